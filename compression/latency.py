"""Latency measured by the engine itself, for latency budgets.

MACs are not time: on a CPU a 2.4x MAC reduction measured 1.4x (DESIGN.md §2).
So a latency budget is met against a table measured on the job's own device,
at the budget's batch size:

- per decomposable layer, the dense op and its factorised module at a grid of
  ranks (``GRID``: rank 1 and 1/8, 1/4, 1/2, 3/4, 1 of each mode's maximum,
  i.e. about 6 points per form), timed on random weights and inputs of the
  layer's shapes; a weight called at several sites is timed at its first site
  and scaled by the positions of the others;
- the whole model (``total_ms``); ``other_ms`` = total minus the sum of the
  dense layer latencies (floored at 0): what the network spends outside its
  conv/linear layers (activations, BN, pooling, framework overhead).

Every timing is the median over ``repeats`` samples after a warm-up, each sample
averaging enough calls to last about ``MIN_SAMPLE_S`` (so microsecond ops are not
clock noise); on CUDA the device is synchronised around each sample.

Ranks are priced in blocks of ``align`` channels (default 16 on CPU, 8 on
CUDA): measured on this project's CPU (oneDNN, fp32), a Tucker-2 of a 64-channel
3x3 conv costs the same at every rank from 33 to 48 and jumps at 49, so rank r
is priced as rank ceil(r / align) * align (capped at the mode's maximum), and
the grid is measured at such aligned ranks. Pricing up is conservative (a
budget is met, not missed), and the fill pass then raises ranks to the block
edge for free.

``layer_ms(layer, form, ranks)`` maps the aligned ranks to their MACs and interpolates
the measured (MACs, ms) points of that form, made monotone non-decreasing by
isotonic regression (pool adjacent violators), linearly extrapolated past the
largest point. Tucker-2 is measured along the diagonal (both modes at the same
fraction of their maximum); off-diagonal ranks are placed by their MACs.
The model is additive: layers timed in isolation plus ``other_ms``; in a real
network caches and scheduling make the sum differ by a few percent, which is
why tests allow a measurement margin.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from compression import forms as F
from compression.costs import factored_cost
from compression.forms import max_ranks
from compression.input_spec import InputSpec
from compression.inventory import Inventory, LayerInfo
from compression.progress import Progress, silent

GRID = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)  # fractions of each mode's maximum rank (0 -> rank 1)
MIN_SAMPLE_S = 2e-3
MAX_INNER = 200
WARMUP = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_call(fn: Callable[[], object], device: str | torch.device = "cpu", repeats: int = 15,
              warmup: int = WARMUP, clock: str = "wall", stat: str = "median") -> float:
    """Median milliseconds of one ``fn()`` call over ``repeats`` samples
    (``stat='min'``: the fastest sample instead; on a contended machine other
    work only ever adds time, so the minimum is the least noisy estimate).

    ``clock='wall'`` (the default, what a user's budget means) times wall-clock
    seconds. ``clock='cpu'`` times the process's CPU seconds instead: on an
    oversubscribed machine, wall time of any op longer than a scheduler slice
    includes other processes' turns, while CPU time does not. It equals wall
    time only with one intra-op thread (``torch.set_num_threads(1)``) on CPU;
    it is meaningless for CUDA.
    """
    device = torch.device(device)
    now = CLOCKS[clock]
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        _sync(device)
        t = now()
        fn()
        _sync(device)
        one = max(now() - t, 1e-6)
        inner = int(min(MAX_INNER, max(1, MIN_SAMPLE_S // one)))
        samples = []
        for _ in range(max(1, repeats)):
            _sync(device)
            t = now()
            for _ in range(inner):
                fn()
            _sync(device)
            samples.append((now() - t) / inner)
    return 1e3 * (min(samples) if stat == "min" else statistics.median(samples))


def _isotonic(y: np.ndarray) -> np.ndarray:
    """Non-decreasing least-squares fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight]
    for v in y:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2 = blocks.pop()
            m1, w1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    return np.concatenate([[m] * int(w) for m, w in blocks])


@dataclass
class Curve:
    macs: np.ndarray  # increasing
    ms: np.ndarray  # non-decreasing
    ranks: list[tuple[int, ...]]
    raw_ms: list[float]

    def at(self, macs: float) -> float:
        x, y = self.macs, self.ms
        if len(x) == 1:
            return float(y[0] * macs / max(x[0], 1))
        if macs <= x[-1]:
            return float(np.interp(macs, x, y))
        slope = (y[-1] - y[-2]) / max(x[-1] - x[-2], 1)
        return float(y[-1] + max(slope, 0.0) * (macs - x[-1]))


@dataclass
class LayerLatency:
    dense_ms: float
    curves: dict[str, Curve] = field(default_factory=dict)


@dataclass
class LatencyTable:
    layers: dict[str, LayerLatency]
    total_ms: float
    other_ms: float
    batch: int
    device: str
    seconds: float = 0.0
    clock: str = "wall"
    align: int = 1

    def layer_ms(self, layer: LayerInfo, form: str | None, ranks: tuple[int, ...] | None) -> float:
        """Latency of ``layer`` dense (form None) or in ``form`` at ``ranks``.
        Every layer of the inventory is timed dense (a non-decomposable one
        has no factorised curves)."""
        entry = self.layers.get(layer.name)
        if entry is None:
            raise KeyError(f"layer {layer.name} has no latency measurement")
        if form is None:
            return entry.dense_ms
        curve = entry.curves.get(form)
        if curve is None:
            raise KeyError(f"layer {layer.name}: form {form!r} was not measured (measured: {sorted(entry.curves)})")
        return curve.at(factored_cost(layer, form, aligned(layer, form, ranks, self.align)).macs)  # type: ignore

    @property
    def dense_sum_ms(self) -> float:
        return sum(e.dense_ms for e in self.layers.values())

    def to_dict(self) -> dict:
        return {
            "batch": self.batch,
            "device": self.device,
            "total_ms": self.total_ms,
            "other_ms": self.other_ms,
            "seconds": self.seconds,
            "clock": self.clock,
            "align": self.align,
            "layers": {
                name: {
                    "dense_ms": e.dense_ms,
                    "forms": {f: {"ranks": [list(r) for r in c.ranks], "ms": c.raw_ms} for f, c in e.curves.items()},
                }
                for name, e in self.layers.items()
            },
        }


