"""Run a study: every arm of a study YAML × every seed with the sequential reference trainer, then tables and plots.

    python experiments/study.py experiments/table3.yaml [--out DIR]

A study YAML holds `base` (a config file path, relative to the study file, or inline keys),
`arms` (name -> config overrides), `seeds` and optionally `out` (default runs/study/<name>) and
`linear_probe` (epochs: each run's last module is then also scored by a linear probe, as
`launch.py evaluate RUN_DIR --linear-probe` does; the table gains a column).
Run i of arm a lands in OUT/a/seed<s>/; a run whose summary.json exists is skipped and an
interrupted one resumes from its newest checkpoint, so an interrupted study continues where it
stopped (each run's folder is locked while it trains: two studies cannot write one run). The final
table (mean ± std over seeds of the last head's test accuracy) is printed last and written to OUT/results.md and
OUT/results.json; OUT/plots/ gets accuracy, SGR-term and ΔL_k curves per arm.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import stop_on_signals, stopped_by  # noqa: E402
from pipeline.checkpoint import (Checkpoint, CheckpointError, DiskFull, RunFileError,  # noqa: E402
                                 complete_checkpoints_quiet, warnings_printed, write_text_atomic)
from pipeline.config import Config, ConfigError, from_dict, load_yaml, read_yaml_mapping, validate  # noqa: E402
from pipeline.data import DataError  # noqa: E402
from pipeline.metrics import read_jsonl  # noqa: E402
from pipeline.rundir import clear_outputs, lock_run_dir, resume_checkpoint  # noqa: E402


def load_study(path: Path) -> dict[str, Any]:
    """The study YAML with `base` resolved to a Config; one-line ConfigError on a malformed study."""
    study = read_yaml_mapping(path, "study file", "experiments/table3.yaml")
    arms = study.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise ConfigError(f"{path}: a study needs `arms`, a mapping of arm name -> config overrides")
    for arm, overrides in arms.items():
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError(f"{path}: arm {arm!r} must map config keys to values (or be empty), got {overrides!r}")
    probe = study.get("linear_probe", 0)
    if isinstance(probe, bool) or not isinstance(probe, int) or probe < 0:
        raise ConfigError(f"{path}: `linear_probe` must be a number of epochs (0: no probe), got {probe!r}")
    seeds = study.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or len(set(map(str, seeds))) < len(seeds):
        raise ConfigError(f"{path}: `seeds` must be a list of distinct integers, e.g. [0, 1, 2], got {seeds!r}")
    if not isinstance(study.get("out", ""), str):
        raise ConfigError(f"{path}: `out` must be a folder path, got {study['out']!r}")
    base = study.get("base", {})
    if isinstance(base, str):
        candidate = path.parent / base
        base_file = candidate if candidate.is_file() else base
        study["base"], study["base_keys"] = load_yaml(base_file), set(read_yaml_mapping(base_file))
    elif isinstance(base, dict):
        study["base"], study["base_keys"] = from_dict(base, source=f"{path} base"), set(base)
    else:
        raise ConfigError(f"{path}: `base` must be a config file's path or a mapping of config keys, got {base!r}")
    study.setdefault("seeds", [0])
    study.setdefault("linear_probe", 0)
    study.setdefault("out", f"runs/study/{path.stem}")
    return study


def arm_config(base: Config, arm: str, overrides: dict[str, Any] | None, seed: Any, run_dir: Path) -> Config:
    """The validated config of one run: base, the arm's overrides, the seed, the run dir; sequential, no progress bar."""
    values = {**(overrides or {}), "seed": seed, "out": str(run_dir), "schedule": "sequential", "progress": False}
    try:
        return validate(from_dict(values, base=base, source=f"arm {arm}"))
    except ConfigError as err:
        raise ConfigError(f"arm {arm}, seed {seed}: {err}") from None


