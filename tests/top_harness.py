"""The leaderboard top's script (PR #1855, ../shared/anchors/top1855/train_gpt.py) imported beside ours for the
parity tests (tests/test_top_parity*.py): with the FlashAttention 3 stand-in of tests/stubs on sys.path, the same
weights copied into both models, float32. The `top` fixture (conftest.py) is `load_top()`, once per session.

Patches to the top's script, so its classes run on a CPU (each one is set in `top` below): its global BOS_ID set
to 1, as its data loader does when it opens the first shard (its forward reads it; without a loader it is None).
Its fused cross-entropy (Triton, CUDA only) off in its model: its own unfused branch computes the same loss
(softcap, then F.cross_entropy in fp32), as ours does off CUDA. Its FA3 import resolves to the stand-in, whose
dense and varlen calls compute exact attention in the input's dtype; its Triton imports load. Every parity check also runs a mutant to show it can fail. Skipped, with the reason, where the anchor
folder is absent."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, STUBS, tg, use_stub

TOP = ROOT.parent / "shared" / "anchors" / "top1855"
SKIP_WITHOUT_TOP = pytest.mark.skipif(not (TOP / "train_gpt.py").is_file(),
                                      reason=f"{TOP} is not present (the leaderboard top's record folder, PR #1855)")
BOS = tg.BOS_ID
VOCAB, DIM, HEADS, KV_HEADS, ROPE_DIMS = 96, 64, 4, 2, 8
# Tolerance of float32 logits after 17 virtual layers: the two scripts order a few reductions differently
# (XSA's normalize, the split q/k/v GEMMs); measured 2.4e-7 to 6.0e-7, where a sequential tail or lanes from one
# layer later on the same weights differ by 6.4e-2 to 6.5e-2.
LOGIT_ATOL = 1e-5


def load_top():
    """The top's script as a module (its Hyperparameters are read from os.environ when it is imported)."""
    mp = pytest.MonkeyPatch()
    use_stub(mp, STUBS / "fa3", "flash_attn_interface")
    spec = importlib.util.spec_from_file_location("top1855_train_gpt", TOP / "train_gpt.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        mp.undo()
    module.BOS_ID = BOS  # what DocumentPackingLoader._init_shard sets on the first shard it opens
    return module


def top_hparams(top, **overrides) -> SimpleNamespace:
    """The top's submitted configuration at a CPU size: its defaults, the README's overrides that touch the
    model, and small dimensions."""
    H = top.Hyperparameters
    h = SimpleNamespace(**{k: getattr(H, k) for k in dir(H) if not k.startswith("_")})
    values = dict(num_layers=11, model_dim=DIM, num_heads=HEADS, num_kv_heads=KV_HEADS, mlp_mult=4.0,
                  vocab_size=VOCAB, rope_dims=ROPE_DIMS, qk_gain_init=5.0, smear_gate_enabled=True,
                  sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.5, gate_window=12, train_seq_len=64,
                  fused_ce_enabled=False)  # CUDA-only kernel; its unfused branch is the same loss
    values.update(overrides)
    for k, v in values.items():
        setattr(h, k, v)
    return h


def our_config(**overrides) -> tg.ModelConfig:
    """PRESET=record's model at the same CPU size."""
    h = tg.Hyperparameters.from_env({"PRESET": "record", "VOCAB_SIZE": str(VOCAB), "MODEL_DIM": str(DIM),
                                     "NUM_HEADS": str(HEADS), "NUM_KV_HEADS": str(KV_HEADS),
                                     "ROPE_DIMS": str(ROPE_DIMS), "QK_GAIN_INIT": "5.0", "FUSED_CE_ENABLED": "0"})
    return tg.dataclasses.replace(tg.ModelConfig.from_hparams(h), **overrides)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its initial value (zero-initialized projections and gates included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.02 if p.ndim >= 2 else 0.1))
    return model