def dense_module(layer: LayerInfo) -> nn.Module:
    if layer.kind == "linear":
        return nn.Linear(layer.c_in, layer.c_out, bias=layer.has_bias)
    return nn.Conv2d(layer.c_in, layer.c_out, layer.kernel, layer.stride, layer.padding, layer.dilation,
                     layer.groups, bias=layer.has_bias)


def factored_module(layer: LayerInfo, form: str, ranks: tuple[int, ...]) -> nn.Module:
    """A factorised module of the layer's shapes (random weights: timing only)."""
    ranks = tuple(int(r) for r in ranks)
    if layer.kind == "linear":
        return F.SVDLinear(layer.c_in, layer.c_out, ranks, bias=layer.has_bias)  # type: ignore[arg-type]
    if form == "svd":
        return F.SVDConv1x1(layer.c_in, layer.c_out, ranks, stride=layer.stride, padding=layer.padding,  # type: ignore
                            dilation=layer.dilation, bias=layer.has_bias)
    cls = F.FORMS[form]
    return cls(layer.c_in, layer.c_out, ranks, layer.kernel, stride=layer.stride, padding=layer.padding,  # type: ignore
               dilation=layer.dilation, bias=layer.has_bias)


def aligned(layer: LayerInfo, form: str, ranks: tuple[int, ...], align: int) -> tuple[int, ...]:
    """Ranks rounded up to a multiple of ``align``, capped at each mode's maximum."""
    lim = max_ranks(form, layer.c_out, layer.c_in, *layer.kernel)
    return tuple(min(m, -(-int(r) // align) * align) for r, m in zip(ranks, lim))


def grid_ranks(layer: LayerInfo, form: str, align: int = 1) -> list[tuple[int, ...]]:
    lim = max_ranks(form, layer.c_out, layer.c_in, *layer.kernel)
    out: list[tuple[int, ...]] = []
    for t in GRID:
        r = aligned(layer, form, tuple(max(1, min(m, round(t * m))) for m in lim), align)
        if r not in out:
            out.append(r)
    return out


def _site_scale(layer: LayerInfo) -> float:
    first = layer.sites[0].out_positions or 1
    return sum(s.out_positions for s in layer.sites) / first


def build_latency_table(gm: torch.fx.GraphModule, inventory: Inventory, spec: InputSpec, batch: int = 1,
                        device: str | torch.device = "cpu", repeats: int = 15, progress: Progress = silent,
                        forms: tuple[str, ...] | None = None, clock: str = "wall",
                        align: int | None = None, stat: str = "median") -> LatencyTable:
    """Measure the table for ``gm`` (see the module docstring). ``forms`` limits
    the forms timed (default: every form each layer has); ``clock``: see
    ``time_call``; ``stat``: see ``time_call``; ``align``: rank block (default 16 on CPU, 8 on CUDA)."""
    t0 = time.perf_counter()
    dev = torch.device(device)
    align = align or (8 if dev.type == "cuda" else 16)
    layers: dict[str, LayerLatency] = {}
    todo = inventory.layers
    for i, layer in enumerate(todo):
        progress("latency", i / max(len(todo), 1), f"timing {layer.name}")
        x = torch.randn(batch, *layer.in_shape, device=dev)
        scale = _site_scale(layer)
        dense = dense_module(layer).to(dev).eval()
        entry = LayerLatency(scale * time_call(lambda: dense(x), dev, repeats, clock=clock, stat=stat))  # noqa: B023
        for form in layer.forms:
            if forms is not None and form not in forms and form != "svd":  # svd: 1x1/linear, always needed
                continue
            ranks_list = grid_ranks(layer, form, align)
            raw = []
            for ranks in ranks_list:
                mod = factored_module(layer, form, ranks).to(dev).eval()
                raw.append(scale * time_call(lambda: mod(x), dev, repeats, clock=clock, stat=stat))  # noqa: B023
            macs = np.array([factored_cost(layer, form, r).macs for r in ranks_list], dtype=np.float64)
            order = np.argsort(macs, kind="stable")
            entry.curves[form] = Curve(macs[order], _isotonic(np.array(raw)[order]), ranks_list, raw)
        layers[layer.name] = entry
    gm = gm.to(dev).eval()
    example = tuple(t.to(dev) for t in spec.example(batch))
    total = time_call(lambda: gm(*example), dev, repeats, clock=clock, stat=stat)
    dense_sum = sum(e.dense_ms for e in layers.values())
    progress("latency", 1.0, f"model {total:.3g} ms at batch {batch}")
    return LatencyTable(layers, total, max(total - dense_sum, 0.0), batch, str(dev), time.perf_counter() - t0,
                        clock, align)


def measure_model(module: nn.Module, spec: InputSpec, batch: int = 1, device: str | torch.device = "cpu",
                  repeats: int = 15, clock: str = "wall", stat: str = "median") -> float:
    """Median ms of one forward pass of ``module`` at ``batch`` on ``device``."""
    dev = torch.device(device)
    module = module.to(dev).eval()
    example = tuple(t.to(dev) for t in spec.example(batch))
    return time_call(lambda: module(*example), dev, repeats, clock=clock, stat=stat)
