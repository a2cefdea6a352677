"""Decompositions behind the factorised layer forms, in plain torch.

Everything is computed in float64 on the input's device (small layers lose
visible accuracy in float32 SVD/ALS); callers cast the factors back to the
layer's dtype. Rank problems raise :class:`RankError` with a message that names
the limit, because ranks usually come from a user or a search.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal, NamedTuple, TypeVar

import torch
from torch import Tensor

from compression.errors import RankError

# Which CP-ALS implementation the CP forms use for their init. Measured with
# bench/_layer_timing.py (1 thread, 100 sweeps, rank 128 on 256x256x3x3): ours
# 13 s (3-way) / 16 s (4-way) vs tensorly parafac 46 s / >150 s, same error,
# so "torch" is the default; "tensorly" stays here so the choice is one line.
CP_BACKEND: Literal["torch", "tensorly"] = "torch"

_LETTERS = "abcdefgh"


F = TypeVar("F", bound=Callable)


def single_threaded(fn: F) -> F:
    """Run ``fn`` with one intra-op thread. The factorisations here work on
    matrices of at most a few thousand columns, where threads gain little, and on
    a busy 2-core machine multi-threaded LAPACK spin-waits: a 512 x 4608 float64
    SVD took 13.6 s with 2 threads against 1.1 s with one (bench/decompose.py)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        before = torch.get_num_threads()
        if before == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper  # type: ignore[return-value]


def _f64(t: Tensor) -> Tensor:
    # A NaN/Inf weight would make LAPACK fail or return garbage factors; say so.
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"cannot decompose a tensor of shape {tuple(t.shape)} that contains NaN or Inf")
    return t.detach().to(torch.float64)


def _check_rank(name: str, rank: int, limit: int, why: str) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise RankError(f"{name} must be an int, got {type(rank).__name__}")
    if rank < 1:
        raise RankError(f"{name}={rank} is invalid: ranks must be >= 1")
    if rank > limit:
        raise RankError(f"{name}={rank} exceeds its maximum {limit} ({why})")


@single_threaded
def leading_left_singular_vectors(matrix: Tensor, rank: int) -> Tensor:
    """Top ``rank`` left singular vectors of ``matrix`` (m, n), shape (m, rank).

    Computed as eigenvectors of the m x m Gram matrix: conv unfoldings are wide
    (m << n), and this skips the right singular vectors a full SVD would build
    (several times faster for a 256 x 2304 unfolding). Squaring the condition
    number only blurs directions with negligible energy. When the matrix has
    fewer than ``rank`` columns the basis is completed orthonormally for free;
    the extra directions carry zero energy.
    """
    m, n = matrix.shape
    if n < m and rank <= n:
        u, _, _ = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank]
    _, vecs = torch.linalg.eigh(matrix @ matrix.T)
    return vecs.flip(1)[:, :rank]  # eigh sorts ascending


