"""The asynchronous K-process pipeline against the sequential reference, to the bit, and its lifecycle."""
import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import complete_checkpoints, complete_checkpoints_quiet
from pipeline.config import Config
from pipeline.data import data_shape, load_config_data
from pipeline.metrics import read_jsonl
from pipeline.trainer import SequentialTrainer
from tests.pipeline.test_data import write_image_folder
from workers.coordinator import StageFailed
from workers.launcher import folder_maker, remove_stale_ipc_dirs, run_spawned
from workers.trace import OUTBOX_ROW
from workers.transport import SEGMENT_PREFIX, named_segments

ROOT = Path(__file__).parents[2]


def small_config(tmp_path: Path, **overrides) -> Config:
    values = dict(dataset="digits", model="resnet8", stages=3, method="sgr", lam=50.0, epochs=2, batch_size=32,
                  train_subset=192, lr=0.05, threads=1, progress=False, eval_batch_size=128, log_every=2,
                  eval_every=4, probe_size=64, out=str(tmp_path / "pipeline"))
    values.update(overrides)
    return Config(**values)


def reference(cfg: Config, tmp_path: Path) -> tuple[SequentialTrainer, dict]:
    data = load_config_data(cfg)
    trainer = SequentialTrainer(dataclasses.replace(cfg, schedule="sequential"), data, tmp_path / "reference")
    return trainer, trainer.run()


def pipeline_states(run_dir: Path, stages: int) -> list[dict]:
    """Each stage's state at the run's newest complete checkpoint (the last step)."""
    last = complete_checkpoints(run_dir)[-1]
    assert len(last.manifest["files"]) == stages
    return [torch.load(last.stage_file(k), map_location="cpu", weights_only=True) for k in range(stages)]


def assert_bit_identical(trainer: SequentialTrainer, states: list[dict]) -> None:
    assert len(states) == len(trainer.local)
    for lm, state in zip(trainer.local, states):
        for part, module in (("module", lm.module), ("head", lm.head)):
            expected = module.state_dict()
            assert expected.keys() == state[part].keys()
            for name, value in expected.items():
                assert torch.equal(value.cpu(), state[part][name]), f"{part}.{name} differs"


def run_pipeline(cfg: Config) -> dict:
    data = load_config_data(cfg)
    return run_spawned(cfg, cfg.stages, data_shape(data, cfg.batch_size))


@pytest.mark.parametrize("transport", ["auto", "zmq"])  # CPU stages on one host: shared memory; zmq over ipc://
@pytest.mark.parametrize("stages,method", [(2, "sgr"), (3, "sgr"), (2, "layerwise"), (3, "layerwise"), (3, "reforward"),
                                           (3, "infopro")])  # infopro: uint8 images travel with the activations
def test_pipeline_equals_the_sequential_reference_to_the_bit(tmp_path, stages, method, transport):
    cfg = small_config(tmp_path, stages=stages, method=method, transport=transport)
    result = run_pipeline(cfg)
    assert result["links"] == [{"auto": "shm", "zmq": "zmq"}[transport]] * (stages - 1)
    trainer, expected = reference(cfg, tmp_path)
    assert_bit_identical(trainer, pipeline_states(Path(cfg.out), stages))
    # evaluation flowed through the pipeline behind training batch t: same accuracies and ΔL_k per head
    assert result["test_acc"] == expected["test_acc"] and result["test_top5"] == expected["test_top5"]
    evals = eval_records(Path(cfg.out))
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert evals == eval_records(tmp_path / "reference")
    assert evals[0]["delta_loss"] == [None] * stages and evals[1]["delta_loss"][0] == 0.0
    for k in range(stages):  # the coordinator's timeline of train reports (log_every 2): what benchmarks time
        reports = [r for r in result["timeline"] if r[1] == k]
        assert [r[2] for r in reports] == list(range(2, 13, 2))
        assert all(a[0] <= b[0] and a[3] <= b[3] for a, b in zip(reports, reports[1:]))


