"""Quantization benchmark: round to nearest vs GPTQ vs GPTQ + LQER at the same artifact bytes.

Trains the scaled-down record stack of bench/ablate.py on CPU (in-process, with train_gpt.py's own
train()), collects the GPTQ Hessians on training data as a real run does, then quantizes the same
weights three ways. Every method is fitted (train_gpt.fit_artifact: SDClip k widened until it fits)
to one common model budget -- the round-to-nearest artifact at the configured k -- so the BPB
differences are at equal bytes. Reported per method: artifact bytes, final k, round-trip BPB, the
quantization gap (round-trip BPB - pre-quant BPB) and the quantization time; per group: the
zeroth-order entropy of the codes against their Brotli-11 size; bits per parameter; Hessian time.

Run (about 5 minutes on a 2-core CPU):
    python bench/quant.py [--steps 300] [--seed 1337] [--json] [--out bench/quant.md]

Data: as bench/ablate.py (../shared/data FineWeb sample, canonical 1024 tokenizer, last 200
documents = validation), cached in bench/.cache/.
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402


def load_ablate():
    spec = importlib.util.spec_from_file_location("ablate", ROOT / "bench" / "ablate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps of the small model")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--bits", nargs="+", default=["6,7", "4,6"],
                    help="MATRIX_BITS,EMBED_BITS settings to compare (the first is the record's)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = ap.parse_args()
    ablate = load_ablate()
    if not ablate.CORPUS.is_file() or not ablate.TOKENIZER.is_file():
        print(f"error: needs {ablate.CORPUS} and {ablate.TOKENIZER}", file=sys.stderr)
        return 2
    data_dir = ablate.build_dataset()
    env = {**ablate.BASE_ENV, "ITERATIONS": str(args.steps), "MAX_WALLCLOCK_SECONDS": "0", "SEED": str(args.seed),
           "DATA_PATH": str(data_dir), "TOKENIZER_PATH": str(ablate.TOKENIZER), "TRAIN_LOG_EVERY": "0",
           "RUN_ID": "quant_bench", "LQER_ENABLED": "0",
           "COMPRESSOR": "brotli"}  # one fast codec for every fit (pergroup's lrzip is slow and may be absent)
    h = tg.Hyperparameters.from_env(env)
    d = tg.setup_distributed(h)
    log = tg.Logger(None, enabled=False)
    data = tg.prepare_data(h, d, log)
    torch.manual_seed(h.seed)
    model = tg.GPT(tg.ModelConfig.from_hparams(h)).to(d.device)
    opt = tg.Optimizers(model, h)

    graphs = tg.Graphs.build(h, model)
    ctx = tg.EvalContext.build(h, d, graphs, data)

    def evaluate() -> tg.EvalResult:
        return tg.eval_windows(ctx, ctx.seq_len)

    def make_loader() -> tg.TrainLoader:
        return tg.TrainLoader(data.train_files, h.train_seq_len, h.micro_batch_seqs, h.accum_steps, h.seed,
                              h.vocab_size, d)

    t0 = time.perf_counter()
    result = tg.train(h, d, graphs, opt, make_loader, evaluate, 0.0, log)
    train_s = time.perf_counter() - t0
    calib = tg.calibrate_gptq(h, d, model, graphs.calibrate, make_loader)
    pre = evaluate()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_params = sum(v.numel() for v in state.values())
    rows = []
    for bits in args.bits:
        mb, eb = (int(b) for b in bits.split(","))
        base = dataclasses.replace(tg.QuantSpec.from_hparams(h), bits=(("attn", mb), ("embed", eb), ("mlp", mb)))
        rows += compare_methods(h, base, state, calib.hessians, model, evaluate, pre, n_params)
    report = {
        "command": "python bench/quant.py " + " ".join(sys.argv[1:]),
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, torch {torch.__version__}",
        "shape": {k: env[k] for k in ("NUM_LAYERS", "MODEL_DIM", "MLP_MULT", "VOCAB_SIZE", "NUM_LOOPS")},
        "steps": result.steps, "seed": args.seed, "params": n_params, "train_seconds": train_s,
        "hessian_seconds": calib.seconds, "calibration_batches": h.gptq_calibration_batches,
        "pre_quant_bpb": pre.val_bpb, "methods": rows,
    }
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    md = [f"Command: `{report['command']}`; {report['host']}; {report['params']:,} parameters, "
          f"{report['steps']} steps (seed {args.seed}), pre-quant val_bpb {pre.val_bpb:.4f}; Hessians "
          f"({h.gptq_calibration_batches} batches x {h.train_batch_tokens} tokens) {report['hessian_seconds']:.2f} s.",
          "", "| bits matrix/embed | method | model bytes (budget) | k attn / mlp / embed | round-trip BPB | gap BPB | "
          "gap vs RTN | bits/param | quant s |", "|---|---|---|---|---|---|---|---|---|"]
    rtn_gap = {}
    for r in rows:
        if r["method"] == "rtn":
            rtn_gap[tuple(r["bits"].items())] = r["gap_bpb"]
    for r in rows:
        k = r["k"]
        ratio = r["gap_bpb"] / rtn_gap[tuple(r["bits"].items())]
        md.append(f"| {r['bits']['mlp']}/{r['bits']['embed']} | {r['method']} | {r['bytes_model']:,} ({r['budget']:,})"
                  f"{'' if r['fits'] else ' OVER'} | {k['attn']:.2f} / {k['mlp']:.2f} / {k['embed']:.2f} | "
                  f"{r['roundtrip_bpb']:.4f} | {r['gap_bpb']:+.4f} | {ratio:.2f}x | {r['bits_per_param']:.3f} | "
                  f"{r['quant_seconds']:.2f} |")
    md += ["", "| method | group | params | bits | entropy bits/param | entropy bytes | brotli-11 bytes | brotli / entropy |",
           "|---|---|---|---|---|---|---|---|"]
    rows_first = [r for r in rows if r["bits"] == rows[0]["bits"]]
    for r in rows_first:
        for group, g in r["groups"].items():
            md.append(f"| {r['method']} | {group} | {g['params']:,} | {r['bits'][group]} | "
                      f"{g['entropy_bits_per_param']:.3f} | {g['entropy_bytes']:,.0f} | {g['brotli_bytes']:,} | "
                      f"{g['brotli_over_entropy']:.4f} |")
    text = "\n".join(md) + "\n"
    if args.out:
        tg.atomic_write_bytes(args.out, text.encode())
    if not args.json:
        print(text)
    return 0



def compare_methods(h, base, state, hessians, model, evaluate, pre, n_params) -> list[dict]:
    """RTN, GPTQ and GPTQ+LQER fitted to one budget: the RTN artifact's size at the configured k."""
    methods = {
        "rtn": dataclasses.replace(base, method="rtn", lqer_rank=0),
        "gptq": dataclasses.replace(base, method="gptq", lqer_rank=0),
        "gptq+lqer": dataclasses.replace(base, method="gptq", lqer_rank=h.lqer_rank, lqer_top_k=h.lqer_top_k,
                                         lqer_factor_bits=h.lqer_factor_bits),
    }
    budget = len(tg.pack_quantized(tg.quantize_state(state, methods["rtn"]), base.compressor))
    rows = []
    for name, spec in methods.items():
        fit = tg.fit_artifact(state, spec, hessians, budget, {}, lambda _msg: None)
        t1 = time.perf_counter()
        quantized = tg.quantize_state(state, fit.spec, hessians)
        quant_s = time.perf_counter() - t1
        model.load_state_dict(tg.unpack_body(tg.artifact_body(fit.blob, name), name)[0], strict=True)
        rt = evaluate()
        groups = {}
        for group, e in tg.quant_entropy_bytes(quantized).items():
            codes = b"".join(qt.q.contiguous().numpy().tobytes() for qt in quantized.values()
                             if isinstance(qt, tg.QuantTensor) and qt.group == group)
            compressed = len(tg._compress(codes, "brotli"))
            groups[group] = {**e, "brotli_bytes": compressed, "brotli_over_entropy": compressed / e["entropy_bytes"]}
        rows.append({"method": name, "fits": fit.fits, "bytes_model": len(fit.blob), "budget": budget,
                     "k": dict(fit.spec.clip), "bits": dict(fit.spec.bits), "roundtrip_bpb": rt.val_bpb,
                     "gap_bpb": rt.val_bpb - pre.val_bpb, "quant_seconds": quant_s,
                     "bits_per_param": 8 * len(fit.blob) / n_params, "groups": groups})
    return rows

if __name__ == "__main__":
    sys.exit(main())
