"""PRESET=record's training schedule and training loader against the leaderboard top's (PR #1855), on the CPU,
with the top's own script (../shared/anchors/top1855/train_gpt.py, the `top` fixture of conftest.py).

A. The schedule. The top computes it inside `train_model` (closures, not importable), so the test takes that
   function's text with `ast` and runs it: every statement from `max_wallclock_ms = ...` to the end of its
   `while True:` training loop (its `training_frac`, `lr_mul` and `step_fn` with the Muon momentum warm-up,
   the looping switch, the wallclock stop), against a fake clock that advances by a given list of step
   times. Ours runs `train()` itself (schedule_step, lr_scale, muon_momentum_at, looping_due,
   Optimizers.set_schedule, the stop rule) on the same clock and step times. Both sides record, at every
   optimizer step, the LR multiplier, the Muon momentum and whether looping is on.
   Configuration: the top's Hyperparameters defaults plus its README's reproduce command (ITERATIONS=20000
   MAX_WALLCLOCK_SECONDS=600 WARMDOWN_FRAC=0.85 MIN_LR=0.1 GPTQ_RESERVE_SECONDS=0.5 VAL_LOSS_EVERY=0 ...);
   ours PRESET=record with WARMDOWN_FRAC=0.85 MIN_LR=0.1 set explicitly and GPTQ_RESERVE_SECONDS=0.5 (ours
   defaults to a measured reserve: a deliberate deviation). Momentum warm-up, ENABLE_LOOPING_AT, ITERATIONS
   and the cap are the record's own defaults, so a change to them fails here.

B. The training loader. The top's `DocumentPackingLoader` and ours (`TrainLoader`, packed=True as
   DOC_PACKED_LOADER=1 in PRESET=record), per rank, at WORLD_SIZE 1, 2 and 8, on three small synthetic shards
   in the challenge format (pgolf.shards.write_shard), the record's per-rank shape scaled down: TRAIN_SEQ_LEN 64,
   4 sequences per rank and micro-batch, GRAD_ACCUM_STEPS 8 // WORLD_SIZE (both scripts), 20 steps.
   They differ: the equality checks (tokens; cu_seqlens where the tokens agree) are xfail(strict=True) with
   the reason. Passing tests pin down how: each loader equals a rule stated here (which tokens each rank and
   micro-batch gets, and where its cu_seqlens cut) at every step, rank and micro-batch, and each rule fails
   for the other loader; ours reads the same tokens per step at every world size, the top's does not after a
   shard end; neither depends on SEED.

Patches to the top's script (nothing else of it is changed or stubbed):
  * `top.BOS_ID` = 1 (tests/top_harness.py), as DocumentPackingLoader._init_shard sets it on the first shard.
  * A (its train_model, run from its text): the statement `if h.warmup_steps > 0: ...` is left out (the
    untimed compile warm-up; it restores the model and optimizer state and starts a new loader, so it does
    not touch the timed schedule). The names the loop reads are stand-ins:
      - `h`: its Hyperparameters + the README overrides, as rank 0 of 8 (world_size 8, grad_accum_steps 1,
        distributed False, so its all-reduce of the stop flag, the identity for equal step times, is skipped);
      - `time.perf_counter`: the fake clock;
      - `torch`: the real module except `torch.cuda.synchronize` (a no-op) and `torch.autocast` (a null
        context): no CUDA here;
      - `base_model` and `model`: a one-parameter module with `looping_active`;
      - `optimizers`: four optimizers' param_groups with base_lr 1.0, so group["lr"] is the LR multiplier;
        the Muon group starts at momentum=h.muon_momentum as its Muon(...) does; `step()` records the
        groups and advances the clock;
      - `train_loader`, `eval_val`, `log` (recorded), `device`, `val_data`, `compiled_forward_logits`, `dist`.
    Its `step_fn`, `lr_mul`, `training_frac`, looping switch, EMA update and stop rule run as written.
  * B: `pin_memory` is a no-op (torch.empty(pin_memory=True) through a proxy of `top.torch`, and
    Tensor.pin_memory): a CPU-only torch has no pinned allocator. Each loader is built per rank from a
    namespace with rank, world_size, train_seq_len, train_files (its constructor reads nothing else);
    no torch.distributed is needed by either loader.
Ours is patched only in A: `tg.time` is the fake clock, and the model, optimizer and loader handed to
`train()` are stand-ins around our real `Optimizers.set_schedule`.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import tg
from pgolf.shards import write_shard
from top_harness import BOS, SKIP_WITHOUT_TOP, top_hparams

pytestmark = SKIP_WITHOUT_TOP

CPU = torch.device("cpu")

# ---------------------------------------------------------------------------------------------------------------
# A. The schedule
# ---------------------------------------------------------------------------------------------------------------

# The top's reproduce command (its README), the knobs its training loop reads.
TOP_README = dict(iterations=20000, max_wallclock_seconds=600.0, warmdown_frac=0.85, min_lr=0.1, matrix_lr=0.026,
                  warmup_steps=20, gptq_reserve_seconds=0.5, val_loss_every=0, grad_clip_norm=0.3)
OURS_ENV = {"PRESET": "record", "WARMDOWN_FRAC": "0.85", "MIN_LR": "0.1", "GPTQ_RESERVE_SECONDS": "0.5",
            "WORLD_SIZE": "8"}  # rank 0 of the record's 8 ranks: one micro-batch per step (no process group here)
# LR multipliers are compared to 1e-12: the two fracs are one division apart (ms / 599500 vs s / 599.5) on the
# same exact elapsed time (the step times are multiples of 2**-20 s, so their sums are exact); the measured
# difference is 0 at every step. Momentum and looping are compared exactly.
LR_ATOL = 1e-12


def step_seconds(n: int = 6000) -> list[float]:
    """Step times like the top's seed-42 log (train_seed42.log: 8.22M tok/s = 95.7 ms/step before looping,
    which turned on at step 2178; 4945 steps in 599.6 s, so ~141 ms/step after), jittered, with a slow first
    step and a hiccup every 250 steps. Rounded to multiples of 2**-20 s so every sum of them is exact."""
    rng = np.random.default_rng(1855)
    t = np.where(np.arange(n) < 2178, 0.0957, 0.1409) + rng.normal(0.0, 0.0008, n)
    t[::250] += 0.03
    t[0] = 0.45
    return [round(float(x) * 2**20) / 2**20 for x in t]


class FakeClock:
    """time.perf_counter for both loops: advanced only by the optimizer steps (and nothing else takes time)."""

    def __init__(self):
        self.now = 1024.0

    def perf_counter(self) -> float:
        return self.now


class StepRecorder:
    """At each optimizer step: (LR multiplier of every group, Muon momentum, looping); then the step's time
    passes on the clock."""

    def __init__(self, clock: FakeClock, times: list[float]):
        self.clock, self.times, self.rows = clock, times, []

    def record(self, lrs: list[float], momentum: float, looping: bool) -> None:
        self.rows.append((lrs, momentum, bool(looping)))
        self.clock.now += self.times[len(self.rows) - 1]


class OneParam(torch.nn.Module):
    """Model stand-in: one parameter, so a loss can be backpropagated, and the looping flags of both models."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.looping_active = False  # the top's
        self.looping = False  # ours
        self.encoder_indices, self.decoder_indices = [0], [1]

    def forward(self, x, y, cu_seqlens=None, max_seqlen=None):
        return self.w * 0.0 + 1.0

    def set_looping(self, on: bool) -> None:
        self.looping = on

    def layout_summary(self) -> str:
        return ""


