"""Compiled-graph comparison on the CPU: a training micro-step (forward + backward, bf16 autocast,
torch.compile fullgraph, inductor) of this script's model against PR #1394's (the 2026-04-05 SP8192 record),
to explain why our step was slower than that script's on one H100 (2026-11-26), with numbers a CPU can produce:

- dynamo: graphs compiled and graph breaks;
- inductor's generated code, forward and backward: fused kernels, external calls (GEMMs, attention,
  other aten ops; custom ops such as the FA3 stand-in's or our fused CE/MLP counted apart, after a plus),
  and the bytes of every buffer the code allocates (each is written once and read at least once, so a
  proxy for memory traffic; a buffer inductor reuses counts once), with the fp32 ones of at least
  batch x seq x dim elements counted apart (at batch 1 x 2048 a (512, 2048) weight gradient is that size);
- the bytes the forward saves for the backward (autograd's saved-tensor hooks).

    python bench/graphs.py --anchor ../shared/anchors/r0405/train_gpt_human.py
    python bench/graphs.py --anchor ... --train-gpt /tmp/old_train_gpt.py train_gpt.py --batch 2 --seq-len 1024
    python bench/graphs.py --anchor ../shared/anchors/r0405/train_gpt_human.py \
        --top ../shared/anchors/top1855/train_gpt.py --batch 1 --seq-len 2048

The CPU's autocast rules are not CUDA's (fewer ops run in bf16 on the CPU), and CPU kernels are C++,
not Triton: read the numbers as relative, and confirm on a GPU with bench/gpu.py. The anchor is
imported with an SDPA stand-in for flash_attn_interface (written to a temporary folder).

--top adds the leaderboard top (PR #1855) at its submitted configuration (TOP_ENV: the README's reproduce
values that touch the model), imported with the FlashAttention 3 stand-in of tests/stubs/fa3 (custom ops and
autograd.Functions as upstream's interface; dense here: no cu_seqlens) and the CPU patches of TOP_PATCHES.
Ours is then also built at PRESET=record (RECORD_ARCH: dense SDPA, no document masks, no Triton), so the
two rows compare the two scripts' own models; the PR #1394 comparison keeps its ANCHOR_ARCH row. Buffers an
extern op allocates itself are not in the generated code, so not counted: both attention forwards' outputs,
and SDPA's dq, dk, dv in our backward, where the FA3 stand-in's backward writes into dq, dk, dv buffers the
generated code allocates (counted in the top's row; ours with the same stand-in is in bench/RESULTS.md's
2026-12-06 compiled-step section).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from gpu import ANCHOR_ARCH  # noqa: E402  (our knobs for PR #1394's architecture: one definition)

SHIM = '''import torch.nn.functional as F
def flash_attn_func(q, k, v, causal=True):
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal, enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)
'''
BUFFER = re.compile(r"empty_strided_cpu\(\(([^)]*)\), \([^)]*\), torch\.(\w+)\)")
# Extern calls, counted as before: GEMMs and aten ops (each mention in the call, asserts and comments included).
EXTERN = re.compile(r"extern_kernels\.\w+\(|torch\.ops\.aten\.\w+")
# Custom ops of other namespaces, counted the same way and apart: the FA3 stand-in's attention in the top's graphs
# (ours with SDPA has none there), and ours' fused CE / MLP ops where its defaults turn them on (PR #1394 knobs).
CUSTOM = re.compile(r"torch\.ops\.(?!aten\.|inductor\.)\w+\.\w+")
STUBS_FA3 = ROOT / "tests" / "stubs" / "fa3"  # FlashAttention 3's interface as upstream has it, on the CPU
# PR #1855's README ("## Reproducing"): the values that touch the model (the others are data, optimizer,
# quantization, TTT); the rest of its model knobs are its Hyperparameters' defaults (QK_GAIN_INIT 5.0,
# NUM_LOOPS 2 over layers 3-5, PARALLEL_START_LAYER 8, XSA on all 11 layers, ...).
TOP_ENV = {"VOCAB_SIZE": "8192", "SPARSE_ATTN_GATE_ENABLED": "1", "SPARSE_ATTN_GATE_SCALE": "0.5",
           "GATE_WINDOW": "12", "SMEAR_GATE_ENABLED": "1", "GATED_ATTN_QUANT_GATE": "1", "CASEOPS_ENABLED": "1"}
TOP_PATCHES = ("BOS_ID=1 (its loader sets it on the first shard)",
               "h.fused_ce_enabled=False (its Triton CE is CUDA-only; its unfused branch computes the same loss)",
               "block.mlp.use_fused=False in every block (its fused LeakyReLU^2 MLP Triton kernel is CUDA-only)",
               "FA3 = tests/stubs/fa3 (dense flash_attn_func: a custom op, saves q, k, v, out, lse)")
# Ours for the comparison with the top: the record preset, dense attention as the top's without cu_seqlens, and
# no Triton (FUSED_MLP_ENABLED only where this version of the script has the knob).
RECORD_ARCH = {"PRESET": "record", "FUSED_CE_ENABLED": "0", "FUSED_MLP_ENABLED": "0", "DOC_ISOLATION": "0"}
CONFIGS = {"pr1394": ("PR #1394 knobs", ANCHOR_ARCH), "record": ("PRESET=record", RECORD_ARCH)}
ITEM = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "bool": 1, "int8": 1, "uint8": 1}


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def shape_knobs(layers: int) -> dict[str, str]:
    """NUM_LAYERS and the knobs that depend on it (the looped span is layers 4-5 of 11, centred likewise)."""
    if layers == 11:
        return {"NUM_LAYERS": "11", "XSA_LAST_N": "11"}
    return {"NUM_LAYERS": str(layers), "XSA_LAST_N": str(layers), "LOOP_START": str(layers // 2 - 1),
            "LOOP_END": str(layers // 2)}


def build_ours(path: Path, tag: str, looping: bool, layers: int, config: str = "pr1394") -> torch.nn.Module:
    """This script's model: with PR #1394's architecture (config pr1394, ANCHOR_ARCH) or its own record preset
    (config record, RECORD_ARCH), SDPA attention either way."""
    tg = load(path, f"ours_{tag}")
    env = dict(CONFIGS[config][1], **shape_knobs(layers))
    if config == "record" and "FUSED_MLP_ENABLED" not in getattr(tg.Hyperparameters, "knob_names", list)():
        env.pop("FUSED_MLP_ENABLED")  # an older version of the script, without the knob
    h = tg.Hyperparameters.from_env(env)
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.from_hparams(h, "sdpa"))
    tg.flatten_parameters(model)
    model.set_looping(looping)
    return model


def build_anchor(path: Path, looping: bool, layers: int) -> torch.nn.Module:
    import os

    shim = Path(tempfile.mkdtemp()) / "flash_attn_interface.py"
    shim.write_text(SHIM)
    sys.path.insert(0, str(shim.parent))
    os.environ.update(shape_knobs(layers))  # PR #1394's script reads these names too
    an = load(path, "anchor_under_test")
    torch.manual_seed(0)
    model = an.GPT(an.Hyperparameters()).bfloat16()
    an.restore_fp32_params(model)
    model.looping_active = looping
    return model


def build_top(path: Path, looping: bool, layers: int) -> torch.nn.Module:
    """PR #1855's GPT as its train_model builds it (GPT(h).bfloat16(), restore_fp32_params), at its submitted
    configuration (TOP_ENV) and the CPU patches of TOP_PATCHES. Its Hyperparameters read os.environ when the
    module is imported: TOP_ENV and the shape knobs are set for the import only."""
    import os

    env = dict(TOP_ENV, **shape_knobs(layers))
    saved_env = {k: os.environ.get(k) for k in env}
    # The stand-in stays importable under its name: dynamo re-imports the module of the autograd.Function it
    # traces for its guards. PR #1394's SDPA shim (same name) is dropped first, from sys.modules and from dynamo's
    # cache of imported modules (functools.cache): its model is analysed before this one is built.
    sys.modules.pop("flash_attn_interface", None)
    import torch._dynamo.symbolic_convert as dynamo_convert

    getattr(getattr(dynamo_convert, "_import_module", None), "cache_clear", lambda: None)()
    sys.path.insert(0, str(STUBS_FA3))
    os.environ.update(env)
    try:
        top = load(path, "top_under_test")
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    top.BOS_ID = 1
    h = top.Hyperparameters()
    h.fused_ce_enabled = False
    torch.manual_seed(0)
    model = top.GPT(h).bfloat16()
    top.restore_fp32_params(model)
    for block in model.blocks:
        block.mlp.use_fused = False
    model.looping_active = looping
    return model


def analyse(model: torch.nn.Module, batch: int, seq_len: int, vocab: int, code_dir: Path | None = None,
            label: str = "model") -> dict:
    """The compiled micro-step's numbers; with code_dir, inductor's forward and backward code and the list of
    tensors saved for the backward are written there (<label>.fwd.py, <label>.bwd.py, <label>.saved.txt)."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:]
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    saved: dict[int, int] = {}
    shapes: dict[int, str] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):  # activations only: a saved weight (or a view of the flat parameter buffer) is no new memory
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            shapes.setdefault(t.untyped_storage().data_ptr(), f"{tuple(t.shape)} {str(t.dtype)[6:]}")
        return t

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = compiled(x, y)
        loss.backward()
        return loss

    t0 = time.perf_counter()
    loss, codes = run_and_get_code(step)
    seconds = time.perf_counter() - t0
    act = batch * seq_len * model_dim(model)
    out = {"loss": loss.item(), "compile_and_step_s": seconds, "graphs": counters["stats"]["unique_graphs"],
           "graph_breaks": sum(counters["graph_break"].values()), "saved_for_backward_mib": sum(saved.values()) / 2**20}
    if code_dir is not None:
        code_dir.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^\w.-]+", "_", label)
        for part, code in zip(("fwd", "bwd"), codes):
            (code_dir / f"{name}.{part}.py").write_text(code)
        (code_dir / f"{name}.saved.txt").write_text("".join(
            f"{saved[k] / 2**20:10.3f} MiB  {shapes[k]}\n" for k in sorted(saved, key=saved.get, reverse=True)))
    for label, code in zip(("forward", "backward"), codes):
        call = code[code.index("def call("):]
        buffers = [(eval_dims(m.group(1)), m.group(2)) for m in BUFFER.finditer(call)]
        out[label] = {
            "fused_kernels": len(re.findall(r"^\s*cpp_fused_\w+\(", call, re.M)),
            "extern_calls": len(EXTERN.findall(call)),
            "custom_op_calls": len(CUSTOM.findall(call)),
            "buffer_mib": sum(n * ITEM.get(dt, 4) for n, dt in buffers) / 2**20,
            "fp32_activation_buffers": sum(1 for n, dt in buffers if dt == "float32" and n >= act),
        }
    return out


