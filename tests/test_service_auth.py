"""API keys: shown once, stored only as an HMAC, found by that HMAC."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import authenticate, bearer_token, create_key, has_scope, hash_token, revoke_key
from app.db import utcnow
from app.models import ApiKey, User

SECRET = "s" * 40


def test_hash_is_hmac_sha256_of_the_token_under_the_secret() -> None:
    expected = hmac.new(SECRET.encode(), b"tt_abc", hashlib.sha256).hexdigest()
    assert hash_token(SECRET, "tt_abc") == expected
    assert hash_token("other" * 8, "tt_abc") != expected


def test_token_is_returned_once_and_never_stored(session: Session, user: User) -> None:
    key, token = create_key(session, user, secret=SECRET, name="ci")
    session.commit()
    assert token.startswith("tt_") and len(token) > 40
    row = session.execute(select(ApiKey.__table__).where(ApiKey.id == key.id)).one()
    assert all(token not in str(value) for value in row)
    assert row.token_hash == hash_token(SECRET, token)
    assert row.prefix == token[:10]


def test_lookup_by_hash_finds_the_key_and_marks_it_used(session: Session, user: User) -> None:
    key, token = create_key(session, user, secret=SECRET, scopes=["read"])
    session.commit()
    found = authenticate(session, token, secret=SECRET)
    assert found is not None and found.id == key.id and found.user.id == user.id
    assert found.last_used_at is not None
    assert has_scope(found, "read") and not has_scope(found, "write")


def test_wrong_token_or_wrong_secret_finds_nothing(session: Session, user: User) -> None:
    _, token = create_key(session, user, secret=SECRET)
    session.commit()
    assert authenticate(session, token + "x", secret=SECRET) is None
    assert authenticate(session, token, secret="t" * 40) is None


def test_revoked_key_and_disabled_user_are_refused(session: Session, user: User) -> None:
    key, token = create_key(session, user, secret=SECRET)
    _, other_token = create_key(session, user, secret=SECRET)
    session.commit()
    assert revoke_key(session, user, key.id) is True
    assert revoke_key(session, user, key.id) is False  # already revoked
    session.commit()
    assert authenticate(session, token, secret=SECRET) is None
    assert authenticate(session, other_token, secret=SECRET) is not None
    user.disabled_at = utcnow()
    session.commit()
    assert authenticate(session, other_token, secret=SECRET) is None


def test_a_user_cannot_revoke_someone_elses_key(session: Session, user: User) -> None:
    key, token = create_key(session, user, secret=SECRET)
    intruder = User(email="intruder@example.com")
    session.add(intruder)
    session.commit()
    assert revoke_key(session, intruder, key.id) is False
    assert authenticate(session, token, secret=SECRET) is not None


def test_last_used_is_written_at_most_once_a_minute(session: Session, user: User) -> None:
    _, token = create_key(session, user, secret=SECRET)
    t0 = utcnow()
    key = authenticate(session, token, secret=SECRET, now=t0)
    assert key is not None
    authenticate(session, token, secret=SECRET, now=t0 + dt.timedelta(seconds=30))
    assert key.last_used_at == t0
    authenticate(session, token, secret=SECRET, now=t0 + dt.timedelta(minutes=2))
    assert key.last_used_at == t0 + dt.timedelta(minutes=2)


def test_unknown_scopes_are_refused(session: Session, user: User) -> None:
    with pytest.raises(ValueError, match="unknown scopes"):
        create_key(session, user, secret=SECRET, scopes=["read", "root"])


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer tt_abc", "tt_abc"),
        ("bearer   tt_abc ", "tt_abc"),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer", None),
        ("Bearer someone-elses-token", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_header_parsing(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token
