"""Refuse a budget no rank choice can meet at job creation, when the model's layer table
is already known (it was inspected at upload with the same input shape).

The engine's own check (``compression.ranks.base.Meter.check_reachable``) runs on a layer
table rebuilt from the stored inventory, so the API and the worker say the same thing.
Where the table cannot be rebuilt exactly (a weight called more than once, an old or
odd inventory) nothing is decided here: the worker checks again and fails the job with
``invalid_budget``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from app.problems import Unprocessable

log = logging.getLogger(__name__)


@dataclass
class _Context:
    """The two things ``Meter.check_reachable`` reads of a selection context."""

    inventory: Any
    form: str

    def forms_for(self, layer: Any) -> tuple[str, ...]:
        from compression.plan import default_form

        return (default_form(layer, self.form),)


def rebuild_inventory(data: dict[str, Any]) -> Any | None:
    """An ``Inventory`` from its ``to_dict()``, or None when that would not be exact."""
    from compression.inventory import CallSite, Inventory, LayerInfo

    layers = []
    for d in data["layers"]:
        if d["call_sites"] != 1:
            return None
        padding = d["padding"] if isinstance(d["padding"], str) else tuple(d["padding"])
        layer = LayerInfo(
            name=d["name"], weight=f"{d['name']}.weight", bias=f"{d['name']}.bias" if d["bias"] else None,
            kind=d["kind"], c_out=int(d["out_channels"]), c_in=int(d["in_channels"]), kernel=tuple(d["kernel"]),
            stride=tuple(d["stride"]), padding=padding, dilation=tuple(d["dilation"]), groups=int(d["groups"]),
            sites=[CallSite(d["name"], tuple(d["in_shape"]), tuple(d["out_shape"]), d["kind"])],
            skip_reason=d["skip_reason"],
        )
        if layer.macs != d["macs"] or layer.params != d["params"]:
            return None  # the cost model disagrees with what was stored: not ours to decide
        layers.append(layer)
    return Inventory(layers, int(data["total_macs"]), int(data["total_params"]))


def check_budget_reachable(inventory: dict[str, Any] | None, budget: str, form: str, field: str = "budget") -> None:
    """422 ``invalid_budget`` (naming ``field``) with the largest reachable reduction when
    even rank 1 in every decomposable layer misses the budget."""
    from compression.budget import Budget
    from compression.errors import BudgetError
    from compression.ranks.base import Meter

    if not inventory:
        return
    try:
        parsed = Budget.parse(budget)
        if parsed.metric == "latency":
            return  # measured on the worker's device
        inv = rebuild_inventory(inventory)
        if inv is None:
            return
        Meter(inv, parsed).check_reachable(_Context(inv, form))  # type: ignore[arg-type]
    except BudgetError as exc:
        message = exc.message if field == "budget" else f"{budget!r} in {field}: {exc.message}"
        raise Unprocessable(message, code=exc.code, field=field) from None
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        log.warning("budget pre-check skipped: stored inventory not usable (%s)", exc)
