"""Download the challenge's pre-tokenized FineWeb shards and tokenizer from Hugging Face, checked.

The reference repository's downloader (openai/parameter-golf `data/cached_challenge_fineweb.py`)
skips any file that exists, so a half-copied shard survives forever; it caches `manifest.json`
forever, so pointing it at another repository (`MATCHED_FINEWEB_REPO_ID`) reads the old one and
reports sp4096/sp8192 as missing; it does not retry rate limits; and the variants live in
different dataset repositories (sp1024, sp4096/sp8192 and CaseOps each in its own). This tool:

  * picks the repository per variant (sp1024: willdepueoai/parameter-golf, sp4096/sp8192:
    kevclark/parameter-golf, the CaseOps sp8192_lossless_caps_caseops_v1_reserved of PR #1729:
    romeerp/parameter-golf-caseops-v1), overridable with --repo-id or MATCHED_FINEWEB_REPO_ID;
  * fetches a dataset's validation byte sidecars (`fineweb_val_bytes_*.bin`, CaseOps: each
    validation token's original UTF-8 bytes, which BPB must count) with the same checks, and
    checks that each has its validation shard's token count and 0 at every BOS;
  * resolves --revision to one commit first and downloads every file from that commit, so a
    repository updated mid-download cannot give a mixed dataset;
  * takes the file list from the repository's `datasets/manifest.json` when it has one, else from
    the repository listing; the manifest is cached per repository and checked against the
    commit's listing on every run, so it is refreshed whenever the repository or revision changes;
  * checks every file, local or freshly downloaded, against the size and hash the hub lists for
    that commit (LFS sha256, or the git blob id for small files); a wrong file is fetched again,
    and a download that does not match is never moved into place;
  * retries 429 and 5xx answers and dropped connections with exponential backoff, but stops at the
    first failure to resolve a host name (DNS): the machine is offline, and retrying cannot help;
  * sends HF_TOKEN (or the token saved by `hf auth login`) when there is one;
  * prints one line per file and a closing summary (files, bytes, shards, tokens).

Files are fetched with `huggingface_hub.hf_hub_download` into a staging folder under
DATA_DIR/datasets/.hub/ (same filesystem), verified there and renamed into place, so an interrupted
run never leaves a partial file under its final name. Running the tool twice transfers nothing the
second time: only the commit listing is requested.

Usage:
  python data/cached_challenge_fineweb.py --variant sp8192 [--train-shards 80]
      [--repo-id OWNER/NAME] [--revision REV] [--data-dir DIR] [--verify]

Exit codes: 0 done, 1 a download or check failed, 2 bad input (unknown variant, too many shards,
unknown repository or revision).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = Path(__file__).resolve().parent

# Where each published variant lives (three hub repositories hold them; data/README.md).
CASEOPS_VARIANT = "sp8192_lossless_caps_caseops_v1_reserved"  # PR #1729's export (records 2026-04-18 on)
VARIANT_REPOS = {
    "sp1024": "willdepueoai/parameter-golf",
    "sp4096": "kevclark/parameter-golf",
    "sp8192": "kevclark/parameter-golf",
    CASEOPS_VARIANT: "romeerp/parameter-golf-caseops-v1",
}
# The reference exports are rooted under this folder of the dataset repository:
# <root>/manifest.json, <root>/datasets/fineweb10B_<variant>/*.bin, <root>/tokenizers/*.model.
DEFAULT_REMOTE_ROOT = "datasets"
DEFAULT_TRAIN_SHARDS = 80  # the reference's default: 8B training tokens at 1e8 tokens per shard
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SHARD_NAME = re.compile(r"^fineweb_(train|val)_(\d{6})\.bin$")
# The validation byte sidecar of a CaseOps export: one per validation shard, same index and token count.
SIDECAR_NAME = re.compile(r"^fineweb_val_bytes_(\d{6})\.bin$")
SIDECAR_KIND = "val_bytes"
IDENTITY_TRANSFORM = "identity"

DEFAULT_RETRIES = 6
DEFAULT_RETRY_BASE_SECONDS = 2.0  # 2, 4, 8, 16, 32, 60 s: about two minutes before giving up
MAX_RETRY_SECONDS = 60.0
MAX_RETRY_AFTER_SECONDS = 300.0
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})

STAGING_DIR = ".hub"  # DATA_DIR/datasets/.hub/<owner>--<name>/: manifest cache and in-flight downloads
VERIFIED_NAME = "verified.json"
SOURCE_NAME = "download.json"  # written into the dataset folder: where its files came from

T = TypeVar("T")


class UsageError(ValueError):
    """Bad input: the message names the flag, the value and what is allowed (exit code 2)."""


class DownloadError(RuntimeError):
    """A file could not be fetched or did not check out (exit code 1)."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One file of the resolved commit, as the hub lists it."""

    path: str  # path in the repository
    size: int | None
    sha256: str | None  # LFS files: sha256 of the content
    git_oid: str | None  # every file: git blob id = sha1(b"blob <size>\0" + content)

    @property
    def check(self) -> tuple[str, str] | None:
        """The strongest content check available: ("sha256", hex) or ("git-sha1", hex)."""
        if self.sha256:
            return "sha256", self.sha256
        if self.git_oid:
            return "git-sha1", self.git_oid
        return None


