"""Per-group compression of a model (measured 2026-11-26 and 2026-12-06): COMPRESSOR=pergroup's coders side by
side with today's brotli container, on the same quantized codes.

    python bench/pergroup.py logs/<run>.ptz            # a trained artifact (e.g. a mini-track run)
    python bench/pergroup.py --record                  # the record-sized model, init + noise (no training)

Candidates, each decompressed and compared byte for byte with the serialized body:
- `brotli` : COMPRESSOR=brotli, today's container (brotli-11, 4 MiB chunks in parallel);
- `pergroup-brotli` : the pergroup layout (train_gpt.pergroup_pieces: each role's code matrices transposed,
  rows of PERGROUP_SORTED roles in similarity order, the uint16 orders counted) with brotli-11 (window 24)
  for every piece;
- `pergroup-lrzip` : COMPRESSOR=pergroup itself (`lrzip -z -L 9`, ZPAQ back end, for the roles; brotli for the
  rest), through train_gpt.compress_body / decompress_chunks;
- `pergroup-zpaq-m5` : the same pieces with the zpaq 7.15 command-line archiver at -m5 (temporary files);
- `pergroup-pyzpaq5` : the same pieces with the PyPI `zpaq` wheel (in-memory libzpaq, level 5, one thread per
  piece), when it imports.
Seconds: compression with a thread per core (pieces in parallel, as train_gpt does), decompression the same
way and again with the whole process pinned to one core (os.sched_setaffinity; the coders' own threads and
subprocesses inherit it). Per piece: raw bytes, the codes' zeroth-order entropy (what an ideal coder of
independent symbols needs), each coder's bytes, and for the roles PR #1855 sorts (tok_emb, attn.c_q, mlp.fc)
lrzip with the other sort choice than train_gpt.PERGROUP_SORTED's (the uint16 row orders counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402

TOP_SORTED = ("tok_emb.weight", "attn.c_q.weight", "mlp.fc.weight")  # the roles PR #1855 similarity-sorts


def brotli_window(data: bytes) -> bytes:
    import brotli

    return brotli.compress(data, quality=11, lgwin=24)


def zpaq_cli(data: bytes) -> bytes:
    with tempfile.TemporaryDirectory(prefix="pergroup_zpaq_") as d:
        Path(d, "p").write_bytes(data)
        subprocess.run(["zpaq", "a", "p.zpaq", "p", "-m5"], cwd=d, check=True, capture_output=True)
        return Path(d, "p.zpaq").read_bytes()


def unzpaq_cli(data: bytes) -> bytes:
    with tempfile.TemporaryDirectory(prefix="pergroup_unzpaq_") as d:
        Path(d, "p.zpaq").write_bytes(data)
        subprocess.run(["zpaq", "x", "p.zpaq", "-to", "out"], cwd=d, check=True, capture_output=True)
        return Path(d, "out", "p").read_bytes()


def coders() -> dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]]:
    """Role coders available here: name -> (compress, decompress)."""
    import brotli

    out = {"pergroup-brotli": (brotli_window, brotli.decompress)}
    if shutil.which("zpaq"):
        out["pergroup-zpaq-m5"] = (zpaq_cli, unzpaq_cli)
    try:
        import zpaq

        out["pergroup-pyzpaq5"] = (lambda b: zpaq.compress(b, level=5, threads=1), lambda b: zpaq.decompress(b, threads=1))
    except ImportError:
        pass
    return out


def quantized_from_body(body: bytes) -> tuple[dict, dict]:
    """The quantized tensors (codes, scales, LQER factors: not dequantized) and metadata of a serialized body."""
    (hlen,) = struct.unpack_from("<I", body)
    header, payload = json.loads(body[4: 4 + hlen]), memoryview(body)[4 + hlen:]

    def seg(s: dict, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        raw = tg.byte_shuffle(bytes(payload[s["offset"]: s["offset"] + s["nbytes"]]), s["stride"], undo=True)
        t = torch.frombuffer(bytearray(raw), dtype=torch.int16 if dtype == torch.bfloat16 else dtype)
        return t.view(dtype).reshape(shape).clone()

    out = {}
    for e in header["tensors"]:
        dtype = tg._TORCH_DTYPES[e["dtype"]]
        if e["kind"] == "intq_row":
            rows, cols = e["shape"]
            lq, g = None, 0
            if "lqer" in e:
                r, g = e["lqer"]["rank"], e["lqer"].get("group", 0)
                lq = (seg(e["lqer"]["a"], torch.int8, [rows, r]),
                      seg(e["lqer"]["a_scale"], torch.float16, [1, 1] if g else [rows, 1]),
                      seg(e["lqer"]["b"], torch.int8, [r, cols]),
                      seg(e["lqer"]["b_scale"], torch.float16, [r * cols // g, 1] if g else [r, 1]))
            out[e["name"]] = tg.QuantTensor(e["group"], e["bits"], seg(e["q"], torch.int8, e["shape"]),
                                            seg(e["scale"], torch.float16, [rows]), dtype, e["method"], lq, g)
        else:
            out[e["name"]] = seg(e["data"], torch.float16 if e["kind"] == "fp16" else dtype, e["shape"]).to(dtype)
    return out, header.get("meta", {})


def record_quantized(seed: int) -> tuple[dict, dict]:
    """The record-sized model (bench/compress.py: init + N(0, 0.02) noise on every matrix), quantized with
    PRESET=record's QuantSpec (int6 matrices, int7 embedding, int8 gate rows, asymmetric LQER) by round to
    nearest: GPTQ needs Hessians of a trained model."""
    sys.path.insert(0, str(ROOT / "bench"))
    import compress

    spec = dataclasses.replace(tg.QuantSpec.from_hparams(tg.Hyperparameters.from_env({"PRESET": "record"})),
                               method="rtn")
    return tg.quantize_state(compress.record_state(seed), spec, None), {}


def flipped_sort_bytes(role: str, raw: bytes, shapes: list) -> int:
    """lrzip bytes of a role of PR #1855's sorted set with the other choice than train_gpt's (sorted where
    PERGROUP_SORTED leaves it in row order, and the reverse), its row orders counted."""
    saved = tg.PERGROUP_SORTED
    tg.PERGROUP_SORTED = () if role in saved else (role,)
    try:
        return len(tg.lrzip(tg.encode_role(role, raw, shapes), "-z", "-L", "9"))
    finally:
        tg.PERGROUP_SORTED = saved


def timed(fn: Callable, *args) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def one_core(fn: Callable, *args) -> tuple[object, float]:
    """fn(*args) with this process (and what it starts) on one CPU core; seconds."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        return timed(fn, *args)
    finally:
        os.sched_setaffinity(0, cpus)


