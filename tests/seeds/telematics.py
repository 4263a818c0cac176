"""Runs the Telematics SDK seed's Python client, ``create_websocket_connection(jwt_token,
instance_id)`` (extracted from the seed page at run time, re-indented, otherwise
unchanged), against fleetcast with ``websocket-client``, the way the seed's usage example
does: call it with a token and an instance id, run ``ws.run_forever`` in a daemon thread,
and ``ws.close()`` on Ctrl+C (here: when standard input closes). Driven by
tests/it/seeds.rs.

The function hard-codes the production URL in its ``websocket.WebSocketApp(...)`` call.
The text is not edited: the function's global ``websocket`` is the real module except
that ``WebSocketApp`` is a subclass which maps the production origin
``wss://portal-apis.telematicssdk.com`` to SEED_BASE_URL and observes what the client
receives ("message", before the seed's on_message runs), sends ("sent"), and its open,
error and close callbacks. The seed's ``print`` calls are reported as "print" lines (the
function's global ``print`` reports, then prints). Nothing is substituted in the code:
the token and the instance are the function's parameters; the function itself sends
``device_token: None`` (instance mode), ``timezone: 'America/New_York'``,
``date_format: 'iso'``.

Extracting a function
---------------------
The page lost every indentation. The function is found by its header (exactly once), with
the imports right above it, and re-indented with seedtext.py's rules, plus these for a
function that defines callbacks and then hands them over:

* the function's nested ``def`` s (the callbacks ``on_open(ws)``...) sit at the
  function's body level, like methods in a class (seedtext's method rule), whatever their
  first parameter; their bodies are greedy;
* the last nested function's body ends at the first statement that reads that function's
  own name (``websocket.WebSocketApp(..., on_close=on_close)``: a callback handing itself
  over belongs to the function that defines it); that statement, the comments right above
  it and what follows are at the function's body level and must be simple statements;
* the function ends with its ``return`` at body level (nothing after it could run).

A nested function inside a callback would be misplaced (none in the seed). The result must
compile.

Environment: SEED_FILE, SEED_BASE_URL (ws://host:port), SEED_TOKEN, SEED_INSTANCE,
SEED_TIMEOUT_MS (default 20000). ``python telematics.py --extract SEED_FILE`` prints the
extracted function.
"""

import builtins
import hashlib
import json
import os
import re
import sys
import threading
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import seedtext  # noqa: E402
from seedtext import SeedError, emit  # noqa: E402

FUNCTION = "create_websocket_connection"
PRODUCTION = "wss://portal-apis.telematicssdk.com"
DEF_NAME = re.compile(r"^(?:async\s+)?def\s+(\w+)")


def extract_function(text, name):
    """The top-level function `name` from a seed page, re-indented, with the imports above
    it. Returns {"source", "lines", "imports", "first_line", "sha256"}."""
    physical = text.split("\n")
    header = re.compile(r"(?<![\w])def\s+" + re.escape(name) + r"\s*\(")
    hits = [(n, m.start()) for n, line in enumerate(physical) for m in header.finditer(line)]
    if len(hits) != 1:
        raise SeedError(f"def {name}: {len(hits)} headers in the seed (want exactly 1)")
    n, col = hits[0]
    physical = list(physical)
    physical[n] = physical[n][col:]

    imports = []
    k = n - 1
    while k >= 0 and seedtext.IMPORT_LINE.match(physical[k].strip()):
        imports.insert(0, physical[k].strip())
        k -= 1
    if k >= 0:
        m = seedtext.IMPORT_TAIL.search(physical[k].strip())
        if m:
            imports.insert(0, m.group(1))

    stmts = []
    nested = None  # the name of the last nested function
    tail_at = None  # where the function's own statements after the callbacks start
    for ll in seedtext.logical_lines(physical, n):
        if not seedtext.classify(ll):
            break
        if not stmts:
            if ll.kind != "def":
                raise SeedError(f"def {name}: no function header parsed")
            ll.kind = "class"  # its body is placed like a class body: see the docstring
            stmts.append(ll)
            continue
        if tail_at is None:
            if ll.kind == "def":
                nested = DEF_NAME.match(ll.code).group(1)
                ll.method = True
            elif ll.kind != "comment" and nested is not None and nested in ll.loads:
                tail_at = len(stmts)
                while stmts[tail_at - 1].kind == "comment":
                    tail_at -= 1
        stmts.append(ll)
        if tail_at is not None and ll.kind == "simple" and re.match(r"return\b", ll.code):
            break
    else:
        raise SeedError(f"def {name}: the page ended inside the function")
    if tail_at is None or not re.match(r"return\b", stmts[-1].code):
        raise SeedError(f"def {name}: no statement after its callbacks ending in a return")
    head, tail = stmts[:tail_at], stmts[tail_at:]
    for ll in tail:
        if ll.kind not in ("simple", "comment"):
            raise SeedError(f"def {name}: cannot place {ll.code!r} after the callbacks")
    body = seedtext.reindent(head)
    for ll in tail:
        body += "".join(line + "\n" for line in seedtext._emit(ll, 1))
    source = "".join(line + "\n" for line in imports) + body
    try:
        compile(source, f"<seed def {name}>", "exec")
    except SyntaxError as e:
        raise SeedError(f"def {name}: the re-indented code does not compile: {e}\n{source}")
    return {
        "source": source,
        "lines": len(body.splitlines()),
        "imports": imports,
        "first_line": n + 1,
        "sha256": hashlib.sha256(source.encode()).hexdigest(),
    }