def changed_settings(cfg: Config, run_dir: Path, keys: set[str]) -> str:
    """How the study's own settings (`keys`: those its base and the arm set) differ from the ones the run in `run_dir`
    was trained with ('' if none, or if the run kept nothing: no summary, no checkpoint); keys `auto` in the arm are
    resolved at training, and are not compared."""
    path = run_dir / "config.yaml"
    if not path.exists() or not ((run_dir / "summary.json").exists() or complete_checkpoints_quiet(run_dir)):
        return ""
    saved = read_run_file(path, lambda p: read_yaml_mapping(p, "run config"))
    now = cfg.to_dict()
    differ = [key for key in sorted(keys & now.keys()) if now[key] != "auto" and saved.get(key, now[key]) != now[key]]
    return ", ".join(f"{key}={saved[key]!r} (now {now[key]!r})" for key in differ)


def read_run_file(path: Path, read: Callable[[Path], Any]) -> Any:
    """`read(path)` of a file a study's run wrote; a missing or damaged one is a one-line ConfigError."""
    try:
        return read(path)
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as err:
        raise ConfigError(f"{path} cannot be read ({err}); delete {path.parent} to train that run again") from None


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A run's summary.json: its final test accuracy (None: it diverged), seconds."""
    def parse(path: Path) -> dict[str, Any]:
        summary = json.loads(path.read_text())  # a KeyError, TypeError or ValueError below: not a run's summary
        if summary["final_test_acc"] is not None:  # None: the run diverged
            summary.update(final_test_acc=float(summary["final_test_acc"]), seconds=float(summary["seconds"]))
        return summary
    return read_run_file(run_dir / "summary.json", parse)


