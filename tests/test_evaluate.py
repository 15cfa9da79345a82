"""Evaluation metrics (evaluate.py), the classic bugs of the synthetic tasks (data.py) and the warm start's
corpus copies (sft.py).

References are independent of the code under test: pass@k against enumeration of all k-subsets, per-task
records against scripted answers whose verdicts are known by hand and run in the real sandbox, classic bugs
against in-process brute force and the sandbox.
"""
import ast
import itertools
import math
import random
import re

import pytest

import data
import synthetic
from evaluate import (fast_share_records, pass_at_k, pass_at_ks, summarize,
                      summarize_fast_share, task_results)
from reward import NO_CODE_FEEDBACK, RewardConfig, TimeReward
from rollout import RolloutConfig, RolloutWorker
from sandbox import SandboxPool
from sft import corpus_copy, format_answer, repair_pairs, warm_start_examples
from tokenizer import Tokenizer

SPLITS = ("train", "validation", "test")
WRONG = "def f(*args):\n    return 12345\n"   # fails every test of the synthetic tasks used here


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2) as p:
        yield p


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.byte_level()


def worker_for(tok, pool):
    return RolloutWorker(tok, pool, RolloutConfig(max_turns=3, max_new_tokens=128, instruction=""), RewardConfig())


def timed_worker(tok, pool, repeats=3):
    """A worker whose time reward sets each passing episode's speed."""
    worker = RolloutWorker(tok, pool, RolloutConfig(max_turns=1, max_new_tokens=128, instruction=""),
                           RewardConfig(time_weight=1.0))
    worker.time_reward = TimeReward(pool, repeats=repeats)
    return worker


# ----------------------------------------------------------------------------------------------------------------
# pass@k


def brute_pass_at_k(n, c, k):
    """Share of the k-subsets of n samples (the first c correct) that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration_of_all_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(5, 1, 2) == pytest.approx(0.4)          # 1 - C(4,2)/C(5,2) = 1 - 6/10
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)      # large n: exact integers, no overflow
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 200, 1) == 1.0


@pytest.mark.parametrize("n,c,k", [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4), (0, 0, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)


# ----------------------------------------------------------------------------------------------------------------
# task_results + summarize with scripted answers in the real sandbox


def public_only_program(task):
    """Hard-codes the public tests' answers: passes them, fails the private tests."""
    lines = ["def f(xs):"]
    for test in task.public_tests:
        lines.append(f"    if xs == {test.call[2:-1]}:\n        return {test.expected}")
    return "\n".join(lines) + "\n    return 12345\n"


def scripted_sampler(tok, script):
    """script: task prompt -> (turn-1 answers, cycled over calls; answers of turns 2, 3). An answer is code, or
    None for a response without a code block. Each turn-1 cycle length divides both the 4 samples and the 2
    episodes, so the records do not depend on whether single-turn or multi-turn episodes are drawn first."""
    calls = {}

    def sample(prompts):
        out = []
        for ids in prompts:
            text = tok.decode(ids)
            [prompt] = [p for p in script if f"<|end_header_id|>\n\n{p}<|eot_id|>" in text]
            user_turns = text.count("<|start_header_id|>user<|end_header_id|>")
            first, later = script[prompt]
            if user_turns == 1:
                code = first[calls.get(prompt, 0) % len(first)]
                calls[prompt] = calls.get(prompt, 0) + 1
            else:
                # the feedback of the previous turn is in the prompt: the rollout really went on
                assert "Your code failed the following tests:" in text or NO_CODE_FEEDBACK in text
                code = later[user_turns - 2]
            answer = "I am not sure." if code is None else format_answer(code)
            out.append((tok.encode(answer) + [tok.eot_id], True))
        return out
    return sample


