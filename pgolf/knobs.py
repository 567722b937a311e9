"""Other scripts' names for train_gpt.py's knobs: rewritten to today's knobs, or refused, or warned about.

Public Parameter Golf run commands use names this script spells differently (aliases, older names), knobs
whose value it fixes, features it does not implement and knobs it no longer reads. `rewrite` is the one entry
point; train_gpt.py's `Hyperparameters.from_env` calls it before reading its knobs, and raises `Refused` as its
ConfigError. A train_gpt.py copied without pgolf/ beside it (a records folder) rewrites nothing and knows none
of these names: it only warns about a misspelt knob.
"""

from __future__ import annotations

import math
from typing import Mapping

# Features used by public Parameter Golf scripts that train_gpt.py does not implement, or no longer implements.
# Setting one to anything but an "off" value must fail loudly instead of being silently ignored.
OFF_VALUES = frozenset({"", "0", "0.0", "false", "off", "none"})
UNIMPLEMENTED_FEATURES: dict[str, str] = {
    "TRIGRAM": "trigram hash embeddings",
    "VE_ENABLED": "value embeddings",
    "GATED_ATTN": "gated attention",
    "ATTN_OUT_GATE_ENABLED": "PR #1855's dense attention output gate (SPARSE_ATTN_GATE_ENABLED is the per-head one)",
    "QAT_ENABLED": "QAT (removed with late QAT: PR #1855 trains without it and quantizes with GPTQ afterwards)",
    "LATE_QAT_THRESHOLD": "late QAT (PR #1290; removed: about -0.0001 BPB in public records; PR #1855 has none)",
    "GPTQ_AR_SELFGEN": "GPTQ calibration on self-generated text (PR #1019; removed: PR #1855 calibrates on "
                       "training data inside the training budget)",
    "SWA_ENABLED": "SWA",
    "MIXED_QUANT": "mixed int5/int6 GPTQ",
    "BIGRAM_VOCAB_SIZE": "BigramHash embeddings (PR #65; removed: no record since PR #1060 uses them)",
    "VALUE_RESIDUAL": "value residual (ResFormer, PR #1499; removed: no public record turned it on)",
}
# Older names the public run commands use, mapped to the knob they mean (PR #1290/#1392 commands, and PR #1855's).
KNOB_ALIASES: dict[str, str] = {"MUON_EQ_R": "MUON_ROW_NORMALIZE", "GPTQ_CALIB_BATCHES": "GPTQ_CALIBRATION_BATCHES",
                                "GLOBAL_TTT_MOMENTUM": "TTT_MOMENTUM", "GLOBAL_TTT_CHUNK_TOKENS": "TTT_CHUNK_TOKENS",
                                "GLOBAL_TTT_GRAD_CLIP": "TTT_GRAD_CLIP"}
# PR #1855's knobs whose value train_gpt.py fixes (its README sets some): accepted at that value, refused otherwise.
# PHASED_TTT_ENABLED: its README command's; TTT is always phased LoRA TTT since the chunked whole-model TTT
# (PR #549/#1413) was removed.
FIXED_KNOBS: dict[str, str] = {"TTT_BETA1": "0", "TTT_BETA2": "0.99", "TTT_OPTIMIZER": "adam", "TTT_GRAD_STEPS": "1",
                               "TTT_K_LORA": "1", "TTT_MLP_LORA": "1", "TTT_O_LORA": "1", "PARALLEL_FINAL_LANE": "mean",
                               "ROPE_YARN": "0", "GLOBAL_TTT_WARMUP_CHUNKS": "0", "VAL_DOC_FRACTION": "1",
                               "PHASED_TTT_ENABLED": "1"}
# Older names rewritten to today's knobs by translate_legacy_vars.
LEGACY_VARS = frozenset({"RECUR_LAYERS", "RECUR_START_STEP", "PARALLEL_RESIDUAL", "PARALLEL_RESIDUAL_START",
                         "TARGET_MB", "USE_GPTQ", "SLIDING_WINDOW_ENABLED"})
