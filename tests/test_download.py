"""data/cached_challenge_fineweb.py against a fake Hugging Face hub on loopback (no network).

    python -m pytest -q tests/test_download.py

`FakeHub` is an `http.server` in a thread that answers the two endpoints the downloader's
`huggingface_hub` calls use: the dataset listing (`GET /api/datasets/{repo}/revision/{rev}?blobs=true`,
what `HfApi.dataset_info(files_metadata=True)` reads) and file resolution
(`HEAD`/`GET /datasets/{repo}/resolve/{rev}/{path}` with `X-Repo-Commit`, `ETag`, `Content-Length`
and `Range`, what `hf_hub_download` reads). The tool runs as a subprocess with `HF_ENDPOINT` pointing
at it (huggingface_hub reads that variable at import), a private `HF_HOME` and a tiny retry base.
The hub counts every GET of a file, so "downloads nothing" is checked by request counts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest

import train_gpt as tg
from pgolf.shards import write_shard

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "data" / "cached_challenge_fineweb.py"
TOKEN = "hf_fake_token_for_tests"
pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed (pip install -r requirements.txt)")


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _shard_bytes(tmp: Path, n_tokens: int, seed: int) -> bytes:
    """A real challenge-format shard (pgolf.shards.write_shard), read back as bytes."""
    tokens = np.random.default_rng(seed).integers(4, 1024, n_tokens)
    tokens[:: 97] = tg.BOS_ID
    path = tmp / f"shard_{seed}.bin"
    write_shard(path, tokens)
    return path.read_bytes()


class FakeHub:
    """Dataset repositories served over HTTP the way the hub serves them, with fault injection."""

    LFS_SUFFIXES = (".bin", ".model")  # stored with Git LFS on the real hub: listed with a sha256

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo_id -> {"commit": sha, "files": {path: bytes}}
        self.corrupt: dict[tuple[str, str], bytes] = {}  # (repo, path) -> bytes served instead
        self.faults: dict[tuple[str, str], list[int]] = {}  # (method, url path) -> statuses to answer first
        self.drop_once: dict[tuple[str, str], int] = {}  # (repo, path) -> bytes sent before the connection drops
        self.ranges: list[tuple[str, int]] = []  # (path, start) of every Range request
        self.file_gets: Counter = Counter()  # (repo, path) -> successful GETs of the file
        self.fault_hits: Counter = Counter()
        self.auth: list[str] = []
        self._commits = 0
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                hub.handle(self, "GET")

            def do_HEAD(self):
                hub.handle(self, "HEAD")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def publish(self, repo_id: str, files: dict[str, bytes]) -> str:
        """A new commit of repo_id holding exactly `files`; returns its sha."""
        self._commits += 1
        commit = hashlib.sha1(f"{repo_id}:{self._commits}".encode()).hexdigest()
        self.repos[repo_id] = {"commit": commit, "files": dict(files)}
        return commit

    # -- HTTP --------------------------------------------------------------------------------
    def _send(self, req, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        req.send_response(status)
        for k, v in (headers or {}).items():
            req.send_header(k, str(v))
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if not head:
            req.wfile.write(body)

    def _error(self, req, status: int, code: str, head: bool) -> None:
        self._send(req, status, json.dumps({"error": code}).encode(),
                   {"X-Error-Code": code, "Content-Type": "application/json"}, head)

    def handle(self, req, method: str) -> None:
        url = urlsplit(req.path)
        path = unquote(url.path)
        head = method == "HEAD"
        with self.lock:
            if req.headers.get("Authorization"):
                self.auth.append(req.headers["Authorization"])
            pending = self.faults.get((method, path))
            if pending:
                status = pending.pop(0)
                self.fault_hits[(method, path, status)] += 1
                return self._send(req, status, b"try again later", {"Content-Type": "text/plain"}, head)
        m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/revision/([^/]+)", path)
        if m and method == "GET":
            return self._listing(req, m.group(1), m.group(2))
        m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._resolve(req, m.group(1), m.group(2), m.group(3), head)
        self._error(req, 404, "NotFound", head)

    def _repo_at(self, req, repo_id: str, revision: str, head: bool) -> dict | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(req, 404, "RepoNotFound", head)
            return None
        if revision not in ("main", repo["commit"]):
            self._error(req, 404, "RevisionNotFound", head)
            return None
        return repo

    def _listing(self, req, repo_id: str, revision: str) -> None:
        repo = self._repo_at(req, repo_id, revision, False)
        if repo is None:
            return
        siblings = []
        for name, data in sorted(repo["files"].items()):
            entry = {"rfilename": name, "size": len(data), "blobId": _git_blob_sha1(data)}
            if name.endswith(self.LFS_SUFFIXES):
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(entry)
        body = json.dumps({"id": repo_id, "sha": repo["commit"], "siblings": siblings}).encode()
        self._send(req, 200, body, {"Content-Type": "application/json"})

    def _resolve(self, req, repo_id: str, revision: str, name: str, head: bool) -> None:
        repo = self._repo_at(req, repo_id, revision, head)
        if repo is None:
            return
        if name not in repo["files"]:
            return self._error(req, 404, "EntryNotFound", head)
        true_data = repo["files"][name]
        data = self.corrupt.get((repo_id, name), true_data)
        lfs = name.endswith(self.LFS_SUFFIXES)
        etag = hashlib.sha256(true_data).hexdigest() if lfs else _git_blob_sha1(true_data)
        headers = {"X-Repo-Commit": repo["commit"], "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        status, start = 200, 0
        rng = re.fullmatch(r"bytes=(\d+)-", req.headers.get("Range", ""))
        if rng and not head:
            start, status = int(rng.group(1)), 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self.ranges.append((name, start))
        if not head:
            with self.lock:
                self.file_gets[(repo_id, name)] += 1
                cut = self.drop_once.pop((repo_id, name), None) if start == 0 else None
            if cut is not None:  # announce the whole file, send part of it, hang up
                req.send_response(200)
                for k, v in {**headers, "Content-Length": len(data)}.items():
                    req.send_header(k, str(v))
                req.end_headers()
                req.wfile.write(data[:cut])
                req.wfile.flush()
                req.close_connection = True
                return
        self._send(req, status, data[start:], headers, head)


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

SP1024_REPO = "willdepueoai/parameter-golf"  # the tool's default repository for sp1024
SP8192_REPO = "kevclark/parameter-golf"  # default for sp4096/sp8192; published here without a manifest
DS = "datasets/datasets/fineweb10B_sp1024"


def reference_manifest(files_train: int, files_val: int = 1) -> bytes:
    """The layout of the reference export's datasets/manifest.json (paths relative to datasets/)."""
    return json.dumps({
        "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                      "path": "datasets/fineweb10B_sp1024",
                      "stats": {"files_train": files_train, "files_val": files_val}}],
        "tokenizers": [{"name": "sp_bpe_1024", "kind": "sentencepiece_bpe", "vocab_size": 1024,
                        "model_path": "tokenizers/fineweb_1024_bpe.model",
                        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
    }, indent=2).encode()


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("payload")
    return {
        "val0": _shard_bytes(tmp, 3000, 0),
        **{f"train{i}": _shard_bytes(tmp, 2000 + 10 * i, i + 1) for i in range(4)},
        "model": b"\x0a\x0bsentencepiece model stand-in " * 40,
        "vocab": "".join(f"piece{i}\t-{i}\n" for i in range(50)).encode(),
    }


