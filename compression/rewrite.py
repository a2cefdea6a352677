"""The rewrite pass: replace planned conv/linear calls by factorised modules.

Each planned layer gets one submodule, initialised by decomposing its weight;
every call site of that weight becomes a ``call_module`` of the same submodule
(a shared weight stays shared). The dense weight and bias are then dropped from
the graph module so parameter counts and files shrink.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from compression import forms
from compression.inventory import Inventory, LayerInfo
from compression.plan import RankPlan

PREFIX = "tt_"


def submodule_name(layer_name: str) -> str:
    return PREFIX + layer_name.replace(".", "_")


def build_module(layer: LayerInfo, form: str, ranks: tuple[int, ...], weight: torch.Tensor,
                 bias: torch.Tensor | None, init: str | None = None) -> nn.Module:
    """The factorised module for one layer, initialised by decomposition."""
    w = weight.detach()
    b = None if bias is None else bias.detach()
    kwargs: dict = {"ranks": tuple(ranks)}
    if init is not None:
        kwargs["init"] = init
    if layer.kind == "linear":
        return forms.SVDLinear.from_dense(w, b, **kwargs)
    conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
    if form == "svd":
        return forms.SVDConv1x1.from_dense(w, b, stride=layer.stride, **kwargs)
    return forms.FORMS[form].from_dense(w, b, **conv, **kwargs)


def get_tensor(gm: nn.Module, target: str) -> torch.Tensor:
    mod_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(mod_path) if mod_path else gm
    return getattr(owner, attr)


def _delete_attr(gm: nn.Module, target: str) -> None:
    mod_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(mod_path) if mod_path else gm
    if hasattr(owner, attr):
        delattr(owner, attr)


def apply_plan(gm: torch.fx.GraphModule, inventory: Inventory, plan: RankPlan,
               modules: dict[str, nn.Module] | None = None, init: str | None = None) -> torch.fx.GraphModule:
    """Rewrite ``gm`` in place following ``plan`` and return it.

    ``modules`` may supply ready factorised modules by layer name (e.g. trained
    by a rank-selection method); others are decomposed from the dense weights.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    for lp in plan.layers:
        layer = inventory.by_name(lp.name)
        mod = (modules or {}).get(lp.name)
        if mod is None:
            weight = get_tensor(gm, layer.weight)
            bias = get_tensor(gm, layer.bias) if layer.bias else None
            mod = build_module(layer, lp.form, lp.ranks, weight, bias, init)
        name = submodule_name(layer.name)
        gm.add_submodule(name, mod)
        for site in layer.sites:
            node = nodes[site.node]
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (node.args[0],))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
    # Drop the dense weights nobody reads any more.
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            target = str(node.target)
            gm.graph.erase_node(node)
            if not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
                _delete_attr(gm, target)
    gm.graph.lint()
    gm.recompile()
    return gm
