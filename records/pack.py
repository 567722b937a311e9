"""Pack train_gpt.py into a self-extracting script: fewer code bytes, the same program.

Usage:
    python records/pack.py                                  # sizes of train_gpt.py: raw, compressed, shipped
    python records/pack.py train_gpt.py -o train_gpt_shipped.py   # the shipped file: stripped, smaller codec
    python records/pack.py train_gpt.py -o packed.py --mode plain --codec lzma   # payload = the source
    python records/pack.py train_gpt.py -o packed.py --mode minify --codec brotli
    python records/pack.py --unpack packed.py -o source.py  # the payload of a packed file

A packed file is two lines of Python that decode a base85 string, decompress it (raw LZMA2, as
`train_gpt.self_extracting_source` writes it, or Brotli) and run the result with
`exec(compile(payload, __file__, "exec"))`. The payload therefore runs as `__main__` and sees the
packed file as `__file__`, so `bytes_code` and `code_sha256` in its logs are those of the packed
file: the bytes that ship.

Modes (`--mode`; `-o` writes `strip` with the smaller codec unless told otherwise):

- `plain`: the payload is the source byte for byte, so its sha256 is the source's.
- `minify`: comments, blank lines and trailing spaces are removed, indentation becomes one space per
  level and continuation lines lose their leading spaces; the syntax tree is unchanged
  (`ast.dump(ast.parse(minified)) == ast.dump(ast.parse(source))`). `--minify` is this mode.
- `strip`: `minify`, and also the docstrings (module, class, function; a body left empty gets `pass`)
  and the help text of every `knob(...)` call (it only feeds the README's knob table) are removed, and
  lines inside brackets are joined. The check: the generated file's syntax tree equals the source's
  with exactly those strings removed; any other difference is an error. When the code reads a
  docstring at run time (`__doc__`, `getdoc`) every docstring is kept and the output says so.

Every file written here is verified before it is written: the payload decodes back to exactly the
generated source, both the packed file and its payload compile, and a stripped payload, executed as
a module, defines the same top-level names as the source (this imports the program: it must have no
side effects at import, as train_gpt.py has none). Files are written atomically.
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import io
import lzma
import os
import sys
import tokenize
import types
from pathlib import Path

CODECS = ("lzma", "brotli")
CODEC_CHOICES = ("auto", *CODECS)  # auto: whichever ships fewer bytes
MODES = ("plain", "minify", "strip")  # the order of the sizes table
DEFAULT_MODE = "strip"
MODE_SUFFIX = {"plain": "", "minify": ", minified", "strip": ", stripped"}  # labels of the sizes table
BROTLI_QUALITY = 11
BROTLI_LGWIN = 24
DEFAULT_SOURCE = Path(__file__).resolve().parent.parent / "train_gpt.py"
DOC_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
DOCSTRING_READERS = frozenset({"__doc__", "getdoc"})  # names through which code can read a docstring
KNOB_FUNCTION = "knob"  # the module-level def whose string argument KNOB_HELP_PARAM strip blanks
KNOB_HELP_PARAM = "help"
SNIPPET_CHARS = 60  # how much of a differing statement an error quotes


class PackError(Exception):
    """A file cannot be packed, minified or unpacked; the message names it and says why."""


# ---------------------------------------------------------------------------------------------
# Codecs and the wrapper
# ---------------------------------------------------------------------------------------------


def _brotli():
    try:
        import brotli
    except ImportError as exc:  # brotli is in requirements.txt; only a bare environment lacks it
        raise PackError("--codec brotli needs the brotli module (pip install brotli)") from exc
    return brotli


def compress(payload: bytes, codec: str) -> bytes:
    if codec == "lzma":
        # Raw LZMA2 (no .xz container): the bytes train_gpt.self_extracting_source writes.
        return lzma.compress(payload, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9}])
    if codec == "brotli":
        return _brotli().compress(payload, quality=BROTLI_QUALITY, lgwin=BROTLI_LGWIN)
    raise PackError(f"codec {codec!r} is not allowed: expected one of {', '.join(CODECS)}")


def wrap(payload: bytes, codec: str) -> bytes:
    """The self-extracting file for `payload`."""
    return wrap_compressed(compress(payload, codec), codec)


def wrap_compressed(compressed: bytes, codec: str) -> bytes:
    """The self-extracting file for an already compressed payload. The base85 alphabet has no quote or
    backslash, so the encoded string needs no escaping."""
    text = base64.b85encode(compressed)
    if codec == "lzma":
        return (b"import lzma as L,base64 as B\nexec(compile(L.decompress(B.b85decode(\"" + text +
                b"\"),format=L.FORMAT_RAW,filters=[{\"id\":L.FILTER_LZMA2}]),__file__,\"exec\"))\n")
    return (b"import brotli as R,base64 as B\nexec(compile(R.decompress(B.b85decode(\"" + text +
            b"\")),__file__,\"exec\"))\n")


def _b85_literal(tree: ast.AST) -> bytes | None:
    """The constant argument of the first `<x>.b85decode("...")` call, or None."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "b85decode"
                and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, (str, bytes))):
            value = node.args[0].value
            return value.encode("ascii") if isinstance(value, str) else value
    return None


