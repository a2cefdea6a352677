"""API keys: ``Authorization: Bearer tt_...``.

The token is shown once, at creation. The database keeps HMAC-SHA256(secret_key,
token): a leaked database cannot be replayed as keys without the server secret,
and lookup stays a single indexed equality on the hash (a plain password hash with
a per-row salt could not be looked up at all). Functions never commit: the
request's session does.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import uuid
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import utcnow
from app.models import ApiKey, User

TOKEN_PREFIX = "tt_"
SCOPES = frozenset({"read", "write"})
# last_used_at is a hint, not an audit log: update it at most this often per key.
LAST_USED_RESOLUTION = dt.timedelta(minutes=1)


def hash_token(secret: str, token: str) -> str:
    return hmac.new(secret.encode(), token.encode(), hashlib.sha256).hexdigest()


def create_key(
    session: Session, user: User, *, secret: str, name: str = "default", scopes: Iterable[str] = ("read", "write")
) -> tuple[ApiKey, str]:
    """Make a key for ``user``. Returns the row and the token; the token is not kept anywhere."""
    scope_list = sorted(set(scopes))
    if unknown := set(scope_list) - SCOPES:
        raise ValueError(f"unknown scopes: {sorted(unknown)}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(user_id=user.id, name=name, prefix=token[:10], token_hash=hash_token(secret, token), scopes=scope_list)
    session.add(key)
    session.flush()
    return key, token


def bearer_token(authorization: str | None) -> str | None:
    """The token from an ``Authorization`` header value, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(TOKEN_PREFIX):
        return None
    return token


def authenticate(session: Session, token: str, *, secret: str, now: dt.datetime | None = None) -> ApiKey | None:
    """The live key for ``token`` (not revoked, user not disabled), or None."""
    now = now or utcnow()
    key = session.scalars(
        select(ApiKey)
        .join(User)
        .where(ApiKey.token_hash == hash_token(secret, token), ApiKey.revoked_at.is_(None), User.disabled_at.is_(None))
    ).one_or_none()
    if key is not None and (key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION):
        key.last_used_at = now
    return key


def has_scope(key: ApiKey, scope: str) -> bool:
    return scope in key.scopes


def revoke_key(session: Session, user: User, key_id: uuid.UUID, *, now: dt.datetime | None = None) -> bool:
    """Revoke one of ``user``'s keys. False if no such live key belongs to them."""
    key = session.scalars(
        select(ApiKey).where(ApiKey.id == key_id, ApiKey.user_id == user.id, ApiKey.revoked_at.is_(None))
    ).one_or_none()
    if key is None:
        return False
    key.revoked_at = now or utcnow()
    return True
