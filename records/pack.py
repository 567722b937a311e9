"""Pack train_gpt.py into a self-extracting script: fewer code bytes, the same program.

Usage:
    python records/pack.py                                  # sizes of train_gpt.py: raw, compressed, shipped
    python records/pack.py train_gpt.py -o train_gpt_shipped.py   # the shipped file: stripped, smaller codec
    python records/pack.py train_gpt.py -o shipped.py --no-rename   # stripped, function locals keep their names
    python records/pack.py train_gpt.py -o packed.py --mode plain --codec lzma   # payload = the source
    python records/pack.py train_gpt.py -o packed.py --wrapper base85   # an ASCII file (25% more bytes)
    python records/pack.py --unpack packed.py -o source.py  # the payload of a packed file

A packed file is one line of Python (after a coding cookie) that decompresses a string literal (raw
LZMA2 or Brotli) and runs the result with `exec(compile(payload, __file__, "exec"))`. The payload
therefore runs as `__main__` and sees the packed file as `__file__`, so `bytes_code` and `code_sha256` in
its logs are those of the packed file: the bytes that ship. The latin1 wrapper also hands the payload's
lines to linecache under that name, so `inspect.getsource` (what `@triton.jit` reads) and the traceback
module see the program rather than the wrapper (Python's own handler of an uncaught error reads the file).

Wrappers (`--wrapper`, default latin1):

- `latin1`: line 1 is the coding cookie `#coding:l1` (PEP 263; "l1" is Python's alias of Latin-1),
  line 2 holds the compressed bytes as a triple-quoted string literal, each byte one character (line
  feeds raw, so the literal spans lines), and turns it back into bytes with `.encode("l1")`. Only
  backslash, `\\r` (the tokenizer reads CR and CRLF as LF, inside literals too), NUL (`\\0`, or `\\x00`
  before an octal digit) and the quotes that would close the literal (the third of every run of the
  quote, and a run's last quote at the end; `"` or `'`, whichever needs fewer) are escaped: about 1%
  over the compressed size. The file is not UTF-8 text. unpack() also reads the one-line literal of
  files written before (latin1_line_literal).
- `base85`: the compressed bytes in base85 (ASCII, 25% over the compressed size), for whoever needs an
  ASCII file (`--wrapper base85`, or `wrapper="base85"` to pack(), pack_payload() and wrap()).

Modes (`--mode`; `-o` writes `strip`, latin1, with the smaller codec unless told otherwise):

- `plain`: the payload is the source byte for byte, so its sha256 is the source's.
- `minify`: comments, blank lines and trailing spaces are removed, indentation becomes one space per
  level, continuation lines lose their leading spaces, and every space between two tokens that is not
  needed goes (`a = f(x, y)` -> `a=f(x,y)`; kept between two word characters, as in `if x`; nothing
  inside a string or f-string is touched). The check: the token stream (type and text of every token
  but NL and comments) and the syntax tree are unchanged. `--minify` is this mode.
- `strip`: the source without these, written anew (`ast.unparse`) and then minified (as above, and
  lines inside brackets joined): the docstrings
  (module, class, function; a body left empty gets `pass`), the help text of every `knob(...)` call
  (it only feeds the README's knob table), every `hint=` string passed to a class the module defines
  (an error's advice: the message itself keeps what, the value and what is allowed) and the annotations of every function (parameters, *args,
  **kwargs, return) whose decorators are all in SAFE_DECORATORS. A function with any other decorator
  keeps its annotations (`torch.library.custom_op` infers its schema from them, `triton.jit` reads
  `tl.constexpr`), and class-level or variable annotations (dataclass fields) are never touched. And
  the locals of functions get short names (rename_locals; not with `--no-rename`): only variables that
  symtable says a function, lambda or comprehension (inside a def) assigns itself, that are no
  parameter, global, nonlocal, import, def or class name, and are used only by such scopes (a closure
  is renamed in every nested scope that uses it), in functions under SAFE_DECORATORS only and not
  reading their locals by name (locals(), vars(), dir(), eval, exec; FRAME_LOCALS_READERS such as a
  frame's f_locals turn renaming off). New names are a..z, A..Z, then two characters, the most used local first, never a
  keyword, builtin, module-level name or any name the function or a scope inside it spells. The check,
  independent of the renamer: the generated file's syntax tree equals the source's with exactly those
  removals, up to the names of renamable locals: canonical_tree names each one `<scope>@<k>` (decided
  by symtable on each file's own text, names resolved upward), so a local renamed onto a name the
  function reads, two locals merged, a parameter renamed or an occurrence missed is an error that names
  the function. When the code reads docstrings (`__doc__`, `getdoc`) every docstring is kept, and when
  it reads annotations (ANNOTATION_READERS, or an annotation-reading decorator such as `custom_op`
  called other than as a decorator) every annotation is kept; the output says so.

Every file written here is verified before it is written: the literal read back from the file (through
its syntax tree, which honours the coding cookie) is exactly the compressed bytes, the wrapper itself,
run with `compile` and `exec` intercepted, hands exactly the payload and `__file__` to them, both the
packed file and its payload compile, and a stripped payload, executed as a module, defines the same
top-level names as the source (this imports the program: it must have no side effects at import, as
train_gpt.py has none). Files are written atomically.
"""

from __future__ import annotations

import argparse
import ast
import base64
import builtins
import codecs
import hashlib
import io
import itertools
import keyword
import linecache
import lzma
import os
import re
import string
import symtable
import sys
import tokenize
import types
from pathlib import Path

CODECS = ("lzma", "brotli")
CODEC_CHOICES = ("auto", *CODECS)  # auto: whichever ships fewer bytes
WRAPPERS = ("latin1", "base85")
DEFAULT_WRAPPER = "latin1"  # what -o, pack(), pack_payload() and wrap() write unless told otherwise
MODES = ("plain", "minify", "strip")  # the order of the sizes table
DEFAULT_MODE = "strip"
MODE_SUFFIX = {"plain": "", "minify": ", minified", "strip": ", stripped"}  # labels of the sizes table
BROTLI_QUALITY = 11
BROTLI_LGWIN = 24
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9}]
LATIN1 = "l1"  # the shortest name Python knows for Latin-1, in the cookie and in .encode()
LATIN1_COOKIE = b"#coding:" + LATIN1.encode() + b"\n"
NUL_BEFORE_OCTAL = re.compile(rb"\x00(?=[0-7])")  # "\0" then a digit 0-7 would read as one octal escape
MAX_WRAPPER_STATEMENTS = 4  # a longer file is a program, not a wrapper
DEFAULT_SOURCE = Path(__file__).resolve().parent.parent / "train_gpt.py"
DOC_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
FUNCTION_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef)
DOCSTRING_READERS = frozenset({"__doc__", "getdoc"})  # names through which code can read a docstring
ANNOTATION_READERS = frozenset({"__annotations__", "get_type_hints", "signature", "get_annotations"})
# Decorators that read the annotations of the function they get; called other than as a decorator
# (`custom_op("x")(f)`), nothing tells which function's annotations they read, so all are kept.
ANNOTATION_DECORATORS = frozenset({"custom_op", "register_fake", "jit", "infer_schema", "singledispatch",
                                   "singledispatchmethod"})  # "jit": triton.jit, torch.jit.script
SAFE_DECORATORS = frozenset({"staticmethod", "classmethod", "property", "torch.no_grad()",
                             "torch.inference_mode()", "functools.cache"})  # as ast.unparse writes them; none
