"""The README's "What you should see" table: the default run for several seeds, algorithms and time rewards.

    python bench/experiment_table.py [--seeds 0 1 2] [--algos ppo grpo expert_iteration] [--time_weights 1 0]
                                     [--out out/table] [any train.py flag, passed to every run]

Each cell is one `python train.py --seed S --algo A --time_weight W` (the tiny preset), run one after the other in
fresh processes; the warm start of each seed is trained once and cached. A run whose metrics.jsonl already holds an
"after" evaluation is not run again, so a killed table resumes. Prints a markdown table of the mean and sample
standard deviation over seeds of held-out pass@1 before and after RL, 1@3 after (and the pass rate of the first
turns of its episodes), and the fast share on the slow/fast subset before and after, then the individual runs. On 2
CPU cores a seed's warm start takes 10 to 26 minutes, by CPU, and on an Intel Xeon, one thread beside another run, a
run of expert iteration (the fastest algorithm) takes 10 to 20 and one of GRPO or PPO 16 to 28: about a working day
for the 18 cells, more on slower CPUs. Two copies of this script with OMP_NUM_THREADS=1 and disjoint cells use the 2
cores about as well; let the first run of each seed finish its warm start before another run of that seed starts, or
both will train it (the first one saved is kept, `sft.publish_checkpoint`).

With --ablation, each cell's warm start and final policy are also evaluated by `evaluate.py` with the execution
feedback and with RLEF's uninformative one (about a minute each), and a second table gives RLEF's signature:
what turns 2-3 add (1@3 minus the first turns' pass rate) with each feedback, the repair rate, and 1@3 on the
tests-say tasks, whose value for no numbers only the feedback shows (synthetic.py).
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from evaluate import summarize  # noqa: E402  (the project's modules, from ROOT)
from synthetic import synthetic_tasks  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--algos", nargs="+", default=["ppo", "grpo", "expert_iteration"])
    ap.add_argument("--time_weights", type=float, nargs="+", default=[1.0, 0.0])
    ap.add_argument("--out", default="out/table")
    ap.add_argument("--ablation", action="store_true", help="also RLEF's signature table (module docstring)")
    return ap.parse_known_args(argv)


def evaluations(metrics: Path) -> dict:
    """{"before": record, "after": record} from a run's metrics.jsonl ({} when it has not finished)."""
    if not metrics.exists():
        return {}
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {r["label"]: r for r in records if r.get("kind") == "eval" and r["label"] in ("before", "after")}


def run_cell(out: Path, seed: int, algo: str, time_weight: float, extra: list[str]) -> dict:
    folder = out / f"{algo}-tw{time_weight:g}-seed{seed}"
    done = evaluations(folder / "metrics.jsonl")
    if "after" not in done:
        argv = [sys.executable, str(ROOT / "train.py"), "--seed", str(seed), "--algo", algo,
                "--time_weight", str(time_weight), "--out_dir", str(folder), *extra]
        print(" ".join(argv[1:]), flush=True)
        with open(out / f"{folder.name}.log", "w") as log:
            subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
        done = evaluations(folder / "metrics.jsonl")
    return done


def mean_spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def fast(record: dict) -> str:
    """The fast share and, in brackets, how many passing slow/fast programs it is a share of."""
    share = record.get("fast_share")
    return "n/a" if share is None else f"{share:.2f} ({record.get('fast_share_passing')})"


def multi_turn_key(record: dict) -> str:
    """The evaluation's multi-turn metric, "1@3" for the preset's 3 turns."""
    return next(k for k in record if k.startswith("1@"))


def table(rows: dict) -> str:
    """rows: (algo, time_weight) -> list of {"before", "after"} per seed."""
    lines = ["| algorithm | time reward | seeds | pass@1 before | pass@1 after | 1@3 after (first turns) | "
             "fast share before | fast share after |", "|---|---|---|---|---|---|---|---|"]
    for (algo, tw), runs in rows.items():
        def col(label, key):
            return mean_spread([r[label].get(key) for r in runs])
        one_at_3 = multi_turn_key(runs[0]["after"])
        lines.append(f"| {algo} | {'on' if tw else 'off'} ({tw:g}) | {len(runs)} | {col('before', 'pass@1')} | "
                     f"{col('after', 'pass@1')} | {col('after', one_at_3)} ({col('after', 'turn1_pass')}) | "
                     f"{col('before', 'fast_share')} | "
                     f"{col('after', 'fast_share')} |")
    return "\n".join(lines)


