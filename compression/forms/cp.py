"""CP factorised convs.

``CPConv`` (3 factors: 1x1 -> depthwise k x k -> 1x1) decomposes the 3-way
tensor (C_out, C_in, kh*kw); ``CP4Conv`` (Lebedev et al.: 1x1 -> depthwise k x 1
-> depthwise 1 x k -> 1x1) decomposes the 4-way weight itself.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from compression.forms.tucker2 import (
    IntPair,
    Padding,
    check_conv_weight,
    check_ranks,
    norm_padding,
    pair,
)
from compression.linalg import CPResult, cp_decompose


def _balanced(result: CPResult) -> list[Tensor]:
    # Spread the CP weights evenly over the factors so no layer holds all the
    # scale (better conditioned for float32 fine-tuning).
    share = result.weights.clamp_min(0).pow(1.0 / len(result.factors))
    return [f * share for f in result.factors]


def _decompose(weight: Tensor, shape: tuple[int, ...], rank: int, init: str, form: str) -> list[Tensor]:
    if init != "als":
        raise ValueError(f"form {form!r} init must be 'als', got {init!r}")
    return _balanced(cp_decompose(weight.reshape(shape), rank))


class CPConv(nn.Module):
    """Rank-R CP of a dense conv; ``ranks = (R,)``. The depthwise conv keeps
    stride, padding and dilation; the bias sits on the last 1x1 conv."""

    form: str = "cp"
    __jit_unused_properties__ = ["ranks"]

    def __init__(
        self,
        c_in: int,
        c_out: int,
        ranks: tuple[int],
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: Padding = 0,
        dilation: IntPair = 1,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_ranks(tuple(ranks), 1, self.form)
        (r,) = ranks
        st = pair(stride, "stride")
        kw_ = {"device": device, "dtype": dtype}
        self._ranks = (int(r),)
        self.first = nn.Conv2d(c_in, r, 1, bias=False, **kw_)
        self.spatial = nn.Conv2d(
            r, r, pair(kernel_size, "kernel_size"), stride=st,
            padding=norm_padding(padding, st), dilation=pair(dilation, "dilation"),
            groups=r, bias=False, **kw_,
        )
        self.last = nn.Conv2d(r, c_out, 1, bias=bias, **kw_)

    @property
    def ranks(self) -> tuple[int, ...]:
        return self._ranks

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        *,
        ranks: tuple[int, ...],
        stride: IntPair = (1, 1),
        padding: Padding = (0, 0),
        dilation: IntPair = (1, 1),
        init: Literal["als"] = "als",
    ) -> CPConv:
        check_conv_weight(weight, cls.form)
        check_ranks(tuple(ranks), 1, cls.form)
        (r,) = ranks
        c_out, c_in, kh, kw = weight.shape
        a, b, c = _decompose(weight, (c_out, c_in, kh * kw), r, init, cls.form)
        mod = cls(
            c_in, c_out, (r,), (kh, kw), stride, padding, dilation,
            bias=bias is not None, device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            mod.first.weight.copy_(b.T[:, :, None, None])
            mod.spatial.weight.copy_(c.T.reshape(r, 1, kh, kw))
            mod.last.weight.copy_(a[:, :, None, None])
            if bias is not None:
                mod.last.bias.copy_(bias)
        return mod

    def to_dense(self) -> tuple[Tensor, Tensor | None]:
        """Equivalent dense (weight, bias); differentiable w.r.t. the factors."""
        w = torch.einsum(
            "or,ri,rhw->oihw", self.last.weight[:, :, 0, 0], self.first.weight[:, :, 0, 0],
            self.spatial.weight[:, 0],
        )
        return w, self.last.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.spatial(self.first(x)))


class CP4Conv(nn.Module):
    """Lebedev 4-factor CP of a dense conv; ``ranks = (R,)``.

    Stride, padding and dilation are split by axis: the k x 1 conv takes the
    height parts, the 1 x k conv the width parts. Zero padding commutes with
    the separable split, so this equals the dense conv exactly at exact rank.
    'same' is passed to both spatial convs (stride must then be 1).
    """

    form: str = "cp4"
    __jit_unused_properties__ = ["ranks"]

    def __init__(
        self,
        c_in: int,
        c_out: int,
        ranks: tuple[int],
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: Padding = 0,
        dilation: IntPair = 1,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_ranks(tuple(ranks), 1, self.form)
        (r,) = ranks
        kh, kw = pair(kernel_size, "kernel_size")
        sh, sw = pair(stride, "stride")
        dh, dw = pair(dilation, "dilation")
        pad = norm_padding(padding, (sh, sw))
        if isinstance(pad, str):
            pad_v: tuple[int, int] | str = pad
            pad_h: tuple[int, int] | str = pad
        else:
            pad_v, pad_h = (pad[0], 0), (0, pad[1])
        kw_ = {"device": device, "dtype": dtype}
        self._ranks = (int(r),)
        self.first = nn.Conv2d(c_in, r, 1, bias=False, **kw_)
        self.vertical = nn.Conv2d(
            r, r, (kh, 1), stride=(sh, 1), padding=pad_v, dilation=(dh, 1),
            groups=r, bias=False, **kw_,
        )
        self.horizontal = nn.Conv2d(
            r, r, (1, kw), stride=(1, sw), padding=pad_h, dilation=(1, dw),
            groups=r, bias=False, **kw_,
        )
        self.last = nn.Conv2d(r, c_out, 1, bias=bias, **kw_)

    @property
    def ranks(self) -> tuple[int, ...]:
        return self._ranks

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        *,
        ranks: tuple[int, ...],
        stride: IntPair = (1, 1),
        padding: Padding = (0, 0),
        dilation: IntPair = (1, 1),
        init: Literal["als"] = "als",
    ) -> CP4Conv:
        check_conv_weight(weight, cls.form)
        check_ranks(tuple(ranks), 1, cls.form)
        (r,) = ranks
        c_out, c_in, kh, kw = weight.shape
        a, b, fh, fw = _decompose(weight, (c_out, c_in, kh, kw), r, init, cls.form)
        mod = cls(
            c_in, c_out, (r,), (kh, kw), stride, padding, dilation,
            bias=bias is not None, device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            mod.first.weight.copy_(b.T[:, :, None, None])
            mod.vertical.weight.copy_(fh.T[:, None, :, None])
            mod.horizontal.weight.copy_(fw.T[:, None, None, :])
            mod.last.weight.copy_(a[:, :, None, None])
            if bias is not None:
                mod.last.bias.copy_(bias)
        return mod

    def to_dense(self) -> tuple[Tensor, Tensor | None]:
        """Equivalent dense (weight, bias); differentiable w.r.t. the factors."""
        w = torch.einsum(
            "or,ri,rh,rw->oihw", self.last.weight[:, :, 0, 0], self.first.weight[:, :, 0, 0],
            self.vertical.weight[:, 0, :, 0], self.horizontal.weight[:, 0, 0, :],
        )
        return w, self.last.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.horizontal(self.vertical(self.first(x))))
