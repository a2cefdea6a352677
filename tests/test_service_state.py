"""The job state machine: which moves apply, which are refused, and attempt fencing."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from app.db import make_sessionmaker, utcnow
from app.jobs import state
from app.jobs.state import CANCELLED, CANCELLING, FAILED, QUEUED, RUNNING, SUCCEEDED, TRANSITIONS
from app.models import Job, JobEvent, JobStatus

STALE = dt.timedelta(minutes=2)
MakeJob = Callable[..., uuid.UUID]


def _job(session: Session, job_id: uuid.UUID) -> Job:
    session.expire_all()
    return session.get_one(Job, job_id)


def _force(session: Session, job_id: uuid.UUID, status: JobStatus, heartbeat_age: dt.timedelta) -> None:
    """Put a job in a given state directly (test setup only), held by attempt 1."""
    session.execute(
        update(Job).where(Job.id == job_id).values(status=status, attempt=1, heartbeat_at=utcnow() - heartbeat_age)
    )
    session.commit()


# Every operation, run against a job held by attempt 1 whose heartbeat is 10 minutes old.
OPERATIONS: dict[str, Callable[[Session, uuid.UUID], object]] = {
    "claim_fresh": lambda s, j: state.claim(s, j, stale_after=dt.timedelta(hours=1)),
    "claim_stale": lambda s, j: state.claim(s, j, stale_after=STALE),
    "heartbeat": lambda s, j: state.heartbeat(s, j, 1, progress=0.5),
    "succeed": lambda s, j: state.succeed(s, j, 1, metrics={"speedup": 2.0}),
    "fail": lambda s, j: state.fail(s, j, 1, code="boom", message="it broke"),
    "request_cancel": lambda s, j: state.request_cancel(s, j),
    "confirm_cancelled": lambda s, j: state.confirm_cancelled(s, j, 1),
    "abandon": lambda s, j: state.abandon(s, j, 1, stale_after=STALE),
}
# Status after each operation; absent means refused (status unchanged).
EXPECTED: dict[JobStatus, dict[str, JobStatus]] = {
    QUEUED: {"claim_fresh": RUNNING, "claim_stale": RUNNING, "request_cancel": CANCELLED},
    RUNNING: {
        "claim_stale": RUNNING,
        "heartbeat": RUNNING,
        "succeed": SUCCEEDED,
        "fail": FAILED,
        "request_cancel": CANCELLING,
        "abandon": FAILED,
    },
    CANCELLING: {"heartbeat": CANCELLING, "confirm_cancelled": CANCELLED, "abandon": CANCELLED},
    SUCCEEDED: {},
    FAILED: {},
    CANCELLED: {},
}


@pytest.mark.parametrize("start", list(JobStatus))
@pytest.mark.parametrize("op", list(OPERATIONS))
def test_every_operation_from_every_state(session: Session, make_job: MakeJob, start: JobStatus, op: str) -> None:
    job_id = make_job()
    _force(session, job_id, start, heartbeat_age=dt.timedelta(minutes=10))
    result = OPERATIONS[op](session, job_id)
    session.commit()
    after = JobStatus(_job(session, job_id).status)
    expected = EXPECTED[start].get(op)
    if expected is None:
        assert result in (None, False)
        assert after == start
    else:
        assert result not in (None, False)
        assert after == expected
        assert after == start or after in TRANSITIONS[start]


def test_transition_table_only_allows_moves_out_of_active_states() -> None:
    for status in state.TERMINAL:
        assert TRANSITIONS[status] == frozenset()
    assert set(TRANSITIONS) == set(JobStatus)


def test_claim_returns_attempt_and_logs_an_event(session: Session, make_job: MakeJob) -> None:
    job_id = make_job()
    assert state.claim(session, job_id, stale_after=STALE) == 1
    session.commit()
    job = _job(session, job_id)
    assert (job.status, job.attempt, job.started_at is not None) == (RUNNING, 1, True)
    events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all()
    assert [(e.kind, e.status, e.attempt) for e in events] == [("status", "running", 1)]
    # A live worker holds it now: nobody else can claim it.
    assert state.claim(session, job_id, stale_after=STALE) is None


def test_stale_attempt_is_fenced_out_after_a_reclaim(session: Session, make_job: MakeJob) -> None:
    job_id = make_job()
    t0 = utcnow()
    first = state.claim(session, job_id, stale_after=STALE, now=t0)
    session.commit()
    # The first worker goes silent; after the stale window a second worker takes over.
    second = state.claim(session, job_id, stale_after=STALE, now=t0 + STALE + dt.timedelta(seconds=1))
    session.commit()
    assert (first, second) == (1, 2)

    # The first worker wakes up: every write of its attempt is refused.
    assert state.heartbeat(session, job_id, 1, progress=0.9, phase="finetune") is None
    assert state.succeed(session, job_id, 1, metrics={"from": "old"}) is False
    assert state.fail(session, job_id, 1, code="x", message="y") is False
    session.commit()
    job = _job(session, job_id)
    assert (job.status, job.attempt, job.progress, job.phase, job.metrics) == (RUNNING, 2, 0.0, None, None)

    assert state.heartbeat(session, job_id, 2, progress=0.5, phase="search") == RUNNING
    assert state.succeed(session, job_id, 2, metrics={"from": "new"}) is True
    session.commit()
    job = _job(session, job_id)
    assert (job.status, job.progress, job.metrics) == (SUCCEEDED, 1.0, {"from": "new"})


def test_claim_respects_the_attempt_cap(session: Session, make_job: MakeJob) -> None:
    job_id = make_job()
    _force(session, job_id, RUNNING, heartbeat_age=dt.timedelta(hours=1))
    assert state.claim(session, job_id, stale_after=STALE, max_attempts=1) is None
    assert state.claim(session, job_id, stale_after=STALE, max_attempts=2) == 2


def test_heartbeat_records_progress_clamped_to_unit_interval(session: Session, make_job: MakeJob) -> None:
    job_id = make_job()
    attempt = state.claim(session, job_id, stale_after=STALE)
    assert attempt is not None
    before = _job(session, job_id).heartbeat_at
    assert before is not None
    now = before + dt.timedelta(seconds=5)
    assert state.heartbeat(session, job_id, attempt, progress=1.7, phase="rank_search", message="m", now=now)
    session.commit()
    job = _job(session, job_id)
    assert (job.progress, job.phase, job.message, job.heartbeat_at) == (1.0, "rank_search", "m", now)


def test_cancel_while_running_lets_the_worker_finish_as_cancelled(session: Session, make_job: MakeJob) -> None:
    job_id = make_job()
    attempt = state.claim(session, job_id, stale_after=STALE)
    assert attempt is not None
    assert state.request_cancel(session, job_id) == CANCELLING
    assert state.request_cancel(session, job_id) is None  # already cancelling
    # The worker learns about it from its next heartbeat; its result no longer counts.
    assert state.heartbeat(session, job_id, attempt) == CANCELLING
    assert state.succeed(session, job_id, attempt, metrics={}) is False
    assert state.confirm_cancelled(session, job_id, attempt) is True
    session.commit()
    job = _job(session, job_id)
    assert (job.status, job.finished_at is not None, job.metrics) == (CANCELLED, True, None)


def test_cancelled_queued_job_cannot_be_claimed(session: Session, make_job: MakeJob) -> None:
    job_id = make_job()
    assert state.request_cancel(session, job_id) == CANCELLED
    session.commit()
    assert state.claim(session, job_id, stale_after=STALE) is None
    assert _job(session, job_id).finished_at is not None


def test_failure_keeps_code_and_message(session: Session, make_job: MakeJob) -> None:
    job_id = make_job()
    attempt = state.claim(session, job_id, stale_after=STALE)
    assert attempt is not None
    assert state.fail(session, job_id, attempt, code="input_spec_mismatch", message="expected 3 channels")
    session.commit()
    job = _job(session, job_id)
    assert (job.status, job.error_code, job.error_message) == (FAILED, "input_spec_mismatch", "expected 3 channels")


def test_abandon_spares_a_worker_that_heartbeats_in_time(session: Session, make_job: MakeJob) -> None:
    job_id = make_job()
    attempt = state.claim(session, job_id, stale_after=STALE)
    assert attempt is not None
    session.commit()
    assert state.abandon(session, job_id, attempt, stale_after=STALE) is None
    later = utcnow() + STALE * 2
    assert state.abandon(session, job_id, attempt + 1, stale_after=STALE, now=later) is None  # wrong attempt
    assert state.abandon(session, job_id, attempt, stale_after=STALE, now=later) == FAILED
    session.commit()
    assert _job(session, job_id).error_code == state.WORKER_LOST


def test_an_object_loaded_in_the_session_sees_the_transition(session: Session, make_job: MakeJob) -> None:
    job_id = make_job()
    job = session.get_one(Job, job_id)
    assert state.claim(session, job_id, stale_after=STALE) == 1
    assert (job.status, job.attempt) == (RUNNING, 1)


def _race(engine: Engine, job_id: uuid.UUID, n: int) -> list[int | None]:
    """n sessions claim the same job at the same moment, each in its own thread."""
    sessions = make_sessionmaker(engine)
    barrier = threading.Barrier(n)
    results: list[int | None] = [None] * n
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with sessions() as s:
                barrier.wait()
                results[i] = state.claim(s, job_id, stale_after=STALE)
                s.commit()
        except BaseException as e:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_claims_have_exactly_one_winner(
    engine: Engine, session: Session, make_job: MakeJob, round_: int
) -> None:
    job_id = make_job()
    results = _race(engine, job_id, n=6)
    assert (results.count(1), results.count(None)) == (1, 5)
    assert _job(session, job_id).attempt == 1


def test_second_claim_waits_for_the_first_and_then_loses(engine: Engine, make_job: MakeJob) -> None:
    """The row lock makes the second UPDATE re-check its WHERE after the first commits."""
    if engine.dialect.name != "postgresql":
        pytest.skip("row-level locking is what this pins down; SQLite locks the whole file")
    job_id = make_job()
    sessions = make_sessionmaker(engine)
    with sessions() as first, sessions() as second:
        assert state.claim(first, job_id, stale_after=STALE) == 1  # holds the row lock, uncommitted
        box: list[int | None] = []
        t = threading.Thread(target=lambda: box.append(state.claim(second, job_id, stale_after=STALE)))
        t.start()
        t.join(timeout=0.5)
        assert t.is_alive(), "the second claim should block on the first one's row lock"
        first.commit()
        t.join(timeout=10)
        assert box == [None]
        second.rollback()
