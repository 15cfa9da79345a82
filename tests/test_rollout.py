"""Multi-turn episodes on a scripted fake policy: exact token masks, feedback text and rewards."""
import threading

import pytest

from data import Task, Test
from reward import UNINFORMATIVE_FEEDBACK, RewardConfig, feedback_text
from rollout import INSTRUCTION, NO_CODE_FEEDBACK, RolloutConfig, RolloutWorker, collate, task_message
from sandbox import SandboxPool
from tokenizer import Tokenizer

TASK = Task(task_id="add", prompt="Write add(a, b) that returns a + b.",
            public_tests=[Test(kind="call", call="add(1, 2)", expected="3")],
            private_tests=[Test(kind="call", call="add(1, 2)", expected="3"),
                           Test(kind="call", call="add(-5, 5)", expected="0")],
            entry_point="add", reference_solution="def add(a, b):\n    return a + b\n")

WRONG = "```python\ndef add(a, b):\n    return a - b\n```"
NO_CODE = "I am not sure."
RIGHT = "Here:\n```python\ndef add(a, b):\n    return a + b\n```"


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2) as p:
        yield p


def scripted(tok, script):
    """A Sampler that answers turn k of every episode with script[k] (+ the end-of-turn token)."""
    calls = []

    def sample(prompts):
        calls.append(len(prompts))
        turn = len(calls) - 1
        return [(tok.encode(script[turn]) + [tok.eot_id], True) for _ in prompts]
    return sample, calls


def test_three_turn_episode_exact_tokens_masks_feedback_rewards(pool):
    tok = Tokenizer.byte_level()
    worker = RolloutWorker(tok, pool, RolloutConfig(max_turns=3, max_new_tokens=64), RewardConfig())
    sampler, calls = scripted(tok, [WRONG, NO_CODE, RIGHT])
    [ep] = worker.run(sampler, [TASK])
    assert calls == [1, 1, 1]

    # The expected token stream, assembled independently from the tokenizer's primitives.
    prompt = tok.encode_dialog_prompt([{"role": "user", "content": task_message(TASK)}])
    r1 = tok.encode(WRONG) + [tok.eot_id]
    fb1_text = ("Your code failed the following tests:\n\n"
                "- input 'add(1, 2)' failed: Expected output '3' but got '-1'\n\nGive it another try.")
    assert feedback_text(ep.turns[0].public, TASK.public_tests) == fb1_text
    fb1 = tok.encode_message("user", fb1_text) + tok.encode_header("assistant")
    r2 = tok.encode(NO_CODE) + [tok.eot_id]
    fb2 = tok.encode_message("user", NO_CODE_FEEDBACK) + tok.encode_header("assistant")
    r3 = tok.encode(RIGHT) + [tok.eot_id]
    expected = prompt + r1 + fb1 + r2 + fb2 + r3
    assert ep.tokens == expected
    mask = [False] * len(prompt) + [True] * len(r1) + [False] * len(fb1) + [True] * len(r2) + \
        [False] * len(fb2) + [True] * len(r3)
    assert ep.action_mask == mask

    # Turn boundaries, codes, verdicts and rewards (RLEF: -0.2 for the turn without code, +1 at the end).
    starts = [len(prompt), len(prompt + r1 + fb1), len(prompt + r1 + fb1 + r2 + fb2)]
    assert [(t.start, t.end) for t in ep.turns] == [(s, s + len(r)) for s, r in zip(starts, (r1, r2, r3))]
    assert ep.turns[0].code == "def add(a, b):\n    return a - b\n" and not ep.turns[0].public.passed
    assert ep.turns[1].code is None and ep.turns[1].public is None
    assert ep.turns[2].public.passed and ep.private.passed
    assert [t.reward for t in ep.turns] == [0.0, pytest.approx(-0.2), 1.0]
    assert ep.reward == pytest.approx(0.8) and not ep.truncated

    batch = collate([ep], pad_id=tok.pad_id)
    assert batch["tokens"][0].tolist() == expected
    assert batch["action_mask"][0].tolist() == mask
    assert batch["turn_starts"][0].tolist() == starts
    turn_ids = batch["turn_ids"][0].tolist()
    assert [turn_ids[i] for i in range(len(mask)) if mask[i]] == [0] * len(r1) + [1] * len(r2) + [2] * len(r3)
    assert all(t == -1 for t, m in zip(turn_ids, mask) if not m)
    assert batch["turn_rewards"][0].tolist() == pytest.approx([0.0, -0.2, 1.0])