def eval_dims(text: str) -> int:
    n = 1
    for d in filter(None, (s.strip() for s in text.split(","))):
        n *= int(d)
    return n


def model_dim(model: torch.nn.Module) -> int:
    return model.tok_emb.weight.shape[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--anchor", type=Path, help="train_gpt_human.py, the readable script of the PR #1394 record "
                                                "(../shared/anchors/r0405)")
    ap.add_argument("--train-gpt", type=Path, nargs="+", default=[ROOT / "train_gpt.py"],
                    help="one or more versions of this script to compare (e.g. an older commit's file)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=11)
    ap.add_argument("--looping", action="store_true", help="depth recurrence on")
    ap.add_argument("--top", type=Path,
                    help="the leaderboard top's train_gpt.py (PR #1855, ../shared/anchors/top1855): adds its row, "
                         "and ours at PRESET=record beside it")
    ap.add_argument("--code-dir", type=Path, help="write each row's inductor code and saved-tensor list here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    # Our rows: PR #1394's architecture for the PR #1394 comparison (and alone, as before), the record preset for
    # the top.
    configs = (["pr1394"] if args.anchor or not args.top else []) + (["record"] if args.top else [])
    rows, ours_record = {}, None
    for config in configs:
        for i, path in enumerate(args.train_gpt):
            label = f"ours:{path.name}" if len(args.train_gpt) == 1 else f"ours:{i}:{path}"
            if len(configs) > 1 or config == "record":
                label += f" ({CONFIGS[config][0]})"
            rows[label] = analyse(build_ours(path, f"{config}_{i}", args.looping, args.layers, config), args.batch,
                                  args.seq_len, 8192, args.code_dir, label)
            ours_record = ours_record or (label if config == "record" else None)
            print(f"{label}: {json.dumps(rows[label])}", file=sys.stderr, flush=True)
    if args.anchor:
        rows["anchor PR #1394"] = analyse(build_anchor(args.anchor, args.looping, args.layers), args.batch,
                                          args.seq_len, 8192, args.code_dir, "anchor PR #1394")
        print(f"anchor PR #1394: {json.dumps(rows['anchor PR #1394'])}", file=sys.stderr, flush=True)
    if args.top:
        rows["top PR #1855"] = analyse(build_top(args.top, args.looping, args.layers), args.batch, args.seq_len, 8192,
                                       args.code_dir, "top PR #1855")
        print(f"top PR #1855: {json.dumps(rows['top PR #1855'])}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"# bench/graphs.py: CPU inductor, torch {torch.__version__}, batch {args.batch} x {args.seq_len}, "
          f"{args.layers} layers, looping {'on' if args.looping else 'off'}, bf16 autocast")
    if "pr1394" in configs:
        print("# ours (PR #1394 knobs): " + " ".join(f"{k}={v}" for k, v in ANCHOR_ARCH.items()))
    if args.top:
        print("# ours (PRESET=record): " + " ".join(f"{k}={v}" for k, v in RECORD_ARCH.items()) + ", SDPA")
        print("# top PR #1855: its Hyperparameters with " + " ".join(f"{k}={v}" for k, v in TOP_ENV.items()) +
              "; GPT(h).bfloat16(), restore_fp32_params; CPU patches: " + "; ".join(TOP_PATCHES))
        print("# buffers MiB: allocations in inductor's code; an extern op's own outputs are not counted (SDPA's "
              "dq, dk, dv in ours; the FA3 stand-in's backward writes into counted dq, dk, dv buffers)")
    print("| model | graphs | breaks | fwd kernels | fwd extern (+custom ops) | fwd buffers MiB | fwd fp32 act. buffers | "
          "bwd kernels | bwd extern (+custom ops) | bwd buffers MiB | bwd fp32 act. buffers | saved for bwd MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        f, b = r["forward"], r["backward"]
        print(f"| {label} | {r['graphs']} | {r['graph_breaks']} | {f['fused_kernels']} | {extern(f)} | "
              f"{f['buffer_mib']:.0f} | {f['fp32_activation_buffers']} | {b['fused_kernels']} | {extern(b)} | "
              f"{b['buffer_mib']:.0f} | {b['fp32_activation_buffers']} | {r['saved_for_backward_mib']:.0f} |")
    if args.top:
        print(compare(ours_record, rows[ours_record], rows["top PR #1855"]))
    return 0


def extern(part: dict) -> str:
    """Extern calls, and custom ops after a plus where there are any."""
    return f"{part['extern_calls']}" + (f" +{part['custom_op_calls']}" if part.get("custom_op_calls") else "")


def compare(label: str, ours: dict, top: dict) -> str:
    """One line: ours against the top on bytes moved (forward + backward buffer MiB) and saved-for-backward MiB."""
    def moved(r: dict) -> float:
        return r["forward"]["buffer_mib"] + r["backward"]["buffer_mib"]

    parts = []
    for name, a, b in (("bytes moved (fwd+bwd buffer MiB)", moved(ours), moved(top)),
                       ("saved for backward MiB", ours["saved_for_backward_mib"], top["saved_for_backward_mib"])):
        verdict = f"ours <= top, {a / b:.3f}x" if a <= b else f"ours is larger: {a / b:.3f}x the top's"
        parts.append(f"{name}: ours {a:.1f}, top {b:.1f} ({verdict})")
    return f"{label} vs top PR #1855: " + "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
