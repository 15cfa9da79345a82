"""Rewards from execution: RLEF's correctness reward and feedback text, and this project's addition, a time
reward against the reference solution.

Rewards are pure functions of sandbox verdicts: the only code this file runs goes through sandbox.py
(TimeReward). It never imports torch.
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

from data import Task, Test

if TYPE_CHECKING:   # sandbox imports data.Test; reward needs its types for annotations only
    from sandbox import RunResult, SandboxPool

# RLEF (Gehring et al. 2024): +1 when the final code passes every private test, -1 otherwise,
# and -0.2 for a turn whose response holds no code. The same reward's KL penalty is ppo.py's.
CORRECT, INCORRECT, INVALID = 1.0, -1.0, -0.2


@dataclass
class RewardConfig:
    time_weight: float = 0.0   # weight of TimeReward, on passing programs; 0 = off


def final_reward(result: RunResult | None, cfg: RewardConfig, time: float = 0.0) -> float:
    """The reward of an episode's final code on the private tests, `result` (None: the last turn had no code).

    r = +1 + time_weight * time   when every private test passes (time: TimeReward's score)
        -1                        when one fails
        -1 - 0.2                  without code: the episode failed and its last turn had no code, so silence
                                  never beats trying
    """
    if result is None:
        return INCORRECT + INVALID
    return CORRECT + cfg.time_weight * time if result.passed else INCORRECT


# ---- Code extraction

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[ \t]*\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)",
                    re.DOTALL | re.MULTILINE)
_PYTHON = {"python", "py", "python3", "py3"}


def extract_code(text: str) -> str | None:
    """The last ```python block of a response (else the last unlabelled ``` block), or None: no code.

    A block with a syntax error is still code: it fails its tests and the feedback shows the SyntaxError. A
    block left open at the end (generation stopped before the closing fence) runs to the end of the text.
    """
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    python = [body for lang, body in blocks if lang in _PYTHON]
    bare = [body for lang, body in blocks if lang == ""]
    code = (python or bare or [""])[-1]
    if not code.strip():
        return None
    return code if code.endswith("\n") else code + "\n"


# ---- Feedback for the next turn, in RLEF's form

NO_CODE_FEEDBACK = "Your answer contained no ```python code block. Give it another try."
# RLEF's ablation (Gehring et al. 2024): the same turns, with feedback that says nothing about the run
UNINFORMATIVE_FEEDBACK = "Your code failed a test. Give it another try."
_STATUS_TEXT = {"timeout": "Execution took too long.", "out_of_memory": "Out of memory.",
                "output_limit": "The program printed too much output."}


def feedback_text(result: RunResult, tests: list[Test]) -> str:
    """"Your code failed the following tests:", a line per failing test, "Give it another try."; "" when every
    test passed. `tests` are the tests `result` ran; one without a result (the program ended the run before
    it) counts as failed."""
    results = result.tests + [None] * (len(tests) - len(result.tests))
    lines = [_failure_text(test, r) for test, r in zip(tests, results) if r is None or r.status != "pass"]
    if not lines:
        return ""
    return "Your code failed the following tests:\n\n" + "\n".join(lines) + "\n\nGive it another try."


def _failure_text(test: Test, result) -> str:
    shown = {"call": test.call, "stdio": test.stdin, "assert": test.code}[test.kind]
    shown = shown.strip().replace("\n", "\\n")
    head = f"- input '{_truncate(shown)}' failed:"
    if result is None:
        return f"{head} No result: the program stopped before this test."
    if result.status == "wrong_answer":
        expected = result.expected if result.expected is not None else test.expected
        return f"{head} Expected output '{_truncate(expected)}' but got '{_truncate(result.got or '')}'"
    if result.status == "runtime_error":   # the traceback's end (the sandbox keeps the program's frames only)
        kept = [line for line in result.detail.strip().splitlines() if line.strip()][-6:]
        traceback = "\n".join("  " + line for line in kept)
        return f"{head}\n{_truncate(traceback, 500)}"
    if result.status == "crash":
        return f"{head} The program crashed ({_truncate(result.detail.strip(), 80) or 'killed by a signal'})."
    return f"{head} {_STATUS_TEXT.get(result.status, result.status)}"


def _truncate(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# ---- Time reward (this project's addition)


def has_assert_tests(task: Task) -> bool:
    """Whether a private test is an assert, whose verdict the sandbox's child decides: a program could forge
    its pass. Such tasks earn no time reward, and train.py keeps them out of RL."""
    return any(test.kind == "assert" for test in task.private_tests)


class TimeReward:
    """r = clip(ln(t_ref / t_cand), -clip, clip): a passing program's speed against the task's reference
    solution, on the private tests (cf. Shypula et al. 2024, "Learning Performance-Improving Code Edits",
    which scores speedups against a reference).

    - t is CPU time (the sandbox's cgroup clock: every process the program starts counts), not wall time,
      which waiting for a core inflates. It is the median over rounds less the median of a baseline, a
      program that does nothing (interpreter start-up and harness, which would swamp a difference of a few
      ms), and at least `floor_s`, below which times are noise: two programs under the floor score 0.
    - ln of the ratio is symmetric (2x faster +0.69, 2x slower -0.69) and free of each task's scale; the clip
      keeps time_weight * r from outweighing correctness.
    - Each call times candidate, reference and baseline one after the other, in rounds, each in a sandbox run
      of its own: the load of the moment falls on all three alike, nothing the candidate leaves can slow the
      reference, and the median drops outliers. Nothing is cached: a reference timed once would carry its
      error into every later call. Rounds stop early once both medians are under the floor.
    - A candidate whose timing run fails scores -clip: failing on purpose never beats running slowly. A
      reference that fails is run again, up to `ref_tries` runs; if it still fails the sample leaves the time
      term (0), as does a task without a reference or with an assert test (its pass could be forged).
    `last_outcome` names the case of the last call.
    """

    def __init__(self, pool: SandboxPool, repeats: int = 3, clip: float = 1.0, floor_s: float = 0.005,
                 ref_tries: int = 3):
        if repeats < 1 or ref_tries < 1:
            raise ValueError(f"TimeReward: repeats and ref_tries must be >= 1, got {repeats} and {ref_tries}")
        self.pool, self.repeats, self.clip, self.floor_s = pool, repeats, clip, floor_s
        self.ref_tries = ref_tries
        self.last_outcome = ""

    def __call__(self, task: Task, program: str) -> float:
        if has_assert_tests(task):
            self.last_outcome = "assert_tests"
            return 0.0
        times = self.net_cpu_times(task, program)
        if times is None:
            self.last_outcome = "no_reference" if task.reference_solution is None else "reference_failed"
            return 0.0
        self.last_outcome = ("candidate_failed" if times[1] == math.inf else
                             "under_floor" if max(times) < self.floor_s else "timed")
        return self.score(*times)

    def score(self, t_ref: float, t_cand: float) -> float:
        """clip(ln(t_ref / t_cand)) of net CPU times raised to the floor; t_cand = inf (failed): -clip."""
        if t_cand == math.inf:
            return -self.clip
        t_ref, t_cand = max(t_ref, self.floor_s), max(t_cand, self.floor_s)
        return max(-self.clip, min(self.clip, math.log(t_ref / t_cand)))

    def net_cpu_times(self, task: Task, program: str) -> tuple[float, float] | None:
        """(reference, candidate): median CPU seconds over the rounds less the baseline's median. The
        candidate's is inf when one of its runs failed; None without a reference or when it kept failing."""
        if task.reference_solution is None:
            return None
        cpu = {"cand": [], "ref": [], "base": []}
        for _ in range(self.repeats):
            t = self._time(program, task.private_tests, task.setup_code)
            if t is None:
                return (statistics.median(cpu["ref"]) if cpu["ref"] else math.nan), math.inf
            cpu["cand"].append(t)
            for _ in range(self.ref_tries):
                t = self._time(task.reference_solution, task.private_tests, task.setup_code)
                if t is not None:
                    break
            if t is None:
                return None
            cpu["ref"].append(t)
            t = self._time("pass\n", [Test(kind="assert", code="pass")], "")
            if t is None:
                raise RuntimeError("TimeReward: the sandbox failed the empty baseline program")
            cpu["base"].append(t)
            base = statistics.median(cpu["base"])
            t_ref, t_cand = statistics.median(cpu["ref"]) - base, statistics.median(cpu["cand"]) - base
            if max(t_ref, t_cand) < self.floor_s:
                break
        return t_ref, t_cand

    def _time(self, program: str, tests: list[Test], setup: str) -> float | None:
        """CPU seconds of one run, None when it fails. One job at a time: the run has ended on return."""
        result = self.pool.map([(program, tests, setup)])[0]
        return result.cpu_time if result.passed else None
