"""The sandbox's supervisor: one long-lived process per worker (root in training, stdlib only), started by
sandbox.py, that runs each program in a fresh child and reports per-test results as JSON lines. Another
process on another interpreter (the child's), so it imports none of the parent's code. Two ways to run a
child:

* bubblewrap (root, `bwrap` on PATH, writable cgroups): `bwrap ... python -I -S` as the worker's uid, in new
  user, PID, IPC, UTS, network and cgroup namespaces, with read-only /usr and /etc, fresh /proc and /dev, and
  private size-limited tmpfs mounts for /tmp, /var/tmp, /dev/shm and the home; nothing else of the host. Each
  child has its own cgroup (CPU of everything it starts, memory including tmpfs and shared memory, pids); one
  kill ends it all, and the namespaces and mounts go with its last process. The next child starts as soon as a
  run ends (a spare that has run nothing and waits for its job), so a job does not wait for an interpreter.
* fallback (no bwrap, no writable cgroups, or no root): `python -I -S` forked directly, as the worker's uid
  when root, with rlimits, in a private root with its own network and IPC namespaces where root allows; its
  CPU is its own clock plus the rusage of the descendants we reap as their subreaper, and cleanup removes the
  uid's processes and files. Cgroups are still used when writable.
Both install a seccomp filter (sandbox_host.seccomp_program) before the program starts.
"""
from __future__ import annotations

import ctypes
import json
import math
from itertools import accumulate
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import time

from sandbox_cgroup import CgroupTree, RunCgroup, write_file
from sandbox_host import (BOX_MARKER, BOX_PREFIX, EMPTY, enter_private_root, fresh_home, install_seccomp,
                          isolate, kill_uid, mount_plan, owned_entries, private_tree, proc_ppid, proc_uid,
                          proc_covers, remove_tree, seccomp_fprog, site_dirs)

MAX_DEPTH = 100                 # nesting of a result value: the child's encoder and the parent's decoder
MAX_ELEMENTS = 200_000          # elements of all result values of a run: child's encoder, supervisor, parent
JSON_DEPTH = 3 * MAX_DEPTH + 8  # JSON nesting of such a value (a dict entry is 3 levels): both sides
MAX_CONTAINERS = 2 * MAX_ELEMENTS + 2   # JSON arrays of that many elements (tagged nodes, items, dict pairs)
MAX_REPLY_BYTES = 16 << 20      # all results of a run as sent (escaped JSON); later ones become output_limit
CHILD_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"
HOME = "/home/sandbox"          # the program's home and cwd inside bubblewrap and the fallback's private root
SPARE_TESTS = 32                # a spare child is made for up to this many tests (its CPU rlimit), or more
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", HOME)   # each a private tmpfs of disk_mb per program
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 36, 38
# keyctl(2): no libc wrapper, so the syscall number per architecture; unknown architectures skip it.
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}.get(platform.machine())
KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_CLEAR, KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING = 1, 7, -4, -5

_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_BRACKET_SIGN = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def run_budget_s(n_tests: int, lim: dict) -> float:
    """Wall-clock seconds one run may take in all, loading and respawns included: each test and one load may
    use the wall watchdog, plus 2 s each to start a child. Past it the remaining tests time out; the parent
    waits this plus a margin for the reply."""
    return (n_tests + 1) * (lim["timeout_s"] * lim["wall_factor"] + 2.0)


def json_over_budget(text: str, max_containers: int = MAX_CONTAINERS, limit: int = JSON_DEPTH) -> str:
    """Why JSON text must not be parsed ('' if it may): nesting deeper than `limit`, more than
    `max_containers` arrays and objects, unbalanced brackets or an unterminated string. One linear pass of
    C-speed steps, no recursion; the supervisor and the parent both call it before json.loads, whose cost is
    per container: escaped backslashes and quotes are dropped, every '"' left delimits a string, the parts
    outside strings keep only their brackets, and the running sum of +1 per opening and -1 per closing one
    is the depth."""
    plain = text.replace("\\\\", "").replace('\\"', "")   # left to right, as a JSON scanner pairs them
    parts = plain.split('"')
    if len(parts) % 2 == 0:    # an odd number of quotes: a string never ends
        return "the result is malformed"
    outside = "".join(parts[::2]).encode("utf-8", "surrogatepass").translate(None, _NOT_BRACKETS)
    if not outside:
        return ""
    if len(outside) > 2 * max_containers:
        return f"the results hold more than {MAX_ELEMENTS} elements"
    depth = list(accumulate(memoryview(outside.translate(_BRACKET_SIGN)).cast("b")))
    if max(depth) > limit:
        return f"the result nests deeper than {MAX_DEPTH} levels"
    return "the result is malformed" if min(depth) < 0 or depth[-1] != 0 else ""


