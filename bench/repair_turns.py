"""What the repair turns of a tiny-preset policy do: multi-turn episodes on held-out tasks, turn by turn.

    python bench/repair_turns.py [--seed 0] [--checkpoint DIR] [--episodes 4] [--samples 4] [--split test]

1@3 counts an episode as solved when its final code passes the private tests. Turns 2 and 3 can only add to
the first turn's pass rate where the first answer failed the public tests (an answer that passes them but
fails the private tests ends the episode with no feedback). For every later turn this sorts the answer into:
- "repeats an earlier answer": the same code, whitespace aside, as a previous turn of the episode;
- "passes the public tests", "fails the public tests", "no code block".
It then sets the repaired share of the episodes that got feedback against what fresh samples would do: a task
whose single-turn samples pass with rate p would be solved by two more independent tries 1 - (1 - p)^2 of
the time. A repair turn that reads the feedback should beat that; one that only resamples would match it.
It also samples each task once more per single-turn sample with one solved exchange of a random training
task before it (its reference answer as the assistant's), so the answer sits as far into the chat as a second
turn's: a pass rate far below the fresh one means the policy cannot write code that far in, feedback or not.
With --fresh_chat it also replays the same episodes' failed first answers with later turns that each start
a new chat, one user message holding the task, the last answer and the feedback, or the task and the
feedback alone: does the policy repair better at the start of a chat, where it writes code best?
Without --checkpoint it uses the preset's warm start for --seed, trained first when it is not cached.
"""
import argparse
import collections
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import synthetic  # noqa: E402
from bench.warm_start_errors import preset_policy  # noqa: E402
from reward import RewardConfig, feedback_text  # noqa: E402
from rollout import RolloutWorker, response_code, task_message  # noqa: E402
from sft import format_answer  # noqa: E402
from train import load_tasks  # noqa: E402


def later_turn_kind(episode, k: int) -> str:
    """What turn k (k >= 1) of an episode did."""
    code = episode.turns[k].code
    if code is None:
        return "no code block"
    if code.strip() in {t.code.strip() for t in episode.turns[:k] if t.code is not None}:
        return "repeats an earlier answer"
    return "passes the public tests" if episode.turns[k].public.passed else "fails the public tests"


def got_feedback(episode) -> bool:
    return len(episode.turns) > 1


def fresh_sample_baseline(singles, repaired, tries: int = 2) -> float:
    """The share of the `repaired` episodes that `tries` independent single-turn samples would solve: for a task
    whose `singles` pass with rate p, 1 - (1 - p)^tries, averaged over the episodes (nan for none)."""
    outcomes: dict[str, list[bool]] = collections.defaultdict(list)
    for ep in singles:
        outcomes[ep.task.task_id].append(ep.passed)
    rates = [sum(outcomes[ep.task.task_id]) / len(outcomes[ep.task.task_id]) for ep in repaired]
    return sum(1 - (1 - p) ** tries for p in rates) / len(rates) if rates else float("nan")


def after_another_task(tokenizer, task, other, instruction: str) -> list[int]:
    """The prompt of `task` with one solved exchange of `other` before it."""
    return tokenizer.encode_dialog_prompt([
        {"role": "user", "content": task_message(other, instruction)},
        {"role": "assistant", "content": format_answer(other.reference_solution)},
        {"role": "user", "content": task_message(task, instruction)}])


def sampled_codes(tokenizer, sampler, prompts: list[list[int]], batch_size: int):
    """Yields the code block (None without one) of one sampled answer per prompt, `batch_size` prompts per
    sampler call; a generator, so the caller can hand each program to the sandbox while the next batch samples."""
    for start in range(0, len(prompts), batch_size):
        for response, stopped in sampler(prompts[start:start + batch_size]):
            yield response_code(tokenizer, response, stopped)


def pass_rate_after_another_task(tokenizer, sampler, pool, tasks, others, samples: int, cfg) -> float:
    """Private-test pass rate of `samples` answers per task, each after a solved exchange of a random `other`."""
    rng = random.Random(cfg.seed)
    jobs = [(t, after_another_task(tokenizer, t, rng.choice(others), cfg.instruction))
            for t in tasks for _ in range(samples)]
    codes = sampled_codes(tokenizer, sampler, [prompt for _, prompt in jobs], cfg.gen_batch_size)
    futures = [pool.submit(code, task.private_tests, task.setup_code) if code is not None else None
               for (task, _), code in zip(jobs, codes)]
    return sum(f is not None and f.result().passed for f in futures) / len(futures)


def fresh_chat_message(task, code: str, public, instruction: str, show_code: bool) -> str:
    """A later turn as a new chat: the task, the last answer (if show_code) and the feedback on it."""
    parts = [task_message(task, instruction)]
    if show_code:
        parts.append("A previous answer:\n" + format_answer(code))
    parts.append(feedback_text(public, task.public_tests))
    return "\n\n".join(parts)


