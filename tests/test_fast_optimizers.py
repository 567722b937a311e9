"""Fast optimizers without changing the math: the batched and sharded Muon equals the per-matrix
reference (tests/reference_muon.py) in one process and across 2 and 3 gloo processes (uneven shares
included), the split-norm gradient clip equals torch's, the fused EMA equals a per-tensor loop, the step
timer accounts for a step's time, and bench/step.py runs at a CI-friendly size.

Run: python -m pytest -q tests/test_fast_optimizers.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import train_gpt as tg
from reference_muon import ReferenceOptimizers, momentum_buffer

ROOT = Path(__file__).resolve().parent.parent

# 5 layers: buckets of 5 (MLP in/out) and 10 (c_q + attn proj, c_k + c_v) matrices, so 2 and 3 ranks
# get uneven shares (3+2, 2+2+1, 4+4+2) and some ranks a padded one.
ENV = dict(VOCAB_SIZE="64", NUM_LAYERS="5", MODEL_DIM="32", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="2",
           TRAIN_SEQ_LEN="16", EVAL_SEQ_LEN="16", TRAIN_BATCH_TOKENS="64", GRAD_ACCUM_STEPS="1", COMPILE="0",
           NUM_LOOPS="0", TTT_ENABLED="0", GRAD_CLIP_NORM="0.3", MUON_NS_DTYPE="fp32")
STEPS = 3


def hparams(**overrides) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env({**ENV, **{k: str(v) for k, v in overrides.items()}})


def rank_grads(model: torch.nn.Module, step: int, rank: int) -> list[torch.Tensor]:
    """Different, reproducible gradients for every (step, rank, parameter)."""
    out = []
    for i, p in enumerate(model.parameters()):
        g = torch.Generator().manual_seed(10_000 * step + 100 * rank + i)
        out.append(torch.randn(p.shape, generator=g) * 0.05)
    return out


# The optimizers compared: train_gpt's batched Muon and the per-matrix reference.
OPTIMIZERS = {"batched": tg.Optimizers, "reference": ReferenceOptimizers}


def reference_run(impl: str, world: int) -> dict[str, torch.Tensor]:
    """One process, gradients = the mean of what `world` ranks would compute."""
    h = hparams()
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.from_hparams(h))
    opt = OPTIMIZERS[impl](model, h)
    for step in range(STEPS):
        opt.set_schedule(1.0 - 0.2 * step, step)
        per_rank = [rank_grads(model, step, r) for r in range(world)]
        for i, p in enumerate(model.parameters()):
            p.grad = sum(g[i] for g in per_rank) / world
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def initial_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in tg.GPT(tg.ModelConfig.from_hparams(hparams())).state_dict().items()}


def assert_updates_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Every parameter's total change equal within bf16 resolution (2^-8) of its size."""
    init = initial_state()
    moved = 0
    for k in want:
        d_got, d_want = got[k] - init[k], want[k] - init[k]
        scale = float(d_want.abs().max())
        moved += scale > 0
        torch.testing.assert_close(d_got, d_want, rtol=0, atol=max(scale * 2 ** -8, 1e-9), msg=k)
    assert moved >= len(want) - 2  # the updates are real (not all zero)


def test_fixture_buckets_are_uneven():
    h = hparams()
    model = tg.GPT(tg.ModelConfig.from_hparams(h))
    sizes = sorted(len(ps) for _, ps in tg.Optimizers(model, h).muon.buckets)
    assert 5 in sizes and 10 in sizes, sizes
    assert any(n % 2 for n in sizes) and any(n % 3 for n in sizes)


def test_batched_muon_equals_the_per_matrix_loop():
    assert_updates_close(reference_run("batched", 1), reference_run("reference", 1))


