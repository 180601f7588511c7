"""The CUDA paths, run whenever a GPU is present (skipped otherwise); scripts/gpu_check.sh runs them first.

The decisions around them (placement, which tensors go by IPC, dtypes, where checkpoints load)
are pure functions tested on the CPU in tests/workers and tests/pipeline; here the real CUDA
calls run: IPC between processes, pinned copies, bf16 on the wire, a resume on the GPU.
"""
import dataclasses
import multiprocessing as mp
from pathlib import Path

import msgpack
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import zmq

from bench.gpu_check import STRESS_MESSAGES, check_transport, written_late
from pipeline.checkpoint import load_stage_state, save_atomic, stage_state
from pipeline.config import Config
from pipeline.data import eval_batches, load_data, steps_per_epoch, train_batches
from pipeline.heads import build_head
from pipeline.losses import barlow_twins_loss
from pipeline.schedule import run_epochs
from pipeline.sgr import sgr_term
from pipeline.stages import build_local_modules, build_stage_steps, configure_torch
from pipeline.syncbn import convert_sync_bn
from workers.ipc_check import cuda_ipc_error
from workers.placement import LinkKind
from workers.replicas import join_group
from workers.transport import CudaIpcPayload, Receiver, Sender, encode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda:0")


def test_cuda_ipc_works_between_two_processes_on_this_gpu():
    assert cuda_ipc_error("cuda:0", "cuda:0") is None


def test_transport_stress_between_three_processes_by_cuda_ipc():
    assert check_transport("cuda:0").startswith(f"{STRESS_MESSAGES} messages")


def test_the_stress_producer_sends_while_the_writes_of_its_tensors_are_still_queued():
    out = written_late({"a": torch.arange(1000.0, device=CUDA)}, sleep_cycles=200_000_000)  # ~0.1 s: a margin
    assert not torch.cuda.current_stream(CUDA).query()  # the restoring copies still wait behind the sleep
    torch.cuda.synchronize(CUDA)
    assert torch.equal(out["a"].cpu(), torch.arange(1000.0))


def test_labels_and_empty_tensors_travel_as_frames_even_on_an_ipc_link():
    frames = encode({}, {"x": torch.ones(4, device=CUDA), "y": torch.arange(4, device=CUDA),
                         "empty": torch.empty(0, device=CUDA)}, CudaIpcPayload())
    meta = {m["name"]: m for m in msgpack.unpackb(frames[0], raw=False)["tensors"]}
    assert "ipc" in meta["x"] and "ipc" not in meta["y"] and "ipc" not in meta["empty"]
    assert len(frames) == 3  # the header, then frames for y and the empty tensor


def _forwarder(in_endpoint: str, out_endpoint: str) -> None:
    ctx = zmq.Context()
    receiver = Receiver(ctx, in_endpoint, timeout_s=60, device=CUDA)
    sender = Sender(ctx, out_endpoint, LinkKind.CUDA_IPC, depth=1, timeout_s=60)
    message = receiver.recv()
    sender.send({}, {"x": message.tensors["x"]})  # received by IPC: cannot be re-shared, must go as a frame
    sender.drain()
    receiver.done(message)
    ctx.destroy(linger=1000)


def test_a_tensor_received_by_ipc_is_forwarded_without_the_reshare_crash(tmp_path):
    ctx = zmq.Context()
    last = Receiver(ctx, f"ipc://{tmp_path}/b", timeout_s=60, device=CUDA)
    first = Sender(ctx, f"ipc://{tmp_path}/a", LinkKind.CUDA_IPC, depth=1, timeout_s=60)
    middle = mp.get_context("spawn").Process(target=_forwarder, args=(f"ipc://{tmp_path}/a", f"ipc://{tmp_path}/b"))
    middle.start()
    x = torch.randn(64, 64, device=CUDA)
    first.send({}, {"x": x})
    message = last.recv()
    assert torch.equal(message.tensors["x"], x)
    last.done(message)
    first.drain()
    middle.join(timeout=60)
    assert middle.exitcode == 0
    ctx.destroy(linger=0)


def test_uint8_batches_normalised_on_the_gpu_equal_the_host_normalised_ones():
    data = load_data("digits")
    for (gx, gy), (cx, cy) in zip(train_batches(data, 0, 64, 3, True, device=CUDA), train_batches(data, 0, 64, 3, True)):
        assert gx.is_cuda and torch.equal(gx.cpu(), cx) and torch.equal(gy, cy)
    gx, _ = next(eval_batches(data, 100, CUDA))
    assert torch.equal(gx.cpu(), next(eval_batches(data, 100))[0])