@dataclasses.dataclass(frozen=True)
class PlannedFile:
    remote: RemoteFile
    local: Path
    kind: str  # "val", "train", "val_bytes" (SIDECAR_KIND) or "tokenizer"


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def human_bytes(n: float) -> str:
    """Decimal units, like the challenge's byte limits."""
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} TB"


def train_gpt():
    """train_gpt.py owns the shard format and atomic writes; import it from the repository root
    only when needed (it imports torch, which costs about two seconds)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import train_gpt as tg

    return tg


def exclusive(path: Path):
    """The repository's one lock helper (pgolf/locks.py), waiting for and holding the lock on `path`."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from pgolf.locks import exclusive as lock

    return lock(path)


def file_digest(path: Path, kind: str, size: int) -> str:
    """sha256 of the content, or the git blob id (sha1 over a 'blob <size>\\0' prefix + content)."""
    if kind == "sha256":
        h = hashlib.sha256()
    else:
        h = hashlib.sha1()
        h.update(b"blob %d\0" % size)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def error_chain(exc: BaseException) -> Iterator[BaseException]:
    """exc and its causes: huggingface_hub wraps the HTTP error it got in its own exceptions."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


TRANSIENT_ERROR_NAMES = frozenset({  # connection-level failures of requests (hub 0.x) and httpx (1.x+)
    "ConnectError", "ConnectionError", "TimeoutException", "Timeout", "TimeoutError", "ReadTimeout",
    "RemoteProtocolError", "ReadError", "ChunkedEncodingError", "IncompleteRead", "ProtocolError"})


def transient_reason(exc: BaseException) -> str | None:
    """Why exc is worth retrying (a 429/5xx answer, a dropped or timed-out connection, a body
    shorter than announced), or None."""
    for e in error_chain(exc):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int):
            return f"HTTP {status}" if status in RETRY_STATUS else None
        if {c.__name__ for c in type(e).__mro__} & TRANSIENT_ERROR_NAMES:
            return type(e).__name__
        if isinstance(e, OSError) and "Consistency check failed" in str(e):  # hf_hub_download's size check
            return "incomplete transfer"
    return None


# How getaddrinfo's failure reads once a library has copied its text into an exception of its own
# without the original as cause (glibc EAI_NONAME and EAI_AGAIN, macOS, Windows).
NAME_RESOLUTION_TEXT = ("name or service not known", "temporary failure in name resolution",
                        "nodename nor servname provided", "getaddrinfo failed")


def unresolved_host(exc: BaseException) -> str | None:
    """The host name whose DNS lookup failed in exc (socket.gaierror, however huggingface_hub, httpx
    or urllib3 wrapped it), or None when exc is something else."""
    chain = list(error_chain(exc))
    if not any(isinstance(e, socket.gaierror) or type(e).__name__ == "NameResolutionError"
               or any(t in str(e).lower() for t in NAME_RESOLUTION_TEXT) for e in chain):
        return None
    for e in chain:
        try:  # httpx errors carry the request (reading .request raises when they do not)
            host = e.request.url.host  # type: ignore[attr-defined]
        except Exception:
            host = getattr(getattr(e, "conn", None), "host", None)  # urllib3's NameResolutionError
        if isinstance(host, str) and host:
            return host
    return urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "the hub"


def offline_error(what: str, host: str) -> DownloadError:
    return DownloadError(f"{what}: cannot resolve the host name {host}: this machine appears to be offline (or its "
                         "DNS does not work); connect it to the network, or set HF_ENDPOINT to a hub it can "
                         "reach, and run again (files already in place are kept)")


def retry_after_seconds(exc: BaseException) -> float | None:
    """The server's Retry-After (seconds form), if the error carries a response with one."""
    for e in error_chain(exc):
        headers = getattr(getattr(e, "response", None), "headers", None)
        value = headers.get("Retry-After") if hasattr(headers, "get") else None
        if value is not None:
            try:
                return min(float(value), MAX_RETRY_AFTER_SECONDS)
            except ValueError:
                return None
    return None


