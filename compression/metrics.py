"""Output comparisons used wherever two models are checked against each other."""

from __future__ import annotations

import math

import torch


def relative_error(out: object, ref: object) -> float:
    """max|a-b| / max|b| over all (possibly nested) tensor outputs."""
    a, b = _flatten(out), _flatten(ref)
    if len(a) != len(b):
        return float("inf")
    err, scale = 0.0, 1e-12
    for x, y in zip(a, b):
        x, y = x.detach().double(), y.detach().double()
        if x.shape != y.shape:
            return float("inf")
        if x.numel():
            err = max(err, (x - y).abs().max().item())
            scale = max(scale, y.abs().max().item())
    return err / scale if math.isfinite(err) else float("inf")


def _flatten(obj: object) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _flatten(o)]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in _flatten(obj[k])]
    return []
