"""``vbmf``: VBMF rank estimates, weakened to meet the budget.

Kim et al., "Compression of Deep Convolutional Neural Networks for Fast and Low
Power Mobile Applications" (ICLR 2016) pick each conv's Tucker-2 ranks by
running *analytic empirical VBMF* on the mode-1 (C_out) and mode-2 (C_in)
unfoldings of the kernel. EVBMF is the global analytic solution of Nakajima,
Sugiyama, Babacan and Tomioka, "Global analytic solution of fully-observed
variational Bayesian matrix factorization" (JMLR 14, 2013); the formulas below
follow that paper (and the reference MATLAB/Python code the popular
pytorch-tensor-decompositions scripts use):

- V is L x M with L <= M (transpose otherwise), alpha = L / M, singular values
  gamma_h. tau_bar = 2.5129 sqrt(alpha); x_bar = (1 + tau_bar)(1 + alpha / tau_bar).
- The noise variance sigma^2 minimises the free energy
  F(sigma^2) = sum_{x_h <= x_bar} (x_h - log x_h)
             + sum_{x_h > x_bar} (x_h - tau(x_h) + log((tau(x_h) + 1) / x_h)
                                  + alpha log(tau(x_h) / alpha + 1))
             + residual / (M sigma^2) + (L - H) log sigma^2,
  with x_h = gamma_h^2 / (M sigma^2) and
  tau(x) = (x - (1 + alpha) + sqrt((x - (1 + alpha))^2 - 4 alpha)) / 2,
  searched (bounded scalar minimisation) between
  max(gamma_{h_ub+1}^2 / (M x_bar), mean_{h > h_ub} gamma_h^2 / M) and ||V||^2 / (L M),
  where h_ub = min(ceil(L / (1 + alpha)) - 1, H) - 1 (0-based).
- The estimated rank is the number of gamma_h above the threshold
  gamma_bar = sqrt(M sigma^2 (1 + tau_bar)(1 + alpha / tau_bar)).

VBMF's ranks ignore the budget, so each layer's estimate r_vbmf (per mode) is
scaled by one global weakening factor f, r = clamp(ceil(f * r_vbmf), 1, max),
with f found by bisection so the network meets the budget; ``fill_to_budget``
then spends the slack. CP forms take r_vbmf = max of the two mode estimates
(a CP of rank R has both mode ranks <= R); SVD layers use the matrix itself.
With ``ctx.form == 'auto'`` each layer takes, at the cost of its weakened
Tucker-2 ranks, the form with the lowest predicted error.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar

from compression.inventory import LayerInfo
from compression.plan import RankPlan
from compression.ranks.base import RankSelector, SelectionContext, bisect_knob, plan_from_choice
from compression.ranks.fill import below_break_even, best_form_within, fill_to_budget, limits, tied, tied_ranks
from compression.ranks.spectra import LayerSpectrum, predicted_error, spectra_for

TAU_BAR_COEF = 2.5129  # Nakajima et al. 2013: tau_bar = 2.5129 sqrt(alpha)


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    b = x - (1 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4 * alpha, 0.0)))


def _free_energy(sigma2: float, L: int, M: int, s: np.ndarray, residual: float, x_bar: float) -> float:
    H = len(s)
    alpha = L / M
    x = s**2 / (M * sigma2)
    z1 = x[x > x_bar]
    z2 = x[x <= x_bar]
    tau1 = _tau(z1, alpha)
    z2 = np.maximum(z2, 1e-300)
    obj = np.sum(z2 - np.log(z2))
    obj += np.sum(z1 - tau1) + np.sum(np.log((tau1 + 1) / z1)) + alpha * np.sum(np.log(tau1 / alpha + 1))
    return float(obj + residual / (M * sigma2) + (L - H) * math.log(sigma2))


def evbmf_rank(s: np.ndarray, L: int, M: int, residual: float = 0.0) -> tuple[int, float]:
    """EVBMF rank estimate and noise variance for an L x M matrix with singular
    values ``s`` (descending; the full spectrum when ``residual`` is 0)."""
    if L > M:
        L, M = M, L
    s = np.asarray(s, dtype=np.float64)[:L]
    H = len(s)
    if H == 0 or not np.any(s > 0):
        return 0, 0.0
    alpha = L / M
    tau_bar = TAU_BAR_COEF * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    h_ub = int(min(math.ceil(L / (1 + alpha)) - 1, H)) - 1
    upper = (float(np.sum(s**2)) + residual) / (L * M)
    tail = s[h_ub + 1:] if h_ub + 1 < H else s[-1:]
    lower = max(float(tail[0] ** 2) / (M * x_bar), float(np.mean(tail**2)) / M)
    lower = max(lower, upper * 1e-12)
    if lower >= upper:
        sigma2 = upper
    else:
        res = minimize_scalar(_free_energy, args=(L, M, s, residual, x_bar), bounds=(lower, upper), method="bounded")
        sigma2 = float(res.x)
    threshold = math.sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return int(np.sum(s > threshold)), sigma2


def vbmf_ranks(layer: LayerInfo, sp: LayerSpectrum) -> tuple[int, int]:
    """(r_in, r_out) estimated by EVBMF on the C_in and C_out unfoldings (>= 1)."""
    r_out, _ = evbmf_rank(sp.s_out, *sp.dims_out)
    r_in, _ = evbmf_rank(sp.s_in, *sp.dims_in)
    return max(1, r_in), max(1, r_out)


class VBMF(RankSelector):
    name = "vbmf"
    summary = "VBMF rank estimates (Kim et al. 2016), weakened by one factor to meet the budget"

    def select(self, ctx: SelectionContext) -> RankPlan:
        meter = ctx.meter()
        meter.check_reachable(ctx)
        spectra = spectra_for(ctx)
        ctx.progress("ranks", 0.0, "vbmf: estimating ranks")
        est = {layer.name: vbmf_ranks(layer, spectra.get(layer)) for layer in ctx.candidates()}

        def scaled(layer: LayerInfo, form: str, f: float) -> tuple[int, ...]:
            r_in, r_out = est[layer.name]
            lim = limits(layer, form)
            up = lambda r, m: max(1, min(m, math.ceil(f * r - 1e-9)))  # noqa: E731
            if form == "tucker2":
                if tied(ctx):
                    return tied_ranks(layer, max(1, math.ceil(f * max(r_in, r_out) - 1e-9)))
                return (up(r_in, lim[0]), up(r_out, lim[1]))
            return (up(max(r_in, r_out), lim[0]),)

        def build(f: float) -> dict:
            choice = {}
            for layer in ctx.candidates():
                if ctx.form == "auto":
                    ref = "tucker2" if "tucker2" in layer.forms else layer.forms[0]
                    picked = best_form_within(ctx, meter, layer, meter.layer_cost(layer, ref, scaled(layer, ref, f)),
                                              spectra)
                    if picked is not None:
                        choice[layer.name] = picked
                    continue
                form = ctx.forms_for(layer)[0]
                ranks = scaled(layer, form, f)
                if below_break_even(meter, layer, form, ranks):
                    choice[layer.name] = (form, ranks)
            return choice

        # The largest useful factor takes every layer to its maximum ranks.
        f_hi = max((max(limits(layer, form)) / min(est[layer.name])
                    for layer in ctx.candidates() for form in ctx.forms_for(layer)), default=1.0)
        ctx.progress("ranks", 0.3, "vbmf: bisecting the weakening factor")
        choice = bisect_knob(build, meter, 0.0, max(f_hi, 1.0) * 1.01, iters=50)
        choice = fill_to_budget(ctx, choice, meter=meter, spectra=spectra)
        ctx.progress("ranks", 1.0, "vbmf: done")
        errors = {n: predicted_error(ctx.inventory.by_name(n), f, r, spectra) for n, (f, r) in choice.items()}
        note = "VBMF estimates (r_in, r_out): " + ", ".join(f"{n}={est[n]}" for n in sorted(est))
        return plan_from_choice(ctx, choice, self.name, errors, note=note)
