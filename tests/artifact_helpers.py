"""Test-only shorthands over train_gpt.py's quantization API (kept out of the shipped script, whose bytes count)."""

from __future__ import annotations

from typing import Any

import torch

from conftest import tg


def pack_artifact(state: dict[str, torch.Tensor], spec: Any = None, hessians: dict[str, torch.Tensor] | None = None,
                  meta: dict[str, Any] | None = None) -> bytes:
    """Quantize (round to nearest unless Hessians are given) and pack a state dict, as write_artifact does."""
    spec = spec or tg.QuantSpec()
    return tg.pack_quantized(tg.quantize_state(state, spec, hessians), spec.compressor, meta)


def unpack_artifact_full(blob: bytes, source: str = "artifact") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of pack_quantized: (dequantized state, metadata); ArtifactError names `source`."""
    return tg.unpack_body(tg.artifact_body(blob, source), source)


def unpack_artifact(blob: bytes, source: str = "artifact") -> dict[str, torch.Tensor]:
    """The state dict of a packed artifact (without its metadata)."""
    return unpack_artifact_full(blob, source)[0]


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)
