"""The budget a user sets: how much smaller or faster the model must become.

Text forms: ``flops:3x`` (3x fewer MACs), ``flops:0.33`` (keep 33 % of MACs),
``params:0.4`` / ``params:40%`` (keep 40 % of the parameters), ``params:2.5x``,
``latency:8ms@1`` (at most 8 ms at batch 1 on the device the job runs on).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from compression.errors import BudgetError

METRICS = ("flops", "params", "latency")
_RE = re.compile(r"^\s*(flops|macs|params|latency)\s*[:=]\s*([0-9]*\.?[0-9]+)\s*(x|%|ms)?\s*(?:@\s*(\d+))?\s*$", re.I)


@dataclass(frozen=True)
class Budget:
    metric: str  # "flops" (MACs), "params" or "latency" (ms)
    keep: float | None = None  # fraction of the original to keep, for flops/params
    ms: float | None = None  # absolute target, for latency
    batch: int = 1  # batch size the latency is measured at

    @classmethod
    def parse(cls, text: str) -> Budget:
        m = _RE.match(text or "")
        if not m:
            raise BudgetError(
                f"cannot read budget {text!r}: use e.g. 'flops:3x' (3x fewer MACs), 'params:0.4' "
                "(keep 40 % of parameters) or 'latency:8ms@1' (8 ms at batch 1)"
            )
        metric, value, unit, batch = m.group(1).lower(), float(m.group(2)), (m.group(3) or "").lower(), m.group(4)
        metric = "flops" if metric == "macs" else metric
        if metric == "latency":
            if unit not in ("", "ms") or value <= 0:
                raise BudgetError(f"latency budget {text!r} needs a positive time in ms, e.g. 'latency:8ms@1'")
            return cls("latency", ms=value, batch=int(batch or 1))
        if batch:
            raise BudgetError(f"'@batch' only applies to latency budgets, not {metric}")
        if unit == "ms":
            raise BudgetError(f"{metric} budgets take a factor ('3x') or a fraction ('0.4' or '40%'), not ms")
        if unit == "x":
            if value <= 1:
                raise BudgetError(f"reduction factor {value}x must be greater than 1 (e.g. '{metric}:2x')")
            keep = 1 / value
        elif unit == "%":
            keep = value / 100
        else:
            keep = value
        if not 0 < keep < 1:
            raise BudgetError(f"{metric} budget must keep between 0 and 100 % of the original, got {keep:.3g}")
        return cls(metric, keep=keep)

    def target(self, original: float) -> float:
        """The absolute limit for a model whose metric is ``original``."""
        return self.ms if self.metric == "latency" else original * self.keep  # type: ignore[return-value,operator]

    def __str__(self) -> str:
        if self.metric == "latency":
            return f"latency:{self.ms:g}ms@{self.batch}"
        return f"{self.metric}:{1 / self.keep:.3g}x"  # type: ignore[operator]
