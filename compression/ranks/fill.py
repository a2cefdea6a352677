"""Budget filling and form helpers shared by rank-selection methods.

``fill_to_budget(ctx, choice)`` is a greedy post-pass: while the budget still
holds it raises one rank of one layer by one step, always the step with the
largest predicted-error reduction per unit of added cost (squared relative
errors from ``spectra.predicted_error``). A knob found by bisection leaves slack
because ranks are integers; the fill spends it, so a method lands within 1 % of
the target whenever rank granularity allows. It only raises ranks of layers
already in ``choice`` (a layer a method left dense stays dense) and never goes
past break-even: a layer's factored cost must stay below its dense cost in MACs,
in parameters, and in the budget's own metric (e.g. measured latency).

``tied(ctx)`` tells whether Tucker-2 ranks are tied (``ctx.options['tied']``):
then R_in = R_out = r (each capped at its mode's maximum) and the fill raises r.
"""

from __future__ import annotations

import heapq
import math

from compression.costs import dense_cost, factored_cost
from compression.forms import max_ranks
from compression.inventory import LayerInfo
from compression.ranks.base import Meter, SelectionContext
from compression.ranks.spectra import Spectra, predicted_error, spectra_for

Choice = dict[str, tuple[str, tuple[int, ...]]]

__all__ = ["Choice", "below_break_even", "best_form_within", "fill_to_budget", "limits", "tied", "tied_ranks"]


def tied(ctx: SelectionContext) -> bool:
    return bool(ctx.options.get("tied", False))


def limits(layer: LayerInfo, form: str) -> tuple[int, ...]:
    return max_ranks(form, layer.c_out, layer.c_in, *layer.kernel)


def tied_ranks(layer: LayerInfo, r: int) -> tuple[int, int]:
    """Tucker-2 ranks (R_in, R_out) tied at ``r``, each capped at its mode's maximum."""
    m_in, m_out = limits(layer, "tucker2")
    return (max(1, min(r, m_in)), max(1, min(r, m_out)))


def below_break_even(meter: Meter, layer: LayerInfo, form: str, ranks: tuple[int, ...]) -> bool:
    """True when the factorised layer is cheaper than the dense one in MACs, in
    parameters and in the budget's metric (no plan may make a layer costlier)."""
    d, f = dense_cost(layer), factored_cost(layer, form, ranks)
    if f.macs >= d.macs or f.params >= d.params:
        return False
    if meter.budget.metric == "latency":
        return meter.layer_cost(layer, form, ranks) < meter.layer_cost(layer, None, None)
    return True


def _sq_err(layer: LayerInfo, form: str, ranks: tuple[int, ...], spectra: Spectra) -> float:
    return predicted_error(layer, form, ranks, spectra) ** 2


