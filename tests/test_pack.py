"""records/pack.py's strip mode: the shipped file is generated, minimal, and the one that runs.

Run:
    python -m pytest -q tests/test_pack.py --durations=5
    python -m pytest -q -m "not slow" tests/test_pack.py      # no training runs

Everything works on a snapshot of train_gpt.py, so an edit to the script during the session cannot
make the runs disagree. The slow tests run the stripped, packed snapshot as a user would (test_run.TINY
without warmup, ~10 s a run on a 2-core CPU): one process next to the readable snapshot (the same
losses), two processes under torchrun on CPU (gloo), and EVAL_ONLY on the first run's artifact. Every
log must count bytes_code = the size of the shipped file.
"""

from __future__ import annotations

import ast
import hashlib
import io
import shutil
import sys
import tokenize
from pathlib import Path

import pytest

from conftest import ROOT
from test_run import FINAL_RE, rel_diff, run_script, tiny_env

RECORDS = ROOT / "records"
if str(RECORDS) not in sys.path:
    sys.path.insert(0, str(RECORDS))

import pack  # noqa: E402

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
# The stripped program: the source's syntax tree without docstrings and knob help
# ---------------------------------------------------------------------------------------------


def test_strip_removes_only_docstrings_and_knob_help(snapshot, stripped):
    src = snapshot.read_bytes()
    source_tree, tree = ast.parse(src), ast.parse(stripped)
    assert len(pack.docstrings(source_tree)) > 100 and pack.docstrings(tree) == []
    helps = pack.knob_help_args(tree)
    assert len(helps) == len(pack.knob_help_args(source_tree)) > 100
    assert {h.value for h in helps} == {""}
    assert ast.dump(tree) == ast.dump(pack.strip_tree(source_tree))
    tokens = list(tokenize.generate_tokens(io.StringIO(stripped.decode()).readline))
    assert not any(t.type == tokenize.COMMENT for t in tokens), "no comments"
    assert not any(t.type == tokenize.NL for t in tokens), "no blank lines, no line breaks inside brackets"
    mini = pack.minify(src)
    assert len(stripped) < 0.85 * len(mini)
    assert len(pack.compress(stripped, "lzma")) < 0.8 * len(pack.compress(mini, "lzma")), "about a quarter fewer"


def test_a_generated_file_with_any_other_change_is_rejected(snapshot, stripped):
    src = snapshot.read_bytes()
    pack.check_stripped(src, stripped)
    mutants = {b"ARTIFACT_LIMIT_BYTES = 16_000_000": b"ARTIFACT_LIMIT_BYTES = 16_000_001",  # a constant
               b"corrupted artifact": b"corrupt artifact",  # an error message (not knob help)
               b'"record": {}': b'"record": {"seed": 1}'}  # a preset
    for old, new in mutants.items():
        assert stripped.count(old) >= 1, old
        mutant = stripped.replace(old, new, 1)
        with pytest.raises(pack.PackError, match=r"^\S+: the stripped program differs from the source beyond "
                                                 r"docstrings and knob help: source line \d+ `.+` vs generated "
                                                 r"line \d+ `.+`$"):
            pack.check_stripped(src, mutant, str(snapshot))
        with pytest.raises(pack.PackError, match="differs from the source beyond"):
            pack.verify_shipped(src, pack.pack_payload(mutant, "lzma"), "mutant.py")
    pack.verify_shipped(src, pack.pack_payload(stripped, "brotli"), "stripped.py")


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

    def f(self):
        """Doc."""
        return print("kept", [1,  # comment
                              2])