# reads annotations (functools.cache copies __annotations__ onto its wrapper, which nothing reads)
SAFE_DECORATOR_ATTRS = frozenset({"setter", "getter", "deleter"})  # `@<name>.setter` of a property
KNOB_FUNCTION = "knob"  # the module-level def whose string argument KNOB_HELP_PARAM strip blanks
KNOB_HELP_PARAM = "help"
HINT_PARAM = "hint"  # `raise SomeError(message, hint="what to do")`: advice the shipped file drops
SNIPPET_CHARS = 60  # how much of a differing statement an error quotes
SKIPPED_TOKENS = frozenset({tokenize.NL, tokenize.COMMENT})  # what the token check ignores
LAYOUT_TOKENS = frozenset({tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT,
                           tokenize.ENDMARKER})  # no text between two tokens to compact
FSTRING_START = getattr(tokenize, "FSTRING_START", None)  # Python 3.12+: f-strings are split into tokens
FSTRING_END = getattr(tokenize, "FSTRING_END", None)
STRING_PREFIXES = frozenset({"r", "u", "f", "b", "t", "br", "rb", "fr", "rf", "tr", "rt"})  # lower-cased
OPERATORS = tuple(tokenize.EXACT_TOKEN_TYPES)
OPEN_BRACKETS, CLOSE_BRACKETS = frozenset("([{"), frozenset(")]}")
# The files, %s standing for the literal (latin1: triple-quoted, so line 2 spans lines), e.g.
#   #coding:l1
#   import brotli as R,linecache as C;P=R.decompress("""<compressed bytes>""".encode("l1"));C.cache[__file__]=
#   0,None,P.decode().splitlines(1),0;exec(compile(P,__file__,"exec"))
# The latin1 files also give linecache the payload's lines under the file's name: inspect.getsource
# (which @triton.jit calls on every kernel) and the traceback module read the program, not the wrapper. An
# entry whose mtime is None is never dropped by linecache.checkcache.
_RUN = b',__file__,"exec"))\n'  # exec(compile(<payload>, __file__, "exec")): the payload runs as this file
_LINES = b';C.cache[__file__]=0,None,P.decode().splitlines(1),0;exec(compile(P' + _RUN
_LATIN1_BYTES = b'.encode("' + LATIN1.encode() + b'")'
_RAW_LZMA2 = b"format=%d,filters=[{'id':%d}]" % (lzma.FORMAT_RAW, lzma.FILTER_LZMA2)  # the constants, as numbers
WRAPPERS_BY_FORM = {  # (wrapper, codec) -> file
    ("base85", "lzma"): b'import lzma as L,base64 as B\nexec(compile(L.decompress(B.b85decode("%s"),'
                        b'format=L.FORMAT_RAW,filters=[{"id":L.FILTER_LZMA2}])' + _RUN,
    ("base85", "brotli"): b'import brotli as R,base64 as B\nexec(compile(R.decompress(B.b85decode("%s"))' + _RUN,
    ("latin1", "lzma"): LATIN1_COOKIE + b"import lzma as L,linecache as C;P=L.decompress(%s" + _LATIN1_BYTES + b","
                        + _RAW_LZMA2 + b")" + _LINES,
    ("latin1", "brotli"): LATIN1_COOKIE + b"import brotli as R,linecache as C;P=R.decompress(%s" + _LATIN1_BYTES
                          + b")" + _LINES,
}


class PackError(Exception):
    """A file cannot be packed, minified or unpacked; the message names it and says why."""


# ---------------------------------------------------------------------------------------------
# Codecs and the wrappers
# ---------------------------------------------------------------------------------------------


def _brotli():
    try:
        import brotli
    except ImportError as exc:  # brotli is in requirements.txt; only a bare environment lacks it
        raise PackError("--codec brotli needs the brotli module (pip install brotli)") from exc
    return brotli


def compress(payload: bytes, codec: str) -> bytes:
    if codec == "lzma":
        return lzma.compress(payload, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)  # raw LZMA2, no .xz container
    if codec == "brotli":
        return _brotli().compress(payload, quality=BROTLI_QUALITY, lgwin=BROTLI_LGWIN)
    raise PackError(f"codec {codec!r} is not allowed: expected one of {', '.join(CODECS)}")


def _check_wrapper(wrapper: str) -> None:
    if wrapper not in WRAPPERS:
        raise PackError(f"--wrapper {wrapper!r} is not allowed: expected one of {', '.join(WRAPPERS)}")


def wrap(payload: bytes, codec: str, wrapper: str = DEFAULT_WRAPPER) -> bytes:
    """The self-extracting file for `payload`."""
    return wrap_compressed(compress(payload, codec), codec, wrapper)


def wrap_compressed(compressed: bytes, codec: str, wrapper: str = DEFAULT_WRAPPER) -> bytes:
    """The self-extracting file for an already compressed payload: `decompress(<literal>)` compiled
    under the file's own name and executed (WRAPPERS_BY_FORM)."""
    _check_wrapper(wrapper)
    if codec not in CODECS:
        raise PackError(f"codec {codec!r} is not allowed: expected one of {', '.join(CODECS)}")
    literal = base64.b85encode(compressed) if wrapper == "base85" else latin1_literal(compressed)
    return WRAPPERS_BY_FORM[wrapper, codec] % literal


def _escape_common(data: bytes) -> bytes:
    """Backslash, CR (the tokenizer reads CR and CRLF as LF, in literals too) and NUL (no source may hold
    it) escaped: what any string literal of a Latin-1 file needs."""
    data = data.replace(b"\\", b"\\\\").replace(b"\r", b"\\r")  # backslash first
    return NUL_BEFORE_OCTAL.sub(rb"\\x00", data).replace(b"\x00", b"\\0")


def latin1_literal(data: bytes) -> bytes:
    """`data` as a triple-quoted Python string literal of a Latin-1 file: each byte is the character of
    the same number, line breaks (LF) raw, escaped only where the literal needs it (_escape_common, and
    the quote where three in a row or one at the end would close the literal: the third of every run
    and a run's last quote at the end), with whichever quote needs fewer escapes."""
    data = _escape_common(data)
    best = None
    for quote in (b'"', b"'"):
        def broken(run: re.Match, quote=quote) -> bytes:
            n, last = len(run.group()), run.end() == len(data)
            return b"".join(b"\\" + quote if i % 3 == 2 or (last and i == n - 1) else quote for i in range(n))
        body = re.sub(re.escape(quote) + b"+", broken, data)
        if best is None or len(body) < len(best[1]):
            best = quote, body
    quote, body = best
    return quote * 3 + body + quote * 3


def latin1_line_literal(data: bytes) -> bytes:
    """`data` as a one-line string literal of a Latin-1 file (the form files written before the
    triple-quoted one hold; unpack reads both): LF and the rarer quote escaped too."""
    quote = b'"' if data.count(b'"') <= data.count(b"'") else b"'"
    return quote + _escape_common(data).replace(b"\n", b"\\n").replace(quote, b"\\" + quote) + quote


def _is_latin1(name: str) -> bool:
    try:
        return codecs.lookup(name).name == "iso8859-1"
    except LookupError:
        return False


def _string_constant(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes))


def _literal(tree: ast.AST) -> tuple[bytes, str] | None:
    """(compressed bytes, wrapper) from the first `<x>.b85decode("...")` or `"...".encode("<latin-1>")`
    call of a wrapper's syntax tree, or None."""
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args):
            continue
        func, arg = node.func, node.args[0]
        if func.attr == "b85decode" and _string_constant(arg):
            text = arg.value.encode("ascii", "replace") if isinstance(arg.value, str) else arg.value
            try:
                return base64.b85decode(text), "base85"
            except ValueError:
                return None
        if (func.attr == "encode" and isinstance(func.value, ast.Constant) and isinstance(func.value.value, str)
                and isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _is_latin1(arg.value)):
            try:
                return func.value.value.encode("latin-1"), "latin1"
            except UnicodeEncodeError:  # a character past U+00FF: not bytes spelled in Latin-1
                return None
    return None


