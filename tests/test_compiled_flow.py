"""The GPU-only paths, run on the CPU the way they run on a GPU: through main(), compiled, with
stand-ins that mirror upstream's structure (tests/stubs: FlashAttention 3 and flash-attn-4; the FA3 stand-in in
../shared/anchors/fa3_cpu too, when present), nothing pre-called outside the compiled region. Each compiled
run is a fresh process (tests/compiled_run.py), so no op was defined eagerly before its graph was traced.

Backend: `aot_eager` for whole runs (dynamo, AOTAutograd and fake tensors, which is where the compiled-run defects
fixed before were: an op defined inside a compiled region, a tensor passed twice to an autograd.Function), and
inductor itself (its CPU code generation) for the leaderboard top's combination of knobs and for a model with
each of them (test_inductor_compiles_the_record_knobs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, SHARED_FA3, STUBS, tg
from pgolf.shards import write_shard

CPU = torch.device("cpu")
BOS = tg.BOS_ID


def run_compiled(tmp_path: Path, dataset: dict, knobs: dict[str, str], stubs: list[Path],
                 inductor: bool = False) -> tuple[dict, str, str]:
    """main() in a fresh process with COMPILE=1 and a small record-shaped run; (result JSON, log, stderr)."""
    env = dict(PRESET="smoke", DATA_PATH=str(dataset["dir"]), TOKENIZER_PATH=str(dataset["tokenizer"]),
               LOG_DIR=str(tmp_path), RUN_ID="flow", COMPILE="1", ITERATIONS="5", MAX_WALLCLOCK_SECONDS="0",
               WARMUP_STEPS="1", NUM_LAYERS="3", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", NUM_LOOPS="1",
               LOOP_START="1", LOOP_END="1", LOOPING_START_STEP="2", VAL_LOSS_EVERY="2", TRAIN_SEQ_LEN="64",
               EVAL_SEQ_LEN="64", TRAIN_BATCH_TOKENS="512", EVAL_BATCH_SEQS="8", EVAL_STRIDE="32", TTT_ENABLED="1",
               TTT_CHUNK_TOKENS="1024", MAX_VAL_TOKENS="2048", GPTQ_CALIBRATION_BATCHES="2",
               QUANT_METHOD="gptq", BPB_CHECK_DOCS="5", PHASED_TTT_PREFIX_DOCS="4", PHASED_TTT_NUM_PHASES="2",
               TTT_BATCH_SIZE="4", TTT_LORA_RANK="4", SMEAR_GATE_ENABLED="1", SPARSE_ATTN_GATE_ENABLED="1",
               XSA_LAST_N="3", PARALLEL_MODE="lanes", PARALLEL_START_LAYER="2")
    env.update(knobs)
    clean = {k: v for k, v in os.environ.items() if k not in tg.Hyperparameters.knob_names()}
    result = tmp_path / "result.json"
    cmd = [sys.executable, str(ROOT / "tests" / "compiled_run.py"), str(result), *(["--inductor"] if inductor else []),
           *map(str, stubs)]
    proc = subprocess.run(cmd, env={**clean, **env}, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0 and result.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    log = tmp_path / "flow.txt"
    return json.loads(result.read_text()), log.read_text() if log.is_file() else "", proc.stderr


TOP_KNOBS = {"ATTN_BACKEND": "fa3", "DOC_ISOLATION": "1", "DOC_PACKED_LOADER": "1", "FUSED_CE_ENABLED": "1",
             "FUSED_MLP_ENABLED": "1", "MLP_ACT": "leaky_relu2"}
FLOWS = {
    "fused_ce": ({"FUSED_CE_ENABLED": "1"}, []),
    # The leaderboard top's attention, MLP and loss: FA3 varlen over documents, the packed loader, fused CE, the
    # fused leaky_relu2 MLP (every flow runs phased TTT);
    # once more with inductor's own code generation (96 s here), the rest with aot_eager (15-17 s each).
    "fa3_doc_isolation": (TOP_KNOBS, [STUBS / "fa3"]),
    "fa3_doc_isolation_inductor": (TOP_KNOBS, [STUBS / "fa3"]),
    "shared_fa3_doc_isolation": ({"ATTN_BACKEND": "fa3", "DOC_ISOLATION": "1", "DOC_PACKED_LOADER": "1"},
                                 [SHARED_FA3]),
    "fa4": ({"ATTN_BACKEND": "fa4"}, [STUBS / "fa4"]),
    "sdpa_doc_isolation": ({"DOC_ISOLATION": "1", "DOC_PACKED_LOADER": "1"}, []),
}


@pytest.mark.slow
@pytest.mark.parametrize("flow", list(FLOWS))
def test_main_runs_compiled_and_compiles_nothing_after_the_warm_up(tmp_path, dataset, flow):
    """Every graph a run uses (training plain/looped, evaluation in both states, TTT, calibration, Muon) compiles
    before the first timed step and none afterwards, for each knob combination `record` and the preflight use."""
    knobs, stubs = FLOWS[flow]
    if stubs and not stubs[0].is_dir():
        pytest.skip(f"{stubs[0]} is not present (the FA3 stand-in of ../shared/anchors)")
    inductor = flow.endswith("_inductor")  # its graphs are dynamo's (no backward graph to read)
    result, log, err = run_compiled(tmp_path, dataset, knobs, stubs, inductor)
    assert result["rc"] == 0, err[-3000:]
    compiles = result["compiles"]
    assert compiles and not [c for c in compiles if c.endswith("training")], compiles
    metrics = json.loads((tmp_path / "flow.json").read_text())
    order = [r["phase"] for r in metrics["phases"]]
    assert order == ["startup", "warmup_train_plain", "warmup_train_looped", "warmup_eval_plain", "warmup_eval_looped",
                     "warmup_ttt_train", "warmup_calibration", "training", "calibration", "eval_pre_quant",
                     "quantization", "artifact_read", "eval_roundtrip", "eval_sliding", "eval_ttt"], order
    assert metrics["wall_seconds"] >= sum(r["seconds"] for r in metrics["phases"]) * 0.99
    assert all(f"phase:{name} seconds:" in log for name in order) and "wall_time:" in log
    assert "ttt_phased:1/" in log and "mode:phased_lora" in log and metrics["ttt"]["documents"] >= 1
    assert f"phases:{metrics['ttt']['phases_run']}/2" in log, "phases run of PHASED_TTT_NUM_PHASES=2"
    assert compiles.count("lora:setup") == 1, compiles  # one dynamic graph, compiled in the warm-up
    backend = knobs.get("ATTN_BACKEND", "sdpa")
    assert f"resolved_attn_backend: {backend}" in log
    ops = set().union(*result["graphs"])
    if knobs.get("FUSED_CE_ENABLED") == "1":
        assert "pgolf.softcap_ce.default" in ops and (inductor or "pgolf.softcap_ce_bwd.default" in ops)
    if knobs.get("FUSED_MLP_ENABLED") == "1":
        assert "pgolf.leaky_relu2_mlp.default" in ops and (inductor or "pgolf.leaky_relu2_mlp_bwd.default" in ops)
    if knobs.get("DOC_ISOLATION") == "1":
        kind = "fa3_varlen" if backend == "fa3" else "sdpa_document_mask"
        assert f"resolved_doc_attention: {kind}" in log
    if backend == "fa4":
        assert "pgolf.fa4_fwd.default" in ops and "pgolf.fa4_bwd.default" in ops
    if flow.startswith("fa3_doc_isolation"):
        assert "pgolf_test_fa3._flash_attn_forward.default" in ops
        # The training graphs take cu_seqlens from the loader; only evaluation graphs compute them on the device.
        # (Dynamo's graphs, read with inductor, hold a training step's FA3 call as an autograd HOP.)
        assert inductor or sum("pgolf.doc_cu_seqlens.default" not in g and
                               "pgolf_test_fa3._flash_attn_forward.default" in g for g in result["graphs"]) >= 2


@pytest.mark.slow
def test_an_fa3_that_fails_to_import_is_one_clear_line_or_a_fallback(tmp_path, dataset):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "flash_attn_interface.py").write_text(
        'raise ImportError("flash_attn_3/_C.abi3.so: undefined symbol: _ZN3c104cuda9SetDeviceEab")\n')
    run = tmp_path / "run"
    run.mkdir()
    result, log, err = run_compiled(run, dataset, {"ATTN_BACKEND": "fa3", "ITERATIONS": "1"}, [broken])
    assert result["rc"] == 2
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert line == ["error: ATTN_BACKEND='fa3' is not allowed here: flash_attn_interface ImportError: "
                    "flash_attn_3/_C.abi3.so: undefined symbol: _ZN3c104cuda9SetDeviceEab; use auto or sdpa"], err


# ---------------------------------------------------------------------------------------------
# Row by row, each failing before its fix
# ---------------------------------------------------------------------------------------------

MODEL_SCRIPT = r"""
import sys, torch
sys.path[:0] = {paths!r}
import train_gpt as tg
cfg = tg.ModelConfig(vocab_size=96, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
                     tie_embeddings=True, tied_embed_init_std=0.05, logit_softcap=30.0, rope_base=1e4,
                     qk_gain_init=1.5, xsa_last_n=2, smear_gate_enabled=True, {knobs})
