"""What the sandbox asks of the host kernel: a cgroup per run (v1 or v2, under a subtree of our own), and the
processes and files of a uid (uid claims and the fallback's cleanup). Stdlib only: the supervisor imports it.
Kept apart so that sandbox_supervisor.py reads as the run of one program, top to bottom.
"""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
import uuid

CLEAN_ROOTS = ("/tmp", "/var/tmp", "/run/lock", "/dev/shm")   # world-writable places (fallback cleanup)


# --------------------------------------------------------------------------------------------------------
# cgroups: one per child, under a subtree of our own next to the supervisor's cgroup
# --------------------------------------------------------------------------------------------------------

def read_file(path: str) -> str:
    with open(path) as f:
        return f.read()


def write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


class CgroupTree:
    """Our subtree, nanorlef-<pid>-<uuid>: in each v1 hierarchy we need, or once in the v2 hierarchy."""
    V1 = ("cpuacct", "memory", "pids", "cpu", "freezer")   # the first three are required

    def __init__(self, bases: dict[str, str], v2: bool):
        self.bases, self.v2, self.count = bases, v2, 0

    @classmethod
    def create(cls) -> tuple[CgroupTree | None, str]:
        """(tree, description); tree None when there is no writable cgroup hierarchy."""
        own = {}
        for line in read_file("/proc/self/cgroup").splitlines():
            _, ctrls, path = line.split(":", 2)
            own[ctrls] = path
        name = f"nanorlef-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):   # v2: the root first (controllers live there)
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
                return cls({"": base}, True), f"cgroup v2 ({read_file(base + '/cgroup.subtree_control').strip()})"
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
            cls(bases, False).close()
            return None, "no writable cgroup v1 cpuacct, memory and pids"
        return cls(bases, False), "cgroup v1 (" + ", ".join(bases) + ")"

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
        return problems


class RunCgroup:
    def __init__(self, dirs: dict[str, str], v2: bool, lim: dict):
        self.dirs, self.v2 = dirs, v2
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


# --------------------------------------------------------------------------------------------------------
# Processes and files of a uid (uid claims and the fallback's cleanup)
# --------------------------------------------------------------------------------------------------------

def _proc_field(pid: str, name: bytes) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            data = f.read()
    except OSError:
        return None
    i = data.find(b"\n" + name + b":")
    return data[i + len(name) + 2:data.index(b"\n", i + 1)].split() if i >= 0 else None


def proc_uid(pid: str) -> int | None:
    """Real uid of a process (a process cannot change it without privilege, unlike /proc/PID's owner)."""
    f = _proc_field(pid, b"Uid")
    return int(f[0]) if f else None


def proc_ppid(pid: str) -> str | None:
    f = _proc_field(pid, b"PPid")
    return f[0].decode() if f else None


def uid_processes(uid: int) -> list[str]:
    """Processes with `uid` as any of their real, effective, saved or filesystem uids."""
    return [p for p in os.listdir("/proc") if p.isdigit() and str(uid).encode() in (_proc_field(p, b"Uid") or [])]


def owned_entries(uid: int, roots=CLEAN_ROOTS, depth: int = 2) -> list[str]:
    """Entries owned by `uid` in the world-writable temp places, looking inside other world-writable
    directories `depth` levels down (where a program can create files)."""
    found = []
    for root in roots:
        try:
            entries = list(os.scandir(root))
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_uid == uid:
                found.append(e.path)
            elif depth > 1 and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH:
                found += owned_entries(uid, (e.path,), depth - 1)
    return found


def remove_tree(paths: list[str]) -> None:
    """`rm -rf` (iterative, never follows symlinks, stays on one file system) of paths whose writers are all
    dead: a 3,000-deep directory costs no recursion here. Raises OSError with rm's message on failure."""
    if paths:
        out = subprocess.run(["rm", "-rf", "--one-file-system", "--", *paths], capture_output=True, timeout=60)
        if out.returncode:
            raise OSError(f"rm -rf: {out.stderr.decode(errors='replace')[-300:]}")
