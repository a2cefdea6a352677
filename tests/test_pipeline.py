"""End-to-end engine tests: TorchScript file in, factorised TorchScript and .pt2 out."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compression.errors import UnsupportedModelError
from compression.input_spec import InputSpec
from compression.inventory import build_inventory, count_macs
from compression.metrics import relative_error
from compression.model_io import to_editable
from compression.pipeline import compress
from compression.plan import plan_by_ratio
from compression.rewrite import apply_plan
from tests import zoo

BUILDERS = {
    "resnet": zoo.resnet_like,
    "mobilenet": zoo.mobilenet_like,
    "vgg": zoo.vgg_like,
    "mlp": zoo.mlp,
    "transformer": zoo.transformer_encoder,
}
CASES = [
    ("resnet", "script"),
    ("resnet", "trace"),
    ("mobilenet", "script"),
    ("vgg", "script"),
    ("mlp", "trace"),
    ("transformer", "script"),
    ("transformer", "trace"),
]


def _ts(name: str, how: str) -> tuple[torch.jit.ScriptModule, InputSpec]:
    model, spec_s = BUILDERS[name]()
    spec = InputSpec.parse(spec_s)
    if how == "script":
        return zoo.scripted(model), spec
    with torch.enable_grad():  # traced transformers keep the decomposable (non-fused) path
        return zoo.traced(model, spec.example(5)), spec


@pytest.mark.parametrize(("name", "how"), CASES, ids=[f"{n}-{h}" for n, h in CASES])
def test_full_rank_round_trip_matches_original(tmp_path, name, how):
    ts, spec = _ts(name, how)
    path = zoo.save_ts(ts, tmp_path)
    result = compress(path, spec, out_dir=tmp_path / "out", ranks=1.0)

    assert result.plan.layers, "every zoo model has decomposable layers"
    assert result.max_output_deviation < 1e-4
    original = torch.jit.load(str(path))
    scripted = torch.jit.load(str(tmp_path / "out" / "model.pt"))
    program = torch.export.load(str(tmp_path / "out" / "model.pt2")).module()
    batches = (1, 2, 7) if not result.files["model.pt2"].fixed_shapes else (5,)
    # The scripted transformer's fast-path ifs are resolved before converting.
    route = "specialised" if (name, how) == ("transformer", "script") else "converter"
    assert result.route == route and batches == (1, 2, 7)
    for batch in batches:
        x = spec.example(batch, seed=batch)
        with torch.no_grad():
            want = original(*x)
            assert relative_error(scripted(*x), want) < 1e-4
            assert relative_error(program(*x), want) < 1e-4


def test_factorised_files_are_smaller_and_cost_what_the_plan_says(tmp_path):
    ts, spec = _ts("resnet", "script")
    result = compress(zoo.save_ts(ts, tmp_path), spec, out_dir=tmp_path / "out", ranks=0.4)
    predicted = result.plan.macs_after(result.inventory)
    assert abs(result.macs_after / predicted - 1) < 0.01
    assert result.macs_ratio > 1.5 and result.params_ratio > 1.5
    reloaded = torch.jit.load(str(tmp_path / "out" / "model.pt"))
    assert abs(count_macs(reloaded, spec.example(2)) / result.macs_after - 1) < 0.01
    assert 0 < result.max_output_deviation < 1  # low rank changes outputs, but not wildly
    assert (tmp_path / "out" / "report.json").stat().st_size > 0


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "vgg", "mlp"])
def test_inventory_macs_agree_with_torch_flop_counter(name):
    ts, spec = _ts(name, "script")
    editable = to_editable(ts, spec)
    inv = build_inventory(editable.gm, spec)
    counted = count_macs(ts, spec.example(3))
    assert abs(inv.layer_macs / counted - 1) < 0.01
    assert inv.total_macs == counted


def test_inventory_reports_depthwise_and_grouped_as_skipped():
    ts, spec = _ts("mobilenet", "script")
    inv = build_inventory(to_editable(ts, spec).gm, spec)
    reasons = {layer.skip_reason for layer in inv.skipped}
    assert reasons == {"depthwise conv", "grouped conv"}
    plan = plan_by_ratio(inv, 0.5)
    assert set(plan.dense) >= {layer.name for layer in inv.skipped}


class _SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        return self.conv(torch.relu(self.conv(y)))  # one weight, two call sites


def test_weight_shared_by_two_calls_gets_one_replacement():
    spec = InputSpec.parse("3,12,12")
    ts = torch.jit.script(_SharedConv().eval())
    gm = to_editable(ts, spec).gm
    inv = build_inventory(gm, spec)
    shared = inv.by_name("conv")
    assert len(shared.sites) == 2
    apply_plan(gm, inv, plan_by_ratio(inv, 1.0))
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("tt_")]
    assert calls.count("tt_conv") == 2 and len(set(calls)) == 2
    x = spec.example(3)
    with torch.no_grad():
        assert relative_error(gm(*x), ts(*x)) < 1e-4


def test_model_without_decomposable_layers_is_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.ReLU()).eval()
    path = zoo.save_ts(torch.jit.script(model), tmp_path)
    with pytest.raises(UnsupportedModelError) as err:
        compress(path, "4,8,8", out_dir=tmp_path / "out")
    assert err.value.code == "no_decomposable_layer"
    assert "depthwise" in err.value.message


def test_data_dependent_control_flow_is_refused_with_a_clear_error(tmp_path):
    model, spec = zoo.control_flow_model()
    path = zoo.save_ts(zoo.scripted(model), tmp_path)
    with pytest.raises(UnsupportedModelError) as err:
        compress(path, spec, out_dir=tmp_path / "out")
    assert err.value.code == "data_dependent_control_flow"
    assert not (tmp_path / "out" / "model.pt").exists()
