"""Shared fixtures. Run the suite with `python -m pytest -q tests` from the repository root.

`train_gpt.py` is imported as a module (importing it has no side effects). Tests that want real
data use ../shared/data when it is present and skip with a reason otherwise; the `dataset`
fixture falls back to the embedded sample (data/make_sample.py), so every test that needs shards
and a tokenizer runs on any machine.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
CANONICAL_TOKENIZER = SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model"
CHALLENGE_DOCS = SHARED_DATA / "corpus" / "fineweb_challenge_docs_200.jsonl"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402
from pgolf.shards import write_shard  # noqa: E402

# One intra-op thread in the test process unless OMP_NUM_THREADS says otherwise: at these sizes one thread is as
# fast as two, and two collapse when other processes share a 2-core machine (the -m "not slow" tier took 8.7 min
# with two threads beside a CI run, 1.2 min with one). Subprocesses keep the environment they are given.
if "OMP_NUM_THREADS" not in os.environ:
    tg.torch.set_num_threads(1)


def read_jsonl_texts(path: Path, limit: int | None = None) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            texts.append(json.loads(line)["text"])
            if limit is not None and len(texts) >= limit:
                break
    return texts


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not CANONICAL_TOKENIZER.is_file() or not CHALLENGE_DOCS.is_file():
        pytest.skip(f"shared data not present at {SHARED_DATA} (canonical tokenizer and challenge docs)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> dict:
    """A real 1024-token dataset: the 200 challenge documents tokenized with the canonical tokenizer
    (val = first 20 documents) when ../shared/data exists, else the embedded sample.

    Returns {"dir": dataset folder, "tokenizer": .model path, "vocab_size": 1024, "source": str}.
    """
    root = tmp_path_factory.mktemp("dataset")
    if CANONICAL_TOKENIZER.is_file() and CHALLENGE_DOCS.is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(CANONICAL_TOKENIZER))
        docs = read_jsonl_texts(CHALLENGE_DOCS)
        streams = [np.array([sp.bos_id()] + sp.encode(t), dtype=np.int64) for t in docs]
        out = root / "datasets" / "fineweb10B_sp1024"
        write_shard(out / "fineweb_val_000000.bin", np.concatenate(streams[:20]))
        write_shard(out / "fineweb_train_000000.bin", np.concatenate(streams[20:110]))
        write_shard(out / "fineweb_train_000001.bin", np.concatenate(streams[110:]))
        return {"dir": out, "tokenizer": CANONICAL_TOKENIZER, "vocab_size": 1024, "source": "shared"}
    spec_path = ROOT / "data" / "make_sample.py"
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_sample", spec_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dataset_dir, tokenizer = module.build_sample(root, vocab_size=1024, log=lambda *a, **k: None)
    return {"dir": Path(dataset_dir), "tokenizer": Path(tokenizer), "vocab_size": 1024, "source": "sample"}


def eval_ctx(model, val: np.ndarray, luts: tg.ByteLUTs, seq_len: int, stride: int | None = None, batch_seqs: int = 4,
             rank: int = 0, world_size: int = 1, compute_dtype: str = "fp32") -> "tg.EvalContext":
    """An EvalContext on the CPU for `val` (stride defaults to seq_len: the plain evaluation)."""
    import torch

    return tg.EvalContext(model, torch.from_numpy(np.asarray(val, dtype=np.int64)), luts, seq_len,
                          stride or seq_len, batch_seqs, rank, world_size, torch.device("cpu"), compute_dtype)


def logits(model: "tg.GPT", ids: "tg.Tensor") -> "tg.Tensor":
    """Softcapped logits in fp32 (the training loss never materializes them)."""
    return tg.softcap(model.raw_logits(ids).float(), model.cfg.logit_softcap)


# ---------------------------------------------------------------------------------------------
# FlashAttention stand-ins (tests/stubs): mirror upstream's structure, computed on the CPU
# ---------------------------------------------------------------------------------------------

STUBS = ROOT / "tests" / "stubs"
SHARED_FA3 = ROOT.parent / "shared" / "anchors" / "fa3_cpu"
_STUB_MODULES: dict[Path, dict] = {}  # imported once per process: their custom ops register on import


def use_stub(monkeypatch, folder: Path, module: str) -> dict:
    """Make the stand-in in `folder` importable (`module` and its package) for one test; returns its modules by
    name. A model built on a stand-in's op keeps that module, so each folder is imported once per process."""
    package = module.split(".")[0]
    monkeypatch.syspath_prepend(str(folder))
    if folder not in _STUB_MODULES:
        saved = {m: sys.modules.pop(m) for m in list(sys.modules) if m.split(".")[0] == package}
        importlib.import_module(module)
        _STUB_MODULES[folder] = {m: sys.modules.pop(m) for m in list(sys.modules) if m.split(".")[0] == package}
        sys.modules.update(saved)
    for name in [m for m in sys.modules if m.split(".")[0] == package]:
        monkeypatch.delitem(sys.modules, name)
    for name, module in _STUB_MODULES[folder].items():
        monkeypatch.setitem(sys.modules, name, module)
    return _STUB_MODULES[folder]


@pytest.fixture
def fa3_stub(monkeypatch):
    """tests/stubs/fa3: FlashAttention 3's interface (dense and varlen) as `flash_attn_interface`."""
    return use_stub(monkeypatch, STUBS / "fa3", "flash_attn_interface")["flash_attn_interface"]


@pytest.fixture
def fa4_stub(monkeypatch):
    """tests/stubs/fa4: flash-attn-4's interface as upstream has it today; yields its calls, counted."""
    interface = use_stub(monkeypatch, STUBS / "fa4", "flash_attn.cute.interface")["flash_attn.cute.interface"]
    calls = {"fwd": 0, "bwd": 0}
    for name in ("fwd", "bwd"):
        real = getattr(interface, f"_flash_attn_{name}")

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(interface, f"_flash_attn_{name}", counted)
    yield calls


@pytest.fixture(scope="session")
def top():
    """The leaderboard top's script (PR #1855) as a module: tests/top_harness.py."""
    import top_harness
    return top_harness.load_top()