def test_uninformative_feedback_replaces_every_feedback_message_and_nothing_else(pool):
    """RLEF's ablation: the same three turns, each failed turn followed by one fixed message, whatever failed
    (a wrong answer or no code); the verdicts and rewards are those of the informative run."""
    tok = Tokenizer.byte_level()
    cfg = RolloutConfig(max_turns=3, max_new_tokens=64, feedback="uninformative")
    sampler, _ = scripted(tok, [WRONG, NO_CODE, RIGHT])
    [ep] = RolloutWorker(tok, pool, cfg, RewardConfig()).run(sampler, [TASK])
    fixed = tok.encode_message("user", UNINFORMATIVE_FEEDBACK) + tok.encode_header("assistant")
    prompt = tok.encode_dialog_prompt([{"role": "user", "content": task_message(TASK)}])
    answers = [tok.encode(text) + [tok.eot_id] for text in (WRONG, NO_CODE, RIGHT)]
    assert ep.tokens == prompt + answers[0] + fixed + answers[1] + fixed + answers[2]
    assert [t.reward for t in ep.turns] == [0.0, pytest.approx(-0.2), 1.0] and ep.private.passed
    assert "Expected output" not in tok.decode(ep.tokens) and "add(1, 2)" not in tok.decode(ep.tokens)


def test_episode_ends_when_public_tests_pass_and_private_tests_decide(pool):
    """A program that passes the public test but fails a private one: one turn, reward -1."""
    tok = Tokenizer.byte_level()
    overfit = "```python\ndef add(a, b):\n    return 3\n```"
    worker = RolloutWorker(tok, pool, RolloutConfig(max_turns=3), RewardConfig())
    sampler, calls = scripted(tok, [overfit, RIGHT, RIGHT])
    eps = worker.run(sampler, [TASK, TASK])
    assert calls == [2]  # both episodes ended after turn 1: the public test passed
    for ep in eps:
        assert len(ep.turns) == 1 and ep.turns[0].public.passed
        assert not ep.private.passed and ep.reward == -1.0
        assert [r.status for r in ep.private.tests] == ["pass", "wrong_answer"]


def test_a_passing_final_program_is_timed_once_in_a_timing_thread_and_earns_the_time_reward(pool):
    """r = +1 + time_weight * speed on a pass (reward.final_reward); two samples of a task that wrote the same
    program share one timing; a failing program is never timed."""
    tok = Tokenizer.byte_level()
    worker = RolloutWorker(tok, pool, RolloutConfig(max_turns=1), RewardConfig(time_weight=0.5))
    timed = []

    def time_reward(task, code):
        timed.append((task.task_id, code, threading.current_thread() is threading.main_thread()))
        return 0.4
    worker.time_reward = time_reward

    def right_right_wrong(prompts):
        return [(tok.encode(answer) + [tok.eot_id], True) for answer in (RIGHT, RIGHT, WRONG)[:len(prompts)]]
    right, again, wrong = worker.run(right_right_wrong, [TASK, TASK, TASK])
    for ep in (right, again):
        assert ep.passed and ep.speed == 0.4 and ep.reward == pytest.approx(1.0 + 0.5 * 0.4)
    assert not wrong.passed and wrong.speed is None and wrong.reward == -1.0
    assert timed == [("add", right.turns[0].code, False)]


def test_finished_episodes_leave_the_generation_batch(pool):
    """Episode A passes in turn 1, B needs a second turn: the second generate() call holds only B."""
    tok = Tokenizer.byte_level()
    answers = iter([RIGHT, WRONG, RIGHT])  # call 1: A turn 1, call 2: B turn 1, call 3: B turn 2
    seen = []

    def sample(prompts):
        seen.append(len(prompts))
        return [(tok.encode(next(answers)) + [tok.eot_id], True) for _ in prompts]

    worker = RolloutWorker(tok, pool, RolloutConfig(max_turns=3, gen_batch_size=1), RewardConfig())
    a, b = worker.run(sample, [TASK, TASK])
    assert seen == [1, 1, 1]  # gen_batch_size=1: turn 1 is two calls of one, turn 2 one call (B only)
    assert len(a.turns) == 1 and a.passed and a.reward == 1.0
    assert len(b.turns) == 2 and b.passed and b.reward == 1.0


def test_truncated_response_is_closed_and_flagged(pool):
    """A response that hits max_new_tokens without a stop token: an end-of-turn token (not an action) closes
    it, before the feedback and at the end of the episode, as the chat template closes every message."""
    tok = Tokenizer.byte_level()
    cut = tok.encode("```python\ndef add(a, b):\n    return a -")

    def sample(prompts):
        return [(cut, False) for _ in prompts]

    worker = RolloutWorker(tok, pool, RolloutConfig(max_turns=2, max_new_tokens=len(cut)), RewardConfig())
    [ep] = worker.run(sample, [TASK])
    assert len(ep.turns) == 2
    for turn in ep.turns:
        assert ep.tokens[turn.start:turn.end] == cut
        assert ep.tokens[turn.end] == tok.eot_id and ep.action_mask[turn.end] is False
    assert len(ep.tokens) == ep.turns[-1].end + 1
    assert ep.truncated and collate([ep], tok.pad_id)["truncated"].tolist() == [True]
    assert ep.reward == -1.0  # the cut-off code is a syntax error: it fails


