"""Work that must wait for the request's commit (enqueueing a job, deleting files).

Services never commit. They register follow-up actions with :func:`after_commit`;
the request's session dependency commits and then runs them, so a worker never
receives a job id the database does not hold yet, and a file is deleted only once
the row that pointed at it is gone for good. A rollback drops them and runs the
:func:`on_rollback` actions instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.orm import Session

log = logging.getLogger(__name__)
_KEY = "tensortrim.after_commit"
_UNDO = "tensortrim.on_rollback"


def after_commit(session: Session, action: Callable[[], None]) -> None:
    session.info.setdefault(_KEY, []).append(action)


def on_rollback(session: Session, action: Callable[[], None]) -> None:
    """Undo something outside the database (a stored file) if the transaction does not commit."""
    session.info.setdefault(_UNDO, []).append(action)


def run_after_commit(session: Session) -> None:
    session.info.pop(_UNDO, None)
    _run(session.info.pop(_KEY, []))


def run_on_rollback(session: Session) -> None:
    session.info.pop(_KEY, None)
    _run(session.info.pop(_UNDO, []))


def _run(actions: list[Callable[[], None]]) -> None:
    # One failing does not stop the others: the transaction's outcome is already decided,
    # and the reconciler re-enqueues queued jobs nobody took.
    for action in actions:
        try:
            action()
        except Exception:  # noqa: BLE001
            log.exception("post-transaction action %r failed", action)
