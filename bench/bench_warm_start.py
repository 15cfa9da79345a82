"""Time of one warm-start step of the tiny preset (forward + backward of a batch of demonstrations, 32 in the
preset), with the whole batch padded to its longest demonstration against `sft.backward_by_length`
(micro-batches of similar length, the same gradient):

    python bench/bench_warm_start.py [--batches 6] [--batch 32] [--threads 2] [--micro 4 8 16] [--seed 0] [--bf16]

The batches are the warm start's own (`sft.batches_by_turns` over `sft.warm_start_examples` of the preset),
one-turn and two-turn repair batches timed apart, since repair demonstrations are 2-3x longer. Every way runs
on the same batches, one after the other in one process, against the padded baseline of the same run. The
step's total is the two kinds weighted by their share of the warm start's steps.

--bf16 also times micro-batches of 8 under `torch.autocast("cpu", torch.bfloat16)`, with attention in bf16 and
with it kept in fp32: on a CPU with AMX bf16 matmuls run several times faster than fp32 ones, and these rows
show what that does to a whole step of this tiny model.
"""
import argparse
import contextlib
import random
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sft  # noqa: E402
import train  # noqa: E402
from model import Transformer  # noqa: E402
from sandbox import Limits, SandboxPool  # noqa: E402


def padded_backward(model, batch, pad_id) -> None:
    """The warm start before `backward_by_length`: one batch padded to its longest demonstration."""
    tokens, mask = sft.pad_batch(batch, pad_id)
    sft.sft_loss(model, tokens, mask).backward()


SDPA = torch.nn.functional.scaled_dot_product_attention  # torch's own, kept before any swap below


def fp32_attention(q, k, v, **kwargs):
    """Attention in fp32 inside an autocast region: CPU flash attention's backward is slow in bf16."""
    with torch.autocast("cpu", enabled=False):
        return SDPA(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)


def under_bf16_autocast(step, attention_in_fp32: bool):
    """`step` run under bf16 autocast; the warm start's fused lm_head logprob keeps fp32 (it turns autocast off)."""
    def run(batch):
        swap = mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", fp32_attention) \
            if attention_in_fp32 else contextlib.nullcontext()
        with swap, torch.autocast("cpu", dtype=torch.bfloat16):
            step(batch)
    return run


def seconds_per_batch(step, batches) -> float:
    step(batches[0])  # warm-up: allocator, thread pool
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    return (time.perf_counter() - start) / len(batches)


def is_repair(example, eot_id: int) -> bool:
    """A repair demonstration has four end-of-turn tokens (two messages per turn), a one-turn one two."""
    return example[0].count(eot_id) > 2


def batches_of_each_kind(examples, eot_id: int, count: int, batch_size: int, seed: int) -> dict[str, list]:
    """The warm start's first `count` one-turn and `count` repair batches (`sft.batches_by_turns` never mixes the
    two kinds in a batch)."""
    kinds = {"one-turn": [], "repair": []}
    for batch in sft.batches_by_turns(examples, batch_size, random.Random(seed)):
        kind = kinds["repair" if is_repair(batch[0], eot_id) else "one-turn"]
        if len(kind) < count:
            kind.append(batch)
        if all(len(k) == count for k in kinds.values()):
            return kinds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=6, help="timed batches of each kind")
    ap.add_argument("--batch", type=int, default=None, help="demonstrations per step (default: the preset's)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--micro", type=int, nargs="+", default=[4, 8, 16], help="micro-batch sizes to time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="also time bf16 autocast (micro-batches of 8)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = train.parse_config(["--seed", str(args.seed)])
    tokenizer = train.load_tokenizer(cfg)
    with SandboxPool(2, Limits(timeout_s=2.0)) as pool:
        examples = sft.warm_start_examples(tokenizer, train.load_tasks(cfg)[0], cfg.instruction, pool=pool,
                                           repairs=sft.TINY["repairs"], bug_rate=sft.TINY["bug_rate"],
                                           seed=cfg.seed)
    batch_size = args.batch or sft.TINY["batch"]
    kinds = batches_of_each_kind(examples, tokenizer.eot_id, args.batches, batch_size, args.seed)
    share = {"repair": sum(is_repair(ex, tokenizer.eot_id) for ex in examples) / len(examples)}
    share["one-turn"] = 1 - share["repair"]
    torch.manual_seed(0)
    model = Transformer(sft.tiny_model_config(tokenizer))
    ways = {"padded": lambda b: padded_backward(model, b, tokenizer.pad_id)}
    for micro in args.micro:
        ways[f"by length, micro {micro}"] = lambda b, m=micro: sft.backward_by_length(model, b, tokenizer.pad_id, m)
    if args.bf16:
        by_length = lambda b: sft.backward_by_length(model, b, tokenizer.pad_id, 8)  # noqa: E731
        ways["micro 8, bf16 autocast"] = under_bf16_autocast(by_length, attention_in_fp32=False)
        ways["micro 8, bf16, attn fp32"] = under_bf16_autocast(by_length, attention_in_fp32=True)
    print(f"{len(examples)} demonstrations, batches of {batch_size}; share of steps: "
          f"one-turn {share['one-turn']:.2f}, repair {share['repair']:.2f}; {args.threads} threads")
    print(f"{'':24s} {'one-turn s':>10s} {'repair s':>10s} {'per step s':>10s} {'vs padded':>10s}")
    baseline = None
    for name, step in ways.items():
        seconds = {kind: seconds_per_batch(step, batches) for kind, batches in kinds.items()}
        per_step = sum(share[kind] * s for kind, s in seconds.items())
        baseline = baseline or per_step
        print(f"{name:24s} {seconds['one-turn']:10.3f} {seconds['repair']:10.3f} {per_step:10.3f} "
              f"{per_step / baseline:10.2f}")


if __name__ == "__main__":
    main()
