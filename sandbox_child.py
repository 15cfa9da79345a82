"""The child harness of the sandbox: the code that runs inside each sandboxed `python -I -S`.

sandbox_supervisor.py compiles this whole file with the child's own interpreter and sends the code object
(marshal) to each child, which defines `_child_main` and calls it. It runs unprivileged and imports only
builtin modules: every import here is paid by every program (`json` alone would cost ~10 ms), so results are
written as JSON by hand. Kept apart from the supervisor because it runs in another process, as another uid,
beside untrusted code.
"""


def _child_main(job):
    """job = (program, setup_code, [(kind, call_or_code, stdin)], first test index, output cap in bytes,
    nesting cap, element cap): the caps are the supervisor's and the parent's
    (sandbox_supervisor.MAX_DEPTH)."""
    import builtins
    import io
    import os
    import sys
    from _json import encode_basestring_ascii as quote

    # Bind what the harness uses now: the program may patch builtins, os, sys or json afterwards.
    write, read, exit_now, exc_info = os.write, os.read, os._exit, sys.exc_info
    type_, str_, len_, compile_, exec_, eval_ = type, str, len, compile, exec, eval
    int_repr, float_repr, complex_repr, bytes_hex = int.__repr__, float.__repr__, complex.__repr__, bytes.hex
    dict_items, issubclass_ = dict.items, issubclass
    # These compare equal to a plain dict in `assert f(x) == {...}`; they are encoded from their raw dict
    # storage (dict.items, no method of theirs runs), so even an impostor class with these names gains
    # nothing.
    dict_likes = {("collections", "Counter"), ("collections", "defaultdict"), ("collections", "OrderedDict")}
    TextIOWrapper, BytesIO, RawIOBase = io.TextIOWrapper, io.BytesIO, io.RawIOBase

    program, setup, tests, first, out_cap, max_depth, max_elements = job

    def send(text):
        data = text.encode()
        while data:
            data = data[write(4, data):]

    def wait_ack():  # blocks until the supervisor has sampled our CPU clock
        if read(5, 1) != b"k":
            exit_now(70)

    class OutputLimit(BaseException):
        pass

    class TooLarge(Exception):
        pass

    class Sink(RawIOBase):  # capped byte sink behind sys.stdout / sys.stderr
        def __init__(self):
            self.parts, self.size, self.over = [], 0, False

        def writable(self):
            return True

        def write(self, b):
            if self.size + len_(b) > out_cap:
                self.over = True
                raise OutputLimit(f"more than {out_cap} bytes of output")
            self.parts.append(bytes(b))
            self.size += len_(b)
            return len_(b)

    sources = {"<program>": program, "<setup>": setup}

    def describe(e, tb):  # "Traceback ...\nName: message", last 3 frames in our sources, no imports
        try:
            lines = []
            while tb is not None:
                code = tb.tb_frame.f_code
                if code.co_filename in sources:
                    src = sources[code.co_filename].splitlines()
                    text = src[tb.tb_lineno - 1].strip() if 0 < tb.tb_lineno <= len_(src) else ""
                    where = f'  File "{code.co_filename}", line {tb.tb_lineno}, in {code.co_name}'
                    lines.append(f"{where}\n    {text}")
                tb = tb.tb_next
            if type_(e) is SyntaxError or type_(e) is IndentationError:
                lines.append(f'  File "{e.filename}", line {e.lineno}\n    {(e.text or "").strip()}')
            try:
                msg = str_(e)[:300].encode("utf-8", "replace").decode("utf-8")   # lone surrogates -> '?' 
            except BaseException:
                msg = "<unprintable>"
            head = "Traceback (most recent call last):\n" + "\n".join(lines[-3:]) + "\n" if lines else ""
            return f"{head}{type_(e).__name__}: {msg}"
        except BaseException:
            return "exception (could not be described)"

    budget = [0]

    def canon(x, depth):  # value -> tagged JSON text, by exact type only (no method of x is called)
        budget[0] += 1
        if budget[0] > max_elements or depth > max_depth:
            return '["unsupported","too deep or too many elements"]'
        t = type_(x)
        if t is int:
            if x.bit_length() > 13_000:  # ~4000 digits: also the int<->str limit of Python 3.11
                return '["unsupported","int with more than 4000 digits"]'
            return '["int","' + int_repr(x) + '"]'
        if t is str:
            if len_(x) > out_cap:
                raise TooLarge
            return '["str",' + quote(x) + "]"
        if x is None:
            return '["none"]'
        if x is True or x is False:
            return '["bool",' + ("1" if x else "0") + "]"
        if t is float:
            return '["float","' + float_repr(x) + '"]'
        if t is list or t is tuple or t is set or t is frozenset:
            return '["' + t.__name__ + '",[' + ",".join([canon(v, depth + 1) for v in x]) + "]]"
        if t is dict or (issubclass_(t, dict) and (t.__module__, t.__qualname__) in dict_likes):
            return '["dict",[' + ",".join(["[" + canon(k, depth + 1) + "," + canon(v, depth + 1) + "]"
                                           for k, v in dict_items(x)]) + "]]"
        if t is bytes:
            if len_(x) > out_cap:
                raise TooLarge
            return '["bytes","' + bytes_hex(x) + '"]'
        if t is complex:
            return '["complex","' + complex_repr(x) + '"]'
        return '["unsupported","exact type is not a builtin value type"]'

    def report(status, value, detail):
        send("R [" + quote(status) + "," + value + "," + quote(detail[:2000]) + "]\n")
        wait_ack()

    def run_one(kind, src, stdin, namespace):
        """Returns (status, value_json, detail). Every line of program code runs inside this call."""
        out, err = Sink(), Sink()
        sys.stdout = TextIOWrapper(out, encoding="utf-8", errors="replace", write_through=True)
        sys.stderr = TextIOWrapper(err, encoding="utf-8", errors="replace", write_through=True)
        sys.stdin = TextIOWrapper(BytesIO(stdin.encode("utf-8", "replace")), encoding="utf-8")
        sources["<test>"] = src
        try:
            if kind == "load":  # the program's definitions, then the task's setup_code
                exec_(compile_(program, "<program>", "exec"), namespace)
                if setup:
                    exec_(compile_(setup, "<setup>", "exec"), namespace)
                value = "null"
            elif kind == "stdio":  # the whole program as __main__, per test, with this test's stdin
                try:
                    exec_(compile_(program, "<program>", "exec"),
                          {"__name__": "__main__", "__builtins__": builtins})
                except SystemExit as e:  # sys.exit() / sys.exit(0) end a stdio program normally
                    if e.code is not None and e.code != 0:
                        raise
                sys.stdout.flush()
                value = '["str",' + quote(b"".join(out.parts).decode("utf-8", "replace")) + "]"
            elif kind == "call":
                value = canon(eval_(compile_(src, "<test>", "eval"), namespace), 0)
            else:
                exec_(compile_(src, "<test>", "exec"), namespace)
                value = "null"
            if len_(value) > out_cap * 2:
                raise TooLarge
        except TooLarge:
            return "output_limit", "null", f"the result is larger than {out_cap} bytes"
        except BaseException as e:  # SystemExit, KeyboardInterrupt and their subclasses fail the test too
            if out.over or err.over:
                return "output_limit", "null", f"more than {out_cap} bytes of output"
            status = "oom" if type_(e) is MemoryError else "error"
            if type_(e) is OSError and e.errno == 27:  # EFBIG: RLIMIT_FSIZE (Python ignores SIGXFSZ)
                status = "output_limit"
            return status, "null", describe(e, exc_info()[2])
        if out.over or err.over:
            return "output_limit", "null", f"more than {out_cap} bytes of output"
        return "ok", value, ""

    namespace = {"__name__": "solution", "__builtins__": builtins}
    load_error = None
    if any(kind != "stdio" for kind, _, _ in tests[first:]):
        send("L\n")
        wait_ack()
        load_error = run_one("load", "", "", namespace)
        if load_error[0] == "ok":
            load_error = None
    for i in range(first, len_(tests)):
        kind, src, stdin = tests[i]
        send("S\n")
        wait_ack()
        if load_error is not None and kind != "stdio":
            report(*load_error)
        else:
            report(*run_one(kind, src, stdin, namespace))
    exit_now(0)  # skips atexit handlers, __del__ and buffered writes the program may have planted
