"""Hand-back: TorchScript and .pt2 files load in a fresh call and match the
in-memory GraphModule; a file that does not match is never left behind."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.fx
from torch import nn
from torch._export.converter import TS2EPConverter

from compression.errors import ExportError
from compression.export import ExportCheck, export_pt2, export_torchscript

aten = torch.ops.aten


# --- models -------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(8), Block(8))
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(torch.relu(self.bn(self.stem(x))))
        return self.fc(self.drop(x.mean((2, 3))))


class TwoInputMLP(nn.Module):
    """Two inputs, tuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.fc2 = nn.Linear(32, 16)
        self.side = nn.Linear(5, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.fc2(torch.relu(self.fc1(x)))) + self.side(y)
        return self.head(h), h


class SharedConvNet(nn.Module):
    """``mid`` is applied twice: one weight, two call sites."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.first(x))
        x = torch.relu(self.mid(torch.relu(self.mid(x))))
        return self.fc(x.mean((2, 3)))


class Tucker2Conv(nn.Module):
    """Stand-in for the factorised form: 1x1 -> kxk core -> 1x1."""

    def __init__(self, c_in: int, c_out: int, r_in: int, r_out: int, padding: int) -> None:
        super().__init__()
        self.first = nn.Conv2d(c_in, r_in, 1, bias=False)
        self.core = nn.Conv2d(r_in, r_out, 3, padding=padding, bias=False)
        self.last = nn.Conv2d(r_out, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))


class TokenTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 4)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(tok)).mean(1))


# --- building editable graphs the way model_io / rewrite do --------------------


def _attr(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    assert node.op == "get_attr"
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def _editable(src: torch.jit.ScriptModule, example: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule:
    """Converter, then: no guards or scalar asserts, BN and dropout as modules."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = TS2EPConverter(src, example).convert().module()
    for name in ("train", "eval"):  # .module() makes both raise; model_io restores them
        gm.__dict__.pop(name, None)
    graph = gm.graph
    for i, node in enumerate(list(graph.nodes)):
        if (node.op == "call_module" and node.target == "_guards_fn") or (node.target is aten._assert_scalar.default):
            graph.erase_node(node)
        elif node.target is aten.batch_norm.default:
            x, w, b, mean, var, _, momentum, eps, _ = node.args
            weight = _attr(gm, w)
            bn = nn.BatchNorm2d(weight.numel(), eps=eps, momentum=momentum)
            with torch.no_grad():
                bn.weight.copy_(weight)
                bn.bias.copy_(_attr(gm, b))
                bn.running_mean.copy_(_attr(gm, mean))
                bn.running_var.copy_(_attr(gm, var))
            _swap_for_module(gm, node, f"bn_{i}", bn, (x,))
        elif node.target is aten.dropout.default:
            _swap_for_module(gm, node, f"dropout_{i}", nn.Dropout(node.args[1]), (node.args[0],))
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _swap_for_module(gm: torch.fx.GraphModule, node: torch.fx.Node, name: str, module: nn.Module, args: tuple) -> None:
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, args)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _factorise_convs(gm: torch.fx.GraphModule, weights: dict[str, str]) -> None:
    """Replace the conv nodes reading weight ``key`` by a call of one shared
    Tucker2Conv registered under the (nested) name ``weights[key]``."""
    made: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        if node.target not in (aten.conv2d.default, aten.convolution.default):
            continue
        w = node.args[1]
        if w.target not in weights:
            continue
        name = weights[w.target]
        if name not in made:
            c_out, c_in = _attr(gm, w).shape[:2]
            gm.add_submodule(name, Tucker2Conv(c_in, c_out, 4, 4, padding=1))
            made[name] = name
        _swap_for_module(gm, node, name, gm.get_submodule(name), (node.args[0],))
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _img(batch: int = 2) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(0)),)


def _randomised_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
    return model.eval()


# --- checks ---------------------------------------------------------------------


def _load(check: ExportCheck) -> Callable[..., Any]:
    """Load the file with nothing from the writer's process state but torch."""
    return torch.jit.load(check.path) if check.kind == "torchscript" else torch.export.load(check.path).module()


