"""S3-compatible object storage for uploads and job artifacts (``TENSORTRIM_STORAGE_BACKEND=s3``).

The same interface and guarantees as :class:`app.storage.LocalStorage`:

* keys are made here (``<kind>/<2 hex>/<32 hex>``) and checked against that shape before
  any object name is built (``<prefix><key>``), so a tampered row cannot name another object;
* ``save`` streams: bytes are buffered up to one part (8 MiB by default, S3's minimum is
  5 MiB) and sent as a multipart upload, so memory stays bounded whatever the size; the
  size cap is enforced on what arrives and the SHA-256 is computed on the fly;
* nothing is visible until the upload completes (a multipart upload is invisible until
  ``CompleteMultipartUpload``, like the local temporary file before its rename); on any
  failure, the cap included, the multipart upload is aborted and nothing is kept.

Readers that need a file on disk (the inspection sandbox) use :meth:`S3Storage.local_copy`;
downloads stream the object (:meth:`S3Storage.download_response`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.storage import _KEY, Kind, StorageUnavailable, StoredFile, TooLarge

if TYPE_CHECKING:
    from starlette.responses import Response

    from app.settings import Settings

MiB = 1 << 20
MIN_PART_BYTES = 5 * MiB  # S3's floor for every part but the last
DEFAULT_PART_BYTES = 8 * MiB
_MISSING = {"NoSuchKey", "404", "NotFound"}


def _normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


class S3Storage:
    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        prefix: str = "",
        part_bytes: int = DEFAULT_PART_BYTES,
        tmp_dir: Path | None = None,
    ) -> None:
        if not bucket:
            raise ValueError("an S3 bucket name is required")
        if part_bytes < MIN_PART_BYTES:
            raise ValueError(f"parts must be at least {MIN_PART_BYTES} bytes")
        self.client = client
        self.bucket = bucket
        self.prefix = _normalise_prefix(prefix)
        self.part_bytes = part_bytes
        self.tmp_dir = tmp_dir  # where local_copy() downloads to (None: the system's temp dir)

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
        config = Config(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            # Path-style works with every S3-compatible server (MinIO, moto, Ceph); AWS accepts it too.
            s3={"addressing_style": "path"} if settings.s3_endpoint_url else None,
            # Only the checksums S3 requires: several S3-compatible servers reject the newer defaults.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.s3_endpoint_url or None,
            region_name=settings.s3_region or None,
            aws_access_key_id=settings.s3_access_key_id or None,
            aws_secret_access_key=secret,
            config=config,
        )
        return cls(client, settings.s3_bucket, prefix=settings.s3_prefix)

    # ------------------------------------------------------------------ names and reads
    def object_name(self, key: str) -> str:
        if not _KEY.match(key):
            raise ValueError(f"not a storage key: {key!r}")
        return self.prefix + key

    def open(self, key: str) -> BinaryIO:
        """A streaming, file-like reader (``read(n)``, ``close()``, a context manager).
        A missing object raises ``FileNotFoundError``, as the local backend does."""
        return self._get(key)["Body"]  # type: ignore[no-any-return]

    def iter_chunks(self, key: str, chunk_bytes: int = MiB) -> Iterator[bytes]:
        with self.open(key) as body:
            yield from iter(lambda: body.read(chunk_bytes), b"")

    def size(self, key: str) -> int:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.object_name(key))
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, key) from e
        return int(head["ContentLength"])

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        """The object downloaded to a private temporary file (named like the key's last
        part, as the local path is), removed on exit."""
        name = self.object_name(key).rsplit("/", 1)[-1]
        tmp = Path(tempfile.mkdtemp(prefix="tt-s3-", dir=self.tmp_dir))
        try:
            dest = tmp / name
            with self.open(key) as src, dest.open("wb") as out:
                shutil.copyfileobj(src, out, MiB)
            yield dest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def download_response(
        self,
        key: str,
        *,
        filename: str,
        headers: Mapping[str, str] | None = None,
        media_type: str = "application/octet-stream",
    ) -> Response:
        """The object as a streamed HTTP attachment (Content-Length from the store)."""
        from urllib.parse import quote

        from starlette.responses import StreamingResponse

        obj = self._get(key)
        body = obj["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from iter(lambda: body.read(MiB), b"")
            finally:
                body.close()

        quoted = quote(filename)
        disposition = (
            f"attachment; filename*=utf-8''{quoted}" if quoted != filename else f'attachment; filename="{filename}"'
        )
        out = {"Content-Length": str(obj["ContentLength"]), "Content-Disposition": disposition, **(headers or {})}
        return StreamingResponse(chunks(), media_type=media_type, headers=out)

    def delete(self, key: str) -> None:
        name = self.object_name(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=name)
        except (ClientError, BotoCoreError) as e:
            if self._code(e) not in _MISSING:
                raise StorageUnavailable(f"deleting an object failed: {self._code(e) or e}") from e

    def check_free_space(self, needed: int) -> None:
        """An object store has no volume to fill: this checks the bucket answers (readiness)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as e:
            raise StorageUnavailable(f"bucket {self.bucket!r} is not reachable: {e}") from e

    # ------------------------------------------------------------------ writes
    def save(
        self, chunks: Iterable[bytes], *, kind: Kind, max_bytes: int, expected_bytes: int | None = None
    ) -> StoredFile:
        """Store a stream of byte chunks. ``expected_bytes`` (e.g. Content-Length) is
        refused early when over the cap; the cap is enforced on what actually arrives."""
        writer = _S3Writer(self, kind, max_bytes, expected_bytes)
        try:
            for chunk in chunks:
                if writer.write(chunk):
                    writer.flush()
            return writer.commit()
        finally:
            writer.discard()

    async def save_async(
        self, chunks: AsyncIterable[bytes], *, kind: Kind, max_bytes: int, expected_bytes: int | None = None
    ) -> StoredFile:
        """As ``save``, for a request body streamed by the ASGI server; network calls to
        the store run in a thread so the event loop keeps serving."""
        writer = _S3Writer(self, kind, max_bytes, expected_bytes)
        try:
            async for chunk in chunks:
                if writer.write(chunk):
                    await asyncio.to_thread(writer.flush)
            return await asyncio.to_thread(writer.commit)
        finally:
            await asyncio.to_thread(writer.discard)

    def save_file(self, source: Path, *, kind: Kind) -> StoredFile:
        """Copy a file we produced (a job artifact) into storage."""
        size = source.stat().st_size
        with source.open("rb") as f:
            return self.save(iter(lambda: f.read(MiB), b""), kind=kind, max_bytes=size, expected_bytes=size)

    # ------------------------------------------------------------------ helpers
    def _get(self, key: str) -> dict[str, Any]:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.object_name(key))  # type: ignore[no-any-return]
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, key) from e

    @staticmethod
    def _code(e: ClientError | BotoCoreError) -> str:
        response = getattr(e, "response", None) or {}
        return str(response.get("Error", {}).get("Code", ""))

    def _error(self, e: ClientError | BotoCoreError, key: str) -> Exception:
        code = self._code(e)
        if code in _MISSING:
            return FileNotFoundError(errno.ENOENT, "no such object in storage", key)
        return StorageUnavailable(f"reading an object failed: {code or e}")


