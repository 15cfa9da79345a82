"""Where one training iteration of the tiny preset spends its time on the CPU:

    generation        model.generate inside the rollout (KV cache, sampling)
    sandbox           waiting for program runs (public tests, private tests, time reward) not hidden by generation
    logprob/KL        recomputing old and reference logprobs (and values) with the training forward
    update            PPO epochs: forward + backward + optimizer steps
    other             tokenizing, feedback text, collate, advantages

    python bench/bench_train.py [--iterations 2] [--threads 2] [any train.py flag, e.g. --algo grpo --kl_placement loss]

It builds the same Trainer as `python train.py` (the cached warm start is reused, or trained first), runs one
untimed iteration (warm-up: time-reward reference timings, allocator), then times `--iterations` more. Wall
time and process CPU time are both printed: on a shared machine the CPU seconds are the steadier number.
"""
import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=2, help="timed iterations after one warm-up iteration")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    return ap.parse_known_args(argv)


def split_iteration(metrics: dict, seconds: dict) -> dict:
    """The four phases of an iteration (plus the remainder) from one train_step's metrics and the rollout worker's
    counters for the same step. time_score is the logprob/KL recomputation (old, reference, values, advantages)."""
    generation = seconds["generate"]
    sandbox = seconds["sandbox_wait"]
    parts = {"generation": generation, "sandbox": sandbox,
             "logprob/KL": metrics.get("time_score", 0.0), "update": metrics["time_update"]}
    parts["other"] = max(metrics["time_rollout"] - generation - sandbox, 0.0)
    return parts


def main(argv=None):
    args, train_argv = parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    from train import Trainer, parse_config

    # out/ of a real run is left alone; eval is not part of an iteration
    cfg = parse_config(["--out_dir", str(ROOT / "out" / "bench_train"), "--overwrite", *train_argv])
    trainer = Trainer(cfg)
    try:
        trainer.train_step(0)  # warm-up
        totals = {}
        wall = cpu = 0.0
        for it in range(args.iterations):
            before = dict(trainer.worker.seconds)
            t0, c0 = time.perf_counter(), time.process_time()
            metrics = trainer.train_step(it + 1)
            wall += time.perf_counter() - t0
            cpu += time.process_time() - c0
            seconds = {k: trainer.worker.seconds[k] - before[k] for k in before}
            for k, v in split_iteration(metrics, seconds).items():
                totals[k] = totals.get(k, 0.0) + v
        n = args.iterations
        total = sum(totals.values())
        print(f"tiny preset, algo {cfg.algo}: {cfg.tasks_per_step} tasks x {cfg.samples_per_task} samples, "
              f"max_turns {cfg.max_turns}, max_new_tokens {cfg.max_new_tokens}, {args.threads} threads, "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        print(f"mean over {n} iterations: wall {wall / n:.2f} s, process CPU {cpu / n:.2f} s "
              f"(sandbox children not counted in CPU)")
        for k, v in totals.items():
            print(f"  {k:<11} {v / n:7.2f} s  {100 * v / total:5.1f} %")
    finally:
        trainer.pool.close()


if __name__ == "__main__":
    main()
