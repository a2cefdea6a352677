"""Fine-tuning restores a heavily compressed digits CNN; data-free distillation
(synthetic inputs from BN statistics) brings it closer to the original."""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from compression.errors import TensorTrimError
from compression.evaluate import evaluate
from compression.finetune import finetune, layer_map, with_batch_halving
from compression.input_spec import InputSpec
from compression.inventory import build_inventory
from compression.model_io import to_editable
from compression.plan import RankPlan, plan_by_ratio
from compression.ranks.base import Data
from compression.rewrite import apply_plan
from compression.synth import synthesize
from tests.digits import digits, trained_cnn

RATIO = 0.4  # of each conv's maximum ranks: accuracy falls to ~40 %


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(one_thread) -> SimpleNamespace:
    train, test = digits()
    model = trained_cnn()
    spec = InputSpec.parse("1,8,8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher = to_editable(torch.jit.script(model), spec).gm
    inventory = build_inventory(teacher, spec)
    return SimpleNamespace(
        teacher=teacher, inventory=inventory, spec=spec, train=train, test=test
    )


def compressed(s: SimpleNamespace) -> torch.fx.GraphModule:
    """The convs at 40 % ranks (Tucker-2); the classifier stays dense."""
    plan = plan_by_ratio(s.inventory, RATIO)
    plan = RankPlan(plan.method, [lp for lp in plan.layers if s.inventory.by_name(lp.name).kind == "conv2d"])
    return apply_plan(copy.deepcopy(s.teacher), s.inventory, plan).eval()


def test_layer_map_pairs_teacher_nodes_with_tt_modules(setup):
    student = compressed(setup)
    mapping = layer_map(setup.inventory, student)
    assert set(mapping) == {layer.name for layer in setup.inventory.layers if layer.kind == "conv2d"}
    teacher_nodes = {n.name for n in setup.teacher.graph.nodes}
    for name, (nodes, module) in mapping.items():
        assert module == "tt_" + name.replace(".", "_")
        assert isinstance(student.get_submodule(module), nn.Module)
        assert set(nodes) <= teacher_nodes


def test_finetune_restores_accuracy(setup):
    student = compressed(setup)
    before = {k: v.clone() for k, v in setup.teacher.state_dict().items()}
    original = evaluate(setup.teacher, setup.test)["top1"]
    dropped = evaluate(student, setup.test)["top1"]
    assert original > 0.95
    assert dropped < original - 0.3  # rank 40 % really hurts

    phases = []
    result = finetune(
        student, setup.teacher, setup.train, spec=setup.spec, layers=layer_map(setup.inventory, student),
        epochs=6, batch_size=64, lr=0.05, seed=0, progress=lambda p, f, m: phases.append(p),
    )  # fmt: skip
    restored = evaluate(student, setup.test, reference=setup.teacher)
    print(f"digits top-1: original {original:.4f}, compressed {dropped:.4f}, fine-tuned {restored['top1']:.4f}")
    assert restored["top1"] >= original - 0.02
    assert restored["agreement"] > 0.95
    assert not student.training
    # History: epoch 0 is the starting point; the restored checkpoint is the best one.
    assert [r.epoch for r in result.history][0] == 0 and result.best_epoch >= 1
    assert result.best.val_accuracy == max(r.val_accuracy for r in result.history)
    assert {"ce", "kd", "feature"} <= set(result.history[1].train_terms)
    assert result.samples_train + result.samples_val == len(setup.train) and not result.data_free
    assert "finetune" in phases
    # The teacher is never trained.
    assert all(torch.equal(v, setup.teacher.state_dict()[k]) for k, v in before.items())


def test_data_free_improves_agreement(setup):
    student = compressed(setup)
    agreement_before = evaluate(student, setup.test, reference=setup.teacher)["agreement"]
    result = finetune(
        student, setup.teacher, None, spec=setup.spec, epochs=6, batch_size=64, lr=0.01,
        synth_samples=256, synth_steps=60, synth_batch=256, patience=0, seed=0,
    )  # fmt: skip
    agreement_after = evaluate(student, setup.test, reference=setup.teacher)["agreement"]
    print(f"data-free agreement on real digits: {agreement_before:.4f} -> {agreement_after:.4f}")
    assert result.data_free and "ce" not in result.history[1].train_terms
    assert agreement_after > agreement_before


def test_unlabelled_data_distils_and_runs_are_deterministic(setup):
    data = Data((setup.train.x[0][:256],))  # no labels: KD + per-layer terms only
    states = []
    for _ in range(2):
        student = compressed(setup)
        result = finetune(student, setup.teacher, data, spec=setup.spec, epochs=1, batch_size=64, seed=3,
                          relative_features=True)
        states.append(student.state_dict())
    assert set(result.history[1].train_terms) == {"kd", "feature"}
    assert result.history[1].val_accuracy is None and result.history[1].val_agreement is not None
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())


