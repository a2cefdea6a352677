"""Model I/O: a TorchScript file in, a trainable and editable FX graph out.

TorchScript types are fixed, so layers cannot be swapped in a ScriptModule. We
turn it into a ``torch.fx.GraphModule`` instead, by one of two routes:

* ``"converter"``: torch's TorchScript-to-ExportedProgram converter
  (``torch._export.converter.TS2EPConverter``, a private API wrapped only here).
  It keeps the batch size symbolic; it rejects ``prim::If`` it cannot resolve
  (e.g. the fast-path checks in scripted transformer layers).
* ``"specialised"``: the converter again, on a copy whose ``if`` nodes are all
  resolved first. Each condition is recorded by running an instrumented copy of
  the inlined graph (with gradients enabled, so transformer layers take the
  decomposable slow path) at the example batch and at CHECK_BATCHES, and the
  ``if`` is replaced by the branch it took. This is how scripted transformers
  keep a free batch size. ``check_control_flow`` has already rejected conditions
  on tensor values, so these conditions depend on shapes, flags and modes only.
* ``"export"``: non-strict ``torch.export.export`` of a wrapper that calls the
  ScriptModule, the last resort. It fixes every shape to the example, so
  ``dynamic_batch`` is usually False.

The graph is then made fit for fine-tuning: trainable tensors become
``nn.Parameter`` under their original names, the shape guards derived from the
example are dropped, and batch norm / dropout calls become real modules so
``train()`` / ``eval()`` work.
"""

from __future__ import annotations

import io
import operator
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from compression.archive import precheck_archive
from compression.errors import ArchiveError, InputSpecError, TensorTrimError, UnsupportedModelError
from compression.input_spec import InputSpec

CHECK_BATCHES = (1, 2, 7)
REL_TOL = 1e-4

_aten = torch.ops.aten
_FUSED_OPS = {"_transformer_encoder_layer_fwd", "_native_multi_head_attention"}


@dataclass
class EditableModel:
    gm: fx.GraphModule
    input_spec: InputSpec
    route: str  # "converter", "specialised" or "export"
    dynamic_batch: bool


# --------------------------------------------------------------------------- load


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    """Pre-check the archive, load it on CPU and put it in eval mode."""
    path = Path(path)
    precheck_archive(path)
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError, ValueError, pickle errors...
        raise ArchiveError(
            f"{path.name} could not be loaded as TorchScript: {_one_line(exc)}. "
            "Save it with torch.jit.save from the same or an older torch version"
        ) from None
    return module.eval()


# --------------------------------------------------------------------------- convert


def to_editable(script_module: torch.jit.ScriptModule, input_spec: InputSpec | str) -> EditableModel:
    """Turn a ScriptModule into a trainable ``fx.GraphModule`` that matches it.

    Raises InputSpecError if the model rejects inputs of the spec, and
    UnsupportedModelError (with a ``code``) if no route gives a matching graph.
    """
    spec = InputSpec.parse(input_spec) if isinstance(input_spec, str) else input_spec
    ts = script_module.eval()
    check_control_flow(ts)

    batch = spec.example_batch
    example = spec.example(batch, seed=0)
    reference = _run_reference(ts, example, spec)

    probes = [example] + [spec.example(b, seed=b) for b in CHECK_BATCHES]
    routes: tuple[tuple[str, Callable[[torch.jit.ScriptModule, tuple[torch.Tensor, ...]], fx.GraphModule]], ...] = (
        ("converter", _via_converter),
        ("specialised", lambda m, ex: _via_specialised_converter(m, ex, probes)),
        ("export", _via_export),
    )
    failures: list[UnsupportedModelError] = []
    for route, build in routes:
        try:
            gm = build(_private_copy(ts), example)
            gm = _make_editable(gm, ts)
            _check_no_fused_ops(gm)
            dynamic = _verify(gm, ts, spec, batch, reference, route)
            return EditableModel(gm=gm, input_spec=spec, route=route, dynamic_batch=dynamic)
        except UnsupportedModelError as exc:
            failures.append(exc)
        except TensorTrimError:
            raise
        except Exception as exc:  # the converter and export raise anything
            failures.append(UnsupportedModelError(f"{route} route failed: {_one_line(exc)}", code="conversion_failed"))
    # Prefer the most specific reason: a fused fast path explains a failure of both routes.
    fused = [f for f in failures if f.code == "fused_fast_path"]
    if fused:
        raise fused[0]
    reasons = "; ".join(f.message for f in failures)
    raise UnsupportedModelError(f"cannot turn the model into an editable graph: {reasons}", code="conversion_failed")


