"""Datasets for data-aware rank selection, fine-tuning and evaluation.

Two file formats, both read without unpickling anything:

* ``.npz`` (``numpy.savez``): an ``x`` array of inputs (batch first; ``x0``,
  ``x1``, ... for a model with several inputs) and an optional ``y`` array of
  integer class labels. uint8 images are scaled to [0, 1]; ``mean``/``std``
  then normalise per channel (axis 1).
* an image-folder zip: one folder per class holding PNG/JPEG files (an outer
  folder around them is fine). Class index = position of the folder name in
  sorted order. Images are decoded with Pillow, resized to ``image_size`` and
  normalised like uint8 arrays.

The format is told by the content, not the file name (stored files are named
by the server). Every problem raises ``TensorTrimError(code="bad_dataset")``
with a message that says what is wrong and how to fix it. The in-memory type is
``compression.ranks.base.Data``.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from compression.errors import TensorTrimError
from compression.input_spec import InputSpec, TensorSpec
from compression.ranks.base import Data

CODE = "bad_dataset"
GiB = 1024**3
MAX_ENTRIES = 200_000
MAX_UNCOMPRESSED = 4 * GiB
MAX_RATIO = 1000.0  # declared/compressed; savez_compressed of mostly-zero images stays far below
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_JUNK = ("__MACOSX/", ".DS_Store", "Thumbs.db", "desktop.ini")
NPZ_HINT = "save it with numpy.savez(path, x=inputs, y=labels)"
ZIP_HINT = "zip one folder per class holding PNG/JPEG images (e.g. cats/001.png, dogs/002.jpg)"

Stats = float | Sequence[float] | None


def _bad(message: str) -> TensorTrimError:
    return TensorTrimError(message, code=CODE)


# --------------------------------------------------------------------------- entry point


def load_dataset(
    path: str | Path,
    *,
    input_spec: InputSpec | str | None = None,
    image_size: int | tuple[int, int] | None = None,
    mean: Stats = None,
    std: Stats = None,
    labels: bool = True,
) -> Data:
    """Read ``path`` (``.npz`` or image-folder zip) into a checked ``Data``.

    ``labels=True`` requires class labels (``y`` / class folders) and checks them;
    ``labels=False`` reads inputs only (distillation data) and ignores any labels.
    ``input_spec`` (shape per sample, batch excluded) is checked when given;
    ``image_size`` (``(H, W)`` or one int) defaults to the spec's last two sizes.
    """
    path = Path(path)
    spec = InputSpec.parse(input_spec) if isinstance(input_spec, str) else input_spec
    if not path.is_file():
        raise _bad(f"dataset file {path.name} not found")
    if path.stat().st_size == 0:
        raise _bad(f"dataset file {path.name} is empty: upload it again")
    if not zipfile.is_zipfile(path):
        raise _bad(f"{path.name} is neither an .npz file nor a zip archive: {NPZ_HINT}, or {ZIP_HINT}")
    names = precheck_zip(path)
    files = [n for n in names if not n.endswith("/")]
    if files and all(n.endswith(".npy") for n in files):
        data = _read_npz(path, spec, mean, std, labels)
    else:
        data = _read_image_zip(path, names, spec, image_size, mean, std, labels)
    return check_data(data, spec, labels=labels, source=path.name)


def precheck_zip(
    path: str | Path,
    *,
    max_entries: int = MAX_ENTRIES,
    max_uncompressed: int = MAX_UNCOMPRESSED,
    max_ratio: float = MAX_RATIO,
) -> list[str]:
    """Cheap checks before reading a zip (entry count, declared size and ratio,
    no absolute or ``..`` names); returns the entry names."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _bad(f"{path.name} is a damaged zip archive ({exc}): create and upload it again") from None
    if not infos:
        raise _bad(f"{path.name} is an empty zip archive: {NPZ_HINT}, or {ZIP_HINT}")
    if len(infos) > max_entries:
        raise _bad(f"{path.name} has {len(infos)} entries (limit {max_entries}): use fewer images or an .npz file")
    total = sum(i.file_size for i in infos)
    if total > max_uncompressed:
        raise _bad(
            f"{path.name} declares {total / GiB:.2f} GiB uncompressed (limit {max_uncompressed / GiB:.2f} GiB): "
            "upload a smaller dataset"
        )
    packed = max(sum(i.compress_size for i in infos), 1)
    if total / packed > max_ratio:
        raise _bad(f"{path.name} expands {total / packed:.0f}x when unpacked (limit {max_ratio:.0f}x): not a dataset")
    for info in infos:
        name = info.filename
        p = PurePosixPath(name.replace("\\", "/"))
        if p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":"):
            raise _bad(f"{path.name} holds an unsafe entry name {name!r} (absolute or with '..'): zip relative paths")
    return [i.filename for i in infos]