class TorchOnCPU:
    """The top's `torch` inside its training loop: the real module, less the CUDA-only calls."""

    cuda = SimpleNamespace(synchronize=lambda *a, **k: None)

    @staticmethod
    def autocast(*args, **kwargs):
        return contextlib.nullcontext()

    def __getattr__(self, name):
        return getattr(torch, name)


def top_loop_code(top):
    """The top's train_model from `max_wallclock_ms = ...` to the end of its `while True:` loop, less the
    `if h.warmup_steps > 0:` warm-up, compiled with its own file name and line numbers."""
    fn = ast.parse(textwrap.dedent(inspect.getsource(top.train_model))).body[0]
    ast.increment_lineno(fn, top.train_model.__code__.co_firstlineno - 1)
    body = fn.body
    first = next(i for i, s in enumerate(body) if isinstance(s, ast.Assign)
                 and [ast.unparse(t) for t in s.targets] == ["max_wallclock_ms"])
    loop = next(i for i, s in enumerate(body) if isinstance(s, ast.While))
    kept = [s for s in body[first: loop + 1]
            if not (isinstance(s, ast.If) and ast.unparse(s.test) == "h.warmup_steps > 0")]
    assert len(kept) == loop + 1 - first - 1, "the warm-up block was not found where expected"
    names = {s.name for s in kept if isinstance(s, ast.FunctionDef)}
    assert {"training_frac", "lr_mul", "step_fn"} <= names
    return compile(ast.Module(body=kept, type_ignores=[]), top.__file__, "exec")


