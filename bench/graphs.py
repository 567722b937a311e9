"""Compiled-graph comparison on the CPU: a training micro-step (forward + backward, bf16 autocast,
torch.compile fullgraph, inductor) of this script's model against R0405's, as ../shared/docs/gpu-gap.md
analysed the GPU gap, with numbers a CPU can produce:

- dynamo: graphs compiled and graph breaks;
- inductor's generated code, forward and backward: fused kernels, external calls (GEMMs, attention,
  other aten ops), and the bytes of every buffer the code allocates (each is written once and read at
  least once, so a proxy for memory traffic), with the fp32 activation-sized ones counted apart;
- the bytes the forward saves for the backward (autograd's saved-tensor hooks).

    python bench/graphs.py --anchor ../shared/anchors/r0405/train_gpt_human.py
    python bench/graphs.py --anchor ... --train-gpt /tmp/old_train_gpt.py train_gpt.py --batch 2 --seq-len 1024

The CPU's autocast rules are not CUDA's (fewer ops run in bf16 on the CPU), and CPU kernels are C++,
not Triton: read the numbers as relative, and confirm on a GPU with bench/gpu.py. The anchor is
imported with an SDPA stand-in for flash_attn_interface (written to a temporary folder).
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
from gpu import ANCHOR_ARCH  # noqa: E402  (our knobs for R0405's architecture: one definition)

SHIM = '''import torch.nn.functional as F
def flash_attn_func(q, k, v, causal=True):
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal, enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)
'''
BUFFER = re.compile(r"empty_strided_cpu\(\(([^)]*)\), \([^)]*\), torch\.(\w+)\)")
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


def build_ours(path: Path, tag: str, looping: bool, layers: int) -> torch.nn.Module:
    tg = load(path, f"ours_{tag}")
    env = dict(ANCHOR_ARCH, **shape_knobs(layers))
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
    os.environ.update(shape_knobs(layers))  # R0405 reads these names too
    an = load(path, "anchor_under_test")
    torch.manual_seed(0)
    model = an.GPT(an.Hyperparameters()).bfloat16()
    an.restore_fp32_params(model)
    model.looping_active = looping
    return model


def analyse(model: torch.nn.Module, batch: int, seq_len: int, vocab: int) -> dict:
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:]
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    saved: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):  # activations only: a saved weight (or a view of the flat parameter buffer) is no new memory
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
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
    for label, code in zip(("forward", "backward"), codes):
        call = code[code.index("def call("):]
        buffers = [(eval_dims(m.group(1)), m.group(2)) for m in BUFFER.finditer(call)]
        out[label] = {
            "fused_kernels": len(re.findall(r"^\s*cpp_fused_\w+\(", call, re.M)),
            "extern_calls": len(re.findall(r"extern_kernels\.\w+\(|torch\.ops\.aten\.\w+", call)),
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
    ap.add_argument("--anchor", type=Path, help="R0405's train_gpt_human.py (../shared/anchors/r0405)")
    ap.add_argument("--train-gpt", type=Path, nargs="+", default=[ROOT / "train_gpt.py"],
                    help="one or more versions of this script to compare (e.g. an older commit's file)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=11)
    ap.add_argument("--looping", action="store_true", help="depth recurrence on")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = {}
    for i, path in enumerate(args.train_gpt):
        label = f"ours:{path.name}" if len(args.train_gpt) == 1 else f"ours:{i}:{path}"
        rows[label] = analyse(build_ours(path, str(i), args.looping, args.layers), args.batch, args.seq_len, 8192)
        print(f"{label}: {json.dumps(rows[label])}", file=sys.stderr, flush=True)
    if args.anchor:
        rows["anchor R0405"] = analyse(build_anchor(args.anchor, args.looping, args.layers), args.batch, args.seq_len,
                                       8192)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"# bench/graphs.py: CPU inductor, torch {torch.__version__}, batch {args.batch} x {args.seq_len}, "
          f"{args.layers} layers, looping {'on' if args.looping else 'off'}, bf16 autocast")
    print("| model | graphs | breaks | fwd kernels | fwd extern | fwd buffers MiB | fwd fp32 act. buffers | "
          "bwd kernels | bwd extern | bwd buffers MiB | bwd fp32 act. buffers | saved for bwd MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        f, b = r["forward"], r["backward"]
        print(f"| {label} | {r['graphs']} | {r['graph_breaks']} | {f['fused_kernels']} | {f['extern_calls']} | "
              f"{f['buffer_mib']:.0f} | {f['fp32_activation_buffers']} | {b['fused_kernels']} | {b['extern_calls']} | "
              f"{b['buffer_mib']:.0f} | {b['fp32_activation_buffers']} | {r['saved_for_backward_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
