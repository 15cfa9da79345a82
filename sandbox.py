"""Run untrusted programs against tests and return verdicts that the program cannot forge.

Three processes take part in every run:

  parent (this module, e.g. the trainer)  --json lines-->  supervisor (one per worker, root, stdlib only)
                                                                |  fork (+ exec), per program
                                                                v
                                          child: `python -I -S` running _child_main, as the worker's uid

* The parent keeps the expected outputs. It sends the program and the test *inputs* to its worker's
  supervisor and compares what comes back (`_verdict`). Expected values never leave the parent.
* The supervisor is a small long-lived process per worker (so the big parent never forks). It is the child
  subreaper: every orphan a program leaves is re-parented to it, so "no children left" means "no process of
  the run left". It starts each program, times it, watches each test with CPU and wall-clock deadlines, and
  after the run kills every process of the worker's uid and removes the uid's files from /tmp, /var/tmp,
  /run/lock and /dev/shm. Its CPU accounting (wait4 rusage of the child and of every reaped descendant) is the
  program's cpu_time; a program cannot hide work in a child it does not wait for.
* The child drops to the worker's uid before exec, then runs all of the program's tests. Results travel on
  their own pipe (fd 4), canonicalised by *exact* type into a tagged JSON tree (`type(x) is int`, so int
  subclasses and AlwaysEqual objects become "unsupported" markers that never compare equal). A crash or
  timeout on test i is recorded and the remaining tests continue from i+1 in a fresh child; a program that
  dies while loading fails all its tests at once.

Guarantees. call and stdio verdicts cannot be forged: a pass needs the right value for an input whose expected
output the child never sees (a forged result line is only as good as the value it carries). assert verdicts
are decided inside the child, so a program that tampers with the interpreter (monkeypatching what the assert
uses, writing "ok" on the result pipe) can fake them: they only get the in-process guarantee. Comparison is
`expected == got` on builtin values, exactly like the original `assert f(x) == y`: 3.0 == 3 and True == 1
pass, [1] == (1,) does not.

As root (the training setup) the child runs as its own uid (61000 + n, claimed with a lock file so that
concurrent pools never share one) with no supplementary groups, in the supervisor's namespaces: an empty
network namespace (loopback down: no connection anywhere, not even 127.0.0.1), a private IPC namespace, and
a mount namespace where the repo, the task data and /root, /home are covered by an empty read-only tmpfs
(`default_hidden_paths`), so a program cannot read expected outputs from disk. The interpreter must be one the
uid can execute: `find_interpreter` picks sys.executable when it can, else a world-executable python of the
same version (here /usr/bin/python3.11: sys.executable lives under /root, mode 0700).
Without root the child runs as the caller's uid: rlimits (RLIMIT_NPROC above the caller's own count), the
private home, the clean environment and the subreaper cleanup still hold, but a program can read what the
caller can read, signal the caller's processes and reach the network. Use root for training.

fresh_interpreter=False (SandboxPool) forks the child from the supervisor instead of exec'ing a new
interpreter: same uid, limits, namespaces and verdict path, ~10 ms less CPU per program.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import json
import math
import os
import queue
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data import Test, load_task_file

STATUSES = ("pass", "wrong_answer", "runtime_error", "timeout", "out_of_memory", "crash", "output_limit")
UID_BASE = 61000                         # worker uids: UID_BASE, UID_BASE + 1, ... (claimed via lock files)
LOCK_DIR = "/tmp/nanorlef-sandbox-locks"
CLEAN_ROOTS = ("/tmp", "/var/tmp", "/run/lock", "/dev/shm")   # world-writable places a program can leave files
CHILD_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"
TRUNCATE = 200                           # chars of expected/got shown in details


@dataclass
class Limits:
    timeout_s: float = 5.0        # per test: CPU seconds; wall-clock watchdog at wall_factor * timeout_s
    memory_mb: int = 1024         # RLIMIT_AS
    max_output_bytes: int = 1 << 20  # per test, for stdout, stderr and the encoded result each
    wall_factor: float = 2.0      # wall deadline = wall_factor * timeout_s (catches sleep(); not used for rewards)
    stack_mb: int = 64            # RLIMIT_STACK
    max_processes: int = 64       # RLIMIT_NPROC: processes + threads of the worker uid
    max_open_files: int = 64      # RLIMIT_NOFILE
    max_file_mb: int = 16         # RLIMIT_FSIZE: largest file the program may write


@dataclass
class TestResult:
    __test__ = False              # not a pytest test class, despite the name
    status: str
    detail: str = ""              # exception + short traceback, or "Expected ... but got ..." (truncated)
    expected: str | None = None   # truncated repr (wrong_answer)
    got: str | None = None        # truncated repr (wrong_answer)
    cpu_time: float | None = None  # seconds of the child's CPU clock between the test's start and end messages


@dataclass
class RunResult:
    tests: list[TestResult]
    cpu_time: float               # CPU seconds (user+sys) of the child and every descendant, from wait4 rusage
    wall_time: float
    leftovers: list[str] = field(default_factory=list)  # cleanup problems (should stay empty)

    @property
    def passed(self) -> bool:
        return bool(self.tests) and all(t.status == "pass" for t in self.tests)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "status": [t.status for t in self.tests],
                "tests": [asdict(t) for t in self.tests], "cpu_time": self.cpu_time,
                "wall_time": self.wall_time, "leftovers": self.leftovers}


# --------------------------------------------------------------------------------------------------------
# The child. Compiled once per worker and sent (marshal) to each `python -I -S` child, or called directly in a
# forked one. It runs unprivileged and imports only builtin modules: every import here is paid by every
# program (`json` alone would cost ~10 ms), so results are written as JSON by hand.
# --------------------------------------------------------------------------------------------------------

def _child_main(job):
    """job = (program, setup_code, [(kind, call_or_code, stdin)], first test index, output cap in bytes)."""
    import builtins
    import io
    import os
    import sys
    from _json import encode_basestring_ascii as quote

    # Bind what the harness uses now: the program may patch builtins, os, sys or json afterwards.
    write, read, exit_now, exc_info = os.write, os.read, os._exit, sys.exc_info
    type_, str_, len_, compile_, exec_, eval_ = type, str, len, compile, exec, eval
    int_repr, float_repr, complex_repr, bytes_hex = int.__repr__, float.__repr__, complex.__repr__, bytes.hex
    dict_items, issubclass_ = dict.items, issubclass
    # These compare equal to a plain dict in `assert f(x) == {...}`; they are encoded from their raw dict
    # storage (dict.items, no method of theirs runs), so even an impostor class with these names gains nothing.
    dict_likes = {("collections", "Counter"), ("collections", "defaultdict"), ("collections", "OrderedDict")}
    TextIOWrapper, BytesIO, RawIOBase = io.TextIOWrapper, io.BytesIO, io.RawIOBase

    program, setup, tests, first, out_cap = job

    def send(text):
        data = text.encode()
        while data:
            data = data[write(4, data):]

    def wait_ack():  # blocks until the supervisor has sampled our CPU clock
        if read(5, 1) != b"k":
            exit_now(70)

    class OutputLimit(BaseException):
        pass

    class TooLarge(Exception):
        pass

    class Sink(RawIOBase):  # capped byte sink behind sys.stdout / sys.stderr
        def __init__(self):
            self.parts, self.size, self.over = [], 0, False

        def writable(self):
            return True

        def write(self, b):
            if self.size + len_(b) > out_cap:
                self.over = True
                raise OutputLimit(f"more than {out_cap} bytes of output")
            self.parts.append(bytes(b))
            self.size += len_(b)
            return len_(b)

    sources = {"<program>": program, "<setup>": setup}

    def describe(e, tb):  # "Traceback ...\nName: message", last 3 frames in our sources, no imports
        try:
            lines = []
            while tb is not None:
                code = tb.tb_frame.f_code
                if code.co_filename in sources:
                    src = sources[code.co_filename].splitlines()
                    text = src[tb.tb_lineno - 1].strip() if 0 < tb.tb_lineno <= len_(src) else ""
                    lines.append(f'  File "{code.co_filename}", line {tb.tb_lineno}, in {code.co_name}\n    {text}')
                tb = tb.tb_next
            if type_(e) is SyntaxError or type_(e) is IndentationError:
                lines.append(f'  File "{e.filename}", line {e.lineno}\n    {(e.text or "").strip()}')
            try:
                msg = str_(e)[:300]
            except BaseException:
                msg = "<unprintable>"
            head = "Traceback (most recent call last):\n" + "\n".join(lines[-3:]) + "\n" if lines else ""
            return f"{head}{type_(e).__name__}: {msg}"
        except BaseException:
            return "exception (could not be described)"

    budget = [0]

    def canon(x, depth):  # value -> tagged JSON text, by exact type only (no method of x is called)
        budget[0] += 1
        if budget[0] > 200_000 or depth > 100:
            return '["unsupported","too deep or too many elements"]'
        t = type_(x)
        if t is int:
            if x.bit_length() > 13_000:  # ~4000 digits: also the int<->str limit of Python 3.11
                return '["unsupported","int with more than 4000 digits"]'
            return '["int","' + int_repr(x) + '"]'
        if t is str:
            if len_(x) > out_cap:
                raise TooLarge
            return '["str",' + quote(x) + "]"
        if x is None:
            return '["none"]'
        if x is True or x is False:
            return '["bool",' + ("1" if x else "0") + "]"
        if t is float:
            return '["float","' + float_repr(x) + '"]'
        if t is list or t is tuple or t is set or t is frozenset:
            return '["' + t.__name__ + '",[' + ",".join([canon(v, depth + 1) for v in x]) + "]]"
        if t is dict or (issubclass_(t, dict) and (t.__module__, t.__qualname__) in dict_likes):
            return '["dict",[' + ",".join(["[" + canon(k, depth + 1) + "," + canon(v, depth + 1) + "]"
                                           for k, v in dict_items(x)]) + "]]"
        if t is bytes:
            if len_(x) > out_cap:
                raise TooLarge
            return '["bytes","' + bytes_hex(x) + '"]'
        if t is complex:
            return '["complex","' + complex_repr(x) + '"]'
        return '["unsupported","exact type is not a builtin value type"]'

    def report(status, value, detail):
        send("R [" + quote(status) + "," + value + "," + quote(detail[:2000]) + "]\n")
        wait_ack()

    def run_one(kind, src, stdin, namespace):
        """Returns (status, value_json, detail). Every line of program code runs inside this call."""
        out, err = Sink(), Sink()
        sys.stdout = TextIOWrapper(out, encoding="utf-8", errors="replace", write_through=True)
        sys.stderr = TextIOWrapper(err, encoding="utf-8", errors="replace", write_through=True)
        sys.stdin = TextIOWrapper(BytesIO(stdin.encode("utf-8", "replace")), encoding="utf-8")
        sources["<test>"] = src
        try:
            if kind == "load":  # the program's definitions, then the task's setup_code
                exec_(compile_(program, "<program>", "exec"), namespace)
                if setup:
                    exec_(compile_(setup, "<setup>", "exec"), namespace)
                value = "null"
            elif kind == "stdio":  # the whole program as __main__, per test, with this test's stdin
                try:
                    exec_(compile_(program, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
                except SystemExit as e:  # sys.exit() / sys.exit(0) end a stdio program normally
                    if e.code is not None and e.code != 0:
                        raise
                sys.stdout.flush()
                value = '["str",' + quote(b"".join(out.parts).decode("utf-8", "replace")) + "]"
            elif kind == "call":
                value = canon(eval_(compile_(src, "<test>", "eval"), namespace), 0)
            else:
                exec_(compile_(src, "<test>", "exec"), namespace)
                value = "null"
            if len_(value) > out_cap * 2:
                raise TooLarge
        except TooLarge:
            return "output_limit", "null", f"the result is larger than {out_cap} bytes"
        except BaseException as e:  # BaseException too: SystemExit, KeyboardInterrupt and subclasses fail the test
            if out.over or err.over:
                return "output_limit", "null", f"more than {out_cap} bytes of output"
            status = "oom" if type_(e) is MemoryError else "error"
            if type_(e) is OSError and e.errno == 27:  # EFBIG: RLIMIT_FSIZE (Python ignores SIGXFSZ)
                status = "output_limit"
            return status, "null", describe(e, exc_info()[2])
        if out.over or err.over:
            return "output_limit", "null", f"more than {out_cap} bytes of output"
        return "ok", value, ""

    namespace = {"__name__": "solution", "__builtins__": builtins}
    load_error = None
    if any(kind != "stdio" for kind, _, _ in tests[first:]):
        send("L\n")
        wait_ack()
        load_error = run_one("load", "", "", namespace)
        if load_error[0] == "ok":
            load_error = None
    for i in range(first, len_(tests)):
        kind, src, stdin = tests[i]
        send("S\n")
        wait_ack()
        if load_error is not None and kind != "stdio":
            report(*load_error)
        else:
            report(*run_one(kind, src, stdin, namespace))
    exit_now(0)  # skips atexit handlers, __del__ and buffered writes the program may have planted


# The child's `-c` script: read (harness code, job) from fd 3, define _child_main, run it. The harness arrives
# compiled (marshal) because compiling its source costs ~2 ms, a sixth of the interpreter's start-up.
_CHILD_BOOT = """import marshal, os
data = b''
while chunk := os.read(3, 1 << 16):
    data += chunk
