"""sklearn's digits (8x8, 10 classes) and a small CNN trained on them in seconds:
the real data and real trained weights behind the fine-tuning tests."""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from compression.ranks.base import Data

SPEC = "1,8,8"


def digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


@cache
def digits() -> tuple[Data, Data]:
    """(train: 1,300 images, test: 497 images), normalised, fixed split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 - 0.3) / 0.4
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1300], perm[1300:]
    return Data((x[tr],), y[tr]), Data((x[te],), y[te])


@cache
def trained_cnn(epochs: int = 8) -> nn.Module:
    """The digits CNN trained with Adam (deterministic seed), in eval mode."""
    train, _ = digits()
    (x,), y = train.x, train.y
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = digits_cnn()
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        for _ in range(epochs):
            model.train()
            for i in range(0, len(x), 64):
                loss = nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return model.eval()


def accuracy(model: torch.nn.Module, data: Data) -> float:
    with torch.no_grad():
        return (model(*data.x).argmax(1) == data.y).float().mean().item()
