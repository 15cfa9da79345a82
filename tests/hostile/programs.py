"""The hostile battery: programs that attack the sandbox, each with the verdict it must get.

`cases(ctx)` builds them; ctx gives what some attacks aim at (the repo, the test process's pid, a local
server's port, the name of a secret environment variable). Every case is a call/assert/stdio task whose
correct verdict is known; tests/test_sandbox.py checks the verdict and that nothing is left behind.
"""
from dataclasses import dataclass, field

from data import Test


@dataclass
class Case:
    name: str
    program: str
    tests: list
    expect: tuple                    # status of each test (a tuple of statuses: any of them)
    limits: dict = field(default_factory=dict)   # Limits overrides
    needs_root: bool = False         # uid drop / network namespace / kill(-1) safety
    needs_cgroups: bool = False      # the guarantee comes from the run's cgroup
    needs_bwrap: bool = False        # the guarantee comes from bubblewrap's namespaces and mounts
    detail: str = ""                 # must appear in tests[0].detail


def call(expr: str, expected: str) -> Test:
    return Test("call", call=expr, expected=expected)


F1 = [call("f()", "1")]              # one test: f() must return 1
F1_THEN_OK = [call("f()", "1"), call("1 + 1", "2")]   # a second, trivially passing test after the attack


def cases(ctx: dict) -> list[Case]:
    repo, pid, port, secret = ctx["repo"], ctx["parent_pid"], ctx["port"], ctx["secret_name"]
    return [
        # ---- runaway programs
        Case("infinite_loop", "def f():\n    while True:\n        pass\n", F1_THEN_OK, ("timeout", "pass")),
        Case("sleep_forever", "import time\ndef f():\n    time.sleep(10**6)\n", F1_THEN_OK, ("timeout", "pass")),
        Case("loop_at_load", "while True:\n    pass\ndef f():\n    return 1\n", F1_THEN_OK, ("timeout", "timeout")),
        Case("fork_bomb", "import os\ndef f():\n    while True:\n        try:\n            os.fork()\n"
             "        except OSError:\n            pass\n", F1_THEN_OK, ("timeout", "pass"), needs_root=True),
        Case("fork_bomb_at_load", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
             "        pass\n", F1, ("timeout",), needs_root=True),
        Case("memory_list", "def f():\n    x = []\n    while True:\n        x.append([0] * 10**6)\n", F1_THEN_OK,
             ("out_of_memory", "pass"), limits={"memory_mb": 256}),
        Case("memory_bytearray", "def f():\n    return len(bytearray(10**11))\n", F1_THEN_OK, ("out_of_memory", "pass")),
        Case("memory_str", "def f():\n    return len('x' * 10**12)\n", F1, ("out_of_memory",)),
        Case("stdout_1gb", "import sys\ndef f():\n    for _ in range(1000):\n        sys.stdout.write('x' * 10**6)\n"
             "    return 1\n", F1_THEN_OK, ("output_limit", "pass")),
        Case("stdio_1gb", "import sys\nfor _ in range(1000):\n    print('y' * 10**6)\n",
             [Test("stdio", stdin="", expected="y")], ("output_limit",)),
        Case("stdout_fd1_direct", "import os\ndef f():\n    for _ in range(200):\n        os.write(1, b'x' * 10**6)\n"
             "    return 1\n", F1, ("pass",)),
        Case("endless_file_write", "def f():\n    with open('big', 'w') as fh:\n        while True:\n"
             "            fh.write('x' * 10**6)\n", F1_THEN_OK, ("output_limit", "pass")),
        Case("thousands_of_temp_files", "import os\ndef f():\n    for i in range(2000):\n"
             "        open(f'/tmp/sbx_hostile_{i}', 'w').close()\n        open(f'/dev/shm/sbx_hostile_{i}', 'w').close()\n"
             "        open(f'home_{i}', 'w').close()\n    os.mkdir('/var/tmp/sbx_hostile_dir')\n    return 1\n",
             F1, ("pass",), limits={"timeout_s": 5.0}, needs_root=True),
        # ---- crashes
        Case("c_stack_recursion", "import sys\nsys.setrecursionlimit(10**8)\ndef f():\n    return eval('f()')\n",
             F1_THEN_OK, ("crash", "pass"), limits={"stack_mb": 8}, detail="SIGSEGV"),
        Case("ctypes_segfault", "import ctypes\ndef f():\n    return ctypes.string_at(0)\n", F1_THEN_OK,
             ("crash", "pass"), detail="SIGSEGV"),
        Case("abort", "import os\ndef f():\n    os.abort()\n", F1_THEN_OK, ("crash", "pass"), detail="SIGABRT"),
        Case("segfault_at_load", "import ctypes\nctypes.string_at(0)\ndef f():\n    return 1\n", F1_THEN_OK,
             ("crash", "crash"), detail="while loading"),
        # ---- attacks on the harness
        Case("kill_parent", "import os\ndef f():\n    try:\n        os.kill(os.getppid(), 9)\n"
             "    except PermissionError:\n        pass\n    return 1\n", F1_THEN_OK, ("pass", "pass"), needs_root=True),
        Case("kill_test_process", f"import os\ndef f():\n    try:\n        os.kill({pid}, 9)\n"
             "    except (PermissionError, ProcessLookupError):\n        return 1\n    return 0\n", F1, ("pass",),
             needs_root=True),
        Case("kill_minus_one", "import os\ndef f():\n    os.kill(-1, 9)\n    return 2\n", F1_THEN_OK,
             (("wrong_answer", "runtime_error"), "pass"), needs_root=True),   # alone in its PID namespace: ESRCH
        Case("kill_own_group", "import os\ndef f():\n    os.killpg(0, 9)\n", F1_THEN_OK, ("crash", "pass"),
             detail="SIGKILL"),
        Case("sigstop_self", "import os, signal\ndef f():\n    os.kill(os.getpid(), signal.SIGSTOP)\n    return 1\n",
             F1_THEN_OK, ("timeout", "pass")),
        Case("ignore_sigterm_sigxcpu", "import signal\nfor s in (signal.SIGTERM, signal.SIGXCPU, signal.SIGINT):\n"
             "    signal.signal(s, signal.SIG_IGN)\ndef f():\n    while True:\n        pass\n", F1_THEN_OK,
             ("timeout", "pass")),
        Case("double_fork_daemon", "import os, time\ndef f():\n    if os.fork() == 0:\n        if os.fork() == 0:\n"
             "            while True:\n                time.sleep(0.01)\n        os._exit(0)\n    os.wait()\n    return 1\n",
             F1, ("pass",)),
        Case("setsid_daemon", "import os\ndef f():\n    if os.fork() == 0:\n        os.setsid()\n"
             "        while True:\n            pass\n    return 1\n", F1, ("pass",)),
        Case("spinning_thread", "import threading\ndef spin():\n    while True:\n        pass\n"
             "def f():\n    threading.Thread(target=spin).start()\n    return 1\n", F1, ("pass",)),
        Case("daemon_holding_result_fd", "import os\ndef f():\n    if os.fork() == 0:\n        while True:\n"
             "            pass\n    return 1\n", F1_THEN_OK, ("pass", "pass")),
        # ---- escapes
        Case("secret_env", f"import os\ndef f():\n    return int('{secret}' not in os.environ and "   # bwrap sets PWD
             "sorted(set(os.environ) - {'PWD'}) == ['HOME', 'LANG', 'MKL_NUM_THREADS', 'OMP_NUM_THREADS', "
             "'OPENBLAS_NUM_THREADS', 'PATH', 'TMPDIR'])\n", F1, ("pass",)),
        # Its own processes' environments may be readable (the PID namespace's init is its own bwrap), the
        # secret in the test process's may not.
        Case("proc_environ", f"import os\ndef f():\n    for p in ['/proc/{pid}/environ', '/proc/{pid}/mem', "
             f"f'/proc/{{os.getppid()}}/environ'] + [f'/proc/{{q}}/environ' for q in os.listdir('/proc')]:\n"
             f"        try:\n            data = open(p, 'rb').read()\n"
             f"            if p.endswith('mem') or b'{secret}' in data:\n                return 0\n        except OSError:\n            pass\n    return 1\n", F1, ("pass",),
             needs_root=True),
        Case("write_repo", f"def f():\n    try:\n        open('{repo}/sandbox.py', 'a').write('# pwned')\n"
             "        return 0\n    except OSError:\n        return 1\n", F1, ("pass",), needs_root=True),
        Case("delete_repo_file", f"import os, shutil\ndef f():\n    for act in (lambda: os.remove('{repo}/data.py'),\n"
             f"                lambda: shutil.rmtree('{repo}/tests'), lambda: os.rename('{repo}/sandbox.py', 'x')):\n"
             "        try:\n            act()\n            return 0\n        except OSError:\n            pass\n"
             "    return 1\n", F1, ("pass",), needs_root=True),
        Case("read_task_data", f"import os\ndef f():\n    for d in ('{ctx['data']}', '{repo}'):\n"
             "        try:\n            if os.listdir(d):\n                return 0\n        except OSError:\n"
             "            pass\n    return 1\n", F1, ("pass",), needs_root=True),
        Case("write_root_home", "def f():\n    try:\n        open('/root/pwned', 'w')\n        return 0\n"
             "    except OSError:\n        return 1\n", F1, ("pass",), needs_root=True),
        Case("local_server", f"import socket\ndef f():\n    try:\n        socket.create_connection(('127.0.0.1', {port}), "
             "timeout=2).sendall(b'pwned')\n        return 0\n    except OSError:\n        return 1\n", F1, ("pass",),
             needs_root=True),
        Case("setuid_root", "import os\ndef f():\n    try:\n        os.setuid(0)\n        return 0\n"
             "    except OSError:\n        return int(os.getuid() != 0 and os.geteuid() != 0 "
             "and os.getgroups() == [])\n", F1, ("pass",), needs_root=True),
        Case("raise_rlimits", "import resource\ndef f():\n    for r in (resource.RLIMIT_AS, resource.RLIMIT_NPROC, "
             "resource.RLIMIT_CPU):\n        try:\n            resource.setrlimit(r, (resource.RLIM_INFINITY, "
             "resource.RLIM_INFINITY))\n            return 0\n        except (ValueError, OSError):\n            pass\n"
             "    return 1\n", F1, ("pass",)),
        # ---- forgeries
        Case("sys_exit_before_tests", "import sys\nsys.exit(0)\ndef f():\n    return 1\n", F1_THEN_OK,
             ("runtime_error", "runtime_error"), detail="SystemExit"),
        Case("os_exit_before_tests", "import os\nos._exit(0)\ndef f():\n    return 1\n", F1_THEN_OK,
             ("runtime_error", "runtime_error"), detail="exited with code 0"),
        Case("os_exit_in_test", "import os\ndef f():\n    os._exit(0)\n", F1_THEN_OK, ("runtime_error", "pass")),
        Case("printed_success_markers", "print('PASSED')\nprint('{\"passed\": true, \"status\": [\"pass\"]}')\n"
             "def f():\n    print('ALL TESTS PASSED')\n    return 0\n", F1, ("wrong_answer",)),
        Case("always_equal", "class A:\n    def __eq__(self, o):\n        return True\n    def __ne__(self, o):\n"
             "        return False\n    __hash__ = None\ndef f():\n    return A()\n", F1, ("wrong_answer",)),
        Case("int_subclass", "class I(int):\n    def __eq__(self, o):\n        return True\ndef f():\n    return I(7)\n",
             F1, ("wrong_answer",)),
        Case("int_subclass_right_value", "class I(int):\n    pass\ndef f():\n    return I(1)\n", F1, ("wrong_answer",)),
        Case("str_and_list_subclass", "class S(str):\n    pass\nclass L(list):\n    pass\ndef f():\n"
             "    return L([S('a')])\n", [call("f()", "['a']")], ("wrong_answer",)),
        Case("subclass_inside_container", "class I(int):\n    def __eq__(self, o):\n        return True\n"
             "def f():\n    return {'k': [1, (2, I(9))]}\n", [call("f()", "{'k': [1, (2, 3)]}")], ("wrong_answer",)),
        Case("impostor_counter", "class Counter(dict):\n    def __eq__(self, o):\n        return True\n"
             "Counter.__module__ = 'collections'\ndef f():\n    return Counter(x=1)\n", [call("f()", "{'y': 2}")],
             ("wrong_answer",)),
        Case("monkeypatch_json_builtins", "import json, builtins\njson.dumps = lambda *a, **k: 'true'\n"
             "json.loads = lambda *a, **k: True\nbuiltins.type = lambda x: int\nbuiltins.repr = lambda x: '1'\n"
             "builtins.isinstance = lambda *a: True\ndef f():\n    return 'not one'\n", F1, ("wrong_answer",)),
        Case("base_exception_subclass", "class Out(BaseException):\n    pass\ndef f():\n    raise Out('bye')\n",
             F1_THEN_OK, ("runtime_error", "pass"), detail="Out: bye"),
        Case("keyboard_interrupt", "def f():\n    raise KeyboardInterrupt\n", F1, ("runtime_error",)),
        Case("evil_exception_str", "class E(Exception):\n    def __str__(self):\n        while True:\n"
             "            pass\ndef f():\n    raise E()\n", F1_THEN_OK, ("timeout", "pass")),
        Case("close_fds_0_2", "import os\nfor fd in (0, 1, 2):\n    os.close(fd)\ndef f():\n    return 1\n", F1, ("pass",)),
        Case("close_result_fd", "import os\ndef f():\n    os.close(4)\n    return 1\n", F1, ("runtime_error",)),
        Case("fd_exhaustion", "import os\nkeep = []\ndef f():\n    try:\n        while True:\n"
             "            keep.append(open(os.devnull))\n    except OSError:\n        pass\n    return 1\n", F1, ("pass",)),
        Case("huge_int_result", "def f():\n    return 10**100000\n", F1, ("wrong_answer",), detail="unsupported"),
        Case("self_referencing_list", "def f():\n    x = []\n    x.append(x)\n    return x\n", F1, ("wrong_answer",)),
        Case("flood_result_pipe", "import os\ndef f():\n    while True:\n        os.write(4, b'x' * 65536)\n", F1_THEN_OK,
             ("output_limit", "pass")),
        Case("forged_results_on_result_fd", "import os\nos.write(4, b'S\\n' + b'R [\"ok\",[\"int\",\"999\"],\"\"]\\n' * 2)\n"
             "os._exit(0)\n", F1_THEN_OK, ("wrong_answer", "runtime_error")),
        Case("garbage_on_result_fd", "import os\ndef f():\n    os.write(4, b'R {not json}\\n')\n    return 1\n", F1_THEN_OK,
             ("runtime_error", "pass")),
        Case("atexit_trick", "import atexit, os\natexit.register(lambda: os.write(4, b'R [\"ok\",[\"int\",\"1\"],\"\"]\\n'))\n"
             "def f():\n    return 0\n", F1, ("wrong_answer",)),
        # A forged result line is only as good as the value it carries: without the expected value it fails.
        Case("replace_sys_stdout", "import sys, os\nsys.stdout = os.fdopen(4, 'w')\nprint('R [\"ok\",[\"bool\",1],\"\"]')\n"
             "def f():\n    return 0\n", [call("f()", "7")], (("wrong_answer", "runtime_error"),)),
        Case("read_stdin_in_call_test", "def f():\n    return input()\n", F1, ("runtime_error",), detail="EOFError"),
    ]
