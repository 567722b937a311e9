"""records/pack.py on small inputs: the whitespace compaction (minify and strip) and the Latin-1 wrapper.

Run:
    python -m pytest -q tests/test_pack_dense.py

The compaction must keep every token (type and text) and the syntax tree; the Latin-1 wrapper must
hold any bytes at all in one triple-quoted string literal (and unpack still reads the one-line literal
of earlier files) and, run as `python file.py`, execute its payload with `__file__` = the packed file.
(train_gpt.py itself, stripped and shipped: tests/test_pack.py; the renaming of locals:
tests/test_pack_rename.py.)
"""

from __future__ import annotations

import ast
import base64
import io
import lzma
import random
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from conftest import ROOT

RECORDS = ROOT / "records"
if str(RECORDS) not in sys.path:
    sys.path.insert(0, str(RECORDS))

import pack  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Compaction
# ---------------------------------------------------------------------------------------------

SPACED = '''import os, sys
x, y, w = 3, 4, 6
a = x - -y
b = x ** -1 + (x)  @  1 if False else x // 2
c = 1 .real + 1.5 .imag + 0x1F
d = '' 'x' "" "y" r"\\d" u'z'
e = f"{x = }" f'{x!r:>{w}}' f"{ {'k': 1}['k'] }" f"{'a' if x else 'b'}"
g = [i for i in range(3) if i not in (1,) and i is not None]
h = lambda *a, **k: (a, k)
i = x if y else .5
s = """a  b
   c  """
t = [..., ...]
m = {**{"a": 1}, "b": 2}
def f(p, /, q: int = 2, *r: str, s: "t" = 3, **u: (int)) -> (int):
    return p + q ; z = 1
class C(object) :
    v : int = 5
print(a, b, c, d, e, g, h(1, q=2), i, s, t, m, f(1), f.__annotations__, C.v)
'''

COMPACT = '''import os,sys
x,y,w=3,4,6
a=x--y
b=x**-1+(x)@1 if False else x//2
c=1 .real+1.5 .imag+0x1F
d='' 'x'"" "y"r"\\d"u'z'
e=f"{x = }"f'{x!r:>{w}}'f"{ {'k': 1}['k'] }"f"{'a' if x else 'b'}"
g=[i for i in range(3)if i not in(1,)and i is not None]
h=lambda*a,**k:(a,k)
i=x if y else.5
s="""a  b
   c  """
t=[...,...]
m={**{"a":1},"b":2}
def f(p,/,q:int=2,*r:str,s:"t"=3,**u:(int))->(int):
 return p+q;z=1
class C(object):
 v:int=5
print(a,b,c,d,e,g,h(1,q=2),i,s,t,m,f(1),f.__annotations__,C.v)
'''


def run_source(source: bytes, tmp_path: Path, name: str = "m.py") -> str:
    path = tmp_path / name
    path.write_bytes(source)
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_minify_mode_removes_every_space_no_token_needs(tmp_path):
    out = pack.make_payload(SPACED.encode(), "minify")
    assert out.decode() == COMPACT
    assert run_source(out, tmp_path, "a.py") == run_source(SPACED.encode(), tmp_path, "b.py")
    assert pack.compact(out) == out, "compaction is idempotent"


def test_strings_and_fstrings_are_left_alone():
    # On 3.12+ the tokenizer splits f-strings into FSTRING_START/MIDDLE/END and the expressions inside:
    # `{x = }` prints its own spaces, so nothing between FSTRING_START and FSTRING_END is touched.
    src = b'v = f"{ x = }  {y !r}"  +  f"""{ {1: 2} [1] }"""  +  "  a , b  "\n'
    assert pack.compact(src) == b'v=f"{ x = }  {y !r}"+f"""{ {1: 2} [1] }"""+"  a , b  "\n'
    nested = b'v = f"{ f\'{ a + 1 }\' + b }" + g(f"{ c }", 1)\n'
    assert pack.compact(nested) == b'v=f"{ f\'{ a + 1 }\' + b }"+g(f"{ c }",1)\n'
    # A line break inside an f-string's braces is no line break to join (3.12+ tokenizes the braces).
    src = b'q = [f"""{x\n + 1}""",\n     2]\n'
    joined = pack.join_bracket_lines(pack.minify(src))
    assert joined == b'q = [f"""{x\n + 1}""",2]\n'
    pack.check_same_tokens(src, joined)
    # strip writes the program anew (ast.unparse): the f-string is respelled, its value is the same.
    assert pack.strip_source(src) == b"q=[f'{x + 1}',2]\n"