def test_bf16_newton_schulz_stays_within_bf16_tolerance_of_fp32():
    """MUON_NS_DTYPE=bf16 (the records' GPU numerics; auto on AMX CPUs) against the fp32 reference."""
    want = reference_run("reference", 1)
    h = hparams(MUON_NS_DTYPE="bf16")
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.from_hparams(h))
    opt = tg.Optimizers(model, h)
    for step in range(STEPS):
        opt.set_schedule(1.0 - 0.2 * step, step)
        for p, g in zip(model.parameters(), rank_grads(model, step, 0)):
            p.grad = g
        opt.step()
        opt.zero_grad()
    init = initial_state()
    for k, v in model.state_dict().items():
        d_got, d_want = v - init[k], want[k] - init[k]
        rel = float((d_got - d_want).norm() / d_want.norm().clamp_min(1e-12))
        # bf16 keeps 8 significant bits: 5 iterations x 3 steps end 1-3% from fp32 (measured 2.3% worst);
        # a real mistake (no Nesterov, wrong scale, a swapped matrix) is tens of percent.
        assert rel < 0.05, (k, rel)


def test_ns_dtype_auto():
    assert tg.resolve_ns_dtype("fp32", torch.device("cpu")) == torch.float32
    assert tg.resolve_ns_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert tg.resolve_ns_dtype("auto", torch.device("cuda")) == torch.bfloat16
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    assert tg.resolve_ns_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if amx else torch.float32)


def test_batched_muon_momentum_is_stacked_per_bucket():
    h = hparams()
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.from_hparams(h))
    opt = tg.Optimizers(model, h)
    grads = rank_grads(model, 0, 0)
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    opt.step()
    for (_, ps) in opt.muon.buckets:
        buf = opt.muon.state[ps[0]]["momentum_buffer"]
        assert buf.shape == (len(ps), *ps[0].shape)
    # after one step the momentum is the (clipped) gradient itself, matrix by matrix
    total = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    coef = min(1.0, h.grad_clip_norm / (float(total) + 1e-6))
    index = {id(p): i for i, p in enumerate(model.parameters())}
    for _, ps in opt.muon.buckets:
        for p in ps:
            torch.testing.assert_close(momentum_buffer(opt.muon, p), grads[index[id(p)]] * coef, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", OPTIMIZERS)
def test_schedule_still_applies_after_load_state_dict(impl):
    """The warmup restores the optimizer with load_state_dict, which replaces the param-group dicts:
    set_schedule must still reach the update (an LR of 0 leaves the matrices unchanged)."""
    h = hparams(MUON_WD="0")
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.from_hparams(h))
    opt = OPTIMIZERS[impl](model, h)
    opt.load_state_dict(opt.state_dict())
    opt.set_schedule(0.0, 0)
    matrices = [p for group in opt.muon.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in matrices]
    for p, g in zip(model.parameters(), rank_grads(model, 0, 0)):
        p.grad = g
    opt.step()
    after = [p.detach() for p in matrices]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    opt.set_schedule(1.0, 0)
    for p, g in zip(model.parameters(), rank_grads(model, 1, 0)):
        p.grad = g
    opt.step()
    assert not any(torch.equal(a, b) for a, b in zip(after, before))


def test_split_clip_equals_torch_clip_grad_norm():
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(s, generator=gen) for s in [(5, 4), (7,), (3, 3, 2), (6, 4)]]
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in tensors]
    for p, t in zip(params, tensors):
        p.grad = t.clone()
    torch.nn.utils.clip_grad_norm_(params, 0.5)  # clips the .grad of each parameter
    want = [p.grad for p in params]
    assert not torch.allclose(want[0], tensors[0])
    replicated, sharded = [t.clone() for t in tensors[:2]], [t.clone() for t in tensors[2:]]
    # zero padding in a shard changes nothing
    sharded[1] = torch.cat([sharded[1], torch.zeros(2, 4)])
    tg.clip_global_norm_(replicated, sharded, 0.5, 1)
    for got, ref in zip(replicated + [sharded[0], sharded[1][:6]], want):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    # below the threshold nothing moves
    small = [t * 1e-3 for t in tensors]
    copy = [t.clone() for t in small]
    tg.clip_global_norm_(copy[:2], copy[2:], 0.5, 1)
    for a, b in zip(copy, small):
        torch.testing.assert_close(a, b)


def test_retired_muon_impl_warns_and_changes_nothing():
    """Old commands that set MUON_IMPL still run (even strict): the batched Muon is the only one."""
    for value in ("loop", "batched"):
        h = hparams(MUON_IMPL=value, STRICT_ENV="1")
        assert h.knob_values() == hparams(STRICT_ENV="1").knob_values()
        assert any(w.startswith(f"MUON_IMPL={value!r} is ignored") and "reference_muon" in w for w in h.env_warnings)


