"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``.

``apt-get install -y dataset-fashion-mnist`` puts the four standard idx files
(gzip) in ``/usr/share/datasets/fashion-mnist/``: 60,000 training and 10,000
test images of 28x28 uint8, 10 balanced classes. Image files have a 16-byte
header, label files an 8-byte one.

``load(split)`` returns ``(x, y)``: float32 images ``(N, 1, 28, 28)``
normalised with the training set's mean and std, int64 labels ``(N,)``.
``balanced_subset`` picks the first ``n // 10`` samples of every class (a
deterministic, class-balanced subset).
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np
import torch

ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MEAN, STD = 0.2860, 0.3530  # of the 60k training images, in [0, 1]
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")


def available(root: Path = ROOT) -> bool:
    return all((root / f).is_file() for pair in FILES.values() for f in pair)


def _read(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    return np.frombuffer(raw, dtype=np.uint8, offset=header)


@functools.cache
def load(split: str = "train", root: Path = ROOT) -> tuple[torch.Tensor, torch.Tensor]:
    """All images and labels of ``split`` ('train' or 'test'). Cached: a benchmark takes
    several subsets of one split, and decompressing it is the slow part. The tensors are
    shared between callers: index them, do not modify them in place."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not available(root):
        raise FileNotFoundError(f"Fashion-MNIST not found in {root}: apt-get install -y dataset-fashion-mnist")
    images, labels = FILES[split]
    y = _read(root / labels, 8).astype(np.int64)
    x = _read(root / images, 16).reshape(len(y), 1, 28, 28)
    xt = (torch.from_numpy(x.astype(np.float32)) / 255.0 - MEAN) / STD
    return xt, torch.from_numpy(y)


def balanced_subset(x: torch.Tensor, y: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n // classes`` samples of every class, in the original order
    (everything when ``n`` is None or not smaller than the set)."""
    if n is None or n >= len(y):
        return x, y
    classes = int(y.max()) + 1
    per = n // classes
    idx = torch.cat([torch.nonzero(y == c).flatten()[:per] for c in range(classes)]).sort().values
    return x[idx], y[idx]