# Knobs train_gpt.py no longer reads: setting one warns (with what replaced it) instead of failing old commands.
RETIRED_VARS: dict[str, str] = {
    "VAL_BATCH_TOKENS": "every evaluation uses EVAL_BATCH_SEQS windows per forward (one compiled shape)",
    "VAL_BATCH_SIZE": "every evaluation uses EVAL_BATCH_SEQS windows per forward (one compiled shape)",
    "MUON_IMPL": "the per-matrix reference lives in tests/reference_muon.py; the batched Muon is the only one",
    "GPTQ_CALIB_SAMPLES": "self-generated GPTQ calibration was removed; GPTQ_CALIBRATION_BATCHES sets the calibration",
    "GPTQ_TEMPERATURE": "self-generated GPTQ calibration was removed; GPTQ calibrates on training data",
    "BIGRAM_DIM": "BigramHash embeddings were removed (a table size other than 0 is refused)",
    "TTT_LR": "the chunked whole-model TTT (PR #549/#1413) was removed; the phases' SGD uses GLOBAL_TTT_LR",
    "TTT_EPOCHS": "the chunked whole-model TTT (PR #549/#1413) was removed; the phases' SGD uses GLOBAL_TTT_EPOCHS",
}
# Every name above: not a knob, but not unknown either (no "did you mean" warning).
KNOWN_NAMES = frozenset(UNIMPLEMENTED_FEATURES) | set(KNOB_ALIASES) | set(FIXED_KNOBS) | LEGACY_VARS | set(RETIRED_VARS)


class Refused(ValueError):
    """One line naming the variable, the value and what is wrong (train_gpt.py raises it as a ConfigError)."""


def rewrite(env: Mapping[str, str]) -> tuple[dict[str, str], list[str], frozenset[str]]:
    """`env` with older names and aliases rewritten to today's knobs; the warnings (retired variables); the
    names this module knows (KNOWN_NAMES). Raises Refused for a legacy or alias name that contradicts its
    knob, an unimplemented feature turned on and a fixed knob at another value."""
    env = dict(env)
    translate_legacy_vars(env)
    for alias, name in KNOB_ALIASES.items():
        if alias in env:
            if name in env and env[name].strip() != env[alias].strip():
                raise Refused(f"{alias}={env[alias]!r} is not allowed together with {name}={env[name]!r}; "
                              f"{alias} is another name for {name}; set one of them")
            env.setdefault(name, env[alias])
    warnings = []
    for name in sorted(env):
        value = env[name]
        if name in UNIMPLEMENTED_FEATURES and value.strip().lower() not in OFF_VALUES:
            raise Refused(f"{name}={value!r} is not allowed: it turns on {UNIMPLEMENTED_FEATURES[name]}; "
                          f"this train_gpt.py does not implement it: unset it or set it to 0")
        if name in FIXED_KNOBS and not same_value(value, FIXED_KNOBS[name]) and not no_ttt_choice(name, env):
            raise Refused(f"{name}={value!r} is not allowed: this script fixes it at {FIXED_KNOBS[name]}")
        if name in RETIRED_VARS:
            warnings.append(f"{name}={value!r} is ignored: {RETIRED_VARS[name]}")
    return env, warnings, KNOWN_NAMES


def no_ttt_choice(name: str, env: Mapping[str, str]) -> bool:
    """PHASED_TTT_ENABLED=0 beside TTT_ENABLED=0 (an older sweep's "no TTT at all"): no TTT runs, nothing to refuse."""
    return name == "PHASED_TTT_ENABLED" and env.get("TTT_ENABLED", "").strip() == "0"