torch.manual_seed(0)
model = tg.GPT(cfg)
ids = torch.randint(2, 96, (2, 33), generator=torch.Generator().manual_seed(1))
ids[0, 9] = ids[1, 20] = tg.BOS_ID
compiled = torch.compile(model, backend={backend!r}, fullgraph=True, dynamic=False)
loss = compiled(ids[:, :-1], ids[:, 1:])
loss.backward()
grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
model.zero_grad()
ref = model(ids[:, :-1], ids[:, 1:])  # eager, after the compiled call
ref.backward()
assert abs(loss.item() - ref.item()) < 2e-2, (loss.item(), ref.item())
assert all(torch.allclose(g, p.grad, atol=5e-2, rtol=5e-2) for g, p in zip(grads, [p for p in model.parameters() if p.grad is not None]))
print("ok", loss.item())
"""


def compile_model_fresh(knobs: str, paths: list[str], backend: str = "aot_eager", timeout: int = 600):
    script = MODEL_SCRIPT.format(paths=[str(ROOT), *paths], knobs=knobs, backend=backend)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_row1_fused_ce_model_compiles_with_the_op_never_called_before():
    """Before: pgolf::softcap_ce was defined on its first call, inside the compiled forward, and dynamo refused
    (`Attempted to call function marked as skipped ... infer_schema`)."""
    proc = compile_model_fresh("fused_ce_enabled=True", [])
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("stub", ["ours", "shared"])
@pytest.mark.slow
def test_row2_fa3_varlen_model_compiles_with_the_op_never_called_before(stub):
    """Before: doc_cu_seqlens defined inside the compiled hidden(), and one cu_seqlens tensor passed as both
    cu_seqlens_q and cu_seqlens_k to FA3's autograd.Function ('duplicate tensor input' on torch 2.13)."""
    path = STUBS / "fa3" if stub == "ours" else SHARED_FA3
    if not path.is_dir():
        pytest.skip(f"{path} is not present (the FA3 stand-in of ../shared/anchors)")
    proc = compile_model_fresh("doc_isolation=True, attn_backend='fa3'", [str(path)])
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.slow
def test_row2_one_tensor_twice_into_fa3s_autograd_function_is_what_dynamo_refuses(fa3_stub):
    """Why Documents carries cu_k, a copy of cu_q: the check the fix answers can fail."""
    q, k, v = (torch.randn(12, h, 8, requires_grad=True) for h in (4, 2, 2))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)

    def attend(cu_q, cu_k):
        return fa3_stub.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 12, 12, causal=True).sum()

    torch._dynamo.reset()
    try:
        with pytest.raises(Exception, match="duplicate tensor input"):
            torch.compile(lambda c: attend(c, c), backend="aot_eager", fullgraph=True)(cu)
        assert torch.compile(lambda c: attend(c, c.clone()), backend="aot_eager", fullgraph=True)(cu).isfinite()
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiles_the_record_knobs():
    """Inductor's own lowering (not only aot_eager) of a model with the fused CE and MLP ops and FA3 varlen attention."""
    proc = compile_model_fresh("fused_ce_enabled=True, fused_mlp_enabled=True, mlp_act='leaky_relu2', "
                               "doc_isolation=True, attn_backend='fa3'", [str(STUBS / "fa3")],
                               backend="inductor", timeout=900)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.slow