def _moves(ctx: SelectionContext, layer: LayerInfo, form: str, ranks: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Rank tuples one step above ``ranks`` (one per mode, or one tied step)."""
    lim = limits(layer, form)
    if form == "tucker2" and tied(ctx):
        r = max(ranks)
        if r >= max(lim):
            return []
        nxt = tied_ranks(layer, r + 1)
        return [nxt] if nxt != tuple(ranks) else []
    out = []
    for i, (r, m) in enumerate(zip(ranks, lim)):
        if r < m:
            out.append(tuple(r + 1 if j == i else x for j, x in enumerate(ranks)))
    return out


def fill_to_budget(ctx: SelectionContext, choice: Choice, *, meter: Meter | None = None,
                   spectra: Spectra | None = None, caps: dict[str, tuple[int, ...]] | None = None,
                   max_steps: int = 1_000_000) -> Choice:
    """Raise ranks greedily (best predicted-error reduction per unit cost first)
    while the whole network still fits the budget. ``caps`` optionally bounds
    each layer's ranks (a method that must keep its own character, like
    ``uniform``, passes them). Returns a new choice; the input is not modified.
    A choice already over budget is returned unchanged."""
    meter = meter or ctx.meter()
    spectra = spectra or spectra_for(ctx)
    choice = dict(choice)
    layers = {layer.name: layer for layer in ctx.inventory.layers if layer.name in choice}
    slack = meter.target * (1 + 1e-9) - meter.total(choice)
    if slack < 0:
        return choice
    heap: list = []
    version = dict.fromkeys(layers, 0)
    cur_cost = {n: meter.layer_cost(layers[n], *choice[n]) for n in layers}
    cur_err = {n: _sq_err(layers[n], *choice[n], spectra) for n in layers}

    def push(name: str) -> None:
        layer = layers[name]
        form, ranks = choice[name]
        for nxt in _moves(ctx, layer, form, ranks):
            cap = (caps or {}).get(name)
            if cap is not None and any(r > c for r, c in zip(nxt, cap)):
                continue
            if not below_break_even(meter, layer, form, nxt):
                continue
            dc = meter.layer_cost(layer, form, nxt) - cur_cost[name]
            gain = cur_err[name] - _sq_err(layer, form, nxt, spectra)
            prio = math.inf if dc <= 0 else gain / dc
            # max-heap on priority, then cheaper steps first
            heapq.heappush(heap, (-prio, dc, name, version[name], nxt))

    for name in layers:
        push(name)
    steps = 0
    while heap and steps < max_steps:
        _, dc, name, ver, nxt = heapq.heappop(heap)
        if ver != version[name]:
            continue
        if dc > slack:
            # Slack only shrinks, so this step will never fit; the layer's other
            # moves stay queued (they may be cheaper).
            continue
        form = choice[name][0]
        choice[name] = (form, nxt)
        slack -= dc
        cur_cost[name] += dc
        cur_err[name] = _sq_err(layers[name], form, nxt, spectra)
        version[name] += 1
        steps += 1
        push(name)
    return choice


def best_form_within(ctx: SelectionContext, meter: Meter, layer: LayerInfo, cap: float,
                     spectra: Spectra, forms: tuple[str, ...] | None = None,
                     ) -> tuple[str, tuple[int, ...]] | None:
    """For ``ctx.form == 'auto'``: among ``forms`` (default: the layer's), the
    (form, ranks) with the lowest predicted error whose cost in the budget's
    metric is at most ``cap`` (and below break-even). Tucker-2 is searched over
    tied ranks when ``tied(ctx)``, else over the energy-balanced path (both mode
    tails equal) plus a bisection on the cost; CP/SVD over the single rank.
    Returns None when nothing fits."""
    best: tuple[float, str, tuple[int, ...]] | None = None
    for form in forms or ctx.forms_for(layer):
        cand = _largest_within(ctx, meter, layer, form, cap, spectra)
        if cand is None:
            continue
        err = predicted_error(layer, form, cand, spectra)
        if best is None or err < best[0] - 1e-12:
            best = (err, form, cand)
    return None if best is None else (best[1], best[2])


def _largest_within(ctx: SelectionContext, meter: Meter, layer: LayerInfo, form: str, cap: float,
                    spectra: Spectra) -> tuple[int, ...] | None:
    lim = limits(layer, form)
    if form == "tucker2":
        sp = spectra.get(layer)
        if tied(ctx):
            path = lambda r: tied_ranks(layer, r)  # noqa: E731
            top = max(lim)
        else:
            # Walk the path where both modes keep the same energy fraction.
            def path(k: int) -> tuple[int, int]:
                e = k / 1000
                return (min(sp.energy_rank("in", e), lim[0]), min(sp.energy_rank("out", e), lim[1]))
            top = 1000
    else:
        path = lambda r: (r,)  # noqa: E731
        top = lim[0]

    def ok(k: int) -> bool:
        ranks = path(k)
        return below_break_even(meter, layer, form, ranks) and meter.layer_cost(layer, form, ranks) <= cap

    lo, hi = 0, top  # invariant: ok(lo) or lo == 0
    if not ok(1):
        return None
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return path(lo)