def test_a_cut_off_earlier_turn_flags_the_episode(pool):
    """The length penalty covers an episode in which ANY response was cut off, not only the last one."""
    tok = Tokenizer.byte_level()
    cut = tok.encode(WRONG)[:-3]  # the closing fence is missing

    def sample(prompts, turn=iter([(cut, False), (tok.encode(RIGHT) + [tok.eot_id], True)])):
        return [next(turn) for _ in prompts]

    worker = RolloutWorker(tok, pool, RolloutConfig(max_turns=3), RewardConfig())
    [ep] = worker.run(sample, [TASK])
    assert [t.stopped for t in ep.turns] == [False, True] and ep.passed
    assert ep.truncated and collate([ep], tok.pad_id)["truncated"].tolist() == [True]


def test_another_end_token_is_written_as_end_of_turn(pool):
    """A turn that stopped on <|end_of_text|> is written as the template writes it, with <|eot_id|>; the stop
    stays the policy's action."""
    tok = Tokenizer.byte_level()
    answers = iter([tok.encode(WRONG) + [tok.eos_id], tok.encode(RIGHT) + [tok.eos_id]])
    worker = RolloutWorker(tok, pool, RolloutConfig(max_turns=3), RewardConfig())
    [ep] = worker.run(lambda prompts: [(next(answers), True) for _ in prompts], [TASK])
    assert tok.eos_id not in ep.tokens and ep.passed and not ep.truncated
    for turn, text in zip(ep.turns, (WRONG, RIGHT)):
        assert ep.tokens[turn.start:turn.end] == tok.encode(text) + [tok.eot_id]
        assert all(ep.action_mask[turn.start:turn.end])
    with pytest.raises(ValueError, match="stop_ids"):  # "stopped" without a stop token is the sampler's bug
        worker.run(lambda prompts: [(tok.encode(RIGHT), True) for _ in prompts], [TASK])


def lengths_of_turn_one(tok):
    """Prompt, first response (WRONG + end of turn) and the feedback message with the next header."""
    prompt = tok.encode_dialog_prompt([{"role": "user", "content": task_message(TASK)}])
    response = tok.encode(WRONG) + [tok.eot_id]
    fb = ("Your code failed the following tests:\n\n"
          "- input 'add(1, 2)' failed: Expected output '3' but got '-1'\n\nGive it another try.")
    feedback = tok.encode_message("user", fb) + tok.encode_header("assistant")
    return len(prompt), len(response), len(feedback)


def test_episode_length_limit_counts_the_feedback_and_the_next_header(pool):
    """A second turn is sampled only if the feedback, the header and a whole response (max_new_tokens and its
    closing <|eot_id|>) fit in max_episode_tokens; one token less and the episode ends after turn 1."""
    tok = Tokenizer.byte_level()
    prompt, response, feedback = lengths_of_turn_one(tok)
    max_new = 100
    just_fits = prompt + response + feedback + max_new + 1
    for limit, turns in ((just_fits, 2), (just_fits - 1, 1)):
        seen = []

        def sample(prompts, answers=iter([WRONG, RIGHT])):
            seen.extend(len(p) for p in prompts)
            return [(tok.encode(next(answers)) + [tok.eot_id], True) for _ in prompts]
        cfg = RolloutConfig(max_turns=3, max_new_tokens=max_new, max_episode_tokens=limit)
        [ep] = RolloutWorker(tok, pool, cfg, RewardConfig()).run(sample, [TASK])
        assert len(ep.turns) == turns and len(ep.tokens) <= limit
        assert all(n + max_new + 1 <= limit for n in seen)
        assert ep.passed == (turns == 2)  # ended early: the wrong first answer is the final code


