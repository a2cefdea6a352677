"""Decomposition benchmark (engine issue).

1. Per-layer decomposition time, ours (compression.linalg) vs tensorly's
   ``partial_tucker`` / ``parafac`` at the same ranks (bench/_layer_timing.py).
2. A ResNet-18-sized model at 224x224 (random weights): time to convert the
   TorchScript file and to decompose every layer (Tucker-2 at half ranks), the
   MACs ratio, and the measured CPU latency ratio of the exported TorchScript
   files, original vs compressed, side by side in one run (batch 1 and 32,
   median of repeats after warm-up).

Run: python -m bench.decompose [--quick]. Writes bench/results/decompose.{json,md}.
(``--model small`` and ``--shapes`` shrink the run for the test suite; the defaults are
the published configuration.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench._layer_timing import time_layer_decompositions
from bench.models import SmallConvNet, resnet18
from compression.pipeline import compress

RESULTS = Path(__file__).parent / "results"
# name -> (builder, input spec, description); "resnet18" is the published configuration.
MODELS = {
    "resnet18": (resnet18, "3,224,224", "ResNet-18-sized, 224x224, random weights"),
    "small": (SmallConvNet, "3,32,32", "Small conv net (bench.models.SmallConvNet), 32x32, random weights"),
}
SHAPES = "64x64x3x3,128x128x3x3"


def latency_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int, warmup: int = 2) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def model_rows(ratio: float, batches: tuple[int, ...], repeats: int, name: str = "resnet18") -> dict:
    build, spec, description = MODELS[name]
    shape = tuple(int(d) for d in spec.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{name}.pt"
        torch.manual_seed(0)
        torch.jit.save(torch.jit.script(build().eval()), str(src))
        t = time.perf_counter()
        result = compress(src, spec, out_dir=Path(tmp) / "out", form="tucker2", ranks=ratio)
        total = time.perf_counter() - t
        original = torch.jit.load(str(src)).eval()
        compressed = torch.jit.load(str(Path(tmp) / "out" / "model.pt")).eval()
        lat = {}
        for b in batches:
            x = torch.randn(b, *shape)
            # Interleave the two models so machine-load drift hits both alike.
            before, after = [], []
            for _ in range(3):
                before.append(latency_ms(original, x, repeats))
                after.append(latency_ms(compressed, x, repeats))
            lat[b] = {"original_ms": min(before), "compressed_ms": min(after),
                      "speedup": min(before) / min(after)}
    return {
        "model": description,
        "form": "tucker2",
        "rank_ratio": ratio,
        "convert_s": result.seconds["convert"],
        "decompose_s": result.seconds["decompose"],
        "export_s": result.seconds["export"],
        "pipeline_total_s": total,
        "layers_factorised": len(result.plan.layers),
        "macs_before": result.macs_before,
        "macs_after": result.macs_after,
        "macs_ratio": result.macs_ratio,
        "params_ratio": result.params_ratio,
        "latency": lat,
    }


def write(layer_rows: list[dict], model: dict, args: argparse.Namespace) -> str:
    lines = ["## Per-layer decomposition time: ours vs tensorly (median seconds, same ranks and caps)", "",
             "| weight | op | implementation | ranks | seconds | x ours | rel. error |",
             "|---|---|---|---|---|---|---|"]
    ours = {(str(r["shape"]), r["op"]): r["seconds"] for r in layer_rows if r["impl"].startswith("ours")}
    for r in layer_rows:
        base = ours.get((str(r["shape"]), r["op"]), r["seconds"])
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['op']} | {r['impl']} | {r['ranks']} | "
                     f"{r['seconds']:.4f} | {r['seconds'] / base:.2f} | {r['rel_error']:.4f} |")
    lines += ["", f"## {model['model']}, Tucker-2 at rank ratio {model['rank_ratio']}", "",
              "| convert s | decompose s | export+verify s | MACs ratio | params ratio |", "|---|---|---|---|---|",
              f"| {model['convert_s']:.2f} | {model['decompose_s']:.2f} | {model['export_s']:.2f} | "
              f"{model['macs_ratio']:.2f}x | {model['params_ratio']:.2f}x |", "",
              "| batch | original ms | compressed ms | measured speed-up |", "|---|---|---|---|"]
    for b, v in model["latency"].items():
        lines.append(f"| {b} | {v['original_ms']:.1f} | {v['compressed_ms']:.1f} | {v['speedup']:.2f}x |")
    lines += ["", f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average at end "
              f"{os.getloadavg()[0]:.1f}. Command: `{shlex.join(['python', '-m', 'bench.decompose', *args.argv])}`."]
    return "\n".join(lines) + "\n"


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    shapes = [tuple(int(d) for d in s.split("x")) for s in text.split(",")]
    if not shapes or any(len(s) != 4 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected C_outxC_inxKhxKw[,...], got {text!r}")
    return shapes  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, batch 1 and 8 only")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet18",
                        help="network for part 2: resnet18 (default, 3x224x224, the published numbers) or small "
                             "(bench.models.SmallConvNet, 3x32x32, for quick runs and tests)")
    # 256x256x3x3 is left out of the default: tensorly's 4-way parafac did not finish one run in 150 s there.
    parser.add_argument("--shapes", type=parse_shapes, default=SHAPES,
                        help=f"conv weight shapes timed in part 1, comma-separated (default {SHAPES})")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    repeats = 2 if args.quick else 3
    shapes = args.shapes
    # Both libraries on one thread: with two, LAPACK spin-waits on a busy 2-core box
    # and the comparison would measure contention, not the algorithms.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        layer_rows = time_layer_decompositions(shapes, repeats=repeats)
    finally:
        torch.set_num_threads(threads)
    model = model_rows(args.ratio, (1, 8) if args.quick else (1, 32), 3 if args.quick else 5, args.model)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decompose.json").write_text(json.dumps({"layers": layer_rows, "model": model}, indent=2))
    text = write(layer_rows, model, args)
    (RESULTS / "decompose.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