def test_synthesis_matches_bn_statistics(setup):
    bn = setup.teacher.get_submodule("1")
    seen = []
    handle = bn.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        data = synthesize(setup.teacher, setup.spec, 64, steps=0)  # plain noise
        with torch.no_grad():
            setup.teacher(*data.x)
        noise_gap = (seen[-1].mean((0, 2, 3)) - bn.running_mean).norm()
        data = synthesize(setup.teacher, setup.spec, 64, steps=60)
        with torch.no_grad():
            setup.teacher(*data.x)
        synth_gap = (seen[-1].mean((0, 2, 3)) - bn.running_mean).norm()
    finally:
        handle.remove()
    assert data.y is None and data.x[0].shape == (64, 1, 8, 8)
    assert synth_gap < 0.5 * noise_gap
    assert all(p.requires_grad for p in setup.teacher.parameters())  # flags restored


def test_options_and_errors(setup):
    student = compressed(setup)
    with pytest.raises(TensorTrimError, match="optimizer"):
        finetune(student, setup.teacher, setup.train, spec=setup.spec, optimizer="adam")
    with pytest.raises(TensorTrimError, match="not nodes of the original graph"):
        finetune(student, setup.teacher, setup.train, spec=setup.spec, layers={"0": (("nope",), "tt_0")})
    unlabelled = Data((setup.train.x[0][:20],))
    for options in ({"ce_weight": -1.0}, {"temperature": 0.0}, {"kd_weight": float("nan")},
                    {"kd_weight": 0.0, "feature_weight": 0.0}):  # the last leaves only CE, and there are no labels
        with pytest.raises(TensorTrimError, match="loss weights") as err:
            finetune(student, setup.teacher, unlabelled, spec=setup.spec, epochs=1, **options)
        assert err.value.code == "invalid_options"
    bad = Data((setup.train.x[0][:20],), setup.train.y[:20] + 10)
    with pytest.raises(TensorTrimError, match="out of range") as err:
        finetune(student, setup.teacher, bad, spec=setup.spec, epochs=1)
    assert err.value.code == "bad_dataset"
    with pytest.raises(TensorTrimError, match="data-free mode"):
        synthesize(setup.teacher, InputSpec.parse("16:int64@100"), 4)


def test_batch_is_halved_on_out_of_memory():
    tried, resets = [], []

    def fn(size: int) -> str:
        tried.append(size)
        if size > 16:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return "ok"

    assert with_batch_halving(fn, 64, retry=True, reset=resets.append) == ("ok", 16)
    assert tried == [64, 32, 16] and resets == [32, 16]
    with pytest.raises(TensorTrimError, match="batch size 64") as err:
        with_batch_halving(fn, 64, retry=False)
    assert err.value.code == "out_of_memory"


def test_the_start_is_kept_only_when_it_validates_clearly_better(setup):
    """Epoch 0 (the weights before fine-tuning) inherits the original's fit to the validation
    samples; it must not win on validation noise, only when fine-tuning clearly hurt."""
    start = {k: v.clone() for k, v in setup.teacher.state_dict().items()}

    def tune(lr: float) -> tuple[nn.Module, object]:
        student = copy.deepcopy(setup.teacher)  # an exact copy: nothing to recover, only noise to add
        return student, finetune(student, setup.teacher, setup.train, spec=setup.spec, layers={},
                                 feature_weight=0.0, epochs=2, lr=lr, seed=0)

    # A gentle run: validation accuracy ties the start's (a plain comparison would keep the start on
    # its lower, teacher-identical loss); the fine-tuned epoch is kept.
    _, gentle = tune(1e-3)
    h = gentle.history
    assert h[0].val_accuracy == max(r.val_accuracy for r in h) and h[0].val_loss < min(r.val_loss for r in h[1:])
    assert gentle.best_epoch >= 1
    # A learning rate that wrecks the network: the start is restored, weights and all.
    student, wrecked = tune(3.0)
    assert max(r.val_accuracy for r in wrecked.history[1:]) < 0.5 and wrecked.best_epoch == 0
    assert all(torch.equal(v, start[k]) for k, v in student.state_dict().items())


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.01), ("adamw", 1e-3)])
def test_the_default_learning_rate_suits_the_optimizer(setup, optimizer, lr):
    data = Data((setup.train.x[0][:128],), setup.train.y[:128])
    result = finetune(compressed(setup), setup.teacher, data, spec=setup.spec, epochs=1, optimizer=optimizer)
    assert result.history[0].lr == lr