def parsed(data):
    try:
        return json.loads(data)
    except (TypeError, ValueError):
        return data if isinstance(data, str) else repr(data)


def observed_websocket_module(real, base_url):
    """`real` (the websocket-client module) with an observing, URL-mapping WebSocketApp."""

    class WebSocketApp(real.WebSocketApp):
        def __init__(self, url, *args, on_open=None, on_message=None, on_error=None, on_close=None, **kwargs):
            mapped = base_url + url[len(PRODUCTION) :] if url.startswith(PRODUCTION + "/") else url
            emit("ws_connect", url=url, mapped=mapped)

            def opened(ws):
                emit("ws_open")
                if on_open:
                    on_open(ws)

            def message(ws, data):
                emit("message", msg=parsed(data))
                if on_message:
                    on_message(ws, data)

            def error(ws, e):
                emit("ws_error", url=mapped, message=f"{type(e).__name__}: {e}")
                if on_error:
                    on_error(ws, e)

            def closed(ws, code, reason):
                emit("ws_close", url=mapped, code=code, reason=reason)
                if on_close:
                    on_close(ws, code, reason)

            super().__init__(
                mapped, *args, on_open=opened, on_message=message, on_error=error, on_close=closed, **kwargs
            )

        def send(self, data, *args, **kwargs):
            emit("sent", msg=parsed(data))
            return super().send(data, *args, **kwargs)

    shim = types.ModuleType(real.__name__)
    shim.__dict__.update(real.__dict__)
    shim.WebSocketApp = WebSocketApp
    return shim


def observed_print(*args, **kwargs):
    emit("print", text=kwargs.get("sep", " ").join(str(a) for a in args))
    builtins.print(*args, **kwargs)


def main(argv):
    if argv[1:2] == ["--extract"]:
        with open(argv[2], encoding="utf-8") as f:
            got = extract_function(f.read(), FUNCTION)
        sys.stdout.write(got["source"])
        print(
            f"# {FUNCTION}: seed line {got['first_line']}, {got['lines']} lines, "
            f"imports {got['imports']}, sha256 {got['sha256'][:16]}",
            file=sys.stderr,
        )
        return 0

    seed = os.environ["SEED_FILE"]
    namespace = {"__name__": "telematics_seed"}
    try:
        with open(seed, encoding="utf-8") as f:
            got = extract_function(f.read(), FUNCTION)
        exec(compile(got["source"], f"<{os.path.basename(seed)}: def {FUNCTION}>", "exec"), namespace)
    except SeedError as e:
        emit("fatal", message=f"extracting {FUNCTION}: {e}")
        return 1
    emit(
        "extracted",
        lang="python",
        seed=os.path.basename(seed),
        name=FUNCTION,
        line=got["first_line"],
        lines=got["lines"],
        imports=got["imports"],
        sha256=got["sha256"],
    )
    namespace["websocket"] = observed_websocket_module(namespace["websocket"], os.environ["SEED_BASE_URL"])
    namespace["print"] = observed_print

    # The usage example, step by step.
    ws = namespace[FUNCTION](os.environ["SEED_TOKEN"], os.environ["SEED_INSTANCE"])
    ws_thread = threading.Thread(target=ws.run_forever)
    ws_thread.daemon = True
    ws_thread.start()

    # Its main thread waits for Ctrl+C; here for the end of standard input.
    stdin_closed = threading.Event()

    def watch():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except Exception:
            pass
        stdin_closed.set()

    threading.Thread(target=watch, daemon=True).start()
    timeout = int(os.environ.get("SEED_TIMEOUT_MS", "20000")) / 1000
    if not stdin_closed.wait(timeout):
        emit("fatal", message=f"harness still running after {timeout} s")
        return 3
    ws.close()  # the usage example's KeyboardInterrupt branch
    # Then the usage example's process ends, daemon thread and all. (With websocket-client
    # 1.8, a close() from another thread does not wake run_forever's select(): its thread
    # would stay blocked, and on_close does not run, until the process exits.)
    ws_thread.join(timeout=0.5)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except SeedError as e:
        print(f"telematics.py: {e}", file=sys.stderr)
        sys.exit(1)
