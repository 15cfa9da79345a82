"""Rewards from execution: correctness, CPU time against the reference solution, a lint penalty, and the
feedback text the model reads in the next turn (RLEF, Gehring et al. 2024).

Rewards are pure functions of sandbox verdicts; the only code this file runs goes through sandbox.py
(TimeReward). lint_penalty only parses and compiles, it never executes. Never imports torch.
"""
from __future__ import annotations

import ast
import math
import re
import statistics
import symtable
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from data import Task, Test

if TYPE_CHECKING:  # sandbox imports data.Test; reward needs its types only for annotations
    from sandbox import RunResult, SandboxPool

# ----------------------------------------------------------------------------------------------------------------
# Code extraction

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[ \t]*\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)", re.DOTALL | re.MULTILINE)
_PYTHON_LANGS = {"python", "py", "python3", "py3"}


def extract_code(text: str) -> str | None:
    """The last ```python fenced block (else the last unlabelled ``` block); None = no valid code.

    None when there is no such block or it holds only whitespace: that turn gets RewardConfig.invalid.
    A block with a syntax error is still returned: it is an attempt, it fails its tests as a runtime error,
    and the model gets the SyntaxError as feedback. A block left open at the end of the text (generation
    stopped before the closing fence) counts: its code runs to the end of the text.
    """
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    python = [body for lang, body in blocks if lang in _PYTHON_LANGS]
    bare = [body for lang, body in blocks if lang == ""]
    code = (python or bare or [""])[-1]
    if not code.strip():
        return None
    return code if code.endswith("\n") else code + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Correctness


@dataclass
class RewardConfig:
    correct: float = 1.0           # every private test passes (RLEF)
    incorrect: float = -1.0        # any private test fails
    invalid: float = -0.2          # the turn has no code block
    partial_credit: bool = False   # incorrect + fraction passed * (correct - incorrect) instead of incorrect
    time_weight: float = 0.0       # weight of TimeReward (only for passing programs); 0 = off
    time_clip: float = 1.0         # TimeReward is clipped to [-time_clip, time_clip] before the weight
    time_repeats: int = 3          # interleaved repeats per timing, the median is used
    time_floor_s: float = 0.005    # CPU times under this (after the baseline) count as this: below it is noise
    time_ref_tries: int = 3        # a reference that fails a timing run is run again up to this many times
    lint_weight: float = 0.0       # weight of lint_penalty; 0 = off


def correctness_reward(result: RunResult | None, cfg: RewardConfig = RewardConfig()) -> float:
    """+1 all tests pass, -1 otherwise, -0.2 with no code (result None). With partial credit the failing case
    is mapped linearly from `incorrect` (no test passed) towards `correct` by the fraction passed."""
    if result is None:
        return cfg.invalid
    if result.passed:
        return cfg.correct
    if cfg.partial_credit and result.tests:
        fraction = sum(t.status == "pass" for t in result.tests) / len(result.tests)
        return cfg.incorrect + fraction * (cfg.correct - cfg.incorrect)
    return cfg.incorrect


def combined_reward(result: RunResult | None, cfg: RewardConfig, time: float = 0.0, lint: float = 0.0) -> float:
    """correctness + time_weight * time (passing programs only) - lint_weight * lint (programs with code)."""
    reward = correctness_reward(result, cfg)
    if result is not None and result.passed:
        reward += cfg.time_weight * time
    if result is not None:
        reward -= cfg.lint_weight * lint
    return reward


# ----------------------------------------------------------------------------------------------------------------
# Time reward


def has_assert_tests(task: Task) -> bool:
    """Whether any private test is an assert, whose verdict the sandbox's child decides: a program could forge
    its pass. Such tasks earn no time reward, and train.py keeps them out of RL."""
    return any(test.kind == "assert" for test in task.private_tests)


