"""A rank plan: what every layer becomes. Produced by a rank-selection method
(or by hand), consumed by the rewrite pass, shown in reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from compression.costs import Cost, dense_cost, factored_cost
from compression.errors import RankError
from compression.forms import max_ranks
from compression.inventory import Inventory, LayerInfo


@dataclass
class LayerPlan:
    name: str
    form: str
    ranks: tuple[int, ...]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    predicted_error: float | None = None  # relative Frobenius error of the weight, if known

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ranks"] = list(self.ranks)
        return d


@dataclass
class RankPlan:
    method: str
    layers: list[LayerPlan]
    dense: dict[str, str] = field(default_factory=dict)  # layer name -> why it stays dense
    note: str = ""

    def macs_after(self, inventory: Inventory) -> int:
        return inventory.total_macs - sum(lp.macs_before - lp.macs_after for lp in self.layers)

    def params_after(self, inventory: Inventory) -> int:
        return inventory.total_params - sum(lp.params_before - lp.params_after for lp in self.layers)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "layers": [lp.to_dict() for lp in self.layers],
            "dense": dict(self.dense),
            "note": self.note,
        }


def layer_plan(layer: LayerInfo, form: str, ranks: tuple[int, ...], error: float | None = None) -> LayerPlan:
    """A checked plan entry: the form must exist for the layer and ranks must fit."""
    if form not in layer.forms:
        raise RankError(f"layer {layer.name}: form {form!r} not available (choose from {', '.join(layer.forms)})")
    limits = max_ranks(form, layer.c_out, layer.c_in, *layer.kernel)
    ranks = tuple(int(r) for r in ranks)
    if len(ranks) != len(limits) or any(r < 1 or r > m for r, m in zip(ranks, limits)):
        raise RankError(f"layer {layer.name}: ranks {ranks} for {form} must be between 1 and {limits}")
    before: Cost = dense_cost(layer)
    after = factored_cost(layer, form, ranks)
    return LayerPlan(layer.name, form, ranks, before.macs, after.macs, before.params, after.params, error)


def default_form(layer: LayerInfo, conv_form: str = "tucker2") -> str:
    """The form used for a layer when the user names one form for all convs."""
    return conv_form if conv_form in layer.forms else layer.forms[0]


def ratio_ranks(layer: LayerInfo, form: str, ratio: float) -> tuple[int, ...]:
    """Ranks at ``ratio`` of each mode's maximum (at least 1)."""
    return tuple(max(1, round(ratio * m)) for m in max_ranks(form, layer.c_out, layer.c_in, *layer.kernel))


def plan_by_ratio(inventory: Inventory, ratio: float, conv_form: str = "tucker2", method: str = "ratio") -> RankPlan:
    """Every decomposable layer at ``ratio`` of its maximum ranks; a layer whose
    factorised form would cost more MACs than the dense layer stays dense."""
    if not 0 < ratio <= 1:
        raise RankError(f"rank ratio {ratio} must be in (0, 1]")
    layers, dense = [], {}
    for layer in inventory.layers:
        if not layer.decomposable:
            dense[layer.name] = layer.skip_reason or "not decomposable"
            continue
        form = default_form(layer, conv_form)
        lp = layer_plan(layer, form, ratio_ranks(layer, form, ratio))
        if ratio < 1 and lp.macs_after >= lp.macs_before:
            dense[layer.name] = "factorised form would not be cheaper at this rank"
            continue
        layers.append(lp)
    return RankPlan(method, layers, dense)