os.close(3)
harness, job = marshal.loads(data)
exec(marshal.loads(harness))
_child_main(job)
"""


def _compiled_harness(python: str) -> bytes:
    """marshal'd code of _child_main, compiled by `python` itself (code objects are per-version)."""
    import inspect
    import marshal
    src = inspect.getsource(_child_main)
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        return marshal.dumps(compile(src, "<sandbox harness>", "exec"))
    out = subprocess.run([python, "-I", "-S", "-c", "import marshal, sys; sys.stdout.buffer.write("
                          "marshal.dumps(compile(sys.stdin.read(), '<sandbox harness>', 'exec')))"],
                         input=src.encode(), capture_output=True, check=True, timeout=60)
    return out.stdout


# --------------------------------------------------------------------------------------------------------
# The supervisor: one per worker, started once, runs jobs it reads as JSON lines on stdin.
# --------------------------------------------------------------------------------------------------------

CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWIPC, PR_SET_CHILD_SUBREAPER = 0x00020000, 0x40000000, 0x08000000, 36
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 1 << 14, 1 << 18


def default_hidden_paths() -> list[str]:
    """What programs must not read even where it is world-readable: the repo, the task data (expected
    outputs!) and home directories. Hidden under an empty read-only tmpfs in the supervisor's mount namespace."""
    repo = Path(__file__).resolve().parent
    data = Path(os.environ.get("NANORLEF_DATA", repo.parent / "shared" / "data")).resolve()
    return [str(p) for p in (repo, data, Path("/root"), Path("/home")) if p.is_dir()]


