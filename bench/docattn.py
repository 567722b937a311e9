"""Document-isolated attention on this machine: which fallback for FA3's varlen call is fastest.

    python bench/docattn.py [--shapes mini,record] [--reps 5] [--mean-doc 600] [--device cuda]

Every variant computes causal attention restricted to each document (a row start or a BOS token starts
one), forward + backward, on the same random q/k/v and document layout; each is checked against the
per-segment reference (one SDPA call per document, the varlen semantics) before it is timed.

- `causal`        plain causal SDPA, no isolation: the cost isolation is compared with
- `sdpa_mask`     SDPA with a (B, 1, T, T) boolean document mask (what train_gpt.py's fallback runs)
- `sdpa_mask_c`   the same under torch.compile
- `flex_c`        torch flex_attention with a document block mask, compiled (flex is only fast compiled)
- `segments`      the reference: one SDPA call per document (FA3 varlen's semantics, eager)

Output: a table of milliseconds per forward+backward (flex: forward only on CPU, which has no flex backward) (median of --reps) and the ratio to `causal`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {  # (rows, seq_len, heads, kv_heads, head_dim)
    "mini": (32, 128, 4, 2, 32),      # bench/mini_track.py's shape
    "record": (2, 2048, 8, 4, 64),    # the record's attention, 2 rows (a CPU-sized slice of 48)
    "record_gpu": (48, 2048, 8, 4, 64),  # one H100's micro-batch at the record's 786,432 tokens/step on 8 GPUs
}


def doc_starts(rows: int, seq_len: int, mean_doc: float, gen: torch.Generator) -> torch.Tensor:
    """(rows, seq_len) bool: True where a document starts (every row start, then geometric gaps)."""
    starts = torch.rand(rows, seq_len, generator=gen) < 1.0 / mean_doc
    starts[:, 0] = True
    return starts


def segment_mask(starts: torch.Tensor) -> torch.Tensor:
    seg = starts.cumsum(1)
    T = starts.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=starts.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def by_segments(q, k, v, starts):
    out = torch.empty_like(q)
    for b in range(q.size(0)):
        bounds = starts[b].nonzero().flatten().tolist() + [q.size(2)]  # host sync per row: a reference, not a path
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            out[b:b + 1, :, lo:hi] = F.scaled_dot_product_attention(
                q[b:b + 1, :, lo:hi], k[b:b + 1, :, lo:hi], v[b:b + 1, :, lo:hi], is_causal=True, enable_gqa=True)
    return out


def variants(starts: torch.Tensor):
    mask = segment_mask(starts)
    seg = starts.cumsum(1)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def doc_causal(b, h, qi, ki):
        return (qi >= ki) & (seg[b, qi] == seg[b, ki])

    B, T = starts.shape
    block = create_block_mask(doc_causal, B, None, T, T, device=starts.device)
    flex = torch.compile(flex_attention, dynamic=False)
    masked = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # noqa: E731
    return {
        "causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "sdpa_mask": masked,
        "sdpa_mask_c": torch.compile(masked, dynamic=False),
        "flex_c": lambda q, k, v: flex(q, k, v, block_mask=block, enable_gqa=True),
        "segments": lambda q, k, v: by_segments(q, k, v, starts),
    }


def time_one(fn, q, k, v, reps: int, backward: bool) -> float:
    times = []
    for i in range(reps + 1):
        qq, kk, vv = (t.detach().requires_grad_(backward) for t in (q, k, v))
        t0 = time.perf_counter()
        out = fn(qq, kk, vv)
        if backward:
            out.square().sum().backward()
        if q.device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call compiles
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="mini,record")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mean-doc", type=float, default=600.0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 on cuda, as training runs)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}, mean document {args.mean_doc:g} tokens")
    print(f"{'shape':8} {'variant':12} {'ms fwd+bwd':>11} {'vs causal':>9} {'max err':>9}")
    for name in args.shapes.split(","):
        B, T, H, Hkv, D = SHAPES[name]
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, h, T, D, generator=gen).to(device, dtype) for h in (H, Hkv, Hkv))
        starts = doc_starts(B, T, args.mean_doc, gen).to(device)
        ref = by_segments(q, k, v, starts)
        base = None
        for vname, fn in variants(starts).items():
            err = 0.0 if vname == "causal" else (fn(q, k, v) - ref).abs().max().item()
            # FlexAttention has no CPU backward (torch raises NotImplementedError): forward only, marked.
            backward = not (vname.startswith("flex") and q.device.type == "cpu")
            ms = time_one(fn, q, k, v, args.reps, backward)
            base = base or ms
            note = "" if backward else "  forward only: no CPU backward"
            print(f"{name:8} {vname:12} {ms:11.2f} {ms / base:9.2f} {err:9.1e}{note}")


if __name__ == "__main__":
    main()
