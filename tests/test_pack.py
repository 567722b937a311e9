"""records/pack.py: the shipped train_gpt.py is generated from the readable one, minimal, and the one that runs.

Three parts, smallest inputs first:
- renaming of function locals (strip mode) and its alpha-equivalence check, on small programs: what is
  renamed (locals of functions, lambdas and comprehensions inside functions, closures consistently) and
  what is not; wrong renamings and a patched-in renamer bug are rejected, naming the function;
- the whitespace compaction (minify and strip) keeps every token and the syntax tree; the Latin-1 wrapper
  holds any bytes in one string literal and runs its payload with `__file__` = the packed file;
- strip mode on a snapshot of train_gpt.py (an edit to the script during the session cannot make runs
  disagree): only docstrings, knob help, hints, annotations and local names change; the slow tests run
  the stripped, packed snapshot as a user would (one process next to the readable snapshot, two under
  torchrun on CPU, EVAL_ONLY on the first run's artifact with a copy of pgolf/ beside it, and refused without),
  every log counting bytes_code = the shipped size.

Run:
    python -m pytest -q tests/test_pack.py --durations=5
    python -m pytest -q -m "not slow" tests/test_pack.py      # no training runs
"""

from __future__ import annotations

import ast
import base64
import builtins
import collections
import contextlib
import hashlib
import io
import lzma
import os
import random
import re
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from conftest import ROOT
from test_run import FINAL_RE, error_lines, rel_diff, run_script, tiny_env

RECORDS = ROOT / "records"
if str(RECORDS) not in sys.path:
    sys.path.insert(0, str(RECORDS))

import pack  # noqa: E402


# =============================================================================================
# Renaming of function locals and its check
# =============================================================================================

DIFFERS = (r"^m\.py: the stripped program differs from the source beyond docstrings, knob help, hints, annotations and "
           r"local names: ")


def mutate(code: bytes, function: str, renames: dict[str, str], outside_fstrings: bool = False) -> bytes:
    """`code` with every name in `renames` respelled (variables, parameters, `except ... as` names) inside
    the first function called `function` (the whole module: "<module>"), nested scopes included; with
    outside_fstrings, the occurrences inside f-strings keep their name."""
    tree = ast.parse(code)
    fn = tree if function == "<module>" else next(f for f in ast.walk(tree)
                                                  if isinstance(f, pack.FUNCTION_DEFS) and f.name == function)
    skip = ({id(n) for j in ast.walk(fn) if isinstance(j, ast.JoinedStr) for n in ast.walk(j)}
            if outside_fstrings else set())
    for node in ast.walk(fn):
        for kind, field in ((ast.Name, "id"), (ast.arg, "arg"), (ast.ExceptHandler, "name")):
            if isinstance(node, kind) and getattr(node, field) in renames and id(node) not in skip:
                setattr(node, field, renames[getattr(node, field)])
    return (ast.unparse(tree) + "\n").encode()


