"""reward.py: code extraction, rewards computed by hand, exact feedback strings, and the time reward against
real sandbox runs and fake timings."""
import math
import statistics

import pytest

from data import Task, Test
from reward import RewardConfig, TimeReward, extract_code, feedback_text, final_reward
from sandbox import Limits, RunResult, SandboxPool, TestResult


def run(*statuses: str) -> RunResult:
    return RunResult(tests=[TestResult(s) for s in statuses], cpu_time=0.02, wall_time=0.05)


# ---------------------------------------------------------------------------------------------- extract_code

FENCE = "```"


@pytest.mark.parametrize("text, code", [
    (f"Here:\n{FENCE}python\ndef f():\n    return 1\n{FENCE}\nDone.", "def f():\n    return 1\n"),
    (f"{FENCE}python\nx = 1\n{FENCE}\nbetter:\n{FENCE}python\nx = 2\n{FENCE}", "x = 2\n"),  # the last one
    (f"{FENCE}\nx = 3\n{FENCE}", "x = 3\n"),  # bare fence
    (f"{FENCE}python\nx = 4\n{FENCE}\nOutput:\n{FENCE}\n4\n{FENCE}", "x = 4\n"),  # python beats bare
    (f"{FENCE}bash\nls\n{FENCE}", None),  # not python
    (f"{FENCE}python\nx = 5", "x = 5\n"),  # left open at the end
    (f"{FENCE}py\ndef f(:\n{FENCE}", "def f(:\n"),  # a syntax error is code
    (f"{FENCE}python\n   \n{FENCE}", None),  # empty
    ("def f():\n    return 1\n", None),  # no fence
    ("", None),
])
def test_extract_code(text, code):
    assert extract_code(text) == code


# ---------------------------------------------------------------------------------------------- correctness


def test_final_reward():
    """RLEF's +1 / -1 / -1.2 by hand; the time reward counts on a passing program only."""
    plain, timed = RewardConfig(), RewardConfig(time_weight=0.5)
    assert final_reward(run("pass", "pass"), plain, time=0.8) == 1.0
    assert final_reward(run("pass", "pass"), timed, time=0.8) == pytest.approx(1.4)
    assert final_reward(run("pass", "wrong_answer"), timed, time=0.8) == -1.0
    assert final_reward(run(), timed, time=0.8) == -1.0          # no results: not a pass
    assert final_reward(None, timed, time=0.8) == pytest.approx(-1.2)   # no final code: -1 - 0.2


# ---------------------------------------------------------------------------------------------- feedback


def test_feedback_text_exact():
    tests = [Test("call", call="add(1, 2)", expected="3"),
             Test("call", call="add(2, 2)", expected="4"),
             Test("stdio", stdin="5 5\n", expected="10\n"),
             Test("call", call="add(0, 0)", expected="0"),
             Test("call", call="add(-1, 1)", expected="0"),
             Test("assert", code="assert add(1, 1) == 2\nassert add(0, 1) == 1"),
             Test("call", call="add(9, 9)", expected="18")]
    result = RunResult(tests=[
        TestResult("pass"),
        TestResult("wrong_answer", expected="4", got="5"),
        TestResult("timeout", detail="Execution took too long."),
        TestResult("runtime_error", detail="Traceback (most recent call last):\n"
                                          "  File \"<program>\", line 2, in add\n"
                                          "    return a + b + c\nNameError: name 'c' is not defined"),
        TestResult("out_of_memory"),
        TestResult("crash", detail="killed by signal SIGSEGV"),
    ], cpu_time=0.1, wall_time=0.2)                       # the last test has no result at all
    assert feedback_text(result, tests) == (
        "Your code failed the following tests:\n\n"
        "- input 'add(2, 2)' failed: Expected output '4' but got '5'\n"
        "- input '5 5' failed: Execution took too long.\n"
        "- input 'add(0, 0)' failed:\n"
        "  Traceback (most recent call last):\n"
        "    File \"<program>\", line 2, in add\n"
        "      return a + b + c\n"
        "  NameError: name 'c' is not defined\n"
        "- input 'add(-1, 1)' failed: Out of memory.\n"
        "- input 'assert add(1, 1) == 2\\nassert add(0, 1) == 1' failed: The program crashed "
        "(killed by signal SIGSEGV).\n"
        "- input 'add(9, 9)' failed: No result: the program stopped before this test.\n\n"
        "Give it another try.")


