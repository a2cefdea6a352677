"""``uniform``: one rank ratio for every layer (as tensorly-torch's ``rank=0.5``),
the ratio found by bisection so the whole network meets the budget.

To land within 1 % of the budget despite integer ranks, the bisected ratio's
ranks are then rounded *up* (never past ceil(ratio * max rank) per mode) in the
layers where the remaining budget slack allows, best predicted-error reduction
per unit cost first (``fill_to_budget`` with caps). So every layer's rank stays
within one step of the common ratio: the method stays uniform, and comparisons
against it are honest. Only when that still leaves the network more than 1 %
under the target (tiny layers whose single rank step is a large share of the
budget) does an uncapped fill spend the rest; the plan's note names the layers
raised past the ratio. With ``ctx.options['tied']`` Tucker-2 ranks are tied at
ratio * min(C_in, C_out).
"""

from __future__ import annotations

import math

from compression.plan import RankPlan
from compression.ranks.base import (
    BUDGET_TOLERANCE,
    Meter,
    RankSelector,
    SelectionContext,
    bisect_knob,
    plan_from_choice,
)
from compression.ranks.fill import below_break_even, fill_to_budget, limits, tied, tied_ranks
from compression.ranks.spectra import predicted_error, spectra_for


class Uniform(RankSelector):
    name = "uniform"
    summary = "the same rank ratio in every layer (the common default)"

    def select(self, ctx: SelectionContext) -> RankPlan:
        meter = ctx.meter()
        meter.check_reachable(ctx)
        ratio, choice = _bisect(ctx, meter)
        caps = {n: _ranks_at(ctx, ctx.inventory.by_name(n), f, ratio, math.ceil) for n, (f, _) in choice.items()}
        spectra = spectra_for(ctx)
        choice = fill_to_budget(ctx, choice, meter=meter, spectra=spectra, caps=caps)
        note = f"ratio {ratio:.4f}"
        if meter.total(choice) < meter.target * (1 - BUDGET_TOLERANCE):
            # Rank steps too coarse (tiny layers): spend the rest without caps, and say so.
            filled = fill_to_budget(ctx, choice, meter=meter, spectra=spectra)
            raised = sorted(n for n in filled if filled[n] != choice[n])
            choice = filled
            if raised:
                note += f"; {len(raised)} layer(s) raised past the ratio to meet the budget: {', '.join(raised)}"
        errors = {n: predicted_error(ctx.inventory.by_name(n), f, r, spectra) for n, (f, r) in choice.items()}
        return plan_from_choice(ctx, choice, self.name, errors, note=note)


def _ranks_at(ctx: SelectionContext, layer, form: str, ratio: float, rnd=round) -> tuple[int, ...]:
    lim = limits(layer, form)
    if form == "tucker2" and tied(ctx):
        return tied_ranks(layer, max(1, rnd(ratio * min(lim))))
    return tuple(max(1, min(m, rnd(ratio * m))) for m in lim)


def _bisect(ctx: SelectionContext, meter: Meter) -> tuple[float, dict]:
    """The largest common rank ratio over ``ctx.candidates()`` that meets the budget, and its choice."""
    layers = ctx.candidates()

    def build(ratio: float) -> dict:
        choice = {}
        for layer in layers:
            form = ctx.forms_for(layer)[0]
            ranks = _ranks_at(ctx, layer, form, ratio)
            if below_break_even(meter, layer, form, ranks):
                choice[layer.name] = (form, ranks)
        return choice

    ratio_box = [0.0]

    def build_tracking(ratio: float) -> dict:
        choice = build(ratio)
        if meter.fits(meter.total(choice)):
            ratio_box[0] = max(ratio_box[0], ratio)
        return choice

    choice = bisect_knob(build_tracking, meter, 0.0, 1.0)
    return ratio_box[0], choice


def uniform_ratio(ctx: SelectionContext, meter: Meter) -> float:
    """The rank ratio a uniform split of ``ctx.budget`` gives every candidate layer."""
    return _bisect(ctx, meter)[0]
