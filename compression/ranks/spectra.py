"""Weight spectra and predicted decomposition error, shared by rank-selection methods.

``Spectra`` computes, once per layer and in float64, the singular values of the
weight unfoldings: for a k x k conv the mode-0 (C_out x C_in*k*k) and mode-1
(C_in x C_out*k*k) unfoldings; for a linear layer or a 1x1 conv the weight
matrix itself (both modes then hold the same values). ``spectra_for(ctx)``
returns one cached ``Spectra`` per graph module, so every method and the
fill pass share the SVDs.

``predicted_error(layer, form, ranks, spectra)`` is the relative Frobenius error
||W - W_hat|| / ||W|| a form is expected to leave:

- ``svd``: exact (Eckart-Young): sqrt(tail(R)) / ||W||.
- ``tucker2``: the truncated-HOSVD bound sqrt(tail_out(R_out)^2 + tail_in(R_in)^2)
  / ||W|| (tail = energy of the dropped singular values); the true HOSVD error is
  between max(tail_out, tail_in) and this bound.
- ``cp`` / ``cp4``: an *estimate* from the same spectra, no ALS is run. A rank-R
  CP has mode ranks <= R, so its error is at least ``lower`` = max of the mode
  tails at R. A Tucker-2 with one mode kept full and the other at r is a CP of
  rank <= r*k*k (cp4: r*k*k*min(kh, kw), each 3-way spatial vector being a
  kh x kw matrix of rank <= min(kh, kw)), so the error is at most ``upper`` =
  min of the mode tails at R // (k*k) (cp4: R // (k*k*min(kh, kw))). The
  estimate is the geometric mean sqrt(lower * upper): monotone in R, zero
  where the spectra say the layer is exactly representable, and it ranks CP
  below Tucker-2 at equal cost on typical trained weights, as ALS does. It is a
  heuristic; a method that needs exact CP errors must run ``linalg.cp_decompose``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from compression.inventory import LayerInfo
from compression.linalg import single_threaded

__all__ = ["LayerSpectrum", "Spectra", "predicted_error", "spectra_for", "weight_of"]


@dataclass(frozen=True)
class LayerSpectrum:
    """Singular values (descending, float64) of one layer's weight unfoldings.

    ``s_out``: mode-0 (C_out rows); ``s_in``: mode-1 (C_in rows). ``dims_out`` /
    ``dims_in`` are the (rows, cols) of each unfolding (VBMF needs them).
    """

    name: str
    s_out: np.ndarray
    s_in: np.ndarray
    dims_out: tuple[int, int]
    dims_in: tuple[int, int]
    norm2: float  # ||W||_F^2

    def __post_init__(self) -> None:
        for attr in ("s_out", "s_in"):
            s = getattr(self, attr)
            # tail[r] = sum_{i >= r} s_i^2, r = 0..len(s)
            tail = np.concatenate([np.cumsum((s**2)[::-1])[::-1], [0.0]])
            object.__setattr__(self, f"_tail_{attr[2:]}", tail)

    def tail(self, mode: str, rank: int) -> float:
        """Energy (squared Frobenius norm) dropped by keeping ``rank`` values of ``mode``."""
        tail = self._tail_out if mode == "out" else self._tail_in  # type: ignore[attr-defined]
        return float(tail[min(max(int(rank), 0), len(tail) - 1)])

    def rel_tail(self, mode: str, rank: int) -> float:
        return self.tail(mode, rank) / self.norm2 if self.norm2 > 0 else 0.0

    def energy_rank(self, mode: str, fraction: float) -> int:
        """Smallest rank (>= 1) keeping at least ``fraction`` of the squared spectrum."""
        tail = self._tail_out if mode == "out" else self._tail_in  # type: ignore[attr-defined]
        if self.norm2 <= 0:
            return 1
        allowed = (1.0 - fraction) * self.norm2 * (1 + 1e-12)
        # tail is non-increasing; first index where tail <= allowed
        idx = int(np.searchsorted(-tail, -allowed, side="left"))
        return max(1, min(idx, len(tail) - 1))


def weight_of(gm: torch.nn.Module, layer: LayerInfo) -> torch.Tensor:
    mod_path, _, attr = layer.weight.rpartition(".")
    owner = gm.get_submodule(mod_path) if mod_path else gm
    return getattr(owner, attr)


@single_threaded
def _svdvals(m: torch.Tensor) -> np.ndarray:
    """Singular values, descending, via the eigenvalues of the smaller Gram matrix
    (15x faster than an SVD for a 512 x 4608 unfolding; absolute accuracy
    ~1e-16 * s_max^2 on s^2, which is all the tails and VBMF need)."""
    g = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    ev = torch.linalg.eigvalsh(g).clamp_min(0).sqrt().flip(0)
    return ev.cpu().numpy()


def compute_spectrum(layer: LayerInfo, weight: torch.Tensor) -> LayerSpectrum:
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"layer {layer.name}: weight contains NaN or Inf")
    if w.dim() == 4 and tuple(w.shape[2:]) != (1, 1):
        u0 = w.reshape(w.shape[0], -1)
        u1 = w.transpose(0, 1).reshape(w.shape[1], -1)
        s0, s1 = _svdvals(u0), _svdvals(u1)
        d0, d1 = tuple(u0.shape), tuple(u1.shape)
    else:
        m = w.reshape(w.shape[0], -1)
        s0 = s1 = _svdvals(m)
        d0 = tuple(m.shape)
        d1 = (d0[1], d0[0])
    return LayerSpectrum(layer.name, s0, s1, d0, d1, float((w * w).sum()))  # type: ignore[arg-type]


class Spectra:
    """Lazy per-layer cache of ``LayerSpectrum`` for one graph module.

    An entry is recomputed when the weight tensor changes (new tensor or an
    in-place update, seen through the tensor's version counter).
    """

    def __init__(self, gm: torch.nn.Module) -> None:
        self.gm = gm
        self._cache: dict[str, tuple[int, int, LayerSpectrum]] = {}

    def get(self, layer: LayerInfo) -> LayerSpectrum:
        w = weight_of(self.gm, layer)
        key = (id(w), w._version)
        hit = self._cache.get(layer.name)
        if hit is not None and hit[:2] == key:
            return hit[2]
        spec = compute_spectrum(layer, w)
        self._cache[layer.name] = (*key, spec)
        return spec

    __getitem__ = get


_BY_GM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def spectra_for(ctx_or_gm) -> Spectra:
    """The shared ``Spectra`` of a SelectionContext (or graph module)."""
    gm = getattr(ctx_or_gm, "gm", ctx_or_gm)
    sp = _BY_GM.get(gm)
    if sp is None:
        sp = _BY_GM[gm] = Spectra(gm)
    return sp


def predicted_error(layer: LayerInfo, form: str | None, ranks: tuple[int, ...] | None,
                    spectra: Spectra | LayerSpectrum) -> float:
    """Predicted relative Frobenius error of ``layer`` in ``form`` at ``ranks``
    (0.0 for form None = dense). See the module docstring for each form."""
    if form is None:
        return 0.0
    sp = spectra if isinstance(spectra, LayerSpectrum) else spectra.get(layer)
    if sp.norm2 <= 0:
        return 0.0
    if form == "svd":
        return math.sqrt(sp.rel_tail("out", ranks[0]))  # type: ignore[index]
    if form == "tucker2":
        r_in, r_out = ranks  # type: ignore[misc]
        return min(1.0, math.sqrt(sp.rel_tail("out", r_out) + sp.rel_tail("in", r_in)))
    if form in ("cp", "cp4"):
        (r,) = ranks  # type: ignore[misc]
        kh, kw = layer.kernel
        per = kh * kw * (min(kh, kw) if form == "cp4" else 1)
        lower = max(sp.rel_tail("out", r), sp.rel_tail("in", r))
        q = r // per
        upper = 1.0 if q < 1 else min(sp.rel_tail("out", q), sp.rel_tail("in", q), 1.0)
        return min(1.0, math.sqrt(math.sqrt(lower * upper)))
    raise ValueError(f"unknown form {form!r}")
