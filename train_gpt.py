"""Parameter Golf training script: one readable file that trains, packs and scores a small GPT.

The challenge (openai/parameter-golf): lowest bits per byte (val_bpb) on the FineWeb validation
split (the fixed first 50,000 documents) with an artifact of at most 16,000,000 bytes (decimal;
the bytes of this file plus the compressed weights), at most 600 s of training on 8xH100 SXM and
at most 600 s of evaluation.

Run:
    PRESET=smoke python train_gpt.py                                   # 2-core CPU, ~2 minutes
    torchrun --standalone --nproc_per_node=8 train_gpt.py              # the record configuration
    DRY_RUN=1 python train_gpt.py                                      # preflight: config + param counts

Every knob is an UPPER_CASE environment variable read by `Hyperparameters.from_env`; docs/knobs.md
lists them all. Importing this file has no side effects: the environment is read, devices are
touched and files are written only inside `main()`. Beside it in the repository, pgolf/ (not shipped)
adds run locks, OVERWRITE staging, other scripts' knob names, dataset manifest checks, the embedded sample
(SAMPLE_DATA), EVAL_ONLY and REQUANTIZE.

Sections, in order (`grep -n '^# ====' train_gpt.py`): config, logging, distributed, data and BPB,
model, kernels, optimizers, quantization and packing, evaluation, training, main.
"""

from __future__ import annotations

import copy, dataclasses, datetime, difflib, functools, hashlib, heapq, importlib.util, json, math, os, platform
import queue, re, shutil, signal, struct, sys, threading, time, zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# ==== Config ====

ARTIFACT_LIMIT_BYTES = 16_000_000  # decimal bytes, not MiB: code + compressed model (challenge rule)
CANONICAL_WORLD = 8  # the record track's GPU count; grad accumulation reproduces its batch

# Named defaults (an environment variable wins): `record` = the dataclass's (PR #1855), `baseline` = the naive baseline
# (records/.../NaiveBaseline, 1.2244 BPB), `smoke` = that baseline small enough for a 2-core CPU minute on the sample.
BASELINE: dict[str, Any] = {
    "vocab_size": 1024, "num_layers": 9, "model_dim": 512, "num_heads": 8, "num_kv_heads": 4, "mlp_mult": 2.0,
    "train_batch_tokens": 524_288, "train_seq_len": 1024, "eval_seq_len": 1024, "qk_gain_init": 1.5, "matrix_lr": 0.04,
    "scalar_lr": 0.04, "tied_embed_lr": 0.05, "muon_momentum": 0.95, "muon_momentum_warmup_start": 0.85,
    "muon_momentum_warmup_steps": 500, "muon_wd": 0.0, "embed_wd": 0.0, "adam_wd": 0.0, "grad_clip_norm": 0.0,
    "ema_decay": 0.0, "mlp_act": "relu2", "ln_scale": False, "rope_dims": 0, "ortho_init": False, "muon_ns": "classic",
    "muon_row_normalize": False, "xsa_last_n": 0, "skip_gates_enabled": False, "smear_gate_enabled": False,
    "sparse_attn_gate_enabled": False, "num_loops": 0, "parallel_mode": "off",
    # WARMDOWN_ITERS=1200 of the naive baseline's ~13,780 steps in 600 s: the last ~9% of the run.
    "warmdown_frac": 0.087, "min_lr": 0.0, "val_loss_every": 1000, "train_log_every": 200, "fused_ce_enabled": False,
    "fused_mlp_enabled": False, "doc_isolation": False, "doc_packed_loader": False, "caseops_enabled": False,
    # Its artifact: per-row int8 round to nearest at each row's largest magnitude, fp16 control tensors, zlib-9.
    "quant_method": "rtn", "matrix_bits": 8, "embed_bits": 8, "mlp_clip_sigmas": 0.0, "attn_clip_sigmas": 0.0,
    "embed_clip_sigmas": 0.0, "lqer_enabled": False, "lqer_asym_enabled": False, "gated_attn_quant_gate": False,
    "compressor": "zlib", "eval_stride": 0, "ttt_enabled": False,
}
SMOKE_SIZES: dict[str, Any] = {
    # ~16k tokens/s on a 2-core CPU, so many small steps beat a few large ones.
    "sample_data": True, "num_layers": 4, "model_dim": 128, "num_heads": 4, "num_kv_heads": 2,
    "train_batch_tokens": 4096, "train_seq_len": 128, "eval_seq_len": 128, "grad_accum_steps": 1,
    "eval_batch_seqs": 64, "iterations": 2000, "max_wallclock_seconds": 60.0, "warmup_steps": 2,
    "warmdown_frac": 0.3, "muon_momentum_warmup_steps": 100, "train_log_every": 50, "val_loss_every": 0,
    "compile": False, "gptq_calibration_batches": 4,  # when a test turns GPTQ on (QUANT_METHOD=gptq)
}
PRESETS: dict[str, dict[str, Any]] = {"record": {}, "baseline": BASELINE, "smoke": {**BASELINE, **SMOKE_SIZES}}