class _S3Writer:
    """One object on its way into the bucket: a buffer of at most one part, then a
    multipart upload that becomes visible only on commit."""

    def __init__(self, storage: S3Storage, kind: Kind, max_bytes: int, expected_bytes: int | None) -> None:
        if expected_bytes is not None and expected_bytes > max_bytes:
            raise TooLarge(f"{expected_bytes} bytes declared, the limit is {max_bytes}")
        self.storage = storage
        self.max_bytes = max_bytes
        self.size = 0
        self.hash = hashlib.sha256()
        hex_ = uuid.uuid4().hex
        self.key = f"{kind}/{hex_[:2]}/{hex_}"
        self.name = storage.object_name(self.key)
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []
        self.done = False

    def write(self, chunk: bytes) -> bool:
        """Take a chunk; True when a full part is buffered and ``flush`` should run."""
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise TooLarge(f"more than {self.max_bytes} bytes")
        self.hash.update(chunk)
        self.buffer += chunk
        return len(self.buffer) >= self.storage.part_bytes

    def flush(self) -> None:
        """Send the buffered bytes as the next part (all parts but the last are >= 5 MiB)."""
        s = self.storage
        try:
            if self.upload_id is None:
                self.upload_id = s.client.create_multipart_upload(Bucket=s.bucket, Key=self.name)["UploadId"]
            number = len(self.parts) + 1
            r = s.client.upload_part(
                Bucket=s.bucket, Key=self.name, UploadId=self.upload_id, PartNumber=number, Body=bytes(self.buffer)
            )
        except (ClientError, BotoCoreError) as e:
            raise StorageUnavailable(f"uploading to the object store failed: {e}") from e
        self.parts.append({"PartNumber": number, "ETag": r["ETag"]})
        self.buffer.clear()

    def commit(self) -> StoredFile:
        s = self.storage
        try:
            if self.upload_id is None:  # it all fit in one part: a single PUT
                s.client.put_object(Bucket=s.bucket, Key=self.name, Body=bytes(self.buffer))
            else:
                if self.buffer:
                    self.flush()
                s.client.complete_multipart_upload(
                    Bucket=s.bucket, Key=self.name, UploadId=self.upload_id, MultipartUpload={"Parts": self.parts}
                )
        except (ClientError, BotoCoreError) as e:
            raise StorageUnavailable(f"uploading to the object store failed: {e}") from e
        self.done = True
        self.buffer.clear()
        return StoredFile(key=self.key, size=self.size, sha256=self.hash.hexdigest())

    def discard(self) -> None:
        """Abort the multipart upload unless commit() completed it."""
        self.buffer.clear()
        if self.done or self.upload_id is None:
            return
        s = self.storage
        with contextlib.suppress(ClientError, BotoCoreError):
            s.client.abort_multipart_upload(Bucket=s.bucket, Key=self.name, UploadId=self.upload_id)
        self.upload_id = None
