"""Malformed and hostile uploads through the real API (real storage, the real sandboxed
inspector): each gets a 4xx problem detail that says what is wrong, the API keeps
answering, and nothing is left half-written in storage."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.api_support import API, Api, assert_problem, make_api, model_bytes, npz_bytes  # noqa: F401


@pytest.fixture
def sqlite_api(make_api: Callable[..., Api], engine: object) -> Api:  # noqa: F811
    # One backend is enough here: storage and the inspector are what is under test.
    if getattr(engine, "url").get_backend_name() != "sqlite":  # noqa: B009
        pytest.skip("upload checks do not depend on the database backend")
    return make_api()


def _zip_bomb() -> bytes:
    """A valid zip whose one entry inflates ~6000x (30 MB of zeros in ~30 kB)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\0" * (30 << 20))
        zf.writestr("archive/code/__torch__.py", b"")
        zf.writestr("archive/constants.pkl", b"")
        zf.writestr("archive/version", b"3\n")
    return buf.getvalue()


def _lying_zip() -> bytes:
    """A tiny zip whose central directory declares a 4 GiB entry."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", b"x" * 16)
    data = bytearray(buf.getvalue())
    cd = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, cd + 24, 0xFFFFFFF0)  # uncompressed size in the central directory
    return bytes(data)


def _corrupted() -> bytes:
    """A real model with one byte of a stored tensor flipped: fails its CRC check."""
    data = bytearray(model_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size > 64)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 32] ^= 0xFF
    return bytes(data)


HOSTILE_MODELS = {
    "random bytes": (os.urandom(4096), "not a TorchScript archive"),
    "empty file": (b"", "empty"),
    "truncated zip": (model_bytes()[: len(model_bytes()) // 2], "not a zip file"),
    "corrupted zip": (_corrupted(), "damaged"),
    "plain pickle": (pickle.dumps({"conv.weight": [1.0, 2.0]}), "pickle"),
    "zip bomb": (_zip_bomb(), "expands"),
    "lying zip": (_lying_zip(), "expands"),
}


def _assert_nothing_kept(api: Api) -> None:
    left = api.stored_files()
    assert left == [], f"storage kept files after a rejected upload: {left}"


@pytest.mark.parametrize("case", sorted(HOSTILE_MODELS))
def test_malformed_model_upload_is_a_422_that_keeps_nothing(sqlite_api: Api, case: str) -> None:
    data, words = HOSTILE_MODELS[case]
    h = sqlite_api.user()
    r = sqlite_api.client.post(f"{API}/models", headers=h, files={"file": ("evil.pt", data)})
    body = assert_problem(r, 422, field="file")
    assert words in body["detail"], body
    assert "Traceback" not in body["detail"] and str(sqlite_api.storage_dir) not in body["detail"]
    _assert_nothing_kept(sqlite_api)
    assert sqlite_api.client.get(f"{API}/models", headers=h).json()["items"] == []
    assert sqlite_api.client.get("/healthz").status_code == 200


def test_upload_over_the_cap_is_refused_while_streaming_and_keeps_nothing(
    make_api: Callable[..., Api],  # noqa: F811
    engine: object,
) -> None:
    if getattr(engine, "url").get_backend_name() != "sqlite":  # noqa: B009
        pytest.skip("storage behaviour does not depend on the database backend")
    api = make_api(max_upload_bytes=1 << 20)
    h = api.user()
    sent = 0

    def body() -> object:  # no Content-Length: the cap must bite on what arrives
        nonlocal sent
        for _ in range(64):
            sent += 64 << 10
            yield b"\0" * (64 << 10)

    r = api.client.post(f"{API}/models", headers={**h, "Content-Type": "application/octet-stream"}, content=body())
    assert_problem(r, 413, code="too_large")
    _assert_nothing_kept(api)
    # Declared too large up front: refused before reading the body.
    r = api.client.post(f"{API}/models", headers=h, files={"file": ("big.pt", b"\0" * ((1 << 20) + 1))})
    assert_problem(r, 413, code="too_large")
    _assert_nothing_kept(api)


def test_input_spec_that_does_not_fit_and_an_impossible_budget_are_422s(sqlite_api: Api) -> None:
    h = sqlite_api.user()
    r = sqlite_api.client.post(f"{API}/models", headers=h, files={"file": ("tiny.pt", model_bytes())},
                               data={"input_spec": "5,16,16"})
    body = assert_problem(r, 422, code="input_spec_mismatch", field="input_spec")
    assert "5,16,16" in body["detail"]
    _assert_nothing_kept(sqlite_api)
    r = sqlite_api.client.post(f"{API}/models", headers=h, files={"file": ("tiny.pt", model_bytes())},
                               data={"input_spec": "not,a,shape"})
    assert_problem(r, 422, field="input_spec")
    _assert_nothing_kept(sqlite_api)

    model = sqlite_api.upload_model(h, input_spec="3,16,16")
    assert model["status"] == "ready"
    r = sqlite_api.client.post(f"{API}/jobs", headers=h,
                               json={"model_id": model["id"], "input_spec": "3,16,16", "budget": "flops:10000x"})
    body = assert_problem(r, 422, code="invalid_budget", field="budget")
    assert "cannot be met" in body["detail"] and "largest reachable reduction is" in body["detail"], body
    r = sqlite_api.client.post(f"{API}/jobs", headers=h, json={"model_id": model["id"], "budget": "flops:2x",
                                                                 "sweep": ["flops:3x", "flops:10000x"]})
    body = assert_problem(r, 422, code="invalid_budget", field="sweep")
    assert body["detail"].startswith("'flops:10000x' in sweep: ") and "largest reachable" in body["detail"], body
    assert sqlite_api.enqueued.calls == []
    # manual ranks are checked against the inspected layer table, with the engine's words
    for ranks, words in (({"nope": [1, 1]}, "'nope' is not in the model; decomposable layers: "),
                         ({"conv2": [99, 1]}, "R_in=99 is out of range for tucker2: allowed 1..")):
        r = sqlite_api.client.post(f"{API}/jobs", headers=h,
                                   json={"model_id": model["id"], "budget": "flops:2x", "ranks": ranks})
        body = assert_problem(r, 422, field="ranks")
        assert words in body["detail"], body
    assert sqlite_api.enqueued.calls == []
    ok = sqlite_api.create_job(h, model["id"], budget="flops:2x")  # a reachable one still passes
    assert ok["status"] == "queued"


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: npz_bytes(x=np.zeros((4, 3, 16, 16), np.float32), y=np.zeros(5, np.int64)), "disagree"),
        (lambda: npz_bytes(x=np.array([{"a": 1}, None], dtype=object)), "pickle"),
        (lambda: pickle.dumps(np.zeros(3)), "not a zip"),
        (lambda: _zip_bomb(), "too large"),
        (lambda: npz_bytes(x=np.zeros((4, 2), np.float32))[:200], "not a zip"),
    ],
    ids=["mismatched-shapes", "object-arrays", "pickle", "zip-bomb", "truncated"],
)
def test_malformed_dataset_upload_is_a_422_that_keeps_nothing(sqlite_api: Api, make: Callable[[], bytes],
                                                              words: str) -> None:
    h = sqlite_api.user()
    r = sqlite_api.client.post(f"{API}/datasets", headers=h, files={"file": ("d.npz", make())})
    body = assert_problem(r, 422, code="bad_dataset", field="file")
    assert words in body["detail"], body
    _assert_nothing_kept(sqlite_api)


def test_hostile_multipart_bodies_are_4xx(sqlite_api: Api) -> None:
    h = sqlite_api.user()
    cases = [
        ({"Content-Type": "multipart/form-data"}, b"--x\r\n"),  # no boundary
        ({"Content-Type": "multipart/form-data; boundary=x"}, b"garbage without parts"),
        ({"Content-Type": "multipart/form-data; boundary=x"},
         b'--x\r\nContent-Disposition: form-data; name="other"; filename="a"\r\n\r\nabc\r\n--x--\r\n'),
        ({"Content-Type": "multipart/form-data; boundary=x"},
         b'--x\r\nContent-Disposition: form-data; name="input_spec"\r\n\r\n' + b"1," * 40000 + b"\r\n--x--\r\n"),
    ]
    for headers, data in cases:
        r = sqlite_api.client.post(f"{API}/models", headers={**h, **headers}, content=data)
        assert 400 <= r.status_code < 500, (headers, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    _assert_nothing_kept(sqlite_api)


def test_storage_tree_holds_only_server_made_names(sqlite_api: Api, tmp_path: Path) -> None:
    """A user file name with path tricks is a display name only."""
    h = sqlite_api.user()
    r = sqlite_api.client.post(f"{API}/models", headers=h,
                               files={"file": ("../../../etc/evil.pt", model_bytes())})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "evil.pt"
    for p in sqlite_api.stored_files():
        rel = p.relative_to(sqlite_api.storage_dir).as_posix()
        assert rel.startswith("models/") and "evil" not in rel, rel