def with_retries(what: str, fn: Callable[[], T], retries: int, base_seconds: float,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """Call fn; on a transient failure wait base * 2^attempt seconds (at most MAX_RETRY_SECONDS,
    with 0-25% jitter so parallel clients spread out, and at least the server's Retry-After)
    and try again, up to `retries` more times. A host name that does not resolve raises
    DownloadError at once (offline: every retry would fail the same way); other errors propagate."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:
            host = unresolved_host(exc)
            if host is not None:
                raise offline_error(what, host) from exc
            reason = transient_reason(exc)
            if reason is None or attempt == retries:
                raise
            delay = min(base_seconds * 2 ** attempt, MAX_RETRY_SECONDS) * (1 + 0.25 * random.random())
            delay = max(delay, retry_after_seconds(exc) or 0.0)
            log(f"  {what}: {reason}; retry {attempt + 1}/{retries} in {delay:.1f}s")
            sleep(delay)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Download the challenge FineWeb shards and tokenizer from Hugging Face, with size and "
                    "hash checks, retries and a manifest that follows the repository and revision.")
    p.add_argument("--variant", required=True,
                   help="sp1024, sp4096, sp8192, or another name published in --repo-id "
                        "(the dataset folder is fineweb10B_<variant>)")
    p.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS,
                   help=f"how many fineweb_train_* shards to fetch, from 000000 (default {DEFAULT_TRAIN_SHARDS}; "
                        "the whole validation split is always fetched)")
    p.add_argument("--repo-id", default=None,
                   help="Hugging Face dataset repository (default: MATCHED_FINEWEB_REPO_ID, else the variant's "
                        "published repository)")
    p.add_argument("--revision", default="main", help="branch, tag or commit (default main)")
    p.add_argument("--remote-root", default=os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT),
                   help=f"folder of the export inside the repository (default {DEFAULT_REMOTE_ROOT!r}, or "
                        "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX; '' for the repository root)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help=f"local root for datasets/ and tokenizers/ (default {DEFAULT_DATA_DIR})")
    p.add_argument("--verify", action="store_true",
                   help="hash every local file again, even those verified by an earlier run")
    p.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                   help=f"retries per request on 429/5xx/connection errors (default {DEFAULT_RETRIES})")
    p.add_argument("--retry-base-seconds", type=float,
                   default=None, help="first backoff delay, doubled per retry (default PG_RETRY_BASE_SECONDS "
                                      f"or {DEFAULT_RETRY_BASE_SECONDS})")
    return p.parse_args(argv)


def resolve_inputs(args: argparse.Namespace, env: dict[str, str]) -> tuple[str, str, float]:
    """Check the flags; return (repo_id, where the repo id came from, retry base seconds)."""
    if not VARIANT_NAME.match(args.variant):
        raise UsageError(f"--variant={args.variant!r} is not allowed: expected a name like sp1024 "
                         "(letters, digits, '_', '.', '-')")
    if args.train_shards < 0:
        raise UsageError(f"--train-shards={args.train_shards} is not allowed: expected an integer >= 0")
    if args.retries < 0:
        raise UsageError(f"--retries={args.retries} is not allowed: expected an integer >= 0")
    raw_base = args.retry_base_seconds if args.retry_base_seconds is not None else env.get("PG_RETRY_BASE_SECONDS")
    try:
        base = DEFAULT_RETRY_BASE_SECONDS if raw_base is None else float(raw_base)
    except ValueError:
        raise UsageError(f"PG_RETRY_BASE_SECONDS={raw_base!r} is not allowed: expected a number >= 0") from None
    if not base >= 0:
        flag = "--retry-base-seconds" if args.retry_base_seconds is not None else "PG_RETRY_BASE_SECONDS"
        raise UsageError(f"{flag}={raw_base} is not allowed: expected a number >= 0")
    if ".." in Path(args.remote_root).parts or Path(args.remote_root).is_absolute():
        raise UsageError(f"--remote-root={args.remote_root!r} is not allowed: expected a relative folder "
                         "inside the repository")
    if args.repo_id:
        repo_id, source = args.repo_id, "--repo-id"
    elif env.get("MATCHED_FINEWEB_REPO_ID"):
        repo_id, source = env["MATCHED_FINEWEB_REPO_ID"], "MATCHED_FINEWEB_REPO_ID"
    elif args.variant in VARIANT_REPOS:
        repo_id, source = VARIANT_REPOS[args.variant], f"default for {args.variant}"
    else:
        known = ", ".join(f"{v} ({r})" for v, r in VARIANT_REPOS.items())
        raise UsageError(f"--variant={args.variant} is not a known variant: known are {known}; for another "
                         "variant name its repository with --repo-id or MATCHED_FINEWEB_REPO_ID")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise UsageError(f"{source}={repo_id!r} is not allowed: expected OWNER/NAME")
    return repo_id, source, base


# ---------------------------------------------------------------------------------------------
# Planning: which remote files, where they go
# ---------------------------------------------------------------------------------------------

def remote_join(root: str, rel: str) -> str:
    return "/".join(p for p in (root.strip("/"), rel.strip("/")) if p)


def local_path_for(rel: str, data_dir: Path, what: str) -> Path:
    """Map a path relative to the export root (datasets/..., tokenizers/...) to DATA_DIR/<rel>;
    refuse anything that would land elsewhere (a hostile or broken manifest)."""
    parts = Path(rel).parts
    if not parts or parts[0] not in ("datasets", "tokenizers") or ".." in parts or Path(rel).is_absolute():
        raise DownloadError(f"{what}: path {rel!r} is not under datasets/ or tokenizers/; refusing to write it")
    return data_dir.joinpath(*parts)


def has_sidecars(entry: dict[str, Any], tokenizer: dict[str, Any]) -> bool:
    """The reference exporter of PR #1729 lists `val_bytes_glob` for a dataset whose validation split has
    byte sidecars, and `text_transform` for a tokenizer that needs them (the record's downloader fetches
    the sidecars when val_bytes_glob is set)."""
    transform = str(tokenizer.get("text_transform") or IDENTITY_TRANSFORM)
    return bool(entry.get("val_bytes_glob")) or transform != IDENTITY_TRANSFORM


def is_caseops_variant(variant: str) -> bool:
    return "caseops" in variant.lower()


def plan_from_manifest(manifest: dict[str, Any], manifest_name: str, variant: str, train_shards: int,
                       listing: dict[str, RemoteFile], root: str, data_dir: Path, repo_desc: str) -> list[PlannedFile]:
    """The reference manifest: {"datasets": [{"name": "fineweb10B_<v>", "tokenizer_name": ...,
    "stats": {"files_train": N, "files_val": M}}], "tokenizers": [{"name": ..., "model_path":
    "tokenizers/...", "vocab_path": ...}]}, paths relative to the export root."""
    dataset_name = f"fineweb10B_{variant}"
    datasets = manifest.get("datasets") if isinstance(manifest, dict) else None
    if not isinstance(datasets, list):
        raise DownloadError(f"{manifest_name} in {repo_desc}: no 'datasets' list; cannot tell which files exist")
    entry = next((d for d in datasets if isinstance(d, dict) and d.get("name") == dataset_name), None)
    if entry is None:
        names = sorted(str(d.get("name")) for d in datasets if isinstance(d, dict))
        variants = [n.removeprefix("fineweb10B_") for n in names]
        raise UsageError(f"--variant={variant} is not published in {repo_desc}: its {manifest_name} lists "
                         f"{', '.join(variants) or 'no datasets'}")
    stats = entry.get("stats") or {}
    try:
        n_train, n_val = int(stats["files_train"]), int(stats["files_val"])
    except (KeyError, TypeError, ValueError):
        raise DownloadError(f"{manifest_name} in {repo_desc}: dataset {dataset_name} has no "
                            "stats.files_train/files_val shard counts") from None
    if train_shards > n_train:
        raise UsageError(f"--train-shards={train_shards} is not allowed: {variant} has {n_train} train shards "
                         f"in {repo_desc}")
    tok_name = entry.get("tokenizer_name")
    tok = next((t for t in manifest.get("tokenizers") or [] if isinstance(t, dict) and t.get("name") == tok_name), None)
    if tok is None:
        raise DownloadError(f"{manifest_name} in {repo_desc}: tokenizer {tok_name!r} of {dataset_name} is not listed")
    prefix = str(entry.get("path") or f"datasets/{dataset_name}").strip("/")
    rels = [(f"{prefix}/fineweb_val_{i:06d}.bin", "val") for i in range(n_val)]
    if has_sidecars(entry, tok):
        rels += [(f"{prefix}/fineweb_val_bytes_{i:06d}.bin", SIDECAR_KIND) for i in range(n_val)]
    rels += [(f"{prefix}/fineweb_train_{i:06d}.bin", "train") for i in range(train_shards)]
    tok_paths = [str(tok[k]) for k in ("model_path", "vocab_path", "path") if tok.get(k)]
    if not tok_paths:
        raise DownloadError(f"{manifest_name} in {repo_desc}: tokenizer {tok_name!r} names no files")
    rels += [(p, "tokenizer") for p in tok_paths]
    return _resolve_plan(rels, listing, root, data_dir, f"{manifest_name} in {repo_desc}", repo_desc)


def plan_from_listing(variant: str, train_shards: int, listing: dict[str, RemoteFile], root: str,
                      data_dir: Path, repo_desc: str) -> list[PlannedFile]:
    """No manifest: every fineweb_val_* shard (and fineweb_val_bytes_* sidecar) and the first train
    shards found under <root>/datasets/fineweb10B_<variant>/, and the tokenizer
    <root>/tokenizers/fineweb_<V>_bpe<suffix>.model (+ .vocab) for sp<V><suffix>, or
    <root>/tokenizers/<variant>.model."""
    dataset_rel = f"datasets/fineweb10B_{variant}"
    shards: dict[str, list[tuple[int, str]]] = {"val": [], "train": [], SIDECAR_KIND: []}
    dataset_dirs: set[str] = set()
    root_prefix = f"{root}/" if root else ""
    for path in listing:
        if not path.startswith(root_prefix + "datasets/"):
            continue
        rel = path[len(root_prefix):]
        folder, _, name = rel.rpartition("/")
        m = SHARD_NAME.match(name)
        if m:
            dataset_dirs.add(folder.removeprefix("datasets/"))
            if folder == dataset_rel:
                shards[m.group(1)].append((int(m.group(2)), rel))
        m = SIDECAR_NAME.match(name)
        if m and folder == dataset_rel:
            shards[SIDECAR_KIND].append((int(m.group(1)), rel))
    if not shards["val"]:
        available = ", ".join(sorted(d.removeprefix("fineweb10B_") for d in dataset_dirs)) or "none"
        raise UsageError(f"--variant={variant} is not published in {repo_desc}: no "
                         f"{remote_join(root, dataset_rel)}/fineweb_val_*.bin (variants there: {available})")
    train = sorted(shards["train"])
    if train_shards > len(train):
        raise UsageError(f"--train-shards={train_shards} is not allowed: {variant} has {len(train)} train shards "
                         f"in {repo_desc}")
    rels = [(rel, "val") for _, rel in sorted(shards["val"])]
    rels += [(rel, SIDECAR_KIND) for _, rel in sorted(shards[SIDECAR_KIND])]
    rels += [(rel, "train") for _, rel in train[:train_shards]]
    # The exporter names the tokenizer of variant sp<V><suffix> fineweb_<V>_bpe<suffix> (the CaseOps
    # sp8192_lossless_caps_caseops_v1_reserved: fineweb_8192_bpe_lossless_caps_caseops_v1_reserved).
    m = re.fullmatch(r"sp(\d+)(_.+)?", variant)
    stems = ([f"fineweb_{m.group(1)}_bpe{m.group(2) or ''}"] if m else []) + [variant]
    for stem in stems:
        model = f"tokenizers/{stem}.model"
        if remote_join(root, model) in listing:
            rels.append((model, "tokenizer"))
            if remote_join(root, f"tokenizers/{stem}.vocab") in listing:
                rels.append((f"tokenizers/{stem}.vocab", "tokenizer"))
            break
    else:
        looked = ", ".join(remote_join(root, f"tokenizers/{s}.model") for s in stems)
        raise DownloadError(f"{repo_desc}: no tokenizer for {variant} (looked for {looked}; no manifest.json)")
    return _resolve_plan(rels, listing, root, data_dir, f"listing of {repo_desc}", repo_desc)


def check_sidecar_plan(plan: list[PlannedFile], variant: str, repo_desc: str) -> None:
    """A CaseOps dataset (or any dataset with sidecars) needs exactly one sidecar per validation shard:
    without it BPB would be counted on the transformed text, with a stray one on misaligned bytes."""
    names = {kind: sorted(p.remote.path.rsplit("/", 1)[-1] for p in plan if p.kind == kind) for kind in ("val", SIDECAR_KIND)}
    if not names[SIDECAR_KIND] and not is_caseops_variant(variant):
        return
    expected = [n.replace("fineweb_val_", "fineweb_val_bytes_", 1) for n in names["val"]]
    if names[SIDECAR_KIND] != expected:
        missing = sorted(set(expected) - set(names[SIDECAR_KIND])) or ["(none)"]
        extra = sorted(set(names[SIDECAR_KIND]) - set(expected)) or ["(none)"]
        raise DownloadError(f"{repo_desc}: the byte sidecars of {variant} do not match its validation shards "
                            f"(missing: {', '.join(missing[:3])}; without a shard: {', '.join(extra[:3])}); BPB "
                            "of a CaseOps dataset is counted from fineweb_val_bytes_*.bin, one per fineweb_val_*.bin")


def _resolve_plan(rels: list[tuple[str, str]], listing: dict[str, RemoteFile], root: str, data_dir: Path,
                  source: str, repo_desc: str) -> list[PlannedFile]:
    missing = [remote_join(root, rel) for rel, _ in rels if remote_join(root, rel) not in listing]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DownloadError(f"{', '.join(missing[:3])}{more}: listed by {source} but not in {repo_desc}")
    return [PlannedFile(listing[remote_join(root, rel)], local_path_for(rel, data_dir, source), kind)
            for rel, kind in rels]


# ---------------------------------------------------------------------------------------------
# Local state: hashes already verified (so a second run does not re-hash 16 GB)
# ---------------------------------------------------------------------------------------------

class VerifiedCache:
    """Remembers (size, mtime_ns, check) of files that hashed correctly. A file whose size or
    modification time changed since (truncated, rewritten) is hashed again."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries: dict[str, Any] = json.loads(path.read_text())
            if not isinstance(self.entries, dict):
                self.entries = {}
        except (OSError, ValueError):
            self.entries = {}

    @staticmethod
    def _key(local: Path) -> str:
        return str(local.resolve())

    def knows(self, local: Path, check: tuple[str, str]) -> bool:
        entry = self.entries.get(self._key(local))
        try:
            st = local.stat()
        except OSError:
            return False
        return entry == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "check": list(check)}

    def remember(self, local: Path, check: tuple[str, str]) -> None:
        st = local.stat()
        self.entries[self._key(local)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "check": list(check)}

    def forget(self, local: Path) -> None:
        self.entries.pop(self._key(local), None)

    def save(self) -> None:
        train_gpt().atomic_write_bytes(self.path, (json.dumps(self.entries, indent=1, sort_keys=True) + "\n").encode())


