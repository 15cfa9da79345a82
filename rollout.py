"""Multi-turn episodes with execution feedback, as in RLEF (Gehring et al. 2024).

One episode of a task:
    user: problem statement
    assistant: response 1 ──► extract the code ──► run the PUBLIC tests in the sandbox
    user: "Your code failed the following tests: ... Give it another try."     (only if a test failed)
    assistant: response 2 ──► ...
The episode ends when the public tests pass or the turn limit is reached. Only then is the final code scored
on the PRIVATE tests (reward.py), so the policy never sees what it is scored on.

All episodes of a batch advance together, turn by turn; finished ones drop out of the generation batch. The
sandbox works in a thread pool while the model generates: each micro-batch's programs are submitted as soon as
they are sampled, and final private-test runs are submitted as soon as an episode ends.

Chat template. An episode's ids are the model family's chat template (Llama 3 or ChatML) applied to its
messages, with each assistant message written as the policy sampled it. The sampled ids are the actions and
are never re-encoded (that would train ids the policy did not sample): they equal the template's own ids
whenever they are the tokenizer's encoding of their text (Llama 3's template also trims that text). However a
turn ended, it is closed as the template closes a message (Tokenizer.close_turn): a stop on another end token
(<|eom_id|>, <|end_of_text|>, <|endoftext|>) is written as <|eot_id|> / <|im_end|> and stays an action;
ChatML's newline after <|im_end|>, and the whole closing of a response cut off by the length limit, are
context.

Truncation. An episode in which any response was cut off by max_new_tokens is `truncated` (the length
penalty in ppo.py). An episode never exceeds max_episode_tokens: a further turn is sampled only if the
feedback message, the next assistant header and a whole response with its closing fit; when they do not, the
episode ends there and its last code is scored. A task whose prompt leaves no room for one turn is an error.

This file computes no loss. Its output is token ids, the mask of tokens the policy sampled, the turn
boundaries and the rewards; `collate` pads them into tensors for ppo.py.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from data import Task
from reward import (INVALID, NO_CODE_FEEDBACK, UNINFORMATIVE_FEEDBACK, RewardConfig, TimeReward, extract_code,
                    feedback_text, final_reward)
from sandbox import RunResult, SandboxPool

# A sampler maps prompts (token id lists) to (response ids, stopped) pairs. `stopped` is False when the
# response hit the length limit without a stop token. The response includes the stop token when stopped.
Sampler = Callable[[list[list[int]]], list[tuple[list[int], bool]]]

INSTRUCTION = "Write a Python solution. Put the complete program in one ```python code block."


@dataclass
class RolloutConfig:
    max_turns: int = 3             # RLEF uses 3 turns
    max_new_tokens: int = 256      # per turn
    max_episode_tokens: int = 2048  # prompt, responses and feedback; an episode never exceeds it
    gen_batch_size: int = 16       # episodes per generate() call (micro-batch)
    instruction: str = INSTRUCTION  # appended to every task's prompt (the tiny demo: none)
    feedback: str = "execution"     # "uninformative": reward.UNINFORMATIVE_FEEDBACK after every failed turn


@dataclass
class Turn:
    start: int                  # index in Episode.tokens of the first sampled token of this turn
    end: int                    # one past the last sampled token (the closing context follows)
    stopped: bool               # ended with a stop token (False: hit max_new_tokens)
    code: str | None            # extracted code, None when the response had no code block
    public: RunResult | None = None   # verdicts on the public tests (None without code)
    reward: float = 0.0         # per-turn reward: -0.2 without code (RLEF), plus the final reward on the last


@dataclass
class Episode:
    task: Task
    tokens: list[int]                       # the chat template of prompt, responses, feedback messages
    action_mask: list[bool]                 # True where the policy sampled the token
    turns: list[Turn] = field(default_factory=list)
    private: RunResult | None = None        # verdicts of the final code on the private tests
    speed: float | None = None              # the time reward of the final code, when it passed and was timed
    done: bool = False
    _private_future: Future | None = None
    _speed_future: Future | None = None     # the time reward, computed in RolloutWorker.timing

    @property
    def reward(self) -> float:
        return sum(turn.reward for turn in self.turns)

    @property
    def passed(self) -> bool:
        return self.private is not None and self.private.passed

    @property
    def truncated(self) -> bool:
        """Some response ran out of tokens before its stop token (gets the length penalty in ppo.py)."""
        return any(not turn.stopped for turn in self.turns)

    def text(self, tokenizer) -> str:
        return tokenizer.decode(self.tokens)


class RolloutWorker:
    """Runs batches of multi-turn episodes; holds the sandbox pool and the time reward."""

    def __init__(self, tokenizer, pool: SandboxPool, cfg: RolloutConfig, reward_cfg: RewardConfig):
        self.tokenizer, self.pool, self.cfg, self.reward_cfg = tokenizer, pool, cfg, reward_cfg
        self.time_reward = TimeReward(pool) if reward_cfg.time_weight else None
        # One timing thread per sandbox worker: TimeReward runs its jobs one after the other, so this keeps
        # every worker busy.
        self.timing = ThreadPoolExecutor(pool.workers) if self.time_reward is not None else None
        # where rollout time goes (bench/bench_train.py)
        self.seconds = {"generate": 0.0, "sandbox_wait": 0.0}

    def run(self, sampler: Sampler, tasks: list[Task], max_turns: int | None = None) -> list[Episode]:
        """One episode per task (repeat a task n times in `tasks` for n samples), in the order given."""
        max_turns = self.cfg.max_turns if max_turns is None else max_turns
        tok = self.tokenizer
        episodes = []
        for task in tasks:
            message = task_message(task, self.cfg.instruction)
            prompt = tok.encode_dialog_prompt([{"role": "user", "content": message}])
            if not self._room_for_turn(len(prompt)):
                raise ValueError(f"task {task.task_id}: its prompt ({len(prompt)} tokens) leaves no room for "
                                 f"a {self.cfg.max_new_tokens}-token response within max_episode_tokens="
                                 f"{self.cfg.max_episode_tokens}")
            episodes.append(Episode(task, list(prompt), [False] * len(prompt)))
        for turn_index in range(max_turns):
            active = [ep for ep in episodes if not ep.done]
            if not active:
                break
            last_turn = turn_index == max_turns - 1
            pending = self._generate_and_submit(sampler, active)
            for ep, future in pending:
                self._finish_turn(ep, future, last_turn)
        if self.timing is not None:
            self._time_final_programs(episodes)
        for ep in episodes:
            self._score(ep)
        return episodes

    def _generate_and_submit(self, sampler: Sampler,
                             active: list[Episode]) -> list[tuple[Episode, Future | None]]:
        """Sample one response per active episode, micro-batch by micro-batch; each program goes to the
        sandbox as soon as it is sampled, so the sandbox runs while the next micro-batch generates."""
        pending = []
        size = self.cfg.gen_batch_size
        for i in range(0, len(active), size):
            chunk = active[i:i + size]
            t0 = time.perf_counter()
            responses = sampler([ep.tokens for ep in chunk])
            self.seconds["generate"] += time.perf_counter() - t0
            for ep, (response, stopped) in zip(chunk, responses):
                if not 0 < len(response) <= self.cfg.max_new_tokens:
                    raise ValueError(f"task {ep.task.task_id}: the sampler returned {len(response)} tokens; "
                                     f"RolloutConfig.max_new_tokens is {self.cfg.max_new_tokens}")
                actions, closing = self.tokenizer.close_turn(response, stopped)
                start = len(ep.tokens)
                ep.tokens += actions + closing
                ep.action_mask += [True] * len(actions) + [False] * len(closing)
                code = response_code(self.tokenizer, response, stopped)
                ep.turns.append(Turn(start, start + len(actions), stopped, code))
                future = None
                if code is not None and ep.task.public_tests:
                    future = self.pool.submit(code, ep.task.public_tests, ep.task.setup_code)
                pending.append((ep, future))
        return pending

    def _room_for_turn(self, n_tokens: int) -> bool:
        """Whether a whole response and its closing fit after n_tokens within max_episode_tokens."""
        turn = self.cfg.max_new_tokens + len(self.tokenizer.encode_message_end())
        return n_tokens + turn <= self.cfg.max_episode_tokens

    def _finish_turn(self, ep: Episode, future: Future | None, last_turn: bool) -> None:
        """Read the public verdicts; end the episode or append the feedback as the next user turn."""
        turn, tok = ep.turns[-1], self.tokenizer
        turn.public = self._wait(future)
        public_passed = turn.code is not None and (turn.public is None or turn.public.passed)
        message = []
        if not (public_passed or last_turn):
            feedback = UNINFORMATIVE_FEEDBACK if self.cfg.feedback == "uninformative" else \
                NO_CODE_FEEDBACK if turn.code is None else feedback_text(turn.public, ep.task.public_tests)
            message = tok.encode_message("user", feedback) + tok.encode_header("assistant")
        if not message or not self._room_for_turn(len(ep.tokens) + len(message)):
            ep.done = True
            if turn.code is not None:  # score the final code now; it runs while other episodes generate
                ep._private_future = self.pool.submit(turn.code, ep.task.private_tests, ep.task.setup_code)
            return
        if turn.code is None:   # RLEF: a turn without code is penalised, and the episode goes on
            turn.reward = INVALID
        ep.tokens += message
        ep.action_mask += [False] * len(message)

    def _score(self, ep: Episode) -> None:
        """The final reward, on the last turn: correctness on the private tests (+ the time reward)."""
        final = ep.turns[-1]
        ep.private, ep._private_future = self._wait(ep._private_future), None   # None: no final code
        ep.speed, ep._speed_future = self._wait(ep._speed_future), None
        final.reward += final_reward(ep.private, self.reward_cfg, time=ep.speed or 0.0)

    def _time_final_programs(self, episodes: list[Episode]) -> None:
        """Start the time reward of every final program, after generation (timing beside it slowed generation
        as much as it saved). The samples of a task often write the same program: it is timed once."""
        timings: dict[tuple[str, str], Future] = {}
        for ep in episodes:
            if ep._private_future is not None:
                key = (ep.task.task_id, ep.turns[-1].code)
                if key not in timings:
                    timings[key] = self.timing.submit(self._speed, ep.task, key[1], ep._private_future)
                ep._speed_future = timings[key]

    def _speed(self, task: Task, code: str, private: Future) -> float | None:
        """The time reward of a final program once it has passed its private tests (None if it failed)."""
        return self.time_reward(task, code) if private.result().passed else None

    def _wait(self, future: Future | None):
        if future is None:
            return None
        t0 = time.perf_counter()
        result = future.result()
        self.seconds["sandbox_wait"] += time.perf_counter() - t0
        return result


def task_message(task: Task, instruction: str = INSTRUCTION) -> str:
    return f"{task.prompt.rstrip()}\n\n{instruction}" if instruction else task.prompt.rstrip()


def response_code(tokenizer, response: list[int], stopped: bool) -> str | None:
    """The code block of a sampled response (None without one), decoded without its stop token."""
    return extract_code(tokenizer.decode(response[:-1] if stopped else response))


def model_sampler(model, tokenizer, max_new_tokens: int, temperature: float,
                  generator: torch.Generator | None = None) -> Sampler:
    """A Sampler backed by model.generate (KV cache, per-row stop ids)."""
    from model import generate

    def sample(prompts: list[list[int]]) -> list[tuple[list[int], bool]]:
        out = generate(model, prompts, max_new_tokens, temperature=temperature,
                       stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id, generator=generator)
        rows = []
        for tokens, mask, stopped in zip(out.tokens.tolist(), out.mask.tolist(), out.stopped.tolist()):
            rows.append(([t for t, m in zip(tokens, mask) if m], bool(stopped)))
        return rows
    return sample


# ------------------------------------------------------------------------------------------------------------
# Episodes -> padded tensors for ppo.py


def collate(episodes: list[Episode], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad episodes into (B, T) tensors. Turn-level fields are (B, K), K the most turns in the batch.

    tokens        (B, T) long   token ids, pad_id after the end
    action_mask   (B, T) bool   True where the policy sampled the token
    turn_ids      (B, T) long   index of the turn an action token belongs to, -1 elsewhere
    turn_starts   (B, K) long   index of each turn's first sampled token; the last prompt token is start - 1,
                                where RLEF's turn-level critic predicts the value of the turn
    turn_mask     (B, K) bool   which turns exist
    turn_rewards  (B, K) float  per-turn rewards (the final reward sits on the last turn)
    rewards       (B,)   float  episode reward (sum of turn rewards)
    truncated     (B,)   bool   some response of the episode hit the length limit without a stop token
    """
    B = len(episodes)
    T = max(len(ep.tokens) for ep in episodes)
    K = max(len(ep.turns) for ep in episodes)
    batch = {
        "tokens": torch.full((B, T), pad_id, dtype=torch.long),
        "action_mask": torch.zeros(B, T, dtype=torch.bool),
        "turn_ids": torch.full((B, T), -1, dtype=torch.long),
        "turn_starts": torch.zeros(B, K, dtype=torch.long),
        "turn_mask": torch.zeros(B, K, dtype=torch.bool),
        "turn_rewards": torch.zeros(B, K),
        "rewards": torch.tensor([ep.reward for ep in episodes], dtype=torch.float32),
        "truncated": torch.tensor([ep.truncated for ep in episodes]),
    }
    for b, ep in enumerate(episodes):
        n = len(ep.tokens)
        batch["tokens"][b, :n] = torch.tensor(ep.tokens)
        batch["action_mask"][b, :n] = torch.tensor(ep.action_mask)
        for k, turn in enumerate(ep.turns):
            batch["turn_ids"][b, turn.start:turn.end] = k
            batch["turn_starts"][b, k] = turn.start
            batch["turn_mask"][b, k] = True
            batch["turn_rewards"][b, k] = turn.reward
    return batch