def scripted_case():
    """(tasks, script for scripted_sampler, per task id: c, final_c, turn1_c, turns by hand) for 4 samples and
    2 episodes of up to 3 turns."""
    comp = [t for t in synthetic.synthetic_tasks("test", 0) if "composition" in t.tags]
    a, b, c, d, e, g = comp[:6]
    # public tests not among the private ones: a turn-1 program can fail the public tests yet pass the private
    # ones, which only the extra private-test run of task_results can see
    f = data.Task(task_id="custom/two", prompt="Write f(xs) that returns 2 (the public test disagrees).",
                  public_tests=[data.Test(kind="call", call="f([1])", expected="1")],
                  private_tests=[data.Test(kind="call", call="f([2])", expected="2")], entry_point="f")
    two = "def f(xs):\n    return 2\n"
    assert any(t.call not in {p.call for p in c.public_tests} for t in c.private_tests)
    R = {t.prompt: t.reference_solution for t in comp[:6]}
    script = {
        a.prompt: ([R[a.prompt], WRONG], [R[a.prompt], R[a.prompt]]),   # right half the time; fixed after feedback
        b.prompt: ([WRONG], [WRONG, R[b.prompt]]),                       # right only at turn 3
        c.prompt: ([public_only_program(c)], [WRONG, WRONG]),            # public pass ends the episode, private fail
        d.prompt: ([None, R[d.prompt]], [R[d.prompt], R[d.prompt]]),     # no code block, then right
        e.prompt: ([WRONG], [WRONG, WRONG]),                             # never right
        g.prompt: ([R[g.prompt]], [WRONG, WRONG]),                       # always right at once
        f.prompt: ([two], [two, two]),                                   # fails public, passes private, 3 turns
    }
    # by hand:                  c  final_c turn1_c turns
    expected = {a.task_id: (2, 2, 1, 1 + 2), b.task_id: (0, 2, 0, 3 + 3), c.task_id: (0, 0, 0, 1 + 1),
                d.task_id: (2, 2, 1, 2 + 1), e.task_id: (0, 0, 0, 3 + 3), g.task_id: (4, 2, 2, 1 + 1),
                f.task_id: (4, 2, 2, 3 + 3)}
    return [a, b, c, d, e, g, f], script, expected


def test_task_results_and_summarize_count_scripted_verdicts(tok, pool):
    tasks, script, expected = scripted_case()
    records, episodes = task_results(worker_for(tok, pool), scripted_sampler(tok, script), tasks, samples=4,
                                     max_turns=3, episodes=2)
    assert [r["task_id"] for r in records] == [t.task_id for t in tasks]
    for r in records:
        assert (r["c"], r["final_c"], r["turn1_c"], r["turns"]) == expected[r["task_id"]], r
        assert (r["n"], r["episodes"], r["max_turns"]) == (4, 2, 3)
    assert [ep.task.task_id for ep in episodes] == [t.task_id for t in tasks for _ in range(2)]
    assert [len(ep.turns) for ep in episodes] == [1, 2, 3, 3, 1, 1, 2, 1, 3, 3, 1, 1, 3, 3]

    m = summarize(records, ks=(1, 2, 4, 5))
    assert m["pass@1"] == pytest.approx((2 + 0 + 0 + 2 + 0 + 4 + 4) / 4 / 7)
    # pass@2 per task: c=2 of 4 -> 1 - C(2,2)/C(4,2) = 5/6; c=0 -> 0; c=4 -> 1
    assert m["pass@2"] == pytest.approx((5 / 6 + 5 / 6 + 1 + 1) / 7)
    assert m["pass@4"] == pytest.approx(4 / 7)
    assert "pass@5" not in m                                       # k above the samples per task: no estimate
    assert m["1@3"] == pytest.approx(10 / 14)
    assert m["turn1_pass"] == pytest.approx(6 / 14)
    # repairs by hand: a's and d's second episodes, both of b's; f's turn 1 already passed the private tests
    assert [r["repaired_c"] for r in records] == [1, 2, 0, 1, 0, 0, 0]
    assert m["repair_rate"] == pytest.approx(4 / (14 - 6))
    assert m["mean_turns"] == pytest.approx(28 / 14)
    assert m["tasks"] == 7
    # records from several ranks merge by concatenation: the same metrics whatever the split
    assert summarize(records[4:] + records[:4], ks=(1, 2)) == pytest.approx(
        {k: v for k, v in m.items() if k not in ("pass@4",)})
    with pytest.raises(ValueError, match="no evaluation records"):
        summarize([])


