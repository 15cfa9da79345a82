"""Evaluation on held-out tasks, scored on their private tests.

- pass@k: n single-turn samples per task, the unbiased estimator of Chen et al. 2021 (Codex paper, eq. 1).
- 1@3: RLEF's metric (Gehring et al. 2024): one episode of up to 3 turns with public-test feedback; it counts
  as solved when its final code passes the private tests. Averaged over `episodes` episodes per task.
- turn-1 vs last-turn pass rate inside those episodes: how much the feedback turns add.
- fast share: on tasks with a slow and a fast solution, the share of passing programs that are fast (what the
  time reward acts on).
"""
from __future__ import annotations

from math import comb

from data import Task
from reward import TimeReward
from rollout import Episode, RolloutWorker, Sampler


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) passes:
    1 - C(n-c, k) / C(n, k). Exact integer arithmetic, so no cancellation for large n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def task_results(worker: RolloutWorker, sampler: Sampler, tasks: list[Task], samples: int, max_turns: int,
                 episodes: int = 1) -> tuple[list[dict], list[Episode]]:
    """Per task: how many of `samples` single-turn samples pass, and the verdicts of `episodes` multi-turn
    episodes (first turn and final turn).

    Returns per-task records (mergeable across ranks) and the multi-turn episodes (for logging samples).
    """
    single = worker.run(sampler, [t for t in tasks for _ in range(samples)], max_turns=1)
    multi = worker.run(sampler, [t for t in tasks for _ in range(episodes)], max_turns=max_turns)
    # Turn 1 of a multi-turn episode that went on was never scored on the private tests: score it now.
    futures = {i: worker.pool.submit(ep.turns[0].code, ep.task.private_tests, ep.task.setup_code)
               for i, ep in enumerate(multi) if len(ep.turns) > 1 and ep.turns[0].code is not None}

    def turn1_passed(i: int) -> bool:
        return multi[i].passed if len(multi[i].turns) == 1 else i in futures and futures[i].result().passed

    records = []
    for t, task in enumerate(tasks):
        mine = range(t * episodes, (t + 1) * episodes)
        records.append({"task_id": task.task_id, "n": samples,
                        "c": sum(e.passed for e in single[t * samples:(t + 1) * samples]),
                        "episodes": episodes, "final_c": sum(multi[i].passed for i in mine),
                        "turn1_c": sum(turn1_passed(i) for i in mine),
                        "turns": sum(len(multi[i].turns) for i in mine), "max_turns": max_turns})
    return records, multi


def fast_share_records(worker: RolloutWorker, sampler: Sampler, tasks: list[Task], samples: int,
                       time_reward: TimeReward, fast_above: float = -0.5) -> list[dict]:
    """Per slow/fast task: how many of `samples` single-turn samples pass, and how many of those are fast.

    Fast means a time reward above `fast_above` (at most e^0.5 = 1.6x the reference's CPU time): the slow
    solutions of the synthetic family are tens of times slower, so they score the clip, -1.
    """
    episodes = worker.run(sampler, [t for t in tasks for _ in range(samples)], max_turns=1)
    records = []
    for t, task in enumerate(tasks):
        passing = [e for e in episodes[t * samples:(t + 1) * samples] if e.passed]
        fast = sum(time_reward(task, e.turns[-1].code) > fast_above for e in passing)
        records.append({"task_id": task.task_id, "passing": len(passing), "fast": fast})
    return records


def summarize(records: list[dict], ks: tuple[int, ...] = (1,)) -> dict:
    """Average the per-task records into metrics (all in [0, 1])."""
    if not records:
        raise ValueError("summarize: no evaluation records")
    out = {}
    for k in ks:
        if k <= records[0]["n"]:
            out[f"pass@{k}"] = sum(pass_at_k(r["n"], r["c"], k) for r in records) / len(records)
    episodes = sum(r["episodes"] for r in records)
    out[f"1@{records[0]['max_turns']}"] = sum(r["final_c"] for r in records) / episodes  # RLEF's 1@3
    out["turn1_pass"] = sum(r["turn1_c"] for r in records) / episodes
    out["mean_turns"] = sum(r["turns"] for r in records) / episodes
    out["tasks"] = len(records)
    return out


def summarize_fast_share(records: list[dict]) -> dict:
    """Share of fast programs among the passing ones, over all slow/fast tasks (NaN when none passed)."""
    passing = sum(r["passing"] for r in records)
    return {"fast_share": sum(r["fast"] for r in records) / passing if passing else float("nan"),
            "fast_share_passing": passing}