def top_h(top, **overrides) -> SimpleNamespace:
    h = top_hparams(top, **TOP_README)  # its class defaults, the README's overrides
    # rank 0 of the 8xH100 run (8 // 8 = 1 micro-batch); not `distributed`: its all-reduce of the stop flag is the
    # identity when every rank has the same times
    h.distributed, h.rank, h.world_size, h.grad_accum_steps = False, 0, 8, 1
    for k, v in overrides.items():
        setattr(h, k, v)
    return h


def run_top_schedule(top, times: list[float], **overrides) -> dict:
    clock = FakeClock()
    rec = StepRecorder(clock, times)
    model = OneParam()
    h = top_h(top, **overrides)

    class TopOptimizers:  # the top's Optimizers as step_fn uses it: iterable, optimizer_muon, step()
        def __init__(self):
            muon_group = {"base_lr": 1.0, "lr": 1.0, "momentum": h.muon_momentum}
            self.optimizer_muon = SimpleNamespace(param_groups=[muon_group])
            self.others = [SimpleNamespace(param_groups=[{"base_lr": 1.0, "lr": 1.0}]) for _ in range(3)]

        def __iter__(self):
            return iter([*self.others[:2], self.optimizer_muon, self.others[2]])

        def step(self, distributed=False):
            lrs = [g["lr"] for opt in self for g in opt.param_groups]
            rec.record(lrs, self.optimizer_muon.param_groups[0]["momentum"], model.looping_active)

        def zero_grad_all(self):
            model.zero_grad(set_to_none=True)

    batch = (torch.zeros(1, 8, dtype=torch.int64),) * 2 + (torch.tensor([0, 8], dtype=torch.int32), 8)
    logs: list[str] = []
    ns = {"__builtins__": __builtins__, "h": h, "device": CPU, "val_data": None, "base_model": model, "model": model,
          "compiled_forward_logits": None, "optimizers": TopOptimizers(), "log": logs.append, "dist": None,
          "train_loader": SimpleNamespace(next_batch=lambda *a: batch), "eval_val": lambda *a: (0.0, 0.0),
          "time": clock, "torch": TorchOnCPU()}
    exec(top_loop_code(top), ns)
    return {"rows": rec.rows, "steps": ns["step"], "train_s": (clock.now - 1024.0), "logs": logs, "ns": ns,
            "cap_s": ns["max_wallclock_ms"] / 1e3}


def ours_hparams(**env) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env({**OURS_ENV, **env})


def run_our_schedule(times: list[float], **env) -> dict:
    h = ours_hparams(**env)
    clock = FakeClock()
    rec = StepRecorder(clock, times)
    model = OneParam()

    class OurOptimizers:  # what train() and train_step() call; the schedule is our real Optimizers.set_schedule
        set_schedule = tg.Optimizers.set_schedule

        def __init__(self):
            self.h = h
            self.base_lr = dict.fromkeys(tg.PARAM_GROUPS, 1.0)
            self.muon = SimpleNamespace(param_groups=[{"lr": 1.0, "momentum": h.muon_momentum}])
            self.adam = SimpleNamespace(param_groups=[{"lr": 1.0, "name": g} for g in ("embed", "head", "scalar")])

        def step(self, timer=None):
            lrs = [g["lr"] for g in self.adam.param_groups + self.muon.param_groups]
            rec.record(lrs, self.muon.param_groups[0]["momentum"], model.looping)

        def zero_grad(self):
            model.zero_grad(set_to_none=True)

    batch = (torch.zeros(1, 8, dtype=torch.int64),) * 2 + (torch.tensor([0, 8], dtype=torch.int32),)
    loader = SimpleNamespace(next_batch=lambda: batch, close=lambda: None, wait_seconds=0.0)
    d = tg.DistInfo(0, 8, CPU)  # all_reduce_ is the identity without a process group
    graphs = tg.Graphs(model, None, model)
    logs: list[str] = []
    reserve = tg.gptq_reserve(h, d, graphs, lambda: loader, logs.append)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "time", clock)  # train() and its StepTimer read the fake clock
        result = tg.train(h, d, graphs, OurOptimizers(), lambda: loader, lambda: None, reserve, logs.append)
    return {"rows": rec.rows, "steps": result.steps, "train_s": result.train_time_ms / 1e3, "logs": logs,
            "stopped_by": result.stopped_by, "cap_s": h.max_wallclock_seconds - reserve}