def test_task_results_in_groups_count_as_one_call_and_report_progress(tok, pool):
    """With a log, each phase runs a generate() batch of tasks at a time (12 episodes: 3 tasks of 4 samples, 6
    tasks of 2 episodes) and logs its progress; the records are those of one call."""
    tasks, script, expected = scripted_case()
    lines = []
    worker = RolloutWorker(tok, pool, RolloutConfig(max_turns=3, max_new_tokens=128, instruction="",
                                                    gen_batch_size=12), RewardConfig())
    records, _ = task_results(worker, scripted_sampler(tok, script), tasks, samples=4, max_turns=3, episodes=2,
                              log=lines.append)
    assert {r["task_id"]: (r["c"], r["final_c"], r["turn1_c"], r["turns"]) for r in records} == expected
    progress = [re.fullmatch(r"(\w+) (\d)/7 tasks  elapsed \d:\d\d:\d\d  ETA \d:\d\d:\d\d", line).groups()
                for line in lines]
    assert progress == [("samples", "3"), ("samples", "6"), ("samples", "7"), ("episodes", "6"), ("episodes", "7")]
    assert lines[-1].endswith("ETA 0:00:00")


def test_pass_at_ks_are_one_and_the_powers_of_2_and_10_up_to_the_samples():
    assert pass_at_ks(1) == (1,)
    assert pass_at_ks(3) == (1, 2)
    assert pass_at_ks(10) == (1, 2, 4, 8, 10)
    assert pass_at_ks(200) == (1, 2, 4, 8, 10, 16, 32, 64, 100, 128)


# ----------------------------------------------------------------------------------------------------------------
# fast share


def test_fast_share_counts_fast_and_slow_passing_programs(tok, pool):
    slow_fast = [t for t in synthetic.synthetic_tasks("test", 0) if "slow_fast" in t.tags]
    tasks = [next(t for t in slow_fast if family in t.task_id) for family in ("multiples", "lookup")]
    per_task = {tasks[0].prompt: ["fast", "slow", "wrong", "fast"], tasks[1].prompt: ["slow", "wrong", "slow", "wrong"]}
    programs = {t.prompt: {"fast": t.reference_solution, "slow": t.slow_solution, "wrong": WRONG} for t in tasks}
    calls = {}

    def sampler(prompts):
        out = []
        for ids in prompts:
            text = tok.decode(ids)
            [prompt] = [p for p in per_task if p in text]
            kind = per_task[prompt][calls.get(prompt, 0)]
            calls[prompt] = calls.get(prompt, 0) + 1
            out.append((tok.encode(format_answer(programs[prompt][kind])) + [tok.eot_id], True))
        return out

    # median of 5 timings, not 3: on a clean-clone CI run the median of 3 once put the reference itself past
    # e^0.5 of its own time (the sandbox's two workers share the machine's two cores)
    records = fast_share_records(timed_worker(tok, pool, repeats=5), sampler, tasks, 4)
    assert records == [{"task_id": tasks[0].task_id, "passing": 3, "fast": 2},
                       {"task_id": tasks[1].task_id, "passing": 2, "fast": 0}]
    assert summarize_fast_share(records) == {"fast_share": pytest.approx(2 / 5), "fast_share_passing": 5}

    def all_wrong(prompts):
        return [(tok.encode(format_answer(WRONG)) + [tok.eot_id], True) for _ in prompts]
    none = fast_share_records(timed_worker(tok, pool), all_wrong, tasks, 2)
    assert [(r["passing"], r["fast"]) for r in none] == [(0, 0), (0, 0)]
    share = summarize_fast_share(none)
    assert math.isnan(share["fast_share"]) and share["fast_share_passing"] == 0
    with pytest.raises(ValueError, match="times no program"):
        fast_share_records(worker_for(tok, pool), all_wrong, tasks, 2)


# ----------------------------------------------------------------------------------------------------------------
# classic bugs of the synthetic tasks


def composition_tasks():
    return [t for s in SPLITS for t in synthetic.synthetic_tasks(s, 0) if "composition" in t.tags]


