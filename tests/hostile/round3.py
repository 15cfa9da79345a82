"""Hostile programs for the third round of attacks on the sandbox (a security review of round 2's fixes), written
for this repository: the reviewer's own reproducers were kept out of it, so these close classes, not programs.
Each is driven by its own test in tests/test_sandbox.py.
"""

# ---- the parent's and supervisor's JSON checks: forged result lines that are slow to check or to parse.
# Each writes its own result line for the first test and exits; `n` is set by the test.
_FORGE = "import os\ndef f():\n    os.write(4, b'R ' + {line} + b'\\n')\n    os._exit(0)\n"
# A string that never ends, of escaped quotes and backslashes: a backtracking string pattern rescans it
# from every quote (quadratic).
UNTERMINATED_ESCAPES = _FORGE.format(line="b'[\"ok\",[\"str\",\"' + b'\\\\\\\\\\\\\"' * 500000")
# Legal JSON, shallow, but a million arrays: json.loads costs per array, in supervisor and parent alike.
MILLION_ARRAYS = _FORGE.format(line="b'[\"ok\",[\"list\",[' + b','.join([b'[[]]'] * 400000) + b']],\"\"]'")

# ---- state that outlives a run: an abstract unix socket whose only reference is in flight to itself
# (SCM_RIGHTS), so closing the program does not free its name. STORE binds a name; FIND lists such names.
SOCKET_STORE = (
    "import array, socket\n"
    "def f(word):\n"
    "    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
    "    s.bind(b'\\0r3-' + word.encode())\n"
    "    fds = array.array('i', [s.fileno()])\n"
    "    s.sendmsg([b'.'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], 0, s.getsockname())\n"
    "    s.detach()\n"
    "    return 1\n")
SOCKET_FIND = "def f():\n    return sorted(l.split()[-1] for l in open('/proc/net/unix') if 'r3-' in l)\n"

# ---- System V shared memory that outlives a run (fallback): a fixed key, created by one program and looked
# up by the next; the segment is never removed.
SHM = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nKEY = 0x72337368\n"
       "def store():\n    return int(libc.shmget(KEY, 1 << 20, 0o1600) >= 0)\n"
       "def find():\n    return int(libc.shmget(KEY, 0, 0) >= 0)\n")

# ---- files outside the allowlist: the program lists the root and tries paths that hold answers elsewhere.
LOOK_AROUND = (
    "import os\n"
    "def f(paths):\n"
    "    return sorted(os.listdir('/')), [p for p in paths if os.path.exists(p)]\n")

# ---- an exception message that is not UTF-8 encodable (a lone surrogate).
SURROGATE = "def f():\n    raise ValueError('\\udcff' + chr(0xd800) + ' broken')\n"

# ---- forging verdicts: find the harness's frame and report 'ok' for every remaining test, then exit.
FORGE_OK = (
    "import os, sys\n"
    "frame = sys._getframe()\n"
    "while frame is not None and 'first' not in frame.f_locals:\n"
    "    frame = frame.f_back\n"
    "for _ in range(frame.f_locals['first'], len(frame.f_locals['tests'])):\n"
    "    os.write(4, b'S\\n'); os.read(5, 1)\n"
    "    os.write(4, b'R [\"ok\",null,\"\"]\\n'); os.read(5, 1)\n"
    "os._exit(0)\n")