def test_the_run_loop_draws_gpu_batches_in_its_thread_equal_to_the_host_ones():
    cfg = Config(dataset="digits", batch_size=64, epochs=2, augment=True)
    data = load_data("digits")
    spe = steps_per_epoch(data, cfg.batch_size)
    for (_, _, gpu), (_, _, cpu) in zip(run_epochs(cfg, data, spe, device=CUDA), run_epochs(cfg, data, spe)):
        for g, c in zip(gpu, cpu):  # drawn, copied and normalised by the prefetch thread, read by this one
            assert g.x.is_cuda and torch.equal(g.x.cpu(), c.x) and torch.equal(g.y, c.y)


def test_bf16_activations_and_delta_cross_between_modules_on_the_gpu():
    cfg = Config(dataset="digits", model="resnet8", stages=2, batch_size=8, amp="bf16", device="cuda:0", progress=False)
    local = build_local_modules(cfg, 1, 10, 8)
    for lm in local:
        lm.module.to(CUDA)
        lm.head.to(CUDA)
    first, second = build_stage_steps(cfg, local, steps_per_epoch=4)
    y = torch.randint(0, 10, (8,), device=CUDA)
    result = first.train_step(torch.randn(8, 1, 8, 8, device=CUDA), None, y)
    assert result.out.dtype == torch.bfloat16 and result.delta.dtype == torch.bfloat16
    assert torch.isfinite(second.train_step(result.out, result.delta, y).stats.sgr)


def test_a_resume_on_the_gpu_keeps_adam_step_counters_on_the_cpu(tmp_path):
    cfg = Config(dataset="digits", model="resnet8", stages=2, batch_size=8, optimizer="adamw", device="cuda:0",
                 progress=False)

    def step_on_gpu():
        local = build_local_modules(cfg, 1, 10, 8)
        for lm in local:
            lm.module.to(CUDA)
            lm.head.to(CUDA)
        return build_stage_steps(cfg, local, steps_per_epoch=4)[0]

    step = step_on_gpu()
    step.train_step(torch.randn(8, 1, 8, 8, device=CUDA), None, torch.randint(0, 10, (8,), device=CUDA))
    save_atomic(stage_state(step, CUDA), tmp_path / "stage1.pt")
    fresh = step_on_gpu()
    load_stage_state(fresh, tmp_path / "stage1.pt", CUDA)
    for state in fresh.optimizer.state.values():
        assert state["step"].device.type == "cpu" and state["exp_avg"].is_cuda


def test_a_replica_group_runs_its_collectives_and_sync_batchnorm_over_nccl(tmp_path):
    # replicas sharing one GPU use gloo (NCCL refuses two ranks of a group on one device), so a group of one is how
    # one GPU runs NCCL's side: float buckets, float64 sums, int64 digests and BatchNorm counters, SGR's double
    # backward through SyncBatchNorm's all-reduces
    group = join_group(str(tmp_path / "store"), 0, 1, "nccl", 60, CUDA)
    try:
        module = convert_sync_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(CUDA), None)
        x = torch.randn(2, 3, 8, 8, device=CUDA, requires_grad=True)
        (delta,) = torch.autograd.grad(module(x).square().sum(), x, create_graph=True)
        delta.square().sum().backward()
        grads = [p.grad.clone() for p in module.parameters()]
        group.average_gradients(list(module.parameters()))
        assert all(torch.equal(p.grad, g) for p, g in zip(module.parameters(), grads))  # the mean over one replica
        assert group.all_sum([1.5, 2, torch.tensor(3.0, device=CUDA)]) == [1.5, 2.0, 3.0]
        before = {name: t.clone() for name, t in module.state_dict().items()}
        group.broadcast_buffers([module])
        assert all(torch.equal(module.state_dict()[name], t) for name, t in before.items())
        group.check_same([module], "stage 1", 1)
        group.finish()
    finally:
        dist.destroy_process_group()