def brute_force_inputs():
    """Every list of up to 2 numbers in the tasks' range -9..9, and random longer ones."""
    rng = random.Random(0)
    short = [list(p) for n in range(3) for p in itertools.product(range(-9, 10), repeat=n)]
    return short + [[rng.randint(-9, 9) for _ in range(rng.randint(3, 8))] for _ in range(400)]


def own_function(code):
    namespace = {}
    exec(code, namespace)
    return namespace["f"]


def same(g, f, xs):
    try:
        return g(list(xs)) == f(list(xs))
    except Exception:
        return False


def passes_in_process(code, tests):
    namespace = {}
    exec(code, namespace)
    for test in tests:
        try:
            if eval(test.call, namespace) != ast.literal_eval(test.expected):
                return False
        except Exception:
            return False
    return True


def single_bug_programs():
    return [(task, synthetic.with_bugs(task.reference_solution, [site]))
            for task in composition_tasks() for site in synthetic.bug_sites(task.reference_solution)]


def test_every_classic_bug_applies_to_a_train_task_and_changes_its_result():
    train = [t for t in synthetic.synthetic_tasks("train", 0) if "composition" in t.tags]
    inputs = brute_force_inputs()
    for name, pattern, repl in synthetic.CLASSIC_BUGS:
        hits = [t for t in train if re.search(pattern, t.reference_solution, flags=re.M)]
        assert hits, f"classic bug {name!r} applies to no train task"
        site = (pattern, repl)
        assert all(site in synthetic.bug_sites(t.reference_solution) for t in hits)
        # a bug that never changes a result teaches nothing
        assert any(not all(same(own_function(synthetic.with_bugs(t.reference_solution, [site])),
                                own_function(t.reference_solution), xs) for xs in inputs) for t in hits), name


def test_composition_public_tests_include_the_empty_list():
    for task in composition_tasks():
        empty = [t for t in task.public_tests if t.call == "f([])"]
        assert len(empty) == 1, task.task_id
        assert ast.literal_eval(empty[0].expected) == own_function(task.reference_solution)([])
        assert all(t in task.private_tests for t in task.public_tests), task.task_id


def test_sandbox_verdicts_on_buggy_programs_match_in_process(pool):
    programs = random.Random(0).sample(single_bug_programs(), 40)
    results = pool.map([(code, task.private_tests, task.setup_code) for task, code in programs])
    verdicts = [r.passed for r in results]
    assert verdicts == [passes_in_process(code, task.private_tests) for task, code in programs]
    assert verdicts.count(False) >= 20   # most classic bugs are caught: the sample checks real failures


# ----------------------------------------------------------------------------------------------------------------
# sft: corpus copies with bugs, warm-start demonstrations, repair pairs

# three references that between them carry all seven classic bugs, with the all-bugs version by hand
HAND = {"def f(xs):\n    return max((x * x for x in xs if x > 3), default=0)\n":
        "def f(xs):\n    return max((x * 2 for x in xs if x >= 3))\n",
        "def f(xs):\n    return len([x for x in xs if x % 3 == 0])\n":
        "def f(xs):\n    return sum([x for x in xs if x % 3])\n",
        "def f(xs):\n    return [-x for x in xs if x < 2]\n":
        "def f(xs):\n    return sorted([~x for x in xs if x <= 2])\n"}


def test_corpus_copy_with_rate_zero_and_one():
    assert {site for code in HAND for site in synthetic.bug_sites(code)} == {(p, r) for _, p, r in synthetic.CLASSIC_BUGS}
    rng = random.Random(0)
    for code, all_bugs in HAND.items():
        assert corpus_copy(code, 0.0, rng) == code
        assert corpus_copy(code, 1.0, rng) == all_bugs
    for task in [t for t in synthetic.synthetic_tasks("train", 0) if t.reference_solution]:
        ref = task.reference_solution
        assert corpus_copy(ref, 0.0, rng) == ref
        assert corpus_copy(ref, 1.0, rng) == synthetic.with_bugs(ref, synthetic.bug_sites(ref))