# --------------------------------------------------------------------------- npz


def _read_npz(path: Path, spec: InputSpec | None, mean: Stats, std: Stats, labels: bool) -> Data:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise _bad(
                f"{path.name} holds object (pickled) arrays, which are not read for safety: store plain numeric "
                f"arrays; {NPZ_HINT}"
            ) from None
        raise _bad(f"{path.name} is not a readable .npz file ({exc}): {NPZ_HINT}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise _bad(f"{path.name} is not a readable .npz file ({exc}): {NPZ_HINT}") from None
    n_inputs = len(spec.inputs) if spec is not None else None
    keys = _input_keys(path.name, arrays, n_inputs)
    x = tuple(
        _to_input(f"{path.name}:{k}", arrays[k], spec.inputs[i] if spec else None, mean, std)
        for i, k in enumerate(keys)
    )
    y = None
    if labels:
        if "y" not in arrays:
            raise _bad(
                f"{path.name} has no 'y' array of labels (found: {', '.join(sorted(arrays))}): add integer class "
                "labels as y, or use the data without labels (distillation only)"
            )
        y = _to_labels(f"{path.name}:y", arrays["y"])
    return Data(x, y)


def _input_keys(name: str, arrays: dict[str, np.ndarray], n_inputs: int | None) -> list[str]:
    found = ", ".join(sorted(arrays)) or "none"
    if "x" in arrays:
        if n_inputs not in (None, 1):
            raise _bad(f"{name}: the model takes {n_inputs} inputs; store them as x0 ... x{n_inputs - 1}, not one x")
        return ["x"]
    numbered = sorted((k for k in arrays if k[:1] == "x" and k[1:].isdigit()), key=lambda k: int(k[1:]))
    if not numbered:
        raise _bad(f"{name} has no 'x' array of inputs (found: {found}): {NPZ_HINT}")
    want = [f"x{i}" for i in range(n_inputs if n_inputs is not None else len(numbered))]
    if numbered != want:
        raise _bad(f"{name}: input arrays must be named {', '.join(want)} (found: {found})")
    return want


def _to_input(name: str, arr: np.ndarray, ts: TensorSpec | None, mean: Stats, std: Stats) -> torch.Tensor:
    if arr.ndim < 1 or arr.shape[0] == 0:
        raise _bad(f"{name} holds no samples (shape {arr.shape}): the first axis must count the samples")
    want_int = ts is not None and not ts.is_float
    if want_int:
        if arr.dtype.kind not in "iu":
            raise _bad(f"{name} must hold integers ({ts.dtype} inputs such as token ids), not {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr).astype(np.int64))
        return _fit_shape(name, t, ts).to(ts.dtype)
    if arr.dtype.kind not in "fiu":
        raise _bad(f"{name} has dtype {arr.dtype}: store numbers (float32 or uint8 images)")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).reshape(arr.shape[0], -1).any(1).sum())
        raise _bad(f"{name} contains NaN or infinite values in {bad} sample(s): clean or drop those samples")
    t = torch.from_numpy(np.ascontiguousarray(arr))
    t = t.float() / 255.0 if arr.dtype == np.uint8 else t.float()
    t = _fit_shape(name, t, ts)
    return normalise(t, mean, std, name)