def _leaves(fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(torch.utils._pytree.tree_leaves(fn(*inputs)))


def _assert_matches(gm: torch.fx.GraphModule, example: tuple, check: ExportCheck, batches: tuple[int, ...]) -> None:
    data = Path(check.path).read_bytes()
    assert (check.size_bytes, check.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert check.batch_sizes_checked == batches
    assert check.max_rel_error <= 1e-4
    nn.Module.train(gm, False)  # not gm.eval(): raises on ExportedProgram.module()
    loaded = _load(check)
    for b in batches:
        inputs = tuple(
            torch.randn(b, *x.shape[1:]) if x.is_floating_point() else torch.randint(0, 50, (b, *x.shape[1:]))
            for x in example
        )
        for got, want in zip(_leaves(loaded, inputs), _leaves(gm, inputs), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _export_both(gm: torch.fx.GraphModule, tmp_path: Path, example: tuple) -> tuple[ExportCheck, ExportCheck]:
    ts = export_torchscript(gm, tmp_path / "model.pt", example)
    pt2 = export_pt2(gm, tmp_path / "model.pt2", example)
    assert (ts.kind, pt2.kind) == ("torchscript", "pt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.pt2"]
    return ts, pt2


# --- tests ------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["script", "trace"])
def test_resnet_like_exports_with_free_batch(tmp_path: Path, source: str) -> None:
    torch.manual_seed(0)
    model = _randomised_bn(TinyResNet())
    src = torch.jit.script(model) if source == "script" else torch.jit.trace(model, _img())
    gm = _editable(src, _img())
    assert any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    assert any(isinstance(m, nn.Dropout) for m in gm.modules())
    gm.train()  # the export must not depend on the caller's mode ...
    code_before = gm.code
    ts, pt2 = _export_both(gm, tmp_path, _img())
    assert gm.training and gm.code == code_before  # ... nor change the caller's graph
    assert (ts.method, pt2.method) == ("script", "export-dynamic")
    assert not ts.fixed_shapes and not pt2.fixed_shapes
    for check in (ts, pt2):
        _assert_matches(gm, _img(), check, (1, 2, 7))


def test_two_input_mlp_with_tuple_output(tmp_path: Path) -> None:
    torch.manual_seed(1)
    example = (torch.randn(3, 12), torch.randn(3, 5))
    gm = _editable(torch.jit.script(TwoInputMLP().eval()), example)
    ts, pt2 = _export_both(gm, tmp_path, example)
    assert (ts.method, pt2.method) == ("script", "export-dynamic")
    for check in (ts, pt2):
        _assert_matches(gm, example, check, (1, 2, 3, 7))
        outs = _leaves(_load(check), (torch.randn(4, 12), torch.randn(4, 5)))
        assert [o.shape for o in outs] == [(4, 4), (4, 16)]


def test_factorised_modules_and_shared_weight(tmp_path: Path) -> None:
    torch.manual_seed(2)
    gm = _editable(torch.jit.script(SharedConvNet().eval()), _img())
    # nested names, a dotted path as rewrite may register them; ``mid`` is shared
    _factorise_convs(gm, {"first.weight": "factors.first", "mid.weight": "factors.mid"})
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls.count("factors.mid") == 2 and "factors.first" in calls
    ts, pt2 = _export_both(gm, tmp_path, _img())
    assert (ts.method, pt2.method) == ("script", "export-dynamic")
    for check in (ts, pt2):
        _assert_matches(gm, _img(), check, (1, 2, 7))
    # the shared module stays one module in the TorchScript file
    loaded = torch.jit.load(ts.path)
    assert sum(1 for n, _ in loaded.named_children() if "factors" in n) == 2


def test_parameters_stay_parameters(tmp_path: Path) -> None:
    gm = _editable(torch.jit.script(TwoInputMLP().eval()), (torch.randn(2, 12), torch.randn(2, 5)))
    n_params = sum(p.numel() for p in gm.parameters())
    ts = export_torchscript(gm, tmp_path / "m.pt", (torch.randn(2, 12), torch.randn(2, 5)))
    assert sum(p.numel() for p in torch.jit.load(ts.path).parameters()) == n_params


def test_transformer_with_fixed_shapes(tmp_path: Path) -> None:
    torch.manual_seed(3)
    example = (torch.randint(0, 50, (2, 6)),)
    gm = torch.export.export(TokenTransformer().eval(), example, strict=False).module()
    ts, pt2 = _export_both(gm, tmp_path, example)
    assert ts.method in ("script", "trace")
    assert pt2.method == "export-static"
    for check in (ts, pt2):
        assert check.fixed_shapes and check.note
        _assert_matches(gm, example, check, (2,))


def _python_only(x: torch.Tensor, **scale: float) -> torch.Tensor:
    return x * scale["factor"]  # **kwargs cannot be scripted


def test_unscriptable_graph_falls_back_to_trace(tmp_path: Path) -> None:
    example = (torch.randn(2, 12), torch.randn(2, 5))
    gm = _editable(torch.jit.script(TwoInputMLP().eval()), example)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    first = out.args[0][0]
    with gm.graph.inserting_before(out):
        scaled = gm.graph.call_function(_python_only, (first,), {"factor": 2.0})
    out.args = ((scaled, *out.args[0][1:]),)
    gm.recompile()
    ts = export_torchscript(gm, tmp_path / "m.pt", example)
    assert ts.method == "trace" and ts.fixed_shapes and "script failed" in ts.note
    assert ts.batch_sizes_checked == (2,)
    with torch.no_grad():
        want = gm(*example)[0]
    torch.testing.assert_close(_leaves(_load(ts), example)[0], want)
    pt2 = export_pt2(gm, tmp_path / "m.pt2", example)  # export traces Python: no fallback
    assert pt2.method == "export-dynamic" and pt2.batch_sizes_checked == (1, 2, 7)


def test_batch_one_example_gives_static_pt2(tmp_path: Path) -> None:
    example = (torch.randn(1, 12), torch.randn(1, 5))
    gm = _editable(torch.jit.script(TwoInputMLP().eval()), (torch.randn(2, 12), torch.randn(2, 5)))
    pt2 = export_pt2(gm, tmp_path / "m.pt2", example)
    # Dim.AUTO specialises a size-1 dimension; the check says so instead of guessing
    assert (pt2.method, pt2.fixed_shapes, pt2.batch_sizes_checked) == ("export-static", True, (1,))


def _with_random_op(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Dropout hard-wired to training: the file can never reproduce the model."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    (res,) = out.args[0]
    with gm.graph.inserting_before(out):
        noisy = gm.graph.call_function(aten.dropout.default, (res, 0.5, True))
    out.args = ((noisy,),)
    gm.recompile()
    return gm


@pytest.mark.parametrize("export", [export_torchscript, export_pt2])
def test_mismatch_raises_and_leaves_nothing(tmp_path: Path, export) -> None:
    gm = _with_random_op(_editable(torch.jit.script(TinyResNet().eval()), _img()))
    target = tmp_path / "out" / "model.bin"
    with pytest.raises(ExportError, match="differs from the model"):
        export(gm, target, _img())
    assert list(target.parent.iterdir()) == []
