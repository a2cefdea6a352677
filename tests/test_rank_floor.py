"""Rank floors (``compression.ranks.floor``): BATUDE and rene move budget between
layers but never take a layer, per mode, below half a uniform split's ranks."""

from __future__ import annotations

import pytest
import torch

from compression.budget import Budget
from compression.errors import TensorTrimError
from compression.ranks.base import Data, SelectionContext
from compression.ranks.batude import Batude, greedy_ranks
from compression.ranks.floor import rank_floor
from compression.ranks.rene import Rene
from compression.ranks.uniform import Uniform
from tests import zoo
from tests.test_batude import _conv, _editable, _meter


@pytest.fixture(scope="module")
def resnet():
    return _editable(zoo.resnet_like)


def test_greedy_floor_stops_the_one_mode_collapse():
    # The known behaviour of the additive energy proxy: on flat spectra one mode falls
    # to rank 1 (see test_greedy_recomputes_the_coupled_tucker_saving). A floor of 3
    # per mode keeps both modes at 3 or more and still meets the budget.
    c = _conv("c", 8, 8, 4)
    meter = _meter([c], "flops:4x")
    flat = [[torch.ones(8), torch.ones(8)]]
    assert greedy_ranks(meter, [c], ["tucker2"], flat).ranks == [(1, 8)]
    res = greedy_ranks(meter, [c], ["tucker2"], flat, floors=[(3, 3)])
    assert res.fits and all(r >= 3 for r in res.ranks[0]), res.ranks
    assert res.total <= meter.target


def test_floor_is_half_the_uniform_ranks(resnet):
    gm, spec, inv = resnet
    ctx = SelectionContext(gm, inv, spec, Budget.parse("flops:5x"))
    floor = rank_floor(ctx)
    uniform = {lp.name: lp.ranks for lp in Uniform().select(ctx).layers}
    assert 0 < floor.ratio < 1 and floor.share == 0.5
    for name, ranks in uniform.items():
        low = floor.of(inv.by_name(name), "tucker2")
        # uniform rounds ratio x max rank (and may top up by a step): half of it, rounded down
        assert all(f <= max(1, r // 2 + 1) for f, r in zip(low, ranks)), (name, low, ranks)
        assert all(f >= max(1, r // 2 - 1) for f, r in zip(low, ranks)), (name, low, ranks)
    off = rank_floor(SelectionContext(gm, inv, spec, Budget.parse("flops:5x"), options={"min_rank_share": 0}))
    assert all(f == 1 for f in off.of(inv.by_name(next(iter(uniform))), "tucker2"))


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half", True])
def test_bad_min_rank_share_is_refused(resnet, bad):
    gm, spec, inv = resnet
    ctx = SelectionContext(gm, inv, spec, Budget.parse("flops:3x"), options={"min_rank_share": bad})
    with pytest.raises(TensorTrimError, match="min_rank_share"):
        rank_floor(ctx)


@pytest.mark.parametrize("method", ["batude", "rene"])
def test_learned_ranks_respect_the_floor_at_a_steep_budget(resnet, method):
    gm, spec, inv = resnet
    x = spec.example(64, seed=7)
    with torch.no_grad():
        y = gm(*x).argmax(1)
    options = {"epochs": 1, "batch_size": 32} if method == "batude" else {"warmup": 10, "steps": 40}
    ctx = SelectionContext(gm, inv, spec, Budget.parse("flops:5x"), data=Data(x, y), options=options)
    plan = (Batude() if method == "batude" else Rene()).select(ctx)
    floor = rank_floor(ctx)
    assert plan.layers
    for lp in plan.layers:
        assert floor.allows(inv.by_name(lp.name), lp.form, lp.ranks), (lp.name, lp.ranks, floor.of(
            inv.by_name(lp.name), lp.form))
    meter = ctx.meter()
    total = meter.total({lp.name: (lp.form, lp.ranks) for lp in plan.layers})
    assert total <= meter.target * 1.0001 and total >= meter.target * 0.99
