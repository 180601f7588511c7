import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings

import pytest
import torch

from pipeline.checkpoint import (CheckpointError, DiskFull, RunFileError, check_finite, checkpoint_dir,
                                 complete_checkpoints, fingerprint, gist, latest_checkpoint, load_stage_state, prune,
                                 save_atomic, stage_state, write_manifest, write_text_atomic)
from pipeline.config import Config
from pipeline.stages import build_local_modules, build_stage_steps

FINGERPRINT = {"model": "resnet8", "cuts": [2, 3], "stages": 3}


def fake_checkpoint(run_dir, step, stages=3, test_acc=None, fingerprint=FINGERPRINT):
    path = checkpoint_dir(run_dir, step)
    for k in range(stages):
        save_atomic({"k": torch.full((4,), float(k))}, path / f"stage{k + 1}.pt")
    write_manifest(path, step, 0, fingerprint, stages, test_acc)
    return path


def test_only_sealed_and_whole_checkpoints_count(tmp_path):
    fake_checkpoint(tmp_path, 10)
    no_manifest = fake_checkpoint(tmp_path, 20)
    (no_manifest / "manifest.json").unlink()
    truncated = fake_checkpoint(tmp_path, 30)
    data = (truncated / "stage2.pt").read_bytes()
    (truncated / "stage2.pt").write_bytes(data[: len(data) // 2])
    missing = fake_checkpoint(tmp_path, 40)
    (missing / "stage3.pt").unlink()
    with pytest.warns(UserWarning) as caught:
        found = complete_checkpoints(tmp_path)
    assert [c.step for c in found] == [10]
    messages = " ".join(str(w.message) for w in caught)
    assert "step00000020: no readable manifest" in messages
    assert "step00000030: stage2.pt is missing or truncated" in messages
    assert "step00000040: stage3.pt is missing or truncated" in messages
    with warnings.catch_warnings(record=True):
        assert latest_checkpoint(tmp_path, FINGERPRINT).step == 10  # the torn ones are skipped for it


def test_a_run_with_another_model_or_split_is_refused(tmp_path):
    fake_checkpoint(tmp_path, 10)
    with pytest.raises(CheckpointError, match=r"was trained with cuts=\[2, 3\], stages=3, but this config has "
                                              r"cuts=\[2\], stages=2; resume with the run's own config"):
        latest_checkpoint(tmp_path, {**FINGERPRINT, "cuts": [2], "stages": 2})
    with pytest.raises(CheckpointError, match="has no complete, uncorrupted checkpoint"):
        latest_checkpoint(tmp_path / "empty", FINGERPRINT)


def test_a_key_a_manifest_predates_is_not_compared_and_one_it_holds_is(tmp_path):
    fake_checkpoint(tmp_path, 10)  # written before train_subset was part of the fingerprint
    assert latest_checkpoint(tmp_path, {**FINGERPRINT, "train_subset": 256}).step == 10
    fake_checkpoint(tmp_path, 20, fingerprint={**FINGERPRINT, "train_subset": 512})
    with pytest.raises(CheckpointError, match="with train_subset=512, but this config has train_subset=256"):
        latest_checkpoint(tmp_path, {**FINGERPRINT, "train_subset": 256})


def test_prune_keeps_the_newest_and_the_best(tmp_path):
    for step, acc in ((10, 0.5), (20, 0.9), (30, 0.6), (40, 0.7), (50, None)):
        fake_checkpoint(tmp_path, step, test_acc=acc)
    for torn_step in (35, 45, 60):
        (fake_checkpoint(tmp_path, torn_step) / "manifest.json").unlink()
    shutil.copytree(tmp_path / "checkpoints" / "step00000010", tmp_path / "checkpoints" / "step00000010.keep")
    prune(tmp_path, keep_last=2)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # best (0.9) + newest two; folders without a manifest are left alone, and so is a user's copy
    assert left == ["step00000010.keep", "step00000020", "step00000035", "step00000040", "step00000045",
                    "step00000050", "step00000060"]
    prune(tmp_path, keep_last=2, sealed=40)  # at the seal of step 40 (a resumed run's, say: 50 is newer already)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # a torn folder older than the step just sealed is what a run that died while saving left (checkpoints are
    # sealed in step order); a newer one may be one being written
    assert left == ["step00000010.keep", "step00000020", "step00000040", "step00000045", "step00000050",
                    "step00000060"]


def test_manifest_is_written_last_and_lists_sizes_and_checksums(tmp_path):
    path = fake_checkpoint(tmp_path, 7, stages=2, test_acc=0.25)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 7 and manifest["test_acc"] == 0.25
    assert manifest["files"] == {f"stage{k}.pt": {"bytes": (path / f"stage{k}.pt").stat().st_size,
                                                  "sha256": hashlib.sha256((path / f"stage{k}.pt").read_bytes()).hexdigest()}
                                 for k in (1, 2)}
    assert not list(path.glob("*.tmp"))


def test_stage_state_round_trips_weights_optimizer_schedule_and_rng(tmp_path):
    cfg = Config(dataset="digits", stages=2, epochs=1)
    local = build_local_modules(cfg, 1, 10, 8)
    step = build_stage_steps(cfg, local, 5)[1]
    with torch.no_grad():
        x = local[0].module(torch.randn(8, 1, 8, 8))  # module 2's input
    y, delta, probe = torch.randint(0, 10, (8,)), torch.randn_like(x), torch.randn_like(x[:3])
    step.train_step(x, delta, y)
    save_atomic(stage_state(step, torch.device("cpu"), probe), tmp_path / "s.pt")
    expected_rng = torch.get_rng_state()
    fresh = build_stage_steps(cfg, build_local_modules(cfg, 1, 10, 8), 5)[1]
    torch.manual_seed(123)
    assert torch.equal(load_stage_state(fresh, tmp_path / "s.pt", torch.device("cpu")), probe)
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert fresh.scheduler.last_epoch == step.scheduler.last_epoch == 1
    assert torch.equal(fresh.rng_state["cpu"], step.rng_state["cpu"])  # the module's own stream (dropout) goes on
    # both continue identically
    a, b = step.train_step(x, delta, y), fresh.train_step(x, delta, y)
    assert torch.equal(a.stats.loss, b.stats.loss)
    assert all(torch.equal(p, q) for p, q in zip(step.module.parameters(), fresh.module.parameters()))


def test_the_fingerprint_changes_with_the_optimizer_whose_state_is_saved():
    sgd, adamw = fingerprint(Config(), [2, 3]), fingerprint(Config(optimizer="adamw"), [2, 3])
    assert [key for key in sgd if sgd[key] != adamw[key]] == ["optimizer"]


def test_checkpoints_load_on_the_cpu_and_adam_step_counters_stay_there(tmp_path, monkeypatch):
    cfg = Config(dataset="digits", model="resnet8", stages=2, batch_size=8, optimizer="adamw", progress=False)
    step = build_stage_steps(cfg, build_local_modules(cfg, 1, 10, 8), steps_per_epoch=4)[0]
    step.train_step(torch.randn(8, 1, 8, 8), None, torch.randint(0, 10, (8,)))
    save_atomic(stage_state(step, torch.device("cpu"), torch.randn(2, 1, 8, 8)), tmp_path / "stage1.pt")
    locations = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: locations.append(kw.get("map_location")) or real_load(*a, **kw))
    fresh = build_stage_steps(cfg, build_local_modules(cfg, 1, 10, 8), steps_per_epoch=4)[0]
    probe = load_stage_state(fresh, tmp_path / "stage1.pt", torch.device("cpu"))
    assert locations == ["cpu"]  # on a GPU, map_location=device would put Adam's `step` there: two syncs per parameter
    steps = [s["step"] for s in fresh.optimizer.state.values()]
    assert steps and all(t.device.type == "cpu" and t.dtype == torch.float32 and float(t) == 1.0 for t in steps)
    assert probe.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("manifest, why", [
    ({}, "the manifest's step is None"),
    ([], "the manifest is not a JSON object"),
    ({"step": 20, "epoch": 0, "fingerprint": FINGERPRINT, "files": None}, "the manifest lists no stage files"),
    ({"step": 20, "epoch": 0, "files": {"stage1.pt": 1}}, "the manifest has no fingerprint"),
    ({"step": 30, "epoch": 0, "fingerprint": FINGERPRINT, "files": {"stage1.pt": 1}},
     "the manifest says step 30 but the folder is step00000020 (edited?)"),
    ({"step": 20, "epoch": 0, "fingerprint": FINGERPRINT, "files": {"stage2.pt": 1}},
     "the manifest lists ['stage2.pt'], not stage1.pt..stage1.pt"),
    ({"step": 20, "epoch": 0, "fingerprint": FINGERPRINT, "files": {"stage1.pt": "big"}},
     "the manifest's entry for stage1.pt is 'big'"),
])
def test_a_malformed_manifest_is_skipped_and_the_previous_checkpoint_used(tmp_path, manifest, why):
    fake_checkpoint(tmp_path, 10)
    bad = fake_checkpoint(tmp_path, 20)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=f"skipping checkpoint .*step00000020: {re.escape(why)}"):
        assert latest_checkpoint(tmp_path, FINGERPRINT).step == 10