def sp1024_files(payload: dict[str, bytes], train: int = 3, manifest_train: int | None = None) -> dict[str, bytes]:
    files = {
        "README.md": b"# fake parameter-golf export\n",
        "datasets/manifest.json": reference_manifest(train if manifest_train is None else manifest_train),
        f"{DS}/fineweb_val_000000.bin": payload["val0"],
        "datasets/tokenizers/fineweb_1024_bpe.model": payload["model"],
        "datasets/tokenizers/fineweb_1024_bpe.vocab": payload["vocab"],
    }
    files.update({f"{DS}/fineweb_train_{i:06d}.bin": payload[f"train{i}"] for i in range(train)})
    return files


@pytest.fixture
def hub(payload):
    h = FakeHub()
    h.publish(SP1024_REPO, sp1024_files(payload))
    h.publish(SP8192_REPO, {
        "datasets/datasets/fineweb10B_sp8192/fineweb_val_000000.bin": payload["val0"],
        "datasets/datasets/fineweb10B_sp8192/fineweb_train_000000.bin": payload["train0"],
        "datasets/datasets/fineweb10B_sp8192/fineweb_train_000001.bin": payload["train1"],
        "datasets/tokenizers/fineweb_8192_bpe.model": payload["model"],
    })
    yield h
    h.close()


