"""A CNN whose layers have known, different low ranks (for rank-recovery tests).

Each k x k conv weight is built as a Tucker-2 product core x0 U_out x1 U_in with
orthonormal U's at planted ranks (R_in, R_out), and the classifier as a rank-R
product, each plus Gaussian noise of 1e-3 relative Frobenius norm. Weights are
scaled to He-init norms (||W||^2 = 2 C_out) so activations keep their scale.

``planted_model()`` returns ``(model, spec, planted_ranks, budget)``:
``planted_ranks`` maps layer names (as the inventory names them) to ranks in the
form's order (Tucker-2: (R_in, R_out); SVD: (R,)); ``budget`` is a ``flops:``
keep fraction equal to the network's MACs with exactly those layers at exactly
those ranks (the stem, 3 input channels, is full rank and past break-even for
any useful rank, so it stays dense). A method that reads the spectra right
recovers the planted ranks at that budget; ``uniform`` cannot (one ratio of
every layer's maximum).
"""

from __future__ import annotations

import torch
from torch import nn

from compression.costs import dense_cost, factored_cost
from compression.input_spec import InputSpec
from compression.inventory import CallSite, LayerInfo, count_macs

SPEC = "3,16,16"
NOISE = 1e-3
# name -> (c_in, c_out, stride, (R_in, R_out))
CONVS = {
    "c1": (32, 48, 1, (6, 20)),
    "c2": (48, 48, 2, (24, 8)),
    "c3": (48, 64, 1, (12, 30)),
    "c4": (64, 64, 1, (28, 10)),
}
FC_RANK = 4
CLASSES = 10


def _orth(n: int, r: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return q


def _noisy(w: torch.Tensor, c_out: int, g: torch.Generator) -> torch.Tensor:
    w = w * (2 * c_out) ** 0.5 / w.norm()
    noise = torch.randn(w.shape, generator=g, dtype=torch.float64)
    return (w + NOISE * w.norm() * noise / noise.norm()).float()


def planted_conv_weight(c_out: int, c_in: int, k: int, r_in: int, r_out: int, g: torch.Generator) -> torch.Tensor:
    core = torch.randn(r_out, r_in, k, k, generator=g, dtype=torch.float64)
    w = torch.einsum("rshw,or,is->oihw", core, _orth(c_out, r_out, g), _orth(c_in, r_in, g))
    return _noisy(w, c_out, g)


class PlantedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.c1 = nn.Conv2d(32, 48, 3, padding=1)
        self.c2 = nn.Conv2d(48, 48, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(48, 64, 3, padding=1)
        self.c4 = nn.Conv2d(64, 64, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        x = torch.relu(self.c4(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def planted_ranks() -> dict[str, tuple[int, ...]]:
    ranks: dict[str, tuple[int, ...]] = {name: r for name, (_, _, _, r) in CONVS.items()}
    ranks["fc"] = (FC_RANK,)
    return ranks


def build_planted(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PlantedNet()
    with torch.no_grad():
        for name, (c_in, c_out, _, (r_in, r_out)) in CONVS.items():
            getattr(model, name).weight.copy_(planted_conv_weight(c_out, c_in, 3, r_in, r_out, g))
        u, v = _orth(CLASSES, FC_RANK, g), _orth(64, FC_RANK, g)
        s = torch.diag(torch.linspace(2.0, 1.0, FC_RANK, dtype=torch.float64))
        model.fc.weight.copy_(_noisy(u @ s @ v.T, CLASSES, g))
    return model.eval()


def editable(model: nn.Module, spec: InputSpec) -> torch.fx.GraphModule:
    """The editable graph of ``model`` (model_io when present, else the converter)."""
    try:
        from compression.model_io import to_editable
    except ImportError:
        from torch._export.converter import TS2EPConverter

        gm = TS2EPConverter(torch.jit.script(model.eval()), spec.example(5)).convert().module()
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and node.target == "_guards_fn":
                gm.graph.erase_node(node)
        gm.recompile()
        return gm
    return to_editable(torch.jit.script(model.eval()), spec).gm


def planted_budget(model: nn.Module, spec: InputSpec) -> str:
    """MACs with the planted layers at their ranks, as a keep fraction. Computed
    on the eager model (FLOP counter + shapes from hooks + the cost model), so
    no conversion is needed."""
    ranks = planted_ranks()
    shapes: dict[str, tuple] = {}
    hooks = [getattr(model, n).register_forward_hook(
        lambda m, i, o, n=n: shapes.__setitem__(n, (tuple(i[0].shape[1:]), tuple(o.shape[1:])))) for n in ranks]
    example = spec.example(1)
    try:
        total = count_macs(model, example)
    finally:
        for h in hooks:
            h.remove()
    saved = 0
    for name, r in ranks.items():
        mod = getattr(model, name)
        in_shape, out_shape = shapes[name]
        if isinstance(mod, nn.Linear):
            layer = LayerInfo(name, name + ".weight", name + ".bias", "linear", mod.out_features, mod.in_features,
                              (1, 1), sites=[CallSite(name, in_shape, out_shape, "linear")])
            form = "svd"
        else:
            layer = LayerInfo(name, name + ".weight", name + ".bias", "conv2d", mod.out_channels, mod.in_channels,
                              mod.kernel_size, sites=[CallSite(name, in_shape, out_shape, "conv2d")])
            form = "tucker2"
        saved += dense_cost(layer).macs - factored_cost(layer, form, r).macs
    return f"flops:{(total - saved) / total:.6f}"


def planted_model(seed: int = 0) -> tuple[nn.Module, str, dict[str, tuple[int, ...]], str]:
    """(model, spec string, planted ranks by layer name, budget string)."""
    model = build_planted(seed)
    spec = InputSpec.parse(SPEC)
    return model, SPEC, planted_ranks(), planted_budget(model, spec)
