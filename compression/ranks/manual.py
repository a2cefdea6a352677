"""``manual``: per-layer ranks given by the user.

``ctx.options['ranks']`` maps layer names (as ``tensortrim inspect`` lists them)
to either a list of ranks in the form's order (Tucker-2: ``[R_in, R_out]``; CP,
CP-4 and SVD: ``[R]``; a bare int is ``[R]``), a float ratio in (0, 1] of the
layer's maximum ranks, or a
dict ``{"form": "cp", "ranks": [16]}`` / ``{"form": "tucker2", "ratio": 0.3}``.
Layers not named stay dense. ``ctx.options['default']`` (a ratio) optionally
applies to every decomposable layer not named.

Everything is checked up front and reported with ``RankError``: unknown layer
names (the message lists valid ones), layers that cannot be decomposed (and
why), forms the layer does not have, and ranks outside 1..max (the message
names the allowed range). A choice past break-even (the factorised layer would
cost more than the dense one) is left dense and recorded in ``plan.dense``. The
budget is not enforced (the user chose the ranks); a plan over budget says so
in its note.
"""

from __future__ import annotations

from compression.errors import RankError
from compression.inventory import LayerInfo
from compression.plan import RankPlan, default_form
from compression.ranks.base import RankSelector, SelectionContext, plan_from_choice
from compression.ranks.fill import limits, tied, tied_ranks
from compression.ranks.spectra import predicted_error, spectra_for


def _form_for(ctx: SelectionContext, layer: LayerInfo, form: str | None) -> str:
    if form is None:
        form = "tucker2" if ctx.form == "auto" else ctx.form
        return default_form(layer, form)
    if form not in layer.forms:
        raise RankError(f"layer {layer.name}: form {form!r} is not available (choose from {', '.join(layer.forms)})")
    return form


def _ratio_ranks(ctx: SelectionContext, layer: LayerInfo, form: str, ratio: float) -> tuple[int, ...]:
    if isinstance(ratio, bool) or not 0 < ratio <= 1:
        raise RankError(f"layer {layer.name}: rank ratio {ratio!r} must be in (0, 1]")
    lim = limits(layer, form)
    if form == "tucker2" and tied(ctx):
        return tied_ranks(layer, max(1, round(ratio * min(lim))))
    return tuple(max(1, min(m, round(ratio * m))) for m in lim)


def parse_entry(ctx: SelectionContext, layer: LayerInfo, value: object) -> tuple[str, tuple[int, ...]]:
    """One user entry -> checked (form, ranks)."""
    form = None
    if isinstance(value, dict):
        unknown = set(value) - {"form", "ranks", "ratio"}
        if unknown or ("ranks" in value) == ("ratio" in value):
            raise RankError(f"layer {layer.name}: give {{'form': ..., 'ranks': [...]}} or {{'form': ..., 'ratio': r}}")
        form = value.get("form")
        value = value["ranks"] if "ranks" in value else value["ratio"]
    form = _form_for(ctx, layer, form)
    lim = limits(layer, form)
    if isinstance(value, float):  # a ratio; an int is one rank
        return form, _ratio_ranks(ctx, layer, form, float(value))
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(r, int) and not isinstance(r, bool) for r in value):
        raise RankError(f"layer {layer.name}: ranks must be a list of integers or a ratio in (0, 1], got {value!r}")
    ranks = tuple(value)
    order = "[R_in, R_out]" if form == "tucker2" else "[R]"
    if len(ranks) != len(lim):
        raise RankError(f"layer {layer.name}: form {form} takes {len(lim)} rank(s) {order}, got {list(ranks)}")
    for r, m, mode in zip(ranks, lim, ("R_in", "R_out") if form == "tucker2" else ("R",)):
        if not 1 <= r <= m:
            raise RankError(f"layer {layer.name}: {mode}={r} is out of range for {form}: allowed 1..{m} "
                            f"(ranks {order} within 1..{list(lim)})")
    return form, ranks


class Manual(RankSelector):
    name = "manual"
    summary = "per-layer ranks given by the user"

    def select(self, ctx: SelectionContext) -> RankPlan:
        given = ctx.options.get("ranks")
        default = ctx.options.get("default")
        if not isinstance(given, dict) or (not given and default is None):
            raise RankError("method 'manual' needs options['ranks'] = {layer name: [ranks] or ratio}")
        names = {layer.name: layer for layer in ctx.inventory.layers}
        unknown = sorted(set(given) - set(names))
        if unknown:
            valid = ", ".join(layer.name for layer in ctx.inventory.decomposable)
            raise RankError(f"unknown layer name(s) {', '.join(map(repr, unknown))}; decomposable layers: {valid}")
        choice = {}
        for name, value in given.items():
            layer = names[name]
            if not layer.decomposable:
                raise RankError(f"layer {name} cannot be decomposed: {layer.skip_reason}")
            choice[name] = parse_entry(ctx, layer, value)
        if default is not None:
            for layer in ctx.inventory.decomposable:
                if layer.name not in choice:
                    form = _form_for(ctx, layer, None)
                    choice[layer.name] = (form, _ratio_ranks(ctx, layer, form, float(default)))
        spectra = spectra_for(ctx)
        errors = {n: predicted_error(names[n], f, r, spectra) for n, (f, r) in choice.items()}
        return plan_from_choice(ctx, choice, self.name, errors)
