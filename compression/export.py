"""Hand-back: write the compressed GraphModule as TorchScript and as ``.pt2``.

Every file is loaded back and compared with the in-memory model before it is
handed over; a file that fails the check never appears under its final name.
"""

from __future__ import annotations

import copy
import hashlib
import keyword
import math
import os
import re
import secrets
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from compression.errors import ExportError
from compression.model_io import drop_example_guards

CHECK_BATCHES = (1, 2, 7)  # 1 and an odd size catch most baked-in batch shapes
_FIXED_METHODS = ("trace", "export-static")


@dataclass(frozen=True)
class ExportCheck:
    """What was written and how well the reloaded file matched the model."""

    path: str
    kind: str  # "torchscript" | "pt2"
    method: str  # "script" | "trace" | "export-dynamic" | "export-static"
    batch_sizes_checked: tuple[int, ...]
    max_rel_error: float
    size_bytes: int
    sha256: str
    # True when the file only promises to run at the example's shapes: traced,
    # exported static, or the model itself rejects other batch sizes.
    fixed_shapes: bool = False
    note: str = ""  # why a fallback was taken or shapes are fixed; empty if neither


def export_torchscript(
    gm: torch.fx.GraphModule,
    path: str | Path,
    example_inputs: Sequence[Any],
    *,
    rtol: float = 1e-4,
) -> ExportCheck:
    """Write ``gm`` as a TorchScript file: scripted (shapes stay free) when the
    graph allows it, else traced (shapes may be fixed to the example)."""
    example = tuple(example_inputs)
    ref = _prepared_copy(gm)
    note = ""
    try:
        with warnings.catch_warnings():
            # Raised for every GraphModule (its own __init__ annotations); harmless.
            warnings.filterwarnings("ignore", message="The TorchScript type system doesn't support")
            module: torch.jit.ScriptModule = torch.jit.script(_scriptable(ref))
        method = "script"
    except Exception as exc:  # any scripting failure means: trace
        note = f"torch.jit.script failed ({_first_line(exc)}); traced instead"
        method = "trace"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                module = torch.jit.trace(_prepared_copy(gm), example, check_trace=False, strict=False)
        except Exception as exc2:
            raise ExportError(
                f"TorchScript export failed: script: {_first_line(exc)}; trace: {_first_line(exc2)}"
            ) from exc2
    return _write_checked(
        path,
        "torchscript",
        method,
        note,
        save=lambda p: torch.jit.save(module, p),
        load=lambda p: torch.jit.load(p, map_location="cpu"),
        reference=ref,
        example=example,
        rtol=rtol,
    )


