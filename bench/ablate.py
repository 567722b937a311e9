"""CPU ablation of the record stack: the full scaled-down stack against the same shape with one
technique switched off, at equal wallclock.

Run (the training seconds plus about a minute of evaluation per variant and seed on a 2-core CPU):
    python bench/ablate.py [--seconds 60 | --steps N] [--seeds 1337] [--only NAME ...] [--out bench/ablation.md]

`--steps N` runs every variant for exactly N optimizer steps (no wallclock cap) instead: it compares
what each technique does per step, immune to this machine's load, while `--seconds` also charges a
technique for the time it costs. Each finished run is appended to `<out>.jsonl` as it completes.

Data: ../shared/data/corpus/fineweb_legal_pilot_2800.jsonl tokenized with the canonical
../shared/data/tokenizers/fineweb_1024_bpe.model ([BOS] + ids per document); the last 200 documents
are the validation split, the rest train. The shards are cached in bench/.cache/.

Every variant runs `train_gpt.py` in a subprocess with the same env except its own overrides and
reports the round-trip val_bpb from the `final` line. Short CPU runs are noisy: compare differences
with the seed spread of the full stack (run more --seeds), and do not read a small difference as a
measured gain.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
CORPUS = SHARED / "corpus" / "fineweb_legal_pilot_2800.jsonl"
TOKENIZER = SHARED / "tokenizers" / "fineweb_1024_bpe.model"
CACHE = ROOT / "bench" / ".cache" / "fineweb_legal_sp1024"
VAL_DOCS = 200
FINAL_RE = re.compile(r"^final val_loss:(\S+) val_bpb:(\S+) .* steps:(\d+)$")

# The record stack scaled to a 2-core CPU: 6 layers x 128, loop 2..3 once more, lanes from layer 4.
BASE_ENV = {
    "VOCAB_SIZE": "1024", "NUM_LAYERS": "6", "MODEL_DIM": "128", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
    "MLP_MULT": "4.0", "TRAIN_SEQ_LEN": "128", "EVAL_SEQ_LEN": "128", "TRAIN_BATCH_TOKENS": "4096",
    "GRAD_ACCUM_STEPS": "1", "ITERATIONS": "100000", "WARMUP_STEPS": "2",
    "COMPILE": "0", "TRAIN_LOG_EVERY": "100", "EMA_DECAY": "0.99", "MUON_MOMENTUM_WARMUP_STEPS": "100",
    "LOOP_START": "2", "LOOP_END": "3", "NUM_LOOPS": "1", "PARALLEL_START_LAYER": "4", "ROPE_DIMS": "16",
    "ROPE_TRAIN_SEQ_LEN": "128", "TTT_ENABLED": "0",
    "CASEOPS_ENABLED": "0",  # the dataset below is plain sp1024 text (no byte sidecars)
}
# name -> overrides; "full" is the record stack itself.
VARIANTS: dict[str, dict[str, str]] = {
    "full": {},
    "no_partial_rope": {"ROPE_DIMS": "0"},
    "no_ln_scale": {"LN_SCALE": "0"},
    "relu2_mlp": {"MLP_ACT": "relu2"},
    "no_ortho_init": {"ORTHO_INIT": "0"},
    "no_xsa": {"XSA_LAST_N": "0"},
    "no_skip_gates": {"SKIP_GATES_ENABLED": "0"},
    "no_recurrence": {"NUM_LOOPS": "0"},
    "no_parallel": {"PARALLEL_MODE": "off"},
    "no_smear_gate": {"SMEAR_GATE_ENABLED": "0"},
    "no_attn_gate": {"SPARSE_ATTN_GATE_ENABLED": "0"},
    "classic_ns": {"MUON_NS": "classic"},
    "no_muon_eq_r": {"MUON_ROW_NORMALIZE": "0"},
    # PR #1855's attention inside documents and its document packing (both on in the record)
    "no_doc_isolation": {"DOC_ISOLATION": "0", "DOC_PACKED_LOADER": "0"},
    "no_fused_ce": {"FUSED_CE_ENABLED": "0"},  # the same loss without the custom op (Triton on CUDA only)
}


def build_dataset() -> Path:
    """Tokenize the shared FineWeb sample once: val = the last VAL_DOCS documents."""
    sys.path.insert(0, str(ROOT))
    import sentencepiece as spm

    from pgolf.shards import write_shard

    if (CACHE / "fineweb_val_000000.bin").is_file() and (CACHE / "fineweb_train_000000.bin").is_file():
        return CACHE
    t0 = time.perf_counter()
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    with open(CORPUS, encoding="utf-8") as fh:
        docs = [json.loads(line)["text"] for line in fh]
    encoded = [np.array([sp.bos_id()] + ids, dtype=np.int64) for ids in sp.encode(docs)]
    write_shard(CACHE / "fineweb_train_000000.bin", np.concatenate(encoded[:-VAL_DOCS]))
    write_shard(CACHE / "fineweb_val_000000.bin", np.concatenate(encoded[-VAL_DOCS:]))
    print(f"tokenized {len(docs)} documents in {time.perf_counter() - t0:.1f}s -> {CACHE}", flush=True)
    return CACHE


def run_variant(name: str, overrides: dict[str, str], seed: int, seconds: float, steps: int | None, data: Path,
                log_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG", "TMPDIR")}
    env.update(BASE_ENV)
    env["MAX_WALLCLOCK_SECONDS"] = str(seconds)
    env.update(overrides)
    if steps is not None:
        env.update(ITERATIONS=str(steps), MAX_WALLCLOCK_SECONDS="0")
    env.update(SEED=str(seed), DATA_PATH=str(data),
               TOKENIZER_PATH=str(TOKENIZER), LOG_DIR=str(log_dir), RUN_ID=f"{name}_s{seed}")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    match = FINAL_RE.match(lines[-1]) if lines else None
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"{name} seed {seed} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return {"variant": name, "seed": seed, "val_bpb": float(match.group(2)), "steps": int(match.group(3)),
            "wall_s": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="training wallclock per run")
    ap.add_argument("--steps", type=int, default=None, help="step-matched instead: exactly this many steps per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337])
    ap.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="run only these variants")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "ablation.md", help="markdown table to write")
    args = ap.parse_args()
    if not CORPUS.is_file() or not TOKENIZER.is_file():
        print(f"error: needs {CORPUS} and {TOKENIZER}", file=sys.stderr)
        return 2
    data = build_dataset()
    log_dir = ROOT / "bench" / ".cache" / "logs" / time.strftime("%Y%m%d_%H%M%S")  # train_gpt.py refuses a RUN_ID twice
    names = args.only or list(VARIANTS)
    results: dict[str, list[dict]] = {}
    for name in names:
        for seed in args.seeds:
            r = run_variant(name, VARIANTS[name], seed, args.seconds, args.steps, data, log_dir)
            results.setdefault(name, []).append(r)
            with open(args.out.with_suffix(".jsonl"), "a", encoding="utf-8") as fh:
                fh.write(json.dumps(r) + "\n")
            print(f"{name:22s} seed {seed}: val_bpb {r['val_bpb']:.4f} steps {r['steps']} ({r['wall_s']:.0f}s)", flush=True)
    full = statistics.mean(r["val_bpb"] for r in results["full"]) if "full" in results else None
    rows = ["| variant | overrides | val_bpb (mean) | Δ vs full | per seed | steps (mean) | train+eval s (mean) |",
            "|---|---|---|---|---|---|---|"]
    for name in names:
        rs = results[name]
        bpb = statistics.mean(r["val_bpb"] for r in rs)
        delta = f"{bpb - full:+.4f}" if full is not None and name != "full" else ""
        over = " ".join(f"{k}={v}" for k, v in VARIANTS[name].items()) or "(record stack)"
        per_seed = ", ".join(f"{r['seed']}: {r['val_bpb']:.4f}" for r in rs)
        rows.append(f"| {name} | `{over}` | {bpb:.4f} | {delta} | {per_seed} | "
                    f"{statistics.mean(r['steps'] for r in rs):.0f} | {statistics.mean(r['wall_s'] for r in rs):.0f} |")
    if "full" in results and len(results["full"]) > 1:
        spread = statistics.stdev(r["val_bpb"] for r in results["full"])
        rows.append(f"\nSeed std of the full stack: {spread:.4f} BPB over {len(results['full'])} seeds.")
    budget = f"--steps {args.steps}" if args.steps is not None else f"--seconds {args.seconds:g}"
    header = (f"Command: `python bench/ablate.py {budget} --seeds {' '.join(map(str, args.seeds))}`; "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}.\n\n")
    args.out.write_text(header + "\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