@pytest.mark.parametrize("transport", ["auto", "zmq"])
def test_barlow_twins_with_sgr_in_the_pipeline_equals_the_reference_to_the_bit(tmp_path, transport):
    """Both views (each with its photometric recipe) travel as one batch of 2N; before each evaluation the k-NN bank's
    batches flow through every stage."""
    cfg = small_config(tmp_path, transport=transport, local_loss="barlow_twins", head="projector",
                       last_head="projector", projector_width=16, augment=True, photometric="barlow_twins",
                       probe_size=0, knn_bank=96, knn_k=5)
    result = run_pipeline(cfg)
    trainer, expected = reference(cfg, tmp_path)
    assert_bit_identical(trainer, pipeline_states(Path(cfg.out), 3))
    evals = eval_records(Path(cfg.out))
    assert [r["step"] for r in evals] == [4, 8, 12] and evals == eval_records(tmp_path / "reference")
    assert result["test_acc"] == expected["test_acc"] and min(expected["test_acc"]) > 0.1  # k-NN beats chance


def test_a_streamed_image_folder_trains_through_the_pipeline_as_in_the_reference(tmp_path):
    """Only stage 1 decodes images (with loader processes and RandomResizedCrop); the result is the reference's."""
    write_image_folder(tmp_path / "folder", sizes=((40, 30), (30, 40), (36, 36), (24, 50)))
    cfg = small_config(tmp_path, dataset="imagefolder", data_dir=str(tmp_path / "folder"), image_size=16, augment=True,
                       stages=2, train_subset=0, batch_size=4, eval_batch_size=3, probe_size=4, eval_every=2,
                       loader_workers=2)
    trainer, expected = reference(cfg, tmp_path)
    result = run_pipeline(cfg)
    assert_bit_identical(trainer, pipeline_states(Path(cfg.out), 2))
    assert result["final_test_acc"] == expected["final_test_acc"]
    assert eval_records(Path(cfg.out)) == eval_records(tmp_path / "reference")


TINY_VIT = {"patch_size": 8, "num_layers": 3, "hidden_dim": 16, "mlp_dim": 32, "num_heads": 2, "dropout": 0.2,
            "attention_dropout": 0.1}


@pytest.mark.parametrize("model,args,train_subset", [("vit_s16", TINY_VIT, 32), ("swin_t", {}, 8)])
def test_dropout_and_stochastic_depth_in_the_pipeline_draw_as_in_the_reference(tmp_path, model, args, train_subset):
    """Each module draws from its own stream, so K processes and one process agree to the bit (Swin-T: stochastic depth 0.2)."""
    cfg = small_config(tmp_path, dataset="synthetic", image_size=16 if model == "vit_s16" else 32,
                       train_subset=train_subset, model=model, model_args=args, head="token_linear", stages=2,
                       batch_size=8 if model == "vit_s16" else 4, eval_batch_size=64, probe_size=8, optimizer="adamw",
                       lr=1e-3, lam=1.0, epochs=1 if model == "swin_t" else 2)
    trainer, expected = reference(cfg, tmp_path)
    result = run_pipeline(cfg)
    assert_bit_identical(trainer, pipeline_states(Path(cfg.out), 2))
    assert result["final_test_acc"] == expected["final_test_acc"]


def eval_records(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["event"] == "eval"]


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    cfg = small_config(tmp_path, checkpoint_every=6, keep_checkpoints=5)  # 12 steps: checkpoints at 6 and 12
    run_pipeline(cfg)
    full = pipeline_states(Path(cfg.out), 3)
    interrupted = tmp_path / "interrupted"  # as if the run had died after its checkpoint of step 6
    shutil.copytree(cfg.out, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "step00000012")
    resume = complete_checkpoints(interrupted)[-1]
    assert resume.step == 6
    run_spawned(dataclasses.replace(cfg, out=str(interrupted)), 3, data_shape(load_config_data(cfg), 32), resume)
    resumed = pipeline_states(interrupted, 3)
    for a, b in zip(full, resumed):
        for part in ("module", "head"):
            assert all(torch.equal(a[part][name], b[part][name]) for name in a[part])
        assert torch.equal(a["optimizer"]["state"][0]["momentum_buffer"], b["optimizer"]["state"][0]["momentum_buffer"])
    # the records of the resumed run continue the interrupted one's, with no duplicates
    assert eval_records(interrupted) == eval_records(Path(cfg.out))


