"""Rank floors for the methods that move budget between layers (``batude``, ``rene``).

Both rank layers by what a cut costs *now* (weight energy, or the output change
with one layer truncated), and both drove single layers to ranks of 1-3 at 5x
fewer MACs on bench/quality.py's networks: BATUDE's Tucker-2 pairs (1, 26) and
(94, 3), rene (3, 3) on the last ResNet block. Top-1 right after compression
was ~10 % and, after the same fine-tuning as every method, 2.7-5.1 points below
a uniform split: a rank that small is capacity fine-tuning cannot restore.

The floor keeps every searched layer, per mode, at no less than ``share`` x the
rank a uniform split of the same budget gives it (``uniform_ratio``), so these
methods still move budget to the layers that need it but cannot empty one.
``share`` is the method option ``min_rank_share`` (0 turns the floor off).
A floor below the uniform ranks is always reachable: the uniform split itself
meets the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from compression.errors import TensorTrimError
from compression.inventory import LayerInfo
from compression.ranks.base import Meter, SelectionContext
from compression.ranks.fill import limits
from compression.ranks.uniform import uniform_ratio

DEFAULT_SHARE = 0.5


@dataclass(frozen=True)
class RankFloor:
    ratio: float  # the uniform split's rank ratio at this budget
    share: float

    def of(self, layer: LayerInfo, form: str) -> tuple[int, ...]:
        """Smallest allowed ranks of ``layer`` in ``form`` (in the form's ranks order)."""
        return tuple(max(1, min(m, math.floor(self.share * self.ratio * m))) for m in limits(layer, form))

    def allows(self, layer: LayerInfo, form: str, ranks: tuple[int, ...]) -> bool:
        return all(r >= f for r, f in zip(ranks, self.of(layer, form)))


def rank_floor(ctx: SelectionContext, meter: Meter | None = None) -> RankFloor:
    share = ctx.options.get("min_rank_share", DEFAULT_SHARE)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise TensorTrimError(f"min_rank_share must be a number in [0, 1], got {share!r}", code="invalid_options")
    if share == 0:
        return RankFloor(0.0, 0.0)
    return RankFloor(uniform_ratio(ctx, meter or ctx.meter()), float(share))
