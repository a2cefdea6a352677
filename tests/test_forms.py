"""Factorised layer forms and the decompositions behind them (small, fast tensors)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.export import Dim

from compression.errors import RankError
from compression.forms import (
    FORMS,
    CP4Conv,
    CPConv,
    SVDConv1x1,
    SVDLinear,
    Tucker2Conv,
    form_class,
    max_ranks,
)
from compression.linalg import (
    cp_als,
    cp_reconstruct,
    truncated_svd,
    tucker2_hooi,
    tucker2_hosvd,
    tucker2_reconstruct,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def planted_cp(shape: tuple[int, ...], rank: int, seed: int = 0) -> Tensor:
    g = gen(seed)
    factors = [torch.randn(s, rank, generator=g, dtype=torch.float64) for s in shape]
    return cp_reconstruct(torch.ones(rank, dtype=torch.float64), factors)


# (C_out, C_in, kh, kw, stride, padding, dilation)
GEOMETRIES = [
    (8, 6, 3, 3, 2, 1, 1),
    (8, 6, 3, 3, 1, "same", 2),
    (6, 5, 3, 1, 1, (1, 0), 1),
    (6, 5, 3, 1, (2, 1), (2, 0), (2, 1)),
    (5, 7, 2, 2, 1, "same", 1),  # even kernel: 'same' pads asymmetrically
    (4, 3, 1, 3, 1, "valid", 1),
]


def dense_conv(x: Tensor, w: Tensor, b: Tensor | None, stride, padding, dilation) -> Tensor:
    return F.conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation)


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("init", ["hosvd", "hooi"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_tucker2_full_rank_is_exact(geom, init: str, with_bias: bool) -> None:
    c_out, c_in, kh, kw, stride, padding, dilation = geom
    g = gen(1)
    w = torch.randn(c_out, c_in, kh, kw, generator=g)
    b = torch.randn(c_out, generator=g) if with_bias else None
    x = torch.randn(2, c_in, 9, 8, generator=g)
    r_in, r_out = max_ranks("tucker2", c_out, c_in, kh, kw)
    m = Tucker2Conv.from_dense(
        w, b, ranks=(r_in, r_out), stride=stride, padding=padding, dilation=dilation, init=init
    )
    assert m.ranks == (r_in, r_out) and m.form == "tucker2"
    assert rel(m(x), dense_conv(x, w, b, stride, padding, dilation)) < 1e-5
    wd, bd = m.to_dense()
    assert wd.shape == w.shape and rel(wd, w) < 1e-5
    assert (bd is None) == (b is None)


@pytest.mark.parametrize("with_bias", [True, False])
def test_svd_full_rank_is_exact(with_bias: bool) -> None:
    g = gen(2)
    w = torch.randn(7, 5, generator=g)
    b = torch.randn(7, generator=g) if with_bias else None
    x = torch.randn(3, 5, generator=g)
    m = SVDLinear.from_dense(w, b, ranks=(5,))
    assert rel(m(x), F.linear(x, w, b)) < 1e-5

    wc = torch.randn(6, 4, 1, 1, generator=g)
    bc = torch.randn(6, generator=g) if with_bias else None
    xc = torch.randn(2, 4, 9, 7, generator=g)
    for stride, padding in [(2, 0), (1, 1), ((2, 1), (1, 0))]:
        mc = SVDConv1x1.from_dense(wc, bc, ranks=(4,), stride=stride, padding=padding)
        assert rel(mc(xc), dense_conv(xc, wc, bc, stride, padding, 1)) < 1e-5


def test_truncated_svd_is_best_rank_r() -> None:
    m = torch.randn(9, 6, generator=gen(3), dtype=torch.float64)
    left, right = truncated_svd(m, 3)
    s = torch.linalg.svdvals(m)
    assert abs(float((left @ right - m).norm()) - float(s[3:].norm())) < 1e-10


def test_hooi_not_worse_than_hosvd() -> None:
    w = torch.randn(16, 12, 3, 3, generator=gen(4), dtype=torch.float64)
    for r_out, r_in in [(4, 3), (8, 6), (2, 10)]:
        e_hosvd = rel(tucker2_reconstruct(*tucker2_hosvd(w, r_out, r_in)), w)
        e_hooi = rel(tucker2_reconstruct(*tucker2_hooi(w, r_out, r_in)), w)
        assert e_hooi <= e_hosvd + 1e-12


def test_tucker2_factors_shapes_and_dtype() -> None:
    w = torch.randn(8, 6, 3, 2, generator=gen(5))
    core, u_out, u_in = tucker2_hosvd(w, 4, 3)
    assert core.shape == (4, 3, 3, 2) and u_out.shape == (8, 4) and u_in.shape == (6, 3)
    assert core.dtype == torch.float64
    eye = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(u_out.T @ u_out, eye, atol=1e-12)


def test_cp_als_error_decreases_with_rank() -> None:
    x = torch.randn(8, 7, 9, generator=gen(6), dtype=torch.float64)
    errors = [cp_als(x, r, n_iter=60, tol=1e-9).rel_error for r in (1, 3, 6, 12, 24)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("shape", [(8, 6, 9), (7, 6, 3, 3)])
def test_cp_als_recovers_planted_rank(shape: tuple[int, ...]) -> None:
    x = planted_cp(shape, 4, seed=7)
    res = cp_als(x, 4, n_iter=500, tol=1e-13)
    assert res.rel_error < 1e-6
    assert rel(cp_reconstruct(res.weights, res.factors), x) < 1e-6
    assert all(torch.allclose(f.norm(dim=0), torch.ones(4, dtype=torch.float64)) for f in res.factors)


def test_cp_als_is_nan_safe_when_overparameterised() -> None:
    # Rank-1 data at rank 6 (and rank > every spatial mode): the Gram matrix is
    # near-singular; the ridge must keep the iterates finite.
    x = planted_cp((5, 4, 3, 3), 1, seed=8)
    res = cp_als(x, 6, n_iter=50)
    assert all(bool(torch.isfinite(f).all()) for f in res.factors)
    assert res.rel_error < 1e-4
    with pytest.raises(ValueError, match="NaN"):
        cp_als(torch.full((3, 4, 5), float("nan")), 2)
    zero = cp_als(torch.zeros(3, 4, 5), 2)
    assert zero.rel_error == 0.0 and bool((zero.weights == 0).all())


def test_cp_forms_exact_at_planted_rank() -> None:
    g = gen(9)
    x = torch.randn(2, 6, 10, 9, generator=g, dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64)
    w3 = planted_cp((7, 6, 9), 3, seed=10).reshape(7, 6, 3, 3)
    w4 = planted_cp((7, 6, 3, 3), 3, seed=11)
    cases = [
        ((2, 1), (1, 2), (2, 1)),
        (1, "same", 2),
        (2, "valid", 1),
    ]
    for stride, padding, dilation in cases:
        m3 = CPConv.from_dense(w3, b, ranks=(3,), stride=stride, padding=padding, dilation=dilation)
        m4 = CP4Conv.from_dense(w4, b, ranks=(3,), stride=stride, padding=padding, dilation=dilation)
        assert rel(m3(x), dense_conv(x, w3, b, stride, padding, dilation)) < 1e-5
        assert rel(m4(x), dense_conv(x, w4, b, stride, padding, dilation)) < 1e-5


def test_same_padding_with_stride_is_rejected() -> None:
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="same"):
        CP4Conv.from_dense(w, None, ranks=(2,), stride=2, padding="same")


def make_forms(dtype: torch.dtype = torch.float32) -> list[tuple[nn.Module, tuple[int, ...], dict]]:
    """(low-rank module, input shape, conv kwargs) for every form."""
    g = gen(12)
    w = torch.randn(8, 6, 3, 3, generator=g, dtype=dtype)
    b = torch.randn(8, generator=g, dtype=dtype)
    geo = {"stride": 1, "padding": "same", "dilation": 2}
    geo2 = {"stride": 2, "padding": 1, "dilation": 1}
    return [
        (Tucker2Conv.from_dense(w, b, ranks=(3, 4), **geo), (6, 9, 8), geo),
        (Tucker2Conv.from_dense(w, None, ranks=(3, 4), init="hooi", **geo2), (6, 9, 8), geo2),
        (CPConv.from_dense(w, b, ranks=(5,), **geo2), (6, 9, 8), geo2),
        (CP4Conv.from_dense(w, b, ranks=(5,), **geo), (6, 9, 8), geo),
        (SVDConv1x1.from_dense(w[:, :, :1, :1], b, ranks=(3,), stride=2), (6, 9, 8), {"stride": 2}),
        (SVDLinear.from_dense(w[:, :, 0, 0], b, ranks=(3,)), (6,), {}),
    ]


def test_to_dense_matches_forward() -> None:
    for m, in_shape, geo in make_forms(torch.float64):
        x = torch.randn(2, *in_shape, generator=gen(13), dtype=torch.float64)
        wd, bd = m.to_dense()
        ref = F.linear(x, wd, bd) if wd.dim() == 2 else F.conv2d(x, wd, bd, **geo)
        assert rel(m(x), ref) < 1e-10, m.form


def test_to_dense_is_differentiable() -> None:
    m = CP4Conv.from_dense(torch.randn(4, 3, 3, 3), None, ranks=(2,))
    m.to_dense()[0].square().sum().backward()
    assert m.first.weight.grad is not None


def test_forms_script_and_export() -> None:
    for m, in_shape, _ in make_forms():
        m.eval()
        scripted = torch.jit.script(m)
        example = torch.randn(3, *in_shape, generator=gen(14))
        exported = torch.export.export(m, (example,), dynamic_shapes={"x": {0: Dim.AUTO}}).module()
        for batch in (1, 3):
            x = torch.randn(batch, *in_shape, generator=gen(batch))
            ref = m(x)
            assert torch.allclose(scripted(x), ref, atol=1e-6), m.form
            assert torch.allclose(exported(x), ref, atol=1e-6), m.form


def test_dtype_is_preserved() -> None:
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    for cls, ranks in [(Tucker2Conv, (2, 2)), (CPConv, (2,)), (CP4Conv, (2,))]:
        m = cls.from_dense(w, None, ranks=ranks)
        assert m.first.weight.dtype == torch.float64
    m16 = Tucker2Conv.from_dense(w.to(torch.bfloat16), None, ranks=(2, 2))
    assert m16.core.weight.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_forms_on_cuda() -> None:
    w = torch.randn(8, 6, 3, 3, device="cuda")
    x = torch.randn(2, 6, 9, 8, device="cuda")
    for cls, ranks in [(Tucker2Conv, (6, 8)), (CPConv, (4,)), (CP4Conv, (4,))]:
        m = cls.from_dense(w, None, ranks=ranks, padding=1)
        assert m.first.weight.device.type == "cuda"
        wd, _ = m.to_dense()
        assert rel(m(x), F.conv2d(x, wd, None, padding=1)) < 1e-4


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda w: Tucker2Conv.from_dense(w, None, ranks=(7, 4)), "r_in=7 exceeds its maximum 6"),
        (lambda w: Tucker2Conv.from_dense(w, None, ranks=(2, 9)), "r_out=9 exceeds its maximum 8"),
        (lambda w: Tucker2Conv.from_dense(w, None, ranks=(0, 4)), ">= 1"),
        (lambda w: Tucker2Conv.from_dense(w, None, ranks=(3,)), "takes 2 integer rank"),
        (lambda w: CPConv.from_dense(w, None, ranks=(0,)), ">= 1"),
        (lambda w: CP4Conv.from_dense(w, None, ranks=(2, 2)), "takes 1 integer rank"),
        (lambda w: SVDLinear.from_dense(w[:, :, 0, 0], None, ranks=(7,)), "exceeds its maximum 6"),
        (lambda w: SVDConv1x1.from_dense(w[:, :, :1, :1], None, ranks=(-1,)), ">= 1"),
    ],
)
def test_invalid_ranks_raise(build, match: str) -> None:
    w = torch.randn(8, 6, 3, 3)
    with pytest.raises(RankError, match=match):
        build(w)


def test_tucker_rank_cap_uses_unfolding_rank() -> None:
    # 1x1 conv 2 -> 16: the mode-0 unfolding is 16 x 2, so R_out <= 2.
    w = torch.randn(16, 2, 1, 1)
    assert max_ranks("tucker2", 16, 2, 1, 1) == (2, 2)
    with pytest.raises(RankError, match="C_in\\*kh\\*kw=2"):
        tucker2_hosvd(w, 3, 2)


def test_max_ranks_and_registry() -> None:
    assert max_ranks("tucker2", 64, 32, 3, 3) == (32, 64)
    assert max_ranks("svd", 10, 20) == (10,)
    assert max_ranks("cp", 64, 64, 3, 3) == ((64 * 64 * 9) // (64 + 64 + 9),)
    assert max_ranks("cp4", 1, 1, 1, 1) == (1,)
    assert set(FORMS) == {"tucker2", "cp", "cp4", "svd"}
    assert all(FORMS[name].form == name for name in FORMS)
    assert form_class("svd", 4) is SVDConv1x1 and form_class("svd", 2) is SVDLinear
    with pytest.raises(ValueError, match="unknown form"):
        max_ranks("tt", 4, 4, 3, 3)
