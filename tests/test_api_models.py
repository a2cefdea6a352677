"""Model uploads: streamed with a cap, pre-checked, inspected out of process, owner-scoped."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from app.api.deps import get_model_inspector
from app.services.sandbox import InspectionError, subprocess_inspect_model

try:
    from tests.api_support import API, Api, TinyNet, api, assert_problem, make_api, model_bytes  # noqa: F401
except ImportError:  # pytest run from inside tests/
    from api_support import (  # type: ignore[no-redef]  # noqa: F401
        API,
        Api,
        TinyNet,
        api,
        assert_problem,
        make_api,
        model_bytes,
    )


_INSPECTED: dict[tuple[str, str], dict[str, object]] = {}


def _real_inspector_once(path: Path, spec: str, timeout: float) -> dict[str, object]:
    """The real child-process inspector, run once per file and spec in this test session
    (it takes seconds; the backends differ only in what happens around it)."""
    key = (hashlib.sha256(path.read_bytes()).hexdigest(), spec)
    if key not in _INSPECTED:
        _INSPECTED[key] = subprocess_inspect_model(path, spec, timeout)
    return _INSPECTED[key]


def test_multipart_upload_returns_the_layer_table_computed_out_of_process(api: Api) -> None:
    api.app.dependency_overrides[get_model_inspector] = lambda: _real_inspector_once
    user = api.user()
    data = model_bytes()
    body = api.upload_model(user, data, input_spec="3,16,16")

    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["size_bytes"] == len(data)
    assert body["name"] == "tiny.pt"
    assert body["status"] == "ready"
    assert body["input_spec"] == "3,16,16"
    inv = body["inventory"]
    assert [layer["name"] for layer in inv["layers"]] == ["conv1", "conv2", "fc"]
    assert inv["total_macs"] >= 3 * 8 * 9 * 256 + 8 * 16 * 9 * 256
    assert inv["total_params"] == sum(p.numel() for p in TinyNet().parameters())
    # Stored once, under a server-made key, and readable back.
    assert len(api.stored_files()) == 1
    r = api.client.get(f"{API}/models/{body['id']}", headers=user)
    assert r.status_code == 200 and r.json()["inventory"] == inv


def test_raw_body_upload_without_input_spec_is_prechecked_only(api: Api) -> None:
    user = api.user()
    r = api.client.post(f"{API}/models?name=net.pt", headers=user, content=model_bytes())
    assert r.status_code == 201, r.json()
    assert r.json()["status"] == "uploaded"
    assert r.json()["inventory"] is None
    assert r.json()["name"] == "net.pt"


def test_too_large_upload_is_413_and_nothing_is_kept(make_api: Callable[..., Api]) -> None:
    api = make_api(max_upload_bytes=64 * 1024)
    user = api.user()
    big = os.urandom(200 * 1024)
    # Declared too large (Content-Length), refused before reading.
    assert_problem(api.client.post(f"{API}/models", headers=user, content=big), 413, "too_large")
    # Multipart: the cap is enforced while streaming.
    r = api.client.post(f"{API}/models", headers=user, files={"file": ("big.pt", big)})
    assert_problem(r, 413, "too_large", "file")
    assert api.stored_files() == []


def test_random_bytes_are_422_bad_archive_and_not_kept(api: Api) -> None:
    user = api.user()
    r = api.client.post(f"{API}/models", headers=user, files={"file": ("junk.pt", os.urandom(4096))})
    body = assert_problem(r, 422, "bad_archive", "file")
    assert "junk.pt" in body["detail"] and "torch.jit" in body["detail"]
    assert api.stored_files() == []
    assert api.client.get(f"{API}/models", headers=user).json()["items"] == []


def test_an_inspection_failure_is_422_with_the_engine_code_and_not_kept(api: Api) -> None:
    seen: list[tuple[Path, str]] = []

    def inspector(path: Path, spec: str, timeout: float) -> dict[str, object]:
        seen.append((path, spec))
        assert path.is_file()  # the stored upload, handed over by path
        raise InspectionError("input_spec_mismatch", "the model rejects inputs of spec '5,16,16'")

    api.app.dependency_overrides[get_model_inspector] = lambda: inspector
    user = api.user()
    r = api.client.post(
        f"{API}/models", headers=user, files={"file": ("tiny.pt", model_bytes())}, data={"input_spec": "5,16,16"}
    )
    body = assert_problem(r, 422, "input_spec_mismatch", "input_spec")
    assert "5,16,16" in body["detail"]
    assert [spec for _, spec in seen] == ["5,16,16"]
    assert api.stored_files() == []


def test_unreadable_input_spec_is_422_naming_the_field(api: Api) -> None:
    user = api.user()
    r = api.client.post(f"{API}/models?input_spec=3,abc", headers=user, content=model_bytes())
    body = assert_problem(r, 422, "input_spec_mismatch", "input_spec")
    assert "3,224,224" in body["detail"]
    assert api.stored_files() == []


def test_multipart_without_a_file_part_is_422(api: Api) -> None:
    user = api.user()
    r = api.client.post(f"{API}/models", headers=user, files={"input_spec": (None, "3,16,16")})
    assert_problem(r, 422, field="file")
    assert api.stored_files() == []


def test_full_storage_is_507(make_api: Callable[..., Api]) -> None:
    api = make_api(min_free_bytes=1 << 62)
    r = api.client.post(f"{API}/models", headers=api.user(), content=model_bytes())
    assert_problem(r, 507, "storage_full")
    assert api.stored_files() == []


def test_storage_quota_is_429_on_upload(make_api: Callable[..., Api]) -> None:
    size = len(model_bytes())
    api = make_api(quota_storage_bytes=size + size // 2)
    user = api.user()
    api.upload_model(user)
    r = api.client.post(f"{API}/models", headers=user, files={"file": ("again.pt", model_bytes())})
    body = assert_problem(r, 429, "storage_quota_exceeded")
    assert "delete" in body["detail"]
    assert len(api.stored_files()) == 1


def test_list_pages_and_delete_removes_the_file(api: Api) -> None:
    user = api.user()
    ids = [api.upload_model(user)["id"] for _ in range(3)]
    first = api.client.get(f"{API}/models?limit=2", headers=user).json()
    second = api.client.get(f"{API}/models?limit=2&cursor={first['next_cursor']}", headers=user).json()
    assert second["next_cursor"] is None
    assert sorted(m["id"] for m in first["items"] + second["items"]) == sorted(ids)

    assert api.client.delete(f"{API}/models/{ids[0]}", headers=user).status_code == 204
    assert len(api.stored_files()) == 2
    assert_problem(api.client.get(f"{API}/models/{ids[0]}", headers=user), 404, "not_found")


def test_a_model_used_by_a_job_cannot_be_deleted(api: Api) -> None:
    user = api.user()
    model = api.upload_model(user)
    api.create_job(user, model["id"])
    r = api.client.delete(f"{API}/models/{model['id']}", headers=user)
    assert_problem(r, 409, "model_in_use")