def test_row3_fa4_custom_op_takes_the_four_values_fa4_returns_now(fa4_stub):
    """Before: `out, lse = _flash_attn_fwd(...)` failed on flash-attn-4 >= 4.0.0b19 (out, lse, p, row_max)."""
    attn = tg.fa4_attention()
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 9, h, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    out = attn(q, k, v)
    ref_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in ref_in), is_causal=True,
                                         enable_gqa=True).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    for a, b in zip((q, k, v), ref_in):
        assert torch.allclose(a.grad, b.grad, atol=1e-4)
    assert fa4_stub == {"fwd": 1, "bwd": 1}, "the backward reuses the forward's output and lse"
    compiled = torch.compile(lambda a, b, c: attn(a, b, c).sum(), backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(q, k, v), ref.sum(), atol=1e-4)


def test_fa4_backend_model_equals_the_sdpa_model(fa4_stub):
    torch.manual_seed(0)
    sdpa = iso_model(doc_isolation=False)
    fa4 = iso_model(doc_isolation=False, attn_backend="fa4")
    fa4.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(7))
    # The flash path runs attention in bf16 (as FA3 and FA4 do), so compare at bf16 precision.
    assert abs(fa4(ids[:, :-1], ids[:, 1:]).item() - sdpa(ids[:, :-1], ids[:, 1:]).item()) < 2e-2


