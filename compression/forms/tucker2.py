"""Tucker-2 factorised conv: 1x1 (C_in->R_in), k x k core (R_in->R_out), 1x1 (R_out->C_out).

Also holds the small conv-geometry helpers the other forms share.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from compression.errors import RankError
from compression.linalg import tucker2_hooi, tucker2_hosvd

IntPair = int | tuple[int, int]
Padding = int | tuple[int, int] | str


def pair(value: IntPair, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return (int(value[0]), int(value[1]))


def norm_padding(padding: Padding, stride: tuple[int, int]) -> tuple[int, int] | str:
    """Numeric padding as a pair; 'same' kept as a string (nn.Conv2d handles the
    asymmetric split for even kernels exactly like the dense conv); 'valid' is 0."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding != "same":
            raise ValueError(f"padding must be 'same', 'valid' or numeric, got {padding!r}")
        if stride != (1, 1):
            raise ValueError("padding='same' needs stride 1 (as in nn.Conv2d)")
        return "same"
    return pair(padding, "padding")


def check_ranks(ranks: tuple[int, ...], n: int, form: str) -> None:
    if len(ranks) != n or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
        raise RankError(f"form {form!r} takes {n} integer rank(s), got {ranks!r}")
    if min(ranks) < 1:
        raise RankError(f"form {form!r}: ranks must be >= 1, got {ranks!r}")


def check_conv_weight(weight: Tensor, form: str) -> None:
    if weight.dim() != 4:
        raise ValueError(f"form {form!r} expects a conv weight (C_out, C_in, kh, kw), got {tuple(weight.shape)}")


class Tucker2Conv(nn.Module):
    """Tucker-2 of a dense conv; ``ranks = (r_in, r_out)``.

    The core conv keeps stride, padding and dilation; the bias sits on the last
    1x1 conv. Groups must be 1 (the caller's responsibility: the weight shape
    alone cannot tell).
    """

    form: str = "tucker2"
    __jit_unused_properties__ = ["ranks"]

    def __init__(
        self,
        c_in: int,
        c_out: int,
        ranks: tuple[int, int],
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: Padding = 0,
        dilation: IntPair = 1,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_ranks(tuple(ranks), 2, self.form)
        r_in, r_out = ranks
        st = pair(stride, "stride")
        kw_ = {"device": device, "dtype": dtype}
        self._ranks = (int(r_in), int(r_out))
        self.first = nn.Conv2d(c_in, r_in, 1, bias=False, **kw_)
        self.core = nn.Conv2d(
            r_in, r_out, pair(kernel_size, "kernel_size"), stride=st,
            padding=norm_padding(padding, st), dilation=pair(dilation, "dilation"),
            bias=False, **kw_,
        )
        self.last = nn.Conv2d(r_out, c_out, 1, bias=bias, **kw_)

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
        init: Literal["hosvd", "hooi"] = "hosvd",
    ) -> Tucker2Conv:
        check_conv_weight(weight, cls.form)
        check_ranks(tuple(ranks), 2, cls.form)
        r_in, r_out = ranks
        if init == "hosvd":
            core, u_out, u_in = tucker2_hosvd(weight, r_out, r_in)
        elif init == "hooi":
            core, u_out, u_in = tucker2_hooi(weight, r_out, r_in)
        else:
            raise ValueError(f"Tucker2Conv init must be 'hosvd' or 'hooi', got {init!r}")
        c_out, c_in, kh, kw = weight.shape
        mod = cls(
            c_in, c_out, (r_in, r_out), (kh, kw), stride, padding, dilation,
            bias=bias is not None, device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            mod.first.weight.copy_(u_in.T[:, :, None, None])
            mod.core.weight.copy_(core)
            mod.last.weight.copy_(u_out[:, :, None, None])
            if bias is not None:
                mod.last.bias.copy_(bias)
        return mod

    def to_dense(self) -> tuple[Tensor, Tensor | None]:
        """Equivalent dense (weight, bias); differentiable w.r.t. the factors."""
        w = torch.einsum(
            "or,rshw,si->oihw", self.last.weight[:, :, 0, 0], self.core.weight,
            self.first.weight[:, :, 0, 0],
        )
        return w, self.last.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.core(self.first(x)))