def _decoders() -> list[tuple[str, object]]:
    """(codec, decompress) for every format a public wrapper may hold, the likeliest first."""
    import zlib
    found = [("lzma", lambda b: lzma.decompress(b, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])),
             ("lzma", lzma.decompress)]  # raw LZMA2, then .xz / .lzma
    try:
        import brotli
        found.append(("brotli", brotli.decompress))
    except ImportError:
        pass
    return found + [("zlib", zlib.decompress)]


def unpack_wrapper(packed: bytes) -> tuple[bytes, str, bytes, str] | None:
    """(payload, codec, compressed bytes, wrapper) of a self-extracting file, or None (see unpack)."""
    try:
        tree = ast.parse(packed)  # from bytes: a coding cookie is honoured
    except (SyntaxError, ValueError):
        return None
    if len(tree.body) > MAX_WRAPPER_STATEMENTS:
        return None
    found = _literal(tree)
    if found is None:
        return None
    compressed, wrapper = found
    for codec, decompress in _decoders():
        try:
            return decompress(compressed), codec, compressed, wrapper
        except Exception:  # noqa: BLE001 - any decoder error means "not this codec"
            continue
    return None


def unpack(packed: bytes) -> tuple[bytes, str] | None:
    """(payload, codec) of a self-extracting file, or None when `packed` is not one.

    Reads the literal from the syntax tree (nothing is executed): a base85 string passed to
    `b85decode`, or a string turned into bytes with `.encode("l1")` (any name of Latin-1), and tries raw
    LZMA2, .xz/.lzma, Brotli and zlib, so the wrappers public records ship (PR #1394 style) are
    recognised too. Only a short file (at most MAX_WRAPPER_STATEMENTS statements) counts as a wrapper."""
    got = unpack_wrapper(packed)
    return None if got is None else got[:2]


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


# ---------------------------------------------------------------------------------------------
# Compaction: the spaces and the line breaks inside brackets that no token needs
# ---------------------------------------------------------------------------------------------


def _tokens(text: str, name: str) -> list[tokenize.TokenInfo]:
    try:
        return list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (SyntaxError, tokenize.TokenError) as exc:
        raise PackError(f"{name}: cannot be tokenized: {exc}") from exc


def _string_like(tok: tokenize.TokenInfo) -> bool:
    return tok.type in (tokenize.STRING, FSTRING_START, FSTRING_END)


def needs_space(a: tokenize.TokenInfo, b: tokenize.TokenInfo) -> bool:
    """Whether tokens `a` and `b`, written without a space, could read as other tokens."""
    if _word_char(a.string[-1:]) and _word_char(b.string[:1]):
        return True  # `if x`, `1 if`, `return x`
    if a.type == tokenize.NUMBER and b.string[:1] == ".":
        return True  # `1 .real`, not the number `1.`
    if a.type == tokenize.NAME and a.string.lower() in STRING_PREFIXES and _string_like(b):
        return True  # `r "x"`, not the raw string `r"x"`
    if _string_like(a) and _string_like(b) and a.string[-1:] == b.string[:1]:
        return True  # `'' 'x'`, not the start of `'''x'`
    if a.type == tokenize.OP and b.type == tokenize.OP:
        joined = a.string + b.string  # `* *`, `. . .`: a longer operator, or the start of one
        return any(len(op) > len(a.string) and (joined.startswith(op) or op.startswith(joined)) for op in OPERATORS)
    return a.type == tokenize.ERRORTOKEN or b.type == tokenize.ERRORTOKEN


def compact(source: bytes, name: str = "source") -> bytes:
    """`source` (minified: "\\n" line endings) without the spaces between two tokens on one line that no
    token needs (see needs_space); nothing inside a string or f-string is touched. Raises PackError unless
    check_same_tokens passes."""
    text = source.decode("utf-8")
    lines = text.split("\n")
    cuts: list[tuple[int, int, int, str]] = []  # (row, start column, end column, replacement)
    prev, fstring_depth = None, 0
    for tok in _tokens(text, name):
        if tok.type in LAYOUT_TOKENS:
            continue
        if fstring_depth == 0 and prev is not None and prev.end[0] == tok.start[0]:
            (row, start), end = prev.end, tok.start[1]
            gap = lines[row - 1][start:end]
            want = " " if needs_space(prev, tok) else ""
            if gap and gap != want and gap.strip(" \t\f") == "":
                cuts.append((row, start, end, want))
        fstring_depth += (tok.type == FSTRING_START) - (tok.type == FSTRING_END)
        prev = tok
    for row, start, end, want in reversed(cuts):  # right to left: the columns stay valid
        lines[row - 1] = lines[row - 1][:start] + want + lines[row - 1][end:]
    compacted = "\n".join(lines).encode("utf-8")
    check_same_tokens(source, compacted, name)
    return compacted


def _significant(tokens: list[tokenize.TokenInfo]) -> list[tokenize.TokenInfo]:
    return [t for t in tokens if t.type not in SKIPPED_TOKENS]


def check_same_tokens(before: bytes, after: bytes, name: str = "source") -> None:
    """Raise PackError unless `after` has the tokens of `before` (type and text; NL and comments aside) and
    the same syntax tree; the message names the first token that differs."""
    old = _significant(_tokens(before.decode("utf-8"), name))
    new = _significant(_tokens(after.decode("utf-8"), f"{name} (compacted)"))
    for a, b in zip(old, new):
        if (a.type, a.string) != (b.type, b.string):
            raise PackError(f"{name}: compaction changed a token: line {a.start[0]} `{a.string}` "
                            f"({tokenize.tok_name[a.type]}) became line {b.start[0]} `{b.string}` "
                            f"({tokenize.tok_name[b.type]}) in `{_snippet(b.line)}`")
    if len(old) != len(new):
        raise PackError(f"{name}: compaction changed the number of tokens ({len(old)} -> {len(new)})")
    if ast.dump(_parse(before, name)) != ast.dump(_parse(after, f"{name} (compacted)")):
        raise PackError(f"{name}: compaction changed the syntax tree")


def _snippet(text: str) -> str:
    text = text.strip()
    return text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS] + "..."


def join_bracket_lines(source: bytes, name: str = "source") -> bytes:
    """Every line break inside (), [] or {} removed: the continuation joins the line before it, with a
    space only where needs_space wants one. Line endings must be "\\n" (minify's output)."""
    text = source.decode("utf-8")
    breaks = _bracket_breaks(text, name)
    out: list[str] = []
    for row, line in enumerate(text.rstrip("\n").split("\n"), start=1):
        if row - 1 in breaks:
            out[-1] += (" " if breaks[row - 1] else "") + line.lstrip()
        else:
            out.append(line)
    return ("\n".join(out) + "\n").encode("utf-8")


def _bracket_breaks(text: str, name: str) -> dict[int, bool]:
    """Row -> whether a space must join it to the next, for each row whose line break lies inside
    brackets (a tokenize NL token at bracket depth > 0)."""
    rows, depth, fstrings, prev, pending = {}, 0, 0, None, None
    for tok in _tokens(text, name):
        inside, fstrings = fstrings > 0, fstrings + (tok.type == FSTRING_START) - (tok.type == FSTRING_END)
        if inside and fstrings > 0:
            continue  # within an f-string (3.12+ tokens): nothing is joined
        if tok.type == tokenize.NL and depth > 0:
            pending = tok.start[0]
        elif tok.type not in LAYOUT_TOKENS:
            if pending is not None:
                rows[pending], pending = needs_space(prev, tok), None
            depth += (tok.type == tokenize.OP and tok.string in OPEN_BRACKETS) - (
                tok.type == tokenize.OP and tok.string in CLOSE_BRACKETS)
            prev = tok
    return rows


def _word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


# ---------------------------------------------------------------------------------------------
# Stripping: docstrings, knob help, hints and annotations removed, everything else checked unchanged
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


