"""The sandbox's cgroups: a subtree of our own per supervisor (nanorlef-<pid>-<tag>, next to the supervisor's
own cgroup, in each v1 hierarchy we need or once in v2) and one cgroup per run under it, which accounts the
CPU of every process the run starts, charges its memory (tmpfs and shared memory too), caps its processes and
ends it with one kill. Stdlib only: the supervisor imports it. We never touch a cgroup we did not create.
"""
from __future__ import annotations

import fcntl
import os
import signal
import time
import uuid

from sandbox_host import LOCK_DIR, lock_dir


def read_file(path: str) -> str:
    with open(path) as f:
        return f.read()


def write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _tree_lock(name: str, create: bool) -> int | None:
    """An flock on LOCK_DIR/<name>.cgroup: taken at once by create(), or None where someone holds it (or,
    without `create`, where there is no such file: a tree we cannot prove dead is left alone)."""
    lock_dir()
    try:
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
        fd = os.open(f"{LOCK_DIR}/{name}.cgroup", flags, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


class CgroupTree:
    """Our subtree, nanorlef-<pid>-<uuid>: in each v1 hierarchy we need, or once in the v2 hierarchy."""
    V1 = ("cpuacct", "memory", "pids", "cpu", "freezer")   # the first three are required

    def __init__(self, bases: dict[str, str], v2: bool, name: str = ""):
        self.bases, self.v2, self.count, self.name = bases, v2, 0, name
        self.lock_fd = None   # held while the tree is in use: how a sweep tells a live tree from an orphan

    @staticmethod
    def _own() -> dict[str, str]:
        """This process's cgroup per hierarchy; the supervisor inherits the parent's, so both see the same."""
        own = {}
        for line in read_file("/proc/self/cgroup").splitlines():
            _, ctrls, path = line.split(":", 2)
            own[ctrls] = path
        return own

    @classmethod
    def create(cls) -> tuple[CgroupTree | None, str]:
        """(tree, description); tree None when there is no writable cgroup hierarchy."""
        cls.sweep_orphans()
        own = cls._own()
        name = f"nanorlef-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        lock_fd = _tree_lock(name, create=True)
        if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):   # v2: the root first (the controllers)
            for parent in dict.fromkeys(["/sys/fs/cgroup", "/sys/fs/cgroup" + own.get("", "/")]):
                try:
                    os.mkdir(f"{parent}/{name}")
                except OSError:
                    continue
                base = f"{parent}/{name}"
                for ctrl in ("memory", "pids", "cpu"):
                    try:
                        write_file(f"{base}/cgroup.subtree_control", f"+{ctrl}")
                    except OSError:
                        pass
                controllers = read_file(base + "/cgroup.subtree_control").strip()
                return cls({"": base}, True, name)._locked(lock_fd), f"cgroup v2 ({controllers})"
            return None, "no writable cgroup v2 directory"
        bases = {}
        for ctrl in cls.V1:
            mount = next((f"/sys/fs/cgroup/{k}" for k in own if ctrl in k.split(",")), None)
            path = own.get(next((k for k in own if ctrl in k.split(",")), ""), "/")
            if mount is None or not os.path.isdir(mount):
                continue
            try:
                os.mkdir(f"{mount}{path.rstrip('/')}/{name}")
                bases[ctrl] = f"{mount}{path.rstrip('/')}/{name}"
            except OSError:
                continue
        if not all(c in bases for c in cls.V1[:3]):
            cls(bases, False, name)._locked(lock_fd).close()
            return None, "no writable cgroup v1 cpuacct, memory and pids"
        return cls(bases, False, name)._locked(lock_fd), "cgroup v1 (" + ", ".join(bases) + ")"

    def _locked(self, lock_fd: int) -> CgroupTree:
        self.lock_fd = lock_fd
        return self

    @classmethod
    def named(cls, name: str) -> CgroupTree | None:
        """The tree called `name`, for the parent to remove once it has killed the supervisor that made it."""
        return next(iter(cls._named(lambda n: n == name)), None)

    @classmethod
    def sweep_orphans(cls) -> list[str]:
        """Remove the subtrees of supervisors that are gone with nobody left to remove them (their pool's
        process was killed, say): only our own names, only trees whose lock no process holds (a pid would not
        do: a supervisor in another PID namespace shares these hierarchies), only trees with no process."""
        return [p for tree in cls._named(lambda n: True) for p in tree.remove_orphan(kill=False)]

    def remove_orphan(self, kill: bool) -> list[str]:
        """Remove this tree if no supervisor holds its lock; with kill=False only if no process is in it."""
        self.lock_fd = _tree_lock(self.name, create=False)
        if self.lock_fd is None:
            return []
        try:
            return [] if not kill and self.has_processes() else self.remove_all()
        except OSError as e:   # another sweeper got there first, or a hierarchy went away
            return [f"cgroup {self.name}: {e}"]
        finally:
            if self.lock_fd is not None:
                os.close(self.lock_fd)
                self.lock_fd = None

    @classmethod
    def _named(cls, name_matches) -> list[CgroupTree]:
        """Our subtrees (nanorlef-<pid>-<tag>, as create() names them) whose name matches. No other name is
        ever touched."""
        own, found = cls._own(), {}
        if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            roots = ["/sys/fs/cgroup", "/sys/fs/cgroup" + own.get("", "/")]
            parents = [("", p) for p in dict.fromkeys(roots)]
        else:
            keys = {c: next((k for k in own if c in k.split(",")), None) for c in cls.V1}
            parents = [(c, f"/sys/fs/cgroup/{k}{own[k].rstrip('/')}") for c, k in keys.items() if k]
        for ctrl, parent in parents:
            try:
                names = os.listdir(parent)
            except OSError:
                continue
            for n in names:
                prefix, owner, tag = (n.split("-", 2) + ["", ""])[:3]
                if prefix == "nanorlef" and owner.isdigit() and tag.isalnum() and name_matches(n):
                    found.setdefault(n, {})[ctrl] = f"{parent}/{n}"
        return [cls(bases, "" in bases, n) for n, bases in found.items()]

    def has_processes(self) -> bool:
        for base in self.bases.values():
            for d, _, _ in os.walk(base):
                try:
                    if read_file(f"{d}/cgroup.procs").strip():
                        return True
                except OSError:
                    pass
        return False

    def remove_all(self) -> list[str]:
        """Its run cgroups (processes killed first, v1 frozen), then the subtree itself."""
        runs: dict[str, dict[str, str]] = {}
        for ctrl, base in self.bases.items():
            for n in os.listdir(base) if os.path.isdir(base) else []:
                if n.startswith("run") and n[3:].isdigit():
                    runs.setdefault(n, {})[ctrl] = f"{base}/{n}"
        problems = [p for dirs in runs.values() for p in RunCgroup(dirs, self.v2, None).remove()]
        return problems + self.close()

    def run(self, lim: dict) -> RunCgroup:
        self.count += 1
        return RunCgroup({c: f"{b}/run{self.count}" for c, b in self.bases.items()}, self.v2, lim)

    def close(self) -> list[str]:
        problems = []
        for base in self.bases.values():
            try:
                os.rmdir(base)
            except OSError as e:
                problems.append(f"cgroup {base}: {e}")
        if self.lock_fd is not None:
            # v1 trees whose memory half sits under another session's memory cgroup (each sees only its
            # own) keep the lock file, so that a sweep from there can still prove that half orphaned.
            if not problems and (self.v2 or "memory" in self.bases):
                os.unlink(f"{LOCK_DIR}/{self.name}.cgroup")
            os.close(self.lock_fd)
            self.lock_fd = None
        return problems