def unpack(packed: bytes) -> tuple[bytes, str] | None:
    """(payload, codec) of a self-extracting file, or None when `packed` is not one.

    Reads the base85 literal from the syntax tree (nothing is executed) and tries raw LZMA2, .xz/.lzma,
    Brotli and zlib, so the wrappers public records ship (PR #1394 style) are recognised too. Only a
    short file (at most a few statements) counts as a wrapper."""
    try:
        tree = ast.parse(packed)
    except (SyntaxError, ValueError):
        return None
    if len(tree.body) > 4:
        return None
    literal = _b85_literal(tree)
    if literal is None:
        return None
    try:
        data = base64.b85decode(literal)
    except ValueError:
        return None
    attempts = [("lzma", lambda b: lzma.decompress(b, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])),
                ("lzma", lambda b: lzma.decompress(b))]
    try:
        import brotli
        attempts.append(("brotli", brotli.decompress))
    except ImportError:
        pass
    import zlib
    attempts.append(("zlib", zlib.decompress))
    for codec, fn in attempts:
        try:
            return fn(data), codec
        except Exception:  # noqa: BLE001 - any decoder error means "not this codec"
            continue
    return None


# ---------------------------------------------------------------------------------------------
# Minification (syntax-tree preserving)
# ---------------------------------------------------------------------------------------------


def _spans(tokens: list[tokenize.TokenInfo]) -> list[tuple[int, int]]:
    """(first row, last row) of every string that spans lines (f-strings as a whole on 3.12+)."""
    spans, stack = [], []
    for tok in tokens:
        name = tokenize.tok_name[tok.type]
        if name == "FSTRING_START":
            stack.append(tok.start[0])
        elif name == "FSTRING_END":
            first = stack.pop()
            if not stack and first != tok.end[0]:
                spans.append((first, tok.end[0]))
        elif not stack and tok.type == tokenize.STRING and tok.start[0] != tok.end[0]:
            spans.append((tok.start[0], tok.end[0]))
    return spans


def minify(source: bytes, name: str = "source") -> bytes:
    """`source` without comments, blank lines, trailing spaces and with one-space indentation; raises
    PackError unless the result parses to the same syntax tree."""
    try:
        text = source.decode("utf-8")
        original = ast.dump(ast.parse(text))
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (UnicodeDecodeError, SyntaxError, tokenize.TokenError) as exc:
        raise PackError(f"{name}: cannot be minified: {exc}") from exc
    lines = text.splitlines()
    keep_lead, keep_tail = set(), set()  # rows whose start / end lie inside a multi-line string
    for first, last in _spans(tokens):
        keep_lead.update(range(first + 1, last + 1))
        keep_tail.update(range(first, last))
    cut: dict[int, int] = {}  # row -> column where a comment starts
    code_rows: set[int] = set()  # rows holding a token other than a comment or newline
    stmt_depth: dict[int, int] = {}  # first row of each logical line -> indentation depth
    in_brackets: dict[int, bool] = {}  # continuation row -> whether it lies inside (), [], {}
    depth, parens, at_stmt_start = 0, 0, True
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            cut[tok.start[0]] = tok.start[1]
            continue
        if tok.type == tokenize.INDENT:
            depth += 1
            continue
        if tok.type == tokenize.DEDENT:
            depth -= 1
            continue
        if tok.type in (tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER):
            at_stmt_start = at_stmt_start or tok.type == tokenize.NEWLINE
            continue
        row = tok.start[0]
        if at_stmt_start:
            stmt_depth[row] = depth
            at_stmt_start = False
        elif row not in code_rows and row not in stmt_depth:
            in_brackets[row] = parens > 0
        code_rows.update(range(tok.start[0], tok.end[0] + 1))
        if tok.type == tokenize.OP and tok.string in "([{":
            parens += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            parens -= 1
    out = []
    for row, line in enumerate(lines, start=1):
        if row not in code_rows and row not in keep_lead:
            continue  # blank or comment-only
        if row in cut:
            line = line[:cut[row]]
        if row not in keep_tail:
            line = line.rstrip()
        if row not in keep_lead:
            if row in stmt_depth:
                line = " " * stmt_depth[row] + line.lstrip()
            elif row in in_brackets:
                line = ("" if in_brackets[row] else " ") + line.lstrip()
        out.append(line)
    result = "\n".join(out) + "\n"
    try:
        same = ast.dump(ast.parse(result)) == original
    except SyntaxError:
        same = False
    if not same:
        raise PackError(f"{name}: minification would change the program (syntax tree differs); pack with "
                        f"--mode plain")
    return result.encode("utf-8")