def _word(node: ast.AST, strings: bool = True) -> str | None:
    """The name a Name or Attribute node spells, or (with strings) a string constant's value."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if strings and isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _reads(tree: ast.Module, words: frozenset[str]) -> list[int]:
    return [node.lineno for node in ast.walk(tree) if _word(node) in words]


def docstring_reads(tree: ast.Module) -> list[int]:
    """Lines where the code may read a docstring at run time: a name, attribute or string in
    DOCSTRING_READERS (`__doc__`, `inspect.getdoc`, `getattr(x, "__doc__")`)."""
    return _reads(tree, DOCSTRING_READERS)


def annotation_reads(tree: ast.Module) -> list[int]:
    """Lines where the code may read annotations at run time: a name, attribute or string in
    ANNOTATION_READERS (`__annotations__`, `inspect.signature`, ...), or a name in ANNOTATION_DECORATORS
    used other than in a decorator (`torch.library.custom_op("x")(f)` reads f's annotations)."""
    in_decorators = {id(part) for fn in ast.walk(tree) if isinstance(fn, (*FUNCTION_DEFS, ast.ClassDef))
                     for decorator in fn.decorator_list for part in ast.walk(decorator)}
    lines = _reads(tree, ANNOTATION_READERS)
    lines += [node.lineno for node in ast.walk(tree)
              if _word(node, strings=False) in ANNOTATION_DECORATORS and id(node) not in in_decorators]
    return sorted(set(lines))


def _safe_decorator(node: ast.expr) -> bool:
    return ast.unparse(node) in SAFE_DECORATORS or (
        isinstance(node, ast.Attribute) and node.attr in SAFE_DECORATOR_ATTRS and isinstance(node.value, ast.Name))


def _parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.arg]:
    a = fn.args
    return [p for p in (*a.posonlyargs, *a.args, a.vararg, *a.kwonlyargs, a.kwarg) if p is not None]


def _annotations(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.expr]:
    return [p.annotation for p in _parameters(fn) if p.annotation is not None] + ([fn.returns] if fn.returns else [])


def annotated_functions(tree: ast.Module) -> tuple[list[ast.FunctionDef], list[ast.FunctionDef]]:
    """(strippable, kept): the functions with annotations whose decorators are all in SAFE_DECORATORS,
    and those with any other decorator (it may read them)."""
    strippable, kept = [], []
    for fn in ast.walk(tree):
        if isinstance(fn, FUNCTION_DEFS) and _annotations(fn):
            (strippable if all(map(_safe_decorator, fn.decorator_list)) else kept).append(fn)
    return strippable, kept


def strippable_functions(tree: ast.Module) -> list[ast.FunctionDef]:
    """The functions strip removes annotations from: none when the code reads annotations."""
    return [] if annotation_reads(tree) else annotated_functions(tree)[0]


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


def hint_args(tree: ast.Module) -> list[tuple[ast.Call, ast.keyword]]:
    """Every `hint="..."` (a string or f-string) passed to a class the module defines, as in
    `raise ConfigError(f"X={x!r} is not allowed: ...", hint="set Y")`: the message keeps what, the value
    and what is allowed; the hint only says what to do, and the shipped file leaves it out."""
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in classes:
            found += [(node, k) for k in node.keywords if k.arg == HINT_PARAM and (
                isinstance(k.value, ast.JoinedStr) or (isinstance(k.value, ast.Constant)
                                                       and isinstance(k.value.value, str)))]
    return found


def strip_tree(tree: ast.Module) -> ast.Module:
    """`tree`, changed in place, as the stripped file must parse: docstrings removed (a body left empty
    holds `pass`) unless the code reads docstrings, every knob help string blanked, every hint_args
    argument removed, and the annotations of strippable_functions removed."""
    if not docstring_reads(tree):
        for body, doc in docstrings(tree):
            body.remove(doc)
            if not body:
                body.append(ast.Pass())
    for arg in knob_help_args(tree):
        arg.value, arg.kind = "", None
    for call, hint in hint_args(tree):
        call.keywords.remove(hint)
    for fn in strippable_functions(tree):
        for p in _parameters(fn):
            p.annotation = None
        fn.returns = None
    return tree


def _unparse(tree: ast.Module, name: str) -> str:
    """`tree` as source text (ast.unparse), checked to parse back to the same tree."""
    try:
        text = ast.unparse(tree) + "\n"
        same = ast.dump(ast.parse(text)) == ast.dump(tree)
    except (SyntaxError, ValueError, RecursionError) as exc:
        raise PackError(f"{name}: the stripped tree cannot be written as source: {exc}") from exc
    if not same:
        raise PackError(f"{name}: ast.unparse does not give back the stripped syntax tree; pack with --mode minify")
    return text


def strip_source(source: bytes, name: str = "source", rename: bool = True) -> bytes:
    """The stripped source (see the module docstring); raises PackError unless the token check of the
    joined and compacted lines and check_stripped pass."""
    return strip_with_stats(source, name, rename)[0]


def strip_with_stats(source: bytes, name: str = "source", rename: bool = True) -> tuple[bytes, Renamed]:
    """(the stripped source, what rename_locals renamed): strip_tree, rename_locals (unless `rename` is
    false), ast.unparse, then minify, join_bracket_lines and compact, each checked; then check_stripped."""
    expected = strip_tree(_parse(source, name))
    text = _unparse(expected, name)
    renamed = Renamed()
    if rename:
        tree = _parse(text.encode("utf-8"), name)
        renamed = rename_locals(tree, text, name)
        text = _unparse(tree, name)
        if renamed.blocked:  # say it with the source's line numbers
            renamed.blocked = renaming_blocked(expected, _ScopeBuilder(expected, name).aliased)
    minified = minify(text.encode("utf-8"), name)
    stripped = compact(join_bracket_lines(minified, name), name)
    check_same_tokens(minified, stripped, name)
    check_stripped(source, stripped, name)
    return stripped, renamed


def check_stripped(source: bytes, generated: bytes, name: str = "source") -> None:
    """Raise PackError unless `generated` parses to the syntax tree of `source` with its docstrings, knob
    help and strippable annotations removed (strip_tree), up to the names of renamable locals
    (canonical_tree: each tree is read with symtable on its own text). Any other difference is an error
    that names the function and quotes the first difference."""
    expected_tree = strip_tree(_parse(source, name))  # its lines are the source's, for the message
    expected = _unparse(expected_tree, name)
    got = generated.decode("utf-8", "replace")
    want_tree, got_tree = canonical_tree(expected, name), canonical_tree(got, f"{name} (stripped)")
    if ast.dump(want_tree) != ast.dump(got_tree):
        where = _first_difference(want_tree, got_tree, expected_tree, _parse(generated, name))
        raise PackError(f"{name}: the stripped program differs from the source beyond docstrings, knob help, hints, "
                        f"annotations and local names: {where}")


# ---------------------------------------------------------------------------------------------
# Renaming function locals (strip): symtable says what is local, canonical_tree checks the result
# ---------------------------------------------------------------------------------------------

COMPREHENSIONS = {ast.ListComp: "listcomp", ast.SetComp: "setcomp", ast.DictComp: "dictcomp",
                  ast.GeneratorExp: "genexpr"}  # node -> the name symtable gives its scope
