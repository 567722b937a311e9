"""Training-loader throughput benchmark (a script, not a test).

Run:
    python bench/loader.py [--tokens 20000000] [--batch-seqs 48] [--seq-len 2048] [--steps N]
                           [--contend N] [--json]

Writes one synthetic shard (random uint16 ids < --vocab, seeded) to a temporary folder with
`pgolf.shards.write_shard`, then measures over the same random sequence starts (first batch checked equal):

  * TrainLoader          train_gpt.TrainLoader on CPU (accum 1, world 1): a background thread gathers
                         windows through a strided view of the shard into a ring buffer; next_batch()
                         hands a slot over with ndarray.copy();
  * per-sequence loop    the reference records' style: per sequence, slice the memmap and
                         torch.from_numpy(window.astype(np.int64)); then torch.stack.

Throughput is input tokens (batch_seqs * seq_len per batch) per second of wall time in next_batch()
after --warmup batches; each is measured --repeats times, median reported (min..max shown). A short
profile of TrainLoader's per-micro-batch steps follows. Target: >= 30 M tokens/s for TrainLoader.

--contend N runs N busy-looping Python processes during the measurements, to see the loader on a
loaded machine (e.g. a CPU training step keeping the cores busy).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402
from pgolf.shards import write_shard  # noqa: E402

TARGET_TOKENS_PER_S = 30e6


def reference_batch(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference records' style: one memmap slice, int64 cast and tensor per sequence, then stack."""
    window = torch.stack([torch.from_numpy(tokens[s: s + seq_len + 1].astype(np.int64)) for s in starts])
    return window[:, :-1], window[:, 1:]


def measure(next_batch: Callable[[], tuple], shape: tuple, warmup: int, steps: int,
            wait: Callable[[], float] = lambda: 0.0) -> dict:
    """Wall time of `steps` next_batch() calls after `warmup` untimed ones (and time blocked, if known)."""
    for _ in range(warmup):
        next_batch()
    wait0, t0 = wait(), time.perf_counter()
    for _ in range(steps):
        x, y = next_batch()[:2]
    elapsed = time.perf_counter() - t0
    assert x.shape == shape and torch.equal(y[:, :-1], x[:, 1:])
    return {"seconds": elapsed, "wait_seconds": wait() - wait0}


