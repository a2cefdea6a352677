"""Evaluation numbers are consistent: a model agrees with itself, accuracy
matches a direct count, latency and sizes are sane."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compression.evaluate import (
    agreement,
    evaluate,
    file_size,
    file_sizes,
    measure_latency,
    size_ratio,
    topk_correct,
)
from compression.input_spec import InputSpec
from compression.metrics import relative_error
from compression.ranks.base import Data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(one_thread) -> tuple[nn.Module, Data]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
            nn.Flatten(), nn.Linear(8 * 64, 10),
        )  # fmt: skip
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        for _ in range(3):  # a few quick epochs: a real, imperfect classifier
            for i in range(0, 1000, 100):
                loss = nn.functional.cross_entropy(model(x[i : i + 100]), y[i : i + 100])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return model.eval(), Data((x[1000:],), y[1000:])


def test_model_agrees_with_itself(digits):
    model, data = digits
    result = evaluate(model, data, reference=model, spec=InputSpec.parse("1,8,8"), batch_size=100)
    assert result["samples"] == len(data)
    assert result["agreement"] == 1.0 and result["relative_error"] == 0.0
    assert 0.5 < result["top1"] <= result["top5"] <= 1.0


def test_accuracy_matches_a_direct_count_and_modes_are_restored(digits):
    model, data = digits
    model.train()  # dropout on: evaluate must still be deterministic and restore the flag
    try:
        result = evaluate(model, data, batch_size=64)
        assert model.training
    finally:
        model.eval()
    with torch.no_grad():
        logits = model(data.x[0])
    assert result["top1"] == pytest.approx(float((logits.argmax(1) == data.y).float().mean()))
    top5 = float((logits.topk(5, 1).indices == data.y[:, None]).any(1).float().mean())
    assert result["top5"] == pytest.approx(top5)
    assert "agreement" not in result


def test_agreement_and_error_against_a_perturbed_model(digits):
    model, data = digits
    other = type(model)(*[m for m in model])  # same layers ...
    other[-1] = nn.Linear(8 * 64, 10)  # ... but a random classifier
    result = evaluate(other, data, reference=model, batch_size=128)
    with torch.no_grad():
        a, b = other(data.x[0]), model(data.x[0])
    assert result["agreement"] == pytest.approx(agreement(a, b)) and result["agreement"] < 0.5
    assert result["relative_error"] == pytest.approx(relative_error(a, b), rel=1e-6) and result["relative_error"] > 0.1


def test_unlabelled_and_non_classification_outputs():
    model = nn.Linear(4, 1)  # one output column: not logits
    data = Data((torch.randn(10, 4),))
    result = evaluate(model, data, reference=model)
    assert result == {"samples": 10, "agreement": None, "relative_error": 0.0}


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    y = torch.tensor([1, 2, 0])
    assert topk_correct(logits, y, (1, 2, 5)) == (1, 2, 3)


def test_latency_and_file_sizes(tmp_path, digits):
    model, _ = digits
    lat = measure_latency(model, InputSpec.parse("1,8,8"), batch=2, warmup=1, repeats=5)
    assert 0 < lat["median_ms"] <= lat["p90_ms"] and lat["repeats"] == 5 and lat["device"] == "cpu"
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 1000)
    b.write_bytes(b"x" * 250)
    assert file_size(a) == 1000 and size_ratio(a, b) == 4.0
    assert file_sizes({"a": a, "b": b, "missing": tmp_path / "nope"}) == {"a": 1000, "b": 250}
