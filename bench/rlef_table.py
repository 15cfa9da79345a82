"""The README's results table: RL against imitation from one warm start, and RLEF's signature.

    python bench/rlef_table.py [--seeds 0 1 2] [--other_seeds 3 4] [--out out/rlef]

Arms, all from the repository's warm start (sft.SHIPPED) and evaluated alike:
- RL: `python train.py --seed S` (the default run), one per seed;
- SFT on the warm start's demonstrations (references with their planted bugs, and the repairs), and
- SFT on the clean references (the same demonstrations without the bugs): the imitation ceiling. The
  tests-say tasks that RL trains on have no reference, so neither SFT arm sees them.
Each SFT arm trains on the same training tasks for the wall time of the RL runs' iterations (their mean).

Every checkpoint is evaluated by `evaluate.py` with the preset's sampling (4 samples and 4 episodes per held-out
task at temperature 1, sampler seed 12345, as train.py's own evaluation), once with execution feedback and once
with an uninformative message after each failed turn (RLEF's ablation; 1 sample, 4 episodes). Prints a markdown
table of means and standard deviations. Finished runs and evaluations are reused, so a killed table resumes.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
import sft  # noqa: E402
import train  # noqa: E402
from model import Transformer  # noqa: E402
from sandbox import Limits, SandboxPool  # noqa: E402

COLUMNS = ("pass@1", "1@3", "turn1_pass", "repair_rate")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the table's seeds")
    ap.add_argument("--other_seeds", type=int, nargs="*", default=[3, 4], help="seeds never used for tuning")
    ap.add_argument("--sft_lr", type=float, default=3e-4, help="peak lr of the SFT arms (cosine to 0)")
    ap.add_argument("--out", default="out/rlef")
    return ap.parse_args(argv)


def rl_run(out: Path, seed: int) -> Path:
    """The default run of `seed` (run unless finished); returns its folder."""
    folder = out / f"rl-seed{seed}"
    if not (folder / "checkpoint" / "policy" / "config.json").exists() or not finished(folder):
        argv = [sys.executable, str(ROOT / "train.py"), "--seed", str(seed), "--out_dir", str(folder),
                "--overwrite"]
        print(" ".join(argv[1:]), flush=True)
        with open(out / f"rl-seed{seed}.log", "w") as log:
            subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    return folder


def finished(folder: Path) -> bool:
    metrics = folder / "metrics.jsonl"
    return metrics.exists() and any(json.loads(line).get("label") == "after"
                                    for line in metrics.read_text().splitlines() if line.strip())


def iteration_seconds(folder: Path) -> float:
    """Wall time of a run's RL iterations: the sum of their timed phases (evaluations left out)."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sum(v for r in records if r.get("kind") == "train" for k, v in r.items() if k.startswith("time_"))


def sft_arm(out: Path, name: str, bug_rate: float, seconds: float, lr: float) -> Path:
    """Continue the warm start with SFT for `seconds` of wall time; returns the saved policy folder."""
    folder = out / f"sft-{name}"
    if (folder / "config.json").exists():
        return folder
    cfg = train.parse_config([])
    tokenizer, (tasks, _) = train.load_tokenizer(cfg), train.load_tasks(cfg)
    with SandboxPool(2, Limits(timeout_s=2.0)) as pool:
        examples = sft.warm_start_examples(tokenizer, tasks, cfg.instruction, repairs=sft.TINY["repairs"],
                                           bug_rate=bug_rate, pool=pool, seed=sft.TINY["seed"])
    model = Transformer.from_pretrained(train.tiny_warm_start(cfg, tokenizer, tasks))
    probe = Transformer.from_pretrained(train.tiny_warm_start(cfg, tokenizer, tasks))
    t0 = time.perf_counter()   # calibrate: seconds per step on a throw-away copy
    sft.train_sft(probe, examples, steps=10, batch_size=sft.TINY["batch"], lr=lr, pad_id=tokenizer.pad_id)
    steps = max(1, int(seconds / ((time.perf_counter() - t0) / 10)))
    print(f"sft-{name}: {len(examples)} demonstrations, {steps} steps for {seconds:.0f} s", flush=True)
    t0 = time.perf_counter()
    sft.train_sft(model, examples, steps=steps, batch_size=sft.TINY["batch"], lr=lr, pad_id=tokenizer.pad_id,
                  seed=1)
    print(f"sft-{name}: took {time.perf_counter() - t0:.0f} s", flush=True)
    model.save_pretrained(folder, tokenizer=tokenizer)
    return folder


