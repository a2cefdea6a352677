"""Local storage: server-made keys, the size cap enforced while streaming, nothing left behind."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from app.storage import LocalStorage, StorageFull, TooLarge

MiB = 1024 * 1024


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield bytes([sent % 251]) * n
        sent += n


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage")


def test_save_streams_hashes_and_renames_into_place(storage: LocalStorage) -> None:
    data = b"".join(_chunks(3 * MiB + 17))
    stored = storage.save(_chunks(3 * MiB + 17), kind="models", max_bytes=4 * MiB)
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.key.startswith("models/")
    assert storage.path(stored.key).read_bytes() == data
    assert _files(storage.root) == [storage.path(stored.key)]  # no temporary file left


def test_exactly_the_cap_is_accepted(storage: LocalStorage) -> None:
    assert storage.save(_chunks(MiB), kind="datasets", max_bytes=MiB).size == MiB


def test_over_the_cap_is_refused_and_leaves_nothing(storage: LocalStorage) -> None:
    consumed = 0

    def counting() -> Iterator[bytes]:
        nonlocal consumed
        for chunk in _chunks(100 * MiB):
            consumed += len(chunk)
            yield chunk

    with pytest.raises(TooLarge):
        storage.save(counting(), kind="models", max_bytes=MiB)
    assert consumed <= MiB + 64 * 1024, "the stream must be cut off at the cap, not read to the end"
    assert _files(storage.root) == []


def test_declared_size_over_the_cap_is_refused_before_reading(storage: LocalStorage) -> None:
    def never() -> Iterator[bytes]:
        raise AssertionError("must not read")
        yield b""

    with pytest.raises(TooLarge):
        storage.save(never(), kind="models", max_bytes=MiB, expected_bytes=MiB + 1)
    assert _files(storage.root) == []


def test_client_disconnect_mid_stream_leaves_nothing(storage: LocalStorage) -> None:
    def broken() -> Iterator[bytes]:
        yield b"x" * 1000
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        storage.save(broken(), kind="models", max_bytes=MiB)
    assert _files(storage.root) == []


def test_free_space_is_checked_first(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "s", min_free_bytes=1 << 62)  # more than any disk
    with pytest.raises(StorageFull):
        storage.save(_chunks(10), kind="models", max_bytes=MiB, expected_bytes=10)
    assert _files(storage.root) == []


def test_disk_filling_up_mid_write_becomes_storage_full_and_leaves_nothing(
    storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f: BinaryIO) -> None:
            self.f = f

        def write(self, _chunk: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> object:
            return getattr(self.f, name)

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(StorageFull, match="No space left"):
        storage.save(_chunks(MiB), kind="models", max_bytes=MiB)
    assert _files(storage.root) == []


def test_async_save_enforces_the_cap_too(storage: LocalStorage) -> None:
    async def body(total: int) -> AsyncIterator[bytes]:
        for chunk in _chunks(total):
            yield chunk

    stored = asyncio.run(storage.save_async(body(1000), kind="models", max_bytes=1000))
    assert stored.size == 1000
    with pytest.raises(TooLarge):
        asyncio.run(storage.save_async(body(1001), kind="models", max_bytes=1000))
    assert _files(storage.root) == [storage.path(stored.key)]


def test_keys_are_unique_and_made_by_the_server(storage: LocalStorage) -> None:
    keys = {storage.save([b"same"], kind="artifacts", max_bytes=10).key for _ in range(20)}
    assert len(keys) == 20


@pytest.mark.parametrize(
    "key",
    [
        "../etc/passwd",
        "models/../../x",
        "/etc/passwd",
        "models/ab/../../../../etc",
        "models/ab/net.pt",
        "other/ab/" + "a" * 32,
    ],
)
def test_paths_are_built_only_from_well_formed_keys(storage: LocalStorage, key: str) -> None:
    with pytest.raises(ValueError):
        storage.path(key)


def test_save_file_and_delete(storage: LocalStorage, tmp_path: Path) -> None:
    src = tmp_path / "model.pt"
    src.write_bytes(b"abc" * 1000)
    stored = storage.save_file(src, kind="artifacts")
    with storage.open(stored.key) as f:
        assert f.read() == src.read_bytes()
    storage.delete(stored.key)
    assert not storage.path(stored.key).exists()