def ablation_records(folder: Path, log: Path) -> dict:
    """{(model, feedback): evaluate.py's per-task records} for the run's warm start and final policy, with the
    execution feedback and the uninformative one. The flags and the sampling seed are those of the run's own
    evaluation (its config.json; seed + 12345), so the execution-feedback results reproduce train.py's."""
    cfg = json.loads((folder / "config.json").read_text())
    found = re.search(r"warm start: .*?(\S*warmstart-[0-9a-f]{12})", log.read_text())
    if found is None:
        raise SystemExit(f"experiment_table.py: {log} names no warm-start folder")
    warm_start = ROOT / found.group(1)   # train.py ran in ROOT: a relative cache_dir is relative to it
    flags = ["--dataset", "synthetic", "--samples", cfg["eval_samples"], "--episodes", cfg["eval_episodes"],
             "--max_turns", cfg["max_turns"], "--temperature", cfg["eval_temperature"], "--max_new_tokens",
             cfg["max_new_tokens"], "--instruction", cfg["instruction"], "--seed", cfg["seed"] + 12345,
             "--timeout", cfg["test_timeout"], "--gen_batch_size", cfg["gen_batch_size"], "--workers",
             cfg["sandbox_workers"], "--limit", cfg["eval_tasks"], "--dtype", cfg["dtype"]]
    records = {}
    for model, model_dir in (("warmstart", warm_start), ("policy", folder / "checkpoint" / "policy")):
        for feedback in ("execution", "uninformative"):
            path = folder / f"eval-{model}-{feedback}.json"
            if not path.exists():
                argv = [sys.executable, str(ROOT / "evaluate.py"), "--model_dir", str(model_dir), "--feedback",
                        feedback, "--out", str(path), *map(str, flags)]
                with open(path.with_suffix(".log"), "w") as out:
                    subprocess.run(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=True)
            records[model, feedback] = json.loads(path.read_text())["per_task"]
    return records


def signature(records: dict) -> dict:
    """RLEF's signature from ablation_records: per model, what the later turns add with each feedback, the
    repair rate, and 1@3 on the tests-say tasks with each feedback."""
    tests_say = {t.task_id for t in synthetic_tasks("test") if "tests_say" in t.tags}
    out = {}
    for (model, feedback), recs in records.items():
        every, say = summarize(recs), summarize([r for r in recs if r["task_id"] in tests_say])
        one_at = multi_turn_key(every)
        out[model, feedback] = {"pass@1": every["pass@1"], "gain": every[one_at] - every["turn1_pass"],
                                "repair_rate": every["repair_rate"], "tests_say": say[one_at]}
    return out


def signature_table(signatures: list[dict]) -> str:
    rows = [("pass@1", "execution", "pass@1"),
            ("1@3 minus first-turn pass, execution feedback", "execution", "gain"),
            ("1@3 minus first-turn pass, uninformative feedback", "uninformative", "gain"),
            ("repair rate, execution feedback", "execution", "repair_rate"),
            ("tests-say tasks' 1@3, execution feedback", "execution", "tests_say"),
            ("tests-say tasks' 1@3, uninformative feedback", "uninformative", "tests_say")]
    lines = ["| held-out | warm start | after RL |", "|---|---|---|"]
    for name, feedback, key in rows:
        cells = [mean_spread([s[model, feedback][key] for s in signatures]) for model in ("warmstart", "policy")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv=None):
    args, extra = parse_args(argv)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for seed in args.seeds:  # seed-major: the first seed's row of cells is complete early
        for algo in args.algos:
            for tw in args.time_weights:
                rows.setdefault((algo, tw), []).append(run_cell(out, seed, algo, tw, extra))
    print("\n" + table(rows))
    print("\nper run (pass@1 before -> after, 1@3 after and the pass rate of its episodes' first turns, fast share "
          "before -> after (passing slow/fast programs)):")
    for (algo, tw), runs in rows.items():
        for seed, r in zip(args.seeds, runs):
            b, a = r["before"], r["after"]
            one_at_3, first_turns = multi_turn_key(a), a.get("turn1_pass", float("nan"))
            print(f"  {algo:17s} tw={tw:g} seed={seed}: {b['pass@1']:.3f} -> {a['pass@1']:.3f}  "
                  f"{one_at_3} {a[one_at_3]:.3f} (first turns {first_turns:.3f})  fast {fast(b)} -> {fast(a)}")
    if args.ablation:
        signatures = {}
        for seed in args.seeds:
            for algo in args.algos:
                for tw in args.time_weights:
                    name = f"{algo}-tw{tw:g}-seed{seed}"
                    signatures[name] = signature(ablation_records(out / name, out / f"{name}.log"))
        print("\nRLEF's signature, mean ± sd over the runs:\n" + signature_table(list(signatures.values())))
        print("\nper run (gain of turns 2-3 with execution / uninformative feedback, repair rate, tests-say 1@3 "
              "with execution / uninformative feedback; warm start -> after RL):")
        for name, s in signatures.items():
            w, p = (s[m, "execution"] for m in ("warmstart", "policy"))
            wu, pu = (s[m, "uninformative"] for m in ("warmstart", "policy"))
            print(f"  {name}: gain {w['gain']:.3f}/{wu['gain']:.3f} -> {p['gain']:.3f}/{pu['gain']:.3f}  "
                  f"repair {w['repair_rate']:.3f} -> {p['repair_rate']:.3f}  tests-say "
                  f"{w['tests_say']:.3f}/{wu['tests_say']:.3f} -> {p['tests_say']:.3f}/{pu['tests_say']:.3f}")


if __name__ == "__main__":
    main()