def join_bracket_lines(source: bytes, name: str = "source") -> bytes:
    """Every line break inside (), [] or {} removed: the continuation joins the line before it, with a
    space only between two word characters. Line endings must be "\\n" (minify's output)."""
    text = source.decode("utf-8")
    breaks = _bracket_breaks(text, name)
    out: list[str] = []
    for row, line in enumerate(text.rstrip("\n").split("\n"), start=1):
        if row - 1 in breaks:
            line = line.lstrip()
            out[-1] += (" " if _word_char(out[-1][-1:]) and _word_char(line[:1]) else "") + line
        else:
            out.append(line)
    return ("\n".join(out) + "\n").encode("utf-8")


def _bracket_breaks(text: str, name: str) -> set[int]:
    """Rows whose line break lies inside brackets (a tokenize NL token at bracket depth > 0)."""
    rows, depth = set(), 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.OP and tok.string in ("(", "[", "{"):
                depth += 1
            elif tok.type == tokenize.OP and tok.string in (")", "]", "}"):
                depth -= 1
            elif tok.type == tokenize.NL and depth > 0:
                rows.add(tok.start[0])
    except (SyntaxError, tokenize.TokenError) as exc:
        raise PackError(f"{name}: cannot be tokenized: {exc}") from exc
    return rows


def _word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


# ---------------------------------------------------------------------------------------------
# Stripping: docstrings and knob help removed, everything else checked unchanged
# ---------------------------------------------------------------------------------------------


def _parse(source: bytes, name: str) -> ast.Module:
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError) as exc:
        raise PackError(f"{name}: does not parse: {exc}") from exc


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def docstrings(tree: ast.Module) -> list[tuple[list[ast.stmt], ast.Expr]]:
    """(body, docstring statement) of the module and of every class and function that has one."""
    return [(node.body, node.body[0]) for node in ast.walk(tree)
            if isinstance(node, DOC_OWNERS) and node.body and _is_docstring(node.body[0])]


def docstring_reads(tree: ast.Module) -> list[int]:
    """Lines where the code may read a docstring at run time: a name, attribute or string in
    DOCSTRING_READERS (`__doc__`, `inspect.getdoc`, `getattr(x, "__doc__")`)."""
    lines = []
    for node in ast.walk(tree):
        word = (node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute)
                else node.value if isinstance(node, ast.Constant) else None)
        if isinstance(word, str) and word in DOCSTRING_READERS:
            lines.append(node.lineno)
    return lines


