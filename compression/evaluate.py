"""Measuring a model: accuracy, agreement with a reference, output error,
latency and file size. Functions leave models as they found them (the train /
eval flag is restored)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from compression.data import check_data
from compression.input_spec import InputSpec
from compression.ranks.base import Data

Model = Callable[..., Any]


@contextmanager
def eval_mode(*models: Model | None) -> Iterator[None]:
    """Put modules in eval mode for the block and restore their flags after."""
    mods = [m for m in models if isinstance(m, (nn.Module, torch.jit.ScriptModule))]
    flags = [m.training for m in mods]
    try:
        for m in mods:
            m.eval()
        yield
    finally:
        for m, flag in zip(mods, flags):
            m.train(flag)


def evaluate(
    model: Model,
    data: Data,
    *,
    reference: Model | None = None,
    spec: InputSpec | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> dict[str, float | int | None]:
    """Scores of ``model`` on ``data``.

    Returns ``samples``; ``top1`` / ``top5`` (labelled data, classification
    output; top5 only with >= 5 classes); with a ``reference``: ``agreement``
    (fraction of equal top-1 predictions) and ``relative_error`` (max|out-ref| /
    max|ref| over all outputs, as ``compression.metrics.relative_error``).
    Models must already be on ``device``; data is moved batch by batch.
    """
    if spec is not None:
        check_data(data, spec, source="evaluation data")
    n = correct1 = correct5 = agree = 0
    classes: int | None = None
    classified = True
    err, scale = 0.0, 1e-12
    with eval_mode(model, reference), torch.inference_mode():
        for xs, y in data.batches(batch_size, shuffle=False):
            xs = tuple(x.to(device) for x in xs)
            out = _leaves(model(*xs))
            logits = _logits(out)
            n += int(xs[0].shape[0])
            if logits is None:
                classified = False
            else:
                classes = int(logits.shape[1])
            if y is not None and logits is not None:
                y = y.to(logits.device)
                c1, c5 = topk_correct(logits, y, (1, 5))
                correct1, correct5 = correct1 + c1, correct5 + c5
            if reference is not None:
                ref = _leaves(reference(*xs))
                ref_logits = _logits(ref)
                if logits is not None and ref_logits is not None:
                    agree += int((logits.argmax(1) == ref_logits.argmax(1)).sum())
                e, s = _abs_error(out, ref)
                err, scale = max(err, e), max(scale, s)
    result: dict[str, float | int | None] = {"samples": n}
    if data.y is not None and classified:
        result["top1"] = correct1 / n
        result["top5"] = correct5 / n if classes is not None and classes >= 5 else None
    if reference is not None:
        result["agreement"] = agree / n if classified else None
        result["relative_error"] = err / scale if math.isfinite(err) else math.inf
    return result


def topk_correct(logits: torch.Tensor, y: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> tuple[int, ...]:
    """How many rows have the label among the top-k logits, for each k."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == y.view(-1, 1)
    return tuple(int(hit[:, :k].any(1).sum()) for k in ks)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of rows whose top-1 classes are equal."""
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def measure_latency(
    model: Model,
    spec: InputSpec,
    batch: int = 1,
    device: str | torch.device = "cpu",
    warmup: int = 5,
    repeats: int = 20,
) -> dict[str, float | int | str]:
    """Wall time of one forward pass on random inputs of ``spec`` (median and
    90th percentile in ms). CUDA is synchronised around each call."""
    device = torch.device(device)
    xs = tuple(x.to(device) for x in spec.example(batch, seed=0))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with eval_mode(model), torch.inference_mode():
        for _ in range(max(warmup, 0)):
            model(*xs)
        sync()
        for _ in range(max(repeats, 1)):
            t = time.perf_counter()
            model(*xs)
            sync()
            times.append((time.perf_counter() - t) * 1000)
    times.sort()
    p90 = times[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)]
    return {"median_ms": statistics.median(times), "p90_ms": p90, "batch": batch, "device": str(device),
            "repeats": len(times)}


def file_size(path: str | Path) -> int:
    """Size of a file in bytes."""
    return Path(path).stat().st_size


def file_sizes(paths: dict[str, str | Path]) -> dict[str, int]:
    """``{label: bytes}`` for the files that exist."""
    return {k: file_size(p) for k, p in paths.items() if Path(p).is_file()}


def size_ratio(before: str | Path, after: str | Path) -> float:
    """How many times smaller ``after`` is than ``before``."""
    return file_size(before) / max(file_size(after), 1)


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _logits(leaves: list[torch.Tensor]) -> torch.Tensor | None:
    if leaves and leaves[0].is_floating_point() and leaves[0].dim() == 2 and leaves[0].shape[1] >= 2:
        return leaves[0]
    return None


def _abs_error(out: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[float, float]:
    """(max |out - ref|, max |ref|); inf when the structures differ."""
    if len(out) != len(ref) or any(a.shape != b.shape for a, b in zip(out, ref)):
        return math.inf, 1.0
    err = scale = 0.0
    for a, b in zip(out, ref):
        if a.numel():
            a, b = a.detach().double(), b.detach().double()
            err = max(err, float((a - b).abs().max()))
            scale = max(scale, float(b.abs().max()))
    return err, scale
