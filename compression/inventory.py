"""Layer inventory: every conv/linear call in the editable graph, with shapes.

A pass over the FX graph (not per-architecture code): each call of a conv or
linear op whose weight is a stored attribute becomes one ``LayerInfo``; calls
sharing a weight are grouped, so they get one shared replacement later. Shapes
come from running the graph once (shape propagation) on an example batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

from compression.costs import Cost, dense_cost, forms_for
from compression.input_spec import InputSpec

aten = torch.ops.aten

# op -> (kind, index of groups arg, index of transposed arg or None)
_CONV_OPS = {
    aten.conv2d.default: "conv2d",
    aten.conv2d.padding: "conv2d",
    aten.conv1d.default: "conv1d",
    aten.conv1d.padding: "conv1d",
    aten.conv3d.default: "conv3d",
    aten.conv3d.padding: "conv3d",
    aten.convolution.default: "convolution",
    aten.conv_transpose1d.default: "conv_transpose",
    aten.conv_transpose2d.input: "conv_transpose",
    aten.conv_transpose3d.input: "conv_transpose",
}
_LINEAR_OPS = {aten.linear.default: "linear"}


@dataclass(frozen=True)
class CallSite:
    """One call of a layer's weight, with per-sample shapes (batch dropped)."""

    node: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kind: str

    @property
    def in_positions(self) -> int:
        return _positions(self.in_shape, self.kind)

    @property
    def out_positions(self) -> int:
        return _positions(self.out_shape, self.kind)

    @property
    def mid_positions(self) -> int:
        """Positions after the vertical kx1 conv of a 4-factor CP: H_out x W_in."""
        if self.kind != "conv2d":
            return self.out_positions
        return self.out_shape[-2] * self.in_shape[-1]


def _positions(shape: tuple[int, ...], kind: str) -> int:
    # conv: channels first, the rest are positions; linear: features last.
    return prod(shape[1:]) if kind.startswith("conv") else prod(shape[:-1])


@dataclass
class LayerInfo:
    name: str  # the weight's attribute path without ".weight", e.g. "layer1.0.conv1"
    weight: str  # qualified attribute holding the weight
    bias: str | None
    kind: str  # "conv2d" | "linear" | "conv1d" | "conv3d" | "conv_transpose"
    c_out: int
    c_in: int
    kernel: tuple[int, int]
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] | str = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1
    sites: list[CallSite] = field(default_factory=list)
    skip_reason: str | None = None

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    @property
    def decomposable(self) -> bool:
        return self.skip_reason is None

    @property
    def cost(self) -> Cost:
        return dense_cost(self)

    @property
    def macs(self) -> int:
        return self.cost.macs

    @property
    def params(self) -> int:
        return self.cost.params

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.sites[0].in_shape

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.sites[0].out_shape

    @property
    def forms(self) -> tuple[str, ...]:
        return forms_for(self) if self.decomposable else ()

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "in_channels": self.c_in,
            "out_channels": self.c_out,
            "kernel": list(self.kernel),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "bias": self.has_bias,
            "in_shape": list(self.in_shape),
            "out_shape": list(self.out_shape),
            "call_sites": len(self.sites),
            "macs": self.macs,
            "params": self.params,
            "decomposable": self.decomposable,
            "skip_reason": self.skip_reason,
        }


@dataclass
class Inventory:
    layers: list[LayerInfo]
    total_macs: int  # whole network, per sample, from torch's FLOP counter
    total_params: int

    @property
    def layer_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def other_macs(self) -> int:
        """MACs outside conv/linear layers (e.g. attention matmuls); never compressed."""
        return max(self.total_macs - self.layer_macs, 0)

    @property
    def decomposable(self) -> list[LayerInfo]:
        return [layer for layer in self.layers if layer.decomposable]

    @property
    def skipped(self) -> list[LayerInfo]:
        return [layer for layer in self.layers if not layer.decomposable]

    def by_name(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "total_macs": self.total_macs,
            "total_params": self.total_params,
            "layer_macs": self.layer_macs,
            "layers": [layer.to_dict() for layer in self.layers],
        }


