"""Hostile programs for the sandbox's attack classes 1-11 (docs/sandbox.md) and its "what held" list, written for this repository
(the issue's own attack programs were kept out of it, so these close classes, not particular programs).

`cases(ctx)` gives single-program cases for the battery in tests/test_sandbox.py (same Case type as
programs.py). Attacks that need two programs, two workers or a timing are programs here too (the constants
below), driven by their own tests in tests/test_sandbox.py and tests/test_reward.py.
"""
from programs import F1, F1_THEN_OK, Case, call

LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
BURN = "import time\ndef burn(s):\n    t = time.process_time()\n    while time.process_time() - t < s:\n        pass\n"

# ---- class 2: state a program leaves for the next one (another sample of the task, or its own timing runs).
# STORE leaves a mark in every place a later program could look; FIND returns the bitmask of marks it finds.
_KEYS = ("import platform\nSYS = {'x86_64': (248, 249), 'aarch64': (217, 218)}.get(platform.machine())\n"
         "KEY = 0x6e726c66\n")   # add_key / request_key syscall numbers; the SysV key
STORE = LIBC + _KEYS + (
    "def f():\n"
    "    for d in ('/tmp', '/var/tmp', '/dev/shm', os.path.expanduser('~')):\n"
    "        try:\n            open(d + '/nanorlef-cache', 'w').write('42')\n        except OSError:\n            pass\n"
    "    libc.shmget(KEY, 4096, 0o1666)\n    libc.msgget(KEY, 0o1666)\n"
    "    libc.mq_open(b'/nanorlef-cache', os.O_CREAT | os.O_RDWR, 0o666, None)\n"
    "    if SYS:\n        for ring in (-3, -4, -5):   # session, user, user-session keyrings\n"
    "            libc.syscall(SYS[0], b'user', b'nanorlef-cache', b'42', 2, ring)\n"
    "    return 1\n")
FIND = LIBC + _KEYS + (
    "def f():\n    found = 0\n"
    "    for i, d in enumerate(('/tmp', '/var/tmp', '/dev/shm', os.path.expanduser('~'))):\n"
    "        found |= os.path.exists(d + '/nanorlef-cache') << i\n"
    "    found |= (libc.shmget(KEY, 0, 0) >= 0) << 4\n    found |= (libc.msgget(KEY, 0) >= 0) << 5\n"
    "    found |= (libc.mq_open(b'/nanorlef-cache', os.O_RDWR) >= 0) << 6\n"
    "    if SYS:\n        found |= (libc.syscall(SYS[1], b'user', b'nanorlef-cache', None, 0) >= 0) << 7\n"
    "    return found\n")

# ---- class 5: forged results the parent must decode on a budget. Each writes its own result line and exits.
_FORGE = "import os\ndef f():\n    os.write(4, b'R [\"ok\",' + {value} + b',\"\"]\\n')\n    os._exit(0)\n"
COLLIDING_SET = _FORGE.format(value="b'[\"set\",[' + b','.join(b'[\"int\",\"%d\"]' % (i * (2**61 - 1)) "
                                    "for i in range(40000)) + b']]'")
COLLIDING_DICT = _FORGE.format(value="b'[\"dict\",[' + b','.join(b'[[\"int\",\"%d\"],[\"int\",\"1\"]]' "
                                     "% (i * (2**61 - 1)) for i in range(40000)) + b']]'")
NESTED_990 = _FORGE.format(value="b'[\"list\",[' * 990 + b'[\"int\",\"1\"]' + b']]' * 990")
BIG_RESULTS = "def f(i):\n    return 'x' * 1_000_000\n"   # 1 MB per test: 20 tests are past the reply cap