def _knob_def(tree: ast.Module) -> ast.FunctionDef | None:
    """The module-level `def knob` when it has a KNOB_HELP_PARAM parameter."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == KNOB_FUNCTION:
            a = node.args
            if KNOB_HELP_PARAM in [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]:
                return node
    return None


def knob_help_args(tree: ast.Module) -> list[ast.Constant]:
    """The string constants passed as KNOB_HELP_PARAM (by position or keyword) to the module's own
    `knob`; none when the module defines no such function."""
    knob = _knob_def(tree)
    if knob is None:
        return []
    positional = [p.arg for p in knob.args.posonlyargs + knob.args.args]
    index = positional.index(KNOB_HELP_PARAM) if KNOB_HELP_PARAM in positional else None
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == KNOB_FUNCTION):
            continue
        args = [k.value for k in node.keywords if k.arg == KNOB_HELP_PARAM]
        if index is not None and len(node.args) > index and not any(
                isinstance(a, ast.Starred) for a in node.args[:index + 1]):
            args.append(node.args[index])
        found += [a for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return found


def strip_tree(tree: ast.Module) -> ast.Module:
    """`tree`, changed in place, as the stripped file must parse: docstrings removed (a body left empty
    holds `pass`) unless the code reads docstrings, and every knob help string blanked."""
    if not docstring_reads(tree):
        for body, doc in docstrings(tree):
            body.remove(doc)
            if not body:
                body.append(ast.Pass())
    for arg in knob_help_args(tree):
        arg.value, arg.kind = "", None
    return tree


def _strip_edits(source: bytes, tree: ast.Module) -> list[tuple[int, int, bytes]]:
    """(start, end, replacement) byte spans of the source: the edits strip_tree describes."""
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))

    def span(node: ast.AST) -> tuple[int, int]:  # AST columns are UTF-8 byte offsets
        return starts[node.lineno - 1] + node.col_offset, starts[node.end_lineno - 1] + node.end_col_offset

    edits = []
    if not docstring_reads(tree):
        edits += [(*span(doc), b"pass" if len(body) == 1 else b"") for body, doc in docstrings(tree)]
    edits += [(*span(arg), b'""') for arg in knob_help_args(tree)]
    return edits


def strip_source(source: bytes, name: str = "source") -> bytes:
    """The stripped source (see the module docstring); raises PackError unless check_stripped passes."""
    edited = source
    for start, end, replacement in sorted(_strip_edits(source, _parse(source, name)), reverse=True):
        edited = edited[:start] + replacement + edited[end:]
    _parse(edited, f"{name} (docstrings and knob help removed)")
    stripped = join_bracket_lines(minify(edited, name), name)
    check_stripped(source, stripped, name)
    return stripped


def check_stripped(source: bytes, generated: bytes, name: str = "source") -> None:
    """Raise PackError unless `generated` parses to the syntax tree of `source` with its docstrings and
    knob help removed (strip_tree). Any other difference is an error that quotes the first one."""
    expected = strip_tree(_parse(source, name))
    got = _parse(generated, f"{name} (stripped)")
    if ast.dump(expected) != ast.dump(got):
        raise PackError(f"{name}: the stripped program differs from the source beyond docstrings and knob help: "
                        f"{_first_difference(expected, got)}")


def _node_key(node: ast.AST) -> list:
    """The node's type and its own fields, child nodes reduced to their types."""
    def plain(value):
        return type(value).__name__ if isinstance(value, ast.AST) else value
    key = [type(node).__name__]
    for _, value in ast.iter_fields(node):
        key.append([plain(v) for v in value] if isinstance(value, list) else plain(value))
    return key


def _located(node: ast.AST, tree: ast.Module) -> str:
    """'line N `code`' for `node` or, when it has no position (an operator), its nearest ancestor that has."""
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    while not hasattr(node, "lineno") and node in parents:
        node = parents[node]
    text = ast.unparse(node).split("\n")[0]
    text = text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS] + "..."
    return f"line {getattr(node, 'lineno', '?')} `{text}`"


def _first_difference(expected: ast.Module, got: ast.Module) -> str:
    for a, b in zip(ast.walk(expected), ast.walk(got)):
        if _node_key(a) != _node_key(b):
            return f"source {_located(a, expected)} vs generated {_located(b, got)}"
    return "the generated file has a different number of syntax nodes"