def schedule_differences(top_run: dict, ours_run: dict) -> dict[str, list[int]]:
    """Steps (of those both ran) where the LR multiplier, the Muon momentum or the looping state differ."""
    out: dict[str, list[int]] = {"lr": [], "momentum": [], "looping": []}
    for step, ((tl, tm, tloop), (ol, om, oloop)) in enumerate(zip(top_run["rows"], ours_run["rows"])):
        if len(set(tl)) != 1 or len(set(ol)) != 1 or abs(tl[0] - ol[0]) > LR_ATOL:
            out["lr"].append(step)
        if tm != om:
            out["momentum"].append(step)
        if tloop != oloop:
            out["looping"].append(step)
    return out


def top_lr_mul(top):
    """The top's `lr_mul` closure, from train_model's text (it reads only `h`)."""
    fn = ast.parse(textwrap.dedent(inspect.getsource(top.train_model))).body[0]
    ast.increment_lineno(fn, top.train_model.__code__.co_firstlineno - 1)
    [lr_mul] = [s for s in fn.body if isinstance(s, ast.FunctionDef) and s.name == "lr_mul"]
    ns = {"h": top_h(top)}
    exec(compile(ast.Module(body=[lr_mul], type_ignores=[]), top.__file__, "exec"), ns)
    return ns["lr_mul"]


@pytest.fixture(scope="module")
def times() -> list[float]:
    return step_seconds()


@pytest.fixture(scope="module")
def top_schedule(top, times) -> dict:
    return run_top_schedule(top, times)


def test_the_schedule_knobs_are_the_tops(top):
    """The values the schedule reads: the top's class defaults + README against PRESET=record."""
    t, o = top_h(top), ours_hparams()
    assert (o.iterations, o.max_wallclock_seconds, o.warmdown_frac, o.min_lr, o.warmdown_iters) == \
           (t.iterations, t.max_wallclock_seconds, t.warmdown_frac, t.min_lr, 0)
    assert (o.muon_momentum_warmup_start, o.muon_momentum, o.muon_momentum_warmup_steps) == \
           (t.muon_momentum_warmup_start, t.muon_momentum, t.muon_momentum_warmup_steps) == (0.92, 0.97, 1500)
    assert (o.enable_looping_at, o.looping_start_step, o.num_loops) == \
           (t.enable_looping_at, 0, t.num_loops) == (0.35, 0, 2)
    assert (o.matrix_lr, o.warmup_steps, o.gptq_reserve) == (t.matrix_lr, t.warmup_steps, 0.5)


def test_lr_multiplier_equals_the_tops_lr_mul_at_every_fraction(top):
    """Its `lr_mul` closure, taken from train_model's text, against tg.lr_scale on a dense grid of training
    fractions and at the warmdown start and floor boundaries (to the ulp)."""
    lr_mul = top_lr_mul(top)
    fracs = np.concatenate([np.linspace(0.0, 1.0, 20001)[:-1], [0.15, 1 - 0.85, 0.915, 1 - 0.085]])
    fracs = np.concatenate([fracs, np.nextafter(fracs, 0.0), np.nextafter(fracs, 1.0)])
    worst = max(abs(lr_mul(float(f)) - tg.lr_scale(float(f), 0.85, 0.1)) for f in fracs)
    assert worst <= LR_ATOL