def first_two_tokens(text: str) -> list[tokenize.TokenInfo]:
    """The first two tokens of `text` (which may be a fragment: an unclosed bracket)."""
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type not in pack.LAYOUT_TOKENS:
            found.append(tok)
        if len(found) == 2:
            return found
    raise AssertionError(f"{text!r}: fewer than two tokens")


@pytest.mark.parametrize("text, space", [
    ("if x", True), ("1 if", True), ("return x", True), ("not a", True), ("x_1 _y", True),
    ("a =", False), ("( x", False), ("x )", False), ("- -", False), ("= -", False), ("** -", False),
    ("* *", True), ("/ /", True), ("< =", True), ("- >", True), (": =", True), (". .", True), ("... .", False),
    ("1 .real", True), ("x .real", False), ("'' 'x'", True), ('"a" "b"', True), ("'a' \"b\"", False),
    ("r 'x'", True), ("else .5", False), ("x 'y'", False), (") if", False), ("'a' if", False),
    ("!= =", False), ("< <=", True)])
def test_needs_space(text, space):
    a, b = first_two_tokens(text)
    assert pack.needs_space(a, b) is space, (a.string, b.string)


def test_a_compaction_that_changes_a_token_is_rejected(monkeypatch):
    # Same tokens, other spacing: accepted (`a--b` is `a`, `-`, `-`, `b`).
    pack.check_same_tokens(b"x = a - -b\n", b"x=a--b\n")
    mutants = {b"x = a - -b\n": b"x=a-b\n",  # a token lost
               b"x = a if b else c\n": b"x=aif b else c\n",  # two names merged
               b's = "a b"\n': b's="ab"\n',  # inside a string
               b"y = 1 + 2\n": b"y=1+3\n"}
    for before, after in mutants.items():
        with pytest.raises(pack.PackError, match=r"^m\.py: compaction changed (a token: line 1 `.+` \(\w+\) became "
                                                 r"line 1 `.+` \(\w+\) in `.+`|the number of tokens)"):
            pack.check_same_tokens(before, after, "m.py")
    # A compaction that drops a needed space is refused before anything is written.
    monkeypatch.setattr(pack, "needs_space", lambda a, b: False)
    for src in (b"x = a if b else c\n", b"y = 1 .real\n", b"z = '' 'x'\n", b"w = f(* *a)\n"):
        with pytest.raises(pack.PackError, match=r"^m\.py( \(compacted\))?: (compaction changed|cannot be "
                                                 r"tokenized|does not parse)"):
            pack.compact(src, "m.py")


def test_bracket_lines_join_with_a_space_only_where_needed():
    src = b"x = [a if b\n     else c,\n     1\n     .real, ''\n     'y']\n"
    out = pack.join_bracket_lines(pack.minify(src))
    assert out == b"x = [a if b else c,1 .real, '' 'y']\n"
    pack.check_same_tokens(src, out)


# ---------------------------------------------------------------------------------------------
# Function annotations (strip)
# ---------------------------------------------------------------------------------------------