class TimeReward:
    """Reward for running faster than the task's reference solution, on the private tests.

    r = clip(ln(t_ref / t_cand), -clip, clip), with t = max(median CPU time - baseline, floor).
    - CPU time of the run (the sandbox's cgroup clock: every process the program starts counts), not wall
      time, which waiting for a core inflates. CPU time moves with load too (on a 2-core VM the benchmark's
      loop was charged 0.09-0.12 s while sharing its core with a busy process, 0.17 s alone), hence rounds.
    - ln of the speed ratio is symmetric (2x faster = +0.69, 2x slower = -0.69) and scale-free across tasks;
      the clip keeps time_weight * r from ever outweighing correctness (cf. Shypula et al. 2024 "Learning
      performance-improving code edits", which scores speedup ratios against a reference).
    - baseline: the median CPU time of a program that defines nothing, run with one trivial test. It is the
      interpreter start-up and harness cost that every run pays, which would otherwise swamp a difference of
      a few ms.
    - floor: both times below it (most short programs) give r = 0 instead of a ratio of noise.
    - Every call times candidate, reference and baseline in rounds, one after the other, each run in its own
      sandbox (own cgroup and PID namespace, ended before the next starts), so nothing the candidate starts
      can slow the reference; the rounds put the load of the moment on all three alike and the median drops
      outliers. Nothing is cached: a reference timed once and reused carries its measurement error into every
      later call (bench/bench_time_reward.py).
    - Rounds stop early once both medians are under the floor, where r = 0: most programs cost one round (3
      runs), measurable ones `repeats` rounds.
    Failures: a candidate whose timing run fails (wrong answer, timeout, crash) scores -clip, the slowest, so
    failing on purpose never beats running slowly. A reference that fails is run again, up to `ref_tries` runs
    per round; if it still fails, the sample leaves the time term (0, counted as "reference_failed" in
    `outcomes`), as does a task without a reference. `last_outcome` and `outcomes` say which case each call was.
    """
    OUTCOMES = ("timed", "under_floor", "candidate_failed", "reference_failed", "no_reference", "assert_tests")

    def __init__(self, pool: SandboxPool, repeats: int = 3, clip: float = 1.0, floor_s: float = 0.005,
                 ref_tries: int = 3):
        if repeats < 1 or ref_tries < 1:
            raise ValueError(f"TimeReward: repeats and ref_tries must be >= 1, got {repeats} and {ref_tries}")
        self.pool, self.repeats, self.clip, self.floor_s, self.ref_tries = pool, repeats, clip, floor_s, ref_tries
        self.outcomes = dict.fromkeys(self.OUTCOMES, 0)
        self.last_outcome = ""

    @classmethod
    def from_config(cls, pool: SandboxPool, cfg: RewardConfig) -> "TimeReward":
        return cls(pool, repeats=cfg.time_repeats, clip=cfg.time_clip, floor_s=cfg.time_floor_s,
                   ref_tries=cfg.time_ref_tries)

    def __call__(self, task: Task, program: str) -> float:
        if has_assert_tests(task):  # a program can forge an assert test's pass (sandbox.TestResult.trusted)
            self.outcomes["assert_tests"] += 1
            self.last_outcome = "assert_tests"
            return 0.0
        times = self.net_cpu_times(task, program)
        if times is None:
            outcome, r = ("no_reference" if task.reference_solution is None else "reference_failed"), 0.0
        else:
            r = self.score(*times)
            outcome = ("candidate_failed" if times[1] == math.inf else
                       "under_floor" if max(times) < self.floor_s else "timed")
        self.outcomes[outcome] += 1
        self.last_outcome = outcome
        return r

    def score(self, t_ref: float, t_cand: float) -> float:
        """clip(ln(t_ref / t_cand), -clip, clip) of net CPU times, each raised to the floor; t_cand = inf (a
        failed run) is the slowest, -clip."""
        if t_cand == math.inf:
            return -self.clip
        t_ref, t_cand = max(t_ref, self.floor_s), max(t_cand, self.floor_s)
        return max(-self.clip, min(self.clip, math.log(t_ref / t_cand)))

    def _time(self, program: str, tests: list[Test], setup: str) -> float | None:
        """CPU seconds of one run, None when it fails. One job at a time: the run has ended on return."""
        result = self.pool.map([(program, tests, setup)])[0]
        return result.cpu_time if result.passed else None

    def net_cpu_times(self, task: Task, program: str) -> tuple[float, float] | None:
        """(reference, candidate): median CPU seconds over the rounds, less the baseline's median. The
        candidate's is inf when one of its runs failed; None when there is no reference or it kept failing."""
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


# ----------------------------------------------------------------------------------------------------------------
# Lint penalty: undefined names, unused imports, syntax warnings (ast / symtable / compile only, no execution)

_BUILTINS = frozenset(dir(__import__("builtins"))) | {"__file__", "__builtins__", "__annotations__"}


def _tables(table: symtable.SymbolTable):
    yield table
    for child in table.get_children():
        yield from _tables(child)