def test_the_lr_check_fails_for_another_floor(top):
    """The mutant: MIN_LR=0 (the top's code default, which its README overrides)."""
    assert abs(top_lr_mul(top)(0.95) - tg.lr_scale(0.95, 0.85, 0.0)) > 0.04


@pytest.mark.slow
def test_schedule_equals_the_tops_at_every_step_of_a_600s_run(top, top_schedule, times):
    """Same step times: the LR multiplier (<= 1e-12), the Muon momentum (exact) and looping (exact) agree at
    every step both run. Both stop on the wallclock: the top after the first step that ends at or past
    600 - 0.5 s, ours one step earlier, the last step that ends before it (a known
    deviation: a cap checked only after each step lets runs end past 600 s)."""
    ours = run_our_schedule(times)
    t_rows, o_rows = top_schedule["rows"], ours["rows"]
    cap = 600.0 - 0.5
    assert top_schedule["cap_s"] == ours["cap_s"] == cap
    # exact equality is meaningful: no step's fraction is within 1e-9 of a switching point
    fracs = np.cumsum([0.0] + times[: len(t_rows)])[:-1] / cap
    for point in (1 - 0.85, 0.35, 1 - 0.85 * 0.9):
        assert np.abs(fracs - point).min() > 1e-9
    assert schedule_differences(top_schedule, ours) == {"lr": [], "momentum": [], "looping": []}
    # the run itself: ~4,9xx steps; warm-up, looping at 0.35 and the LR floor are all inside it
    elapsed = np.cumsum(times)
    top_stop = int(np.argmax(elapsed >= cap)) + 1  # the top: stop after the step whose end reaches the cap
    assert top_schedule["steps"] == len(t_rows) == top_stop
    assert ours["steps"] == len(o_rows) == top_stop - 1 and ours["stopped_by"] == "wallclock"
    assert elapsed[ours["steps"] - 1] <= cap < elapsed[top_stop - 1]
    assert ours["train_s"] == elapsed[ours["steps"] - 1] and top_schedule["train_s"] == elapsed[top_stop - 1]
    on = next(i for i, r in enumerate(t_rows) if r[2])
    assert 2000 < on < 2300 and f"layer_loop:enabled step:{on} " in " ".join(top_schedule["logs"]) + " "
    assert any(line.startswith(f"layer_loop:enabled step:{on} ") for line in ours["logs"])
    momenta = [r[1] for r in t_rows]
    assert momenta[0] == 0.92 and momenta[1500] == momenta[-1] == 0.97 and momenta[750] == pytest.approx(0.945)
    lr = [r[0][0] for r in t_rows]
    assert lr[0] == 1.0 and lr[-1] == 0.1 and 0.1 < min(x for x in lr if x > 0.1) < 1.0


@pytest.mark.parametrize("env", [{"WARMDOWN_FRAC": "0.75", "MUON_MOMENTUM_WARMUP_STEPS": "1499"},
                                 {"MIN_LR": "0.0", "ENABLE_LOOPING_AT": "0.351"}])
@pytest.mark.slow
def test_the_schedule_check_fails_for_mutants(top_schedule, times, env):
    """Two mutants per run (each moves one channel only, at the steps it should): WARMDOWN_FRAC=0.75 (the
    top's code default, which its README overrides) from the step the top's warmdown starts; a momentum
    warm-up one step shorter at steps 1-1499; MIN_LR=0 (the top's code default) only on the floor; looping
    at 0.351 from the top's looping step until ours turns on."""
    ours = run_our_schedule(times, **env)
    diff = schedule_differences(top_schedule, ours)
    rows = top_schedule["rows"]
    fracs = np.cumsum([0.0] + times[: len(rows)])[:-1] / top_schedule["cap_s"]
    if "WARMDOWN_FRAC" in env:
        assert diff["lr"][0] == int(np.argmax(fracs >= 0.15)) and diff["momentum"] == list(range(1, 1500))
        assert diff["looping"] == []
    else:
        assert diff["lr"][0] == int(np.argmax(fracs > 1 - 0.085)) and diff["momentum"] == []
        top_on = [r[2] for r in rows].index(True)
        assert diff["looping"] == list(range(top_on, int(np.argmax(fracs >= 0.351))))