def _fit_shape(name: str, t: torch.Tensor, ts: TensorSpec | None) -> torch.Tensor:
    """Check per-sample shape vs the spec; accept channels-last images and a
    missing single channel axis, converting them to the spec's layout."""
    if ts is None:
        return t
    want, got = tuple(ts.shape), tuple(t.shape[1:])
    if got == want:
        return t
    if len(want) == 3 and got == (want[1], want[2], want[0]):  # N,H,W,C -> N,C,H,W
        return t.permute(0, 3, 1, 2).contiguous()
    if len(want) == len(got) + 1 and want[0] == 1 and got == want[1:]:  # N,H,W -> N,1,H,W
        return t.unsqueeze(1)
    shown = ",".join(str(d) for d in want)
    raise _bad(
        f"{name} has per-sample shape {got} (array shape {tuple(t.shape)}) but the model input spec is ({shown}): "
        f"store an array of shape (N, {shown})"
    )


def normalise(t: torch.Tensor, mean: Stats, std: Stats, name: str = "x") -> torch.Tensor:
    """``(t - mean) / std`` with per-channel (axis 1) or scalar statistics."""
    if mean is None and std is None:
        return t
    channels = t.shape[1] if t.dim() > 1 else 1

    def stat(v: Stats, what: str, default: float) -> torch.Tensor:
        if v is None:
            v = default
        vals = torch.as_tensor([v] if isinstance(v, (int, float)) else list(v), dtype=torch.float32)
        if vals.numel() not in (1, channels):
            raise _bad(f"{what} has {vals.numel()} values but {name} has {channels} channels: give 1 or {channels}")
        return vals.reshape(1, -1, *([1] * (t.dim() - 2))) if vals.numel() > 1 else vals

    m, s = stat(mean, "mean", 0.0), stat(std, "std", 1.0)
    if (s <= 0).any():
        raise _bad("std values must be positive")
    return (t - m) / s


