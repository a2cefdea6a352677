"""The quality benchmark's harness (bench/quality.py), run for real at toy scale.

Fashion-MNIST is replaced by a synthetic stand-in of the same shape (the
harness, not the data, is under test here); the networks, ``compress``, the
tensorly-torch and torch-pruning baselines, the cache and the report are the
real ones.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench import quality as q
from compression.data import train_val_split
from compression.pipeline import TEST_FRACTION
from compression.ranks.base import Data


def _synthetic_fashion(split: str, root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten classes told apart by a bright square at a class-specific place, plus noise."""
    n = 600 if split == "train" else 200
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    y = torch.arange(n) % 10
    x = 0.3 * torch.randn(n, 1, 28, 28, generator=g)
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 4)
        x[i, 0, 2 + 8 * r: 8 + 8 * r, 2 + 6 * col: 8 + 6 * col] += 2.0
    return x, y


def test_pipeline_data_puts_the_test_split_exactly_where_compress_holds_out() -> None:
    train = Data((torch.randn(80, 1, 4, 4),), torch.arange(80) % 4)
    test = Data((torch.randn(20, 1, 4, 4),), torch.arange(20) % 4)
    for seed in (0, 3):
        fit, held = train_val_split(q.pipeline_data(train, test, seed), TEST_FRACTION, seed)
        assert sorted(map(tuple, held.x[0].flatten(1).tolist())) == sorted(map(tuple, test.x[0].flatten(1).tolist()))
        assert sorted(map(tuple, fit.x[0].flatten(1).tolist())) == sorted(map(tuple, train.x[0].flatten(1).tolist()))
        assert sorted(held.y.tolist()) == sorted(test.y.tolist())
    with pytest.raises(ValueError, match="use test = training / 4"):
        q.pipeline_data(train, Data((torch.randn(8, 1, 4, 4),), torch.arange(8) % 4), 0)


def test_networks_train_on_a_superset_of_the_fine_tuning_split_by_default() -> None:
    _, cfg = q.parse_args([])
    assert (cfg.n_net_train, cfg.n_train, cfg.n_test, cfg.train_epochs) == (60000, 6000, 1500, 8)
    assert (cfg.n_score, cfg.ft_epochs) == (10000, 5)  # all test images; the pipeline's fine-tuning default
    assert "_net60000_s10000_ft5_" in cfg.key()
    _, quick = q.parse_args(["--quick"])
    assert quick.n_net_train is None and quick.n_score is None
    assert "_net" not in quick.key() and "_s" not in quick.key().split("_ft")[0]  # older cache keys keep their meaning
    assert q.parse_args(["--score", "0"])[1].n_score is None
    with pytest.raises(SystemExit):
        q.parse_args(["--train", "2000", "--net-train", "1000"])
    with pytest.raises(SystemExit):
        q.parse_args(["--score", "1000"])  # below the 1,500-image test split it must contain
    x, y = _synthetic_fashion("train")
    small, large = q.fashion.balanced_subset(x, y, 100), q.fashion.balanced_subset(x, y, 300)
    rows = {tuple(r) for r in large[0].flatten(1).tolist()}
    assert all(tuple(r) in rows for r in small[0].flatten(1).tolist())


