"""The evaluation's own noise: one policy evaluated several times, each with other random numbers.

    python bench/eval_draws.py --seed 0 [--checkpoint out/checkpoint/policy] [--draws 12345,1,2,3,4,5,6]

train.py evaluates with a generator seeded with --seed + 12345, so every run of a seed draws its evaluation
samples from the same random numbers. Here each draw D seeds that generator with D instead (12345 + seed
repeats the run's own evaluation exactly) and prints held-out pass@1, 1@3 and the pass rate of the 1@3
episodes' first turns, as train.py's evaluation computes them, then their mean and standard deviation over
the draws. Without --checkpoint it evaluates the preset's warm start for --seed (trained first when it is not
cached). A checkpoint is read with its own tokenizer (tokenizer.tokenizer_for), or --tokenizer's: 'bytes' for a
tiny run's policy folder that holds no tokenizer file. Other flags go to train.py's config, e.g. --cache_dir.
For a whole benchmark with pass@k, use evaluate.py.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import train  # noqa: E402
from evaluate import summarize, task_results  # noqa: E402
from rollout import model_sampler  # noqa: E402

KEYS = ("pass@1", "1@3", "turn1_pass")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", default="", help="an HF policy folder; '' = the preset's warm start")
    ap.add_argument("--tokenizer", default="", help="with --checkpoint: '' = the checkpoint's own tokenizer, "
                    "'bytes' = byte-level, or a tokenizer.model / .json / .tiktoken path")
    ap.add_argument("--draws", default="1,2,3,4,5,6", help="comma-separated generator seeds, one evaluation each")
    ap.add_argument("--out_dir", default="out/eval_draws", help="train.py's out_dir (nothing is trained)")
    args, flags = ap.parse_known_args(argv)
    where = ["--model_dir", args.checkpoint, "--tokenizer", args.tokenizer] if args.checkpoint else []
    cfg = train.parse_config([*flags, *where, "--seed", str(args.seed), "--out_dir", args.out_dir,
                              "--algo", "expert_iteration"])  # the preset's algorithm: no critic to build
    trainer = train.Trainer(cfg)
    rows = []
    try:
        for draw in (int(d) for d in args.draws.split(",")):
            # Trainer.evaluate's sampler and held-out results, with the generator seeded with the draw
            generator = torch.Generator(trainer.device).manual_seed(draw)
            sampler = model_sampler(trainer.models.policy, trainer.tokenizer, cfg.max_new_tokens,
                                    cfg.eval_temperature, generator)
            records, _ = task_results(trainer.worker, sampler, trainer.eval_tasks, cfg.eval_samples,
                                      cfg.max_turns, cfg.eval_episodes)
            metrics = summarize(records, (1,))
            rows.append({k: metrics[k] for k in KEYS})
            print(json.dumps({"draw": draw, **{k: round(v, 4) for k, v in rows[-1].items()}}), flush=True)
    finally:
        trainer.pool.close()
    for k in KEYS:
        values = [row[k] for row in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{k:>10}: mean {statistics.mean(values):.3f}  sd {spread:.3f}  over {len(values)} draws")
    print(f"1@3 above pass@1 in {sum(row['1@3'] > row['pass@1'] for row in rows)} of {len(rows)} draws")


if __name__ == "__main__":
    main()
