"""One interface for every rank-selection method.

A method gets a ``SelectionContext`` (editable graph, inventory, budget,
optional data, progress callback) and returns a ``RankPlan``. The budget
arithmetic lives in ``Meter`` so every method hits the budget the same way.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx

from compression.budget import Budget
from compression.costs import factored_cost
from compression.errors import BudgetError, TensorTrimError
from compression.forms import max_ranks
from compression.input_spec import InputSpec
from compression.inventory import Inventory, LayerInfo
from compression.plan import LayerPlan, RankPlan, default_form, layer_plan
from compression.progress import Progress, silent

BUDGET_TOLERANCE = 0.01  # every method lands within 1 % of the target (or as close as ranks allow)
# Which layers a method may factorise by default: k x k convolutions with at least
# MIN_WEIGHTS weights and more than STEM_CHANNELS input channels. Measured on
# Fashion-MNIST (bench/quality.py, 3x fewer MACs): factorising every layer cut the
# stem (1 input channel) to an output rank of 4 and the 10-way classifier to rank 5,
# leaving 15-26 % top-1 right after compression, where tensorly-torch, which
# factorises only such k x k convs, kept 68 %. 1x1 convs and linear layers save
# little and sit on residual shortcuts and at the logits; a stem's input mode
# cannot shrink, so its factorisation only narrows its output.
MIN_WEIGHTS = 512
STEM_CHANNELS = 4
# Options read outside the methods themselves (candidates, fill, rank floor), so any method takes them.
SHARED_OPTIONS = ("all_layers", "tied", "min_rank_share")


@dataclass
class Data:
    """Optional labelled (or unlabelled) samples for data-aware methods."""

    x: tuple[torch.Tensor, ...]
    y: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.x[0].shape[0])

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple[Data, Data]:
        n = len(self)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        k = max(1, int(round(n * val_fraction)))
        val, train = perm[:k], perm[k:]
        pick = lambda idx: Data(tuple(t[idx] for t in self.x), None if self.y is None else self.y[idx])  # noqa: E731
        return pick(train), pick(val)

    def batches(self, size: int, *, shuffle: bool = True, seed: int = 0):
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for i in range(0, n, size):
            idx = order[i : i + size]
            yield tuple(t[idx] for t in self.x), (None if self.y is None else self.y[idx])


@dataclass
class SelectionContext:
    gm: torch.fx.GraphModule
    inventory: Inventory
    spec: InputSpec
    budget: Budget
    form: str = "tucker2"  # form for kxk convs: "tucker2", "cp", "cp4", or "auto" (cheapest per layer)
    data: Data | None = None
    progress: Progress = silent
    device: str = "cpu"
    seed: int = 0
    options: dict = field(default_factory=dict)  # method-specific knobs (and ``all_layers``, see candidates)
    latency: object | None = None  # compression.latency.LatencyTable for latency budgets
    finetune_follows: bool = False  # the caller fine-tunes the factorised network (methods may tune for that)
    _candidates: tuple[list[LayerInfo], dict[str, str]] | None = field(default=None, init=False, repr=False)

    def candidates(self) -> list[LayerInfo]:
        """The layers a method may factorise: the k x k convolutions that matter (see
        MIN_WEIGHTS), or every decomposable layer when those alone cannot meet the budget
        (an MLP, a transformer, a parameter budget on a model whose weights sit in its
        linear layers). Option ``all_layers``: True always takes every layer, False never does."""
        if self._candidates is None:
            self._candidates = _candidates(self)
        return self._candidates[0]

    def kept_dense(self) -> dict[str, str]:
        """Why each decomposable layer outside ``candidates()`` stays dense."""
        self.candidates()
        return self._candidates[1]  # type: ignore[index]

    def forms_for(self, layer: LayerInfo) -> tuple[str, ...]:
        if self.form == "auto":
            return layer.forms
        return (default_form(layer, self.form),)

    def meter(self) -> Meter:
        return Meter(self.inventory, self.budget, self.latency)


class Meter:
    """Measures a choice of (form, ranks) per layer in the budget's metric."""

    def __init__(self, inventory: Inventory, budget: Budget, latency: object | None = None) -> None:
        self.inventory = inventory
        self.budget = budget
        self.latency = latency
        if budget.metric == "latency" and latency is None:
            raise BudgetError("a latency budget needs a measured latency table (compression.latency)")
        self.original = self.total({})
        self.target = budget.target(self.original)

    def layer_cost(self, layer: LayerInfo, form: str | None, ranks: tuple[int, ...] | None) -> float:
        if self.budget.metric == "latency":
            return self.latency.layer_ms(layer, form, ranks)  # type: ignore[union-attr]
        cost = layer.cost if form is None else factored_cost(layer, form, ranks)  # type: ignore[arg-type]
        return float(cost.macs if self.budget.metric == "flops" else cost.params)

    def fixed(self) -> float:
        """What the network costs outside its conv/linear layers."""
        if self.budget.metric == "latency":
            return self.latency.other_ms  # type: ignore[union-attr]
        if self.budget.metric == "flops":
            return float(self.inventory.other_macs)
        return float(self.inventory.total_params - sum(layer.params for layer in self.inventory.layers))

    def total(self, choice: dict[str, tuple[str, tuple[int, ...]]]) -> float:
        """Whole-network cost when the layers in ``choice`` take (form, ranks)."""
        total = self.fixed()
        for layer in self.inventory.layers:
            form, ranks = choice.get(layer.name, (None, None))
            total += self.layer_cost(layer, form, ranks)
        return total

    def fits(self, value: float) -> bool:
        return value <= self.target * (1 + 1e-9)

    def smallest(self, ctx: SelectionContext, layers: list[LayerInfo]) -> float:
        """Whole-network cost with rank 1 (in its cheapest form) in each of ``layers``."""
        floor = {}
        for layer in layers:
            best = min(
                ((f, (1,) * len(max_ranks(f, layer.c_out, layer.c_in, *layer.kernel))) for f in ctx.forms_for(layer)),
                key=lambda c: self.layer_cost(layer, *c),
            )
            if self.layer_cost(layer, *best) < self.layer_cost(layer, None, None):
                floor[layer.name] = best
        return self.total(floor)

    def check_reachable(self, ctx: SelectionContext) -> None:
        """Raise a clear error when even rank 1 everywhere misses the budget."""
        smallest = self.smallest(ctx, ctx.inventory.decomposable)
        if smallest > self.target:
            unit = {"flops": "MACs", "params": "parameters", "latency": "ms"}[self.budget.metric]
            raise BudgetError(
                f"budget {self.budget} cannot be met: even rank 1 in every decomposable layer leaves "
                f"{smallest:.4g} {unit} (the target is {self.target:.4g}, the original {self.original:.4g}); "
                f"the largest reachable reduction is {self.original / smallest:.2f}x"
            )


