import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

import launch
from pipeline.config import Config, from_dict, load_yaml
from pipeline.data import eval_batches, load_data
from pipeline.export import load_exported
from tests.pipeline.test_data import write_image_folder

ROOT = Path(__file__).parents[1]
DIGITS = ["--dataset", "digits", "--model", "resnet8", "--epochs", "1", "--batch-size", "32", "--no-progress"]


def test_cli_runs_a_job_and_flags_override_the_yaml(tmp_path, capsys):
    out = tmp_path / "run"
    assert launch.main([*DIGITS, "--method", "layerwise", "--stages", "2", "--out", str(out), "--set", "lr=0.05"]) == 0
    printed = capsys.readouterr().out
    assert "layerwise | resnet8 | K=2" in printed and "final test accuracy (last head)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["test_acc"]) == 2
    assert "lr: 0.05" in (out / "config.yaml").read_text()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--method", "dgl"], "error: unknown method 'dgl'"),
        (["--lam", "-1"], "error: lam must be >= 0"),
        (["--stages", "9"], "error: stages=9 is out of range: this model has 4 units"),
        (["--stages", "9", "--set", "split=auto"], "error: stages=9 is out of range: model resnet8 has 4 units"),
        (["--set", "colour=blue"], "error: unknown key 'colour' in command line"),
        (["--config", "configs/missing.yaml"], "error: config file configs/missing.yaml not found"),
        (["--dataset", "fashion_mnist", "--data-dir", "/nonexistent"], "error: Fashion-MNIST file"),
    ],
)
def test_bad_input_is_one_line_before_training(tmp_path, capsys, argv, message):
    assert launch.main([*DIGITS, "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--device", "cuda"], "error: device cuda asked for but no CUDA GPU is visible; use --device cpu"),
        (["--method", "greedy"], "error: method greedy trains modules one after another; run it with --schedule sequential"),
        (["--replicas", "[1,2]"], "error: replicas lists 2 values but the split has 3 stages; give one per stage"),
        (["--replicas", "3"], "error: batch_size 32 does not split evenly over 3 replicas"),
        (["--replicas", "2", "--schedule", "sequential"], "error: replicas are processes of the pipeline"),
        (["--replicas", "two"], "error: config key 'replicas' must be an integer or a list of them (one per stage) or auto"),
    ],
)
def test_topology_errors_come_before_any_process_starts(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert launch.main([*DIGITS, "--out", str(tmp_path / "run"), *argv]) == 2
    assert capsys.readouterr().err.startswith(message)
    assert not (tmp_path / "run").exists()


def test_one_gpu_per_stage_is_checked_against_the_split(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    argv = [*DIGITS, "--out", str(tmp_path / "run"), "--stages", "3", "--device", "cuda", "--set", "gpus=[0,1]"]
    assert launch.main(argv) == 2
    assert capsys.readouterr().err == ("error: gpus lists 2 devices but the run has 3 stage processes; give one GPU per "
                                       "process (stage by stage, replicas in order)\n")


def test_replicas_auto_on_the_cpu_runs_one_process_per_stage(tmp_path, capsys):
    assert launch.main([*DIGITS, "--out", str(tmp_path / "run"), "--stages", "2", "--replicas", "auto",
                        "--set", "train_subset=64"]) == 0
    assert "replicas auto: [1, 1] (one per stage: no more GPUs than stages to spread over)" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["replicas"] == [1, 1]


def test_cli_as_a_program(tmp_path):
    proc = subprocess.run(
        [sys.executable, "launch.py", *DIGITS, "--out", str(tmp_path / "run"), "--set", "train_subset=256"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[eval] step 8: test accuracy per head: M1" in proc.stdout


def test_a_temp_folder_too_deep_for_unix_sockets_is_one_line_before_anything_starts(tmp_path):
    deep = tmp_path / ("t" * max(1, 90 - len(str(tmp_path))))  # over 75 bytes: the forkserver's socket would not fit
    deep.mkdir()
    proc = subprocess.run([sys.executable, "launch.py", *DIGITS, "--out", str(tmp_path / "run")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(deep)})
    assert proc.returncode == 2
    assert proc.stderr == (f"error: the temp folder {deep} has a {len(str(deep))}-byte path, and the run's Unix "
                           "sockets in it need one of at most 75; set TMPDIR to a shorter folder\n")
    assert not list(deep.iterdir())  # nothing was started there


def test_a_finished_run_exports_evaluates_plots_and_refuses_what_would_lose_it(tmp_path, capsys):
    out = tmp_path / "run"
    run = [*DIGITS, "--stages", "2", "--threads", "1", "--out", str(out), "--set", "train_subset=256"]
    assert launch.main(run) == 0  # the asynchronous pipeline
    summary = json.loads((out / "summary.json").read_text())
    assert {p.name for p in (out / "plots").iterdir()} >= {"loss.png", "sgr.png", "accuracy.png"}
    capsys.readouterr()

    # export: plain PyTorch, the exported model's accuracy is the pipeline's final evaluation
    assert launch.main(["export", str(out)]) == 0
    model = load_exported(out / "model.pt")
    data = load_data("digits", train_subset=256)
    exported = torch.load(out / "model.pt", weights_only=True)
    assert torch.equal(exported["mean"], data.mean) and torch.equal(exported["std"], data.std)
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in eval_batches(data, 1000))
    assert correct / len(data.test_y) == summary["final_test_acc"]
    assert launch.main(["evaluate", str(out)]) == 0
    assert f"M2 {100 * summary['final_test_acc']:.2f}%" in capsys.readouterr().out

    # what would lose or mix up the saved run is refused with one line
    for argv, message in (
        (run, f"error: {out} holds checkpoints of an earlier run: continue it with --resume {out}"),
        (["--resume", str(out), "--stages", "3"], "but this config has cuts=[2, 3], stages=3"),
        (["--resume", str(out)], f"error: {out} already finished at step 8; raise --epochs to train further"),
        (["--resume", str(tmp_path / "nothing")], "is not a run directory (no config.yaml)"),
        (["export", str(tmp_path / "nothing")], "is not a run directory (no config.yaml)"),
        (["export", str(out), "--to", str(out / "checkpoints" / "step00000008" / "stage1.pt")],
         "would overwrite the run's own checkpoints/step00000008/stage1.pt; name another file"),
        (["export", str(out), "--to", str(out / "config.yaml")], "would overwrite the run's own config.yaml"),
        (["export", str(out), "--to", str(out / "plots" / "loss.png")], "would overwrite the run's own plots/loss.png"),
        (["export", str(out), "--to", str(tmp_path / "no" / "m.pt")], f"the folder {tmp_path / 'no'} does not exist"),
        (["export", str(out), "--to", str(tmp_path)], "is a folder; name a file"),
    ):
        assert launch.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    config = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(config.replace("batch_size: 32", "batch_size: 16"))  # edited after training
    for tool in ("export", "evaluate"):  # the checkpoint would be rebuilt as another network, or scored on other data
        assert launch.main([tool, str(out)]) == 2
        assert "was trained with batch_size=32, but this config has batch_size=16; " \
               f"{out / 'config.yaml'} is not the config it was trained with" in capsys.readouterr().err
    (out / "config.yaml").write_text(config)
    assert launch.main(["evaluate", str(out)]) == 0  # nothing of the run was lost


def test_plan_prints_the_split_that_split_auto_then_trains_with(tmp_path, capsys):
    assert launch.main(["plan", *DIGITS, "--stages", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("plan: resnet8, sgr (λ=1.0), K=3, batch 32, cpu; measured at batches 4 and 5, extrapolated")
    cuts = printed[-1].split("]")[0].removeprefix("cuts [")
    bounds = [0, *map(int, cuts.split(",")), 4]
    assert [line.split()[:2] for line in printed[2:5]] == [[str(k + 1), f"{bounds[k]}-{bounds[k + 1] - 1}"] for k in range(3)]
    out = tmp_path / "run"
    argv = [*DIGITS, "--stages", "3", "--set", "split=auto", "--set", "train_subset=64", "--out", str(out)]
    assert launch.main([*argv, "--schedule", "sequential"]) == 0
    assert f"split auto: cuts [{cuts.replace(',', ', ')}]" in capsys.readouterr().out
    saved = (out / "config.yaml").read_text()
    assert "split:\n" + "".join(f"- {c}\n" for c in cuts.split(",")) in saved
    assert launch.main([*argv, "--resume", str(out), "--epochs", "2"]) == 0  # the pipeline resumes with the planned cuts


def test_plan_with_gpus_prints_the_layout_the_planner_predicts_fastest(capsys):
    assert launch.main(["plan", *DIGITS, "--stages", "3", "--gpus", "5"]) == 0
    printed = capsys.readouterr().out
    layout = printed.split("| stage | units | replicas |")[1].split("\n\n")[0].splitlines()[2:]
    counts = [int(row.split(" | ")[2]) for row in layout]
    busy = [float(row.split(" | ")[6].rstrip(" |")) for row in layout]
    assert len(counts) == 3 and sum(counts) <= 5 and all(32 % c == 0 for c in counts)
    assert max(busy) == 1.0  # the slowest stage sets the pace
    assert "| one device per stage, cuts [" in printed and "| global BP, plain data parallel | 5 |" in printed
    assert f"--replicas [{','.join(map(str, counts))}] (torchrun: --nproc-per-node {sum(counts)})" in printed
    assert "the all-reduce is left out: measure its bandwidth with bench/allreduce.py" in printed
    # an all-reduce slower than any step saved: one replica per stage
    assert launch.main(["plan", *DIGITS, "--stages", "3", "--gpus", "5", "--set", "allreduce_gbps=0.000001"]) == 0
    printed = capsys.readouterr().out
    assert "--replicas [1,1,1]" in printed and "then its gradient all-reduce at 1e-06 GB/s" in printed
    data_parallel = printed.split("| global BP, plain data parallel | 5 | ")[1].split(" | ")
    assert float(data_parallel[1]) > 10  # global BP's data parallelism pays the all-reduce too


@pytest.mark.parametrize("argv,message", [
    (["--method", "bp"], "error: method bp trains the whole network as one module: there is no split to plan"),
    (["--stages", "9"], "error: stages=9 is out of range: model resnet8 has 4 units, so use 1..4"),
    (["--stages", "3", "--gpus", "2"], "error: --gpus 2 is fewer than the 3 stages; give at least 3"),
    (["--stages", "3", "--gpus", "4", "--memory-cap", "0.0001"], "error: no layout of 3 stages fits 0 MiB per device"),
    (["--stages", "3", "--gpus", "4", "--memory-cap", "nan"], "error: --memory-cap must be a positive number of GiB"),
    (["--stages", "3", "--gpus", "4", "--memory-cap", "-1"], "error: --memory-cap must be a positive number of GiB"),
    (["--stages", "3", "--gpus", "4", "--set", "local_loss=barlow_twins", "--set", "head=projector", "--set",
      "last_head=projector", "--set", "augment=true", "--set", "probe_size=0"],
     "error: local_loss barlow_twins trains one process per stage (replicas: 1), so --gpus would plan"),
])
def test_plan_refuses_what_it_cannot_plan_in_one_line(capsys, argv, message):
    assert launch.main(["plan", *DIGITS, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_bf16_on_a_gpu_without_it_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda: False)
    argv = [*DIGITS, "--out", str(tmp_path / "run"), "--device", "cuda", "--set", "amp=bf16"]
    assert launch.main(argv) == 2
    assert capsys.readouterr().err == ("error: amp: bf16 asked for but the GPU of cuda has no bfloat16 support "
                                       "(pre-Ampere); use amp: fp32\n")



@pytest.mark.parametrize("argv, message", [
    (["--set", "split=[1,"], "error: override 'split=[1,': the value is not valid YAML"),
    (["--set", "lr=null"], "error: config key 'lr' needs a value, got null"),
    (["--lr", "inf"], "error: config key 'lr' must be a finite number, got inf"),
    (["--lam", "inf"], "error: config key 'lam' must be a finite number, got inf"),
    (["--set", "peer_timeout=.inf"], "error: config key 'peer_timeout' must be a finite number, got inf"),
    (["--set", "log_every=true"], "error: config key 'log_every' must be an integer, got True"),
    (["--set", "image_size=0"], "error: image_size must be >= 8 pixels, got 0"),
    (["--set", "model_args={widths: [-4, 8]}"], "error: model_args {'widths': [-4, 8]}: sizes and counts must be >= 1"),
    (["--set", "split={a: 1}"], "error: split must be a name (per_block, auto, ...) or a list of whole cut points"),
    (["--stages", "2", "--set", "split=[2.5]"], "error: split must be a name"),
    (["--stages", "2", "--set", "split=[true]"], "error: split must be a name"),
    (["--seed", str(2**62)], f"error: seed must be in 0..{2**32 - 1}, got {2**62}"),
    (["--resume", "latest", "--fresh"], "error: --resume continues a run and --fresh starts one over: give one"),
    (["--resume", ""], "error: --resume needs a run directory"),  # an unset shell variable: not the default job
    (["--out", ""], "error: out is empty: give the run directory"),  # not the current folder
    (["--set", "head_width=-3"], "error: head_width must be >= 0"),
])
def test_bad_values_on_the_command_line_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert launch.main([*DIGITS, "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_resume_names_its_own_run_directory_so_out_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("dataset: digits\n")
    assert launch.main(["--resume", str(tmp_path / "run"), "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume {tmp_path / 'run'} writes into that run's own directory: drop --out "
                          f"{tmp_path / 'other'}")
    assert not (tmp_path / "other").exists()


def test_a_signal_before_the_run_starts_is_one_line_with_the_signals_exit_code(monkeypatch, capsys):
    for error, code, line in ((KeyboardInterrupt(), 130, "interrupted\n"), (launch.Terminated(), 143, "terminated\n"),
                              (launch.Terminated(signal.SIGHUP), 129, "hung up\n")):
        def stopped(*_args, error=error):
            raise error
        monkeypatch.setattr(launch, "build_config", stopped)  # where Ctrl-C or SIGTERM lands while the run starts
        assert launch.main([*DIGITS]) == code
        assert capsys.readouterr().err == line


def test_a_hangup_stops_the_run_as_sigterm_does_unless_nohup_ignores_it():
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    saved = {sig: signal.getsignal(sig) for sig in stop_signals}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # the terminal's session
        launch.stop_on_signals()
        with pytest.raises(launch.Terminated) as raised:
            os.kill(os.getpid(), signal.SIGHUP)
        assert launch.stopped_by(raised.value) == ("hung up", 129)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # `nohup launch.py ...`
        launch.stop_on_signals()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_binary_config_file_is_one_line(tmp_path, capsys):
    (tmp_path / "bin.yaml").write_bytes(b"lr: 0.1\nseed: \x00\x01\xff\xfe\n")
    assert launch.main(["--config", str(tmp_path / "bin.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"error: config file {tmp_path / 'bin.yaml'} is not text (binary bytes); give a YAML file\n"


def test_evaluate_picks_again_when_a_live_run_prunes_the_checkpoint_it_picked(tmp_path, capsys, monkeypatch):
    import pipeline.export

    out = tmp_path / "run"
    assert launch.main([*DIGITS, "--schedule", "sequential", "--threads", "1", "--out", str(out), "--set",
                        "train_subset=256", "--set", "checkpoint_every=4"]) == 0
    picked, restore = [], pipeline.export.restore_steps

    def pruned_under_it(cfg, data, checkpoint, device):  # the live run's prune, between the pick and the read
        picked.append(checkpoint.step)
        if len(picked) == 1:
            shutil.rmtree(checkpoint.path)
        return restore(cfg, data, checkpoint, device)

    monkeypatch.setattr(pipeline.export, "restore_steps", pruned_under_it)
    capsys.readouterr()
    assert launch.main(["evaluate", str(out)]) == 0
    assert picked == [8, 4] and "[eval] step 4:" in capsys.readouterr().out


def test_a_second_launcher_on_a_live_run_directory_is_refused_and_deletes_nothing(tmp_path, capsys, monkeypatch):
    from pipeline.rundir import lock_run_dir

    run_dir = tmp_path / "run"
    held = lock_run_dir(run_dir)  # what a running launcher holds
    (run_dir / "checkpoints" / "step00000004").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"event": "train", "step": 4}\n')
    (run_dir / "config.yaml").write_text(yaml.safe_dump(Config(dataset="digits", out=str(run_dir)).to_dict()))
    for stray_rank in (False, True):  # RANK alone (no WORLD_SIZE > 1) is not torchrun's: it once skipped the lock
        if stray_rank:
            monkeypatch.setenv("RANK", "1")
        for extra in ([], ["--fresh"]):
            assert launch.main([*DIGITS, "--out", str(run_dir), *extra]) == 2
            assert capsys.readouterr().err == (f"error: {run_dir} is in use by another run (pid {os.getpid()}); wait "
                                               "for it to end, stop it, or choose another --out\n")
    monkeypatch.delenv("RANK")
    assert (run_dir / "checkpoints" / "step00000004").is_dir()
    assert (run_dir / "metrics.jsonl").read_text() == '{"event": "train", "step": 4}\n'
    held.close()  # the first run ends: the directory is free again
    for left in ("trace.json", "model.pt", "linear_probe.json"):  # what the earlier run and tools on it wrote
        (run_dir / left).write_text("{}")
    assert launch.main([*DIGITS, "--out", str(run_dir), "--fresh", "--epochs", "1", "--set", "train_subset=128",
                        "--schedule", "sequential"]) == 0
    assert not any((run_dir / left).exists() for left in ("trace.json", "model.pt", "linear_probe.json"))
    assert '"step": 4}' not in (run_dir / "metrics.jsonl").read_text()  # only the new run's records


def test_a_corrupted_newest_checkpoint_is_skipped_and_the_resumed_run_ends_as_an_uninterrupted_one(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = [*DIGITS, "--out", str(run_dir), "--schedule", "sequential", "--threads", "1", "--set", "train_subset=128",
            "--set", "checkpoint_every=1", "--set", "keep_checkpoints=10", "--set", "probe_size=0"]
    assert launch.main(argv) == 0
    final = {k: torch.load(run_dir / "checkpoints" / "step00000004" / f"stage{k}.pt", weights_only=True)
             for k in (1, 2, 3)}
    shutil.rmtree(run_dir / "checkpoints" / "step00000004")  # as if killed after step 3's checkpoint
    stage2 = run_dir / "checkpoints" / "step00000003" / "stage2.pt"
    data = bytearray(stage2.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size
    stage2.write_bytes(bytes(data))
    capsys.readouterr()
    assert launch.main(["--resume", str(run_dir), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert f"warning: skipping checkpoint {stage2.parent}: stage2.pt does not match its SHA-256 in the manifest" in err
    assert f"resuming {run_dir} from step 2" in out
    assert "settings changed" not in out  # the same settings as the run's
    for k, state in final.items():
        resumed = torch.load(run_dir / "checkpoints" / "step00000004" / f"stage{k}.pt", weights_only=True)
        for part in ("module", "head"):
            assert all(torch.equal(v, resumed[part][n]) for n, v in state[part].items()), (k, part)
    for step in (1, 2, 3):  # no good checkpoint left (the resumed run rewrote step 3): one line, exit 2
        (run_dir / "checkpoints" / f"step{step:08d}" / "manifest.json").write_text("{}")
    shutil.rmtree(run_dir / "checkpoints" / "step00000004")
    assert launch.main(["--resume", str(run_dir), "--no-progress"]) == 2
    no_checkpoint = f"error: {run_dir} has no complete, uncorrupted checkpoint (newest: step00000003: the " \
                    "manifest's step is None, not a positive integer); start the run over (its training command, " \
                    "with --fresh)\n"
    assert capsys.readouterr().err.endswith(no_checkpoint)
    for tool in ("evaluate", "export"):  # the tools refuse it in one line too
        assert launch.main([tool, str(run_dir)]) == 2
        assert capsys.readouterr().err.endswith(no_checkpoint)


def test_a_resume_that_changes_settings_says_which_before_config_yaml_records_the_new_ones(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert launch.main([*DIGITS, "--out", str(run_dir), "--schedule", "sequential", "--set", "train_subset=64"]) == 0
    capsys.readouterr()
    assert launch.main(["--resume", str(run_dir), "--epochs", "2", "--lr", "0.05", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run_dir} from step 2\nwith settings changed from the run's config.yaml: epochs 1 -> 2, " \
           "lr 0.1 -> 0.05\n" in out
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["lr"] == 0.05
    cfg = from_dict({"epochs": 3}, base=load_yaml(run_dir / "config.yaml"))  # torchrun: one rank says it, not each
    args = argparse.Namespace(resume=str(run_dir), fresh=False)
    resumed = f"resuming {run_dir} from step 4\nwith settings changed from the run's config.yaml: epochs 2 -> 3\n"
    for rank, said in ((1, ""), (0, resumed)):
        assert launch.find_resume(args, cfg, load_data("digits"), 6, rank).step == 4
        assert capsys.readouterr().out == said


def test_an_out_that_is_a_file_is_one_line_and_leaves_no_ipc_folder(tmp_path, capsys):
    before = set(Path(tempfile.gettempdir()).glob("sgr-*"))
    (tmp_path / "file").write_text("not a folder")
    assert launch.main([*DIGITS, "--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == (f"error: --out {tmp_path / 'file'} cannot be a run directory (File exists); "
                                       "give a writable folder\n")
    assert set(Path(tempfile.gettempdir()).glob("sgr-*")) <= before


def test_a_barlow_twins_run_is_scored_by_knn_and_by_a_linear_probe_on_request(tmp_path, capsys):
    out = tmp_path / "bt"
    run = [*DIGITS, "--stages", "2", "--threads", "1", "--out", str(out), "--schedule", "sequential",
           "--set", "train_subset=256", "--set", "local_loss=barlow_twins", "--set", "head=projector",
           "--set", "last_head=projector", "--set", "projector_width=32", "--set", "augment=true",
           "--set", "probe_size=0", "--set", "knn_bank=256"]
    assert launch.main(run) == 0
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert launch.main(["evaluate", str(out)]) == 0  # k-NN against the same bank: the run's own final numbers
    assert f"M2 {100 * summary['final_test_acc']:.2f}%" in capsys.readouterr().out

    assert launch.main(["evaluate", str(out), "--linear-probe", "--probe-epochs", "30"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "linear_probe.json").read_text())
    records = [json.loads(line) for line in (out / "linear_probe.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(30)) and records[-1]["test_acc"] == result["test_acc"]
    assert result["test_acc"] > 0.3 and f"{100 * result['test_acc']:.2f}%" in printed  # 10 classes: chance is 0.1
    assert launch.main(["evaluate", str(out), "--linear-probe", "--probe-epochs", "0"]) == 2
    assert "--probe-epochs must be >= 1" in capsys.readouterr().err
    assert launch.main(["evaluate", str(out), "--device", "gpu"]) == 2
    assert "device must be cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err


def test_the_tools_on_a_run_that_logged_nothing_or_a_damaged_one_are_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("dataset: digits\n")
    assert launch.main(["plot", str(run_dir)]) == 2
    missing = f"error: {run_dir / 'metrics.jsonl'} does not exist: the run has logged nothing to plot yet\n"
    assert capsys.readouterr().err == missing
    (run_dir / "metrics.jsonl").write_text('{"event": "train"}\nnot json\n')
    assert launch.main(["plot", str(run_dir)]) == 2
    assert capsys.readouterr().err == f"error: {run_dir / 'metrics.jsonl'} line 2 is not JSON; the file was edited " \
                                      "or damaged\n"
    (run_dir / "trace.json").mkdir()
    assert launch.main(["trace", str(run_dir)]) == 2
    assert capsys.readouterr().err == f"error: cannot read {run_dir / 'trace.json'} (Is a directory)\n"


def test_what_would_damage_a_saved_run_or_another_folder_is_one_line_and_changes_nothing(tmp_path, capsys):
    out, other = tmp_path / "run", tmp_path / "other"
    run = [*DIGITS, "--stages", "2", "--threads", "1", "--out", str(out), "--schedule", "sequential",
           "--set", "train_subset=128"]
    out.mkdir()
    (out / "plots").write_text("a file where the plots go")
    assert launch.main(run) == 0  # trained and saved: only the pictures are missing, and it says so
    assert "warning: plots not written" in capsys.readouterr().err
    (out / "plots").unlink()
    config, step = (out / "config.yaml").read_text(), out / "checkpoints" / "step00000004"
    for change, key in ((["--set", "probe_size=64"], "probe_size"), (["--set", "head_width=8"], "head_width"),
                        (["--set", "local_loss=infopro"], "local_loss")):  # shapes a checkpoint holds
        assert launch.main(["--resume", str(out), "--epochs", "2", *change]) == 2
        err = capsys.readouterr().err
        assert f"was trained with {key}=" in err and err.count("\n") == 1, err
    assert (out / "config.yaml").read_text() == config  # refused before the run wrote anything

    other.mkdir()  # another run's checkpoint, a device-like file, a file taken for a folder
    shutil.copytree(out / "checkpoints", other / "checkpoints")
    (other / "config.yaml").write_text(config)
    os.mkfifo(tmp_path / "fifo")
    for to, message in ((other / "checkpoints" / step.name / "stage1.pt",
                         f"would overwrite the run {other}'s checkpoints/{step.name}/stage1.pt"),
                        (tmp_path / "fifo", "is not a regular file"),
                        (tmp_path / "fifo" / "m.pt", f"the folder {tmp_path / 'fifo'} is a file, not a folder")):
        assert launch.main(["export", str(out), "--to", str(to)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert (tmp_path / "fifo").is_fifo()

    mine = tmp_path / "mine"  # --fresh in a folder that is not a run's
    (mine / "plots").mkdir(parents=True)
    (mine / "model.pt").write_text("someone's model")
    assert launch.main([*DIGITS, "--out", str(mine), "--fresh"]) == 2
    assert "is not a run directory (no config.yaml) and holds plots, model.pt" in capsys.readouterr().err
    assert (mine / "model.pt").read_text() == "someone's model" and (mine / "plots").is_dir()

    records = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(records + "not json\n")  # a damaged record log
    assert launch.main(["--resume", str(out), "--epochs", "2"]) == 2
    assert "is not JSON; the file was edited or damaged; repair it or move it away, then resume" in \
        capsys.readouterr().err
    (out / "metrics.jsonl").write_text(records)

    stage1 = step / "stage1.pt"  # a file that passes its checksum but is not the module's state
    torch.save({"module": torch.zeros(3)}, stage1)
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"]["stage1.pt"] = {"bytes": stage1.stat().st_size, "sha256": hashlib.sha256(stage1.read_bytes())
                                      .hexdigest()}
    (step / "manifest.json").write_text(json.dumps(manifest))
    for argv in (["evaluate", str(out)], ["--resume", str(out), "--epochs", "2"]):
        assert launch.main(argv) == 2
        err = capsys.readouterr().err
        assert f"error: {stage1} does not hold this module's state (" in err and err.count("\n") == 1, err


def test_a_file_of_the_run_that_cannot_be_written_is_one_line_and_keeps_the_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "summary.json").mkdir(parents=True)  # written last, after the final checkpoint
    run = [*DIGITS, "--stages", "2", "--threads", "1", "--out", str(out), "--schedule", "sequential",
           "--set", "train_subset=128"]
    assert launch.main(run) == 1
    assert capsys.readouterr().err == f"error: cannot write {out / 'summary.json'}: Is a directory\n"
    assert (out / "checkpoints" / "step00000004" / "manifest.json").is_file()


def test_plan_and_models_have_help_of_their_own(capsys):
    with pytest.raises(SystemExit) as done:
        launch.main(["plan", "--help"])
    printed = capsys.readouterr().out
    assert done.value.code == 0 and printed.startswith("usage: launch.py plan")
    assert "--gpus GPUS" in printed and "--memory-cap" in printed and "--stages STAGES" in printed
    assert "--fresh" not in printed and "--epochs" not in printed  # training flags a plan takes but ignores
    assert launch.main(["models", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: launch.py models")
    assert launch.main(["models", "extra"]) == 2


@pytest.mark.parametrize("schedule", ["sequential", "pipeline"])
def test_a_corrupt_image_ends_the_run_with_one_line_naming_it(tmp_path, capfd, schedule):
    write_image_folder(tmp_path / "folder")
    broken = tmp_path / "folder" / "train" / "ant" / "0.png"
    broken.write_bytes(b"\x89PNG but cut short")
    argv = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "folder"), "--set", "image_size=16",
            "--stages", "2", "--batch-size", "2", "--epochs", "1", "--threads", "1", "--no-progress",
            "--set", "loader_workers=0", "--schedule", schedule, "--out", str(tmp_path / "run")]
    assert launch.main(argv) == 1
    # a stage writes to the stderr its forkserver had when it started (this test's, when it started the forkserver):
    # at most its own one line, never a traceback
    lines = capfd.readouterr().err.splitlines()
    assert lines[-1].startswith("error: ") and f"cannot decode image {broken} (" in lines[-1]
    assert len(lines) <= (1 if schedule == "sequential" else 2) and "Traceback" not in "".join(lines), lines
    assert all(line.startswith("stage 1: DataError: cannot decode image") for line in lines[:-1])


@pytest.mark.parametrize("environment,message", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer"),
    ({"WORLD_SIZE": "3", "RANK": "5"}, "WORLD_SIZE=3 needs a RANK from 0 to 2, got 5"),
    ({"WORLD_SIZE": "3", "RANK": "0"}, "WORLD_SIZE=3 without MASTER_ADDR and MASTER_PORT"),
])
def test_torchrun_variables_set_by_hand_that_cannot_work_are_one_line(tmp_path, capsys, monkeypatch, environment,
                                                                      message):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert launch.main([*DIGITS, "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (f"error: {message}; start the run with torchrun (which sets these variables), "
                                       "or unset WORLD_SIZE to let launch.py spawn it\n")
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_a_rank_waiting_for_torchrun_peers_that_never_come_stops_on_sigterm(tmp_path):
    """torch's rendezvous waits in C++, where Python's handlers never run: SIGTERM once did nothing for 30 minutes."""
    import socket
    import time

    with socket.socket() as probe:  # a free port for the rendezvous that no other rank will join
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "launch.py", *DIGITS, "--stages", "2", "--out", str(tmp_path / "run")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "run dir" in proc.stdout.readline()  # rank 0's header: next, it waits for rank 1
        time.sleep(2)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)  # it never returned before
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode in (-signal.SIGTERM, 143)  # 143: a slow start got it before the rendezvous began
