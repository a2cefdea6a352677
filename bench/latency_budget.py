"""Latency budgets, measured: is a plan chosen against the latency table as
fast as the table predicts once it is built and timed?

The rank search meets a latency budget against the engine's latency table
(per-layer timings plus ``other_ms``, see ``compression.latency``); the table is
additive, so the real model can differ. This benchmark checks the gap: for
each model and each target fraction of the dense latency at batch 1 on the CPU
it chooses ranks (method ``energy``), rewrites the model, then times dense and
compressed back to back five times (one intra-op thread, process CPU clock,
fastest of 7 samples each, because the box is shared) and reports the median
ratio compressed / dense next to the target.

Models: a small conv net (3x32x32: 64-channel stem, four 64-channel 3x3 convs,
linear head) and the ResNet-18 layout (bench.models) at 3x112x112.

Run: python -m bench.latency_budget [--targets 0.7,0.5] [--models small,resnet18]
Writes bench/results/latency_budget.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics

import torch

from bench.models import SmallConvNet, resnet18
from bench.ranks import RESULTS
from compression.budget import Budget
from compression.input_spec import InputSpec
from compression.inventory import build_inventory
from compression.latency import build_latency_table, measure_model
from compression.model_io import to_editable
from compression.ranks import SelectionContext, select_ranks
from compression.rewrite import apply_plan

MODELS = {"small": (SmallConvNet, "3,32,32"), "resnet18": (resnet18, "3,112,112")}


def run(models: list[str], targets: list[float]) -> list[dict]:
    rows = []
    for name in models:
        build, spec_text = MODELS[name]
        torch.manual_seed(0)
        spec = InputSpec.parse(spec_text)
        gm = to_editable(torch.jit.script(build().eval()), spec).gm
        inv = build_inventory(gm, spec)
        table = build_latency_table(gm, inv, spec, batch=1, device="cpu", repeats=9, forms=("tucker2",),
                                    clock="cpu", stat="min")
        for target in targets:
            budget = Budget("latency", ms=target * table.total_ms, batch=1)
            ctx = SelectionContext(gm, inv, spec, budget, latency=table)
            plan = select_ranks(ctx, "energy")
            predicted = ctx.meter().total({lp.name: (lp.form, lp.ranks) for lp in plan.layers})
            small = copy.deepcopy(gm)
            apply_plan(small, inv, plan)
            ratios = []
            for _ in range(5):  # back-to-back pairs: a change in load hits both
                dense_ms = measure_model(gm, spec, 1, "cpu", repeats=7, clock="cpu", stat="min")
                ratios.append(measure_model(small, spec, 1, "cpu", repeats=7, clock="cpu", stat="min") / dense_ms)
            row = {"model": name, "input": spec_text, "target": target, "table_ms": table.total_ms,
                   "predicted_ratio": predicted / table.total_ms, "measured_ratio": statistics.median(ratios),
                   "ratios": ratios, "layers_factorised": len(plan.layers)}
            row["met"] = row["measured_ratio"] <= target
            rows.append(row)
            print(f"{name:9} target {target:.2f}  predicted {row['predicted_ratio']:.3f}  "
                  f"measured {row['measured_ratio']:.3f}  {'met' if row['met'] else 'MISSED'}")
    return rows


def write(rows: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "machine": platform.machine(), "threads": 1,
            "load_avg": os.getloadavg()}
    (RESULTS / "latency_budget.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# Latency budgets: predicted by the table vs measured (CPU, batch 1, one thread)", "",
             f"torch {meta['torch']}, load average {meta['load_avg'][0]:.2f} at the end. Ratio = compressed / "
             "dense latency; measured = median of 5 back-to-back pairs (CPU clock, fastest of 7 each).", "",
             "| model | input | target | predicted | measured | met | layers factorised |",
             "|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['input']} | {r['target']:.2f} | {r['predicted_ratio']:.3f} | "
                     f"{r['measured_ratio']:.3f} | {'yes' if r['met'] else 'no'} | {r['layers_factorised']} |")
    (RESULTS / "latency_budget.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="0.7,0.5")
    ap.add_argument("--models", default="small,resnet18")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = run(args.models.split(","), [float(t) for t in args.targets.split(",")])
    write(rows)
    print((RESULTS / "latency_budget.md").read_text())


if __name__ == "__main__":
    main()