def check_local(f: RemoteFile, local: Path, cache: VerifiedCache, rehash: bool) -> str | None:
    """None when local holds exactly f's content, else why not."""
    if not local.is_file():
        return "missing"
    size = local.stat().st_size
    if f.size is not None and size != f.size:
        return f"size {size} != {f.size}"
    check = f.check
    if check is None:
        return None
    if not rehash and cache.knows(local, check):
        return None
    digest = file_digest(local, check[0], size)
    if digest != check[1]:
        cache.forget(local)
        return f"{check[0]} {digest[:12]}... != {check[1][:12]}..."
    cache.remember(local, check)
    return None


# ---------------------------------------------------------------------------------------------
# The download
# ---------------------------------------------------------------------------------------------

class Hub:
    """The two huggingface_hub calls this tool makes (listing, file download), each with the retry policy."""

    def __init__(self, repo_id: str, retries: int, base_seconds: float):
        import huggingface_hub  # imported here so `--help` and bad flags answer without it

        self.hf = huggingface_hub
        self.repo_id = repo_id
        self.retries = retries
        self.base = base_seconds
        self.api = huggingface_hub.HfApi()

    def auth_description(self) -> str:
        if os.environ.get("HF_TOKEN"):
            return "HF_TOKEN"
        try:
            from huggingface_hub.utils import get_token

            return "saved token" if get_token() else "anonymous (set HF_TOKEN for higher rate limits)"
        except Exception:  # older huggingface_hub without get_token
            return "anonymous or saved token"

    def resolve(self, revision: str) -> tuple[str, dict[str, RemoteFile]]:
        """Commit sha of revision and every file of that commit with size and hashes."""
        info = with_retries(f"listing {self.repo_id}@{revision}", lambda: self.api.dataset_info(
            self.repo_id, revision=revision, files_metadata=True), self.retries, self.base)
        if not info.sha:
            raise DownloadError(f"{self.repo_id}@{revision}: the hub's answer names no commit")
        files = {}
        for s in info.siblings or []:
            lfs = s.lfs
            sha256 = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
            files[s.rfilename] = RemoteFile(s.rfilename, s.size, sha256, s.blob_id)
        return info.sha, files

    def fetch(self, f: RemoteFile, commit: str, staging: Path) -> Path:
        """Download f at commit into staging/<repo path> (atomic inside huggingface_hub)."""
        staged = staging / f.path
        staged.unlink(missing_ok=True)  # never let the library reuse a stale staged copy
        path = with_retries(f.path, lambda: self.hf.hf_hub_download(
            self.repo_id, f.path, repo_type="dataset", revision=commit, local_dir=staging), self.retries, self.base)
        return Path(path)


