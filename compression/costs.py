"""The cost model: MACs and parameters of a layer, dense or factorised.

The one place that knows what each form costs. MACs are per sample (batch 1),
summed over every call site of a (possibly shared) weight. Bias is counted in
params for dense and factorised forms alike and ignored in MACs, as
``torch.utils.flop_counter`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from compression.inventory import LayerInfo


@dataclass(frozen=True)
class Cost:
    macs: int
    params: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.macs + other.macs, self.params + other.params)


FORMS_FOR_KIND = {
    # which factorised forms exist for which layer kind
    "conv2d": ("tucker2", "cp", "cp4"),
    "conv2d_1x1": ("svd",),
    "linear": ("svd",),
}


def forms_for(layer: LayerInfo) -> tuple[str, ...]:
    if layer.kind == "conv2d" and layer.kernel == (1, 1):
        return FORMS_FOR_KIND["conv2d_1x1"]
    return FORMS_FOR_KIND.get(layer.kind, ())


def dense_cost(layer: LayerInfo) -> Cost:
    kh, kw = layer.kernel
    per_out = kh * kw * (layer.c_in // layer.groups) * layer.c_out
    macs = sum(site.out_positions * per_out for site in layer.sites)
    params = per_out + (layer.c_out if layer.has_bias else 0)
    return Cost(macs, params)


def factored_cost(layer: LayerInfo, form: str, ranks: tuple[int, ...]) -> Cost:
    """Cost of ``layer`` replaced by ``form`` at ``ranks``.

    tucker2: ranks (R_in, R_out): 1x1 C_in->R_in at the input resolution,
             kxk core R_in->R_out at the output resolution, 1x1 R_out->C_out.
    cp:      rank (R,): 1x1 C_in->R, depthwise kxk, 1x1 R->C_out.
    cp4:     rank (R,): 1x1 C_in->R, depthwise kx1 (vertical stride), 1xk, 1x1 R->C_out.
    svd:     rank (R,): two linear maps / 1x1 convs (the stride goes in the first).
    """
    kh, kw = layer.kernel
    c_in, c_out = layer.c_in, layer.c_out
    bias = c_out if layer.has_bias else 0
    if form == "tucker2":
        r_in, r_out = ranks
        per_site = (c_in * r_in, kh * kw * r_in * r_out, r_out * c_out)
        macs = sum(
            s.in_positions * per_site[0] + s.out_positions * (per_site[1] + per_site[2]) for s in layer.sites
        )
        return Cost(macs, sum(per_site) + bias)
    (r,) = ranks
    if form == "cp":
        macs = sum(s.in_positions * c_in * r + s.out_positions * (kh * kw * r + r * c_out) for s in layer.sites)
        return Cost(macs, c_in * r + kh * kw * r + r * c_out + bias)
    if form == "cp4":
        macs = sum(
            s.in_positions * c_in * r + s.mid_positions * kh * r + s.out_positions * (kw * r + r * c_out)
            for s in layer.sites
        )
        return Cost(macs, c_in * r + (kh + kw) * r + r * c_out + bias)
    if form == "svd":
        macs = sum(s.out_positions * r * (c_in + c_out) for s in layer.sites)
        return Cost(macs, r * (c_in + c_out) + bias)
    raise ValueError(f"unknown form {form!r}")


def spatial(shape: tuple[int, ...]) -> int:
    """Positions a per-position map runs over: H*W for a conv, tokens for a linear."""
    return prod(shape)