def test_a_tiny_benchmark_runs_every_kind_of_method_resumes_from_its_cache_and_reports(
        tmp_path, monkeypatch) -> None:
    pytest.importorskip("tltorch")
    pytest.importorskip("torch_pruning")
    monkeypatch.setattr(q.fashion, "load", _synthetic_fashion)
    monkeypatch.setattr(q, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(q, "RESULTS", tmp_path / "results")
    out = tmp_path / "quality"
    argv = ["--nets", "resnet", "--budgets", "3", "--methods", "uniform,tltorch,prune", "--seeds", "1",
            "--train", "200", "--net-train", "400", "--train-epochs", "1", "--ft-epochs", "1", "--repeats", "2",
            "--score", "200", "--no-pretrained", "--out", str(out)]
    assert q.main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    meta = report["meta"]
    assert meta["runs_completed"] == meta["runs_planned"] == 3 and not meta["runs_missing"]
    assert report["nets"]["resnet"]["train_samples"] == 400 and meta["n_net_train"] == 400
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"uniform", "tltorch", "prune"}
    for method, row in rows.items():
        achieved, _ = row["macs_vs_target"]
        assert 0.9 < achieved <= 1.0 + 0.011, (method, achieved)  # matched MACs: the comparison's premise
        for key in ("top1_after_compression", "top1_finetuned", "top1_finetuned_test_split"):
            assert 0.0 <= row[key][0] <= 1.0
        assert row["scored_on"] == 200  # the headline figure is on the score set, not the 50-image test split
        run = next(r for r in report["runs"] if r["method"] == method)
        assert row["top1_finetuned"][0] == run["top1_finetuned_score"]
        assert row["top1_finetuned_test_split"][0] == run["top1_finetuned"]
    run = next(r for r in report["runs"] if r["method"] == "uniform")
    assert run["ranks"] and run["latency_b1"]["compressed_ms"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| resnet | 3x | tltorch | 1 |" in md and "on 400 training images" in md
    assert "top-1 after fine-tuning (200 images)" in md
    net = report["nets"]["resnet"]
    assert net["original_scored_on"] == 200 and 0.0 <= net["original_top1"] <= 1.0
    assert (tmp_path / "cache" / "runs" / meta["config_key"] / "resnet_3x_prune_s0.json").is_file()

    # A second invocation finds every run in the cache and reports the same numbers.
    assert q.main(argv) == 0
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["meta"]["invocations"][-1]["runs_done"] == 0
    assert [r["top1_finetuned"] for r in again["rows"]] == [r["top1_finetuned"] for r in report["rows"]]

    # A run that compressed another network (one retrained on another CPU rounds differently) is run again.
    stale = tmp_path / "cache" / "runs" / meta["config_key"] / "resnet_3x_uniform_s0.json"
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "net_fingerprint": "elsewhere"}))
    assert q.main(argv) == 0
    third = json.loads(out.with_suffix(".json").read_text())
    assert third["meta"]["invocations"][-1]["runs_done"] == 1
    assert json.loads(stale.read_text())["net_fingerprint"] == third["nets"]["resnet"]["fingerprint"]

    # --render rebuilds the table and verdict from the stored runs, running nothing.
    (tmp_path / "cache").rename(tmp_path / "gone")
    assert q.main(["--render", str(out.with_suffix(".json"))]) == 0
    rendered = json.loads(out.with_suffix(".json").read_text())
    assert rendered["rows"] == third["rows"] and rendered["runs"] == third["runs"]
    assert rendered["meta"]["rendered"]["command"] == f"python -m bench.quality --render {out.with_suffix('.json')}"
    assert "rebuilt from the stored runs by `python -m bench.quality --render" in out.with_suffix(".md").read_text()
    assert not (tmp_path / "cache").exists()
    for bad in (tmp_path / "missing.json", out.with_suffix(".md")):
        with pytest.raises(SystemExit):
            q.parse_args(["--render", str(bad)])


def test_the_verdict_counts_a_tie_with_a_baseline_as_not_beating_it() -> None:
    def row(method: str, acc: float, std: float = 0.0) -> dict:
        return {"net": "n", "budget": 3.0, "method": method, "top1_finetuned": (acc, std), "seeds": [0, 1, 2]}

    lines = q.verdict([row("rene", 0.90), row("tltorch", 0.90), row("prune", 0.89)], {"n": 0.904})
    assert lines == ["rene on n at 3x: 90.00 % (-0.40 vs original); beats prune; does NOT beat tltorch 90.00 "
                     "(gap +0.00 ± 0.00); within 0.5 points of the original"]
    assert q.verdict([row("rene", 0.90)], {"n": 0.90})[0].startswith("rene on n at 3x: 90.00 % (+0.00 vs original); "
                                                                     "no baseline in this run")


def test_the_verdict_holds_the_learned_methods_to_our_rank_heuristics_too_and_gives_the_gap_noise() -> None:
    def row(method: str, acc: float, std: float) -> dict:
        return {"net": "n", "budget": 2.0, "method": method, "top1_finetuned": (acc, std), "seeds": [0, 1, 2]}

    rows = [row("batude", 0.90, 0.003), row("energy", 0.902, 0.004), row("uniform", 0.899, 0.0), row("prune", 0.8, 0)]
    [line] = q.verdict(rows, {"n": 0.91})
    # se = sqrt(0.3^2 / 3 + 0.4^2 / 3) = 0.29 points
    assert line == ("batude on n at 2x: 90.00 % (-1.00 vs original); beats uniform, prune; does NOT beat energy "
                    "90.20 (gap -0.20 ± 0.29)")


def test_the_verdict_compares_a_cell_cut_short_on_the_seeds_both_methods_completed() -> None:
    """--max-minutes can stop a run between a cell's methods: seed 0 alone for ours, seeds 0 and 1
    for a baseline that did worse on seed 0 but better on average."""
    def row(method: str, by_seed: dict[str, float]) -> dict:
        values = list(by_seed.values())
        return {"net": "n", "budget": 5.0, "method": method, "seeds": sorted(int(k) for k in by_seed),
                "top1_finetuned": (sum(values) / len(values), 0.0), "top1_by_seed": by_seed}

    rows = [row("batude", {"0": 0.90}), row("uniform", {"0": 0.89, "1": 0.93}), row("energy", {"0": 0.91})]
    [line] = q.verdict(rows, {"n": 0.92})
    assert line == ("batude on n at 5x: 90.00 % (-2.00 vs original); beats uniform; does NOT beat energy 91.00 "
                    "(gap -1.00 ± 0.00)")
    rows[2] = row("energy", {"1": 0.80})
    assert q.verdict(rows, {"n": 0.92})[0].endswith("; beats uniform; does NOT beat energy (no seed in common)")


