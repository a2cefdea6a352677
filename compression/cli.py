"""``tensortrim`` command line: ``inspect`` and ``compress`` (the engine);
the service adds ``serve``, ``worker`` and ``keys`` through ``extend_parser``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from compression.errors import TensorTrimError
from compression.input_spec import InputSpec

# Sub-command registrars from packages that build on the engine (the service);
# the engine never imports them, they register themselves.
EXTENSIONS: list[Callable[[argparse._SubParsersAction], None]] = []


def _spec(args: argparse.Namespace) -> InputSpec:
    if args.input_file:
        return InputSpec.from_file(args.input_file)
    if not args.input_shape:
        raise TensorTrimError(
            "give --input-shape (one sample, no batch dimension, e.g. 3,224,224) or --input-file "
            "(example tensors): TorchScript does not record input shapes"
        )
    return InputSpec.parse(args.input_shape)


def _fmt(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _bars() -> Callable[[str, float, str], None]:
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(phase: str, fraction: float, message: str = "") -> None:
        bar = bars.get(phase)
        if bar is None:
            bar = bars[phase] = tqdm(total=100, desc=phase, unit="%", leave=True, file=sys.stderr,
                                     bar_format="{desc:>10}: {percentage:3.0f}%|{bar}| {postfix}")
        bar.n = round(100 * fraction)
        bar.set_postfix_str(message[:60], refresh=True)
        if fraction >= 1.0:
            bar.close()

    return progress


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from compression.inventory import build_inventory
    from compression.pipeline import load_editable

    spec = _spec(args)
    _, editable = load_editable(args.model, spec)
    inv = build_inventory(editable.gm, spec)
    if args.json:
        print(json.dumps({"route": editable.route, **inv.to_dict()}, indent=2))
        return 0
    print(f"{'layer':32} {'kind':8} {'in->out':>11} {'kernel':>6} {'stride':>6} {'groups':>6} "
          f"{'out shape':>14} {'MACs':>9} {'params':>9}  note")
    for layer in inv.layers:
        note = layer.skip_reason or ",".join(layer.forms)
        shape = "x".join(str(d) for d in layer.out_shape)
        print(f"{layer.name[:32]:32} {layer.kind[:8]:8} {f'{layer.c_in}->{layer.c_out}':>11} "
              f"{'x'.join(map(str, layer.kernel)):>6} {'x'.join(map(str, layer.stride)):>6} {layer.groups:>6} "
              f"{shape:>14} {_fmt(layer.macs):>9} {_fmt(layer.params):>9}  {note}")
    print(f"\nconverted by: {editable.route}; layers: {len(inv.layers)} ({len(inv.decomposable)} decomposable)")
    print(f"total MACs: {_fmt(inv.total_macs)} (conv/linear {_fmt(inv.layer_macs)}); params: {_fmt(inv.total_params)}")
    return 0


def _finetune_options(args: argparse.Namespace) -> bool | dict:
    if not args.finetune:
        return False
    options = {"epochs": args.epochs, "lr": args.lr, "optimizer": args.optimizer}
    return {k: v for k, v in options.items() if v is not None}


def cmd_compress(args: argparse.Namespace) -> int:
    from compression.pipeline import compress, sweep

    spec = _spec(args)
    progress = _bars() if not args.quiet else (lambda *a: None)
    options = dict(args.method_options or {})
    method = args.method
    if args.layer_ranks is not None:
        if method not in (None, "manual"):
            raise SystemExit(f"error: --layer-ranks is for --method manual, not {method!r}")
        method, options["ranks"] = "manual", args.layer_ranks
    common = {"out_dir": args.output, "form": args.form, "method": method, "data": args.data,
              "finetune": _finetune_options(args), "device": args.device, "progress": progress,
              "method_options": options or None, "latency": not args.no_latency}
    if args.sweep:
        report = sweep(args.model, spec, [b.strip() for b in args.sweep.split(",")], **common)
        print(f"{'budget':>12} {'MACs ratio':>10} {'accuracy':>9}")
        for p in report["sweep"]:
            acc = "-" if p["accuracy"] is None else f"{p['accuracy']:.4f}"
            print(f"{p['budget']:>12} {p['macs_ratio']:>9.2f}x {acc:>9} ({p['metric']})")
        print(f"wrote {Path(args.output) / 'sweep.json'} and report.html; one folder per budget")
        return 0
    result = compress(args.model, spec, args.budget, ranks=args.ranks, **common)
    if args.budget or method == "manual":
        print(f"ranks chosen by {result.plan.method}" + (f" under {args.budget}" if args.budget else "")
              + (f" ({result.plan.note})" if result.plan.note else ""))
    print(f"MACs:   {_fmt(result.macs_before)} -> {_fmt(result.macs_after)}  ({result.macs_ratio:.2f}x fewer)")
    print(f"params: {_fmt(result.params_before)} -> {_fmt(result.params_after)}  ({result.params_ratio:.2f}x fewer)")
    print(f"max output deviation (relative): {result.max_output_deviation:.3e}")
    original, compressed = result.evaluation["original"], result.evaluation["compressed"]
    if compressed.get("top1") is not None:
        print(f"top-1 accuracy: {original['top1']:.4f} -> {compressed['top1']:.4f} ({result.evaluation['data']})")
    if compressed.get("agreement") is not None:
        print(f"top-1 agreement with the original: {compressed['agreement']:.4f}")
    for dev, rows in result.latency.items():
        for batch, row in rows.items():
            print(f"latency {dev} batch {batch}: {row['original_ms']:.2f} ms -> {row['compressed_ms']:.2f} ms "
                  f"({row['speedup']:.2f}x)")
    print(f"layers factorised: {len(result.plan.layers)}; left dense: {len(result.plan.dense)}")
    for name, check in result.files.items():
        print(f"wrote {Path(args.output) / name} ({check.method}, {_fmt(check.size_bytes)}B, verified)")
    print(f"wrote {Path(args.output) / 'report.json'} and report.html")
    return 0


def _json_object(text: str) -> dict:
    """A JSON object given inline or as @file."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as e:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {e.strerror}") from None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}); e.g. '{{\"conv1\": [8, 16]}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("give a JSON object, e.g. '{\"conv1\": [8, 16]}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    from compression.ranks import METHODS, default_method

    parser = argparse.ArgumentParser(prog="tensortrim", description="Compress TorchScript models by decomposition")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="TorchScript file (torch.jit.save)")
        p.add_argument("--input-shape", help="one sample's shape without batch, e.g. 3,224,224 ('a;b' for several)")
        p.add_argument("--input-file", help="example inputs (.npz or torch.save of tensors), batch first")

    p = sub.add_parser("inspect", help="print the layer table with MACs and params")
    model_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("compress", help="decompose layers and write model.pt, model.pt2, report.json")
    model_args(p)
    p.add_argument("--form", default="tucker2", choices=["tucker2", "cp", "cp4", "auto"],
                   help="form for kxk convs ('auto': chosen per layer; needs --budget)")
    p.add_argument("--ranks", type=float, default=0.5,
                   help="rank ratio of each layer's maximum (0,1]; ignored with --budget")
    p.add_argument("--budget", help="choose ranks under a budget: 'flops:3x', 'params:0.4', 'latency:8ms@1'")
    p.add_argument("--method", choices=sorted(METHODS), default=None,
                   help=f"rank-selection method for --budget (default: {default_method(False)} without data)")
    p.add_argument("--method-options", type=_json_object, metavar="JSON",
                   help='method knobs as JSON (or @file), e.g. \'{"all_layers": true}\' to factorise 1x1 and '
                        "linear layers too")
    p.add_argument("--layer-ranks", type=_json_object, metavar="JSON",
                   help='per-layer ranks (or @file), implies --method manual: \'{"conv1": [8, 16], "fc": 0.5}\'; '
                        "layers not named stay dense")
    p.add_argument("--sweep", help="several budgets, comma-separated: writes the accuracy-vs-MACs curve")
    p.add_argument("--data", help="data set: .npz with x (and y) arrays, or an image-folder zip")
    p.add_argument("--finetune", action="store_true", help="fine-tune after decomposition (data-free without --data)")
    p.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs")
    p.add_argument("--lr", type=float, default=None,
                   help="fine-tuning learning rate (default 0.01 with SGD, 0.001 with AdamW)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--no-latency", action="store_true", help="skip timing the original and compressed files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compress)

    for extend in EXTENSIONS:
        extend(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TensorTrimError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: file not found: {exc.filename}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