def test_strip_removes_annotations_only_under_safe_decorators():
    src = b'''import torch
def f(x: (int), y: "Tensor" = 1, *a: (tuple[int, ...]), k: dict[str, int] = {}, **kw: int) -> (
        tuple[int, int]):
    return x
async def g(x: int) -> None: pass
@torch.no_grad()
def h(x: int) -> int:
    def inner(q: int) -> int:
        return q
    return inner(x)
@torch.library.custom_op("a::b", mutates_args=())
def op(x: torch.Tensor) -> torch.Tensor:
    def inner2(q: int) -> int:
        return q
    return x
@op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x
class P:
    n: int = 1
    @property
    def v(self) -> int:
        return 1
    @v.setter
    def v(self, value: int) -> None:
        pass
    @classmethod
    def c(cls) -> "P":
        return cls()
'''
    assert pack.strip_source(src) == (b'import torch\n'
                                      b'def f(x,y=1,*a,k={},**kw):\n return x\n'
                                      b'async def g(x):\n pass\n'
                                      b'@torch.no_grad()\ndef h(x):\n def inner(q):\n  return q\n return inner(x)\n'
                                      b"@torch.library.custom_op('a::b',mutates_args=())\n"
                                      b'def op(x:torch.Tensor)->torch.Tensor:\n def inner2(q):\n  return q\n return x\n'
                                      b'@op.register_fake\ndef _(x:torch.Tensor)->torch.Tensor:\n return x\n'
                                      b'class P:\n n:int=1\n @property\n def v(self):\n  return 1\n'
                                      b' @v.setter\n def v(self,value):\n  pass\n'
                                      b' @classmethod\n def c(cls):\n  return cls()\n')
    _, kept = pack.annotated_functions(ast.parse(src))
    assert [f.name for f in kept] == ["op", "_"]


# ---------------------------------------------------------------------------------------------
# The Latin-1 wrapper
# ---------------------------------------------------------------------------------------------

NASTY = {
    "every byte": bytes(range(256)) + bytes(range(255, -1, -1)),
    "NUL runs before digits": b"\x000\x00\x007\x00\x00\x008\x009\x00a\x00\x00",
    "trailing backslash": b"abc\\",
    "only a backslash": b"\\",
    "backslash before line breaks": b"a\\\nb\\\r\nc\\\\\n",
    "both quotes, more double": b'""\'"',
    "both quotes, more single": b"''\"'",
    "line breaks": b"\r\n\n\r\r\x85\x0c\x0b\x1a\x1c",
    # What else a tokenizer might take for a line break or an end, each at a line's start and end.
    "line starts": b"".join(b"\n" + bytes([c]) + b"x" + bytes([c]) for c in (0x0b, 0x0c, 0x1a, 0x1c, 0x1d, 0x1e,
                                                                            0x85, 0xa0, 0x09, 0x20, 0x23)) + b"\n",
    "quote runs": b"".join(q * n + b"x" for q in (b'"', b"'") for n in range(1, 8)),
    "double quotes first and last": b'"""a""""',
    "single quotes first and last": b"'''a''''",
    "only double quotes": b'"' * 7,
    "only single quotes": b"'" * 5,
    "quote after escapes": b'\\"\x00"\r"\\\'\n\'',
    "empty": b"",
}