# ---------------------------------------------------------------- 2 and 3 gloo processes

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    import train_gpt as tg
    import test_fast_optimizers as ts
    import reference_muon as rm
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=rank,
                            world_size=world)
    h = ts.hparams()
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.from_hparams(h))
    opt = ts.OPTIMIZERS[os.environ["IMPL"]](model, h, rank=rank, world_size=world)
    timer = tg.StepTimer(torch.device("cpu"))
    for step in range(ts.STEPS):
        opt.set_schedule(1.0 - 0.2 * step, step)
        timer.start()
        for p, g in zip(model.parameters(), ts.rank_grads(model, step, rank)):
            p.grad = g
        opt.step(timer)
        opt.zero_grad()
        timer.collect()
    if isinstance(opt.muon, tg.Muon):
        owned = sum(len(rm.owned(opt.muon, b)) for b in range(len(opt.muon.buckets)))
        stacked = sum(opt.muon.state[ps[0]]["momentum_buffer"].shape[0] for _, ps in opt.muon.buckets)
    else:
        owned = stacked = -1
    torch.save(model.state_dict(), os.environ["OUT"] + f"/rank{{rank}}.pt")
    with open(os.environ["OUT"] + f"/rank{{rank}}.json", "w") as fh:
        json.dump({{"owned": owned, "stacked": stacked, "phases": timer.summary_ms()}}, fh)
    dist.barrier()
    dist.destroy_process_group()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path: Path, world: int, impl: str) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), tests=str(ROOT / "tests")))
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**{k: v for k, v in os.environ.items() if k not in tg.Hyperparameters.knob_names()},
               "RANK": str(rank), "WORLD_SIZE": str(world), "PORT": port, "IMPL": impl, "OUT": str(tmp_path),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=180)
        outs.append(out)
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-3000:]}"
    results = []
    for rank in range(world):
        info = json.loads((tmp_path / f"rank{rank}.json").read_text())
        info["state"] = torch.load(tmp_path / f"rank{rank}.pt")
        results.append(info)
    return results


@pytest.mark.parametrize("world,impl", [(2, "batched"), (3, "batched"), (2, "reference")])
@pytest.mark.slow
def test_distributed_muon_equals_single_process(tmp_path, world, impl):
    ranks = run_ranks(tmp_path, world, impl)
    want = reference_run("reference", world)
    for info in ranks:
        assert_updates_close(info["state"], want)
        for k in want:  # every rank holds the same weights
            assert torch.equal(info["state"][k], ranks[0]["state"][k]), k
    if impl == "batched":
        h = hparams()
        model = tg.GPT(tg.ModelConfig.from_hparams(h))
        buckets = tg.Optimizers(model, h).muon.buckets
        # each rank keeps momentum only for its share; the shares cover every matrix exactly once
        assert sum(info["owned"] for info in ranks) == sum(len(ps) for _, ps in buckets)
        for info in ranks:
            assert info["stacked"] == sum(-(-len(ps) // world) for _, ps in buckets)
            assert info["phases"]["comm"] > 0 and info["phases"]["optimizer"] > 0


# ---------------------------------------------------------------- EMA and the step timer


def test_fused_ema_equals_a_per_tensor_loop():
    h = hparams()
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.from_hparams(h))
    ema = tg.EMA(model, 0.9)
    loop = [torch.zeros_like(p) for p in model.parameters()]
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        ema.update()
        for s, p in zip(loop, model.parameters()):
            s.mul_(0.9).add_(p.detach(), alpha=0.1)
    for a, b in zip(ema.shadow, loop):  # the shadow reads the live parameters, not stale copies
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_flattened_parameters_keep_values_and_give_a_one_lerp_ema():
    h = hparams()
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.from_hparams(h))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flat = tg.flatten_parameters(model)
    assert flat is not None and flat.numel() == sum(p.numel() for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert tg.flat_buffer(list(model.parameters())).data_ptr() == flat.data_ptr()
    assert tg.flat_buffer(list(model.parameters())[1:]) is None  # not the whole buffer
    # the tied embedding is one parameter, stored once
    assert len({p.data_ptr() for p in model.parameters()}) == len(list(model.parameters()))
    ema, loop = tg.EMA(model, 0.9), [torch.zeros_like(p) for p in model.parameters()]
    assert ema._flat is not None
    opt = tg.Optimizers(model, h)
    for step in range(3):
        for p, g in zip(model.parameters(), rank_grads(model, step, 0)):
            p.grad = g
        opt.step()  # optimizers update the views in place: the flat buffer sees it
        opt.zero_grad()
        ema.update()
        for s, p in zip(loop, model.parameters()):
            s.mul_(0.9).add_(p.detach(), alpha=0.1)
    for a, b in zip(ema.shadow, loop):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # moved parameters are noticed: the EMA reads the new tensors
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone() + 1.0
    ema.update()
    for s, b, p in zip(ema.shadow, loop, model.parameters()):
        torch.testing.assert_close(s, 0.9 * b + 0.1 * p.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_compiled_model_trains_with_flattened_parameters():
    """torch.compile (fullgraph, as train_gpt) accepts parameters that alias one buffer."""
    h = hparams(COMPILE="1")
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.from_hparams(h))
    ref = tg.GPT(tg.ModelConfig.from_hparams(h))
    ref.load_state_dict(model.state_dict())
    tg.flatten_parameters(model)
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    x = torch.randint(0, 64, (2, 16))
    loss = compiled(x, x)
    loss.backward()
    ref_loss = ref(x, x)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_step_timer_accumulates_marked_phases():
    timer = tg.StepTimer(torch.device("cpu"))
    for _ in range(2):
        timer.start()
        sum(range(20_000))
        timer.mark("data")
        sum(range(200_000))
        timer.mark("fwd_bwd")
        timer.mark("ema")
        timer.collect()
    ms = timer.summary_ms()
    assert set(ms) == set(tg.STEP_PHASES)
    assert ms["fwd_bwd"] > ms["data"] > 0 and ms["comm"] == 0
    assert timer.summary_ms()["fwd_bwd"] == 0  # a new window


# ---------------------------------------------------------------- bench/step.py


def run_bench(*args: str, **env: str) -> dict:
    full = {**{k: v for k, v in os.environ.items() if k not in tg.Hyperparameters.knob_names()}, **env}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "step.py"), *args, "--json"], env=full,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.slow
