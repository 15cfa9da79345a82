"""Hostile programs for the fifth round: the page cache that /usr shares with every run, written for this
repository. Driven by tests/test_sandbox.py.
"""

# ---- probing and evicting cached pages of a shared file: a signal to a later run of the same program, or
# cold files for the reference it is timed against. Each attempt reports its errno name ("ok" if allowed).
PAGE_CACHE = '''import ctypes, errno, mmap, os, platform
libc = ctypes.CDLL(None, use_errno=True)
IO_SETUP = 206 if platform.machine() == "x86_64" else 0

def attempt(call):
    try:
        r = call()
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    if isinstance(r, int) and r < 0:
        return errno.errorcode.get(ctypes.get_errno(), "?")
    return "ok"

def f():
    fd = os.open(os.__file__, os.O_RDONLY)
    page = mmap.mmap(fd, 4096, prot=mmap.PROT_READ)
    buf, vec = bytearray(4096), ctypes.create_string_buffer(1)
    start = ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(mmap.mmap(-1, 4096))))
    return sorted({
        "fadvise_dontneed": attempt(lambda: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)),
        "readahead": attempt(lambda: libc.readahead(fd, ctypes.c_long(0), ctypes.c_size_t(4096))),
        "mincore": attempt(lambda: libc.mincore(start, ctypes.c_size_t(4096), vec)),
        "preadv2_nowait": attempt(lambda: os.preadv(fd, [buf], 0, os.RWF_NOWAIT)),
        "madvise_cold": attempt(lambda: page.madvise(20)),
        "madvise_pageout": attempt(lambda: page.madvise(21)),
        "io_uring_setup": attempt(lambda: libc.syscall(425, 8, ctypes.create_string_buffer(120))),
        "io_setup": attempt(lambda: libc.syscall(IO_SETUP, 8, ctypes.byref(ctypes.c_ulong(0)))),
        "cachestat": attempt(lambda: libc.syscall(451, fd, ctypes.create_string_buffer(16),
                                                  ctypes.create_string_buffer(40), 0)),
        "plain_preadv": attempt(lambda: os.preadv(fd, [buf], 0)),
        "madvise_willneed": attempt(lambda: page.madvise(mmap.MADV_WILLNEED)),
    }.items())
'''
DENIED = ("fadvise_dontneed", "readahead", "mincore", "preadv2_nowait", "madvise_cold", "madvise_pageout",
          "io_uring_setup", "io_setup", "cachestat")
PAGE_CACHE_EXPECTED = sorted({**dict.fromkeys(DENIED, "EPERM"), "plain_preadv": "ok",
                              "madvise_willneed": "ok"}.items())

# ---- reading which pages of a file are cached without the denied calls: map 16 pages of a rarely used
# stdlib module, fault the first (the kernel maps its cached neighbours too) and read the present bits from
# /proc/self/pagemap. In a private tmpfs copy every page is always in memory, so there is no bit to read.
PAGEMAP = '''import glob, mmap, os, struct
def f():
    path = sorted(glob.glob(os.path.dirname(os.__file__) + "/lib-dynload/_codecs_jp*.so"))[0]
    fd = os.open(path, os.O_RDONLY)
    pages = min(16, os.fstat(fd).st_size // 4096)
    m = mmap.mmap(fd, pages * 4096, prot=mmap.PROT_READ)
    m.madvise(mmap.MADV_RANDOM)
    m[0]
    with open("/proc/self/maps") as maps:
        line = next(l for l in maps if l.rstrip().endswith(path))
    base = int(line.split("-")[0], 16)
    with open("/proc/self/pagemap", "rb") as pm:
        pm.seek(base // 4096 * 8)
        words = struct.unpack(f"<{pages}Q", pm.read(8 * pages))
    return [w >> 63 for w in words]
'''


# ---- memory: allocates `mb` megabytes and returns 1 (the limits of each job apply, not those a spare child
# was started with).
ALLOCATE = "def f(mb):\n    block = bytearray(mb << 20)\n    return 1\n"

# ---- objects a program shares with later runs on the host: the device nodes' times (utimensat needs only
# write access to /dev/null), and the uid's keys (its persistent keyring outlives runs in the fallback).
SHARED_STATE = '''import ctypes, errno, os, platform
libc = ctypes.CDLL(None, use_errno=True)
ADD_KEY, KEYCTL = (248, 250) if platform.machine() == "x86_64" else (217, 219)
def f():
    out = {}
    for name in ("null", "zero", "urandom"):
        try:
            os.utime(f"/dev/{name}", (0, 0))
            out[name] = "ok"
        except OSError as e:
            out[name] = errno.errorcode[e.errno]
    with open("/dev/null", "w") as sink:   # the devices still work
        out["write_null"] = sink.write("x")
    for call, args in (("add_key", (ADD_KEY, b"user", b"memo", b"42", 2, -4)), ("keyctl", (KEYCTL, 0x15, -1))):
        out[call] = "ok" if libc.syscall(*args) >= 0 else errno.errorcode[ctypes.get_errno()]
    return sorted(out.items())
'''
SHARED_STATE_EXPECTED = sorted({"null": "EPERM", "zero": "EPERM", "urandom": "EPERM", "write_null": 1,
                                "add_key": "EPERM", "keyctl": "EPERM"}.items())

# ---- host-wide counters: /proc/vmstat moves by one per page a program mlocks, and other global /proc files
# (stat, meminfo, pressure, ...) move with what any run does; chown(-1, -1) sets a device node's ctime;
# MADV_HUGEPAGE / MADV_COLLAPSE turn pages of the shared interpreter copy into huge pages that outlive the run.
GLOBAL_COUNTERS = '''import ctypes, errno, mmap, os, platform
libc = ctypes.CDLL(None, use_errno=True)
MLOCK = 149 if platform.machine() == "x86_64" else 228
def f():
    out = {name: open(f"/proc/{name}").read() for name in ("vmstat", "stat", "meminfo") if os.path.exists(f"/proc/{name}")}
    out["sys"] = sorted(os.listdir("/proc/sys")) if os.path.isdir("/proc/sys") else []
    page = mmap.mmap(-1, 1 << 21)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    out["mlock"] = "ok" if libc.syscall(MLOCK, ctypes.c_void_p(address), ctypes.c_size_t(4096)) == 0 else \\
        errno.errorcode[ctypes.get_errno()]
    for advice, name in ((14, "hugepage"), (25, "collapse")):
        try:
            page.madvise(advice)
            out[name] = "ok"
        except OSError as e:
            out[name] = errno.errorcode[e.errno]
    try:
        os.chown("/dev/zero", -1, -1)
        out["chown"] = "ok"
    except OSError as e:
        out["chown"] = errno.errorcode[e.errno]
    return sorted(out.items())
'''