def _run_reference(ts: torch.jit.ScriptModule, example: tuple[torch.Tensor, ...], spec: InputSpec) -> Any:
    try:
        with torch.no_grad(), torch.jit.optimized_execution(False):
            return ts(*example)
    except Exception as exc:
        raise InputSpecError(f"the model rejects inputs of spec '{spec.to_string()}': {_one_line(exc)}") from None


# --------------------------------------------------------------------------- routes


def _private_copy(ts: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """A copy with its own tensors and its own TorchScript types. The converter
    rewrites the ``forward`` graph in place, and methods belong to the type, which
    ``copy.deepcopy`` shares; the export route re-registers parameters. A save /
    load round trip in memory keeps the caller's module untouched."""
    buffer = io.BytesIO()
    torch.jit.save(ts, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer, map_location="cpu").eval()


def _via_converter(ts: torch.jit.ScriptModule, example: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    from torch._export.converter import TS2EPConverter  # private API: only used here

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Manually populate ... num_batches_tracked" etc.
        ep = TS2EPConverter(ts, example).convert()
    return ep.module()


def _via_specialised_converter(
    ts: torch.jit.ScriptModule,
    example: tuple[torch.Tensor, ...],
    probes: list[tuple[torch.Tensor, ...]],
) -> fx.GraphModule:
    specialise_branches(ts, probes)
    return _via_converter(ts, example)


def specialise_branches(ts: torch.jit.ScriptModule, probes: list[tuple[torch.Tensor, ...]]) -> int:
    """Inline ``ts.forward`` in place and replace every ``prim::If`` that runs on
    the probe inputs by the branch it takes. Returns how many were replaced.

    The probes run with gradients enabled and parameters requiring grad, so
    ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` take the slow path
    (plain linear layers) rather than the fused kernels. An ``if`` that goes both
    ways (across probes or loop iterations) cannot be specialised: raises
    UnsupportedModelError. Ifs that never run (inside untaken branches) vanish
    with their branch. Mutates ``ts``: call it on a private copy."""
    graph = ts.forward.graph
    torch._C._jit_pass_inline(graph)
    probe_graph = graph.copy()
    n_ifs = _record_conditions(probe_graph)
    probe = torch._C._create_function_from_graph("tensortrim_branch_probe", probe_graph)
    for p in ts.parameters():
        p.requires_grad_(True)
    taken: dict[int, set[int]] = {}
    with torch.enable_grad(), torch.jit.optimized_execution(False):
        for inputs in probes:
            _, record = probe(ts._c, *inputs)
            for i in range(0, len(record), 2):
                taken.setdefault(record[i], set()).add(record[i + 1])
    ifs = [n for n in _walk(graph.block()) if n.kind() == "prim::If"]
    if len(ifs) != n_ifs:  # the probe graph is a copy: same nodes, same order
        raise UnsupportedModelError("specialised route: the probe graph does not match", code="conversion_failed")
    both = [i for i, values in taken.items() if len(values) > 1]
    if both:
        raise UnsupportedModelError(
            f"specialised route: an if takes both branches across batch sizes ({_where(ifs[both[0]])})",
            code="conversion_failed",
        )
    for i, node in enumerate(ifs):  # pre-order: outer ifs first; moved nodes stay the same objects
        if i not in taken:
            continue
        block = list(node.blocks())[0 if taken[i].pop() else 1]
        for inner in list(block.nodes()):
            inner.moveBefore(node)
        for out, value in zip(list(node.outputs()), list(block.outputs()), strict=True):
            out.replaceAllUsesWith(value)
        node.destroy()
    torch._C._jit_pass_dce(graph)
    torch._C._jit_pass_constant_propagation(graph)
    _split_size_lists(graph)
    _int_math_as_tensors(graph)
    torch._C._jit_pass_dce(graph)
    torch._C._jit_pass_lint(graph)
    return len(taken)


def _split_size_lists(graph: torch._C.Graph) -> None:
    """``a, b, c = x.size()`` -> ``x.size(0), x.size(1), x.size(2)``. The converter
    maps the whole-list ``aten::size`` to an op that fixes every dimension to the
    example (the batch included) when it retraces; single sizes stay symbolic."""
    for node in list(_walk(graph.block())):
        if node.kind() != "aten::size" or node.inputsSize() != 1:
            continue
        tensor = node.inputsAt(0)
        for use in list(node.output().uses()):
            unpack = use.user
            if unpack.kind() != "prim::ListUnpack":
                continue
            for dim, out in enumerate(list(unpack.outputs())):
                index = graph.insertConstant(dim)
                index.node().moveBefore(unpack)
                size = graph.create("aten::size", [tensor, index])
                size.output().setType(torch._C.IntType.get())
                size.insertBefore(unpack)
                out.replaceAllUsesWith(size.output())


_INT_MATH = {
    "aten::mul": "aten::mul",
    "aten::floordiv": "aten::floor_divide",
    "aten::add": "aten::add",
    "aten::sub": "aten::sub",
}


def _int_math_as_tensors(graph: torch._C.Graph) -> None:
    """``bsz * heads`` on ints -> ``int(tensor(bsz) * tensor(heads))``, as
    torch.jit.trace records it. The converter calls int ops such as ``aten.mul.int``
    directly, which fixes their symbolic operands (the batch size) to the example;
    scalar tensors keep them symbolic."""
    int_type = torch._C.IntType.get()
    for node in list(_walk(graph.block())):
        kind = _INT_MATH.get(node.kind())
        ins = list(node.inputs())
        if kind is None or len(ins) != 2 or not all(v.type() == int_type for v in [*ins, node.output()]):
            continue
        tensors = []
        for value in ins:
            as_tensor = graph.create("prim::NumToTensor", [value])
            as_tensor.output().setType(torch._C.TensorType.get())
            as_tensor.insertBefore(node)
            tensors.append(as_tensor.output())
        if kind in ("aten::add", "aten::sub"):
            alpha = graph.insertConstant(1)
            alpha.node().moveBefore(node)
            tensors.append(alpha)
        math = graph.create(kind, tensors)
        math.output().setType(torch._C.TensorType.get())
        math.insertBefore(node)
        back = graph.create("aten::Int", [math.output()])
        back.output().setType(int_type)
        back.insertBefore(node)
        node.output().replaceAllUsesWith(back.output())
        node.destroy()


def _record_conditions(graph: torch._C.Graph) -> int:
    """Instrument ``graph`` (a copy) so it returns ``(output, record)``, where
    record lists ``[if_index, int(condition), ...]`` for every ``if`` run, the
    ifs numbered in ``_walk`` order. Returns the number of ifs."""
    ifs = [n for n in _walk(graph.block()) if n.kind() == "prim::If"]
    int_list = torch._C.ListType.ofInts()
    record = graph.create("prim::ListConstruct")
    record.output().setType(int_list)
    record.insertAfter(graph.block().paramNode())
    log = record.output()

    def append(value: torch._C.Value, before: torch._C.Node) -> None:
        node = graph.create("aten::append", [log, value])
        node.output().setType(int_list)
        node.insertBefore(before)

    for i, node in enumerate(ifs):
        index = graph.insertConstant(i)
        index.node().moveBefore(node)
        append(index, node)
        as_int = graph.create("aten::Int", [node.inputsAt(0)])
        as_int.output().setType(torch._C.IntType.get())
        as_int.insertBefore(node)
        append(as_int.output(), node)
    (result,) = list(graph.outputs())
    pair = graph.create("prim::TupleConstruct", [result, log])
    pair.output().setType(torch._C.TupleType([result.type(), int_list]))
    graph.appendNode(pair)
    graph.eraseOutput(0)
    graph.registerOutput(pair.output())
    return len(ifs)


class _ScriptWrapper(nn.Module):
    """Lets torch.export trace a ScriptModule call (non-strict, so the TorchScript
    interpreter runs on fake tensors and its ops land in the graph)."""

    def __init__(self, ts: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.ts = ts

    def forward(self, *args: torch.Tensor) -> Any:
        return self.ts(*args)


def _via_export(ts: torch.jit.ScriptModule, example: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    # export wants nn.Parameter objects; TorchScript hands back plain tensors.
    for name, p in list(ts.named_parameters()):
        owner, leaf = _owner(ts, name)
        setattr(owner, leaf, nn.Parameter(p.detach(), requires_grad=True))
    # Grad enabled + parameters requiring grad make transformer layers take the
    # decomposed slow path instead of the fused fast-path kernels.
    with torch.enable_grad():
        ep = torch.export.export(_ScriptWrapper(ts), example, strict=False)
    gm = ep.module()
    gm.meta["_name_prefix"] = "ts."
    return gm


# --------------------------------------------------------------------------- graph fix-ups


def _make_editable(gm: fx.GraphModule, ts: torch.jit.ScriptModule) -> fx.GraphModule:
    prefix = gm.meta.pop("_name_prefix", "")
    drop_example_guards(gm)
    param_names = {n for n, _ in ts.named_parameters()}
    gm = _rebuild_attributes(gm, lambda t: t.removeprefix(prefix), param_names)
    _modularise_batch_norm(gm)
    _modularise_dropout(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm.eval()


def drop_example_guards(gm: fx.GraphModule) -> None:
    """Remove the input guard and the scalar asserts the tracer derived from the
    example (e.g. ``batch * heads >= 8``); they would reject other batch sizes."""
    graph = gm.graph
    checks = ("_assert_scalar", "sym_constrain_range", "_assert_async", "_assert_tensor_metadata")
    for node in list(graph.nodes):
        is_guard = node.op == "call_module" and node.target == "_guards_fn"
        if is_guard or (node.op == "call_function" and _op_name(node.target).startswith(checks)):
            graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    graph.eliminate_dead_code()


def _rebuild_attributes(gm: fx.GraphModule, rename: Callable[[str], str], param_names: set[str]) -> fx.GraphModule:
    """Re-home every attribute the graph reads under its TorchScript name, as an
    ``nn.Parameter`` if TorchScript calls it a parameter (the converter may make
    it a buffer), else a buffer. The tensors come from a private copy of the
    ScriptModule, so training the graph never changes the caller's module.
    Shared tensors stay shared."""
    root = nn.Module()
    made: dict[int, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _get(gm, node.target)
            new_name = rename(node.target)
            if isinstance(value, torch.Tensor):
                key = id(value)
                if key not in made:
                    data = value.detach()
                    made[key] = nn.Parameter(data, requires_grad=True) if new_name in param_names else data
                value = made[key]
            _set(root, new_name, value)
            node.target = new_name
        elif node.op == "call_module":
            _set(root, node.target, _get(gm, node.target))
    new = fx.GraphModule(root, gm.graph, class_name="EditableGraph")
    new.meta.update(gm.meta)
    return new


_BN_ATTRS = ("weight", "bias", "running_mean", "running_var")


def _modularise_batch_norm(gm: fx.GraphModule) -> None:
    """``aten.batch_norm(x, w, b, mean, var, training=False, ...)`` ignores
    ``gm.train()``; a real BatchNorm module uses batch statistics and updates the
    running ones in train mode. The module reuses the graph's tensors."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _aten.batch_norm.default:
            x, w, b, mean, var, _training, momentum, eps = node.args[:8]
            uses = [node]
        elif node.target is _aten._native_batch_norm_legit_no_training.default:
            x, w, b, mean, var, momentum, eps = node.args[:7]
            uses = list(node.users)
            if not all(u.target is _getitem and u.args[1] == 0 for u in uses):
                continue
        else:
            continue
        attrs = (w, b, mean, var)
        if any(a is not None and not (isinstance(a, fx.Node) and a.op == "get_attr") for a in attrs):
            continue
        if mean is None or var is None:
            continue
        rank = _rank(x)
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank or 0)
        if cls is None:
            continue
        tensors = [None if a is None else _get(gm, a.target) for a in attrs]
        bn = cls(tensors[2].numel(), eps=float(eps), momentum=float(momentum), affine=w is not None)
        for attr, t in zip(_BN_ATTRS, tensors, strict=True):
            if t is not None:
                setattr(bn, attr, t)  # same Parameter / buffer object: no copy
        bn.num_batches_tracked.zero_()  # the converter drops it; restart the count
        bn.eval()
        path = _bn_home(gm, attrs) or _fresh_name(gm, node.name)
        _set(gm, path, bn)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (x,))
        call.meta = dict(node.meta)
        for u in uses:
            u.replace_all_uses_with(call)
        for u in uses:
            if u is not node:
                gm.graph.erase_node(u)
        gm.graph.erase_node(node)


def _bn_home(gm: fx.GraphModule, attrs: tuple[Any, ...]) -> str | None:
    """If the four tensors live in one plain container named like a BN module
    (``layer1.bn1.weight`` ...), put the BN module there: names stay the same."""
    owners = set()
    for attr, node in zip(_BN_ATTRS, attrs, strict=True):
        if node is None:
            continue
        owner, _, leaf = node.target.rpartition(".")
        if leaf != attr or not owner:
            return None
        owners.add(owner)
    if len(owners) != 1:
        return None
    path = owners.pop()
    container = _get(gm, path)
    if type(container) is not nn.Module or list(container.children()):
        return None
    own = set(container._parameters) | set(container._buffers)
    return path if own <= set(_BN_ATTRS) | {"num_batches_tracked"} else None


def _modularise_dropout(gm: fx.GraphModule) -> None:
    """``aten.dropout(x, p, train=False)`` is frozen at trace time; a module follows
    ``gm.train()``."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        uses = [node]
        if name in ("dropout", "dropout_"):
            module: nn.Module = nn.Dropout(float(node.args[1]))
        elif name in ("alpha_dropout", "alpha_dropout_"):
            module = nn.AlphaDropout(float(node.args[1]))
        elif name in ("feature_dropout", "feature_dropout_", "feature_alpha_dropout", "feature_alpha_dropout_"):
            module = FeatureDropout(float(node.args[1]), alpha="alpha" in name)
        elif name == "native_dropout":
            uses = list(node.users)
            if not all(u.target is _getitem and u.args[1] == 0 for u in uses):
                continue
            module = nn.Dropout(float(node.args[1]))
        else:
            continue
        path = _fresh_name(gm, node.name)
        _set(gm, path, module.eval())
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (node.args[0],))
        call.meta = dict(node.meta)
        for u in uses:
            u.replace_all_uses_with(call)
        for u in uses:
            if u is not node:
                gm.graph.erase_node(u)
        gm.graph.erase_node(node)


class FeatureDropout(nn.Module):
    """Channel-wise dropout as TorchScript's ``feature_dropout`` does it, for any rank."""

    def __init__(self, p: float, alpha: bool = False) -> None:
        super().__init__()
        self.p = p
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.alpha:
            return torch.feature_alpha_dropout(x, self.p, self.training)
        return torch.feature_dropout(x, self.p, self.training)


def _check_no_fused_ops(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and _op_name(node.target) in _FUSED_OPS:
            raise UnsupportedModelError(
                f"the graph calls the fused kernel aten.{_op_name(node.target)}, which hides the linear layers "
                "inside one op, so there is nothing to decompose. Export the model with torch.jit.trace while "
                "gradients are enabled (the slow path), or script it",
                code="fused_fast_path",
            )


# --------------------------------------------------------------------------- verification


def _verify(
    gm: fx.GraphModule,
    ts: torch.jit.ScriptModule,
    spec: InputSpec,
    batch: int,
    reference: Any,
    route: str,
) -> bool:
    """Compare with the ScriptModule at the example batch and at CHECK_BATCHES.
    Returns whether other batch sizes work (always required on the converter routes)."""
    # optimized_execution(False): the profiling executor would re-optimise the
    # ScriptModule for every new batch size, which costs seconds and proves nothing.
    with torch.no_grad(), torch.jit.optimized_execution(False):
        _compare(gm(*spec.example(batch, seed=0)), reference, batch, route)
        for b in CHECK_BATCHES:
            inputs = spec.example(b, seed=b)
            try:
                got = gm(*inputs)
                _compare(got, ts(*inputs), b, route)
            except Exception:
                if route == "export":  # the export route bakes shapes in: fixed batch
                    return False
                raise
    return True


def _compare(got: Any, want: Any, batch: int, route: str) -> None:
    got_leaves, want_leaves = pytree.tree_leaves(got), pytree.tree_leaves(want)
    if len(got_leaves) != len(want_leaves):
        raise UnsupportedModelError(
            f"{route} route: the editable graph returns {len(got_leaves)} outputs, the model {len(want_leaves)}",
            code="conversion_failed",
        )
    for g, w in zip(got_leaves, want_leaves, strict=True):
        if not isinstance(w, torch.Tensor):
            continue
        if not isinstance(g, torch.Tensor) or g.shape != w.shape:
            raise UnsupportedModelError(
                f"{route} route: output shape {getattr(g, 'shape', type(g))} differs from the model's "
                f"{tuple(w.shape)} at batch {batch}",
                code="conversion_failed",
            )
        if not w.is_floating_point():
            if not torch.equal(g, w):
                raise UnsupportedModelError(
                    f"{route} route: integer outputs differ at batch {batch}", code="conversion_failed"
                )
            continue
        err = (g.double() - w.double()).abs().max().item() if w.numel() else 0.0
        scale = max(w.double().abs().max().item() if w.numel() else 0.0, 1e-12)
        if not err <= REL_TOL * scale:  # also catches NaN
            raise UnsupportedModelError(
                f"{route} route: the editable graph differs from the model at batch {batch} "
                f"(relative max error {err / scale:.2e} > {REL_TOL:.0e})",
                code="conversion_failed",
            )


# --------------------------------------------------------------------------- control flow


# Ops whose result depends on a tensor's metadata, never on its values.
_META_OPS = {
    "aten::size", "aten::sym_size", "aten::dim", "aten::len", "aten::numel", "aten::stride",
    "aten::is_contiguous", "aten::is_floating_point", "aten::is_complex", "aten::get_device",
    "aten::element_size", "aten::__is__", "aten::__isnot__", "aten::is_grad_enabled",
    "aten::is_autocast_enabled", "aten::is_autocast_cpu_enabled",
    "prim::shape", "prim::dtype", "prim::device", "prim::layout", "prim::requires_grad",
    "prim::is_nested", "prim::is_cuda", "prim::is_cpu", "prim::is_sparse", "prim::is_sparse_csr",
    "prim::is_quantized", "prim::is_meta", "prim::is_mkldnn", "prim::is_xpu", "prim::is_mps",
    "prim::is_vulkan", "prim::is_ipu", "prim::is_maia", "prim::is_xla", "prim::is_lazy", "prim::name",
}  # fmt: skip


def check_control_flow(ts: torch.jit.ScriptModule) -> None:
    """Raise UnsupportedModelError(code="data_dependent_control_flow") if an ``if``
    or loop in the (inlined) TorchScript graph depends on input tensor values.

    Taint analysis: the inputs' values flow through every op except metadata
    queries (size, dim, dtype, ``is None``...). Constant propagation first folds
    branches on ``self.training`` and on optional arguments that are None, such
    as the masks in nn.TransformerEncoder's checks.
    """
    graph = ts.inlined_graph  # a copy: safe to optimise
    torch._C._jit_pass_constant_propagation(graph)
    torch._C._jit_pass_dce(graph)
    inputs = list(graph.inputs())[1:]  # [0] is self
    tainted: set[str] = {v.debugName() for v in inputs}

    def is_t(v: torch._C.Value) -> bool:
        return v.debugName() in tainted

    changed = True
    while changed:  # fixed point: loop-carried values feed back
        before = len(tainted)
        for node in _walk(graph.block()):
            kind = node.kind()
            if kind in _META_OPS:
                continue
            ins = list(node.inputs())
            if kind == "prim::Loop":
                carried_in, block = ins[2:], next(node.blocks())
                b_in, b_out = list(block.inputs())[1:], list(block.outputs())[1:]
                for i, v in enumerate(node.outputs()):
                    if is_t(carried_in[i]) or is_t(b_out[i]):
                        tainted.update({v.debugName(), b_in[i].debugName()})
                continue
            if kind == "prim::If":
                outs = [list(b.outputs()) for b in node.blocks()]
                for i, v in enumerate(node.outputs()):
                    if is_t(ins[0]) or any(is_t(o[i]) for o in outs):
                        tainted.add(v.debugName())
                continue
            if any(is_t(v) for v in ins):
                tainted.update(v.debugName() for v in node.outputs())
        changed = len(tainted) != before

    for node in _walk(graph.block()):
        if node.kind() == "prim::If":
            cond = node.inputsAt(0)
        elif node.kind() == "prim::Loop":
            block = next(node.blocks())
            conds = [node.inputsAt(0), node.inputsAt(1), next(block.outputs())]
            cond = next((c for c in conds if is_t(c)), conds[0])
        else:
            continue
        if is_t(cond):
            what = "an if" if node.kind() == "prim::If" else "a loop"
            raise UnsupportedModelError(
                f"the model has data-dependent control flow: {what} depends on input tensor values "
                f"({_where(cond.node(), node)}). Neither export route can follow it; rewrite it without "
                "branching on values (e.g. torch.where), or trace the model with torch.jit.trace on a "
                "representative input",
                code="data_dependent_control_flow",
            )


def _walk(block: torch._C.Block) -> Iterator[torch._C.Node]:
    for node in block.nodes():
        yield node
        for sub in node.blocks():
            yield from _walk(sub)


_FILE_LINE = re.compile(r'File "([^"]+)", line (\d+)')


def _where(*nodes: torch._C.Node) -> str:
    """'forward, zoo.py line 151: if x.sum() > 0:' from a node's source range."""
    for node in nodes:
        try:
            text = node.sourceRange()
        except Exception:
            continue
        original = text.split("\nSerialized", 1)[0]
        match = _FILE_LINE.search(original)
        if not match:
            continue
        lines = original.splitlines()
        code = ""
        method = ""
        for i, line in enumerate(lines):
            m = re.match(r"\s*def (\w+)\(", line)
            if m and not code:
                method = m.group(1)
            if set(line.strip()) <= set("~<-HERE ") and "~" in line and i > 0:
                code = lines[i - 1].split("#", 1)[0].strip()
                break
        place = f"{Path(match.group(1)).name} line {match.group(2)}"
        return ", ".join(s for s in (f"in {method}()" if method else "", place) if s) + (f": {code}" if code else "")
    return "location unknown"


# --------------------------------------------------------------------------- helpers


_getitem = operator.getitem


def _op_name(target: Any) -> str:
    """'dropout' for aten.dropout.default, '' for non-ops."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    return ""


def _rank(node: Any) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _owner(root: Any, qualname: str) -> tuple[Any, str]:
    *path, leaf = qualname.split(".")
    mod = root
    for p in path:
        mod = getattr(mod, p)
    return mod, leaf


def _get(root: Any, qualname: str) -> Any:
    owner, leaf = _owner(root, qualname)
    return getattr(owner, leaf)


def _set(root: nn.Module, qualname: str, value: Any) -> None:
    *path, leaf = qualname.split(".")
    mod = root
    for p in path:
        if not hasattr(mod, p):
            mod.add_module(p, nn.Module())
        mod = getattr(mod, p)
    if isinstance(value, nn.Parameter):
        mod.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        if leaf in mod._parameters:
            del mod._parameters[leaf]
        mod.register_buffer(leaf, value)
    else:
        if isinstance(value, nn.Module) and leaf in mod._modules:
            mod._modules[leaf] = value
        else:
            setattr(mod, leaf, value)


def _fresh_name(gm: nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _one_line(exc: BaseException) -> str:
    """The useful line of an exception, without TorchScript's stack dump."""
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # TorchScript errors end with "RuntimeError: <message>" after the traceback.
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception):", line):
            return line.split(":", 1)[1].strip()[:500]
    return lines[0][:500] if lines else type(exc).__name__