def output(code: bytes) -> str:
    """What `code` prints, run as a module."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "m.py", "exec", dont_inherit=True), {"__name__": "m"})
    return out.getvalue()


PROGRAM = b'''import os
import functools
G = 1


def f(alpha, beta=2):
    total = alpha + beta + G
    count = len(os.sep)
    for item in range(count):
        total += item
    try:
        1 / 0
    except ZeroDivisionError as err:
        total += len(str(err))
    squares = [k * k for k in range(count) if k != total]
    return total, f"{total!r} {count}", squares


def outer():
    shared = 3
    def inner():
        return shared + 1
    nums = [shared * i for i in range(2)]
    return inner() + sum(nums)


def counter():
    n = 0
    def bump():
        nonlocal n
        n += 1
    bump()
    return n


def uses_global():
    global G
    G = G + 1
    return G


def dynamic():
    value = 5
    return sorted(locals())


def evaluates():
    value = 6
    return eval("value")


def has_dir(obj):
    names = dir(obj)
    return len(names)


def lists_own_names():
    value = 7
    return dir()


def shadow():
    first = 1
    read = lambda: G + first
    return read()


def definer():
    import math as m
    def helper():
        return m.pi
    class Local:
        attr = 1
    return helper() + Local.attr


def class_reader():
    hidden = 4
    class Reader:
        seen = hidden
    return Reader.seen


def walrus(values):
    kept = [y for v in values if (y := v * 2) > 2]
    return kept, y


def matcher(point):
    match point:
        case (first, *rest):
            return first, rest
        case {"key": found, **others}:
            return found, others
        case _:
            return None


@functools.lru_cache
def cached(x):
    result = x * 3
    return result


class K:
    y = [j for j in range(3)]

    def m(self, q):
        result = q * 2
        return result

    @staticmethod
    def s(q):
        doubled = q * 2
        return doubled


z = [w for w in range(2)]
print(f(1), outer(), counter(), uses_global(), dynamic(), evaluates(), has_dir(1), lists_own_names(), shadow(),
      definer(), class_reader(), walrus([1, 2]), matcher((1, 2, 3)), matcher({"key": 1, "x": 2}), cached(2),
      K().m(2), K.s(3), K.y, z)
'''

RENAMED = b'''import os
import functools
G=1
def f(alpha,beta=2):
 a=alpha+beta+G
 b=len(os.sep)
 for c in range(b):
  a+=c
 try:
  1/0
 except ZeroDivisionError as d:
  a+=len(str(d))
 e=[b*b for b in range(b)if b!=a]
 return(a,f'{a!r} {b}',e)
def outer():
 a=3
 def inner():
  return a+1
 b=[a*b for b in range(2)]
 return inner()+sum(b)
def counter():
 n=0
 def bump():
  nonlocal n
  n+=1
 bump()
 return n
def uses_global():
 global G
 G=G+1
 return G
def dynamic():
 value=5
 return sorted(locals())
def evaluates():
 value=6
 return eval('value')
def has_dir(obj):
 a=dir(obj)
 return len(a)
def lists_own_names():
 value=7
 return dir()
def shadow():
 a=1
 b=lambda:G+a
 return b()
def definer():
 import math as m
 def helper():
  return m.pi
 class Local:
  attr=1
 return helper()+Local.attr
def class_reader():
 hidden=4
 class Reader:
  seen=hidden
 return Reader.seen
def walrus(values):
 a=[y for a in values if(y:=(a*2))>2]
 return(a,y)
def matcher(point):
 match point:
  case[a,*b]:
   return(a,b)
  case{'key':c,**d}:
   return(c,d)
  case _:
   return None
@functools.lru_cache
def cached(x):
 result=x*3
 return result
class K:
 y=[j for j in range(3)]
 def m(self,q):
  a=q*2
  return a
 @staticmethod
 def s(q):
  a=q*2
  return a
z=[w for w in range(2)]
'''


def test_locals_are_renamed_and_nothing_else():
    out, renamed = pack.strip_with_stats(PROGRAM, "m.py")
    assert out.startswith(RENAMED), out.decode()
    assert output(out) == output(PROGRAM)
    assert str(renamed) == "20 locals renamed in 8 functions (3 of them of comprehensions or lambdas)"
    assert renamed.functions == {"f", "outer", "has_dir", "shadow", "walrus", "matcher", "K.m", "K.s"}
    # --no-rename: the same program, names as written.
    plain = pack.strip_source(PROGRAM, "m.py", rename=False)
    assert b" total=alpha+beta+G\n" in plain and output(plain) == output(PROGRAM)
    assert len(pack.compress(out, "lzma")) < len(pack.compress(plain, "lzma"))


def test_new_names_avoid_every_name_the_scope_reads():
    src = b'''a = 0
def f():
    first = 1
    second = [first]
    third = (lambda: b)()
    return first, second, third
b = 5
def g(c):
    delta = 1
    text = f"{delta}{E}"
    return c + delta, text
E = "x"
print(f(), g(1))
'''
    out = pack.strip_source(src, "m.py")
    # Module-level names (a, b, E), parameters (c) and names read in nested scopes or f-strings are taken.
    assert b"def f():\n c=1\n d=[c]\n e=(lambda:b)()\n return(c,d,e)\n" in out, out.decode()
    assert b"def g(c):\n d=1\n e=f'{d}{E}'\n return(c+d,e)\n" in out, out.decode()
    assert output(out) == output(src)


def test_the_most_used_local_gets_the_first_name():
    src = b"def f():\n    once = 1\n    often = 2\n    return often + often + once + often\n"
    assert pack.strip_source(src) == b"def f():\n b=1\n a=2\n return a+a+b+a\n"


def test_reading_frames_locals_turns_renaming_off(tmp_path, capsys):
    src = b"import sys\ndef f():\n    value = 1\n    return sys._getframe().f_locals['value']\nprint(f())\n"
    out, renamed = pack.strip_with_stats(src, "m.py")
    assert b" value=1\n" in out and renamed.locals == 0 and output(out) == "1\n"
    path = tmp_path / "m.py"
    path.write_bytes(src)
    assert pack.main([str(path), "-o", str(tmp_path / "out.py")]) == 0
    assert "no local renamed (the code may read frames' locals at lines 4)" in capsys.readouterr().out
    aliased = b"def f():\n    value = 1\n    show = locals\n    return show()\nprint(f())\n"
    assert b" value=1\n" in pack.strip_source(aliased) and output(pack.strip_source(aliased)) == output(aliased)


def test_the_cli_reports_the_renamed_locals(tmp_path, capsys):
    path = tmp_path / "prog.py"
    path.write_bytes(PROGRAM)
    out = tmp_path / "out.py"
    assert pack.main([str(path), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "20 locals renamed in 8 functions (3 of them of comprehensions or lambdas)" in text, text
    assert pack.unpack(out.read_bytes())[0].startswith(RENAMED)
    assert pack.main([str(path), "-o", str(out), "--no-rename"]) == 0
    assert "no local renamed (--no-rename)" in capsys.readouterr().out
    assert b" total=alpha+beta+G\n" in pack.unpack(out.read_bytes())[0]
    assert pack.main([str(path), "-o", str(out), "--no-rename", "--mode", "plain"]) == 2
    assert "--no-rename is for --mode strip" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The check: canonical trees
# ---------------------------------------------------------------------------------------------


def test_canonical_names_depend_on_the_scope_and_the_first_appearance():
    tree = pack.canonical_tree("G = 1\ndef f(p):\n    x = p\n    y = [x * i for i in G]\n    return y, x\n")
    names = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name)]
    # Breadth first: x is f's first local, y its second, i the comprehension's (scope 2); G and p stay.
    assert names == ["G", "1@0", "p", "1@1", "1@1", "1@0", "1@0", "2@0", "2@0", "G"], names
    assert ast.dump(pack.canonical_tree("def f(p):\n    a = p\n    return a\n")) == ast.dump(
        pack.canonical_tree("def f(p):\n    b = p\n    return b\n"))


@pytest.mark.parametrize("what, function, renames, fstrings, shown", [
    ("captures a global", "f", {"a": "G"}, False, "function `f`"),
    ("captures a builtin", "f", {"a": "len"}, False, "function `f`"),
    ("captures a module-level import", "f", {"a": "os"}, False, "function `f`"),
    ("renames a parameter", "f", {"alpha": "p"}, False, "function `f`"),
    ("renames a parameter to a local's name", "f", {"alpha": "a", "a": "alpha"}, False, "function `f`"),
    ("merges two locals", "f", {"b": "a"}, False, "function `f`"),
    ("misses an f-string occurrence", "f", {"a": "x"}, True, "function `f`"),
    ("misses a closure use", "inner", {"a": "x"}, False, "function `inner`"),
    ("renames a local of a function under another decorator", "cached", {"result": "r"}, False, "function `cached`"),
    ("renames a local read by locals()", "dynamic", {"value": "v"}, False, "function `dynamic`"),
    ("renames a local read by eval", "evaluates", {"value": "v"}, False, "function `evaluates`"),
    ("renames a local read by dir()", "lists_own_names", {"value": "v"}, False, "function `lists_own_names`"),
    ("renames a global", "uses_global", {"G": "H"}, False, "function `uses_global`"),
    ("renames a local a class body reads", "class_reader", {"hidden": "h"}, False, "function `class_reader`"),
    ("renames a class", "definer", {"Local": "L"}, False, "function `definer`"),
    ("renames an import where it is used", "definer", {"m": "q"}, False, "function `helper`"),
    ("renames a comprehension variable at module level", "<module>", {"w": "v"}, False, None),
    ("renames a comprehension variable in a class body", "<module>", {"j": "i"}, False, "class `K`"),
])
@pytest.mark.slow
def test_a_wrong_renaming_is_rejected(what, function, renames, fstrings, shown):
    generated = pack.strip_source(PROGRAM, "m.py")
    pack.check_stripped(PROGRAM, generated, "m.py")
    mutant = mutate(generated, function, renames, outside_fstrings=fstrings)
    assert mutant != (ast.unparse(ast.parse(generated)) + "\n").encode(), what
    where = f"in {shown}" if shown else "at module level"
    with pytest.raises(pack.PackError, match=DIFFERS + rf"{where} source line \d+ `.+` vs generated line \d+ `.+`"):
        pack.check_stripped(PROGRAM, mutant, "m.py")


def test_a_nonlocal_renamed_where_it_is_bound_is_rejected():
    generated = pack.strip_source(PROGRAM, "m.py")
    mutant = generated.replace(b"def counter():\n n=0\n", b"def counter():\n c=0\n").replace(b" return n\n",
                                                                                                b" return c\n")
    with pytest.raises(pack.PackError, match=r"^m\.py \(stripped\): symtable cannot read it: no binding for "
                                             r"nonlocal 'n' found"):
        pack.check_stripped(PROGRAM, mutant, "m.py")


def test_an_import_renamed_is_rejected_with_the_import_named():
    # `import math as m` binds no Name node: its renaming shows in the alias, outside mutate's fields.
    generated = pack.strip_source(PROGRAM, "m.py").replace(b"import math as m\n", b"import math as q\n")
    with pytest.raises(pack.PackError, match=DIFFERS + r"in function `definer` source line \d+ `math as m` vs "
                                             r"generated line \d+ `math as q`"):
        pack.check_stripped(PROGRAM, generated, "m.py")


def test_a_consistent_renaming_is_accepted():
    generated = pack.strip_source(PROGRAM, "m.py")
    for function, renames in (("f", {"a": "b", "b": "a"}), ("f", {"a": "zz"}), ("outer", {"a": "q"}),
                              ("m", {"a": "result"})):
        pack.check_stripped(PROGRAM, mutate(generated, function, renames), "m.py")


def test_the_check_catches_a_renamer_bug(monkeypatch):
    # A renamer that forgets the nested scopes using a closure variable: outer's `shared` is renamed
    # where it is assigned, not in inner(): the check (upward resolution, its own) refuses the file.
    src = b"def outer():\n    shared = 3\n    def inner():\n        return shared + 1\n    return inner()\n"
    assert pack.strip_source(src, "m.py") == b"def outer():\n a=3\n def inner():\n  return a+1\n return inner()\n"
    monkeypatch.setattr(pack, "_free_users", lambda scope, name: [])
    with pytest.raises(pack.PackError, match=DIFFERS + r"in function `inner` source line 4 `shared` vs generated "
                                                       r"line 4 `shared` \(names: local 0 of scope 1 vs `shared`, "
                                                       r"no renamable local\)$"):
        pack.strip_source(src, "m.py")


@pytest.mark.skipif(sys.version_info < (3, 12), reason="Python 3.12+ inlines comprehensions (PEP 709)")
def test_inlined_comprehensions_are_renamed_with_their_function():
    # symtable has no block for an inlined comprehension: its variables are looked up in the function's
    # block and renamed with the function's locals (a generator expression keeps its own block).
    src = (b"def f(a):\n    squares = [item * item for item in a]\n    last = [lambda: item for item in a][0]()\n"
           b"    return squares, last, (k for k in a)\nprint(f([1, 2])[:2])\n")
    out = pack.strip_source(src, "m.py")
    assert out == (b"def f(a):\n c=[b*b for b in a]\n d=[lambda:b for b in a][0]()\n return(c,d,(a for a in a))\n"
                   b"print(f([1,2])[:2])\n")
    assert output(out) == output(src) == "([1, 4], 2)\n"


# =============================================================================================
# Compaction and the Latin-1 wrapper
# =============================================================================================

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


# =============================================================================================
# train_gpt.py stripped and shipped
# =============================================================================================

DIST_ARGV = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "train_gpt.py"
    shutil.copyfile(ROOT / "train_gpt.py", path)
    return path


@pytest.fixture(scope="module")
def stripped(snapshot) -> bytes:
    return pack.strip_source(snapshot.read_bytes(), str(snapshot))


@pytest.fixture(scope="module")
def shipped(snapshot, tmp_path_factory) -> Path:
    """The file `python records/pack.py SOURCE -o OUT` writes: stripped, the smaller codec."""
    out = tmp_path_factory.mktemp("ship") / "train_gpt.py"
    assert pack.main([str(snapshot), "-o", str(out)]) == 0
    return out


# ---------------------------------------------------------------------------------------------
# The stripped program: the source's syntax tree without docstrings, knob help and annotations, its
# function locals renamed
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_strip_removes_only_docstrings_knob_help_and_annotations(snapshot, stripped):
    src = snapshot.read_bytes()
    source_tree, tree = ast.parse(src), ast.parse(stripped)
    assert len(pack.docstrings(source_tree)) > 100 and pack.docstrings(tree) == []
    helps = pack.knob_help_args(tree)
    assert len(helps) == len(pack.knob_help_args(source_tree)) > 100
    assert {h.value for h in helps} == {""}
    assert pack.annotation_reads(source_tree) == [], "train_gpt.py reads no annotations at run time"
    strippable, kept = pack.annotated_functions(source_tree)
    assert len(strippable) > 100 and pack.annotated_functions(tree)[0] == []
    # custom ops (schema), their fakes and Triton kernels (tl.constexpr) keep every annotation.
    assert [ast.dump(f) for f in pack.annotated_functions(tree)[1]] == [ast.dump(f) for f in kept]
    decorators = {ast.unparse(d).split("(")[0].split(".")[-1] for f in kept for d in f.decorator_list}
    assert decorators == {"custom_op", "register_fake", "jit"}, decorators
    fields = [n for n in ast.walk(tree) if isinstance(n, ast.AnnAssign)]
    assert len(fields) == sum(isinstance(n, ast.AnnAssign) for n in ast.walk(source_tree)) > 100, "fields stay"
    expected = pack.strip_tree(source_tree)
    assert ast.dump(tree) != ast.dump(expected), "function locals are renamed"
    assert ast.dump(pack.canonical_tree(stripped.decode())) == ast.dump(
        pack.canonical_tree(pack._unparse(expected, "expected")))
    # Only variables inside functions change: parameters, attributes, keyword arguments, def, class and
    # import names, and every name at module level and in class bodies are those of the source.
    assert spelled_outside_functions(tree) == spelled_outside_functions(expected)
    renamed = [(a.id, b.id) for a, b in zip(ast.walk(expected), ast.walk(tree))
               if isinstance(a, ast.Name) and a.id != b.id]
    assert len(renamed) > 3000 and all(len(new) <= 2 for _, new in renamed)
    assert not {new for _, new in renamed} & set(dir(builtins)), "no builtin name is taken"
    tokens = list(tokenize.generate_tokens(io.StringIO(stripped.decode()).readline))
    assert not any(t.type == tokenize.COMMENT for t in tokens), "no comments"
    assert not any(t.type == tokenize.NL for t in tokens), "no blank lines, no line breaks inside brackets"
    mini = pack.minify(src)
    assert len(stripped) < 0.85 * len(mini)
    assert len(pack.compress(stripped, "lzma")) < 0.8 * len(pack.compress(mini, "lzma")), "about a quarter fewer"


def spelled_outside_functions(tree: ast.Module) -> collections.Counter:
    """Every name the renamer must leave alone: parameters, attributes, keyword arguments, def, class and
    import names, global and nonlocal declarations, and the variables of the module and of class bodies."""
    found = collections.Counter()
    for node in ast.walk(tree):
        for field in ("arg", "attr", "name", "asname", "names"):
            value = getattr(node, field, None)
            if isinstance(node, (ast.arg, ast.Attribute, ast.keyword, ast.FunctionDef, ast.AsyncFunctionDef,
                                 ast.ClassDef, ast.alias, ast.Global, ast.Nonlocal)) and value is not None:
                found[type(node).__name__, str(value)] += 1

    def outside(body: list[ast.AST]) -> None:
        for node in body:
            if isinstance(node, (*pack.FUNCTION_DEFS, ast.Lambda, *pack.COMPREHENSIONS)):
                continue
            if isinstance(node, ast.Name):
                found["Name", node.id] += 1
            outside(list(ast.iter_child_nodes(node)))
    outside(tree.body)
    return found


@pytest.mark.slow
def test_a_generated_file_with_any_other_change_is_rejected(snapshot, stripped):
    src = snapshot.read_bytes()
    pack.check_stripped(src, stripped)
    mutants = {b"ARTIFACT_LIMIT_BYTES=16000000": b"ARTIFACT_LIMIT_BYTES=16000001",  # a constant
               b"corrupted artifact": b"corrupt artifact",  # an error message (not knob help)
               b"'record':{}": b"'record':{'seed':1}",  # a preset
               # a custom op's annotations are its schema: removing them is a change
               b"def fwd(q:Tensor,k:Tensor,v:Tensor)->tuple[Tensor,Tensor]:": b"def fwd(q,k,v):",
               # a Triton kernel's tl.constexpr parameters
               b"CAP:tl.constexpr,BLOCK:tl.constexpr)": b"CAP,BLOCK)",
               # an annotation strip removes, left in place, is a difference too
               b"def run(h):": b"def run(h:Hyperparameters)->int:",
               b"size_margin_bytes:int=": b"size_margin_bytes="}  # a dataclass field's annotation
    for old, new in mutants.items():
        assert stripped.count(old) >= 1, old
        mutant = stripped.replace(old, new, 1)
        with pytest.raises(pack.PackError, match=DIFFERS + r"(in (function|class) `\w+` |at module level )"
                                                 r"source line \d+ `.+` vs generated line \d+ `.+`$"):
            pack.check_stripped(src, mutant, str(snapshot))
        with pytest.raises(pack.PackError, match="differs from the source beyond"):
            pack.verify_shipped(src, pack.pack_payload(mutant, "lzma"), "mutant.py")
    pack.verify_shipped(src, pack.pack_payload(stripped, "brotli"), "stripped.py")
    pack.verify_shipped(src, pack.pack_payload(stripped, "brotli", wrapper="latin1"), "stripped.py")


SMALL = b'''"""Module doc."""
from dataclasses import field


def knob(default, help, check=None):
    """Doc."""
    return field(default=default, metadata={"help": help, "check": check})


class Only:
    """Only a docstring: the body becomes pass."""


class H:
    a: int = knob(1, "help text "
                     "continued", None)
    b: int = knob(2, help="keyword help")
    c: str = knob("x", f"an f-string {1} is left alone")

    def f(self, n: int = 2, *rest: "list[int]", **kw: (dict)) -> list:
        """Doc."""
        return print("kept", [1,  # comment
                              2])

    @property
    def g(self) -> int:
        return self.a - -self.b

    @staticmethod
    @registry.register
    def h(x: int) -> int:
        return x
'''


DIFFERS = (r"^\S+: the stripped program differs from the source beyond docstrings, knob help, hints, annotations and "
           r"local names: ")


@pytest.mark.slow
def test_a_wrong_renaming_of_the_real_program_is_rejected(snapshot, stripped):
    """The renaming mutants of the first part on train_gpt.py itself: a function of the generated program
    is changed, and check_stripped must reject it, naming the function."""
    src = snapshot.read_bytes()
    functions = [f for f in ast.walk(ast.parse(stripped)) if isinstance(f, ast.FunctionDef)]

    def own(node: ast.AST):  # the nodes of a function outside its nested scopes
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (*pack.FUNCTION_DEFS, ast.Lambda, *pack.COMPREHENSIONS)):
                yield child
                yield from own(child)

    def stores(fn: ast.FunctionDef) -> list[str]:
        return sorted({n.id for n in own(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)})

    def reads(fn: ast.FunctionDef) -> set[str]:
        return {n.id for n in own(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}

    report = next(f for f in functions if f.name == "report_size")  # bytes_total, used in an f-string
    local, other = stores(report)[:2]
    assert len(local) == len(other) == 1 and "ARTIFACT_LIMIT_BYTES" in reads(report)
    assert any(isinstance(n, ast.Name) and n.id == local for j in ast.walk(report) if isinstance(j, ast.JoinedStr)
               for n in ast.walk(j))
    counting = next(f for f in functions if "len" in reads(f) and stores(f) and len(stores(f)[-1]) == 1)
    mutants = {"report_size": [mutate(stripped, "report_size", {local: "ARTIFACT_LIMIT_BYTES"}),  # a global
                               mutate(stripped, "report_size", {"bytes_model": "bm"}),  # a parameter
                               mutate(stripped, "report_size", {other: local}),  # two locals merged
                               mutate(stripped, "report_size", {local: "zz"}, outside_fstrings=True)],
               counting.name: [mutate(stripped, counting.name, {stores(counting)[-1]: "len"})]}  # a builtin
    for function, generated in mutants.items():
        for mutant in generated:
            with pytest.raises(pack.PackError, match=DIFFERS + f"in function `{function}` source line \\d+"):
                pack.check_stripped(src, mutant, str(snapshot))
    # Another consistent renaming is as good: the check compares the programs up to local names.
    pack.check_stripped(src, mutate(stripped, "report_size", {local: other, other: local}))


def test_strip_rules_on_a_small_source():
    out = pack.strip_source(SMALL)
    assert out == (b'from dataclasses import field\n'
                   b'def knob(default,help,check=None):\n'
                   b" return field(default=default,metadata={'help':help,'check':check})\n"
                   b'class Only:\n'
                   b' pass\n'
                   b'class H:\n'
                   b" a:int=knob(1,'',None)\n"  # class-level annotations (dataclass fields) stay
                   b" b:int=knob(2,help='')\n"
                   b" c:str=knob('x',f'an f-string {1} is left alone')\n"
                   b' def f(self,n=2,*rest,**kw):\n'
                   b"  return print('kept',[1,2])\n"
                   b' @property\n'
                   b' def g(self):\n'
                   b'  return self.a--self.b\n'
                   b' @staticmethod\n'
                   b' @registry.register\n'  # an unknown decorator may read them: h keeps its annotations
                   b' def h(x:int)->int:\n'
                   b'  return x\n')
    # Without a module-level `def knob(..., help, ...)` a call named knob is not touched.
    assert pack.strip_source(b'x = knob(1, "help")\n') == b"x=knob(1,'help')\n"
    # functools.cache (the kernel builders') reads no annotation: they go.
    assert pack.strip_source(b"@functools.cache\ndef k() -> int:\n    return 1\n") == (
        b"@functools.cache\ndef k():\n return 1\n")


HINTED = b"""class Hinted(Exception):
    def __init__(self, message, hint=""):
        super().__init__(f"{message}; {hint}" if hint else message)

