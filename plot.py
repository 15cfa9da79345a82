"""A PNG of a run: training reward, pass rate and KL to the reference per step, with the evaluations.

    python plot.py out/metrics.jsonl out/plot.png

matplotlib is optional (the run itself never needs it): without it `write_plot` prints why and returns None.
Reads the metrics JSONL that train.py writes: {"kind": "train", "step", "reward", "pass_rate", "kl_ref"?} per
iteration and {"kind": "eval", "step", "pass@1", "1@3"?} per evaluation.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) in file order. A line that is not JSON names the file and line."""
    train, evals = [], []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number}: not JSON ({e.msg})") from None
        {"train": train, "eval": evals}.get(record.get("kind"), []).append(record)
    return train, evals


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, skipping records without it or with null (NaN written as null)."""
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
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
    # train records carry the step index (0-based) of the iteration; an eval at step s ran after s iterations
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps, reward = series(train, "reward")
    axes[0].plot([s + 1 for s in steps], reward, marker=".", color="tab:blue")
    axes[0].set_title("episode reward (train)")
    steps, passed = series(train, "pass_rate")
    axes[1].plot([s + 1 for s in steps], passed, marker=".", color="tab:blue", label="train episodes")
    for key, color in (("pass@1", "tab:green"), ("1@3", "tab:orange")):
        e_steps, values = series(evals, key)
        if e_steps:
            axes[1].plot(e_steps, values, marker="o", color=color, label=f"held-out {key}")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("pass rate")
    axes[1].legend(fontsize=8)
    steps, kl = series(train, "kl_ref")
    if steps:
        axes[2].plot([s + 1 for s in steps], kl, marker=".", color="tab:red")
    axes[2].set_title("KL to the reference (k1, per token)")
    for ax in axes:
        ax.set_xlabel("step")
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