def count_macs(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """MACs per sample of one forward pass, as torch's FLOP counter sees them."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() else 1
    return counter.get_total_flops() // 2 // batch


def count_params(module: torch.nn.Module) -> int:
    # Buffers other than BN statistics are weights the converter may keep as buffers.
    seen = {id(p) for p in module.parameters()}
    n = sum(p.numel() for p in module.parameters())
    for name, b in module.named_buffers():
        if id(b) not in seen and b.is_floating_point() and not name.endswith(("running_mean", "running_var")):
            n += b.numel()
    return n


def build_inventory(gm: torch.fx.GraphModule, spec: InputSpec) -> Inventory:
    example = spec.example(spec.example_batch)
    ShapeProp(gm).propagate(*example)
    by_weight: dict[str, LayerInfo] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        kind = _CONV_OPS.get(node.target) or _LINEAR_OPS.get(node.target)
        if kind is None:
            continue
        layer, site_kind = _describe(node, kind)
        site = CallSite(node.name, _shape(node.args[0]), _shape(node), site_kind)
        known = by_weight.get(layer.weight)
        if known is None:
            layer.sites.append(site)
            by_weight[layer.weight] = layer
        else:
            if _settings(known) != _settings(layer) and known.skip_reason is None:
                known.skip_reason = "weight shared by calls with different settings"
            known.sites.append(site)
    layers = list(by_weight.values())
    with torch.no_grad():
        total = count_macs(gm, example)
    return Inventory(layers, total, count_params(gm))


def _settings(layer: LayerInfo) -> tuple:
    return (layer.stride, layer.padding, layer.dilation, layer.groups, layer.bias)


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None:
        raise ValueError(f"no shape recorded for {node.name}")
    return tuple(int(d) for d in meta.shape[1:])


def _attr(node: object) -> str | None:
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        return str(node.target)
    return None


def _pair(v: object, n: int = 2) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(x) for x in v)  # type: ignore[union-attr]
    return v * n if len(v) == 1 else v


def _describe(node: torch.fx.Node, kind: str) -> tuple[LayerInfo, str]:
    args = list(node.args) + [None] * 9
    weight_node = args[1]
    weight = _attr(weight_node)
    bias = _attr(args[2])
    w_shape = tuple(weight_node.meta["tensor_meta"].shape) if isinstance(weight_node, torch.fx.Node) else ()
    name = weight.removesuffix(".weight") if weight else node.name
    if kind == "linear":
        layer = LayerInfo(name, weight or node.name, bias, "linear", w_shape[0], w_shape[1], (1, 1))
        site_kind = "linear"
    else:
        transposed = kind == "conv_transpose"
        if kind == "convolution":
            transposed = bool(args[6])
            stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
            kind = "conv_transpose" if transposed else f"conv{len(w_shape) - 2}d"
        else:
            stride, padding, dilation, groups = args[3], args[4], args[5], args[6]
            if transposed:  # conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation)
                groups, dilation = args[6], args[7]
        nd = max(len(w_shape) - 2, 1)
        c_out, c_in = (w_shape[1], w_shape[0]) if transposed else (w_shape[0], w_shape[1])
        groups = int(groups or 1)
        layer = LayerInfo(
            name,
            weight or node.name,
            bias,
            kind,
            c_out * (groups if transposed else 1),
            c_in * (1 if transposed else groups),
            tuple(w_shape[2:4]) if nd == 2 else (int(w_shape[2]), 1),  # type: ignore[arg-type]
            _pair(stride if stride is not None else 1, nd),
            padding if isinstance(padding, str) else _pair(padding if padding is not None else 0, nd),
            _pair(dilation if dilation is not None else 1, nd),
            groups,
        )
        site_kind = "conv2d" if kind == "conv2d" else "conv"
        if kind == "conv_transpose":
            layer.skip_reason = "transposed conv: no decomposed form"
        elif kind != "conv2d":
            layer.skip_reason = f"{kind}: only 2-D convs are decomposed"
        elif groups > 1:
            layer.skip_reason = "depthwise conv" if w_shape[1] == 1 else "grouped conv"
    if weight is None:
        layer.skip_reason = "weight is computed in the graph, not stored"
    return layer, site_kind