def test_feedback_truncates_and_is_empty_when_all_pass():
    tests = [Test("call", call="f('" + "x" * 500 + "')", expected="1")]
    long_answer = TestResult("wrong_answer", expected="1", got="'" + "y" * 900 + "'")
    text = feedback_text(RunResult([long_answer], 0, 0), tests)
    line = text.splitlines()[2]
    assert line == f"- input 'f('{'x' * 117}...' failed: Expected output '1' but got ''{'y' * 119}...'"
    assert feedback_text(RunResult([TestResult("pass")], 0, 0), tests) == ""


def test_feedback_from_a_real_run():
    from sandbox import run_program
    tests = [Test("call", call="f(2)", expected="4"), Test("call", call="f(3)", expected="9")]
    result = run_program("def f(x):\n    return x + x\n", tests)
    assert feedback_text(result, tests) == ("Your code failed the following tests:\n\n"
                                            "- input 'f(3)' failed: Expected output '9' but got '6'\n\n"
                                            "Give it another try.")


# ---------------------------------------------------------------------------------------------- time reward


class CountingPool:
    """A pool that records the programs it is asked to run, and how many at once."""

    def __init__(self, pool):
        self.pool, self.programs, self.batches = pool, [], []

    def map(self, jobs):
        self.programs += [job[0] for job in jobs]
        self.batches.append(len(jobs))
        return self.pool.map(jobs)


FAST = "def total(n):\n    return n * (n - 1) // 2\n"
SLOW = "def total(n):\n    s = 0\n    for i in range(n):\n        s += i\n    return s\n"


