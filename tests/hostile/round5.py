"""Hostile programs for the fifth round: the page cache that /usr shares with every run, written for this
repository. Driven by tests/test_sandbox.py.
"""

# ---- probing and evicting cached pages of a shared file: a signal to a later run of the same program, or
# cold files for the reference it is timed against. Each attempt reports its errno name ("ok" if allowed).
PAGE_CACHE = '''import ctypes, errno, mmap, os
libc = ctypes.CDLL(None, use_errno=True)

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
        "cachestat": attempt(lambda: libc.syscall(451, fd, ctypes.create_string_buffer(16),
                                                  ctypes.create_string_buffer(40), 0)),
        "plain_preadv": attempt(lambda: os.preadv(fd, [buf], 0)),
        "madvise_willneed": attempt(lambda: page.madvise(mmap.MADV_WILLNEED)),
    }.items())
'''
DENIED = ("fadvise_dontneed", "readahead", "mincore", "preadv2_nowait", "madvise_cold", "madvise_pageout",
          "io_uring_setup", "cachestat")
PAGE_CACHE_EXPECTED = sorted({**dict.fromkeys(DENIED, "EPERM"), "plain_preadv": "ok", "madvise_willneed": "ok"}.items())

# ---- memory: allocates `mb` megabytes and returns 1 (the limits of each job apply, not those a spare child
# was started with).
ALLOCATE = "def f(mb):\n    block = bytearray(mb << 20)\n    return 1\n"