LOCALS_READERS = frozenset({"locals", "vars", "dir", "eval", "exec"})  # builtins that see the caller's locals
WITH_ARGUMENT_HARMLESS = frozenset({"vars", "dir"})  # ... except these, called with an argument
# Reading a frame's locals, or a code object's local names, by name: then no local is renamed anywhere.
FRAME_LOCALS_READERS = frozenset({"f_locals", "getargvalues", "co_varnames", "co_cellvars", "co_freevars"})
SCOPE_TYPES = ("module", "function", "class")  # symtable's blocks that the renamer maps to syntax nodes
RESERVED_NAMES = frozenset({*keyword.kwlist, *getattr(keyword, "softkwlist", ()), *dir(builtins)})
SHORT_FIRST = string.ascii_lowercase + string.ascii_uppercase  # new names: a..z, A..Z, then two characters
SHORT_REST = SHORT_FIRST + string.digits + "_"
CANONICAL = "{scope}@{k}"  # a renamable local's name in canonical_tree: never an identifier


class Renamed:
    """What rename_locals did: how many locals it renamed (of them, how many of lambdas and comprehensions),
    in how many functions (a lambda or comprehension counts as part of the def it lies in)."""

    def __init__(self):
        self.locals = 0
        self.functions: set[str] = set()  # qualified names of the defs whose locals were renamed
        self.comprehensions = 0
        self.blocked: str | None = None  # why nothing was renamed (renaming_blocked)

    def __str__(self) -> str:
        if self.blocked:
            return f"no local renamed ({self.blocked})"
        return (f"{self.locals} locals renamed in {len(self.functions)} functions"
                + (f" ({self.comprehensions} of them of comprehensions or lambdas)" if self.comprehensions else ""))


class _Scope:
    """One symtable block (module, class, function, lambda, comprehension) and its syntax: the name
    occurrences that are variables (`refs`: (node, field, order), field being `id` of a Name, `name` of an
    `except ... as`, a match capture) and every name its own code spells (`spelled`)."""

    def __init__(self, node: ast.AST, kind: str, parent: _Scope | None, excluded: bool = False):
        self.node, self.kind, self.parent, self.excluded = node, kind, parent, excluded
        self.children: list[_Scope] = []
        self.refs: list[tuple[ast.AST, str, int]] = []
        self.spelled: set[str] = set()
        self.dynamic = False  # calls locals(), vars(), dir(), eval or exec: its names are data
        self.table: symtable.SymbolTable | None = None
        self.symbols: dict[str, symtable.Symbol] = {}
        if parent is not None:
            parent.children.append(self)

    @property
    def renamable(self) -> bool:
        """A function, lambda or comprehension whose locals may be renamed."""
        return self.kind == "function" and not self.excluded and not self.dynamic

    def qualname(self) -> str:
        parts, scope = [], self
        while scope.parent is not None:
            node = scope.node
            parts.append(getattr(node, "name", None) or COMPREHENSIONS.get(type(node), "lambda"))
            scope = scope.parent
        return ".".join(reversed(parts)) or "<module>"

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


def _in_function(scope: _Scope) -> bool:
    """Whether a lambda or comprehension in `scope` lies in a def (not in a class body or at module level,
    which are left as they are), through other lambdas and comprehensions."""
    while scope.kind == "function" and not isinstance(scope.node, FUNCTION_DEFS):
        scope = scope.parent
    return scope.kind == "function"


def _future_annotations(tree: ast.Module) -> bool:
    return any(isinstance(s, ast.ImportFrom) and s.module == "__future__"
               and any(a.name == "annotations" for a in s.names) for s in tree.body)