def evaluation(model_dir: Path, out: Path, feedback: str) -> dict:
    """evaluate.py's metrics for a checkpoint (cached in `out`)."""
    if not out.exists():
        samples = "4" if feedback == "execution" else "1"
        evaluate.main(["--model_dir", str(model_dir), "--dataset", "synthetic", "--tokenizer", "bytes",
                       "--samples", samples, "--episodes", "4", "--temperature", "1.0", "--max_new_tokens", "112",
                       "--gen_batch_size", "64", "--instruction", "", "--seed", "12345", "--workers", "2",
                       "--timeout", "2", "--feedback", feedback, "--out", str(out)])
    return json.loads(out.read_text())["metrics"]


def row(name: str, runs: list[tuple[dict, dict]]) -> str:
    """A markdown row: mean (sd) of each column over runs, then turns 2-3's gain with each feedback."""
    def cell(values):
        values = [100 * v for v in values]
        sd = f" ({statistics.stdev(values):.1f})" if len(values) > 1 else ""
        return f"{statistics.mean(values):.1f}{sd}"
    cells = [cell([m[c] for m, _ in runs]) for c in COLUMNS]
    cells += [cell([m["1@3"] - m["turn1_pass"] for m, _ in runs]),
              cell([a["1@3"] - a["turn1_pass"] for _, a in runs])]
    return f"| {name} | " + " | ".join(cells) + " |"


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    folders = {seed: rl_run(out, seed) for seed in args.seeds + args.other_seeds}
    seconds = statistics.mean(iteration_seconds(f) for f in folders.values())
    cfg = train.parse_config([])
    tokenizer, (tasks, _) = train.load_tokenizer(cfg), train.load_tasks(cfg)
    checkpoints = {"warm start": train.tiny_warm_start(cfg, tokenizer, tasks),
                   "SFT on the warm start's demonstrations": sft_arm(out, "demos", sft.TINY["bug_rate"], seconds,
                                                                     args.sft_lr),
                   "SFT on clean references (imitation ceiling)": sft_arm(out, "references", 0.0, seconds,
                                                                           args.sft_lr)}
    checkpoints.update({f"RL seed {s}": f / "checkpoint" / "policy" for s, f in folders.items()})
    results = {name: (evaluation(path, out / "eval" / f"{slug(name)}.json", "execution"),
                      evaluation(path, out / "eval" / f"{slug(name)}-uninformative.json", "uninformative"))
               for name, path in checkpoints.items()}
    print(f"\nRL iterations: {seconds:.0f} s of wall time per run (mean); the SFT arms trained as long.\n")
    print("| arm | pass@1 | 1@3 | turn-1 pass | repair rate | 1@3 - turn 1 | same, uninformative feedback |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in list(checkpoints)[:3]:
        print(row(name, [results[name]]))
    print(row(f"RL, seeds {', '.join(map(str, args.seeds))}", [results[f"RL seed {s}"] for s in args.seeds]))
    if args.other_seeds:
        print(row(f"RL, seeds {', '.join(map(str, args.other_seeds))}",
                  [results[f"RL seed {s}"] for s in args.other_seeds]))
    print("\nper run:")
    for name, (m, a) in results.items():
        print(f"  {name}: " + ", ".join(f"{c} {m[c]:.3f}" for c in COLUMNS) +
              f"; uninformative: 1@3 {a['1@3']:.3f}, turn-1 {a['turn1_pass']:.3f}")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


if __name__ == "__main__":
    main()