def lint_issues(program: str) -> list[str]:
    """Human-readable issues: a syntax error, syntax warnings, names never defined, imports never used."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compile(program, "<program>", "exec")
        with warnings.catch_warnings():   # symtable would repeat compile's warnings
            warnings.simplefilter("ignore")
            tables = list(_tables(symtable.symtable(program, "<program>", "exec")))
    except (SyntaxError, ValueError) as e:   # ValueError: source with null bytes
        return [f"syntax error: {e}"]
    issues = [f"{w.category.__name__}: {w.message}" for w in caught
              if issubclass(w.category, SyntaxWarning | DeprecationWarning)]
    module = tables[0]
    bound = {s.get_name() for s in module.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    bound |= {s.get_name() for t in tables for s in t.get_symbols() if s.is_declared_global() and s.is_assigned()}
    tree = ast.parse(program)
    future = {a.asname or a.name for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module == "__future__" for a in n.names}
    # Under `from __future__ import annotations` symtable skips annotations; a name used there is still used.
    annotations = [n.annotation for n in ast.walk(tree) if isinstance(n, ast.arg | ast.AnnAssign) and n.annotation]
    annotations += [n.returns for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
                    and n.returns]
    referenced = {n.id for a in annotations for n in ast.walk(a) if isinstance(n, ast.Name)}
    undefined, imported = set(), []
    for t in tables:
        for s in t.get_symbols():
            name = s.get_name()
            if s.is_referenced():
                referenced.add(name)
                globally = t.get_type() == "module" or s.is_global()
                if globally and name not in bound and name not in _BUILTINS:
                    undefined.add(name)
            if s.is_imported() and name not in future:
                imported.append(name)
    issues += [f"undefined name '{n}'" for n in sorted(undefined)]
    issues += [f"unused import '{n}'" for n in sorted(set(imported) - referenced)]
    return issues


def lint_penalty(program: str) -> float:
    """0 for clean code, 0.25 per issue, at most 1 (a syntax error is 1)."""
    issues = lint_issues(program)
    if issues and issues[0].startswith("syntax error"):
        return 1.0
    return min(1.0, 0.25 * len(issues))


# ----------------------------------------------------------------------------------------------------------------
# Feedback for the next turn (RLEF form)

NO_CODE_FEEDBACK = "Your answer contained no ```python code block. Give it another try."
_STATUS_TEXT = {"timeout": "Execution took too long.", "out_of_memory": "Out of memory.",
                "output_limit": "The program printed too much output."}


def _truncate(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _test_input(test: Test) -> str:
    raw = {"call": test.call, "stdio": test.stdin, "assert": test.code}[test.kind]
    return _truncate(raw.strip().replace("\n", "\\n"))


def _short_traceback(detail: str, lines: int = 6, limit: int = 500) -> str:
    """The last lines of the sandbox's traceback (it keeps only frames of the program), indented."""
    kept = [line for line in detail.strip().splitlines() if line.strip()][-lines:]
    return _truncate("\n".join("  " + line for line in kept), limit)


def _failure_text(test: Test, result) -> str:
    head = f"- input '{_test_input(test)}' failed:"
    if result is None:
        return f"{head} No result: the program stopped before this test."
    if result.status == "wrong_answer":
        expected = result.expected if result.expected is not None else test.expected
        got = result.got if result.got is not None else ""
        return f"{head} Expected output '{_truncate(expected)}' but got '{_truncate(got)}'"
    if result.status == "runtime_error":
        return f"{head}\n{_short_traceback(result.detail)}"
    if result.status == "crash":
        return f"{head} The program crashed ({_truncate(result.detail.strip(), 80) or 'killed by a signal'})."
    return f"{head} {_STATUS_TEXT.get(result.status, result.status)}"


def feedback_text(result: RunResult, tests: list[Test]) -> str:
    """"Your code failed the following tests:" + one line per failing test + "Give it another try."

    `tests` are the tests `result` ran (the public tests during a rollout); a test with no result (the
    program killed the run before it) counts as failed. Returns "" when every test passed.
    """
    lines = []
    for i, test in enumerate(tests):
        test_result = result.tests[i] if i < len(result.tests) else None
        if test_result is None or test_result.status != "pass":
            lines.append(_failure_text(test, test_result))
    if not lines:
        return ""
    return "Your code failed the following tests:\n\n" + "\n".join(lines) + "\n\nGive it another try."
