"""One two-turn RLEF episode, through the real rollout loop, sandbox and rewards (the README's example).

A scripted policy stands in for the model so that the episode is reproducible: its first answer is the task's
reference solution with one classic bug (synthetic.CLASSIC_BUGS), as the warm start's repair demonstrations have it,
and its second answer is the reference. Everything else is the code's own output: the prompt in the tiny
preset's chat template, the sandbox's verdicts on the public tests, the feedback message, the private-test run
and the rewards (the tiny preset's: time reward on).

    python3 bench/example_episode.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reward import RewardConfig  # noqa: E402
from rollout import RolloutConfig, RolloutWorker  # noqa: E402
from sandbox import Limits, SandboxPool  # noqa: E402
from sft import format_answer  # noqa: E402
from synthetic import bug_sites, synthetic_tasks, with_bugs  # noqa: E402
from tokenizer import TINY_BPE, Tokenizer  # noqa: E402


def scripted_sampler(tokenizer, answers: list[str]):
    """A Sampler that answers turn k with answers[k] (one episode at a time), ending on the end-of-turn id."""
    def sample(prompts):
        turn = next(i for i, a in enumerate(answers) if a is not None)
        code, answers[turn] = answers[turn], None
        return [(tokenizer.encode(format_answer(code)) + [tokenizer.eot_id], True) for _ in prompts]
    return sample


def main():
    task = next(t for t in synthetic_tasks("train", seed=0) if "default=0" in t.reference_solution)
    buggy = with_bugs(task.reference_solution, bug_sites(task.reference_solution)[:1])
    tokenizer = Tokenizer.byte_level(TINY_BPE)
    with SandboxPool(2, Limits(timeout_s=2.0)) as pool:
        worker = RolloutWorker(tokenizer, pool, RolloutConfig(max_turns=3, max_new_tokens=48, instruction=""),
                               RewardConfig(time_weight=1.0))
        episode = worker.run(scripted_sampler(tokenizer, [buggy, task.reference_solution]), [task])[0]
    print(f"task {task.task_id}: {len(task.public_tests)} public tests, {len(task.private_tests)} private tests\n")
    print(episode.text(tokenizer))
    print()
    for k, turn in enumerate(episode.turns):
        public = "pass" if turn.public.passed else [t.status for t in turn.public.tests]
        print(f"turn {k + 1}: public tests {public}, turn reward {turn.reward:+.2f}")
    print(f"private tests: {'all pass' if episode.passed else 'fail'}; time reward: "
          f"{worker.time_reward.last_outcome}; episode reward {episode.reward:+.2f}")


if __name__ == "__main__":
    main()
