"""Rank-selection benchmark: every registered method at the same MACs.

A ResNet-18-sized network (torchvision's layout: 7x7 stem, 4 stages of 2 basic
blocks, 64..512 channels, 1x1 downsample shortcuts, 1000-way classifier) built
inline with random weights at 224x224 (torchvision is not installed and no
weights can be downloaded). For each method at one budget (default flops:3x):

- seconds spent choosing ranks (``select_ranks``);
- MACs kept, measured on the rewritten network (torch's FLOP counter);
- mean relative weight error ||W - W_hat|| / ||W|| over the decomposable layers
  (a layer the plan leaves dense counts 0), from the actual decomposition;
- relative output error ||f(x) - f_hat(x)|| / ||f(x)|| of the decomposed network
  on random inputs.

Data-driven methods (``uses_data``) get 32 random images labelled by the dense
network's own predictions. Caveat: with random weights the spectra are nearly
flat, so this measures the machinery (time, budget hit, error at equal MACs),
not which method finds the better ranks in a trained network.

Run: python -m bench.ranks [budget] [--methods a,b] [--model resnet18|small]
Writes bench/results/ranks.json and bench/results/ranks.md. (``--model small``,
bench.models.SmallConvNet at 3x32x32, is for quick runs and the test suite; the
default is the published configuration.)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from bench.models import SmallConvNet, resnet18
from compression.budget import Budget
from compression.input_spec import InputSpec
from compression.inventory import build_inventory, count_macs
from compression.model_io import to_editable
from compression.ranks import METHODS, Data, SelectionContext, select_ranks
from compression.ranks.spectra import spectra_for, weight_of
from compression.rewrite import apply_plan, submodule_name

RESULTS = Path(__file__).parent / "results"
SPEC = "3,224,224"
# name -> (builder, input spec, label); "resnet18" is the published configuration.
MODELS = {"resnet18": (resnet18, SPEC, "ResNet-18 layout"), "small": (SmallConvNet, "3,32,32", "small conv net")}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def run(budget_text: str, methods: list[str], on_row=None, model_name: str = "resnet18") -> list[dict]:
    build, spec_text, _ = MODELS[model_name]
    torch.manual_seed(0)
    model = build().eval()
    spec = InputSpec.parse(spec_text)
    t = time.perf_counter()
    gm = to_editable(torch.jit.script(model), spec).gm
    inv = build_inventory(gm, spec)
    print(f"converted in {time.perf_counter() - t:.1f}s; {len(inv.decomposable)} decomposable layers, "
          f"{inv.total_macs / 1e9:.2f} GMACs, {inv.total_params / 1e6:.1f}M params")
    t = time.perf_counter()
    spectra = spectra_for(gm)
    for layer in inv.decomposable:
        spectra.get(layer)
    spectra_s = time.perf_counter() - t
    print(f"spectra of {len(inv.decomposable)} layers (shared by all methods, not in select s): {spectra_s:.2f}s")
    budget = Budget.parse(budget_text)
    x = spec.example(4, seed=7)
    with torch.no_grad():
        ref = gm(*x)
    rows = []
    for name in methods:
        data = None
        if METHODS[name].uses_data:
            xs = spec.example(32, seed=3)
            with torch.no_grad():
                data = Data(xs, gm(*xs).argmax(1))
        # ranks as chosen for a job that fine-tunes, but without BATUDE's 600-step minimum: on the
        # few samples here that would be a training run of many epochs, not a rank choice
        options = {"min_steps": 0} if name == "batude" else {}
        ctx = SelectionContext(gm, inv, spec, budget, data=data, finetune_follows=True, options=options)
        t = time.perf_counter()
        try:
            plan = select_ranks(ctx, name)
        except Exception as exc:  # report, keep benchmarking the others
            print(f"{name}: failed: {exc}")
            rows.append({"method": name, "error": str(exc)})
            if on_row:
                on_row(rows)
            continue
        seconds = time.perf_counter() - t
        small = copy.deepcopy(gm)
        t = time.perf_counter()
        apply_plan(small, inv, plan)
        decompose_s = time.perf_counter() - t
        werr = dict.fromkeys((layer.name for layer in inv.decomposable), 0.0)
        for lp in plan.layers:
            layer = inv.by_name(lp.name)
            w = weight_of(gm, layer).detach()
            mod = small.get_submodule(submodule_name(layer.name))
            w_hat = mod.to_dense()[0] if hasattr(mod, "to_dense") else None
            if w_hat is not None:
                werr[lp.name] = rel(w_hat.reshape(w.shape), w)
        with torch.no_grad():
            out = small(*x)
            macs = count_macs(small, spec.example(1))
        row = {
            "method": name,
            "select_s": round(seconds, 3),
            "spectra_s": round(spectra_s, 3),
            "decompose_s": round(decompose_s, 3),
            "macs_kept": macs / inv.total_macs,
            "target_keep": budget.keep,
            "budget_miss_pct": 100 * (macs / inv.total_macs / budget.keep - 1),
            "mean_weight_error": sum(werr.values()) / max(len(werr), 1),
            "output_error": rel(out, ref),
            "layers_factorised": len(plan.layers),
            "ranks": {lp.name: list(lp.ranks) for lp in plan.layers},
            "note": plan.note[:300],
        }
        rows.append(row)
        if on_row:
            on_row(rows)
        print(f"{name:8} select {seconds:7.2f}s  MACs kept {row['macs_kept']:.4f} "
              f"(miss {row['budget_miss_pct']:+.2f} %)"
              f"  weight err {row['mean_weight_error']:.4f}  output err {row['output_error']:.4f}")
    return rows


def write(rows: list[dict], budget_text: str, model_name: str = "resnet18") -> None:
    _, spec_text, label = MODELS[model_name]
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"budget": budget_text, "model": f"{label}, random weights, {spec_text.replace(',', 'x')}",
            "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads()}
    (RESULTS / "ranks.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    side = "x".join(spec_text.split(",")[1:])
    lines = [f"# Rank selection at {budget_text} ({label}, random weights, {side})", "",
             f"torch {meta['torch']}, {meta['threads']} threads. Errors at equal MACs; weight error is the "
             "mean over decomposable layers (dense = 0). 'select s' excludes the shared spectra "
             f"({rows[0].get('spectra_s', 0) if rows else 0:.2f} s, computed once for all methods). Wall "
             "times were taken on a shared, oversubscribed 2-core box: compare them with each other only.", "",
             "| method | select s | MACs kept | miss % | mean weight err | output err | layers |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:60]} | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['select_s']:.2f} | {r['macs_kept']:.4f} | {r['budget_miss_pct']:+.2f} | "
                     f"{r['mean_weight_error']:.4f} | {r['output_error']:.4f} | {r['layers_factorised']} |")
    (RESULTS / "ranks.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("budget", nargs="?", default="flops:3x")
    ap.add_argument("--methods", default=None, help="comma-separated (default: all registered except manual)")
    ap.add_argument("--model", choices=sorted(MODELS), default="resnet18",
                    help="resnet18 (default: the ResNet-18 layout at 3x224x224, the published numbers) or small "
                         "(bench.models.SmallConvNet at 3x32x32, for quick runs and tests)")
    args = ap.parse_args(argv)
    methods = args.methods.split(",") if args.methods else [m for m in METHODS if m != "manual"]
    rows = run(args.budget, methods, on_row=lambda r: write(r, args.budget, args.model), model_name=args.model)
    write(rows, args.budget, args.model)
    print((RESULTS / "ranks.md").read_text())


if __name__ == "__main__":
    main()