def export_pt2(
    gm: torch.fx.GraphModule,
    path: str | Path,
    example_inputs: Sequence[Any],
    *,
    rtol: float = 1e-4,
) -> ExportCheck:
    """Write ``gm`` as an ExportedProgram (``.pt2``) with a free batch dimension
    where export can keep one, else with every shape fixed to the example."""
    example = tuple(example_inputs)
    ref = _prepared_copy(gm)
    note = ""
    dynamic = tuple(
        {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in example
    )
    try:
        ep = torch.export.export(_prepared_copy(gm), example, dynamic_shapes=dynamic)
        method = "export-dynamic"
        if not _batch_is_symbolic(ep):
            # Dim.AUTO quietly specialises when the graph pins the batch size.
            method = "export-static"
            note = "export kept no symbolic batch dimension"
    except Exception as exc:  # any dynamic failure means: try static
        note = f"dynamic export failed ({_first_line(exc)}); exported static shapes"
        method = "export-static"
        try:
            ep = torch.export.export(_prepared_copy(gm), example)
        except Exception as exc2:
            raise ExportError(f".pt2 export failed: dynamic: {_first_line(exc)}; static: {_first_line(exc2)}") from exc2
    # Export re-derives asserts from the example (e.g. batch*heads >= 8) that
    # would reject other batch sizes; the numeric check below guards the result.
    drop_example_guards(ep.graph_module)
    ep.graph_module.recompile()
    return _write_checked(
        path,
        "pt2",
        method,
        note,
        save=lambda p: torch.export.save(ep, p),
        load=lambda p: torch.export.load(p).module(),
        reference=ref,
        example=example,
        rtol=rtol,
    )


# --- preparing the graph -----------------------------------------------------


def _prepared_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Deep copy in eval mode, without the converter's shape guard call (it
    pins the example's batch size; a no-op when the caller already dropped it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation
        out = copy.deepcopy(gm)
    # Not out.eval(): ExportedProgram.module() overrides eval/train to raise.
    nn.Module.train(out, False)
    drop_example_guards(out)
    out.graph.lint()
    out.recompile()
    return out


def _scriptable(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rebuild ``gm`` in the form ``torch.jit.script`` accepts: attributes and
    submodules under plain identifiers, ops as overload packets (script picks
    the overload itself), and plain codegen instead of pytree flattening."""
    root = nn.Module()
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    flat: dict[str, str] = {}
    taken = set(dir(torch.fx.GraphModule)) | set(vars(nn.Module()))  # e.g. "training"

    def flat_name(target: str) -> str:
        if target not in flat:
            base = re.sub(r"\W", "_", target)
            if not base or base[0].isdigit() or keyword.iskeyword(base):
                base = "_" + base
            name, i = base, 1
            while name in taken:
                name, i = f"{base}_{i}", i + 1
            taken.add(name)
            flat[target] = name
        return flat[target]

    for node in gm.graph.nodes:
        if node.op == "output":
            outs = node.args[0]
            new_out = torch.fx.node.map_arg(outs, lambda n: env[n])
            info = getattr(gm.graph._codegen, "pytree_info", None)
            if info is not None and info.out_spec is not None:
                # The pytree codegen returns a flat tuple and restores the
                # caller's structure itself; bake that structure in instead.
                new_out = pytree.tree_unflatten(list(new_out), info.out_spec)
            graph.output(new_out)
            continue
        new = graph.node_copy(node, lambda n: env[n])
        if node.op == "get_attr":
            new.target = flat_name(node.target)
            if not hasattr(root, new.target):
                value = _fetch(gm, node.target)
                if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                    root.register_buffer(new.target, value)
                else:
                    setattr(root, new.target, value)
        elif node.op == "call_module":
            new.target = flat_name(node.target)
            if not hasattr(root, new.target):
                root.add_module(new.target, gm.get_submodule(node.target))
        elif node.target is torch.ops.aten._local_scalar_dense.default and _is_integral(node.args[0]):
            # Script types _local_scalar_dense as `number`, which view/reshape
            # refuse; int(tensor) is the same value typed as int.
            new.target = int
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            new.target = node.target.overloadpacket
        env[node] = new
    out = torch.fx.GraphModule(root, graph)
    return out.eval()


def _is_integral(node: Any) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    dtype = getattr(val, "dtype", None) or getattr(meta, "dtype", None)
    return dtype is not None and not dtype.is_floating_point and not dtype.is_complex


def _fetch(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _batch_is_symbolic(ep: torch.export.ExportedProgram) -> bool:
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in ep.graph_signature.user_inputs:
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() > 0:
            # A SymInt can still be a constant once export specialised it.
            return not is_concrete_int(val.shape[0])
    return False


# --- writing and checking ----------------------------------------------------


def _write_checked(
    path: str | Path,
    kind: str,
    method: str,
    note: str,
    *,
    save: Callable[[str], None],
    load: Callable[[str], Callable[..., Any]],
    reference: Callable[..., Any],
    example: tuple[Any, ...],
    rtol: float,
) -> ExportCheck:
    """Save under a temporary name in the target folder, load it back, compare,
    and only then rename: a failed check leaves nothing behind."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Same folder so the final rename is atomic; the saver creates the file
    # itself so it gets ordinary permissions.
    tmp = final.with_name(f".{final.stem}.{secrets.token_hex(6)}.tmp{final.suffix}")
    tmp_name = str(tmp)
    try:
        try:
            save(tmp_name)
            loaded = load(tmp_name)
        except Exception as exc:
            raise ExportError(f"{kind} file could not be saved and loaded back: {_first_line(exc)}") from exc
        batches = _batches_to_check(method, example)
        checked, err = _compare(loaded, reference, example, batches, rtol, kind)
        fixed = method in _FIXED_METHODS or len(checked) < len(batches)
        if len(checked) < len(batches):
            note = _join(note, f"the model itself only runs at batch sizes {checked}")
        size, digest = _size_and_sha256(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportCheck(
        path=str(final),
        kind=kind,
        method=method,
        batch_sizes_checked=checked,
        max_rel_error=err,
        size_bytes=size,
        sha256=digest,
        fixed_shapes=fixed,
        note=note,
    )


def _batches_to_check(method: str, example: tuple[Any, ...]) -> tuple[int, ...]:
    own = _example_batch(example)
    if method in _FIXED_METHODS or own is None:
        return (own,) if own is not None else (0,)
    return tuple(sorted({*CHECK_BATCHES, own}))


def _example_batch(example: tuple[Any, ...]) -> int | None:
    for x in example:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return int(x.shape[0])
    return None


def _compare(
    loaded: Callable[..., Any],
    reference: Callable[..., Any],
    example: tuple[Any, ...],
    batches: tuple[int, ...],
    rtol: float,
    kind: str,
) -> tuple[tuple[int, ...], float]:
    own = _example_batch(example)
    checked: list[int] = []
    worst = 0.0
    for b in batches:
        inputs = example if b in (own, 0) else _resized(example, b, seed=b)
        with torch.no_grad():
            try:
                want = reference(*inputs)
            except Exception as exc:
                if b == own or b == 0:
                    raise ExportError(f"the model itself fails on the example inputs: {_first_line(exc)}") from exc
                continue  # the model itself pins this size: nothing to compare
            try:
                got = loaded(*inputs)
            except Exception as exc:
                raise ExportError(f"the exported {kind} file fails at batch size {b}: {_first_line(exc)}") from exc
        err = _max_rel_error(got, want, kind, b)
        if not err <= rtol:  # also catches NaN
            raise ExportError(
                f"the exported {kind} file differs from the model at batch size {b}: "
                f"relative max error {err:.3g} > {rtol:g}"
            )
        worst = max(worst, err)
        checked.append(b)
    return tuple(checked), worst


def _resized(example: tuple[Any, ...], batch: int, seed: int) -> tuple[Any, ...]:
    """Fresh inputs like the example but with another batch size; values drawn
    in the example's range (token ids stay valid ids)."""
    gen = torch.Generator().manual_seed(seed)
    out: list[Any] = []
    for x in example:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            out.append(x)
            continue
        shape = (batch, *x.shape[1:])
        if x.dtype.is_floating_point:
            std = float(x.float().std()) if x.numel() > 1 else 1.0
            mean = float(x.float().mean())
            new = torch.randn(shape, generator=gen) * (std or 1.0) + mean
        elif x.dtype == torch.bool:
            new = torch.rand(shape, generator=gen) < 0.5
        else:
            lo, hi = int(x.min()), int(x.max())
            new = torch.randint(lo, hi + 1, shape, generator=gen)
        out.append(new.to(x.dtype))
    return tuple(out)


def _max_rel_error(got: Any, want: Any, kind: str, batch: int) -> float:
    got_leaves = pytree.tree_leaves(got)
    want_leaves = pytree.tree_leaves(want)
    if len(got_leaves) != len(want_leaves):
        raise ExportError(
            f"the exported {kind} file returns {len(got_leaves)} outputs, "
            f"the model {len(want_leaves)} (batch size {batch})"
        )
    worst = 0.0
    for a, b in zip(got_leaves, want_leaves, strict=True):
        if not isinstance(b, torch.Tensor):
            if a != b:
                return float("inf")
            continue
        if not isinstance(a, torch.Tensor) or a.shape != b.shape:
            return float("inf")
        if b.numel() == 0:
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        both_nan = a64.isnan() & b64.isnan()
        diff = float(torch.where(both_nan, 0.0, a64 - b64).abs().max())
        scale = max(float(torch.where(both_nan, 0.0, b64).abs().max()), 1e-12)
        rel = diff / scale
        if math.isnan(rel):
            return float("inf")
        worst = max(worst, rel)
    return worst


def _size_and_sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return path.stat().st_size, h.hexdigest()


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