def quote_escapes(data: bytes, quote: bytes) -> int:
    """How many quotes a triple-quoted literal must escape: the third of every run, and the last quote
    when the data ends with a run whose last quote is not already a third."""
    runs = [m for m in re.finditer(re.escape(quote) + b"+", data)]
    n = sum(len(m.group()) // 3 for m in runs)
    if runs and runs[-1].end() == len(data) and len(runs[-1].group()) % 3:
        n += 1
    return n


@pytest.mark.parametrize("name", list(NASTY))
def test_latin1_literal_holds_any_bytes(name, tmp_path):
    data = NASTY[name]
    literal = pack.latin1_literal(data)
    quote = literal[:1]
    assert literal[:3] == literal[-3:] == quote * 3, "triple-quoted"
    assert b"\x00" not in literal and b"\r" not in literal, "no NUL, no CR: the tokenizer would change them"
    assert literal.count(b"\n") == data.count(b"\n"), "line breaks are raw"
    # Escapes only where needed: one extra byte per backslash, CR, NUL (three before an octal digit) and
    # per quote that would close the literal, with the quote that needs fewer.
    extra = sum(data.count(c) for c in (b"\\", b"\r", b"\x00"))
    extra += 2 * len(re.findall(rb"\x00[0-7]", data))  # `\x00`, not `\0`, before an octal digit
    assert quote_escapes(data, quote) <= quote_escapes(data, b"'" if quote == b'"' else b'"')
    assert len(literal) == len(data) + 6 + extra + quote_escapes(data, quote)
    source = pack.LATIN1_COOKIE + b"v = " + literal + b'.encode("l1")\n'
    assert ast.parse(source).body[0].value.func.value.value.encode("latin-1") == data  # the cookie is honoured
    compiled = {}
    exec(compile(source, "m.py", "exec"), compiled)  # compile() from bytes: the string tokenizer
    assert compiled["v"] == data
    run = source + b"import sys\nsys.stdout.write(v.hex())\n"
    assert run_source(run, tmp_path) == data.hex(), "python file.py reads the literal back byte for byte"
    # The one-line form of earlier files holds them too (unpack reads both).
    line = pack.latin1_line_literal(data)
    assert b"\n" not in line and b"\r" not in line and b"\x00" not in line
    assert ast.literal_eval((pack.LATIN1_COOKIE + line).decode("latin-1").split("\n", 1)[1]) == data.decode("latin-1")


def test_the_quote_is_the_one_needing_fewer_escapes():
    assert pack.latin1_literal(b'a"""b') == b"'''a\"\"\"b'''"  # `"` would need one escape, `'` none
    assert pack.latin1_literal(b"a'''b") == b'"""a\'\'\'b"""'
    assert pack.latin1_literal(b'a"b"c\'') == b'"""a"b"c\'"""', "single quotes do not close a triple literal"
    assert pack.latin1_literal(b"ab") == b'"""ab"""'
    singles3, singles6 = b"'" * 3, b"'" * 6  # one and two escapes of `'`: `"` needs as many, and wins the tie
    assert pack.latin1_literal(singles3 + b'x"') == b'"""' + singles3 + b'x\\"' + b'"""', "the last quote"
    assert pack.latin1_literal(singles6 + b'x""""') == b'"""' + singles6 + b'x""\\"\\"' + b'"""', "the third, last"
    assert pack.latin1_literal(b'"\'\'\'\'"') == b'""""\'\'\'\'\\""""', "a tie (one escape each) goes to `\"`"


def random_payload(seed: int = 0, size: int = 20_000) -> bytes:
    """A program whose compressed form holds every byte value (NUL before digits included)."""
    data = random.Random(seed).randbytes(size)
    return (b"import sys\nD=" + repr(data).encode() + b"\n"
            b"print(__name__, __file__ == sys.argv[0], len(D), sys.modules['__main__'].__file__)\n")


@pytest.mark.parametrize("codec", pack.CODECS)
def test_a_latin1_packed_file_runs_its_payload_as_the_script(codec, tmp_path):
    payload = random_payload()
    compressed = pack.compress(payload, codec)
    assert len(set(compressed)) == 256 and re.search(rb"\x00[0-7]", compressed)
    packed = pack.pack_payload(payload, codec, "p.py", wrapper="latin1")
    head, rest = packed.split(b"\n", 1)
    assert head == b"#coding:l1"
    assert len(ast.parse(packed).body) == 4, "the cookie, then one line (import; P=...; linecache; exec)"
    assert rest.endswith(b'__file__,"exec"))\n') and rest.count(b"\n") == compressed.count(b"\n") + 1
    assert len(packed) <= len(compressed) * 1.015 + 150, "about 1% over the compressed bytes"
    assert pack.unpack_wrapper(packed) == (payload, codec, compressed, "latin1")
    path = tmp_path / "packed.py"
    path.write_bytes(packed)
    out = run_source(packed, tmp_path, "packed.py").split()
    assert out == ["__main__", "True", "20000", str(path)], out


def test_the_cli_writes_latin1_by_default_and_unpacks_it(tmp_path, capsys):
    src = tmp_path / "prog.py"
    src.write_bytes(random_payload(1))
    out = tmp_path / "packed.py"
    assert pack.main([str(src), "-o", str(out), "--mode", "plain"]) == 0
    assert "+latin1" in capsys.readouterr().out and out.read_bytes().startswith(pack.LATIN1_COOKIE)
    assert run_source(out.read_bytes(), tmp_path, "packed.py").split()[:3] == ["__main__", "True", "20000"]
    assert pack.main(["--unpack", str(out), "-o", str(tmp_path / "back.py")]) == 0
    assert (tmp_path / "back.py").read_bytes() == src.read_bytes()
    assert pack.main([str(out)]) == 2, "packing a packed file is refused"
    assert "already a self-extracting file" in capsys.readouterr().err


def test_unpack_knows_every_wrapper_and_nothing_else():
    src = b"print('hi')\n"
    for wrapper in pack.WRAPPERS:
        for codec in pack.CODECS:
            assert pack.unpack(pack.pack_payload(src, codec, wrapper=wrapper)) == (src, codec)
    raw = lzma.compress(src, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    spelled = (b"# -*- coding: latin-1 -*-\nimport lzma\nexec(lzma.decompress(" + pack.latin1_literal(raw)
               + b'.encode("iso-8859-1"),format=lzma.FORMAT_RAW,filters=[{"id":lzma.FILTER_LZMA2}]))\n')
    assert pack.unpack(spelled) == (src, "lzma"), "other spellings of the cookie and of Latin-1"
    for codec in pack.CODECS:  # the one-line literal of files written before the triple-quoted one
        compressed = pack.compress(src, codec)
        old = pack.WRAPPERS_BY_FORM["latin1", codec] % pack.latin1_line_literal(compressed)
        assert old.count(b"\n") == 2 and pack.unpack_wrapper(old) == (src, codec, compressed, "latin1")
        pack.check_wrapper_run(old, src, "old.py")
    b85 = base64.b85encode(raw).decode()
    assert pack.unpack(f'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("{b85}"),format=L.FORMAT_RAW,'
                       f'filters=[{{"id":L.FILTER_LZMA2}}]))\n'.encode()) == (src, "lzma")
    assert pack.unpack(b'import lzma\nexec(lzma.decompress("abc".encode("utf-8")))\n') is None, "not Latin-1"
    assert pack.unpack(b'x = "abc".encode("l1")\n') is None, "not compressed"


def test_a_generated_file_that_does_not_run_its_payload_is_rejected():
    src = b"print('hi')\n"
    compressed = pack.compress(src, "brotli")
    good = pack.wrap_compressed(compressed, "brotli", "latin1")
    pack.verify_generated(good, compressed, src, "p.py")
    tampered = {good.replace(b"__file__", b'"x.py"'): "does not run exactly its payload",
                good.replace(b"exec(compile(", b"print(compile("): "does not run exactly its payload",
                good.replace(b"import brotli as R,linecache as C;", b"import brotli as R,linecache as C;R=None;"):
                    "running the wrapper failed",
                good.replace(b"P.decode().splitlines(1)", b"[]"): "does not give linecache the payload's lines"}
    for packed, message in tampered.items():
        assert packed != good
        with pytest.raises(pack.PackError, match=f"^p\\.py: (the wrapper )?{message}"):
            pack.check_wrapper_run(packed, src, "p.py")
    with pytest.raises(pack.PackError, match="literal read back from the file differs"):
        pack.verify_generated(good, compressed + b"\0", src, "p.py")
    with pytest.raises(pack.PackError, match=r"--wrapper 'hex' is not allowed: expected one of latin1, base85"):
        pack.pack(src, "lzma", wrapper="hex")