def _to_labels(name: str, arr: np.ndarray) -> torch.Tensor:
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        hint = " (one-hot? store the class index: y.argmax(1))" if arr.ndim == 2 else ""
        raise _bad(f"{name} has shape {arr.shape}: labels must be one class index per sample, shape (N,){hint}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise _bad(f"{name} contains NaN or infinite labels: every sample needs a class index")
        if not (arr == np.round(arr)).all():
            i = int(np.flatnonzero(arr != np.round(arr))[0])
            raise _bad(
                f"{name} holds non-integer labels (e.g. {arr[i].item()!r} at index {i}): store class indices 0..C-1"
            )
    elif arr.dtype.kind not in "iub":
        raise _bad(f"{name} has dtype {arr.dtype}: labels must be integer class indices 0..C-1")
    y = torch.from_numpy(np.ascontiguousarray(arr).astype(np.int64))
    if y.numel() and int(y.min()) < 0:
        raise _bad(f"{name} holds negative labels (min {int(y.min())}): store class indices 0..C-1")
    return y


# --------------------------------------------------------------------------- image-folder zip


def _read_image_zip(
    path: Path,
    names: list[str],
    spec: InputSpec | None,
    image_size: int | tuple[int, int] | None,
    mean: Stats,
    std: Stats,
    labels: bool,
) -> Data:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a declared dependency
        raise _bad("reading image-folder zips needs Pillow (pip install pillow); or upload an .npz file") from None
    files = [n for n in names if not n.endswith("/") and not any(j in n for j in _JUNK)]
    files = [n for n in files if not PurePosixPath(n).name.startswith(".")]
    others = [n for n in files if not n.lower().endswith(IMAGE_SUFFIXES)]
    if others:
        raise _bad(f"{path.name} holds {others[0]!r}, which is not a PNG or JPEG image: {ZIP_HINT}")
    if not files:
        raise _bad(f"{path.name} holds no PNG/JPEG images: {ZIP_HINT}")
    parts = [PurePosixPath(n).parts for n in files]
    # Strip outer folders shared by every file (e.g. "digits/0/a.png").
    while all(len(p) > 2 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    if labels:
        deep = [files[i] for i, p in enumerate(parts) if len(p) != 2]
        if deep:
            raise _bad(
                f"{path.name}: {deep[0]!r} is not directly inside a class folder: {ZIP_HINT}"
            )
        classes = sorted({p[0] for p in parts})
        if len(classes) < 2:
            raise _bad(f"{path.name} has only one class folder ({classes[0]!r}): {ZIP_HINT}")
        index = {c: i for i, c in enumerate(classes)}
    order = sorted(range(len(files)), key=lambda i: parts[i])
    channels, size = _image_geometry(spec, image_size)
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    images: list[np.ndarray] = []
    targets: list[int] = []
    with zipfile.ZipFile(path) as zf:
        for i in order:
            arr = _decode(Image, zf, files[i], channels, size, path.name)
            if images and arr.shape != images[0].shape:  # no size given: all must agree
                raise _bad(
                    f"{path.name}: image {files[i]!r} is {arr.shape[1]}x{arr.shape[0]} but "
                    f"{files[order[0]]!r} is {images[0].shape[1]}x{images[0].shape[0]}: pass image_size (or an "
                    "input spec) to resize them all"
                )
            if channels is None:
                channels = arr.shape[2]
            images.append(arr)
            if labels:
                targets.append(index[parts[i][0]])
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    x = normalise(x.contiguous(), mean, std, path.name)
    return Data((x,), torch.tensor(targets, dtype=torch.int64) if labels else None)


def _image_geometry(
    spec: InputSpec | None, image_size: int | tuple[int, int] | None
) -> tuple[int | None, tuple[int, int] | None]:
    channels = None
    if spec is not None:
        shape = spec.inputs[0].shape
        if len(spec.inputs) != 1 or len(shape) != 3 or shape[0] not in (1, 3):
            raise _bad(
                f"an image-folder zip feeds one (C,H,W) image input with 1 or 3 channels, but the input spec is "
                f"'{spec.to_string()}': upload an .npz file instead"
            )
        channels = shape[0]
        if image_size is None:
            image_size = (shape[1], shape[2])
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if image_size is not None:
        image_size = (int(image_size[0]), int(image_size[1]))
        if spec is not None and image_size != tuple(spec.inputs[0].shape[1:]):
            raise _bad(f"image_size {image_size} differs from the input spec's {tuple(spec.inputs[0].shape[1:])}")
        if min(image_size) < 1:
            raise _bad(f"image_size {image_size} must be positive")
    return channels, image_size


def _decode(image_mod, zf: zipfile.ZipFile, name: str, channels: int | None, size: tuple[int, int] | None,
            archive: str) -> np.ndarray:
    """One image as uint8 (H, W, C), converted to ``channels`` and resized to ``size`` (H, W)."""
    try:
        with image_mod.open(io.BytesIO(zf.read(name))) as img:
            img.load()
            if channels is None:
                channels = 1 if img.mode in ("1", "L", "I", "I;16", "F") else 3
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), image_mod.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except image_mod.DecompressionBombError:
        raise _bad(f"{archive}: image {name!r} is too large (over {MAX_IMAGE_PIXELS} pixels)") from None
    except (OSError, ValueError, SyntaxError, zipfile.BadZipFile) as exc:
        raise _bad(f"{archive}: image {name!r} cannot be decoded ({exc}): re-save it as PNG or JPEG") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


# --------------------------------------------------------------------------- checks and splits


def check_data(data: Data, spec: InputSpec | None = None, *, labels: bool = False, source: str = "dataset") -> Data:
    """Validate an in-memory ``Data`` (shapes vs ``spec``, equal sample counts,
    finite inputs, integer labels); returns it unchanged."""
    if not data.x:
        raise _bad(f"{source} has no inputs")
    n = int(data.x[0].shape[0]) if data.x[0].dim() else 0
    if n == 0:
        raise _bad(f"{source} holds no samples")
    if spec is not None and len(spec.inputs) != len(data.x):
        raise _bad(f"{source} has {len(data.x)} input array(s) but the model takes {len(spec.inputs)}")
    for i, t in enumerate(data.x):
        what = f"{source} input {i}" if len(data.x) > 1 else f"{source} inputs"
        if t.dim() < 1 or t.shape[0] != n:
            raise _bad(f"{what} has {t.shape[0] if t.dim() else 0} samples but input 0 has {n}: counts must match")
        if spec is not None and tuple(t.shape[1:]) != tuple(spec.inputs[i].shape):
            shown = ",".join(str(d) for d in spec.inputs[i].shape)
            raise _bad(f"{what} have per-sample shape {tuple(t.shape[1:])} but the input spec is ({shown})")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise _bad(f"{what} contain NaN or infinite values: clean or drop those samples")
    if labels and data.y is None:
        raise _bad(f"{source} has no labels: add class labels, or use it without labels (distillation only)")
    if data.y is not None:
        y = data.y
        if y.dim() != 1:
            raise _bad(f"{source} labels have shape {tuple(y.shape)}: one class index per sample, shape (N,)")
        if len(y) != n:
            raise _bad(f"{source} has {n} inputs but {len(y)} labels: give exactly one label per sample")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise _bad(f"{source} labels have dtype {y.dtype}: use integer class indices 0..C-1")
        if len(y) and int(y.min()) < 0:
            raise _bad(f"{source} holds negative labels (min {int(y.min())}): use class indices 0..C-1")
    return data


def train_val_split(data: Data, val_fraction: float = 0.1, seed: int = 0) -> tuple[Data, Data | None]:
    """Deterministic split (same seed, same split); stratified by class when
    labelled, so every class is in both parts when it has >= 2 samples.
    ``val_fraction == 0`` gives ``(data, None)``."""
    if not 0 <= val_fraction < 1:
        raise _bad(f"validation fraction {val_fraction} must be in [0, 1)")
    n = len(data)
    if val_fraction == 0:
        return data, None
    if n < 2:
        raise _bad(f"cannot split {n} sample(s) into training and validation parts: give at least 2")
    g = torch.Generator().manual_seed(seed)
    if data.y is None:
        perm = torch.randperm(n, generator=g)
        k = min(max(1, round(n * val_fraction)), n - 1)
        val_idx, train_idx = perm[:k], perm[k:]
    else:
        val_parts, train_parts = [], []
        for c in torch.unique(data.y):
            idx = torch.nonzero(data.y == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            k = round(len(idx) * val_fraction) if len(idx) > 1 else 0
            val_parts.append(idx[:k])
            train_parts.append(idx[k:])
        val_idx, train_idx = torch.cat(val_parts), torch.cat(train_parts)
        if len(val_idx) == 0:  # tiny data: take one sample anyway
            val_idx, train_idx = train_idx[:1], train_idx[1:]
        val_idx, train_idx = val_idx.sort().values, train_idx.sort().values
    return subset(data, train_idx), subset(data, val_idx)


def subset(data: Data, idx: torch.Tensor) -> Data:
    return Data(tuple(t[idx] for t in data.x), None if data.y is None else data.y[idx])


def save_npz(path: str | Path, data: Data) -> None:
    """Write ``data`` in the format ``load_dataset`` reads (handy for tests and CLIs)."""
    arrays = {"x": data.x[0].numpy()} if len(data.x) == 1 else {f"x{i}": t.numpy() for i, t in enumerate(data.x)}
    if data.y is not None:
        arrays["y"] = data.y.numpy()
    with Path(path).open("wb") as f:  # a file object: numpy adds no ".npz" suffix
        np.savez(f, **arrays)