class RunCgroup:
    def __init__(self, dirs: dict[str, str], v2: bool, lim: dict | None):
        """Makes the directories with limits `lim`; lim=None takes existing ones (to remove them)."""
        self.dirs, self.v2 = dirs, v2
        if lim is None:
            return
        for d in dirs.values():
            os.mkdir(d)
        mem, pids = lim["memory_mb"] << 20, lim["max_processes"] + 3   # + bwrap's two processes and the fork
        limits = ({"memory.max": mem, "memory.swap.max": 0, "pids.max": pids} if v2 else
                  {"memory.limit_in_bytes": mem, "memory.memsw.limit_in_bytes": mem, "pids.max": pids})
        for key, value in limits.items():
            path = f"{self._dir(key)}/{key}"
            if os.path.exists(path):
                write_file(path, str(value))

    def _dir(self, key: str) -> str:
        return self.dirs[""] if self.v2 else self.dirs[key.split(".")[0]]

    def procs_files(self) -> list[str]:
        return [f"{d}/cgroup.procs" for d in self.dirs.values()]

    def cpu(self) -> float:
        """CPU seconds of every process that ever ran in the group, waited for or not."""
        try:
            if self.v2:
                stat_ = read_file(self.dirs[""] + "/cpu.stat")
                return int(stat_.split("usage_usec", 1)[1].split()[0]) / 1e6
            return int(read_file(self.dirs["cpuacct"] + "/cpuacct.usage")) / 1e9
        except (OSError, ValueError, IndexError):
            return 0.0

    def oom_killed(self) -> bool:
        path = f"{self._dir('memory.events')}/{'memory.events' if self.v2 else 'memory.oom_control'}"
        try:
            fields = read_file(path).split()
            return int(fields[fields.index("oom_kill") + 1]) > 0
        except (OSError, ValueError, IndexError):
            return False

    def pids(self) -> list[int]:
        found = set()
        for f in self.procs_files():
            try:
                found.update(int(p) for p in read_file(f).split())
            except (OSError, ValueError):
                pass
        return sorted(found)

    def kill(self) -> None:
        """SIGKILL everything in the group: cgroup.kill (v2), else frozen, killed, thawed (v1)."""
        kill_file = f"{self.dirs.get('', '')}/cgroup.kill"
        if self.v2 and os.path.exists(kill_file):
            write_file(kill_file, "1")
            return
        freezer = self.dirs.get("freezer")
        if freezer:
            write_file(f"{freezer}/freezer.state", "FROZEN")
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if freezer:
            write_file(f"{freezer}/freezer.state", "THAWED")

    def remove(self) -> list[str]:
        """Kill what is left, wait for the group to empty, remove it. Returns problems (normally none)."""
        deadline = time.monotonic() + 5
        while self.pids() and time.monotonic() < deadline:
            self.kill()
            time.sleep(0.001)
        problems = []
        for d in self.dirs.values():
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:   # EBUSY while the last exiting task leaves
                    err = e
                    time.sleep(0.002)
            else:
                problems.append(f"cgroup {d}: {err}")
        return problems


