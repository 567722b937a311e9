"""Configuration: `Hyperparameters.from_env`, presets, validation messages, world sizes, unknown
variables, derived paths and the DRY_RUN=1 preflight.

Run: python -m pytest -q tests/test_config.py

Every test passes its environment to `from_env` explicitly (never os.environ); the two subprocess
tests build a clean child environment without knobs or torchrun variables.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT, tg
from pgolf import knobs, recover

H = tg.Hyperparameters
SCRIPT = ROOT / "train_gpt.py"
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def config_error(env: dict[str, str]) -> str:
    """The ConfigError message for `env`; fails if from_env accepts it or raises something else."""
    with pytest.raises(tg.ConfigError) as info:
        H.from_env(env)
    return str(info.value)


def assert_one_line_naming(msg: str, *needles: str) -> None:
    assert "\n" not in msg and "\r" not in msg, f"message is not one line: {msg!r}"
    assert msg.strip() == msg and msg, f"message is empty or padded: {msg!r}"
    for needle in needles:
        assert needle in msg, f"{needle!r} not named in message {msg!r}"


def child_env(**extra: str) -> dict[str, str]:
    """os.environ minus knobs, feature flags and torchrun variables, plus `extra` and PYTHONPATH."""
    drop = set(H.knob_names()) | set(knobs.UNIMPLEMENTED_FEATURES) | set(TORCHRUN_VARS)
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith("TORCHELASTIC_") and k not in ("PYTHONPATH", "PRESET")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


# ---------------------------------------------------------------- defaults and presets


def test_empty_env_is_the_dataclass_default_record_preset():
    h = H.from_env({})
    assert h == H()
    assert h.preset == "record" and tg.PRESETS["record"] == {}
    assert h.env_warnings == ()
    assert (h.world_size, h.rank, h.local_rank) == (1, 0, 0)


@pytest.mark.parametrize("name, value", [
    ("VOCAB_SIZE", 8192), ("NUM_LAYERS", 11), ("MODEL_DIM", 512), ("NUM_HEADS", 8), ("NUM_KV_HEADS", 4),
    ("MLP_MULT", 4.0), ("TRAIN_SEQ_LEN", 2048), ("TRAIN_BATCH_TOKENS", 786_432), ("MATRIX_LR", 0.026),
    ("EMA_DECAY", 0.9965), ("WARMDOWN_FRAC", 0.85), ("MIN_LR", 0.1), ("BETA2", 0.99), ("QK_GAIN_INIT", 5.0), ("TIE_EMBEDDINGS", True),
    ("MAX_WALLCLOCK_SECONDS", 600.0), ("SEED", 1337), ("COMPILE", True), ("DRY_RUN", False),
])
def test_documented_record_defaults(name, value):
    h = H.from_env({})
    got = h.knob_values()[name]
    assert got == value and type(got) is type(value), f"{name}: {got!r} != {value!r}"


def test_knob_names_are_upper_case_fields_and_unique():
    names = H.knob_names()
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*", n) for n in names)
    # topology and bookkeeping fields are not knobs
    assert not {"WORLD_SIZE", "RANK", "LOCAL_RANK", "ENV_WARNINGS"} & set(names)
    # a feature flag that became a knob must leave UNIMPLEMENTED_FEATURES, or setting it would be refused
    assert not set(names) & set(knobs.UNIMPLEMENTED_FEATURES)


# A value that passes validation and differs from the record default, per knob (str knobs listed;
# numbers and bools derived from the default).
STR_OVERRIDES = {"data_dir": "/data/pg", "data_path": "/shards/x", "tokenizer_path": "/tok/x.model",
                 "run_id": "my-run_1.2", "log_dir": "/tmp/logs-x", "device": "cpu", "compute_dtype": "fp32",
                 "mlp_act": "relu2", "muon_ns": "classic", "parallel_mode": "off", "quant_method": "rtn",
                 "gptq_reserve_seconds": "8.5", "compressor": "lzma", "artifact": "/tmp/x.ptz",
                 "bpb_check_docs": "all", "muon_ns_dtype": "fp32", "attn_backend": "sdpa",
                 "requantize": "/tmp/x.weights.pt"}
# Knobs that are only valid together with another one.
OVERRIDE_COMPANIONS = {"eval_only": {"ARTIFACT": "/tmp/x.ptz"}}


def _override_candidates(f) -> list[str]:
    d = f.default
    if isinstance(d, bool):
        return ["0" if d else "1"]
    if isinstance(d, int):
        return [str(v) for v in (d * 2, d + 1, d - 1, 1, 2) if v != d and v >= 0]
    if isinstance(d, float):
        return [repr(v) for v in (d / 2, d * 2, 0.5, 0.25, 1.0, 0.0) if v != d]
    return [STR_OVERRIDES[f.name]] if f.name in STR_OVERRIDES else []


@pytest.mark.parametrize("f", [f for f in H.knob_fields() if f.name != "preset"], ids=lambda f: f.name.upper())
def test_every_knob_can_be_overridden(f):
    candidates = _override_candidates(f)
    if not candidates:
        pytest.skip(f"no override value chosen for new str knob {f.name.upper()}")
    for raw in candidates:  # the first value that passes the cross-field checks with the other defaults
        try:
            h = H.from_env({f.name.upper(): raw, **OVERRIDE_COMPANIONS.get(f.name, {})})
            break
        except tg.ConfigError as exc:
            assert f.name.upper() in str(exc) or "TRAIN_BATCH_TOKENS" in str(exc)
    else:
        pytest.fail(f"none of {candidates} is accepted for {f.name.upper()}")
    got = getattr(h, f.name)
    assert type(got) is type(f.default)
    assert got != f.default
    expected = {bool: lambda s: s == "1", int: int, float: float, str: str}[type(f.default)](raw)
    assert got == expected
    # nothing else moved
    moved = {f.name.upper(), *OVERRIDE_COMPANIONS.get(f.name, {})}
    others = {k: v for k, v in h.knob_values().items() if k not in moved}
    assert others == {k: v for k, v in H().knob_values().items() if k not in moved}


@pytest.mark.parametrize("env, field_name, value", [
    ({"NUM_LAYERS": "13"}, "num_layers", 13),  # int
    ({"NUM_LAYERS": " 7 "}, "num_layers", 7),  # surrounding whitespace is ignored
    ({"MATRIX_LR": "0.5"}, "matrix_lr", 0.5),  # float
    ({"MATRIX_LR": "1e-3"}, "matrix_lr", 1e-3),
    ({"MLP_MULT": "3"}, "mlp_mult", 3.0),  # an integer literal for a float knob is a float
    ({"TIE_EMBEDDINGS": "0"}, "tie_embeddings", False),  # bool 0/1
    ({"SAMPLE_DATA": "1"}, "sample_data", True),
    ({"COMPILE": "0"}, "compile", False),
    ({"RUN_ID": "abc-1.2_x"}, "run_id", "abc-1.2_x"),  # str
    ({"DEVICE": "cpu"}, "device", "cpu"),
])
def test_overrides_by_type(env, field_name, value):
    got = getattr(H.from_env(env), field_name)
    assert got == value and type(got) is type(value)


def test_baseline_preset():
    h = H.from_env({"PRESET": "baseline"})
    assert h.preset == "baseline"
    assert (h.num_layers, h.mlp_mult, h.train_batch_tokens, h.train_seq_len, h.vocab_size) == (9, 2.0, 524_288, 1024, 1024)
    assert (h.model_dim, h.num_heads, h.num_kv_heads, h.eval_seq_len) == (512, 8, 4, 1024)
    for name, value in tg.PRESETS["baseline"].items():
        assert getattr(h, name) == value, name
    # knobs the preset does not mention keep the record defaults
    for f in H.knob_fields():
        if f.name not in tg.PRESETS["baseline"] and f.name != "preset":
            assert getattr(h, f.name) == f.default, f.name


# Knobs that run the same model differently (devices, logs, files, checks): not features a preset chooses.
OPERATIONAL = {"compile", "sample_data", "strict_env", "dry_run", "eval_only", "overwrite", "tie_embeddings",
               "ttt_warm_start_a"}


def test_every_feature_the_record_turns_on_is_explicitly_off_in_the_baseline():
    """The baseline is the naive baseline (1.2244 BPB: int8 + zlib, no EMA, no sliding eval), written out:
    a feature added to the record later must be switched off in it explicitly, never inherited."""
    numeric = {"xsa_last_n", "num_loops", "eval_stride", "ema_decay", "rope_dims", "min_lr", "muon_wd", "embed_wd",
               "adam_wd", "grad_clip_norm"}
    base = tg.PRESETS["baseline"]
    on_in_record = [f.name for f in H.knob_fields()
                    if f.name not in OPERATIONAL and ((f.type in (bool, "bool") and f.default is True)
                                                      or (f.name in numeric and f.default))]
    assert len(on_in_record) > 15
    missing = [n for n in on_in_record if n not in base]
    assert not missing, f"PRESET=baseline inherits these record features: {missing}"
    assert all(not base[n] for n in on_in_record if n not in ("ema_decay",)) and base["ema_decay"] == 0.0
    h = H.from_env({"PRESET": "baseline"})
    assert (h.quant_method, h.matrix_bits, h.embed_bits, h.compressor, h.lqer_enabled) == ("rtn", 8, 8, "zlib", False)
    assert (h.mlp_clip_sigmas, h.attn_clip_sigmas, h.embed_clip_sigmas) == (0.0, 0.0, 0.0)  # the row's max


def test_explicit_env_var_beats_preset():
    h = H.from_env({"PRESET": "baseline", "NUM_LAYERS": "5", "MATRIX_LR": "0.01", "TRAIN_SEQ_LEN": "2048"})
    assert (h.num_layers, h.matrix_lr, h.train_seq_len) == (5, 0.01, 2048)
    assert h.mlp_mult == 2.0  # the rest of the preset still applies
    h = H.from_env({"PRESET": "smoke", "COMPILE": "1", "SAMPLE_DATA": "0"})
    assert h.compile is True and h.sample_data is False and h.num_layers == tg.PRESETS["smoke"]["num_layers"]


def test_smoke_preset_is_small():
    h = H.from_env({"PRESET": "smoke"})
    assert h.preset == "smoke" and h.sample_data and not h.compile and h.vocab_size == 1024
    assert h.num_layers <= 4 and h.model_dim <= 128 and h.train_batch_tokens <= 16_384 and h.train_seq_len <= 256
    assert 0 < h.max_wallclock_seconds <= 120
    n = sum(p.numel() for p in tg.GPT(tg.ModelConfig.from_hparams(h)).parameters())
    assert n < 1_000_000


@pytest.mark.parametrize("preset", ["bogus", "Record", ""])
def test_unknown_preset_fails_naming_preset(preset):
    msg = config_error({"PRESET": preset})
    assert_one_line_naming(msg, "PRESET", repr(preset))


def test_preset_is_whitespace_stripped_like_every_other_value():
    assert tg.Hyperparameters.from_env({"PRESET": " smoke "}).preset == "smoke"


# ---------------------------------------------------------------- malformed values

MALFORMED = [
    ({"NUM_LAYERS": "eleven"}, ["NUM_LAYERS", "eleven"]),
    ({"NUM_LAYERS": "1e3"}, ["NUM_LAYERS", "1e3"]),
    ({"NUM_LAYERS": "3.0"}, ["NUM_LAYERS", "3.0"]),
    ({"EMA_DECAY": "1.5"}, ["EMA_DECAY", "1.5"]),
    ({"EMA_DECAY": "-0.1"}, ["EMA_DECAY", "-0.1"]),
    ({"TIE_EMBEDDINGS": "yes"}, ["TIE_EMBEDDINGS", "yes"]),
    ({"COMPILE": "true"}, ["COMPILE", "true"]),
    ({"DRY_RUN": "2"}, ["DRY_RUN", "2"]),
    ({"MAX_WALLCLOCK_SECONDS": "nan"}, ["MAX_WALLCLOCK_SECONDS", "nan"]),
    ({"MAX_WALLCLOCK_SECONDS": "inf"}, ["MAX_WALLCLOCK_SECONDS", "inf"]),
    ({"MAX_WALLCLOCK_SECONDS": "-1"}, ["MAX_WALLCLOCK_SECONDS", "-1"]),
    ({"MLP_MULT": "-inf"}, ["MLP_MULT", "-inf"]),
    ({"SEED": "-1"}, ["SEED", "-1"]),
    ({"ITERATIONS": "-5"}, ["ITERATIONS", "-5"]),
    ({"ITERATIONS": "0"}, ["ITERATIONS", "0"]),
    ({"WARMUP_STEPS": "-2"}, ["WARMUP_STEPS", "-2"]),
    ({"GRAD_ACCUM_STEPS": "-1"}, ["GRAD_ACCUM_STEPS", "-1"]),
    ({"TRAIN_BATCH_TOKENS": "-2048"}, ["TRAIN_BATCH_TOKENS", "-2048"]),
    ({"MATRIX_LR": "-0.1"}, ["MATRIX_LR", "-0.1"]),
    ({"GRAD_CLIP_NORM": "-1"}, ["GRAD_CLIP_NORM", "-1"]),
    ({"MUON_WD": "-0.5"}, ["MUON_WD", "-0.5"]),
    ({"LOGIT_SOFTCAP": "-30"}, ["LOGIT_SOFTCAP", "-30"]),
    ({"NUM_HEADS": "0"}, ["NUM_HEADS", "0"]),
    ({"MUON_MOMENTUM": "1.5"}, ["MUON_MOMENTUM", "1.5"]),
    ({"WARMDOWN_FRAC": "2"}, ["WARMDOWN_FRAC", "2"]),
    ({"VOCAB_SIZE": "70000"}, ["VOCAB_SIZE", "70000"]),
    ({"VOCAB_SIZE": "1"}, ["VOCAB_SIZE", "1"]),
    ({"NUM_KV_HEADS": "3"}, ["NUM_KV_HEADS", "3", "NUM_HEADS"]),
    ({"NUM_HEADS": "8", "NUM_KV_HEADS": "16"}, ["NUM_KV_HEADS", "16"]),
    ({"MODEL_DIM": "100"}, ["MODEL_DIM", "100"]),
    ({"MODEL_DIM": "24", "NUM_HEADS": "8", "NUM_KV_HEADS": "4"}, ["MODEL_DIM", "24"]),  # odd head dim
    ({"ATTN_BACKEND": "flash"}, ["ATTN_BACKEND", "flash", "auto, fa3, fa4 or sdpa"]),
    ({"RUN_ID": "a/b"}, ["RUN_ID", "a/b"]),
    ({"RUN_ID": "../escape"}, ["RUN_ID", "../escape"]),
    ({"RUN_ID": "two\nlines"}, ["RUN_ID"]),
    ({"DEVICE": "mps"}, ["DEVICE", "mps"]),
    ({"COMPUTE_DTYPE": "fp16"}, ["COMPUTE_DTYPE", "fp16"]),
    ({"WORLD_SIZE": "two"}, ["WORLD_SIZE", "two"]),
    ({"WORLD_SIZE": "0"}, ["WORLD_SIZE", "0"]),
    ({"WORLD_SIZE": "2", "RANK": "2"}, ["RANK", "2"]),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, ["RANK", "-1"]),
    ({"LOCAL_RANK": "-1"}, ["LOCAL_RANK", "-1"]),
    ({"RANK": "zero"}, ["RANK", "zero"]),
    ({"LOG_DIR": ""}, ["LOG_DIR=''", "'.' for the working directory"]),  # not silently the working directory
    ({"LOG_DIR": "  "}, ["LOG_DIR=''"]),
    ({"DATA_DIR": ""}, ["DATA_DIR=''", "'.' for the working directory"]),  # it would build the sample in '.'
]


@pytest.mark.parametrize("env, needles", MALFORMED,
                         ids=[",".join(f"{k}={v!r}" for k, v in env.items()) for env, _ in MALFORMED])
def test_malformed_value_raises_one_line_config_error(env, needles):
    msg = config_error(env)
    assert_one_line_naming(msg, *needles)


def test_config_error_is_a_value_error_subclass():
    assert issubclass(tg.ConfigError, ValueError)


def test_batch_not_divisible_into_whole_sequences_per_rank():
    # 524288 tokens at seq 1024 over 3 ranks x 1 micro-batch: 170.67 sequences per rank
    msg = config_error({"PRESET": "baseline", "WORLD_SIZE": "3", "RANK": "0", "GRAD_ACCUM_STEPS": "1"})
    assert_one_line_naming(msg, "TRAIN_BATCH_TOKENS", "524288", "3072")
    # record batch over 5 ranks: the message gives the required multiple 5*1*2048 = 10240
    msg = config_error({"WORLD_SIZE": "5", "RANK": "0", "GRAD_ACCUM_STEPS": "1"})
    assert_one_line_naming(msg, "TRAIN_BATCH_TOKENS", "786432", "10240")
    # an explicit batch that is not a whole number of sequences
    msg = config_error({"TRAIN_BATCH_TOKENS": "786433"})
    assert_one_line_naming(msg, "TRAIN_BATCH_TOKENS", "786433", str(8 * 2048))


def test_record_batch_does_split_over_three_ranks():
    # 786432 = 3 * 128 * 2048: the record batch IS whole sequences per rank on 3 ranks (no error)
    h = H.from_env({"WORLD_SIZE": "3", "RANK": "0", "GRAD_ACCUM_STEPS": "1"})
    assert (h.accum_steps, h.micro_batch_seqs) == (1, 128)
    assert h.world_size * h.accum_steps * h.micro_batch_seqs * h.train_seq_len == 786_432


# ---------------------------------------------------------------- world sizes


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("preset", ["record", "baseline", "smoke"])
def test_world_sizes_keep_the_global_batch(world, preset):
    ref = H.from_env({"PRESET": preset})
    auto = ref.grad_accum_steps == 0  # a preset may pin GRAD_ACCUM_STEPS
    for rank in (0, world - 1):
        h = H.from_env({"PRESET": preset, "WORLD_SIZE": str(world), "RANK": str(rank)})
        assert (h.world_size, h.rank) == (world, rank)
        assert h.accum_steps == (max(1, 8 // world) if auto else ref.grad_accum_steps)
        assert h.train_batch_tokens == world * h.accum_steps * h.micro_batch_seqs * h.train_seq_len
        assert h.train_batch_tokens == ref.train_batch_tokens  # the global batch is the same
        if auto:  # same micro-batch shape everywhere: 8 micro-batches in total per step
            assert h.micro_batch_seqs == ref.micro_batch_seqs and world * h.accum_steps == 8


@pytest.mark.parametrize("world, micro", [(16, 24), (32, 12)])
def test_large_world_sizes_work_for_the_record_batch(world, micro):
    h = H.from_env({"WORLD_SIZE": str(world), "RANK": str(world - 1), "LOCAL_RANK": "7"})
    assert h.accum_steps == 1 and h.micro_batch_seqs == micro
    assert world * h.micro_batch_seqs * h.train_seq_len == 786_432


def test_grad_accum_steps_overrides_the_default():
    h = H.from_env({"WORLD_SIZE": "8", "RANK": "3", "GRAD_ACCUM_STEPS": "2"})
    assert h.accum_steps == 2 and h.micro_batch_seqs == 24
    h = H.from_env({"GRAD_ACCUM_STEPS": "1"})
    assert h.accum_steps == 1 and h.micro_batch_seqs == 384
    assert h.train_batch_tokens == h.accum_steps * h.micro_batch_seqs * h.train_seq_len
    assert H.from_env({"GRAD_ACCUM_STEPS": "0"}).accum_steps == 8  # 0 = automatic


def test_retired_val_batch_knobs_warn_and_change_nothing():
    for name in ("VAL_BATCH_TOKENS", "VAL_BATCH_SIZE"):
        h = H.from_env({name: "524288", "STRICT_ENV": "1"})  # an old command still runs, even strict
        assert h.knob_values() == H.from_env({"STRICT_ENV": "1"}).knob_values()
        assert any(w.startswith(f"{name}='524288' is ignored") and "EVAL_BATCH_SEQS" in w for w in h.env_warnings)
        assert h.eval_batch_seqs == H.from_env({}).eval_batch_seqs


def test_retired_self_generated_calibration_knobs_warn_and_change_nothing():
    for name, value in (("GPTQ_CALIB_SAMPLES", "64"), ("GPTQ_TEMPERATURE", "0.8")):
        h = H.from_env({name: value, "STRICT_ENV": "1"})  # an old command still runs, even strict
        assert h.knob_values() == H.from_env({"STRICT_ENV": "1"}).knob_values()
        assert any(w.startswith(f"{name}={value!r} is ignored") and "self-generated" in w for w in h.env_warnings)


def test_the_removed_whole_model_ttt_knobs_warn_or_are_fixed():
    """TTT is always phased LoRA TTT: PHASED_TTT_ENABLED=1 (PR #1855's command) is accepted and changes nothing,
    0 (the removed chunked TTT) is refused with one line unless TTT_ENABLED=0; TTT_LR and TTT_EPOCHS warn that they
    are ignored."""
    plain = H.from_env({"STRICT_ENV": "1"}).knob_values()
    for env in ({}, {"TTT_ENABLED": "0", "PRESET": "smoke"}):
        h = H.from_env({**env, "PHASED_TTT_ENABLED": "1", "STRICT_ENV": "1"})
        assert h.env_warnings == () and h.knob_values() == H.from_env({**env, "STRICT_ENV": "1"}).knob_values()
    assert_one_line_naming(config_error({"PHASED_TTT_ENABLED": "0"}), "PHASED_TTT_ENABLED='0'", "fixes it at 1")
    no_ttt = {"TTT_ENABLED": "0", "STRICT_ENV": "1"}  # an older sweep's "no TTT at all" still runs
    assert H.from_env({**no_ttt, "PHASED_TTT_ENABLED": "0"}).knob_values() == H.from_env(no_ttt).knob_values()
    for name, value in (("TTT_LR", "0.005"), ("TTT_EPOCHS", "3")):
        h = H.from_env({name: value, "STRICT_ENV": "1"})  # an old command still runs, even strict
        assert h.knob_values() == plain
        assert h.env_warnings == (f"{name}={value!r} is ignored: {knobs.RETIRED_VARS[name]}",)
        assert "whole-model TTT" in h.env_warnings[0] and f"GLOBAL_{name}" in h.env_warnings[0]


def test_refusals_and_warnings_name_only_existing_knobs():
    """A description that points to another variable points to a knob (QAT_ENABLED once named a removed one)."""
    for text in [*knobs.UNIMPLEMENTED_FEATURES.values(), *knobs.RETIRED_VARS.values()]:
        for name in re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", text):
            assert name in H.knob_names(), f"{name} in {text!r} is not a knob"


# ---------------------------------------------------------------- unknown variables


def _named_vars(msg: str) -> set[str]:
    return set(re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", msg))


@pytest.mark.parametrize("typo, knob", [("MUON_WDD", "MUON_WD"), ("NUM_LAYER", "NUM_LAYERS"),
                                        ("MATRIX_LRR", "MATRIX_LR"), ("EMA_DECY", "EMA_DECAY")])
def test_typo_warns_with_closest_knob(typo, knob):
    value = "3" if typo == "NUM_LAYER" else "0.1"
    h = H.from_env({typo: value})
    assert len(h.env_warnings) == 1
    w = h.env_warnings[0]
    assert "\n" not in w
    assert {typo, knob} <= _named_vars(w), w
    # the typo did not change anything
    assert h.knob_values() == H().knob_values()
    with pytest.raises(tg.ConfigError) as info:
        H.from_env({typo: value, "STRICT_ENV": "1"})
    assert_one_line_naming(str(info.value), typo, knob)


def test_several_typos_warn_each():
    h = H.from_env({"MUON_WDD": "0.1", "NUM_LAYER": "3"})
    assert len(h.env_warnings) == 2
    assert any("MUON_WDD" in w for w in h.env_warnings) and any("NUM_LAYER" in w for w in h.env_warnings)


def test_strict_env_refuses_every_typo_in_one_error_line():
    msg = config_error({"MUON_WDD": "0.1", "NUM_LAYER": "3", "STRICT_ENV": "1"})
    assert_one_line_naming(msg, "MUON_WDD='0.1' (did you mean MUON_WD?)", "NUM_LAYER='3' (did you mean NUM_LAYERS?)",
                           "STRICT_ENV=1 refuses them")
    assert "ignored" not in msg


def test_typo_warnings_are_repeated_below_the_config_block():
    """The first warnings print above ~160 config lines and scroll away: one line repeats them after the block."""
    h = H.from_env({"SEEDS": "42", "NUM_LAYER": "3"})
    lines: list[str] = []
    tg.log_header(h, tg.DistInfo(0, 1, tg.torch.device("cpu")), b"code", "sdpa", {}, lines.append)
    end = max(i for i, line in enumerate(lines) if line.startswith("  "))
    after = [line for line in lines[end + 1:] if line.startswith("WARNING:")]
    assert len(after) == 1 and "SEEDS='42'" in after[0] and "did you mean NUM_LAYERS?" in after[0], lines[end:]


def test_strict_env_and_input_checks_leave_the_config_hash_alone():
    """Seeds run with and without STRICT_ENV (or checking more documents) are one configuration."""
    base = tg.config_hash(H.from_env({}).knob_values())
    for env in ({"STRICT_ENV": "1"}, {"BPB_CHECK_DOCS": "all"}, {"SEED": "7", "LOG_DIR": "elsewhere"}):
        assert tg.config_hash(H.from_env(env).knob_values()) == base, env
    assert tg.config_hash(H.from_env({"NUM_LAYERS": "7"}).knob_values()) != base


UNRELATED = {"HOME": "/root", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "CUDA_VISIBLE_DEVICES": "0,1",
             "OMP_NUM_THREADS": "2", "PYTHONPATH": "/x", "LC_ALL": "C", "TERM": "xterm", "USER": "me",
             "LD_LIBRARY_PATH": "/usr/lib", "NCCL_DEBUG": "INFO", "TORCH_LOGS": "recompiles",
             "TORCHINDUCTOR_CACHE_DIR": "/tmp/ind", "TRITON_CACHE_DIR": "/tmp/tr", "HF_HOME": "/tmp/hf",
             "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "LOCAL_WORLD_SIZE": "1",
             "TORCHELASTIC_RUN_ID": "none", "PYTHONDONTWRITEBYTECODE": "1", "VIRTUAL_ENV": "/venv"}


def test_unrelated_variables_give_no_warning():
    h = H.from_env(UNRELATED)
    assert h.env_warnings == ()
    assert H.from_env({**UNRELATED, "STRICT_ENV": "1"}).env_warnings == ()


@pytest.mark.parametrize("name", ["MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"])
def test_common_thread_count_variables_are_not_flagged(name):
    # Standard BLAS thread-count variables set by many cluster profiles next to OMP_NUM_THREADS. They
    # are not typos of a knob: "did you mean OMP_NUM_THREADS?" is noise (OMP_NUM_THREADS is not a knob
    # either), and with STRICT_ENV=1 the run is refused.
    assert H.from_env({name: "1"}).env_warnings == ()
    H.from_env({name: "1", "STRICT_ENV": "1"})


@pytest.mark.parametrize("env", [{"GATED_ATTN": "1"}, {"VE_ENABLED": "1"},
                                 {"TRIGRAM": "1"}, {"COMPRESSOR": "zstd"}, {"MLP_ACT": "gelu"},
                                 {"MIXED_QUANT": "1"}, {"SLIDING_WINDOW_ENABLED": "true"},
                                 {"LATE_QAT_THRESHOLD": "0.15"}, {"GPTQ_AR_SELFGEN": "1"}],
                         ids=lambda e: next(iter(e)))
def test_unimplemented_feature_on_raises(env):
    (name, value), = env.items()
    msg = config_error(env)
    assert_one_line_naming(msg, name, value)


@pytest.mark.parametrize("env", [{"TRIGRAM": "0"}, {"VE_ENABLED": "0"}, {"COMPRESSOR": "pergroup"},
                                 {"GATED_ATTN": "0"}, {"USE_GPTQ": ""}, {"SWA_ENABLED": "off"},
                                 {"LATE_QAT_THRESHOLD": "0"}, {"LATE_QAT_THRESHOLD": "0.0"}, {"GPTQ_AR_SELFGEN": "0"}],
                         ids=lambda e: next(iter(e)))
def test_unimplemented_feature_off_is_accepted(env):
    h = H.from_env(env)
    assert h.env_warnings == () and h.knob_values() == H().knob_values()


def test_removed_bigram_and_value_residual_knobs_accept_off_and_refuse_on():
    """BigramHash (PR #65) and value residual (PR #1499) were removed: their off values still run, an on value
    is refused with one line naming the variable, and BIGRAM_DIM (no off value) only warns that it is ignored."""
    for env in ({"BIGRAM_VOCAB_SIZE": "0"}, {"VALUE_RESIDUAL": "0"}, {"VALUE_RESIDUAL": "false"}):
        h = H.from_env({**env, "STRICT_ENV": "1"})
        assert h.env_warnings == () and h.knob_values() == H.from_env({"STRICT_ENV": "1"}).knob_values()
    for env in ({"BIGRAM_VOCAB_SIZE": "3072"}, {"VALUE_RESIDUAL": "1"}):
        (name, value), = env.items()
        msg = config_error(env)
        assert_one_line_naming(msg, name, value, "removed", "PR #")
    h = H.from_env({"BIGRAM_VOCAB_SIZE": "0", "BIGRAM_DIM": "112", "STRICT_ENV": "1"})
    assert h.knob_values() == H.from_env({"STRICT_ENV": "1"}).knob_values()
    assert h.env_warnings == ("BIGRAM_DIM='112' is ignored: BigramHash embeddings were removed "
                              "(a table size other than 0 is refused)",)
    assert_one_line_naming(config_error({"BIGRAM_VOCAB_SIZE": "3072", "BIGRAM_DIM": "112"}), "BIGRAM_VOCAB_SIZE")


def test_every_unimplemented_feature_is_refused_when_on_and_accepted_when_off():
    for name in knobs.UNIMPLEMENTED_FEATURES:
        assert_one_line_naming(config_error({name: "1"}), name)
        assert H.from_env({name: "0"}).env_warnings == ()


# ---------------------------------------------------------------- other scripts' names (pgolf/knobs.py)


def test_pgolf_refusals_are_config_errors_with_the_same_line():
    for env in ({"MUON_EQ_R": "0", "MUON_ROW_NORMALIZE": "1"}, {"TRIGRAM": "1"}, {"TTT_BETA1": "0.9"},
                {"RECUR_LAYERS": "4,6"}, {"TARGET_MB": "15.9", "TARGET_BYTES": "16000000"}):
        with pytest.raises(knobs.Refused) as refused:
            knobs.rewrite(env)
        assert config_error(env) == str(refused.value)
        assert_one_line_naming(str(refused.value), *env)


def test_pgolf_rewrite_returns_todays_knobs_the_warnings_and_the_names_it_knows():
    env = {"MUON_EQ_R": "0", "RECUR_LAYERS": "4,5", "VAL_BATCH_TOKENS": "1", "TTT_BETA2": "0.99", "SEED": "3"}
    rewritten, warnings, known = knobs.rewrite(env)
    assert rewritten == {**env, "MUON_ROW_NORMALIZE": "0", "LOOP_START": "4", "LOOP_END": "5", "NUM_LOOPS": "1"}
    assert env == {"MUON_EQ_R": "0", "RECUR_LAYERS": "4,5", "VAL_BATCH_TOKENS": "1", "TTT_BETA2": "0.99",
                   "SEED": "3"}, "the caller's mapping is left alone"
    assert len(warnings) == 1 and warnings[0].startswith("VAL_BATCH_TOKENS='1' is ignored")
    assert set(env) - {"SEED"} <= known and not known & set(H.knob_names())


def test_a_shipped_copy_without_pgolf_reads_its_knobs_and_warns_about_a_misspelt_one(monkeypatch):
    plain = {**UNRELATED, "NUM_LAYERS": "7", "SEED": "3", "PRESET": "baseline", "STRICT_ENV": "1"}
    with_pgolf = H.from_env(plain)
    monkeypatch.setitem(sys.modules, "pgolf", None)  # `from pgolf import knobs` raises ImportError, as in a copy
    assert H.from_env(plain) == with_pgolf and with_pgolf.env_warnings == ()
    h = H.from_env({"SEEDS": "42"})
    assert h.env_warnings == ("SEEDS='42' is not a knob of train_gpt.py and is ignored (did you mean SEED?)",)
    msg = config_error({"SEEDS": "42", "STRICT_ENV": "1"})
    assert msg == "unknown knobs: SEEDS='42' (did you mean SEED?); STRICT_ENV=1 refuses them"
    # Other scripts' names are not known to a copy: nothing is rewritten or refused.
    assert H.from_env({"MUON_EQ_R": "0", "TRIGRAM": "1"}).muon_row_normalize is True


def test_pgolf_knobs_does_not_import_train_gpt():
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import pgolf.knobs; "
            "assert 'train_gpt' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env=child_env())
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- derived paths


def test_default_paths_follow_data_dir_and_vocab_size():
    h = H.from_env({})  # the record's CaseOps export (PR #1729), as the downloader's --variant names it
    assert h.dataset_dir == Path("./data") / "datasets" / "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
    assert h.tokenizer_file == Path("./data") / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
    h = H.from_env({"CASEOPS_ENABLED": "0"})
    assert h.dataset_dir == Path("./data") / "datasets" / "fineweb10B_sp8192"
    assert h.tokenizer_file == Path("./data") / "tokenizers" / "fineweb_8192_bpe.model"
    h = H.from_env({"DATA_DIR": "/mnt/pg", "VOCAB_SIZE": "1024", "CASEOPS_ENABLED": "0"})
    assert h.dataset_dir == Path("/mnt/pg/datasets/fineweb10B_sp1024")
    assert h.tokenizer_file == Path("/mnt/pg/tokenizers/fineweb_1024_bpe.model")
    assert H.from_env({"PRESET": "baseline"}).dataset_dir.name == "fineweb10B_sp1024"


def test_data_path_and_tokenizer_path_override():
    env = {"DATA_DIR": "/mnt/pg", "DATA_PATH": "/elsewhere/shards", "TOKENIZER_PATH": "/t/tok.model"}
    h = H.from_env(env)
    assert h.dataset_dir == Path("/elsewhere/shards") and h.tokenizer_file == Path("/t/tok.model")
    h = H.from_env({**env, "SAMPLE_DATA": "1"})
    assert h.dataset_dir == Path("/elsewhere/shards") and h.tokenizer_file == Path("/t/tok.model")


def test_sample_data_selects_the_sample_names():
    h = H.from_env({"SAMPLE_DATA": "1", "VOCAB_SIZE": "1024", "DATA_DIR": "/d"})
    assert h.dataset_dir == Path("/d/datasets/sample_sp1024")
    assert h.tokenizer_file == Path("/d/tokenizers/sample_1024_bpe.model")
    smoke = H.from_env({"PRESET": "smoke"})
    assert smoke.dataset_dir == Path("./data/datasets/sample_sp1024")
    # the same names data/make_sample.py builds
    text = (ROOT / "data" / "make_sample.py").read_text(encoding="utf-8")
    assert '"datasets" / f"sample_sp{vocab_size}"' in text and '"tokenizers" / f"sample_{vocab_size}_bpe.model"' in text


# ---------------------------------------------------------------- DRY_RUN=1 and exit codes


def _model_param_count(env: dict[str, str]) -> int:
    h = H.from_env(env)
    return sum(p.numel() for p in tg.GPT(tg.ModelConfig.from_hparams(h)).parameters())


@pytest.mark.slow
def test_dry_run_subprocess(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    log_dir = tmp_path / "logs"
    knobs = {"PRESET": "smoke", "DRY_RUN": "1", "COMPILE": "0", "LOG_DIR": str(log_dir), "DEVICE": "cpu"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=cwd, env=child_env(**knobs),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()

    # config block: sorted `  key: value` lines covering every knob
    start = lines.index("config:")
    block = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        block.append(line)
    keys = [line[2:].split(":", 1)[0] for line in block]
    assert all(re.fullmatch(r"  [a-z0-9_]+: .*|  [a-z0-9_]+:", line) for line in block), block
    assert keys == sorted(keys) and len(keys) == len(set(keys))
    config = {line[2:].split(":", 1)[0]: line[2:].split(":", 1)[1].strip() for line in block}
    h = H.from_env(knobs)
    assert set(f.name for f in H.knob_fields()) <= set(config)
    shadowed = {"run_id"}  # generated
    for f in H.knob_fields():
        if f.name not in shadowed:
            assert config[f.name] == str(getattr(h, f.name)).strip(), f.name
    assert config["resolved_grad_accum_steps"] == str(h.accum_steps) and config["world_size"] == "1"
    assert config["resolved_device"] == "cpu" and config["device"] == h.device and re.fullmatch(r"smoke_\d{8}_\d{6}_\d{6}_\d+", config["run_id"])

    # parameter counts
    n = _model_param_count(knobs)
    assert f"model_params:{n}" in lines
    groups = [line for line in lines if line.startswith("param_group:")]
    names = [re.search(r"param_group:(\S+)", g).group(1) for g in groups]
    assert names == list(tg.PARAM_GROUPS)
    counts = [int(re.search(r"\bparams:(\d+)", g).group(1)) for g in groups]
    assert sum(counts) == n
    assert "dry_run:ok" in proc.stdout

    # nothing written
    assert not log_dir.exists()
    assert list(cwd.iterdir()) == []


@pytest.mark.slow
def test_bad_knob_subprocess_exits_2_with_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path,
                          env=child_env(NUM_LAYERS="eleven", LOG_DIR=str(tmp_path / "logs")),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1, proc.stderr
    assert err[0].startswith("error: ") and "NUM_LAYERS" in err[0] and "eleven" in err[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_main_returns_2_in_process(capsys):
    # main(env) with an explicit env: same contract without a subprocess
    assert tg.main({"EMA_DECAY": "1.5"}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "EMA_DECAY" in err[0]


def test_muon_eq_r_is_an_alias_of_muon_row_normalize():
    assert H.from_env({"MUON_EQ_R": "0"}).muon_row_normalize is False
    assert H.from_env({"MUON_EQ_R": "1", "PRESET": "baseline"}).muon_row_normalize is True
    assert H.from_env({"MUON_EQ_R": "1", "MUON_ROW_NORMALIZE": "1"}).muon_row_normalize is True
    assert H.from_env({"MUON_EQ_R": "1"}).env_warnings == ()
    msg = config_error({"MUON_EQ_R": "0", "MUON_ROW_NORMALIZE": "1"})
    assert_one_line_naming(msg, "MUON_EQ_R", "MUON_ROW_NORMALIZE")
    msg = config_error({"MUON_EQ_R": "yes"})
    assert "MUON_ROW_NORMALIZE" in msg and "yes" in msg


def test_record_defaults_of_the_model_and_muon_options():
    h = H.from_env({})
    assert (h.mlp_act, h.leaky_slope, h.ln_scale, h.rope_dims, h.rope_train_seq_len, h.ortho_init) == (
        "leaky_relu2", 0.5, True, 16, 2048, True)
    assert (h.muon_ns, h.muon_row_normalize) == ("polar_express", True)
    b = H.from_env({"PRESET": "baseline"})
    assert (b.mlp_act, b.ln_scale, b.rope_dims, b.ortho_init, b.muon_ns, b.muon_row_normalize) == (
        "relu2", False, 0, False, "classic", False)


def test_legacy_recurrence_and_parallel_names():
    h = H.from_env({"RECUR_LAYERS": "4,5", "RECUR_START_STEP": "3000", "PARALLEL_START_LAYER": "7"})
    assert (h.num_loops, h.loop_start, h.loop_end, h.looping_start_step) == (1, 4, 5, 3000)
    assert h.parallel_start_layer == 7 and h.env_warnings == ()
    assert H.from_env({"RECUR_LAYERS": ""}).num_loops == 0
    assert H.from_env({"PARALLEL_RESIDUAL": "0"}).parallel_mode == "off"
    assert H.from_env({"PARALLEL_RESIDUAL": "1"}).parallel_mode == "lanes"
    for env, names in (({"RECUR_LAYERS": "4,6"}, ["RECUR_LAYERS", "contiguous"]),
                       ({"RECUR_LAYERS": "4,x"}, ["RECUR_LAYERS"]),
                       ({"RECUR_LAYERS": "4,5", "NUM_LOOPS": "2"}, ["RECUR_LAYERS", "NUM_LOOPS"]),
                       ({"PARALLEL_RESIDUAL": "1", "PARALLEL_MODE": "off"}, ["PARALLEL_RESIDUAL", "PARALLEL_MODE"]),
                       ({"PARALLEL_RESIDUAL": "2"}, ["PARALLEL_RESIDUAL"])):
        assert_one_line_naming(config_error(env), *names)


def test_gptj_parallel_residual_start_is_refused_unless_off():
    # PR #1412/#1493 commands: GPT-J parallel layers from PARALLEL_RESIDUAL_START on (negative: none)
    for start in ("7", "0", "x"):
        assert_one_line_naming(config_error({"PARALLEL_RESIDUAL_START": start}), "PARALLEL_RESIDUAL_START", "GPT-J")
    h = H.from_env({"PARALLEL_RESIDUAL_START": "-1"})
    assert h.parallel_mode == "off" and h.env_warnings == ()
    assert H.from_env({"PARALLEL_RESIDUAL_START": ""}).parallel_mode == "lanes"  # empty = unset
    assert_one_line_naming(config_error({"PARALLEL_RESIDUAL_START": "-1", "PARALLEL_MODE": "lanes"}),
                           "PARALLEL_RESIDUAL_START", "PARALLEL_MODE")


@pytest.mark.parametrize("mode", ["gptj", "lanes_seq", "lane_merge"])
def test_removed_parallel_modes_are_refused(mode):
    assert_one_line_naming(config_error({"PARALLEL_MODE": mode}), "PARALLEL_MODE", mode, "off or lanes")


# The design documents' run commands (PR #1392 / PR #1290 style), as users paste them.
SEED_COMMANDS = [
    'VOCAB_SIZE=4096 MLP_MULT=4.0 QK_GAIN_INIT=5.0 MUON_EQ_R=1 RECUR_LAYERS="4,5" RECUR_START_STEP=3000 '
    'PARALLEL_START_LAYER=7 MUON_WD=0.090 ADAM_WD=0.090 WARMDOWN_ITERS=4000 GPTQ_CALIB_BATCHES=128 GPTQ_DAMP=0.01 '
    'BIGRAM_VOCAB_SIZE=0 TRIGRAM=0 TARGET_MB=15.9 SEED=42',
    'SEED=42 BIGRAM_VOCAB_SIZE=3072 BIGRAM_DIM=112 WARMDOWN_ITERS=4000 RECUR_LAYERS=4,5 RECUR_START_STEP=3000 '
    'TARGET_MB=15.9',
]


def _command_env(command: str) -> dict[str, str]:
    import shlex
    return dict(tok.split("=", 1) for tok in shlex.split(command))


def test_design_document_commands_parse_with_their_meaning():
    h = H.from_env({"STRICT_ENV": "1", **_command_env(SEED_COMMANDS[0])})
    assert h.env_warnings == ()
    assert (h.vocab_size, h.mlp_mult, h.qk_gain_init, h.muon_row_normalize) == (4096, 4.0, 5.0, True)
    assert (h.num_loops, h.loop_start, h.loop_end, h.looping_start_step) == (1, 4, 5, 3000)
    assert (h.parallel_start_layer, h.muon_wd, h.adam_wd, h.warmdown_iters) == (7, 0.09, 0.09, 4000)
    assert (h.gptq_calibration_batches, h.gptq_damp, h.seed) == (128, 0.01, 42)
    assert h.target_bytes == 15_900_000, "TARGET_MB is decimal megabytes, not MiB"
    env2 = {"STRICT_ENV": "1", **_command_env(SEED_COMMANDS[1])}
    assert_one_line_naming(config_error(env2), "BIGRAM_VOCAB_SIZE='3072'", "removed")  # BigramHash is gone
    h2 = H.from_env({**env2, "BIGRAM_VOCAB_SIZE": "0"})  # the rest of the command keeps its meaning
    assert len(h2.env_warnings) == 1 and h2.env_warnings[0].startswith("BIGRAM_DIM='112' is ignored")
    assert (h2.warmdown_iters, h2.target_bytes) == (4000, 15_900_000)
    assert (h2.num_loops, h2.loop_start, h2.loop_end, h2.looping_start_step) == (1, 4, 5, 3000)
    # Both build (the record shape with these overrides) without error.
    for hp in (h, h2):
        tg.GPT(tg.ModelConfig.from_hparams(dataclasses.replace(hp, num_layers=11, model_dim=64, num_heads=2,
                                                               num_kv_heads=1, vocab_size=256)))


def test_target_mb_and_use_gptq_legacy_names():
    assert H.from_env({"TARGET_MB": "16"}).target_bytes == 16_000_000
    assert H.from_env({"TARGET_MB": "15.95"}).target_bytes == 15_950_000
    assert H.from_env({"USE_GPTQ": "0"}).quant_method == "rtn"
    assert H.from_env({"USE_GPTQ": "1"}).quant_method == "gptq"
    for env, names in (({"TARGET_MB": "abc"}, ["TARGET_MB", "abc"]), ({"TARGET_MB": "-1"}, ["TARGET_MB"]),
                       ({"TARGET_MB": "15.9", "TARGET_BYTES": "16000000"}, ["TARGET_MB", "TARGET_BYTES"]),
                       ({"USE_GPTQ": "yes"}, ["USE_GPTQ"]),
                       ({"GPTQ_CALIB_BATCHES": "8", "GPTQ_CALIBRATION_BATCHES": "16"}, ["GPTQ_CALIB_BATCHES"]),
                       ({"GPTQ_RESERVE_SECONDS": "soon"}, ["GPTQ_RESERVE_SECONDS", "soon"]),
                       ({"EVAL_ONLY": "1"}, ["EVAL_ONLY", "ARTIFACT"])):
        assert_one_line_naming(config_error(env), *names)


def test_clip_sigmas_groups_and_matrix_override():
    h = H.from_env({})
    assert (h.clip_sigmas("mlp"), h.clip_sigmas("attn"), h.clip_sigmas("embed")) == (11.5, 13.0, 14.0)
    h = H.from_env({"MATRIX_CLIP_SIGMAS": "12.85"})
    assert (h.clip_sigmas("mlp"), h.clip_sigmas("attn"), h.clip_sigmas("embed")) == (12.85, 12.85, 14.0)
    assert H.from_env({}).gptq_reserve is None and H.from_env({"GPTQ_RESERVE_SECONDS": "8"}).gptq_reserve == 8.0


def test_loop_span_must_fit_the_model():
    msg = config_error({"NUM_LAYERS": "4"})  # the record span 3..5 needs at least 6 layers
    assert_one_line_naming(msg, "LOOP_START", "NUM_LAYERS=4", "NUM_LOOPS=0")
    assert H.from_env({"NUM_LAYERS": "4", "NUM_LOOPS": "0"}).num_layers == 4


def test_a_hint_ends_the_message_and_is_optional():
    """Errors say what, the value and what is allowed; a `hint` (dropped from the shipped file) says what to do."""
    assert str(tg.ConfigError("X=1 is not allowed", hint="set Y")) == "X=1 is not allowed; set Y"
    assert str(tg.DataError("f.bin: missing")) == "f.bin: missing"
    assert isinstance(tg.ArtifactError("a", hint="b"), ValueError) and str(tg.ArtifactError("a", hint="b")) == "a; b"
    msg = config_error({"TTT_CHUNK_TOKENS": "1024"})  # the record's EVAL_SEQ_LEN is 2048
    assert msg == ("TTT_CHUNK_TOKENS=1024 is not allowed: must be >= EVAL_SEQ_LEN=2048; the phase SGD trains on whole "
                   "sequences of a chunk")


# torch's own first line for a file holding an object weights_only refuses (its escapes bold a phrase)
TORCH_REFUSAL = ("Weights only load failed. This file can still be loaded, to do so you have two options, \x1b[1mdo "
                 "those steps only if you trust the source of the checkpoint\x1b[0m. \n\t(1) In PyTorch 2.6, ...")


def test_requantize_of_a_foreign_file_says_why_in_whole_words(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError(TORCH_REFUSAL)

    def error(path: Path) -> str:
        h = H.from_env({"REQUANTIZE": str(path)})
        with pytest.raises(tg.ConfigError) as info:
            recover.requantize(tg, SimpleNamespace(h=h), None)
        return str(info.value)

    tg.torch.save({"x": 1}, tmp_path / "other.pt")  # a torch file, not one keep_weights wrote: short, shown whole
    assert error(tmp_path / "other.pt").endswith("not a weights file kept by train_gpt.py (KeyError: 'state_dict')")
    monkeypatch.setattr(tg.torch, "load", refuse)
    msg = error(tmp_path / "x.pt")
    assert_one_line_naming(msg, "REQUANTIZE=", "(ValueError: Weights only load failed.")
    shown = msg.split("(ValueError: ", 1)[1]
    assert "\x1b" not in msg and shown.endswith(" ...)"), msg
    plain = re.sub(r"\x1b\[[0-9;]*m", "", TORCH_REFUSAL)
    assert plain.startswith(shown.removesuffix(" ...)") + " "), "cut at a word boundary"
