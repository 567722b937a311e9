"""Writing the challenge shard format (data/cached_challenge_fineweb.py in openai/parameter-golf): a header of
256 little-endian int32 (magic 20240520, version 1, the token count), then the tokens as little-endian uint16.
train_gpt.py reads it (`read_shard_header`, `load_shard`); the data tools, benchmarks and tests write it here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
SHARD_TOKEN_DTYPE = np.dtype("<u2")


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write tokens in the challenge shard format, atomically."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(SHARD_TOKEN_DTYPE).max):
        raise ValueError(f"{path}: token ids must be in [0, 65535] to fit uint16")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    atomic_write_bytes(Path(path), header.tobytes() + tokens.astype(SHARD_TOKEN_DTYPE).tobytes())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
