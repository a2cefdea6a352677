"""The web UI's sessions and CSRF protection, and its pages, through the ASGI app
(no browser): sign in with a key, the cookie never holds the key, every write needs
the CSRF token, another user's job is a 404 page, the budget pre-check."""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path

from app.ui.deps import CSRF_COOKIE, SESSION_COOKIE, key_hash_from_cookie

try:
    from tests.api_support import API, Api, api, assert_problem, make_api, model_bytes  # noqa: F401
except ImportError:  # pytest run from inside tests/
    from api_support import API, Api, api, assert_problem, make_api, model_bytes  # type: ignore[no-redef]  # noqa: F401


_INSPECTED: dict[tuple[str, str], dict[str, object]] = {}


def _inspect_once(path: Path, spec: str, timeout: float) -> dict[str, object]:
    """The real sandboxed inspector, once per file and spec (it takes seconds)."""
    from app.services.sandbox import default_model_inspector

    key = (hashlib.sha256(path.read_bytes()).hexdigest(), spec)
    if key not in _INSPECTED:
        _INSPECTED[key] = default_model_inspector()(path, spec, timeout)
    return _INSPECTED[key]


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf-token" content="([^"]+)"', html)
    assert m, html[:500]
    return m.group(1)


def _token(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def sign_in(api: Api, headers: dict[str, str]) -> str:
    """Sign the test client in; returns the CSRF token of the signed-in session."""
    c = api.client
    page = c.get("/ui/login")
    r = c.post("/ui/login", data={"api_key": _token(headers), "csrf_token": _csrf(page.text), "next": "/ui/jobs"},
               follow_redirects=False)
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/ui/jobs"
    return _csrf(c.get("/ui/jobs").text)


def test_pages_redirect_to_sign_in(api: Api) -> None:
    r = api.client.get("/ui/jobs/new", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login?next=/ui/jobs/new"
    r = api.client.get("/ui/", follow_redirects=True)
    assert r.status_code == 200 and "Sign in" in r.text
    assert_problem(api.client.post("/ui/api/jobs", json={}), 401, "unauthorized")


def test_session_cookie_references_the_key_hash_not_the_key(api: Api) -> None:
    headers = api.user()
    sign_in(api, headers)
    cookie = api.client.cookies[SESSION_COOKIE]
    assert _token(headers) not in cookie
    from app.auth import hash_token

    assert key_hash_from_cookie(api.settings, cookie) == hash_token(api.settings.secret_key.get_secret_value(),
                                                                   _token(headers))
    # a tampered cookie is no session
    api.client.cookies.set(SESSION_COOKIE, cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB"))
    assert api.client.get("/ui/jobs", follow_redirects=False).status_code == 303


def test_cookie_flags(api: Api) -> None:
    headers = api.user()
    c = api.client
    page = c.get("/ui/login")
    r = c.post("/ui/login", data={"api_key": _token(headers), "csrf_token": _csrf(page.text)}, follow_redirects=False)
    set_cookies = r.headers.get_list("set-cookie")
    session = next(h for h in set_cookies if h.startswith(SESSION_COOKIE + "="))
    assert "HttpOnly" in session and "SameSite=lax" in session and "Path=/" in session
    assert any(h.startswith(CSRF_COOKIE + "=") for h in set_cookies), "signing in rotates the CSRF nonce"


def test_sign_in_needs_csrf_and_a_valid_key(api: Api) -> None:
    headers = api.user()
    c = api.client
    r = c.post("/ui/login", data={"api_key": _token(headers), "csrf_token": "forged"}, follow_redirects=False)
    assert_problem(r, 403, "csrf_failed")
    page = c.get("/ui/login")
    r = c.post("/ui/login", data={"api_key": "tt_wrong", "csrf_token": _csrf(page.text)})
    assert r.status_code == 401 and 'id="api_key-error"' in r.text
    assert SESSION_COOKIE not in c.cookies


def test_writes_need_the_csrf_header_and_same_origin(api: Api) -> None:
    headers = api.user()
    csrf = sign_in(api, headers)
    model = api.upload_model(headers)
    body = {"model_id": model["id"], "budget": "flops:2x", "input_spec": "3,16,16"}
    assert_problem(api.client.post("/ui/api/jobs", json=body), 403, "csrf_failed")
    assert_problem(api.client.post("/ui/api/jobs", json=body, headers={"X-CSRF-Token": "x" * 43}), 403, "csrf_failed")
    r = api.client.post("/ui/api/jobs", json=body,
                        headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"})
    assert_problem(r, 403, "csrf_failed")
    r = api.client.post("/ui/api/jobs", json=body, headers={"X-CSRF-Token": csrf, "Origin": "http://testserver"})
    assert r.status_code == 201, r.text
    assert len(api.enqueued.calls) == 1


def test_revoking_the_key_ends_the_session(api: Api) -> None:
    headers = api.user()
    sign_in(api, headers)
    assert api.client.get("/ui/jobs").status_code == 200
    from sqlalchemy import update

    from app.models import ApiKey

    with api.session() as s:
        s.execute(update(ApiKey).values(revoked_at=ApiKey.created_at))
        s.commit()
    assert api.client.get("/ui/jobs", follow_redirects=False).status_code == 303


def test_sign_out(api: Api) -> None:
    headers = api.user()
    csrf = sign_in(api, headers)
    assert api.client.post("/ui/logout", data={"csrf_token": "nope"}).status_code == 403
    r = api.client.post("/ui/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303
    assert api.client.get("/ui/jobs", follow_redirects=False).status_code == 303


def test_other_users_job_is_a_404_page(api: Api) -> None:
    alice, bob = api.user(), api.user()
    model = api.upload_model(alice)
    job = api.create_job(alice, model["id"])
    sign_in(api, bob)
    r = api.client.get(f"/ui/jobs/{job['id']}")
    assert r.status_code == 404 and "Not found" in r.text and "text/html" in r.headers["content-type"]
    assert api.client.get(f"/ui/jobs/{uuid.uuid4()}").status_code == 404
    assert api.client.get("/ui/jobs/not-a-uuid").status_code == 404
    assert api.client.get(f"/ui/jobs/{job['id']}/artifacts/model.pt").status_code == 404
    csrf = _csrf(api.client.get("/ui/jobs").text)
    assert_problem(api.client.post(f"/ui/api/jobs/{job['id']}/cancel", headers={"X-CSRF-Token": csrf}), 404)
    assert_problem(api.client.get(f"/ui/api/jobs/{job['id']}/events"), 404)
    # and alice sees it, in her list too
    sign_in(api, alice)
    assert api.client.get(f"/ui/jobs/{job['id']}").status_code == 200
    assert f"/ui/jobs/{job['id']}" in api.client.get("/ui/jobs").text


def test_impossible_budget_is_refused_on_the_budget_field(api: Api) -> None:
    from app.api.deps import get_model_inspector

    api.app.dependency_overrides[get_model_inspector] = lambda: _inspect_once
    headers = api.user()
    csrf = sign_in(api, headers)
    model = api.upload_model(headers, input_spec="3,16,16")
    assert model["inventory"], "the real inspector ran"
    for budget, code in (("flops:1000x", "invalid_budget"), ("params:1000x", "invalid_budget"),
                         ("flops:0.5x", "validation_error")):
        r = api.client.post("/ui/api/jobs", json={"model_id": model["id"], "budget": budget},
                            headers={"X-CSRF-Token": csrf})
        body = assert_problem(r, 422, code, field="budget")
        if code == "invalid_budget":
            assert "largest reachable reduction" in body["detail"], body
    assert api.enqueued.calls == []
    r = api.client.post("/ui/api/jobs", json={"model_id": model["id"], "budget": "flops:1.5x"},
                        headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201, r.text


def test_static_files_and_security_headers(api: Api) -> None:
    r = api.client.get("/ui/static/app.css")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/css")
    assert api.client.get("/ui/static/..%2Fmain.py").status_code == 404
    page = api.client.get("/ui/login")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "http" not in re.sub(r'xmlns="http://www.w3.org/2000/svg"', "", page.text.split("<body>")[0]), (
        "nothing is loaded from elsewhere"
    )