# Variables torchrun (or the shell) sets that are ours to read but are not knobs.
LAUNCHER_VARS = frozenset({"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                           "ROLE_NAME", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                           "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                           "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                           "OMP_NUM_THREADS"})

COMPRESSORS = ("pergroup", "brotli", "lzma", "zlib")

class Hinted(Exception):
    """An error whose message may end in a `hint` saying what to do (records/pack.py drops `hint=` when shipping)."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(f"{message}; {hint}" if hint else message)

class ConfigError(Hinted, ValueError):
    """A bad environment variable or input file: the message is one line naming it."""

# A knob's check: (test of the parsed value, what is allowed, for the error).
Check = tuple[Callable[[Any], bool], str]
POSITIVE: Check = (lambda v: v > 0), "> 0"
NON_NEGATIVE: Check = (lambda v: v >= 0), ">= 0"
FRACTION: Check = (lambda v: 0.0 <= v <= 1.0), "a number in [0, 1]"
BELOW_ONE: Check = (lambda v: 0.0 <= v < 1.0), "in [0, 1)"  # decays, momenta, betas: at 1.0 an average never moves
BITS: Check = (lambda v: 2 <= v <= 8), "an integer in [2, 8]"

def one_of(*values: str) -> Check:
    return (lambda v: v in values), f"{', '.join(values[:-1])} or {values[-1]}"

def _is_non_negative_number(v: str) -> bool:
    try:
        return math.isfinite(float(v)) and float(v) >= 0
    except ValueError:
        return False

def knob(default: Any, help: str, check: Check | None = None) -> Any:
    return field(default=default, metadata={"knob": True, "help": help, "check": check})

@dataclass(frozen=True)
class Hyperparameters:
    # --- Run and data ---
    preset: str = knob("record", "named defaults: record | baseline | smoke", one_of(*PRESETS))
    data_dir: str = knob("./data", "root of datasets/ and tokenizers/ (relative to the working directory)",
                         (bool, "a folder ('.' for the working directory)"))
    data_path: str = knob("", "shard folder; empty = DATA_DIR/datasets/fineweb10B_sp<VOCAB_SIZE>, with "
                              "_lossless_caps_caseops_v1_reserved under CASEOPS_ENABLED")
    tokenizer_path: str = knob("", "SentencePiece model; empty = DATA_DIR/tokenizers/fineweb_<VOCAB_SIZE>_bpe.model, "
                                   "fineweb_<VOCAB_SIZE>_bpe_lossless_caps_caseops_v1_reserved.model under CASEOPS")
    sample_data: bool = knob(False, "1 = use (and build on first use) the embedded sample dataset in DATA_DIR")
    vocab_size: int = knob(8192, "tokenizer and embedding vocabulary size",
                           (lambda v: 2 <= v <= 65536, "an integer in [2, 65536] (shards store uint16 tokens)"))
    seed: int = knob(1337, "seed for the initial weights and the training data order", NON_NEGATIVE)
    run_id: str = knob("", "name of this run's outputs; empty = <preset>_<UTC timestamp>_<pid>",
                       (lambda v: bool(re.fullmatch(r"[A-Za-z0-9._-]*", v)), "letters, digits, '.', '_' and '-' only"))
    log_dir: str = knob("logs", "folder of <RUN_ID>.txt/.json/.ptz", (bool, "a folder ('.' for the working directory)"))
    overwrite: bool = knob(False, "1 = rerun a RUN_ID whose outputs exist; they are replaced once the new run finishes")
    device: str = knob("auto", "auto | cpu | cuda", one_of("auto", "cpu", "cuda"))
    compute_dtype: str = knob("auto", "autocast dtype; auto: bf16 on CUDA, fp32 on CPU", one_of("auto", "bf16", "fp32"))
    compile: bool = knob(True, "torch.compile the model (0 = eager)")
    attn_backend: str = knob("auto", "auto = the first of fa3 (flash_attn_interface), fa4 (flash_attn.cute) and "
                                     "sdpa that imports (CPU: sdpa)", one_of("auto", "fa3", "fa4", "sdpa"))
    dry_run: bool = knob(False, "1 = build model and optimizers, print config and parameter counts, exit")
    strict_env: bool = knob(False, "1 = an unknown variable that looks like a knob is an error")

    # --- Training length and batch ---
    iterations: int = knob(20000, "maximum optimizer steps", POSITIVE)
    max_wallclock_seconds: float = knob(600.0, "training time cap in seconds (0 = no cap)", NON_NEGATIVE)
    train_batch_tokens: int = knob(786_432, "tokens per optimizer step over all ranks", POSITIVE)
    train_seq_len: int = knob(2048, "training sequence length", POSITIVE)
    grad_accum_steps: int = knob(0, "micro-batches per step and rank; 0 = max(1, 8 // WORLD_SIZE)", NON_NEGATIVE)
    warmup_steps: int = knob(20, "untimed compile warmup steps, then model and optimizer are restored", NON_NEGATIVE)
    warmdown_frac: float = knob(0.85, "final fraction of the run over which the LR decays (PR #1855)", FRACTION)
    warmdown_iters: int = knob(0, "decay the LR over the last N steps instead of WARMDOWN_FRAC (0 = off; under a "
                                  "wallclock cap, N times the average step, as the naive baseline)", NON_NEGATIVE)
    min_lr: float = knob(0.1, "LR floor as a fraction of the peak during warmdown", FRACTION)
    train_log_every: int = knob(500, "log a train line every N steps, besides steps 1-2, the last, one every 30 s "
                                     "and every 1/20 of ITERATIONS (0 = only those)", NON_NEGATIVE)
    val_loss_every: int = knob(0, "validate every N steps (0 = only at the end)", NON_NEGATIVE)

    # --- Evaluation ---
    eval_seq_len: int = knob(2048, "evaluation sequence length", POSITIVE)
    eval_stride: int = knob(0, "sliding-window eval stride: each target scored once with >= EVAL_SEQ_LEN - stride "
                                "context (0 or >= EVAL_SEQ_LEN = off; legacy SLIDING_WINDOW_ENABLED=0)", NON_NEGATIVE)
    eval_batch_seqs: int = knob(32, "windows per forward and rank in the plain and sliding evals (one compiled "
                                    "shape); at most this many sequences per phase SGD step and rank", POSITIVE)
    bpb_check_docs: str = knob("1000", "val documents whose byte count is checked against their decoded text (or all)",
                               (lambda v: v == "all" or (v.isdigit() and int(v) > 0), "all or an integer > 0"))
    max_val_tokens: int = knob(0, "score only the first N val targets (0 = all; else NOT reportable)", NON_NEGATIVE)
    eval_time_budget_seconds: float = knob(600.0, "TTT trains less (LoRA steps every 2nd chunk, then none; no "
                                                  "further phase) when it would pass this", POSITIVE)
    ttt_enabled: bool = knob(True, "score-first test-time training: per-document LoRA (PR #1530) with phases of "
                                   "global SGD over already-scored documents (PR #1610/#1626)")
    ttt_momentum: float = knob(0.9, "phase SGD momentum", BELOW_ONE)
    ttt_chunk_tokens: int = knob(32768, "phase SGD: already-scored tokens per chunk (cosine LR over the chunks, the "
                                        "last not trained; LoRA TTT's chunk is TTT_CHUNK_SIZE)", POSITIVE)
    ttt_grad_clip: float = knob(1.0, "phase SGD gradient-norm clip (0 = off)", NON_NEGATIVE)
    ttt_lora_rank: int = knob(80, "rank of TTT's per-document LoRA adapters", POSITIVE)
    ttt_lora_alpha: float = knob(144.0, "LoRA output scale alpha/rank (PR #1767)", POSITIVE)
    ttt_lora_lr: float = knob(1e-4, "LoRA AdamW learning rate", NON_NEGATIVE)
    ttt_weight_decay: float = knob(0.5, "LoRA AdamW weight decay", NON_NEGATIVE)
    ttt_batch_size: int = knob(64, "documents per LoRA batch (one row and one set of adapters each)", POSITIVE)
    ttt_chunk_size: int = knob(48, "LoRA TTT: tokens of each document scored, then trained on, per step", POSITIVE)
    ttt_warm_start_a: bool = knob(True, "keep LoRA A from one document batch to the next, zero only B (PR #1767)")
    phased_ttt_prefix_docs: int = knob(2500, "documents scored by the last phase SGD pause", NON_NEGATIVE)
    phased_ttt_num_phases: int = knob(3, "phase SGD pauses at equal shares of the prefix (0 = LoRA only)", NON_NEGATIVE)
    global_ttt_lr: float = knob(0.001, "phase SGD learning rate (cosine over TTT_CHUNK_TOKENS chunks)", NON_NEGATIVE)
    global_ttt_epochs: int = knob(1, "phase SGD epochs over a phase's documents", NON_NEGATIVE)

    # --- Model ---
    num_layers: int = knob(11, "transformer blocks", POSITIVE)
    model_dim: int = knob(512, "residual width", POSITIVE)
    num_heads: int = knob(8, "attention query heads", POSITIVE)
    num_kv_heads: int = knob(4, "attention key/value heads (grouped-query attention)", POSITIVE)
    mlp_mult: float = knob(4.0, "MLP hidden width as a multiple of MODEL_DIM", POSITIVE)
    tie_embeddings: bool = knob(True, "1 = the output head reuses the token embedding")
    tied_embed_init_std: float = knob(0.005, "std of the embedding init", POSITIVE)
    logit_softcap: float = knob(30.0, "logits = c*tanh(z/c) (0 = off)", NON_NEGATIVE)
    fused_ce_enabled: bool = knob(True, "softcapped cross-entropy as one custom op (Triton kernels on CUDA, the "
                                         "PyTorch formula elsewhere; PR #1787) instead of the formula inductor fuses")
    fused_mlp_enabled: bool = knob(True, "the MLP as one custom op whose up projection and MLP_ACT are one Triton "
                                         "kernel each way on CUDA (PR #1530, #1855); relu2 is its slope 0")
    caseops_enabled: bool = knob(True, "CaseOps data (PR #1729): count validation bytes from the byte sidecar "
                                        "fineweb_val_bytes_*.bin of the original text, not the tokenizer's tables")
    doc_isolation: bool = knob(True, "attention stays inside each document, a BOS starting one (PR #1530): FA3's "
                                      "varlen call, else FlexAttention (CUDA, compiled), else SDPA with a mask")
    doc_packed_loader: bool = knob(True, "a micro-batch is one row of documents read in order from each shard's first "
                                         "BOS, cut at each BOS and TRAIN_SEQ_LEN tokens (PR #1855, with DOC_ISOLATION)")
    rope_base: float = knob(10000.0, "RoPE base frequency", POSITIVE)
    qk_gain_init: float = knob(5.0, "initial per-head query gain after QK RMS-norm (PR #1276)", POSITIVE)
    rope_dims: int = knob(16, "rotate the first N dims of each head (0 or >= head dim = all; PR #315)", NON_NEGATIVE)
    rope_train_seq_len: int = knob(2048, "NTK-scale the RoPE base for sequences longer than this", POSITIVE)
    mlp_act: str = knob("leaky_relu2", "MLP activation: relu2 / leaky_relu2 (PR #549)", one_of("relu2", "leaky_relu2"))
    leaky_slope: float = knob(0.5, "negative slope of leaky_relu2", NON_NEGATIVE)
    ln_scale: bool = knob(True, "scale each block's norm outputs by 1/sqrt(layer index + 1) (PR #315)")
    ortho_init: bool = knob(True, "orthogonal init of block matrices >= 64x64 (PR #65); output projections stay zero")
    xsa_last_n: int = knob(11, "exclusive self-attention in the last N layers (0 = off, >= NUM_LAYERS = all; "
                               "PR #265)", NON_NEGATIVE)
    skip_gates_enabled: bool = knob(True, "sigmoid-gated U-Net skips: x = lerp(w*skip, x, sigmoid(g)) (PR #1089)")
    smear_gate_enabled: bool = knob(True, "SmearGate (PR #1667): gated previous-token mix, masked at BOS (PR #1851)")
    gate_window: int = knob(12, "input dims the SmearGate and the attention output gate read", POSITIVE)
    sparse_attn_gate_enabled: bool = knob(True, "per-head sigmoid gate on the attention output (PR #1787)")
    sparse_attn_gate_scale: float = knob(0.5, "logit scale of the attention output gate", POSITIVE)
    num_loops: int = knob(2, "depth recurrence: extra passes over LOOP_START..LOOP_END (PR #1493)", NON_NEGATIVE)
    loop_start: int = knob(3, "first physical layer of the looped span", NON_NEGATIVE)
    loop_end: int = knob(5, "last physical layer of the looped span (inclusive)", NON_NEGATIVE)
    enable_looping_at: float = knob(0.35, "turn looping on at this fraction of training (time or steps)", FRACTION)
    looping_start_step: int = knob(0, "turn looping on at this step instead (0 = ENABLE_LOOPING_AT)", NON_NEGATIVE)
    parallel_mode: str = knob("lanes", "2 parallel residual lanes as PR #1855 runs PR #1530's", one_of("off", "lanes"))
    parallel_start_layer: int = knob(8, "first layer of the parallel lanes (decoder half only)", NON_NEGATIVE)

    # --- Optimizers ---
    matrix_lr: float = knob(0.026, "Muon LR for 2-D block matrices", NON_NEGATIVE)
    scalar_lr: float = knob(0.02, "AdamW LR for vectors, scalars and control tensors", NON_NEGATIVE)
    tied_embed_lr: float = knob(0.03, "AdamW LR for the token embedding", NON_NEGATIVE)
    head_lr: float = knob(0.008, "AdamW LR for the untied output head (TIE_EMBEDDINGS=0)", NON_NEGATIVE)
    muon_momentum: float = knob(0.97, "Muon momentum after warmup", BELOW_ONE)
    muon_momentum_warmup_start: float = knob(0.92, "Muon momentum at step 0", BELOW_ONE)
    muon_momentum_warmup_steps: int = knob(1500, "steps of linear momentum warmup", NON_NEGATIVE)
    muon_backend_steps: int = knob(5, "Newton-Schulz iterations", POSITIVE)
    muon_ns: str = knob("polar_express", "Newton-Schulz coefficients: classic / polar_express (PR #1344) / "
                                         "polar_express_safe (the same, input norm x 1.02, PR #1514)",
                        (lambda v: v in NS_COEFFICIENT_SETS, "classic, polar_express or polar_express_safe"))
    muon_row_normalize: bool = knob(True, "MuonEq-R (alias MUON_EQ_R): rows normalized before Newton-Schulz (PR #1217)")
    muon_wd: float = knob(0.095, "decoupled weight decay of Muon matrices", NON_NEGATIVE)
    muon_ns_dtype: str = knob("auto", "Newton-Schulz dtype: auto = bf16 on CUDA (as the records) and on CPUs with "
                                      "AMX tiles, else fp32", (lambda v: v in MUON_NS_DTYPES, "auto, bf16 or fp32"))
    embed_wd: float = knob(0.085, "decoupled weight decay of the embedding", NON_NEGATIVE)
    adam_wd: float = knob(0.02, "decoupled weight decay of scalar/control tensors", NON_NEGATIVE)
    beta1: float = knob(0.9, "AdamW beta1", BELOW_ONE)
    beta2: float = knob(0.99, "AdamW beta2 (PR #1855)", BELOW_ONE)
    adam_eps: float = knob(1e-8, "AdamW epsilon", POSITIVE)
    grad_clip_norm: float = knob(0.3, "global gradient-norm clip (0 = off)", NON_NEGATIVE)
    ema_decay: float = knob(0.9965, "EMA decay of the weights applied at the end (0 = off)", BELOW_ONE)

    # --- Quantization and artifact ---
    quant_method: str = knob("gptq", "gptq (full-Hessian, PR #1019) / rtn; legacy USE_GPTQ=0/1", one_of("gptq", "rtn"))
    matrix_bits: int = knob(6, "bits of attention and MLP matrices", BITS)
    embed_bits: int = knob(7, "bits of the embedding tables (and an untied head; PR #1586)", BITS)
    mlp_clip_sigmas: float = knob(11.5, "SDClip k of MLP matrices: clip = k * std(row) (PR #1394); 0 = no clip, "
                                        "the row's largest magnitude (the naive baseline)", NON_NEGATIVE)
    attn_clip_sigmas: float = knob(13.0, "SDClip k of attention matrices (0 = no clip)", NON_NEGATIVE)
    embed_clip_sigmas: float = knob(14.0, "SDClip k of the embedding tables (0 = no clip)", NON_NEGATIVE)
    matrix_clip_sigmas: float = knob(0.0, "when > 0, sets both MLP_CLIP_SIGMAS and ATTN_CLIP_SIGMAS", NON_NEGATIVE)
    gptq_damp: float = knob(0.01, "GPTQ damping as a fraction of the mean Hessian diagonal", POSITIVE)
    gptq_block: int = knob(128, "GPTQ columns updated per block", POSITIVE)
    gptq_calibration_batches: int = knob(16, "training batches for GPTQ Hessians (alias GPTQ_CALIB_BATCHES)", POSITIVE)
    gptq_reserve_seconds: str = knob("auto", "training seconds kept for Hessian collection: a number, or auto = "
                                             "measured time of one batch x batches (+margin)",
                                     (lambda v: v == "auto" or _is_non_negative_number(v), "auto or a number >= 0"))
    lqer_enabled: bool = knob(True, "low-rank correction of the largest quantization errors (PR #1797)")
    lqer_rank: int = knob(4, "LQER rank", POSITIVE)
    lqer_top_k: int = knob(3, "LQER corrects this many tensors (largest error norm first)", POSITIVE)
    lqer_factor_bits: int = knob(4, "bits of the symmetric LQER factors", BITS)
    lqer_asym_enabled: bool = knob(True, "asymmetric LQER factors (PR #1797): A int2 with one scale, B int4 in groups "
                                         "of LQER_ASYM_GROUP (symmetric where B does not divide into groups)")
    lqer_asym_group: int = knob(64, "values of B per fp16 scale in asymmetric LQER", POSITIVE)
    gated_attn_quant_gate: bool = knob(True, "attention output gate rows as int8, a scale each, not fp16 (PR #1736)")
    target_bytes: int = knob(ARTIFACT_LIMIT_BYTES, "code + compressed model byte limit (TARGET_MB: millions)", POSITIVE)
    size_margin_bytes: int = knob(8000, "safety margin under TARGET_BYTES for run-to-run size jitter", NON_NEGATIVE)
    compressor: str = knob("pergroup", "pergroup (PR #1855: each role's code matrices by lrzip's ZPAQ, the rest "
                                       "brotli; no lrzip: brotli, warned) / brotli / lzma / zlib", one_of(*COMPRESSORS))
    eval_only: bool = knob(False, "1 = no training: load ARTIFACT and evaluate it (re-scoring)")
    artifact: str = knob("", "artifact to evaluate with EVAL_ONLY=1")
    requantize: str = knob("", "a <RUN_ID>.weights.pt kept by a run that could not write its artifact: instead of "
                               "training, quantize, pack and score those weights (same knobs as that run)")

    # --- Launcher topology (read from torchrun's variables; not knobs) ---
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    env_warnings: tuple[str, ...] = ()
    env_set: frozenset[str] = frozenset()  # the knobs a variable set (EVAL_ONLY refuses them against its artifact)

    @classmethod
    def knob_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.metadata.get("knob")]

    @classmethod
    def knob_names(cls) -> list[str]:
        return [f.name.upper() for f in cls.knob_fields()]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Hyperparameters":
        """The one place that reads the environment. Raises ConfigError naming the bad variable."""
        env = dict(os.environ if env is None else env)
        preset = env.get("PRESET", "record").strip()  # an unknown one: __post_init__ refuses it
        values: dict[str, Any] = {**PRESETS.get(preset, {}), "preset": preset}
        knobs = operations("knobs")  # pgolf/: other scripts' knob names rewritten, refused or warned about
        try:
            env, warnings, known = knobs.rewrite(env) if knobs else (env, [], frozenset())
        except knobs.Refused as exc:  # only raised where pgolf.knobs exists
            raise ConfigError(str(exc)) from None
        env_set = frozenset(f.name for f in cls.knob_fields() if f.name.upper() in env) - {"preset"}
        values.update({f.name: _parse_value(f.name.upper(), env[f.name.upper()], type(f.default))
                       for f in cls.knob_fields() if f.name in env_set})
        warnings += _check_unknown_vars(env, known, bool(values.get("strict_env", False)))
        topo = {k: _parse_value(k.upper(), env.get(k.upper(), str(d)), int)
                for k, d in (("world_size", 1), ("rank", 0), ("local_rank", 0))}
        return cls(**values, **topo, env_warnings=tuple(warnings), env_set=env_set)

    def __post_init__(self) -> None:
        for f in self.knob_fields():
            test, allowed = f.metadata["check"] or (None, "")
            if test is not None and not test(value := getattr(self, f.name)):
                raise ConfigError(f"{f.name.upper()}={value!r} is not allowed: expected {allowed}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ConfigError(f"RANK={self.rank} / WORLD_SIZE={self.world_size} / LOCAL_RANK={self.local_rank} is "
                              "not a valid torchrun topology")
        dim, heads = self.model_dim, self.num_heads
        if dim % (2 * heads):  # whole head dims, even for RoPE's halves
            raise ConfigError(f"MODEL_DIM={dim} is not allowed: must be divisible by 2*NUM_HEADS={2 * heads}")
        if self.rope_dims % 2 or self.rope_dims == 2:  # halves of an even width; NTK needs d > 2
            raise ConfigError(f"ROPE_DIMS={self.rope_dims} is not allowed: expected 0 (all) or an even number >= 4")
        if self.num_loops and not self.loop_start <= self.loop_end < self.num_layers:
            raise ConfigError(f"LOOP_START={self.loop_start}/LOOP_END={self.loop_end} is not allowed: need LOOP_START "
                              f"<= LOOP_END < NUM_LAYERS={self.num_layers}", hint="NUM_LOOPS=0 for no looping")
        if self.gate_window > dim:
            raise ConfigError(f"GATE_WINDOW={self.gate_window} is not allowed: must be <= MODEL_DIM={dim}")
        if heads % self.num_kv_heads:
            raise ConfigError(f"NUM_KV_HEADS={self.num_kv_heads} is not allowed: must divide NUM_HEADS={heads}")
        if int(dim * self.mlp_mult) < 1:
            raise ConfigError(f"MLP_MULT={self.mlp_mult} is not allowed: MODEL_DIM*MLP_MULT must be >= 1")
        if self.ttt_enabled and self.ttt_chunk_tokens < self.eval_seq_len:
            raise ConfigError(f"TTT_CHUNK_TOKENS={self.ttt_chunk_tokens} is not allowed: must be >= EVAL_SEQ_LEN="
                              f"{self.eval_seq_len}", hint="the phase SGD trains on whole sequences of a chunk")
        if self.eval_only and not self.artifact:
            raise ConfigError("EVAL_ONLY=1 is not allowed without ARTIFACT=<path of a .ptz artifact>")
        chunk = self.world_size * self.accum_steps * self.train_seq_len
        if self.train_batch_tokens % chunk:
            raise ConfigError(f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} is not allowed: must be a multiple of "
                              f"WORLD_SIZE*GRAD_ACCUM_STEPS*TRAIN_SEQ_LEN = {self.world_size}*{self.accum_steps}*"
                              f"{self.train_seq_len} = {chunk}", hint="whole sequences per rank and micro-batch")

    @property
    def accum_steps(self) -> int:
        return self.grad_accum_steps or max(1, CANONICAL_WORLD // self.world_size)

    @property
    def micro_batch_seqs(self) -> int:
        return self.train_batch_tokens // (self.world_size * self.accum_steps * self.train_seq_len)

    @property
    def dataset_dir(self) -> Path:
        name = f"sample_sp{self.vocab_size}" if self.sample_data else f"fineweb10B_sp{self.vocab_size}{self._caseops}"
        return Path(self.data_path or Path(self.data_dir) / "datasets" / name)

    @property
    def tokenizer_file(self) -> Path:
        name = "sample_{}_bpe.model" if self.sample_data else "fineweb_{}_bpe" + self._caseops + ".model"
        return Path(self.tokenizer_path or Path(self.data_dir) / "tokenizers" / name.format(self.vocab_size))

    @property
    def _caseops(self) -> str:  # PR #1729's published CaseOps export (the downloader's --variant)
        return "_lossless_caps_caseops_v1_reserved" if self.caseops_enabled else ""

    @property
    def sliding(self) -> bool:
        return 0 < self.eval_stride < self.eval_seq_len

    def clip_sigmas(self, group: str) -> float:
        """SDClip k of a quantization group (mlp / attn / embed); MATRIX_CLIP_SIGMAS sets both matrix groups."""
        if group != "embed" and self.matrix_clip_sigmas > 0:
            return self.matrix_clip_sigmas
        return {"mlp": self.mlp_clip_sigmas, "attn": self.attn_clip_sigmas, "embed": self.embed_clip_sigmas}[group]

    @property
    def gptq_reserve(self) -> float | None:  # None: auto, measured during warmup
        return None if self.gptq_reserve_seconds == "auto" else float(self.gptq_reserve_seconds)

    def knob_values(self) -> dict[str, Any]:
        return {f.name.upper(): getattr(self, f.name) for f in self.knob_fields()}

def _parse_value(name: str, raw: str, kind: type) -> Any:
    text = raw.strip()
    try:
        if kind is bool and text in ("0", "1"):
            return text == "1"
        if kind is int:
            return int(text)
        if kind is float and math.isfinite(value := float(text)):
            return value
        if kind is str:
            return text
    except ValueError:
        pass
    allowed = {bool: "0 or 1", int: "an integer", float: "a finite number"}[kind]
    raise ConfigError(f"{name}={raw!r} is not allowed: expected {allowed}")

def closest_knob(name: str, candidates: list[str]) -> str | None:
    """The knob `name` looks like a misspelling of (case, underscores or a letter off: seed, SEEED -> SEED), or None."""
    key = name.upper()  # an exact match scores 1.0, the best
    squashed = {c.replace("_", ""): c for c in candidates}
    close = (difflib.get_close_matches(key, candidates, n=1, cutoff=0.8)
             or difflib.get_close_matches(key.replace("_", ""), list(squashed), n=1, cutoff=0.8))
    return squashed.get(close[0], close[0]) if close else None

def operations(name: str) -> Any:
    """pgolf.<name> where the unshipped pgolf/ sits beside this file, else None (a broken pgolf module raises)."""
    try:
        importlib.import_module("pgolf")  # first: the package decides (a copy without it, or a test hiding it)
        return importlib.import_module(f"pgolf.{name}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("pgolf", f"pgolf.{name}"):
            raise
        return None

def _check_unknown_vars(env: Mapping[str, str], known: frozenset[str], strict: bool) -> list[str]:
    """Variables that look like a misspelt knob: a warning each, or (STRICT_ENV=1) one error naming them all."""
    candidates = Hyperparameters.knob_names()
    typos = []  # (NAME='value', (did you mean KNOB?))
    for name in sorted(set(env) - set(candidates) - LAUNCHER_VARS - known):
        if close := re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) and closest_knob(name, candidates):
            typos.append((f"{name}={env[name]!r}", f"(did you mean {close}?)"))
    if strict and typos:  # every typo at once: fixing them one run at a time wastes a start-up each
        raise ConfigError(f"unknown knobs: {', '.join(' '.join(t) for t in typos)}; STRICT_ENV=1 refuses them")
    return [f"{set_to} is not a knob of train_gpt.py and is ignored {mean}" for set_to, mean in typos]

# The seed and the knobs that name or place a run or only check its inputs: one sweep shares a config hash.
CONFIG_HASH_IGNORED = frozenset({"SEED", "RUN_ID", "LOG_DIR", "OVERWRITE", "REQUANTIZE", "STRICT_ENV",
                                 "BPB_CHECK_DOCS"})

def config_hash(config: dict[str, Any]) -> str:
    """sha256 of a resolved config (`knob_values()` or a run JSON's `config`) without CONFIG_HASH_IGNORED."""
    kept = {k: config[k] for k in sorted(config) if k not in CONFIG_HASH_IGNORED}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()

# ==== Logging ====

RUN_OUTPUTS = (".txt", ".json", ".ptz")

@dataclass(frozen=True)
class RunFiles:
    """A shipped copy's LOG_DIR/<RUN_ID>.txt/.json/.ptz; pgolf/runs.py adds a lock and OVERWRITE staging."""
    log_dir: Path
    run_id: str
    note: str = ""  # what claiming did

    def path(self, suffix: str) -> Path:  # now; `final(suffix)`: once `publish`ed
        return self.log_dir / f"{self.run_id}{suffix}"

    final = path  # nothing is staged or locked

    def publish(self) -> None:
        pass

    release = publish

def claim_run_files(h: Hyperparameters) -> RunFiles:
    """Rank 0, before any work: pgolf.runs.claim, or (a shipped copy) refuse outputs that exist unless OVERWRITE=1."""
    runs = operations("runs")
    if runs is None:
        files = RunFiles(Path(h.log_dir), h.run_id)
        existing = [p for p in map(files.path, RUN_OUTPUTS) if p.exists()]
        if existing and not h.overwrite:
            raise ConfigError(f"RUN_ID={h.run_id!r} is not allowed: {existing[0]} exists",
                              hint="choose another RUN_ID, or OVERWRITE=1")
        try:  # the log opens next: a LOG_DIR that cannot take it is refused now, not after the warm-up
            files.log_dir.mkdir(parents=True, exist_ok=True)
            files.path(".txt").touch()
        except OSError as exc:
            raise ConfigError(f"LOG_DIR={h.log_dir!r} is not allowed: cannot write there "
                              f"({exc.strerror or exc})") from None
        return files
    try:
        return runs.claim(Path(h.log_dir), h.run_id, h.overwrite, 0 if h.eval_only else h.target_bytes)
    except runs.Refused as exc:
        raise ConfigError(str(exc)) from None

class Logger:
    """Rank 0 prints and appends to a file; a failed write (full disk) drops the file and sets `failure`, not raises."""

    def __init__(self, path: Path | None, enabled: bool = True):
        self.enabled, self.path, self.file, self.failure = enabled, path, None, None
        if enabled and path is not None:
            try:  # in LOG_DIR, which claim_run_files made
                self.file = open(path, "w", encoding="utf-8")
            except OSError as exc:
                self._failed(exc)

    def __call__(self, msg: str = "", console: bool = True) -> None:
        if console and self.enabled:
            print(msg, flush=True)
        if self.file is not None:  # never opened unless enabled
            try:
                self.file.write(msg + "\n")
                self.file.flush()
            except OSError as exc:
                self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        self.failure = self.failure or f"{self.path}: could not write the log ({exc.strerror or exc})"
        self.close()

    def close(self) -> None:
        """Never raises: it runs on every exit path, before the lock is released."""
        file, self.file = self.file, None
        try:
            if file is not None:
                file.close()
        except OSError:
            pass

def warn(log: Callable[[str], None], message: str, banner: bool = False) -> None:
    """Every warning of the log: `WARNING: message`, framed by lines of '!' when `banner` (it must not be missed)."""
    rule = [f"WARNING: {'!' * 60}"] if banner else []
    for line in rule + [f"WARNING: {message}"] + rule:
        log(line)

def format_kv(**items: Any) -> str:  # the schema of every progress line
    return " ".join(f"{k}:{v}" for k, v in items.items())

STEP_PHASES = ("data", "fwd_bwd", "comm", "optimizer", "ema", "other")

class StepTimer:
    """Step time per phase: `mark(phase)` ends an interval; CUDA events read after the step's all-reduce (no sync)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any]] = []  # (the phase that ends here, time) since `start`
        self.totals, self.steps = dict.fromkeys(STEP_PHASES, 0.0), 0

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.marks = [("", self._now())]

    def mark(self, phase: str) -> None:
        self.marks.append((phase, self._now()))

    def collect(self) -> None:
        for (_, a), (phase, b) in zip(self.marks, self.marks[1:]):
            self.totals[phase] += a.elapsed_time(b) / 1000.0 if self.cuda else b - a
        self.steps += 1

    def summary_ms(self) -> dict[str, float]:
        """Mean ms per step of every phase since the last call, then start a new window."""
        out = {k: v * 1000.0 / max(self.steps, 1) for k, v in self.totals.items()}
        self.totals, self.steps = dict.fromkeys(STEP_PHASES, 0.0), 0
        return out

class PhaseClock:
    """Logs a `phase:` line (seconds, tokens/s, peak CUDA memory) per phase; `rows` become the JSON's `phases`."""

    def __init__(self, device: torch.device, log: "Logger"):
        self.device, self.log = device, log
        self.start = time.perf_counter()
        self.rows: list[dict[str, Any]] = []

    def record(self, name: str, seconds: float, tokens: int = 0) -> None:
        row: dict[str, Any] = {"phase": name, "seconds": round(seconds, 3)}
        if tokens:
            row.update(tokens=tokens, tok_s=round(tokens / max(seconds, 1e-9)))
        if self.device.type == "cuda":
            row["peak_mib"] = torch.cuda.max_memory_allocated(self.device) // 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rows.append(row)
        self.log(format_kv(**row))

    def wall_seconds(self) -> float:
        return time.perf_counter() - self.start

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
        tmp.unlink(missing_ok=True)

def sha256_file(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()

def package_version(*names: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "absent"

def environment_versions(device: torch.device) -> dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cuda": str(torch.version.cuda), "platform": platform.platform(), "device": str(device)}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), gpu_count=str(torch.cuda.device_count()),
                    flash_attn=package_version("flash_attn_3", "flash-attn-3", "flash_attn_interface", "flash_attn"))
    else:
        info["cpu_threads"] = str(torch.get_num_threads())
    return info

def log_header(h: Hyperparameters, d: DistInfo, code: bytes, backend: str, fingerprint: dict[str, Any],
               log: Logger) -> dict[str, str]:
    """The resolved config, versions, code hash and dataset fingerprint: one sorted `key: value` block."""
    versions = environment_versions(d.device)
    # Knob names win: a derived value that shares a knob's name is logged as resolved_<name>.
    knobs = {k.lower(): v for k, v in h.knob_values().items()}
    info = {**knobs, **{(f"resolved_{k}" if k in knobs else k): v for k, v in versions.items()},
            **{f"dataset_{k}": v for k, v in fingerprint.items()},
            "world_size": d.world_size, "resolved_grad_accum_steps": h.accum_steps,
            "resolved_attn_backend": backend, "code_sha256": hashlib.sha256(code).hexdigest(),
            "resolved_doc_attention": doc_attention_kind(backend, d.device, h.compile) if h.doc_isolation else "off",
            "code_bytes": len(code), "config_hash": config_hash(h.knob_values())}
    for w in h.env_warnings:  # first: a misspelt knob changes what the config block below means
        warn(log, w)
    log("config:")
    for key in sorted(info):
        log(f"  {key}: {info[key]}")
    if h.env_warnings:  # again below the block, whose ~160 lines scroll the first ones off the screen
        warn(log, "as above the config: " + "; ".join(h.env_warnings))
    if backend == "sdpa" and d.device.type == "cuda" and torch.cuda.get_device_capability(d.device)[0] == 9:
        warn(log, "Hopper GPU without FlashAttention 3 or 4 (flash_attn_interface / flash_attn.cute): attention "
                  "runs on PyTorch SDPA, ~15-20% fewer steps in 600 s. See README 'FlashAttention'.", banner=True)
    return versions

def log_model(h: Hyperparameters, model: GPT, opt: Optimizers, log: Logger) -> None:
    log(f"model_params:{sum(p.numel() for p in model.parameters())}")
    log(format_kv(layers="plain") + " " + model.layout_summary())
    if h.num_loops:
        model.set_looping(True)
        log(format_kv(layers="looped") + " " + model.layout_summary())
        model.set_looping(False)
    for group, count in opt.group_counts().items():
        optim, lr_knob, wd_knob = PARAM_GROUPS[group]
        log(format_kv(param_group=group, optimizer=optim, params=count, lr=getattr(h, lr_knob),
                      lr_knob=lr_knob.upper(), wd=getattr(h, wd_knob), wd_knob=wd_knob.upper()))
    for name, group, numel in opt.table:
        log(format_kv(param=name, group=group, numel=numel), console=False)

def default_run_id(preset: str) -> str:
    """<preset>_<UTC time to the microsecond>_<pid>: two runs started in the same second differ."""
    return f"{preset}_{datetime.datetime.now(datetime.timezone.utc):%Y%m%d_%H%M%S_%f}_{os.getpid()}"

def claim_outputs(h: Hyperparameters, d: DistInfo) -> RunFiles | None:
    """Rank 0 checks LOG_DIR and takes the RUN_ID (claim_run_files); every rank gets its answer."""
    if h.dry_run:
        return None
    files, error = None, None
    if d.is_main:
        try:
            files = claim_run_files(h)
        except ConfigError as exc:
            error = str(exc)
    files, error = broadcast_object((files, error))
    if error:
        raise ConfigError(error)
    return files

def stop_on_output_failure(rc: RunContext, failure: str | None, kept: Callable[[], str]) -> None:
    """When the log or the output `failure` names failed, every rank raises OutputError saying what was kept."""
    failure = rc.log.failure or failure
    if failure := broadcast_object(failure and f"{failure}; {kept()}"):
        raise OutputError(failure)

def failure_line(exc: BaseException) -> str:
    """Why a run stopped: the message of a failure main() maps to an exit code, else the type and first line."""
    if isinstance(exc, (ConfigError, ArtifactError, TrainingDiverged, OutputError, Terminated)):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (SIGINT)"
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"

def kept_weights(rc: RunContext, model: GPT, hessians: dict[str, Tensor] | None, steps: int) -> str:
    """An output failed before the artifact was written: what pgolf.recover kept, as a sentence."""
    recover = operations("recover")
    if recover is None:
        return f"the trained weights were not kept (no pgolf/ beside {Path(__file__).name})"
    return recover.keep_weights(sys.modules[__name__], rc, model, hessians, steps)

def kept_artifact(rc: RunContext) -> str:
    """The metrics failed: the artifact is there (pgolf.recover says how to score it again)."""
    recover = operations("recover")
    return recover.kept_artifact(rc) if recover else f"the artifact is kept in {rc.files.path('.ptz')}"

# ==== Distributed ====

@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    device: torch.device  # cuda:LOCAL_RANK or cpu

    @property
    def is_main(self) -> bool:
        return self.rank == 0

def setup_distributed(h: Hyperparameters) -> DistInfo:
    """Pick the device and, under torchrun, join the process group (NCCL on CUDA, gloo on CPU)."""
    use_cuda = h.device == "cuda" or (h.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("DEVICE='cuda' is not allowed: no CUDA device is available")
    device = torch.device("cuda", h.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        # fp32 matmuls (COMPUTE_DTYPE=fp32 runs, anything outside autocast) may use TF32, as the records do.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if h.world_size > 1:
        kwargs = {"device_id": device} if use_cuda else {}
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30), **kwargs)
    return DistInfo(h.rank, h.world_size, device)

def all_reduce_(t: Tensor, op: str = "sum") -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t

def synchronize(device: torch.device) -> None:  # so wallclock timings measure the queued GPU work
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()

def broadcast_object(obj: Any) -> Any:
    box = [obj]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]

def compute_autocast(device: torch.device, compute_dtype: str):
    use_bf16 = compute_dtype == "bf16" or (compute_dtype == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)

# ==== Data and BPB ====

# Challenge shard format (openai/parameter-golf's data/cached_challenge_fineweb.py): 256 int32, then uint16 tokens.
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
SHARD_TOKEN_DTYPE = np.dtype("<u2")
LEADING_SPACE = "\u2581"  # SentencePiece's word-boundary marker; counts as ONE byte (a space)
BOS_ID = 1  # the challenge recipe's bos id: every document starts with it (pad/bos/eos/unk = 0/1/2/3)

class DataError(ConfigError):
    """A bad shard or tokenizer file: the message names the file, what was expected and what was found."""

def read_shard_header(path: Path) -> int:
    """Validate a shard's header and size; return its token count."""
    size = os.path.getsize(path)
    if size < SHARD_HEADER_BYTES:
        raise DataError(f"{path}: truncated shard: {size} bytes, expected at least the {SHARD_HEADER_BYTES}-byte "
                        "header")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad shard magic: expected {SHARD_MAGIC}, found {header[0]}")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version: expected {SHARD_VERSION}, found {header[1]}")
    n = int(header[2])
    expected = SHARD_HEADER_BYTES + n * SHARD_TOKEN_DTYPE.itemsize
    if n < 0 or size != expected:
        raise DataError(f"{path}: shard size mismatch: header says {n} tokens = {expected} bytes, file has {size} "
                        "bytes")
    return n

def load_shard(path: Path) -> np.ndarray:
    """Memory-map a validated shard as uint16 tokens (pages are read on demand)."""
    n = read_shard_header(path)
    if n == 0:  # np.memmap refuses an empty mapping
        return np.zeros(0, dtype=SHARD_TOKEN_DTYPE)
    return np.memmap(path, dtype=SHARD_TOKEN_DTYPE, mode="r", offset=SHARD_HEADER_BYTES, shape=(n,))

def list_shards(dataset_dir: Path, split: str) -> list[Path]:
    pattern = f"fineweb_{split}_*.bin"
    # CaseOps byte sidecars (fineweb_val_bytes_*.bin, PR #1729) match the glob and would pass every token check.
    files = sorted(f for f in Path(dataset_dir).glob(pattern) if not f.name.startswith(f"fineweb_{split}_bytes_"))
    if not files:
        raise DataError(f"{Path(dataset_dir) / pattern}: no files match",
                        hint="set DATA_PATH or DATA_DIR; see data/README.md to download or build a dataset")
    return files

def check_token_range(tokens: np.ndarray, vocab_size: int, where: str, offset: int = 0) -> None:
    """Refuses ids >= vocab_size (openai/parameter-golf#1723); `offset` is tokens[0]'s position in the file."""
    flat = tokens.reshape(-1)
    if flat.size and int(flat.max()) >= vocab_size:
        bad = offset + int(np.argmax(flat >= vocab_size))
        raise DataError(f"{where}: token id {int(flat[bad - offset])} at token {bad} of the file (byte "
                        f"{SHARD_HEADER_BYTES + bad * SHARD_TOKEN_DTYPE.itemsize}) is >= VOCAB_SIZE={vocab_size}")

def load_validation_tokens(files: list[Path], seq_len: int, vocab_size: int, max_tokens: int = 0) -> np.ndarray:
    """The validation tokens (MAX_VAL_TOKENS: the first `max_tokens` targets), cut to whole sequences + 1 token."""
    parts = []
    for f in files:
        parts.append(np.asarray(load_shard(f)))
        check_token_range(parts[-1], vocab_size, str(f))
    tokens = np.concatenate(parts)[: max_tokens + 1 if max_tokens else None]
    usable = ((tokens.size - 1) // seq_len) * seq_len
    if usable <= 0:
        raise DataError(f"{files[0].parent}/fineweb_val_*.bin: validation split has {tokens.size} tokens, "
                        f"shorter than one sequence of EVAL_SEQ_LEN={seq_len} + 1")
    return np.ascontiguousarray(tokens[: usable + 1])

def dataset_fingerprint(train_files: list[Path], val_files: list[Path], tokenizer: Path) -> dict[str, Any]:
    return {"train_shards": len(train_files), "train_tokens": sum(read_shard_header(f) for f in train_files),
            "val_shards": len(val_files), "val_tokens_raw": sum(read_shard_header(f) for f in val_files),
            "val_sha256": sha256_file(*val_files), "tokenizer": str(tokenizer),
            "tokenizer_sha256": sha256_file(tokenizer)}

# The challenge's val split (first 50,000 documents of docs_selected.jsonl) in targets at 2048-token sequences, from
# the records' logs (sp1024: willdepueoai/parameter-golf; sp4096, sp8192: kevclark/parameter-golf; CaseOps: PR #1729).
CHALLENGE_VAL_DOCUMENTS = 50_000
CHALLENGE_SEQ_LEN = 2048
CHALLENGE_VAL_TARGETS = {1024: 62_021_632, 4096: 45_508_608, 8192: 40_540_160}
CHALLENGE_CASEOPS_VAL_TARGETS = {8192: 47_851_520}  # romeerp/parameter-golf-caseops-v1 (PR #1729)
CASEOPS_TRANSFORM = "lossless_caps_caseops_v1"
NO_MANIFEST = {"manifest": None, "manifest_sha256": None, "manifest_tokenizer_sha256": None, "text_transform": None}

def challenge_split(vocab_size: int, val_tokens_raw: int, documents: int, max_val_tokens: int,
                    caseops: bool = False) -> tuple[bool, str]:
    """Whether the scored stream is the challenge's validation split: (reportable, why)."""
    if max_val_tokens:
        return False, f"MAX_VAL_TOKENS={max_val_tokens}: a prefix of the validation split"
    expected = (CHALLENGE_CASEOPS_VAL_TARGETS if caseops else CHALLENGE_VAL_TARGETS).get(vocab_size)
    if expected is None:
        return False, f"no published challenge validation split for VOCAB_SIZE={vocab_size}"
    targets = (val_tokens_raw - 1) // CHALLENGE_SEQ_LEN * CHALLENGE_SEQ_LEN
    docs = CHALLENGE_VAL_DOCUMENTS
    if (documents, targets) != (docs, expected):
        return False, (f"not the challenge's validation split: {documents:,} documents and {targets:,} targets at "
                       f"{CHALLENGE_SEQ_LEN}, the sp{vocab_size} split has {docs:,} and {expected:,}")
    return True, f"the challenge's sp{vocab_size} validation split ({docs:,} documents, {expected:,} targets)"

class TrainLoader:
    """Prefetched batches, cu_seqlens: a seeded window order per epoch, world-size free, or `packed` (PR #1855)."""

    PREFETCH = 4  # batches the producer thread keeps ready

    def __init__(self, files: list[Path], seq_len: int, micro_seqs: int, accum: int, seed: int, vocab_size: int,
                 d: DistInfo, packed: bool = False):
        self.files = list(files)
        self.shards = [load_shard(f) for f in self.files]
        self._first_bos = [int(np.argmax(s == BOS_ID)) if packed else 0 for s in self.shards]
        self.seq_len, self.micro_seqs, self.accum, self.packed = seq_len, micro_seqs, accum, packed
        self.rank, self.world_size, self.seed, self.vocab_size = d.rank, d.world_size, seed, vocab_size
        self.global_seqs = micro_seqs * accum * d.world_size
        self.device = device = d.device
        self.wait_seconds = 0.0
        self.span = micro_seqs * seq_len + 1  # packed: one micro-batch's tokens and the target after them
        # (n_windows, seq_len+1) strided views: indexing the first axis copies each window as one contiguous row.
        self._windows = [np.lib.stride_tricks.sliding_window_view(s, seq_len + 1) if s.size > seq_len else None
                         for s in self.shards]
        pin = device.type == "cuda"
        # Ring of preallocated (pinned on CUDA) buffers: queue depth + one being filled + one in use + spare.
        shape = (self.span,) if packed else (micro_seqs, seq_len + 1)
        self._buffers = [torch.empty(shape, dtype=torch.int64, pin_memory=pin) for _ in range(self.PREFETCH + 3)]
        self._copied = [None] * len(self._buffers)  # CUDA events: host buffer free for reuse
        self._cu: list[Tensor | None] = [None] * len(self._buffers)  # each buffer's cu_seqlens
        self._queue: queue.Queue = queue.Queue(maxsize=self.PREFETCH)
        self._stop = threading.Event()
        if packed and all(s.size - b < self.span * d.world_size for s, b in zip(self.shards, self._first_bos)):
            raise DataError(f"{self.files[0].parent}/fineweb_train_*.bin: no shard holds one micro-step of every rank "
                            f"from its first BOS ({d.world_size} x {self.span} tokens) for DOC_PACKED_LOADER=1")
        total = sum(self._slot_count(s.size, b if packed else self._max_phase(s.size))  # worst-case phases
                    for s, b in zip(self.shards, self._first_bos))
        if total < self.global_seqs:
            raise DataError(f"{self.files[0].parent}/fineweb_train_*.bin: only {total} training sequences of "
                            f"TRAIN_SEQ_LEN+1={seq_len + 1} tokens, need at least {self.global_seqs} per step")
        self._thread = threading.Thread(target=self._produce, name="train-loader", daemon=True)
        self._thread.start()

    def _max_phase(self, n_tokens: int) -> int:
        return self.seq_len - 1 if n_tokens > 2 * self.seq_len + 1 else 0  # tiny shards keep phase 0

    def _slot_count(self, n_tokens: int, phase: int) -> int:
        return max(0, (n_tokens - 1 - phase) // self.seq_len)

    def _epoch_slots(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        shard_ids, starts = [], []
        for i, tokens in enumerate(self.shards):
            phase = int(rng.integers(self._max_phase(tokens.size) + 1))
            count = self._slot_count(tokens.size, phase)
            shard_ids.append(np.full(count, i, dtype=np.int32))
            starts.append(phase + np.arange(count, dtype=np.int64) * self.seq_len)
        order = rng.permutation(sum(len(s) for s in starts))
        return np.concatenate(shard_ids)[order], np.concatenate(starts)[order]

    def _fill(self, out: np.ndarray, shard_ids: np.ndarray, starts: np.ndarray) -> None:
        for sid in np.unique(shard_ids):  # one fancy-index per shard present in the chunk
            rows = np.flatnonzero(shard_ids == sid)
            block = self._windows[sid][starts[rows]]
            if block.size and int(block.max()) >= self.vocab_size:  # name the token's place in the file
                r = int(np.argmax((block >= self.vocab_size).any(axis=1)))
                check_token_range(block[r], self.vocab_size, str(self.files[sid]), offset=int(starts[rows[r]]))
            out[rows] = block

    def _put(self, ring: int, cu: np.ndarray) -> None:
        cu = torch.from_numpy(cu)
        self._cu[ring] = cu.pin_memory() if self.device.type == "cuda" else cu
        while not self._stop.is_set():
            try:
                self._queue.put(ring, timeout=0.1)
                return
            except queue.Full:
                continue

    def _produce_packed(self) -> None:
        shard, cursor, ring = 0, self._first_bos[0], 0
        while not self._stop.is_set():
            while cursor + self.span * self.world_size > self.shards[shard].size:
                shard = (shard + 1) % len(self.shards)
                cursor = self._first_bos[shard]
            lo = cursor + self.rank * self.span
            block = self.shards[shard][lo: lo + self.span]
            if int(block.max()) >= self.vocab_size:
                check_token_range(block, self.vocab_size, str(self.files[shard]), offset=lo)
            if self._copied[ring] is not None:
                self._copied[ring].synchronize()
            self._buffers[ring].numpy()[:] = block
            self._put(ring, packed_cu_seqlens(block[:-1], BOS_ID, self.seq_len))
            ring = (ring + 1) % len(self._buffers)
            cursor += self.span * self.world_size

    def _produce(self) -> None:
        try:
            if self.packed:
                return self._produce_packed()
            epoch, pos, ring = 0, 0, 0
            shard_ids, starts = self._epoch_slots(epoch)
            while not self._stop.is_set():
                if pos + self.global_seqs > len(starts):  # __init__'s worst-case count guarantees one step
                    epoch, pos = epoch + 1, 0
                    shard_ids, starts = self._epoch_slots(epoch)
                for m in range(self.accum):
                    lo = pos + (self.rank * self.accum + m) * self.micro_seqs
                    if self._copied[ring] is not None:
                        self._copied[ring].synchronize()
                    self._fill(self._buffers[ring].numpy(), shard_ids[lo: lo + self.micro_seqs],
                               starts[lo: lo + self.micro_seqs])
                    self._put(ring, host_cu_seqlens(self._buffers[ring].numpy()[:, :-1], BOS_ID))
                    ring = (ring + 1) % len(self._buffers)
                pos += self.global_seqs
        except BaseException as exc:  # surfaced to the training loop by next_batch()
            self._queue.put(exc)

    def next_batch(self) -> tuple[Tensor, Tensor, Tensor]:
        """(inputs, targets, cu_seqlens) on the device; (micro_seqs, seq_len) each, packed (1, micro_seqs * seq_len)."""
        t0 = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - t0
        if isinstance(item, BaseException):
            self._queue.put(item)  # the producer has stopped: every later call raises it too, never blocks
            raise item
        buf, cu = self._buffers[item], self._cu[item]
        if self.device.type == "cuda":
            batch = buf.to(self.device, non_blocking=True)
            cu = cu.to(self.device, non_blocking=True)
            self._copied[item] = torch.cuda.Event()
            self._copied[item].record()
        else:  # a copy, as the slot is refilled later (numpy's is single-threaded; torch's clone stalls on a busy core)
            batch = torch.from_numpy(buf.numpy().copy())
        batch = batch[None] if self.packed else batch
        return batch[:, :-1], batch[:, 1:], cu

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

@dataclass(frozen=True)
class ByteLUTs:
    """Per-token UTF-8 byte counts for BPB (the rule of every record since the naive baseline)."""

    base_bytes: Tensor  # int64 [V]: bytes of the piece without its leading '▁'
    has_leading_space: Tensor  # bool [V]: piece starts with '▁' (one space byte, unless after a boundary)
    is_boundary: Tensor  # bool [V]: control/unknown tokens (BOS...): 0 bytes, and no space after them

    def to(self, device: torch.device) -> "ByteLUTs":
        return ByteLUTs(self.base_bytes.to(device), self.has_leading_space.to(device), self.is_boundary.to(device))

def load_tokenizer(path: Path, vocab_size: int):
    import sentencepiece as spm
    if not os.path.isfile(path):
        raise DataError(f"{path}: tokenizer file not found (set TOKENIZER_PATH or DATA_DIR)")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:
        raise DataError(f"{path}: not a readable SentencePiece model ({str(exc).splitlines()[0][:120]})") from None
    if sp.vocab_size() != vocab_size:
        raise DataError(f"{path}: tokenizer vocab_size={sp.vocab_size()} does not match VOCAB_SIZE={vocab_size}")
    if sp.bos_id() != BOS_ID:  # document boundaries (BPB, SmearGate) are found by this id
        raise DataError(f"{path}: tokenizer bos_id={sp.bos_id()}, expected {BOS_ID} (the challenge recipe)")
    return sp

def build_byte_luts(sp, path: Path | str = "tokenizer") -> ByteLUTs:
    """Byte tables of a SentencePiece model; refuses one without a '▁' piece (openai/parameter-golf#897)."""
    if sp.piece_to_id(LEADING_SPACE) == sp.unk_id():
        raise DataError(f"{path}: tokenizer has no standalone '\u2581' piece; its byte counts would be wrong "
                        "(openai/parameter-golf#897)")
    V = sp.vocab_size()
    base, space, boundary = np.zeros(V, dtype=np.int16), np.zeros(V, dtype=bool), np.zeros(V, dtype=bool)
    for i in range(V):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            boundary[i] = True
        elif sp.is_byte(i):
            base[i] = 1  # <0xNN> byte-fallback piece = exactly one byte of the document
        else:
            try:
                piece = sp.id_to_piece(i)
            except UnicodeDecodeError:
                raise DataError(f"{path}: piece {i} is not UTF-8: a damaged tokenizer file; fetch or build it "
                                "again") from None
            space[i] = piece.startswith(LEADING_SPACE)
            base[i] = len(piece.removeprefix(LEADING_SPACE).encode("utf-8"))
    return ByteLUTs(torch.from_numpy(base).long(), torch.from_numpy(space), torch.from_numpy(boundary))

def count_target_bytes(prev_ids: Tensor, target_ids: Tensor, luts: ByteLUTs) -> Tensor:
    """Each target's bytes: its piece's, +1 for its '▁' unless after a boundary (BOS). Every evaluation uses it."""
    extra = luts.has_leading_space[target_ids] & ~luts.is_boundary[prev_ids]
    return luts.base_bytes[target_ids].to(torch.int64) + extra.to(torch.int64)

def document_spans(tokens: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each document's tokens after its BOS; a leading fragment without a BOS is no document."""
    starts = np.flatnonzero(tokens == BOS_ID)
    ends = np.append(starts[1:], tokens.size)
    return [(int(s) + 1, int(e)) for s, e in zip(starts, ends)]

@dataclass(frozen=True)
class BPBCheck:
    documents: int  # documents (BOS-delimited) in the scored stream
    checked: int  # documents whose byte count was checked against the decoded text
    targets: int  # targets the evaluation must score, each exactly once
    bytes: int  # their bytes by the lookup tables (CaseOps: by the sidecar)
    unknown_tokens: int  # <unk> tokens in the checked documents (0 bytes each: no byte fallback)
    normalized: int = 0  # CaseOps: checked documents whose decoded text the tokenizer's normalization changed

SELF_CHECK_CHUNK = 1 << 22  # targets per slice when totalling the validation bytes
# SentencePiece's normalization (NFKC, single spaces) moves a CaseOps document's bytes by <= 1.35% on FineWeb.
CASEOPS_CHECK_TOLERANCE = 0.02

def checked_documents(n_docs: int, max_docs: int | None) -> list[int]:
    if max_docs is None or max_docs >= n_docs:
        return list(range(n_docs))
    return sorted(set(np.linspace(0, n_docs - 1, max_docs).round().astype(int).tolist()))

def decoded_bytes(sp, ids: list[int], boundary: list[bool]) -> int:
    """UTF-8 bytes of the decoded document; control/unknown tokens stand for no text (an <unk> decodes to ' ⁇ ')."""
    total, piece = 0, []
    for i in ids + [-1]:
        if i < 0 or boundary[i]:
            total += len(sp.decode(piece).encode("utf-8")) if piece else 0
            piece = []
        else:
            piece.append(i)
    return total

def bpb_self_check(tokens: np.ndarray, sp, luts: ByteLUTs, max_docs: int | None, source: str = "validation",
                   sidecar: np.ndarray | None = None) -> BPBCheck:
    """Each checked document's bytes by the tables (CaseOps: `sidecar`) must be its decoded text's, else DataError."""
    boundary = luts.is_boundary.tolist()

    def target_bytes(lo: int, hi: int) -> Tensor:  # targets lo..hi-1 (target j is tokens[j + 1])
        t = torch.from_numpy(tokens[lo: hi + 1].astype(np.int64))
        return count_target_bytes(t[:-1], t[1:], luts)

    n_targets = tokens.size - 1
    if sidecar is not None:
        total_bytes = int(sidecar[1:].sum())
    else:  # in slices, to keep memory small on the full split
        total_bytes = sum(int(target_bytes(lo, min(lo + SELF_CHECK_CHUNK, n_targets)).sum())
                          for lo in range(0, n_targets, SELF_CHECK_CHUNK))
    spans = [(s, e) for s, e in document_spans(tokens) if e > s]
    pick = checked_documents(len(spans), max_docs)
    unknown = normalized = 0
    for k in pick:
        s, e = spans[k]
        ids = tokens[s:e].tolist()
        unknown += sum(1 for i in ids if sp.is_unknown(i))
        if sidecar is not None:
            counted, ref = int(sidecar[s:e].sum()), len(caseops_decode(sp.decode(ids)).encode("utf-8"))
            normalized += counted != ref
            if abs(counted - ref) > CASEOPS_CHECK_TOLERANCE * max(counted, ref, 1):
                raise DataError(f"{source}: BPB self-check failed: document {k} (tokens {s}..{e}) has {counted} bytes "
                                f"by the byte sidecar but its decoded original text has {ref} (more than the "
                                f"tokenizer's normalization explains: {CASEOPS_CHECK_TOLERANCE:.0%})")
            continue
        doc_bytes = target_bytes(s - 1, e - 1)
        lut, ref = int(doc_bytes.sum()), decoded_bytes(sp, ids, boundary)
        if lut != ref:  # name the first token after which the running counts disagree
            j = next(j for j in range(1, len(ids) + 1)
                     if int(doc_bytes[:j].sum()) != decoded_bytes(sp, ids[:j], boundary))
            raise DataError(f"{source}: BPB self-check failed: document {k} (tokens {s}..{e}) has {lut} bytes by the "
                            f"lookup tables but {ref} decoded; first bad token at document position {j - 1}: id "
                            f"{ids[j - 1]} piece {sp.id_to_piece(ids[j - 1])!r}")
    return BPBCheck(len(spans), len(pick), n_targets, total_bytes, unknown, normalized)

# encode(decode(doc)) == doc held for all 900 test documents under each of 7 tokenizers, for 0-2.5% under another.
TOKENIZER_CHECK_MIN = 0.9  # of the checked documents must re-encode to themselves
TOKENIZER_CHECK_DOCS = 1000  # at most this many of the self-check's documents (~1-3 ms each)

@dataclass(frozen=True)
class ReencodeCheck:
    reencoded: int  # documents with encode(decode(document)) == document
    checked: int  # the self-check's documents but the last and those with control or <unk> ids
    seconds: float

def tokenizer_check(tokens: np.ndarray, sp, boundary: np.ndarray, max_docs: int | None, tokenizer: Path,
                    source: str) -> ReencodeCheck:
    """TOKENIZER_CHECK_MIN of the documents must re-encode to themselves, or DataError names both and the count."""
    t0 = time.perf_counter()
    spans = [(s, e) for s, e in document_spans(tokens) if e > s][:-1]  # the last may be cut short
    pick = checked_documents(len(spans), min(max_docs or TOKENIZER_CHECK_DOCS, TOKENIZER_CHECK_DOCS))
    docs = [d.tolist() for d in (tokens[spans[k][0]:spans[k][1]] for k in pick)
            if not boundary[d].any()]  # an <unk> decodes to ' ⁇ ', not to the text it stands for
    same = sum(a == b for a, b in zip(sp.encode(sp.decode(docs)), docs))
    if same < TOKENIZER_CHECK_MIN * len(docs):
        raise DataError(f"TOKENIZER_PATH={tokenizer} is not the tokenizer of {source}: re-encoding their decoded text "
                        f"gives {same} of {len(docs)} validation documents back (at least {TOKENIZER_CHECK_MIN:.0%} "
                        f"needed)", hint="the byte counts would be wrong; set TOKENIZER_PATH to the tokenizer the "
                        "shards were made with")
    return ReencodeCheck(same, len(docs), time.perf_counter() - t0)

def load_byte_sidecar(val_files: list[Path], tokens: np.ndarray) -> np.ndarray:
    """CASEOPS_ENABLED: each val token's original-text bytes, from PR #1729's fineweb_val_bytes_*.bin sidecars."""
    parts = []
    for f in val_files:
        side = f.with_name(f.name.replace("fineweb_val_", "fineweb_val_bytes_", 1))
        if not side.is_file():
            raise DataError(f"{side}: missing", hint="CASEOPS_ENABLED=1 (the record's default) counts bytes from "
                            "the sidecar beside each validation shard (data/README.md, CaseOps); CASEOPS_ENABLED=0 "
                            "for plain shards")
        part, n = load_shard(side), read_shard_header(f)
        if part.size != n:
            raise DataError(f"{side}: {part.size} byte counts for the {n} tokens of {f.name}: not its sidecar")
        parts.append(part)
    sidecar = np.concatenate(parts)[: tokens.size].astype(np.int32)  # on the device: 4 bytes a token, not 8
    bad = np.flatnonzero((tokens == BOS_ID) & (sidecar != 0))
    if bad.size:
        raise DataError(f"{val_files[0].parent}/fineweb_val_bytes_*.bin: {int(sidecar[bad[0]])} bytes at BOS token "
                        f"{int(bad[0])} (a BOS stands for no text): the sidecars do not match the shards")
    return sidecar

CASEOPS_TITLE, CASEOPS_ALLCAPS, CASEOPS_CAPNEXT, CASEOPS_ESC = "\ue001", "\ue002", "\ue003", "\ue004"

def caseops_decode(text: str) -> str:
    """The original text of a lossless_caps_caseops_v1 string (PR #1729; data/caseops.py has the transform)."""
    def word(m: re.Match) -> str:
        escaped, mode, body = m.groups()
        if escaped is not None:
            return escaped
        if mode == CASEOPS_ALLCAPS:
            return body.replace(CASEOPS_CAPNEXT, "").upper()
        body = re.sub(f"{CASEOPS_CAPNEXT}([A-Za-z])", lambda c: c.group(1).upper(), body)
        return body[0].upper() + body[1:] if mode == CASEOPS_TITLE else body

    pattern = f"{CASEOPS_ESC}(.)|([{CASEOPS_TITLE}{CASEOPS_ALLCAPS}]?)((?:{CASEOPS_CAPNEXT}?[A-Za-z])+)"
    return re.sub(pattern, word, text, flags=re.DOTALL)

def sliding_windows(n_targets: int, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Window starts and first scored offsets: each target once, with >= seq_len - stride context where it can."""
    if n_targets < seq_len:
        raise ValueError(f"{n_targets} targets are fewer than one window of {seq_len}")
    starts = list(range(0, n_targets - seq_len + 1, stride))
    if starts[-1] + seq_len < n_targets:
        starts.append(n_targets - seq_len)
    first = [0] + [prev + seq_len - cur for prev, cur in zip(starts, starts[1:])]
    return np.asarray(starts, dtype=np.int64), np.asarray(first, dtype=np.int64)

def bpb_from_sums(nats: float, tokens: float, n_bytes: float) -> float:
    return (nats / tokens) / math.log(2.0) * (tokens / n_bytes)

@dataclass
class DataBundle:
    train_files: list[Path]
    val_tokens: np.ndarray
    sidecar: np.ndarray | None  # CASEOPS_ENABLED: the validation tokens' original bytes
    luts: ByteLUTs
    fingerprint: dict[str, Any]  # shard counts, hashes, the manifest and the tokenizer it records
    check: BPBCheck
    reportable: bool  # only the challenge's whole validation split
    reportable_reason: str
    reencode: ReencodeCheck  # the tokenizer reproduces the validation shards
    shards: dict[str, Any] | str | None  # sha256s against the manifest's: None = none listed, "unchecked"

def prepare_data(h: Hyperparameters, d: DistInfo, log: Logger) -> DataBundle:
    """Tokenizer, byte tables, shard lists and the validation split, all checked before training."""
    tg = sys.modules[__name__]  # the running module, as pgolf's functions take it
    if h.sample_data:  # pgolf.sample builds it on first use (data/make_sample.py writes through pgolf/)
        sample = operations("sample")
        if sample is None:
            raise DataError(f"{Path(__file__).resolve().parent / 'pgolf'}: not found; SAMPLE_DATA=1 needs the "
                            f"repository's data/make_sample.py and pgolf/ beside {Path(__file__).name}")
        sample.ensure(tg, h, d, log)
    sp = load_tokenizer(h.tokenizer_file, h.vocab_size)
    byte_luts = build_byte_luts(sp, h.tokenizer_file)
    luts = byte_luts.to(d.device)
    train_files, val_files = list_shards(h.dataset_dir, "train"), list_shards(h.dataset_dir, "val")
    fingerprint = dataset_fingerprint(train_files, val_files, h.tokenizer_file)
    provenance = operations("provenance")  # the manifest beside the shards, its sha256s (not in a shipped copy)
    identity, shards = NO_MANIFEST, "unchecked"
    if provenance is not None:
        identity = provenance.dataset_identity(tg, h.dataset_dir, h.tokenizer_file, fingerprint["tokenizer_sha256"])
        shards = provenance.verify_shards(tg, h.dataset_dir, d.rank, d.world_size)
    fingerprint.update(identity)
    check_transform(h, fingerprint["text_transform"], fingerprint["manifest"])
    val_tokens = load_validation_tokens(val_files, h.eval_seq_len, h.vocab_size, h.max_val_tokens)
    fingerprint["val_tokens"] = int(val_tokens.size - 1)  # scored targets after truncation
    max_docs = None if h.bpb_check_docs == "all" else int(h.bpb_check_docs)
    source = str(h.dataset_dir / "fineweb_val_*.bin")
    sidecar = load_byte_sidecar(val_files, val_tokens) if h.caseops_enabled else None
    reencode = tokenizer_check(val_tokens, sp, byte_luts.is_boundary.numpy(), max_docs, h.tokenizer_file, source)
    check = bpb_self_check(val_tokens, sp, byte_luts, max_docs, source, sidecar)
    reportable, reason = challenge_split(h.vocab_size, fingerprint["val_tokens_raw"], check.documents, h.max_val_tokens,
                                         h.caseops_enabled)
    accounting = "caseops_sidecar" if h.caseops_enabled else "tokenizer_luts"
    fingerprint.update(val_documents=check.documents, byte_accounting=accounting, challenge_split=reportable)
    return DataBundle(train_files, val_tokens, sidecar, luts, fingerprint, check, reportable, reason, reencode, shards)

def check_transform(h: Hyperparameters, transform: str | None, manifest: str | None) -> None:
    """CASEOPS_ENABLED must match the manifest's text transform (or sidecars), or the wrong text's bytes are counted."""
    sidecars = sorted(h.dataset_dir.glob("fineweb_val_bytes_*.bin"))
    if (transform == CASEOPS_TRANSFORM or sidecars) and not h.caseops_enabled:
        what = (f"{manifest}: text_transform {transform}" if transform == CASEOPS_TRANSFORM
                else f"{sidecars[0]}: a byte sidecar")
        raise DataError(f"{what}: CASEOPS_ENABLED=0 is not allowed for these shards",
                        hint="CaseOps data: set CASEOPS_ENABLED=1 to count bytes from the sidecar")
    if h.caseops_enabled and transform not in (None, CASEOPS_TRANSFORM):
        raise DataError(f"{manifest}: text_transform {transform}: CASEOPS_ENABLED=1 is not allowed for these "
                        f"shards (they are not CaseOps)")

def log_data_checks(h: Hyperparameters, data: DataBundle, log: Logger) -> None:
    c = data.check
    rule = (f"sidecar bytes == UTF-8 bytes of the decoded documents with CaseOps inverted (within "
            f"{CASEOPS_CHECK_TOLERANCE:.0%} where the tokenizer normalized the text: {c.normalized} documents)"
            if h.caseops_enabled else "lookup-table bytes == UTF-8 bytes of the decoded documents")
    log(format_kv(bpb_self_check="ok", documents_checked=f"{c.checked}/{c.documents}", val_documents=c.documents,
                  val_targets=c.targets, val_bytes=c.bytes, unknown_tokens=c.unknown_tokens,
                  byte_accounting=data.fingerprint["byte_accounting"], rule=rule))
    r = data.reencode
    log(format_kv(tokenizer_check="ok" if r.checked else "unchecked", reencoded=f"{r.reencoded}/{r.checked}",
                  seconds=f"{r.seconds:.2f}",
                  rule=f"encode(decode(document))==document for >={TOKENIZER_CHECK_MIN:.0%}"))
    s, fp = data.shards, data.fingerprint
    log(format_kv(shard_hashes="ok", **s) if isinstance(s, dict)
        else f"shard_hashes:{s or 'unverified (no per-file hashes)'}")
    if isinstance(s, dict) and s["verified"] < s["shards"]:
        warn(log, f"{s['shards'] - s['verified']} of {s['shards']} shards in {h.dataset_dir} have no sha256 in "
                  f"{fp['manifest']}: not verified")
    log(format_kv(dataset=h.dataset_dir, manifest=fp["manifest"] or s or "none",
                  tokenizer_sha256=fp["tokenizer_sha256"], manifest_tokenizer_sha256=fp["manifest_tokenizer_sha256"]
                  or "none", reportable="yes" if data.reportable else "no", reason=data.reportable_reason))
    if fp["manifest"] is None:
        what = (f"pgolf/ is not beside this script: the shards in {h.dataset_dir} are not checked against a manifest"
                if s == "unchecked" else f"no manifest.json or download.json beside the shards in {h.dataset_dir}: "
                "their hashes are unchecked")
        warn(log, f"{what}, and only the re-encode check ties them to the tokenizer {h.tokenizer_file}")
    if not data.reportable:
        warn(log, f"this run is NOT reportable: {data.reportable_reason}")

# ==== Model ====

FLASH_MODULES = {"fa3": "flash_attn_interface", "fa4": "flash_attn.cute"}  # FlashAttention 3, flash-attn-4
CU_BUCKET = 64  # cu_seqlens are padded to a multiple of this (zero-length sequences at the end; PR #1855)
# The custom ops, built once per process; not functools.cache, which dynamo would trace into the builder.
_CUSTOM_OPS: dict[str, Callable] = {}
ORTHO_INIT_SUFFIXES = (".attn.c_q.weight", ".attn.c_k.weight", ".attn.c_v.weight", ".mlp.fc.weight")  # input side
Adapter = tuple[Tensor, Tensor, float]  # TTT LoRA: A (D, r, in), B (D, out, r), output scale; a row per document

def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except Exception:  # a dotted name's parent package is missing, or fails to import (flash_attn of FA2)
        return False

def select_attention_backend(setting: str, device: torch.device) -> tuple[str, list[str]]:
    """ATTN_BACKEND for this device (auto: FA3, else FA4, else SDPA) and a note per installed kernel passed over."""
    cuda = device.type == "cuda"
    if setting == "sdpa" or (setting == "auto" and not cuda):
        return "sdpa", []
    notes = []
    for backend in (setting,) if setting != "auto" else ("fa3", "fa4"):
        if setting == "auto" and not importable(FLASH_MODULES[backend]):
            continue  # not installed: nothing to report
        why = None
        try:  # being found is not enough: a wheel built for another torch fails to load its extension
            importlib.import_module(FLASH_MODULES[backend])
        except Exception as exc:  # ImportError, OSError of a missing library, or whatever the module raises
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        if why is None and backend == "fa4" and cuda and torch.cuda.get_device_capability(device)[0] not in (9, 10, 11):
            why = "needs a GPU of compute capability 9-11"  # the majors FA4's CuTe kernels support
        if why is None:
            return backend, notes
        if setting != "auto":
            raise ConfigError(f"ATTN_BACKEND={setting!r} is not allowed here: {FLASH_MODULES[backend]} {why}",
                              hint="use auto or sdpa")
        notes.append(f"{backend} ({FLASH_MODULES[backend]}) is installed but not used: {why}")
    return "sdpa", notes

def fa4_attention() -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """flash-attn-4 causal attention (B, T, H, D) as a custom op: FA4's autograd.Function is untraceable by dynamo."""
    if "fa4" in _CUSTOM_OPS:
        return _CUSTOM_OPS["fa4"]
    from flash_attn.cute import interface as fa4

    @torch.library.custom_op("pgolf::fa4_fwd", mutates_args=())
    def fwd(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # flash-attn-4 >= 4.0.0b19 returns (out, lse, p, row_max); earlier betas (out, lse).
        return tuple(fa4._flash_attn_fwd(q, k, v, causal=True, return_lse=True)[:2])

    @fwd.register_fake
    def _(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        B, T, H, _ = q.shape
        return torch.empty_like(q), q.new_empty((B, H, T), dtype=torch.float32)

    @torch.library.custom_op("pgolf::fa4_bwd", mutates_args=())
    def bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(fa4._flash_attn_bwd(q, k, v, out, dout, lse, None, True, 0.0)[:3])

    @bwd.register_fake
    def _(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs, *output)

    def backward(ctx, dout: Tensor, _dlse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, out, lse = ctx.saved_tensors
        return bwd(dout.contiguous(), q, k, v, out, lse)
    fwd.register_autograd(backward, setup_context=setup_context)
    _CUSTOM_OPS["fa4"] = lambda q, k, v: fwd(q, k, v)[0]
    return _CUSTOM_OPS["fa4"]

def doc_attention_kind(backend: str, device: torch.device, compiled: bool) -> str:
    """DOC_ISOLATION's attention: FA3 varlen; compiled on CUDA FlexAttention (eager has no CPU backward); else SDPA."""
    if backend == "fa3":
        return "fa3_varlen"
    return "flex_block_mask" if device.type == "cuda" and compiled else "sdpa_document_mask"

class Documents(NamedTuple):  # DOC_ISOLATION for one forward, in the form its attention kernel takes
    kind: str
    max_len: int  # no sequence is longer (FA3's max_seqlen; the RoPE span)
    cu_q: Tensor | None = None  # fa3_varlen: int32 cu_seqlens over the flattened batch
    cu_k: Tensor | None = None  # a copy of cu_q: dynamo refuses one tensor passed twice to an autograd.Function
    mask: Any = None  # flex_block_mask: a BlockMask; sdpa_document_mask: (B, 1, T, T) bool

def document_ids(ids: Tensor, bos_id: int, cu_seqlens: Tensor | None = None) -> Tensor:
    """(B, T) sequence index of each token, from cu_seqlens over the flattened batch, else row starts and BOS."""
    if cu_seqlens is None:
        return (ids == bos_id).cumsum(1)
    flat = torch.arange(ids.numel(), device=ids.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, flat, right=True).view(ids.shape)

def document_mask(segment: Tensor) -> Tensor:
    """(B, 1, T, T) bool: query t sees keys s <= t of its own sequence (SDPA's form of FA3's varlen call)."""
    causal = torch.ones(segment.size(1), segment.size(1), dtype=torch.bool, device=segment.device).tril()
    return ((segment[:, :, None] == segment[:, None, :]) & causal).unsqueeze(1)

def document_block_mask(segment: Tensor) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask
    B, T = segment.shape
    return create_block_mask(lambda b, h, q, kv: (q >= kv) & (segment[b, q] == segment[b, kv]), B, None, T, T,
                             device=segment.device)

def document_starts(ids: Tensor, bos_id: int) -> Tensor:
    """cu_seqlens (int32) of the flattened batch: every row start and every BOS starts a sequence."""
    starts = ids == bos_id
    starts[:, 0] = True
    flat = starts.flatten().nonzero().flatten()
    return torch.cat((flat, flat.new_tensor([ids.numel()]))).int()

def host_cu_seqlens(inputs: np.ndarray, bos_id: int) -> np.ndarray:
    """document_starts in the loader's thread (no device-to-host wait), padded with the total to CU_BUCKET."""
    starts = inputs == bos_id
    starts[:, 0] = True
    flat = np.flatnonzero(starts)
    return np.pad(flat, (0, -(flat.size + 1) % CU_BUCKET + 1), constant_values=inputs.size).astype(np.int32)

def packed_cu_seqlens(inputs: np.ndarray, bos_id: int, max_len: int) -> np.ndarray:
    """host_cu_seqlens of a packed stream cut as PR #1855's loader: at BOS and every `max_len` tokens of a document."""
    n = inputs.size
    docs = np.union1d([0], np.flatnonzero(inputs == bos_id))
    counts = -(-np.diff(np.append(docs, n)) // max_len)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    starts = np.repeat(docs, counts) + (np.arange(first.size) - first) * max_len
    return np.pad(starts, (0, -(starts.size + 1) % CU_BUCKET + 1), constant_values=n).astype(np.int32)

def doc_cu_seqlens() -> Callable[[Tensor, int], Tensor]:
    """document_starts as a custom op of dynamic length (one graph for all layouts); it syncs: eval only (PR #1855)."""
    if "doc_cu" in _CUSTOM_OPS:
        return _CUSTOM_OPS["doc_cu"]

    @torch.library.custom_op("pgolf::doc_cu_seqlens", mutates_args=())
    def cu(ids: Tensor, bos_id: int) -> Tensor:
        return document_starts(ids, bos_id)

    @cu.register_fake
    def _(ids: Tensor, bos_id: int) -> Tensor:
        return ids.new_empty(torch.library.get_ctx().new_dynamic_size(min=2), dtype=torch.int32)
    _CUSTOM_OPS["doc_cu"] = cu
    return cu

@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    num_layers: int
    model_dim: int
    num_heads: int
    num_kv_heads: int
    mlp_mult: float
    tie_embeddings: bool
    tied_embed_init_std: float
    logit_softcap: float
    rope_base: float
    qk_gain_init: float
    # Defaults reproduce the baseline model, so a ModelConfig built by hand stays the naive baseline's shape.
    rope_dims: int = 0
    rope_train_seq_len: int = 1 << 30
    train_seq_len: int = 1 << 30  # the longest sequence of a packed training row (DOC_ISOLATION)
    mlp_act: str = "relu2"
    leaky_slope: float = 0.5
    ln_scale: bool = False
    ortho_init: bool = False
    xsa_last_n: int = 0
    skip_gates_enabled: bool = False
    smear_gate_enabled: bool = False
    gate_window: int = 12
    sparse_attn_gate_enabled: bool = False
    sparse_attn_gate_scale: float = 1.0
    num_loops: int = 0
    loop_start: int = 0
    loop_end: int = 0
    parallel_mode: str = "off"
    parallel_start_layer: int = 0
    bos_id: int = BOS_ID
    attn_backend: str = "sdpa"
    fused_ce_enabled: bool = False
    fused_mlp_enabled: bool = False
    doc_isolation: bool = False

    @classmethod
    def from_hparams(cls, h: Hyperparameters, attn_backend: str = "sdpa") -> "ModelConfig":
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("attn_backend", "bos_id")]
        return cls(**{n: getattr(h, n) for n in names}, attn_backend=attn_backend)

def layer_layout(num_layers: int, loop_start: int, loop_end: int, num_loops: int) -> list[int]:
    """Virtual layer order: loop_start..loop_end run num_loops more times (depth recurrence, PR #1204 -> #1493)."""
    if num_loops <= 0:
        return list(range(num_layers))
    span = list(range(loop_start, loop_end + 1))
    return list(range(loop_start)) + span * (num_loops + 1) + list(range(loop_end + 1, num_layers))

def parallel_tail_start(layout: list[int], start_layer: int, mode: str) -> int:
    """Where parallel lanes begin: the longest suffix of layers >= start_layer, never before the decoder half."""
    if mode == "off":
        return len(layout)
    i = len(layout)
    while i > 0 and layout[i - 1] >= start_layer:
        i -= 1
    return max(i, len(layout) // 2)

def rms_norm(x: Tensor) -> Tensor:
    # Parameter-free, as the naive baseline's. In x's dtype: torch 2.12's CUDA autocast runs it in fp32 (2.9 did not).
    with torch.autocast(x.device.type, enabled=False):
        return F.rms_norm(x, (x.size(-1),))

def rope_base_for(seq_len: int, base: float, rope_dims: int, train_seq_len: int) -> float:
    """NTK-aware base scaling past the training length (PR #265): base * (seq_len / train_seq_len) ** (d / (d - 2))."""
    return base if seq_len <= train_seq_len else base * (seq_len / train_seq_len) ** (rope_dims / (rope_dims - 2))

class Rotary(nn.Module):
    """RoPE angles of a head's first `rope_dims` dims, recomputed per forward (PR #1643's cache broke in inference)."""

    def __init__(self, rope_dims: int, base: float, train_seq_len: int):
        super().__init__()
        self.rope_dims, self.base, self.train_seq_len = rope_dims, base, train_seq_len
        self.register_buffer("exponents", torch.arange(0, rope_dims, 2, dtype=torch.float32) / rope_dims,
                             persistent=False)

    def forward(self, seq_len: int, device: torch.device, span: int | None = None) -> tuple[Tensor, Tensor]:
        """Angles of positions 0..seq_len-1, at the base for attention spans of up to `span` (seq_len) tokens."""
        base = rope_base_for(span or seq_len, self.base, self.rope_dims, self.train_seq_len)
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), base ** -self.exponents)
        return freqs.cos(), freqs.sin()

def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x (B, T, H, D): rotate the halves of the first 2*cos.size(-1) dims; the rest attend by content (partial RoPE).
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half: 2 * half], x[..., 2 * half:]
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)

class LoRASlot(NamedTuple):  # one virtual layer's TTT adapters
    q: Adapter
    k: Adapter
    v: Adapter
    o: Adapter
    mlp: Adapter

def lora_delta(x: Tensor, adapter: Adapter) -> Tensor:
    a, b, scale = adapter
    return scale * ((x @ a.transpose(1, 2).to(x.dtype)) @ b.transpose(1, 2).to(x.dtype))

class LoRAView(NamedTuple):  # TTT adapters for a batch of documents: a LoRASlot per virtual layer, the head's
    slots: list[LoRASlot]
    head: Adapter

class LayerAux(NamedTuple):  # a block's inputs beside x at one virtual layer
    docs: Documents | None = None
    lora: LoRASlot | None = None

def accumulate_hessian(H: Tensor | None, x: Tensor) -> None:
    """GPTQ calibration tap: H += x^T x over x's rows; on CUDA a bf16 GEMM to fp32 (twice TF32's rate)."""
    if H is None:
        return
    x = x.detach().reshape(-1, x.size(-1))
    if x.is_cuda and x.dtype == torch.bfloat16:
        H.add_(torch.mm(x.T, x, out_dtype=torch.float32))
    else:
        H.addmm_(x.T.float(), x.float())

class TappedLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.hessian: Tensor | None = None  # GPTQ's calibration tap of the input (collect_hessians)

    def forward(self, x: Tensor) -> Tensor:
        accumulate_hessian(self.hessian, x)
        return F.linear(x, self.weight)

class CausalSelfAttention(nn.Module):
    """GQA with per-head QK RMS-norm, a learned per-head query gain and RoPE; optional XSA and per-head gate."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.model_dim // cfg.num_heads
        kv_dim = self.kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = TappedLinear(cfg.model_dim, cfg.model_dim)
        self.c_k, self.c_v = TappedLinear(cfg.model_dim, kv_dim), TappedLinear(cfg.model_dim, kv_dim)
        self.proj = TappedLinear(cfg.model_dim, cfg.model_dim)
        nn.init.zeros_(self.proj.weight)  # each block starts as the identity on the residual stream
        # q_gain is an inverse temperature: with unit-RMS q and k the logit is gain*sqrt(D)*cos(q, k).
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init, dtype=torch.float32))
        self.use_xsa = layer_idx >= cfg.num_layers - cfg.xsa_last_n
        self.gate_window, self.gate_scale = cfg.gate_window, cfg.sparse_attn_gate_scale
        # Output gate sigmoid(scale * W x[:window]) per head; W = 0 gives 0.5 at init (PR #1787).
        self.attn_gate_w = (nn.Parameter(torch.zeros(cfg.num_heads, cfg.gate_window))
                            if cfg.sparse_attn_gate_enabled else None)
        self._flash = self._varlen = None  # fa3/fa4 on (B, T, H, D) in bf16; FA3's varlen call for DOC_ISOLATION
        if cfg.attn_backend == "fa3":
            from flash_attn_interface import flash_attn_func, flash_attn_varlen_func
            self._flash = functools.partial(flash_attn_func, causal=True)
            self._varlen = functools.partial(flash_attn_varlen_func, causal=True)
        elif cfg.attn_backend == "fa4":
            self._flash = fa4_attention()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, aux: "LayerAux" = None) -> Tensor:
        docs, lora = aux if aux is not None else (None, None)
        B, T, C = x.shape
        # One GEMM for q, k and v (their weights stay separate parameters); c_q's tap is the Hessian of all three.
        accumulate_hessian(self.c_q.hessian, x)
        w = torch.cat((self.c_q.weight, self.c_k.weight, self.c_v.weight))
        q, k, v = F.linear(x, w).split((C, self.kv_dim, self.kv_dim), dim=-1)
        if lora is not None:
            q, k, v = q + lora_delta(x, lora.q), k + lora_delta(x, lora.k), v + lora_delta(x, lora.v)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))  # (B, T, H, D)
        k, v = [t.unflatten(-1, (self.num_kv_heads, self.head_dim)) for t in (k, v)]
        q, k = apply_rotary(rms_norm(q), cos, sin), apply_rotary(rms_norm(k), cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        if docs is not None and docs.kind == "fa3_varlen":
            y = self._varlen(q.flatten(0, 1).bfloat16(), k.flatten(0, 1).bfloat16(), v.flatten(0, 1).bfloat16(),
                             docs.cu_q, docs.cu_k, docs.max_len, docs.max_len)
            y = (y[0] if isinstance(y, tuple) else y).view(B, T, self.num_heads, self.head_dim).to(x.dtype)
        elif docs is not None and docs.kind == "flex_block_mask":
            from torch.nn.attention.flex_attention import flex_attention
            y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=docs.mask,
                               enable_gqa=self.num_kv_heads != self.num_heads).transpose(1, 2)
        elif self._flash is not None and docs is None:
            y = self._flash(q.bfloat16(), k.bfloat16(), v.bfloat16())
            y = (y[0] if isinstance(y, tuple) else y).to(x.dtype)
        else:  # SDPA: causal, or under a document mask
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=None if docs is None else docs.mask, is_causal=docs is None,
                                               enable_gqa=self.num_kv_heads != self.num_heads).transpose(1, 2)
        if self.use_xsa:
            y = exclusive_self_attention(y, v)
        if self.attn_gate_w is not None:
            gate = torch.sigmoid(self.gate_scale * F.linear(x[..., : self.gate_window], self.attn_gate_w.to(x.dtype)))
            y = y * gate[..., None]  # (B, T, H, 1)
        out = self.proj(y.reshape(B, T, C))
        # TTT's O adapter reads the attention's input, as Q, K and V's do (PR #1855), not its output.
        return out if lora is None else out + lora_delta(x, lora.o)

def exclusive_self_attention(y: Tensor, v: Tensor) -> Tensor:
    """XSA (PR #265/#478): y (B, T, H, D) minus its component along the token's own value; GQA without repeating v."""
    B, T, H, D = y.shape
    yg = y.view(B, T, v.size(2), H // v.size(2), D)
    # F.normalize(v) (eps 1e-12) in v's dtype: autocast's F.normalize makes XSA fp32 (~2 GiB per micro-step).
    inv_norm = torch.rsqrt((v * v).sum(-1, keepdim=True, dtype=torch.float32).clamp_min(1e-12 ** 2))
    vn = (v * inv_norm.to(v.dtype)).unsqueeze(3)  # (B, T, Hkv, 1, D)
    return (yg - (yg * vn).sum(-1, keepdim=True) * vn).view(B, T, H, D)

class MLP(nn.Module):
    """relu(x)^2 MLP (the naive baseline) or leaky_relu(x, slope)^2, a gradient for x < 0 too (PR #549: -0.0021 BPB)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.model_dim * cfg.mlp_mult)
        self.fc, self.proj = TappedLinear(cfg.model_dim, hidden), TappedLinear(hidden, cfg.model_dim)
        nn.init.zeros_(self.proj.weight)
        self.slope = cfg.leaky_slope if cfg.mlp_act == "leaky_relu2" else 0.0
        self._fused = fused_leaky_relu2_mlp() if cfg.fused_mlp_enabled else None  # made here: see GPT.__init__

    def forward(self, x: Tensor, aux: "LayerAux" = None) -> Tensor:
        if self._fused is not None and self.fc.hessian is None:  # GPTQ calibration taps the unfused path
            out = self._fused(x, self.fc.weight.to(x.dtype), self.proj.weight.to(x.dtype), self.slope)
        else:
            h = self.fc(x)
            h = F.leaky_relu(h, self.slope) if self.slope else F.relu(h)
            out = self.proj(h * h)  # not h.square(): CUDA autocast runs pow in fp32; h * h stays bf16 (same bits)
        # TTT's MLP adapter runs beside the MLP, from its input (the hidden width would make A 4x larger).
        return out if aux is None or aux.lora is None else out + lora_delta(x, aux.lora.mlp)

class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.norm_scale = 1.0 / math.sqrt(layer_idx + 1) if cfg.ln_scale else 1.0  # layerwise LN scale (PR #315)
        self.attn, self.mlp = CausalSelfAttention(cfg, layer_idx), MLP(cfg)
        self.attn_scale, self.mlp_scale = (nn.Parameter(torch.ones(cfg.model_dim)) for _ in range(2))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(cfg.model_dim), torch.zeros(cfg.model_dim))))
        # Lanes: lane <- r * lane + p[sub-layer, lane] * sub-layer output; r starts at 1.1 as PR #1855's.
        self.lane_r = self.lane_p = None
        if cfg.parallel_mode == "lanes" and layer_idx >= cfg.parallel_start_layer:
            self.lane_r, self.lane_p = nn.Parameter(torch.full((2,), 1.1)), nn.Parameter(torch.ones(2, 2))

    def _mix(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        return mix[0] * x + mix[1] * x0

    def forward(self, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor, aux: "LayerAux" = None) -> Tensor:
        x = self._mix(x, x0)
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.norm_scale, cos, sin, aux)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.norm_scale, aux)

    def forward_lanes(self, l0: Tensor, l1: Tensor, x0: Tensor, cos: Tensor, sin: Tensor,
                      aux: "LayerAux" = None) -> tuple[Tensor, Tensor]:
        """PR #1855's lanes (PR #1530): attention reads lane 0 mixed with x0, the MLP reads lane 1 unmixed."""
        r, p = self.lane_r.to(l0.dtype), self.lane_p.to(l0.dtype)
        a = self.attn_scale.to(l0.dtype) * self.attn(rms_norm(self._mix(l0, x0)) * self.norm_scale, cos, sin, aux)
        m = self.mlp_scale.to(l0.dtype) * self.mlp(rms_norm(l1) * self.norm_scale, aux)
        return r[0] * l0 + p[0, 0] * a + p[1, 0] * m, r[1] * l1 + p[0, 1] * a + p[1, 1] * m

class SmearGate(nn.Module):
    """x_t += lam * sigmoid(w . x_t[:window]) * x_{t-1} (PR #1667), but not at BOS (PR #1851 BOS fix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.window, self.bos_id = cfg.gate_window, cfg.bos_id
        self.smear_w, self.smear_lambda = nn.Parameter(torch.zeros(cfg.gate_window)), nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))  # x_{t-1}; zeros at t = 0
        gate = torch.sigmoid(x[..., : self.window] @ self.smear_w.to(x.dtype)) * (ids != self.bos_id).to(x.dtype)
        return x + (self.smear_lambda.to(x.dtype) * gate)[..., None] * prev

class GPT(nn.Module):
    """Tied-embedding GPT with the naive baseline's U-Net skips from encoder to decoder half."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # Custom ops are defined here, never on a first call inside a compiled forward (dynamo refuses that).
        self._ce = fused_softcap_ce() if cfg.fused_ce_enabled else None
        self._doc_cu = doc_cu_seqlens() if cfg.doc_isolation and cfg.attn_backend == "fa3" else None
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        head_dim = cfg.model_dim // cfg.num_heads
        rope_dims = cfg.rope_dims if 0 < cfg.rope_dims < head_dim else head_dim
        self.rotary = Rotary(rope_dims, cfg.rope_base, cfg.rope_train_seq_len)
        # Both layouts exist from the start so turning looping on changes no parameter (or count).
        self.layouts = {False: layer_layout(cfg.num_layers, 0, 0, 0),
                        True: layer_layout(cfg.num_layers, cfg.loop_start, cfg.loop_end, cfg.num_loops)}
        self.looping = False
        self.parallel_from = {k: parallel_tail_start(v, cfg.parallel_start_layer, cfg.parallel_mode)
                              for k, v in self.layouts.items()}
        # The skip count follows the longest (looped) layout; the plain layout uses the first ones.
        num_skips = max(min(len(v) // 2, len(v) - len(v) // 2) for v in self.layouts.values())
        self.skip_weights = nn.Parameter(torch.ones(num_skips, cfg.model_dim))
        # Sigmoid skip gates (PR #1089): g = 0 starts at an even mix of the stream and the skip.
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, cfg.model_dim)) if cfg.skip_gates_enabled else None
        self.smear = SmearGate(cfg) if cfg.smear_gate_enabled else None
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.model_dim, cfg.vocab_size, bias=False)
        if self.lm_head is not None:
            nn.init.zeros_(self.lm_head.weight)
        self.head_hessian: Tensor | None = None  # calibration tap of the head's input (collect_hessians)
        if cfg.ortho_init:  # OrthoInit (PR #65): orthogonal block matrices >= 64x64; output projections stay zero
            for name, p in self.blocks.named_parameters():
                if name.endswith(ORTHO_INIT_SUFFIXES) and min(p.shape) >= 64:
                    nn.init.orthogonal_(p, gain=1.0)

    def hidden(self, ids: Tensor, lora: LoRAView | None = None, cu_seqlens: Tensor | None = None) -> Tensor:
        """Final-norm hidden states; `lora`: TTT's adapters, a row per document; `cu_seqlens`: host_cu_seqlens(ids)."""
        x = self.tok_emb(ids)
        if self.smear is not None:
            x = self.smear(x, ids)
        # A LoRA TTT row is one document from its start (or a window inside it): isolation changes nothing there.
        docs = self.documents(ids, cu_seqlens) if self.cfg.doc_isolation and lora is None else None
        x = rms_norm(x)
        if torch.is_autocast_enabled(x.device.type):
            # The stream in the autocast dtype, as PR #1394's .bfloat16() model (fp32 moves ~10% more bytes).
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x0 = x
        # RoPE is relative: a packed row (PR #1855) needs no NTK scaling for its length.
        cos, sin = self.rotary(ids.size(1), ids.device, ids.size(1) if docs is None else docs.max_len)
        layout = self.layouts[self.looping]
        num_encoder, parallel_from = len(layout) // 2, self.parallel_from[self.looping]
        skips, lanes = [], None
        for pos, layer in enumerate(layout):
            if pos == parallel_from:
                lanes = (x, x)  # PR #1855 splits before this layer's skip: lane 1 never receives one
            if pos >= num_encoder and skips:  # U-Net: decoder position i adds the i-th last encoder output
                x, lanes = self.merge_skip(pos - num_encoder, skips.pop(), x, lanes)
            aux = LayerAux(docs, None if lora is None else lora.slots[pos])
            if lanes is None:
                x = self.blocks[layer](x, x0, cos, sin, aux)
            else:
                lanes = self.blocks[layer].forward_lanes(lanes[0], lanes[1], x0, cos, sin, aux)
            if pos < num_encoder:
                skips.append(x)
        if lanes is not None:
            x = 0.5 * (lanes[0] + lanes[1])
        x = rms_norm(x)
        accumulate_hessian(self.head_hessian, x)  # the tied embedding is the LM head (PR #1394)
        return x

    def merge_skip(self, i: int, skip: Tensor, x: Tensor,
                   lanes: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """The i-th skip into the stream (lane 0 after the split, as PR #1855), added or sigmoid-gated (PR #1089)."""
        skip = self.skip_weights[i].to(x.dtype) * skip
        stream = x if lanes is None else lanes[0]
        gate = None if self.skip_gates is None else torch.sigmoid(self.skip_gates[i].to(x.dtype))
        stream = stream + skip if gate is None else torch.lerp(skip, stream, gate)
        return (stream, None) if lanes is None else (x, (stream, lanes[1]))

    def documents(self, ids: Tensor, cu_seqlens: Tensor | None = None) -> Documents:
        """DOC_ISOLATION's sequences (the loader's cu_seqlens, else row starts and BOS), for FA3 as PR #1530's."""
        kind = doc_attention_kind(self.cfg.attn_backend, ids.device, torch.compiler.is_compiling())
        max_len = ids.size(1) if cu_seqlens is None else min(ids.size(1), self.cfg.train_seq_len)
        if kind == "fa3_varlen":
            cu = self._doc_cu(ids, self.cfg.bos_id) if cu_seqlens is None else cu_seqlens
            return Documents(kind, max_len, cu, cu.clone())
        segment = document_ids(ids, self.cfg.bos_id, cu_seqlens)
        mask = document_block_mask(segment) if kind == "flex_block_mask" else document_mask(segment)
        return Documents(kind, max_len, mask=mask)

    def set_looping(self, on: bool) -> None:
        self.looping = bool(on) and self.cfg.num_loops > 0

    def layout_summary(self) -> str:
        layout = self.layouts[self.looping]
        half, par = len(layout) // 2, self.parallel_from[self.looping]
        enc, dec, par = (str(part).replace(" ", "") for part in (layout[:half], layout[half:], layout[par:]))
        return format_kv(virtual_layers=len(layout), encoder=enc, decoder=dec,
                         parallel=par if self.cfg.parallel_mode != "off" else "off")

    def raw_logits(self, ids: Tensor, lora: LoRAView | None = None, cols: Tensor | None = None,
                   cu_seqlens: Tensor | None = None) -> Tensor:
        """Head output before the softcap, in the compute dtype; at each row's `cols` (B, M) only where given."""
        h = self.hidden(ids, lora, cu_seqlens)
        if cols is not None:
            h = h.gather(1, cols[..., None].expand(-1, -1, h.size(-1)))
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        z = F.linear(h, weight.to(h.dtype))
        return z if lora is None else z + lora_delta(h, lora.head)

    def forward(self, ids: Tensor, targets: Tensor, reduction: str = "mean",
                cu_seqlens: Tensor | None = None) -> Tensor:
        """Cross-entropy in nats (fp32); reduction='none' gives per-token losses of shape ids.shape."""
        z = self.raw_logits(ids, cu_seqlens=cu_seqlens)
        if self._ce is not None:
            nll = self._ce(z.reshape(-1, z.size(-1)), targets.reshape(-1), self.cfg.logit_softcap).view(targets.shape)
        else:
            nll = softcapped_cross_entropy(z, targets, self.cfg.logit_softcap)
        return nll.mean() if reduction == "mean" else nll

def check_packed_mask(h: Hyperparameters, backend: str, device: torch.device) -> None:
    """Refuses, before any work, a packed row whose SDPA document mask (CUDA, no FA3 or compile) passes 4 GB."""
    n = h.micro_batch_seqs * h.train_seq_len
    if (h.doc_isolation and h.doc_packed_loader and device.type == "cuda" and n * n > 1 << 32
            and doc_attention_kind(backend, device, h.compile) == "sdpa_document_mask"):
        raise ConfigError(f"COMPILE={int(h.compile)} is not allowed with DOC_ISOLATION=1, DOC_PACKED_LOADER=1 and "
                          f"attention on {backend}: the document mask of a {n}-token row takes {n * n / 1e9:.0f} GB",
                          hint="COMPILE=1 (FlexAttention), FA3, or DOC_PACKED_LOADER=0")

# ==== Kernels ====

def softcap(z: Tensor, cap: float) -> Tensor:
    return cap * torch.tanh(z / cap) if cap > 0 else z

def softcapped_cross_entropy(z: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Per-token F.cross_entropy of fp32 softcap(z), written for inductor to fuse (PR #1787 fused it by hand)."""
    s = softcap(z.float(), cap)
    hit = torch.arange(z.size(-1), device=z.device) == targets.unsqueeze(-1)
    return torch.logsumexp(s, dim=-1) - torch.where(hit, s, 0.0).sum(-1)

def softcap_ce_reference(z: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """(per-row nats, log-sum-exp) of softmax(softcap(z)) for z (N, V): the fused op off CUDA; test reference."""
    s = softcap(z.float(), cap)
    lse = torch.logsumexp(s, dim=-1)
    return lse - s.gather(-1, targets[:, None])[:, 0], lse

def softcap_ce_reference_grad(grad: Tensor, z: Tensor, targets: Tensor, lse: Tensor, cap: float) -> Tensor:
    """dLoss/dz of softcap_ce_reference: (softmax - onehot) * grad * (1 - tanh^2), in z's dtype."""
    s = softcap(z.float(), cap)
    d = torch.exp(s - lse[:, None])
    d[torch.arange(z.size(0), device=z.device), targets] -= 1.0
    d *= grad[:, None]
    if cap > 0:
        d *= 1.0 - (s / cap).square()
    return d.to(z.dtype)

CE_BLOCK = 1024  # logits per program step of the fused kernels (8 steps over an 8192 vocabulary)

@functools.cache
def softcap_ce_kernels() -> tuple[Any, Any]:
    """PR #1787's fused softcapped CE, a program per row of z (N, V): forward writes (loss, lse), backward dz."""
    import triton  # here, not at import: importing Triton reads the environment (and CPU builds lack it)
    import triton.language as tl

    @triton.jit
    def forward(z, targets, loss, lse_out, V, CAP: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        target = tl.load(targets + row)
        m = tl.zeros([], dtype=tl.float32) - float("inf")
        total = tl.zeros([], dtype=tl.float32)
        picked = tl.zeros([], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(z + row.to(tl.int64) * V + cols, mask=cols < V, other=0.0).to(tl.float32)
            if CAP > 0:  # CAP * tanh(x / CAP), with tanh from exp (inlined: a helper would not trace everywhere)
                u = CAP * (2.0 / (1.0 + tl.exp(-2.0 * x / CAP)) - 1.0)
            else:
                u = x
            u = tl.where(cols < V, u, float("-inf"))
            m_new = tl.maximum(m, tl.max(u, 0))
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(u - m_new), 0)
            m = m_new
            picked += tl.sum(tl.where(cols == target, u, 0.0), 0)
        lse = m + tl.log(total)
        tl.store(loss + row, lse - picked)
        tl.store(lse_out + row, lse)

    @triton.jit
    def backward(z, targets, lse_in, grad, dz, V, CAP: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        target = tl.load(targets + row)
        lse = tl.load(lse_in + row)
        g = tl.load(grad + row)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            offs = row.to(tl.int64) * V + cols
            x = tl.load(z + offs, mask=cols < V, other=0.0).to(tl.float32)
            if CAP > 0:
                th = 2.0 / (1.0 + tl.exp(-2.0 * x / CAP)) - 1.0
                u, slope = CAP * th, 1.0 - th * th
            else:
                u, slope = x, x * 0.0 + 1.0
            d = g * (tl.exp(u - lse) - tl.where(cols == target, 1.0, 0.0)) * slope
            tl.store(dz + offs, d.to(dz.dtype.element_ty), mask=cols < V)
    return forward, backward

def softcap_ce_triton(z: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    z, targets = z.contiguous(), targets.contiguous()  # the kernels index row r at r * V and targets + r
    loss = torch.empty(z.size(0), dtype=torch.float32, device=z.device)
    lse = torch.empty_like(loss)
    softcap_ce_kernels()[0][(z.size(0),)](z, targets, loss, lse, z.size(1), CAP=cap, BLOCK=CE_BLOCK)
    return loss, lse

def softcap_ce_triton_grad(grad: Tensor, z: Tensor, targets: Tensor, lse: Tensor, cap: float) -> Tensor:
    z, targets, lse = z.contiguous(), targets.contiguous(), lse.contiguous()
    dz = torch.empty_like(z)
    softcap_ce_kernels()[1][(z.size(0),)](z, targets, lse, grad.contiguous(), dz, z.size(1), CAP=cap, BLOCK=CE_BLOCK)
    return dz

def on_triton(t: Tensor) -> bool:
    return t.is_cuda and importable("triton")

def fused_softcap_ce() -> Callable[[Tensor, Tensor, float], Tensor]:
    """FUSED_CE_ENABLED: per-row nats of softmax(softcap(z)) for z (N, V), a custom op opaque to torch.compile."""
    if "ce" in _CUSTOM_OPS:
        return _CUSTOM_OPS["ce"]

    @torch.library.custom_op("pgolf::softcap_ce", mutates_args=())
    def fwd(z: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
        return (softcap_ce_triton if on_triton(z) else softcap_ce_reference)(z.contiguous(), targets, cap)

    @fwd.register_fake
    def _(z: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
        return z.new_empty(z.size(0), dtype=torch.float32), z.new_empty(z.size(0), dtype=torch.float32)

    @torch.library.custom_op("pgolf::softcap_ce_bwd", mutates_args=())
    def bwd(grad: Tensor, z: Tensor, targets: Tensor, lse: Tensor, cap: float) -> Tensor:
        fn = softcap_ce_triton_grad if on_triton(z) else softcap_ce_reference_grad
        return fn(grad, z.contiguous(), targets, lse, cap)

    @bwd.register_fake
    def _(grad: Tensor, z: Tensor, targets: Tensor, lse: Tensor, cap: float) -> Tensor:
        return torch.empty_like(z)

    def setup_context(ctx, inputs, output) -> None:
        z, targets, ctx.cap = inputs
        ctx.save_for_backward(z, targets, output[1])

    def backward(ctx, grad: Tensor, _grad_lse: Tensor) -> tuple[Tensor, None, None]:
        z, targets, lse = ctx.saved_tensors
        return bwd(grad, z, targets, lse, ctx.cap), None, None
    fwd.register_autograd(backward, setup_context=setup_context)
    return _CUSTOM_OPS.setdefault("ce", lambda z, targets, cap: fwd(z, targets, float(cap))[0])

def leaky_relu2_linear_reference(a: Tensor, b: Tensor, slope: float, pre: Tensor | None = None) -> Any:
    """z = a b^T: (z, leaky_relu(z)^2), or with `pre` the MLP's backward z * d leaky_relu(pre)^2/d pre (b = W2^T)."""
    z = a @ b.T
    if pre is None:
        h = F.leaky_relu(z, slope)
        return z, h * h
    return z * torch.where(pre > 0, 2 * pre, 2 * slope * slope * pre)

@functools.cache
def leaky_relu2_linear_kernel() -> Any:
    """leaky_relu2_linear_reference as one Triton kernel (PR #1530, PR #1855): the activation applied in registers."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(a, b, pre, out, M, N, K, sam, sak, sbn, sbk, SLOPE: tl.constexpr, FORWARD: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid, tiles_n = tl.program_id(0), tl.cdiv(N, BN)
        rm = (pid // tiles_n) * BM + tl.arange(0, BM)  # a row's tiles run side by side: its rows of a come from L2
        rn = (pid % tiles_n) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        pa = a + rm[:, None].to(tl.int64) * sam + rk[None, :] * sak
        pb = b + rn[:, None].to(tl.int64) * sbn + rk[None, :] * sbk
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            x = tl.load(pa, mask=(rm[:, None] < M) & (rk[None, :] < K - k), other=0.0)
            w = tl.load(pb, mask=(rn[:, None] < N) & (rk[None, :] < K - k), other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
            pa += BK * sak
            pb += BK * sbk
        offs = rm[:, None].to(tl.int64) * N + rn[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        if FORWARD:
            z = acc.to(pre.dtype.element_ty)
            tl.store(pre + offs, z, mask=mask)
            h = z.to(tl.float32)
            h = tl.where(h > 0, h, SLOPE * h)
            tl.store(out + offs, (h * h).to(out.dtype.element_ty), mask=mask)  # = bf16 h * h: exact in fp32
        else:
            z = tl.load(pre + offs, mask=mask, other=0.0).to(tl.float32)
            d = acc * tl.where(z > 0, 2.0 * z, 2.0 * SLOPE * SLOPE * z)
            tl.store(out + offs, d.to(out.dtype.element_ty), mask=mask)
    return kernel

def leaky_relu2_linear_triton(a: Tensor, b: Tensor, slope: float, pre: Tensor | None = None) -> Any:
    (M, K), N = a.shape, b.size(0)
    BM, BN, BK = 128, 128, 64  # the kernel's M, N, K tile
    out = a.new_empty(M, N, dtype=a.dtype if pre is None else pre.dtype)
    z = torch.empty_like(out) if pre is None else pre.contiguous()
    leaky_relu2_linear_kernel()[(-(-M // BM) * -(-N // BN),)](a, b, z, out, M, N, K, *a.stride(), *b.stride(),
                                                             SLOPE=slope, FORWARD=pre is None, BM=BM, BN=BN, BK=BK,
                                                             num_warps=8, num_stages=3)
    return (z, out) if pre is None else out

def fused_leaky_relu2_mlp() -> Callable[[Tensor, Tensor, Tensor, float], Tensor]:
    """FUSED_MLP_ENABLED: leaky_relu(x W1^T)^2 W2^T as a custom op, fused both ways as PR #1855's MLP function."""
    if "mlp" in _CUSTOM_OPS:
        return _CUSTOM_OPS["mlp"]

    def linear(a: Tensor, b: Tensor, slope: float, pre: Tensor | None = None) -> Any:
        return (leaky_relu2_linear_triton if on_triton(a) else leaky_relu2_linear_reference)(a, b, slope, pre)

    @torch.library.custom_op("pgolf::leaky_relu2_mlp", mutates_args=())
    def fwd(x: Tensor, w1: Tensor, w2: Tensor, slope: float) -> tuple[Tensor, Tensor, Tensor]:
        pre, post = linear(x, w1, slope)
        return F.linear(post, w2), pre, post

    @fwd.register_fake
    def _(x: Tensor, w1: Tensor, w2: Tensor, slope: float) -> tuple[Tensor, Tensor, Tensor]:
        pre = x.new_empty(x.size(0), w1.size(0))
        return x.new_empty(x.size(0), w2.size(0)), pre, torch.empty_like(pre)

    @torch.library.custom_op("pgolf::leaky_relu2_mlp_bwd", mutates_args=())
    def bwd(grad: Tensor, w2: Tensor, pre: Tensor, slope: float) -> Tensor:
        return linear(grad, w2.T, slope, pre)

    @bwd.register_fake
    def _(grad: Tensor, w2: Tensor, pre: Tensor, slope: float) -> Tensor:
        return torch.empty_like(pre)

    def setup_context(ctx, inputs, output) -> None:
        x, w1, w2, ctx.slope = inputs
        ctx.save_for_backward(x, w1, w2, *output[1:])

    def backward(ctx, grad: Tensor, _pre: Tensor, _post: Tensor) -> tuple[Tensor | None, ...]:
        x, w1, w2, pre, post = ctx.saved_tensors
        d = bwd(grad, w2, pre, ctx.slope)
        nx, n1, n2 = ctx.needs_input_grad[:3]
        return d @ w1 if nx else None, d.T @ x if n1 else None, grad.T @ post if n2 else None, None
    fwd.register_autograd(backward, setup_context=setup_context)
    return _CUSTOM_OPS.setdefault("mlp", lambda x, w1, w2, slope: fwd(x.reshape(-1, x.size(-1)), w1, w2,
                                                                       float(slope))[0].view(*x.shape[:-1], -1))

# ==== Optimizers ====

def flatten_parameters(model: nn.Module) -> Tensor | None:
    """Re-home parameters as views of one flat buffer (PR #1584's one-lerp EMA) after .to(device); None if mixed."""
    params = list(model.parameters())
    if not params or len({(p.dtype, p.device) for p in params}) != 1:
        return None
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    for p, view in zip(params, flat.split([p.numel() for p in params])):
        p.data = view.view_as(p)
    return flat

def flat_buffer(params: list[Tensor]) -> Tensor | None:
    """The flat buffer `params` are consecutive contiguous views of (flatten_parameters), else None."""
    if not params:
        return None
    storage = params[0].untyped_storage()
    if storage.nbytes() != sum(p.numel() for p in params) * params[0].element_size():
        return None
    flat = torch.empty(0, dtype=params[0].dtype, device=params[0].device).set_(storage)
    return flat if all(p.dtype == flat.dtype and p.is_contiguous() and p.data_ptr() == v.data_ptr()
                       for p, v in zip(params, flat.split([p.numel() for p in params]))) else None

# Newton-Schulz (a, b, c) per iteration, the last reused: classic Keller Jordan's (the naive baseline to PR #1769);
# polar_express PR #1344's (PRs #1787 to #1855); polar_express_safe PR #1514's, the norm times 1.02.
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))
NS_COEFFICIENT_SETS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "classic": ((3.4445, -4.7750, 2.0315),), "polar_express": POLAR_EXPRESS, "polar_express_safe": POLAR_EXPRESS}
NS_NORM_SAFETY = {"classic": 1.0, "polar_express": 1.0, "polar_express_safe": 1.02}
NS_EPS = 1e-7
MUON_NS_DTYPES = ("auto", "bf16", "fp32")

PARAM_GROUPS: dict[str, tuple[str, str, str]] = {  # every parameter's group: (optimizer, LR knob, weight-decay knob)
    "matrix": ("muon", "matrix_lr", "muon_wd"),  # 2-D block matrices
    "embed": ("adamw", "tied_embed_lr", "embed_wd"),  # token embedding (also the head when tied)
    "head": ("adamw", "head_lr", "embed_wd"),  # untied output head
    "scalar": ("adamw", "scalar_lr", "adam_wd"),  # vectors, scalars and control tensors
}
MATRIX_SUFFIXES = ORTHO_INIT_SUFFIXES + (".attn.proj.weight", ".mlp.proj.weight")

def classify_param(name: str) -> str:
    if name.startswith("blocks.") and name.endswith(MATRIX_SUFFIXES):
        return "matrix"
    return {"tok_emb.weight": "embed", "lm_head.weight": "head"}.get(name, "scalar")  # scalar: q_gain, scales, ...

def newton_schulz(G: Tensor, steps: int, dtype: torch.dtype, coeffs: str = "classic") -> Tensor:
    """Quintic Newton-Schulz approximation of the polar factor U V^T of G (m, n), or of each matrix of G (k, m, n)."""
    table = NS_COEFFICIENT_SETS[coeffs]
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * NS_NORM_SAFETY[coeffs] + NS_EPS)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the short side: X X^T is the smaller Gram matrix
        X = X.mT
    addmm = torch.baddbmm if X.dim() == 3 else torch.addmm  # scale-and-add fused into the matmul
    for i in range(steps):
        a, b, c = table[min(i, len(table) - 1)]
        A = X @ X.mT
        B = addmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A
        X = addmm(X, B, X, beta=a, alpha=1.0)  # a*X + B@X
    return X.mT if transposed else X

def row_normalize(U: Tensor) -> Tensor:
    """MuonEq-R (PR #1217/#1260): give every row of the update unit L2 norm before orthogonalizing."""
    return U / U.norm(dim=-1, keepdim=True).clamp_min(NS_EPS)

def resolve_ns_dtype(setting: str, device: torch.device) -> torch.dtype:
    """MUON_NS_DTYPE. auto: bf16 on CUDA and on CPUs with AMX tiles (3-5x fp32 there), else fp32 (emulated bf16)."""
    if setting == "auto":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, hence the guard
        setting = "bf16" if device.type == "cuda" or (amx is not None and amx()) else "fp32"
    return torch.bfloat16 if setting == "bf16" else torch.float32

class NewtonSchulz(NamedTuple):  # MUON_BACKEND_STEPS, MUON_NS, MUON_ROW_NORMALIZE, MUON_NS_DTYPE
    steps: int = 5
    coeffs: str = "classic"
    row_norm: bool = False
    dtype: Any = "auto"

def muon_direction(G: Tensor, buf: Tensor, mu: Tensor, ns: NewtonSchulz, scale: float) -> Tensor:
    """Muon's direction (in ns.dtype) for gradients G (k, m, n), momentum into `buf` in place; `scale` = sqrt(m/n)."""
    buf.mul_(mu).add_(G)
    U = G + mu * buf  # Nesterov
    if ns.row_norm:
        U = row_normalize(U)
    return newton_schulz(U, ns.steps, ns.dtype, ns.coeffs) * scale

def muon_apply(params: list[Tensor], X: Tensor, lr: Tensor, wd: Tensor) -> None:
    torch._foreach_mul_(params, 1.0 - lr * wd)
    torch._foreach_sub_(params, list((X.to(params[0].dtype) * lr).unbind(0)))

def muon_fused_step(params: list[Tensor], G: Tensor, buf: Tensor, lr: Tensor, mu: Tensor, wd: Tensor,
                    ns: NewtonSchulz, scale: float) -> None:
    muon_apply(params, muon_direction(G, buf, mu, ns, scale), lr, wd)

class Muon(torch.optim.Optimizer):
    """Muon batched as PR #1584: same-shape buckets, split over ranks by one reduce-scatter and one all-gather."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, ns: NewtonSchulz,
                 compile: bool = False, world: tuple[int, int] = (0, 1)):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=ns.steps, weight_decay=weight_decay,
                                      ns_coeffs=ns.coeffs, row_normalize=ns.row_norm))
        (self.rank, self.world_size), self.ns_dtype = world, ns.dtype
        # A bucket names its group by index: load_state_dict (after the warm-up) replaces the group dicts.
        buckets: dict[tuple, list[nn.Parameter]] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                buckets.setdefault((gi, tuple(p.shape), p.dtype), []).append(p)
        self.buckets: list[tuple[int, list[nn.Parameter]]] = [(key[0], ps) for key, ps in buckets.items()]
        self.share = [math.ceil(len(ps) / self.world_size) for _, ps in self.buckets]  # matrices per rank and bucket
        wrap = (lambda f: torch.compile(f, dynamic=False, fullgraph=True)) if compile else (lambda f: f)
        self._fused, self._direction, self._apply = wrap(muon_fused_step), wrap(muon_direction), wrap(muon_apply)
        self._scalars: dict[str, Tensor] = {}

    def _scalar(self, name: str, value: float, device: torch.device) -> Tensor:
        # LR and momentum change every step: 0-d tensors keep them out of the compiled graphs' guards.
        t = self._scalars.get(name)
        if t is None or t.device != device:
            t = self._scalars[name] = torch.zeros((), dtype=torch.float32, device=device)
        return t.fill_(value)

    @torch.no_grad()
    def shard_grads(self) -> list[Tensor]:
        """Per bucket, this rank's (share, m, n) slice of the rank-averaged stacked gradients (one reduce-scatter)."""
        stacks = [torch.stack([p.grad for p in ps] + [torch.zeros_like(ps[0].grad)] * (n * self.world_size - len(ps)))
                  for (_, ps), n in zip(self.buckets, self.share)]
        if self.world_size == 1:
            return stacks
        flat = torch.cat([G.reshape(self.world_size, -1) for G in stacks], dim=1)  # row r: rank r's shares
        out = flat.new_empty(flat.size(1))
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in torch 2.10
        scatter(out, flat.reshape(-1))
        out.div_(self.world_size)
        parts = out.split([G.numel() // self.world_size for G in stacks])
        return [part.view(-1, *G.shape[1:]) for part, G in zip(parts, stacks)]

    @torch.no_grad()
    def step(self, shards: list[Tensor] | None = None, comm: Callable[[], None] | None = None) -> None:
        """One update from shard_grads() (e.g. clipped; computed here when None); `comm()` after the all-gather."""
        shards = self.shard_grads() if shards is None else shards
        if not shards:
            return
        dev = shards[0].device
        ns_dtype = resolve_ns_dtype(self.ns_dtype, dev)
        scalars = [(self._scalar(f"lr{gi}", g["lr"], dev), self._scalar(f"mu{gi}", g["momentum"], dev),
                    self._scalar(f"wd{gi}", g["weight_decay"], dev)) for gi, g in enumerate(self.param_groups)]
        gathered = []
        for (gi, ps), G in zip(self.buckets, shards):
            group, state = self.param_groups[gi], self.state[ps[0]]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(G)
            args = (NewtonSchulz(group["backend_steps"], group["ns_coeffs"], group["row_normalize"], ns_dtype),
                    math.sqrt(max(1.0, ps[0].size(0) / ps[0].size(1))))
            if self.world_size == 1:
                self._fused(ps, G, state["momentum_buffer"], *scalars[gi], *args)
            else:
                gathered.append(self._direction(G, state["momentum_buffer"], scalars[gi][1], *args))
        if self.world_size == 1:
            return
        flat = torch.cat([X.reshape(-1) for X in gathered])
        full = flat.new_empty(self.world_size, flat.numel())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(full.view(-1), flat)
        if comm is not None:
            comm()
        for (gi, ps), X, part in zip(self.buckets, gathered, full.split([X.numel() for X in gathered], dim=1)):
            self._apply(ps, part.reshape(-1, *X.shape[1:])[: len(ps)], scalars[gi][0], scalars[gi][2])

def lr_scale(frac: float, warmdown_frac: float, min_lr: float) -> float:
    """LR multiplier at training progress `frac` in [0, 1]: 1, then linear warmdown to a MIN_LR floor."""
    if warmdown_frac <= 0.0 or frac < 1.0 - warmdown_frac:
        return 1.0
    return max(min((1.0 - frac) / warmdown_frac, 1.0), min_lr)  # min(): the ratio may be 1 + 1 ulp at warmdown start

def lr_scale_iters(step: int, elapsed_s: float, iterations: int, max_wallclock_seconds: float,
                   warmdown_iters: int, min_lr: float) -> float:
    """WARMDOWN_ITERS (PR #1290): linear decay over the last `warmdown_iters` steps, or their mean time if capped."""
    remaining = (iterations - step) / warmdown_iters
    if max_wallclock_seconds > 0 and step > 0:
        remaining = min(remaining, (max_wallclock_seconds - elapsed_s) / (warmdown_iters * (elapsed_s / step)))
    return max(min(max(remaining, 0.0), 1.0), min_lr)

def muon_momentum_at(step: int, start: float, final: float, warmup_steps: int) -> float:
    f = 1.0 if warmup_steps <= 0 else min(step / warmup_steps, 1.0)
    return (1.0 - f) * start + f * final

def training_progress(step: int, elapsed_s: float, iterations: int, max_wallclock_seconds: float) -> float:
    """Fraction of the run done: whichever of the step budget and the wallclock cap is closer to its end."""
    wall = elapsed_s / max_wallclock_seconds if max_wallclock_seconds > 0 else 0.0
    return min(max(step / iterations, wall), 1.0)

class Optimizers:
    """Muon for block matrices, AdamW for the rest (PARAM_GROUPS); `step()` also averages and clips gradients."""

    def __init__(self, model: nn.Module, h: Hyperparameters, rank: int = 0, world_size: int = 1):
        self.h, self.world_size = h, world_size
        self.table = [(name, classify_param(name), p.numel()) for name, p in model.named_parameters()]
        self.params = list(model.parameters())
        grouped = {g: [p for p, row in zip(self.params, self.table) if row[1] == g] for g in PARAM_GROUPS}
        self.base_lr = {g: getattr(h, PARAM_GROUPS[g][1]) for g in PARAM_GROUPS}
        ns = NewtonSchulz(h.muon_backend_steps, h.muon_ns, h.muon_row_normalize, h.muon_ns_dtype)
        self.muon = Muon(grouped["matrix"], lr=h.matrix_lr, momentum=h.muon_momentum, weight_decay=h.muon_wd, ns=ns,
                         compile=h.compile, world=(rank, world_size))
        adam_groups = [dict(params=grouped[g], lr=self.base_lr[g], weight_decay=getattr(h, PARAM_GROUPS[g][2]),
                            name=g) for g in ("embed", "head", "scalar") if grouped[g]]
        self.adam_params = [p for g in adam_groups for p in g["params"]]
        fused = bool(self.params) and self.params[0].is_cuda
        self.adam = torch.optim.AdamW(adam_groups, betas=(h.beta1, h.beta2), eps=h.adam_eps, fused=fused)

    def group_counts(self) -> dict[str, int]:
        return {g: sum(n for _, group, n in self.table if group == g) for g in PARAM_GROUPS}

    def set_schedule(self, scale: float, step: int) -> None:
        h = self.h
        mu = muon_momentum_at(step, h.muon_momentum_warmup_start, h.muon_momentum, h.muon_momentum_warmup_steps)
        for group in self.muon.param_groups:
            group["lr"], group["momentum"] = self.base_lr["matrix"] * scale, mu
        for group in self.adam.param_groups:
            group["lr"] = self.base_lr[group["name"]] * scale

    @torch.no_grad()
    def step(self, timer: StepTimer | None = None) -> None:
        mark = timer.mark if timer is not None else (lambda phase: None)
        sync_gradients(self.adam_params, self.world_size)
        shards = self.muon.shard_grads()
        mark("comm")
        if self.h.grad_clip_norm > 0:
            adam_grads = [p.grad for p in self.adam_params if p.grad is not None]
            clip_global_norm_(adam_grads, shards, self.h.grad_clip_norm, self.world_size)
        self.muon.step(shards, comm=lambda: mark("comm"))
        self.adam.step()
        mark("optimizer")

    def zero_grad(self) -> None:
        self.muon.zero_grad(set_to_none=True)
        self.adam.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adam": self.adam.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adam.load_state_dict(state["adam"])

def clip_global_norm_(replicated: list[Tensor], sharded: list[Tensor], max_norm: float, world_size: int) -> None:
    """clip_grad_norm_ (same coefficient, no host sync) over gradients `replicated` on all ranks and `sharded`."""
    local = (torch.stack([t.float().pow(2).sum() for t in sharded]).sum() if sharded
             else torch.zeros((), device=replicated[0].device))
    if world_size > 1:
        all_reduce_(local)
    if replicated:
        local = local + torch.stack(torch._foreach_norm(replicated)).float().pow(2).sum().to(local.device)
    coef = (max_norm / (local.sqrt() + 1e-6)).clamp(max=1.0)
    if replicated:
        torch._foreach_mul_(replicated, coef.to(replicated[0].device))
    if sharded:
        torch._foreach_mul_(sharded, coef)

def sync_gradients(params: list[nn.Parameter], world_size: int, average: bool = True) -> None:
    if world_size <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_(flat)
    if average:
        flat.div_(world_size)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))

class EMA:
    """fp32 EMA of all parameters in one lerp (PR #1584), bias-corrected as Adam's so initial weights do not linger."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.steps = decay, 0
        self.params = list(model.parameters())
        self._flat = flat_buffer(self.params) if all(p.dtype == torch.float32 for p in self.params) else None
        if self._flat is not None:
            self._shadow_flat = torch.zeros_like(self._flat)
            self.shadow = [v.view_as(p) for v, p in zip(self._shadow_flat.split([p.numel() for p in self.params]),
                                                         self.params)]
        else:
            self.shadow = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        if self._flat is not None and self.params[0].data_ptr() != self._flat.data_ptr():
            self._flat = None  # the parameters were re-bound (e.g. moved) after the EMA was built
        if self._flat is not None:
            self._shadow_flat.lerp_(self._flat, 1.0 - self.decay)
        else:  # fp32 parameters as they are (.float() returns them), others as fp32 copies
            torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)
        self.steps += 1

    @torch.no_grad()
    def apply_to(self, model: nn.Module) -> None:
        if self.steps == 0:
            return
        correction = 1.0 - self.decay ** self.steps
        for p, s in zip(model.parameters(), self.shadow):
            p.copy_((s / correction).to(p.dtype))

# ==== Quantization and packing ====

ARTIFACT_MAGIC = b"PGOLFART"
ARTIFACT_VERSION = 4  # 4: asymmetric LQER and int8 gate rows (3: the body in independently compressed chunks)
ARTIFACT_PREFIX = struct.Struct("<8sHIQ")  # magic, version, crc32 of the compressed body, its length
ARTIFACT_COMPRESSOR_IDS = {"brotli": 0, "lzma": 1, "zlib": 2, "pergroup": 3}  # the compressed body's first byte
# COMPRESSOR=pergroup (PR #1855): one `lrzip -z -L 9` (ZPAQ) stream per role of transposed codes, the rest brotli.
PERGROUP_CODERS = ("brotli", "lrzip")  # a chunk's first byte: its coder's index
PERGROUP_SORTED = ("tok_emb.weight",)  # PR #1855 also sorts attn.c_q, mlp.fc: here 0.3-1.4% more of their bytes
PERGROUP_MIN_BYTES = 4096
PERGROUP_RATIO = 0.99  # pergroup bytes / brotli-11 bytes of one model (0.986-0.992 measured: bench/RESULTS.md)
PERGROUP_HEAD = struct.Struct("<IB")  # a role's piece: matrix count, rows sorted?; then (rows, cols) uint32 each
BROTLI_QUALITY = 11
COMPRESS_CHUNK_BYTES = 4 << 20  # compressed in parallel: brotli-11 of the whole record body takes most of a minute
CHUNK_COUNT = struct.Struct("<I")
FIT_MAX_ATTEMPTS = 8  # fit-to-size: packs tried before giving up (usually 1-2 are needed)
FIT_OVERSHOOT = 1.15  # widen k a little more than the entropy estimate asks, so one more pack fits
GPTQ_RESERVE_SAFETY = 1.25  # auto reserve = probe time x batches x this + GPTQ_RESERVE_PAD_S
GPTQ_RESERVE_PAD_S = 0.5

class OutputError(RuntimeError):
    """An output could not be written (disk full, permissions): the message says what was kept, and where."""

class ArtifactError(Hinted, ValueError):
    """An artifact that cannot be read back: the message names the file and what is wrong."""

def quant_group(name: str) -> str:
    """SDClip/bit-width group: embed (tables, an untied head), gate (GATED_ATTN_QUANT_GATE), attn or mlp."""
    if name in ("tok_emb.weight", "lm_head.weight"):
        return "embed"
    return "gate" if name.endswith(".attn_gate_w") else "attn" if ".attn." in name else "mlp"

def is_quantized(name: str, t: Tensor) -> bool:
    """Matrices, embedding tables and an untied head; control tensors (PARAM_GROUPS "scalar") stay fp16."""
    return t.is_floating_point() and t.ndim == 2 and classify_param(name) != "scalar"

def qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1

def sdclip_scales(w: Tensor, bits: int, k: float) -> Tensor:
    """SDClip (PR #1394): fp16 row steps clipping at k (unbiased) std devs; k = 0: at the row's max (naive int8)."""
    clip = k * w.float().std(dim=-1) if k > 0 else w.float().abs().amax(dim=-1)
    scale = (clip / qmax(bits)).half()
    return torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant row: scale 1

def quantize_rtn(w: Tensor, scale: Tensor, bits: int) -> Tensor:
    r = qmax(bits)
    return torch.clamp(torch.round(w.float() / scale.float().unsqueeze(-1)), -r, r).to(torch.int8)

def gptq_quantize(w: Tensor, H: Tensor, scale: Tensor, bits: int, damp: float, block: int) -> Tensor:
    """Full-Hessian act-order GPTQ (PR #1019 -> PR #1394) on a fixed SDClip grid, of a matrix or a stack of them."""
    single = w.dim() == 2
    W, H, s = (t.detach().float().clone() for t in ((w[None], H[None], scale[None]) if single else (w, H, scale)))
    k, rows, n = W.shape
    diag = torch.diagonal(H, dim1=-2, dim2=-1)  # a view: writes go into H
    dead = diag == 0
    diag[dead] = 1.0
    W.masked_fill_(dead[:, None, :], 0.0)
    diag.add_(damp * diag.mean(-1, keepdim=True))
    perm = torch.argsort(diag, dim=-1, descending=True, stable=True)
    W = W.gather(2, perm[:, None, :].expand(k, rows, n))
    H = H.gather(1, perm[:, :, None].expand(k, n, n)).gather(2, perm[:, None, :].expand(k, n, n))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    s, r = s[:, :, None], qmax(bits)
    Q = torch.zeros_like(W, dtype=torch.int8)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, :, i1:i2].clone()
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for j in range(i2 - i1):
            col = W1[:, :, j: j + 1]
            q = torch.clamp(torch.round(col / s), -r, r)
            Q[:, :, i1 + j] = q[..., 0].to(torch.int8)
            err = (col - q * s) / Hinv1[:, j: j + 1, j: j + 1]
            W1[:, :, j:] -= err * Hinv1[:, j: j + 1, j:]
            Err1[:, :, j: j + 1] = err
        W[:, :, i2:] -= Err1 @ Hinv[:, i1:i2, i2:]
    Q = Q.gather(2, torch.argsort(perm)[:, None, :].expand(k, rows, n))
    return Q[0] if single else Q

def lqer_factors(A: Tensor, B: Tensor, spec: "QuantSpec") -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], int]:
    """LQER codes of E ~ A @ B and B's scale group: asymmetric int2 A, int4 B (PR #1797), else 0: by row (PR #1855)."""
    g, bits = spec.lqer_asym_group, spec.lqer_factor_bits
    if not g or B.numel() % g:  # symmetric: each row clipped at its max (SDClip k = 0)
        sa, sb = sdclip_scales(A, bits, 0), sdclip_scales(B, bits, 0)
        return (quantize_rtn(A, sa, bits), sa[:, None], quantize_rtn(B, sb, bits), sb[:, None]), 0
    sa = (A.abs().amax().clamp_min(1e-10) / 1.5).half().reshape(1, 1)
    groups = B.reshape(-1, g)
    sb = (groups.abs().amax(dim=-1, keepdim=True).clamp_min(1e-10) / 7.5).half()
    qa = torch.clamp(torch.round(A / sa.float()), -2, 1).to(torch.int8)
    qb = torch.clamp(torch.round(groups / sb.float()), -8, 7).to(torch.int8).reshape(B.shape)
    return (qa, sa, qb, sb), g

@dataclass(frozen=True)
class QuantSpec:
    """Everything that decides the quantized values: bits and SDClip k per group, GPTQ and LQER."""
    method: str = "gptq"
    bits: tuple[tuple[str, int], ...] = (("attn", 6), ("embed", 7), ("mlp", 6))
    clip: tuple[tuple[str, float], ...] = (("attn", 13.0), ("embed", 14.0), ("mlp", 11.5))
    damp: float = 0.01
    block: int = 128
    lqer_rank: int = 0  # 0 = LQER off
    lqer_top_k: int = 3
    lqer_factor_bits: int = 4
    lqer_asym_group: int = 0  # 0 = symmetric LQER factors
    compressor: str = "brotli"

    @classmethod
    def from_hparams(cls, h: Hyperparameters) -> "QuantSpec":
        # The gates as int8 at each row's largest magnitude (SDClip k = 0), without a Hessian (PR #1736).
        groups = ("attn", "embed", "gate", "mlp") if h.gated_attn_quant_gate else ("attn", "embed", "mlp")
        bits = {"attn": h.matrix_bits, "embed": h.embed_bits, "gate": 8, "mlp": h.matrix_bits}
        return cls(method=h.quant_method, bits=tuple((g, bits[g]) for g in groups),
                   clip=tuple((g, 0.0 if g == "gate" else h.clip_sigmas(g)) for g in groups), damp=h.gptq_damp,
                   block=h.gptq_block, lqer_rank=h.lqer_rank if h.lqer_enabled else 0, lqer_top_k=h.lqer_top_k,
                   lqer_factor_bits=h.lqer_factor_bits, lqer_asym_group=h.lqer_asym_group if h.lqer_asym_enabled else 0,
                   compressor=h.compressor)

@dataclass
class QuantTensor:
    group: str
    bits: int
    q: Tensor  # int8 container, values in [-qmax, qmax]
    scale: Tensor  # fp16 per row
    dtype: torch.dtype
    method: str  # "gptq" | "rtn" | "rtn_fallback"
    lqer: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # A codes, A scales, B codes, B scales
    lqer_group: int = 0  # B values per scale (asymmetric LQER), 0 = a scale per row of B

    def dequantize(self) -> Tensor:
        w = self.q.float() * self.scale.float()[:, None]
        if self.lqer is not None:
            qa, sa, qb, sb = self.lqer
            b = (qb.float().reshape(-1, self.lqer_group or qb.shape[1]) * sb.float()).reshape(qb.shape)
            w = w + (qa.float() * sa.float()) @ b
        return w.to(self.dtype)

def quantize_stack(W: Tensor, H: Tensor | None, scale: Tensor, bits: int, spec: QuantSpec, names: list[str],
                   log: Callable[[str], None] | None) -> tuple[Tensor, list[str]]:
    """Codes and methods of same-shape matrices: batched GPTQ given Hessians; RTN for one whose Hessian is not PD."""
    if H is None:
        return quantize_rtn(W, scale, bits), ["rtn"] * len(names)
    try:
        return gptq_quantize(W, H, scale, bits, spec.damp, spec.block), ["gptq"] * len(names)
    except torch.linalg.LinAlgError:
        if len(names) > 1:  # one matrix at a time: only the one that fails falls back
            parts = [quantize_stack(W[i: i + 1], H[i: i + 1], scale[i: i + 1], bits, spec, [n], log)
                     for i, n in enumerate(names)]
            return torch.cat([codes for codes, _ in parts]), [method for _, (method,) in parts]
    if log:
        log(format_kv(gptq_fallback=names[0], reason="cholesky_failed", used="round_to_nearest"))
    return quantize_rtn(W, scale, bits), ["rtn_fallback"]

def quantize_state(state: dict[str, Tensor], spec: QuantSpec, hessians: dict[str, Tensor] | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, QuantTensor | Tensor]:
    """QuantTensors (codes on the CPU) of the matrices, batched by shape and group; LQER on the lqer_top_k worst."""
    out, stacks, errors = {}, {}, []
    gates = "gate" in dict(spec.bits)  # GATED_ATTN_QUANT_GATE: the gates too, though they are control tensors
    for name, t in sorted(state.items()):
        if is_quantized(name, t) or (gates and t.ndim == 2 and quant_group(name) == "gate"):
            key = (tuple(t.shape), quant_group(name), spec.method == "gptq" and name in (hessians or {}))
            stacks.setdefault(key, []).append(name)
        else:
            out[name] = t.detach()
    for (_, group, gptq), names in stacks.items():
        bits = dict(spec.bits)[group]
        W = torch.stack([state[n].detach().float() for n in names])
        H = torch.stack([hessians[n].to(W.device) for n in names]) if gptq else None
        scale = sdclip_scales(W, bits, dict(spec.clip)[group])
        codes, methods = quantize_stack(W, H, scale, bits, spec, names, log)
        for i, name in enumerate(names):
            out[name] = QuantTensor(group, bits, codes[i].cpu(), scale[i].cpu(), state[name].dtype, methods[i])
            if spec.lqer_rank > 0 and group != "gate":
                err = W[i] - codes[i].float() * scale[i].float()[:, None]  # fp32 as PR #1855; dequantize adds in fp32
                errors.append((float(err.norm()), name, err))
    for _, name, err in sorted(errors, key=lambda e: (-e[0], e[1]))[: spec.lqer_top_k]:
        U, S, Vh = torch.linalg.svd(err, full_matrices=False)
        r = min(spec.lqer_rank, S.numel())
        factors, out[name].lqer_group = lqer_factors(U[:, :r] * S[:r], Vh[:r], spec)
        out[name].lqer = tuple(t.cpu() for t in factors)
    return out

def quant_entropy_bytes(quantized: dict[str, QuantTensor | Tensor]) -> dict[str, dict[str, float]]:
    """Zeroth-order entropy of the codes per group, in bytes (what an ideal coder would need)."""
    counts: dict[str, Tensor] = {}
    for qt in quantized.values():
        if isinstance(qt, QuantTensor):
            c = torch.bincount(qt.q.flatten().to(torch.int64) + 128, minlength=256).double()
            counts[qt.group] = counts.get(qt.group, 0) + c
    result = {}
    for group, c in sorted(counts.items()):
        n = int(c.sum())
        p = c[c > 0] / n
        bits = float(-(p * torch.log2(p)).sum())
        result[group] = {"params": n, "entropy_bits_per_param": bits, "entropy_bytes": bits * n / 8}
    return result

def byte_shuffle(data: bytes, stride: int, undo: bool = False) -> bytes:
    """Byte k of every `stride`-byte value together, a shorter tail as is (PR #1089); undo: the inverse."""
    if stride <= 1 or len(data) < stride:
        return data
    whole = len(data) - len(data) % stride
    arr = np.frombuffer(data, dtype=np.uint8, count=whole)
    return arr.reshape((stride, -1) if undo else (-1, stride)).T.tobytes() + data[whole:]

_TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.int8,
                                                          torch.uint8, torch.int32, torch.int64, torch.bool)}

def _compress(data: bytes, compressor: str, undo: bool = False) -> bytes:
    """brotli, zlib (the naive baseline's zlib-9) or xz -9 (PR #1290) of data; undo: the inverse."""
    if compressor == "brotli":
        import brotli
        return brotli.decompress(data) if undo else brotli.compress(data, quality=BROTLI_QUALITY)
    if compressor == "zlib":
        return zlib.decompress(data) if undo else zlib.compress(data, 9)
    import lzma
    return lzma.decompress(data, lzma.FORMAT_XZ) if undo else lzma.compress(data, lzma.FORMAT_XZ, preset=9)

def _map_parallel(fn: Callable[[bytes], bytes], items: list[bytes]) -> list[bytes]:
    """fn over items on a thread per core: brotli, lzma and waits on lrzip release the GIL while they work."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=min(len(items), os.cpu_count() or 1) or 1) as pool:
        return list(pool.map(fn, items))

def code_role(name: str) -> str:
    """The name without its block index: PR #1855 codes every layer's c_q (mlp.fc, ...) as one stream."""
    return re.sub(r"^blocks\.\d+\.", "", name)

def similarity_order(q: np.ndarray) -> np.ndarray:
    """PR #1855's similarity sort: rows in greedy nearest-L1-neighbour order from row 0, so neighbours differ little."""
    d, order = torch.cdist(*[torch.from_numpy(q.astype(np.float32))] * 2, p=1), [0]
    while len(order) < len(q):
        d[:, order[-1]] = math.inf
        order.append(int(d[order[-1]].argmin()))
    return np.array(order, dtype=np.uint16)

def lrzip(data: bytes, *args: str) -> bytes:
    """lrzip through a pipe, at our nice value: its default, 19, starves it on a busy machine (13 s for 32 KB)."""
    import subprocess
    return subprocess.run(["lrzip", "-N", str(os.nice(0)), *args], input=data, capture_output=True, check=True).stdout

def pergroup_pieces(body: bytes) -> list[tuple[str, bytes, list]]:
    """(role, bytes, shapes) in body order: each role's run of codes (PERGROUP_MIN_BYTES or more), the rest as ""."""
    from itertools import groupby
    (hlen,) = struct.unpack_from("<I", body)
    codes = [e for e in json.loads(body[4: 4 + hlen])["tensors"] if e["kind"] == "intq_row"]
    pieces, pos = [], 0
    for role, run in groupby(codes, lambda e: code_role(e["name"])):
        run = list(run)
        a, n = 4 + hlen + run[0]["q"]["offset"], sum(e["q"]["nbytes"] for e in run)
        if n >= PERGROUP_MIN_BYTES:
            pieces += [("", body[pos:a], []), (role, body[a:a + n], [e["shape"] for e in run])]
            pos = a + n
    return [p for p in pieces + [("", body[pos:], [])] if p[1]]

def encode_role(role: str, raw: bytes, shapes: list) -> bytes:
    """A role's codes as PR #1855's coder reads them: PERGROUP_HEAD, shapes, row orders if sorted, each transposed."""
    sort = role in PERGROUP_SORTED and max(r for r, _ in shapes) <= 1 << 14  # similarity_order: rows^2 fp32, 1 GiB
    mats = np.split(np.frombuffer(raw, np.int8), np.cumsum([r * c for r, c in shapes])[:-1])
    mats = [m.reshape(shape) for m, shape in zip(mats, shapes)]
    orders = [similarity_order(m) for m in mats] if sort else [slice(None)] * len(mats)
    return b"".join([PERGROUP_HEAD.pack(len(shapes), sort), np.array(shapes, "<u4").tobytes(),
                     *(o.tobytes() for o in orders if sort), *(m[o].T.tobytes() for m, o in zip(mats, orders))])

def decode_role(raw: bytes) -> bytes:
    """Inverse of encode_role: the matrices row-major, one after another; ValueError where raw is not one."""
    n, sort = PERGROUP_HEAD.unpack_from(raw)
    shapes = np.frombuffer(raw, "<u4", 2 * n, PERGROUP_HEAD.size).reshape(n, 2).astype(np.int64)
    pos, rows = PERGROUP_HEAD.size + 8 * n, shapes[:, 0]
    orders = np.split(np.frombuffer(raw, "<u2", rows.sum() * sort, pos), np.cumsum(rows)[:-1])
    mats = np.split(np.frombuffer(raw, np.int8, -1, pos + 2 * rows.sum() * sort), np.cumsum(shapes.prod(1))[:-1])
    mats = [m.reshape(c, r).T for (r, c), m in zip(shapes, mats)]  # a short or long piece fails: the last has the rest
    if sort and any((np.sort(o) != np.arange(r)).any() for o, r in zip(orders, rows)):
        raise ValueError("a row order is not a permutation")
    return b"".join((m[np.argsort(o)] if sort else m).tobytes() for m, o in zip(mats, orders))

def pack_piece(piece: tuple[str, bytes, list]) -> bytes:
    """One pergroup chunk: coder index (PERGROUP_CODERS) | role | 0 | the coded bytes."""
    if piece[0]:
        return b"\1" + piece[0].encode() + b"\0" + lrzip(encode_role(*piece), "-z", "-L", "9")
    return b"\0\0" + _compress(piece[1], "brotli")

def unpack_piece(chunk: bytes, source: str) -> bytes:
    """Inverse of pack_piece; ArtifactError names the group that does not decode."""
    coder, (role, _, data) = chunk[0], chunk[1:].partition(b"\0")
    try:  # an unknown coder index is an IndexError
        return decode_role(lrzip(data, "-d")) if coder == 1 else _compress(data, PERGROUP_CODERS[coder], True)
    except Exception as exc:  # lrzip's exit status, a short or long piece, a bad row order: all mean corrupt
        group = role.decode(errors="replace") or "header, scales"
        raise ArtifactError(f"{source}: corrupted artifact: group {group!r} "
                            f"({PERGROUP_CODERS[coder] if coder < 2 else coder}): {type(exc).__name__}: "
                            f"{str(exc)[:200]!r}") from None

def compress_body(body: bytes, compressor: str) -> bytes:
    """prefix | compressor id | chunk count | chunk lengths | chunks (pergroup_pieces, or COMPRESS_CHUNK_BYTES each)."""
    if compressor == "pergroup":
        chunks = _map_parallel(pack_piece, pergroup_pieces(body))
    else:
        pieces = [body[i: i + COMPRESS_CHUNK_BYTES] for i in range(0, len(body), COMPRESS_CHUNK_BYTES)] or [b""]
        chunks = _map_parallel(lambda c: _compress(c, compressor), pieces)
    compressed = (bytes([ARTIFACT_COMPRESSOR_IDS[compressor]]) + CHUNK_COUNT.pack(len(chunks))
                  + b"".join(CHUNK_COUNT.pack(len(c)) for c in chunks) + b"".join(chunks))
    return ARTIFACT_PREFIX.pack(ARTIFACT_MAGIC, ARTIFACT_VERSION, zlib.crc32(compressed), len(compressed)) + compressed

def decompress_chunks(compressed: bytes, source: str) -> bytes:
    """Inverse of compress_body's part after the prefix (checked by the caller): the serialized body."""
    kind = {v: k for k, v in ARTIFACT_COMPRESSOR_IDS.items()}.get(compressed[0] if compressed else None)
    if kind is None:
        raise ArtifactError(f"{source}: corrupted artifact: unknown compressor id")
    try:
        (n,) = CHUNK_COUNT.unpack_from(compressed, 1)
        lengths = struct.unpack_from(f"<{n}I", compressed, 1 + CHUNK_COUNT.size)
        offset = 1 + CHUNK_COUNT.size * (n + 1)
        if offset + sum(lengths) != len(compressed):
            raise ValueError(f"{n} chunks of {sum(lengths)} bytes do not fill the {len(compressed) - offset}-byte body")
        bounds = np.cumsum([offset, *lengths]).tolist()
        chunks = [compressed[a:b] for a, b in zip(bounds, bounds[1:])]
        if kind == "pergroup" and b"\1" in {c[:1] for c in chunks} and not shutil.which("lrzip"):
            raise ArtifactError(f"{source}: COMPRESSOR=pergroup needs lrzip, not installed: apt-get install -y lrzip")
        unpack = (lambda c: unpack_piece(c, source)) if kind == "pergroup" else (lambda c: _compress(c, kind, True))
        return b"".join(_map_parallel(unpack, chunks))
    except ArtifactError:
        raise
    except Exception as exc:  # brotli.error / lzma.LZMAError / struct.error / ValueError: all mean corrupt
        raise ArtifactError(f"{source}: corrupted artifact: {type(exc).__name__}: {exc}") from None

def pack_quantized(quantized: dict[str, QuantTensor | Tensor], compressor: str = "brotli",
                   meta: dict[str, Any] | None = None) -> bytes:
    return compress_body(serialize_quantized(quantized, compressor, meta), compressor)

def serialize_quantized(quantized: dict[str, QuantTensor | Tensor], compressor: str = "brotli",
                        meta: dict[str, Any] | None = None) -> bytes:
    """header length | JSON header | raw arrays, no pickle: codes, LQER factors, scales, the rest (like with like)."""
    segments = []

    def add(t: Tensor) -> dict[str, int]:
        t = t.detach().cpu().contiguous()
        data = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()  # numpy has no bf16
        segments.append(byte_shuffle(data, t.element_size()))
        return {"offset": sum(map(len, segments[:-1])), "nbytes": len(data), "stride": t.element_size()}
    qts = {n: t for n, t in quantized.items() if isinstance(t, QuantTensor)}
    # pergroup: by role, so that each role's codes are one contiguous run (pergroup_pieces)
    qts = dict(sorted(qts.items(), key=lambda e: (code_role(e[0]) if compressor == "pergroup" else e[1].group, e[0])))
    entries = [{"name": n, "kind": "intq_row", "group": qt.group, "bits": qt.bits, "method": qt.method,
                "dtype": str(qt.dtype).removeprefix("torch."), "shape": list(qt.q.shape), "q": add(qt.q)}
               for n, qt in qts.items()]
    for e, qt in zip(entries, qts.values()):
        if qt.lqer is not None:
            qa, _, qb, _ = qt.lqer
            e["lqer"] = {"rank": qa.shape[1], "group": qt.lqer_group, "a": add(qa), "b": add(qb)}
    for e, qt in zip(entries, qts.values()):
        e["scale"] = add(qt.scale)
        if qt.lqer is not None:
            e["lqer"].update(a_scale=add(qt.lqer[1]), b_scale=add(qt.lqer[3]))
    for name in sorted(quantized.keys() - qts.keys()):
        t = quantized[name].detach()
        if t.dtype not in _TORCH_DTYPES.values():
            raise ArtifactError(f"{name}: dtype {t.dtype} cannot be stored in an artifact")
        to_fp16 = t.is_floating_point() and (t.numel() == 0 or t.abs().max().item() <= torch.finfo(torch.float16).max)
        kind, stored = ("fp16", t.half()) if to_fp16 else ("raw", t)  # exact where fp16 would overflow
        entries.append({"name": name, "kind": kind, "dtype": str(t.dtype).removeprefix("torch."),
                        "shape": list(t.shape), "data": add(stored)})
    header = json.dumps({"format": "pgolf-artifact", "version": ARTIFACT_VERSION, "compressor": compressor,
                         "tensors": entries, "meta": meta or {}}, sort_keys=True, separators=(",", ":")).encode()
    return struct.pack("<I", len(header)) + header + b"".join(segments)

def artifact_body(blob: bytes, source: str = "artifact") -> bytes:
    """The serialized body: prefix checked (magic, version, length, CRC32), then decompressed."""
    if len(blob) < ARTIFACT_PREFIX.size:
        raise ArtifactError(f"{source}: truncated artifact: {len(blob)} bytes, shorter than its "
                            f"{ARTIFACT_PREFIX.size}-byte prefix")
    magic, version, crc, length = ARTIFACT_PREFIX.unpack_from(blob)
    if magic != ARTIFACT_MAGIC:
        raise ArtifactError(f"{source}: not a train_gpt.py artifact (magic {magic!r}, expected {ARTIFACT_MAGIC!r})")
    if version != ARTIFACT_VERSION:
        raise ArtifactError(f"{source}: unsupported artifact version {version} (this script reads version "
                            f"{ARTIFACT_VERSION})")
    compressed = blob[ARTIFACT_PREFIX.size:]
    if len(compressed) != length:
        raise ArtifactError(f"{source}: truncated or padded artifact: body is {len(compressed)} bytes, prefix says "
                            f"{length}")
    if zlib.crc32(compressed) != crc:
        raise ArtifactError(f"{source}: corrupted artifact: CRC32 mismatch")
    return decompress_chunks(compressed, source)

def unpack_body(body: bytes, source: str = "artifact") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Inverse of serialize_quantized: (dequantized state in the original dtypes, metadata)."""
    try:
        (hlen,) = struct.unpack_from("<I", body)
        header = json.loads(body[4: 4 + hlen])
    except (struct.error, ValueError) as exc:  # JSON and UnicodeDecode errors are ValueErrors
        raise ArtifactError(f"{source}: corrupted artifact: {type(exc).__name__}: {exc}") from None
    if (4 + hlen > len(body) or not isinstance(header, dict) or header.get("format") != "pgolf-artifact"
            or header.get("version") != ARTIFACT_VERSION or not isinstance(header.get("tensors"), list)):
        raise ArtifactError(f"{source}: corrupted artifact: header is not a version-{ARTIFACT_VERSION} pgolf-artifact "
                            "header")
    payload = memoryview(body)[4 + hlen:]

    def segment(seg: dict[str, int], dtype: torch.dtype, shape: list[int]) -> Tensor:
        if seg["offset"] + seg["nbytes"] > len(payload):
            raise ArtifactError(f"{source}: corrupted artifact: segment past the end of the payload")
        raw = byte_shuffle(bytes(payload[seg["offset"]: seg["offset"] + seg["nbytes"]]), seg["stride"], undo=True)
        as_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
        t = torch.frombuffer(bytearray(raw), dtype=as_dtype) if raw else torch.empty(0, dtype=as_dtype)  # 0 bytes
        return t.view(dtype).reshape(shape).clone()
    state = {}
    for e in header["tensors"]:
        try:
            dtype = _TORCH_DTYPES[e["dtype"]]
            if e["kind"] == "intq_row":
                (rows, cols), lq, g = e["shape"], None, 0
                if "lqer" in e:
                    r, g = e["lqer"]["rank"], e["lqer"].get("group", 0)
                    lq = (segment(e["lqer"]["a"], torch.int8, [rows, r]),
                          segment(e["lqer"]["a_scale"], torch.float16, [1, 1] if g else [rows, 1]),
                          segment(e["lqer"]["b"], torch.int8, [r, cols]),
                          segment(e["lqer"]["b_scale"], torch.float16, [r * cols // g, 1] if g else [r, 1]))
                qt = QuantTensor(e["group"], e["bits"], segment(e["q"], torch.int8, e["shape"]),
                                 segment(e["scale"], torch.float16, [rows]), dtype, e["method"], lq, g)
                state[e["name"]] = qt.dequantize()
            elif e["kind"] in ("fp16", "raw"):
                stored = torch.float16 if e["kind"] == "fp16" else dtype
                state[e["name"]] = segment(e["data"], stored, e["shape"]).to(dtype)
            else:
                raise ValueError(f"unknown tensor kind {e['kind']!r}")
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            name = e.get("name", "?") if isinstance(e, dict) else "?"
            raise ArtifactError(f"{source}: corrupted artifact: tensor {name!r}: {type(exc).__name__}: {exc}") from None
    return state, header.get("meta", {})

@dataclass
class FitResult:
    blob: bytes
    spec: QuantSpec
    attempts: list[dict[str, Any]]
    entropy: dict[str, dict[str, float]]
    quant_seconds: float
    fits: bool

def fit_artifact(state: dict[str, Tensor], spec: QuantSpec, hessians: dict[str, Tensor] | None, budget_bytes: int,
                 meta: dict[str, Any], log: Callable[[str], None]) -> FitResult:
    """Quantize and pack, widening matrix SDClip k while over budget: each doubling ~1 bit/param less (PR #1394)."""
    t0, attempts = time.perf_counter(), []
    factor, last, blob = 1.0, None, None  # last: (entropy bytes, compressed bytes) of the last packed attempt
    ratio = PERGROUP_RATIO if spec.compressor == "pergroup" else 1.0
    for attempt in range(1, FIT_MAX_ATTEMPTS + 1):
        s = dataclasses.replace(spec, clip=tuple((g, k if g == "embed" else k * factor) for g, k in spec.clip))
        quantized = quantize_state(state, s, hessians, log)
        entropy = quant_entropy_bytes(quantized)
        ent = sum(g["entropy_bytes"] for g in entropy.values())
        predicted = None if last is None else last[1] + (ent - last[0]) * ratio
        blob = pack_quantized(quantized, s.compressor, meta) if predicted is None or predicted <= budget_bytes else None
        size = round(predicted) if blob is None else len(blob)
        last = last if blob is None else (ent, size)
        attempts.append({"attempt": attempt, "factor": factor, "bytes": size, "compressed": blob is not None})
        log(format_kv(fit_attempt=attempt, k_factor=f"{factor:.4f}", bytes_model=size, budget=budget_bytes,
                      size="packed" if blob is not None else "predicted", **{f"k_{g}": f"{k:.3f}" for g, k in s.clip}))
        if blob is not None and size <= budget_bytes:
            return FitResult(blob, s, attempts, entropy, time.perf_counter() - t0, True)
        stuck = ""  # where a wider factor changes nothing: say so once rather than run k_factor off to 1e23
        if not any(k > 0 for g, k in s.clip if g in ("attn", "mlp")):
            stuck = ("MLP_CLIP_SIGMAS=ATTN_CLIP_SIGMAS=0 clip at each row's max, which no factor widens "
                     "(MATRIX_CLIP_SIGMAS > 0 clips at k sigmas)")
        elif len(attempts) >= 2 and size >= attempts[-2]["bytes"]:
            stuck = f"k_factor {factor:.4g} no longer shrinks the artifact"
        if stuck:
            warn(log, f"fit-to-size stops at {size:,} model bytes, over the budget of {budget_bytes:,}: {stuck}; "
                      f"lower MATRIX_BITS or raise TARGET_BYTES")
        matrix_params = sum(v["params"] for g, v in entropy.items() if g not in ("embed", "gate"))
        if stuck or matrix_params == 0:
            break
        step = FIT_OVERSHOOT * 8 * (size - budget_bytes) / ratio / matrix_params  # log2 k to add (entropy rule)
        if len(attempts) >= 2:  # or more, where the last two attempts' bytes saved per doubling of k (> 0) ask it
            (f0, b0), (f1, b1) = [(a["factor"], a["bytes"]) for a in attempts[-2:]]
            step = max(step, FIT_OVERSHOOT * (size - budget_bytes) / ((b0 - b1) / (math.log2(f1) - math.log2(f0))))
        factor *= 2.0 ** step
    blob = blob if blob is not None else pack_quantized(quantized, s.compressor, meta)
    return FitResult(blob, s, attempts, entropy, time.perf_counter() - t0, False)

@torch.no_grad()
def collect_hessians(model: "GPT", batches: Iterable[Tensor], device: torch.device, compute_dtype: str,
                     forward: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """fp32 H = sum x^T x of each quantized matrix's input over `batches` (tied embedding: the head's, PR #1394)."""
    at = model.tok_emb.weight.device
    hessians: dict[str, Tensor] = {}
    for name, m in model.named_modules():
        shares_q = name.endswith((".c_k", ".c_v"))  # c_q's input, tapped once (below)
        if isinstance(m, TappedLinear) and is_quantized(f"{name}.weight", m.weight) and not shares_q:
            m.hessian = hessians[f"{name}.weight"] = torch.zeros(m.in_features, m.in_features, device=at)
    hessians.update({f"{name}.{kv}.weight": m.c_q.hessian for name, m in model.named_modules()
                     if isinstance(m, CausalSelfAttention) for kv in ("c_k", "c_v")})
    head = "tok_emb.weight" if model.lm_head is None else "lm_head.weight"
    model.head_hessian = hessians[head] = torch.zeros(model.cfg.model_dim, model.cfg.model_dim, device=at)
    forward = forward or model.hidden
    try:
        for ids in batches:
            with compute_autocast(device, compute_dtype):
                forward(ids.contiguous())
    finally:  # disarm the taps
        for m in model.modules():
            if isinstance(m, TappedLinear):
                m.hessian = None
        model.head_hessian = None
    return hessians

def gather_hessians(h: Hyperparameters, d: DistInfo, model: "GPT", loader: TrainLoader, batches: int,
                    forward: Callable[[Tensor], Tensor] | None = None) -> tuple[dict[str, Tensor], float]:
    """GPTQ Hessians of `batches` training batches (each rank its share of each) summed over ranks, and the seconds."""
    # Rows of TRAIN_SEQ_LEN (a packed batch is one long row), attending across documents as PR #1855's.
    ids = (loader.next_batch()[0].reshape(-1, h.train_seq_len) for _ in range(batches * h.accum_steps))
    synchronize(d.device)
    t0 = time.perf_counter()
    hessians = collect_hessians(model, ids, d.device, h.compute_dtype, forward)
    for t in {id(t): t for _, t in sorted(hessians.items())}.values():  # in name order, a shared tensor once
        all_reduce_(t)
    synchronize(d.device)
    return hessians, time.perf_counter() - t0

def measure_gptq_reserve(h: Hyperparameters, d: DistInfo, model: "GPT", forward: Callable[[Tensor], Tensor],
                         make_loader: Callable[[], TrainLoader]) -> float:
    """GPTQ_RESERVE_SECONDS=auto: the slower of two timed batches x batches x GPTQ_RESERVE_SAFETY + a pad."""
    loader, looping = make_loader(), model.looping
    model.set_looping(h.num_loops > 0)  # as at the end of training
    try:
        worst = max(gather_hessians(h, d, model, loader, 1, forward)[1] for _ in range(2))
    finally:
        loader.close()
        model.set_looping(looping)
    reserve = worst * h.gptq_calibration_batches * GPTQ_RESERVE_SAFETY + GPTQ_RESERVE_PAD_S
    return float(all_reduce_(torch.tensor(reserve, device=d.device), op="max"))  # the slowest rank's

@dataclass
class Calibration:
    hessians: dict[str, Tensor] | None
    source: str  # "train_data" | "off"
    seconds: float
    tokens: int  # calibration tokens over all ranks

def calibrate_gptq(h: Hyperparameters, d: DistInfo, model: "GPT", forward: Callable[[Tensor], Tensor],
                   make_loader: Callable[[], TrainLoader]) -> Calibration:
    """GPTQ Hessians on GPTQ_CALIBRATION_BATCHES training batches: data access, inside the wallclock (PR #1868)."""
    if h.quant_method != "gptq":
        return Calibration(None, "off", 0.0, 0)
    synchronize(d.device)
    t0 = time.perf_counter()
    loader = make_loader()
    try:
        hessians, _ = gather_hessians(h, d, model, loader, h.gptq_calibration_batches, forward)
    finally:
        loader.close()
    synchronize(d.device)
    return Calibration(hessians, "train_data", time.perf_counter() - t0,
                       h.gptq_calibration_batches * h.train_batch_tokens)

def report_size(h: Hyperparameters, bytes_model: int, bytes_code: int, log: Logger) -> int:
    bytes_total = bytes_model + bytes_code
    log(format_kv(bytes_model=bytes_model, bytes_code=bytes_code, bytes_total=bytes_total, target=h.target_bytes,
                  limit=ARTIFACT_LIMIT_BYTES))
    for what, limit in (("TARGET_BYTES", h.target_bytes), ("challenge", ARTIFACT_LIMIT_BYTES)):
        if bytes_total > limit:
            invalid = ": this run is not a valid submission" if what == "challenge" else ""
            warn(log, f"bytes_total {bytes_total:,} is OVER the {what} limit of {limit:,} bytes by "
                      f"{bytes_total - limit:,} bytes{invalid}", banner=True)
    return bytes_total

def log_calibration(rc: RunContext, calib: Calibration, train_time_s: float, reserve: float) -> float:
    """Log calibration, loud when training data was read after the cap; returns when it was last read (s)."""
    cap, access_end = rc.h.max_wallclock_seconds, train_time_s + calib.seconds
    if calib.source == "off":
        return access_end
    rc.clock.record("calibration", calib.seconds, calib.tokens)
    rc.log(format_kv(gptq_calibration=calib.source, tokens=calib.tokens, time=f"{calib.seconds * 1000:.0f}ms",
                     train_data_access_end=f"{access_end * 1000:.0f}ms",
                     cap=f"{cap * 1000:.0f}ms" if cap > 0 else "none"))
    if cap > 0 and access_end > cap:
        warn(rc.log, f"training data was read until {access_end:.2f}s, after the {cap:g}s cap: raise "
                     f"GPTQ_RESERVE_SECONDS (the reserve was {reserve:.2f}s)", banner=True)
    return access_end

def available_compressor(h: Hyperparameters, code_bytes: int, log: Logger) -> Hyperparameters:
    """COMPRESSOR=pergroup where lrzip is installed; else brotli, with a warning of the bytes that costs."""
    if h.compressor != "pergroup" or h.eval_only or shutil.which("lrzip"):
        return h
    lost = (h.target_bytes - h.size_margin_bytes - code_bytes) * (1 / PERGROUP_RATIO - 1)
    warn(log, f"COMPRESSOR=pergroup needs lrzip (apt-get install -y lrzip): brotli instead, ~{lost:,.0f} bytes more "
              f"for the same model", banner=True)
    return dataclasses.replace(h, compressor="brotli")

# Left out of an artifact's config (the same run twice writes the same bytes); EVAL_ONLY reads them from the env.
EVAL_ONLY_ENV_KNOBS = frozenset({
    "preset", "data_dir", "data_path", "tokenizer_path", "sample_data", "run_id", "log_dir", "device", "compute_dtype",
    "compile", "dry_run", "strict_env", "eval_only", "artifact", "attn_backend", "overwrite", "requantize",
    "eval_seq_len", "eval_stride", "eval_batch_seqs", "bpb_check_docs", "max_val_tokens", "eval_time_budget_seconds",
    "ttt_enabled", "ttt_momentum", "ttt_chunk_tokens", "ttt_grad_clip", "ttt_lora_rank", "ttt_lora_alpha",
    "ttt_lora_lr", "ttt_weight_decay", "ttt_batch_size", "ttt_chunk_size", "ttt_warm_start_a", "phased_ttt_prefix_docs",
    "phased_ttt_num_phases", "global_ttt_lr", "global_ttt_epochs",
})

def write_artifact(rc: RunContext, model: GPT, hessians: dict[str, Tensor] | None, steps: int) -> tuple[Path, dict]:
    """Quantize to fit the budget, write <RUN_ID>.ptz atomically (rank 0); returns its path and the quant report."""
    h, log, code = rc.h, rc.log, rc.code
    # An incomplete log makes no valid run: no artifact, what was trained is kept for REQUANTIZE.
    stop_on_output_failure(rc, None, lambda: kept_weights(rc, model, hessians, steps))
    artifact_path = rc.files.path(".ptz")
    log(format_kv(code_bytes=len(code)))
    budget = h.target_bytes - h.size_margin_bytes - len(code)
    log(format_kv(target_bytes=h.target_bytes, target_note="decimal bytes (TARGET_MB=15.9 means 15,900,000; "
                  "15.9 MiB would be over the 16,000,000 cap)", size_margin=h.size_margin_bytes, model_budget=budget))
    report, failure = {}, None
    if rc.d.is_main:
        config = {k: v for k, v in h.knob_values().items() if k.lower() not in EVAL_ONLY_ENV_KNOBS}
        meta = {"code_sha256": hashlib.sha256(code).hexdigest(), "config": config, "steps": steps,
                "looping": model.looping, "preset": h.preset,  # EVAL_ONLY refuses other data, notes another PRESET
                "data": {k: rc.data.fingerprint[k] for k in ("tokenizer_sha256", "val_sha256")}}
        fit = fit_artifact(model.state_dict(), QuantSpec.from_hparams(h), hessians, budget, meta, log)
        try:
            atomic_write_bytes(artifact_path, fit.blob)
        except OSError as exc:
            failure = (f"{artifact_path}: could not write the artifact ({exc.strerror or exc}); "
                       f"{kept_weights(rc, model, hessians, steps)}")
        rc.clock.record("quantization", fit.quant_seconds)
        report.update(fits=fit.fits, attempts=fit.attempts, quant_seconds=fit.quant_seconds,
                      clip_sigmas=dict(fit.spec.clip), bits=dict(fit.spec.bits), entropy=fit.entropy)
        log(format_kv(quant=fit.spec.method, fits=int(fit.fits), attempts=len(fit.attempts),
                      quant_time=f"{fit.quant_seconds * 1000:.0f}ms",
                      **{f"k_{g}": f"{k:.3f}" for g, k in fit.spec.clip}, **{f"bits_{g}": b for g, b in fit.spec.bits}))
        for group, e in fit.entropy.items():
            log(format_kv(quant_group=group, params=e["params"],
                          entropy_bits_per_param=f"{e['entropy_bits_per_param']:.4f}",
                          entropy_bytes=round(e["entropy_bytes"])))
        if not fit.fits:
            warn(log, f"the artifact did not fit the budget of {budget:,} model bytes after {len(fit.attempts)} "
                      f"attempts; raise MATRIX_CLIP_SIGMAS or lower MATRIX_BITS")
    failure = broadcast_object(failure)  # every rank stops together
    if failure:
        raise OutputError(failure)
    return artifact_path, report

# ==== Evaluation ====

@dataclass(frozen=True)
class EvalResult:
    val_loss: float  # nats per token
    val_bpb: float
    tokens: int
    bytes: int
    seconds: float

def result_from_sums(sums: Tensor, t0: float) -> EvalResult:
    """All-reduce this rank's (nats, targets, bytes) into a result timed from t0."""
    all_reduce_(sums)
    nats, tokens, n_bytes = sums.tolist()
    return EvalResult(nats / tokens, bpb_from_sums(nats, tokens, n_bytes), int(tokens), int(n_bytes),
                      time.perf_counter() - t0)

@dataclass(frozen=True)
class EvalContext:
    """What every evaluation reads; stride: EVAL_STRIDE (seq_len without sliding); batch_seqs: windows per forward."""
    model: Callable[..., Tensor]
    tokens: Tensor  # int64 validation stream on the device; target j is tokens[j + 1]
    luts: ByteLUTs
    seq_len: int
    stride: int
    batch_seqs: int
    rank: int
    world_size: int
    device: torch.device
    compute_dtype: str
    sidecar: Tensor | None = None  # CASEOPS_ENABLED: each token's original bytes (replaces the byte tables)
    lora: Callable[..., Tensor] | None = None  # phased TTT's compiled chunk forward (Graphs.lora); None: eager

    @classmethod
    def build(cls, h: Hyperparameters, d: DistInfo, graphs: "Graphs", data: "DataBundle") -> "EvalContext":
        tokens = torch.from_numpy(np.asarray(data.val_tokens, dtype=np.int64)).to(d.device)
        sidecar = None if data.sidecar is None else torch.from_numpy(data.sidecar).to(d.device)
        return cls(graphs.model, tokens, data.luts, h.eval_seq_len, h.eval_stride if h.sliding else h.eval_seq_len,
                   h.eval_batch_seqs, d.rank, d.world_size, d.device, h.compute_dtype, sidecar, graphs.lora)

    def target_bytes(self, x: Tensor, y: Tensor, pos: Tensor) -> Tensor:
        """Bytes of targets y (inputs x, stream positions pos): the CaseOps sidecar's count, else the byte tables'."""
        return count_target_bytes(x, y, self.luts) if self.sidecar is None else self.sidecar[pos]

    @property
    def n_targets(self) -> int:
        return self.tokens.numel() - 1

    def autocast(self):
        return compute_autocast(self.device, self.compute_dtype)

def score_windows(ctx: EvalContext, starts: np.ndarray, first: np.ndarray) -> Tensor:
    """Sum of (nats, targets, bytes) over the windows, batch_seqs a forward (the last batch padded: one graph)."""
    sums, n = torch.zeros(3, dtype=torch.float64, device=ctx.device), starts.size
    starts_t, first_t = (torch.from_numpy(a).to(ctx.device) for a in (starts, first))
    offsets, rows = (torch.arange(v, device=ctx.device) for v in (ctx.seq_len + 1, ctx.batch_seqs))
    for b in range(0, n, ctx.batch_seqs):
        idx = (b + rows).clamp_max(n - 1)
        pos = starts_t[idx][:, None] + offsets  # each window's stream positions
        win = ctx.tokens[pos]
        x, y = win[:, :-1], win[:, 1:]
        mask = (offsets[None, :-1] >= first_t[idx][:, None]) & (b + rows < n)[:, None]
        with ctx.autocast():
            nll = ctx.model(x, y, reduction="none")
        n_bytes = ctx.target_bytes(x, y, pos[:, 1:])
        sums += torch.stack([(nll.double() * mask).sum(), mask.sum().double(), (n_bytes * mask).sum().double()])
    return sums

@torch.no_grad()
def eval_windows(ctx: EvalContext, stride: int) -> EvalResult:
    """Each target scored exactly once, seq_len windows every `stride` tokens (PR #50; stride = seq_len: plain eval)."""
    t0 = time.perf_counter()
    starts, first = sliding_windows(ctx.n_targets, ctx.seq_len, stride)
    lo, hi = starts.size * ctx.rank // ctx.world_size, starts.size * (ctx.rank + 1) // ctx.world_size
    return result_from_sums(score_windows(ctx, starts[lo:hi], first[lo:hi]), t0)

@dataclass(frozen=True)
class TTTConfig:
    lr: float
    epochs: int
    momentum: float
    chunk_tokens: int
    grad_clip: float

    @classmethod
    def global_phase(cls, h: Hyperparameters) -> "TTTConfig":
        """Phased TTT's SGD on the base weights (GLOBAL_TTT_*; momentum, chunk and clip shared with TTT_*)."""
        return cls(h.global_ttt_lr, h.global_ttt_epochs, h.ttt_momentum, h.ttt_chunk_tokens, h.ttt_grad_clip)

TTT_LORA_BETAS = (0.0, 0.99)  # AdamW betas of the LoRA adapters: no momentum (PR #1530; beta2 0.99 as the top's)
TTT_LORA_EPS = 1e-10

class DocLoRA:
    """Per-document LoRA (PR #1530) on Q, K, V, O, MLP of every virtual layer and the head; B = 0: base scores first."""

    def __init__(self, model: GPT, docs: int, rank: int, alpha: float, seed: int):
        cfg, device, self.scale = model.cfg, model.tok_emb.weight.device, alpha / rank
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        C, kv = cfg.model_dim, cfg.num_kv_heads * (cfg.model_dim // cfg.num_heads)
        self.params: list[Tensor] = []

        def adapter(n_in: int, n_out: int) -> Adapter:
            self.params += [torch.zeros(docs, rank, n_in, device=device, requires_grad=True),
                            torch.zeros(docs, n_out, rank, device=device, requires_grad=True)]
            return self.params[-2], self.params[-1], self.scale

        self.slots = [LoRASlot(adapter(C, C), adapter(C, kv), adapter(C, kv), adapter(C, C), adapter(C, C))
                      for _ in model.layouts[model.looping]]
        self.head = adapter(C, cfg.vocab_size)
        self.reset(warm_a=False)

    def rows(self, k: int, first: int = 0) -> "LoRAView":
        """The adapters of documents first..k-1 (views: gradients reach the full tensors)."""
        cut = lambda ad: (ad[0][first:k], ad[1][first:k], ad[2])  # noqa: E731
        return LoRAView([LoRASlot(*map(cut, slot)) for slot in self.slots], cut(self.head))

    @torch.no_grad()
    def reset(self, warm_a: bool) -> None:
        """New documents: B = 0 (the base model again); A re-drawn unless kept (TTT_WARM_START_A, PR #1767)."""
        for a, b in zip(self.params[0::2], self.params[1::2]):
            b.zero_()
            if not warm_a:  # nn.Linear's init range for A, drawn on the CPU so every device gets the same A
                bound = 1.0 / math.sqrt(a.size(-1))
                a.copy_(torch.empty(a.shape).uniform_(-bound, bound, generator=self.gen))

@dataclass(frozen=True)
class LoRATTTConfig:
    rank: int
    alpha: float
    lr: float
    weight_decay: float
    batch_docs: int
    chunk: int
    warm_start_a: bool
    prefix_docs: int
    phases: int
    seed: int

    @classmethod
    def from_hparams(cls, h: Hyperparameters) -> "LoRATTTConfig":
        return cls(h.ttt_lora_rank, h.ttt_lora_alpha, h.ttt_lora_lr, h.ttt_weight_decay, h.ttt_batch_size,
                   h.ttt_chunk_size, h.ttt_warm_start_a, h.phased_ttt_prefix_docs, h.phased_ttt_num_phases, h.seed)

def ttt_documents(tokens: np.ndarray, n_targets: int) -> list[tuple[int, int]]:
    """[lo, hi) input positions of each document, from its BOS (or 0) to the next one's, covering 0..n_targets."""
    starts = np.union1d([0], np.flatnonzero(tokens[:n_targets] == BOS_ID))
    return [(int(a), int(b)) for a, b in zip(starts, np.append(starts[1:], n_targets))]

def lora_batches(lengths: np.ndarray, batch_docs: int) -> list[tuple[int, list[int]]]:
    """(index in the cut, documents) of each LoRA batch, cut by length from the shortest, longest first (PR #1855)."""
    order = np.argsort(lengths, kind="stable")
    cut = [order[j: j + batch_docs].tolist() for j in range(0, order.size, batch_docs)]
    return sorted(enumerate(cut), key=lambda ib: -int(lengths[ib[1][-1]]))

def phase_bounds(n_docs: int, prefix_docs: int, phases: int) -> list[int]:
    """Documents scored by each global SGD pause (PR #1855): prefix*(k+1)/phases, the prefix at most all."""
    return [min(prefix_docs, n_docs) * (k + 1) // phases for k in range(phases)] if prefix_docs else []

def ttt_schedule(costs: list[int], sizes: list[int], bounds: list[int], world: int) -> tuple[list, list[int]]:
    """(per segment each rank's batches, per pause the batches before it): free ranks claim the next (PR #1855)."""
    segments, pauses, q, done = [], [], 0, 0
    while q < len(costs):
        share: list[list[int]] = [[] for _ in range(world)]
        busy, paused = [(-1, r, -1) for r in range(world)], False  # (time free, rank, batch done): all free first
        while busy:
            t, r, j = heapq.heappop(busy)
            if j >= 0:
                done += sizes[j]
                paused = paused or (len(pauses) < len(bounds) and done >= bounds[len(pauses)])
            if not paused and q < len(costs):
                heapq.heappush(busy, (max(t, 0) + costs[q], r, q))  # estimated costs: ranks plan alike, no collective
                share[r].append(q)
                q += 1
        segments.append(share)
        if paused and q < len(costs):
            pauses.append(q)
    return segments, pauses

def phase_documents(batches: list[tuple[int, list[int]]], scored: int, n_docs: int) -> list[int]:
    """A pause's documents (PR #1855): the first n_docs of the batches scored so far, in the order they were cut."""
    return [d for _, docs in sorted(batches[:scored]) for d in docs][:n_docs]

class LoRAWalk(NamedTuple):
    """Plan of one LoRA batch, longest document first (PR #1855); c: chunk, r: row (a document)."""
    rows: list[int]  # per chunk: its rows (>= 2, see lora_nll)
    width: list[int]  # per chunk: its window width (>= 3)
    start: np.ndarray  # (chunks, rows): the window's first stream position
    col: np.ndarray  # (chunks, rows): the column its targets start after
    n: np.ndarray  # (chunks, rows): how many targets it scores
    learn: np.ndarray  # (chunks, rows): the document has a later chunk, so this one is trained on

    @classmethod
    def plan(cls, spans: list[tuple[int, int]], chunk: int, seq_len: int) -> "LoRAWalk":
        spans = sorted(spans, key=lambda span: span[0] - span[1])
        first, lengths = (np.array(v, dtype=np.int64) for v in zip(*(spans * (1 + (len(spans) < 2)))))
        lengths = lengths - first
        last = (lengths - 1) // chunk
        lo = np.arange(last[0] + 1) * chunk
        hi = np.minimum(lo + chunk, lengths[0])
        end = np.minimum(hi[:, None], lengths[None, :])
        own = np.maximum(0, end - seq_len)
        n = np.maximum(0, end - lo[:, None]) * (np.arange(lengths.size) < len(spans))  # a padding row scores nothing
        rows = [max(2, int((last >= c).sum())) for c in range(lo.size)]
        return cls(rows, [max(3, int(v)) for v in hi - np.maximum(0, hi - seq_len)], first[None, :] + own,
                   lo[:, None] - own, n, (np.arange(lo.size)[:, None] < last[None, :]) & (n > 0))

    def cost(self) -> int:
        """Window tokens through the model: the work the ranks are balanced on."""
        return int(sum(k * w for k, w in zip(self.rows, self.width)))

def lora_chunk_nll(model: GPT, x: Tensor, cols: Tensor, y: Tensor, lora: LoRAView) -> Tensor:
    """Nats of the targets y (rows, M) at window positions cols: only they reach the head."""
    return softcapped_cross_entropy(model.raw_logits(x, lora=lora, cols=cols).float(), y, model.cfg.logit_softcap)

def lora_nll(model: GPT, lora: LoRAView, x: Tensor, cols: Tensor, y: Tensor, ctx: EvalContext) -> Tensor:
    """lora_chunk_nll, compiled where ctx.lora is: one graph, rows >= 2 and width >= 3 dynamic (never specialized)."""
    if ctx.lora is not None:
        for t in (x, cols, y, *(w for ad in [*(a for s in lora.slots for a in s), lora.head] for w in ad[:2])):
            torch._dynamo.mark_dynamic(t, 0, min=2, max=1 << 30)
        torch._dynamo.mark_dynamic(x, 1, min=3, max=ctx.seq_len)  # the RoPE base is fixed up to ROPE_TRAIN_SEQ_LEN
    with ctx.autocast():
        return lora_chunk_nll(model, x, cols, y, lora) if ctx.lora is None else ctx.lora(x, cols, y, lora)

def row_groups(k: int, group: int) -> list[tuple[int, int]]:
    """k rows in the fewest near-equal parts of at most `group` rows, each of at least 2 (see lora_nll)."""
    parts = max(1, min(-(-k // group), k // 2))
    cuts = [k * i // parts for i in range(parts + 1)]
    return list(zip(cuts, cuts[1:]))

def score_lora_batch(model: GPT, lora: "DocLoRA", ctx: EvalContext, docs: list[tuple[int, int]],
                     cfg: LoRATTTConfig, every: int, group: int = 1 << 30) -> Tensor:
    """Score chunk by chunk, stepping the adapters every `every` chunks (0: never; PR #1855); `group` rows a forward."""
    walk = LoRAWalk.plan(docs, cfg.chunk, ctx.seq_len)
    start, col, n, learn = (torch.from_numpy(a).to(ctx.device) for a in (walk.start, walk.col, walk.n, walk.learn))
    opt = torch.optim.AdamW(lora.params, lr=cfg.lr, betas=TTT_LORA_BETAS, eps=TTT_LORA_EPS,
                            weight_decay=cfg.weight_decay)
    sums, j = torch.zeros(3, dtype=torch.float64, device=ctx.device), torch.arange(cfg.chunk, device=ctx.device)
    for c, (k, width) in enumerate(zip(walk.rows, walk.width)):
        step = every and c % every == 0 and c + 1 < len(walk.rows)
        for a, b in row_groups(k, group):
            pos = (start[c, a:b, None] + torch.arange(width + 1, device=ctx.device)).clamp_max(ctx.n_targets)
            win = ctx.tokens[pos]
            cols = (col[c, a:b, None] + j).clamp_max(width - 1)
            x, y = win[:, :-1], win.gather(1, cols + 1)
            nll = lora_nll(model, lora.rows(b, a), x, cols, y, ctx)  # with gradients: one graph, the top's too
            mask = j < n[c, a:b, None]
            n_bytes = ctx.target_bytes(x.gather(1, cols), y, pos.gather(1, cols + 1))
            scored = nll.detach().double() * mask
            sums += torch.stack([scored.sum(), mask.sum().double(), (n_bytes * mask).sum().double()])
            if step:  # each document's adapters: the gradient of its own chunk's mean loss
                (nll.mean(1) * learn[c, a:b]).sum().backward()
        if step:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return sums

def lora_rows_per_forward(ctx: EvalContext, model: GPT, lora: "DocLoRA", cfg: LoRATTTConfig) -> tuple[int, float]:
    """(rows per forward, MiB per row): a whole batch unless on CUDA that passes 80% of free memory (2-row probe)."""
    if ctx.device.type != "cuda":
        return cfg.batch_docs, 0.0
    torch.cuda.synchronize(ctx.device)
    torch.cuda.reset_peak_memory_stats(ctx.device)
    used, free = torch.cuda.memory_allocated(ctx.device), torch.cuda.mem_get_info(ctx.device)[0]
    gen = torch.Generator(device="cpu").manual_seed(0)
    win = torch.randint(0, model.cfg.vocab_size, (2, ctx.seq_len + 1), generator=gen).to(ctx.device)
    cols = (ctx.seq_len - cfg.chunk + torch.arange(cfg.chunk, device=ctx.device)).clamp(0, ctx.seq_len - 1)
    cols = cols.expand(2, -1).contiguous()  # the chunk step's shape: no graph of its own
    lora_nll(model, lora.rows(2), win[:, :-1], cols, win.gather(1, cols + 1), ctx).mean().backward()
    for p in lora.params:
        p.grad = None
    per_row = max((torch.cuda.max_memory_allocated(ctx.device) - used) / 2, 1.0)
    return max(2, min(cfg.batch_docs, int(0.8 * free / per_row))), per_row / 2**20

def with_frozen(params: list[nn.Parameter], fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) with params' requires_grad off: a LoRA backward skips their gradients (and it guards the graph)."""
    for p in params:
        p.requires_grad_(False)
    try:
        return fn(*args)
    finally:
        for p in params:
            p.requires_grad_(True)

@dataclass
class PhasedTTT:
    """One phased LoRA TTT evaluation: the eager model, the documents (and their host stream), adapters, phase SGD."""
    ctx: EvalContext
    model: GPT
    cfg: LoRATTTConfig
    sgd: TTTConfig
    docs: list[tuple[int, int]]
    tokens: np.ndarray
    every: int = 1  # chunks per LoRA step (0: scoring only; TTTGuard)

    def __post_init__(self) -> None:
        self.made = 0
        self.lora = self.adapters(self.cfg.batch_docs)
        self.base = [p for p in self.model.parameters() if p.requires_grad]
        self.group, self.mib_per_row = with_frozen(self.base, lora_rows_per_forward, self.ctx, self.model,
                                                   self.lora, self.cfg)

    def adapters(self, docs: int) -> DocLoRA:
        """A new adapter set (at least 2 rows, see LoRAWalk), drawn from a seed of its own: a run is reproducible."""
        self.made += 1
        return DocLoRA(self.model, max(docs, 2), self.cfg.rank, self.cfg.alpha, self.cfg.seed + self.made - 1)

    def score(self, batch: list[int]) -> Tensor:
        """One batch on the reused adapters, reset; a batch of another size gets a set of its own (PR #1855)."""
        lora = self.lora if len(batch) == self.cfg.batch_docs else self.adapters(len(batch))
        if lora is self.lora:
            lora.reset(warm_a=self.cfg.warm_start_a)
        return with_frozen(self.base, score_lora_batch, self.model, lora, self.ctx, [self.docs[d] for d in batch],
                           self.cfg, self.every, self.group)

    def global_sgd(self, doc_ids: list[int]) -> None:
        """All ranks: cosine-LR SGD of the base on scored docs by TTT_CHUNK_TOKENS, then new adapters (PR #1855)."""
        idx = np.concatenate([np.arange(lo, hi + 1) for lo, hi in (self.docs[d] for d in doc_ids)] or [[0]])
        stream, host = self.ctx.tokens[torch.from_numpy(idx).to(self.ctx.device)], self.tokens[idx]
        S, chunk, world = self.ctx.seq_len, self.sgd.chunk_tokens, self.ctx.world_size
        n_chunks = -(-(idx.size - 1) // chunk)
        opt = torch.optim.SGD(self.base, lr=self.sgd.lr, momentum=self.sgd.momentum)  # momentum anew each phase
        seqs = chunk // S  # every trained chunk is whole (the last is not trained)
        shares = [(seqs * r // world, seqs * (r + 1) // world) for r in range(world)]
        for c in range(n_chunks - 1):
            opt.param_groups[0]["lr"] = self.sgd.lr * 0.5 * (1.0 + math.cos(math.pi * c / max(n_chunks - 1, 1)))
            for _ in range(self.sgd.epochs):
                for b in range(0, max(e - s for s, e in shares), self.ctx.batch_seqs):
                    rows = [(min(s + b, e), min(s + b + self.ctx.batch_seqs, e)) for s, e in shares]
                    a, z = (c * chunk + v * S for v in rows[self.ctx.rank])
                    self.sgd_step(opt, stream[a:z + 1], host[a:z], 1.0 / sum(1 for lo, hi in rows if hi > lo))
        self.lora = self.adapters(self.cfg.batch_docs)

    def sgd_step(self, opt: torch.optim.Optimizer, tokens: Tensor, inputs: np.ndarray, weight: float) -> None:
        """SGD step on this rank's tokens (none: zero grad), cut at BOS and EVAL_SEQ_LEN (PR #1855), ranks averaged."""
        ctx, cfg = self.ctx, self.model.cfg
        for p in self.base:
            p.grad = torch.zeros_like(p)
        if inputs.size:
            x, y, cu = tokens[:-1], tokens[1:], None
            if cfg.doc_isolation:  # sequences at most the RoPE span the model was trained at
                cut = min(ctx.seq_len, cfg.train_seq_len)
                cu = torch.from_numpy(packed_cu_seqlens(inputs, BOS_ID, cut)).to(ctx.device)
            x, y = (x[None], y[None]) if cu is not None else (x.view(-1, ctx.seq_len), y.view(-1, ctx.seq_len))
            with ctx.autocast():
                loss = self.model(x, y, cu_seqlens=cu)
            (loss * weight).backward()
        sync_gradients(self.base, ctx.world_size, average=False)
        if self.sgd.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.base, self.sgd.grad_clip)
        opt.step()

@dataclass
class TTTGuard:
    """Phased TTT's time budget: a rank projected past it steps LoRA down (locally); a phase runs if all ranks fit."""
    budget_s: float
    log: Callable[[str], None]
    t0: float = field(default_factory=time.perf_counter)
    done: float = 0.0
    score_s: float = 0.0
    sgd_rate: float = 0.0
    steps_down: list = field(default_factory=list)

    def after_batch(self, ttt: PhasedTTT, cost: int, seconds: float, left: int, where: str) -> None:
        self.done, self.score_s = self.done + cost, self.score_s + seconds
        projected = time.perf_counter() - self.t0 + left * self.score_s / max(self.done, 1)
        if ttt.every and projected > self.budget_s:
            ttt.every = {1: 2, 2: 0}[ttt.every]  # chunks per LoRA step: every chunk, every 2nd, none
            self.done = self.score_s = 0.0  # the next projection measures the new rate
            self.steps_down.append((where, ttt.every))
            self.log(format_kv(ttt_degrade=f"lora_every:{ttt.every}" if ttt.every else "lora_off", at=where,
                               projected_s=f"{projected:.0f}", budget_s=f"{self.budget_s:.0f}"))

    def phase_fits(self, ctx: EvalContext, left: int, sgd_tokens: int) -> bool:
        mine = time.perf_counter() - self.t0 + left * self.score_s / max(self.done, 1) + sgd_tokens * self.sgd_rate
        projected = torch.tensor([mine], dtype=torch.float64, device=ctx.device)
        all_reduce_(projected, op="max")
        return projected.item() <= self.budget_s

def eval_ttt_lora(ctx: EvalContext, model: GPT, cfg: LoRATTTConfig, sgd: TTTConfig, budget_s: float,
                  log: Callable[[str], None]) -> tuple[EvalResult, dict[str, Any]]:
    """Phased score-first LoRA TTT (PR #1530 LoRA, PR #1610/#1626 phases, PR #1855 order): no token trained unscored."""
    tokens = ctx.tokens.cpu().numpy()
    docs = ttt_documents(tokens, ctx.n_targets)
    lengths = np.array([hi - lo for lo, hi in docs], dtype=np.int64)
    batches = lora_batches(lengths, cfg.batch_docs)
    bounds = phase_bounds(len(docs), cfg.prefix_docs, cfg.phases) if sgd.epochs else []
    costs = [LoRAWalk.plan([docs[d] for d in b], cfg.chunk, ctx.seq_len).cost() for _, b in batches]
    segments, pauses = ttt_schedule(costs, [len(b) for _, b in batches], bounds, ctx.world_size)
    ttt, guard = PhasedTTT(ctx, model, cfg, sgd, docs, tokens), TTTGuard(budget_s, log)
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    mine = [share[ctx.rank] for share in segments]
    left = sum(costs[j] for seg in mine for j in seg)
    info: dict[str, Any] = {"documents": len(docs), "batches": len(batches), "segments": len(mine),
                            "phases_set": len(bounds), "phases_planned": len(pauses), "phases_run": 0}
    # PHASED_TTT_NUM_PHASES counts global SGD pauses, as PR #1855's; one with nothing left to score is not ttt.
    log(format_kv(ttt_phases=len(bounds), boundaries=",".join(map(str, bounds)) or "none", pauses_planned=len(pauses),
                  unplanned_after_last_batch=len(bounds) - len(pauses)))
    log(format_kv(ttt_rows_per_forward=ttt.group, batch_docs=cfg.batch_docs, mib_per_row=f"{ttt.mib_per_row:.0f}"))
    for i, seg in enumerate(mine):
        ts = time.perf_counter()
        for j in seg:
            tb = time.perf_counter()
            sums += ttt.score(batches[j][1])
            left -= costs[j]
            guard.after_batch(ttt, costs[j], time.perf_counter() - tb, left, f"segment {i + 1} batch {j + 1}")
        score_s, t_sgd, phase = time.perf_counter() - ts, time.perf_counter(), None
        if i < len(pauses):  # every rank decides together (phase_fits is a collective)
            phase = phase_documents(batches, pauses[i], bounds[i])
            n_tok = int(lengths[phase].sum())
            if guard.phase_fits(ctx, left, n_tok):
                ttt.global_sgd(phase)
                guard.sgd_rate = (time.perf_counter() - t_sgd) / max(n_tok, 1)
                info["phases_run"] += 1
            else:
                phase, pauses = None, pauses[:i]
                log(format_kv(ttt_degrade="phases_off", segment=f"{i + 1}/{len(mine)}",
                              reason=f"projected TTT time would pass the {budget_s:.0f}s budget"))
        log(format_kv(ttt_phased=f"{i + 1}/{len(mine)}", documents=sum(len(batches[j][1]) for j in seg),
                      lora_batches=len(seg), score_s=f"{score_s:.1f}",
                      global_sgd_s=f"{time.perf_counter() - t_sgd:.1f}" if phase else "none",
                      elapsed_s=f"{time.perf_counter() - guard.t0:.1f}"))
    info["lora_steps_down"] = guard.steps_down
    return result_from_sums(sums, guard.t0), info

@dataclass
class Evaluations:
    results: dict[str, EvalResult]  # label -> result, in the order they ran
    seconds: float  # total eval time: artifact read + every evaluation + TTT
    ttt: dict[str, Any] | None

    @property
    def label(self) -> str:  # the score's: the last evaluation
        return list(self.results)[-1]

def log_result(label: str, r: EvalResult, log: Logger, **extra: Any) -> None:
    log(format_kv(**{f"{label}_val_loss": f"{r.val_loss:.8f}"}, val_bpb=f"{r.val_bpb:.8f}",
                  eval_time=f"{r.seconds * 1000:.0f}ms", val_tokens=r.tokens, val_bytes=r.bytes, **extra))

def run_evaluations(rc: RunContext, model: GPT, ctx: EvalContext, artifact_path: Path) -> Evaluations:
    """Timed evaluation: read the artifact, score its round trip, sliding windows, then TTT; the last is the score."""
    h, log, clock = rc.h, rc.log, rc.clock
    t0, blob = time.perf_counter(), artifact_path.read_bytes()
    body = artifact_body(blob, str(artifact_path))  # pergroup: 20-24 s in PR #1855's logs
    coder = {v: k for k, v in ARTIFACT_COMPRESSOR_IDS.items()}[blob[ARTIFACT_PREFIX.size]]  # what wrote it
    log(format_kv(decompress_s=f"{time.perf_counter() - t0:.2f}", compressor=coder))
    model.load_state_dict(unpack_body(body, str(artifact_path))[0], strict=True)
    clock.record("artifact_read", time.perf_counter() - t0)
    # The plain round trip always runs (a labelled line, and the quantization gap); sliding is the score.
    results = {"roundtrip": eval_windows(ctx, ctx.seq_len)}
    if h.sliding:
        results["sliding"] = eval_windows(ctx, ctx.stride)
    for label, r in results.items():
        log_result(label, r, log)
        clock.record(f"eval_{label}", r.seconds, r.tokens)
    ttt_info = None
    if h.ttt_enabled:
        budget = h.eval_time_budget_seconds - (time.perf_counter() - t0)
        r, ttt_info = eval_ttt_lora(ctx, model, LoRATTTConfig.from_hparams(h), TTTConfig.global_phase(h), budget, log)
        log_result("ttt", r, log, mode="phased_lora", documents=ttt_info["documents"],
                   phases=f"{ttt_info['phases_run']}/{ttt_info['phases_set']}")
        results["ttt"] = r
        clock.record("eval_ttt", r.seconds, r.tokens)
    ev = Evaluations(results, time.perf_counter() - t0, ttt_info)
    check = rc.data.check  # every target of the scored stream exactly once, with the verified bytes
    for label, r in results.items():
        if (r.tokens, r.bytes) != (check.targets, check.bytes):
            raise RuntimeError(f"{label} evaluation scored {r.tokens} targets / {r.bytes} bytes, expected "
                               f"{check.targets} / {check.bytes}: a target was skipped or scored twice")
    log(format_kv(coverage="exact", evaluations=",".join(results), scored_targets=check.targets,
                  bytes=check.bytes, note="every validation target scored exactly once in each evaluation"))
    log(format_kv(total_eval_time=f"{ev.seconds * 1000:.0f}ms", budget=f"{h.eval_time_budget_seconds * 1000:.0f}ms",
                  covers="artifact read + every evaluation + TTT (compiled in the untimed warm-up)"))
    return ev

TRAIN_LIMIT_S = 600.0  # challenge rules: training and evaluation are each capped at 10 minutes on 8xH100
EVAL_LIMIT_S = 600.0

def compliance_block(h: Hyperparameters, train_time_ms: float, data_access_end_ms: float, eval_s: float,
                     bytes_total: int, data: DataBundle, label: str, calibration: str) -> list[str]:
    """The lines a reviewer checks, each with how this run satisfies it."""
    ok, train_ms, fp = {True: "ok", False: "OVER"}, round(TRAIN_LIMIT_S * 1000), data.fingerprint
    ttt = ("TTT scores each chunk of a document before its LoRA step on it (a document's last chunk is never trained "
           "on); phase SGD trains only on documents already scored")
    return [
        format_kv(compliance="train_time", ms=round(train_time_ms), limit_ms=train_ms,
                  status=ok[train_time_ms <= train_ms]),
        format_kv(compliance="train_data_access_end", ms=round(data_access_end_ms), limit_ms=train_ms,
                  status=ok[data_access_end_ms <= train_ms], gptq_calibration=calibration),
        format_kv(compliance="eval_time", ms=round(eval_s * 1000), limit_ms=round(EVAL_LIMIT_S * 1000),
                  status=ok[eval_s <= EVAL_LIMIT_S]),
        format_kv(compliance="artifact_bytes", bytes_total=bytes_total, limit=ARTIFACT_LIMIT_BYTES,
                  status=ok[bytes_total <= ARTIFACT_LIMIT_BYTES]),
        format_kv(compliance="validation_data_in_training", value="no", how="training, warmup and GPTQ calibration "
                  "read only fineweb_train_*; the evaluation, TTT and calibration compile warm-ups use random tokens"),
        format_kv(compliance="causal", value="yes",
                  how="causal attention; SmearGate reads only the previous token of the same document"),
        format_kv(compliance="normalized", value="yes", how="full softmax over the vocabulary for every scored token"),
        format_kv(compliance="score_before_update", value="yes",
                  how=ttt if h.ttt_enabled else "no test-time training: weights are fixed during evaluation"),
        format_kv(compliance="single_pass", value="yes",
                  how="each validation target scored exactly once (coverage checked)"),
        format_kv(compliance="dataset", manifest_sha256=fp["manifest_sha256"] or "none",
                  **{k: fp[k] for k in ("val_sha256", "val_documents", "tokenizer_sha256", "byte_accounting")}),
        format_kv(compliance="reportable", value="yes" if data.reportable else "NO",
                  how=f"score from eval:{label} on {data.reportable_reason}" if data.reportable
                  else data.reportable_reason),
    ]

# ==== Training ====

class TrainingDiverged(Hinted, RuntimeError):
    """The training loss became NaN or infinite."""

@dataclass
class TrainResult:
    steps: int
    train_time_ms: float
    data_wait_ms: float
    stopped_by: str
    history: dict[str, list[dict[str, float]]] = dataclasses.field(default_factory=dict)  # progress lines

def train_step(model: Callable[..., Tensor], loader: TrainLoader, opt: Optimizers, h: Hyperparameters,
               device: torch.device, timer: StepTimer | None = None) -> Tensor:
    """One optimizer step over `accum_steps` micro-batches; returns this rank's mean loss (detached)."""
    mark = timer.mark if timer is not None else (lambda phase: None)
    total = torch.zeros((), device=device)
    for _ in range(h.accum_steps):
        x, y, cu = loader.next_batch()
        mark("data")
        if h.doc_isolation:  # one compiled graph for every document count (no recompile per count)
            torch._dynamo.mark_dynamic(cu, 0)
        else:  # a packed row attends in rows of TRAIN_SEQ_LEN, not across its whole length
            x, y, cu = x.reshape(-1, h.train_seq_len), y.reshape(-1, h.train_seq_len), None
        with compute_autocast(device, h.compute_dtype):
            loss = model(x, y, cu_seqlens=cu)
        (loss / h.accum_steps).backward()
        total += loss.detach()
        mark("fwd_bwd")
    opt.step(timer)
    opt.zero_grad()
    mark("optimizer")  # freeing the gradients is optimizer time, not the next phase's
    return total / h.accum_steps

def looping_due(h: Hyperparameters, step: int, frac: float) -> bool:
    """Depth recurrence turns on at LOOPING_START_STEP when set, else at ENABLE_LOOPING_AT of training."""
    return h.num_loops > 0 and (step >= h.looping_start_step if h.looping_start_step else frac >= h.enable_looping_at)

@dataclass(frozen=True)
class Graphs:
    model: Callable[..., Tensor]  # trains and evaluates
    calibrate: Callable[[Tensor], Tensor]  # GPTQ's forward: model.hidden, compiled for the micro-batch shape only
    base: GPT  # the module whose weights they share
    lora: Callable[..., Tensor] | None = None  # TTT's chunk forward (lora_chunk_nll); None: eager

    @classmethod
    def build(cls, h: Hyperparameters, model: GPT) -> "Graphs":
        if not h.compile:
            return cls(model, model.hidden, model)
        compiled_hidden = torch.compile(model.hidden, dynamic=False, fullgraph=True)
        shape = (h.micro_batch_seqs, h.train_seq_len)
        dynamic_ok = h.ttt_enabled and 3 <= h.eval_seq_len <= h.rope_train_seq_len  # one RoPE base (lora_nll)
        lora = torch.compile(functools.partial(lora_chunk_nll, model), fullgraph=True) if dynamic_ok else None
        return cls(torch.compile(model, dynamic=False, fullgraph=True),
                   lambda ids: (compiled_hidden if tuple(ids.shape) == shape else model.hidden)(ids), model, lora)

def warm_up_training(h: Hyperparameters, d: DistInfo, graphs: Graphs, opt: Optimizers,
                     make_loader: Callable[[], TrainLoader], log: Logger) -> dict[str, float]:
    """Untimed WARMUP_STEPS per looping state to compile, then model and optimizer restored: timing starts at step 0."""
    seconds: dict[str, float] = {}
    model = graphs.base
    model_state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    loader = make_loader()
    try:
        for looping in ([False, True] if h.num_loops else [False]) if h.warmup_steps else []:
            model.set_looping(looping)
            t0 = time.perf_counter()
            for i in range(h.warmup_steps):
                opt.set_schedule(1.0, 0)
                train_step(graphs.model, loader, opt, h, d.device)
                log(format_kv(warmup_step=f"{i + 1}/{h.warmup_steps}",
                              **({"looping": int(looping)} if h.num_loops else {})))
            synchronize(d.device)
            seconds[f"train_{'looped' if looping else 'plain'}"] = time.perf_counter() - t0
    finally:
        loader.close()
        model.set_looping(False)
    model.load_state_dict(model_state)
    opt.load_state_dict(opt_state)
    opt.zero_grad()
    return seconds

def warm_up_graphs(h: Hyperparameters, d: DistInfo, graphs: Graphs, looping: bool,
                   training_run: bool) -> dict[str, float]:
    """Untimed COMPILE=1 warm-up of eval, TTT and calibration graphs on random tokens (PR #1530 used val: flagged)."""
    model = graphs.base
    seconds: dict[str, float] = {}
    if not h.compile:
        return seconds
    gen = torch.Generator().manual_seed(h.seed)
    rand = lambda rows, cols: torch.randint(0, h.vocab_size, (rows, cols + 1), generator=gen).to(d.device)  # noqa: E731
    looping_was = model.looping
    eval_states = {looping} | ({False, True} if training_run and h.val_loss_every and h.num_loops else set())

    def timed(name: str, fn: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        with compute_autocast(d.device, h.compute_dtype):
            fn()
        synchronize(d.device)
        seconds[name] = time.perf_counter() - t0

    for state in sorted(eval_states):
        model.set_looping(state)
        win = rand(h.eval_batch_seqs, h.eval_seq_len)
        with torch.no_grad():
            timed(f"eval_{'looped' if state else 'plain'}",
                  lambda: graphs.model(win[:, :-1], win[:, 1:], reduction="none"))
    model.set_looping(looping)
    if graphs.lora is not None:
        timed("ttt_train", lambda: warm_up_lora(h, d, graphs, rand))
    if training_run and h.quant_method == "gptq":
        ids = rand(h.micro_batch_seqs, h.train_seq_len)[:, :-1]
        timed("calibration", lambda: collect_hessians(model, [ids], d.device, h.compute_dtype, graphs.calibrate))
    model.set_looping(looping_was)
    return seconds

def warm_up_lora(h: Hyperparameters, d: DistInfo, graphs: Graphs, rand: Callable[[int, int], Tensor]) -> None:
    """Phased TTT's chunk graph, forward and backward as score_lora_batch calls it, on fresh adapters."""
    model, rows, width = graphs.base, max(h.ttt_batch_size, 2), h.eval_seq_len
    lora = DocLoRA(model, rows, h.ttt_lora_rank, h.ttt_lora_alpha, h.seed)
    rows -= rows == width  # equal sizes would be traced as one symbol (and guarded equal)
    win = rand(rows, width)
    cols = (width - h.ttt_chunk_size + torch.arange(h.ttt_chunk_size, device=d.device)).clamp(0, width - 1)
    cols = cols.expand(rows, -1).contiguous()
    ctx = EvalContext(graphs.model, win.flatten(), None, width, width, 1, d.rank, d.world_size, d.device,
                      h.compute_dtype, None, graphs.lora)
    x, y = win[:, :-1], win.gather(1, cols + 1)
    with_frozen([p for p in model.parameters() if p.requires_grad],
                lambda: lora_nll(model, lora.rows(rows), x, cols, y, ctx).mean().backward())

def gptq_reserve(h: Hyperparameters, d: DistInfo, graphs: Graphs, make_loader: Callable[[], TrainLoader],
                 log: Logger) -> float:
    """Seconds kept so GPTQ's Hessians (training data) end inside the wallclock (PR #1868); 0 without GPTQ or a cap."""
    if h.quant_method != "gptq" or h.max_wallclock_seconds <= 0:
        return 0.0
    reserve = (h.gptq_reserve if h.gptq_reserve is not None
               else measure_gptq_reserve(h, d, graphs.base, graphs.calibrate, make_loader))
    log(format_kv(gptq_reserve=f"{reserve:.2f}s", mode=h.gptq_reserve_seconds,
                  calibration_batches=h.gptq_calibration_batches))
    if reserve >= h.max_wallclock_seconds:
        raise ConfigError(f"GPTQ_RESERVE_SECONDS={h.gptq_reserve_seconds!r} is not allowed: the reserve "
                          f"({reserve:.1f}s) leaves no training time under MAX_WALLCLOCK_SECONDS="
                          f"{h.max_wallclock_seconds:g}", hint="lower GPTQ_CALIBRATION_BATCHES or the reserve")
    return reserve

PROGRESS_SECONDS = 30.0  # a progress line at least this often, whatever TRAIN_LOG_EVERY
PROGRESS_POINTS = 20  # and at least this many over ITERATIONS: the JSON's loss curve has points for any length

def progress_due(h: Hyperparameters, step: int, train_time: float, last_line_time: float, last_step: bool) -> bool:
    return (step <= 2 or last_step or step == h.iterations or bool(h.train_log_every and step % h.train_log_every == 0)
            or step % max(1, h.iterations // PROGRESS_POINTS) == 0 or train_time - last_line_time >= PROGRESS_SECONDS)

def schedule_step(h: Hyperparameters, model: GPT, opt: Optimizers, step: int, train_time: float, cap: float,
                  log: Logger) -> float:
    """Looping, LR scale and momentum for this step; returns the LR scale."""
    frac = training_progress(step, train_time, h.iterations, cap)
    if not model.looping and looping_due(h, step, frac):
        model.set_looping(True)
        log(format_kv(layer_loop="enabled", step=step, frac=f"{frac:.3f}") + " " + model.layout_summary())
    scale = (lr_scale_iters(step, train_time, h.iterations, cap, h.warmdown_iters, h.min_lr) if h.warmdown_iters
             else lr_scale(frac, h.warmdown_frac, h.min_lr))
    opt.set_schedule(scale, step)
    return scale

def train(h: Hyperparameters, d: DistInfo, graphs: Graphs, opt: Optimizers, make_loader: Callable[[], TrainLoader],
          evaluate: Callable[[], EvalResult], reserve: float, log: Logger) -> TrainResult:
    """Steps until ITERATIONS or the wallclock cap minus the GPTQ reserve; then the EMA weights are applied."""
    model = graphs.base
    ema = EMA(model, h.ema_decay) if h.ema_decay > 0 else None
    loader, timer = make_loader(), StepTimer(d.device)
    cap = h.max_wallclock_seconds - reserve if h.max_wallclock_seconds > 0 else 0.0
    train_time, step, stopped_by, last_step_s = 0.0, 0, "iterations", 0.0
    history: dict[str, list[dict[str, float]]] = {"train": [], "val": []}
    window_start = (0.0, 0)  # (train time, step) at the previous progress line
    try:
        while step < h.iterations:
            t0 = time.perf_counter()
            timer.start()
            scale = schedule_step(h, model, opt, step, train_time, cap, log)
            timer.mark("other")
            loss = train_step(graphs.model, loader, opt, h, d.device, timer)
            if ema is not None:
                ema.update()
                timer.mark("ema")
            step += 1
            # One collective: loss, non-finite flag, a stop alike on all ranks; the host runs ahead: step >= last.
            step_s = max(time.perf_counter() - t0, last_step_s)
            local = torch.stack([loss.float(), (~torch.isfinite(loss)).float(),
                                 torch.tensor(float(cap > 0 and train_time + 2 * step_s > cap), device=d.device)])
            all_reduce_(local)
            timer.mark("comm")
            loss_sum, nonfinite, time_up = local.tolist()  # synchronizes: every timer event has completed
            timer.collect()
            last_step_s = time.perf_counter() - t0
            train_time += last_step_s
            last_loss = loss_sum / d.world_size
            if nonfinite > 0:
                raise TrainingDiverged(f"step:{step} train_loss:{last_loss} is not finite; the run stopped",
                                       hint="lower MATRIX_LR/TIED_EMBED_LR/SCALAR_LR or set GRAD_CLIP_NORM")
            if progress_due(h, step, train_time, window_start[0], time_up > 0):
                phases = timer.summary_ms()  # mean ms per step of each phase since the previous line
                tok_s = h.train_batch_tokens * (step - window_start[1]) / (train_time - window_start[0])
                window_start = (train_time, step)
                log(format_kv(step=f"{step}/{h.iterations}", train_loss=f"{last_loss:.4f}",
                              train_time=f"{train_time * 1000:.0f}ms", step_avg=f"{train_time * 1000 / step:.2f}ms",
                              tok_s=f"{tok_s:.0f}", lr_scale=f"{scale:.4f}", looping=int(model.looping),
                              data_wait=f"{loader.wait_seconds * 1000:.0f}ms",
                              **{f"{k}_ms": f"{v:.2f}" for k, v in phases.items()}))
                history["train"].append({"step": step, "train_time_ms": round(train_time * 1000, 1),
                                         "train_loss": round(last_loss, 6), "lr_scale": round(scale, 6),
                                         "looping": int(model.looping), "tok_s": round(tok_s),
                                         **{f"{k}_ms": round(v, 3) for k, v in phases.items()}})
            if h.val_loss_every and step % h.val_loss_every == 0 and step < h.iterations:
                r = evaluate()  # not counted in the training time
                log(format_kv(step=f"{step}/{h.iterations}", val_loss=f"{r.val_loss:.4f}", val_bpb=f"{r.val_bpb:.4f}",
                              train_time=f"{train_time * 1000:.0f}ms"))
                history["val"].append({"step": step, "train_time_ms": round(train_time * 1000, 1),
                                       "val_loss": r.val_loss, "val_bpb": r.val_bpb})
            if time_up > 0:
                stopped_by = "wallclock"
                log(format_kv(stopping_early="wallclock_cap", train_time=f"{train_time * 1000:.0f}ms",
                              step=f"{step}/{h.iterations}"))
                break
    finally:
        loader.close()
    if ema is not None:
        ema.apply_to(model)
        log("ema:applied EMA weights")
    return TrainResult(step, train_time * 1000, loader.wait_seconds * 1000, stopped_by, history)

@dataclass
class RunContext:
    """One run's fixed parts, handed to every phase of `main`."""
    h: Hyperparameters
    d: DistInfo
    data: DataBundle | None
    code: bytes
    versions: dict[str, str]
    backend: str
    log: Logger
    clock: PhaseClock
    files: RunFiles | None

def train_and_evaluate(rc: RunContext, model: GPT, opt: Optimizers) -> int:
    h, d, data, log, clock = rc.h, rc.d, rc.data, rc.log, rc.clock
    graphs = Graphs.build(h, model)
    ctx = EvalContext.build(h, d, graphs, data)
    make_loader = functools.partial(TrainLoader, data.train_files, h.train_seq_len, h.micro_batch_seqs, h.accum_steps,
                                    h.seed, h.vocab_size, d, packed=h.doc_packed_loader)
    end_looping = looping_due(h, h.iterations - 1, 1.0)  # the state calibration, evaluation and TTT run in
    clock.record("startup", clock.wall_seconds())
    for name, seconds in (warm_up_training(h, d, graphs, opt, make_loader, log)
                          | warm_up_graphs(h, d, graphs, end_looping, training_run=True)).items():
        clock.record(f"warmup_{name}", seconds)
    stop_on_output_failure(rc, None, lambda: "nothing was trained yet")
    t0 = time.perf_counter()
    reserve = gptq_reserve(h, d, graphs, make_loader, log)
    if reserve and h.gptq_reserve is None:
        clock.record("gptq_reserve_probe", time.perf_counter() - t0)
    result = train(h, d, graphs, opt, make_loader, lambda: eval_windows(ctx, ctx.seq_len), reserve, log)
    log(format_kv(train_done=result.stopped_by, steps=result.steps, train_time=f"{result.train_time_ms:.0f}ms",
                  data_wait=f"{result.data_wait_ms:.0f}ms",
                  data_wait_frac=f"{result.data_wait_ms / max(result.train_time_ms, 1e-9):.4f}"))
    clock.record("training", result.train_time_ms / 1000, result.steps * h.train_batch_tokens)
    if h.compile and model.looping != end_looping:  # the wallclock stopped training before LOOPING_START_STEP
        warn(log, f"training ended with looping={int(model.looping)}, not the state the evaluation, TTT and "
                  f"calibration graphs were compiled for: they compile now, and evaluation time includes it")
    calib = calibrate_gptq(h, d, model, graphs.calibrate, make_loader)
    access_end = log_calibration(rc, calib, result.train_time_ms / 1000, reserve)
    pre = eval_windows(ctx, ctx.seq_len)
    log(format_kv(pre_quant_val_loss=f"{pre.val_loss:.8f}", val_bpb=f"{pre.val_bpb:.8f}",
                  eval_time=f"{pre.seconds * 1000:.0f}ms"))
    clock.record("eval_pre_quant", pre.seconds, pre.tokens)
    artifact_path, quant_report = write_artifact(rc, model, calib.hessians, result.steps)
    ev = run_evaluations(rc, model, ctx, artifact_path)
    log(format_kv(quant_gap_bpb=f"{ev.results['roundtrip'].val_bpb - pre.val_bpb:.6f}", pre_quant=f"{pre.val_bpb:.8f}",
                  roundtrip=f"{ev.results['roundtrip'].val_bpb:.8f}"))
    bytes_model = artifact_path.stat().st_size
    log(format_kv(artifact=rc.files.final(".ptz")))
    bytes_total = report_size(h, bytes_model, len(rc.code), log)
    for line in compliance_block(h, result.train_time_ms, access_end * 1000, ev.seconds, bytes_total,
                                 data, ev.label, calib.source):
        log(line)
    metrics = {"pre_quant": {"val_loss": pre.val_loss, "val_bpb": pre.val_bpb}, "stopped_by": result.stopped_by,
               "data_wait_ms": round(result.data_wait_ms), "gptq_reserve_s": reserve,
               "calib_ms": round(calib.seconds * 1000), "train_data_access_end_ms": round(access_end * 1000),
               "quant": quant_report, "bpb_check": dataclasses.asdict(data.check),
               "artifact": str(rc.files.final(".ptz")), "history": result.history}
    return finish(rc, ev, bytes_model, result.train_time_ms, result.steps, metrics)

# ==== Main ====

def run(h: Hyperparameters) -> int:
    recover = recovery_run(h)
    d = setup_distributed(h)
    h = dataclasses.replace(h, run_id=h.run_id or broadcast_object(default_run_id(h.preset)))
    files = claim_outputs(h, d)
    log = Logger(None if files is None else files.path(".txt"), enabled=d.is_main)
    clock = PhaseClock(d.device, log)
    try:
        if files is not None and files.note:
            log(f"note: {files.note}")
        code = Path(__file__).resolve().read_bytes()
        backend, backend_notes = select_attention_backend(h.attn_backend, d.device)
        check_packed_mask(h, backend, d.device)
        if recover:
            h, meta = recover.configure(sys.modules[__name__], h, code)
        data = None if h.dry_run else prepare_data(h, d, log)
        versions = log_header(h, d, code, backend, data.fingerprint if data else {}, log)
        for note in backend_notes:
            warn(log, f"ATTN_BACKEND=auto: {note}; attention runs on {backend}")
        h = available_compressor(h, len(code), log)
        if data is not None:
            log_data_checks(h, data, log)
        rc = RunContext(h, d, data, code, versions, backend, log, clock, files)
        torch.manual_seed(h.seed)
        model = GPT(ModelConfig.from_hparams(h, backend)).to(d.device)
        if recover and not h.dry_run:
            return recover.instead_of_training(sys.modules[__name__], rc, model, meta)
        flatten_parameters(model)
        opt = Optimizers(model, h, d.rank, d.world_size)
        log_model(h, model, opt, log)
        if h.dry_run:
            log("dry_run:ok (no data read, nothing written)")
            return 0
        return train_and_evaluate(rc, model, opt)
    except BaseException as exc:
        log(f"error: {failure_line(exc)}", console=False)  # the log file keeps the reason; main() prints it
        raise
    finally:
        log.close()
        if files is not None and d.is_main:
            files.release()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwinds like SIGINT (the lock is released, the log says why); exit code 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"terminated ({signal.Signals(signum).name})")
        self.signum = signum

def catch_termination() -> dict[int, Any]:
    """Turn SIGTERM and SIGHUP into Terminated (on the main thread only); returns the handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum: int, _frame: Any) -> None:
        for s in previous:  # a second signal must not cut the cleanup short
            signal.signal(s, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM))}
    return previous

def recovery_run(h: Hyperparameters) -> Any:
    """pgolf.recover for an EVAL_ONLY or REQUANTIZE run, else None; refused where pgolf/ is not beside this file."""
    recover = operations("recover") if h.eval_only or h.requantize else None
    if recover is None and (h.eval_only or h.requantize):
        knob = "EVAL_ONLY=1" if h.eval_only else f"REQUANTIZE={h.requantize!r}"
        raise ConfigError(f"{knob} is not allowed: it needs the repository's pgolf/ beside {Path(__file__).name}",
                          hint="run the repository's train_gpt.py, or copy pgolf/ beside this file")
    return recover

def finish(rc: RunContext, ev: Evaluations, bytes_model: int, train_time_ms: float, steps: int,
           metrics: dict[str, Any]) -> int:
    """Write the metrics JSON and print the one `final ...` line reviewers and tools read."""
    h, label, bytes_code, wall = rc.h, ev.label, len(rc.code), rc.clock.wall_seconds()
    final, bytes_total, eval_time_ms = ev.results[label], bytes_model + bytes_code, ev.seconds * 1000
    rc.log(format_kv(wall_time=f"{wall:.1f}s", phases_seconds=f"{sum(r['seconds'] for r in rc.clock.rows):.1f}",
                     covers="from the start of main() to here; the phase lines above say where it went"))
    metrics.update(run_id=h.run_id, eval=label, val_loss=final.val_loss, val_bpb=final.val_bpb, val_tokens=final.tokens,
                   val_bytes=final.bytes, bytes_total=bytes_total, bytes_model=bytes_model, bytes_code=bytes_code,
                   over_limit=bytes_total > ARTIFACT_LIMIT_BYTES, train_time_ms=round(train_time_ms),
                   eval_time_ms=round(eval_time_ms), steps=steps, world_size=rc.d.world_size, config=h.knob_values(),
                   config_hash=config_hash(h.knob_values()), code_sha256=hashlib.sha256(rc.code).hexdigest(),
                   versions=rc.versions, attention_backend=rc.backend, dataset=rc.data.fingerprint,
                   reportable=rc.data.reportable, reportable_reason=rc.data.reportable_reason,
                   evaluations={k: dataclasses.asdict(v) for k, v in ev.results.items()}, ttt=ev.ttt,
                   phases=rc.clock.rows, wall_seconds=round(wall, 3))
    failure = None
    if rc.d.is_main and not rc.log.failure:  # no JSON for a run whose log is incomplete
        try:
            atomic_write_bytes(rc.files.path(".json"),
                               (json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n").encode())
            rc.files.publish()  # OVERWRITE=1: only now do the new files replace the old ones
        except OSError as exc:
            failure = f"{rc.files.path('.json')}: could not write the metrics ({exc.strerror or exc})"
    stop_on_output_failure(rc, failure, lambda: kept_artifact(rc))
    rc.log(f"final val_loss:{final.val_loss:.8f} val_bpb:{final.val_bpb:.8f} eval:{label} bytes_total:{bytes_total} "
           f"bytes_model:{bytes_model} bytes_code:{bytes_code} train_time_ms:{round(train_time_ms)} "
           f"eval_time_ms:{round(eval_time_ms)} steps:{steps}")
    # Leave together: a rank exiting right after its last all-reduce can abort in finalization (Gloo needs the GIL).
    barrier()
    return 0

def main(env: Mapping[str, str] | None = None) -> int:
    """Exit code: 2 bad input, 3 training diverged, 4 an output not written, 130 SIGINT, 143 SIGTERM, 129 SIGHUP."""
    previous = catch_termination()
    try:
        return run(Hyperparameters.from_env(env))
    except (ConfigError, ArtifactError, TrainingDiverged, OutputError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 3 if isinstance(exc, TrainingDiverged) else 4 if isinstance(exc, OutputError) else 2
    except KeyboardInterrupt as exc:
        print(f"error: {failure_line(exc)}; outputs written so far are kept, nothing was finished", file=sys.stderr,
              flush=True)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

if __name__ == "__main__":
    sys.exit(main())
