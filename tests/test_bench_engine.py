"""The engine benchmarks (bench/decompose.py, bench/ranks.py, bench/latency_budget.py), run
for real through their ``main(argv)`` at toy scale, results redirected into tmp_path.

Toy scale means ``bench.models.SmallConvNet`` (3x32x32) instead of the ResNet-18 layout
and small weight shapes for the per-layer timings; the decompositions, rank methods,
latency table, rewriting, export and the reports are the real ones. Wall-clock numbers
are only checked to be positive and finite: the machine is shared. A last test renders
the published results (bench/results/) again with the current report code, so a change
to the defaults or the tables that would make them irreproducible shows up here.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from bench import decompose, latency_budget, ranks

PUBLISHED = Path(__file__).resolve().parent.parent / "bench" / "results"
pytestmark = pytest.mark.usefixtures("one_thread")


def positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


# SmallConvNet at 3x32x32: a 3->64 stem, four 64->64 3x3 convs, a 64->10 head.
HW = 32 * 32
STEM_MACS, CONV_MACS, FC_MACS = 3 * 64 * 9 * HW, 64 * 64 * 9 * HW, 64 * 10
SMALL_MACS = STEM_MACS + 4 * CONV_MACS + FC_MACS


def small_macs_kept(plan_ranks: dict[str, list[int]]) -> float:
    """MACs kept by SmallConvNet with the given Tucker-2 ranks on its four convs, by hand:
    a 1x1 conv 64->r_in, an r_in->r_out 3x3 core and a 1x1 conv r_out->64 per pixel."""
    total = STEM_MACS + FC_MACS
    for i in range(4):
        r = plan_ranks.get(f"convs.{i}")
        total += CONV_MACS if r is None else HW * (64 * r[0] + 9 * r[0] * r[1] + r[1] * 64)
    return total / SMALL_MACS


def test_decompose_times_both_libraries_and_the_compressed_model(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(decompose, "RESULTS", tmp_path / "results")
    argv = ["--quick", "--model", "small", "--shapes", "16x16x3x3,24x8x3x3"]
    decompose.main(argv)
    report = json.loads((tmp_path / "results" / "decompose.json").read_text())
    md = (tmp_path / "results" / "decompose.md").read_text()

    impls = {("tucker2", "ours_hosvd"), ("tucker2", "ours_hooi"), ("tucker2", "tensorly_partial_tucker"),
             ("cp3", "ours_cp_als"), ("cp3", "tensorly_parafac"), ("cp4", "ours_cp_als"), ("cp4", "tensorly_parafac")}
    layers = report["layers"]
    assert len(layers) == 2 * len(impls)
    for shape, (r_out, r_in) in (([16, 16, 3, 3], (8, 8)), ([24, 8, 3, 3], (12, 4))):
        rows = {(r["op"], r["impl"]): r for r in layers if r["shape"] == shape}
        assert set(rows) == impls, shape
        for (op, impl), r in rows.items():
            assert positive(r["seconds"]), (shape, op, impl)
            assert 0 < r["rel_error"] < 1, (shape, op, impl)  # half ranks of random weights: lossy, not useless
            assert r["ranks"] == ([r_out, r_in] if op == "tucker2" else [r_out])
            x = "x".join(map(str, shape))
            assert f"| {x} | {op} | {impl} | {tuple(r['ranks'])} | " in md
        # Both HOOIs start from HOSVD and run the same iteration: same error, no worse than HOSVD's.
        hooi = rows["tucker2", "ours_hooi"]["rel_error"]
        tl_hooi = rows["tucker2", "tensorly_partial_tucker"]["rel_error"]
        assert hooi == pytest.approx(tl_hooi, abs=1e-3)
        assert hooi <= rows["tucker2", "ours_hosvd"]["rel_error"] + 1e-9
        for op in ("cp3", "cp4"):  # ALS on both sides from an SVD start: close, not identical
            assert rows[op, "ours_cp_als"]["rel_error"] == pytest.approx(rows[op, "tensorly_parafac"]["rel_error"],
                                                                         abs=0.05)

    model = report["model"]
    assert model["model"] == decompose.MODELS["small"][2] and model["rank_ratio"] == 0.5
    # Half the ranks of a 64->64 3x3 conv keep 13312 of 36864 MACs per pixel (2.77x); the stem and the
    # head barely count.
    assert model["macs_before"] == SMALL_MACS
    assert model["macs_ratio"] == pytest.approx(model["macs_before"] / model["macs_after"])
    assert 2.5 < model["macs_ratio"] < 3.0 and 2.0 < model["params_ratio"] < 3.5
    assert model["layers_factorised"] >= 4
    for key in ("convert_s", "decompose_s", "export_s", "pipeline_total_s"):
        assert positive(model[key]), key
    assert set(model["latency"]) == {"1", "8"}  # --quick: batch 1 and 8
    for v in model["latency"].values():
        assert positive(v["original_ms"]) and positive(v["compressed_ms"])
        assert v["speedup"] == pytest.approx(v["original_ms"] / v["compressed_ms"])
    assert f"## {model['model']}, Tucker-2 at rank ratio 0.5" in md
    assert f"| {model['macs_ratio']:.2f}x | {model['params_ratio']:.2f}x |" in md
    assert re.search(r"^\| 1 \| [\d.]+ \| [\d.]+ \| [\d.]+x \|$", md, re.M)
    assert re.search(r"^\| 8 \| [\d.]+ \| [\d.]+ \| [\d.]+x \|$", md, re.M)
    assert "Command: `python -m bench.decompose --quick --model small --shapes 16x16x3x3,24x8x3x3`." in md


def test_ranks_runs_every_requested_method_at_equal_macs_and_reports_a_failing_one(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ranks, "RESULTS", tmp_path / "results")
    requested = ["uniform", "energy", "vbmf", "batude", "rene", "manual"]  # batude uses data; manual has no ranks
    ranks.main(["--model", "small", "--methods", ",".join(requested)])  # the default budget, flops:3x
    report = json.loads((tmp_path / "results" / "ranks.json").read_text())
    md = (tmp_path / "results" / "ranks.md").read_text()

    assert report["meta"]["budget"] == "flops:3x"
    assert report["meta"]["model"] == "small conv net, random weights, 3x32x32"
    assert md.startswith("# Rank selection at flops:3x (small conv net, random weights, 32x32)\n")
    rows = report["rows"]
    assert [r["method"] for r in rows] == requested
    failed = rows[-1]
    assert "needs options['ranks']" in failed["error"] and set(failed) == {"method", "error"}
    assert "| manual | failed: method 'manual' needs options" in md
    for r in rows[:-1]:
        name = r["method"]
        assert r["target_keep"] == pytest.approx(1 / 3)
        assert abs(r["budget_miss_pct"]) < 1.0, name  # every method meets the budget to within 1 %
        assert r["budget_miss_pct"] == pytest.approx(100 * (r["macs_kept"] / r["target_keep"] - 1))
        # The MACs counted on the rewritten network are the ones its reported ranks cost.
        assert set(r["ranks"]) <= {f"convs.{i}" for i in range(4)} and r["layers_factorised"] == len(r["ranks"]) > 0
        assert all(1 <= k <= 64 for rk in r["ranks"].values() for k in rk), name
        assert r["macs_kept"] == pytest.approx(small_macs_kept(r["ranks"]), rel=1e-6), name
        # Truncating a layer loses part of its weight, never more than all of it.
        assert 0 < r["mean_weight_error"] < 1 and positive(r["output_error"]), name
        assert positive(r["spectra_s"]) and r["select_s"] >= 0 and r["decompose_s"] >= 0
        assert (f"| {name} | {r['select_s']:.2f} | {r['macs_kept']:.4f} | {r['budget_miss_pct']:+.2f} | "
                f"{r['mean_weight_error']:.4f} | {r['output_error']:.4f} | {r['layers_factorised']} |") in md


def test_latency_budget_chooses_ranks_within_the_table_and_measures_them(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(latency_budget, "RESULTS", tmp_path / "results")
    latency_budget.main(["--models", "small", "--targets", "0.7,0.5"])
    report = json.loads((tmp_path / "results" / "latency_budget.json").read_text())
    md = (tmp_path / "results" / "latency_budget.md").read_text()

    rows = report["rows"]
    assert [(r["model"], r["input"], r["target"]) for r in rows] == [("small", "3,32,32", t) for t in (0.7, 0.5)]
    assert rows[0]["table_ms"] == rows[1]["table_ms"] and positive(rows[0]["table_ms"])  # one table per model
    for r in rows:
        # The search meets the budget against the table, and spends most of it.
        assert 0.8 * r["target"] < r["predicted_ratio"] <= r["target"] + 1e-9, r
        assert 1 <= r["layers_factorised"] <= 4
        assert len(r["ratios"]) == 5 and all(positive(x) for x in r["ratios"])
        assert r["measured_ratio"] == sorted(r["ratios"])[2]
        assert r["met"] == (r["measured_ratio"] <= r["target"])
        assert (f"| small | 3,32,32 | {r['target']:.2f} | {r['predicted_ratio']:.3f} | {r['measured_ratio']:.3f} | "
                f"{'yes' if r['met'] else 'no'} | {r['layers_factorised']} |") in md
    assert rows[1]["predicted_ratio"] < rows[0]["predicted_ratio"]  # a tighter budget, a faster plan
    assert report["meta"]["threads"] == 1


def test_the_published_results_render_the_same_with_the_default_configuration(tmp_path, monkeypatch) -> None:
    """The small-model options leave the published configuration alone: the default models and shapes
    are the published ones, and the current report code turns the published rows into the same tables."""
    assert decompose.parse_shapes(decompose.SHAPES) == [(64, 64, 3, 3), (128, 128, 3, 3)]

    calls: dict[str, object] = {}
    pub = json.loads((PUBLISHED / "decompose.json").read_text())
    # In memory (as the benchmark hands them to its report) shapes and ranks are tuples; JSON made them lists.
    pub["layers"] = [{**r, "shape": tuple(r["shape"]), "ranks": tuple(r["ranks"])} for r in pub["layers"]]
    monkeypatch.setattr(decompose, "RESULTS", tmp_path / "decompose")
    monkeypatch.setattr(decompose, "time_layer_decompositions",
                        lambda shapes, repeats: calls.update(shapes=shapes, repeats=repeats) or pub["layers"])
    monkeypatch.setattr(decompose, "model_rows",
                        lambda *a: calls.update(model_rows=a) or pub["model"])
    decompose.main([])
    assert calls == {"shapes": [(64, 64, 3, 3), (128, 128, 3, 3)], "repeats": 3,
                     "model_rows": (0.5, (1, 32), 5, "resnet18")}
    assert pub["model"]["model"] == decompose.MODELS["resnet18"][2]
    published = (PUBLISHED / "decompose.md").read_text().splitlines()
    rendered = (tmp_path / "decompose" / "decompose.md").read_text().splitlines()
    assert rendered[:-1] == published[:-1]  # the last line has the machine's load and thread count
    assert rendered[-1].endswith("Command: `python -m bench.decompose`.")
    assert published[-1].endswith("Command: `python -m bench.decompose`.")

    pub = json.loads((PUBLISHED / "ranks.json").read_text())
    monkeypatch.setattr(ranks, "RESULTS", tmp_path / "ranks")
    monkeypatch.setattr(ranks, "run", lambda budget, methods, on_row=None, model_name="resnet18":
                        calls.update(ranks=(budget, methods, model_name)) or pub["rows"])
    ranks.main([])
    assert calls["ranks"] == ("flops:3x", ["uniform", "energy", "vbmf", "batude", "rene"], "resnet18")
    rendered_meta = json.loads((tmp_path / "ranks" / "ranks.json").read_text())["meta"]
    assert {k: rendered_meta[k] for k in ("budget", "model")} == {k: pub["meta"][k] for k in ("budget", "model")}
    published = (PUBLISHED / "ranks.md").read_text().splitlines()
    rendered = (tmp_path / "ranks" / "ranks.md").read_text().splitlines()
    assert rendered[0] == published[0] and rendered[3:] == published[3:]  # line 2: torch version and threads

    pub = json.loads((PUBLISHED / "latency_budget.json").read_text())
    monkeypatch.setattr(latency_budget, "RESULTS", tmp_path / "latency")
    monkeypatch.setattr(latency_budget, "run", lambda models, targets:
                        calls.update(latency=(models, targets)) or pub["rows"])
    latency_budget.main([])
    assert calls["latency"] == (["small", "resnet18"], [0.7, 0.5])
    published = (PUBLISHED / "latency_budget.md").read_text().splitlines()
    rendered = (tmp_path / "latency" / "latency_budget.md").read_text().splitlines()
    assert rendered[0] == published[0] and rendered[3:] == published[3:]  # line 2: load average
    assert latency_budget.MODELS["small"][1] == "3,32,32" and latency_budget.MODELS["resnet18"][1] == "3,112,112"