# ---- class 8: the previous program's results, looked for in this interpreter's memory
REMEMBER = "def f():\n    return 'nanorlef-' + 'previous-result'\n"
RECALL = ("import gc, sys\ndef f():\n    mark = 'nanorlef-' + 'previous-result'\n    seen = 0\n"
          "    for o in gc.get_objects():\n        if isinstance(o, (list, dict, tuple)) and mark in repr(o)[:100000]:\n"
          "            seen += 1\n    frame = sys._getframe()\n    while frame.f_back is not None:\n"
          "        frame = frame.f_back\n        seen += mark in repr(frame.f_locals)\n    return seen\n")

# ---- classes 9 and 10, and "another worker's memory": programs run beside an honest one on another worker
SPINNERS = ("import os\ndef f():\n    for _ in range(60):\n        if os.fork() == 0:\n            os.setsid()\n"
            "            while True:\n                pass\n    while True:\n        pass\n")
SQUAT = (LIBC + "import time\ndef f():\n    os.mkdir('/tmp/nanorlef-fixed', 0)\n"
         "    libc.shmget(0x6e726c67, 1 << 20, 0o1600)\n    time.sleep(3)\n    return 1\n")
HONEST_TMP = (LIBC + BURN + "def f():\n    with open('/tmp/nanorlef-fixed', 'w') as fh:\n        fh.write('ok')\n"
              "    burn(0.3)\n    others = [p for p in os.listdir('/proc') if p.isdigit() and p not in ('1', '2')]\n"
              "    return (open('/tmp/nanorlef-fixed').read(), libc.shmget(0x6e726c67, 0, 0) >= 0, others)\n")