def top_level_names(code: bytes, name: str) -> set[str]:
    """The names a module defines after running `code` (under a private module name, so a `__main__`
    guard does not fire)."""
    module = types.ModuleType(f"_pack_check_{sha256(code)[:16]}")
    module.__file__ = name
    sys.modules[module.__name__] = module  # dataclasses look their module up while the class body runs
    try:
        exec(compile(code, name, "exec", dont_inherit=True), module.__dict__)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any failure of the program is reported
        raise PackError(f"{name}: importing it failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.modules.pop(module.__name__, None)
    return set(vars(module))


def check_top_level_names(source: bytes, generated: bytes, name: str = "source") -> None:
    """Raise PackError unless the generated program, imported, defines the source's top-level names."""
    want, got = top_level_names(source, name), top_level_names(generated, f"{name} (generated)")
    if want != got:
        raise PackError(f"{name}: the generated program's top-level names differ: missing "
                        f"{sorted(want - got) or 'none'}, extra {sorted(got - want) or 'none'}")


# ---------------------------------------------------------------------------------------------
# Packing with verification
# ---------------------------------------------------------------------------------------------


def _compiles(data: bytes, name: str) -> None:
    try:
        compile(data, name, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        raise PackError(f"{name}: does not compile: {exc}") from exc


def make_payload(source: bytes, mode: str, name: str = "source") -> bytes:
    """What the packed file runs: the source (plain), minified, or stripped."""
    if mode == "plain":
        return source
    if mode == "minify":
        return minify(source, name)
    if mode == "strip":
        return strip_source(source, name)
    raise PackError(f"--mode {mode!r} is not allowed: expected one of {', '.join(MODES)}")


def pack(source: bytes, codec: str = "lzma", do_minify: bool = False, name: str = "source",
         do_strip: bool = False) -> bytes:
    """The verified self-extracting file for `source`: its payload is the source itself, or with
    do_minify the syntax-tree-identical minified source, or with do_strip the stripped source."""
    if codec not in CODECS:
        raise PackError(f"--codec {codec!r} is not allowed: expected one of {', '.join(CODECS)}")
    _compiles(source, name)
    mode = "strip" if do_strip else "minify" if do_minify else "plain"
    return pack_payload(make_payload(source, mode, name), codec, name)


def pack_payload(payload: bytes, codec: str, name: str = "source") -> bytes:
    packed = wrap(payload, codec)
    verify(packed, payload, name)
    return packed


def verify(packed: bytes, expected_payload: bytes, name: str = "packed file") -> None:
    """Raise PackError unless `packed` compiles and unpacks to exactly `expected_payload`."""
    _compiles(packed, name)
    got = unpack(packed)
    if got is None:
        raise PackError(f"{name}: not a self-extracting file")
    if got[0] != expected_payload:
        raise PackError(f"{name}: payload (sha256 {sha256(got[0])}) differs from the source "
                        f"(sha256 {sha256(expected_payload)})")
    _compiles(got[0], f"{name} (payload)")


def verify_shipped(source: bytes, packed: bytes, name: str = "packed file") -> None:
    """Raise PackError unless `packed` is a stripped packing of `source`: it compiles, its payload
    compiles and has the source's syntax tree modulo docstrings and knob help, and defines the
    source's top-level names."""
    got = unpack(packed)
    if got is None:
        raise PackError(f"{name}: not a self-extracting file")
    verify(packed, got[0], name)
    check_stripped(source, got[0], name)
    check_top_level_names(source, got[0], name)


def available_codecs() -> tuple[str, ...]:
    try:
        _brotli()
    except PackError:
        return tuple(c for c in CODECS if c != "brotli")
    return CODECS


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sizes(source: bytes, name: str = "source") -> list[tuple[str, int, int | None]]:
    """(variant, bytes, compressed bytes) for each mode's payload (raw) and its packed file per codec."""
    rows: list[tuple[str, int, int | None]] = []
    payloads = {}
    for mode in MODES:
        try:
            payloads[mode] = make_payload(source, mode, name)
            rows.append((f"raw{MODE_SUFFIX[mode]}", len(payloads[mode]), None))
        except PackError as exc:
            rows.append((f"raw{MODE_SUFFIX[mode]} ({exc})", 0, None))
    for codec in CODECS:
        for mode, payload in payloads.items():
            try:
                compressed = compress(payload, codec)
            except PackError as exc:
                rows.append((f"{codec}+base85{MODE_SUFFIX[mode]} ({exc})", 0, None))
                continue
            packed = wrap_compressed(compressed, codec)
            verify(packed, payload, name)
            rows.append((f"{codec}+base85{MODE_SUFFIX[mode]}", len(packed), len(compressed)))
    return rows


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise PackError(f"{path}: cannot write it ({exc.strerror or exc})") from exc
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="records/pack.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Without -o, prints the raw, compressed and packed sizes of SOURCE.")
    p.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE,
                   help="script to pack (default: the repository's train_gpt.py)")
    p.add_argument("-o", "--output", type=Path, help="write the packed (or, with --unpack, the unpacked) file here")
    p.add_argument("--mode", choices=MODES, help=f"payload: plain (the source byte for byte), minify (syntax tree "
                   f"unchanged) or strip (also no docstrings or knob help; tree checked equal modulo those); "
                   f"default {DEFAULT_MODE}")
    p.add_argument("--minify", action="store_true", help="the same as --mode minify (older commands)")
    p.add_argument("--codec", choices=CODEC_CHOICES, default="auto", help="compressor (default: auto, the one "
                   "whose file is smaller; lzma is train_gpt.py's own wrapper, the log's code_bytes_packed)")
    p.add_argument("--unpack", action="store_true", help="SOURCE is a packed file: write or print its payload")
    return p