def broken_fa3(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "flash_attn_interface.py").write_text('raise ImportError("undefined symbol: _ZN3c10")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn_interface", raising=False)


def test_row4_auto_passes_over_an_fa3_that_is_found_but_does_not_import(tmp_path, monkeypatch):
    """Before: auto picked FA3 because find_spec found it; the model then failed to build with ImportError."""
    broken_fa3(tmp_path, monkeypatch)
    monkeypatch.setattr(tg, "importable", lambda m: m == "flash_attn_interface")  # FA4 absent
    backend, notes = tg.select_attention_backend("auto", torch.device("cuda"))
    assert backend == "sdpa"
    assert notes == ["fa3 (flash_attn_interface) is installed but not used: ImportError: undefined symbol: _ZN3c10"]
    with pytest.raises(tg.ConfigError, match=r"^ATTN_BACKEND='fa3' is not allowed here: flash_attn_interface "
                                             r"ImportError: undefined symbol"):
        tg.select_attention_backend("fa3", CPU)


def test_row4_auto_falls_back_to_fa4_on_hopper(tmp_path, monkeypatch, fa4_stub):
    broken_fa3(tmp_path, monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    backend, notes = tg.select_attention_backend("auto", torch.device("cuda"))
    assert backend == "fa4" and len(notes) == 1 and notes[0].startswith("fa3 (flash_attn_interface)")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert tg.select_attention_backend("auto", torch.device("cuda"))[0] == "sdpa"
    with pytest.raises(tg.ConfigError, match="flash_attn.cute needs a GPU of compute capability 9-11"):
        tg.select_attention_backend("fa4", torch.device("cuda"))


def test_attention_backend_resolution_on_cpu():
    assert tg.select_attention_backend("auto", CPU) == ("sdpa", [])
    assert tg.select_attention_backend("sdpa", CPU) == ("sdpa", [])


def iso_model(**kw) -> tg.GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=96, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
               tie_embeddings=True, tied_embed_init_std=0.05, logit_softcap=30.0, rope_base=1e4, qk_gain_init=1.5,
               smear_gate_enabled=True, xsa_last_n=2, doc_isolation=True)
    cfg.update(kw)
    model = tg.GPT(tg.ModelConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def random_docs(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 96, (rows, cols), generator=g)
    ids[torch.rand(rows, cols, generator=g) < 0.1] = BOS
    return ids


def test_row6_doc_attention_kind_is_fa3_then_flex_on_cuda_and_the_dense_mask_only_on_cpu():
    cuda = torch.device("cuda")
    assert tg.doc_attention_kind("fa3", cuda, True) == "fa3_varlen"
    assert tg.doc_attention_kind("sdpa", cuda, True) == "flex_block_mask"
    assert tg.doc_attention_kind("fa4", cuda, True) == "flex_block_mask"
    assert tg.doc_attention_kind("sdpa", cuda, False) == "sdpa_document_mask"  # eager flex has no fused kernel
    assert tg.doc_attention_kind("sdpa", CPU, True) == "sdpa_document_mask"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.slow
def test_row6_flex_block_mask_attention_equals_the_dense_mask(monkeypatch, compiled):
    """The FlexAttention path (CUDA) run on the CPU: forward only, as FlexAttention has no CPU backward."""
    model = iso_model()
    ids = random_docs(2, 48, seed=3)
    with torch.no_grad():
        dense = model(ids[:, :-1], ids[:, 1:], reduction="none")
    monkeypatch.setattr(tg, "doc_attention_kind", lambda backend, device, compiled: "flex_block_mask")
    run = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False) if compiled else model
    torch._dynamo.reset()
    with torch.no_grad():
        flex = run(ids[:, :-1], ids[:, 1:], reduction="none")
    torch._dynamo.reset()
    assert torch.allclose(flex, dense, atol=1e-5), (flex - dense).abs().max()


def fake_cuda_autocast():
    """CUDA autocast (bf16) on fake CUDA tensors: the dtype rules of a GPU run, checked on a CPU build."""
    from contextlib import contextmanager

    from torch._subclasses.fake_tensor import FakeTensorMode

    @contextmanager
    def ctx():
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
            torch.set_autocast_enabled("cuda", True)
            torch.set_autocast_dtype("cuda", torch.bfloat16)
            try:
                yield mode
            finally:
                torch.set_autocast_enabled("cuda", False)

    return ctx()


def test_row7_norms_and_the_mlp_keep_bf16_under_cuda_autocast():
    """Before: torch >= 2.12's CUDA autocast ran F.rms_norm in fp32 (and pow, so h.square()): block inputs,
    q/k norms, the final norm and the MLP's hidden came out fp32, and GPTQ's Hessian taps took the fp32 path."""
    mlp = tg.MLP(tg.ModelConfig(vocab_size=8, num_layers=1, model_dim=16, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
                                tie_embeddings=True, tied_embed_init_std=0.05, logit_softcap=30.0, rope_base=1e4,
                                qk_gain_init=1.5, mlp_act="leaky_relu2")).requires_grad_(False)
    seen = []
    mlp.proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with fake_cuda_autocast():
        mlp = mlp.to_empty(device="cuda")
        x = torch.empty(4, 16, dtype=torch.bfloat16, device="cuda")
        assert torch.nn.functional.rms_norm(x, (16,)).dtype == torch.float32, "the autocast rule this guards against"
        assert tg.rms_norm(x).dtype == torch.bfloat16
        assert mlp(x).dtype == torch.bfloat16 and seen == [torch.bfloat16]


@pytest.mark.slow
def test_row8_the_training_graph_takes_cu_seqlens_from_the_loader_and_never_waits_for_the_device(tmp_path, fa3_stub):
    """Before: document_starts ran nonzero inside every compiled training forward (a device-to-host sync)."""
    model = iso_model(attn_backend="fa3")
    tokens = np.arange(2, 2 + 3000) % 90 + 2
    tokens[:400:37] = BOS  # two batches of few documents, then batches of many (cu_seqlens of 64, then 128)
    tokens[400::2] = BOS
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, tokens.astype(np.uint16))
    loader = tg.TrainLoader([path], 64, 3, 1, 0, 96, tg.DistInfo(0, 1, CPU), packed=True)
    graphs = []

    def backend(gm, inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def keep(g, _):
            graphs.append({str(n.target) for n in g.graph.nodes if n.op == "call_function"})
            return make_boxed_func(g.forward)
        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    h = types.SimpleNamespace(accum_steps=1, compute_dtype="fp32", doc_isolation=True)
    opt = types.SimpleNamespace(step=lambda timer=None: None, zero_grad=model.zero_grad)
    try:
        losses, lengths = [], set()
        real_next = loader.next_batch

        def next_batch():
            batch = real_next()
            lengths.add(batch[2].numel())
            return batch

        loader.next_batch = next_batch
        for _ in range(4):  # several document counts: one graph (cu_seqlens' length is dynamic)
            losses.append(tg.train_step(compiled, loader, opt, h, CPU).item())
    finally:
        loader.close()
        torch._dynamo.reset()
    assert lengths == {64, 128} and len(graphs) == 2, "one forward and one backward graph for every document count"
    assert not any("pgolf.doc_cu_seqlens.default" in g or "aten.nonzero.default" in g for g in graphs), graphs
    assert all(np.isfinite(losses))


def test_row8_loader_cu_seqlens_are_the_document_starts_padded_to_the_bucket(tmp_path):
    tokens = (np.arange(4000) % 50 + 2).astype(np.int64)
    tokens[np.random.default_rng(0).random(4000) < 0.05] = BOS
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, tokens.astype(np.uint16))
    loader = tg.TrainLoader([path], 64, 5, 1, 0, 96, tg.DistInfo(0, 1, CPU))
    try:
        for _ in range(3):
            x, y, cu = loader.next_batch()
            starts = tg.document_starts(x, BOS)
            assert cu.dtype == torch.int32 and cu.numel() % tg.CU_BUCKET == 0 and cu.numel() >= starts.numel()
            assert torch.equal(cu[: starts.numel()], starts) and (cu[starts.numel():] == x.numel()).all()
    finally:
        loader.close()