# ---------------------------------------------------------------------------------------------------------------
# B. The training loader
# ---------------------------------------------------------------------------------------------------------------

SEQ, ROWS, STEPS = 64, 4, 20  # TRAIN_SEQ_LEN, sequences per rank and micro-batch, steps compared
BATCH_TOKENS = SEQ * ROWS * 8  # TRAIN_BATCH_TOKENS: 8 = WORLD_SIZE * GRAD_ACCUM_STEPS in both scripts
N_LOCAL = SEQ * ROWS  # tokens per rank and micro-batch
VOCAB = 1024


def synthetic_stream(n_tokens: int, seed: int, lead: int = 0) -> np.ndarray:
    """Documents (BOS + 4..300 tokens: short ones, and ones longer than TRAIN_SEQ_LEN), after `lead` tokens of a
    document cut by the shard start."""
    rng = np.random.default_rng(seed)
    parts = [rng.integers(2, VOCAB, lead)]
    while sum(p.size for p in parts) < n_tokens:
        parts.append(np.concatenate([[BOS], rng.integers(2, VOCAB, int(rng.choice([rng.integers(4, 40),
                                                                                       rng.integers(40, 300)])))]))
    return np.concatenate(parts)[:n_tokens].astype(np.int64)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """Three shards, ~2.4 of them read in 20 steps (so both loaders cross two shard boundaries); the second
    starts inside a document."""
    root = tmp_path_factory.mktemp("top_loader")
    streams = [synthetic_stream(16411, 1), synthetic_stream(15707, 2, lead=37), synthetic_stream(17000, 3)]
    for i, s in enumerate(streams):
        write_shard(root / f"fineweb_train_{i:06d}.bin", s)
    write_shard(root / "fineweb_val_000000.bin", streams[0][:1000])
    return root, streams


def bounds(cu: torch.Tensor, total: int) -> list[int]:
    """cu_seqlens less the padding: both pad to a multiple of 64 entries with the total."""
    values = cu.tolist()
    return values[: values.index(total) + 1]


