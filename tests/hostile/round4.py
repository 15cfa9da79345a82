"""Hostile programs for the fourth round of attacks on the sandbox (a second security review), written for
this repository (the reviewer's reproducers stay out of it). Each is driven by its own test in
tests/test_sandbox.py.
"""

# ---- a comparison that raises in the parent: `abs(got - expected)` of a huge int and a float overflows.
HUGE_INT = "def f():\n    return 10 ** 400\n"
# complex is a number `abs(f(x) - e) < t` accepts, as the original assert would.
NEAR_COMPLEX = "def f():\n    return 1.5 + 1e-9j\n"

# ---- a result small where it is counted but larger on the wire: each '"' is escaped once by the child's
# encoder and again in the supervisor's reply line (4 bytes per character sent).
QUOTES = "def f():\n    return '\"' * 1_000_000\n"

# ---- outlasting the run's wall-clock budget: sleep (no CPU) just under the wall watchdog while loading, and
# past it in every test, so every test costs a fresh child a full load deadline and a full test deadline.
SLOW_LOAD_THEN_SLEEP = "import time\ntime.sleep({load_s})\ndef f():\n    time.sleep(100)\n"

# ---- a run still going when the parent kills its supervisor: its cgroups must not stay behind.
SLEEPER = "import time\ndef f():\n    time.sleep(100)\n"
