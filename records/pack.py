"""Pack train_gpt.py into a self-extracting script: fewer code bytes, the same program.

Usage:
    python records/pack.py                                  # sizes of train_gpt.py: raw, lzma, brotli, +minify
    python records/pack.py train_gpt.py -o packed.py        # write the LZMA + base85 file (payload = the source)
    python records/pack.py train_gpt.py -o packed.py --codec brotli --minify
    python records/pack.py --unpack packed.py -o source.py  # the payload of a packed file

A packed file is two lines of Python that decode a base85 string, decompress it (raw LZMA2, as
`train_gpt.self_extracting_source` writes it, or Brotli) and run the result with
`exec(compile(payload, __file__, "exec"))`. The payload therefore runs as `__main__` and sees the
packed file as `__file__`, so `bytes_code` and `code_sha256` in its logs are those of the packed
file: the bytes that ship.

Every file written here is verified before it is written: the payload decodes back to exactly the
source (or the minified source), and both the packed file and its payload compile.

`--minify` applies only transformations that leave the program's syntax tree unchanged, and checks
that: comments, blank lines and trailing spaces are removed, indentation becomes one space per
level and continuation lines lose their leading spaces. Docstrings stay (code may read them). The
check is `ast.dump(ast.parse(minified)) == ast.dump(ast.parse(source))`; any difference is an error.
Without `--minify` the payload is the source byte for byte, so its sha256 is the source's.
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import io
import lzma
import sys
import tokenize
from pathlib import Path

CODECS = ("lzma", "brotli")
BROTLI_QUALITY = 11
BROTLI_LGWIN = 24
DEFAULT_SOURCE = Path(__file__).resolve().parent.parent / "train_gpt.py"


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
    """The self-extracting file for `payload`. The base85 alphabet has no quote or backslash, so the
    encoded string needs no escaping."""
    text = base64.b85encode(compress(payload, codec))
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
        raise PackError(f"{name}: minification would change the program (syntax tree differs); pack without "
                        f"--minify")
    return result.encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Packing with verification
# ---------------------------------------------------------------------------------------------


def _compiles(data: bytes, name: str) -> None:
    try:
        compile(data, name, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        raise PackError(f"{name}: does not compile: {exc}") from exc


def pack(source: bytes, codec: str = "lzma", do_minify: bool = False, name: str = "source") -> bytes:
    """The verified self-extracting file for `source`: its payload is the source itself (or, with
    do_minify, the syntax-tree-identical minified source)."""
    if codec not in CODECS:
        raise PackError(f"--codec {codec!r} is not allowed: expected one of {', '.join(CODECS)}")
    _compiles(source, name)
    payload = minify(source, name) if do_minify else source
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


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sizes(source: bytes) -> list[tuple[str, int]]:
    """(variant, bytes) for the raw source and each codec with and without minification."""
    rows = [("raw", len(source))]
    mini = minify(source)
    rows.append(("raw, minified", len(mini)))
    for codec in CODECS:
        try:
            rows.append((f"{codec}+base85", len(pack(source, codec))))
            rows.append((f"{codec}+base85, minified", len(pack(source, codec, do_minify=True))))
        except PackError as exc:
            rows.append((f"{codec}+base85 ({exc})", 0))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="records/pack.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Without -o, prints the raw and packed sizes of SOURCE.")
    p.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE,
                   help="script to pack (default: the repository's train_gpt.py)")
    p.add_argument("-o", "--output", type=Path, help="write the packed (or, with --unpack, the unpacked) file here")
    p.add_argument("--codec", choices=CODECS, default="lzma", help="compressor (default: lzma, as the log's "
                   "code_bytes_packed)")
    p.add_argument("--minify", action="store_true", help="strip comments/blank lines/indentation first "
                   "(syntax tree checked equal); the payload then differs from the source")
    p.add_argument("--unpack", action="store_true", help="SOURCE is a packed file: write or print its payload")
    args = p.parse_args(argv)
    try:
        if not args.source.is_file():
            raise PackError(f"{args.source}: no such file")
        source = args.source.read_bytes()
        if args.unpack:
            got = unpack(source)
            if got is None:
                raise PackError(f"{args.source}: not a self-extracting file (no base85 payload found)")
            payload, codec = got
            print(f"{args.source}: {len(source):,} bytes, {codec} payload {len(payload):,} bytes, "
                  f"sha256 {sha256(payload)}")
            if args.output:
                args.output.write_bytes(payload)
                print(f"wrote {args.output}")
            return 0
        if unpack(source) is not None:
            raise PackError(f"{args.source}: already a self-extracting file; pack the readable source")
        if args.output is None:
            print(f"{args.source} (sha256 {sha256(source)})")
            for variant, n in sizes(source):
                ratio = f"{n / len(source):6.1%}" if n else ""
                print(f"  {variant:<26} {n:>9,} bytes {ratio}")
            return 0
        packed = pack(source, args.codec, args.minify, str(args.source))
        args.output.write_bytes(packed)
        payload = unpack(packed)[0]
        print(f"wrote {args.output}: {len(packed):,} bytes ({args.codec}{', minified' if args.minify else ''}) "
              f"from {len(source):,} bytes; payload sha256 {sha256(payload)}"
              + (" = source" if payload == source else f" (source {sha256(source)})"))
        print(f"run it as the script itself (python {args.output.name}); its logs then count "
              f"bytes_code:{len(packed)}")
        return 0
    except PackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