def test_a_nan_loss_stops_the_run_and_names_the_stage(tmp_path):
    cfg = small_config(tmp_path, lr=1e12, lam=0.0, method="layerwise")
    with pytest.raises(StageFailed, match=r"stage 1 exited with code 1 after step \d+: FloatingPointError: module 1's loss is (nan|inf)"):
        run_pipeline(cfg)
    assert complete_checkpoints(Path(cfg.out)) == []  # nothing non-finite was checkpointed


def test_pipeline_with_sixteen_stages_equals_the_reference(tmp_path):
    # ResNet-32 of width 4 on 8x8 digits: the stem and each of the 15 blocks in its own process
    cfg = small_config(tmp_path, model="resnet32", model_args={"width": 4}, stages=16, epochs=1, train_subset=64,
                       batch_size=16)
    run_pipeline(cfg)
    trainer, _ = reference(cfg, tmp_path)
    assert_bit_identical(trainer, pipeline_states(Path(cfg.out), 16))


def test_a_stage_error_stops_the_run_and_names_the_stage(tmp_path, monkeypatch):
    cfg = small_config(tmp_path, stages=3)
    # the launcher's ipc folder in a temp dir of this test's own: other runs on the host create and remove theirs
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    start = time.time()
    with pytest.raises(StageFailed, match="stage [12] exited with code 1 after step 0: ValueError: the config's split gives 3"):
        run_spawned(cfg, 2, data_shape(load_config_data(cfg), 32))  # the launcher thinks 2 stages, the config's split gives 3
    assert time.time() - start < 60
    assert not list((tmp_path / "tmp").glob("sgr-*"))  # ipc sockets removed


def children_of(pid: int) -> list[int]:
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(Path(stat).parent.name))
    return found


def ignores(pid: int, signum: int) -> bool:
    """Whether process `pid` ignores signal `signum` (the SigIgn mask of /proc/PID/status)."""
    mask = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask.split()[1], 16) >> (signum - 1) & 1)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# a 3-stage run long enough to be interrupted (its run directory: `--out` follows)
LONG_RUN = ["launch.py", "--dataset", "digits", "--epochs", "50", "--batch-size", "16", "--threads", "1",
            "--no-progress", "--set", "log_every=1"]


def start_logging_run(command: list[str], run_dir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `command` (LONG_RUN or its torchrun form) in a session of its own, SIGHUP at its default as in a
    terminal's (not nohup's, whatever ran the tests); return it once every stage logged."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + 120
    while not metrics.exists() or {r.get("module") for r in read_jsonl(metrics)} < {1, 2, 3}:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    return proc


def start_long_run(tmp_path: Path, *extra: str, temp: Path | None = None) -> tuple[subprocess.Popen, list[int]]:
    """LONG_RUN (with TMPDIR `temp` if given); returns the launcher and its stage pids once they train."""
    run_dir = tmp_path / "long"
    proc = start_logging_run([sys.executable, *LONG_RUN, "--out", str(run_dir), *extra], run_dir,
                             None if temp is None else {**os.environ, "TMPDIR": str(temp)})
    stages = stage_pids(proc.pid)
    assert all(maps_shared_memory(pid) for pid in stages)  # CPU stages on one host: shared-memory links
    return proc, stages