def check(x):
    if x < 0:
        raise Hinted(f"X={x} is not allowed: expected >= 0", hint=f"use {-x}")
    print("fine", hint="kept: print is not a class of this module") if x > 9 else None
    raise Hinted("no hint")
"""


def test_error_hints_are_dropped_and_the_message_kept():
    out = pack.strip_source(HINTED)
    assert b"is not allowed: expected >= 0')" in out and b"use {" not in out
    assert b"hint='kept: print is not a class of this module'" in out, "only calls of the module's own classes"
    assert len(pack.hint_args(ast.parse(HINTED))) == 1
    # A keyword other than hint removed is a difference the check reports.
    wrong = out.replace(b",hint='kept: print is not a class of this module'", b"")
    with pytest.raises(pack.PackError, match="differs from the source beyond"):
        pack.check_stripped(HINTED, wrong)


@pytest.mark.slow
def test_the_real_programs_hints_are_gone_and_its_messages_kept(snapshot, stripped):
    hints = pack.hint_args(ast.parse(snapshot.read_bytes()))
    assert len(hints) >= 10 and all(call.func.id.endswith(("Error", "Diverged")) for call, _ in hints)
    assert pack.hint_args(ast.parse(stripped)) == []
    assert b"is not allowed" in stripped and b"choose another RUN_ID" not in stripped


@pytest.mark.slow
def test_the_shipped_file_stays_within_the_code_budget(shipped):
    """At most 40,500 bytes of code ship. Growing train_gpt.py past it fails here: make room (a hint, a shorter
    message, dead code) rather than raise the number. 40,000 held until PR #1855's kernels, loader, phased TTT
    order and per-group coder and then the run-fault guards took it to 47,320; moving the operations layer to
    pgolf/ brought it to 43,320, removing the alternatives public records dropped (docs/design.md, "What it
    leaves out") to 40,857 and condensing every section to 39,791."""
    assert shipped.stat().st_size <= 40_500, shipped.stat().st_size


SHIPPED_KERNELS = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("shipped", sys.argv[1])
m = importlib.util.module_from_spec(spec)
sys.modules["shipped"] = m
spec.loader.exec_module(m)
z, t = torch.randn(5, 3000, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 7, 2999, 1024, 5])
loss, lse = m.softcap_ce_triton(z, t, 30.0)
ref_loss, ref_lse = m.softcap_ce_reference(z, t, 30.0)
assert torch.allclose(loss, ref_loss, atol=1e-4) and torch.allclose(lse, ref_lse, atol=1e-4)
print("kernels ok")
"""


@pytest.mark.slow
def test_the_shipped_files_triton_kernels_find_their_source(shipped, tmp_path):
    """@triton.jit reads each kernel's source with inspect: the latin1 wrapper hands linecache the payload's
    lines, so FUSED_CE_ENABLED works from the shipped file (here through Triton's CPU interpreter)."""
    pytest.importorskip("triton", reason="FUSED_CE_ENABLED's kernels need Triton (requirements-test.txt)")
    script = tmp_path / "kernels.py"
    script.write_text(SHIPPED_KERNELS)
    out = subprocess.run([sys.executable, str(script), str(shipped)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "kernels ok", out.stderr[-2000:]


def test_a_printed_traceback_from_the_shipped_file_quotes_the_program(tmp_path):
    src = tmp_path / "boom.py"
    src.write_text("import traceback\n\ndef explode(n):\n    return 1 / n\n\nif __name__ == '__main__':\n"
                   "    try:\n        explode(0)\n    except ZeroDivisionError:\n        traceback.print_exc()\n")
    out = tmp_path / "boom_shipped.py"
    assert pack.main([str(src), "-o", str(out)]) == 0
    run = subprocess.run([sys.executable, str(out)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "ZeroDivisionError" in run.stderr
    assert "return 1/n" in run.stderr, run.stderr  # the traceback module reads lines through linecache


@pytest.mark.slow
def test_docstrings_are_kept_when_the_code_reads_them():
    src = b'"""Usage: run me."""\nimport sys\n\ndef f():\n    """Doc."""\n\nprint(__doc__, file=sys.stderr)\n'
    assert pack.docstring_reads(ast.parse(src)) == [7]
    assert pack.strip_source(src) == (b'"""Usage: run me."""\nimport sys\ndef f():\n """Doc."""\n'
                                      b'print(__doc__,file=sys.stderr)\n')
    own = Path(pack.__file__).read_bytes()  # pack.py reads its own __doc__ for --help
    assert pack.docstrings(ast.parse(pack.strip_source(own)))[0][1].value.value == pack.__doc__


@pytest.mark.slow
def test_annotations_are_kept_when_the_code_reads_them(tmp_path, capsys):
    body = b'import inspect, torch\ndef f(x: int) -> int:\n    return x\n'
    for reader in (b"print(inspect.signature(f))", b"print(f.__annotations__)",
                   b'op = torch.library.custom_op("a::f", mutates_args=())(f)'):  # not as a decorator
        src = body + reader + b"\n"
        assert pack.annotation_reads(ast.parse(src)) == [4], reader
        assert pack.strip_source(src).startswith(b"import inspect,torch\ndef f(x:int)->int:\n return x\n")
        assert pack.strip_source(body) == b"import inspect,torch\ndef f(x):\n return x\n"
        path = tmp_path / "m.py"
        path.write_bytes(src)
        capsys.readouterr()
        assert pack.main([str(path)]) == 0
        assert "  stripped: annotations kept (the code may read them at lines 4)\n" in capsys.readouterr().out
        assert pack.main([str(path), "-o", str(tmp_path / "out.py")]) == 0
        assert "annotations kept (the code may read them at lines 4)" in capsys.readouterr().out


@pytest.mark.slow
def test_top_level_names_are_compared_by_importing(snapshot, stripped):
    pack.check_top_level_names(snapshot.read_bytes(), stripped, "train_gpt.py")
    with pytest.raises(pack.PackError, match=r"^m\.py: the generated program's top-level names differ: "
                                             r"missing \['f'\], extra none$"):
        pack.check_top_level_names(b"a = 1\ndef f():\n    pass\n", b"a = 1\n", "m.py")
    with pytest.raises(pack.PackError, match=r"^m\.py \(generated\): importing it failed: ZeroDivisionError"):
        pack.check_top_level_names(b"a = 1\n", b"a = 1 / 0\n", "m.py")


@pytest.mark.slow
def test_the_cli_writes_the_smaller_codec_atomically(snapshot, stripped, shipped, capsys):
    got = pack.unpack_wrapper(shipped.read_bytes())
    assert got is not None and got[0] == stripped and got[3] == pack.DEFAULT_WRAPPER == "latin1"
    both = {codec: len(pack.pack_payload(stripped, codec, wrapper="latin1")) for codec in pack.CODECS}
    assert shipped.stat().st_size == min(both.values()) and got[1] == min(both, key=both.get)
    assert [p.name for p in shipped.parent.iterdir()] == ["train_gpt.py"], "no temporary file left"
    compile(shipped.read_bytes(), str(shipped), "exec")
    assert shipped.read_bytes().startswith(b"#coding:l1\n") and len(ast.parse(shipped.read_bytes()).body) == 4
    # --wrapper base85: an ASCII file with the same payload, a quarter larger.
    ascii_ = shipped.parent / "ascii.py"
    assert pack.main([str(snapshot), "-o", str(ascii_), "--wrapper", "base85"]) == 0
    assert pack.unpack_wrapper(ascii_.read_bytes())[::3] == (stripped, "base85")
    assert ascii_.read_bytes().isascii() and ascii_.stat().st_size > 1.2 * shipped.stat().st_size
    ascii_.unlink()
    # The old forms are still there: --mode plain ships the source byte for byte.
    plain = shipped.parent / "plain.py"
    assert pack.main([str(snapshot), "-o", str(plain), "--mode", "plain", "--codec", "lzma"]) == 0
    assert pack.unpack(plain.read_bytes()) == (snapshot.read_bytes(), "lzma")
    capsys.readouterr()
    assert pack.main([str(snapshot), "-o", str(snapshot)]) == 2
    assert capsys.readouterr().err == f"error: -o {snapshot}: is the source itself; write the packed file elsewhere\n"
    assert pack.main([str(snapshot), "-o", str(plain), "--minify", "--mode", "strip"]) == 2
    assert "--minify and --mode strip disagree" in capsys.readouterr().err


@pytest.mark.slow
def test_the_sizes_table_shows_every_mode_and_codec(snapshot, capsys):
    assert pack.main([str(snapshot)]) == 0
    out = capsys.readouterr().out
    for codec in pack.CODECS:
        for suffix in pack.MODE_SUFFIX.values():
            for wrapper in pack.WRAPPERS:
                assert f"  {codec}+{wrapper}{suffix} " in out and "(compressed " in out, (codec, wrapper, suffix)
    assert "  raw, stripped " in out
    chosen = [line for line in out.splitlines() if line.endswith("  <- -o writes this")]
    assert len(chosen) == 1 and "+latin1, stripped " in chosen[0], chosen
    assert "annotations kept" not in out and "docstrings kept" not in out


# ---------------------------------------------------------------------------------------------
# The shipped file runs: one process, torchrun, EVAL_ONLY
# ---------------------------------------------------------------------------------------------


def assert_counts_the_shipped_file(run, shipped: Path) -> None:
    assert run.rc == 0, run.describe()
    assert FINAL_RE.fullmatch(run.log_lines[-1]), run.log_lines[-1]
    assert int(run.final["bytes_code"]) == shipped.stat().st_size, "bytes_code counts the file that ran"
    assert run.metrics["bytes_code"] == shipped.stat().st_size
    assert run.metrics["code_sha256"] == sha(shipped.read_bytes())


@pytest.fixture(scope="module")
def shipped_run(dataset, shipped, tmp_path_factory):
    d = tmp_path_factory.mktemp("shipped_run")
    return run_script(d, tiny_env(dataset, d, "ship", WARMUP_STEPS=0), script=shipped)


@pytest.mark.slow
def test_shipped_file_trains_exactly_like_the_source(dataset, snapshot, shipped, shipped_run, tmp_path):
    assert_counts_the_shipped_file(shipped_run, shipped)
    ref = run_script(tmp_path, tiny_env(dataset, tmp_path, "ref", WARMUP_STEPS=0), script=snapshot)
    assert ref.rc == 0, ref.describe()
    assert [s["loss"] for s in shipped_run.steps()] == [s["loss"] for s in ref.steps()]
    assert (shipped_run.final["val_loss"], shipped_run.final["val_bpb"]) == (ref.final["val_loss"],
                                                                            ref.final["val_bpb"])
    assert shipped_run.metrics["config"] == {**ref.metrics["config"], "RUN_ID": "ship",
                                             "LOG_DIR": shipped_run.metrics["config"]["LOG_DIR"]}


@pytest.mark.slow
def test_shipped_file_runs_under_torchrun(dataset, shipped, shipped_run, tmp_path):
    run = run_script(tmp_path, tiny_env(dataset, tmp_path, "dist", WARMUP_STEPS=0), DIST_ARGV, timeout=300,
                     script=shipped)
    assert_counts_the_shipped_file(run, shipped)
    assert run.metrics["world_size"] == 2
    assert sum(1 for line in run.stdout_lines if line.startswith("final ")) == 1, "only rank 0 prints"
    single = shipped_run.steps()
    assert len(run.steps()) == len(single) == 6
    for s, d in zip(single, run.steps()):
        assert rel_diff(float(s["loss"]), float(d["loss"])) <= 1e-3, (s, d)
    assert rel_diff(shipped_run.metrics["val_loss"], run.metrics["val_loss"]) <= 1e-4


@pytest.mark.slow
def test_shipped_file_rescores_its_own_artifact_with_pgolf_beside_it(dataset, snapshot, shipped, shipped_run,
                                                                     tmp_path):
    """Re-scoring is the repository's pgolf/recover.py, not shipped: the shipped file alone (as in a records
    folder) refuses EVAL_ONLY in one line before any work; with a copy of pgolf/ beside it, it reproduces its
    own run's score."""
    assert shipped_run.rc == 0, shipped_run.describe()
    env = tiny_env(dataset, tmp_path, "rescore", EVAL_ONLY=1, ARTIFACT=shipped_run.path("ptz"), WARMUP_STEPS=0)
    env.pop("PYTHONPATH", None)  # only what sits beside the file that runs
    alone = run_script(tmp_path, env, script=shipped)
    assert alone.rc == 2 and error_lines(alone) == [
        "error: EVAL_ONLY=1 is not allowed: it needs the repository's pgolf/ beside train_gpt.py"], alone.describe()
    assert "Traceback" not in alone.stderr and not (tmp_path / "logs").exists()
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "pgolf", repo / "pgolf", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(shipped, repo / "train_gpt.py")
    run = run_script(tmp_path, env, script=repo / "train_gpt.py")
    assert_counts_the_shipped_file(run, shipped)
    a, b = shipped_run.final, run.final
    assert (b["val_loss"], b["val_bpb"], b["bytes_model"], b["steps"]) == (a["val_loss"], a["val_bpb"],
                                                                          a["bytes_model"], a["steps"])
    assert b["train_time_ms"] == "0" and run.metrics["eval_only"] is True
    # The stripped payload is not the readable source, so only the shipped file re-scores its artifacts.
    shutil.copyfile(snapshot, repo / "readable.py")
    readable = run_script(tmp_path, {**env, "RUN_ID": "rescore_readable"}, script=repo / "readable.py")
    assert readable.rc != 0 and f"written by code sha256 {sha(shipped.read_bytes())}" in readable.stderr
