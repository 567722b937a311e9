"""Artifact packing speed at the record size: one compressed stream vs the chunks train_gpt.py compresses
in parallel (COMPRESS_CHUNK_BYTES), and GPTQ matrix by matrix vs batched by shape.

    python bench/compress.py                        # record-sized model, brotli; prints a table
    python bench/compress.py --compressor lzma --chunks 1 2 4 --gptq-layers 2

The weights are the record model's initialization plus Gaussian noise (no training), quantized with
round to nearest at the record's bits and SDClip k: codes with the entropy of trained int6 weights
(~3.3-3.5 bits), so sizes are comparable between rows, not to a trained artifact. Threads: one per
core of this machine (train_gpt.py uses the same rule).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402


def record_state(seed: int) -> dict[str, torch.Tensor]:
    h = tg.Hyperparameters.from_env({"PRESET": "record"})
    torch.manual_seed(seed)
    model = tg.GPT(tg.ModelConfig.from_hparams(h))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return {k: v.detach() for k, v in model.state_dict().items()}


def time_pack(quantized: dict, compressor: str, chunk: int) -> tuple[int, float]:
    saved = tg.COMPRESS_CHUNK_BYTES
    tg.COMPRESS_CHUNK_BYTES = chunk
    try:
        body = tg.serialize_quantized(quantized, compressor)
        t0 = time.perf_counter()
        blob = tg.compress_body(body, compressor)
        return len(blob), time.perf_counter() - t0
    finally:
        tg.COMPRESS_CHUNK_BYTES = saved


def time_gptq(state: dict[str, torch.Tensor], layers: int) -> tuple[float, float, bool]:
    """Seconds for GPTQ of the first `layers` blocks' matrices one by one vs batched by shape; equal codes?"""
    names = [n for n in sorted(state) if n.startswith(tuple(f"blocks.{i}." for i in range(layers)))
             and tg.is_quantized(n, state[n])]
    g = torch.Generator().manual_seed(0)
    H = {}
    for n in names:
        x = torch.randn(4 * state[n].shape[1], state[n].shape[1], generator=g)
        H[n] = x.T @ x
    spec = tg.QuantSpec(lqer_rank=0)
    t0 = time.perf_counter()
    one = {}
    for n in names:
        w = state[n].float()
        scale = tg.sdclip_scales(w, 6, dict(spec.clip)[tg.quant_group(n)])
        one[n] = tg.gptq_quantize(w, H[n], scale, 6, spec.damp, spec.block)
    single_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = tg.quantize_state({n: state[n] for n in names}, spec, H)
    batched_s = time.perf_counter() - t0
    return single_s, batched_s, all(torch.equal(one[n], batched[n].q) for n in names)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compressor", choices=tg.COMPRESSORS, default="brotli")
    ap.add_argument("--chunks", type=float, nargs="+", default=[1, 2, 4], help="chunk sizes in MiB")
    ap.add_argument("--gptq-layers", type=int, default=1, help="blocks whose matrices GPTQ times (0 = skip)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    state = record_state(args.seed)
    spec = tg.QuantSpec(method="rtn", lqer_rank=0, compressor=args.compressor)
    quantized = tg.quantize_state(state, spec)
    body = len(tg.serialize_quantized(quantized, args.compressor))
    print(f"# bench/compress.py: {sum(v.numel() for v in state.values()):,} parameters, body {body:,} bytes, "
          f"{args.compressor}, {os.cpu_count()} threads, torch {torch.__version__}")
    print("| streams | chunk | bytes | vs one stream | seconds | speed-up |")
    print("|---|---|---|---|---|---|")
    base_bytes, base_s = time_pack(quantized, args.compressor, 1 << 40)
    print(f"| one | – | {base_bytes:,} | +0 | {base_s:.1f} | 1.00x |")
    for mib in args.chunks:
        size, sec = time_pack(quantized, args.compressor, int(mib * 2**20))
        print(f"| {-(-body // int(mib * 2**20))} | {mib:g} MiB | {size:,} | {size - base_bytes:+,} | {sec:.1f} | "
              f"{base_s / sec:.2f}x |")
    if args.gptq_layers:
        single, batched, equal = time_gptq(state, args.gptq_layers)
        print(f"\nGPTQ of the {args.gptq_layers} first block(s)' matrices on this CPU: one by one {single:.2f} s, "
              f"batched by shape {batched:.2f} s ({single / batched:.2f}x); identical codes: {equal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
