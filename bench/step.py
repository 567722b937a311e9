"""Training-step throughput of train_gpt.py: ms/step, tokens/s, model FLOPs, TFLOP/s and MFU.

Builds the model, optimizers and EMA exactly as train_gpt.py does from the current environment
(PRESET and every knob), feeds random tokens (no dataset needed), runs --warmup untimed steps (compile)
and then --steps timed ones, and prints one table; --json prints the same numbers as JSON.

    python bench/step.py                                   # record preset on this device
    PRESET=record python bench/step.py --looping           # after depth recurrence turns on
    MODEL_DIM=128 NUM_LAYERS=11 python bench/step.py --optimizer-only --json

One process runs GRAD_ACCUM_STEPS micro-batches per step (default 8 // WORLD_SIZE = 8), i.e. the
whole 8-GPU step of TRAIN_BATCH_TOKENS on one device: tokens/s is then per GPU.

FLOPs per token (fwd + bwd = 3 x forward), the usual PaLM-appendix convention:
  matmul     6 x the block-matrix weights of every virtual layer (a looped block counts each pass)
  attention  12 x TRAIN_SEQ_LEN x (NUM_HEADS x head_dim) per virtual layer (QK^T and AV, full window)
  head       6 x MODEL_DIM x VOCAB_SIZE (the tied embedding used as the output layer)
MFU = achieved FLOP/s / the device's dense bf16 peak (table below, or PEAK_TFLOPS / --peak-tflops).

--optimizer-only times the whole optimizer step (Muon + AdamW + clip) of train_gpt.py's batched Muon against
the per-matrix reference it replaced (tests/reference_muon.py, the one the tests hold it equal to), both in the
same Newton-Schulz dtype (MUON_NS_DTYPE), and the fused EMA against a per-tensor loop over state_dict() (the
pre-#1584 records), side by side and interleaved so load on the machine hits both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402

# Dense bf16 tensor-core peak, TFLOP/s (vendor datasheets; no sparsity).
PEAK_TFLOPS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4,
               "A100": 312.0}


def device_peak(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "PEAK_TFLOPS"
    if device.type != "cuda":
        return None, "none (CPU: set PEAK_TFLOPS)"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS.items():  # most specific first
        if key in name:
            return peak, f"table:{key}"
    return None, f"none ({name} not in the table: set PEAK_TFLOPS)"


def flops_per_token(model: tg.GPT, h: tg.Hyperparameters, looping: bool) -> dict[str, float]:
    """Model FLOPs per trained token (forward + backward) at the given looping state."""
    layout = model.layouts[looping and h.num_loops > 0]
    per_block = [sum(p.numel() for n, p in block.named_parameters()
                     if tg.classify_param(f"blocks.{i}.{n}") == "matrix") for i, block in enumerate(model.blocks)]
    matmul = 6.0 * sum(per_block[i] for i in layout)
    head_dim = h.model_dim // h.num_heads
    attention = 12.0 * h.train_seq_len * h.num_heads * head_dim * len(layout)
    head = 6.0 * h.model_dim * h.vocab_size
    return {"matmul": matmul, "attention": attention, "head": head}


class RandomBatches:
    """A stand-in for TrainLoader: pre-generated random tokens and their cu_seqlens, already on the device."""

    def __init__(self, h: tg.Hyperparameters, device: torch.device, count: int = 4):
        gen = torch.Generator().manual_seed(h.seed)
        tokens = [torch.randint(0, h.vocab_size, (h.micro_batch_seqs, h.train_seq_len + 1), generator=gen)
                  for _ in range(count)]
        self.batches = [(b.to(device), torch.from_numpy(tg.host_cu_seqlens(b[:, :-1].numpy(), tg.BOS_ID)).to(device))
                        for b in tokens]
        self.i, self.wait_seconds = 0, 0.0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, cu = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b[:, :-1], b[:, 1:], cu


def build(h: tg.Hyperparameters, device: torch.device, optimizers=tg.Optimizers) -> tuple[tg.GPT, tg.Optimizers]:
    torch.manual_seed(h.seed)
    model = tg.GPT(tg.ModelConfig.from_hparams(h, tg.select_attention_backend(h.attn_backend, device)[0])).to(device)
    tg.flatten_parameters(model)  # as train_gpt.run() does
    return model, optimizers(model, h)


def bench_steps(h: tg.Hyperparameters, device: torch.device, steps: int, warmup: int, looping: bool,
                peak: float | None, peak_source: str) -> dict:
    model, opt = build(h, device)
    model.set_looping(looping)
    compiled = torch.compile(model, dynamic=False, fullgraph=True) if h.compile else model
    ema = tg.EMA(model, h.ema_decay or 0.99)
    loader = RandomBatches(h, device)
    timer = tg.StepTimer(device)
    for i in range(warmup):
        tg.train_step(compiled, loader, opt, h, device)
        ema.update()
        print(f"warmup {i + 1}/{warmup}", file=sys.stderr, flush=True)
    tg.synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps):
        tg.synchronize(device)
        t0 = time.perf_counter()
        timer.start()
        loss = tg.train_step(compiled, loader, opt, h, device, timer)
        ema.update()
        timer.mark("ema")
        loss.item()
        timer.collect()
        times.append(time.perf_counter() - t0)
        print(f"step {i + 1}/{steps} {times[-1] * 1000:.1f}ms", file=sys.stderr, flush=True)
    phases = timer.summary_ms()
    ms = statistics.median(times) * 1000
    flops = flops_per_token(model, h, looping)
    per_token = sum(flops.values())
    tok_s = h.train_batch_tokens / (ms / 1000)
    tflops = per_token * tok_s / 1e12
    return {
        "ms_per_step": ms, "ms_per_step_mean": statistics.mean(times) * 1000, "tokens_per_step": h.train_batch_tokens,
        "grad_accum": h.accum_steps, "tokens_per_s": tok_s, "flops_per_token": per_token, "flops_breakdown": flops,
        "tflops": tflops, "peak_tflops": peak, "peak_source": peak_source,
        "mfu": tflops / peak if peak else None, "optimizer_ms": phases["optimizer"] + phases["comm"],
        "ema_ms": phases["ema"], "fwd_bwd_ms": phases["fwd_bwd"], "data_ms": phases["data"],
        "looping": bool(looping and h.num_loops > 0), "virtual_layers": len(model.layouts[model.looping]),
        "params": sum(p.numel() for p in model.parameters()),
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def fill_grads(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 0.01).to(p.device)


def ema_per_tensor_loop(model: torch.nn.Module, shadow: dict[str, torch.Tensor], decay: float) -> None:
    """The EMA the fused one replaced: one mul_/add_ pair per state_dict() tensor."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            shadow[name].mul_(decay).add_(t.detach().float(), alpha=1.0 - decay)


