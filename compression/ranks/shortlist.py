"""Choosing among rank plans by what they keep of the original, measured on data.

Where fine-tuning starts from the original weights decomposed at the chosen ranks,
how much of the original's accuracy those weights keep right after decomposition
predicted which of two plans fine-tunes better in every cell of the quality benchmark
where BATUDE's and uniform ranks were compared (bench/results/quality_amd.md: 6 of 6,
2x/3x/5x fewer MACs, two networks). So a data-aware method can put its own plan beside
the data-free allocations at the same budget and start from the one that keeps most.
"""

from __future__ import annotations

import copy
import dataclasses

from compression.plan import RankPlan
from compression.ranks.base import SHARED_OPTIONS, Data, SelectionContext

MAX_SAMPLES = 2048  # scoring a plan is one forward pass over at most this many samples
# (name, evaluate's key, sign): the first the evaluation fills in scores the plans, higher better
METRICS = (("top-1", "top1", 1.0), ("agreement", "agreement", 1.0), ("-relative error", "relative_error", -1.0))


@dataclasses.dataclass
class Shortlist:
    chosen: str
    scores: dict[str, float]  # per plan: top-1, else agreement with the original, else -relative error
    metric: str

    def describe(self, own: str) -> str:
        ranked = ", ".join(f"{name} {self._fmt(v)}" for name, v in sorted(self.scores.items(), key=lambda kv: -kv[1]))
        verdict = "kept its own ranks" if self.chosen == own else f"started from {self.chosen}'s ranks"
        return f"{verdict}: {self.metric} right after decomposing the original weights on the selection data: {ranked}"

    def _fmt(self, v: float) -> str:
        return f"{v:.4g}" if self.metric == "-relative error" else f"{100 * v:.2f} %"


def data_free_plans(ctx: SelectionContext, methods: tuple[str, ...] = ("uniform", "energy")) -> dict[str, RankPlan]:
    """The data-free methods' plans at ctx's budget (with the options every method shares)."""
    from compression.ranks import get_method

    shared = {k: v for k, v in ctx.options.items() if k in SHARED_OPTIONS}
    sub = dataclasses.replace(ctx, options=shared, progress=lambda *a: None)
    return {name: get_method(name).select(sub) for name in methods}


def shortlist(ctx: SelectionContext, plans: dict[str, RankPlan], data: Data) -> Shortlist:
    """Decompose a copy of the original at every plan and score it on (at most MAX_SAMPLES of) ``data``;
    the first plan wins ties (list the method's own first)."""
    from compression.evaluate import evaluate
    from compression.rewrite import apply_plan

    if len(data) > MAX_SAMPLES:
        _, data = data.split(MAX_SAMPLES / len(data), seed=ctx.seed)
    results, reference = {}, ctx.gm
    for name, plan in plans.items():
        gm = apply_plan(copy.deepcopy(ctx.gm), ctx.inventory, plan).eval()
        results[name] = evaluate(gm, data, reference=reference, spec=ctx.spec, device=ctx.device)
        if results[name].get("top1") is not None:
            reference = None  # top-1 decides: the original's forward pass is not needed again
    first = next(iter(results.values()))
    metric, key, sign = next(m for m in METRICS if first.get(m[1]) is not None)
    scores = {name: sign * float(r[key]) for name, r in results.items()}
    best = max(scores, key=lambda n: scores[n])  # max keeps the first of equals
    return Shortlist(best, scores, metric)