def run_study(study: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Train every arm × seed not yet finished (no summary.json), then return one result row per arm. Every run's
    config is built, and compared with what an earlier study trained in its folder, before any run trains."""
    from pipeline.data import load_config_data
    from pipeline.plan import resolve_auto_split

    runs = [(arm, seed, out / arm / f"seed{seed}") for arm in study["arms"] for seed in study["seeds"]]
    configs = {run_dir: arm_config(study["base"], arm, study["arms"][arm], seed, run_dir)
               for arm, seed, run_dir in runs}
    for arm, seed, run_dir in runs:
        if changed := changed_settings(configs[run_dir], run_dir, study["base_keys"] | set(study["arms"][arm] or {})):
            raise ConfigError(f"arm {arm}, seed {seed}: {run_dir} was trained with {changed}; restore the arm's "
                              f"settings, or delete {run_dir} to train it with the new ones")
    datasets: dict[tuple, Any] = {}
    for arm, seed, run_dir in runs:
        cfg = configs[run_dir]
        if finished(run_dir, study["linear_probe"]):
            print(f"[study] {arm} seed {seed}: done before, skipped", flush=True)
            continue
        key = (cfg.dataset, cfg.data_dir, cfg.image_size, cfg.train_subset)
        if key not in datasets:
            datasets[key] = load_config_data(cfg)
        data = datasets[key]
        cfg, _ = resolve_auto_split(cfg, data.in_channels, data.num_classes, data.input_size)
        with contextlib.closing(lock_run_dir(run_dir)):  # a second study writing this run is refused
            train_and_probe(cfg, data, run_dir, study["linear_probe"], f"{arm} seed {seed}")
    return collect(study, out)


def finished(run_dir: Path, probe_epochs: int) -> bool:
    """Whether a run has its summary and, if the study probes, its linear probe (a diverged run has none to take)."""
    if not (run_dir / "summary.json").exists():
        return False
    diverged = read_summary(run_dir)["final_test_acc"] is None
    return not probe_epochs or diverged or (run_dir / "linear_probe.json").exists()


def train_and_probe(cfg: Config, data: Any, run_dir: Path, probe_epochs: int, name: str) -> None:
    """Train one run of the study (an interrupted one continues from its checkpoint) and take its linear probe; the
    caller holds the run directory's lock, so every file of the run, a diverged run's summary too, is written under it."""
    from pipeline.trainer import SequentialTrainer

    if not (run_dir / "summary.json").exists():
        print(f"[study] {name}: training -> {run_dir}", flush=True)
        try:
            SequentialTrainer(cfg, data, run_dir, resume=interrupted_at(cfg, data, run_dir)).run()
        except FloatingPointError as err:  # a diverged arm is a result too: recorded, and the study goes on
            print(f"[study] {name}: diverged: {err}", flush=True)
            write_text_atomic(run_dir / "summary.json", json.dumps({"final_test_acc": None, "diverged": str(err)}))
            return
    if not finished(run_dir, probe_epochs):
        print(f"[study] {name}: linear probe", flush=True)
        probe_run(cfg, data, run_dir, probe_epochs)


def interrupted_at(cfg: Config, data: Any, run_dir: Path) -> Checkpoint | None:
    """The checkpoint an interrupted run of this arm continues from, or None (train from the start, after clearing
    what the run left): none saved, a greedy run (not resumable), or a run killed after its last one."""
    from pipeline.data import steps_per_epoch
    from pipeline.stages import split_cuts

    if complete_checkpoints_quiet(run_dir) and cfg.method != "greedy":
        fix = f"delete {run_dir} to train this run from the start"
        cuts = split_cuts(cfg, data.in_channels, data.num_classes, data.input_size)
        with warnings_printed():  # a torn checkpoint skipped: one line, as launch.py prints it
            checkpoint = resume_checkpoint(cfg, cuts, fix)
        if checkpoint.step < steps_per_epoch(data, cfg.batch_size) * cfg.epochs:
            print(f"[study] resuming {run_dir} from step {checkpoint.step}", flush=True)
            return checkpoint
    clear_outputs(run_dir)
    return None


def probe_run(cfg: Config, data: Any, run_dir: Path, epochs: int) -> float:
    """The linear probe of a finished run's newest checkpoint (RUN_DIR/linear_probe.json)."""
    import torch

    from pipeline.checkpoint import newest_good_checkpoint
    from pipeline.export import restore_steps
    from pipeline.linear_probe import probe_checkpoint

    checkpoint = newest_good_checkpoint(run_dir)
    _, steps = restore_steps(cfg, data, checkpoint, torch.device("cpu"))
    return probe_checkpoint(cfg, data, checkpoint, steps, run_dir, epochs, torch.device("cpu"))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def collect(study: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """One row per arm: the last head's final test accuracy per seed, its mean ± std, and the final mean SGR term."""
    rows = []
    for arm in study["arms"]:
        accs, sgrs, seconds, probes = [], [], [], []
        for seed in study["seeds"]:
            run_dir = out / arm / f"seed{seed}"
            summary = read_summary(run_dir)
            if summary["final_test_acc"] is None:
                continue
            accs.append(100 * summary["final_test_acc"])
            seconds.append(summary["seconds"])
            _, sgr = sgr_curve(read_run_file(run_dir / "metrics.jsonl", read_jsonl))
            sgrs.append(sgr[-1] if sgr else 0.0)
            if (run_dir / "linear_probe.json").exists():
                probes.append(100 * read_run_file(run_dir / "linear_probe.json",
                                                  lambda p: float(json.loads(p.read_text())["test_acc"])))
        mean, std = mean_std(accs) if accs else (float("nan"), float("nan"))
        rows.append({"arm": arm, "overrides": study["arms"][arm], "seeds": study["seeds"], "test_acc": accs,
                     "diverged": len(study["seeds"]) - len(accs), "mean": mean, "std": std,
                     "final_sgr": statistics.fmean(sgrs) if sgrs else float("nan"),
                     "seconds": statistics.fmean(seconds) if seconds else float("nan"), "probe_acc": probes})
    return rows


def sgr_curve(records: list[dict]) -> tuple[list[int], list[float]]:
    """Steps and the SGR term averaged over modules 2..K at each training record (the paper's Figure 2)."""
    by_step: dict[int, list[float]] = {}
    for r in records:
        if r["event"] == "train" and r["module"] > 1:
            by_step.setdefault(r["step"], []).append(r["sgr"])
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def format_table(rows: list[dict[str, Any]]) -> str:
    """The markdown results table (with a linear-probe column when a run was probed; test acc is the last head's, or
    k-NN's for Barlow Twins' modules)."""
    probed = any(r.get("probe_acc") for r in rows)
    probe_head, probe_rule = (" linear probe % (mean ± std) |", "---|") if probed else ("", "")
    lines = [f"| arm | overrides | test acc % (mean ± std) | per seed |{probe_head} final SGR term | s/run |",
             f"|---|---|---|---|{probe_rule}---|---|"]
    for r in rows:
        overrides = ", ".join(f"{k}={v}" for k, v in (r["overrides"] or {}).items())
        per_seed = " / ".join([f"{a:.2f}" for a in r["test_acc"]] + ["diverged"] * r["diverged"])
        probe = ""
        if probed:
            probe = " {:.2f} ± {:.2f} |".format(*mean_std(r["probe_acc"])) if r.get("probe_acc") else " – |"
        lines.append(f"| {r['arm']} | {overrides} | {r['mean']:.2f} ± {r['std']:.2f} | {per_seed} |{probe} "
                     f"{r['final_sgr']:.3g} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def plot_study(study: dict[str, Any], out: Path) -> list[Path]:
    """accuracy.png, sgr.png and delta_loss.png in OUT/plots: seed-averaged curves per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    runs = {arm: [read_run_file(out / arm / f"seed{s}" / "metrics.jsonl", read_jsonl) for s in study["seeds"]
                  if read_summary(out / arm / f"seed{s}")["final_test_acc"] is not None]
            for arm in study["arms"]}
    figures = {name: plt.subplots(figsize=(6, 4)) for name in ("accuracy", "sgr", "delta_loss")}
    for arm, records in runs.items():
        if not records:
            continue
        evals = [[r for r in rec if r["event"] == "eval"] for rec in records]
        steps = [r["step"] for r in evals[0]]
        acc = [statistics.fmean(100 * e[i]["test_acc"][-1] for e in evals) for i in range(len(steps))]
        figures["accuracy"][1].plot(steps, acc, marker="o", label=arm)
        curves = [sgr_curve(rec) for rec in records]
        if any(v > 0 for c in curves for v in c[1]):  # arms without a measured SGR term (the BP-free baselines) are left out
            n = min(len(c[1]) for c in curves)
            figures["sgr"][1].plot(curves[0][0][:n], [statistics.fmean(c[1][i] for c in curves) for i in range(n)], label=arm)
        probed = [i for i, r in enumerate(evals[0]) if r.get("delta_loss") and r["delta_loss"][-1] is not None]
        if probed:  # ΔL_k averaged over modules 2..K and seeds (the paper's Figure 3)
            values = [statistics.fmean(d for e in evals for d in e[i]["delta_loss"][1:]) for i in probed]
            figures["delta_loss"][1].plot([steps[i] for i in probed], values, marker="o", label=arm)
    labels = {"accuracy": "test accuracy of the last head (%)", "sgr": "SGR term, mean over modules 2..K",
              "delta_loss": "ΔL_k, mean over modules 2..K"}
    written = []
    for name, (fig, ax) in figures.items():
        ax.set(xlabel="training step", ylabel=labels[name])
        if name == "sgr" and any(line.get_ydata().min() > 0 for line in ax.lines):
            ax.set_yscale("log")
        if name == "delta_loss":
            ax.axhline(0, color="gray", lw=0.5)
        if ax.get_legend_handles_labels()[0]:  # an arm's curve (a bare zero line has no label)
            ax.legend()
        fig.tight_layout()
        fig.savefig(plot_dir / f"{name}.png", dpi=100)
        plt.close(fig)
        written.append(plot_dir / f"{name}.png")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run every arm × seed of a study YAML, then tabulate and plot.")
    p.add_argument("study", help="study YAML (base, arms, seeds, out)")
    p.add_argument("--out", help="output directory (default: the study's `out`)")
    args = p.parse_args(argv)
    again = "free some space and run the study again (finished runs are skipped, an interrupted one resumes)"
    stop_on_signals()
    try:
        study = load_study(Path(args.study))
        out = Path(args.out or study["out"])
        rows = run_study(study, out)
        plot_study(study, out)
        table = format_table(rows)
        write_text_atomic(out / "results.md", f"# {Path(args.study).name}\n\n{table}\n", fix=again)
        write_text_atomic(out / "results.json", json.dumps(rows, indent=1), fix=again)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (DiskFull, DataError, RunFileError) as err:  # each names its file
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM / SIGHUP (Terminated): the checkpoints saved so far are kept
        said, code = stopped_by(err)
        with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
            print(f"{said}: run the study again to continue (finished runs are skipped, the interrupted one resumes "
                  "from its newest checkpoint)", file=sys.stderr)
        return code
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
