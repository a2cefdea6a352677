"""``batude`` (budget-aware Tucker ranks by ADMM training, our reading of the
AAAI 2022 paper): exact budgets, the greedy Z-step, planted ranks, training."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from compression.budget import Budget
from compression.forms import max_ranks
from compression.input_spec import InputSpec
from compression.inventory import CallSite, Inventory, LayerInfo, build_inventory, count_macs, count_params
from compression.model_io import to_editable
from compression.ranks import METHODS
from compression.ranks.base import Data, Meter, SelectionContext
from compression.ranks.batude import Batude, fold, greedy_ranks, layer_form, unfold
from compression.ranks.fill import below_break_even
from compression.ranks.uniform import Uniform
from compression.rewrite import apply_plan, get_tensor

try:
    from tests import zoo
    from tests.planted import planted_model
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    import zoo  # type: ignore[no-redef]
    from planted import planted_model  # type: ignore[no-redef]

FAST = {"epochs": 2, "batch_size": 32, "min_steps": 0}  # bookkeeping tests: no extra epochs for the pull


def _editable(build):
    model, spec_s = build()
    spec = InputSpec.parse(spec_s)
    gm = to_editable(torch.jit.script(model), spec).gm
    return gm, spec, build_inventory(gm, spec)


@pytest.fixture(scope="module")
def resnet():
    return _editable(zoo.resnet_like)


@pytest.fixture(scope="module")
def vgg():
    return _editable(zoo.vgg_like)


def _labelled(gm, spec, n: int = 64) -> Data:
    x = spec.example(n, seed=7)
    with torch.no_grad():
        y = gm(*x).argmax(1)
    return Data(x, y)


def _ranks(plan) -> dict:
    return {lp.name: lp.ranks for lp in plan.layers}


# ----------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    ("model", "budget"),
    [
        ("resnet", "flops:2x"),
        ("resnet", "flops:3x"),
        ("resnet", "flops:5x"),
        ("resnet", "params:0.4"),
        ("vgg", "flops:2x"),
        ("vgg", "params:0.4"),
    ],
)
def test_batude_hits_the_budget_within_one_percent_measured_after_rewrite(model, budget, request):
    gm, spec, inv = request.getfixturevalue(model)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    ctx = SelectionContext(gm, inv, spec, Budget.parse(budget), data=_labelled(gm, spec), options=FAST)
    method = Batude()
    plan = method.select(ctx)

    # ctx.gm is never touched; the trained copy is what gets decomposed
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    trained = method.trained_graph()
    assert trained is not gm
    compressed = apply_plan(trained, inv, plan)
    example = spec.example(2, seed=3)
    measured = count_macs(compressed, example) if ctx.budget.metric == "flops" else count_params(compressed)
    target = ctx.meter().target
    uniform = Uniform().select(ctx)
    print(f"\n{model} {budget}: batude {measured / target:.4f} of target; note: {plan.note}")
    for lp in plan.layers:
        print(
            f"  {lp.name:20s} batude {lp.ranks!s:10s} uniform {_ranks(uniform).get(lp.name, 'dense')!s:10s}"
            f" err {lp.predicted_error:.3f}"
        )
    assert measured <= target * 1.0001
    if measured < target * 0.99:
        zoo.assert_no_rank_step_fits(ctx.meter(), plan)
    assert plan.layers, "nothing was decomposed"
    for lp in plan.layers:  # no layer becomes costlier, in any metric
        assert lp.macs_after < lp.macs_before and lp.params_after < lp.params_before
    assert all(h["nan_skips"] == 0 for h in method.history)
    assert "over budget" not in plan.note


def test_batude_trains_the_weights_and_returns_them(resnet):
    gm, spec, inv = resnet
    ctx = SelectionContext(gm, inv, spec, Budget.parse("flops:2x"), data=_labelled(gm, spec), options=FAST)
    method = Batude()
    method.select(ctx)
    layer = inv.by_name("layer3.conv2")
    trained = method.trained_weights[layer.weight]
    original = get_tensor(gm, layer.weight)
    assert trained.shape == original.shape and not torch.equal(trained, original)
    assert torch.equal(get_tensor(method.trained_graph(), layer.weight), trained)
    assert [h["loss"] for h in method.history] == ["cross-entropy"] * 2
    # load_trained copies them into another graph with the same attribute paths
    other = copy.deepcopy(gm)
    method.load_trained(other)
    assert torch.equal(get_tensor(other, layer.weight), trained)


def _truncation_error(w: torch.Tensor, ranks: tuple[int, ...], form: str) -> float:
    """Energy share the plan's ranks drop, summed over the weight's unfoldings."""
    dims = (1, 0) if form == "tucker2" else (0,)
    total = 0.0
    for r, d in zip(ranks, dims):
        s2 = torch.linalg.svdvals(unfold(w.double(), d)) ** 2
        total += float(s2[r:].sum() / s2.sum())
    return total


def test_batude_admm_pull_makes_the_trained_weights_low_rank(resnet):
    """The paper's claim, on the weights: trained under the pull, each weight sits
    near its own truncation at the chosen ranks; without the pull (rho 0) it does not."""
    gm, spec, inv = resnet
    trained, plans = {}, {}
    for rho in (0.0, 1.0):
        opts = {"epochs": 4, "batch_size": 8, "lr": 1e-2, "rho": rho, "z_every": 2, "fill": False, "min_steps": 0}
        ctx = SelectionContext(gm, inv, spec, Budget.parse("flops:3x"), data=_labelled(gm, spec), options=opts)
        method = Batude()
        plans[rho] = method.select(ctx)
        trained[rho] = method.trained_weights
    assert plans[1.0].layers
    for lp in plans[1.0].layers:  # both trained networks measured at the same (pulled run's) ranks
        weight = inv.by_name(lp.name).weight
        pulled, free = (_truncation_error(trained[rho][weight], lp.ranks, lp.form) for rho in (1.0, 0.0))
        assert pulled < 0.6 * free, (lp.name, pulled, free)


def test_batude_gives_the_ranks_only_when_finetuning_follows_and_adds_epochs_for_small_data(resnet):
    gm, spec, inv = resnet
    data = _labelled(gm, spec)  # 64 samples: 2 mini-batches of 32 an epoch
    for follows in (True, False):
        ctx = SelectionContext(gm, inv, spec, Budget.parse("flops:2x"), data=data, finetune_follows=follows,
                               options={"epochs": 2, "min_steps": 10})
        method = Batude()
        plan = method.select(ctx)
        assert {h["rho"] for h in method.history} == {1.0}
        assert "5 epochs of ADMM training (rho 1)" in plan.note
        # 5 epochs of 2 steps: Z-steps after epoch 1, every z_every (20) steps, and the last
        assert [h["epoch"] for h in method.history] == [1, 5]
        assert method.hand_on is not follows  # fine-tuning starts from the original weights


def test_batude_without_data_distils_on_random_inputs_and_says_so(resnet):
    gm, spec, inv = resnet
    seen: list[tuple[str, float]] = []
    ctx = SelectionContext(
        gm,
        inv,
        spec,
        Budget.parse("flops:2x"),
        options={**FAST, "samples": 32},
        progress=lambda phase, f, msg: seen.append((phase, f)),
    )
    plan = Batude().select(ctx)
    assert "no data given" in plan.note and "random inputs" in plan.note
    assert {p for p, _ in seen} == {"ranks"} and seen[-1][1] == 1.0
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and len(fractions) >= 2 * 2


def test_batude_nan_guard_skips_steps_and_lowers_the_lr(resnet):
    gm, spec, inv = resnet
    ctx = SelectionContext(
        gm, inv, spec, Budget.parse("flops:2x"), data=_labelled(gm, spec), options={**FAST, "lr": 1e30, "clip": 1e30}
    )
    method = Batude()
    plan = method.select(ctx)
    assert method.history[-1]["nan_skips"] > 0
    assert all(bool(torch.isfinite(t).all()) for t in method.trained_weights.values() if t.is_floating_point())
    assert plan.layers


def test_batude_is_registered():
    assert METHODS.get("batude") is Batude
    assert Batude.uses_data


# ----------------------------------------------------------------------------- the greedy Z-step


def _linear(name: str, c_out: int, c_in: int) -> LayerInfo:
    return LayerInfo(
        name, f"{name}.weight", None, "linear", c_out, c_in, (1, 1), sites=[CallSite(name, (c_in,), (c_out,), "linear")]
    )


def _conv(name: str, c_out: int, c_in: int, hw: int, stride: int = 1) -> LayerInfo:
    out = hw // stride
    return LayerInfo(
        name,
        f"{name}.weight",
        None,
        "conv2d",
        c_out,
        c_in,
        (3, 3),
        (stride, stride),
        (1, 1),
        sites=[CallSite(name, (c_in, hw, hw), (c_out, out, out), "conv2d")],
    )


def _meter(layers: list[LayerInfo], budget: str, other_macs: int = 0) -> Meter:
    inv = Inventory(layers, sum(layer.macs for layer in layers) + other_macs, sum(layer.params for layer in layers))
    return Meter(inv, Budget.parse(budget))


def test_greedy_by_hand_drops_cheapest_energy_per_mac_and_stops_at_the_budget():
    # A: 10->10 linear, 20 MACs per SVD rank, dense 100 (break-even: rank <= 4).
    # B: 10->20 linear, 30 MACs per rank, dense 200 (break-even: rank <= 6).
    # Dense total 300, target 150. A's values are cheap (1 / 20 per MAC) so A
    # falls to rank 1 first (total 200 + 20 = 220), then B: 6 -> 180 (200),
    # 5 -> 150 (170), 4 -> 120 (140 <= 150): stop.
    a, b = _linear("a", 10, 10), _linear("b", 20, 10)
    meter = _meter([a, b], "flops:2x")
    energies = [[torch.ones(10)], [torch.full((10,), 100.0)]]
    res = greedy_ranks(meter, [a, b], ["svd", "svd"], energies)
    assert res.ranks == [(1,), (4,)]
    assert res.total == 140 == meter.total({"a": ("svd", (1,)), "b": ("svd", (4,))})
    assert res.fits and res.drops == 9 + 6
    # the state one drop earlier missed the budget: nothing was dropped needlessly
    assert not meter.fits(meter.total({"a": ("svd", (1,)), "b": ("svd", (5,))}))


def test_greedy_recomputes_the_coupled_tucker_saving():
    # One 3x3 conv 8->8 at 4x4: MACs = 16*(8*R_in + 9*R_in*R_out + 8*R_out), so
    # dropping R_in saves 16*(8 + 9*R_out) and dropping R_out 16*(9*R_in + 8).
    # Equal energies: after the first (tied) drop of R_in, R_out's saving shrinks
    # and R_in stays the better drop all the way down: (8, 8) -> (1, 8), which
    # costs 16*144 = 2304 MACs, exactly the 4x target (9216 / 4).
    c = _conv("c", 8, 8, 4)
    meter = _meter([c], "flops:4x")
    assert meter.target == 2304
    for finish in (False, True):
        res = greedy_ranks(meter, [c], ["tucker2"], [[torch.ones(8), torch.ones(8)]], finish=finish)
        assert res.ranks == [(1, 8)] and res.total == 2304 and res.fits


def _reference_greedy(meter, layers, forms, energies):
    """The same greedy without a heap: re-score every candidate at every step."""
    ranks = [[len(e) for e in modes] for modes in energies]

    def eff(i, rk):
        f = meter.layer_cost(layers[i], forms[i], tuple(rk))
        return f if below_break_even(meter, layers[i], forms[i], tuple(rk)) else meter.layer_cost(layers[i], None, None)

    def total():
        return meter.fixed() + sum(eff(i, r) for i, r in enumerate(ranks))

    while not meter.fits(total()):
        best = None
        for i, modes in enumerate(energies):
            for n in range(len(modes)):
                if ranks[i][n] <= 1:
                    continue
                lower = list(ranks[i])
                lower[n] -= 1
                saving = meter.layer_cost(layers[i], forms[i], tuple(ranks[i])) - meter.layer_cost(
                    layers[i], forms[i], tuple(lower)
                )
                score = float(modes[n][ranks[i][n] - 1]) / saving
                key = (score, -saving, i, n)
                best = key if best is None or key < best else best
        ranks[best[2]][best[3]] -= 1
    return [tuple(r) for r in ranks]


@pytest.mark.parametrize("budget", ["flops:2x", "flops:5x", "params:0.3"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lazy_heap_greedy_equals_the_plain_greedy_and_fits(budget, seed):
    rng = random.Random(seed)
    layers, forms, energies = [], [], []
    for k in range(6):
        if k % 3 == 2:
            layer = _linear(f"l{k}", rng.choice([16, 24, 40]), rng.choice([16, 32]))
        else:
            layer = _conv(f"c{k}", rng.choice([8, 16, 24]), rng.choice([8, 16]), rng.choice([4, 8]), rng.choice([1, 2]))
        form = layer_form(layer)
        limits = max_ranks(form, layer.c_out, layer.c_in, *layer.kernel)
        g = torch.Generator().manual_seed(seed * 10 + k)
        mode_e = [
            torch.sort(
                torch.rand(m, generator=g, dtype=torch.float64) ** 2 * rng.uniform(0.1, 10), descending=True
            ).values
            for m in limits
        ]
        layers.append(layer)
        forms.append(form)
        energies.append(mode_e)
    meter = _meter(layers, budget, other_macs=100)
    res = greedy_ranks(meter, layers, forms, energies, finish=False)
    assert res.ranks == _reference_greedy(meter, layers, forms, energies)
    assert res.fits and meter.fits(res.total)
    choice = {
        layer.name: (f, r) for layer, f, r in zip(layers, forms, res.ranks) if below_break_even(meter, layer, f, r)
    }
    assert math.isclose(res.total, meter.total(choice))
    # the finishing rule only changes the last drop, and still fits
    fin = greedy_ranks(meter, layers, forms, energies)
    assert fin.fits and fin.drops == res.drops
    assert sum(a != b for x, y in zip(fin.ranks, res.ranks) for a, b in zip(x, y)) <= 2


def test_greedy_heap_handles_resnet18_sized_spectra():
    widths = [64] * 5 + [128] * 4 + [256] * 4 + [512] * 4
    layers = [_conv(f"c{i}", w, w, 56 * 64 // w) for i, w in enumerate(widths)]
    g = torch.Generator().manual_seed(0)
    energies = [[torch.sort(torch.rand(w, generator=g), descending=True).values for _ in range(2)] for w in widths]
    meter = _meter(layers, "flops:3x")
    res = greedy_ranks(meter, layers, ["tucker2"] * len(layers), energies)
    assert res.fits and meter.fits(res.total)
    assert all(1 <= r <= w for rs, w in zip(res.ranks, widths) for r in rs)
    assert res.drops == sum(2 * w - sum(rs) for rs, w in zip(res.ranks, widths))  # one drop per singular value


def test_unfold_and_fold_are_inverse():
    w = torch.randn(4, 3, 3, 3)
    for d in (0, 1):
        m = unfold(w, d)
        assert m.shape[0] == w.shape[d]
        assert torch.equal(fold(m, d, w.shape), w)


def test_heap_stale_scores_are_lower_bounds():
    # the property the lazy heap relies on: lowering one Tucker rank lowers the
    # other mode's saving (flops and params), so an old score never overstates.
    c = _conv("c", 16, 8, 8, 2)
    for budget in ("flops:2x", "params:0.5"):
        meter = _meter([c], budget)
        for r_in in range(2, 9):
            for r_out in range(2, 17):
                save_out = meter.layer_cost(c, "tucker2", (r_in, r_out)) - meter.layer_cost(
                    c, "tucker2", (r_in, r_out - 1)
                )
                lower = meter.layer_cost(c, "tucker2", (r_in - 1, r_out)) - meter.layer_cost(
                    c, "tucker2", (r_in - 1, r_out - 1)
                )
                assert lower <= save_out


# ----------------------------------------------------------------------------- planted ranks


def test_batude_recovers_planted_ranks_at_the_planted_budget():
    model, spec_s, planted, budget_s = planted_model()  # budget = what the planted ranks cost
    spec = InputSpec.parse(spec_s)
    gm = to_editable(torch.jit.script(model), spec).gm
    inv = build_inventory(gm, spec)
    planted = {name: tuple(r) for name, r in planted.items()}
    budget = Budget.parse(budget_s)
    x = spec.example(64, seed=5)
    with torch.no_grad():
        y = gm(*x)  # the model's own outputs as regression targets
    # every layer, the linear one too: a rank was planted in each
    ctx = SelectionContext(gm, inv, spec, budget, data=Data(x, y), options={**FAST, "all_layers": True})
    method = Batude()
    got = _ranks(method.select(ctx))
    uni = _ranks(Uniform().select(ctx))
    print(f"\nplanted ranks at {budget}: layer, planted, batude, uniform")
    for name, r in planted.items():
        print(f"  {name:10s} {r!s:10s} {got.get(name, 'dense')!s:10s} {uni.get(name, 'dense')!s:10s}")
    assert [h["loss"] for h in method.history] == ["MSE to the given targets"] * FAST["epochs"]
    for name, r in planted.items():
        assert name in got, f"{name} left dense"
        assert all(abs(a - b) <= 2 for a, b in zip(got[name], r)), (name, got[name], r)


def test_batude_hands_on_its_trained_weights_unless_told_to_give_the_ranks_only(resnet):
    gm, spec, inv = resnet
    original = {k: v.clone() for k, v in gm.state_dict().items()}
    changed = {}
    for hand_on in (True, False):
        ctx = SelectionContext(gm, inv, spec, Budget.parse("flops:2x"), data=_labelled(gm, spec),
                               options={**FAST, "lr": 1e-2, "hand_on": hand_on})
        method = Batude()
        note = method.select(ctx).note
        assert ("the ranks only" in note) is not hand_on and ("decompose the trained weights" in note) is hand_on
        target = copy.deepcopy(gm)
        method.load_trained(target)
        changed[hand_on] = sorted(k for k, v in target.state_dict().items() if not torch.equal(v, original[k]))
    assert changed[False] == [] and len(changed[True]) >= len(inv.decomposable)
    assert all(torch.equal(v, original[k]) for k, v in gm.state_dict().items())  # the input graph untouched



def _top1_after_decomposing(gm, inv, plan, data: Data) -> float:
    from compression.evaluate import evaluate

    return float(evaluate(apply_plan(copy.deepcopy(gm), inv, plan).eval(), data)["top1"])


@pytest.fixture(scope="module")
def digits_cnn():
    """A trained network and real labels: plans differ in what they keep (a random network's
    predictions on random inputs barely depend on the ranks)."""
    try:
        from tests.digits import SPEC, digits, trained_cnn
    except ImportError:
        from digits import SPEC, digits, trained_cnn  # type: ignore[no-redef]
    spec = InputSpec.parse(SPEC)
    gm = to_editable(torch.jit.script(trained_cnn()), spec).gm
    train, _ = digits()
    return gm, spec, build_inventory(gm, spec), Data(tuple(t[:400] for t in train.x), train.y[:400])


def test_shortlist_starts_from_the_plan_whose_decomposed_original_keeps_most(digits_cnn):
    """Planted: a plan that cuts every layer to rank 1 beside uniform ranks; the shortlist must take
    uniform's even when listed first, keep the first of equal plans, and report every score."""
    from compression.plan import RankPlan, layer_plan
    from compression.ranks.shortlist import shortlist

    gm, spec, inv, data = digits_cnn
    ctx = SelectionContext(gm, inv, spec, Budget.parse("flops:2x"), data=data)
    uniform = Uniform().select(ctx)
    crushed = RankPlan("crushed", [layer_plan(inv.by_name(lp.name), lp.form, (1,) * len(lp.ranks))
                                   for lp in uniform.layers])
    picked = shortlist(ctx, {"crushed": crushed, "uniform": uniform}, data)
    assert picked.metric == "top-1" and picked.chosen == "uniform"
    assert picked.scores["uniform"] == _top1_after_decomposing(gm, inv, uniform, data)
    assert picked.scores["crushed"] < picked.scores["uniform"] - 0.2
    assert shortlist(ctx, {"a": uniform, "b": uniform}, data).chosen == "a"
    assert "started from uniform's ranks" in picked.describe("crushed")


def test_batude_ranks_only_take_the_best_start_of_its_uniform_and_energy_plans(digits_cnn):
    from compression.ranks.energy import Energy

    gm, spec, inv, data = digits_cnn
    budget = Budget.parse("flops:3x")
    plans, notes = {}, {}
    for shortlisted in (True, False):
        ctx = SelectionContext(gm, inv, spec, budget, data=data, finetune_follows=True,
                               options={**FAST, "shortlist": shortlisted})
        plan = Batude().select(ctx)
        plans[shortlisted], notes[shortlisted] = plan, plan.note
    assert "right after decomposing the original weights" in notes[True]
    assert "right after decomposing" not in notes[False]
    ctx = SelectionContext(gm, inv, spec, budget, data=data)
    candidates = {"batude": plans[False], "uniform": Uniform().select(ctx), "energy": Energy().select(ctx)}
    scores = {name: _top1_after_decomposing(gm, inv, p, data) for name, p in candidates.items()}
    best = max(scores, key=lambda n: scores[n])
    assert _ranks(plans[True]) == _ranks(candidates[best]), (scores, notes[True])
    assert plans[True].method == "batude"