def run_tool(hub: FakeHub | None, tmp: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the downloader against the fake hub with a private HF_HOME and data dir tmp/data."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("HF_", "HUGGINGFACE", "MATCHED_FINEWEB", "PG_")) and "proxy" not in k.lower()}
    clean.update({"HF_HOME": str(tmp / "hf_home"), "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1",
                  "PG_RETRY_BASE_SECONDS": "0.01", "NO_PROXY": "*", "PYTHONUNBUFFERED": "1",
                  "HF_ENDPOINT": hub.endpoint if hub else "http://127.0.0.1:9"})
    clean.update(env or {})
    return subprocess.run([sys.executable, str(TOOL), "--data-dir", str(tmp / "data"), *args],
                          capture_output=True, text=True, env=clean, timeout=120)


def summary(out: str) -> dict[str, str]:
    """key:value tokens of the tool's `download:` summary lines on stdout."""
    return dict(tok.split(":", 1) for line in out.splitlines() if line.startswith("download: ")
                for tok in line.split()[1:] if ":" in tok)


def data_gets(hub: FakeHub) -> int:
    return sum(hub.file_gets.values())


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_full_download_second_run_transfers_nothing_damaged_files_are_fetched_again(hub, payload, tmp_path):
    r = run_tool(hub, tmp_path, "--variant", "sp1024", "--train-shards", "2")
    assert r.returncode == 0, r.stderr
    data = tmp_path / "data"
    ds = data / "datasets" / "fineweb10B_sp1024"
    assert (ds / "fineweb_val_000000.bin").read_bytes() == payload["val0"]
    assert (ds / "fineweb_train_000000.bin").read_bytes() == payload["train0"]
    assert (ds / "fineweb_train_000001.bin").read_bytes() == payload["train1"]
    assert not (ds / "fineweb_train_000002.bin").exists()  # only the requested prefix
    assert (data / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == payload["model"]
    assert (data / "tokenizers" / "fineweb_1024_bpe.vocab").read_bytes() == payload["vocab"]
    # Every file fetched exactly once (manifest, 3 shards, 2 tokenizer files), with the token.
    assert data_gets(hub) == 6 and set(hub.file_gets.values()) == {1}
    assert f"Bearer {TOKEN}" in hub.auth
    s = summary(r.stdout)
    assert s["files"] == "5" and s["fetched"] == "5" and s["val_shards"] == "1" and s["train_shards"] == "2"
    assert int(s["val_tokens"]) == 3000 and int(s["train_tokens"]) == 2000 + 2010
    assert s["commit"] == hub.repos[SP1024_REPO]["commit"]
    record = json.loads((ds / "download.json").read_text())
    assert record["repo_id"] == SP1024_REPO and record["train_shards"] == 2
    # The shards are what train_gpt.py reads.
    assert tg.list_shards(ds, "train") == [ds / "fineweb_train_000000.bin", ds / "fineweb_train_000001.bin"]

    before = data_gets(hub)
    r2 = run_tool(hub, tmp_path, "--variant", "sp1024", "--train-shards", "2")
    assert r2.returncode == 0, r2.stderr
    assert data_gets(hub) == before, "the second run fetched a file"
    assert summary(r2.stdout)["fetched"] == "0"

    shard = ds / "fineweb_train_000001.bin"
    shard.write_bytes(payload["train1"][: len(payload["train1"]) // 2])  # a half-copied file
    # Same size, wrong content, original mtime: only a re-hash (--verify) can see it.
    val = ds / "fineweb_val_000000.bin"
    st = val.stat()
    damaged = bytearray(payload["val0"])
    damaged[5000] ^= 0xFF
    val.write_bytes(bytes(damaged))
    os.utime(val, ns=(st.st_atime_ns, st.st_mtime_ns))

    def fetched_by(*args: str) -> set[str]:
        before = Counter(hub.file_gets)
        r = run_tool(hub, tmp_path, "--variant", "sp1024", "--train-shards", "2", *args)
        assert r.returncode == 0, r.stderr
        return {name for (_, name), n in hub.file_gets.items() if n > before[(SP1024_REPO, name)]}

    # A plain run sees the size; it trusts files it hashed before while size and mtime are unchanged.
    assert fetched_by() == {f"{DS}/fineweb_train_000001.bin"}
    assert shard.read_bytes() == payload["train1"] and val.read_bytes() == bytes(damaged)
    assert fetched_by("--verify") == {f"{DS}/fineweb_val_000000.bin"}
    assert val.read_bytes() == payload["val0"]


@pytest.mark.slow
def test_rate_limits_and_server_errors_are_retried(hub, payload, tmp_path):
    commit = hub.repos[SP1024_REPO]["commit"]
    listing = f"/api/datasets/{SP1024_REPO}/revision/main"
    shard0 = f"/datasets/{SP1024_REPO}/resolve/{commit}/{DS}/fineweb_train_000000.bin"
    shard1 = f"/datasets/{SP1024_REPO}/resolve/{commit}/{DS}/fineweb_train_000001.bin"
    hub.faults[("GET", listing)] = [429, 429]
    hub.faults[("HEAD", shard0)] = [429, 429]
    hub.faults[("GET", shard1)] = [503, 502]
    r = run_tool(hub, tmp_path, "--variant", "sp1024", "--train-shards", "2")
    assert r.returncode == 0, r.stderr
    assert hub.fault_hits[("GET", listing, 429)] == 2
    assert hub.fault_hits[("HEAD", shard0, 429)] == 2
    assert hub.fault_hits[("GET", shard1, 503)] == 1 and hub.fault_hits[("GET", shard1, 502)] == 1
    ds = tmp_path / "data" / "datasets" / "fineweb10B_sp1024"
    assert (ds / "fineweb_train_000001.bin").read_bytes() == payload["train1"]
    assert "HTTP 429; retry 1/" in r.stderr and "HTTP 503; retry 1/" in r.stderr


@pytest.mark.slow
def test_a_dropped_connection_is_resumed(hub, payload, tmp_path):
    # huggingface_hub keeps what it received in whole 10 MB chunks: drop the connection after 11 MB.
    big = _shard_bytes(tmp_path, 6_000_000, 7)  # 12 MB
    hub.publish(SP1024_REPO, {**sp1024_files(payload), f"{DS}/fineweb_val_000000.bin": big})
    name = f"{DS}/fineweb_val_000000.bin"
    hub.drop_once[(SP1024_REPO, name)] = 11_000_000
    r = run_tool(hub, tmp_path, "--variant", "sp1024", "--train-shards", "0")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin").read_bytes() == big
    assert [start > 0 for path, start in hub.ranges if path == name] == [True], r.stderr  # resumed, not restarted


@pytest.mark.slow
def test_hash_mismatch_is_a_clear_error_and_nothing_is_installed(hub, payload, tmp_path):
    bad = bytearray(payload["train1"])
    bad[-1] ^= 0x01  # same size: only the hash can tell
    hub.corrupt[(SP1024_REPO, f"{DS}/fineweb_train_000001.bin")] = bytes(bad)
    r = run_tool(hub, tmp_path, "--variant", "sp1024", "--train-shards", "2")
    assert r.returncode == 1
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "fineweb_train_000001.bin" in err[0] and "sha256" in err[0], r.stderr
    ds = tmp_path / "data" / "datasets" / "fineweb10B_sp1024"
    assert not (ds / "fineweb_train_000001.bin").exists()
    staging = tmp_path / "data" / "datasets" / ".hub" / SP1024_REPO.replace("/", "--")
    assert not (staging / DS / "fineweb_train_000001.bin").exists()  # the bad download was deleted
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_manifest_follows_the_repository_and_revision(hub, payload, tmp_path):
    assert run_tool(hub, tmp_path, "--variant", "sp1024", "--train-shards", "3").returncode == 0
    r = run_tool(hub, tmp_path, "--variant", "sp1024", "--train-shards", "4")
    assert r.returncode == 2 and "--train-shards=4" in r.stderr and "has 3 train shards" in r.stderr
    # A new commit adds a fourth shard: the cached manifest must not hide it (the reference downloader's
    # cached manifest.json did).
    hub.publish(SP1024_REPO, sp1024_files(payload, train=4))
    r = run_tool(hub, tmp_path, "--variant", "sp1024", "--train-shards", "4")
    assert r.returncode == 0, r.stderr
    assert hub.file_gets[(SP1024_REPO, "datasets/manifest.json")] == 2
    assert hub.file_gets[(SP1024_REPO, f"{DS}/fineweb_train_000003.bin")] == 1
    assert hub.file_gets[(SP1024_REPO, f"{DS}/fineweb_train_000000.bin")] == 1  # unchanged files stay
    # Another repository is asked for its own listing, never served the sp1024 manifest.
    r = run_tool(hub, tmp_path, "--variant", "sp1024", "--repo-id", SP8192_REPO, "--train-shards", "1")
    assert r.returncode == 2 and "not published in kevclark/parameter-golf" in r.stderr and "sp8192" in r.stderr


@pytest.mark.slow
def test_repository_listing_is_used_without_a_manifest(hub, payload, tmp_path):
    r = run_tool(hub, tmp_path, "--variant", "sp8192", "--train-shards", "1")  # default repo: kevclark
    assert r.returncode == 0, r.stderr
    data = tmp_path / "data"
    assert (data / "datasets" / "fineweb10B_sp8192" / "fineweb_train_000000.bin").read_bytes() == payload["train0"]
    assert not (data / "datasets" / "fineweb10B_sp8192" / "fineweb_train_000001.bin").exists()
    assert (data / "tokenizers" / "fineweb_8192_bpe.model").read_bytes() == payload["model"]
    assert "using the repository listing" in r.stderr


def test_missing_file_is_named(hub, payload, tmp_path):
    files = sp1024_files(payload, train=2, manifest_train=3)  # the manifest promises a third shard
    hub.publish(SP1024_REPO, files)
    r = run_tool(hub, tmp_path, "--variant", "sp1024", "--train-shards", "3")
    assert r.returncode == 1
    assert f"{DS}/fineweb_train_000002.bin: listed by datasets/manifest.json" in r.stderr
    assert data_gets(hub) == 1  # only the manifest: nothing is fetched before the plan checks out


@pytest.mark.parametrize("args, needle", [
    (["--variant", "sp2048"], "--variant=sp2048 is not a known variant"),
    (["--variant", "../x"], "--variant='../x' is not allowed"),
    (["--variant", "sp1024", "--train-shards", "-1"], "--train-shards=-1 is not allowed"),
    (["--variant", "sp1024", "--repo-id", "nobody"], "--repo-id='nobody' is not allowed: expected OWNER/NAME"),
])
def test_bad_input_fails_before_any_request(args, needle, tmp_path):
    r = run_tool(None, tmp_path, *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and needle in r.stderr, r.stderr


@pytest.mark.slow
def test_unknown_repository_revision_and_variant_on_the_hub(hub, tmp_path):
    r = run_tool(hub, tmp_path, "--variant", "sp2048", "--repo-id", SP1024_REPO)
    assert r.returncode == 2 and "--variant=sp2048 is not published" in r.stderr and "sp1024" in r.stderr
    r = run_tool(hub, tmp_path, "--variant", "sp1024", "--repo-id", "nobody/nothing")
    assert r.returncode == 2 and "--repo-id=nobody/nothing is not allowed" in r.stderr
    r = run_tool(hub, tmp_path, "--variant", "sp1024", "--revision", "v9")
    assert r.returncode == 2 and "--revision=v9" in r.stderr
    assert data_gets(hub) == 1  # the sp1024 manifest for the first call; no data file


def load_tool():
    """Import the downloader as a module (data/ is not a package)."""
    spec = importlib.util.spec_from_file_location("cached_challenge_fineweb", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is created
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    return mod


def test_retry_policy_backs_off_exponentially_and_stops():
    mod = load_tool()

    class Response:
        def __init__(self, status, headers=None):
            self.status_code, self.headers = status, headers or {}

    class HTTPFailure(Exception):
        def __init__(self, status, headers=None):
            super().__init__(f"HTTP {status}")
            self.response = Response(status, headers)

    sleeps: list[float] = []
    calls = iter([HTTPFailure(429), HTTPFailure(500), ConnectionResetError("reset"), "ok"])

    def flaky():
        item = next(calls)
        if isinstance(item, Exception):
            raise item
        return item

    assert mod.with_retries("x", flaky, retries=5, base_seconds=1.0, sleep=sleeps.append) == "ok"
    assert len(sleeps) == 3 and all(b <= s <= 1.25 * b for s, b in zip(sleeps, [1.0, 2.0, 4.0])), sleeps

    sleeps.clear()
    with pytest.raises(HTTPFailure):  # not transient: no retry
        mod.with_retries("x", lambda: (_ for _ in ()).throw(HTTPFailure(404)), 5, 1.0, sleeps.append)
    assert sleeps == []
    with pytest.raises(HTTPFailure):  # gives up after `retries`, honouring Retry-After
        mod.with_retries("x", lambda: (_ for _ in ()).throw(HTTPFailure(503, {"Retry-After": "7"})), 2, 0.1,
                         sleeps.append)
    assert sleeps == [7.0, 7.0]


def test_an_unresolvable_hub_is_reported_offline_after_one_try(tmp_path):
    # `.invalid` never resolves (RFC 2606), so this needs no network and fails the same way offline.
    r = run_tool(None, tmp_path, "--variant", "sp1024", env={"HF_ENDPOINT": "http://nonexistent.invalid"})
    assert r.returncode == 1, r.stderr
    assert "retry" not in r.stderr, r.stderr  # one try, no backoff
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: listing willdepueoai/parameter-golf@main: cannot resolve the host name "
                          "nonexistent.invalid: this machine appears to be offline"), r.stderr
    assert "HF_ENDPOINT" in err and "Traceback" not in r.stderr


def test_name_resolution_failures_are_not_retried_but_other_connection_errors_are():
    mod = load_tool()

    class ConnectError(Exception):  # httpx.ConnectError and huggingface_hub's wrappers chain the gaierror
        pass

    def dns_failure():
        try:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        except OSError as exc:
            raise ConnectError("[Errno -2] Name or service not known") from exc

    sleeps: list[float] = []
    calls = []

    def offline():
        calls.append(1)
        dns_failure()

    with pytest.raises(mod.DownloadError, match="cannot resolve the host name .*appears to be offline"):
        mod.with_retries("x", offline, retries=6, base_seconds=1.0, sleep=sleeps.append)
    assert len(calls) == 1 and sleeps == []
    # Wrapped without its cause (a library that re-raises with the text only): the text is recognised.
    with pytest.raises(mod.DownloadError):
        mod.with_retries("x", lambda: (_ for _ in ()).throw(ConnectError("Temporary failure in name resolution")),
                         6, 1.0, sleeps.append)
    assert sleeps == []
    # A refused or reset connection is still transient: retried with backoff, then raised as is.
    with pytest.raises(ConnectError):
        mod.with_retries("x", lambda: (_ for _ in ()).throw(ConnectError("[Errno 111] Connection refused")),
                         2, 1.0, sleeps.append)
    assert len(sleeps) == 2


# ---------------------------------------------------------------------------------------------
# CaseOps (PR #1729): the published export with its validation byte sidecars
# ---------------------------------------------------------------------------------------------

CASEOPS_REPO = "romeerp/parameter-golf-caseops-v1"  # the tool's default repository for the CaseOps variant
CASEOPS_VARIANT = "sp8192_lossless_caps_caseops_v1_reserved"
CASEOPS_DS = f"datasets/datasets/fineweb10B_{CASEOPS_VARIANT}"
CASEOPS_TOKENIZER = "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved"


def caseops_manifest(files_train: int) -> bytes:
    """The shape of the reference exporter's manifest (2026-04-18 record's download_hf_docs_and_tokenize.py):
    the dataset lists val_bytes_glob, the tokenizer its text_transform; paths relative to datasets/."""
    ds = f"datasets/fineweb10B_{CASEOPS_VARIANT}"
    return json.dumps({
        "datasets": [{"name": f"fineweb10B_{CASEOPS_VARIANT}",
                      "tokenizer_name": "sp_bpe_8192_lossless_caps_caseops_v1_reserved", "path": ds,
                      "train_glob": f"{ds}/fineweb_train_*.bin", "val_glob": f"{ds}/fineweb_val_*.bin",
                      "val_bytes_glob": f"{ds}/fineweb_val_bytes_*.bin", "vocab_size": 8192,
                      "stats": {"files_train": files_train, "files_val": 1}}],
        "tokenizers": [{"name": "sp_bpe_8192_lossless_caps_caseops_v1_reserved", "kind": "sentencepiece_bpe",
                        "vocab_size": 8192, "text_transform": "lossless_caps_caseops_v1",
                        "model_path": f"{CASEOPS_TOKENIZER}.model", "vocab_path": f"{CASEOPS_TOKENIZER}.vocab"}],
    }, indent=2).encode()


@pytest.fixture(scope="module")
def caseops_payload(tmp_path_factory) -> dict[str, bytes]:
    """A validation shard and its sidecar: 0 at every BOS, 1-6 original bytes per other token."""
    tmp = tmp_path_factory.mktemp("caseops")
    rng = np.random.default_rng(11)
    tokens = rng.integers(8, 8192, 3000)
    tokens[::97] = tg.BOS_ID
    counts = np.where(tokens == tg.BOS_ID, 0, rng.integers(1, 7, tokens.size))
    write_shard(tmp / "val.bin", tokens)
    write_shard(tmp / "val_bytes.bin", counts)
    return {"val0": (tmp / "val.bin").read_bytes(), "bytes0": (tmp / "val_bytes.bin").read_bytes(),
            "original_bytes": str(int(counts.sum()))}


def caseops_files(payload, caseops_payload, manifest: bool = True, sidecar: bytes | None = None) -> dict[str, bytes]:
    files = {
        f"{CASEOPS_DS}/fineweb_val_000000.bin": caseops_payload["val0"],
        f"{CASEOPS_DS}/fineweb_val_bytes_000000.bin": caseops_payload["bytes0"] if sidecar is None else sidecar,
        f"{CASEOPS_DS}/fineweb_train_000000.bin": payload["train0"],
        f"{CASEOPS_DS}/fineweb_train_000001.bin": payload["train1"],
        f"datasets/{CASEOPS_TOKENIZER}.model": payload["model"],
        f"datasets/{CASEOPS_TOKENIZER}.vocab": payload["vocab"],
    }
    if manifest:
        files["datasets/manifest.json"] = caseops_manifest(2)
    return files


@pytest.mark.slow
def test_caseops_dataset_comes_with_its_byte_sidecars(hub, payload, caseops_payload, tmp_path):
    hub.publish(CASEOPS_REPO, caseops_files(payload, caseops_payload))
    r = run_tool(hub, tmp_path, "--variant", CASEOPS_VARIANT, "--train-shards", "1")
    assert r.returncode == 0, r.stderr
    assert f"from {CASEOPS_REPO} (default for {CASEOPS_VARIANT})" in r.stderr
    data = tmp_path / "data"
    ds = data / "datasets" / f"fineweb10B_{CASEOPS_VARIANT}"
    assert (ds / "fineweb_val_bytes_000000.bin").read_bytes() == caseops_payload["bytes0"]
    assert (ds / "fineweb_val_000000.bin").read_bytes() == caseops_payload["val0"]
    assert (data / f"{CASEOPS_TOKENIZER}.model").read_bytes() == payload["model"]
    assert (data / f"{CASEOPS_TOKENIZER}.vocab").read_bytes() == payload["vocab"]
    assert not (ds / "fineweb_train_000001.bin").exists()
    s = summary(r.stdout)
    assert s["files"] == "5" and s["val_byte_sidecars"] == "1" and s["val_original_bytes"] == caseops_payload["original_bytes"]
    record = json.loads((ds / "download.json").read_text())
    assert record["repo_id"] == CASEOPS_REPO and record["val_original_bytes"] == int(caseops_payload["original_bytes"])
    sidecar_entry = record["files"][f"datasets/fineweb10B_{CASEOPS_VARIANT}/fineweb_val_bytes_000000.bin"]
    assert sidecar_entry["sha256"] == hashlib.sha256(caseops_payload["bytes0"]).hexdigest()
    assert [p.name for p in tg.list_shards(ds, "val")] == ["fineweb_val_000000.bin"]  # sidecars are not tokens

    # Checked like every other file: a second run fetches nothing, a truncated sidecar is fetched again.
    before = data_gets(hub)
    assert run_tool(hub, tmp_path, "--variant", CASEOPS_VARIANT, "--train-shards", "1").returncode == 0
    assert data_gets(hub) == before
    (ds / "fineweb_val_bytes_000000.bin").write_bytes(caseops_payload["bytes0"][:2000])
    r = run_tool(hub, tmp_path, "--variant", CASEOPS_VARIANT, "--train-shards", "1")
    assert r.returncode == 0, r.stderr
    assert hub.file_gets[(CASEOPS_REPO, f"{CASEOPS_DS}/fineweb_val_bytes_000000.bin")] == 2
    assert (ds / "fineweb_val_bytes_000000.bin").read_bytes() == caseops_payload["bytes0"]


@pytest.mark.slow
def test_caseops_sidecar_missing_from_the_repository_is_named(hub, payload, caseops_payload, tmp_path):
    files = caseops_files(payload, caseops_payload)
    del files[f"{CASEOPS_DS}/fineweb_val_bytes_000000.bin"]
    hub.publish(CASEOPS_REPO, files)
    r = run_tool(hub, tmp_path, "--variant", CASEOPS_VARIANT, "--train-shards", "1")
    assert r.returncode == 1
    assert f"{CASEOPS_DS}/fineweb_val_bytes_000000.bin: listed by datasets/manifest.json" in r.stderr
    # Without a manifest (the listing is read), a CaseOps variant without sidecars is refused too.
    hub.publish(CASEOPS_REPO, {k: v for k, v in caseops_files(payload, caseops_payload, manifest=False).items()
                               if "val_bytes" not in k})
    r = run_tool(hub, tmp_path, "--variant", CASEOPS_VARIANT, "--train-shards", "1")
    assert r.returncode == 1 and "the byte sidecars of" in r.stderr and "missing: fineweb_val_bytes_000000.bin" in r.stderr
    assert data_gets(hub) == 1  # the manifest of the first call: no shard fetched before the plan checks out


@pytest.mark.parametrize("damage, needle", [
    ("short", "byte counts for the 3000 tokens of fineweb_val_000000.bin"),
    ("bos", "a BOS token of fineweb_val_000000.bin is given"),
])
@pytest.mark.slow
def test_a_sidecar_that_does_not_fit_its_shard_is_refused(hub, payload, caseops_payload, tmp_path, damage, needle):
    counts = np.frombuffer(caseops_payload["bytes0"][tg.SHARD_HEADER_BYTES:], dtype="<u2").copy()
    counts = counts[:-5] if damage == "short" else np.concatenate([[3], counts[1:]])
    write_shard(tmp_path / "bad.bin", counts)
    hub.publish(CASEOPS_REPO, caseops_files(payload, caseops_payload, manifest=False,
                                            sidecar=(tmp_path / "bad.bin").read_bytes()))
    r = run_tool(hub, tmp_path, "--variant", CASEOPS_VARIANT, "--train-shards", "0")
    assert r.returncode == 1 and needle in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr
