"""Every environment variable the documentation names is one the code knows; the README stays short and
its links hold.

Run: python -m pytest -q tests/test_docs.py

Scanned for variables: README.md, docs/design.md, docs/knobs.md, records/README.md and data/README.md. Only
code counts: fenced code blocks
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

The README is at most README_MAX_LINES lines and names no tracker issue, no path outside the repository and no
nickname of a record (FORBIDDEN); every relative link in README.md and docs/*.md points to a file that exists
and, with a `#fragment`, to a heading of that file (GitHub's anchors: lower case, punctuation dropped, spaces
as hyphens, a repeated heading numbered -1, -2, ...).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT, tg
from pgolf import knobs

DOCS = ("README.md", "docs/design.md", "docs/knobs.md", "records/README.md", "data/README.md")
README_MAX_LINES = 200

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
    "MUON_WDD": ("misspelt", "train_gpt.py", "docs/design.md's example of a misspelt knob (MUON_WD)"),
    "NUM_LAYER": ("misspelt", "train_gpt.py", "docs/design.md's example of a misspelt knob (NUM_LAYERS)"),
    "SEEDS": ("misspelt", "train_gpt.py", "README's example of why sweeps set STRICT_ENV=1 (SEED)"),
    "NAME": ("placeholder", "bench/mini_track.py", "metavariable of `--variant NAME=KEY=VAL,...`"),
    "KEY": ("placeholder", "bench/mini_track.py", "metavariable of `--variant NAME=KEY=VAL,...`"),
    "NCCL_NET": ("external", "NCCL", "NCCL's network transport (Socket on GCP)"),
}
VARIANT_SYNTAX = "NAME=KEY=VAL,..."  # bench/mini_track.py's metavar, quoted by docs/design.md

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
    return set(tg.Hyperparameters.knob_names()) | knobs.KNOWN_NAMES | set(tg.LAUNCHER_VARS)


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


def test_doc_scan_is_not_vacuous():
    readme = env_names((ROOT / "README.md").read_text(encoding="utf-8"))
    # single words come only from NAME=value; names with underscores from anywhere in code
    assert {"PRESET", "SEED", "DEVICE", "STRICT_ENV", "NCCL_NET", "MAX_WALLCLOCK_SECONDS"} <= readme
    design = env_names((ROOT / "docs/design.md").read_text(encoding="utf-8"))
    assert {"EVAL_STRIDE", "PHASED_TTT_NUM_PHASES", "GPTQ_RESERVE_SECONDS"} <= design
    assert len(design & set(tg.Hyperparameters.knob_names())) > 50
    knobs = env_names((ROOT / "docs/knobs.md").read_text(encoding="utf-8"))
    assert {k for k in tg.Hyperparameters.knob_names() if "_" in k} <= knobs  # a bare single word is not taken


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


# ---------------------------------------------------------------- README length, words and links

FORBIDDEN = {
    r"(?i)\bissue \d+": "a tracker issue number (say the fact, or cite a public PR)",
    r"\.\./shared": "a path outside the repository",
    r"\bR0\d{3}\b": "a record's nickname (say 'the 2026-04-05 record (PR #1394)')",
}
_LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$", re.MULTILINE)


def link_docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """`text` without fenced code blocks and inline code spans (links and headings there are not Markdown)."""
    return "\n\n".join(_SPAN.sub(" ", para) for para in re.split(r"\n[ \t]*\n", _FENCE.sub("\n\n", text)))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading's text: links keep their text, markup and punctuation go, spaces become -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in _HEADING.finditer(_FENCE.sub("\n\n", text)):
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    """The relative links of a Markdown file whose file or #anchor does not exist."""
    bad = []
    for target in _LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest.read_text(encoding="utf-8")):
            bad.append(f"{target} (no heading #{fragment} in {dest.name})")
    return bad


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move detail to docs/"


@pytest.mark.parametrize("doc", ["README.md", "docs/design.md", "docs/knobs.md"])
def test_docs_name_no_issues_paths_or_nicknames(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    found = [f"{m.group(0)!r} ({why})" for pattern, why in FORBIDDEN.items() for m in re.finditer(pattern, text)]
    assert not found, f"{doc}: {', '.join(found)}"


@pytest.mark.parametrize("path", link_docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert not broken_links(path), f"{path.relative_to(ROOT)}: broken links: {', '.join(broken_links(path))}"


def test_link_checker_rules(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## The data: `cached.py` (FA3, v2)\n\n## Same\n\n## Same\n")
    doc = tmp_path / "doc.md"
    doc.write_text("# Top\n\n```\n# not a heading\n[x](missing_in_code.md)\n```\n"
                   "[a](other.md) [b](other.md#the-data-cachedpy-fa3-v2) [c](other.md#same-1) [d](#top) "
                   "[e](https://example.com/x) `[f](missing_in_span.md)` ![img](missing.png)\n"
                   "[g](nowhere.md) [h](other.md#nope) [i](#not-a-heading) [j](other.md#same-2)\n")
    assert broken_links(doc) == ["nowhere.md (no such file)", "other.md#nope (no heading #nope in other.md)",
                                 "#not-a-heading (no heading #not-a-heading in doc.md)",
                                 "other.md#same-2 (no heading #same-2 in other.md)"]
    assert slug("Attention kernels (FA3, FA4, SDPA)") == "attention-kernels-fa3-fa4-sdpa"