def _mode(args: argparse.Namespace) -> str:
    if args.minify and args.mode not in (None, "minify"):
        raise PackError(f"--minify and --mode {args.mode} disagree: give one of them")
    return "minify" if args.minify else args.mode or DEFAULT_MODE


def _unpack_command(args: argparse.Namespace, packed: bytes) -> int:
    got = unpack(packed)
    if got is None:
        raise PackError(f"{args.source}: not a self-extracting file (no base85 payload found)")
    payload, codec = got
    print(f"{args.source}: {len(packed):,} bytes, {codec} payload {len(payload):,} bytes, sha256 {sha256(payload)}")
    if args.output:
        atomic_write(args.output, payload)
        print(f"wrote {args.output}")
    return 0


def _sizes_command(path: Path, source: bytes) -> int:
    print(f"{path} (sha256 {sha256(source)})")
    for variant, n, compressed in sizes(source, str(path)):
        ratio = f"{n / len(source):6.1%}" if n else ""
        extra = f"  (compressed {compressed:,})" if compressed else ""
        print(f"  {variant:<26} {n:>9,} bytes {ratio}{extra}")
    reads = docstring_reads(_parse(source, str(path)))
    if reads:
        print(f"  stripped: docstrings kept, the code reads them (lines {', '.join(map(str, reads))})")
    return 0


def _strip_summary(source: bytes, name: str) -> str:
    tree = _parse(source, name)
    reads, helps = docstring_reads(tree), len(knob_help_args(tree))
    if reads:
        return (f"docstrings kept (the code reads them at lines {', '.join(map(str, reads))}), "
                f"{helps} knob help strings blanked")
    return f"{len(docstrings(tree))} docstrings removed, {helps} knob help strings blanked"


def _write_command(args: argparse.Namespace, source: bytes) -> int:
    mode, name = _mode(args), str(args.source)
    if args.output.resolve() == args.source.resolve():
        raise PackError(f"-o {args.output}: is the source itself; write the packed file elsewhere")
    _compiles(source, name)
    payload = make_payload(source, mode, name)
    if mode == "strip":
        check_top_level_names(source, payload, name)
    codecs = available_codecs() if args.codec == "auto" else (args.codec,)
    packed = {codec: pack_payload(payload, codec, name) for codec in codecs}
    codec = min(codecs, key=lambda c: len(packed[c]))  # ties go to lzma, train_gpt.py's own wrapper
    atomic_write(args.output, packed[codec])
    others = "".join(f"; {c}: {len(packed[c]):,}" for c in codecs if c != codec)
    print(f"wrote {args.output}: {len(packed[codec]):,} bytes ({mode}, {codec}{others}) from {len(source):,} "
          f"bytes; payload {len(payload):,} bytes, sha256 {sha256(payload)}"
          + (" = source" if payload == source else f" (source {sha256(source)})"))
    if mode == "strip":
        print(f"stripped: {_strip_summary(source, name)}; syntax tree otherwise equal, top-level names equal")
    print(f"run it as the script itself (python {args.output}); its logs then count bytes_code:{len(packed[codec])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if not args.source.is_file():
            raise PackError(f"{args.source}: no such file")
        source = args.source.read_bytes()
        if args.unpack:
            return _unpack_command(args, source)
        if unpack(source) is not None:
            raise PackError(f"{args.source}: already a self-extracting file; pack the readable source")
        if args.output is None:
            return _sizes_command(args.source, source)
        return _write_command(args, source)
    except PackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
