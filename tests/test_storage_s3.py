"""The S3-compatible storage backend against a real local S3 endpoint (moto's server on
127.0.0.1): streaming multipart saves with the cap enforced while reading, SHA-256 on
the fly, nothing kept on failure (the multipart upload aborted), server-made keys,
reads, deletes, and the REST API end to end with ``storage_backend="s3"``."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import re
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

from app.models import Artifact  # noqa: E402
from app.settings import Settings  # noqa: E402
from app.storage import TooLarge, make_storage  # noqa: E402
from app.storage_s3 import MiB, S3Storage, StorageUnavailable  # noqa: E402

try:
    from tests.api_support import API, Api, make_api, model_bytes  # noqa: F401
except ImportError:  # pytest run from inside tests/
    from api_support import API, Api, make_api, model_bytes  # type: ignore[no-redef]  # noqa: F401

ACCESS, SECRET_ACCESS, REGION = "testing-key", "testing-secret", "us-east-1"
KEY_SHAPE = re.compile(r"^(models|datasets|artifacts)/[0-9a-f]{2}/[0-9a-f]{32}$")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A real S3 endpoint over HTTP: moto's threaded server on a free local port."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_settings(s3_endpoint: str, tmp_path: Any) -> dict[str, Any]:
    """Settings values naming a fresh, empty bucket on the endpoint."""
    bucket = f"tt-{uuid.uuid4().hex[:12]}"
    values = {
        "storage_backend": "s3",
        "s3_endpoint_url": s3_endpoint,
        "s3_bucket": bucket,
        "s3_region": REGION,
        "s3_access_key_id": ACCESS,
        "s3_secret_access_key": SECRET_ACCESS,
        "s3_prefix": "tenant-a/",
    }
    raw = Settings(data_dir=tmp_path / "data", **values)
    S3Storage.from_settings(raw).client.create_bucket(Bucket=bucket)
    return values


@pytest.fixture
def storage(s3_settings: dict[str, Any], tmp_path: Any) -> S3Storage:
    s = make_storage(Settings(data_dir=tmp_path / "data", **s3_settings))
    assert isinstance(s, S3Storage)
    s.part_bytes = 5 * MiB  # S3's minimum part: multipart kicks in on small test data
    return s


def _objects(storage: S3Storage) -> list[str]:
    r = storage.client.list_objects_v2(Bucket=storage.bucket)
    return sorted(o["Key"] for o in r.get("Contents", []))


def _pending_uploads(storage: S3Storage) -> list[Any]:
    return storage.client.list_multipart_uploads(Bucket=storage.bucket).get("Uploads", [])  # type: ignore[no-any-return]


def _record(storage: S3Storage, method: str) -> list[dict[str, Any]]:
    """Record the keyword arguments of every call of one client method."""
    calls: list[dict[str, Any]] = []
    real = getattr(storage.client, method)

    def spy(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(**kwargs)

    setattr(storage.client, method, spy)
    return calls


def _chunks(data: bytes, size: int = MiB) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_small_save_is_one_put_with_hash_size_and_prefix(storage: S3Storage) -> None:
    data = b"hello " * 1000
    stored = storage.save(_chunks(data, 100), kind="models", max_bytes=len(data))
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert KEY_SHAPE.match(stored.key)
    assert _objects(storage) == [f"tenant-a/{stored.key}"]
    with storage.open(stored.key) as f:
        assert f.read() == data


def test_large_save_streams_as_bounded_multipart_parts(storage: S3Storage) -> None:
    data = os.urandom(12 * MiB + 123)
    parts = _record(storage, "upload_part")
    stored = storage.save(_chunks(data, 256 * 1024), kind="artifacts", max_bytes=len(data))
    assert stored.size == len(data) and stored.sha256 == hashlib.sha256(data).hexdigest()
    sizes = [len(p["Body"]) for p in parts]
    assert len(sizes) == 3 and sum(sizes) == len(data)
    assert all(5 * MiB <= s < 5 * MiB + 256 * 1024 for s in sizes[:-1])  # memory: one part plus one chunk
    assert b"".join(storage.iter_chunks(stored.key)) == data
    assert storage.size(stored.key) == len(data)
    assert _pending_uploads(storage) == []


def test_over_the_cap_raises_too_large_aborts_the_upload_and_keeps_nothing(storage: S3Storage) -> None:
    started = _record(storage, "create_multipart_upload")
    aborted = _record(storage, "abort_multipart_upload")
    read: list[int] = []

    def body() -> Iterator[bytes]:
        for _ in range(20):  # 20 MiB offered; the cap is 7
            read.append(1)
            yield os.urandom(MiB)

    with pytest.raises(TooLarge):
        storage.save(body(), kind="models", max_bytes=7 * MiB)
    assert len(read) == 8  # enforced while reading: stopped at the first chunk past the cap
    assert len(started) == 1 and len(aborted) == 1  # a part had gone up; the upload was aborted
    assert _pending_uploads(storage) == []
    assert _objects(storage) == []


def test_exactly_the_cap_is_accepted_and_a_declared_size_over_it_is_refused_before_reading(
    storage: S3Storage,
) -> None:
    assert storage.save([b"x" * 10], kind="models", max_bytes=10).size == 10

    def never() -> Iterator[bytes]:
        raise AssertionError("read despite the declared size")
        yield b""

    with pytest.raises(TooLarge):
        storage.save(never(), kind="models", max_bytes=10, expected_bytes=11)
    assert len(_objects(storage)) == 1


def test_a_failing_stream_mid_upload_leaves_nothing(storage: S3Storage) -> None:
    def body() -> Iterator[bytes]:
        yield os.urandom(6 * MiB)  # one part uploaded
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        storage.save(body(), kind="datasets", max_bytes=100 * MiB)
    assert _pending_uploads(storage) == [] and _objects(storage) == []


def test_async_save_streams_and_enforces_the_cap(storage: S3Storage) -> None:
    data = os.urandom(6 * MiB)

    async def body(payload: bytes) -> AsyncIterator[bytes]:
        for c in _chunks(payload):
            yield c

    stored = asyncio.run(storage.save_async(body(data), kind="models", max_bytes=len(data)))
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(TooLarge):
        asyncio.run(storage.save_async(body(data), kind="models", max_bytes=len(data) - 1))
    assert _objects(storage) == [f"tenant-a/{stored.key}"]
    assert _pending_uploads(storage) == []


def test_keys_are_server_made_and_checked_before_use(storage: S3Storage) -> None:
    keys = {storage.save([b"x"], kind="datasets", max_bytes=1).key for _ in range(5)}
    assert len(keys) == 5 and all(k.startswith("datasets/") and KEY_SHAPE.match(k) for k in keys)
    for bad in ("../etc/passwd", "models/ab/../../x", "models/zz/" + "0" * 32, "tenant-a/models/ab/" + "0" * 32, ""):
        with pytest.raises(ValueError):
            storage.open(bad)
        with pytest.raises(ValueError):
            storage.delete(bad)


def test_open_missing_raises_file_not_found_delete_is_idempotent(storage: S3Storage) -> None:
    stored = storage.save([b"abc"], kind="artifacts", max_bytes=3)
    storage.delete(stored.key)
    storage.delete(stored.key)
    assert _objects(storage) == []
    with pytest.raises(FileNotFoundError):
        storage.open(stored.key)


def test_save_file_and_local_copy(storage: S3Storage, tmp_path: Any) -> None:
    src = tmp_path / "model.pt"
    src.write_bytes(os.urandom(3 * MiB))
    stored = storage.save_file(src, kind="artifacts")
    assert stored.size == src.stat().st_size
    with storage.local_copy(stored.key) as path:
        assert path.read_bytes() == src.read_bytes()
        assert path.name == stored.key.rsplit("/", 1)[-1]
    assert not path.exists() and not path.parent.exists()


def test_settings_and_readiness(storage: S3Storage, s3_settings: dict[str, Any], tmp_path: Any) -> None:
    storage.check_free_space(0)  # the bucket answers
    missing = make_storage(Settings(data_dir=tmp_path, **{**s3_settings, "s3_bucket": "no-such-bucket"}))
    with pytest.raises(StorageUnavailable):
        missing.check_free_space(0)
    with pytest.raises(ValueError, match="TENSORTRIM_S3_BUCKET"):
        Settings(data_dir=tmp_path, storage_backend="s3")
    assert type(make_storage(Settings(data_dir=tmp_path))).__name__ == "LocalStorage"


def test_api_upload_and_artifact_download_through_s3(
    make_api: Callable[..., Api], s3_settings: dict[str, Any]
) -> None:
    from app.jobs import state

    api = make_api(max_upload_bytes=6 * MiB, **s3_settings)
    storage = api.app.state.storage
    assert isinstance(storage, S3Storage)
    storage.part_bytes = 5 * MiB
    user = api.user()
    data = model_bytes()

    model = api.upload_model(user, data, input_spec="3,16,16")  # inspected from a local copy
    assert model["sha256"] == hashlib.sha256(data).hexdigest() and model["size_bytes"] == len(data)
    assert model["status"] == "ready"
    assert not api.storage_dir.exists()  # nothing on the local disk
    objects = _objects(storage)
    assert len(objects) == 1 and objects[0].startswith("tenant-a/models/")

    job = api.create_job(user, model["id"])["id"]
    with api.session() as s:
        attempt = state.claim(s, uuid.UUID(job), stale_after=dt.timedelta(minutes=2))
        s.commit()
    payload = os.urandom(6 * MiB + 7)  # multipart
    with api.session() as s:
        stored = storage.save(_chunks(payload), kind="artifacts", max_bytes=len(payload))
        s.add(Artifact(job_id=uuid.UUID(job), name="model.pt", storage_key=stored.key, sha256=stored.sha256,
                       size_bytes=stored.size))
        assert attempt is not None and state.succeed(s, uuid.UUID(job), attempt, metrics={})
        s.commit()

    r = api.client.get(f"{API}/jobs/{job}/artifacts/model.pt", headers=user)
    assert r.status_code == 200
    assert r.content == payload
    assert r.headers["content-length"] == str(len(payload))
    assert r.headers["etag"] == f'"{hashlib.sha256(payload).hexdigest()}"'
    assert r.headers["content-disposition"] == 'attachment; filename="model.pt"'

    assert api.client.delete(f"{API}/jobs/{job}", headers=user).status_code == 204
    assert api.client.delete(f"{API}/models/{model['id']}", headers=user).status_code == 204
    assert _objects(storage) == []

    # A large multipart upload: the cap is enforced while reading, after a 5 MiB part already
    # went up, and that multipart upload is aborted. (TestClient hands the app the whole body
    # in one message; a real ASGI server sends pieces, so re-chunk what reaches the storage.)
    started = _record(storage, "create_multipart_upload")
    real_save_async = storage.save_async

    async def in_pieces(chunks: Any, **kwargs: Any) -> Any:
        async def pieces() -> AsyncIterator[bytes]:
            async for c in chunks:
                for piece in _chunks(c):
                    yield piece

        return await real_save_async(pieces(), **kwargs)

    storage.save_async = in_pieces  # type: ignore[method-assign]
    big = {"file": ("big.pt", os.urandom(8 * MiB), "application/octet-stream")}
    too_big = api.client.post(f"{API}/models", headers=user, files=big)
    assert too_big.status_code == 413 and too_big.json()["code"] == "too_large"
    assert len(started) == 1
    assert _objects(storage) == [] and _pending_uploads(storage) == []


def test_an_object_store_outage_is_a_503_to_retry_and_keeps_nothing(
    make_api: Callable[..., Api], s3_settings: dict[str, Any]
) -> None:
    down = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    api = make_api(**{**s3_settings, "s3_endpoint_url": down})
    user = api.user()
    r = api.client.post(f"{API}/models", headers=user, params={"input_spec": "3,16,16"}, content=model_bytes())
    assert r.status_code == 503, r.text
    assert r.json()["code"] == "storage_unavailable" and "nothing was stored" in r.json()["detail"]
    assert int(r.headers["Retry-After"]) > 0
    assert api.client.get(f"{API}/models", headers=user).json()["items"] == []