def cases(ctx: dict) -> list[Case]:
    repo, unix_path, abstract = ctx["repo"], ctx["unix_path"], ctx["abstract"]
    return [
        # ---- class 1: CPU in children. The group's CPU deadline sees children nobody waits for...
        Case("cpu_in_unwaited_children", BURN + "import os, signal\nsignal.signal(signal.SIGCHLD, signal.SIG_IGN)\n"
             "def f():\n    for _ in range(2):\n        if os.fork() == 0:\n            burn(0.6)\n"
             "            os._exit(0)\n    time.sleep(8)\n    return 1\n", F1_THEN_OK, ("timeout", "pass"),
             limits={"timeout_s": 0.5, "wall_factor": 30}, needs_cgroups=True),
        # ...and children that are waited for: 2 x 0.4 s is past a 0.5 s limit.
        Case("cpu_in_waited_children", BURN + "import os\ndef f():\n    kids = []\n    for _ in range(2):\n"
             "        pid = os.fork()\n        if pid == 0:\n            burn(0.4)\n            os._exit(0)\n"
             "        kids.append(pid)\n    for k in kids:\n        os.waitpid(k, 0)\n    return 1\n",
             F1_THEN_OK, ("timeout", "pass"), limits={"timeout_s": 0.5, "wall_factor": 4}, needs_cgroups=True),
        # ---- class 3: memory and disk outside the limits
        Case("dev_shm_over_memory", "def f():\n    with open('/dev/shm/big', 'wb') as fh:\n"
             "        for _ in range(96):\n            fh.write(b'x' * (4 << 20))\n    return 1\n", F1_THEN_OK,
             (("out_of_memory", "runtime_error"), "pass"), limits={"memory_mb": 256, "disk_mb": 1024, "max_file_mb": 1024},
             needs_cgroups=True),
        # RLIMIT_AS stops one big attach; three 128 MB segments, each touched and detached, are past it.
        Case("sysv_over_memory", LIBC + "def f():\n    libc.shmat.restype = ctypes.c_void_p\n"
             "    for _ in range(3):\n        addr = libc.shmat(libc.shmget(0, 128 << 20, 0o1600), None, 0)\n"
             "        if addr in (None, 2**64 - 1):\n            raise OSError(ctypes.get_errno(), 'shmat')\n"
             "        ctypes.memset(addr, 1, 128 << 20)\n        libc.shmdt(ctypes.c_void_p(addr))\n    return 1\n",
             F1_THEN_OK, ("out_of_memory", "pass"), limits={"memory_mb": 256}, needs_cgroups=True),
        Case("files_over_quota", "def f():\n    n = 0\n    try:\n        for i in range(40):\n"
             "            with open(f'file{i}', 'wb') as fh:\n                fh.write(b'x' * (1 << 20))\n"
             "            n += 1\n    except OSError:\n        pass\n    return n\n", [call("f() <= 4", "True")],
             ("pass",), limits={"max_file_mb": 1, "disk_mb": 4}, needs_cgroups=True),
        # ---- class 4: a 3,000-deep tree in the home and in /tmp; the worker must survive its cleanup
        Case("deep_tree", "import os\ndef f():\n    for top in (os.path.expanduser('~'), '/tmp'):\n"
             "        os.chdir(top)\n        for _ in range(3000):\n            os.mkdir('d')\n"
             "            os.chdir('d')\n    return 1\n", F1_THEN_OK, ("pass", "pass"),
             limits={"timeout_s": 5.0}, needs_root=True),
        # ---- class 6: expected outputs on disk outside the repository
        Case("read_site_packages", "import os\ndef f():\n"
             f"    for p in {ctx['hidden_files']!r}:\n        try:\n            open(p, 'rb').read(1)\n"
             "            return 0\n        except OSError:\n            pass\n"
             f"    return int(not any(os.path.isdir(d) and os.listdir(d) for d in {ctx['site_dirs']!r}))\n",
             F1, ("pass",), needs_root=True),
        Case("host_command_lines", f"import os\ndef f():\n    for p in os.listdir('/proc'):\n        try:\n"
             f"            if b'pytest' in open(f'/proc/{{p}}/cmdline', 'rb').read() or p == '{ctx['parent_pid']}':\n"
             "                return 0\n        except OSError:\n            pass\n    return 1\n", F1, ("pass",),
             needs_bwrap=True),
        # ---- class 7 and "what held": unix sockets of the host, by path and abstract
        Case("host_unix_sockets", "import socket\ndef f():\n"
             f"    for address in ({unix_path!r}, {abstract!r}):\n        s = socket.socket(socket.AF_UNIX)\n"
             "        try:\n            s.connect(address)\n            return 0\n        except OSError:\n"
             "            pass\n    return 1\n", F1, ("pass",), needs_root=True),
        # ---- "what held"
        Case("unhide_repo_from_user_namespace", LIBC + "def f():\n    libc.unshare(0x10000000 | 0x20000)\n"
             f"    libc.umount2({repo!r}.encode(), 2)\n    return int(not os.path.exists({repo + '/sandbox.py'!r}))\n",
             F1, ("pass",), needs_root=True),
        Case("hardlink_to_root_file", "import os\ndef f():\n    for target in ('/etc/passwd', '/usr/bin/env'):\n"
             "        try:\n            os.link(target, os.path.expanduser('~/x'))\n"
             "            open(os.path.expanduser('~/x'), 'a').write('pwned')\n            return 0\n"
             "        except OSError:\n            pass\n    return 1\n", F1, ("pass",), needs_root=True),
        Case("symlinks_to_root_files", "import os\ndef f():\n"
             f"    for i, t in enumerate(({repo + '/sandbox.py'!r}, {repo + '/data.py'!r}, {repo!r}, '/etc')):\n"
             "        for d in ('/tmp', '/dev/shm', os.path.expanduser('~')):\n"
             "            os.symlink(t, f'{d}/link{i}')\n    return 1\n", F1, ("pass",), needs_root=True),
        Case("daemon_as_pid1_of_new_pid_namespace", LIBC + "import time\ndef f():\n"
             "    libc.unshare(0x10000000)\n    libc.unshare(0x20000000)\n    if os.fork() == 0:\n"
             "        os.setsid()\n        time.sleep(60)\n        os._exit(0)\n    return 1\n", F1, ("pass",),
             needs_root=True),
        Case("raise_priority", "import os\ndef f():\n    try:\n        os.nice(-5)\n        return 0\n"
             "    except OSError:\n        return 1\n", F1, ("pass",), needs_root=True),
    ]
