"""Property-based fuzzing of every operation in our OpenAPI document (schemathesis):
no 5xx, documented status codes and content types, and responses that conform to their
schemas. Runs against the real app (embedded mode, SQLite, real storage) with a valid
API key, a bounded number of examples per operation so it stays well under 2 minutes.
The broker call is a no-op: no job runs."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api_support import SECRET  # noqa: E402

MAX_EXAMPLES = 25
CHECKS = [schemathesis.checks.not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from fastapi.testclient import TestClient

    from app.api.deps import get_enqueue
    from app.auth import create_key
    from app.main import create_app
    from app.models import User
    from app.settings import Settings

    tmp = tmp_path_factory.mktemp("fuzz")
    settings_ = Settings(mode="embedded", data_dir=tmp / "data", storage_dir=tmp / "storage", min_free_bytes=0,
                         secret_key=SECRET, max_upload_bytes=1 << 20, rate_limit_per_s=0)
    app = create_app(settings_)
    app.dependency_overrides[get_enqueue] = lambda: (lambda job_id, queue=None: None)
    with TestClient(app, raise_server_exceptions=False) as client:
        with app.state.sessions() as s:
            user = User(email=f"{uuid.uuid4().hex[:8]}@example.com")
            s.add(user)
            s.flush()
            _, token = create_key(s, user, secret=SECRET, scopes=("read", "write"))
            s.commit()
        yield {"app": app, "client": client, "auth": {"Authorization": f"Bearer {token}"}, "storage": tmp / "storage"}


def _operations() -> dict[str, Any]:
    """Every operation of the document, read once at collection (no app start needed)."""
    from app.main import create_app
    from app.settings import Settings

    document = create_app(Settings(mode="embedded", secret_key=SECRET)).openapi()
    loaded = schemathesis.openapi.from_dict(document)
    return {op.label: op for op in (result.ok() for result in loaded.get_all_operations())}


OPERATIONS = _operations()


def _bytes(value: Any) -> Any:
    if isinstance(value, (bytes, str)) or hasattr(value, "read"):
        return value
    return json.dumps(value).encode()


def _files(files: Any) -> Any:
    """Multipart parts as httpx takes them: schemathesis may generate a non-string value
    for a part (e.g. an int for ``file``), which httpx cannot send (a client-side error)."""
    items = files.items() if isinstance(files, dict) else files
    out = []
    for name, value in items:
        value = (value[0], _bytes(value[1]), *value[2:]) if isinstance(value, tuple) else _bytes(value)
        out.append((name, value))
    return out


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_api_conforms_to_its_openapi_document(label: str, running: dict[str, Any]) -> None:
    client = running["client"]
    seen: list[int] = []

    @given(case=OPERATIONS[label].as_strategy())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        headers = {**(case.headers or {}), **running["auth"]}
        kwargs = case.as_transport_kwargs(base_url="http://testserver", headers=headers)
        kwargs.pop("follow_redirects", None)
        if kwargs.get("files"):
            kwargs["files"] = _files(kwargs["files"])
        request = client.build_request(**kwargs)
        request.read()  # multipart bodies stream; the checks read the request back
        response = client.send(request)
        seen.append(response.status_code)
        case.validate_response(response, checks=CHECKS)

    check()
    assert seen and max(seen) < 500, seen


def test_fuzzing_left_no_temporary_files(running: dict[str, Any]) -> None:
    tmp = Path(running["storage"]) / ".tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []
