"""Cheap validation of an uploaded data set, run as a child process.

``python -m app.services.dataset_probe PATH [--format npz|image_folder]`` prints one
JSON object: the format, the number of samples and the arrays (npz: name, shape,
dtype, read from the ``.npy`` headers only, never unpickled) or the classes (an
image-folder zip: ``class/xxx.png``, optionally under one root folder). On a bad
file it prints ``{"error": {"code": ..., "message": ...}}`` and exits 2.

Imports only the standard library, numpy and Pillow: no service code, no secrets.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import PurePosixPath
from typing import Any

import numpy as np

MAX_ENTRIES = 200_000
MAX_UNCOMPRESSED = 64 << 30
MAX_RATIO = 200.0
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
FORMATS = ("npz", "image_folder")


class BadDataset(Exception):
    def __init__(self, message: str, code: str = "bad_dataset") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def probe(path: str, fmt: str | None = None) -> dict[str, Any]:
    if not zipfile.is_zipfile(path):
        raise BadDataset(
            "not a zip archive: upload an .npz (numpy.savez) or a zip of images in one folder per class"
        )
    with zipfile.ZipFile(path) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        _check_zip(infos, path)
        is_npz = bool(infos) and all(i.filename.endswith(".npy") for i in infos)
        fmt = fmt or ("npz" if is_npz else "image_folder")
        if fmt == "npz":
            if not is_npz:
                raise BadDataset("an .npz holds only .npy arrays; this zip holds other files")
            result = _probe_npz(zf, infos)
        else:
            result = _probe_images(zf, infos)
        bad = zf.testzip()
        if bad is not None:
            raise BadDataset(f"entry {bad!r} fails its CRC check: the upload is damaged, upload it again")
    return result


def _check_zip(infos: list[zipfile.ZipInfo], path: str) -> None:
    if not infos:
        raise BadDataset("the archive is empty")
    if len(infos) > MAX_ENTRIES:
        raise BadDataset(f"the archive has {len(infos)} files (limit {MAX_ENTRIES})")
    total = sum(i.file_size for i in infos)
    compressed = max(sum(i.compress_size for i in infos), 1)
    if total > MAX_UNCOMPRESSED or total > MAX_RATIO * compressed:
        raise BadDataset(f"the archive unpacks to {total} bytes ({total / compressed:.0f}x its size): too large")
    for i in infos:
        parts = PurePosixPath(i.filename).parts
        if i.filename.startswith("/") or "\\" in i.filename or ".." in parts:
            raise BadDataset(f"entry {i.filename!r} points outside the archive")


def _probe_npz(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> dict[str, Any]:
    arrays: dict[str, dict[str, Any]] = {}
    for info in infos:
        name = info.filename.removesuffix(".npy")
        with zf.open(info) as f:
            try:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            except ValueError as exc:
                raise BadDataset(f"array {name!r} is not a valid .npy record ({exc})") from None
        if dtype.hasobject:
            raise BadDataset(
                f"array {name!r} holds Python objects (dtype {dtype}), which need pickle: save numeric arrays only"
            )
        if not shape:
            raise BadDataset(f"array {name!r} is a scalar: every array needs the sample dimension first")
        arrays[name] = {"shape": list(shape), "dtype": str(dtype)}
    counts = {a["shape"][0] for a in arrays.values()}
    if len(counts) != 1:
        sizes = ", ".join(f"{k}: {v['shape'][0]}" for k, v in arrays.items())
        raise BadDataset(f"arrays disagree on the number of samples (first dimension): {sizes}")
    return {"format": "npz", "num_samples": counts.pop(), "arrays": arrays}


def _probe_images(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> dict[str, Any]:
    images = [i for i in infos if i.filename.lower().endswith(IMAGE_EXTS) and not _hidden(i.filename)]
    if not images:
        raise BadDataset(
            f"no images found (extensions {', '.join(IMAGE_EXTS)}): zip a folder with one sub-folder per class"
        )
    paths = [PurePosixPath(i.filename).parts for i in images]
    # Allow one wrapping folder: root/class/img.png
    if all(len(p) >= 3 for p in paths) and len({p[0] for p in paths}) == 1:
        paths = [p[1:] for p in paths]
    if any(len(p) != 2 for p in paths):
        raise BadDataset("images must sit in one folder per class, e.g. cats/001.png, dogs/002.png")
    classes = sorted({p[0] for p in paths})
    sample_size = _first_image_size(zf, images[0])
    return {"format": "image_folder", "num_samples": len(images), "classes": classes, "sample_size": sample_size}


def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(name).parts)


def _first_image_size(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> list[int] | None:
    try:
        from PIL import Image
    except ImportError:
        return None
    try:
        with zf.open(info) as f, Image.open(f) as img:  # reads the header only
            return [img.width, img.height]
    except Exception:  # noqa: BLE001
        raise BadDataset(f"{info.filename!r} is not a readable image") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dataset_probe")
    parser.add_argument("path")
    parser.add_argument("--format", choices=FORMATS)
    args = parser.parse_args(argv)
    try:
        result = probe(args.path, args.format)
    except BadDataset as exc:
        print(json.dumps({"error": {"code": exc.code, "message": exc.message}}))
        return 2
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        print(json.dumps({"error": {"code": "bad_dataset", "message": f"damaged archive: {exc}"}}))
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
