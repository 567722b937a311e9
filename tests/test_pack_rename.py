"""records/pack.py's strip mode renames function locals; check_stripped verifies it by alpha-equivalence.

Run:
    python -m pytest -q tests/test_pack_rename.py

Small programs: what is renamed (locals of functions, lambdas and comprehensions inside functions, closures
consistently) and what is not (parameters, globals, nonlocals, def/class/import names, class bodies, the
module, functions under other decorators or reading their locals by name); every generated program prints
what its source prints. Then the check: wrong renamings (a captured global or builtin, a parameter, two
locals merged, a missed f-string occurrence or closure use) are rejected, naming the function; a renamer
bug (patched in) is caught. (The same mutants on train_gpt.py: tests/test_pack.py.)
"""

from __future__ import annotations

import ast
import contextlib
import io
import sys

import pytest

from conftest import ROOT

RECORDS = ROOT / "records"
if str(RECORDS) not in sys.path:
    sys.path.insert(0, str(RECORDS))

import pack  # noqa: E402

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
