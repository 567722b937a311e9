"""Runs that train nothing here, and what a run keeps when an output cannot be written.

- EVAL_ONLY=1 ARTIFACT=<RUN_ID>.ptz re-scores an artifact (what a reviewer does): the model and quantization
  knobs come from the artifact's own config, checked against the code that wrote it (its sha256 is inside) and
  the tokenizer and validation shards its run used; the evaluation knobs (EVAL_ONLY_ENV_KNOBS) come from the
  environment.
- REQUANTIZE=<RUN_ID>.weights.pt finishes a run whose artifact could not be written: the weights, GPTQ Hessians
  and config that `keep_weights` saved are quantized, packed and scored with the knobs the run had.

Every function takes `tg`, the running train_gpt module (`sys.modules[__name__]` there: `__main__` when run as
a script), and never imports train_gpt, which would make second copies of its classes (a ConfigError raised
here must be the one train_gpt.main() catches). A train_gpt.py copied without pgolf/ beside it refuses
EVAL_ONLY and REQUANTIZE, and keeps no weights when an output fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def configure(tg: Any, h: Any, code: bytes) -> tuple[Any, dict[str, Any] | None]:
    """Before the data is read: EVAL_ONLY's config (the artifact's knobs) and the artifact's metadata;
    REQUANTIZE's run keeps its own knobs (checked against the weights' config later)."""
    if not h.eval_only:
        return h, None
    _, meta = read_artifact(tg, Path(h.artifact))
    return eval_only_config(tg, h, meta, code, h.artifact), meta


def read_artifact(tg: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(dequantized state, metadata) of the artifact file at `path`; ArtifactError names the file."""
    if not path.is_file():
        raise tg.ArtifactError(f"{path}: artifact file not found")
    return tg.unpack_body(tg.artifact_body(path.read_bytes(), str(path)), str(path))


def instead_of_training(tg: Any, rc: Any, model: Any, meta: dict[str, Any] | None) -> int:
    """The rest of an EVAL_ONLY or REQUANTIZE run, once the model is built; returns the exit code."""
    if rc.h.eval_only:
        return evaluate_artifact(tg, rc, model, meta)
    tg.flatten_parameters(model)
    return requantize(tg, rc, model)


def eval_only_config(tg: Any, h: Any, meta: dict[str, Any], code: bytes, source: str) -> Any:
    """EVAL_ONLY: the model and quantization knobs of the run that wrote the artifact, checked against
    the code that wrote it (a reviewer re-scores a submission with the script it shipped)."""
    sha = hashlib.sha256(code).hexdigest()
    if meta.get("code_sha256") != sha:
        raise tg.ArtifactError(f"{source}: written by code sha256 {meta.get('code_sha256')}, but this script is {sha}",
                               hint="re-score an artifact with the script file that made it")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise tg.ArtifactError(f"{source}: artifact has no config metadata")
    names = {f.name for f in tg.Hyperparameters.knob_fields()}
    taken = {k.lower(): v for k, v in config.items()
             if k.lower() in names and k.lower() not in tg.EVAL_ONLY_ENV_KNOBS}
    # A variable that sets a knob the artifact overrides (even to its PRESET's default) would be ignored silently.
    clash = [k for k, v in taken.items() if k in h.env_set and getattr(h, k) != v]
    if clash:
        mine, theirs = (", ".join(f"{k.upper()}={c[k]!r}" for k in clash) for c in (vars(h), taken))
        raise tg.ConfigError(f"{mine} not allowed with EVAL_ONLY=1: {source} was trained with {theirs}",
                             hint="EVAL_ONLY takes these knobs from the artifact; unset them")
    return dataclasses.replace(h, **taken)


def preset_defaults(tg: Any, preset: str) -> dict[str, Any]:
    """Every knob's value under PRESET when no variable sets it."""
    return {**{f.name: f.default for f in tg.Hyperparameters.knob_fields()}, **tg.PRESETS[preset]}


def check_artifact_data(tg: Any, h: Any, meta: dict[str, Any], fingerprint: dict[str, Any],
                        log: Callable[[str], None]) -> None:
    """EVAL_ONLY scores on the tokenizer and validation shards the artifact's own run used, or refuses."""
    recorded = meta.get("data")
    if not isinstance(recorded, dict):
        return tg.warn(log, f"{h.artifact} records no tokenizer or validation sha256: the data it is scored on is "
                            f"unchecked")
    for var, path, key in (("TOKENIZER_PATH", h.tokenizer_file, "tokenizer_sha256"),
                           ("DATA_PATH", h.dataset_dir, "val_sha256")):
        if recorded.get(key) != fingerprint[key]:
            raise tg.DataError(f"{var}={path}: {key} {fingerprint[key]}, but {h.artifact} was trained and scored "
                               f"with {key} {recorded.get(key)}", hint="re-score an artifact on the data it was made for")


def log_eval_only_knobs(tg: Any, h: Any, meta: dict[str, Any], log: Callable[[str], None]) -> None:
    """The model knobs taken from the artifact (those not at PRESET's defaults), and a note when the artifact
    was trained under another PRESET, whose evaluation defaults (EVAL_SEQ_LEN, ...) this run does not take."""
    ours = preset_defaults(tg, h.preset)
    model = [f.name for f in dataclasses.fields(tg.ModelConfig)
             if f.name in ours and f.name not in tg.EVAL_ONLY_ENV_KNOBS]
    knobs = ",".join(f"{k.upper()}={getattr(h, k)}" for k in model if getattr(h, k) != ours[k])
    log(tg.format_kv(eval_only_model_knobs=knobs or "none", other_model_knobs=f"PRESET={h.preset}_defaults",
                     artifact=h.artifact))
    trained = meta.get("preset")
    if trained in tg.PRESETS and trained != h.preset:
        theirs = preset_defaults(tg, trained)
        differ = [f"{k.upper()}={ours[k]} ({trained}: {theirs[k]})"
                  for k in sorted(tg.EVAL_ONLY_ENV_KNOBS - {"preset"})
                  if getattr(h, k) == ours[k] != theirs[k]]
        tg.warn(log, f"PRESET={h.preset}, but {h.artifact} was trained under PRESET={trained}: the evaluation knobs "
                     f"keep this PRESET's defaults: {', '.join(differ) or 'none differ'}")