def test_bench_step_cpu_small(tmp_path):
    r = run_bench("--steps", "2", "--warmup", "1", VOCAB_SIZE="256", NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2",
                  NUM_KV_HEADS="1", TRAIN_SEQ_LEN="32", TRAIN_BATCH_TOKENS="256", GRAD_ACCUM_STEPS="2", COMPILE="0",
                  NUM_LOOPS="0", PEAK_TFLOPS="1.0")
    assert r["device"] == "cpu" and r["tokens_per_step"] == 256 and r["grad_accum"] == 2
    assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["optimizer_ms"] > 0 and r["ema_ms"] > 0
    # FLOPs: 6 x matmul params + attention + tied head, all per token
    assert r["flops_per_token"] == pytest.approx(r["flops_breakdown"]["matmul"] + r["flops_breakdown"]["attention"]
                                                 + r["flops_breakdown"]["head"])
    assert r["peak_tflops"] == 1.0 and r["mfu"] == pytest.approx(r["tflops"] / 1.0)


def test_bench_flops_count_looped_layers_and_the_head():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "bench" / "step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    base = dict(VOCAB_SIZE="1024", NUM_LAYERS="6", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="4",
                TRAIN_SEQ_LEN="128", LOOP_START="2", LOOP_END="3", NUM_LOOPS="1", TTT_ENABLED="0")
    h = tg.Hyperparameters.from_env(base)
    model = tg.GPT(tg.ModelConfig.from_hparams(h))
    plain = bench.flops_per_token(model, h, looping=False)
    looped = bench.flops_per_token(model, h, looping=True)
    d, kv = 64, 32
    per_layer = d * d * 2 + d * kv * 2 + 2 * d * 4 * d  # q, proj, k, v, MLP in and out
    assert plain["matmul"] == pytest.approx(6 * 6 * per_layer, rel=0.05)
    assert looped["matmul"] == pytest.approx(6 * 8 * per_layer, rel=0.05)  # 2 extra virtual layers
    assert plain["head"] == 6 * d * 1024
    assert looped["attention"] == pytest.approx(plain["attention"] * 8 / 6)
