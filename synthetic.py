"""Synthetic tasks for the CPU demo: small list functions a tiny model can learn in minutes.

Compositions: f(xs) = reduction(map(x) for x in xs if filter(x)), e.g. "the sum of the squares of the even
numbers in xs". The held-out splits are new compositions of primitives that the training split has seen, so
evaluation measures generalisation, not recall. Every reference has one canonical style: `def f(xs):` and a
one-line `return`.

Slow/fast pairs: two correct solutions, one tens of ms of CPU slower on a large private test, for the time
reward to choose between.

Classic bugs: the near misses a code model learns from a real corpus (an empty max without a default, an off
by one). The warm start shows them at a set rate (sft.py), so the policy makes them on held-out tasks too and
execution feedback has something general to repair.

Tests-say tasks: a max/min composition whose value for no numbers the prompt leaves to the tests ("or what
the tests say if there are none"). Only running the code reveals it: the public test on the empty list fails
with "Expected output '7'". Turn 1 can only guess; a later turn can know, if the model reads the feedback.
This is what RLEF adds over single-turn RL, in miniature. About half of the training split's tests-say tasks
keep a reference, for the warm start's repair demonstrations; the rest carry tests only, for RL alone.
"""
from __future__ import annotations

import random
import re

from data import Task, Test

SPLITS = ("train", "validation", "test")
SPLIT_SEED = 1234   # fixes which compositions are held out, whatever the seed of the instances
HELD_OUT = {"test": 0.2, "validation": 0.1}
INSTANCES = {"train": 5, "validation": 2, "test": 2}   # tasks per composition with a constant k

# name -> (English, condition source or None); "{k}" is a constant drawn per task.
FILTERS = {"all": ("the numbers in xs", None), "even": ("the even numbers in xs", "x % 2 == 0"),
           "odd": ("the odd numbers in xs", "x % 2 == 1"), "pos": ("the positive numbers in xs", "x > 0"),
           "neg": ("the negative numbers in xs", "x < 0"),
           "gt": ("the numbers in xs greater than {k}", "x > {k}"),
           "div": ("the numbers in xs divisible by {k}", "x % {k} == 0")}
# name -> (English wrapper of the filter phrase F, expression source)
MAPS = {"id": ("{F}", "x"), "square": ("the squares of {F}", "x * x"),
        "double": ("the doubles of {F}", "2 * x"), "neg": ("the negatives of {F}", "-x"),
        "abs": ("the absolute values of {F}", "abs(x)"),
        "plus": ("{F}, each plus {k}", "x + {k}"), "times": ("{F}, each times {k}", "{k} * x")}
# name -> (sentence over the map phrase M, return expression over the generator G); count takes no map.
REDUCTIONS = {"sum": ("the sum of {M}", "sum({G})"),
              "max": ("the largest of {M}, or 0 if there are none", "max(({G}), default=0)"),
              "min": ("the smallest of {M}, or 0 if there are none", "min(({G}), default=0)"),
              "list": ("a list of {M}, in order", "[{G}]"),
              "count": ("how many of {F} there are", "len([x for x in xs if {C}])")}
TESTS_SAY = {"max": "the largest of {M}, or what the tests say if there are none",
             "min": "the smallest of {M}, or what the tests say if there are none"}
EMPTY_VALUES = range(1, 10)   # what a tests-say task returns for no numbers: never the 0 of the others
TESTS_SAY_WARM_START = 0.5    # share of the training split's tests-say tasks that keep their reference
FILTER_K = {"gt": range(1, 6), "div": range(2, 6)}
MAP_K = {"plus": range(1, 10), "times": range(2, 10)}

# (name, pattern, replacement) on a reference's source.
CLASSIC_BUGS = [("no default for an empty max/min", r", default=0\)", ")"),
                ("off by one in a comparison", r"x (>|<) (\d+)", r"x \1= \2"),
                ("remainder used as a truth value", r"x % (\d+) == 0", r"x % \1"),
                ("x * 2 for the square", r"x \* x", "x * 2"),
                ("~x for the negative", r"-x for", "~x for"),
                ("sorted instead of in order", r"return \[(.*)\]$", r"return sorted([\1])"),
                ("sum instead of a count", r"return len\(\[", "return sum([")]


