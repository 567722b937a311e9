"""SAMPLE_DATA=1: the embedded sample dataset (data/make_sample.py), built on first use by rank 0."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any


def ensure(tg: Any, h: Any, d: Any, log: Any) -> None:
    """Rank 0 builds (or finds intact) the sample in DATA_DIR with the repository's data/make_sample.py; all wait."""
    if d.is_main:
        script = Path(tg.__file__).resolve().parent / "data" / "make_sample.py"
        if not script.exists():
            raise tg.DataError(f"{script}: not found; SAMPLE_DATA=1 needs the repository's data/make_sample.py and "
                               f"pgolf/ beside {Path(tg.__file__).name}")
        spec = importlib.util.spec_from_file_location("make_sample", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.build_sample(h.data_dir, vocab_size=h.vocab_size, log=log)
    tg.barrier()
