"""``rene``: continuous rank search with an exact budget (data-free)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from compression.budget import Budget
from compression.input_spec import InputSpec
from compression.inventory import build_inventory, count_macs, count_params
from compression.model_io import to_editable
from compression.ranks import METHODS
from compression.ranks.base import SelectionContext
from compression.ranks.rene import Rene
from compression.ranks.uniform import Uniform
from compression.rewrite import apply_plan
from tests.planted import planted_model
from tests.zoo import resnet_like

# The default schedule (20 + 100 steps per round) on the tiny test model; the
# planted and NaN tests use a shorter one to stay fast.
SHORT = {"warmup": 10, "steps": 40}


def editable(model: nn.Module, spec: str):
    spec_ = InputSpec.parse(spec)
    gm = to_editable(torch.jit.script(model.eval()), spec_).gm
    return gm, build_inventory(gm, spec_), spec_


@pytest.fixture(scope="module")
def resnet():
    model, spec = resnet_like()
    return editable(model, spec)


def measured(gm, inv, spec, plan, metric: str) -> tuple[float, float]:
    """(after, before) from the rewritten graph, counted by torch."""
    new = apply_plan(copy.deepcopy(gm), inv, plan)
    if metric == "flops":
        return count_macs(new, spec.example(1)), count_macs(gm, spec.example(1))
    return count_params(new), count_params(gm)


def check_break_even(plan) -> None:
    for lp in plan.layers:
        assert lp.macs_after < lp.macs_before and lp.params_after < lp.params_before, lp


@pytest.mark.parametrize("budget", ["flops:2x", "flops:3x", "flops:5x", "params:0.4"])
def test_data_free_budget_within_one_percent(resnet, budget):
    gm, inv, spec = resnet
    b = Budget.parse(budget)
    rene = Rene()
    plan = rene.select(SelectionContext(gm, inv, spec, b, seed=0))
    after, before = measured(gm, inv, spec, plan, b.metric)
    miss = after / (before * b.keep) - 1
    print(f"{budget}: kept {after / before:.4f} (target {b.keep:.4f}, miss {100 * miss:+.2f} %), {plan.note}")
    assert abs(miss) <= 0.01, (budget, miss)
    assert plan.method == "rene" and plan.layers
    check_break_even(plan)
    for lp in plan.layers:
        assert lp.predicted_error is not None and 0 <= lp.predicted_error <= 1
    assert rene.stats["guard_events"] == 0


def test_registered_and_deterministic(resnet):
    gm, inv, spec = resnet
    assert METHODS["rene"] is Rene and not Rene.uses_data
    ctx = SelectionContext(gm, inv, spec, Budget.parse("flops:3x"), seed=3, options=SHORT)
    a = Rene().select(ctx).to_dict()
    b = Rene().select(ctx).to_dict()
    assert a == b


def test_nan_guard_huge_lr(resnet):
    gm, inv, spec = resnet
    b = Budget.parse("flops:3x")
    rene = Rene()
    plan = rene.select(SelectionContext(gm, inv, spec, b, options={**SHORT, "lr": 1e30, "clip": 0}))
    assert rene.stats["guard_events"] > 0  # the guard fired ...
    after, before = measured(gm, inv, spec, plan, "flops")
    assert abs(after / (before * b.keep) - 1) <= 0.01  # ... and the plan is still exact and finite
    assert all(math.isfinite(lp.predicted_error) for lp in plan.layers)
    check_break_even(plan)


# ------------------------------------------------------------------ planted ranks


def test_planted_ranks_recovered_uniform_not():
    model, spec, ranks, budget = planted_model()
    gm, inv, spec_ = editable(model, spec)
    # the classifier has a planted rank too: search linear layers as well
    ctx = SelectionContext(gm, inv, spec_, Budget.parse(budget), options={**SHORT, "all_layers": True})
    got = {lp.name: lp.ranks for lp in Rene().select(ctx).layers}
    uni = {lp.name: lp.ranks for lp in Uniform().select(ctx).layers}
    print(f"\n{'layer':14s} {'planted':>10s} {'rene':>10s} {'uniform':>10s}")
    for name, want in ranks.items():
        print(f"{name:14s} {want!s:>10s} {got.get(name)!s:>10s} {uni.get(name)!s:>10s}")

    def close(found: dict, name: str, want: tuple[int, ...]) -> bool:
        have = found.get(name)
        return have is not None and len(have) == len(want) and all(abs(a - b) <= 2 for a, b in zip(have, want))

    assert all(close(got, n, w) for n, w in ranks.items())
    assert not all(close(uni, n, w) for n, w in ranks.items())


def test_mixed_core_matches_padding():
    from compression.ranks.rene import _MixCores

    g = torch.Generator().manual_seed(0)
    cores = [torch.randn(r, r + 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True) for r in (2, 4, 5)]
    alpha = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(alpha, 0)
    want = sum(p[k] * torch.nn.functional.pad(c, (0, 0, 0, 0, 0, 6 - c.shape[1], 0, 5 - c.shape[0]))
               for k, c in enumerate(cores))
    got = _MixCores.apply(p, (5, 6, 3, 3), *cores)
    assert torch.allclose(got, want)
    assert torch.autograd.gradcheck(lambda a, *cs: _MixCores.apply(torch.softmax(a, 0), (5, 6, 3, 3), *cs),
                                    (alpha, *cores))
