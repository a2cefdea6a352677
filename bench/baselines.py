"""Peer baselines for the quality benchmark, matched to a MACs budget.

* ``tltorch_tucker``: tensorly-torch's factorised convolution
  (``tltorch.FactorizedConv.from_conv(conv, rank=r, factorization='tucker',
  decompose_weights=True)``) on every k x k convolution (k > 1, groups 1, more
  than one input channel), with ONE rank ratio ``r`` for all of them (as a user
  of ``rank=0.5`` would), found by bisection so that the whole network's MACs
  land at (or just under) the target. Two settings differ from tltorch's
  defaults, both in the baseline's favour: ``implementation='factorized'``
  (the default, 'reconstructed', rebuilds the dense kernel every call and
  saves no MACs) and ``fixed_rank_modes='spatial'`` (the kernel's spatial
  modes keep full rank: in the factorised forward they are multiplied back
  into the core, so truncating them would lose accuracy for no MACs saved:
  this makes it a Tucker-2, like ours).
* ``channel_pruning``: structured channel pruning with torch-pruning
  (``MagnitudePruner`` = ``BasePruner`` with L1-magnitude importance, the same
  ratio for every layer, the classifier left whole), ratio found by bisection
  likewise.

MACs are counted with ``compression.inventory.count_macs`` (torch's
FlopCounterMode) on one sample, on the nn.Module that actually runs, so the
tltorch core reconstruction each call does is counted too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from compression.inventory import count_macs

BISECT_STEPS = 18
TOLERANCE = 0.01  # the match we aim for: within 1 % of the target MACs


@dataclass
class Matched:
    module: nn.Module
    knob: float  # the rank ratio (tltorch) or pruning ratio (torch-pruning)
    macs: int
    target: int
    detail: dict

    @property
    def deviation(self) -> float:
        """(achieved - target) / target."""
        return (self.macs - self.target) / self.target


def _eligible_convs(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups == 1 and max(m.kernel_size) > 1 and m.in_channels > 1]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _tucker_conv(conv: nn.Conv2d, ratio: float, decompose: bool) -> nn.Module:
    import tltorch

    return tltorch.FactorizedConv.from_conv(conv, rank=ratio, factorization="tucker", decompose_weights=decompose,
                                            implementation="factorized", fixed_rank_modes="spatial")


def tltorch_factorize(model: nn.Module, ratio: float, *, decompose: bool = True) -> nn.Module:
    """A copy of ``model`` with every eligible conv replaced by a tltorch Tucker conv at ``ratio``."""
    out = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name in _eligible_convs(out):
            _set(out, name, _tucker_conv(out.get_submodule(name), ratio, decompose))
    return out.eval()


def _bisect(build: Callable[[float], nn.Module], example: tuple[torch.Tensor, ...], target: int, lo: float,
            hi: float, increasing: bool) -> tuple[float, int]:
    """The knob in [lo, hi] whose whole-network MACs are closest to ``target``
    without passing it by more than ``TOLERANCE`` (MACs grow with the knob when
    ``increasing``; a uniform knob moves in integer channel / rank steps, so an
    exact hit is not always possible). Returns (knob, MACs)."""
    best: tuple[float, int] | None = None
    for _ in range(BISECT_STEPS):
        mid = (lo + hi) / 2
        macs = count_macs(build(mid), example)
        if macs <= target * (1 + TOLERANCE) and (best is None or abs(macs - target) < abs(best[1] - target)):
            best = (mid, macs)
        if abs(macs - target) <= 0.002 * target:
            break
        if (macs <= target) == increasing:
            lo = mid
        else:
            hi = mid
    if best is None:  # nothing fits: take the cheapest end
        knob = lo if increasing else hi
        best = (knob, count_macs(build(knob), example))
    return best


def tltorch_tucker(model: nn.Module, target_macs: int, example: tuple[torch.Tensor, ...]) -> Matched:
    """tltorch Tucker convs at one rank ratio whose whole-network MACs match ``target_macs``."""
    ratio, _ = _bisect(lambda r: tltorch_factorize(model, r, decompose=False), example, target_macs,
                       1e-3, 1.0, increasing=True)
    module = tltorch_factorize(model, ratio, decompose=True)
    macs = count_macs(module, example)
    ranks = {name: list(module.get_submodule(name).rank) for name in _eligible_convs(model)}
    return Matched(module, ratio, macs, target_macs, {"rank_ratio": ratio, "ranks": ranks,
                                                      "implementation": "factorized",
                                                      "fixed_rank_modes": "spatial"})


def prune_channels(model: nn.Module, ratio: float, example: tuple[torch.Tensor, ...]) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of every layer's channels pruned by L1 magnitude."""
    import torch_pruning as tp

    out = copy.deepcopy(model).eval()
    if ratio <= 0:
        return out
    last = [m for m in out.modules() if isinstance(m, nn.Linear)][-1:]  # keep the classifier's outputs
    pruner = tp.pruner.MagnitudePruner(out, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=last)
    pruner.step()
    return out.eval()


def channel_pruning(model: nn.Module, target_macs: int, example: tuple[torch.Tensor, ...]) -> Matched:
    """torch-pruning L1 channel pruning at one ratio whose MACs match ``target_macs``."""
    ratio, _ = _bisect(lambda p: prune_channels(model, p, example), example, target_macs, 0.0, 0.97,
                       increasing=False)
    module = prune_channels(model, ratio, example)
    macs = count_macs(module, example)
    widths = {name: m.out_channels for name, m in module.named_modules() if isinstance(m, nn.Conv2d)}
    return Matched(module, ratio, macs, target_macs, {"pruning_ratio": ratio, "importance": "L1 magnitude",
                                                      "conv_out_channels": widths})


BASELINES: dict[str, Callable[[nn.Module, int, tuple[torch.Tensor, ...]], Matched]] = {
    "tltorch": tltorch_tucker,
    "prune": channel_pruning,
}