def sum_task(reference: str, task_id: str) -> Task:
    tests = [Test("call", call="total(3_000_000)", expected=str(3_000_000 * 2_999_999 // 2)),
             Test("call", call="total(10)", expected="45")]
    return Task(task_id=task_id, prompt="Sum 0..n-1.", public_tests=tests[1:], private_tests=tests,
                entry_point="total", reference_solution=reference)


@pytest.mark.slow
def test_time_reward_orders_slow_and_fast_timing_the_reference_beside_each_candidate():
    with SandboxPool(workers=2, limits=Limits(timeout_s=10.0)) as pool:
        counting = CountingPool(pool)
        time_reward = TimeReward(counting, repeats=3, clip=1.0)
        fast_task = sum_task(FAST, "sum-fast-ref")
        slow_vs_fast = time_reward(fast_task, SLOW)
        assert counting.programs == [SLOW, FAST, "pass\n"] * 3  # 3 rounds of (candidate, reference, baseline)
        assert set(counting.batches) == {1}                    # one at a time: nothing beside the reference
        assert slow_vs_fast == -1.0                           # the loop takes >100 ms: clipped
        assert time_reward(fast_task, FAST) == 0.0            # both under the floor: no reward for noise
        # nothing cached: the reference is timed again beside the candidate. Usually one round, since both are
        # under the floor; a noisy round adds one more (the early stop is checked exactly with fake timings)
        assert counting.programs[9:12] == [FAST, FAST, "pass\n"] and len(counting.programs) in (12, 15, 18)
        slow_task = sum_task(SLOW, "sum-slow-ref")
        assert time_reward(slow_task, FAST) == 1.0
        assert time_reward(slow_task, "def total(n):\n    return 0\n") == -1.0  # a failed run: the slowest
        # Same program twice, timed side by side: noise only, never the clip. The noise is the machine's load,
        # which moves each round differently (on a shared 2-core machine one round can score +-0.7);
        # test_time_reward_is_unmoved_by_load_that_changes_between_calls shows that timing side by side
        # removes the bias a load change between calls would give.
        assert abs(statistics.median(time_reward(slow_task, SLOW) for _ in range(3))) < 1.0
        t_ref, t_cand = time_reward.net_cpu_times(slow_task, FAST)
        assert t_ref > 0.05 > t_cand                          # the loop really costs tens of ms of CPU
        no_ref = Task(task_id="no-ref", prompt="p", public_tests=[], private_tests=fast_task.private_tests,
                      entry_point="total")
        assert time_reward(no_ref, FAST) == 0.0


HIDDEN = ("import os, signal\nsignal.signal(signal.SIGCHLD, signal.SIG_IGN)\n"   # nobody waits for the worker
          "def total(n):\n    r, w = os.pipe()\n    if os.fork() == 0:\n        s = 0\n"
          "        for i in range(n):\n            s += i\n        os.write(w, str(s).encode())\n"
          "        os._exit(0)\n    os.close(w)\n    return int(os.read(r, 64))\n")
SPINNING = ("import os\ndef total(n):\n    for _ in range(20):\n        if os.fork() == 0:\n"
            "            os.setsid()\n            while True:\n                pass\n"
            "    return n * (n - 1) // 2\n")


@pytest.mark.slow
def test_time_reward_is_unmoved_by_hidden_children_and_spinners():
    """In the real sandbox: the loop done in a child nobody waits for costs what the same loop costs in the
    program itself (it would score +1 if such children went uncounted), and setsid spinners a candidate leaves
    are ended before the reference is timed, so they cannot slow it."""
    with SandboxPool(workers=2, limits=Limits(timeout_s=10.0)) as pool:
        if "cgroup" not in pool.isolation:
            pytest.skip(f"CPU of unwaited children is counted with cgroups only: {pool.isolation}")
        time_reward = TimeReward(pool, repeats=3)
        slow_task = sum_task(SLOW, "sum-slow-ref")
        assert time_reward(slow_task, HIDDEN) < 0.5
        t_ref_alone, _ = time_reward.net_cpu_times(slow_task, FAST)
        t_ref, t_cand = time_reward.net_cpu_times(slow_task, SPINNING)
        assert t_ref < 2 * t_ref_alone + 0.05


class FakePool:
    """CPU time per program text, times a load factor that a test can change between calls. `fails` maps a
    program to the indices of its runs (0, 1, ...) that fail their test."""
    def __init__(self, times, fails=None):
        self.times, self.load, self.fails, self.runs = times, 1.0, fails or {}, {}

    def map(self, jobs):
        results = []
        for program, *_ in jobs:
            n = self.runs[program] = self.runs.get(program, -1) + 1
            status = "timeout" if n in self.fails.get(program, ()) else "pass"
            results.append(RunResult([TestResult(status)], self.times[program] * self.load, 0.0))
        return results


def test_time_reward_formula_by_hand():
    """With fake timings: r = clip(ln((t_ref - b) / (t_cand - b)), -clip, clip), each at least the floor."""
    task = sum_task("REF", "t")
    pool = FakePool({"REF": 0.120, "CAND": 0.050, "pass\n": 0.020})
    assert TimeReward(pool, clip=5.0)(task, "CAND") == pytest.approx(math.log(0.100 / 0.030))
    assert TimeReward(pool, clip=0.5)(task, "CAND") == 0.5
    pool.times["CAND"] = 0.021                                # below the floor: counts as 5 ms
    assert TimeReward(pool, clip=5.0, floor_s=0.005)(task, "CAND") == pytest.approx(math.log(0.100 / 0.005))


def test_time_reward_stops_rounds_once_both_are_under_the_floor():
    """With fake timings: one round (candidate, reference, baseline) when both net times are under the floor,
    where r = 0 whatever more rounds would measure; all `repeats` rounds when either is measurable."""
    task = sum_task("REF", "t")
    pool = FakePool({"REF": 0.022, "QUICK": 0.023, "LOOP": 0.120, "pass\n": 0.020})
    counting = CountingPool(pool)
    time_reward = TimeReward(counting, repeats=3, floor_s=0.005)
    assert time_reward(task, "QUICK") == 0.0 and time_reward.last_outcome == "under_floor"
    assert counting.programs == ["QUICK", "REF", "pass\n"]
    counting.programs.clear()
    assert time_reward(task, "LOOP") == pytest.approx(-1.0)   # ln(0.005 / 0.100), clipped at -1
    assert counting.programs == ["LOOP", "REF", "pass\n"] * 3


def test_failed_candidate_timing_scores_the_slowest():
    """A candidate that passed its correctness run but fails a timing run (on purpose, say, after counting its
    runs) gets -clip, never the 0 of an untimed sample: failing cannot beat running slowly."""
    task = sum_task("REF", "t")
    for fails in ({0}, {1}, {2}):
        pool = FakePool({"REF": 0.120, "CAND": 0.050, "pass\n": 0.020}, fails={"CAND": fails})
        time_reward = TimeReward(pool, clip=0.7)
        assert time_reward(task, "CAND") == -0.7
        assert time_reward.last_outcome == "candidate_failed"
    slow = FakePool({"REF": 0.020, "CAND": 0.500, "pass\n": 0.020}, fails={"CAND": {1}})
    assert TimeReward(slow, clip=1.0)(task, "CAND") == -1.0    # as low as a stably slow program, not above it


def test_failed_reference_is_retried_then_leaves_the_time_term():
    task = sum_task("REF", "t")
    times = {"REF": 0.120, "CAND": 0.050, "pass\n": 0.020}
    flaky = CountingPool(FakePool(times, fails={"REF": {0, 1}}))    # fails twice, then passes
    time_reward = TimeReward(flaky, clip=5.0, ref_tries=3)
    assert time_reward(task, "CAND") == pytest.approx(math.log(0.100 / 0.030))
    assert flaky.programs[:5] == ["CAND", "REF", "REF", "REF", "pass\n"]
    assert time_reward.last_outcome == "timed"
    broken = CountingPool(FakePool(times, fails={"REF": set(range(100))}))
    time_reward = TimeReward(broken, clip=5.0, ref_tries=3)
    assert time_reward(task, "CAND") == 0.0                    # the sample leaves the time term...
    assert broken.programs == ["CAND", "REF", "REF", "REF"]   # ...after ref_tries runs of the reference
    assert time_reward.last_outcome == "reference_failed"
    no_ref = Task(task_id="n", prompt="p", public_tests=[], private_tests=task.private_tests,
                  entry_point="total")
    assert time_reward(no_ref, "CAND") == 0.0 and time_reward.last_outcome == "no_reference"


def test_time_reward_is_unmoved_by_load_that_changes_between_calls():
    """A machine twice as loaded at the second call slows every program alike: timed side by side, a program
    against its own copy as the reference scores 0 both times (a reference timed at the first call and reused
    would give ln(1/2) = -0.69 at the second)."""
    task = sum_task("LOOP", "t")
    pool = FakePool({"LOOP": 0.120, "LOOP ": 0.120, "pass\n": 0.020})
    time_reward = TimeReward(pool, clip=1.0)
    assert time_reward(task, "LOOP ") == 0.0
    pool.load = 2.0
    assert time_reward(task, "LOOP ") == 0.0


def test_a_task_with_an_assert_test_earns_no_time_reward():
    """An assert test's pass is decided in the child, where a program can forge it: no time term, whatever the
    program (the pool is never used)."""
    from reward import TimeReward, has_assert_tests
    tests = [Test(kind="call", call="f()", expected="1"), Test(kind="assert", code="assert f() == 1")]
    task = Task(task_id="t", prompt="p", public_tests=[], private_tests=tests, entry_point="f",
                reference_solution="def f():\n    return 1\n")
    timer = TimeReward(pool=None)
    assert has_assert_tests(task) and timer(task, "def f():\n    return 1\n") == 0.0
    assert timer.last_outcome == "assert_tests"