def test_replicated_stages_on_the_gpu_equal_the_reference(tmp_path):
    """Replicas [1, 2] with every process on the GPUs this machine has (on one GPU the replicas share it: gloo with
    CUDA tensors; on two, NCCL); SyncBatchNorm's all-reduces and the gradient buckets run on CUDA tensors."""
    from tests.workers.test_pipeline import pipeline_states, reference, run_pipeline, small_config
    from tests.workers.test_replicated_pipeline import assert_close_to

    cfg = small_config(tmp_path, stages=2, replicas=[1, 2], epochs=1, eval_every=3, device="cuda",
                       deterministic=True)
    result = run_pipeline(cfg)
    assert result["replicas"] == [1, 2]
    trainer, _ = reference(dataclasses.replace(cfg, device="cuda:0"), tmp_path)
    assert_close_to(trainer, pipeline_states(Path(cfg.out), 2))


def test_infopro_images_travel_through_a_gpu_pipeline_as_in_the_reference(tmp_path):
    """Stage 1 makes the uint8 images on its GPU; they go on as host frames (a tensor received by IPC cannot be
    shared again) and each stage moves its copy to its device. Deterministic kernels need nearest upsampling."""
    from tests.workers.test_pipeline import assert_bit_identical, pipeline_states, reference, run_pipeline, small_config

    cfg = small_config(tmp_path, stages=3, method="infopro", epochs=1, device="cuda", deterministic=True,
                       decoder_upsampling="nearest")
    run_pipeline(cfg)
    trainer, _ = reference(dataclasses.replace(cfg, device="cuda:0"), tmp_path)
    assert_bit_identical(trainer, pipeline_states(Path(cfg.out), 3))  # compared on the host


def test_barlow_twins_views_and_knn_bank_run_through_a_gpu_pipeline_as_in_the_reference(tmp_path):
    """Two views per image as one 2N batch on the GPU; the k-NN bank's features and labels live on each stage's GPU."""
    from tests.workers.test_pipeline import (assert_bit_identical, eval_records, pipeline_states, reference, run_pipeline,
                                             small_config)

    cfg = small_config(tmp_path, stages=3, epochs=1, device="cuda", deterministic=True, local_loss="barlow_twins",
                       head="projector", last_head="projector", projector_width=16, augment=True, probe_size=0,
                       knn_bank=96, knn_k=5)
    run_pipeline(cfg)
    trainer, _ = reference(dataclasses.replace(cfg, device="cuda:0"), tmp_path)
    assert_bit_identical(trainer, pipeline_states(Path(cfg.out), 3))  # compared on the host
    assert eval_records(Path(cfg.out)) == eval_records(tmp_path / "reference")


def test_an_fp32_run_convolves_in_ieee_fp32_on_the_gpu():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 64, 16, 16, generator=g), torch.randn(64, 64, 3, 3, generator=g)
    configure_torch(Config(), CUDA)  # tf32: false, the default (PyTorch's own lets cuDNN convolve in TF32)
    out = nn.functional.conv2d(x.to(CUDA), w.to(CUDA)).cpu().double()
    exact = nn.functional.conv2d(x.double(), w.double())
    error = float((out - exact).abs().max() / exact.abs().max())
    assert error < 1e-5, error  # fp32 sums of 576 products; TF32's 10-bit mantissa gives about 1e-3


def _sgr_gradients_through_a_projector() -> list[torch.Tensor]:
    """One SGR update's gradients for a conv and a Barlow Twins projector head on the GPU, from fixed seeds."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1).to(CUDA)
    head = build_head("projector", 16, 10, width=16).to(CUDA)
    x = torch.randn(64, 8, 6, 6, device=CUDA, requires_grad=True)
    delta_prev = torch.randn(64, 8, 6, 6, device=CUDA)
    loss = barlow_twins_loss(*head(conv(x)).chunk(2), 0.005)
    (delta_now,) = torch.autograd.grad(loss, x, create_graph=True)
    (loss + 50.0 * sgr_term(delta_now, delta_prev)).backward()
    return [p.grad for p in [*conv.parameters(), *head.parameters()]]


def test_sgr_through_a_projector_head_repeats_to_the_bit_on_the_gpu():
    """nn.BatchNorm1d's double backward differed from run to run on an H200 (deterministic algorithms on, and
    torch did not flag it); the projector's PlainBatchNorm is plain tensor ops, whose kernels repeat."""
    configure_torch(Config(deterministic=True), CUDA)
    first, second = _sgr_gradients_through_a_projector(), _sgr_gradients_through_a_projector()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
