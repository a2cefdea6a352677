"""Per-layer timing: our decompositions (compression.linalg) against tensorly's.

For each conv weight shape, at the same ranks, iteration cap and tolerance:
Tucker-2 (ours HOSVD and HOOI vs ``partial_tucker`` on modes [0, 1], which is
HOOI) and CP-ALS (ours vs ``parafac``) of the 3-way (C_out, C_in, kh*kw) tensor
used by the "cp" form and the 4-way weight used by "cp4". Reports the median
seconds over ``repeats`` runs and the relative reconstruction error.

Run: python -m bench._layer_timing [repeats] [threads]

Threads default to 1: on a shared, oversubscribed CPU, multi-threaded BLAS
spin-waits made a 64x576 SVD ~100x slower and the numbers meaningless.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterable
from functools import partial

import tensorly as tl
import torch
from tensorly.decomposition import parafac, partial_tucker
from torch import Tensor

from compression.linalg import (
    cp_als,
    cp_reconstruct,
    tucker2_hooi,
    tucker2_hosvd,
    tucker2_reconstruct,
)

# Same caps and tolerances on both sides (relative-error change per sweep).
CP_ITERS = 100
CP_TOL = 1e-6
HOOI_ITERS = 100
HOOI_TOL = 1e-5


def _rel(approx: Tensor, ref: Tensor) -> float:
    return float((approx - ref).norm() / ref.norm())


def _timed(fn: Callable[[], Tensor], repeats: int) -> tuple[float, Tensor]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    assert out is not None
    return statistics.median(times), out


def _our_tucker(fn: Callable[..., tuple[Tensor, Tensor, Tensor]], w: Tensor, r_out: int, r_in: int) -> Tensor:
    return tucker2_reconstruct(*fn(w, r_out, r_in))


def _our_hooi(w: Tensor, r_out: int, r_in: int) -> tuple[Tensor, Tensor, Tensor]:
    return tucker2_hooi(w, r_out, r_in, n_iter=HOOI_ITERS, tol=HOOI_TOL)


def _tl_tucker(w: Tensor, r_out: int, r_in: int) -> Tensor:
    with tl.backend_context("pytorch"):
        (core, (u_out, u_in)), _ = partial_tucker(
            w, rank=[r_out, r_in], modes=[0, 1], init="svd", n_iter_max=HOOI_ITERS, tol=HOOI_TOL
        )
    return tucker2_reconstruct(core, u_out, u_in)


def _tl_cp(x: Tensor, rank: int) -> Tensor:
    with tl.backend_context("pytorch"):
        cp = parafac(x, rank, n_iter_max=CP_ITERS, init="svd", tol=CP_TOL, random_state=0)
    return cp_reconstruct(cp.weights, list(cp.factors))


def _our_cp(x: Tensor, rank: int) -> Tensor:
    res = cp_als(x, rank, n_iter=CP_ITERS, tol=CP_TOL, seed=0)
    return cp_reconstruct(res.weights, res.factors)


def time_layer_decompositions(
    shapes: Iterable[tuple[int, int, int, int]],
    repeats: int = 3,
    ratio: float = 0.5,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Rows ``{shape, op, impl, ranks, seconds, rel_error}``; ranks are ``ratio``
    of each channel count (CP rank = the Tucker R_out)."""
    rows: list[dict] = []
    for shape in shapes:
        c_out, c_in, kh, kw = shape
        # Random weights at He scale, float64 for both sides (the forms decompose in float64).
        w = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        w = w * (2.0 / (c_in * kh * kw)) ** 0.5
        r_out, r_in = max(1, int(c_out * ratio)), max(1, int(c_in * ratio))
        w3 = w.reshape(c_out, c_in, kh * kw)
        tucker = (r_out, r_in)
        cases: list[tuple[str, str, tuple[int, ...], Tensor, Callable[[], Tensor]]] = [
            ("tucker2", "ours_hosvd", tucker, w, partial(_our_tucker, tucker2_hosvd, w, r_out, r_in)),
            ("tucker2", "ours_hooi", tucker, w, partial(_our_tucker, _our_hooi, w, r_out, r_in)),
            ("tucker2", "tensorly_partial_tucker", tucker, w, partial(_tl_tucker, w, r_out, r_in)),
            ("cp3", "ours_cp_als", (r_out,), w3, partial(_our_cp, w3, r_out)),
            ("cp3", "tensorly_parafac", (r_out,), w3, partial(_tl_cp, w3, r_out)),
            ("cp4", "ours_cp_als", (r_out,), w, partial(_our_cp, w, r_out)),
            ("cp4", "tensorly_parafac", (r_out,), w, partial(_tl_cp, w, r_out)),
        ]
        for op, impl, ranks, ref, fn in cases:
            seconds, approx = _timed(fn, repeats)
            row = {
                "shape": shape,
                "op": op,
                "impl": impl,
                "ranks": ranks,
                "seconds": seconds,
                "rel_error": _rel(approx, ref),
            }
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    print(f"torch {torch.__version__}, tensorly {tl.__version__}, threads {torch.get_num_threads()}")

    def show(row: dict) -> None:
        print(
            f"{str(row['shape']):18} {row['op']:8} {row['impl']:24} ranks={str(row['ranks']):10} "
            f"{row['seconds']:8.3f}s  rel_err={row['rel_error']:.5f}",
            flush=True,
        )

    time_layer_decompositions([(64, 64, 3, 3), (256, 256, 3, 3)], repeats, on_row=show)


if __name__ == "__main__":
    main()