class _ScopeBuilder:
    """The scopes of a module, each holding the syntax that symtable puts in it: defaults, annotations,
    decorators and class bases in the enclosing scope, a comprehension's first iterable too; children in
    the order symtable creates them."""

    def __init__(self, tree: ast.Module, name: str):
        self.name = name
        self.opaque_annotations = _future_annotations(tree)  # strings at run time: names in them are no variables
        self.order = 0
        self.aliased: list[int] = []  # lines naming a LOCALS_READERS builtin other than in a call
        self.calls: dict[int, bool] = {}  # id of a LOCALS_READERS Name called -> harmless (vars(x), dir(x))
        self.root = _Scope(tree, "module", None)
        for stmt in tree.body:
            self.visit(stmt, self.root)

    def ref(self, scope: _Scope, node: ast.AST, field: str) -> None:
        value = getattr(node, field)
        if value is not None:
            scope.refs.append((node, field, self.order))
            scope.spelled.add(value)
            self.order += 1

    def annotation(self, node: ast.expr, scope: _Scope) -> None:
        if self.opaque_annotations:
            scope.spelled.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name))
        else:
            self.visit(node, scope)

    def visit(self, node: ast.AST, scope: _Scope) -> None:
        if getattr(node, "type_params", None) or type(node).__name__ == "TypeAlias":
            raise PackError(f"{self.name}: line {node.lineno}: type parameters are not handled by the renamer; "
                            f"pack with --no-rename")
        if isinstance(node, (*FUNCTION_DEFS, ast.Lambda)):
            a = node.args
            for default in [*a.defaults, *a.kw_defaults]:
                if default is not None:
                    self.visit(default, scope)
            if isinstance(node, ast.Lambda):
                inner = _Scope(node, "function", scope, scope.excluded or not _in_function(scope))
                inner.spelled.update(p.arg for p in _parameters(node))
                self.visit(node.body, inner)
                return
            scope.spelled.add(node.name)
            for p in _parameters(node):
                if p.annotation is not None:
                    self.annotation(p.annotation, scope)
            if node.returns is not None:
                self.annotation(node.returns, scope)
            for decorator in node.decorator_list:
                self.visit(decorator, scope)
            excluded = scope.excluded or not all(map(_safe_decorator, node.decorator_list))
            inner = _Scope(node, "function", scope, excluded)
            inner.spelled.update(p.arg for p in _parameters(node))
            for stmt in node.body:
                self.visit(stmt, inner)
        elif isinstance(node, ast.ClassDef):
            scope.spelled.add(node.name)
            for part in [*node.bases, *(k.value for k in node.keywords), *node.decorator_list]:
                self.visit(part, scope)
            inner = _Scope(node, "class", scope, scope.excluded)
            for stmt in node.body:
                self.visit(stmt, inner)
        elif isinstance(node, tuple(COMPREHENSIONS)):
            first, *rest = node.generators
            self.visit(first.iter, scope)  # evaluated in the enclosing scope
            inner = _Scope(node, "function", scope, scope.excluded or not _in_function(scope))
            for part in [first.target, *first.ifs, *(p for g in rest for p in (g.target, g.iter, *g.ifs))]:
                self.visit(part, inner)
            for part in ([node.value, node.key] if isinstance(node, ast.DictComp) else [node.elt]):
                self.visit(part, inner)
        elif isinstance(node, ast.AnnAssign):
            self.visit(node.target, scope)
            self.annotation(node.annotation, scope)
            if node.value is not None:
                self.visit(node.value, scope)
        elif isinstance(node, ast.Name):
            if node.id in LOCALS_READERS:
                if id(node) not in self.calls:
                    self.aliased.append(node.lineno)
                elif not self.calls[id(node)]:
                    self._dynamic(scope)
            self.ref(scope, node, "id")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in LOCALS_READERS:
            self.calls[id(node.func)] = node.func.id in WITH_ARGUMENT_HARMLESS and bool(node.args or node.keywords)
            self.generic(node, scope)
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)):
            self.ref(scope, node, "name")
            self.generic(node, scope)
        elif isinstance(node, ast.MatchMapping):
            self.generic(node, scope)
            self.ref(scope, node, "rest")
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            scope.spelled.update(node.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            scope.spelled.update((a.asname or a.name).split(".")[0] for a in node.names if a.name != "*")
        else:
            self.generic(node, scope)

    @staticmethod
    def _dynamic(scope: _Scope) -> None:
        """`scope` reads its locals by name; a comprehension's locals() may be its function's (PEP 709)."""
        scope.dynamic = True
        while isinstance(scope.node, tuple(COMPREHENSIONS)) and scope.parent is not None:
            scope = scope.parent
            scope.dynamic = True

    def generic(self, node: ast.AST, scope: _Scope) -> None:
        for child in ast.iter_child_nodes(node):
            self.visit(child, scope)


def _table_key(scope: _Scope) -> tuple[str, str, int]:
    node = scope.node
    name = getattr(node, "name", None) or COMPREHENSIONS.get(type(node), "lambda")
    return scope.kind, name, node.lineno


def _private(name: str) -> bool:
    """A name the compiler mangles inside a class (`__x`): symtable knows it by another name."""
    return name.startswith("__") and not name.endswith("__")


def _block_type(table: symtable.SymbolTable) -> str:
    kind = table.get_type()
    return str(getattr(kind, "value", kind)).lower()  # a string before Python 3.13, an enum since


def _inline(scope: _Scope, child: _Scope) -> list[_Scope]:
    """Merge a comprehension symtable has no block for (Python 3.12+ inlines list, set and dict
    comprehensions, PEP 709) into `scope`: its names are looked up in `scope`'s block, where symtable
    put them, so renaming treats them as the function's (consistently: the comprehension stays isolated
    at run time, whatever its variables are called). Returns its children, now `scope`'s."""
    scope.refs += child.refs
    scope.spelled |= child.spelled
    scope.dynamic |= child.dynamic
    for grandchild in child.children:
        grandchild.parent = scope
    return child.children


def _attach(scope: _Scope, table: symtable.SymbolTable, name: str) -> None:
    """Pair each scope with its symtable block: the same kind, name and line, in the same order
    (comprehensions without a block inlined), and every variable the syntax names known to the block."""
    blocks = [t for t in table.get_children() if _block_type(t) in SCOPE_TYPES]
    pending, matched = list(scope.children), []
    while pending:
        child = pending.pop(0)
        block = blocks[len(matched)] if len(matched) < len(blocks) else None
        key = None if block is None else (_block_type(block), block.get_name(), block.get_lineno())
        if key == _table_key(child):
            matched.append(child)
        elif isinstance(child.node, tuple(COMPREHENSIONS)):
            pending[:0] = _inline(scope, child)
        else:
            raise PackError(f"{name}: the scopes in {scope.qualname()} do not match symtable's: "
                            f"{_table_key(child)} vs {key}; pack with --no-rename")
    if len(matched) != len(blocks):
        raise PackError(f"{name}: symtable has more scopes in {scope.qualname()} than the syntax; pack with "
                        f"--no-rename")
    scope.children = matched
    scope.table = table
    scope.symbols = {s.get_name(): s for s in table.get_symbols()}
    unknown = sorted({getattr(n, f) for n, f, _ in scope.refs} - set(scope.symbols))
    if any(not _private(n) for n in unknown):
        raise PackError(f"{name}: symtable does not know {unknown} in {scope.qualname()} (line "
                        f"{getattr(scope.node, 'lineno', 0)}); pack with --no-rename")
    for child, block in zip(matched, blocks):
        _attach(child, block, name)


def scopes(tree: ast.Module, text: str, name: str) -> tuple[_Scope, list[int]]:
    """(the module scope, with every block matched to symtable's run on `text`, which must be the source
    of `tree`; lines where a LOCALS_READERS builtin is named other than in a call)."""
    builder = _ScopeBuilder(tree, name)
    try:
        table = symtable.symtable(text, name, "exec")
    except (SyntaxError, ValueError) as exc:
        raise PackError(f"{name}: symtable cannot read it: {exc}") from exc
    _attach(builder.root, table, name)
    return builder.root, builder.aliased


def renaming_blocked(tree: ast.Module, aliased: list[int]) -> str | None:
    """Why no local may be renamed anywhere, or None: the code reads frames' locals by name, or names
    locals()/vars()/dir()/eval/exec other than by calling them."""
    reads = _reads(tree, FRAME_LOCALS_READERS)
    if reads:
        return f"the code may read frames' locals at lines {', '.join(map(str, reads))}"
    if aliased:
        return (f"locals(), vars(), dir(), eval or exec named other than in a call at lines "
                f"{', '.join(map(str, aliased))}")
    return None


def _renamable_symbol(symbol: symtable.Symbol) -> bool:
    """A local the function assigns itself: not a parameter (keyword calls use its name), an import, a
    def or class name (__name__), a global or nonlocal, nor a name the compiler mangles."""
    name = symbol.get_name()
    return (symbol.is_local() and symbol.is_assigned() and not symbol.is_parameter() and not symbol.is_imported()
            and not symbol.is_namespace() and not symbol.is_global() and not _is_nonlocal(symbol)
            and name.isidentifier() and not name.startswith("__"))


def _is_nonlocal(symbol: symtable.Symbol) -> bool:
    return getattr(symbol, "is_nonlocal", lambda: False)()


def _free_users(scope: _Scope, name: str) -> list[_Scope]:
    """The nested scopes where `name` is free and means `scope`'s variable (downward: a class is passed
    through, since its methods skip it when they resolve a free name)."""
    found = []
    for child in scope.children:
        symbol = child.symbols.get(name)
        free = symbol is not None and symbol.is_free()
        if free:
            found.append(child)
        if free or child.kind == "class":
            found += _free_users(child, name)
    return found


class _Binding:
    def __init__(self, scope: _Scope, name: str, users: list[_Scope]):
        self.scope, self.name, self.users = scope, name, users
        self.refs = [r for s in users for r in s.refs if getattr(r[0], r[1]) == name]
        self.first = min((r[2] for r in self.refs), default=0)


def _short_names():
    yield from SHORT_FIRST
    for length in itertools.count(2):
        for first in SHORT_FIRST + "_":
            for rest in itertools.product(SHORT_REST, repeat=length - 1):
                yield first + "".join(rest)


def rename_locals(tree: ast.Module, text: str, name: str = "source") -> Renamed:
    """Rename, in place, the renamable locals of every function, lambda and comprehension of `tree`
    (whose source is `text`) to short names, the most used first. A local is renamable when symtable
    classifies it as one the scope assigns (_renamable_symbol) and every scope that uses it (the
    function, and the nested ones where it is free) is a function, lambda or comprehension that is not
    under a decorator outside SAFE_DECORATORS and calls no LOCALS_READERS builtin. A new name is never a
    keyword, a builtin, a module-level name, nor any name spelled in the function or in a scope nested in
    it. check_stripped verifies the result independently (canonical_tree)."""
    root, aliased = scopes(tree, text, name)
    done = Renamed()
    done.blocked = renaming_blocked(tree, aliased)
    if done.blocked:
        return done
    reserved = RESERVED_NAMES | set(root.symbols) | root.spelled
    spelled = {id(s): s.spelled | set(s.symbols) for s in root.walk()}  # grows as names are given
    for scope in root.walk():
        if not scope.renamable:
            continue
        bindings = []
        for local, symbol in scope.symbols.items():
            if _renamable_symbol(symbol):
                users = [scope, *_free_users(scope, local)]
                if all(u.renamable and not _is_nonlocal(u.symbols.get(local, symbol)) for u in users):
                    bindings.append(_Binding(scope, local, users))
        if not bindings:
            continue
        used = set().union(*(spelled[id(s)] for s in scope.walk()))
        for binding in sorted(bindings, key=lambda b: (-len(b.refs), b.first)):
            new = next(n for n in _short_names() if n == binding.name or (n not in used and n not in reserved))
            used.add(new)
            if new == binding.name:
                continue
            for node, field, _ in binding.refs:
                setattr(node, field, new)
            for user in binding.users:
                spelled[id(user)].add(new)
            done.locals += 1
            done.comprehensions += not isinstance(scope.node, FUNCTION_DEFS)
            owner = scope
            while not isinstance(owner.node, FUNCTION_DEFS):  # a lambda or comprehension: its def
                owner = owner.parent
            done.functions.add(owner.qualname())
    return done


def _resolve(scope: _Scope, name: str) -> _Scope | None:
    """The function-like scope whose local `name` means where `scope` spells it (upward: free names skip
    classes), or None (a global, a builtin, a class attribute)."""
    while True:
        symbol = scope.symbols.get(name)
        if symbol is None:
            return None
        if not symbol.is_free():
            return scope if symbol.is_local() and scope.kind == "function" else None
        scope = scope.parent
        while scope is not None and scope.kind == "class":
            scope = scope.parent
        if scope is None:
            return None


def canonical_tree(text: str, name: str = "source") -> ast.Module:
    """The syntax tree of `text` with every renamable local named canonically: `<scope>@<k>` for the k-th
    such local, by first appearance, of the scope-th scope (module first, then depth first). Which locals
    are renamable is decided on this text alone, with symtable and upward name resolution: a local of a
    function-like scope that _renamable_symbol accepts and whose every user (each scope where it is free
    and resolves to it) is renamable. Two programs with equal canonical trees differ only in the names of
    such locals, consistently: a local renamed to a name the function also reads (a global, a builtin,
    another local) or a missed occurrence makes the trees differ."""
    tree = _parse(text.encode("utf-8"), name)
    root, aliased = scopes(tree, text, name)
    if renaming_blocked(tree, aliased):
        return tree
    all_scopes = list(root.walk())
    number = {id(s): i for i, s in enumerate(all_scopes)}
    users: dict[tuple[int, str], list[_Scope]] = {}
    for scope in all_scopes:
        for local, symbol in scope.symbols.items():
            owner = _resolve(scope, local)
            if owner is not None:
                users.setdefault((id(owner), local), []).append(scope)

    def renamable(owner: _Scope, local: str) -> bool:
        return (owner.renamable and _renamable_symbol(owner.symbols[local])
                and all(u.renamable and not _is_nonlocal(u.symbols[local]) for u in users[id(owner), local]))

    names: dict[tuple[int, str], str] = {}
    counts: dict[int, int] = {}
    refs = sorted((r for s in all_scopes for r in s.refs), key=lambda r: r[2])
    scope_of = {r[2]: s for s in all_scopes for r in s.refs}
    for node, field, order in refs:
        local = getattr(node, field)
        owner = _resolve(scope_of[order], local)
        if owner is None or not renamable(owner, local):
            continue
        key = (id(owner), local)
        if key not in names:
            k = counts[id(owner)] = counts.get(id(owner), -1) + 1
            names[key] = CANONICAL.format(scope=number[id(owner)], k=k)
        setattr(node, field, names[key])
    return tree


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


def _enclosing_function(node: ast.AST, tree: ast.Module) -> str:
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    while node in parents:
        node = parents[node]
        if isinstance(node, (*FUNCTION_DEFS, ast.ClassDef)):
            return f"in {'class' if isinstance(node, ast.ClassDef) else 'function'} `{node.name}` "
    return "at module level "


def _meaning(node: ast.AST) -> str | None:
    """What a name in a canonical tree stands for: a renamable local (by its canonical number) or itself."""
    if not isinstance(node, (ast.Name, ast.ExceptHandler, ast.MatchAs, ast.MatchStar, ast.MatchMapping)):
        return None
    for field in ("id", "name", "rest"):
        value = getattr(node, field, None)
        if isinstance(value, str):
            scope, _, k = value.partition("@")
            return f"local {k} of scope {scope}" if k else f"`{value}`, no renamable local"
    return None


def _first_difference(expected: ast.Module, got: ast.Module, expected_shown: ast.Module | None = None,
                      got_shown: ast.Module | None = None) -> str:
    """Where two trees first differ (breadth first); `*_shown` are the same trees before canonical naming,
    for the message."""
    expected_shown, got_shown = expected_shown or expected, got_shown or got
    for (a, a_shown), (b, b_shown) in zip(zip(ast.walk(expected), ast.walk(expected_shown)),
                                          zip(ast.walk(got), ast.walk(got_shown))):
        if _node_key(a) != _node_key(b):
            names = (_meaning(a), _meaning(b)) if type(a) is type(b) else (None, None)
            return (f"{_enclosing_function(b_shown, got_shown)}source {_located(a_shown, expected_shown)} vs "
                    f"generated {_located(b_shown, got_shown)}"
                    + (f" (names: {names[0]} vs {names[1]})" if None not in names and len(set(names)) > 1 else ""))
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


def make_payload(source: bytes, mode: str, name: str = "source", rename: bool = True) -> bytes:
    """What the packed file runs: the source (plain), minified and compacted, or stripped (with its
    function locals renamed unless `rename` is false)."""
    if mode == "plain":
        return source
    if mode == "minify":
        return compact(minify(source, name), name)
    if mode == "strip":
        return strip_source(source, name, rename)
    raise PackError(f"--mode {mode!r} is not allowed: expected one of {', '.join(MODES)}")


def pack(source: bytes, codec: str = "lzma", do_minify: bool = False, name: str = "source",
         do_strip: bool = False, wrapper: str = DEFAULT_WRAPPER) -> bytes:
    """The verified self-extracting file for `source`: its payload is the source itself, or with
    do_minify the syntax-tree-identical minified source, or with do_strip the stripped source."""
    if codec not in CODECS:
        raise PackError(f"--codec {codec!r} is not allowed: expected one of {', '.join(CODECS)}")
    _check_wrapper(wrapper)
    _compiles(source, name)
    mode = "strip" if do_strip else "minify" if do_minify else "plain"
    return pack_payload(make_payload(source, mode, name), codec, name, wrapper)


def pack_payload(payload: bytes, codec: str, name: str = "source", wrapper: str = DEFAULT_WRAPPER) -> bytes:
    """The self-extracting file for `payload`, verified (verify_generated)."""
    compressed = compress(payload, codec)
    packed = wrap_compressed(compressed, codec, wrapper)
    verify_generated(packed, compressed, payload, name)
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


def verify_generated(packed: bytes, compressed: bytes, payload: bytes, name: str = "packed file") -> None:
    """Raise PackError unless a file this module wrote is right: verify passes, the literal read back from
    it is exactly `compressed`, and the wrapper, run, compiles exactly `payload` (check_wrapper_run)."""
    verify(packed, payload, name)
    if unpack_wrapper(packed)[2] != compressed:
        raise PackError(f"{name}: the literal read back from the file differs from the compressed payload")
    check_wrapper_run(packed, payload, name)


def check_wrapper_run(packed: bytes, payload: bytes, name: str = "packed file") -> None:
    """Run the wrapper with `compile` and `exec` intercepted, so the payload itself does not run; raise
    PackError unless it calls `exec(compile(payload, __file__, "exec"))` with exactly `payload`. Only for
    files this module generated: it executes the wrapper's own statements (imports, decompression)."""
    calls: list[tuple] = []
    code = object()  # what the intercepted compile returns

    def fake_compile(*args, **kwargs):
        calls.append(("compile", *args, *kwargs.values()))
        return code

    def fake_exec(*args, **kwargs):
        calls.append(("exec", *(a is code for a in args)))

    env = {"__name__": "__main__", "__file__": name,
           "__builtins__": {**vars(builtins), "compile": fake_compile, "exec": fake_exec}}
    before = linecache.cache.pop(name, None)
    try:
        exec(compile(packed, name, "exec", dont_inherit=True), env)
    except Exception as exc:  # noqa: BLE001 - any failure of the wrapper is reported
        raise PackError(f"{name}: running the wrapper failed: {type(exc).__name__}: {exc}") from exc
    finally:
        lines = linecache.cache.pop(name, None)
        if before is not None:
            linecache.cache[name] = before
    if calls != [("compile", payload, name, "exec"), ("exec", True)]:
        raise PackError(f"{name}: the wrapper does not run exactly its payload as "
                        f"exec(compile(payload, __file__, \"exec\"))")
    if unpack_wrapper(packed)[3] == "latin1" and (lines is None or lines[1] is not None
                                                  or lines[2] != payload.decode("utf-8").splitlines(True)):
        raise PackError(f"{name}: the wrapper does not give linecache the payload's lines under __file__")


def verify_shipped(source: bytes, packed: bytes, name: str = "packed file") -> None:
    """Raise PackError unless `packed` is a stripped packing of `source`: it compiles, its payload
    compiles and has the source's syntax tree modulo docstrings, knob help and annotations, and defines
    the source's top-level names."""
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


def label(codec: str, wrapper: str, mode: str) -> str:
    """A packed variant's name in the sizes table, e.g. `brotli+latin1, stripped`."""
    return f"{codec}+{wrapper}{MODE_SUFFIX[mode]}"


def sizes(source: bytes, name: str = "source", rename: bool = True) -> list[tuple[str, int, int | None]]:
    """(variant, bytes, compressed bytes) for each mode's payload (raw) and its packed file per codec and
    wrapper; every packed file is verified as one that would be written."""
    rows: list[tuple[str, int, int | None]] = []
    payloads = {}
    for mode in MODES:
        try:
            payloads[mode] = make_payload(source, mode, name, rename)
            rows.append((f"raw{MODE_SUFFIX[mode]}", len(payloads[mode]), None))
        except PackError as exc:
            rows.append((f"raw{MODE_SUFFIX[mode]} ({exc})", 0, None))
    for codec in CODECS:
        for mode, payload in payloads.items():
            try:
                compressed = compress(payload, codec)
            except PackError as exc:
                rows += [(f"{label(codec, w, mode)} ({exc})", 0, None) for w in WRAPPERS]
                continue
            for wrapper in WRAPPERS:
                packed = wrap_compressed(compressed, codec, wrapper)
                verify_generated(packed, compressed, payload, name)
                rows.append((label(codec, wrapper, mode), len(packed), len(compressed)))
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
    p.add_argument("--mode", choices=MODES, help=f"payload: plain (the source byte for byte), minify (tokens and "
                   f"syntax tree unchanged) or strip (also no docstrings, knob help, error hints or function annotations, and short "
                   f"names for function locals; tree checked equal modulo those); default {DEFAULT_MODE}")
    p.add_argument("--minify", action="store_true", help="the same as --mode minify (older commands)")
    p.add_argument("--codec", choices=CODEC_CHOICES, default="auto", help="compressor (default: auto, the one "
                   "whose file is smaller; lzma is raw LZMA2, preset 9)")
    p.add_argument("--wrapper", choices=WRAPPERS, default=DEFAULT_WRAPPER, help="how the file holds the "
                   "compressed bytes: latin1 (a Latin-1 string literal, about 1%% over them; default) or base85 "
                   "(an ASCII file, 25%% over them)")
    p.add_argument("--no-rename", action="store_true", help="strip: keep the names of function locals")
    p.add_argument("--unpack", action="store_true", help="SOURCE is a packed file: write or print its payload")
    return p


def _mode(args: argparse.Namespace) -> str:
    if args.minify and args.mode not in (None, "minify"):
        raise PackError(f"--minify and --mode {args.mode} disagree: give one of them")
    mode = "minify" if args.minify else args.mode or DEFAULT_MODE
    if args.no_rename and mode != "strip" and args.output is not None:
        raise PackError(f"--no-rename is for --mode strip (--mode {mode} renames nothing)")
    return mode


def _unpack_command(args: argparse.Namespace, packed: bytes) -> int:
    got = unpack_wrapper(packed)
    if got is None:
        raise PackError(f"{args.source}: not a self-extracting file (no compressed payload found)")
    payload, codec, _, wrapper = got
    print(f"{args.source}: {len(packed):,} bytes, {codec}+{wrapper} payload {len(payload):,} bytes, "
          f"sha256 {sha256(payload)}")
    if args.output:
        atomic_write(args.output, payload)
        print(f"wrote {args.output}")
    return 0


def _kept_notes(tree: ast.Module) -> list[str]:
    """Why strip keeps every docstring or every annotation, if it does."""
    notes = []
    for what, reads in (("docstrings", docstring_reads(tree)), ("annotations", annotation_reads(tree))):
        if reads:
            notes.append(f"{what} kept (the code may read them at lines {', '.join(map(str, reads))})")
    return notes


def _sizes_command(path: Path, source: bytes, rename: bool = True) -> int:
    print(f"{path} (sha256 {sha256(source)})")
    rows = sizes(source, str(path), rename)
    default = [label(c, DEFAULT_WRAPPER, DEFAULT_MODE) for c in available_codecs()]  # what -o picks among
    chosen = min((r for r in rows if r[0] in default and r[1]), key=lambda r: r[1], default=(None,))[0]
    for variant, n, compressed in rows:
        ratio = f"{n / len(source):6.1%}" if n else ""
        extra = f"  (compressed {compressed:,})" if compressed else ""
        mark = "  <- -o writes this" if variant == chosen else ""
        print(f"  {variant:<26} {n:>9,} bytes {ratio}{extra}{mark}")
    for note in _kept_notes(_parse(source, str(path))):
        print(f"  stripped: {note}")
    return 0


def _strip_summary(source: bytes, name: str, renamed: Renamed | None) -> str:
    tree = _parse(source, name)
    parts = _kept_notes(tree)
    if not docstring_reads(tree):
        parts.append(f"{len(docstrings(tree))} docstrings removed")
    parts.append(f"{len(knob_help_args(tree))} knob help strings blanked")
    parts.append(f"{len(hint_args(tree))} error hints removed")
    if not annotation_reads(tree):
        strippable, kept = annotated_functions(tree)
        removed = sum(len(_annotations(fn)) for fn in strippable)
        parts.append(f"{removed} annotations of {len(strippable)} functions removed, {len(kept)} functions keep "
                     f"theirs (decorators that may read them)")
    parts.append("no local renamed (--no-rename)" if renamed is None else str(renamed))
    return ", ".join(parts)


def _write_command(args: argparse.Namespace, source: bytes) -> int:
    mode, name = _mode(args), str(args.source)
    if args.output.resolve() == args.source.resolve():
        raise PackError(f"-o {args.output}: is the source itself; write the packed file elsewhere")
    _compiles(source, name)
    renamed = None
    if mode == "strip":
        payload, renamed = strip_with_stats(source, name, rename=not args.no_rename)
        renamed = None if args.no_rename else renamed
    else:
        payload = make_payload(source, mode, name)
    if mode == "strip":
        check_top_level_names(source, payload, name)
    codecs_ = available_codecs() if args.codec == "auto" else (args.codec,)
    packed = {codec: pack_payload(payload, codec, name, args.wrapper) for codec in codecs_}
    codec = min(codecs_, key=lambda c: len(packed[c]))  # ties go to lzma, the one in the standard library
    atomic_write(args.output, packed[codec])
    others = "".join(f"; {c}: {len(packed[c]):,}" for c in codecs_ if c != codec)
    print(f"wrote {args.output}: {len(packed[codec]):,} bytes ({mode}, {codec}+{args.wrapper}{others}) from "
          f"{len(source):,} bytes; payload {len(payload):,} bytes, sha256 {sha256(payload)}"
          + (" = source" if payload == source else f" (source {sha256(source)})"))
    if mode == "strip":
        print(f"stripped: {_strip_summary(source, name, renamed)}; syntax tree otherwise equal (locals up to "
              f"renaming), top-level names equal")
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
            return _sizes_command(args.source, source, rename=not args.no_rename)
        return _write_command(args, source)
    except PackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