def install(hub: Hub, f: RemoteFile, local: Path, commit: str, staging: Path, cache: VerifiedCache) -> None:
    """Fetch f, check it in the staging folder, then rename it into place. A file that does not
    match the listing is deleted and never appears under its final name."""
    staged = hub.fetch(f, commit, staging)
    problem = check_local(f, staged, cache, rehash=True)
    if problem is not None:
        staged.unlink(missing_ok=True)
        cache.forget(staged)
        raise DownloadError(f"{f.path}: downloaded file does not match {hub.repo_id}@{commit[:12]}'s listing "
                            f"({problem}); it was deleted and nothing was installed. Run again; if it repeats, "
                            "the repository or a proxy serves wrong bytes")
    local.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, local)
    cache.forget(staged)
    if f.check is not None:
        cache.remember(local, f.check)


def load_manifest(hub: Hub, listing: dict[str, RemoteFile], manifest_path: str, commit: str, staging: Path,
                  cache: VerifiedCache, rehash: bool) -> dict[str, Any] | None:
    """The repository's manifest at this commit, or None when the commit has none. The cached copy
    (staging/<path>) is used only while it matches the commit's listing, so a new commit, a
    different revision or another repository (another staging folder) always refreshes it."""
    remote = listing.get(manifest_path)
    if remote is None:
        return None
    cached = staging / manifest_path
    if check_local(remote, cached, cache, rehash) is not None:
        log(f"manifest: fetching {manifest_path} ({hub.repo_id}@{commit[:12]})")
        staged = hub.fetch(remote, commit, staging)
        problem = check_local(remote, staged, cache, rehash=True)
        if problem is not None:
            staged.unlink(missing_ok=True)
            raise DownloadError(f"{manifest_path}: downloaded manifest does not match the listing ({problem})")
    try:
        return json.loads(cached.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DownloadError(f"{manifest_path} in {hub.repo_id}@{commit[:12]}: not valid JSON ({exc})") from None


def shard_tokens(paths: list[Path]) -> int:
    tg = train_gpt()
    return sum(tg.read_shard_header(p) for p in paths)


def check_sidecars(val: list[Path], sidecars: list[Path]) -> int:
    """Each sidecar must have its validation shard's token count and 0 at every BOS (a document's
    BOS stands for no original byte); returns the validation split's original UTF-8 bytes."""
    tg = train_gpt()
    total = 0
    for shard, sidecar in zip(val, sidecars, strict=True):  # check_sidecar_plan paired them by index
        tokens, counts = tg.load_shard(shard), tg.load_shard(sidecar)
        if tokens.size != counts.size:
            raise DownloadError(f"{sidecar}: {counts.size} byte counts for the {tokens.size} tokens of {shard.name} "
                                "(the repository holds mismatched files)")
        bos_bytes = counts[tokens == tg.BOS_ID]
        if bos_bytes.any():
            raise DownloadError(f"{sidecar}: a BOS token of {shard.name} is given {int(bos_bytes.max())} bytes, expected 0 "
                                "(the sidecar is not aligned with its shard)")
        total += int(counts.sum(dtype="int64"))
    return total


def run(args: argparse.Namespace) -> int:
    repo_id, repo_source, base = resolve_inputs(args, dict(os.environ))
    data_dir = args.data_dir.resolve()
    root = args.remote_root.strip("/")
    try:
        hub = Hub(repo_id, args.retries, base)
    except ImportError:
        raise DownloadError("huggingface_hub is not installed: pip install -r requirements.txt") from None
    if not sys.stderr.isatty():
        hub.hf.utils.disable_progress_bars()  # per-file byte bars only when someone watches them
    staging = data_dir / "datasets" / STAGING_DIR / repo_id.replace("/", "--")
    log(f"download: {args.variant} from {repo_id} ({repo_source}) revision {args.revision}; "
        f"auth: {hub.auth_description()}")

    try:
        commit, listing = hub.resolve(args.revision)
    except hub.hf.utils.RevisionNotFoundError:
        raise UsageError(f"--revision={args.revision} is not allowed: not a branch, tag or commit of "
                         f"{repo_id}") from None
    except hub.hf.utils.RepositoryNotFoundError:
        raise UsageError(f"{repo_source}={repo_id} is not allowed: no such dataset repository on the hub "
                         "(or it is private or gated: set HF_TOKEN)") from None
    repo_desc = f"{repo_id}@{commit[:12]}"
    log(f"download: {args.revision} is commit {commit}; {len(listing)} files listed")

    t0 = time.perf_counter()
    with exclusive(staging / ".lock"):  # one downloader per staging folder: two would fight over the files
        cache = VerifiedCache(staging / VERIFIED_NAME)
        manifest_path = remote_join(root, "manifest.json")
        manifest = load_manifest(hub, listing, manifest_path, commit, staging, cache, args.verify)
        if manifest is not None:
            plan = plan_from_manifest(manifest, manifest_path, args.variant, args.train_shards, listing, root,
                                      data_dir, repo_desc)
        else:
            log(f"download: no {manifest_path} in {repo_desc}; using the repository listing")
            plan = plan_from_listing(args.variant, args.train_shards, listing, root, data_dir, repo_desc)
        check_sidecar_plan(plan, args.variant, repo_desc)

        total_bytes = sum(p.remote.size or 0 for p in plan)
        sidecars_planned = sum(p.kind == SIDECAR_KIND for p in plan)
        log(f"download: {len(plan)} files, {human_bytes(total_bytes)} (val shards: "
            f"{sum(p.kind == 'val' for p in plan)}, train shards: {sum(p.kind == 'train' for p in plan)}, "
            f"{f'val byte sidecars: {sidecars_planned}, ' if sidecars_planned else ''}"
            f"tokenizer files: {sum(p.kind == 'tokenizer' for p in plan)})")
        fetched_files = fetched_bytes = 0
        width = len(str(len(plan)))
        try:
            for i, item in enumerate(plan, 1):
                label = f"[{i:>{width}}/{len(plan)}] {item.local.relative_to(data_dir)}"
                problem = check_local(item.remote, item.local, cache, args.verify)
                if problem is None:
                    log(f"{label}: ok")
                    continue
                log(f"{label}: {problem}; fetching {human_bytes(item.remote.size or 0)}")
                t_file = time.perf_counter()
                install(hub, item.remote, item.local, commit, staging, cache)
                dt = time.perf_counter() - t_file
                size = item.local.stat().st_size
                fetched_files += 1
                fetched_bytes += size
                log(f"{label}: done in {dt:.1f}s ({human_bytes(size / max(dt, 1e-9))}/s)")
        finally:
            cache.save()

        dataset_dir = data_dir / "datasets" / f"fineweb10B_{args.variant}"
        val = [p.local for p in plan if p.kind == "val"]
        train = [p.local for p in plan if p.kind == "train"]
        sidecars = [p.local for p in plan if p.kind == SIDECAR_KIND]
        try:  # also checks every shard's header against its size
            val_tokens, train_tokens = shard_tokens(val), shard_tokens(train)
            original_bytes = check_sidecars(val, sidecars) if sidecars else None
        except train_gpt().DataError as exc:
            raise DownloadError(f"{exc} (the file matches the hub's listing: the repository holds a bad "
                                "shard)") from None
        record = {
            "repo_id": repo_id, "revision": args.revision, "commit": commit, "remote_root": root,
            "variant": args.variant, "train_shards": len(train), "val_shards": len(val),
            "val_tokens": val_tokens, "train_tokens": train_tokens,
            **({"val_byte_sidecars": len(sidecars), "val_original_bytes": original_bytes} if sidecars else {}),
            "files": {str(p.local.relative_to(data_dir)): {"bytes": p.remote.size, "repo_path": p.remote.path,
                                                           **({p.remote.check[0]: p.remote.check[1]}
                                                              if p.remote.check else {})}
                      for p in plan},
        }
        train_gpt().atomic_write_bytes(dataset_dir / SOURCE_NAME, (json.dumps(record, indent=2) + "\n").encode())

    planned = {p.local for p in plan}
    extra = sorted(f.name for f in dataset_dir.glob("fineweb_*.bin") if f not in planned)
    if extra:
        shown = ", ".join(extra[:3]) + (", ..." if len(extra) > 3 else "")
        log(f"note: {len(extra)} other shard(s) in {dataset_dir} ({shown})"
            " were not part of this download; train_gpt.py reads every fineweb_train_*/fineweb_val_* file there")
    tokenizer = next((p.local for p in plan if p.kind == "tokenizer" and p.local.suffix == ".model"), None)
    dt = time.perf_counter() - t0
    print(f"download: files:{len(plan)} fetched:{fetched_files} present:{len(plan) - fetched_files} "
          f"bytes_total:{total_bytes} bytes_fetched:{fetched_bytes} seconds:{dt:.1f}")
    sidecar_summary = f"val_byte_sidecars:{len(sidecars)} val_original_bytes:{original_bytes} " if sidecars else ""
    print(f"download: val_shards:{len(val)} val_tokens:{val_tokens} {sidecar_summary}train_shards:{len(train)} "
          f"train_tokens:{train_tokens} commit:{commit}")
    print(f"download: dataset {dataset_dir}")
    if tokenizer is not None:
        print(f"download: tokenizer {tokenizer}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; finished files are in place, partial ones were discarded", file=sys.stderr)
        return 130
    except Exception as exc:  # a hub error after all retries: one line, not a traceback
        if os.environ.get("PG_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: {type(exc).__name__}: {first} (PG_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