def test_corpus_copy_puts_each_bug_in_independently_at_the_rate():
    code = next(iter(HAND))
    marks = {"default": lambda s: "default=0" not in s, "off by one": lambda s: ">= 3" in s,
             "square": lambda s: "x * 2" in s}
    n, rate, rng = 3000, 0.3, random.Random(1)
    copies = [corpus_copy(code, rate, rng) for _ in range(n)]
    tol = 4.5 * math.sqrt(rate * (1 - rate) / n)   # 4.5 binomial standard deviations
    for name, has in marks.items():
        assert abs(sum(map(has, copies)) / n - rate) < tol, name
    both = sum(marks["default"](s) and marks["square"](s) for s in copies) / n
    assert abs(both - rate ** 2) < 4.5 * math.sqrt(rate ** 2 * (1 - rate ** 2) / n)


def bug_variants(code):
    """Every version of `code` with a subset of its classic bugs in -> that subset's size."""
    sites = synthetic.bug_sites(code)
    return {synthetic.with_bugs(code, list(subset)): r for r in range(len(sites) + 1)
            for subset in itertools.combinations(sites, r)}


def test_warm_start_examples_carry_bugs_at_the_rate(tok):
    tasks = synthetic.synthetic_tasks("train", 0)
    # a tests-say task is taught only as repairs: its value for no numbers is not in the prompt
    with_refs = [t for t in tasks if t.reference_solution and "tests_say" not in t.tags]
    examples = warm_start_examples(tok, tasks, "", bug_rate=0.3, slow_solutions=False)
    assert len(examples) == len(with_refs)
    bugs_in, sites_total = 0, 0
    for i, (ids, mask) in enumerate(examples):
        task = with_refs[i]
        context = tok.decode([x for x, m in zip(ids, mask) if not m])
        answer = tok.decode([x for x, m in zip(ids, mask) if m])
        assert f"<|end_header_id|>\n\n{task.prompt}<|eot_id|>" in context
        variants = {format_answer(code) + "<|eot_id|>": r for code, r in bug_variants(task.reference_solution).items()}
        assert answer in variants, (task.task_id, answer)
        bugs_in += variants[answer]
        sites_total += len(synthetic.bug_sites(task.reference_solution))
    assert sites_total > 500
    assert abs(bugs_in / sites_total - 0.3) < 4.5 * math.sqrt(0.21 / sites_total)


def test_repair_pairs_put_exactly_one_classic_bug_in_the_tasks_own_reference():
    tasks = synthetic.synthetic_tasks("train", 0)
    pairs = repair_pairs(tasks, 40, seed=1)
    assert len(pairs) == 40
    with_sites = [(task, wrong) for task, wrong in pairs if synthetic.bug_sites(task.reference_solution)]
    assert len(with_sites) >= 20
    for task, wrong in with_sites:
        ref = task.reference_solution
        one_bug = {synthetic.with_bugs(ref, [site]) for site in synthetic.bug_sites(ref)}
        assert wrong in one_bug and wrong != ref, (task.task_id, wrong)


def test_private_tests_catch_every_single_classic_bug_that_matters():
    """Each one-bug program either fails the private tests or equals the reference on every brute-force input
    (a harmless rewrite for that task, e.g. x <= 0 for x < 0 in a sum).

    Last in the file so that -x runs everything else first. Fails at the time of writing: data._composition_task
    looks for an input that catches a bug among 50 random lists of 3-8 numbers only, so an off-by-one bug in a
    max/min that only a boundary singleton exposes (f([5]) for `x >= 5` in max-square-gt5) is taken as harmless.
    With seed 0: train max-square-gt5 and min-plus6-neg (confirmed in the sandbox; ~2-3 tasks per seed)."""
    inputs = brute_force_inputs()
    uncaught = []
    for task, buggy in single_bug_programs():
        if passes_in_process(buggy, task.private_tests):
            g, f = own_function(buggy), own_function(task.reference_solution)
            wrong_on = next((xs for xs in inputs if not same(g, f, xs)), None)
            if wrong_on is not None:
                uncaught.append((task.task_id, buggy.splitlines()[1].strip(), wrong_on))
    assert not uncaught, ("buggy programs that pass every private test but are wrong, "
                          "(task, buggy body, input where it differs): " + repr(uncaught))
