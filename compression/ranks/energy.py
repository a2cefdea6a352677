"""``energy``: one global singular-value energy threshold for every layer.

Each layer keeps, per mode, the smallest rank whose singular values retain a
fraction ``e`` of the squared spectrum of that mode's unfolding (Tucker-2: the
C_out and C_in unfoldings; SVD: the matrix). CP forms have no per-mode spectrum,
so they take the smallest rank whose predicted error (``spectra.predicted_error``)
is at most sqrt(1 - e). ``e`` is found by bisection so the network meets the
budget, then ``fill_to_budget`` spends the slack integer ranks leave.

Forms: with ``ctx.form == 'auto'`` each layer takes, at the cost its Tucker-2 (or
SVD) energy ranks would have, the form with the lowest predicted error
(``fill.best_form_within``), so forms are mixed across layers. With
``ctx.options['tied']`` Tucker-2 ranks are tied: r = max of the two energy ranks.
"""

from __future__ import annotations

from compression.inventory import LayerInfo
from compression.plan import RankPlan
from compression.ranks.base import Meter, RankSelector, SelectionContext, bisect_knob, plan_from_choice
from compression.ranks.fill import below_break_even, best_form_within, fill_to_budget, limits, tied, tied_ranks
from compression.ranks.spectra import Spectra, predicted_error, spectra_for


def energy_ranks(ctx: SelectionContext, layer: LayerInfo, form: str, e: float, spectra: Spectra) -> tuple[int, ...]:
    """Ranks of ``layer`` in ``form`` at energy fraction ``e``."""
    sp = spectra.get(layer)
    lim = limits(layer, form)
    if form == "svd":
        return (min(sp.energy_rank("out", e), lim[0]),)
    if form == "tucker2":
        r_in, r_out = min(sp.energy_rank("in", e), lim[0]), min(sp.energy_rank("out", e), lim[1])
        return tied_ranks(layer, max(r_in, r_out)) if tied(ctx) else (r_in, r_out)
    # CP: smallest rank whose predicted error is <= sqrt(1 - e) (monotone in the rank).
    allowed = max(1.0 - e, 0.0) ** 0.5
    lo, hi = 1, lim[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if predicted_error(layer, form, (mid,), spectra) <= allowed + 1e-12:
            hi = mid
        else:
            lo = mid + 1
    return (lo,)


def choose(ctx: SelectionContext, meter: Meter, spectra: Spectra, e: float) -> dict:
    """The choice at energy ``e``: layers past break-even stay dense."""
    choice = {}
    for layer in ctx.candidates():
        if ctx.form == "auto":
            ref = "tucker2" if "tucker2" in layer.forms else layer.forms[0]
            ranks = energy_ranks(ctx, layer, ref, e, spectra)
            picked = best_form_within(ctx, meter, layer, meter.layer_cost(layer, ref, ranks), spectra)
            if picked is not None:
                choice[layer.name] = picked
            continue
        form = ctx.forms_for(layer)[0]
        ranks = energy_ranks(ctx, layer, form, e, spectra)
        if below_break_even(meter, layer, form, ranks):
            choice[layer.name] = (form, ranks)
    return choice


class Energy(RankSelector):
    name = "energy"
    summary = "one global singular-value energy threshold, bisected to the budget"

    def select(self, ctx: SelectionContext) -> RankPlan:
        meter = ctx.meter()
        meter.check_reachable(ctx)
        spectra = spectra_for(ctx)
        ctx.progress("ranks", 0.0, "energy: computing spectra")
        for layer in ctx.candidates():
            spectra.get(layer)
        ctx.progress("ranks", 0.3, "energy: bisecting the threshold")
        cache: dict[float, dict] = {}

        def build(e: float) -> dict:
            if e not in cache:
                cache[e] = choose(ctx, meter, spectra, e)
            return cache[e]

        choice = bisect_knob(build, meter, 0.0, 1.0, iters=50)
        choice = fill_to_budget(ctx, choice, meter=meter, spectra=spectra)
        ctx.progress("ranks", 1.0, "energy: done")
        errors = {n: predicted_error(ctx.inventory.by_name(n), f, r, spectra) for n, (f, r) in choice.items()}
        return plan_from_choice(ctx, choice, self.name, errors)