def _isolate(libc, python: str, hide: list[str]) -> dict:
    """Namespaces for this supervisor and its children: an empty network namespace (loopback down), a private
    System V IPC namespace, and a mount namespace where `hide` is covered. Needs CAP_SYS_ADMIN; without it
    programs share the network and see the files their uid may read."""
    if libc.unshare(CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWNS) != 0:
        return {"network": "shared (no CAP_SYS_ADMIN)", "hidden": []}
    hidden = []
    # Our mounts must not propagate back to the host's namespace.
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0:
        needed = (os.path.realpath(python), os.path.dirname(os.__file__))  # the child's interpreter and stdlib
        for path in hide:
            if any(n == path or n.startswith(path.rstrip("/") + "/") for n in needed):
                continue
            if libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                          b"size=4k,mode=0755") == 0:
                hidden.append(path)
    return {"network": "isolated", "hidden": hidden}


def _supervise(uid: int | None, python: str, fresh_interpreter: bool = True, hide: list[str] = ()) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    sup = _Supervisor(uid, python, fresh_interpreter)   # reads sandbox.py's source: before hiding the repo
    isolation = _isolate(libc, python, list(hide))
    print(json.dumps({"ready": True, **isolation}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        try:
            reply = sup.run_job(job)
        except Exception as e:  # a bug of ours must fail this run, not every later one
            detail = f"sandbox error: {type(e).__name__}: {e}"
            reply = {"tests": [{"status": "crash", "value": None, "detail": detail, "cpu": None}] * len(job["tests"]),
                     "cpu_time": 0.0, "wall_time": 0.0, "leftovers": sup.cleanup()}
        print(json.dumps(reply), flush=True)
    sup.close()


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


class _Supervisor:
    def __init__(self, uid: int | None, python: str, fresh_interpreter: bool = True):
        self.uid, self.python, self.harness = uid, python, _compiled_harness(python)
        self.fresh_interpreter = fresh_interpreter
        stdlib = os.path.dirname(os.__file__)   # what `python -I -S` puts on sys.path
        self.stdlib_path = [os.path.join(sys.prefix, "lib", f"python{sys.version_info[0]}{sys.version_info[1]}.zip"),
                            stdlib, os.path.join(stdlib, "lib-dynload")]
        # The child's home/cwd/TMPDIR: <root-owned dir>/home, owned by the uid. It cannot rename or replace
        # `home` (the parent is not its), so one directory serves every run and is emptied after each.
        if uid is not None:  # we hold the uid's lock: anything of it still around is from a dead supervisor
            for stale in Path(tempfile.gettempdir()).glob(f"nanorlef-sbx-{uid}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            self._kill_all()
            for root in CLEAN_ROOTS:
                _remove_owned(root, uid, depth=2)
        self.box = tempfile.mkdtemp(prefix=f"nanorlef-sbx-{uid}-")
        os.chmod(self.box, 0o711)
        self.home = os.path.join(self.box, "home")
        self._fresh_home()
        self.debug = bool(os.environ.get("NANORLEF_SANDBOX_DEBUG"))
        if uid is None:  # RLIMIT_NPROC counts all processes of our own uid here: leave room for them
            self.nproc_base = sum(1 for p in os.listdir("/proc") if p.isdigit() and _proc_uid(p) == os.getuid())

    # ---- one job: all tests of one program, respawning after a crash or timeout
    def _fresh_home(self) -> None:
        """Empty the home directory, or rebuild it if the program changed what it is."""
        try:
            st = os.lstat(self.home)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == (self.uid if self.uid is not None else os.getuid()):
                os.chmod(self.home, 0o700)
                for entry in os.scandir(self.home):
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
                return
            shutil.rmtree(self.home, ignore_errors=True) if stat.S_ISDIR(st.st_mode) else os.unlink(self.home)
        except FileNotFoundError:
            pass
        os.mkdir(self.home, 0o700)
        if self.uid is not None:
            os.chown(self.home, self.uid, self.uid)

    def run_job(self, job: dict) -> dict:
        tests, lim = job["tests"], job["limits"]
        t0 = time.perf_counter()
        results: list[dict] = []
        cpu = 0.0
        try:
            while len(results) < len(tests):
                got, used = self._run_child(job, len(results), lim, self.home)
                results += got
                cpu += used
        finally:
            leftovers = self.cleanup()
        return {"tests": results, "cpu_time": cpu, "wall_time": time.perf_counter() - t0, "leftovers": leftovers}

    def _rlimits(self, lim: dict, n_tests: int) -> list[tuple[int, int]]:
        import resource as r
        cpu = math.ceil(lim["timeout_s"] * (n_tests + 1)) + 1   # the per-test CPU watchdog is ours; this backs it
        nproc = lim["max_processes"] if self.uid is not None else self.nproc_base + lim["max_processes"]
        return [(r.RLIMIT_AS, lim["memory_mb"] << 20), (r.RLIMIT_CPU, cpu), (r.RLIMIT_NPROC, nproc),
                (r.RLIMIT_NOFILE, lim["max_open_files"]), (r.RLIMIT_FSIZE, lim["max_file_mb"] << 20),
                (r.RLIMIT_CORE, 0), (r.RLIMIT_STACK, lim["stack_mb"] << 20)]

    def _spawn(self, lim: dict, n_tests: int, tmp: str, job: tuple):
        job_r, job_w = os.pipe()
        res_r, res_w = os.pipe()
        ack_r, ack_w = os.pipe()
        env = {"PATH": CHILD_ENV_PATH, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        argv = [self.python, "-I", "-S", "-c", _CHILD_BOOT]
        limits = self._rlimits(lim, n_tests)
        import fcntl
        import resource
        pid = os.fork()
        if pid == 0:  # child: nothing here may raise past os._exit
            try:
                os.setsid()
                devnull = os.open(os.devnull, os.O_RDWR)
                err = 2 if self.debug else devnull  # NANORLEF_SANDBOX_DEBUG=1: harness errors to our stderr
                # Move the sources above the targets first, so no dup2 clobbers one (or is a no-op on fd 3).
                sources = [fcntl.fcntl(fd, fcntl.F_DUPFD, 16) for fd in (devnull, devnull, err, job_r, res_w, ack_r)]
                for target, source in enumerate(sources):
                    os.dup2(source, target)
                os.closerange(6, 1 << 16)
                for which, value in limits:
                    resource.setrlimit(which, (value, value))
                if self.uid is not None:
                    os.setgroups([])
                    os.setresgid(self.uid, self.uid, self.uid)
                    os.setresuid(self.uid, self.uid, self.uid)
                os.chdir(tmp)
                if self.fresh_interpreter:
                    os.execve(self.python, argv, env)
                # Fork mode: this copy of the supervisor (which never ran program code and holds no expected
                # output) becomes the child. Give it what `python -I -S` would see: env, sys.path, argv.
                os.environ.clear()
                os.environ.update(env)
                sys.path[:], sys.argv[:] = self.stdlib_path, ["-c"]
                os.close(3)
                _child_main(job)
            except BaseException as e:
                if self.debug:
                    os.write(2, f"sandbox: child setup failed: {e!r}\n".encode())
            finally:
                os._exit(127)
        for fd in (job_r, res_w, ack_r):
            os.close(fd)
        return pid, job_w, res_r, ack_w

    def _run_child(self, job: dict, first: int, lim: dict, tmp: str) -> tuple[list[dict], float]:
        """Run tests[first:] in one fresh child until it finishes, crashes or times out."""
        import marshal
        tests = job["tests"]
        child_job = (job["program"], job["setup"], [tuple(t) for t in tests], first, lim["max_output_bytes"])
        pid, job_w, res_r, ack_w = self._spawn(lim, len(tests) - first, tmp, child_job)
        pidfd = os.pidfd_open(pid)
        clock = ((~pid) << 3) | 2   # CPUCLOCK_SCHED of process `pid`: CPU time of all its threads, ns precision
        results: list[dict] = []
        stop: dict | None = None    # why we stopped the child early (None: it ended by itself)
        saw_start = False           # False until the first test starts: a death before it is a load failure
        try:
            try:
                if self.fresh_interpreter:
                    _write_all(job_w, marshal.dumps((self.harness, child_job)))
            except BrokenPipeError:
                pass
            os.close(job_w)
            reader = _LineReader(res_r, pidfd, clock, 2 * lim["max_output_bytes"] + 8192)
            reader.arm(lim)
            started_cpu, expecting = 0.0, (b"L", b"S")
            while first + len(results) < len(tests):
                line, stop = reader.next_line()
                if line is None:
                    break
                if line == b"L" and b"L" in expecting:          # program + setup_code start loading
                    expecting = (b"S",)
                elif line == b"S" and b"S" in expecting:        # a test starts: sample the child's CPU clock
                    started_cpu, saw_start, expecting = _cpu(clock), True, (b"R",)
                elif line.startswith(b"R ") and b"R" in expecting:
                    used = _cpu(clock) - started_cpu
                    try:
                        status, value, detail = json.loads(line[2:])
                        if status not in ("ok", "error", "oom", "output_limit") or not isinstance(detail, str):
                            raise ValueError(status)
                    except (ValueError, TypeError, RecursionError):
                        stop = {"status": "error", "detail": "malformed message on the result channel"}
                        break
                    results.append({"status": status, "value": value, "detail": detail, "cpu": used})
                    expecting = (b"S",)
                else:
                    stop = {"status": "error", "detail": "unexpected message on the result channel"}
                    break
                try:
                    os.write(ack_w, b"k")   # the child waits for this, so the clock sample above is exact
                except BrokenPipeError:     # the child is gone; still read what it wrote before leaving
                    pass
                reader.arm(lim)
        finally:
            for fd in (res_r, ack_w, pidfd):
                os.close(fd)
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            _, wstatus, usage = os.wait4(pid, 0)
        cpu = usage.ru_utime + usage.ru_stime
        if first + len(results) < len(tests):
            died = _death_status(stop, wstatus, cpu, math.ceil(lim["timeout_s"] * (len(tests) - first + 1)) + 1,
                                 during_load=not saw_start)
            # A program that never loaded would die the same way in every fresh child: fail all that remain.
            n = 1 if saw_start else len(tests) - first - len(results)
            results += [dict(died) for _ in range(n)]
        return results, cpu + self.reap_descendants()[0]

    # ---- cleanup
    def reap_descendants(self) -> tuple[float, bool]:
        """Kill and reap every process left under us (we are the subreaper, so orphans come to us).
        Returns (their CPU seconds, whether there were any)."""
        cpu, t0, found = 0.0, time.monotonic(), False
        while True:
            try:
                pid, _, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return cpu, found  # no descendant left: nothing of this run is alive
            found = True
            if pid:
                cpu += usage.ru_utime + usage.ru_stime
                continue
            self._kill_all()
            if time.monotonic() - t0 > 5:
                return cpu, found
            time.sleep(0.0005)

    def _kill_all(self) -> None:
        if self.uid is not None:  # kill(-1) from the worker uid hits all its processes at once (fork-safe)
            pid = os.fork()
            if pid == 0:
                try:
                    os.setresgid(self.uid, self.uid, self.uid)
                    os.setresuid(self.uid, self.uid, self.uid)
                    for _ in range(100):
                        os.kill(-1, signal.SIGKILL)
                except BaseException:
                    pass
                os._exit(0)
            os.waitpid(pid, 0)
        me = str(os.getpid())
        for p in os.listdir("/proc"):  # also direct children (non-root mode, or anything not of the uid)
            if p.isdigit() and _proc_ppid(p) == me:
                try:
                    os.kill(int(p), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def cleanup(self) -> list[str]:
        """After a run: no process of the run, no file of the uid in the shared temp places, an empty home."""
        _, found = self.reap_descendants()
        leftovers = []
        if self.uid is not None:
            for root in CLEAN_ROOTS:
                _remove_owned(root, self.uid, depth=2)
            if found:  # only possible if something escaped the subreaper, which we then want to hear about
                leftovers = [f"process {p} of uid {self.uid}" for p in os.listdir("/proc")
                             if p.isdigit() and _proc_uid(p) == self.uid]
        self._fresh_home()
        return leftovers

    def close(self) -> None:
        self.cleanup()
        shutil.rmtree(self.box, ignore_errors=True)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _cpu(clock: int) -> float:
    try:
        return time.clock_gettime(clock)
    except OSError:  # the process is gone
        return 0.0


class _LineReader:
    """Lines from the result channel, with the current test's CPU and wall-clock deadlines."""

    def __init__(self, fd: int, pidfd: int, clock: int, cap: int):
        self.fd, self.pidfd, self.clock, self.cap, self.buf = fd, pidfd, clock, cap, b""

    def arm(self, lim: dict) -> None:
        self.deadline_cpu = _cpu(self.clock) + lim["timeout_s"]
        self.deadline_wall = time.monotonic() + lim["timeout_s"] * lim["wall_factor"]

    def next_line(self) -> tuple[bytes | None, dict | None]:
        """(line, None), or (None, why) where why=None means the child ended by itself."""
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line, self.buf = self.buf[:nl], self.buf[nl + 1:]
                return line, None
            if len(self.buf) > self.cap:
                return None, {"status": "output_limit", "detail": f"result message larger than {self.cap} bytes"}
            now, cpu = time.monotonic(), _cpu(self.clock)
            if now >= self.deadline_wall or cpu >= self.deadline_cpu:
                return None, {"status": "timeout", "detail": "Execution took too long."}
            wait = min(self.deadline_wall - now, max(self.deadline_cpu - cpu, 0.001), 0.25)
            ready, _, _ = select.select([self.fd, self.pidfd], [], [], wait)
            if self.fd in ready and self._read():
                continue
            if self.fd in ready:  # EOF: every writer closed the channel; did the child exit?
                if select.select([self.pidfd], [], [], 0.2)[0]:
                    return None, None
                return None, {"status": "error", "detail": "the result channel was closed before the test reported"}
            if self.pidfd in ready:  # the child exited: take what it wrote before leaving
                if select.select([self.fd], [], [], 0)[0] and self._read():
                    continue
                return None, None

    def _read(self) -> bool:
        chunk = os.read(self.fd, 1 << 16)
        self.buf += chunk
        return bool(chunk)


def _death_status(stop: dict | None, wstatus: int, cpu: float, cpu_limit: int, during_load: bool) -> dict:
    """Status of the test that was running when the child stopped without reporting it."""
    out = {"value": None, "cpu": None}
    if stop is not None:
        return {**out, **stop}
    where = " while loading the program" if during_load else ""
    if os.WIFSIGNALED(wstatus):
        sig = os.WTERMSIG(wstatus)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= cpu_limit - 0.5):  # RLIMIT_CPU
            return {**out, "status": "timeout", "detail": "Execution took too long."}
        if sig == signal.SIGXFSZ:
            return {**out, "status": "output_limit", "detail": "file size limit exceeded"}
        return {**out, "status": "crash", "detail": f"killed by {_signal_name(sig)}{where}"}
    return {**out, "status": "exited", "detail": f"the program exited with code {os.WEXITSTATUS(wstatus)}{where} "
                                                  "before the test reported a result"}


def _proc_field(pid: str, name: bytes) -> bytes | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            data = f.read()
    except OSError:
        return None
    i = data.find(b"\n" + name + b":")
    return data[i + len(name) + 2:data.index(b"\n", i + 1)].split() if i >= 0 else None


def _proc_uid(pid: str) -> int | None:
    """Real uid of a process (a process cannot change it without privilege, unlike /proc/PID's owner)."""
    f = _proc_field(pid, b"Uid")
    return int(f[0]) if f else None


def _proc_ppid(pid: str) -> str | None:
    f = _proc_field(pid, b"PPid")
    return f[0].decode() if f else None


def _remove_owned(root: str, uid: int, depth: int) -> None:
    """Delete entries of `root` owned by `uid`; look inside other world-writable directories too."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for e in entries:
        try:
            st = e.stat(follow_symlinks=False)
            if st.st_uid == uid:
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(e.path, ignore_errors=True)  # fd-based: never follows the program's symlinks
                else:
                    os.unlink(e.path)
            elif depth > 1 and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH:
                _remove_owned(e.path, uid, depth - 1)
        except OSError:
            pass


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
                                 env={"PATH": CHILD_ENV_PATH}, cwd="/", **ids)
        except (OSError, subprocess.SubprocessError) as e:
            tried.append(f"{exe}: {e}")
            continue
        if out.returncode == 0 and out.stdout.split() == version.split("."):
            _interpreters[uid] = exe
            return exe
        tried.append(f"{exe}: exit {out.returncode} {out.stderr.strip()[-200:]}")
    raise RuntimeError(f"no Python {version} that uid {uid} can run (the child needs one it can execute and "
                       f"whose stdlib it can read); tried: {tried or candidates}")


def _claim_uid() -> tuple[int, int]:
    """A worker uid no other pool (in any process) is using: held by an flock until the worker closes."""
    import fcntl
    os.makedirs(LOCK_DIR, mode=0o755, exist_ok=True)
    for uid in range(UID_BASE, UID_BASE + 4096):
        fd = os.open(f"{LOCK_DIR}/{uid}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return uid, fd
        except BlockingIOError:
            os.close(fd)
    raise RuntimeError(f"no free sandbox uid in {UID_BASE}..{UID_BASE + 4095}")


def _supervisor_env() -> dict:
    """No secrets reach the supervisor either; NANORLEF_SANDBOX_DEBUG=1 sends harness errors to stderr."""
    env = {"PATH": CHILD_ENV_PATH, "LANG": "C.UTF-8"}
    if os.environ.get("NANORLEF_SANDBOX_DEBUG"):
        env["NANORLEF_SANDBOX_DEBUG"] = "1"
    return env


class _Worker:
    """One supervisor process and, as root, one uid."""

    def __init__(self, fresh_interpreter: bool = True, hide: list[str] = ()):
        self.fresh_interpreter, self.hide = fresh_interpreter, list(hide)
        self.uid, self.lock_fd = _claim_uid() if os.geteuid() == 0 else (None, None)
        self.python = find_interpreter(self.uid)
        self.proc = None
        self.network, self.hidden = None, []
        self._start()

    def _start(self) -> None:
        boot = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import sandbox; "
                f"sandbox._supervise({self.uid!r}, {self.python!r}, {self.fresh_interpreter!r}, {self.hide!r})")
        # The supervisor runs on the child's interpreter: in fork mode its copies import stdlib as the uid.
        self.proc = subprocess.Popen([self.python, "-E", "-s", "-c", boot], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=_supervisor_env(),
                                     cwd="/", text=True, bufsize=1)
        hello = self.proc.stdout.readline()
        if not hello:
            raise RuntimeError(f"sandbox supervisor failed to start (exit {self.proc.wait()})")
        hello = json.loads(hello)
        self.network, self.hidden = hello["network"], hello["hidden"]

    def run(self, job: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if line:
            return json.loads(line)
        # Only possible without root (the program could signal its supervisor): fail the run, restart.
        self.proc.wait()
        self._start()
        return {"tests": [{"status": "crash", "value": None, "detail": "the sandbox supervisor died", "cpu": None}
                          for _ in job["tests"]], "cpu_time": 0.0, "wall_time": 0.0, "leftovers": []}

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()   # the supervisor cleans up and exits at EOF
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
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
    for i, t in enumerate(tests):
        if not isinstance(t, Test):
            raise ValueError(f"tests[{i}]: must be data.Test, got {type(t).__name__}")
        source, name = (t.call, "call") if t.kind == "call" else (t.code, "code") if t.kind == "assert" else ("", "")
        if name:
            try:
                compile(source, f"tests[{i}].{name}", "eval" if t.kind == "call" else "exec")
            except (SyntaxError, ValueError) as e:
                raise ValueError(f"tests[{i}].{name}: not valid Python ({e})") from None
    return program


def _job(program: str, tests: list[Test], setup_code: str, limits: Limits) -> dict:
    wire = [[t.kind, t.call if t.kind == "call" else t.code, t.stdin] for t in tests]  # inputs only
    return {"program": program, "setup": setup_code, "tests": wire, "limits": asdict(limits)}


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


_SCALARS = {"int": int, "float": float, "complex": complex}
_CONTAINERS = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


def decode_value(tree, depth: int = 0):
    """Tagged JSON tree from the child -> builtin value. Anything malformed becomes _Unsupported."""
    try:
        tag = tree[0]
        if depth > 150:
            return _Unsupported("too deep")
        if tag in _SCALARS:
            return _SCALARS[tag](tree[1])
        if tag == "str" and type(tree[1]) is str:
            return tree[1]
        if tag == "none":
            return None
        if tag == "bool":
            return bool(tree[1])
        if tag in _CONTAINERS:
            return _CONTAINERS[tag](decode_value(v, depth + 1) for v in tree[1])
        if tag == "dict":
            return {decode_value(k, depth + 1): decode_value(v, depth + 1) for k, v in tree[1]}
        if tag == "bytes":
            return bytes.fromhex(tree[1])
        if tag == "unsupported":
            return _Unsupported(str(tree[1]))
    except (TypeError, ValueError, IndexError, KeyError, RecursionError, OverflowError):
        pass
    return _Unsupported("malformed result")


def _short(value, limit: int = TRUNCATE) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def normalize_output(text: str) -> str:
    """stdio comparison: trailing whitespace of each line and trailing blank lines do not matter."""
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def _verdict(test: Test, raw: dict) -> TestResult:
    status, cpu = raw["status"], raw.get("cpu")
    mapped = {"error": "runtime_error", "exited": "runtime_error", "oom": "out_of_memory"}.get(status, status)
    if status != "ok":
        return TestResult(mapped, detail=raw.get("detail", ""), cpu_time=cpu)
    if test.kind == "assert":
        return TestResult("pass", cpu_time=cpu)
    got = decode_value(raw["value"])
    if test.kind == "stdio":
        ok = isinstance(got, str) and normalize_output(got) == normalize_output(test.expected)
        expected, shown = test.expected, got if isinstance(got, str) else repr(got)
    else:
        expected = ast.literal_eval(test.expected)
        ok = bool(expected == got)  # builtins only on both sides: the same == as `assert f(x) == expected`
        shown = got
    if ok:
        return TestResult("pass", cpu_time=cpu)
    e, g = _short(expected if test.kind == "stdio" else test.expected), _short(shown)
    return TestResult("wrong_answer", detail=f"Expected {e} but got {g}", expected=e, got=g, cpu_time=cpu)


def _result(tests: list[Test], reply: dict) -> RunResult:
    return RunResult(tests=[_verdict(t, r) for t, r in zip(tests, reply["tests"])], cpu_time=reply["cpu_time"],
                     wall_time=reply["wall_time"], leftovers=reply["leftovers"])


class SandboxPool:
    """About one worker per core; each worker is a supervisor process and, as root, its own uid."""

    def __init__(self, workers: int | None = None, limits: Limits = Limits(), *, fresh_interpreter: bool = True,
                 hide_paths: list[str] | None = None):
        """fresh_interpreter=True: every program gets a new `python -I -S` (exec). False: a fork of the worker's
        supervisor, which never runs program code and holds no expected output: ~10 ms less CPU per program
        (no interpreter start-up), at the price of sharing the supervisor's hash seed and loaded modules.
        hide_paths: directories programs must not see (default: default_hidden_paths())."""
        self.limits = limits
        n = workers or len(os.sched_getaffinity(0))
        self._jobs: queue.Queue = queue.Queue()
        self._workers: list[_Worker] = []
        try:
            for _ in range(n):
                self._workers.append(_Worker(fresh_interpreter, default_hidden_paths() if hide_paths is None
                                                                                                 else hide_paths))
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


def run_program(program: str, tests: list[Test], setup_code: str = "", limits: Limits = Limits()) -> RunResult:
    """Run one program through a shared one-worker pool (started on first use, closed at exit)."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            import atexit
            _default_pool = SandboxPool(workers=1)
            atexit.register(_default_pool.close)
    return _default_pool.submit(program, tests, setup_code, limits).result()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run a program against a task's tests in the sandbox; "
                                            "prints one JSON object.")
    p.add_argument("--task", required=True, help="task JSON: project format, an MBPP record or a HumanEval record")
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
        with SandboxPool(workers=1) as pool:
            result = pool.submit(program, tests, task.setup_code, Limits(timeout_s=args.timeout)).result()
    except ValueError as e:
        p.error(f"{args.program}: {e}")
    print(json.dumps({"task_id": task.task_id, **result.to_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
