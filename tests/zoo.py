"""A tiny model zoo built in the tests (no downloads).

Each builder returns ``(model, spec)``: an ``nn.Module`` in eval mode with
deterministic weights and the input spec string it expects (without batch).
BatchNorm running statistics are randomised so that BN is not an identity and a
wrong train/eval switch shows up in the outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _finish(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class _ResNetLike(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = _BasicBlock(8, 8, 1)
        self.layer2 = _BasicBlock(8, 16, 2)
        self.layer3 = _BasicBlock(16, 32, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_like() -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    return _finish(_ResNetLike(), 0), "3,16,16"


def _dw_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),  # depthwise
        nn.BatchNorm2d(c_in),
        nn.ReLU6(),
        nn.Conv2d(c_in, c_out, 1, bias=False),  # pointwise
        nn.BatchNorm2d(c_out),
        nn.ReLU6(),
    )


def mobilenet_like() -> tuple[nn.Module, str]:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU6(),
        _dw_block(16, 24, 1),
        nn.Conv2d(24, 24, 3, 1, 1, groups=4, bias=False),  # grouped
        nn.BatchNorm2d(24),
        nn.ReLU6(),
        _dw_block(24, 32, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(32, 10),
    )
    return _finish(model, 1), "3,16,16"


def vgg_like() -> tuple[nn.Module, str]:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(64, 10),
    )
    return _finish(model, 2), "3,16,16"


def mlp() -> tuple[nn.Module, str]:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(20, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    )
    return _finish(model, 3), "20"


class _TransformerClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


def transformer_encoder() -> tuple[nn.Module, str]:
    torch.manual_seed(4)
    return _finish(_TransformerClassifier(), 4), "10,32"


class _ControlFlow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # depends on the data, not on shapes
            return self.a(x)
        return self.b(x)


def control_flow_model() -> tuple[nn.Module, str]:
    torch.manual_seed(5)
    return _finish(_ControlFlow(), 5), "3,16,16"


def scripted(model: nn.Module) -> torch.jit.ScriptModule:
    return torch.jit.script(model.eval())


def traced(model: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    # check_trace=False: the check re-runs under no_grad, where transformer layers
    # take the fused fast path and the two traces differ by design.
    ex = example if isinstance(example, tuple) else (example,)
    return torch.jit.trace(model.eval(), ex, check_trace=False)


def save_ts(module: torch.jit.ScriptModule, tmp_path: Path, name: str = "model.pt") -> Path:
    path = Path(tmp_path) / name
    torch.jit.save(module, str(path))
    return path


def assert_no_rank_step_fits(meter, plan) -> None:
    """A plan under its budget by more than the 1 % tolerance is fine only where ranks
    allow nothing closer: raising any one rank by one must overshoot."""
    from compression.forms import max_ranks

    choice = {lp.name: (lp.form, tuple(lp.ranks)) for lp in plan.layers}
    for name, (form, ranks) in choice.items():
        layer = meter.inventory.by_name(name)
        top = max_ranks(form, layer.c_out, layer.c_in, *layer.kernel)
        for i in range(len(ranks)):
            if ranks[i] < top[i]:
                bumped = {**choice, name: (form, ranks[:i] + (ranks[i] + 1,) + ranks[i + 1:])}
                assert not meter.fits(meter.total(bumped)), f"{name} rank {i} + 1 still fits the budget"
