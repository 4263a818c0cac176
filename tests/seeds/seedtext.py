"""Python code out of a scraped seed page, and helpers shared by the Python harnesses.

The seed pages in ../shared/seeds are scraped web pages: code blocks are not fenced, a
block may start in the middle of a line of prose or of another block ("...route
visualization.class LiveVehicleTracker:"), and every line of Python lost its indentation.
This module finds a class by its header, takes its logical lines up to the first line that
cannot belong to it, and indents them again from their block structure.

Why re-indenting is a heuristic, not a function
-----------------------------------------------
Indentation is information the flattened text no longer holds. After

    if filters:
    subscription["filters"] = filters
    await self.send_message(subscription)

both "send only when there are filters" and "always send" are valid programs, and nothing
in the text says which was meant. The rules below pick one reading, deterministically:

* a line ending with ``:`` (outside strings and brackets, before any comment) opens a
  block; its body is one level deeper;
* ``def``/``async def`` whose first parameter is ``self`` or ``cls`` (or that follows a
  decorator there) is a method: it closes every block back to the class body; any other
  ``def``, a ``class`` or ``if __name__`` ends the extracted class;
* ``elif``/``else``/``except``/``finally`` close the blocks opened after the innermost
  ``if``/``try``/``for``/``while`` that can take them and take its level;
* bodies of ``def``, ``class``, ``try``, ``for``, ``while`` and ``with`` run on until one
  of the rules above closes them (greedy);
* a body of ``if``/``elif``/``else``/``except``/``finally`` holds its first statement, and
  a further statement only when
    - an ``elif``/``else`` of the same ``if`` follows (before the next ``def`` or ``if``), or
    - it reads a name bound in that body that would otherwise be possibly unbound (not bound
      before the ``if``/``try``, and not bound by every branch of an ``if`` with an
      ``else``), or
    - it is a bare ``raise`` in an ``except`` body;
  and never after a ``return``/``raise``/``break``/``continue``/``pass``;
* comments take the level of the statement after them; lines inside brackets are
  indented one level more than their statement; lines inside a triple-quoted string are
  kept as they are.

The result must compile, else extraction fails. The rules were checked by reading every
block of the Bookovia and Valtronics seeds; ``--self-test`` pins them on synthetic code.
Known misreadings: a statement after a loop that reads nothing bound in it lands inside
the loop; an ``else`` after nested ``if``s goes to the innermost one; a nested function
inside a method ends the class; prose glued to the end of the class's last line is lost
with that line.
"""

import ast
import hashlib
import json
import os
import re
import sys
import threading

INDENT = "    "


class SeedError(Exception):
    pass


# ------------------------------------------------------------------ logical lines


class Logical:
    """One logical line: one or more physical lines joined by open brackets or strings."""

    def __init__(self, index):
        self.index = index  # physical line number (0-based) of its first line
        # (text, verbatim, depth): verbatim lines start inside a triple-quoted string;
        # depth is the bracket depth at the line's start
        self.lines = []
        self.code = ""  # the joined text without comments
        self.full = ""  # the joined text with comments (what gets parsed)
        self.kind = None
        self.keyword = None
        self.loads = set()
        self.stores = set()
        self.terminal = False
        self.bare_raise = False
        self.method = False
        self.params = []

    def __repr__(self):
        return f"Logical({self.index}, {self.kind}, {self.full!r})"


def logical_lines(physical, start):
    """Yields Logical lines from physical[start:] (each stripped of leading blanks)."""
    i = 0 + start
    while i < len(physical):
        ll = Logical(i)
        depth = 0
        quote = None  # the open string's delimiter: ', ", ''' or """
        code_parts, full_parts = [], []
        while True:
            raw = physical[i]
            verbatim = quote is not None and len(quote) == 3
            text = raw.rstrip("\n") if verbatim else raw.strip()
            ll.lines.append((text, verbatim, depth))
            code, j, cont = [], 0, False
            while j < len(text):
                ch = text[j]
                if quote:
                    if ch == "\\":
                        code.append(text[j : j + 2])
                        j += 2
                        continue
                    if text.startswith(quote, j):
                        code.append(quote)
                        j += len(quote)
                        quote = None
                        continue
                    code.append(ch)
                    j += 1
                    continue
                if ch == "#":
                    break
                if ch in "'\"":
                    q = text[j : j + 3] if text[j : j + 3] in ("'''", '"""') else ch
                    quote = q
                    code.append(q)
                    j += len(q)
                    continue
                if ch in "([{":
                    depth += 1
                elif ch in ")]}":
                    depth -= 1
                code.append(ch)
                j += 1
            if quote and len(quote) == 1:
                quote = None  # an unterminated one-line string: let the parser judge
            line_code = "".join(code).rstrip()
            if line_code.endswith("\\") and not quote:
                cont = True
            code_parts.append(line_code)
            full_parts.append(text)
            i += 1
            if depth > 0 or quote or cont:
                if i < len(physical):
                    continue
            break
        ll.code = "\n".join(code_parts).strip()
        ll.full = "\n".join(full_parts)
        yield ll


