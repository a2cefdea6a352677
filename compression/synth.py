"""Data-free input synthesis (DeepInversion-style).

Random inputs are optimised so that, at every BatchNorm module of the original
model, the batch mean and variance of the BN input match the stored running
statistics; a small total-variation and L2 prior keeps them image-like. The
result stands in for real data when the user has none: it is used to distil the
compressed model from the original (no labels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from compression.errors import TensorTrimError
from compression.input_spec import InputSpec
from compression.progress import Progress, silent
from compression.ranks.base import Data


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BN modules that keep running statistics."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None and m.running_var is not None
    ]


def synthesize(
    gm: nn.Module,
    spec: InputSpec,
    n: int,
    steps: int = 200,
    progress: Progress = silent,
    *,
    batch_size: int = 128,
    lr: float = 0.1,
    first_bn_weight: float = 2.0,
    tv_weight: float = 1e-3,
    l2_weight: float = 1e-4,
    class_weight: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Data:
    """``n`` synthetic samples for ``gm`` (the original model; left unchanged).

    Each chunk of ``batch_size`` inputs starts from N(0, 1) and takes ``steps``
    Adam steps on: sum over BN modules of ||mean - running_mean|| + ||var -
    running_var|| (the first BN weighted ``first_bn_weight``), plus
    ``tv_weight`` * total variation (inputs with >= 2 spatial axes) and
    ``l2_weight`` * mean square. A model without BatchNorm gets plain N(0, 1)
    inputs (reported through ``progress``).
    """
    if n < 1:
        raise TensorTrimError(f"number of synthetic samples must be >= 1, got {n}", code="bad_dataset")
    if not all(s.is_float for s in spec.inputs):
        raise TensorTrimError(
            f"data-free mode synthesises float inputs, but the model takes '{spec.to_string()}' "
            "(integer inputs such as token ids): upload a dataset instead",
            code="data_free_unsupported",
        )
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    bns = batch_norms(gm)
    if not bns or steps <= 0:
        if not bns:
            progress("synthesize", 1.0, "the model has no BatchNorm statistics: using random N(0,1) inputs")
        return Data(tuple(torch.randn((n, *s.shape), generator=g).to(s.dtype) for s in spec.inputs))

    stats: list[torch.Tensor] = []

    def hook(module: nn.modules.batchnorm._BatchNorm, args: tuple) -> None:
        x = args[0].float()
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        w = first_bn_weight if module is bns[0] else 1.0
        stats.append(
            w * (torch.linalg.vector_norm(mean - module.running_mean.float())
                 + torch.linalg.vector_norm(var - module.running_var.float()))
        )

    was_training = gm.training
    grad_flags = [(p, p.requires_grad) for p in gm.parameters()]
    handles = [bn.register_forward_pre_hook(hook) for bn in bns]
    chunks: list[list[torch.Tensor]] = [[] for _ in spec.inputs]
    done = 0
    try:
        gm.eval()
        for p, _ in grad_flags:
            p.requires_grad_(False)
        while done < n:
            b = min(batch_size, n - done)
            xs = [torch.randn((b, *s.shape), generator=g).to(device).requires_grad_(True) for s in spec.inputs]
            targets = None
            opt = torch.optim.Adam(xs, lr=lr, betas=(0.5, 0.9))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
            for step in range(steps):
                stats.clear()
                opt.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    out = gm(*xs)
                    loss = torch.stack(stats).sum() + sum(_prior(x, tv_weight, l2_weight) for x in xs)
                    logits = _logits(out)
                    if class_weight and logits is not None:
                        if targets is None:
                            targets = torch.arange(b, device=device) % logits.shape[1]
                        loss = loss + class_weight * F.cross_entropy(logits.float(), targets)
                    loss.backward()
                opt.step()
                sched.step()
                if step % 20 == 0 or step == steps - 1:
                    frac = (done + b * (step + 1) / steps) / n
                    progress("synthesize", frac, f"{done + b}/{n} samples, step {step + 1}/{steps}, "
                                                 f"BN loss {float(torch.stack(stats).sum().detach()):.4g}")
            for i, x in enumerate(xs):
                chunks[i].append(x.detach().to("cpu", spec.inputs[i].dtype))
            done += b
    finally:
        for h in handles:
            h.remove()
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        gm.train(was_training)
    x = tuple(torch.cat(c) for c in chunks)
    if not all(torch.isfinite(t).all() for t in x):
        raise TensorTrimError("input synthesis diverged (non-finite values): lower the synthesis lr",
                              code="synthesis_failed")
    return Data(x)


def _prior(x: torch.Tensor, tv_weight: float, l2_weight: float) -> torch.Tensor:
    loss = l2_weight * x.pow(2).mean()
    if tv_weight and x.dim() >= 4:  # (N, C, H, W...): smoothness over the last two axes
        dh = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean()
        dw = (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()
        loss = loss + tv_weight * (dh + dw)
    return loss


def _logits(out: object) -> torch.Tensor | None:
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if leaves and leaves[0].is_floating_point() and leaves[0].dim() == 2 and leaves[0].shape[1] >= 2:
        return leaves[0]
    return None
