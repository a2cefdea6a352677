"""Browser sessions for the web UI: a signed cookie instead of ``Authorization: Bearer``.

Signing in with an API key sets ``tt_session`` (HttpOnly, SameSite=Lax, Secure on
https) to ``<key hash>.<issued at>.<signature>``: it references the key by its stored
HMAC (``ApiKey.token_hash``), never the token itself, and is signed with the
server's secret, so it can be neither read back into a key nor forged. Every
request re-checks the key: revoking it (or disabling its user) ends the session.

CSRF: ``tt_csrf`` holds a random nonce; the token pages embed is
HMAC(secret, nonce). Every unsafe request must send that token, as the form field
``csrf_token`` or the ``X-CSRF-Token`` header (what the pages' fetch/XHR calls do),
and, when the browser sends ``Origin``, come from this site. A cross-site page can
neither read the nonce nor compute the token. Signing in rotates the nonce.

:func:`cookie_or_bearer_key` is a drop-in for ``app.api.deps.current_key`` that
accepts either way of signing in, for wiring the session into ``/api/v1``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.deps import SessionDep, SettingsDep, current_key
from app.auth import LAST_USED_RESOLUTION, has_scope
from app.db import utcnow
from app.models import ApiKey, User
from app.problems import Forbidden, Problem
from app.settings import Settings

SESSION_COOKIE = "tt_session"
CSRF_COOKIE = "tt_csrf"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SESSION_MAX_AGE_S = 12 * 3600
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class SignInRequired(Problem):
    status, code = 401, "unauthorized"


class CsrfFailed(Problem):
    status, code = 403, "csrf_failed"


def _secret(settings: Settings) -> bytes:
    return settings.secret_key.get_secret_value().encode()


def _mac(settings: Settings, purpose: str, payload: str) -> str:
    digest = hmac.new(_secret(settings), f"tensortrim-ui:{purpose}:{payload}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


# --- the session cookie ------------------------------------------------------------------


def session_cookie_value(settings: Settings, key: ApiKey, now: float | None = None) -> str:
    payload = f"{key.token_hash}.{int(now if now is not None else time.time())}"
    return f"{payload}.{_mac(settings, 'session', payload)}"


def key_hash_from_cookie(settings: Settings, value: str | None, now: float | None = None) -> str | None:
    """The key hash a valid, unexpired session cookie names, or None."""
    if not value or value.count(".") != 2:
        return None
    key_hash, issued, sig = value.split(".")
    if not hmac.compare_digest(sig, _mac(settings, "session", f"{key_hash}.{issued}")):
        return None
    if not issued.isdigit() or not 0 <= (now if now is not None else time.time()) - int(issued) < SESSION_MAX_AGE_S:
        return None
    return key_hash


def _live_key(session: Session, key_hash: str) -> ApiKey | None:
    key = session.scalars(
        select(ApiKey)
        .join(User)
        .where(ApiKey.token_hash == key_hash, ApiKey.revoked_at.is_(None), User.disabled_at.is_(None))
    ).one_or_none()
    now = utcnow()
    if key is not None and (key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION):
        key.last_used_at = now
    return key


def set_session(response: Response, request: Request, settings: Settings, key: ApiKey) -> None:
    response.set_cookie(
        SESSION_COOKIE, session_cookie_value(settings, key), max_age=SESSION_MAX_AGE_S, path="/",
        httponly=True, samesite="lax", secure=request.url.scheme == "https",
    )


def clear_session(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/")


# --- CSRF ----------------------------------------------------------------------------------


def csrf_nonce(request: Request) -> str:
    """This browser's CSRF nonce; a new one (set on the response by :func:`persist_csrf`) if absent."""
    nonce = getattr(request.state, "csrf_nonce", None)
    if nonce is None:
        nonce = request.cookies.get(CSRF_COOKIE) or ""
        if len(nonce) < 20:
            nonce = secrets.token_urlsafe(24)
            request.state.csrf_new = True
        request.state.csrf_nonce = nonce
    return nonce


def rotate_csrf(request: Request) -> None:
    request.state.csrf_nonce = secrets.token_urlsafe(24)
    request.state.csrf_new = True


def csrf_token(request: Request, settings: Settings) -> str:
    return _mac(settings, "csrf", csrf_nonce(request))


def persist_csrf(request: Request, response: Response) -> None:
    if getattr(request.state, "csrf_new", False):
        response.set_cookie(
            CSRF_COOKIE, request.state.csrf_nonce, path="/", httponly=True, samesite="lax",
            secure=request.url.scheme == "https",
        )


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    parts = urlsplit(origin)
    return parts.netloc == request.headers.get("host", request.url.netloc) and parts.scheme in ("http", "https")


def check_csrf(request: Request, settings: Settings, submitted: str | None) -> None:
    """Raise :class:`CsrfFailed` unless ``submitted`` is this browser's token and the request is same-origin."""
    nonce = request.cookies.get(CSRF_COOKIE)
    if not _same_origin(request):
        raise CsrfFailed("cross-origin request refused")
    if not nonce or not submitted or not hmac.compare_digest(submitted, _mac(settings, "csrf", nonce)):
        raise CsrfFailed("missing or stale CSRF token: reload the page and try again")


# --- dependencies --------------------------------------------------------------------------


def optional_ui_key(request: Request, session: SessionDep, settings: SettingsDep) -> ApiKey | None:
    """The signed-in browser's API key, or None (pages redirect to the sign-in form)."""
    key_hash = key_hash_from_cookie(settings, request.cookies.get(SESSION_COOKIE))
    return _live_key(session, key_hash) if key_hash else None


OptionalUiKeyDep = Annotated[ApiKey | None, Depends(optional_ui_key)]


def _check_scope(request: Request, key: ApiKey) -> None:
    scope = "read" if request.method in _SAFE_METHODS else "write"
    if not has_scope(key, scope):
        raise Forbidden(f"this API key lacks the {scope!r} scope; sign in with a key that has it")


def ui_key(request: Request, key: OptionalUiKeyDep, settings: SettingsDep) -> ApiKey:
    """For the pages' own fetch/XHR endpoints: session cookie required, CSRF header on writes."""
    if key is None:
        raise SignInRequired("not signed in, or the session expired: sign in again at /ui/login")
    if request.method not in _SAFE_METHODS:
        check_csrf(request, settings, request.headers.get(CSRF_HEADER))
    _check_scope(request, key)
    return key


UiKeyDep = Annotated[ApiKey, Depends(ui_key)]


def ui_user(key: UiKeyDep) -> User:
    return key.user


UiUserDep = Annotated[User, Depends(ui_user)]


def cookie_or_bearer_key(request: Request, session: SessionDep, settings: SettingsDep) -> ApiKey:
    """``Authorization: Bearer`` when sent (exactly as ``current_key``), else the UI's session
    cookie with the CSRF header on writes. Meant to replace ``current_key`` in app/api/deps.py."""
    if request.headers.get("authorization") or SESSION_COOKIE not in request.cookies:
        return current_key(request, session, settings)
    return ui_key(request, optional_ui_key(request, session, settings), settings)