def test_the_report_names_cached_runs_made_by_other_code() -> None:
    now = {"compression/finetune.py": "a", "compression/ranks/batude.py": "b"}
    runs = [{"method": "uniform", "sources": dict(now)},
            {"method": "batude", "sources": {**now, "compression/ranks/batude.py": "old"}},
            {"method": "batude", "sources": {**now, "compression/finetune.py": "old"}},
            {"method": "energy"}]  # from before runs recorded their sources
    text = q.older_code({"meta": {"sources_this_invocation": now}, "runs": runs})
    assert text == ("batude: 2 run(s), differing in compression/finetune.py, compression/ranks/batude.py; "
                    "energy: 1 run(s), differing in compression/finetune.py, compression/ranks/batude.py")
    assert q.older_code({"meta": {"sources_this_invocation": now}, "runs": runs[:1]}) == ""


def _seeded(net: str, method: str, by_seed: dict[str, float], budget: float = 3.0) -> dict:
    values = list(by_seed.values())
    return {"net": net, "budget": budget, "method": method, "seeds": sorted(int(k) for k in by_seed),
            "top1_finetuned": q._mean_std(values), "top1_by_seed": by_seed}


def test_the_gaps_noise_is_the_spread_of_the_per_seed_gaps_not_of_the_two_rows() -> None:
    """Seeds move every method of a cell together (same data order, same test images): a
    baseline 0.5 points ahead on every seed is ahead beyond doubt, however far the seeds spread."""
    rows = [_seeded("n", "batude", {"0": 0.90, "1": 0.92, "2": 0.94}),
            _seeded("n", "energy", {"0": 0.905, "1": 0.925, "2": 0.945})]
    [line] = q.verdict(rows, {"n": 0.923})
    assert line.endswith("does NOT beat energy 92.50 (gap -0.50 ± 0.00); within 0.5 points of the original")
    assert q._se_of_gap(*rows) > 0.01  # unpaired, the seeds' 2-point spread would hide it


def test_the_verdict_pools_every_network_per_budget() -> None:
    rows = [_seeded("a", "batude", {"0": 0.90, "1": 0.91}), _seeded("a", "uniform", {"0": 0.89, "1": 0.91}),
            _seeded("a", "energy", {"0": 0.91, "1": 0.91}),
            _seeded("b", "batude", {"0": 0.80, "1": 0.82}), _seeded("b", "uniform", {"0": 0.80, "1": 0.80}),
            _seeded("b", "energy", {"0": 0.80, "1": 0.80}),
            _seeded("b", "batude", {"1": 0.70}, budget=5.0), _seeded("b", "uniform", {"0": 0.71, "1": 0.69},
                                                                       budget=5.0)]
    lines = q.verdict(rows, {"a": 0.92, "b": 0.82})
    assert len(lines) == 5  # three cells, then two budgets pooled
    # 3x: gaps to uniform 1, 0, 0, 2 points; to energy -1, 0, 0, 2
    assert lines[3] == ("batude at 3x over a, b (gap per seed pair, mean ± standard error): "
                        "uniform +0.75 ± 0.48 (4 pairs), energy +0.25 ± 0.63 (4 pairs); "
                        "at least as accurate as every baseline on average")
    assert lines[4] == ("batude at 5x over a, b (gap per seed pair, mean ± standard error): "
                        "uniform +1.00 ± 0.00 (1 pairs); at least as accurate as every baseline on average")
    rows[2] = _seeded("a", "energy", {"0": 0.95, "1": 0.95})
    assert q.verdict(rows, {"a": 0.92, "b": 0.82})[3].endswith("; behind energy on average")


def test_rendering_the_published_reports_keeps_their_rows() -> None:
    """--render rebuilds rows from the stored runs: every published figure must come out unchanged
    (older reports only gain fields, such as the per-seed figures the paired verdict reads)."""
    reports = sorted((q.RESULTS).glob("quality*.json"))
    assert len(reports) >= 10
    for path in reports:
        report = json.loads(path.read_text())
        rebuilt = json.loads(json.dumps(q.aggregate(report["runs"], q.originals_of(report))))
        assert len(rebuilt) == len(report["rows"]), path
        for new, old in zip(rebuilt, report["rows"], strict=True):
            assert {k: new[k] for k in old} == old, path