def copy_top_into_ours(top_model, ours: tg.GPT) -> None:
    """The top's banks and per-block tensors into our per-layer modules (names differ, values do not)."""
    n = top_model.num_layers
    with torch.no_grad():
        ours.tok_emb.weight.copy_(top_model.tok_emb.weight)
        ours.skip_weights.copy_(top_model.skip_weights)
        ours.skip_gates.copy_(top_model.skip_gates)
        ours.smear.smear_w.copy_(top_model.smear_gate.weight[0])
        ours.smear.smear_lambda.copy_(top_model.smear_lambda[0])
        for i, (tb, ob) in enumerate(zip(top_model.blocks, ours.blocks)):
            ob.attn.c_q.weight.copy_(top_model.qo_bank[i])
            ob.attn.proj.weight.copy_(top_model.qo_bank[n + i])
            ob.attn.c_k.weight.copy_(top_model.kv_bank[i])
            ob.attn.c_v.weight.copy_(top_model.kv_bank[n + i])
            ob.mlp.fc.weight.copy_(top_model.mlp_up_bank[i])
            ob.mlp.proj.weight.copy_(top_model.mlp_down_bank[i])
            for name in ("attn_scale", "mlp_scale", "resid_mix"):
                getattr(ob, name).copy_(getattr(tb, name))
            ob.attn.q_gain.copy_(tb.attn.q_gain)
            ob.attn.attn_gate_w.copy_(tb.attn.attn_gate_w)
            if ob.lane_r is not None:
                ob.lane_r.copy_(top_model.parallel_resid_lambdas[i])
                ob.lane_p.copy_(top_model.parallel_post_lambdas[i])


def documents(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (rows, cols), generator=g)
    ids[torch.rand(rows, cols, generator=g) < 0.06] = BOS
    ids[:, 0] = BOS
    return ids


def pair(top, seed: int = 0, **ours_overrides):
    torch.manual_seed(seed)
    top_model = perturbed(top.GPT(top_hparams(top)), seed).eval()
    ours = tg.GPT(our_config(**ours_overrides))
    copy_top_into_ours(top_model, ours)
    return top_model, ours


def top_logits(top_model, ids: torch.Tensor, varlen: bool) -> torch.Tensor:
    """The top's forward: dense FA3 per row, or (varlen) the rows flattened into one with cu_seqlens at every
    row start and BOS, as its training and evaluation call it."""
    if not varlen:
        return top_model.forward_logits(ids)
    cu = tg.document_starts(ids, BOS)
    return top_model.forward_logits(ids.reshape(1, -1), cu_seqlens=cu, max_seqlen=ids.size(1)).view(*ids.shape, -1)


def top_knob_envs() -> dict[str, str]:
    """Each attribute of the top's Hyperparameters class that its environment sets: attribute -> variable (read
    from its syntax tree, the first os.environ.get of each class-level assignment)."""
    import ast
    tree = ast.parse((TOP / "train_gpt.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Hyperparameters")
    envs = {}
    for st in cls.body:
        if not (isinstance(st, ast.Assign) and isinstance(st.targets[0], ast.Name)):
            continue
        for node in ast.walk(st.value):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and ast.unparse(node.func.value) == "os.environ"):
                envs[st.targets[0].id] = node.args[0].value
                break
    return envs


def readme_command() -> dict[str, str]:
    """The variables of the top README's reproduce command (## Reproducing), in its order."""
    import re
    text = (TOP / "README.md").read_text().split("## Reproducing", 1)[1]
    block = text.split("```bash", 1)[1].split("```", 1)[0].split("torchrun", 1)[0]
    return dict(re.findall(r"([A-Z][A-Z0-9_]*)=(\S+)", block))


def top_config(env: dict[str, str]) -> dict[str, object]:
    """The top's effective configuration under `env` (its class attributes are computed when its script is
    imported, so it is imported afresh with exactly `env` as os.environ): variable -> value."""
    mp = pytest.MonkeyPatch()
    use_stub(mp, STUBS / "fa3", "flash_attn_interface")
    for name in {*top_knob_envs().values(), "DATA_PATH", "TOKENIZER_PATH", *env}:
        mp.delenv(name, raising=False)
    for name, value in env.items():
        mp.setenv(name, value)
    try:
        spec = importlib.util.spec_from_file_location("top1855_config", TOP / "train_gpt.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        mp.undo()
    H = module.Hyperparameters
    config = {env_name: getattr(H, attr) for attr, env_name in top_knob_envs().items()}
    config["DATA_PATH"], config["TOKENIZER_PATH"] = H.datasets_dir, H.tokenizer_path
    return config