def fresh_chat_repairs(tokenizer, sampler, pool, episodes, cfg, show_code: bool, later_turns: int = 2):
    """The episodes whose first answer had code and failed the public tests, replayed from that answer with up
    to `later_turns` tries that each start a new chat (fresh_chat_message). Returns (the replayed episodes'
    tasks, whether each one's final code passes the private tests)."""
    replays = [dict(task=ep.task, code=ep.turns[0].code, public=ep.turns[0].public, done=False)
               for ep in episodes if ep.turns[0].code is not None and not ep.turns[0].public.passed]
    for _ in range(later_turns):
        active = [r for r in replays if not r["done"]]
        prompts = [tokenizer.encode_dialog_prompt([{"role": "user", "content": fresh_chat_message(
            r["task"], r["code"], r["public"], cfg.instruction, show_code)}]) for r in active]
        retried = []
        for r, code in zip(active, sampled_codes(tokenizer, sampler, prompts, cfg.gen_batch_size)):
            if code is not None:  # no code block: the last answer and its feedback stand for the next try
                r["code"] = code
                retried.append((r, pool.submit(code, r["task"].public_tests, r["task"].setup_code)))
        for r, future in retried:
            r["public"] = future.result()
            r["done"] = r["public"].passed
    futures = [pool.submit(r["code"], r["task"].private_tests, r["task"].setup_code) for r in replays]
    return [r["task"] for r in replays], [future.result().passed for future in futures]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="test", choices=["train", "validation", "test"])
    ap.add_argument("--episodes", type=int, default=4, help="3-turn episodes per task")
    ap.add_argument("--samples", type=int, default=4, help="single-turn samples per task (the fresh-sample rate)")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--fresh_chat", action="store_true", help="also replay the failed first answers with later "
                                                               "turns that each start a new chat")
    args, preset_flags = ap.parse_known_args(argv)
    cfg, tokenizer, checkpoint, _, sampler, rollout_cfg, pool = preset_policy(args.seed, args.checkpoint,
                                                                              preset_flags)
    tasks = synthetic.synthetic_tasks(args.split, cfg.seed)
    try:
        worker = RolloutWorker(tokenizer, pool, rollout_cfg, RewardConfig())
        with torch.no_grad():
            singles = worker.run(sampler, [t for t in tasks for _ in range(args.samples)], max_turns=1)
            episodes = worker.run(sampler, [t for t in tasks for _ in range(args.episodes)], max_turns=3)
            solved = [t for t in load_tasks(cfg)[0] if t.reference_solution]   # exchanges need a reference
            later = pass_rate_after_another_task(tokenizer, sampler, pool, tasks, solved, args.samples, cfg)
            fresh_chats = {show_code: fresh_chat_repairs(tokenizer, sampler, pool, episodes, cfg, show_code)
                           for show_code in ((True, False) if args.fresh_chat else ())}
    finally:
        pool.close()
    repaired = [ep for ep in episodes if got_feedback(ep)]
    kinds = collections.Counter(later_turn_kind(ep, k) for ep in repaired for k in range(1, len(ep.turns)))
    first_public_only = sum(len(ep.turns) == 1 and not ep.passed for ep in episodes)

    print(f"{checkpoint}: {args.split} split, {len(tasks)} tasks x {args.episodes} episodes")
    print(f"  single-turn pass rate: {sum(ep.passed for ep in singles) / len(singles):.3f} fresh, {later:.3f} "
          f"after one solved exchange of another task")
    print(f"  episodes with feedback after turn 1: {len(repaired)} of {len(episodes)}")
    print(f"  first answer passes the public tests, fails the private ones (no feedback): {first_public_only}")
    print(f"  later turns: {sum(kinds.values())}")
    for kind, count in kinds.most_common():
        print(f"    {kind:27s} {count / sum(kinds.values()):.3f}")
    if repaired:
        print(f"  episodes with feedback solved by turns 2-3: {sum(ep.passed for ep in repaired) / len(repaired):.3f}"
              f"  (two fresh samples would solve {fresh_sample_baseline(singles, repaired):.3f})")
    for show_code, (replayed, passed) in fresh_chats.items():
        baseline = fresh_sample_baseline(singles, [SimpleNamespace(task=task) for task in replayed])
        print(f"  later turns as new chats ({'task, last answer' if show_code else 'task'} and feedback): "
              f"{sum(passed) / max(1, len(passed)):.3f} of {len(passed)} failed first answers solved "
              f"(two fresh samples would solve {baseline:.3f})")


if __name__ == "__main__":
    main()