def evaluate_artifact(tg: Any, rc: Any, model: Any, meta: dict[str, Any]) -> int:
    """EVAL_ONLY=1: score an existing artifact exactly as the training run did, without training."""
    check_artifact_data(tg, rc.h, meta, rc.data.fingerprint, rc.log)
    log_eval_only_knobs(tg, rc.h, meta, rc.log)
    rc.log(tg.format_kv(eval_only=rc.h.artifact))
    return score_without_training(tg, rc, model, bool(meta.get("looping", False)), lambda: Path(rc.h.artifact),
                                  meta.get("steps", 0), {"eval_only": True, "artifact": rc.h.artifact})


def requantize(tg: Any, rc: Any, model: Any) -> int:
    """REQUANTIZE=<RUN_ID>.weights.pt: finish a run whose artifact could not be written (keep_weights), with
    the knobs it ran with: quantize its trained weights on its Hessians, pack, and score."""
    h, path = rc.h, Path(rc.h.requantize)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        state, hessians, config = payload["state_dict"], payload["hessians"], payload["config"]
    except Exception as exc:  # a missing file, not a torch file, or another dict: all one answer
        why = re.sub(r"\x1b\[[0-9;]*m", "", (str(exc).splitlines() or [""])[0])  # torch's terminal bold
        why = why if len(why) <= 120 else why[:121].rsplit(" ", 1)[0] + " ..."  # whole words only
        raise tg.ConfigError(f"REQUANTIZE={h.requantize!r} is not allowed: not a weights file kept by train_gpt.py "
                             f"({type(exc).__name__}: {why})") from None
    ours = tg.config_hash(h.knob_values())
    if tg.config_hash(config) != ours:
        raise tg.ConfigError(f"REQUANTIZE={h.requantize!r} is not allowed: it was trained with other knobs (config "
                             f"hash {tg.config_hash(config)[:12]}, this run {ours[:12]})", hint="use its knobs")
    model.load_state_dict(state)
    hessians = {k: v.to(rc.d.device) for k, v in hessians.items()} or None
    rc.log(tg.format_kv(requantize=path, steps=payload["steps"]))
    return score_without_training(tg, rc, model, bool(payload["looping"]),
                                  lambda: tg.write_artifact(rc, model, hessians, payload["steps"])[0], payload["steps"],
                                  {"requantized_from": str(path), "artifact": str(rc.files.final(".ptz"))})


def score_without_training(tg: Any, rc: Any, model: Any, looping: bool, artifact: Callable[[], Path], steps: int,
                           metrics: dict[str, Any]) -> int:
    """The end of a run that trains nothing here (EVAL_ONLY, REQUANTIZE): warm-ups, the artifact, the
    evaluations, size and compliance lines (without the training ones: the training run's log has them)."""
    h, log = rc.h, rc.log
    graphs = tg.Graphs.build(h, model)
    rc.clock.record("startup", rc.clock.wall_seconds())
    for name, seconds in tg.warm_up_graphs(h, rc.d, graphs, looping, training_run=False).items():
        rc.clock.record(f"warmup_{name}", seconds)
    model.set_looping(looping)
    path = artifact()
    ctx = tg.EvalContext.build(h, rc.d, graphs, rc.data)
    ev = tg.run_evaluations(rc, model, ctx, path)
    bytes_model = path.stat().st_size
    bytes_total = tg.report_size(h, bytes_model, len(rc.code), log)
    for line in tg.compliance_block(h, 0.0, 0.0, ev.seconds, bytes_total, rc.data, ev.label,
                                    "n/a (nothing trained here)"):
        if not line.startswith(("compliance:train_time", "compliance:train_data_access_end")):
            log(line)
    # train_time_ms:0: nothing was trained here (the training run's log has its time).
    return tg.finish(rc, ev, bytes_model, 0, steps, metrics)


def keep_weights(tg: Any, rc: Any, model: Any, hessians: dict[str, Any] | None, steps: int) -> str:
    """The artifact could not be written: save what training made (weights, GPTQ Hessians, the config) in
    LOG_DIR or else the temporary folder, so REQUANTIZE can finish the run; returns where, as a sentence."""
    payload = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "hessians": {k: v.cpu() for k, v in (hessians or {}).items()}, "config": rc.h.knob_values(),
               "steps": steps, "looping": model.looping}
    for folder in (rc.files.log_dir, Path(tempfile.gettempdir())):
        path = folder / f"{rc.h.run_id}.weights.pt"
        try:
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            tg.atomic_write_bytes(path, buffer.getvalue())
        except OSError:
            continue
        return (f"the trained weights are kept in {path}: REQUANTIZE={path} with the same knobs (and another "
                f"RUN_ID or LOG_DIR) quantizes, packs and scores them")
    return "the trained weights could not be saved either (LOG_DIR and the temporary folder refused them)"


def kept_artifact(rc: Any) -> str:
    """The metrics could not be written: the artifact is there, and EVAL_ONLY scores it again."""
    path = rc.h.artifact if rc.h.eval_only else rc.files.path(".ptz")
    return (f"the artifact is kept in {path}: EVAL_ONLY=1 ARTIFACT={path} (and another RUN_ID or LOG_DIR) scores "
            f"it again")