# --------------------------------------------------------------------------------------------------------
# The supervisor process
# --------------------------------------------------------------------------------------------------------

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


def supervise(uid: int | None, python: str, hide: list[str], libraries: list[str]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    hide = list(dict.fromkeys(list(hide) + site_dirs()))
    sup = Supervisor(uid, python, libc, hide)        # reads the harness source: before hiding the repo
    hello = isolate(libc, python, hide)
    if uid is not None and not sup.bwrap and hello["network"] == "isolated":   # root with CAP_SYS_ADMIN
        sup.private_root = True
        sup.isolation += ", private root, network and IPC namespaces per program"
    if sup.bwrap or sup.private_root:
        sup.use_private_tree(libraries)   # in our own mount namespace, which isolate() made
    sup.prespawn = bool(sup.bwrap)   # only now: a spare started before isolate() would be outside them
    hello["isolation"], hello["cgroup"] = sup.isolation, sup.cgroups.name if sup.cgroups else None
    if sup.bwrap or sup.private_root:                # nothing but the system directories is mounted there
        hello["hidden"] = hide
    print(json.dumps(hello), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        try:
            reply = sup.run_job(job)
        except Exception as e:  # a bug of ours must fail this run, not every later one
            detail = f"sandbox error: {type(e).__name__}: {e}"
            crash = {"status": "crash", "value": None, "detail": detail, "cpu": None}
            reply = {"tests": [crash] * len(job["tests"]), "cpu_time": 0.0, "wall_time": 0.0,
                     "leftovers": sup.cleanup()}
        print(json.dumps(reply), flush=True)
        sup.start_spare(job)
    sup.close()


def _compiled_harness(python: str) -> bytes:
    """marshal'd code of sandbox_child.py, compiled by `python` itself (code objects are per-version)."""
    import marshal
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")) as f:
        src = f.read()
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        return marshal.dumps(compile(src, "<sandbox harness>", "exec"))
    out = subprocess.run([python, "-I", "-S", "-c", "import marshal, sys; sys.stdout.buffer.write("
                          "marshal.dumps(compile(sys.stdin.read(), '<sandbox harness>', 'exec')))"],
                         input=src.encode(), capture_output=True, check=True, timeout=60)
    return out.stdout


class Supervisor:
    def __init__(self, uid: int | None, python: str, libc, hide: list[str]):
        self.uid, self.python, self.libc, self.harness = uid, python, libc, _compiled_harness(python)
        self.debug = bool(os.environ.get("NANORLEF_SANDBOX_DEBUG"))
        self.spare, self.prespawn = None, False   # prespawn: see supervise
        self.seccomp = seccomp_fprog()   # None on an architecture without a syscall table here
        self.cgroups, cg_text = CgroupTree.create() if uid is not None else (None, "not root")
        forced = bool(os.environ.get("NANORLEF_SANDBOX_FALLBACK"))   # to run or compare the fallback anywhere
        self.plan, self.private_root = mount_plan(SYSTEM_DIRS, hide), False   # private_root: see supervise
        self.bwrap = self._bwrap_argv() if self.cgroups and not forced else None
        why = ("no writable cgroups" if not self.cgroups else "NANORLEF_SANDBOX_FALLBACK=1" if forced else
               "no bwrap on PATH" if not self.bwrap else self._probe("bubblewrap"))
        if why:   # say, user namespaces are off: the worker falls back
            self.bwrap = None
        self.isolation = (f"bubblewrap, {cg_text}" if self.bwrap else f"fallback ({why}): uid, rlimits" + (
            f", {cg_text}" if self.cgroups else "")) + (", seccomp" if self.seccomp else "")
        self.box = self.home = self.tree = None
        self.owner = uid if uid is not None else os.getuid()   # of the fallback's home
        if not self.bwrap:   # the fallback's home: <root-owned box>/home, owned by the uid
            import tempfile
            self.box = tempfile.mkdtemp(prefix=f"{BOX_PREFIX}{uid}-")
            os.chmod(self.box, 0o711)
            open(os.path.join(self.box, BOX_MARKER), "w").close()
            self.home = os.path.join(self.box, "home")
            fresh_home(self.home, self.owner)
        if uid is None:  # RLIMIT_NPROC counts all processes of our own uid here: leave room for them
            self.nproc_base = sum(p.isdigit() and proc_uid(p) == os.getuid() for p in os.listdir("/proc"))

    # ---- bubblewrap
    def _bwrap_argv(self) -> list[str] | None:
        exe = shutil.which("bwrap")
        if exe is None:
            return None
        argv = [exe, "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net",
                "--unshare-cgroup-try", "--disable-userns", "--die-with-parent", "--new-session",
                "--proc", "/proc", "--dev", "/dev"]
        for kind, path in proc_covers():   # the host-wide counters of /proc (sandbox_host.PROC_GLOBAL_FILES)
            argv += ["--ro-bind", EMPTY, path] if kind == "file" else ["--tmpfs", path, "--remount-ro", path]
        for kind, src, dst in self.plan:
            argv += {"symlink": ["--symlink", src, dst], "bind": ["--ro-bind", src, dst],
                     "cover": ["--tmpfs", dst, "--remount-ro", dst]}[kind]
        return argv + ["--chdir", HOME]

    def _tmpfs_args(self, lim: dict) -> list[str]:
        size = str(lim["disk_mb"] << 20)
        return [a for d in SCRATCH_DIRS for a in ("--size", size, "--tmpfs", d)]

    def _probe(self, what: str, program: str = "pass\n") -> str:
        """Run `program` through the whole path once: '' if it works, else why `what` failed."""
        lim = {"memory_mb": 256, "max_processes": 8, "disk_mb": 1, "timeout_s": 10, "stack_mb": 8,
               "max_open_files": 64, "max_file_mb": 1, "max_output_bytes": 1024, "wall_factor": 1}
        job = {"program": program, "setup": "", "tests": [["assert", "pass", ""]], "limits": lim}
        try:
            test = self.run_job(job)["tests"][0]
            why = "" if test["status"] == "ok" else f"{what} failed: {test['detail'][:200]}"
        except Exception as e:   # noqa: BLE001 - any failure means: not usable here
            why = f"{what} failed: {type(e).__name__}: {e}"
        return why

    def use_private_tree(self, libraries: list[str]) -> None:
        """Bind /usr and /etc from a tmpfs copy (sandbox_host.private_tree) if the interpreter runs from it
        with its compiled modules; else keep the host's, and say so in the isolation text."""
        host_plan = self.plan
        self.plan, self.tree, why = private_tree(self.libc, self.python, host_plan, libraries)
        self.bwrap = self._bwrap_argv() if self.bwrap else None
        why = why or self._probe("the private interpreter tree", "import _ctypes, _decimal, _json, zlib\n")
        if why:
            self.plan = host_plan
            self.bwrap = self._bwrap_argv() if self.bwrap else None
            self.isolation += f", host /usr ({why})"
        else:
            self.isolation += ", a private copy of the interpreter"

    # ---- one job: all tests of one program, respawning after a crash or timeout
    def run_job(self, job: dict) -> dict:
        tests, lim = job["tests"], job["limits"]
        t0 = time.perf_counter()
        results: list[dict] = []
        cpu, leftovers, reply_bytes = 0.0, [], 0
        self.containers_left = MAX_CONTAINERS
        budget = job.get("budget_s") or run_budget_s(len(tests), lim)   # the parent's, which waits for it
        self.run_deadline = time.monotonic() + budget   # one for the run, not one per message or child
        try:
            while len(results) < len(tests):
                if time.monotonic() >= self.run_deadline:
                    why = f"the run's wall-clock budget ({budget:.1f} s) ran out"
                    results += [{"status": "timeout", "value": None, "detail": why, "cpu": None}
                                for _ in range(len(tests) - len(results))]
                    break
                got, used, problems = self._run_child(job, len(results), lim)
                for r in got:
                    reply_bytes += len(json.dumps(r)) + 2   # as it goes on the wire: escaped again
                    if reply_bytes > MAX_REPLY_BYTES:
                        r.update(status="output_limit", value=None,
                                 detail=f"the results of this program exceed {MAX_REPLY_BYTES} bytes")
                results += got
                cpu += used
                leftovers += problems
        finally:
            leftovers += self.cleanup()
        wall = time.perf_counter() - t0
        return {"tests": results, "cpu_time": cpu, "wall_time": wall, "leftovers": leftovers}

    def start_spare(self, job: dict) -> None:
        """Start the next child now, with this job's limits (the pool's next job usually has the same)."""
        if self.prespawn and self.spare is None:
            try:
                self.spare = self._new_child(job["limits"], max(len(job["tests"]), SPARE_TESTS))
            except OSError:   # no spare this time: the next job starts its own child, as without spares
                self.spare = None

    def _rlimits(self, lim: dict, n_tests: int) -> list[tuple[int, int]]:
        import resource as r
        cpu = self._cpu_rlimit(lim, n_tests)
        nproc = lim["max_processes"] + 3 if self.uid is not None else self.nproc_base + lim["max_processes"]
        return [(r.RLIMIT_AS, lim["memory_mb"] << 20), (r.RLIMIT_CPU, cpu), (r.RLIMIT_NPROC, nproc),
                (r.RLIMIT_NOFILE, lim["max_open_files"]), (r.RLIMIT_FSIZE, lim["max_file_mb"] << 20),
                (r.RLIMIT_CORE, 0), (r.RLIMIT_STACK, lim["stack_mb"] << 20), (r.RLIMIT_MEMLOCK, 0)]

    @staticmethod
    def _cpu_rlimit(lim: dict, n_tests: int) -> int:
        return math.ceil(lim["timeout_s"] * (n_tests + 1)) + 1   # backs our per-test CPU watchdog

    def _fresh_keyrings(self) -> None:
        """Keys a program stored must not reach the next one: a new session keyring, the uid's keyrings
        emptied (bubblewrap's user namespace also gives each program its own user keyring)."""
        if SYS_KEYCTL is not None:
            self.libc.syscall(SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None)
            for ring in (KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING):
                self.libc.syscall(SYS_KEYCTL, KEYCTL_CLEAR, ring)

    def _spawn(self, lim: dict, n_tests: int, cg: RunCgroup | None):
        import fcntl
        import resource
        job_r, job_w = os.pipe()
        res_r, res_w = os.pipe()
        ack_r, ack_w = os.pipe()
        home = HOME if self.bwrap or self.private_root else self.home
        env = {"PATH": CHILD_ENV_PATH, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        argv = [self.python, "-I", "-S", "-c", _CHILD_BOOT]
        if self.bwrap:
            argv = self.bwrap + self._tmpfs_args(lim) + ["--"] + argv
        limits = self._rlimits(lim, n_tests)
        procs = cg.procs_files() if cg else []
        pid = os.fork()
        if pid == 0:  # child: nothing here may raise past os._exit
            try:
                os.setsid()
                for path in procs:   # into the run's cgroup before anything else runs
                    write_file(path, str(os.getpid()))
                devnull = os.open(os.devnull, os.O_RDWR)
                err = 2 if self.debug else devnull  # NANORLEF_SANDBOX_DEBUG=1: harness errors to our stderr
                # Move the sources above the targets first, so no dup2 clobbers one (or is a no-op on fd 3).
                sources = [fcntl.fcntl(fd, fcntl.F_DUPFD, 16)
                           for fd in (devnull, devnull, err, job_r, res_w, ack_r)]
                for target, source in enumerate(sources):
                    os.dup2(source, target)
                os.closerange(6, 1 << 16)
                if self.private_root:
                    enter_private_root(self.libc, self.plan, self.box, SCRATCH_DIRS, lim["disk_mb"], self.uid)
                for which, value in limits:
                    resource.setrlimit(which, (value, value))
                if self.uid is not None:
                    os.setgroups([])
                    os.setresgid(self.uid, self.uid, self.uid)
                    os.setresuid(self.uid, self.uid, self.uid)
                if self.libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:   # no setuid binary gives root back
                    raise OSError("prctl(PR_SET_NO_NEW_PRIVS)")
                self._fresh_keyrings()
                if self.seccomp:   # last: it denies the keyctl calls just made
                    install_seccomp(self.libc, self.seccomp)
                os.chdir("/" if self.bwrap else home)
                os.execve(argv[0], argv, env)
            except BaseException as e:
                if self.debug:
                    os.write(2, f"sandbox: child setup failed: {e!r}\n".encode())
            finally:
                os._exit(127)
        for fd in (job_r, res_w, ack_r):
            os.close(fd)
        return pid, job_w, res_r, ack_w

    def _new_child(self, lim: dict, n_tests: int) -> tuple:
        cg = self.cgroups.run(lim) if self.cgroups else None
        return (lim, n_tests, cg, *self._spawn(lim, n_tests, cg))

    def _take_child(self, lim: dict, n_tests: int) -> tuple:
        """(cgroup, pid, job_w, res_r, ack_w) of a fresh child: the spare, which no program has run in, if it
        is alive and fits (same limits, made for at least n_tests: its CPU rlimit, which only backs our exact
        watchdogs, may be looser), else a new one."""
        spare, self.spare = self.spare, None
        if spare and spare[0] == lim and spare[1] >= n_tests and os.waitpid(spare[3], os.WNOHANG) == (0, 0):
            return spare[2:]
        if spare:
            self._discard(spare)
        return self._new_child(lim, n_tests)[2:]

    def _discard(self, child: tuple) -> None:
        _, _, cg, pid, *fds = child
        for fd in fds:
            os.close(fd)
        try:
            if cg:
                cg.kill()
            os.killpg(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
        self.reap_descendants()   # the spare among them, whether or not it had exited already
        if cg:
            cg.remove()

    def _run_child(self, job: dict, first: int, lim: dict) -> tuple[list[dict], float, list[str]]:
        """Run tests[first:] in one fresh child until it finishes, crashes or times out.
        Returns (results, CPU seconds of the child and everything it started, cleanup problems)."""
        import marshal
        tests = job["tests"]
        child_job = (job["program"], job["setup"], [tuple(t) for t in tests], first, lim["max_output_bytes"],
                     MAX_DEPTH, MAX_ELEMENTS)
        cg, pid, job_w, res_r, ack_w = self._take_child(lim, len(tests) - first)
        pidfd = os.pidfd_open(pid)
        clock = ((~pid) << 3) | 2   # CPUCLOCK_SCHED of process `pid`: CPU of all its threads, in ns
        cpu_now = cg.cpu if cg else (lambda: _cpu(clock))
        results: list[dict] = []
        stop: dict | None = None    # why we stopped the child early (None: it ended by itself)
        saw_start = False           # False until the first test starts: a death before it is a load failure
        try:
            try:
                _write_all(job_w, marshal.dumps((self.harness, child_job)))
            except BrokenPipeError:
                pass
            os.close(job_w)
            reader = _LineReader(res_r, pidfd, cpu_now, 2 * lim["max_output_bytes"] + 8192)
            reader.arm(lim, self.run_deadline)
            started_cpu, expecting = 0.0, (b"L", b"S")
            while first + len(results) < len(tests):
                line, stop = reader.next_line()
                if line is None:
                    break
                if line == b"L" and b"L" in expecting:          # program + setup_code start loading
                    expecting = (b"S",)
                elif line == b"S" and b"S" in expecting:        # a test starts: sample the CPU clock
                    started_cpu, saw_start, expecting = cpu_now(), True, (b"R",)
                elif line.startswith(b"R ") and b"R" in expecting:
                    used = cpu_now() - started_cpu
                    result, containers = _parse_result(line[2:], self.containers_left)
                    self.containers_left -= containers
                    if result is None:
                        stop = {"status": "error", "detail": "malformed message on the result channel"}
                        break
                    results.append({**result, "cpu": used})
                    expecting = (b"S",)
                else:
                    stop = {"status": "error", "detail": "unexpected message on the result channel"}
                    break
                try:
                    os.write(ack_w, b"k")   # the child waits for this, so the clock sample above is exact
                except BrokenPipeError:     # the child is gone; still read what it wrote before leaving
                    pass
                reader.arm(lim, self.run_deadline)
        finally:
            for fd in (res_r, ack_w, pidfd):
                os.close(fd)
            problems = []
            if cg:
                try:
                    cg.kill()
                except OSError as e:
                    problems.append(f"cgroup kill: {e}")
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            _, wstatus, usage = os.wait4(pid, 0)
        reaped = self.reap_descendants()[0]
        oom = bool(cg and cg.oom_killed())
        cpu = cg.cpu() if cg else usage.ru_utime + usage.ru_stime + reaped
        if cg:
            problems += cg.remove()
        if first + len(results) < len(tests):
            cpu_limit = math.ceil(lim["timeout_s"] * (len(tests) - first + 1)) + 1
            died = _death_status(stop, wstatus, cpu, cpu_limit, not saw_start, oom, bool(self.bwrap))
            # A program that never loaded would die the same way in every fresh child: fail all that remain.
            n = 1 if saw_start else len(tests) - first - len(results)
            results += [dict(died) for _ in range(n)]
        return results, cpu, problems

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
            waited = time.monotonic() - t0
            if waited > 5:
                return cpu, found
            # With a run cgroup, its kill reached every process, and the rest are exiting: wait for them
            # before scanning /proc (milliseconds per scan) for anything that escaped.
            if not self.cgroups or waited > 0.05:
                self._kill_all()
            time.sleep(0.0005)

    def _kill_all(self) -> None:
        if self.uid is not None and not self.bwrap:  # kill(-1) as the uid hits all its processes at once
            kill_uid(self.uid)
        me = str(os.getpid())
        for p in os.listdir("/proc"):  # also direct children (non-root mode, or anything not of the uid)
            if p.isdigit() and proc_ppid(p) == me:
                try:
                    os.kill(int(p), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def cleanup(self) -> list[str]:
        """After a run: no process of the run left and, in the fallback, no file of the uid in the shared
        temp places and an empty home. Never raises: a problem is reported, and the worker goes on."""
        try:
            _, found = self.reap_descendants()
            if self.bwrap:
                return []   # the run's mounts, IPC objects and keys went with its namespaces
            leftovers = []
            if self.uid is not None:
                remove_tree(owned_entries(self.uid))
                if found:  # only if something escaped the subreaper, which we then want to hear about
                    leftovers = [f"process {p} of uid {self.uid}" for p in os.listdir("/proc")
                                 if p.isdigit() and proc_uid(p) == self.uid]
            fresh_home(self.home, self.owner)
            return leftovers
        except Exception as e:  # noqa: BLE001 - a program must never take the supervisor down
            return [f"cleanup failed: {type(e).__name__}: {str(e)[:200]}"]

    def close(self) -> None:
        if self.spare:
            self._discard(self.spare)
        self.cleanup()
        if self.box:
            remove_tree([self.box])
        if self.tree:
            self.libc.umount2(self.tree.encode(), 2)   # MNT_DETACH; the mount point is shared, and stays
        if self.cgroups:
            self.cgroups.close()


def _parse_result(raw: bytes, max_containers: int) -> tuple[dict | None, int]:
    """A child's `R [status, value, detail]` line -> ({status, value (JSON text or None), detail}, JSON
    containers in it), or (None, 0) when it is malformed. Checked before json parses it: a forged line may
    nest without end or hold a million empty arrays."""
    try:
        text = raw.decode("utf-8")
        why = json_over_budget(text, max_containers + 2)   # + the line's own array and the value's
        if why:
            return {"status": "output_limit", "value": None, "detail": why}, 0
        status, value, detail = json.loads(text)
        if status not in ("ok", "error", "oom", "output_limit") or not isinstance(detail, str):
            return None, 0
    except (ValueError, TypeError, RecursionError):
        return None, 0
    detail = detail.encode("utf-8", "replace").decode("utf-8")    # always UTF-8 text, even if forged
    return {"status": status, "value": None if value is None else json.dumps(value), "detail": detail}, \
        text.count("[") - 2   # an upper bound (brackets in strings too) is enough for a budget


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

    def __init__(self, fd: int, pidfd: int, cpu_now, cap: int):
        self.fd, self.pidfd, self.cpu_now, self.cap, self.buf = fd, pidfd, cpu_now, cap, b""

    def arm(self, lim: dict, run_deadline: float) -> None:
        self.deadline_cpu = self.cpu_now() + lim["timeout_s"]
        self.run_deadline = run_deadline
        self.deadline_wall = min(time.monotonic() + lim["timeout_s"] * lim["wall_factor"], run_deadline)

    def next_line(self) -> tuple[bytes | None, dict | None]:
        """(line, None), or (None, why) where why=None means the child ended by itself."""
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line, self.buf = self.buf[:nl], self.buf[nl + 1:]
                return line, None
            if len(self.buf) > self.cap:
                why = f"result message larger than {self.cap} bytes"
                return None, {"status": "output_limit", "detail": why}
            now, cpu = time.monotonic(), self.cpu_now()
            if now >= self.deadline_wall or cpu >= self.deadline_cpu:
                over = now >= self.run_deadline
                why = "the run's wall-clock budget ran out" if over else "Execution took too long."
                return None, {"status": "timeout", "detail": why}
            wait = min(self.deadline_wall - now, max(self.deadline_cpu - cpu, 0.001), 0.25)
            ready, _, _ = select.select([self.fd, self.pidfd], [], [], wait)
            if self.fd in ready and self._read():
                continue
            if self.fd in ready:  # EOF: every writer closed the channel; did the child exit?
                if select.select([self.pidfd], [], [], 0.2)[0]:
                    return None, None
                why = "the result channel was closed before the test reported"
                return None, {"status": "error", "detail": why}
            if self.pidfd in ready:  # the child exited: take what it wrote before leaving
                if select.select([self.fd], [], [], 0)[0] and self._read():
                    continue
                return None, None

    def _read(self) -> bool:
        chunk = os.read(self.fd, 1 << 16)
        self.buf += chunk
        return bool(chunk)


def _death_status(stop: dict | None, wstatus: int, cpu: float, cpu_limit: int, during_load: bool, oom: bool,
                  bwrap: bool) -> dict:
    """Status of the test that was running when the child stopped without reporting it."""
    out = {"value": None, "cpu": None}
    if stop is not None:
        return {**out, **stop}
    where = " while loading the program" if during_load else ""
    sig = os.WTERMSIG(wstatus) if os.WIFSIGNALED(wstatus) else None
    if bwrap and os.WIFEXITED(wstatus) and os.WEXITSTATUS(wstatus) > 128:  # bwrap exits 128 + the signal
        sig = os.WEXITSTATUS(wstatus) - 128
    if oom and sig == signal.SIGKILL:   # the cgroup's OOM killer
        return {**out, "status": "oom", "detail": "MemoryError: the run's memory limit"}
    if sig is not None:
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= cpu_limit - 0.5):  # RLIMIT_CPU
            return {**out, "status": "timeout", "detail": "Execution took too long."}
        if sig == signal.SIGXFSZ:
            return {**out, "status": "output_limit", "detail": "file size limit exceeded"}
        name = {s.value: s.name for s in signal.Signals}.get(sig, f"signal {sig}")
        return {**out, "status": "crash", "detail": f"killed by {name}{where}"}
    code = os.WEXITSTATUS(wstatus)
    return {**out, "status": "exited",
            "detail": f"the program exited with code {code}{where} before the test reported a result"}
