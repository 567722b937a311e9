"""Evaluation speed: plain vs sliding-window scoring, and phased LoRA TTT, on CPU (or the current GPU).

A sliding evaluation at stride s runs seq_len/s forward tokens per scored token in the ideal case;
this measures how close the batched implementation (train_gpt.eval_windows: fixed-shape batches of
EVAL_BATCH_SEQS windows) gets, as the cost ratio (sliding seconds / plain seconds) against that ideal,
and the throughput of PRESET=record's phased score-first LoRA TTT (train_gpt.eval_ttt_lora: its adapters,
batches and phases; tokens scored per second). Its phase SGD runs between LoRA batches, so only on a stream of
more documents than one batch (TTT_BATCH_SIZE=64; the default 65,536 tokens hold about 25, and the printed
line says how many phases ran); the phase prefix is the record's share, 2,500 of 50,000, of these documents.

Run (about 4 minutes on a 2-core CPU):
    python bench/eval.py [--tokens 65536] [--seq-len 256] [--json] [--out bench/eval.md]

The model is the scaled-down record stack of bench/ablate.py (untrained: speed does not depend on
the weights); the tokens are the shared FineWeb validation sample when it is cached, else random.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import train_gpt as tg  # noqa: E402
from gpu import prefix_docs_for  # noqa: E402  (one definition of the scaled phase prefix)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=65_536, help="validation targets to score")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--strides", type=int, nargs="+", default=[64, 32])
    ap.add_argument("--batch-seqs", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("ablate", ROOT / "bench" / "ablate.py")
    ablate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablate)
    env = {**ablate.BASE_ENV, "EVAL_SEQ_LEN": str(args.seq_len), "ROPE_TRAIN_SEQ_LEN": str(args.seq_len)}
    h = tg.Hyperparameters.from_env(env)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.from_hparams(h)).to(device)
    model.set_looping(h.num_loops > 0)
    val_file = ablate.CACHE / "fineweb_val_000000.bin"
    if val_file.is_file():
        tokens, source = np.asarray(tg.load_shard(val_file))[: args.tokens + 1], "shared FineWeb validation sample"
    else:
        tokens, source = np.random.default_rng(0).integers(0, h.vocab_size, args.tokens + 1), "random tokens"
    usable = ((tokens.size - 1) // args.seq_len) * args.seq_len
    tokens = np.ascontiguousarray(tokens[: usable + 1]).astype(np.uint16)
    g = torch.Generator().manual_seed(0)
    luts = tg.ByteLUTs(torch.randint(1, 5, (h.vocab_size,), generator=g),
                       torch.zeros(h.vocab_size, dtype=torch.bool), torch.zeros(h.vocab_size, dtype=torch.bool)).to(device)
    rows = []

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return r, time.perf_counter() - t0

    stream = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(device)

    def ctx(stride: int, batch_seqs: int, part: torch.Tensor = stream) -> tg.EvalContext:
        return tg.EvalContext(model, part, luts, args.seq_len, stride, batch_seqs, 0, 1, device, "auto")

    plain_batch = max(args.batch_seqs)
    tg.eval_windows(ctx(args.seq_len, plain_batch, stream[: 2 * args.seq_len + 1]), args.seq_len)  # warm
    plain, plain_s = timed(lambda: tg.eval_windows(ctx(args.seq_len, plain_batch), args.seq_len))
    rows.append({"eval": "plain", "stride": args.seq_len, "batch_seqs": plain_batch, "scored": plain.tokens,
                 "seconds": plain_s, "scored_per_s": plain.tokens / plain_s, "cost_ratio": 1.0, "ideal_ratio": 1.0})
    for stride in args.strides:
        for bs in args.batch_seqs:
            r, sec = timed(lambda: tg.eval_windows(ctx(stride, bs), stride))
            assert r.tokens == plain.tokens
            rows.append({"eval": "sliding", "stride": stride, "batch_seqs": bs, "scored": r.tokens, "seconds": sec,
                         "scored_per_s": r.tokens / sec, "cost_ratio": sec / plain_s,
                         "ideal_ratio": args.seq_len / stride})
    # The record's phase prefix scaled to these documents, as the GPU preflight scales it: at the record's 2,500
    # no phase would ever run on a benchmark-sized stream.
    n_docs = len(tg.ttt_documents(tokens, tokens.size - 1))
    prefix = prefix_docs_for(n_docs, h.phased_ttt_num_phases)
    lora = dataclasses.replace(tg.LoRATTTConfig.from_hparams(h), prefix_docs=prefix)
    sgd = tg.TTTConfig.global_phase(h)
    (r, info), sec = timed(lambda: tg.eval_ttt_lora(ctx(args.seq_len, max(args.batch_seqs)), model, lora, sgd, 1e9,
                                                    lambda m: None))
    assert r.tokens == plain.tokens
    rows.append({"eval": "phased LoRA TTT", "stride": "–", "batch_seqs": max(args.batch_seqs),
                 "scored": r.tokens, "seconds": sec, "scored_per_s": r.tokens / sec, "cost_ratio": sec / plain_s,
                 "ideal_ratio": None, "ttt_documents": info["documents"], "ttt_phases_run": info["phases_run"]})
    host = (f"{torch.cuda.get_device_name() if device.type == 'cuda' else platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}")
    report = {"command": "python bench/eval.py " + " ".join(sys.argv[1:]), "host": host, "tokens": source,
              "seq_len": args.seq_len, "params": sum(p.numel() for p in model.parameters()), "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
    md = [f"Command: `{report['command']}`; {host}; model {report['params']:,} parameters (bench/ablate.py shape, "
          f"looping on), EVAL_SEQ_LEN {args.seq_len}, {plain.tokens:,} scored targets of the {source}.", "",
          "| eval | stride | batch seqs | seconds | scored tokens/s | cost vs plain | ideal (seq_len/stride) |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        ideal = f"{r['ideal_ratio']:.1f}" if r["ideal_ratio"] else "–"
        md.append(f"| {r['eval']} | {r['stride']} | {r['batch_seqs']} | {r['seconds']:.2f} | {r['scored_per_s']:,.0f} | "
                  f"{r['cost_ratio']:.2f}x | {ideal} |")
    md.append(f"\nPhased LoRA TTT: {info['documents']} documents in batches of {lora.batch_docs}, rank {lora.rank}, "
              f"chunks of {lora.chunk}; {info['phases_run']} of {info['phases_set']} phases of global SGD ran.")
    text = "\n".join(md) + "\n"
    if args.out:
        tg.atomic_write_bytes(args.out, text.encode())
    if not args.json:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