@single_threaded
def truncated_svd(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factors ``(U*sqrt(S), sqrt(S)*Vh)`` of a 2-D matrix.

    The singular values are split evenly so both factors have the same scale,
    which keeps float32 training of the two layers well conditioned.
    Returns float64 tensors of shapes (m, rank) and (rank, n).
    """
    if matrix.dim() != 2:
        raise ValueError(f"truncated_svd expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    m, n = matrix.shape
    _check_rank("rank", rank, min(m, n), f"min(out={m}, in={n})")
    u, s, vh = torch.linalg.svd(_f64(matrix), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


# --------------------------------------------------------------------- Tucker-2


def tucker2_rank_limits(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """``(max_r_out, max_r_in)`` for a conv weight (C_out, C_in, kh, kw):
    a mode rank cannot exceed the rank of that mode's unfolding."""
    c_out, c_in, kh, kw = shape
    return min(c_out, c_in * kh * kw), min(c_in, c_out * kh * kw)


def check_tucker2_ranks(shape: tuple[int, ...] | torch.Size, r_out: int, r_in: int) -> None:
    if len(shape) != 4:
        raise ValueError(f"Tucker-2 expects a 4-D conv weight, got shape {tuple(shape)}")
    c_out, c_in, kh, kw = shape
    max_out, max_in = tucker2_rank_limits(shape)
    _check_rank("r_out", r_out, max_out, f"min(C_out={c_out}, C_in*kh*kw={c_in * kh * kw})")
    _check_rank("r_in", r_in, max_in, f"min(C_in={c_in}, C_out*kh*kw={c_out * kh * kw})")


def _unfold0(w: Tensor) -> Tensor:
    return w.reshape(w.shape[0], -1)


def _unfold1(w: Tensor) -> Tensor:
    return w.transpose(0, 1).reshape(w.shape[1], -1)


def _tucker2_core(w: Tensor, u_out: Tensor, u_in: Tensor) -> Tensor:
    # core = W x0 U_out^T x1 U_in^T
    return torch.einsum("oihw,or,is->rshw", w, u_out, u_in)


@single_threaded
def tucker2_hosvd(weight: Tensor, r_out: int, r_in: int) -> tuple[Tensor, Tensor, Tensor]:
    """Tucker-2 of a conv weight by truncated HOSVD.

    Returns float64 ``(core (r_out, r_in, kh, kw), U_out (C_out, r_out),
    U_in (C_in, r_in))`` with ``W ~= core x0 U_out x1 U_in``.
    """
    check_tucker2_ranks(weight.shape, r_out, r_in)
    w = _f64(weight)
    u_out = leading_left_singular_vectors(_unfold0(w), r_out)
    u_in = leading_left_singular_vectors(_unfold1(w), r_in)
    return _tucker2_core(w, u_out, u_in), u_out, u_in


@single_threaded
def tucker2_hooi(
    weight: Tensor, r_out: int, r_in: int, n_iter: int = 20, tol: float = 1e-5
) -> tuple[Tensor, Tensor, Tensor]:
    """Tucker-2 by HOSVD refined with Higher-Order Orthogonal Iteration.

    Each sweep re-fits one factor against the weight projected on the other;
    stops after ``n_iter`` sweeps or when the relative error improves by less
    than ``tol``. With orthonormal factors ||W - W_hat||^2 = ||W||^2 - ||core||^2,
    so the fit costs nothing extra. Never worse than HOSVD (the best iterate is kept).
    """
    core, u_out, u_in = tucker2_hosvd(weight, r_out, r_in)
    w = _f64(weight)
    norm2 = float(w.pow(2).sum())
    if norm2 == 0.0:
        return core, u_out, u_in

    def rel_err(c: Tensor) -> float:
        return math.sqrt(max(norm2 - float(c.pow(2).sum()), 0.0) / norm2)

    best = (rel_err(core), core, u_out, u_in)
    prev = best[0]
    for _ in range(n_iter):
        y = torch.einsum("oihw,is->oshw", w, u_in)
        u_out = leading_left_singular_vectors(_unfold0(y), r_out)
        z = torch.einsum("oihw,or->rihw", w, u_out)
        u_in = leading_left_singular_vectors(_unfold1(z), r_in)
        core = _tucker2_core(w, u_out, u_in)
        err = rel_err(core)
        if err < best[0]:
            best = (err, core, u_out, u_in)
        if prev - err < tol:
            break
        prev = err
    return best[1], best[2], best[3]


def tucker2_reconstruct(core: Tensor, u_out: Tensor, u_in: Tensor) -> Tensor:
    return torch.einsum("rshw,or,is->oihw", core, u_out, u_in)


# --------------------------------------------------------------------------- CP


class CPResult(NamedTuple):
    """CP decomposition ``X ~= sum_r weights[r] * outer(f_0[:, r], f_1[:, r], ...)``
    with unit-norm factor columns (float64)."""

    weights: Tensor
    factors: list[Tensor]
    rel_error: float
    n_iter: int


def cp_reconstruct(weights: Tensor, factors: list[Tensor]) -> Tensor:
    n = len(factors)
    spec = ",".join(f"{_LETTERS[i]}z" for i in range(n))
    return torch.einsum(f"z,{spec}->{_LETTERS[:n]}", weights, *factors)


def _mttkrp(x: Tensor, factors: list[Tensor], mode: int) -> Tensor:
    """Unfolding of ``x`` along ``mode`` times the Khatri-Rao product of the
    other factors, without materialising either."""
    n = x.dim()
    idx = _LETTERS[:n]
    others = [i for i in range(n) if i != mode]
    spec = ",".join(f"{idx[i]}z" for i in others)
    return torch.einsum(f"{idx},{spec}->{idx[mode]}z", x, *[factors[i] for i in others])


def _cp_init(x: Tensor, rank: int, gen: torch.Generator) -> list[Tensor]:
    # Leading left singular vectors of each unfolding; columns past the mode
    # size (rank > I_n) are random. Random draws happen on CPU so a seed gives
    # the same start on every device.
    factors = []
    for mode in range(x.dim()):
        unfolding = torch.movedim(x, mode, 0).reshape(x.shape[mode], -1)
        k = min(rank, x.shape[mode])
        f = torch.linalg.svd(unfolding, full_matrices=False)[0][:, :k]
        if k < rank:
            extra = torch.randn(x.shape[mode], rank - k, generator=gen, dtype=torch.float64)
            f = torch.cat([f, extra.to(x.device)], dim=1)
        factors.append(f)
    return factors


@single_threaded
def cp_als(
    tensor: Tensor,
    rank: int,
    n_iter: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    init: Literal["svd", "random"] = "svd",
) -> CPResult:
    """CP decomposition of a 3- or 4-way tensor by alternating least squares.

    Stops after ``n_iter`` sweeps or when the relative reconstruction error
    changes by less than ``tol``. The normal equations get a tiny ridge
    (1e-10 of the Gram diagonal) so collinear or zero components cannot make
    the solve singular; a non-finite iterate raises :class:`RankError`.
    """
    if tensor.dim() not in (3, 4):
        raise ValueError(f"cp_als expects a 3- or 4-way tensor, got shape {tuple(tensor.shape)}")
    _check_rank("rank", rank, 2**31 - 1, "int32")
    x = _f64(tensor)
    norm_x2 = float(x.pow(2).sum())
    gen = torch.Generator().manual_seed(seed)
    if init == "svd":
        factors = _cp_init(x, rank, gen)
    else:
        factors = [
            torch.randn(s, rank, generator=gen, dtype=torch.float64).to(x.device) for s in x.shape
        ]
    n = x.dim()
    weights = torch.ones(rank, dtype=torch.float64, device=x.device)
    if norm_x2 == 0.0:
        return CPResult(torch.zeros_like(weights), factors, 0.0, 0)
    factors = [f / f.norm(dim=0).clamp_min(1e-300) for f in factors]
    grams = [f.T @ f for f in factors]
    eye = torch.eye(rank, dtype=torch.float64, device=x.device)
    rel_err = prev = math.inf
    it = 0
    for it in range(1, n_iter + 1):
        for mode in range(n):
            v = torch.ones_like(eye)
            for other in range(n):
                if other != mode:
                    v = v * grams[other]
            m = _mttkrp(x, factors, mode)
            ridge = 1e-10 * float(v.diagonal().max().clamp_min(1e-300))
            # v is symmetric, so solve v^T f^T = m^T for the new factor.
            f = torch.linalg.solve(v + ridge * eye, m.T).T
            norms = f.norm(dim=0)
            weights = norms
            f = f / torch.where(norms > 0, norms, torch.ones_like(norms))
            factors[mode] = f
            grams[mode] = f.T @ f
        # Error from the last mode's quantities: <X, X_hat> and ||X_hat||^2
        # are cheap there, so no reconstruction is built per sweep.
        b = factors[-1] * weights
        inner = float((b * m).sum())
        norm_hat2 = float(((b.T @ b) * v).sum())
        if not (math.isfinite(inner) and math.isfinite(norm_hat2)):
            raise RankError(
                f"CP-ALS diverged at rank {rank} for shape {tuple(tensor.shape)} "
                f"(non-finite factors after {it} sweeps); try a lower rank"
            )
        rel_err = math.sqrt(max(norm_x2 - 2 * inner + norm_hat2, 0.0) / norm_x2)
        if abs(prev - rel_err) < tol:
            break
        prev = rel_err
    # The closed-form error loses precision near zero; report the true one.
    rel_err = float((cp_reconstruct(weights, factors) - x).norm()) / math.sqrt(norm_x2)
    return CPResult(weights, factors, rel_err, it)


@single_threaded
def cp_als_tensorly(
    tensor: Tensor, rank: int, n_iter: int = 100, tol: float = 1e-6, seed: int = 0
) -> CPResult:
    """Same contract as :func:`cp_als`, computed by ``tensorly.decomposition.parafac``.

    The pytorch backend is set in a context so it does not leak to other code.
    """
    import tensorly as tl
    from tensorly.decomposition import parafac

    if tensor.dim() not in (3, 4):
        raise ValueError(f"cp_als expects a 3- or 4-way tensor, got shape {tuple(tensor.shape)}")
    _check_rank("rank", rank, 2**31 - 1, "int32")
    x = _f64(tensor)
    with tl.backend_context("pytorch"):
        cp, errors = parafac(
            x, rank, n_iter_max=n_iter, init="svd", tol=tol, random_state=seed,
            normalize_factors=True, return_errors=True,
        )
    weights, factors = cp.weights, list(cp.factors)
    if not all(bool(torch.isfinite(f).all()) for f in factors):
        raise RankError(f"CP-ALS (tensorly) diverged at rank {rank} for shape {tuple(tensor.shape)}")
    norm_x = float(x.norm())
    rel = float((cp_reconstruct(weights, factors) - x).norm()) / norm_x if norm_x else 0.0
    return CPResult(weights, factors, rel, len(errors))


def cp_decompose(
    tensor: Tensor, rank: int, n_iter: int = 100, tol: float = 1e-6, seed: int = 0
) -> CPResult:
    """CP decomposition used by the forms; backend chosen by ``CP_BACKEND``."""
    if CP_BACKEND == "tensorly":
        return cp_als_tensorly(tensor, rank, n_iter=n_iter, tol=tol, seed=seed)
    return cp_als(tensor, rank, n_iter=n_iter, tol=tol, seed=seed)
