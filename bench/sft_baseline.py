"""The imitation baselines of the results table: the shipped warm start, fine-tuned further on demonstrations.

    python bench/sft_baseline.py --data demos|references [--steps 700] [--lr 1e-4] [--seed 0] [--out DIR]

- demos: the warm start's own demonstrations (the references with each classic bug in 30% of the places it
  fits, the slow solutions, 128 repairs and the tests-say tasks' repairs): what RL is compared with. It must
  gain less.
- references: the clean reference solutions and slow solutions only: the imitation ceiling, which RL without
  references is measured against. A tests-say task's reference is no one-turn demonstration (its value for no
  numbers is not in the prompt), so none is here.

Both train on the default run's training tasks with `sft.train_sft` (AdamW, warm-up and cosine decay, batches of
32). 700 steps take about as long as the default run's 24 iterations on 2 cores; the script prints the time. The
result is an HF folder in --out: evaluate it as the RL checkpoints are, e.g.

    python evaluate.py --model_dir DIR --dataset synthetic --samples 4 --episodes 4 --temperature 1 \\
        --max_new_tokens 48 --instruction '' --seed 12345 --timeout 2
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=("demos", "references"), required=True)
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (the RL run's is 1e-4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="'' = out/sft-<data>-seed<seed>")
    return ap.parse_args(argv)


def main(argv=None):
    import torch

    import sft
    from model import Transformer
    from sandbox import Limits, SandboxPool
    from synthetic import synthetic_tasks
    from tokenizer import TINY_BPE, Tokenizer

    args = parse_args(argv)
    out = Path(args.out or ROOT / "out" / f"sft-{args.data}-seed{args.seed}")
    if out.exists():
        sys.exit(f"sft_baseline.py: {out} exists: pass another --out, or remove it")
    tokenizer, tasks = Tokenizer.byte_level(TINY_BPE), synthetic_tasks("train")
    start = sft.tiny_warm_start(ROOT / ".cache", tokenizer, tasks, steps=sft.TINY["steps"], instruction="")
    if args.data == "demos":
        with SandboxPool(2, Limits(timeout_s=2.0)) as pool:
            examples = sft.warm_start_examples(tokenizer, tasks, "", repairs=sft.TINY["repairs"],
                                               bug_rate=sft.TINY["bug_rate"], pool=pool, seed=sft.TINY["seed"])
    else:
        examples = sft.warm_start_examples(tokenizer, tasks, "")
    torch.manual_seed(args.seed)
    model = Transformer.from_pretrained(start)
    t0 = time.perf_counter()
    losses = sft.train_sft(model, examples, steps=args.steps, batch_size=sft.TINY["batch"], lr=args.lr,
                           pad_id=tokenizer.pad_id, seed=args.seed, log=print)
    print(f"{args.data}: {len(examples)} demonstrations, {args.steps} steps in {time.perf_counter() - t0:.0f} s, "
          f"final loss {losses[-1]:.4f}")
    sft.publish_checkpoint(model, out, tokenizer=tokenizer)
    print(f"saved: {out}")


if __name__ == "__main__":
    main()