def entropy_bytes(raw: bytes) -> float:
    counts = np.bincount(np.frombuffer(raw, np.uint8), minlength=256)
    p = counts[counts > 0] / len(raw)
    return float(-(p * np.log2(p)).sum() * len(raw) / 8)


def frame(chunks: list[bytes]) -> int:
    """Bytes of an artifact holding these chunks (prefix, compressor id, chunk count and lengths)."""
    return tg.ARTIFACT_PREFIX.size + 1 + tg.CHUNK_COUNT.size * (len(chunks) + 1) + sum(map(len, chunks))


def measure(quantized: dict, meta: dict, with_one_core: bool = True, only: set[str] | None = None) -> dict:
    rows, pieces_report = [], []
    body = tg.serialize_quantized(quantized, "brotli", meta)
    blob, c_s = timed(tg.compress_body, body, "brotli")
    out, d_s = timed(tg.decompress_chunks, blob[tg.ARTIFACT_PREFIX.size:], "brotli")
    d1 = one_core(tg.decompress_chunks, blob[tg.ARTIFACT_PREFIX.size:], "brotli")[1] if with_one_core else None
    rows.append({"candidate": "brotli", "bytes": len(blob), "compress_s": c_s, "decompress_s": d_s,
                 "decompress_1core_s": d1, "round_trip": out == body})
    pg_body = tg.serialize_quantized(quantized, "pergroup", meta)
    pieces = tg.pergroup_pieces(pg_body)
    encoded, enc_s = timed(lambda: tg._map_parallel(lambda p: tg.encode_role(*p) if p[0] else p[1], pieces))
    for name, (comp, decomp) in coders().items():
        if only is not None and name not in only:
            continue
        def pack(i: int) -> bytes:
            return (b"\1" + pieces[i][0].encode() + b"\0" + comp(encoded[i])) if pieces[i][0] else tg.pack_piece(pieces[i])

        def unpack(chunk: bytes) -> bytes:
            if chunk[0] == 0:
                return tg.unpack_piece(chunk, name)
            return tg.decode_role(decomp(chunk[1:].partition(b"\0")[2]))

        chunks, c_s = timed(tg._map_parallel, pack, list(range(len(pieces))))
        out, d_s = timed(lambda: b"".join(tg._map_parallel(unpack, chunks)))
        d1 = one_core(lambda: b"".join(tg._map_parallel(unpack, chunks)))[1] if with_one_core else None
        rows.append({"candidate": name, "bytes": frame(chunks), "compress_s": c_s + enc_s, "decompress_s": d_s,
                     "decompress_1core_s": d1, "round_trip": out == pg_body, "chunks": [len(c) for c in chunks]})
    if shutil.which("lrzip"):
        blob, c_s = timed(tg.compress_body, pg_body, "pergroup")
        out, d_s = timed(tg.decompress_chunks, blob[tg.ARTIFACT_PREFIX.size:], "pergroup")
        d1 = one_core(tg.decompress_chunks, blob[tg.ARTIFACT_PREFIX.size:], "pergroup")[1] if with_one_core else None
        n = struct.unpack_from("<I", blob, tg.ARTIFACT_PREFIX.size + 1)[0]
        lengths = struct.unpack_from(f"<{n}I", blob, tg.ARTIFACT_PREFIX.size + 5)
        rows.append({"candidate": "pergroup-lrzip", "bytes": len(blob), "compress_s": c_s, "decompress_s": d_s,
                     "decompress_1core_s": d1, "round_trip": out == pg_body, "chunks": list(lengths)})
        flipped = {i: flipped_sort_bytes(*p) for i, p in enumerate(pieces) if p[0] in TOP_SORTED}
    else:
        flipped = {}
    by_name = {r["candidate"]: r for r in rows}
    for i, (role, raw, shapes) in enumerate(pieces):
        entry = {"piece": role or ("header, small roles" if i == 0 else "scales, LQER, small tensors"), "raw": len(raw),
                 "entropy": round(entropy_bytes(raw)) if role else None, "sorted": role in tg.PERGROUP_SORTED,
                 "order_bytes": 2 * sum(r for r, _ in shapes) if role in tg.PERGROUP_SORTED else 0}
        for name, r in by_name.items():
            if "chunks" in r:
                entry[name] = r["chunks"][i]
        if i in flipped:
            entry["lrzip, sort flipped"] = flipped[i]
        pieces_report.append(entry)
    return {"rows": rows, "pieces": pieces_report, "body_bytes": len(body)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", nargs="?", type=Path, help="a .ptz written by train_gpt.py")
    ap.add_argument("--record", action="store_true", help="the record-sized model (init + noise) instead")
    ap.add_argument("--no-one-core", action="store_true", help="skip the one-core decompression timings")
    ap.add_argument("--coders", default=None, metavar="NAMES",
                    help="comma-separated subset of pergroup-brotli,pergroup-zpaq-m5,pergroup-pyzpaq5 (default: all "
                         "that run here; brotli and pergroup-lrzip always run)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not args.record and (args.artifact is None or not args.artifact.is_file()):
        ap.error(f"artifact={args.artifact}: give an existing .ptz, or --record")
    if args.record:
        quantized, meta = record_quantized(0)
        source = "record-sized model, init + noise, RTN with PRESET=record's QuantSpec"
    else:
        blob = args.artifact.read_bytes()
        quantized, meta = quantized_from_body(tg.decompress_chunks(blob[tg.ARTIFACT_PREFIX.size:], str(args.artifact)))
        source = str(args.artifact)
    only = None if args.coders is None else set(args.coders.split(","))
    report = {"source": source, **measure(quantized, meta, not args.no_one_core, only)}
    if not all(r["round_trip"] for r in report["rows"]):
        print("error: a candidate did not round-trip byte for byte", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    base = report["rows"][0]["bytes"]
    print(f"# bench/pergroup.py: {source}; serialized body {report['body_bytes']:,} bytes; {os.cpu_count()} cores")
    print("| candidate | bytes | vs brotli | compress s | decompress s | decompress s, 1 core |")
    print("|---|---|---|---|---|---|")
    for r in report["rows"]:
        one = "–" if r["decompress_1core_s"] is None else f"{r['decompress_1core_s']:.1f}"
        print(f"| {r['candidate']} | {r['bytes']:,} | {100 * (r['bytes'] / base - 1):+.2f}% | {r['compress_s']:.1f} | "
              f"{r['decompress_s']:.1f} | {one} |")
    cols = [k for k in report["pieces"][0] if k.startswith("pergroup")]
    cols += [k for k in ("lrzip, sort flipped",) if any(k in p for p in report["pieces"]) and k not in cols]
    print("\n| piece | raw bytes | order-0 entropy | row orders | " + " | ".join(cols) + " |")
    print("|---|---|---|---|" + "---|" * len(cols))
    for p in report["pieces"]:
        ent = "–" if p["entropy"] is None else f"{p['entropy']:,}"
        print(f"| {p['piece']} | {p['raw']:,} | {ent} | {p['order_bytes']:,} | "
              + " | ".join(f"{p[c]:,}" if c in p else "–" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
