"""What the model takes as input.

TorchScript does not record input shapes, so every job names them. A spec lists
one entry per positional input, without the batch dimension:
``"3,32,32"`` (one float32 image), ``"16:int64@1000"`` (token ids below 1000),
``"3,32,32;10"`` (two inputs). An example tensor file (``.npz`` or a
``torch.save`` of tensors, loaded with ``weights_only=True``) works too; its
first dimension is the batch.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from compression.errors import InputSpecError

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
}
_MAX_ELEMENTS = 64 * 1024 * 1024  # per sample; larger specs are almost surely typos


@dataclass(frozen=True)
class TensorSpec:
    """One positional input: shape without batch, dtype, and for integer inputs
    the exclusive upper bound of values drawn for examples (e.g. a vocabulary)."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    high: int = 2

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point

    def to_string(self) -> str:
        s = ",".join(str(d) for d in self.shape)
        if self.dtype != torch.float32:
            s += ":" + str(self.dtype).removeprefix("torch.")
            if not self.is_float:
                s += f"@{self.high}"
        return s


@dataclass(frozen=True)
class InputSpec:
    inputs: tuple[TensorSpec, ...]
    example_file: str | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, text: str) -> InputSpec:
        """Parse ``"3,32,32"`` / ``"16:int64@1000"`` / ``"3,32,32;10"``."""
        if not text or not text.strip():
            raise InputSpecError("input spec is empty: give the shape of one sample, e.g. '3,224,224'")
        specs = []
        for part in text.split(";"):
            part = part.strip().replace("x", ",")
            shape_s, _, rest = part.partition(":")
            dtype_s, _, high_s = rest.partition("@")
            try:
                shape = tuple(int(d) for d in shape_s.split(",") if d.strip() != "")
            except ValueError:
                raise InputSpecError(
                    f"cannot read input shape {shape_s!r}: use comma-separated positive integers "
                    "without the batch dimension, e.g. '3,224,224'"
                ) from None
            dtype = torch.float32
            if dtype_s:
                if dtype_s not in _DTYPES:
                    raise InputSpecError(f"unknown dtype {dtype_s!r}: use one of {', '.join(sorted(_DTYPES))}")
                dtype = _DTYPES[dtype_s]
            high = 2
            if high_s:
                if not high_s.isdigit() or int(high_s) < 1:
                    raise InputSpecError(f"value bound {high_s!r} must be a positive integer, e.g. 'int64@1000'")
                high = int(high_s)
            specs.append(_checked(TensorSpec(shape, dtype, high)))
        return cls(tuple(specs))

    @classmethod
    def from_file(cls, path: str | Path) -> InputSpec:
        """Read example inputs from ``.npz`` (arrays in order of their names) or a
        ``torch.save`` file of a tensor / tuple of tensors (weights_only)."""
        tensors = load_example_tensors(path)
        specs = []
        for t in tensors:
            if t.dim() < 1:
                raise InputSpecError("example tensors need a batch dimension first")
            high = int(t.max().item()) + 1 if not t.dtype.is_floating_point and t.numel() else 2
            specs.append(_checked(TensorSpec(tuple(t.shape[1:]), t.dtype, max(high, 1))))
        return cls(tuple(specs), example_file=str(path))

    def to_string(self) -> str:
        return ";".join(s.to_string() for s in self.inputs)

    @property
    def example_batch(self) -> int:
        """A batch size >= 2 that equals no other dimension, so the tracer cannot
        confuse the batch with another axis when it decides what is symbolic.
        Fixed-shape graphs (the export route) run only at this batch."""
        dims = {d for s in self.inputs for d in s.shape}
        b = 5
        while b in dims:
            b += 1
        return b

    def example(self, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random inputs for ``batch`` samples (deterministic for a seed)."""
        g = torch.Generator().manual_seed(seed)
        out = []
        for s in self.inputs:
            shape = (batch, *s.shape)
            if s.is_float:
                out.append(torch.randn(shape, generator=g, dtype=torch.float32).to(s.dtype))
            else:
                out.append(torch.randint(0, s.high, shape, generator=g, dtype=s.dtype))
        return tuple(out)


def _checked(spec: TensorSpec) -> TensorSpec:
    if not spec.shape or any(d <= 0 for d in spec.shape):
        raise InputSpecError(
            f"input shape {spec.shape} must list positive sizes without the batch dimension, e.g. '3,224,224'"
        )
    if int(np.prod(spec.shape)) > _MAX_ELEMENTS:
        raise InputSpecError(f"input shape {spec.shape} is too large (over {_MAX_ELEMENTS} elements per sample)")
    return spec


def load_example_tensors(path: str | Path) -> tuple[torch.Tensor, ...]:
    path = Path(path)
    try:
        if zipfile.is_zipfile(path) and path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return tuple(torch.from_numpy(data[k]) for k in sorted(data.files))
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # any parse failure is the user's file, not our bug
        raise InputSpecError(
            f"cannot read example inputs from {path.name}: {exc}. Use .npz or torch.save of a tensor/tuple"
        ) from None
    if isinstance(obj, torch.Tensor):
        return (obj,)
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        return tuple(obj)
    raise InputSpecError(f"{path.name} must hold a tensor or a tuple of tensors")
