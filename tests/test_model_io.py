"""TorchScript file -> trainable FX graph: routes, fidelity, training behaviour, errors."""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from compression.archive import precheck_archive
from compression.errors import ArchiveError, InputSpecError, UnsupportedModelError
from compression.input_spec import InputSpec
from compression.model_io import (
    CHECK_BATCHES,
    EditableModel,
    _make_editable,
    _private_copy,
    _via_export,
    check_control_flow,
    load_torchscript,
    specialise_branches,
    to_editable,
)

try:
    from tests import zoo
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    import zoo  # type: ignore[no-redef]

# (builder, export kind, expected route, expected dynamic batch)
CASES = {
    "resnet-script": (zoo.resnet_like, "script", "converter", True),
    "resnet-trace": (zoo.resnet_like, "trace", "converter", True),
    "mobilenet-script": (zoo.mobilenet_like, "script", "converter", True),
    "vgg-script": (zoo.vgg_like, "script", "converter", True),
    "mlp-script": (zoo.mlp, "script", "converter", True),
    "transformer-script": (zoo.transformer_encoder, "script", "specialised", True),
    "transformer-trace": (zoo.transformer_encoder, "trace", "converter", True),
}


def _export(model: nn.Module, spec: InputSpec, kind: str) -> torch.jit.ScriptModule:
    return zoo.scripted(model) if kind == "script" else zoo.traced(model, spec.example(3, seed=9))


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.jit.ScriptModule, EditableModel]]:
    """Each zoo case saved, loaded and converted once for the whole module."""
    tmp = tmp_path_factory.mktemp("zoo")
    out = {}
    for key, (build, kind, _, _) in CASES.items():
        model, spec_s = build()
        spec = InputSpec.parse(spec_s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # asserts in MHA's Python code
            ts = load_torchscript(zoo.save_ts(_export(model, spec, kind), tmp, f"{key}.pt"))
        out[key] = (ts, to_editable(ts, spec))
    return out


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("key", list(CASES))
def test_converts_and_matches(converted, key):
    ts, em = converted[key]
    _, _, route, dynamic = CASES[key]
    assert (em.route, em.dynamic_batch) == (route, dynamic)
    batches = (1, 2, 7) if em.dynamic_batch else (5,)  # 5: the example batch for these specs
    gm = em.gm.eval()
    with torch.no_grad(), torch.jit.optimized_execution(False):  # skip the profiling executor's warm-up
        for b in batches:
            x = em.input_spec.example(b, seed=100 + b)
            assert _rel_err(gm(*x), ts(*x)) < 1e-4, b


@pytest.mark.parametrize("key", list(CASES))
def test_parameters_are_trainable_under_original_names(converted, key):
    ts, em = converted[key]
    params = dict(em.gm.named_parameters())
    assert set(params) == {n for n, _ in ts.named_parameters()}
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in params.values())
    assert not any(n.startswith("_guards_fn") for n, _ in em.gm.named_modules())
    batch = 2 if em.dynamic_batch else 5
    em.gm.zero_grad()
    em.gm(*em.input_spec.example(batch, seed=1)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
    em.gm.zero_grad(set_to_none=True)


def test_batch_norm_follows_train_and_eval(converted):
    ts, em = converted["resnet-script"]
    gm = em.gm
    bn = gm.get_submodule("layer1.bn1")  # rebuilt where the weights lived
    assert isinstance(bn, nn.BatchNorm2d) and bn.weight is gm.get_parameter("layer1.bn1.weight")
    assert int(bn.num_batches_tracked) == 0
    x = em.input_spec.example(4, seed=3)
    mean_before = bn.running_mean.clone()
    with torch.no_grad():
        eval_out = gm.eval()(*x)
        train_out = gm.train()(*x)
        gm.eval()
        assert not torch.allclose(eval_out, train_out, atol=1e-4)  # batch statistics used
        assert not torch.equal(bn.running_mean, mean_before)  # running statistics updated
        assert int(bn.num_batches_tracked) == 1
        # the ScriptModule is untouched: the graph owns copies of its tensors
        assert torch.equal(ts.layer1.bn1.running_mean, mean_before)
        bn.running_mean.copy_(mean_before)
        bn.running_var.copy_(ts.layer1.bn1.running_var)


def test_dropout_follows_train_and_eval(converted):
    _, em = converted["vgg-script"]
    gm = em.gm
    assert any(isinstance(m, nn.Dropout) for m in gm.modules())
    x = em.input_spec.example(3, seed=4)
    torch.manual_seed(0)
    with torch.no_grad():
        gm.train()
        a, b = gm(*x), gm(*x)
        gm.eval()
        c, d = gm(*x), gm(*x)
    assert not torch.equal(a, b) and torch.equal(c, d)
    for m in gm.modules():  # undo the BN statistics update for the other tests
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.zero_()


def test_data_dependent_if_is_rejected(tmp_path):
    model, spec = zoo.control_flow_model()
    ts = load_torchscript(zoo.save_ts(zoo.scripted(model), tmp_path))
    with pytest.raises(UnsupportedModelError) as info:
        to_editable(ts, spec)
    assert info.value.code == "data_dependent_control_flow"
    assert "x.sum() > 0" in info.value.message and "forward" in info.value.message


class _ValueLoop(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        while bool(x.abs().max() > 1.0):
            x = x / 2
        return x


class _ShapeBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        for _ in range(x.size(0)):
            x = x + 1
        y = self.bn(self.conv(x))
        if self.training:
            y = y * 2
        return y


def test_value_loop_is_rejected_but_shape_branches_are_not():
    with pytest.raises(UnsupportedModelError) as info:
        check_control_flow(torch.jit.script(_ValueLoop()))
    assert info.value.code == "data_dependent_control_flow"
    check_control_flow(torch.jit.script(_ShapeBranches().eval()))
    check_control_flow(torch.jit.script(zoo.transformer_encoder()[0]))


def test_scripted_transformer_branches_are_specialised_to_the_slow_path(converted):
    ts, em = converted["transformer-script"]
    assert em.route == "specialised" and em.dynamic_batch
    kinds = {str(n.target) for n in em.gm.graph.nodes if n.op == "call_function"}
    assert "aten.linear.default" in kinds and not any("_transformer_encoder_layer_fwd" in k for k in kinds)
    copy = _private_copy(ts)
    spec = em.input_spec
    assert specialise_branches(copy, [spec.example(b, seed=b) for b in (5, *CHECK_BATCHES)]) > 0
    assert not any(n.kind() == "prim::If" for n in copy.forward.graph.nodes())
    with torch.no_grad(), torch.jit.optimized_execution(False):
        x = spec.example(3, seed=3)
        assert _rel_err(copy(*x), ts(*x)) < 1e-5


def test_export_route_fallback_fixes_the_batch(converted):
    """The last-resort route, called directly: it matches at the example batch only."""
    ts, em = converted["transformer-script"]
    spec = em.input_spec
    example = spec.example(5, seed=0)
    gm = _make_editable(_via_export(_private_copy(ts), example), ts)
    assert {n for n, _ in gm.named_parameters()} == {n for n, _ in ts.named_parameters()}
    with torch.no_grad(), torch.jit.optimized_execution(False):
        assert _rel_err(gm(*example), ts(*example)) < 1e-4


def test_fused_fast_path_is_rejected():
    model, spec = zoo.transformer_encoder()
    with torch.no_grad():  # no grad + eval: the layers trace into the fused kernel
        ts = torch.jit.trace(model, InputSpec.parse(spec).example(3), check_trace=False)
    with pytest.raises(UnsupportedModelError) as info:
        to_editable(ts, spec)
    assert info.value.code == "fused_fast_path"


def test_wrong_input_spec_is_named(converted):
    ts, _ = converted["resnet-script"]
    with pytest.raises(InputSpecError) as info:
        to_editable(ts, "4,16,16")
    msg = info.value.message
    assert "4,16,16" in msg and "channels" in msg and "\n" not in msg
    with pytest.raises(InputSpecError):
        to_editable(ts, "3,16,16;3,16,16")


# --------------------------------------------------------------------------- archives


@pytest.fixture(scope="module")
def good_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, _ = zoo.mlp()
    return zoo.save_ts(zoo.scripted(model), tmp_path_factory.mktemp("arch"))


def _expect(path: Path, *hints: str) -> None:
    with pytest.raises(ArchiveError) as info:
        load_torchscript(path)
    for hint in hints:
        assert hint in info.value.message, info.value.message


def test_good_archive_loads(good_archive):
    precheck_archive(good_archive)
    assert not load_torchscript(good_archive).training


def test_random_bytes(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    _expect(path, "not a zip", "torch.jit.script")


def test_truncated_zip(tmp_path, good_archive):
    data = good_archive.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    _expect(path, "torch.jit")  # the central directory is gone: "not a zip"
    path.write_bytes(data[:-10])  # end record damaged
    _expect(path, "")


def test_corrupted_entry_fails_crc(tmp_path, good_archive):
    data = bytearray(good_archive.read_bytes())
    with zipfile.ZipFile(good_archive) as zf:
        info = zf.getinfo(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    offset = info.header_offset  # local header: name and extra lengths at bytes 26-29
    name_len, extra_len = (int.from_bytes(data[offset + i : offset + i + 2], "little") for i in (26, 28))
    data[offset + 30 + name_len + extra_len + 5] ^= 0xFF
    path = tmp_path / "crc.pt"
    path.write_bytes(bytes(data))
    _expect(path, "CRC")


def test_huge_declared_size(tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w") as zf:
        for name in ("m/data.pkl", "m/constants.pkl", "m/version", "m/code/m.py"):
            zf.writestr(name, b"x")
    data = bytearray(path.read_bytes())
    pos = data.find(b"PK\x01\x02")
    while pos != -1:  # central directory: uncompressed size at offset 24
        data[pos + 24 : pos + 28] = (0xF0000000).to_bytes(4, "little")
        pos = data.find(b"PK\x01\x02", pos + 4)
    path.write_bytes(bytes(data))
    _expect(path, "GiB uncompressed")


def test_high_compression_ratio(tmp_path):
    path = tmp_path / "ratio.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("m/data.pkl", bytes(4 * 1024 * 1024))
    _expect(path, "expands")


def test_path_escape(tmp_path):
    path = tmp_path / "escape.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m/data.pkl", b"x")
        zf.writestr("m/../../evil.py", b"x")
    _expect(path, "outside the archive")


def test_plain_pickle(tmp_path):
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
    _expect(path, "plain pickle", "torch.jit.script")


def test_state_dict_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(zoo.mlp()[0].state_dict(), path)
    _expect(path, "torch.save checkpoint, not TorchScript", "torch.jit.trace")


def test_archive_that_passes_precheck_but_does_not_load(tmp_path):
    path = tmp_path / "fake.pt"
    with zipfile.ZipFile(path, "w") as zf:
        for name in ("m/data.pkl", "m/constants.pkl", "m/version", "m/code/__torch__/m.py"):
            zf.writestr(name, b"garbage")
    precheck_archive(path)
    _expect(path, "could not be loaded as TorchScript")