@pytest.mark.parametrize("damage", ["one_byte", "garbage"])
def test_a_corrupted_stage_file_fails_its_checksum_and_the_previous_checkpoint_is_used(tmp_path, damage):
    fake_checkpoint(tmp_path, 10)
    bad = fake_checkpoint(tmp_path, 20)
    data = bytearray((bad / "stage2.pt").read_bytes())
    if damage == "one_byte":  # same size: only the checksum can tell
        data[len(data) // 2] ^= 0xFF
    else:
        data = bytearray(random.Random(0).randbytes(len(data)))
    (bad / "stage2.pt").write_bytes(bytes(data))
    assert [c.step for c in complete_checkpoints(tmp_path)] == [10, 20]  # sizes agree
    with pytest.warns(UserWarning, match="step00000020: stage2.pt does not match its SHA-256 in the manifest"):
        assert latest_checkpoint(tmp_path, FINGERPRINT).step == 10
    (checkpoint_dir(tmp_path, 10) / "stage1.pt").write_bytes(b"x" * (checkpoint_dir(tmp_path, 10) / "stage1.pt").stat().st_size)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="has no complete, uncorrupted checkpoint"):
        latest_checkpoint(tmp_path, FINGERPRINT)


def test_format_1_manifests_of_sizes_only_still_count(tmp_path):
    path = fake_checkpoint(tmp_path, 10)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {name: entry["bytes"] for name, entry in manifest["files"].items()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert latest_checkpoint(tmp_path, FINGERPRINT).step == 10


def test_non_finite_state_is_never_checkpointed():
    cfg = Config(dataset="digits", model="resnet8", stages=2, batch_size=8, progress=False)
    step = build_stage_steps(cfg, build_local_modules(cfg, 1, 10, 8), steps_per_epoch=4)[0]
    check_finite(step, 1)  # a fresh module is fine
    bn = next(name for name, _ in step.module.named_buffers() if name.endswith("running_var"))
    step.module.get_buffer(bn).fill_(float("inf"))
    with pytest.raises(FloatingPointError, match=f"module 1's module.{bn} is not finite .* not checkpointed"):
        check_finite(step, 1)


def test_a_full_disk_while_saving_is_one_line_naming_the_file_and_the_space(tmp_path, monkeypatch):
    import collections

    import pipeline.checkpoint as checkpoint_module

    def no_space(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 64 vs 0")  # torch.save's words

    monkeypatch.setattr(checkpoint_module.torch, "save", no_space)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 1024, 1024))
    path = tmp_path / "step00000004" / "stage1.pt"
    with pytest.raises(checkpoint_module.DiskFull) as err:
        save_atomic({"w": torch.zeros(2**18)}, path)
    assert str(err.value) == (f"disk full writing {path}: 0.0 MiB free, about 1.0 MiB needed; free some space "
                              "(or choose another --out) and resume")
    assert not path.exists() and not path.with_suffix(".pt.tmp").exists()


