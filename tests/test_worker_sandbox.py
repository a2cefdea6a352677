"""The supervisor's defensive parsing of what the sandboxed child says and writes."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from worker import sandbox
from worker.sandbox import child_env, parse_event
from worker.tasks import OutputError, check_outputs, parse_report, scrub


def test_protocol_lines_are_parsed_defensively() -> None:
    ok = parse_event(b'{"type": "progress", "phase": "load", "fraction": 1.5, "message": "m", "extra": 1}\n')
    assert ok is not None and ok.phase == "load" and ok.fraction == 1.0
    for bad in (b"not json\n", b"[1]\n", b'{"type": "log"}\n', b'{"type": "progress", "phase": 3, "fraction": 0}\n',
                b'{"type": "progress", "phase": "x", "fraction": "half"}\n',
                b'{"type": "progress", "phase": "x", "fraction": NaN}\n', b"\xff\xfe\n"):
        assert parse_event(bad) is None
    long = parse_event(json.dumps({"type": "progress", "phase": "p" * 500, "fraction": 0, "message": "m" * 9000})
                       .encode())
    assert long is not None and len(long.phase) == 64 and len(long.message) == 500


def test_child_environment_holds_no_service_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TENSORTRIM_DATABASE_URL", "postgresql://u:pw@db/x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nope")
    env = child_env(tmp_path, threads=2, cuda_devices=None)
    assert not any(k.startswith(("TENSORTRIM_", "AWS_")) for k in env)
    assert env["HOME"] == str(tmp_path) and env["OMP_NUM_THREADS"] == "2" and env["CUDA_VISIBLE_DEVICES"] == ""


def _outputs(scratch: Path) -> dict:
    out = scratch / "out"
    out.mkdir(parents=True)
    for name in ("model.pt", "model.pt2"):
        with zipfile.ZipFile(out / name, "w") as zf:
            zf.writestr("m/data.pkl", b"x")
    (out / "report.json").write_text("{}")
    return {"files": {n: {"size": (out / n).stat().st_size} for n in ("model.pt", "model.pt2", "report.json")}}


def test_outputs_are_rechecked(tmp_path: Path) -> None:
    result = _outputs(tmp_path)
    (tmp_path / "out" / "extra.so").write_bytes(b"ignored")
    with pytest.raises(OutputError, match="model.pt"):  # not a TorchScript archive (no code/ records)
        check_outputs(tmp_path, result, max_bytes=1 << 20)


def test_symlinked_or_missing_outputs_are_refused(tmp_path: Path) -> None:
    result = _outputs(tmp_path)
    (tmp_path / "out" / "report.json").unlink()
    (tmp_path / "out" / "report.json").symlink_to("/etc/passwd")
    with pytest.raises(OutputError, match="not a regular file"):
        check_outputs(tmp_path, result, max_bytes=1 << 20)
    (tmp_path / "out" / "report.json").unlink()
    with pytest.raises(OutputError, match="missing outputs"):
        check_outputs(tmp_path, result, max_bytes=1 << 20)


def test_report_fields_are_type_checked(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps({
        "macs_before": 10, "macs_after": 4, "route": "converter", "huge": "x" * 1000, "flag": True,
        "plan": {"method": "ratio", "layers": [
            {"name": "c1", "form": "tucker2", "ranks": [2, 3], "macs_before": 10, "macs_after": 4},
            {"name": "c2", "form": "tucker2", "ranks": ["2"], "macs_before": 1, "macs_after": 1},
            "junk"]}}))
    metrics, layers = parse_report(path)
    assert metrics == {"macs_before": 10, "macs_after": 4, "route": "converter", "rank_method": "ratio"}
    assert [row["layer"] for row in layers] == ["c1"]


def test_sweep_points_are_type_checked(tmp_path: Path) -> None:
    from worker.tasks import parse_sweep

    path = tmp_path / "sweep.json"
    good = {"budget": "flops:2x", "macs_after": 50, "macs_ratio": 2.0, "params_after": 9, "accuracy": 0.9,
            "metric": "top1", "dir": "../../etc", "extra": {"x": 1}}
    path.write_text(json.dumps({"sweep": [good, {**good, "accuracy": "high", "macs_ratio": float("nan")}]}))
    assert parse_sweep(path) == [
        {k: v for k, v in good.items() if k not in ("dir", "extra")},
        {"budget": "flops:2x", "macs_after": 50, "params_after": 9, "metric": "top1"},  # bad values dropped
    ]
    for bad in ({"sweep": []}, {"sweep": ["junk"]}, {"sweep": [{"budget": "flops:2x"}]}, [1, 2]):
        path.write_text(json.dumps(bad))
        with pytest.raises(OutputError):
            parse_sweep(path)
    path.write_text("{not json")
    with pytest.raises(OutputError, match="not JSON"):
        parse_sweep(path)


def test_logs_are_scrubbed_of_secrets() -> None:
    from app.settings import Settings

    settings = Settings(mode="full", database_url="postgresql://tt:hunter2hunter2@db/tt", secret_key="k" * 40)
    text = scrub(f"url {settings.database_url} key {'k' * 40} other redis://u:pass@h/0", settings)
    assert "hunter2" not in text and "k" * 40 not in text and "pass@" not in text


def test_each_child_gets_its_own_user_where_the_namespace_maps_it(tmp_path: Path) -> None:
    """Pid-derived ids on a host (the whole 32-bit range mapped); nobody inside a rootless
    container's user namespace, which maps 65,536 ids."""
    host, rootless = tmp_path / "host_map", tmp_path / "rootless_map"
    host.write_text("         0          0 4294967295\n")
    rootless.write_text("         0       1000          1\n         1     100000      65536\n")
    assert [sandbox.child_id(123, (str(host),) * 2), sandbox.child_id(124, (str(host),) * 2)] == [
        sandbox.CHILD_ID_BASE + 123, sandbox.CHILD_ID_BASE + 124]
    assert sandbox.child_id(123, (str(host), str(rootless))) == sandbox.NOBODY
    assert sandbox.child_id(123, (str(host), str(tmp_path / "missing"))) == sandbox.NOBODY