def _skip_reason(layer: LayerInfo) -> str | None:
    kh, kw = layer.kernel
    if layer.kind != "conv2d" or (kh, kw) == (1, 1):
        return "1x1 conv or linear layer: left to the k x k convolutions (method option all_layers includes it)"
    if layer.c_in <= STEM_CHANNELS:
        return f"only {layer.c_in} input channel(s): a factorisation could only narrow its output"
    if layer.c_out * layer.c_in * kh * kw < MIN_WEIGHTS:
        return f"fewer than {MIN_WEIGHTS} weights: too small to be worth a factorisation's error"
    return None


def _candidates(ctx: SelectionContext) -> tuple[list[LayerInfo], dict[str, str]]:
    every = [layer for layer in ctx.inventory.decomposable if layer.forms]
    wanted = ctx.options.get("all_layers")
    if wanted:
        return every, {}
    kept = {layer.name: why for layer in every if (why := _skip_reason(layer)) is not None}
    picked = [layer for layer in every if layer.name not in kept]
    meter = ctx.meter() if wanted is None and kept else None
    if meter is not None and (not picked or not meter.fits(meter.smallest(ctx, picked))):
        return every, {}  # the budget needs the other layers too
    return picked, kept


class RankSelector(ABC):
    """A rank-selection method. Subclasses set ``name`` and ``uses_data``."""

    name: ClassVar[str]
    uses_data: ClassVar[bool] = False
    summary: ClassVar[str] = ""

    @abstractmethod
    def select(self, ctx: SelectionContext) -> RankPlan: ...


