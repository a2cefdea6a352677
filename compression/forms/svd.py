"""Rank-R SVD forms: two linear layers, or two 1x1 convs for a 1x1 conv."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from compression.forms.tucker2 import IntPair, Padding, check_ranks, norm_padding, pair
from compression.linalg import truncated_svd


def _factors(matrix: Tensor, ranks: tuple[int, ...], init: str, form: str) -> tuple[Tensor, Tensor]:
    check_ranks(tuple(ranks), 1, form)
    if init != "svd":
        raise ValueError(f"form {form!r} init must be 'svd', got {init!r}")
    return truncated_svd(matrix, ranks[0])


class SVDLinear(nn.Module):
    """``Linear(in, out)`` as ``Linear(in, R, bias=False) -> Linear(R, out)``; ``ranks = (R,)``."""

    form: str = "svd"
    __jit_unused_properties__ = ["ranks"]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ranks: tuple[int],
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_ranks(tuple(ranks), 1, self.form)
        (r,) = ranks
        self._ranks = (int(r),)
        self.first = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.last = nn.Linear(r, out_features, bias=bias, device=device, dtype=dtype)

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
        init: Literal["svd"] = "svd",
    ) -> SVDLinear:
        if weight.dim() != 2:
            raise ValueError(f"SVDLinear expects a (out, in) weight, got {tuple(weight.shape)}")
        left, right = _factors(weight, ranks, init, cls.form)
        out_f, in_f = weight.shape
        mod = cls(
            in_f, out_f, (ranks[0],), bias=bias is not None, device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            mod.first.weight.copy_(right)
            mod.last.weight.copy_(left)
            if bias is not None:
                mod.last.bias.copy_(bias)
        return mod

    def to_dense(self) -> tuple[Tensor, Tensor | None]:
        """Equivalent dense (weight, bias); differentiable w.r.t. the factors."""
        return self.last.weight @ self.first.weight, self.last.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.first(x))


class SVDConv1x1(nn.Module):
    """1x1 conv as two 1x1 convs (C_in->R, R->C_out); ``ranks = (R,)``.

    Stride and padding go to the first conv (it has no bias, so padded zeros
    stay zero and the last conv turns them into the bias, as the dense conv does).
    """

    form: str = "svd"
    __jit_unused_properties__ = ["ranks"]

    def __init__(
        self,
        c_in: int,
        c_out: int,
        ranks: tuple[int],
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
        self.first = nn.Conv2d(
            c_in, r, 1, stride=st, padding=norm_padding(padding, st),
            dilation=pair(dilation, "dilation"), bias=False, **kw_,
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
        init: Literal["svd"] = "svd",
    ) -> SVDConv1x1:
        if weight.dim() != 4 or weight.shape[2:] != (1, 1):
            raise ValueError(f"SVDConv1x1 expects a (C_out, C_in, 1, 1) weight, got {tuple(weight.shape)}")
        left, right = _factors(weight[:, :, 0, 0], ranks, init, cls.form)
        c_out, c_in = weight.shape[:2]
        mod = cls(
            c_in, c_out, (ranks[0],), stride, padding, dilation, bias=bias is not None,
            device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            mod.first.weight.copy_(right[:, :, None, None])
            mod.last.weight.copy_(left[:, :, None, None])
            if bias is not None:
                mod.last.bias.copy_(bias)
        return mod

    def to_dense(self) -> tuple[Tensor, Tensor | None]:
        """Equivalent dense (weight, bias); differentiable w.r.t. the factors."""
        w = self.last.weight[:, :, 0, 0] @ self.first.weight[:, :, 0, 0]
        return w[:, :, None, None], self.last.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.first(x))
