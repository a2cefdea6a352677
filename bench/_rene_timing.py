"""Time data-free ``rene`` rank selection on a ResNet-18-sized model (random
weights, 224x224) with 2 CPU threads: ``python -m bench._rene_timing [budget] [threads]``.
Only ``Rene.select`` is timed (conversion and inventory are reported apart)."""

from __future__ import annotations

import sys
import time

import torch

from bench.models import resnet18
from compression.budget import Budget
from compression.input_spec import InputSpec
from compression.inventory import build_inventory
from compression.model_io import to_editable
from compression.ranks.base import SelectionContext
from compression.ranks.rene import Rene


def main(budget: str = "flops:3x", threads: str = "2") -> None:
    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    model = resnet18()
    spec = InputSpec.parse("3,224,224")
    t = time.perf_counter()
    gm = to_editable(torch.jit.script(model), spec).gm
    inv = build_inventory(gm, spec)
    prep = time.perf_counter() - t
    t0 = time.perf_counter()

    def show(phase: str, fraction: float, message: str = "") -> None:
        if fraction in (0.05, 0.9, 1.0) or "step 10" in message or "step 100" in message or "step 120" in message:
            print(f"  [{time.perf_counter() - t0:6.1f} s] {fraction:4.2f} {message}", flush=True)

    ctx = SelectionContext(gm, inv, spec, Budget.parse(budget), seed=0, progress=show)
    rene = Rene()
    t = t0 = time.perf_counter()
    cpu = time.process_time()
    plan = rene.select(ctx)
    sel = time.perf_counter() - t
    cpu = time.process_time() - cpu
    kept = plan.macs_after(inv) / inv.total_macs
    print(f"convert+inventory {prep:.1f} s; rene.select {sel:.1f} s wall, {cpu:.1f} s CPU ({budget}); "
          f"MACs kept {kept:.4f} "
          f"(target {ctx.budget.keep:.4f}); {plan.note}")
    for lp in plan.layers:
        print(f"  {lp.name:24s} {lp.form:8s} {lp.ranks}")


if __name__ == "__main__":
    main(*sys.argv[1:])
