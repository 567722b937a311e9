"""Every environment variable the documentation names is one the code knows.

Run: python -m pytest -q tests/test_docs.py

Scanned: README.md, records/README.md and data/README.md. Only code counts: fenced code blocks
(``` … ```) and inline code spans (`…`, which may wrap a line); prose is never scanned, so a word
like FineWeb or BPB in a sentence is not a variable.

Inside code, a variable is
- an UPPER_CASE name with at least one underscore (`[A-Z][A-Z0-9]*(_[A-Z0-9]+)+`, e.g. `EVAL_STRIDE`,
  `$HF_TOKEN`, `LOG_DIR/<id>.txt` gives LOG_DIR), or
- a single UPPER_CASE word directly followed by `=` and a value (`SEED=42`, `PRESET=smoke`,
  `DEVICE=cpu`); a bare single word (`GPTQ`, `BOS`, `PGOLFART`) is not a variable.
A name is not taken when it is part of a longer identifier or a dotted name (`L.FORMAT_RAW`,
`fineweb_SP_X`), when it is a file name (`NOTES_V2.md`: followed by a dot and a lower-case letter) or a
call (`PARAM_GROUPS(`), and a single word is not taken in `A == B` or `H = …` (spaces around `=`).

Each such name must be known to train_gpt.py (a knob, an alias, a legacy, retired or unimplemented-
feature name, a launcher variable or a fixed knob of PR #1855; read from the module, never copied here) or be in ALLOWLIST with
its reason. Allowlist entries are checked too: one said to be read by a script must appear there as a
string literal of exactly that name, one said to be a constant of train_gpt.py must be an attribute of
the module, a deliberate misspelling must make train_gpt.py suggest a knob, and a placeholder must be
part of the command syntax its script prints.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT, tg

DOCS = ("README.md", "records/README.md", "data/README.md")

# name -> (kind, where, one-line reason). kind: "script" (a repository script reads it: `where` is the
# file, checked), "constant" (a constant of train_gpt.py, not a variable: checked), "misspelt" (a
# deliberate misspelling the README shows being caught: checked), "placeholder" (a metavariable of a
# command syntax that `where` prints: checked), "external" (read by a tool we run or by the system:
# `where` names it). An entry no document mentions any more fails too.
ALLOWLIST: dict[str, tuple[str, str, str]] = {
    "HF_TOKEN": ("script", "data/cached_challenge_fineweb.py", "sent to the hub when set"),
    "MATCHED_FINEWEB_REPO_ID": ("script", "data/cached_challenge_fineweb.py", "dataset repository override"),
    "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX": ("script", "data/cached_challenge_fineweb.py", "default of --remote-root"),
    "PG_RETRY_BASE_SECONDS": ("script", "data/cached_challenge_fineweb.py", "default of --retry-base-seconds"),
    "CASEOPS_REFERENCE": ("script", "tests/test_caseops.py", "the record's lossless_caps.py for the byte-identity test"),
    "MINI_TRAIN_SECONDS": ("script", "bench/mini_track.py", "training seconds of the mini track"),
    "PEAK_TFLOPS": ("script", "bench/step.py", "peak TFLOP/s for MFU on an unlisted GPU"),
    "PARAM_GROUPS": ("constant", "train_gpt.py", "the table mapping parameters to optimizer groups"),
    "MUON_WDD": ("misspelt", "train_gpt.py", "README's example of a misspelt knob (MUON_WD)"),
    "NUM_LAYER": ("misspelt", "train_gpt.py", "README's example of a misspelt knob (NUM_LAYERS)"),
    "SEEDS": ("misspelt", "train_gpt.py", "README's example of why sweeps set STRICT_ENV=1 (SEED)"),
    "NAME": ("placeholder", "bench/mini_track.py", "metavariable of `--variant NAME=KEY=VAL,...`"),
    "KEY": ("placeholder", "bench/mini_track.py", "metavariable of `--variant NAME=KEY=VAL,...`"),
    "NCCL_NET": ("external", "NCCL", "NCCL's network transport (Socket on GCP)"),
}
VARIANT_SYNTAX = "NAME=KEY=VAL,..."  # bench/mini_track.py's metavar, quoted by README.md

_FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.DOTALL | re.MULTILINE)
_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)
_MULTI = re.compile(r"(?<![A-Za-z0-9_.])([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)(?![A-Za-z0-9_(]|\.[a-z])")
_SINGLE = re.compile(r"(?<![A-Za-z0-9_.])([A-Z][A-Z0-9]*)=(?!=)")


def code_snippets(text: str) -> list[str]:
    """Fenced code blocks, then the inline code spans of the remaining text (a span ends at its
    paragraph: it may wrap a line but not cross a blank line)."""
    blocks = [m.group(1) for m in _FENCE.finditer(text)]
    paragraphs = re.split(r"\n[ \t]*\n", _FENCE.sub("\n\n", text))
    return blocks + [m.group(2) for para in paragraphs for m in _SPAN.finditer(para)]


def env_names(text: str) -> set[str]:
    """The environment-variable-like names in the code of a Markdown text (rules: module docstring)."""
    names: set[str] = set()
    for snippet in code_snippets(text):
        names.update(_MULTI.findall(snippet))
        names.update(_SINGLE.findall(snippet))
    return names


def known_names() -> set[str]:
    return (set(tg.Hyperparameters.knob_names()) | set(tg.KNOB_ALIASES) | set(tg.LEGACY_VARS)
            | set(tg.RETIRED_VARS) | set(tg.UNIMPLEMENTED_FEATURES) | set(tg.LAUNCHER_VARS) | set(tg.FIXED_KNOBS))


def unknown_names(text: str) -> list[str]:
    return sorted(env_names(text) - known_names() - set(ALLOWLIST))


@pytest.mark.parametrize("doc", DOCS)
def test_doc_names_only_known_variables(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    names = env_names(text)
    assert names, f"{doc}: no variable found; the extraction is broken"
    bad = unknown_names(text)
    assert not bad, (f"{doc} names variables that train_gpt.py does not know and ALLOWLIST does not "
                     f"explain: {', '.join(bad)}")


def test_readme_scan_is_not_vacuous():
    names = env_names((ROOT / "README.md").read_text(encoding="utf-8"))
    # single words come only from NAME=value; names with underscores from anywhere in code
    assert {"PRESET", "SEED", "DEVICE", "EVAL_STRIDE", "NCCL_NET", "PHASED_TTT_ENABLED"} <= names
    assert len(names & set(tg.Hyperparameters.knob_names())) > 50


def test_checker_flags_made_up_names():
    text = ("Run `SEEDZ=42 NUM_LAYRES=9 python train_gpt.py`.\n\n```bash\nEVAL_STRIDES=64 SEED=1 python x.py\n```\n"
            "Prose is not scanned: NOT_A_CODE_NAME=1.\n")
    assert unknown_names(text) == ["EVAL_STRIDES", "NUM_LAYRES", "SEEDZ"]


def test_extraction_rules():
    text = ("`LOG_DIR/<id>.txt` `DIR/manifest.json` `M.model` `GPTQ` `BOS` `L.FORMAT_RAW` `NOTES_V2.md`\n"
            "`H = Σ xᵀx` `A == B` `fineweb_SP_X` `PRESET=smoke` `${HF_TOKEN}` `--variant wide=MLP_MULT=5`\n"
            "a span that `wraps\nEVAL_STRIDE=64` a line; ```` ``COMPILE=0`` ```` nested backticks\n\n"
            "an unclosed ` stays in its paragraph\n\n`QAT_ENABLED=0` pairs again\n\n"
            "```\nTARGET_MB=15.9\n```\n")
    assert env_names(text) == {"LOG_DIR", "PRESET", "HF_TOKEN", "MLP_MULT", "EVAL_STRIDE", "COMPILE", "QAT_ENABLED",
                               "TARGET_MB"}


def _string_literals(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


@pytest.mark.parametrize("name", sorted(ALLOWLIST))
def test_allowlist_entries_are_true(name):
    kind, where, reason = ALLOWLIST[name]
    assert reason, f"{name}: every allowlist entry needs a reason"
    assert name not in known_names(), f"{name} is now known to train_gpt.py: drop it from ALLOWLIST"
    if kind == "script":
        assert name in _string_literals(ROOT / where), f"{name}: {where} does not read it"
    elif kind == "constant":
        assert hasattr(tg, name), f"{name}: not a constant of train_gpt.py"
    elif kind == "placeholder":
        assert VARIANT_SYNTAX in _string_literals(ROOT / where) and name in re.findall(r"[A-Z]+", VARIANT_SYNTAX)
    elif kind == "misspelt":
        warnings = tg.Hyperparameters.from_env({name: "1"}).env_warnings
        assert any(name in w and "did you mean" in w for w in warnings), warnings
    else:
        assert kind == "external" and where, f"{name}: unknown kind {kind!r}"


def test_allowlist_entries_are_used():
    mentioned = set().union(*(env_names((ROOT / d).read_text(encoding="utf-8")) for d in DOCS))
    unused = sorted(set(ALLOWLIST) - mentioned)
    assert not unused, f"ALLOWLIST entries no document mentions: {', '.join(unused)}; drop them"
