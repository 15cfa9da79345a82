"""synthetic.py: the CPU demo's tasks are deterministic, their held-out splits are new compositions of seen
primitives, their expected values are right (by hand, and the references pass in the sandbox)."""
import ast

import pytest

from conftest import FULL

import synthetic

SPLITS = synthetic.SPLITS


@pytest.fixture(scope="module")
def pool():
    import sandbox
    with sandbox.SandboxPool(workers=2) as p:
        yield p


def failures(pool, tasks, programs):
    results = pool.map([(program, t.private_tests, t.setup_code) for t, program in zip(tasks, programs)])
    return {t.task_id: [x.status for x in r.tests] for t, r in zip(tasks, results) if not r.passed}


def id_composition(task) -> tuple[str, str, str]:
    """(reduction, map, filter) read off a task id, constants stripped: independent of synthetic.py."""
    return tuple(p.rstrip("0123456789") for p in task.task_id.split("/")[2].split("-"))


def test_synthetic_deterministic_and_seeded():
    for split in SPLITS:
        a, b = synthetic.synthetic_tasks(split, seed=3), synthetic.synthetic_tasks(split, seed=3)
        assert [t.to_dict() for t in a] == [t.to_dict() for t in b]
    assert [t.to_dict() for t in synthetic.synthetic_tasks("train", 3)] != \
        [t.to_dict() for t in synthetic.synthetic_tasks("train", 4)]
    with pytest.raises(ValueError, match="split must be"):
        synthetic.synthetic_tasks("dev", 0)


def test_synthetic_held_out_are_new_compositions_of_seen_primitives():
    splits = synthetic.synthetic_compositions()
    train, val, test = (set(splits[s]) for s in SPLITS)
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(test) >= 30 and len(train) >= 3 * len(test)
    seen = [set(column) for column in zip(*train)]
    for triple in test | val:
        assert all(p in seen[i] for i, p in enumerate(triple)), triple
    # The tasks follow the split: the composition in a task id belongs to that split, for any seed.
    for split in SPLITS:
        for seed in (0, 1):
            for task in synthetic.synthetic_tasks(split, seed):
                if "slow_fast" not in task.tags:
                    reduction, mapping, filt = id_composition(task)[:3]
                    assert (filt, mapping, reduction) in splits[split]
    slow_fast = {s: {t.task_id.split("/")[2] for t in synthetic.synthetic_tasks(s, 0)
                     if "slow_fast" in t.tags}
                 for s in SPLITS}
    assert all(slow_fast.values()) and not (slow_fast["train"] & slow_fast["test"])


def test_synthetic_task_shape():
    tasks = [t for s in SPLITS for t in synthetic.synthetic_tasks(s, 0)]
    assert len({t.task_id for t in tasks}) == len(tasks)
    for task in tasks:
        # public: the first private test, and for compositions also the empty list (the last private test)
        public = task.private_tests[:1] + (task.private_tests[-1:] if "slow_fast" not in task.tags else [])
        assert task.entry_point == "f" and task.public_tests == public
        assert ("rl_only" in task.tags) == (task.reference_solution is None) and len(task.prompt) < 160
        assert "rl_only" in task.tags or task.reference_solution.startswith("def f(")
        assert all(t.kind == "call" for t in task.private_tests)
        assert ("slow_fast" in task.tags) == (task.slow_solution is not None)
    example = next(t for t in tasks if t.task_id.endswith("/sum-square-even"))
    assert example.prompt == "Write f(xs) that returns the sum of the squares of the even numbers in xs."
    assert example.reference_solution == "def f(xs):\n    return sum(x * x for x in xs if x % 2 == 0)\n"
    # expected values by hand for one test
    xs = ast.literal_eval(example.private_tests[0].call[2:-1])
    assert ast.literal_eval(example.private_tests[0].expected) == sum(x * x for x in xs if x % 2 == 0)


