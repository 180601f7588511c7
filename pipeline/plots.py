"""PNG plots of a run from its metrics.jsonl: losses, SGR term, head accuracies and ΔL_k per module."""
from __future__ import annotations

from pathlib import Path

from pipeline.metrics import read_jsonl


def _series(records: list[dict], key: str) -> dict[int, tuple[list[int], list[float]]]:
    """Per module: (steps, values) of a train-record key."""
    out: dict[int, tuple[list[int], list[float]]] = {}
    for r in records:
        steps, values = out.setdefault(r["module"], ([], []))
        steps.append(r["step"])
        values.append(r[key])
    return out


def plot_run(run_dir: Path) -> list[Path]:
    """Write RUN_DIR/plots/*.png from the run's records; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(out_dir / name)

    for key, label, name in (("loss", "local classification loss", "loss.png"), ("sgr", "SGR term", "sgr.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        series = _series(train, key)
        if key == "sgr":
            series.pop(1, None)  # module 1 has no SGR term
        for module, (steps, values) in sorted(series.items()):
            ax.plot(steps, values, label=f"module {module}")
        if key == "sgr" and len(series) > 1:  # the paper's Figure 2: the term averaged over neighbouring modules
            later = [series[m] for m in sorted(series)]
            common = min(len(s[0]) for s in later)
            mean = [sum(s[1][i] for s in later) / len(later) for i in range(common)]
            ax.plot(later[0][0][:common], mean, "k--", label="mean over modules 2..K")
        ax.set(xlabel="training step", ylabel=label, yscale="log" if key == "sgr" and _positive(series) else "linear")
        if series:
            ax.legend()
        save(fig, name)

    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in range(len(evals[-1]["test_acc"])):
            points = [(r["step"], r["test_acc"][k]) for r in evals if len(r["test_acc"]) > k]
            ax.plot(*zip(*points), marker="o", label=f"head {k + 1}")
        ax.set(xlabel="training step", ylabel="test accuracy")
        ax.legend()
        save(fig, "accuracy.png")
        probed = [r for r in evals if any(d is not None for d in r.get("delta_loss") or [])]
        if probed:  # the paper's Figure 3
            fig, ax = plt.subplots(figsize=(6, 4))
            for k in range(1, len(probed[-1]["delta_loss"])):
                points = [(r["step"], r["delta_loss"][k]) for r in probed if r["delta_loss"][k] is not None]
                ax.plot(*zip(*points), marker="o", label=f"module {k + 1}")
            ax.axhline(0, color="gray", lw=0.5)
            ax.set(xlabel="training step", ylabel="ΔL_k: loss change from earlier modules' updates")
            ax.legend()
            save(fig, "delta_loss.png")
    return written


def _positive(series: dict[int, tuple[list[int], list[float]]]) -> bool:
    return any(v > 0 for _, values in series.values() for v in values)
