"""Time-reward noise: a slow program scored against itself as the reference, where the right answer is 0.

    python bench/bench_time_reward.py [--calls 20 --repeats 3 --workers 2]

Two ways to time the reference, in the same process and sandbox pool:
- every call (reward.TimeReward): candidate, reference and baseline in rounds, one run after the other;
- timed once: the reference's median taken at the first call, beside a quick candidate, then reused with each
  later candidate (what TimeReward did before; the candidate then runs beside another slow copy of itself).
Prints the median, the minimum and the maximum reward over the calls, and the seconds per call. Run it next to
other load (a training run) to see what a busy machine does to each.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import Task, Test  # noqa: E402
from reward import TimeReward  # noqa: E402
from sandbox import Limits, SandboxPool  # noqa: E402

FAST = "def total(n):\n    return n * (n - 1) // 2\n"
SLOW = "def total(n):\n    s = 0\n    for i in range(n):\n        s += i\n    return s\n"
TESTS = [Test("call", call="total(3_000_000)", expected=str(3_000_000 * 2_999_999 // 2))]


def timed_once(time_reward: TimeReward, task: Task, calls: int) -> list[float]:
    """The reward with the reference's net CPU time taken once (beside FAST) and reused for every later call."""
    t_ref, _ = time_reward.net_cpu_times(task, FAST)
    rewards = []
    for _ in range(calls):
        _, t_cand = time_reward.net_cpu_times(task, SLOW)   # the reference's fresh time here goes unused
        rewards.append(time_reward.score(t_ref, t_cand))
    return rewards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="TimeReward's repeats (median of this many runs)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    task = Task(task_id="sum", prompt="Sum 0..n-1.", public_tests=TESTS, private_tests=TESTS, entry_point="total",
                reference_solution=SLOW)
    with SandboxPool(workers=args.workers, limits=Limits(timeout_s=10.0)) as pool:
        time_reward = TimeReward(pool, repeats=args.repeats)
        start = time.perf_counter()
        side_by_side = [time_reward(task, SLOW) for _ in range(args.calls)]
        seconds = (time.perf_counter() - start) / args.calls
        once = timed_once(time_reward, task, args.calls)
    print(f"slow program against itself, {args.calls} calls, median of {args.repeats} rounds each (0 is right)")
    print("| reference | median | min | max |\n| --- | --- | --- | --- |")
    for name, rewards in (("timed at every call (TimeReward)", side_by_side), ("timed once, reused", once)):
        print(f"| {name} | {statistics.median(rewards):+.3f} | {min(rewards):+.3f} | {max(rewards):+.3f} |")
    print(f"TimeReward: {seconds:.3f} s per call ({3 * args.repeats} sandbox runs)")


if __name__ == "__main__":
    main()