'''


def test_strip_rules_on_a_small_source():
    out = pack.strip_source(SMALL)
    assert out == (b'from dataclasses import field\n'
                   b'def knob(default, help, check=None):\n'
                   b' return field(default=default, metadata={"help": help, "check": check})\n'
                   b'class Only:\n'
                   b' pass\n'
                   b'class H:\n'
                   b' a: int = knob(1, "", None)\n'
                   b' b: int = knob(2, help="")\n'
                   b' c: str = knob("x", f"an f-string {1} is left alone")\n'
                   b' def f(self):\n'
                   b'  return print("kept", [1,2])\n')
    # Without a module-level `def knob(..., help, ...)` a call named knob is not touched.
    assert pack.strip_source(b'x = knob(1, "help")\n') == b'x = knob(1, "help")\n'


def test_docstrings_are_kept_when_the_code_reads_them():
    src = b'"""Usage: run me."""\nimport sys\n\ndef f():\n    """Doc."""\n\nprint(__doc__, file=sys.stderr)\n'
    assert pack.docstring_reads(ast.parse(src)) == [7]
    assert pack.strip_source(src) == (b'"""Usage: run me."""\nimport sys\ndef f():\n """Doc."""\n'
                                      b'print(__doc__, file=sys.stderr)\n')
    own = Path(pack.__file__).read_bytes()  # pack.py reads its own __doc__ for --help
    assert pack.docstrings(ast.parse(pack.strip_source(own)))[0][1].value.value == pack.__doc__


def test_top_level_names_are_compared_by_importing(snapshot, stripped):
    pack.check_top_level_names(snapshot.read_bytes(), stripped, "train_gpt.py")
    with pytest.raises(pack.PackError, match=r"^m\.py: the generated program's top-level names differ: "
                                             r"missing \['f'\], extra none$"):
        pack.check_top_level_names(b"a = 1\ndef f():\n    pass\n", b"a = 1\n", "m.py")
    with pytest.raises(pack.PackError, match=r"^m\.py \(generated\): importing it failed: ZeroDivisionError"):
        pack.check_top_level_names(b"a = 1\n", b"a = 1 / 0\n", "m.py")


def test_the_cli_writes_the_smaller_codec_atomically(snapshot, stripped, shipped, capsys):
    got = pack.unpack(shipped.read_bytes())
    assert got is not None and got[0] == stripped
    both = {codec: len(pack.pack_payload(stripped, codec)) for codec in pack.CODECS}
    assert shipped.stat().st_size == min(both.values()) and got[1] == min(both, key=both.get)
    assert [p.name for p in shipped.parent.iterdir()] == ["train_gpt.py"], "no temporary file left"
    compile(shipped.read_bytes(), str(shipped), "exec")
    # The old forms are still there: --mode plain ships the source byte for byte.
    plain = shipped.parent / "plain.py"
    assert pack.main([str(snapshot), "-o", str(plain), "--mode", "plain", "--codec", "lzma"]) == 0
    assert pack.unpack(plain.read_bytes()) == (snapshot.read_bytes(), "lzma")
    capsys.readouterr()
    assert pack.main([str(snapshot), "-o", str(snapshot)]) == 2
    assert capsys.readouterr().err == f"error: -o {snapshot}: is the source itself; write the packed file elsewhere\n"
    assert pack.main([str(snapshot), "-o", str(plain), "--minify", "--mode", "strip"]) == 2
    assert "--minify and --mode strip disagree" in capsys.readouterr().err


def test_the_sizes_table_shows_every_mode_and_codec(snapshot, capsys):
    assert pack.main([str(snapshot)]) == 0
    out = capsys.readouterr().out
    for codec in pack.CODECS:
        for suffix in pack.MODE_SUFFIX.values():
            assert f"  {codec}+base85{suffix} " in out and "(compressed " in out, (codec, suffix)
    assert "  raw, stripped " in out


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
def test_shipped_file_rescores_its_own_artifact(dataset, snapshot, shipped, shipped_run, tmp_path):
    assert shipped_run.rc == 0, shipped_run.describe()
    env = tiny_env(dataset, tmp_path, "rescore", EVAL_ONLY=1, ARTIFACT=shipped_run.path("ptz"))
    run = run_script(tmp_path, env, script=shipped)
    assert_counts_the_shipped_file(run, shipped)
    a, b = shipped_run.final, run.final
    assert (b["val_loss"], b["val_bpb"], b["bytes_model"], b["steps"]) == (a["val_loss"], a["val_bpb"],
                                                                          a["bytes_model"], a["steps"])
    assert b["train_time_ms"] == "0" and run.metrics["eval_only"] is True
    # The stripped payload is not the readable source, so only the shipped file re-scores its artifacts.
    readable = run_script(tmp_path, {**env, "RUN_ID": "rescore_readable"}, script=snapshot)
    assert readable.rc != 0 and f"written by code sha256 {sha(shipped.read_bytes())}" in readable.stderr