def maps_shared_memory(pid: int) -> bool:
    """Whether process `pid` maps a link's shared-memory slot (a producer maps its own, a consumer its producer's)."""
    return f"/dev/shm/{SEGMENT_PREFIX}" in Path(f"/proc/{pid}/maps").read_text()


def segments_left(pids: list[int]) -> list[str]:
    """Shared-memory segments of these processes still named in /dev/shm."""
    return [name for pid in pids for name in named_segments(pid)]


def test_a_traced_run_writes_a_chrome_trace_that_agrees_with_the_summary(tmp_path):
    cfg = small_config(tmp_path, epochs=1, trace=True)
    result = run_pipeline(cfg)
    trace = json.loads((Path(cfg.out) / "trace.json").read_text())
    assert {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"} == \
        {"stage 1", "stage 2", "stage 3", "stage 1 outbox", "stage 2 outbox"}  # CPU stages send from a thread
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    for stage in range(2):  # the outbox's own row: every message written into the link, one after another
        sent = sorted((e for e in spans if e["tid"] == OUTBOX_ROW + stage), key=lambda e: e["ts"])
        assert sum(e["name"] == "link_send" and "step" in e["args"] for e in sent) >= 6
        assert all(a["ts"] + a["dur"] <= b["ts"] for a, b in zip(sent, sent[1:]))
    for stage in range(3):
        mine = sorted((e for e in spans if e["tid"] == stage), key=lambda e: e["ts"])
        names = {e["name"] for e in mine}
        assert {"train", "eval", "checkpoint"} <= names
        assert ("input" in names) == (stage > 0) and ("send" in names) == (stage < 2)  # the ends receive, send nothing
        assert all(a["ts"] + a["dur"] <= b["ts"] for a, b in zip(mine, mine[1:]))  # one stage's spans never overlap
        assert sum(e["name"] == "train" for e in mine) == 6  # 192 / 32 steps
        train = sum(e["dur"] for e in mine if e["name"] == "train")
        waits = sum(e["dur"] for e in mine if e["name"] in ("input", "credit", "send"))
        assert train / (train + waits) == pytest.approx(result["busy_fraction"][stage], abs=0.05)
    shown = subprocess.run([sys.executable, "launch.py", "trace", cfg.out], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    table = shown.stdout.strip().splitlines()
    assert table[1] == "| stage | busy | of which training | waiting for input | waiting for credit | other |"
    assert [row.split(" | ")[0] for row in table[3:]] == ["| 1", "| 2", "| 3"]
    (Path(cfg.out) / "trace.json").unlink()
    missing = subprocess.run([sys.executable, "launch.py", "trace", cfg.out], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2
    assert missing.stderr == (f"error: {Path(cfg.out) / 'trace.json'} does not exist; a traced run writes it when it "
                              "ends, also when it fails: this one is still running, failed before its stages "
                              "reported, had its launcher killed, or its trace was removed\n")
    (Path(cfg.out) / "config.yaml").write_text((Path(cfg.out) / "config.yaml").read_text().replace("trace: true",
                                                                                                 "trace: false"))
    untraced = subprocess.run([sys.executable, "launch.py", "trace", cfg.out], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
    assert untraced.stderr == (f"error: {Path(cfg.out) / 'trace.json'} does not exist; run the pipeline with "
                               "--set trace=true to record one\n")


def forkserver_of(launcher: int) -> int:
    """The process the launcher's stages are forked from (pipeline.lifeline.forkserver)."""
    servers = [pid for pid in children_of(launcher) if "forkserver" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(servers) == 1, f"launcher {launcher} has forkservers {servers}"
    return servers[0]


def stage_pids(launcher: int) -> list[int]:
    """The launcher's stage processes, in stage order."""
    return sorted(children_of(forkserver_of(launcher)))


def assert_a_killed_process_is_named(proc: subprocess.Popen, pids: list[int], victim: int, name: str) -> str:
    """SIGKILL process `victim` (in spawn order) of a long run: the launcher exits 1 within 10 s naming it, and no
    process or shared-memory segment is left; returns what the launcher printed to stderr."""
    killed_at = time.time()
    os.kill(pids[victim], signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert time.time() - killed_at < 10
    assert proc.returncode == 1
    assert f"error: {name} was killed by signal 9 after step" in err
    time.sleep(0.5)
    assert not any(alive(pid) for pid in pids) and not segments_left(pids)
    return err


def test_a_killed_stage_stops_the_whole_run_within_ten_seconds_and_the_run_resumes(tmp_path):
    proc, stages = start_long_run(tmp_path, "--set", "checkpoint_every=5")
    assert len(stages) == 3
    while not complete_checkpoints_quiet(tmp_path / "long"):  # quiet: the run is saving newer ones meanwhile
        time.sleep(0.1)
    err = assert_a_killed_process_is_named(proc, stages, 1, "stage 2")
    assert f"resume with --resume {tmp_path / 'long'}" in err
    kept = complete_checkpoints_quiet(tmp_path / "long")[-1]
    resumed = subprocess.run([sys.executable, "launch.py", "--resume", str(tmp_path / "long"), "--epochs", "1"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {tmp_path / 'long'} from step {kept.step}" in resumed.stdout


def test_a_stage_sent_sigint_alone_is_named_within_ten_seconds(tmp_path):
    """Not the terminal's Ctrl-C (the whole group, the launcher too): one stage's SIGINT once left the launcher
    waiting 30 s for a record the stage never sent, then blaming no one in particular."""
    proc, stages = start_long_run(tmp_path)
    interrupted_at = time.time()
    os.kill(stages[1], signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert time.time() - interrupted_at < 10
    assert proc.returncode == 1
    assert "error: stage 2 exited with code 130 after step" in err and "Interrupted: stopped by SIGINT (Ctrl-C)" in err
    time.sleep(0.5)
    assert not any(alive(pid) for pid in stages) and not segments_left(stages)


def test_a_traced_run_that_fails_keeps_the_trace_of_what_ran(tmp_path):
    """Spans travel with each train report and the error record, so a failed run still shows where stages waited."""
    proc, stages = start_long_run(tmp_path, "--set", "trace=true")
    run_dir = tmp_path / "long"
    deadline = time.time() + 120
    while len(read_jsonl(run_dir / "metrics.jsonl")) < 12:  # a few steps reported by every stage
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.1)
    os.kill(stages[1], signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "error: stage 2 exited with code 130" in err
    trace = json.loads((run_dir / "trace.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    for stage in range(3):
        mine = sorted((e for e in spans if e["tid"] == stage), key=lambda e: e["ts"])
        assert sum(e["name"] == "train" for e in mine) >= 3, stage
        assert all(a["ts"] + a["dur"] <= b["ts"] for a, b in zip(mine, mine[1:]))
    shown = subprocess.run([sys.executable, "launch.py", "trace", str(run_dir)], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    lines = shown.stdout.strip().splitlines()
    assert shown.returncode == 0 and lines[1].startswith("the run did not finish: these are the spans that reached")
    assert [row.split(" | ")[0] for row in lines[4:]] == ["| 1", "| 2", "| 3"]


def assert_a_frozen_process_is_named(tmp_path: Path, victim: int, name: str, *extra: str) -> None:
    """SIGSTOP process `victim` (in spawn order) of a long run with heartbeat_timeout 3: the launcher exits 1 naming
    it as hung, and no process or shared-memory segment is left."""
    proc, pids = start_long_run(tmp_path, "--set", "heartbeat_timeout=3", *extra)
    os.kill(pids[victim], signal.SIGSTOP)  # alive but silent
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert f"error: {name} sent no heartbeat for 3 s (hung) after step" in err
    time.sleep(0.5)
    assert not any(alive(pid) for pid in pids) and not segments_left(pids)


def test_a_hung_stage_is_detected_by_its_missing_heartbeat(tmp_path):
    assert_a_frozen_process_is_named(tmp_path, 1, "stage 2")


def left_in_temp(temp: Path) -> list[str]:
    """What a run left in its temp folder: ipc folders (sgr-*) and multiprocessing's (pymp-*)."""
    return sorted(p.name for p in temp.iterdir() if p.name.startswith(("sgr-", "pymp-")))


def test_ctrl_c_stops_every_process(tmp_path, own_temp):
    proc, stages = start_long_run(tmp_path, temp=own_temp)
    processes = [*stages, forkserver_of(proc.pid)]  # the forkserver too ends with the run
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted: all stages stopped" in err
    time.sleep(0.5)
    assert not any(alive(pid) for pid in processes) and not segments_left(stages)
    assert not left_in_temp(own_temp)


@pytest.mark.parametrize("transport", ["auto", "zmq"])  # one host: shared memory; zmq over tcp://
def test_torchrun_one_process_per_stage_equals_the_reference(tmp_path, transport):
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "launch.py",
           "--stages", "2", "--dataset", "digits", "--epochs", "1", "--batch-size", "32", "--threads", "1", "--lam", "50",
           "--no-progress", "--out", str(out), "--set", "train_subset=128", "--set", "lr=0.05",
           "--set", f"transport={transport}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final test accuracy (last head)" in proc.stdout
    assert json.loads((out / "summary.json").read_text())["links"] == [{"auto": "shm", "zmq": "zmq"}[transport]]
    cfg = small_config(tmp_path, stages=2, epochs=1, train_subset=128, batch_size=32, lam=50.0, lr=0.05,
                       eval_batch_size=1000, log_every=20)
    trainer, expected = reference(cfg, tmp_path)
    assert_bit_identical(trainer, pipeline_states(out, 2))


def start_torchrun_long_run(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, dict[int, int]]:
    """LONG_RUN under `torchrun --nproc-per-node 3`; returns torchrun and its ranks' pids (by local rank) once every
    stage has logged."""
    run_dir = tmp_path / "long"
    proc = start_logging_run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                              *LONG_RUN, "--out", str(run_dir), *extra], run_dir,
                             {**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = {int(dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
                 ["LOCAL_RANK"]): pid for pid in children_of(proc.pid)}
    return proc, ranks


def test_under_torchrun_a_killed_rank_leaves_its_neighbours_one_line_each_and_no_traceback_of_ours(tmp_path):
    proc, ranks = start_torchrun_long_run(tmp_path)
    os.kill(ranks[1], signal.SIGKILL)  # stage 2
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "error: stage 3: PeerLost: stage 2 has gone: it closed its end of the link" in err, err[-3000:]
    assert "error: stage 1: PeerLost: " in err, err[-3000:]  # not replaced by torchrun's SIGTERM ("terminated")
    # no frame of the project's code: no rank's traceback, none from rank 0's coordinator thread or an exit cut short
    assert str(ROOT / "workers") not in err and str(ROOT / "launch.py") not in err, err[-3000:]
    assert "Exception in thread" not in err and "Exception ignored" not in err and "SIGABRT" not in err, err[-3000:]


def test_under_torchrun_a_frozen_rank_is_named_and_killed_by_rank_0_without_waiting_for_torchrun(tmp_path):
    proc, ranks = start_torchrun_long_run(tmp_path, "--set", "heartbeat_timeout=3")
    frozen_at = time.time()
    os.kill(ranks[1], signal.SIGSTOP)  # stage 2: alive but silent, deaf to torchrun's SIGTERM
    _, err = proc.communicate(timeout=90)
    assert time.time() - frozen_at < 20  # torchrun alone would have waited 30 s more to SIGKILL it
    assert proc.returncode != 0
    assert "error: stage 2 sent no heartbeat for 3 s (hung) after step" in err, err[-3000:]
    time.sleep(0.5)
    assert not any(alive(pid) for pid in ranks.values())


def test_torchrun_with_the_wrong_number_of_processes_is_refused(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "launch.py",
           "--stages", "3", "--dataset", "digits", "--no-progress", "--out", str(tmp_path / "x")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "torchrun started 2 processes but the run has 3 stages; use --nproc-per-node 3" in proc.stderr


def test_a_frozen_stage_is_named_within_thirty_seconds_with_the_defaults(tmp_path):
    proc, stages = start_long_run(tmp_path)
    frozen_at = time.time()
    os.kill(stages[1], signal.SIGSTOP)  # alive but silent: its heartbeat thread is frozen too
    _, err = proc.communicate(timeout=90)
    assert time.time() - frozen_at < 30  # named after heartbeat_timeout (20 s), all stopped 3 s later at most
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1].startswith("error: stage 2 sent no heartbeat for 20 s (hung) after step")
    time.sleep(0.5)
    assert not any(alive(pid) for pid in stages)


def test_a_paused_launcher_does_not_declare_a_healthy_stage_hung(tmp_path):
    proc, stages = start_long_run(tmp_path, "--set", "heartbeat_timeout=3")
    os.kill(proc.pid, signal.SIGSTOP)  # the launcher, not a stage: its own pause must not count
    time.sleep(6)  # twice heartbeat_timeout: every stage looks silent when the launcher resumes
    os.kill(proc.pid, signal.SIGCONT)
    time.sleep(4)  # more than heartbeat_timeout after it resumes
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "hung" not in err


def launcher_ipc_dirs(pid: int, temp: Path) -> list[Path]:
    """The ipc folders under the temp folder `temp` that launcher `pid` made."""
    return [folder for folder in temp.glob("sgr-*") if (folder_maker(folder) or (0,))[0] == pid]


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGHUP, 129, "hung up")])
def test_sigterm_or_a_hangup_stops_every_process_and_leaves_nothing_behind(tmp_path, own_temp, sig, code, word):
    proc, stages = start_long_run(tmp_path, temp=own_temp)
    processes = [*stages, forkserver_of(proc.pid)]  # the forkserver too ends with the run
    assert left_in_temp(own_temp)
    if sig == signal.SIGHUP:
        # the launcher stops the stages: a forkserver that died of it would leave it blind to them (their status
        # comes through the server: one still running would read as ended, and be left running)
        assert all(ignores(pid, sig) for pid in processes) and not ignores(proc.pid, sig)
        os.killpg(proc.pid, sig)  # the terminal closed: every process of its session gets it at once
    else:
        proc.send_signal(sig)  # the launcher only, as `kill` or a scheduler would
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert re.search(f"^{word}: all stages stopped; (checkpoint of step \\d+ kept: resume with --resume "
                     f"{re.escape(str(tmp_path / 'long'))}|no checkpoint yet)$", err, re.M), err
    time.sleep(0.5)
    assert not any(alive(pid) for pid in processes) and not left_in_temp(own_temp) and not segments_left(stages)


def test_the_ipc_folder_of_a_launcher_killed_with_sigkill_is_removed_by_the_next_run(tmp_path, own_temp):
    proc, stages = start_long_run(tmp_path, temp=own_temp)
    processes = [*stages, forkserver_of(proc.pid)]  # the forkserver too ends with the run
    left = launcher_ipc_dirs(proc.pid, own_temp)
    assert any(name.startswith("pymp-") for name in left_in_temp(own_temp))
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup can run; the stages die with their parent
    proc.communicate(timeout=30)
    deadline = time.time() + 15
    while any(alive(pid) for pid in processes) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in processes) and all(d.is_dir() for d in left) and left
    assert not segments_left(stages)  # each stage unlinked its own on the SIGTERM its lifeline sent it
    assert not any(name.startswith("pymp-") for name in left_in_temp(own_temp))  # removed by the stages' lifeline
    assert remove_stale_ipc_dirs(own_temp) == left  # what the next launcher does first
    assert not any(d.exists() for d in left)
