"""Run train_gpt.main() compiled, in a fresh process, counting every graph dynamo compiles and when.

    python tests/compiled_run.py RESULT.json [--inductor] [STUB_DIR ...]   (the run's environment: os.environ)

A fresh process matters: torch.library custom ops are registered once per process, so a test process that
already called an op eagerly would hide an op first defined inside a compiled region.
STUB_DIRs go first on sys.path (the FlashAttention stand-ins in tests/stubs). torch.compile keeps every
argument train_gpt passes (fullgraph=True, dynamic=False; phased TTT's chunk forward: dynamic dims marked) and
gets a counting backend: dynamo, AOTAutograd
and fake-tensor propagation as inductor sees them, with the graphs run eagerly (`aot_eager`); inductor's CPU
code generation is too slow on two cores for whole runs (tests/test_compiled_flow.py checks it on a model).
RESULT.json: {"rc": exit code, "compiles": [phase of each compile, "lora:" before phased TTT's], "graphs": [ops of
each graph]}.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    inductor = "--inductor" in argv
    out, *stubs = [a for a in argv if a != "--inductor"]
    out = Path(out)
    sys.path[:0] = [str(ROOT), *stubs]
    import torch
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    import train_gpt as tg

    phase = {"now": "setup"}
    compiles: list[str] = []
    graphs: list[list[str]] = []

    def counting_backend(gm, example_inputs, tag=""):
        compiles.append(tag + phase["now"])
        if inductor:
            from torch._inductor.compile_fx import compile_fx

            graphs.append(sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"}))
            return compile_fx(gm, example_inputs)

        def keep(g, _):
            graphs.append(sorted({str(n.target) for n in g.graph.nodes if n.op == "call_function"}))
            return make_boxed_func(g.forward)

        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    real_compile = torch.compile

    def compile_(fn, **kwargs):
        # every graph is static but phased TTT's chunk forward, whose rows and width lora_nll marks dynamic
        lora = getattr(fn, "func", None) is tg.lora_chunk_nll
        assert kwargs == ({"fullgraph": True} if lora else {"dynamic": False, "fullgraph": True}), kwargs
        backend = (lambda gm, inputs: counting_backend(gm, inputs, "lora:")) if lora else counting_backend
        return real_compile(fn, backend=backend, **kwargs)

    torch.compile = compile_
    real_train = tg.train

    def train(*args, **kwargs):  # from here on nothing may compile
        phase["now"] = "training"
        return real_train(*args, **kwargs)

    tg.train = train
    rc = tg.main(dict(os.environ))
    out.write_text(json.dumps({"rc": rc, "compiles": compiles, "graphs": graphs}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
