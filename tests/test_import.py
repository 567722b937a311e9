"""Importing train_gpt.py has no side effects: no files, no process group, no device, no environment.

Run: python -m pytest -q tests/test_import.py

The subprocesses import the script from a fresh, empty working directory with a child environment
that has no torchrun variables and no knobs (other than the ones a test sets on purpose).
"""

from __future__ import annotations

import ast
import json
import os
import pytest
import shutil
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist

from conftest import ROOT, tg
from pgolf import knobs

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache"}


def child_env(pythonpath: Path, **extra: str) -> dict[str, str]:
    drop = set(tg.Hyperparameters.knob_names()) | set(knobs.UNIMPLEMENTED_FEATURES) | set(TORCHRUN_VARS)
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith("TORCHELASTIC_") and k not in ("PYTHONPATH", "PRESET")}
    env["PYTHONPATH"] = str(pythonpath)
    env.update(extra)
    return env


def tree_files(root: Path) -> set[str]:
    """Every file and folder under root (relative paths), without .git and caches."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        rel = Path(dirpath).relative_to(root)
        out.update(str(rel / d) + "/" for d in dirnames)
        out.update(str(rel / f) for f in filenames)
    return out


def git_untracked(root: Path) -> set[str] | None:
    """Untracked and ignored paths as git reports them (None when git is unavailable)."""
    if shutil.which("git") is None or not (root / ".git").exists():
        return None
    proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--ignored"], cwd=root,
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return None
    return {line[3:] for line in proc.stdout.splitlines()
            if not any(part in SKIP_DIRS for part in Path(line[3:].rstrip("/")).parts)}


# Runs in the child: import what train_gpt imports, then watch os.environ while importing it.
PROBE = r"""
import collections.abc, json, os, sys
import numpy, torch, torch.distributed, torch.nn.functional  # train_gpt's third-party imports, pre-loaded

class Spy(collections.abc.MutableMapping):
    def __init__(self, inner):
        self.inner, self.seen = inner, []
    def __getitem__(self, k):
        self.seen.append(k); return self.inner[k]
    def __setitem__(self, k, v):
        self.seen.append("set:" + k); self.inner[k] = v
    def __delitem__(self, k):
        self.seen.append("del:" + k); del self.inner[k]
    def __iter__(self):
        self.seen.append("<iter>"); return iter(self.inner)
    def __len__(self):
        self.seen.append("<len>"); return len(self.inner)
    def copy(self):
        self.seen.append("<copy>"); return dict(self.inner)

before = dict(os.environ)
real, spy = os.environ, Spy(os.environ)
os.environ = spy
try:
    import train_gpt
finally:
    os.environ = real
print(json.dumps({
    "seen": spy.seen,
    "env_unchanged": dict(os.environ) == before,
    "dist_initialized": torch.distributed.is_initialized(),
    "cuda_initialized": torch.cuda.is_initialized(),
    "module_file": train_gpt.__file__,
    "num_layers_default": train_gpt.Hyperparameters().num_layers,
}))
"""


def run_probe(cwd: Path, pythonpath: Path, **extra: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=child_env(pythonpath, **extra),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_import_in_fresh_dir_creates_no_files(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before_tree, before_git = tree_files(ROOT), git_untracked(ROOT)
    proc = subprocess.run([sys.executable, "-c", "import train_gpt, torch; "
                           "assert not torch.distributed.is_initialized(); print(train_gpt.__file__)"],
                          cwd=cwd, env=child_env(ROOT), capture_output=True, text=True, timeout=120)
    after_tree, after_git = tree_files(ROOT), git_untracked(ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()).resolve() == (ROOT / "train_gpt.py").resolve()
    assert proc.stderr == ""  # and nothing printed as a warning at import
    assert list(cwd.iterdir()) == [], "import wrote into the working directory"
    assert sorted(after_tree - before_tree) == [], "import created files in the repository"
    if before_git is not None and after_git is not None:
        assert sorted(after_git - before_git) == [], "git status shows new files after the import"


@pytest.mark.slow
def test_import_of_isolated_copy_touches_nothing(tmp_path):
    # The same check on a private copy of the script, immune to other work in the repository tree.
    repo, cwd = tmp_path / "repo", tmp_path / "cwd"
    repo.mkdir()
    cwd.mkdir()
    shutil.copy2(ROOT / "train_gpt.py", repo / "train_gpt.py")
    result = run_probe(cwd, repo, PYTHONDONTWRITEBYTECODE="1")
    assert Path(result["module_file"]).resolve() == (repo / "train_gpt.py").resolve()
    assert sorted(p.name for p in repo.iterdir()) == ["train_gpt.py"]
    assert list(cwd.iterdir()) == []
    assert result["dist_initialized"] is False and result["cuda_initialized"] is False


@pytest.mark.slow
def test_import_does_not_read_the_environment(tmp_path):
    # Knobs that from_env would reject must not matter at import time: only from_env reads them.
    result = run_probe(tmp_path, ROOT, NUM_LAYERS="eleven", STRICT_ENV="1", TTT_ENABLED="1",
                       NUM_LAYER="3", PRESET="nonexistent")
    assert result["seen"] == [], f"importing train_gpt touched os.environ: {result['seen'][:20]}"
    assert result["env_unchanged"] is True
    assert result["num_layers_default"] == 11
    assert result["dist_initialized"] is False and result["cuda_initialized"] is False
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_probe_detects_an_environment_read(tmp_path):
    # The probe is not vacuous: a copy of the script with one module-level os.environ read is caught.
    repo = tmp_path / "repo"
    repo.mkdir()
    source = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
    (repo / "train_gpt.py").write_text(source + '\n_LEAK = os.environ.get("NUM_LAYERS")\n', encoding="utf-8")
    result = run_probe(tmp_path, repo, PYTHONDONTWRITEBYTECODE="1", NUM_LAYERS="eleven")
    assert "NUM_LAYERS" in result["seen"]


def test_in_process_import_has_no_process_group():
    import train_gpt

    assert train_gpt is tg
    assert not dist.is_initialized()
    assert callable(train_gpt.main) and train_gpt.__name__ == "train_gpt"


@pytest.mark.slow
def test_pgolf_recover_does_not_import_train_gpt(tmp_path):
    """pgolf.recover works on the running train_gpt module it is handed: importing train_gpt there would make
    second copies of its classes (run as a script, train_gpt is `__main__`), and main()'s `except ConfigError`
    would miss pgolf's. Neither at import nor inside a function does any pgolf module import it."""
    code = "import sys, pgolf.recover; assert 'train_gpt' not in sys.modules, sorted(sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=child_env(ROOT), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in sorted((ROOT / "pgolf").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = ({a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
                   | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module})
        assert not {m for m in modules if m.split(".")[0] == "train_gpt"}, path


def test_operations_is_none_only_where_pgolf_is_missing(monkeypatch):
    import pgolf.runs
    assert tg.operations("runs") is pgolf.runs
    monkeypatch.setitem(sys.modules, "pgolf", None)  # as beside a shipped copy: no pgolf/
    assert tg.operations("runs") is None
    monkeypatch.undo()

    def broken(name: str, *args):  # pgolf is there, but something it imports is not: that error surfaces
        raise ModuleNotFoundError("No module named 'brotli'", name="brotli")

    monkeypatch.setattr(tg.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="brotli"):
        tg.operations("runs")