def plan_from_choice(ctx: SelectionContext, choice: dict[str, tuple[str, tuple[int, ...]]], method: str,
                     errors: dict[str, float] | None = None, note: str = "") -> RankPlan:
    """Turn {layer: (form, ranks)} into a checked plan. Layers not in ``choice``,
    or whose choice would not be cheaper in the budget's metric, stay dense."""
    meter = ctx.meter()
    layers: list[LayerPlan] = []
    dense: dict[str, str] = {}
    for layer in ctx.inventory.layers:
        if not layer.decomposable:
            dense[layer.name] = layer.skip_reason or "not decomposable"
        elif layer.name not in choice:
            dense[layer.name] = ctx.kept_dense().get(layer.name, "kept dense by the method")
        else:
            form, ranks = choice[layer.name]
            if meter.layer_cost(layer, form, ranks) >= meter.layer_cost(layer, None, None):
                dense[layer.name] = "factorised form would not be cheaper (past break-even)"
                continue
            layers.append(layer_plan(layer, form, ranks, (errors or {}).get(layer.name)))
    total = meter.total({lp.name: (lp.form, lp.ranks) for lp in layers})
    miss = total / meter.target - 1
    if miss > BUDGET_TOLERANCE:
        note = (note + "; " if note else "") + f"over budget by {100 * miss:.2f} % (rank granularity)"
    return RankPlan(method, layers, dense, note)


def bisect_knob(build: Callable[[float], dict[str, tuple[str, tuple[int, ...]]]], meter: Meter,
                lo: float, hi: float, *, iters: int = 40, increasing: bool = True) -> dict:
    """Largest-cost choice that fits the budget for a monotone knob in [lo, hi].

    ``build(k)`` maps the knob to a choice; cost grows with k when ``increasing``.
    Returns the best fitting choice found (rank granularity may leave a gap).
    """
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        choice = build(mid)
        fits = meter.fits(meter.total(choice))
        if fits:
            best = choice
        if fits == increasing:
            lo = mid
        else:
            hi = mid
        if abs(hi - lo) < 1e-7 * max(abs(hi), 1):
            break
    if best is None:
        best = build(lo if increasing else hi)
    return best


def method_options(ctx: SelectionContext, method: str, defaults: dict, *, positive: Iterable[str] = (),
                   nullable: Iterable[str] = (), choices: dict[str, tuple] | None = None) -> dict:
    """``defaults`` overridden by ``ctx.options``, each value checked against its default's
    type, so a typo or a string where a number belongs fails here with the option's name
    rather than deep in a training loop. Numbers must be finite and >= 0 (> 0 for
    ``positive``); a whole number where the default is one; ``None`` only where the
    default is ``None`` or the key is ``nullable``. Unknown keys are an error too."""
    known = set(defaults) | set(SHARED_OPTIONS)
    unknown = sorted(set(ctx.options) - known)
    if unknown:
        raise TensorTrimError(f"unknown option(s) {', '.join(map(repr, unknown))} for method {method!r}: "
                              f"choose from {', '.join(sorted(known))}", code="invalid_options")
    nullable, positive, choices = set(nullable), set(positive), choices or {}
    merged = dict(defaults)
    for key, value in ctx.options.items():
        if key in defaults:
            merged[key] = _checked(method, key, value, defaults[key], key in nullable, key in positive,
                                   choices.get(key))
    return merged


def _checked(method: str, key: str, value, default, nullable: bool, positive: bool, choices: tuple | None):
    def bad(wanted: str) -> TensorTrimError:
        return TensorTrimError(f"method {method!r}: option {key!r} must be {wanted}, got {value!r}",
                               code="invalid_options")

    if value is None:
        if default is None or nullable:
            return None
        raise bad("given (null is not allowed)")
    if choices is not None:
        if value not in choices:
            raise bad("one of " + ", ".join(map(repr, choices)))
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    whole = isinstance(default, int)
    kind = "a whole number" if whole else "a number"
    sign = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"{kind} {sign}")
    if (whole and value != int(value)) or value < 0 or (positive and value == 0):
        raise bad(f"{kind} {sign}")
    return int(value) if whole else value