def test_row8_zero_length_padding_sequences_change_nothing(fa3_stub):
    """The bucket's padding entries are empty sequences: the varlen result equals the unpadded one."""
    model = iso_model(attn_backend="fa3")
    ids = random_docs(3, 40, seed=4)
    x, y = ids[:, :-1], ids[:, 1:]
    cu = torch.from_numpy(tg.host_cu_seqlens(x.numpy(), BOS))
    with torch.no_grad():
        assert torch.equal(model(x, y, reduction="none", cu_seqlens=cu), model(x, y, reduction="none"))


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_row9_the_wallclock_stop_uses_synchronized_step_time(monkeypatch):
    """Before: the stop predicted the next step from the host's enqueue time; with the GPU running behind (each
    step's sync waits 1 s for 0.01 s of enqueue), a 10 s cap was overrun."""
    clock = FakeClock()
    monkeypatch.setattr(tg.time, "perf_counter", clock)
    real_all_reduce = tg.all_reduce_

    def step(*args, **kwargs):
        clock.now += 0.01  # the host enqueues the step
        return torch.tensor(2.0)

    def all_reduce_(t, op="sum"):
        clock.now += 1.0  # the collective waits for the device to finish the step
        return real_all_reduce(t, op)

    monkeypatch.setattr(tg, "train_step", step)
    monkeypatch.setattr(tg, "all_reduce_", all_reduce_)
    h = tg.Hyperparameters.from_env({"PRESET": "smoke", "ITERATIONS": "1000", "MAX_WALLCLOCK_SECONDS": "10",
                                     "EMA_DECAY": "0", "NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "2",
                                     "NUM_KV_HEADS": "1"})
    model = tg.GPT(tg.ModelConfig.from_hparams(h))
    opt = types.SimpleNamespace(set_schedule=lambda scale, step: None)
    graphs = tg.Graphs(model, model.hidden, model)
    loader = types.SimpleNamespace(close=lambda: None, wait_seconds=0.0)
    result = tg.train(h, tg.DistInfo(0, 1, CPU), graphs, opt, lambda: loader, lambda: None, 0.0, lambda *a, **k: None)
    assert result.stopped_by == "wallclock" and result.train_time_ms <= 10_000, result
    assert result.steps == 9  # 9.09 s; a 10th step would end at 10.1 s


def test_row10_fused_ce_op_takes_non_contiguous_targets():
    """The op's CPU formula; the Triton kernels' case is in test_gpu_speed_paths' interpreter check."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 50, generator=g) * 10
    wide = torch.randint(0, 50, (6, 2), generator=g)
    t = wide[:, 0]
    assert not t.is_contiguous()
    ref = F.cross_entropy(tg.softcap(z, 30.0), t.contiguous(), reduction="none")
    assert torch.allclose(tg.fused_softcap_ce()(z, t, 30.0), ref, atol=1e-5)