class NoPinTorch:
    """`torch` for the top's loader: torch.empty(pin_memory=True) without pinning (no pinned allocator on a
    CPU-only torch)."""

    @staticmethod
    def empty(*args, pin_memory=False, **kwargs):
        return torch.empty(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(torch, name)


def top_batches(top, folder: Path, world_size: int, rank: int, seed: int = 1337) -> dict:
    """{(step, rank, micro): (inputs, targets, boundaries)} from the top's DocumentPackingLoader."""
    mp = pytest.MonkeyPatch()
    mp.setattr(top, "torch", NoPinTorch())
    mp.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self)
    accum = 8 // world_size  # its Hyperparameters.grad_accum_steps
    h = SimpleNamespace(rank=rank, world_size=world_size, train_seq_len=SEQ, seed=seed,
                        train_files=str(folder / "fineweb_train_*.bin"))
    try:
        loader = top.DocumentPackingLoader(h, CPU)
        out = {}
        for call in range(STEPS * accum):
            x, y, cu, _ = loader.next_batch(BATCH_TOKENS, accum)
            out[(call // accum, rank, call % accum)] = (x.reshape(-1), y.reshape(-1), bounds(cu, x.numel()))
        for pending in loader._prefetch_queue:  # its prefetches finish while the patches hold
            pending.result()
        loader._batch_pool.shutdown()
    finally:
        mp.undo()
    return out


def our_batches(folder: Path, world_size: int, rank: int, seed: int = 1337, packed: bool | None = None) -> dict:
    """The same from ours, built as train_and_evaluate's make_loader builds it."""
    h = tg.Hyperparameters.from_env({"PRESET": "record", "WORLD_SIZE": str(world_size), "RANK": str(rank),
                                     "TRAIN_SEQ_LEN": str(SEQ), "TRAIN_BATCH_TOKENS": str(BATCH_TOKENS),
                                     "VOCAB_SIZE": str(VOCAB), "SEED": str(seed)})
    assert h.accum_steps == 8 // world_size and h.micro_batch_seqs == ROWS and h.doc_packed_loader
    files = tg.list_shards(folder, "train")
    loader = tg.TrainLoader(files, h.train_seq_len, h.micro_batch_seqs, h.accum_steps, h.seed, h.vocab_size,
                            tg.DistInfo(rank, world_size, CPU),
                            packed=h.doc_packed_loader if packed is None else packed)
    try:
        out = {}
        for call in range(STEPS * h.accum_steps):
            x, y, cu = loader.next_batch()
            out[(call // h.accum_steps, rank, call % h.accum_steps)] = (x.reshape(-1), y.reshape(-1),
                                                                       bounds(cu, x.numel()))
    finally:
        loader.close()
    return out


_BATCHES: dict = {}


def batches(top, shards, who: str, world_size: int) -> dict:
    """Every rank's batches of one loader at one world size (cached for the module)."""
    key = (who, world_size, shards[0])
    if key not in _BATCHES:
        folder = shards[0]
        out = {}
        for rank in range(world_size):
            out.update(top_batches(top, folder, world_size, rank) if who == "top"
                       else our_batches(folder, world_size, rank))
        _BATCHES[key] = out
    return _BATCHES[key]


def first_difference(a: dict, b: dict, part: int) -> str | None:
    """The first (step, rank, micro) whose inputs (part 0) or targets (part 1) differ, with their first tokens."""
    for key in sorted(a):
        if not torch.equal(a[key][part], b[key][part]):
            return f"(step, rank, micro)={key}: top {a[key][part][:8].tolist()}... ours {b[key][part][:8].tolist()}..."
    return None


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_loader_tokens_and_document_boundaries_equal_the_tops(top, shards, world_size):
    """Every (step, rank, micro-batch) of 20 steps, across two shard ends: the same inputs, targets and
    cu_seqlens (less their padding) as the top's DocumentPackingLoader."""
    t, o = batches(top, shards, "top", world_size), batches(top, shards, "ours", world_size)
    assert t.keys() == o.keys() and len(t) == STEPS * 8
    assert first_difference(t, o, 0) is None and first_difference(t, o, 1) is None
    assert [(k, t[k][2], o[k][2]) for k in sorted(t) if t[k][2] != o[k][2]] == []


# The loaders as rules over the shards' token arrays (stated here, checked against both loaders below).

def top_rule(streams: list[np.ndarray], world_size: int) -> dict:
    """The top: a cursor from the first shard's first BOS. Each micro-step (one next_batch call on every rank)
    spans WORLD_SIZE blocks of N_LOCAL+1 tokens; rank r takes block r. When the span no longer fits in the
    shard, the cursor moves to the next shard's first BOS."""
    span, accum = N_LOCAL + 1, 8 // world_size
    shard, out = 0, {}
    cursor = int(np.flatnonzero(streams[0] == BOS)[0])
    for call in range(STEPS * accum):
        while cursor + world_size * span > streams[shard].size:
            shard = (shard + 1) % len(streams)
            cursor = int(np.flatnonzero(streams[shard] == BOS)[0])
        for r in range(world_size):
            block = streams[shard][cursor + r * span: cursor + (r + 1) * span]
            out[(call // accum, r, call % accum)] = (block[:-1], block[1:], doc_chunk_bounds(block[:-1]))
        cursor += world_size * span
    return out


def row_rule(streams: list[np.ndarray], world_size: int) -> dict:
    """The mutant, our loader before it was PR #1855's: slots of TRAIN_SEQ_LEN+1 tokens every TRAIN_SEQ_LEN
    tokens from each shard's first BOS, the shards' slots in file order; step s takes 8*ROWS slots, rank r and
    micro-batch m the ROWS slots of chunk r*accum + m; a sequence starts at every row start and BOS."""
    accum = 8 // world_size
    slots = [(i, b + j * SEQ) for i, s in enumerate(streams) for b in [int(np.argmax(s == BOS))]
             for j in range((s.size - 1 - b) // SEQ)]
    out = {}
    for step in range(STEPS):
        for r in range(world_size):
            for m in range(accum):
                q = step * 8 + r * accum + m
                assert (q + 1) * ROWS <= len(slots)  # no epoch wrap within STEPS
                rows = np.stack([streams[i][a: a + SEQ + 1] for i, a in slots[q * ROWS: (q + 1) * ROWS]])
                x = rows[:, :-1].reshape(-1)
                out[(step, r, m)] = (x, rows[:, 1:].reshape(-1), row_start_bounds(x))
    return out


def doc_chunk_bounds(x: np.ndarray) -> list[int]:
    starts = np.flatnonzero(x == BOS).tolist()
    starts = starts if starts and starts[0] == 0 else [0] + starts
    return [p for a, b in zip(starts, starts[1:] + [x.size]) for p in range(a, b, SEQ)] + [x.size]


def row_start_bounds(x: np.ndarray) -> list[int]:
    return sorted(set(range(0, x.size, SEQ)) | set(np.flatnonzero(x == BOS).tolist())) + [x.size]


def rule_mismatches(rule: dict, got: dict) -> list:
    """(step, rank, micro) keys where the loader's inputs, targets or boundaries are not the rule's."""
    return [k for k in sorted(got) if not (np.array_equal(rule[k][0], got[k][0].numpy())
                                           and np.array_equal(rule[k][1], got[k][1].numpy())
                                           and rule[k][2] == got[k][2])]


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_both_loaders_follow_the_tops_rule(top, shards, world_size):
    """Each loader equals the rule written out above at every step, rank and micro-batch; the mutant, the row
    rule our loader followed before, fails against ours from the second block of a step on."""
    streams = shards[1]
    t, o = batches(top, shards, "top", world_size), batches(top, shards, "ours", world_size)
    assert rule_mismatches(top_rule(streams, world_size), t) == []
    assert rule_mismatches(top_rule(streams, world_size), o) == []
    assert len(rule_mismatches(row_rule(streams, world_size), o)) >= STEPS * 8 - 1


def test_neither_loader_depends_on_the_seed(top, shards):
    """Both read documents in file order: SEED changes no token (ours: DOC_PACKED_LOADER has no shuffle; the
    top's DocumentPackingLoader never reads h.seed). The mutant: our shuffled loader (packed=False) does."""
    folder = shards[0]
    source = Path(top.__file__).read_text()
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "DocumentPackingLoader")
    assert "seed" not in ast.get_source_segment(source, cls)
    a, b = top_batches(top, folder, 2, 1, seed=1), top_batches(top, folder, 2, 1, seed=2)
    assert all(torch.equal(a[k][0], b[k][0]) and a[k][2] == b[k][2] for k in a)
    a, b = our_batches(folder, 2, 1, seed=1), our_batches(folder, 2, 1, seed=2)
    assert all(torch.equal(a[k][0], b[k][0]) and a[k][2] == b[k][2] for k in a)
    a, b = our_batches(folder, 2, 1, seed=1, packed=False), our_batches(folder, 2, 1, seed=2, packed=False)
    assert not all(torch.equal(a[k][0], b[k][0]) for k in a)


def step_stream(b: dict, world_size: int, order) -> list[torch.Tensor]:
    """Each step's inputs over all ranks and micro-batches, blocks in the loader's global order."""
    return [torch.cat([b[k][0] for k in sorted((k for k in b if k[0] == s), key=order)]) for s in range(STEPS)]


def test_the_world_size_changes_the_tokens_at_a_shard_end_in_both(top, shards):
    """Both read the same tokens per step at WORLD_SIZE 1, 2 and 8 until a shard ends: a loader leaves a shard
    once a micro-step's span over all ranks (WORLD_SIZE * 257 tokens here) no longer fits, so at 8 ranks both
    leave shard 0 (16,411 tokens) after 7 steps (7 * 2056 + 2056 > 16,411), at 1 rank they read 257-token blocks
    on into step 7 (PR #1855's rule, which ours now follows; the data order is world-size invariant between
    shard ends)."""
    def streams(who):
        return {ws: step_stream(batches(top, shards, who, ws), ws, lambda k, w=ws: k[2] * w + k[1]) for ws in (1, 2, 8)}

    for got in (streams("top"), streams("ours")):
        differ = [s for s in range(STEPS) if not torch.equal(got[1][s], got[8][s])]
        assert differ[0] == 7 and all(torch.equal(got[1][s], got[2][s]) for s in range(7))