def test_tests_say_tasks_leave_the_empty_value_to_the_tests(pool):
    """A tests-say task's prompt leaves its value for no numbers to the tests; the public test on [] gives it,
    and the feedback of a first answer that returns 0 shows it (the real sandbox and feedback text)."""
    from reward import feedback_text
    compositions = synthetic.synthetic_compositions()
    say = {s: [t for t in synthetic.synthetic_tasks(s, 0) if "tests_say" in t.tags] for s in SPLITS}
    for split in SPLITS:   # one per max/min composition of the split
        assert len(say[split]) == sum(r in ("max", "min") for _, _, r in compositions[split])
    rl_only = [t for t in say["train"] if "rl_only" in t.tags]
    assert 0.3 < len(rl_only) / len(say["train"]) < 0.7   # the rest keep a reference for the warm start
    assert not any("rl_only" in t.tags for s in ("validation", "test") for t in say[s])
    with_reference = [t for s in SPLITS for t in say[s] if t.reference_solution]
    for task in [t for s in SPLITS for t in say[s]]:
        empty = int(task.task_id.rsplit("-empty", 1)[1])
        assert task.prompt.endswith(", or what the tests say if there are none.")
        assert task.public_tests[-1].call == "f([])" and task.public_tests[-1].expected == str(empty)
        assert task.private_tests[-1] == task.public_tests[-1] and 1 <= empty <= 9
    for task in with_reference:
        assert task.reference_solution.endswith(f"default={task.task_id.rsplit('-empty', 1)[1]})\n")
        assert passes_in_process(task.reference_solution, task)
    zero = [t.reference_solution.rsplit("default=", 1)[0] + "default=0)\n" for t in with_reference[:6]]
    results = pool.map([(code, t.public_tests, "") for code, t in zip(zero, with_reference)])
    for task, result in zip(with_reference, results):
        expected = task.public_tests[-1].expected
        assert f"- input 'f([])' failed: Expected output '{expected}' but got '0'" in \
            feedback_text(result, task.public_tests).splitlines()


def passes_in_process(program, task) -> bool:
    namespace = {}
    exec(program, namespace)   # our own references only
    return all(eval(t.call, namespace) == ast.literal_eval(t.expected) for t in task.private_tests)


def test_slow_solutions_agree_with_the_expected_values():
    """The slow solutions compute every answer another way (a loop, a list scan) than the expected values."""
    slow_fast = [t for t in synthetic.synthetic_tasks("test", 0) if "slow_fast" in t.tags]   # 8 of the 40
    assert len(slow_fast) == 8 and all(passes_in_process(t.slow_solution, t) for t in slow_fast)


@pytest.mark.slow
@FULL  # every reference of the data set in the sandbox: opt-in (NANORLEF_FULL=1)
def test_synthetic_references_and_slow_solutions_pass_in_sandbox(pool):
    tasks = [t for s in SPLITS for t in synthetic.synthetic_tasks(s, 0) if t.reference_solution]
    assert not failures(pool, tasks, [t.reference_solution for t in tasks])
    slow_fast = [t for t in tasks if "slow_fast" in t.tags]
    assert not failures(pool, slow_fast, [t.slow_solution for t in slow_fast])
    mutant = "\n_f = f\n\ndef f(*args):\n    return ('mutated', _f(*args))\n"
    assert len(failures(pool, tasks, [t.reference_solution + mutant for t in tasks])) == len(tasks)


def test_warm_start_errors_sorts_failing_answers_by_kind():
    from bench.warm_start_errors import error_kind
    reference = "def f(xs):\n    return max((x + 7 for x in xs if x > 2), default=0)\n"
    no_default = "def f(xs):\n    return max((x + 7 for x in xs if x > 2))\n"
    assert error_kind(reference, True, reference) == "pass"
    assert error_kind(no_default, False, reference) == "classic bugs"
    off_by_one = "def f(xs):\n    return max((x + 7 for x in xs if x >= 2))\n"
    assert error_kind(off_by_one, False, reference) == "classic bugs"
    assert error_kind(reference.replace("+ 7", "+ 8"), False, reference) == "wrong constant"
    assert error_kind(no_default.replace("> 2", "> 4"), False, reference) == "wrong constant"
    assert error_kind(reference.replace("max", "min"), False, reference) == "other"
    assert error_kind(reference.replace("default=0)", "default=0"), False, reference) == "syntax error"
    assert error_kind(None, False, reference) == "no code block"