def timed(fn, device: torch.device) -> float:
    tg.synchronize(device)
    t0 = time.perf_counter()
    fn()
    tg.synchronize(device)
    return (time.perf_counter() - t0) * 1000


def bench_optimizer(h: tg.Hyperparameters, device: torch.device, steps: int, warmup: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from reference_muon import ReferenceOptimizers  # the per-matrix Muon (not shipped)

    runs = {impl: build(h, device, opts) for impl, opts in (("loop", ReferenceOptimizers), ("batched", tg.Optimizers))}
    for impl, (model, _) in runs.items():
        fill_grads(model, 1)
    model = runs["batched"][0]
    ema = tg.EMA(model, 0.99)
    shadow = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in model.state_dict().items()}
    times: dict[str, list[float]] = {"loop": [], "batched": [], "ema_fused": [], "ema_loop": []}
    for i in range(warmup + steps):
        # Interleaved, so that load on a shared machine hits both sides alike; gradients are kept.
        for impl, (_, opt) in runs.items():
            t = timed(opt.step, device)
            if i >= warmup:
                times[impl].append(t)
        t_fused, t_loop = timed(ema.update, device), timed(lambda: ema_per_tensor_loop(model, shadow, 0.99), device)
        if i >= warmup:
            times["ema_fused"].append(t_fused)
            times["ema_loop"].append(t_loop)
        print(f"{'warmup' if i < warmup else 'step'} {i + 1}: loop {times['loop'][-1] if times['loop'] else 0:.1f}ms",
              file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    muon_params = sum(p.numel() for _, ps in runs["batched"][1].muon.buckets for p in ps)
    return {
        "optimizer_loop_ms": med["loop"], "optimizer_batched_ms": med["batched"],
        "optimizer_speedup": med["loop"] / med["batched"], "ema_loop_ms": med["ema_loop"],
        "ema_fused_ms": med["ema_fused"], "ema_speedup": med["ema_loop"] / med["ema_fused"],
        "muon_matrices": sum(len(ps) for _, ps in runs["batched"][1].muon.buckets), "muon_params": muon_params,
        "buckets": [[len(ps), list(ps[0].shape)] for _, ps in runs["batched"][1].muon.buckets],
        "params": sum(p.numel() for p in model.parameters()), "compile": h.compile,
        "samples": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }


def environment(device: torch.device) -> dict:
    info = {k: v for k, v in tg.environment_versions(device).items() if k != "platform"}
    info["device"] = device.type
    info["cpu"] = platform.processor() or platform.machine()
    return info


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(["| metric | value |", "|---|---|"] + [f"| {k.ljust(width)} | {v} |" for k, v in rows])


def fmt(x, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def step_rows(r: dict) -> list[tuple[str, str]]:
    return [("ms/step (median)", fmt(r["ms_per_step"])), ("tokens/step", f"{r['tokens_per_step']:,}"),
            ("grad_accum", str(r["grad_accum"])), ("tokens/s", f"{r['tokens_per_s']:,.0f}"),
            ("model FLOPs/token", f"{r['flops_per_token']:.4g}"), ("achieved TFLOP/s", fmt(r["tflops"], ".3f")),
            ("peak TFLOP/s", f"{fmt(r['peak_tflops'], '.1f')} ({r['peak_source']})"),
            ("MFU", "n/a" if r["mfu"] is None else f"{r['mfu'] * 100:.1f}%"),
            ("forward+backward ms/step", fmt(r["fwd_bwd_ms"])), ("optimizer ms/step", fmt(r["optimizer_ms"])),
            ("EMA ms/step", fmt(r["ema_ms"], ".3f")), ("virtual layers", str(r["virtual_layers"])),
            ("peak memory MiB", fmt(r["peak_memory_mib"], ".0f"))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first: compilation (default 3)")
    ap.add_argument("--looping", action="store_true", help="time with depth recurrence on (as after "
                                                            "ENABLE_LOOPING_AT)")
    ap.add_argument("--both", action="store_true", help="time without and then with depth recurrence, in one "
                                                         "process (--json: {\"plain\": ..., \"looped\": ...})")
    ap.add_argument("--optimizer-only", action="store_true", help="time the optimizer step and EMA only, "
                                                                  "batched vs the per-matrix / per-tensor loops")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: PEAK_TFLOPS "
                                                                     "env, else the H100/H200/A100 table)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error(f"--steps={args.steps} --warmup={args.warmup}: need steps >= 1 and warmup >= 0")
    peak_env = os.environ.get("PEAK_TFLOPS")
    try:
        peak_override = args.peak_tflops or (float(peak_env) if peak_env else None)
    except ValueError:
        print(f"PEAK_TFLOPS={peak_env!r} is not allowed: expected a number of TFLOP/s", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k != "PEAK_TFLOPS"}
    try:
        h = tg.Hyperparameters.from_env(env)
    except tg.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = tg.setup_distributed(h).device
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    info = environment(device)
    shape = dict(preset=h.preset, num_layers=h.num_layers, model_dim=h.model_dim, vocab_size=h.vocab_size,
                 train_seq_len=h.train_seq_len, compile=h.compile,
                 ns_dtype=str(tg.resolve_ns_dtype(h.muon_ns_dtype, device)).replace("torch.", ""))
    if args.optimizer_only:
        r = bench_optimizer(h, device, args.steps, args.warmup)
        out = {**info, **shape, **r}
        rows = [("optimizer step, per-matrix loop (ms)", fmt(r["optimizer_loop_ms"])),
                ("optimizer step, batched (ms)", fmt(r["optimizer_batched_ms"])),
                ("optimizer_speedup", fmt(r["optimizer_speedup"], ".2f") + "x"),
                ("EMA, per-tensor loop (ms)", fmt(r["ema_loop_ms"], ".3f")),
                ("EMA, fused foreach (ms)", fmt(r["ema_fused_ms"], ".3f")),
                ("ema_speedup", fmt(r["ema_speedup"], ".2f") + "x"),
                ("Muon matrices / buckets", f"{r['muon_matrices']} / {len(r['buckets'])}")]
    else:
        peak, source = device_peak(device, peak_override)
        if args.both:
            runs = {name: bench_steps(h, device, args.steps, args.warmup, name == "looped", peak, source)
                    for name in ("plain", "looped")}
            print(json.dumps({**info, **shape, **runs}, indent=2, default=str) if args.json else
                  "\n".join(f"## {name}\n{table(step_rows(r))}" for name, r in runs.items()))
            return 0 if all(math.isfinite(r["ms_per_step"]) for r in runs.values()) else 1
        r = bench_steps(h, device, args.steps, args.warmup, args.looping, peak, source)
        out = {**info, **shape, **r}
        rows = step_rows(r)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        print(f"# bench/step.py: {info['device']} {info.get('gpu', info['cpu'])}, torch {info['torch']}, "
              f"{json.dumps(shape)}")
        print(table(rows))
    if not all(math.isfinite(v) for v in (r.get("ms_per_step", 1.0), r.get("optimizer_batched_ms", 1.0))):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
