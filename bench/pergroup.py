"""Per-group compression of an artifact (issue 16, part 4): what each tensor group costs with each codec and
byte order, against the container train_gpt.py writes today (one codec over the whole body).

    python bench/pergroup.py logs/<run>.ptz            # a trained artifact (e.g. a mini-track run)
    python bench/pergroup.py --record                  # the record-sized model, init + noise (no training)

Groups: the int codes of each quantization group (attn, mlp, embed; int8 containers), the LQER factors,
and everything else (fp16 scales and small tensors, byte-shuffled, and the JSON header). Candidates:
brotli quality 11 (window 24), xz/LZMA preset 9e, zstd level 22 (when the `zstandard` package is
installed), each on the codes in row order, transposed (column by column: TOP's lrzip groups do
this), and with each matrix's rows in greedy nearest-neighbour order (TOP's "simsort"; the uint16
permutation is counted). Every candidate is decompressed and compared byte for byte. Prints one row per group and
candidate (bytes, compression and decompression seconds on this machine), the best per group, and
the total of the best against today's container.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402


def codecs() -> dict[str, tuple]:
    import brotli

    out = {"brotli11": (lambda b: brotli.compress(b, quality=11, lgwin=24), brotli.decompress),
           "xz9e": (lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress)}
    try:
        import zstandard

        out["zstd22"] = (lambda b: zstandard.ZstdCompressor(level=22).compress(b),
                         lambda b: zstandard.ZstdDecompressor().decompress(b))
    except ImportError:
        pass
    return out


def artifact_body(blob: bytes) -> tuple[dict, memoryview]:
    """(JSON header, payload) of an artifact train_gpt.py wrote."""
    body = tg.decompress_chunks(blob[tg.ARTIFACT_PREFIX.size:], "artifact")
    (hlen,) = struct.unpack_from("<I", body)
    return json.loads(body[4: 4 + hlen]), memoryview(body)[4 + hlen:]


def groups(header: dict, payload: memoryview) -> dict[str, list[tuple[bytes, tuple[int, int] | None]]]:
    """Group -> its segments' bytes, each with its (rows, cols) when it is a code matrix (transposable)."""
    out: dict[str, list] = {}
    for e in header["tensors"]:
        segs = [("other", e.get("scale") or e.get("data"), None)]
        if e["kind"] == "intq_row":
            segs.append((f"codes:{e['group']}", e["q"], tuple(e["shape"])))
            if "lqer" in e:
                segs += [("lqer", e["lqer"][k], None) for k in ("a", "b", "a_scale", "b_scale")]
        for name, seg, shape in segs:
            out.setdefault(name, []).append((bytes(payload[seg["offset"]: seg["offset"] + seg["nbytes"]]), shape))
    return dict(sorted(out.items()))


def simsort(codes: np.ndarray) -> np.ndarray:
    """Rows in greedy nearest-neighbour order by L1 distance (TOP's "simsort"), then the uint16 permutation
    a reader needs to put them back."""
    import torch

    x = torch.from_numpy(codes.astype(np.float32))
    dist = torch.cdist(x, x, p=1)
    dist.fill_diagonal_(float("inf"))
    order, seen = [0], torch.zeros(len(codes), dtype=torch.bool)
    seen[0] = True
    for _ in range(len(codes) - 1):
        d = dist[order[-1]].masked_fill(seen, float("inf"))
        nxt = int(torch.argmin(d))
        order.append(nxt)
        seen[nxt] = True
    perm = np.asarray(order, dtype=np.uint16)
    return np.concatenate([codes[perm].reshape(-1).view(np.uint8), perm.view(np.uint8)])


def orders(segments: list) -> dict[str, bytes]:
    rows = b"".join(data for data, _ in segments)
    if any(shape is None for _, shape in segments):
        return {"rows": rows}
    mats = [np.frombuffer(d, dtype=np.int8).reshape(s) for d, s in segments]
    return {"rows": rows, "transposed": b"".join(m.T.tobytes() for m in mats),
            "simsort": b"".join(simsort(m).tobytes() for m in mats)}


def measure(name: str, order: str, data: bytes, codec: str, fns: tuple) -> dict:
    compress, decompress = fns
    t0 = time.perf_counter()
    packed = compress(data)
    t1 = time.perf_counter()
    same = decompress(packed) == data
    return {"group": name, "order": order, "codec": codec, "raw": len(data), "bytes": len(packed),
            "compress_s": t1 - t0, "decompress_s": time.perf_counter() - t1, "round_trip": same}


def record_blob(seed: int) -> bytes:
    sys.path.insert(0, str(ROOT / "bench"))
    import compress

    state = compress.record_state(seed)
    spec = tg.QuantSpec(method="rtn", lqer_rank=0)
    return tg.pack_quantized(tg.quantize_state(state, spec, None), spec.compressor, None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", nargs="?", type=Path, help="a .ptz written by train_gpt.py")
    ap.add_argument("--record", action="store_true", help="the record-sized model (init + noise) instead")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not args.record and (args.artifact is None or not args.artifact.is_file()):
        ap.error(f"artifact={args.artifact}: give an existing .ptz, or --record")
    blob = record_blob(0) if args.record else args.artifact.read_bytes()
    header, payload = artifact_body(blob)
    import brotli

    header_bytes = len(brotli.compress(json.dumps(header, sort_keys=True, separators=(",", ":")).encode(), quality=11))
    fns = codecs()
    jobs = [(name, order, data, codec) for name, segs in groups(header, payload).items()
            for order, data in orders(segs).items() for codec in fns]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        rows = list(pool.map(lambda j: measure(*j, fns[j[3]]), jobs))
    if not all(r["round_trip"] for r in rows):
        print("error: a candidate did not round-trip byte for byte", file=sys.stderr)
        return 1
    best = {}
    for r in rows:
        if r["group"] not in best or r["bytes"] < best[r["group"]]["bytes"]:
            best[r["group"]] = r
    total = sum(r["bytes"] for r in best.values()) + header_bytes  # + the JSON header, brotli-11 on its own
    report = {"source": "record init + noise" if args.record else str(args.artifact), "artifact_bytes": len(blob),
              "header_bytes": header_bytes, "rows": rows, "best": best, "best_total": total}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"# bench/pergroup.py: {report['source']}; today's container {len(blob):,} bytes; codecs {', '.join(fns)}; "
          f"{os.cpu_count()} threads")
    print("| group | order | codec | raw bytes | bytes | compress s | decompress s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mark = " **best**" if best[r["group"]] is r else ""
        print(f"| {r['group']} | {r['order']} | {r['codec']}{mark} | {r['raw']:,} | {r['bytes']:,} | "
              f"{r['compress_s']:.2f} | {r['decompress_s']:.2f} |")
    print(f"\nbest per group + the header ({header_bytes:,} bytes, brotli-11): {total:,} bytes vs today's "
          f"{len(blob):,} ({total - len(blob):+,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
