"""Receiving an upload: the raw request body or one multipart file part, streamed
straight into storage with the size cap enforced while reading.

Starlette's ``request.form()`` spools file parts to disk with no size limit, so
multipart bodies are parsed here with python-multipart's streaming parser: file
bytes go to :meth:`LocalStorage.save_async` chunk by chunk, small text fields
(``input_spec``, ``name``, ``format``) are collected on the side.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.problems import InsufficientStorage, PayloadTooLarge, QuotaExceeded, Unprocessable
from app.services.quota import STORAGE_RETRY_AFTER_S
from app.storage import Kind, Storage, StorageFull, StoredFile, TooLarge

FILE_FIELD = "file"
MAX_FIELD_BYTES = 64 * 1024


@dataclass
class Upload:
    stored: StoredFile
    filename: str | None
    fields: dict[str, str] = field(default_factory=dict)


class _Multipart:
    """Feeds body chunks to the parser; yields the file part's bytes, keeps text fields."""

    def __init__(self, boundary: bytes) -> None:
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_seen = False
        self._out: list[bytes] = []
        self._headers: dict[bytes, bytes] = {}
        self._hname = b""
        self._hvalue = b""
        self._name = ""
        self._is_file = False
        self._buf = bytearray()
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
            },
        )

    def _part_begin(self) -> None:
        self._headers, self._buf = {}, bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._hname.lower()] = self._hvalue
        self._hname, self._hvalue = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        self._is_file = filename is not None
        if self._is_file:
            if self._name != FILE_FIELD:
                raise Unprocessable(
                    f"unexpected file field {self._name!r}: send the file in the field named {FILE_FIELD!r}",
                    field=self._name,
                )
            if self.file_seen:
                raise Unprocessable("send exactly one file per upload", field=FILE_FIELD)
            self.file_seen = True
            self.filename = filename.decode("utf-8", "replace") if filename else None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self._out.append(data[start:end])
            return
        self._buf += data[start:end]
        if len(self._buf) > MAX_FIELD_BYTES:
            raise Unprocessable(f"form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes", field=self._name)

    def _part_end(self) -> None:
        if not self._is_file:
            self.fields[self._name] = self._buf.decode("utf-8", "replace")

    async def file_chunks(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in body:
            try:
                self.parser.write(chunk)
            except MultipartParseError as exc:
                raise Unprocessable(f"malformed multipart body: {exc}", code="bad_multipart") from None
            for out in self._out:
                yield out
            self._out.clear()
        self.parser.finalize()


def safe_filename(name: str | None, default: str) -> str:
    """A display name only (storage keys are made by the server): last path component, printable, bounded."""
    if not name:
        return default
    base = PurePosixPath(PureWindowsPath(name).name).name
    base = "".join(c for c in base if c.isprintable()).strip()
    return base[:255] or default


async def receive_upload(
    request: Request,
    storage: Storage,
    *,
    kind: Kind,
    max_bytes: int,
    quota_left: int,
) -> Upload:
    """Store the request's file. ``max_bytes`` is the service's upload cap; ``quota_left``
    what the owner may still store. 413 / 429 / 507 leave nothing behind."""
    if quota_left <= 0:
        raise _quota_exceeded(quota_left)
    cap = min(max_bytes, quota_left)
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    declared = _content_length(request)
    multipart: _Multipart | None = None
    if content_type == b"multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise Unprocessable("multipart body without a boundary", code="bad_multipart")
        multipart = _Multipart(boundary)
        chunks = multipart.file_chunks(request.stream())
        # The body's length bounds the file's (plus a little framing): size the free-space check with it.
        expected = min(declared, cap) if declared is not None else None
    else:
        chunks = request.stream()
        expected = declared
    try:
        stored = await storage.save_async(chunks, kind=kind, max_bytes=cap, expected_bytes=expected)
    except TooLarge:
        if cap < max_bytes:
            raise _quota_exceeded(quota_left) from None
        raise PayloadTooLarge(
            f"the upload is larger than the limit of {max_bytes} bytes; nothing was stored", field=FILE_FIELD
        ) from None
    except StorageFull:
        raise InsufficientStorage(
            "the server's storage is full; nothing was stored. Try again later or ask an operator to free space"
        ) from None
    except ClientDisconnect:
        raise Unprocessable("the client disconnected before the upload finished", code="upload_incomplete") from None
    if multipart is None:
        return Upload(stored, None)
    if not multipart.file_seen:
        storage.delete(stored.key)
        raise Unprocessable(
            f"no file in the multipart body: send it as the form field {FILE_FIELD!r} (curl -F file=@model.pt)",
            field=FILE_FIELD,
        )
    return Upload(stored, multipart.filename, multipart.fields)


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None or not value.isdigit():
        return None
    return int(value)


def _quota_exceeded(quota_left: int) -> QuotaExceeded:
    return QuotaExceeded(
        _quota_message(quota_left),
        code="storage_quota_exceeded",
        field=FILE_FIELD,
        headers={"Retry-After": str(STORAGE_RETRY_AFTER_S)},
    )


def _quota_message(quota_left: int) -> str:
    left = max(quota_left, 0)
    return (
        f"this upload would exceed your storage quota ({left} bytes left); "
        "delete models, data sets or finished jobs you no longer need, then retry"
    )
