"""A PNG of a run's metrics.jsonl: training reward, pass rate and KL to the reference per step, with the
evaluations. matplotlib is optional: without it `write_plot` says so and returns None.

    python plot.py out/metrics.jsonl out/plot.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) in file order. A line that is not JSON names the file and line."""
    train, evals = [], []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number}: not JSON ({e.msg})") from None
        {"train": train, "eval": evals}.get(record.get("kind"), []).append(record)
    return train, evals


def series(records: list[dict], key: str, shift: int = 0) -> tuple[list[int], list[float]]:
    """(steps + shift, values) of `key`, skipping records without it or with null (NaN written as null)."""
    points = [(r["step"] + shift, r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def write_plot(metrics_jsonl: str | Path, png: str | Path) -> Path | None:
    """Three panels over training steps: reward, pass rate (train episodes and held-out evals), KL.
    Returns the PNG path, or None (with a message) when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"plot: matplotlib is not installed, skipping {png} (pip install matplotlib)", flush=True)
        return None
    train, evals = read_metrics(metrics_jsonl)
    if not train:
        print(f"plot: no training steps in {metrics_jsonl}, skipping {png}", flush=True)
        return None
    # a train record's step is its iteration's 0-based index; an eval at step s ran after s iterations
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(*series(train, "reward", 1), marker=".", color="tab:blue")
    axes[1].plot(*series(train, "pass_rate", 1), marker=".", color="tab:blue", label="train episodes")
    for key, color in (("pass@1", "tab:green"), ("1@3", "tab:orange")):
        steps, values = series(evals, key)
        if steps:  # a run without 1@3 gets no legend entry for it
            axes[1].plot(steps, values, marker="o", color=color, label=f"held-out {key}")
    axes[1].set_ylim(0, 1)
    axes[1].legend(fontsize=8)
    axes[2].plot(*series(train, "kl_ref", 1), marker=".", color="tab:red")
    titles = ("episode reward (train)", "pass rate", "KL to the reference (k1, per token)")
    for ax, title in zip(axes, titles):
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python plot.py METRICS_JSONL OUT_PNG")
    out = write_plot(sys.argv[1], sys.argv[2])
    if out is not None:
        print(f"wrote {out}")