def synthetic_tasks(split: str, seed: int = 0) -> list[Task]:
    """The tasks of one split ("train", "validation" or "test"), deterministic given the seed.

    Which compositions (and slow/fast constants) belong to a split is fixed by SPLIT_SEED; `seed` draws the
    constants k and the test inputs. A composition with a constant gets INSTANCES[split] tasks, different k
    where the draws allow, so the model must read k from the prompt rather than remember it.
    """
    if split not in SPLITS:
        raise ValueError(f"synthetic_tasks: split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"{split}-{seed}")
    tasks = {}
    for filt, mapping, reduction in synthetic_compositions()[split]:
        has_k = filt in FILTER_K or mapping in MAP_K
        for _ in range(INSTANCES[split] if has_k else 1):
            task = composition_task(filt, mapping, reduction, rng, split)
            tasks.setdefault(task.task_id, task)   # the same k drawn twice: one task
    return list(tasks.values()) + slow_fast_tasks(split) + tests_say_tasks(split, seed)


def synthetic_compositions() -> dict[str, list[tuple[str, str, str]]]:
    """(filter, map, reduction) triples per split; the held-out splits use only primitives train has."""
    triples = [(f, m, r) for r in REDUCTIONS for f in FILTERS for m in MAPS if r != "count" or m == "id"]
    rng = random.Random(SPLIT_SEED)
    while True:
        rng.shuffle(triples)
        splits = _split(triples)
        seen = [set(column) for column in zip(*splits["train"])]
        if all(p in seen[i] for t in triples for i, p in enumerate(t)):
            return {s: sorted(ts) for s, ts in splits.items()}


def _split(items: list) -> dict[str, list]:
    n_test, n_val = round(HELD_OUT["test"] * len(items)), round(HELD_OUT["validation"] * len(items))
    return {"test": items[:n_test], "validation": items[n_test:n_test + n_val],
            "train": items[n_test + n_val:]}


def composition_task(filt: str, mapping: str, reduction: str, rng: random.Random, split: str,
                     empty: int | None = None) -> Task:
    """One task of a composition; with `empty`, a tests-say task that returns `empty` for no numbers."""
    fk = rng.choice(FILTER_K[filt]) if filt in FILTER_K else None
    mk = rng.choice(MAP_K[mapping]) if mapping in MAP_K else None
    f_text, cond = (s.format(k=fk) if s else s for s in FILTERS[filt])
    m_text, expr = (s.format(F=f_text, k=mk) for s in MAPS[mapping])
    sentence, body = REDUCTIONS[reduction]
    if empty is not None:
        sentence, body = TESTS_SAY[reduction], body.replace("default=0", f"default={empty}")
    if reduction == "count":
        body = "len(xs)" if cond is None else body.format(C=cond)
    else:
        body = body.format(G=f"{expr} for x in xs" + (f" if {cond}" if cond else ""))
    reference = f"def f(xs):\n    return {body}\n"
    inputs = [random_list(rng) for _ in range(4)] + [[]]
    f = _own_function(reference)
    for site in bug_sites(reference):   # the tests must catch each classic bug that changes the result
        buggy = _own_function(with_bugs(reference, [site]))
        if all(_same(buggy, f, xs) for xs in inputs):
            # one-element lists first: an off by one inside max/min shows only on the boundary value alone
            draws = [[v] for v in range(-9, 10)] + [random_list(rng) for _ in range(50)]
            catch = next((xs for xs in draws if not _same(buggy, f, xs)), None)
            if catch is not None:   # None: a harmless rewrite here (x <= 0 for x < 0 in a sum)
                inputs.insert(-1, catch)
    tests = [Test(kind="call", call=f"f({xs!r})", expected=repr(f(xs))) for xs in inputs]
    name = f"{reduction}-{mapping}{mk or ''}-{filt}{fk or ''}"
    name += f"-empty{empty}" if empty is not None else ""
    # public: the first input and the empty list, so the feedback can show an empty max/min failing
    return Task(task_id=f"synth/{split}/{name}",   # sum-plus3-gt2, max-id-all-empty7
                prompt=f"Write f(xs) that returns {sentence.format(M=m_text, F=f_text)}.",
                public_tests=[tests[0], tests[-1]], private_tests=tests, entry_point="f",
                reference_solution=reference, tags=("composition",) if empty is None else ("tests_say",))


def tests_say_tasks(split: str, seed: int) -> list[Task]:
    """One tests-say task per max/min composition of the split, from a random stream of their own (the other
    tasks stay as they were). In the training split a share TESTS_SAY_WARM_START keeps its reference for the
    warm start; the others have none and are RL's alone."""
    rng = random.Random(f"{split}-{seed}-tests-say")
    tasks = []
    for filt, mapping, reduction in synthetic_compositions()[split]:
        if reduction in TESTS_SAY:
            task = composition_task(filt, mapping, reduction, rng, split, empty=rng.choice(EMPTY_VALUES))
            if split == "train" and rng.random() >= TESTS_SAY_WARM_START:
                task.reference_solution, task.tags = None, ("tests_say", "rl_only")
            tasks.append(task)
    return tasks


def random_list(rng: random.Random) -> list[int]:
    return [rng.randint(-9, 9) for _ in range(rng.randint(3, 8))]


def _own_function(code: str):
    """f of one of our own generated programs, to compute expected values in-process (trusted code only)."""
    namespace = {}
    exec(code, namespace)
    return namespace["f"]


def _same(candidate, reference, xs) -> bool:
    try:
        return candidate(xs) == reference(xs)
    except Exception:
        return False


def bug_sites(code: str) -> list[tuple[str, str]]:
    """(pattern, replacement) of every classic bug that applies to `code`."""
    return [(pattern, repl) for _, pattern, repl in CLASSIC_BUGS if re.search(pattern, code, flags=re.M)]


def with_bugs(code: str, sites: list[tuple[str, str]]) -> str:
    """`code` with the given classic bugs put in."""
    for pattern, repl in sites:
        code = re.sub(pattern, repl, code, flags=re.M)
    return code


# ---- Slow/fast pairs: both correct; the large private test makes the slow one cost tens of ms of CPU more.


def slow_fast_tasks(split: str) -> list[Task]:
    """The slow/fast family, split by its constant k with the compositions' fixed seed."""
    pairs = [(multiples_task, k) for k in range(1, 21)] + [(lookup_task, k) for k in range(0, 20)]
    random.Random(SPLIT_SEED).shuffle(pairs)
    return [make(k, split) for make, k in _split(pairs)[split]]


def multiples_task(k: int, split: str) -> Task:
    n = 1_000_000
    what = "the integers from 1 to n" if k == 1 else f"the multiples of {k} from 1 to n"
    fast = f"def f(n):\n    return {k} * (n // {k}) * (n // {k} + 1) // 2\n" if k > 1 else \
        "def f(n):\n    return n * (n + 1) // 2\n"
    slow = f"def f(n):\n    return sum(x for x in range(1, n + 1) if x % {k} == 0)\n"
    tests = [Test(kind="call", call=f"f({m})", expected=str(sum(x for x in range(1, m + 1) if x % k == 0)))
             for m in (10, 1, 37)]
    tests.append(Test(kind="call", call=f"f({n})", expected=str(k * (n // k) * (n // k + 1) // 2)))
    return Task(task_id=f"synth/{split}/multiples-{k}", prompt=f"Write f(n) that returns the sum of {what}.",
                public_tests=tests[:1], private_tests=tests, entry_point="f", reference_solution=fast,
                tags=("slow_fast",), slow_solution=slow)


def lookup_task(k: int, split: str) -> Task:
    what = "are also in xs" if k == 0 else f"are {k} more than a number in xs"
    shifted = "y" if k == 0 else f"y - {k}"
    fast = f"def f(xs, ys):\n    s = set(xs)\n    return sum(1 for y in ys if {shifted} in s)\n"
    slow = f"def f(xs, ys):\n    return sum(1 for y in ys if {shifted} in xs)\n"
    count = _own_function(fast)
    cases = [([1, 2, 3], [3, 4, 5, 6]), ([], [1]), ([5, 5, 0], [0, 5, 7, 10, 12])]
    tests = [Test(kind="call", call=f"f({xs!r}, {ys!r})", expected=str(count(xs, ys))) for xs, ys in cases]
    big = count(list(range(0, 6000, 3)), list(range(3000)))   # 3,000 numbers: written as a call
    tests.append(Test(kind="call", call="f(list(range(0, 6000, 3)), list(range(3000)))", expected=str(big)))
    return Task(task_id=f"synth/{split}/lookup-{k}",
                prompt=f"Write f(xs, ys) that returns how many numbers in ys {what}.", public_tests=tests[:1],
                private_tests=tests, entry_point="f", reference_solution=fast, tags=("slow_fast",),
                slow_solution=slow)
