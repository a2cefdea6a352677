"""Factorised layer forms: drop-in ``nn.Module`` replacements for dense layers.

Every form has ``form`` (class attribute), read-only ``ranks``,
``from_dense(weight, bias, *, ranks, ...)`` and ``to_dense()``, and is
scriptable (``torch.jit.script``) and exportable (``torch.export.export``).
"""

from __future__ import annotations

from torch import nn

from compression.errors import RankError
from compression.forms.cp import CP4Conv, CPConv
from compression.forms.svd import SVDConv1x1, SVDLinear
from compression.forms.tucker2 import Tucker2Conv

# "svd" names SVDLinear; use form_class() to get SVDConv1x1 for 1x1 conv weights.
FORMS: dict[str, type[nn.Module]] = {
    "tucker2": Tucker2Conv,
    "cp": CPConv,
    "cp4": CP4Conv,
    "svd": SVDLinear,
}


def form_class(form: str, weight_dim: int) -> type[nn.Module]:
    """Form class for a layer whose weight has ``weight_dim`` dims (2: linear, 4: conv)."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; known: {sorted(FORMS)}")
    if form == "svd" and weight_dim == 4:
        return SVDConv1x1
    return FORMS[form]


def max_ranks(form: str, c_out: int, c_in: int, kh: int = 1, kw: int = 1) -> tuple[int, ...]:
    """Largest meaningful ranks, in the form's ``ranks`` order.

    tucker2: (R_in, R_out), each bounded by its unfolding's rank. svd: min(out, in)
    (pass kh = kw = 1). cp/cp4: CP rank has no finite full-rank bound, so use the
    break-even rank C_out*C_in*kh*kw / (C_out + C_in + kh*kw), floored, >= 1.
    """
    if min(c_out, c_in, kh, kw) < 1:
        raise RankError(f"layer sizes must be >= 1, got {(c_out, c_in, kh, kw)}")
    k2 = kh * kw
    if form == "tucker2":
        return (min(c_in, c_out * k2), min(c_out, c_in * k2))
    if form == "svd":
        return (min(c_out, c_in * k2),)
    if form in ("cp", "cp4"):
        return (max(1, (c_out * c_in * k2) // (c_out + c_in + k2)),)
    raise ValueError(f"unknown form {form!r}; known: {sorted(FORMS)}")


__all__ = [
    "FORMS",
    "CP4Conv",
    "CPConv",
    "SVDConv1x1",
    "SVDLinear",
    "Tucker2Conv",
    "form_class",
    "max_ranks",
]