def translate_legacy_vars(env: dict[str, str]) -> None:
    """Older run commands' names (PR #1204/#1290 style), rewritten in place to today's knobs.

    RECUR_LAYERS="4,5" loops a contiguous span once, from RECUR_START_STEP; PARALLEL_RESIDUAL=0/1
    switches parallel residuals off/on; PARALLEL_RESIDUAL_START < 0 turns them off (GPT-J parallel layers from
    a layer >= 0 are refused). An explicit new-style knob that disagrees is refused."""
    def put(name: str, value: str, source: str) -> None:
        if name in env and env[name].strip() != value:
            raise Refused(f"{source} is not allowed together with {name}={env[name]!r}: set one of them")
        env[name] = value

    def flag(name: str) -> str:  # a 0/1 switch
        value = env[name].strip()
        if value not in ("0", "1"):
            raise Refused(f"{name}={value!r} is not allowed: expected 0 or 1")
        return value

    raw = env.get("RECUR_LAYERS")
    if raw is not None and raw.strip():
        try:
            layers = [int(t) for t in raw.split(",")]
        except ValueError:
            raise Refused(f"RECUR_LAYERS={raw!r} is not allowed: expected comma-separated layer indices") from None
        if layers != list(range(layers[0], layers[-1] + 1)):
            raise Refused(f"RECUR_LAYERS={raw!r} is not allowed: the looped layers must be contiguous")
        source = f"RECUR_LAYERS={raw!r}"
        put("LOOP_START", str(layers[0]), source)
        put("LOOP_END", str(layers[-1]), source)
        put("NUM_LOOPS", "1", source)
    elif raw is not None:
        put("NUM_LOOPS", "0", "RECUR_LAYERS=''")
    if "RECUR_START_STEP" in env:
        put("LOOPING_START_STEP", env["RECUR_START_STEP"].strip(), f"RECUR_START_STEP={env['RECUR_START_STEP']!r}")
    start = env.get("PARALLEL_RESIDUAL_START", "").strip()  # empty = unset
    if start:  # PR #1412/#1493 commands: GPT-J parallel layers from this one on; negative = none
        if not is_negative_integer(start):
            raise Refused(f"PARALLEL_RESIDUAL_START={start!r} is not allowed: it turns on GPT-J parallel residuals "
                          "(PR #1412; removed: PR #1855 runs PR #1530's two lanes, PARALLEL_MODE=lanes from "
                          "PARALLEL_START_LAYER); unset it or set it to -1")
        put("PARALLEL_MODE", "off", f"PARALLEL_RESIDUAL_START={start!r}")
    if "TARGET_MB" in env:  # decimal megabytes (PR #1019 meant MiB: 15.9 MiB is over the cap)
        raw_mb = env["TARGET_MB"].strip()
        if not is_non_negative_number(raw_mb) or float(raw_mb) <= 0:
            raise Refused(f"TARGET_MB={raw_mb!r} is not allowed: expected a number > 0 (millions of bytes)")
        put("TARGET_BYTES", str(round(float(raw_mb) * 1_000_000)), f"TARGET_MB={raw_mb!r}")
    if env.get("USE_GPTQ", "").strip():  # empty = unset
        gptq = flag("USE_GPTQ")
        put("QUANT_METHOD", "gptq" if gptq == "1" else "rtn", f"USE_GPTQ={gptq!r}")
    # On/off switches of newer knobs (PR #1392 style): off sets the knob, on must not contradict it.
    switches = (("SLIDING_WINDOW_ENABLED", "EVAL_STRIDE", "0"), ("PARALLEL_RESIDUAL", "PARALLEL_MODE", "off"))
    for name, knob_name, off in switches:
        if name not in env:
            continue
        if flag(name) == "0":
            put(knob_name, off, f"{name}='0'")
        elif env.get(knob_name, "").strip() == off:
            raise Refused(f"{name}='1' is not allowed together with {knob_name}={off!r}")


def same_value(a: str, b: str) -> bool:
    """`a` (as set) means the fixed value `b`: equal as numbers, or as lower-case text."""
    try:
        return float(a) == float(b)
    except ValueError:
        return a.strip().lower() == b


def is_negative_integer(v: str) -> bool:
    try:
        return int(v) < 0
    except ValueError:
        return False


def is_non_negative_number(v: str) -> bool:
    try:
        return math.isfinite(float(v)) and float(v) >= 0
    except ValueError:
        return False
