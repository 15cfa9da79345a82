"""What the tiny preset's warm-started policy gets wrong: single-turn samples sorted into kinds of error.

    python bench/warm_start_errors.py [--seed 0] [--split test] [--samples 4] [--checkpoint DIR]

Samples `--samples` answers per synthetic composition task at temperature 1 (the evaluation's setting), runs
them on the private tests in the sandbox, and sorts each failing answer by its text against the reference:
- "classic bugs": the reference with some of synthetic.CLASSIC_BUGS put in (what execution feedback should remove);
- "wrong constant": one of those with other digits, e.g. `x + 8` for "each plus 7" (the constant not copied
  from the prompt);
- "syntax error", "no code block", and "other" (a wrong composition, or anything else).
Without --checkpoint it uses the preset's warm start for --seed, trained first when it is not cached.
docs/experiments.md ("The warm start, and what it gets wrong") quotes its output for the 600- and 1200-step warm starts.
"""
import argparse
import collections
import itertools
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import synthetic  # noqa: E402
from model import Transformer  # noqa: E402
from reward import RewardConfig  # noqa: E402
from rollout import RolloutConfig, RolloutWorker, model_sampler  # noqa: E402
from sandbox import Limits, SandboxPool  # noqa: E402
from train import load_tasks, load_tokenizer, parse_config, tiny_warm_start  # noqa: E402


def buggy_variants(reference: str) -> set[str]:
    """The reference with every non-empty subset of its classic bugs put in."""
    sites = synthetic.bug_sites(reference)
    return {synthetic.with_bugs(reference, list(chosen)) for r in range(1, len(sites) + 1)
            for chosen in itertools.combinations(sites, r)}


def error_kind(code: str | None, passed: bool, reference: str) -> str:
    if code is None:
        return "no code block"
    if passed:
        return "pass"
    try:
        compile(code, "<answer>", "exec")
    except SyntaxError:
        return "syntax error"
    variants = {v.strip() for v in buggy_variants(reference)}
    if code.strip() in variants:
        return "classic bugs"
    digits_blind = {re.sub(r"\d", "#", v) for v in variants | {reference.strip()}}
    return "wrong constant" if re.sub(r"\d", "#", code.strip()) in digits_blind else "other"


def preset_policy(seed: int, checkpoint: str | None, preset_flags: list[str]):
    """(config, tokenizer, checkpoint, model, sampler at temperature 1, rollout config, sandbox pool) of the tiny
    preset for `seed`. Without a checkpoint, the preset's warm start (trained first when it is not cached)."""
    cfg = parse_config([*preset_flags, "--seed", str(seed)])
    tokenizer = load_tokenizer(cfg)  # the tokenizer and training tasks train.py gives the same warm start
    checkpoint = checkpoint or tiny_warm_start(cfg, tokenizer, load_tasks(cfg)[0])
    model = Transformer.from_pretrained(checkpoint).eval()
    sampler = model_sampler(model, tokenizer, cfg.max_new_tokens, temperature=1.0,
                            generator=torch.Generator().manual_seed(cfg.seed))
    rollout_cfg = RolloutConfig(max_new_tokens=cfg.max_new_tokens, gen_batch_size=cfg.gen_batch_size,
                                instruction=cfg.instruction)
    pool = SandboxPool(cfg.sandbox_workers or None, Limits(timeout_s=cfg.test_timeout))
    return cfg, tokenizer, checkpoint, model, sampler, rollout_cfg, pool


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="test", choices=["train", "validation", "test"])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--checkpoint", default=None)
    args, preset_flags = ap.parse_known_args(argv)
    cfg, tokenizer, checkpoint, model, sampler, rollout_cfg, pool = preset_policy(args.seed, args.checkpoint,
                                                                                  preset_flags)
    tasks = [t for t in synthetic.synthetic_tasks(args.split, cfg.seed) if "composition" in t.tags]
    try:  # single-turn episodes, scored on the private tests as the evaluation's pass@1 samples are
        with torch.no_grad():
            episodes = RolloutWorker(tokenizer, pool, rollout_cfg, RewardConfig()).run(
                sampler, [t for t in tasks for _ in range(args.samples)], max_turns=1)
    finally:
        pool.close()
    kinds = collections.Counter(error_kind(ep.turns[0].code, ep.passed, ep.task.reference_solution)
                                for ep in episodes)
    print(f"{checkpoint}: {args.split} split, {len(tasks)} composition tasks x {args.samples} samples")
    for kind, count in kinds.most_common():
        print(f"  {kind:15s} {count / len(episodes):.3f}")


if __name__ == "__main__":
    main()
