"""What a dataset folder says about itself, checked before training: the manifest beside the shards
(data/tokenize_docs.py and data/make_sample.py write manifest.json, data/cached_challenge_fineweb.py writes
download.json) names the tokenizer the shards were made with and each shard's size and sha256.

train_gpt.py fingerprints the data it scores in every copy (the validation shards' and the tokenizer's
sha256, and the re-encode check that ties the tokenizer to the shards); these checks run where pgolf/ sits
beside it. Every function that needs train_gpt takes `tg`, the running module, and raises its DataError.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

DATASET_MANIFESTS = ("manifest.json", "download.json")
# Shards whose sha256 matched their manifest, as {absolute path: [size, mtime_ns, sha256]}: each is hashed once
# (the challenge's train shards are ~16 GB), again only when its size or modification time changes.
SHARD_HASH_CACHE = "shard_sha256.json"


def manifest_tokenizer_sha256(manifest: dict[str, Any]) -> str | None:
    """The tokenizer a dataset manifest says its shards were made with: tokenize_docs.py's
    `tokenizer.sha256`, or the one `*.model` file listed under `files` (make_sample.py, the downloader)."""
    tok = manifest.get("tokenizer")
    if isinstance(tok, dict) and isinstance(tok.get("sha256"), str):
        return tok["sha256"]
    files = manifest.get("files")
    hashes = ([v.get("sha256") for k, v in files.items() if k.endswith(".model") and isinstance(v, dict)]
              if isinstance(files, dict) else [])
    return hashes[0] if len(hashes) == 1 and isinstance(hashes[0], str) else None


def read_manifest(tg: Any, dataset_dir: Path) -> tuple[Path | None, Any]:
    """The manifest beside the shards (None if there is none) and its parsed content."""
    path = next((Path(dataset_dir) / n for n in DATASET_MANIFESTS if (Path(dataset_dir) / n).is_file()), None)
    try:
        return path, path and json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise tg.DataError(f"{path}: unreadable dataset manifest ({type(exc).__name__}: {exc})") from None


def dataset_identity(tg: Any, dataset_dir: Path, tokenizer: Path, tokenizer_sha256: str,
                     setting: str = "TOKENIZER_PATH") -> dict[str, Any]:
    """The manifest beside the shards and the tokenizer it records. A tokenizer other than the one the shards
    were made with is refused (the error tells to fix `setting`, the caller's name for the tokenizer): its byte
    tables would count the wrong bytes, and the BPB self-check, which decodes with that same tokenizer, cannot
    notice."""
    path, manifest = read_manifest(tg, dataset_dir)
    if path is None:
        return dict(tg.NO_MANIFEST)
    recorded = manifest_tokenizer_sha256(manifest) if isinstance(manifest, dict) else None
    tok = manifest.get("tokenizer") if isinstance(manifest, dict) else None
    transform = (manifest.get("text_transform") or (tok.get("text_transform") if isinstance(tok, dict) else None)
                 if isinstance(manifest, dict) else None)
    if recorded is not None and recorded != tokenizer_sha256:
        raise tg.DataError(f"{tokenizer}: sha256 {tokenizer_sha256} is not the tokenizer {recorded} that {path} "
                           f"records for these shards", hint=f"the byte counts would be wrong; set {setting} to "
                           "the tokenizer the data was made with")
    return {"manifest": str(path), "manifest_sha256": tg.sha256_file(path), "manifest_tokenizer_sha256": recorded,
            "text_transform": transform}


def shard_hash_cache(dataset_dir: Path) -> Path:
    """Beside the shards when that folder is writable, else in the user's cache folder."""
    if os.access(dataset_dir, os.W_OK):
        return Path(dataset_dir) / f".{SHARD_HASH_CACHE}"
    return Path.home() / ".cache" / "parameter-golf" / SHARD_HASH_CACHE


def gather_dicts(part: dict) -> dict:
    """Every rank's dict merged, on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return part
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def listed_shards(tg: Any, dataset_dir: Path) -> tuple[Path | None, list[Path], dict[Path, str]]:
    """The manifest, the shards in the folder, and the sha256 it lists for each it names (sizes checked here):
    tokenize_docs.py lists a shard by its name, make_sample.py and the downloader by datasets/<name>/<file>."""
    path, content = read_manifest(tg, dataset_dir)
    files = content.get("files") if isinstance(content, dict) else None
    listed = {Path(k).name: v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}
    shards = sorted(Path(dataset_dir).glob("fineweb_*.bin"))
    want = {f: listed[f.name] for f in shards if f.name in listed}
    for f, entry in want.items():
        if entry.get("bytes", f.stat().st_size) != f.stat().st_size:
            raise tg.DataError(f"{f}: {f.stat().st_size} bytes, but {path} records {entry['bytes']}: the shard "
                               f"changed after its manifest was written")
    return path, shards, {f: e["sha256"] for f, e in want.items() if isinstance(e.get("sha256"), str)}


def verify_shards(tg: Any, dataset_dir: Path, rank: int = 0, world_size: int = 1) -> dict[str, Any] | None:
    """Every shard against the size and sha256 its manifest lists. Sizes always; hashes only for shards not
    verified before, split over the ranks. None when the manifest lists no shard hashes."""
    path, shards, want = listed_shards(tg, dataset_dir)
    if not want:
        return None
    t0, cache_path = time.perf_counter(), shard_hash_cache(dataset_dir)
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    stamp = {f: [f.stat().st_size, f.stat().st_mtime_ns, sha] for f, sha in want.items()}
    todo = tg.broadcast_object([f for f in want if cache.get(str(f.resolve())) != stamp[f]])  # rank 0's cache rules
    found = gather_dicts({str(f): tg.sha256_file(f) for f in todo[rank::world_size]})
    for f in todo:
        if found[str(f)] != want[f]:
            raise tg.DataError(f"{f}: sha256 {found[str(f)]}, but {path} records {want[f]}: the shard changed after "
                               f"its manifest was written")
    if todo and rank == 0:
        cache.update({str(f.resolve()): stamp[f] for f in todo})
        try:
            tg.atomic_write_bytes(cache_path, json.dumps(cache, indent=0).encode())
        except OSError:
            pass  # nothing lost: the next run hashes them again
    return {"shards": len(shards), "verified": len(want), "hashed_now": len(todo),
            "seconds": round(time.perf_counter() - t0, 2)}
