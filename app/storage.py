"""Local file storage for uploads and job artifacts.

Keys are made here (``<kind>/<2 hex>/<32 hex>``), never from user strings, and are
checked against that shape before any path is built, so even a tampered database
row cannot point outside the storage root. Writes stream into a temporary file in
the same directory tree, enforce the size cap while reading, hash on the fly, and
become visible only by an atomic rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal, Protocol

if TYPE_CHECKING:
    from starlette.responses import Response

    from app.settings import Settings

Kind = Literal["models", "datasets", "artifacts"]
_KEY = re.compile(r"^(models|datasets|artifacts)/[0-9a-f]{2}/[0-9a-f]{32}$")
_TMP = ".tmp"


class StorageError(Exception):
    code = "storage_error"


class StorageFull(StorageError):
    """Not enough free space on the storage volume (HTTP 507)."""

    code = "storage_full"


class StorageUnavailable(StorageError):
    """The storage backend failed a request (an object store down or refusing): HTTP 503,
    worth a retry, unlike a full disk."""

    code = "storage_unavailable"


class TooLarge(StorageError):
    """The stream went past the size cap (HTTP 413)."""

    code = "too_large"


@dataclass(frozen=True)
class StoredFile:
    key: str
    size: int
    sha256: str


class LocalStorage:
    def __init__(self, root: Path, *, min_free_bytes: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes

    def path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"not a storage key: {key!r}")
        return self.root / key

    def open(self, key: str) -> BinaryIO:
        return self.path(key).open("rb")

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        """A file on disk with the object's bytes, for readers that need a path (the
        inspection sandbox). Here it is the stored file itself; S3 downloads a copy."""
        yield self.path(key)

    def download_response(
        self,
        key: str,
        *,
        filename: str,
        headers: Mapping[str, str] | None = None,
        media_type: str = "application/octet-stream",
    ) -> Response:
        """The stored file as an HTTP attachment (sent with sendfile, ranges supported)."""
        from starlette.responses import FileResponse

        return FileResponse(self.path(key), media_type=media_type, filename=filename, headers=headers)

    def check_free_space(self, needed: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if free - needed < self.min_free_bytes:
            raise StorageFull(f"{free} bytes free, {needed} needed plus {self.min_free_bytes} kept in reserve")

    def save(
        self, chunks: Iterable[bytes], *, kind: Kind, max_bytes: int, expected_bytes: int | None = None
    ) -> StoredFile:
        """Store a stream of byte chunks. ``expected_bytes`` (e.g. Content-Length) only
        sizes the free-space check; the cap is enforced on what actually arrives."""
        writer = _Writer(self, kind, max_bytes, expected_bytes)
        try:
            for chunk in chunks:
                writer.write(chunk)
            return writer.commit()
        finally:
            writer.discard()

    async def save_async(
        self, chunks: AsyncIterable[bytes], *, kind: Kind, max_bytes: int, expected_bytes: int | None = None
    ) -> StoredFile:
        """As ``save``, for a request body streamed by the ASGI server."""
        writer = _Writer(self, kind, max_bytes, expected_bytes)
        try:
            async for chunk in chunks:
                writer.write(chunk)
            return writer.commit()
        finally:
            writer.discard()

    def save_file(self, source: Path, *, kind: Kind) -> StoredFile:
        """Copy a file we produced (a job artifact) into storage."""
        size = source.stat().st_size
        with source.open("rb") as f:
            return self.save(iter(lambda: f.read(1 << 20), b""), kind=kind, max_bytes=size, expected_bytes=size)


class Storage(Protocol):
    """What the API and the worker use of a storage backend: :class:`LocalStorage`, or
    :class:`app.storage_s3.S3Storage` (``TENSORTRIM_STORAGE_BACKEND=s3``)."""

    def open(self, key: str) -> BinaryIO: ...
    def delete(self, key: str) -> None: ...
    def check_free_space(self, needed: int) -> None: ...
    def local_copy(self, key: str) -> contextlib.AbstractContextManager[Path]: ...
    def download_response(
        self, key: str, *, filename: str, headers: Mapping[str, str] | None = None, media_type: str = ...
    ) -> Response: ...
    def save(
        self, chunks: Iterable[bytes], *, kind: Kind, max_bytes: int, expected_bytes: int | None = None
    ) -> StoredFile: ...
    async def save_async(
        self, chunks: AsyncIterable[bytes], *, kind: Kind, max_bytes: int, expected_bytes: int | None = None
    ) -> StoredFile: ...
    def save_file(self, source: Path, *, kind: Kind) -> StoredFile: ...


def make_storage(settings: Settings) -> Storage:
    """The configured backend: a local directory by default, an S3-compatible bucket optionally."""
    if settings.storage_backend == "s3":
        from app.storage_s3 import S3Storage  # lazy: boto3 is needed only for this backend

        return S3Storage.from_settings(settings)
    return LocalStorage(settings.storage_dir, min_free_bytes=settings.min_free_bytes)


class _Writer:
    """One temporary file on its way to becoming a stored object."""

    def __init__(self, storage: LocalStorage, kind: Kind, max_bytes: int, expected_bytes: int | None) -> None:
        if expected_bytes is not None and expected_bytes > max_bytes:
            raise TooLarge(f"{expected_bytes} bytes declared, the limit is {max_bytes}")
        # Without a declared size, assume the worst the cap allows rather than fill the disk.
        storage.check_free_space(expected_bytes if expected_bytes is not None else max_bytes)
        self.storage = storage
        self.kind = kind
        self.max_bytes = max_bytes
        self.size = 0
        self.hash = hashlib.sha256()
        tmp_dir = storage.root / _TMP
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=tmp_dir)
        self.tmp: Path | None = Path(name)
        self.file = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise TooLarge(f"more than {self.max_bytes} bytes")
        self.hash.update(chunk)
        try:
            self.file.write(chunk)
        except OSError as e:
            raise StorageFull(f"write failed: {e.strerror}") from e

    def commit(self) -> StoredFile:
        assert self.tmp is not None
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as e:
            raise StorageFull(f"write failed: {e.strerror}") from e
        self.file.close()
        hex_ = uuid.uuid4().hex
        key = f"{self.kind}/{hex_[:2]}/{hex_}"
        dest = self.storage.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.tmp, dest)
        self.tmp = None
        return StoredFile(key=key, size=self.size, sha256=self.hash.hexdigest())

    def discard(self) -> None:
        """Remove the temporary file unless commit() moved it into place."""
        if not self.file.closed:
            self.file.close()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None