def stage_profile(tokens: np.ndarray, starts: np.ndarray, B: int, T: int, vocab: int, reps: int = 30) -> dict:
    """Median ms of each step TrainLoader takes per micro-batch, on the main thread without contention:
    the producer's gather (a fresh batch of starts each time) and range check, the consumer's hand-off."""
    windows = np.lib.stride_tricks.sliding_window_view(tokens, T + 1)
    batches, rows = np.resize(starts, (reps + 1, B)), np.arange(B)
    out, block = np.empty((B, T + 1), dtype=np.int64), windows[batches[0]]
    q: queue.Queue = queue.Queue(maxsize=4)
    stages = {
        "strided-view gather + cast into ring slot": lambda i: out.__setitem__(rows, windows[batches[i]]),
        "check_token_range": lambda i: tg.check_token_range(block, vocab, "bench"),
        "ndarray.copy() hand-off of the slot": lambda i: out.copy(),
        "queue put+get": lambda i: (q.put(i), q.get()),
    }
    profile = {}
    for name, fn in stages.items():
        samples = []
        for i in range(reps + 1):  # call 0 is a warm-up
            t0 = time.perf_counter()
            fn(i)
            samples.append(time.perf_counter() - t0)
        profile[name] = statistics.median(samples[1:]) * 1e3
    return profile


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=20_000_000, help="tokens in the synthetic shard")
    ap.add_argument("--batch-seqs", type=int, default=48, help="sequences per micro-batch")
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (windows are seq_len+1)")
    ap.add_argument("--steps", type=int, default=150, help="timed batches per measurement")
    ap.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per loader (median reported)")
    ap.add_argument("--vocab", type=int, default=8192, help="token ids are drawn from [0, vocab)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--contend", type=int, default=0, help="busy-looping processes to run meanwhile")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    B, T = args.batch_seqs, args.seq_len
    tokens_per_batch = B * T

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        shard = Path(tmp) / "fineweb_train_000000.bin"
        rng = np.random.default_rng(args.seed)
        t0 = time.perf_counter()
        write_shard(shard, rng.integers(0, args.vocab, size=args.tokens, dtype=np.uint16))
        write_s = time.perf_counter() - t0
        mm = tg.load_shard(shard)

        def make() -> tg.TrainLoader:
            return tg.TrainLoader([shard], T, B, 1, args.seed, args.vocab, tg.DistInfo(0, 1, torch.device("cpu")))

        # The loader's first-epoch starts, wrapped if --steps exceeds it; its first batch must match.
        probe = make()
        _, starts = probe._epoch_slots(0)
        x, y, _ = probe.next_batch()
        probe.close()
        rx, ry = reference_batch(mm, starts[:B], T)
        assert torch.equal(x, rx) and torch.equal(y, ry), "loader and reference disagree"
        starts = np.resize(starts, max((args.warmup + args.steps) * B, starts.size))

        runs: dict[str, list[dict]] = {"TrainLoader": [], "per-sequence loop": []}
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.contend)]
        try:
            for _ in range(args.repeats):
                loader = make()
                try:
                    runs["TrainLoader"].append(measure(loader.next_batch, (B, T), args.warmup, args.steps,
                                                       lambda: loader.wait_seconds))
                finally:
                    loader.close()
                batches = (reference_batch(mm, starts[i: i + B], T) for i in range(0, starts.size, B))  # lazy
                runs["per-sequence loop"].append(measure(batches.__next__, (B, T), args.warmup, args.steps))
        finally:
            for hog in hogs:
                hog.terminate()
                hog.wait()
        profile = stage_profile(mm, starts, B, T, args.vocab)
        del mm

    results = {}
    for name, rs in runs.items():
        rates = sorted(args.steps * tokens_per_batch / r["seconds"] for r in rs)
        med = statistics.median(rates)
        results[name] = {"tokens_per_s": med, "tokens_per_s_min": rates[0], "tokens_per_s_max": rates[-1],
                         "ms_per_batch": tokens_per_batch / med * 1e3,
                         "wait_ms_per_batch": statistics.median(r["wait_seconds"] for r in rs) / args.steps * 1e3}
    for r in results.values():
        r["speedup"] = r["tokens_per_s"] / results["per-sequence loop"]["tokens_per_s"]
    tl = results["TrainLoader"]["tokens_per_s"]
    report = {
        "config": {**vars(args), "tokens_per_batch": tokens_per_batch, "cpu_count": os.cpu_count(),
                   "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "numpy": np.__version__},
        "shard_write_seconds": write_s, "results": results, "stage_profile_ms": profile,
        "target_tokens_per_s": TARGET_TOKENS_PER_S, "target_met": tl >= TARGET_TOKENS_PER_S,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0

    print(f"shard: {args.tokens:,} tokens (uint16 < {args.vocab}), written in {write_s:.2f}s; "
          f"batch {B}x{T} = {tokens_per_batch:,} tokens; {args.steps} timed batches after {args.warmup} warm-up, "
          f"median of {args.repeats}; {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
          + (f"; {args.contend} busy processes running" if args.contend else ""))
    print(f"{'loader':<22} {'tokens/s':>10} {'(min..max)':>17} {'ms/batch':>9} {'wait ms':>8} {'speedup':>8}")
    for name, r in results.items():
        span = f"{r['tokens_per_s_min'] / 1e6:.1f}..{r['tokens_per_s_max'] / 1e6:.1f}M"
        print(f"{name:<22} {r['tokens_per_s'] / 1e6:>9.1f}M {span:>17} {r['ms_per_batch']:>9.2f} "
              f"{r['wait_ms_per_batch']:>8.2f} {r['speedup']:>7.2f}x")
    print(f"target >= {TARGET_TOKENS_PER_S / 1e6:.0f}M tokens/s for TrainLoader: "
          f"{'met' if report['target_met'] else 'MISSED'} ({tl / 1e6:.1f}M)")
    print("\nTrainLoader stages, one micro-batch (median ms, main thread):")
    for k, v in profile.items():
        print(f"  {k:<44} {v:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