def test_a_checkpoint_folder_that_cannot_be_made_or_written_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import pipeline.checkpoint as checkpoint_module

    path = tmp_path / "step00000004" / "stage1.pt"
    refuse = PermissionError(errno.EPERM, "Operation not permitted")  # a read-only or immutable run folder
    monkeypatch.setattr(checkpoint_module.Path, "mkdir", lambda *args, **kwargs: (_ for _ in ()).throw(refuse))
    with pytest.raises(checkpoint_module.RunFileError) as err:
        save_atomic({"w": torch.zeros(4)}, path)
    assert str(err.value) == f"cannot write {path}: Operation not permitted"
    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(refuse))
    with pytest.raises(checkpoint_module.RunFileError, match=f"^cannot write {path}: Operation not permitted$"):
        save_atomic({"w": torch.zeros(4)}, path)
    assert not path.exists() and not path.with_suffix(".pt.tmp").exists()


def test_a_full_disk_while_rewriting_a_small_file_of_the_run_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    write_text_atomic(path, "lr: 0.1\n")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(DiskFull, match=f"disk full writing {path}"):
        write_text_atomic(path, "lr: 0.2\n")
    assert path.read_text() == "lr: 0.1\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    monkeypatch.undo()
    (tmp_path / "summary.json").mkdir()
    with pytest.raises(RunFileError, match=f"cannot write {tmp_path / 'summary.json'}: Is a directory"):
        write_text_atomic(tmp_path / "summary.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "summary.json"]  # no .tmp left


def test_a_stage_file_that_loads_but_is_not_the_modules_state_is_a_checkpoint_error_naming_it(tmp_path):
    cfg = Config(dataset="digits", model="resnet8", stages=2)
    steps = build_stage_steps(cfg, build_local_modules(cfg, 1, 10, 8), steps_per_epoch=4)
    for k, state in enumerate(({"module": torch.zeros(3)}, torch.zeros(3), [1, 2])):
        torch.save(state, tmp_path / f"bad{k}.pt")
        with pytest.raises(CheckpointError, match=rf"{tmp_path / f'bad{k}.pt'} does not hold this module's state \("):
            load_stage_state(steps[0], tmp_path / f"bad{k}.pt", torch.device("cpu"))
    torch.save({**stage_state(steps[1], torch.device("cpu"))}, tmp_path / "stage2.pt")
    with pytest.raises(CheckpointError, match=r"\(RuntimeError: (size mismatch|Missing key|Unexpected key)"):
        load_stage_state(steps[0], tmp_path / "stage2.pt", torch.device("cpu"))  # another module's state


def test_gist_skips_a_heading_line_and_keeps_the_type():
    assert gist(RuntimeError("Error(s) in loading state_dict for Sequential:\n\tsize mismatch for 0.weight")) == \
        "RuntimeError: size mismatch for 0.weight"
    assert gist(KeyError("rng_cpu")) == "KeyError: 'rng_cpu'" and gist(EOFError()) == "EOFError"


def test_a_symlinked_file_of_the_run_stays_a_link_when_rewritten(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "metrics.jsonl").write_text("old\n")
    (tmp_path / "metrics.jsonl").symlink_to(tmp_path / "shared" / "metrics.jsonl")
    write_text_atomic(tmp_path / "metrics.jsonl", "new\n")
    assert (tmp_path / "metrics.jsonl").is_symlink() and (tmp_path / "shared" / "metrics.jsonl").read_text() == "new\n"


def test_the_fingerprint_holds_a_size_only_where_it_shapes_what_is_stored():
    plain = fingerprint(Config(dataset="digits", head="etf", probe_size=0), [2, 3])
    assert not {"image_size", "head_width", "probe_size", "projector_width"} & set(plain)
    shaped = fingerprint(Config(dataset="synthetic", head="conv_linear", probe_size=64), [2, 3])
    assert (shaped["image_size"], shaped["head_width"], shaped["probe_size"]) == (32, 0, 64)