COMPOUND = re.compile(r"^(async\s+(?:def|for|with)|def|class|if|elif|else|for|while|with|try|except|finally)\b")
METHOD = re.compile(r"^(?:async\s+)?def\s+\w+\s*\(\s*(self|cls)\b")


def classify(ll):
    """Sets kind/keyword; parses the line to learn the names it reads and binds.

    Returns False when the line is not Python at all (prose, another language)."""
    code = ll.code
    if not code:
        ll.kind = "comment"
        return True
    m = COMPOUND.match(code)
    kw = re.sub(r"\s+", " ", m.group(1)) if m else None
    opens = code.endswith(":")
    if code.startswith("@"):
        ll.kind, probe = "decorator", ll.full + "\ndef _f(): pass"
    elif kw in ("def", "async def"):
        ll.kind, probe = "def", ll.full + "\n" + INDENT + "pass"
        ll.method = bool(METHOD.match(code))
    elif kw == "class":
        ll.kind, probe = "class", ll.full + "\n" + INDENT + "pass"
    elif kw in ("elif", "else") and opens:
        ll.kind, probe = "clause", "if 1:\n" + INDENT + "pass\n" + ll.full + "\n" + INDENT + "pass"
    elif kw in ("except", "finally") and opens:
        ll.kind, probe = "clause", "try:\n" + INDENT + "pass\n" + ll.full + "\n" + INDENT + "pass"
    elif kw == "try" and opens:
        ll.kind, probe = "opener", ll.full + "\n" + INDENT + "pass\nfinally:\n" + INDENT + "pass"
    elif kw and opens:
        ll.kind, probe = "opener", ll.full + "\n" + INDENT + "pass"
    else:
        ll.kind, probe = "simple", ll.full
    ll.keyword = kw
    try:
        tree = ast.parse(probe)
    except SyntaxError:
        return False
    if ll.kind == "simple":
        first = tree.body[0] if tree.body else None
        ll.terminal = isinstance(first, (ast.Return, ast.Raise, ast.Break, ast.Continue, ast.Pass))
        ll.bare_raise = isinstance(first, ast.Raise) and first.exc is None
    # Names read and bound by the statement itself (a header's body is our `pass`).
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (ll.loads if isinstance(node.ctx, ast.Load) else ll.stores).add(node.id)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            ll.stores.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                ll.stores.add((a.asname or a.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name != "_f":
                ll.stores.add(node.name)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "_f":
                a = node.args
                every = a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]
                ll.params = [x.arg for x in every]
    return True


# ------------------------------------------------------------------ re-indentation


class Chain:
    """One if/elif/else or try/except/finally statement."""

    def __init__(self, bound_before):
        self.bound_before = set(bound_before)
        self.branches = []
        self.has_else = False


class Block:
    def __init__(self, kind, level, chain=None, scope=None):
        self.kind = kind
        self.level = level  # the header's level; the body is one deeper
        self.n = 0  # statements in the body so far
        self.stores = set()  # names bound anywhere in the body
        self.terminated = False  # the last statement was return/raise/break/continue/pass
        self.chain = chain
        self.scope = scope  # for def: names bound in the function so far


SOFT = {"if", "elif", "else", "except", "finally"}
OWNERS = {
    "elif": {"if", "elif"},
    "else": {"if", "elif", "for", "while", "try", "except"},
    "except": {"try", "except"},
    "finally": {"try", "except", "else"},
}


def _scope(stack):
    for b in reversed(stack):
        if b.kind == "def":
            return b.scope
    return set()


def _clause_follows(stmts, i):
    """An elif/else comes after statement i before anything that could own it instead."""
    for t in stmts[i + 1 :]:
        if t.kind == "comment":
            continue
        if t.kind == "clause":
            return t.keyword in ("elif", "else")
        if t.kind in ("def", "class", "decorator"):
            return False
        if t.kind == "opener" and t.keyword == "if":
            return False
    return False


def _continues(block, stmt, stmts, i):
    if block.terminated:
        return False
    if block.kind == "except" and stmt.bare_raise:
        return True
    if block.kind in ("if", "elif") and _clause_follows(stmts, i):
        return True
    chain = block.chain
    for name in stmt.loads & block.stores:
        if chain is None or name in chain.bound_before:
            continue
        if chain.has_else and all(name in b for b in chain.branches):
            continue
        return True
    return False


def reindent(stmts):
    """Indents a list of classified Logical lines; returns the source text."""
    out = []
    stack = [Block("module", -1)]
    comments = []
    decorated = None  # level of a pending decorator
    for i, st in enumerate(stmts):
        if st.kind == "comment":
            comments.append(st)
            continue
        if st.kind in ("def", "class", "decorator"):
            in_class = [b.level + 1 for b in stack if b.kind == "class"]
            if decorated is not None:
                target = decorated  # the def a decorator stands above
            elif in_class and (st.method or st.kind == "decorator"):
                target = in_class[-1]
            else:
                target = 0
            while stack[-1].level >= target:
                stack.pop()
            level = target
            decorated = level if st.kind == "decorator" else None
        elif st.kind == "clause":
            j = len(stack) - 1
            while j > 0 and stack[j].kind not in OWNERS[st.keyword] and stack[j].kind not in ("def", "class"):
                j -= 1
            owner = stack[j]
            if owner.kind not in OWNERS[st.keyword]:
                raise SeedError(f"line {st.index + 1}: {st.code!r} has no block to belong to")
            del stack[j:]
            level = owner.level
        else:
            while stack[-1].kind in SOFT and stack[-1].n >= 1 and not _continues(stack[-1], st, stmts, i):
                stack.pop()
            level = stack[-1].level + 1
        for c in comments:
            out.extend(_emit(c, level))
        comments = []
        out.extend(_emit(st, level))

        # Bookkeeping: the statement belongs to the top block's body, and what it binds
        # is bound in every enclosing block and in the function.
        parent = stack[-1]
        if st.kind != "clause":
            parent.n += 1
            parent.terminated = st.terminal
        scope = _scope(stack)
        for b in stack:
            b.stores |= st.stores
        scope |= st.stores
        if st.kind == "def":
            stack.append(Block("def", level, scope=set(st.params)))
        elif st.kind == "class":
            stack.append(Block("class", level))
        elif st.kind == "opener":
            kind = st.keyword.split()[-1]
            chain = Chain(scope) if kind in ("if", "try") else None
            b = Block(kind, level, chain=chain)
            if chain is not None:
                chain.branches.append(b.stores)
            stack.append(b)
        elif st.kind == "clause":
            chain = owner.chain
            b = Block(st.keyword, level, chain=chain)
            b.stores |= st.stores  # `except E as e` binds e in its body
            if chain is not None:
                chain.branches.append(b.stores)
                if st.keyword == "else" and owner.kind in ("if", "elif"):
                    chain.has_else = True
            stack.append(b)
    src = "\n".join(out) + "\n"
    return src


def _emit(ll, level):
    lines = []
    for text, verbatim, depth in ll.lines:
        if verbatim:
            lines.append(text)
        elif not text:
            lines.append("")
        else:
            closes = 1 if text[:1] in ")]}" else 0
            lines.append(INDENT * (level + depth - closes) + text)
    return lines


# ------------------------------------------------------------------ extraction

IMPORT_LINE = re.compile(r"^(?:from\s+[\w.]+\s+)?import\s+[\w., ]+$")
IMPORT_TAIL = re.compile(r"[;)}\]]\s*((?:from\s+[\w.]+\s+)?import\s+[\w., ]+)$")


def extract_class(text, class_name):
    """The class `class_name` from a seed page, re-indented, with the imports above it.

    Returns {"source", "class_lines", "imports", "first_line", "sha256"}."""
    physical = text.split("\n")
    header = re.compile(r"(?<![\w])class\s+" + re.escape(class_name) + r"\s*[:(]")
    hits = [(n, m.start()) for n, line in enumerate(physical) for m in header.finditer(line)]
    if len(hits) != 1:
        raise SeedError(f"class {class_name}: {len(hits)} headers in the seed (want exactly 1)")
    n, col = hits[0]
    physical = list(physical)
    physical[n] = physical[n][col:]

    # Imports right above the class (the first one may be glued to a line of other code).
    imports = []
    k = n - 1
    while k >= 0 and IMPORT_LINE.match(physical[k].strip()):
        imports.insert(0, physical[k].strip())
        k -= 1
    if k >= 0:
        m = IMPORT_TAIL.search(physical[k].strip())
        if m:
            imports.insert(0, m.group(1))

    stmts = []
    for ll in logical_lines(physical, n):
        if not classify(ll):
            break  # prose or another language: the class ended before this line
        if stmts and (
            ll.kind == "class"
            or (ll.kind == "def" and not ll.method and stmts[-1].kind != "decorator")
            or (ll.kind == "opener" and ll.code.startswith("if __name__"))
        ):
            break
        stmts.append(ll)
    while stmts and stmts[-1].kind == "comment":
        stmts.pop()  # comments after the last statement introduce what follows
    if not stmts or stmts[0].kind != "class":
        raise SeedError(f"class {class_name}: no class header parsed")
    body = reindent(stmts)
    source = "".join(line + "\n" for line in imports) + body
    try:
        compile(source, f"<seed class {class_name}>", "exec")
    except SyntaxError as e:
        raise SeedError(f"class {class_name}: the re-indented code does not compile: {e}\n{source}")
    return {
        "source": source,
        "class_lines": len(body.splitlines()),
        "imports": imports,
        "first_line": n + 1,
        "sha256": hashlib.sha256(source.encode()).hexdigest(),
    }


def load_class(seed_path, class_name, namespace):
    """Extracts `class_name` from the seed file and executes it in `namespace`."""
    with open(seed_path, encoding="utf-8") as f:
        got = extract_class(f.read(), class_name)
    exec(compile(got["source"], f"<{os.path.basename(seed_path)}: class {class_name}>", "exec"), namespace)
    emit(
        "extracted",
        lang="python",
        seed=os.path.basename(seed_path),
        name=class_name,
        line=got["first_line"],
        lines=got["class_lines"],
        imports=got["imports"],
        sha256=got["sha256"],
    )
    return namespace[class_name]


# ------------------------------------------------------------------ harness helpers

_emit_lock = threading.Lock()


def emit(ev, **fields):
    """One line for tests/it/seeds.rs: a JSON object whose first member is "ev"."""
    line = json.dumps({"ev": ev, **fields}, default=str)
    with _emit_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def watch_stdin(loop, event):
    """Sets the asyncio `event` when standard input closes (the test is done with us)."""

    def run():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except Exception:
            pass
        loop.call_soon_threadsafe(event.set)

    threading.Thread(target=run, daemon=True).start()


# ------------------------------------------------------------------ self-test and CLI

SELF_TEST = [
    # (flattened input, expected indentation of each line in levels)
    (
        "class C:\ndef f(self, x):\nif x:\ny = 1\nreturn y\n",
        [0, 1, 2, 3, 3],  # return reads y, bound only in the if: stays inside
    ),
    (
        "class C:\ndef f(self, x):\nm = {}\nif x:\nm['a'] = x\nreturn m\n",
        [0, 1, 2, 2, 3, 2],  # m bound before the if: the return follows it
    ),
    (
        "class C:\ndef f(self, x):\nif x > 1:\ns = 'a'\nelif x:\ns = 'b'\nelse:\ns = 'c'\nreturn s\n",
        [0, 1, 2, 3, 2, 3, 2, 3, 2],  # every branch binds s
    ),
    (
        "class C:\nasync def f(self):\ntry:\nwhile self.on:\na = 1\nb = a\nexcept E as e:\nprint(e)\nraise\nasync def g(self):\npass\n",
        [0, 1, 2, 3, 4, 4, 2, 3, 3, 1, 2],
    ),
    (
        "class C:\ndef f(self, ev):\nif ev == 1:\n# c\nself.a = 1\nself.b = 2\nelif ev == 2:\nw = 3\nself.g(w)\nself.h()\n",
        [0, 1, 2, 3, 3, 3, 2, 3, 3, 2],  # a later elif keeps the if open
    ),
    (
        "class C:\ndef f(self):\nif self.x:\nreturn 1\nx = {\n'a': 1\n}\n",
        [0, 1, 2, 3, 2, 3, 2],
    ),
    (
        "class C:\n@staticmethod\ndef s(a):\nreturn a\ndef g(self):\npass\n",
        [0, 1, 1, 2, 1, 2],
    ),
]


def self_test():
    for flat, levels in SELF_TEST:
        stmts = []
        for ll in logical_lines(flat.rstrip("\n").split("\n"), 0):
            assert classify(ll), ll
            stmts.append(ll)
        src = reindent(stmts)
        got = [(len(line) - len(line.lstrip(" "))) // len(INDENT) for line in src.rstrip("\n").split("\n")]
        if got != levels:
            raise SeedError(f"self-test: {flat!r}\ngot levels {got}, want {levels}:\n{src}")
        compile(src, "<self-test>", "exec")
    print(f"seedtext.py self-test: {len(SELF_TEST)} cases ok")


def main(argv):
    if argv[1:] == ["--self-test"]:
        self_test()
        return 0
    if len(argv) != 3:
        print("usage: seedtext.py SEED_FILE CLASS_NAME | --self-test", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        got = extract_class(f.read(), argv[2])
    sys.stdout.write(got["source"])
    print(
        f"# {argv[2]}: seed line {got['first_line']}, {got['class_lines']} lines, "
        f"imports {got['imports']}, sha256 {got['sha256'][:16]}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except SeedError as e:
        print(f"seedtext.py: {e}", file=sys.stderr)
        sys.exit(1)
