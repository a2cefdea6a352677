"""``rene``: the unified continuous rank search (Aghababaei Harandi & Amini,
arXiv 2409.03555; v2 names it RENE), with an exact budget.

Reading implemented here (DESIGN.md 1.2; the authors' MIT code, aah94/RENE, was
consulted for the loop structure):

1. Searched layers: ``ctx.candidates()``, the default shared by every method
   (k x k convs with >= 512 weights and more than 4 input channels; every
   decomposable layer when those alone cannot meet the budget, or when
   ``options['all_layers']`` is true).
2. Per searched layer: a candidate set of *tied* ranks r (Tucker-2:
   R_in = R_out = r, each capped at its mode's maximum; CP / CP4 / SVD: the one
   rank), logits alpha and one factorised weight per candidate. The forward pass
   uses W_mix = sum_r p_r W_hat(r), p = softmax(alpha), as one layer.
   Tucker-2 and SVD candidates share the full HOSVD bases (computed once per
   layer, sliced per candidate); the trainable factor weight of a candidate is
   its core, so every quantity lives in the R_max x R_max core space and the
   weight loss costs nothing dense (||W - W_mix||^2 = ||W||^2 - ||C||^2 +
   ||C - M||^2 with C the projected core and M the mixed core). CP candidates
   are CP-ALS factors, cached per rank.
3. Losses. L_r = gamma * sum_i (sum_r p_i(r) cost_i(r) / dense cost_i)^beta with
   cost in the *budget's metric* (Meter.layer_cost), so MACs, parameter and
   latency budgets all steer it. Factor weights minimise
   L_Tw = [sum_i ||W_i - W_mix,i||^2 / ||W_i||^2] * L_r (data-free). Logits
   minimise L_val * (L_r / L_r0)^lambda: L_val is the cross-entropy on a 10 %
   split of ``ctx.data`` when it has labels, otherwise the relative output
   reconstruction ||f_mix(x) - f(x)||^2 / ||f(x)||^2 on ``ctx.data.x`` or on
   random inputs drawn from the input spec (at reduced spatial size when the
   graph accepts it). L_val is divided by its first value and L_r by its value
   at uniform p (constants), so lambda = 1 is the paper's product up to scale.
4. The budget (the paper has none: its product loss makes gamma a mere step
   size). lambda is a budget multiplier adapted by dual ascent during the joint
   steps: lambda <- lambda * exp(rate * (cost(argmax ranks) / target - 1)),
   so the argmax ranks are steered to the budget. Then a deterministic
   projection makes it exact: starting from the argmax ranks, greedily lower
   the rank with the least predicted output damage per unit of cost saved
   until the budget holds, raise the one with the most damage avoided per unit
   cost while it fits, and exchange (lower some layers to raise a better one)
   while that helps. Predicted output damage of a layer = s_i * e_i(ranks)^2,
   e_i the relative weight error (exact for the HOSVD bases, from the cached
   full core; interpolated between ALS runs for CP) and s_i a sensitivity
   measured once by putting a single truncated layer in the network and
   measuring the output change. Tucker-2 ranks may untie in this last step
   (single-mode steps make the budget exact). ``fill.fill_to_budget`` spends any
   slack left. Candidates, argmax and projection stay at or above the rank
   floor (``compression.ranks.floor``: half a uniform split's ranks; option
   ``min_rank_share``): without it the search emptied single layers at 5x.
5. Search schedule: SGD Nesterov 0.9, lr 1e-3 for both groups, 20 weight-only
   warm-up steps then 100 joint steps per round; rank = argmax p; refine:
   candidates r* +- s/2 at step s // 10, fresh cores and logits; at most 3 rounds.
   The factor-weight (Eq. 8) step runs on every warm-up step and every 5th joint
   step, and its count is capped by a work budget (``weight_work`` core-element
   passes per round): on ResNet-18 it is memory-bound, and at lr 1e-3 it moves
   the cores by ~1e-5 relative, so the cap changes nothing but the time.
   The logit objective runs on 4 random samples at ~64 x 64 (batch 2) when the
   graph accepts a smaller input; costs always come from the full-size inventory.
   Models with < 1M decomposable weights are searched on one intra-op thread.
   Candidates never pass break-even (``fill.below_break_even``: the factored
   layer must be cheaper in MACs, parameters and the budget's metric).
6. Guards: gradient-norm clipping; a non-finite loss, gradient or parameter
   skips the step, restores the last good state (cores and logits), clears the
   momentum and halves that group's learning rate.

Options (``ctx.options``): all_layers, lr, lr_alpha, warmup, steps, rounds,
candidates, refine, gamma, beta, batch, samples, side (data-free input side),
clip, dual_rate, cp_iters, exchange (projection exchange passes), probe_error,
weight_every, weight_work, threads, min_rank_share. ``Rene().stats`` holds the last run's numbers.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from compression.forms import max_ranks
from compression.inventory import LayerInfo
from compression.linalg import cp_decompose, cp_reconstruct, leading_left_singular_vectors
from compression.plan import RankPlan
from compression.ranks.base import Meter, RankSelector, SelectionContext, method_options, plan_from_choice
from compression.ranks.fill import below_break_even, fill_to_budget
from compression.ranks.floor import rank_floor
from compression.rewrite import get_tensor

SMALL_MODEL = 1_000_000  # weights in decomposable layers below which the search runs on one thread
DEFAULTS: dict = {
    "lr": 1e-3, "lr_alpha": None, "momentum": 0.9, "warmup": 20, "steps": 100, "rounds": 3, "candidates": 8,
    "refine": 10, "gamma": 0.4, "beta": 0.8, "batch": 2, "samples": 4, "side": 64, "clip": 1.0,
    "dual_rate": 0.1, "cp_iters": 25, "exchange": 2000, "probe_error": 0.05,
    "weight_every": 5, "weight_work": 3e8,
}

Choice = dict[str, tuple[str, tuple[int, ...]]]


# ----------------------------------------------------------------------------- per-layer facts


@dataclass
class _Layer:
    """One searched layer: its form, decomposition caches, error and cost ladders."""

    info: LayerInfo
    form: str
    w: Tensor  # float64 weight as a 4-D tensor (linear: (out, in, 1, 1))
    norm2: float
    lim: tuple[int, ...]  # max_ranks in the form's order
    rmax: int = 1  # largest tied rank below break-even
    # tucker2 / svd: full HOSVD bases and core, and the 2-D energy table
    u_out: Tensor | None = None
    u_in: Tensor | None = None
    core: Tensor | None = None
    table: Tensor | None = None  # table[a, b] = energy kept by (r_out=a, r_in=b)
    # cp / cp4: ALS caches by rank
    cp_err2: dict[int, float] = field(default_factory=dict)
    cp_fac: dict[int, list[Tensor]] = field(default_factory=dict)
    sens: float = 1.0

    @property
    def tucker_like(self) -> bool:
        return self.form in ("tucker2", "svd")

    def ranks_of(self, r: int) -> tuple[int, ...]:
        """Form ranks of a tied rank r."""
        if self.form == "tucker2":
            return (max(1, min(r, self.lim[0])), max(1, min(r, self.lim[1])))
        return (max(1, min(r, self.lim[0])),)

    def tied_of(self, ranks: tuple[int, ...]) -> int:
        return max(ranks)

    def err2(self, ranks: tuple[int, ...] | None, cp_iters: int = 25) -> float:
        """Squared relative weight error of the form at ``ranks`` (None: dense)."""
        if ranks is None or self.norm2 <= 0:
            return 0.0
        if self.tucker_like:
            r_in, r_out = (ranks[0], ranks[0]) if self.form == "svd" else ranks
            kept = float(self.table[r_out, r_in])  # type: ignore[index]
            return max(0.0, 1.0 - kept / self.norm2)
        (r,) = ranks
        if r in self.cp_err2:
            return self.cp_err2[r]
        # interpolate between evaluated ranks (err2(0) = 1), flat past the last
        known = sorted(self.cp_err2.items())
        lo_r, lo_e = 0, 1.0
        for kr, ke in known:
            if kr > r:
                t = (r - lo_r) / (kr - lo_r)
                return lo_e + t * (ke - lo_e)
            lo_r, lo_e = kr, ke
        return lo_e

    def cp_factors(self, r: int, cp_iters: int, seed: int) -> list[Tensor]:
        if r not in self.cp_fac:
            shape = (self.w.shape[0], self.w.shape[1], self.w.shape[2] * self.w.shape[3])
            x = self.w.reshape(shape) if self.form == "cp" else self.w
            res = cp_decompose(x, r, n_iter=cp_iters, seed=seed)
            share = res.weights.clamp_min(0).pow(1.0 / len(res.factors))
            self.cp_fac[r] = [f * share for f in res.factors]
            self.cp_err2[r] = float(res.rel_error) ** 2
        return self.cp_fac[r]

    def dense_hat(self, ranks: tuple[int, ...], cp_iters: int, seed: int) -> Tensor:
        """W_hat at ``ranks`` as a float64 4-D tensor."""
        if self.tucker_like:
            r_in, r_out = (ranks[0], ranks[0]) if self.form == "svd" else ranks
            c = self.core[:r_out, :r_in]  # type: ignore[index]
            return torch.einsum("or,rshw,is->oihw", self.u_out[:, :r_out], c, self.u_in[:, :r_in])  # type: ignore[index]
        (r,) = ranks
        fac = self.cp_factors(r, cp_iters, seed)
        return cp_reconstruct(torch.ones(r, dtype=torch.float64), fac).reshape(self.w.shape)


def _left_basis(m: Tensor, k: int) -> Tensor:
    """Leading ``k`` left singular vectors of ``m`` (rows <= cols here or k <= rank),
    from the eigenvectors of the Gram matrix: much faster than an SVD of the wide
    unfolding, and only used as a basis (errors are measured in it exactly)."""
    if m.shape[0] > m.shape[1] or k > m.shape[0]:
        return leading_left_singular_vectors(m, k)
    m32 = m.float()
    _, vecs = torch.linalg.eigh((m32 @ m32.T).double())
    return vecs.flip(1)[:, :k].contiguous()


def _prepare(layer: LayerInfo, form: str, weight: Tensor, meter: Meter) -> _Layer:
    w = weight.detach().to(torch.float64)
    if w.dim() == 2:
        w = w[:, :, None, None]
    o, i, kh, kw = w.shape
    lim = max_ranks(form, layer.c_out, layer.c_in, *layer.kernel)
    lay = _Layer(layer, form, w, float((w * w).sum()), lim)
    if lay.tucker_like:
        mo, mi = min(o, i * kh * kw), min(i, o * kh * kw)
        lay.u_out = _left_basis(w.reshape(o, -1), mo)
        lay.u_in = _left_basis(w.transpose(0, 1).reshape(i, -1), mi)
        # core = W x0 U_out^T x1 U_in^T, as two float32 matrix products (the energy
        # table only needs ~1e-6 relative accuracy)
        w32, uo, ui = w.float(), lay.u_out.float(), lay.u_in.float()
        t = (uo.T @ w32.reshape(o, -1)).reshape(mo, i, kh * kw)
        core = (t.transpose(1, 2) @ ui).transpose(1, 2).reshape(mo, mi, kh, kw)
        lay.core = core.double().contiguous()
        energy = lay.core.pow(2).sum(dim=(2, 3))
        table = torch.zeros(mo + 1, mi + 1, dtype=torch.float64)
        table[1:, 1:] = energy.cumsum(0).cumsum(1)
        lay.table = table
    # largest tied rank below break-even (cost is monotone in the tied rank)
    top = max(lim)
    lo, hi = 0, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if below_break_even(meter, layer, form, lay.ranks_of(mid)):
            lo = mid
        else:
            hi = mid - 1
    lay.rmax = lo
    return lay


# ----------------------------------------------------------------------------- mixed modules


class _MixCores(torch.autograd.Function):
    """M = sum_k p_k * pad(G_k) for nested cores G_k (top-left blocks of M).

    Written out because autograd's in-place slice-adds (or pads) copy the whole
    R_max x R_max core once per candidate in the backward pass; here both
    passes cost sum_k |G_k|."""

    @staticmethod
    def forward(ctx, p: Tensor, shape: tuple[int, ...], *cores: Tensor) -> Tensor:  # type: ignore[override]
        m = torch.zeros(shape, dtype=p.dtype)
        for k, g in enumerate(cores):
            m[: g.shape[0], : g.shape[1]].add_(g, alpha=float(p[k]))
        ctx.save_for_backward(p, *cores)
        return m

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        p, *cores = ctx.saved_tensors
        dp = torch.stack([(grad[: g.shape[0], : g.shape[1]] * g).sum() for g in cores])
        dcores = [grad[: g.shape[0], : g.shape[1]] * p[k] if ctx.needs_input_grad[2 + k] else None
                  for k, g in enumerate(cores)]
        return (dp, None, *dcores)



class _Mixed(nn.Module):
    """A searched layer inside the graph: computes the layer with W_mix.

    ``override`` switches it to the dense weight ("dense") or to a given dense
    weight tensor (the sensitivity probe)."""

    def __init__(self, lay: _Layer, bias: Tensor | None, dense: Tensor) -> None:
        super().__init__()
        self.lay = lay
        self.linear = lay.info.kind == "linear"
        info = lay.info
        self.stride, self.padding, self.dilation = info.stride, info.padding, info.dilation
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.dense_w = dense.detach()
        self.override: str | Tensor | None = "dense"
        self.alpha = nn.Parameter(torch.zeros(1))
        self.factors = nn.ParameterList()
        self.cands: list[int] = []
        self._factored: bool | None = None

    # -- candidates ---------------------------------------------------------------
    def reset(self, cands: list[int], cp_iters: int, seed: int) -> None:
        lay = self.lay
        self.cands = list(cands)
        self.alpha = nn.Parameter(torch.zeros(len(cands)))
        params = []
        if lay.tucker_like:
            rmax = max(cands)
            big = lay.ranks_of(rmax)
            r_in, r_out = (big[0], big[0]) if lay.form == "svd" else big
            self.r_in, self.r_out = r_in, r_out
            self.u_out = lay.u_out[:, :r_out].float().contiguous()  # type: ignore[index]
            self.u_in = lay.u_in[:, :r_in].float().contiguous()  # type: ignore[index]
            self.first_w = self.u_in.T.contiguous()[:, :, None, None]
            self.last_w = self.u_out[:, :, None, None].contiguous()
            c = lay.core[:r_out, :r_in]  # type: ignore[index]
            self.c_full = c.float()
            self.resid = max(0.0, lay.norm2 - float(c.pow(2).sum())) / max(lay.norm2, 1e-300)
            for r in cands:
                ri, ro = self._pair(r)
                params.append(nn.Parameter(c[:ro, :ri].float().clone()))
        else:
            self.n_fac = 3 if lay.form == "cp" else 4
            for r in cands:
                for f in lay.cp_factors(r, cp_iters, seed):
                    params.append(nn.Parameter(f.float().clone()))
            self.w32 = lay.w.float()
        self.factors = nn.ParameterList(params)
        self._factored = None

    def _pair(self, r: int) -> tuple[int, int]:
        ranks = self.lay.ranks_of(r)
        return (ranks[0], ranks[0]) if self.lay.form == "svd" else (ranks[0], ranks[1])

    def p(self) -> Tensor:
        return torch.softmax(self.alpha, 0)

    def mixed_core(self) -> Tensor:
        """sum_r p_r * core_r, each core zero-padded to R_out x R_in."""
        return _MixCores.apply(self.p(), tuple(self.c_full.shape), *self.factors)

    def _cp_hat(self, k: int) -> Tensor:
        fac = list(self.factors)[k * self.n_fac:(k + 1) * self.n_fac]
        r = fac[0].shape[1]
        return cp_reconstruct(torch.ones(r, dtype=fac[0].dtype), fac).reshape(self.w32.shape)

    def mixed_weight(self) -> Tensor:
        if self.lay.tucker_like:
            return torch.einsum("or,rshw,is->oihw", self.u_out, self.mixed_core(), self.u_in)
        p = self.p()
        return sum(p[k] * self._cp_hat(k) for k in range(len(self.cands)))  # type: ignore[return-value]

    def werr(self) -> Tensor:
        """||W - W_mix||^2 / ||W||^2."""
        if self.lay.tucker_like:
            return self.resid + (self.c_full - self.mixed_core()).pow(2).sum() / max(self.lay.norm2, 1e-300)
        return (self.w32 - self.mixed_weight()).pow(2).sum() / max(self.lay.norm2, 1e-300)

    def weight_params(self) -> list[nn.Parameter]:
        return list(self.factors)

    # -- forward -----------------------------------------------------------------
    def _dense(self, x: Tensor, w: Tensor) -> Tensor:
        if self.linear:
            return F.linear(x, w.reshape(w.shape[0], w.shape[1]), self.bias)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.override, str):
            return self._dense(x, self.dense_w)
        if isinstance(self.override, Tensor):
            return self._dense(x, self.override)
        if not self.lay.tucker_like:
            return self._dense(x, self.mixed_weight())
        if self._factored is None:
            # one dense conv with W_mix rebuilt each step, or the three factored convs
            # around the mixed core (cheaper when the reduced input has few positions)
            o, i, kh, kw = self.lay.w.shape
            k2 = kh * kw
            dense = o * self.r_out * self.r_in * k2 + o * i * k2 * self.r_in
            pos = x[0].numel() // max(i, 1)
            fact = x.shape[0] * pos * (i * self.r_in + k2 * self.r_in * self.r_out + self.r_out * o)
            self._factored = fact < dense
        m = self.mixed_core()
        if not self._factored:
            return self._dense(x, torch.einsum("or,rshw,is->oihw", self.u_out, m, self.u_in).contiguous())
        if self.linear:
            y = (x @ self.u_in) @ m[:, :, 0, 0].T @ self.u_out.T
            return y if self.bias is None else y + self.bias
        y = F.conv2d(x, self.first_w)
        y = F.conv2d(y, m, None, self.stride, self.padding, self.dilation)
        return F.conv2d(y, self.last_w, self.bias)


def _install(gm: torch.fx.GraphModule, mods: dict[str, _Mixed]) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, mod in mods.items():
        sub = "rene_" + name.replace(".", "_")
        gm.add_submodule(sub, mod)
        for site in mod.lay.info.sites:
            node = nodes[site.node]
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(sub, (node.args[0],))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


# ----------------------------------------------------------------------------- helpers


def _flat(out: object) -> Tensor:
    if isinstance(out, Tensor):
        return out.float().reshape(out.shape[0], -1) if out.dim() else out.float().reshape(1, 1)
    if isinstance(out, (list, tuple)):
        parts = [_flat(o) for o in out]
        parts = [p for p in parts if p.numel()]
        return torch.cat(parts, 1) if parts else torch.zeros(1, 1)
    if isinstance(out, dict):
        return _flat(list(out.values()))
    return torch.zeros(1, 1)


def _rel_recon(out: object, ref: Tensor) -> Tensor:
    got = _flat(out)
    return (got - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-12)


def _free_inputs(ctx: SelectionContext, gm: nn.Module, n: int, side: int) -> list[Tensor]:
    """Random inputs from the spec; spatial dims shrunk to ~side x side when the graph runs on them."""
    g = torch.Generator().manual_seed(ctx.seed + 17)

    def draw(shrink: bool) -> list[Tensor]:
        out = []
        for s in ctx.spec.inputs:
            shape = list(s.shape)
            if shrink and s.is_float and len(shape) >= 3 and shape[-1] * shape[-2] > side * side:
                scale = side / math.sqrt(shape[-1] * shape[-2])
                shape[-2] = max(8, round(shape[-2] * scale))
                shape[-1] = max(8, round(shape[-1] * scale))
            if s.is_float:
                out.append(torch.randn((n, *shape), generator=g).to(s.dtype))
            else:
                out.append(torch.randint(0, s.high, (n, *shape), generator=g, dtype=s.dtype))
        return out

    small = draw(True)
    if [tuple(t.shape[1:]) for t in small] != [s.shape for s in ctx.spec.inputs]:
        try:
            with torch.no_grad():
                gm(*[t[:2] for t in small])
            return small
        except Exception:  # a graph with shapes fixed by the converter: use the spec's size
            pass
    return draw(False)


def _snapshot(params: list[Tensor]) -> list[Tensor]:
    return [p.detach().clone() for p in params]


def _restore(params: list[Tensor], snap: list[Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(params, snap):
            p.copy_(s)


class _Guard:
    """One optimiser with gradient clipping and NaN/Inf guards.

    A good state (parameters whose loss and gradients were finite) is saved
    every ``snap_every`` good steps; a bad step restores it."""

    def __init__(self, params: list[nn.Parameter], lr: float, momentum: float, clip: float,
                 snap_every: int = 1) -> None:
        self.params = params
        self.opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)
        self.clip = clip if clip > 0 else math.inf
        self.snap_every = snap_every
        self.good = _snapshot(params)
        self.events = 0
        self.count = 0

    def step(self, loss: Tensor) -> bool:
        self.opt.zero_grad(set_to_none=True)
        if not bool(torch.isfinite(loss)):
            return self._fail()
        loss.backward()
        # the total norm is non-finite when any gradient entry is
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if not bool(torch.isfinite(norm)):
            return self._fail()
        if self.count % self.snap_every == 0:
            self.good = _snapshot(self.params)
        self.opt.step()
        if not bool(torch.isfinite(torch.stack(torch._foreach_norm(self.params))).all()):
            return self._fail()
        self.count += 1
        return True

    def _fail(self) -> bool:
        self.events += 1
        self.opt.zero_grad(set_to_none=True)
        _restore(self.params, self.good)
        self.opt.state.clear()
        for group in self.opt.param_groups:
            group["lr"] *= 0.5
        return False


# ----------------------------------------------------------------------------- the method


class Rene(RankSelector):
    name = "rene"
    uses_data = False
    summary = "continuous rank search (RENE) over mixed candidate ranks, projected onto the exact budget"

    def __init__(self) -> None:
        self.stats: dict = {}

    def select(self, ctx: SelectionContext) -> RankPlan:
        t0 = time.perf_counter()
        opts = method_options(ctx, self.name, {**DEFAULTS, "threads": None},
                              positive=("lr", "lr_alpha", "steps", "rounds", "candidates", "refine", "batch",
                                        "samples", "side", "cp_iters", "threads"))
        meter = ctx.meter()
        meter.check_reachable(ctx)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(ctx.seed)
        threads = torch.get_num_threads()
        # Tiny tensors gain nothing from intra-op threads, and spinning OpenMP
        # threads on a shared CPU slow small models down by 10x or more.
        if opts.get("threads") is not None:
            torch.set_num_threads(max(1, int(opts["threads"])))
        elif sum(layer.params for layer in ctx.inventory.decomposable) < SMALL_MODEL:
            torch.set_num_threads(1)
        try:
            with torch.no_grad():
                layers = self._layers(ctx, meter, opts)
            ctx.progress("ranks", 0.05, f"rene: {len(layers)} layers searched")
            choice, errors, note = self._run(ctx, meter, layers, opts)
        finally:
            torch.random.set_rng_state(gen_state)
            torch.set_num_threads(threads)
        self.stats["seconds"] = time.perf_counter() - t0
        ctx.progress("ranks", 1.0, f"rene: done in {self.stats['seconds']:.1f} s")
        return plan_from_choice(ctx, choice, self.name, errors=errors, note=note)

    # -- which layers, which forms ------------------------------------------------
    def _layers(self, ctx: SelectionContext, meter: Meter, opts: dict) -> list[_Layer]:
        picked = ctx.candidates()
        self.stats["all_layers"] = not ctx.kept_dense()
        out = []
        for layer in picked:
            forms = ctx.forms_for(layer)
            weight = get_tensor(ctx.gm, layer.weight)
            form = forms[0] if len(forms) == 1 else self._auto_form(ctx, meter, layer, forms, weight, opts)
            lay = _prepare(layer, form, weight, meter)
            if lay.rmax >= 1:
                out.append(lay)
        return out

    def _auto_form(self, ctx: SelectionContext, meter: Meter, layer: LayerInfo, forms: tuple[str, ...],
                   weight: Tensor, opts: dict) -> str:
        """'auto': the form with the lower weight error at the budget's share of the layer's cost."""
        keep = ctx.budget.keep if ctx.budget.keep is not None else 1 / 3
        cap = keep * meter.layer_cost(layer, None, None)
        best = (math.inf, forms[0])
        for form in forms:
            if form == "cp4":
                continue  # CP4 only when asked for: Tucker-2 vs CP is the paper's choice
            lay = _prepare(layer, form, weight, meter)
            r = 0
            for cand in range(1, lay.rmax + 1):
                if meter.layer_cost(layer, form, lay.ranks_of(cand)) <= cap:
                    r = cand
                else:
                    break
            if r == 0:
                continue
            if not lay.tucker_like:
                lay.cp_factors(r, opts["cp_iters"], ctx.seed)
            e = lay.err2(lay.ranks_of(r))
            if e < best[0]:
                best = (e, form)
        return best[1]

    # -- search --------------------------------------------------------------------
    def _run(self, ctx: SelectionContext, meter: Meter, layers: list[_Layer], opts: dict):
        if not layers:
            return {}, {}, "rene: no layer to search"
        gm = copy.deepcopy(ctx.gm).eval()
        for p in gm.parameters():
            p.requires_grad_(False)
        mods = {}
        for lay in layers:
            info = lay.info
            bias = get_tensor(gm, info.bias) if info.bias else None
            mods[info.name] = _Mixed(lay, bias, get_tensor(gm, info.weight))
        _install(gm, mods)
        batches, mode = self._batches(ctx, gm, mods, opts)

        fixed = meter.total({}) - sum(meter.layer_cost(lay.info, None, None) for lay in layers)
        dense_cost = {lay.info.name: meter.layer_cost(lay.info, None, None) for lay in layers}
        lam = 1.0
        guards_events = 0
        floor = rank_floor(ctx, meter)
        lows = {lay.info.name: floor.of(lay.info, lay.form) for lay in layers}  # per mode
        low = {lay.info.name: min(lay.rmax, max(lows[lay.info.name])) for lay in layers}  # as a tied rank
        steps_of = {lay.info.name: max(1, math.ceil((lay.rmax - low[lay.info.name] + 1) / opts["candidates"]))
                    for lay in layers}
        cands = {}
        for lay in layers:
            name = lay.info.name
            s = steps_of[name]
            cands[name] = sorted({min(lay.rmax, low[name] - 1 + s * j) for j in range(1, opts["candidates"] + 1)})
        rounds = int(opts["rounds"])
        picked: dict[str, int] = {}
        done_rounds = 0
        total_steps = rounds * (opts["warmup"] + opts["steps"])
        for rnd in range(rounds):
            costs = {}
            for lay in layers:
                name = lay.info.name
                mods[name].reset(cands[name], opts["cp_iters"], ctx.seed)
                mods[name].override = None
                costs[name] = torch.tensor([meter.layer_cost(lay.info, lay.form, lay.ranks_of(r))
                                            for r in cands[name]], dtype=torch.float32)
            lam, picked, events = self._round(ctx, gm, meter, mods, costs, dense_cost, fixed, batches, mode, lam,
                                              opts, rnd, total_steps)
            guards_events += events
            done_rounds += 1
            # refine around the argmax (Algorithm 1): r* +- s/2 at step s // refine
            again = False
            for lay in layers:
                name = lay.info.name
                s = steps_of[name]
                nxt = s // int(opts["refine"])
                if nxt >= 1:
                    again = True
                    r = picked[name]
                    lo, hi = max(low[name], r - s // 2), min(lay.rmax, r + s // 2)
                    cands[name] = sorted(set(range(lo, hi + 1, nxt)) | {r})
                    steps_of[name] = nxt
                else:
                    cands[name] = [picked[name]]
            if not again:
                break
        for mod in mods.values():
            mod.override = "dense"
        start = {lay.info.name: lay.ranks_of(picked[lay.info.name]) for lay in layers}
        with torch.no_grad():
            self._sensitivities(ctx, gm, mods, layers, start, batches, opts)
        ctx.progress("ranks", 0.9, "rene: projecting onto the budget")
        state, moved = self._project(meter, layers, start, fixed, opts, lows)
        choice = {lay.info.name: (lay.form, state[lay.info.name]) for lay in layers
                  if state[lay.info.name] is not None}
        if meter.total(choice) < meter.target * (1 - 1e-3):  # slack the projection could not spend
            choice = fill_to_budget(ctx, choice, meter=meter)
        errors = {name: math.sqrt(next(lay for lay in layers if lay.info.name == name).err2(ranks))
                  for name, (_, ranks) in choice.items()}
        self.stats.update(rounds=done_rounds, lam=lam, guard_events=guards_events, moved=moved, mode=mode,
                          start=start, layers=len(layers))
        note = (f"rene: {len(layers)} layers, {done_rounds} search round(s), {mode} objective, "
                f"budget multiplier {lam:.3g}, projection moved {moved} rank step(s)")
        if guards_events:
            note += f", {guards_events} non-finite step(s) skipped"
        return choice, errors, note

    def _batches(self, ctx: SelectionContext, gm: nn.Module, mods: dict[str, _Mixed], opts: dict):
        """(inputs, target) batches for the logit objective; targets from the original model."""
        labelled = ctx.data is not None and ctx.data.y is not None
        if labelled:
            _, val = ctx.data.split(0.1, seed=ctx.seed)  # type: ignore[union-attr]
            size = int(ctx.options.get("batch", 16))
            out = [(tuple(x), y) for x, y in val.batches(size, shuffle=True, seed=ctx.seed)]
            return out, "cross-entropy"
        if ctx.data is not None:
            xs: list[tuple[Tensor, ...]] = [tuple(x) for x, _ in
                                            ctx.data.batches(int(opts["batch"]), shuffle=True, seed=ctx.seed)]
            xs = xs[: max(1, int(opts["samples"]) // int(opts["batch"]))]
            mode = "output reconstruction (data)"
        else:
            with torch.no_grad():
                ins = _free_inputs(ctx, gm, int(opts["samples"]), int(opts["side"]))
            b = int(opts["batch"])
            xs = [tuple(t[i:i + b] for t in ins) for i in range(0, ins[0].shape[0], b)]
            mode = "output reconstruction (data-free)"
        with torch.no_grad():
            out = [(x, _flat(gm(*x))) for x in xs]
        return out, mode

    def _round(self, ctx, gm, meter, mods, costs, dense_cost, fixed, batches, mode, lam, opts, rnd, total_steps):
        names = list(mods)
        wparams = [p for m in mods.values() for p in m.weight_params()]
        aparams = [m.alpha for m in mods.values()]
        lr_a = opts["lr_alpha"] if opts["lr_alpha"] is not None else opts["lr"]
        gw = _Guard(wparams, float(opts["lr"]), float(opts["momentum"]), float(opts["clip"]), snap_every=10)
        ga = _Guard(aparams, float(lr_a), float(opts["momentum"]), float(opts["clip"]))
        gamma, beta = float(opts["gamma"]), float(opts["beta"])
        norm = {n: dense_cost[n] for n in names}

        def rank_loss() -> Tensor:
            terms = [((mods[n].p() * costs[n]).sum() / norm[n]).clamp_min(1e-12) ** beta for n in names]
            return gamma * torch.stack(terms).sum()

        with torch.no_grad():
            lr0 = float(rank_loss())
        lval0 = None
        warm, joint = int(opts["warmup"]), int(opts["steps"])
        weight_every = max(1, int(opts["weight_every"]))
        wsteps = set(range(warm)) | {t for t in range(warm, warm + joint) if (t - warm) % weight_every == 0}
        # Cap the factor-weight steps by a work budget (core elements x steps): on large
        # models the Eq. 8 step is memory-bound and at lr 1e-3 moves cores by ~1e-5.
        elems = sum(p.numel() + m.c_full.numel() if m.lay.tucker_like else 3 * p.numel()
                    for m in mods.values() for p in m.weight_params())
        cap = max(2, int(float(opts["weight_work"]) // max(elems, 1)))
        if cap < len(wsteps):
            w_warm = min(warm, (cap + 1) // 2)
            rest = cap - w_warm
            wsteps = set(range(w_warm)) | {warm + (j * joint) // max(rest, 1) for j in range(rest)}
            warm_skip = warm - w_warm  # warm-up steps without a weight step do nothing: skip them
        else:
            warm_skip = 0
        for t in range(warm_skip, warm + joint):
            # weight step (data-free): L_Tw = [sum_i ||W_i - W_mix,i||^2 / ||W_i||^2] * L_r
            if t in wsteps:
                lr_now = rank_loss().detach()
                lw = torch.stack([mods[n].werr() for n in names]).sum() * lr_now
                gw.step(lw)
            if t >= warm:
                for p in wparams:  # the logit step needs no factor gradients
                    p.requires_grad_(False)
                b = batches[(t - warm) % len(batches)]
                x, target = b
                out = gm(*x)
                lval = (F.cross_entropy(_flat(out), target) if mode == "cross-entropy"
                        else _rel_recon(out, target))
                if lval0 is None and bool(torch.isfinite(lval)):
                    lval0 = max(float(lval.detach()), 1e-12)
                ratio = rank_loss() / lr0
                la = (lval / (lval0 or 1.0)) * torch.exp((lam * torch.log(ratio.clamp_min(1e-12))).clamp(-30, 30))
                ga.step(la)
                for p in wparams:
                    p.requires_grad_(True)
                # dual ascent on the budget multiplier, on the argmax choice
                total = fixed + sum(float(costs[n][int(mods[n].alpha.argmax())]) for n in names)
                lam = float(min(1e4, max(1e-4, lam * math.exp(opts["dual_rate"] * (total / meter.target - 1)))))
            done = rnd * (warm + joint) + t + 1
            if done % 10 == 0:
                ctx.progress("ranks", 0.05 + 0.8 * done / total_steps, f"rene: round {rnd + 1}, step {t + 1}")
        for m in mods.values():  # a non-finite state left over falls back to the last good one
            if not bool(torch.isfinite(m.alpha).all()):
                _restore(aparams, ga.good)
                break
        picked = {n: mods[n].cands[int(mods[n].alpha.argmax())] for n in names}
        return lam, picked, gw.events + ga.events

    # -- sensitivity probe ---------------------------------------------------------
    def _sensitivities(self, ctx, gm, mods, layers, start, batches, opts) -> None:
        target = float(opts["probe_error"])
        probes = batches[:2]
        refs = [(x, _flat(gm(*x))) for x, _ in probes]  # all dense now
        found = []
        for lay in layers:
            best, best_r = math.inf, None
            for r in range(1, lay.rmax + 1) if lay.tucker_like else sorted(lay.cp_err2):
                e = lay.err2(lay.ranks_of(r))
                d = abs(math.log(e + 1e-12) - math.log(target))
                if e > 1e-10 and d < best:
                    best, best_r = d, r
            if best_r is None:
                lay.sens = -1.0
                continue
            ranks = lay.ranks_of(best_r)
            mod = mods[lay.info.name]
            mod.override = lay.dense_hat(ranks, opts["cp_iters"], ctx.seed).float().reshape(mod.dense_w.shape)
            eps = sum(float(_rel_recon(gm(*x), ref)) for x, ref in refs) / len(refs)
            mod.override = "dense"
            s = eps / lay.err2(ranks)
            if math.isfinite(s) and s > 0:
                lay.sens = s
                found.append(s)
            else:
                lay.sens = -1.0
        fallback = sorted(found)[len(found) // 2] if found else 1.0
        for lay in layers:
            if lay.sens <= 0:
                lay.sens = fallback

    # -- exact budget ----------------------------------------------------------------
    def _project(self, meter: Meter, layers: list[_Layer], start: dict[str, tuple[int, ...]], fixed: float,
                 opts: dict, lows: dict[str, tuple[int, ...]]) -> tuple[dict[str, tuple[int, ...] | None], int]:
        """Greedy projection of the argmax ranks onto the budget (see the module docstring);
        ``lows``: each layer's rank floor, per mode."""
        by = {lay.info.name: lay for lay in layers}
        state: dict[str, tuple[int, ...] | None] = {
            n: tuple(max(r, f) for r, f in zip(ranks, lows[n])) for n, ranks in start.items()}
        cost_cache: dict[tuple[str, tuple[int, ...] | None], float] = {}

        def cost(n: str, ranks: tuple[int, ...] | None) -> float:
            key = (n, ranks)
            if key not in cost_cache:
                lay = by[n]
                cost_cache[key] = meter.layer_cost(lay.info, None if ranks is None else lay.form, ranks)
            return cost_cache[key]

        def dmg(n: str, ranks: tuple[int, ...] | None) -> float:
            return by[n].sens * by[n].err2(ranks)

        def ok(n: str, ranks: tuple[int, ...]) -> bool:
            lay = by[n]
            return all(f <= r <= m for r, f, m in zip(ranks, lows[n], lay.lim)) and below_break_even(
                meter, lay.info, lay.form, ranks)

        def steps(n: str, ranks: tuple[int, ...] | None, up: bool) -> list[tuple[int, ...] | None]:
            lay = by[n]
            if ranks is None:
                return [] if up else [lay.ranks_of(lay.rmax)]
            d = 1 if up else -1
            out: list[tuple[int, ...] | None] = []
            if lay.form == "tucker2":
                cand = [(ranks[0] + d, ranks[1] + d), (ranks[0] + d, ranks[1]), (ranks[0], ranks[1] + d)]
            else:
                cand = [(ranks[0] + d,)]
            out = [c for c in cand if ok(n, c)]
            if up and not out:
                out = [None]  # the only step up is back to dense
            return out

        def total() -> float:
            return fixed + sum(cost(n, r) for n, r in state.items())

        def best_down(exclude: str | None = None):
            best = None
            for n, r in state.items():
                if n == exclude:
                    continue
                for nxt in steps(n, r, False):
                    saved = cost(n, r) - cost(n, nxt)
                    if saved <= 0:
                        continue
                    score = (dmg(n, nxt) - dmg(n, r)) / saved
                    if best is None or score < best[0]:
                        best = (score, n, nxt, saved)
            return best

        def best_up(slack: float):
            best = None
            for n, r in state.items():
                for nxt in steps(n, r, True):
                    add = cost(n, nxt) - cost(n, r)
                    if add > slack or add <= 0:
                        continue
                    score = (dmg(n, r) - dmg(n, nxt)) / add
                    if best is None or score > best[0] + 1e-15 or (abs(score - best[0]) <= 1e-15 and add < best[3]):
                        best = (score, n, nxt, add)
            return best

        moved = 0
        limit = meter.target * (1 + 1e-9)
        cur = total()
        while cur > limit:  # 1. lower until the budget holds
            b = best_down()
            if b is None:
                break
            state[b[1]] = b[2]
            cur -= b[3]
            moved += 1

        def fill() -> int:
            nonlocal cur
            k = 0
            while True:
                b = best_up(limit - cur)
                if b is None:
                    return k
                state[b[1]] = b[2]
                cur += b[3]
                k += 1

        moved += fill()  # 2. raise while it fits
        for _ in range(int(opts["exchange"])):  # 3. exchange: lower others to afford a better step up
            b = best_up(math.inf)
            if b is None or b[0] <= 0:
                break
            _, n_up, nxt_up, add = b
            saved_state = dict(state)
            saved_cur = cur
            loss = 0.0
            gain = dmg(n_up, state[n_up]) - dmg(n_up, nxt_up)
            while cur + add > limit:
                d = best_down(exclude=n_up)
                if d is None:
                    break
                loss += dmg(d[1], d[2]) - dmg(d[1], state[d[1]])
                state[d[1]] = d[2]
                cur -= d[3]
                if loss >= gain:
                    break
            if cur + add <= limit and loss < gain - 1e-15:
                state[n_up] = nxt_up
                cur += add
                moved += 1 + fill()
            else:
                state, cur = saved_state, saved_cur
                break
        return state, moved
