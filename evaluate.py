"""Evaluation on held-out tasks, scored on their private tests.

- pass@k: n single-turn samples per task, the unbiased estimator of Chen et al. 2021 (Codex paper, eq. 1).
- 1@3: RLEF's metric (Gehring et al. 2024): ONE episode of up to 3 turns with public-test feedback per task;
  it counts as solved when its final code passes the private tests.
- turn-1 vs last-turn pass rate inside those episodes: how much the feedback turns add.
"""
from __future__ import annotations

from math import comb

from data import Task
from rollout import Episode, RolloutWorker, Sampler


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) passes:
    1 - C(n-c, k) / C(n, k). Exact integer arithmetic, so no cancellation for large n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def task_results(worker: RolloutWorker, sampler: Sampler, tasks: list[Task], samples: int,
                 max_turns: int) -> tuple[list[dict], list[Episode]]:
    """Per task: how many of `samples` single-turn samples pass, and the verdicts of one multi-turn episode.

    Returns per-task records (mergeable across ranks) and the multi-turn episodes (for logging samples).
    """
    single = worker.run(sampler, [t for t in tasks for _ in range(samples)], max_turns=1)
    multi = worker.run(sampler, tasks, max_turns=max_turns)
    # Turn 1 of a multi-turn episode that went on was never scored on the private tests: score it now.
    futures = {i: worker.pool.submit(ep.turns[0].code, ep.task.private_tests, ep.task.setup_code)
               for i, ep in enumerate(multi) if len(ep.turns) > 1 and ep.turns[0].code is not None}
    records = []
    for i, task in enumerate(tasks):
        ep = multi[i]
        if len(ep.turns) == 1:
            turn1 = ep.passed
        else:
            turn1 = i in futures and futures[i].result().passed
        records.append({"task_id": task.task_id, "n": samples,
                        "c": sum(e.passed for e in single[i * samples:(i + 1) * samples]),
                        "turn1_passed": bool(turn1), "final_passed": ep.passed, "turns": len(ep.turns),
                        "max_turns": max_turns})
    return records, multi


def summarize(records: list[dict], ks: tuple[int, ...] = (1,)) -> dict:
    """Average the per-task records into metrics (all in [0, 1])."""
    if not records:
        raise ValueError("summarize: no evaluation records")
    out = {}
    for k in ks:
        if k <= records[0]["n"]:
            out[f"pass@{k}"] = sum(pass_at_k(r["n"], r["c"], k) for r in records) / len(records)
    out[f"1@{records[0]['max_turns']}"] = sum(r["final_passed"] for r in records) / len(records)  # RLEF 1@3
    out["turn1_pass"] = sum(r["turn1_passed"] for r in records) / len(records)
    out["mean_turns"] = sum(r["turns"] for r in records) / len(records)
    out["tasks"] = len(records)
    return out