def test_no_episode_exceeds_max_episode_tokens(pool):
    """Worst case: every response is cut off at max_new_tokens, over three turns, at many limits (a limit
    counted on the prompt alone once let a 400-token episode reach 807 tokens)."""
    tok = Tokenizer.byte_level()
    max_new = 120
    filler = tok.encode("x = 1\n" * max_new)[:max_new]  # no code block: "no code" feedback, then again
    prompt_len = lengths_of_turn_one(tok)[0]

    def cut_off(prompts):
        return [(filler, False) for _ in prompts]
    for limit in range(prompt_len + max_new + 1, 800, 23):  # 1, 2 and 3 turns fit
        cfg = RolloutConfig(max_turns=3, max_new_tokens=max_new, max_episode_tokens=limit)
        [ep] = RolloutWorker(tok, pool, cfg, RewardConfig()).run(cut_off, [TASK])
        assert len(ep.tokens) <= limit and ep.truncated
    with pytest.raises(ValueError, match="task add: its prompt"):  # no room for even one turn
        cfg = RolloutConfig(max_new_tokens=max_new, max_episode_tokens=prompt_len + max_new)
        RolloutWorker(tok, pool, cfg, RewardConfig()).run(cut_off, [TASK])
    with pytest.raises(ValueError, match="max_new_tokens is 119"):  # a sampler must keep to the limit
        worker = RolloutWorker(tok, pool, RolloutConfig(max_new_tokens=max_new - 1), RewardConfig())
        worker.run(cut_off, [TASK])


def test_repair_turns_bench_sorts_later_turns_and_computes_the_fresh_sample_baseline(pool):
    """bench/repair_turns.py on scripted episodes: what each later turn did, and 1 - (1 - p)^2 by hand."""
    from bench.repair_turns import fresh_sample_baseline, got_feedback, later_turn_kind
    tok = Tokenizer.byte_level()
    worker = RolloutWorker(tok, pool, RolloutConfig(max_turns=3), RewardConfig())
    [repeat_then_fix] = worker.run(scripted(tok, [WRONG, WRONG, RIGHT])[0], [TASK])
    [silent] = worker.run(scripted(tok, [WRONG, NO_CODE, WRONG.replace("a - b", "a * b")])[0], [TASK])
    [first_try] = worker.run(scripted(tok, [RIGHT])[0], [TASK])
    assert [later_turn_kind(repeat_then_fix, k) for k in (1, 2)] == ["repeats an earlier answer",
                                                                     "passes the public tests"]
    assert [later_turn_kind(silent, k) for k in (1, 2)] == ["no code block", "fails the public tests"]
    assert got_feedback(repeat_then_fix) and got_feedback(silent) and not got_feedback(first_try)
    # singles: one of four passes (p = 1/4), so two fresh tries solve 1 - (3/4)^2 = 7/16 of the episodes
    singles = [first_try] + worker.run(scripted(tok, [WRONG])[0], [TASK] * 3, max_turns=1)
    assert fresh_sample_baseline(singles, [repeat_then_fix, silent]) == pytest.approx(7 / 16)


def test_repair_turns_bench_replays_failed_first_answers_in_new_chats(pool):
    """bench/repair_turns.py --fresh_chat: each later try is a one-message chat (task, last answer, feedback);
    a no-code try keeps the last answer; the final code is scored on the private tests."""
    from types import SimpleNamespace

    from bench.repair_turns import fresh_chat_message, fresh_chat_repairs
    tok = Tokenizer.byte_level()
    worker = RolloutWorker(tok, pool, RolloutConfig(max_turns=1), RewardConfig())
    [failed] = worker.run(scripted(tok, [WRONG])[0], [TASK])
    [passed] = worker.run(scripted(tok, [RIGHT])[0], [TASK])
    seen = []

    def sampler(prompts):  # turn 2: no code; turn 3: the right answer
        seen.append(prompts)
        return [(tok.encode(NO_CODE if len(seen) == 1 else RIGHT) + [tok.eot_id], True) for _ in prompts]
    cfg = SimpleNamespace(instruction=INSTRUCTION, gen_batch_size=8)
    tasks, solved = fresh_chat_repairs(tok, sampler, pool, [failed, passed], cfg, show_code=True)
    assert [t.task_id for t in tasks] == ["add"] and solved == [True]   # only the failed episode is replayed
    feedback = feedback_text(failed.turns[0].public, TASK.public_tests)
    expected = (f"{task_message(TASK)}\n\nA previous answer:\n```python\ndef add(a, b):\n    return a - b\n"
                f"```\n\n{feedback}")
    first = failed.turns[0]
    assert fresh_chat_message(TASK, first.code, first.public, INSTRUCTION, True) == expected
    both_prompts = tok.encode_dialog_prompt([{"role": "user", "content": expected}])
    assert seen == [[both_prompts], [both_prompts]]   # a no-code try leaves the last answer and feedback
    without_code = fresh_chat_message(TASK, failed.turns[0].code, failed.turns[0].public, INSTRUCTION, False)
    assert without_code == f"{task_message(TASK)}\n\n{feedback}"
