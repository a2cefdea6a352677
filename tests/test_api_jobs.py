"""Jobs: creation (validation, idempotency, quotas, enqueue after commit), listing,
cancel, delete, artifacts, owner scoping and the problem-detail shape of errors."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import uuid
from collections.abc import Callable

import pytest

from app.jobs import state
from app.models import Artifact, LayerRank
from app.storage import LocalStorage

try:
    from tests.api_support import API, Api, api, assert_problem, make_api, model_bytes  # noqa: F401
except ImportError:  # pytest run from inside tests/
    from api_support import (  # type: ignore[no-redef]  # noqa: F401
        API,
        Api,
        api,
        assert_problem,
        make_api,
        model_bytes,
    )

STALE = dt.timedelta(minutes=2)


def _claim(api: Api, job_id: str) -> int:
    with api.session() as s:
        attempt = state.claim(s, uuid.UUID(job_id), stale_after=STALE)
        s.commit()
    assert attempt is not None
    return attempt


def _finish(api: Api, job_id: str, *, artifact: bytes | None = None) -> None:
    """Run the job to success the way a worker would, with one artifact and one layer rank."""
    attempt = _claim(api, job_id)
    with api.session() as s:
        if artifact is not None:
            stored = LocalStorage(api.storage_dir).save([artifact], kind="artifacts", max_bytes=len(artifact))
            s.add(Artifact(job_id=uuid.UUID(job_id), name="model.pt", storage_key=stored.key, sha256=stored.sha256,
                           size_bytes=stored.size))
        s.add(LayerRank(job_id=uuid.UUID(job_id), layer="conv2", form="tucker2", ranks=[4, 6], macs_before=294912,
                        macs_after=120000))
        assert state.succeed(s, uuid.UUID(job_id), attempt, metrics={"macs_ratio": 2.1})
        s.commit()


def test_create_returns_201_and_enqueues_only_after_commit(api: Api) -> None:
    user = api.user()
    model = api.upload_model(user)
    r = api.client.post(f"{API}/jobs", headers=user, json={"model_id": model["id"], "input_spec": "3x16x16",
                                                          "budget": "flops:3x", "method": "energy"})
    assert r.status_code == 201, r.json()
    job = r.json()
    assert r.headers["location"] == f"/api/v1/jobs/{job['id']}"
    assert (job["status"], job["input_spec"], job["budget"]) == ("queued", "3,16,16", "flops:3x")
    assert job["form"] == "tucker2"
    assert api.enqueued.calls == [(job["id"], None)]
    assert api.enqueued.committed == [True]

    detail = api.client.get(f"{API}/jobs/{job['id']}", headers=user).json()
    assert detail["progress"] == 0.0 and detail["error"] is None and detail["layers"] == []


def test_input_spec_defaults_to_the_one_given_at_upload(api: Api) -> None:
    user = api.user()
    r = api.client.post(f"{API}/models?input_spec=3,16,16", headers=user, content=b"")
    assert_problem(r, 422, "bad_archive")  # (an empty body is not a model; the spec itself was fine)
    model = api.upload_model(user)  # no spec
    r = api.client.post(f"{API}/jobs", headers=user, json={"model_id": model["id"], "budget": "flops:2x"})
    assert_problem(r, 422, "input_spec_required", "input_spec")


def test_idempotency_key_returns_the_same_job(api: Api) -> None:
    user = api.user()
    model = api.upload_model(user)
    body = {"model_id": model["id"], "input_spec": "3,16,16", "budget": "params:40%"}
    key = {"Idempotency-Key": "req-1", **user}
    first = api.client.post(f"{API}/jobs", headers=key, json=body)
    again = api.client.post(f"{API}/jobs", headers=key, json=body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    assert len(api.enqueued.calls) == 1
    # The same key with other parameters is a client bug, not a replay.
    changed = api.client.post(f"{API}/jobs", headers=key, json={**body, "budget": "params:50%"})
    assert_problem(changed, 409, "idempotency_key_reused")
    # Keys are per owner: another user's identical key is a new job.
    other = api.user()
    other_model = api.upload_model(other)
    r = api.client.post(f"{API}/jobs", headers={"Idempotency-Key": "req-1", **other},
                        json={**body, "model_id": other_model["id"]})
    assert r.status_code == 201


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"budget": "flops:0.5x"}, "budget", "greater than 1"),
        ({"budget": "speed:2"}, "budget", "flops:3x"),
        ({"input_spec": "3,-1,16"}, "input_spec", "positive"),
        ({"method": "magic"}, "method", "choose one of"),
        ({"form": "svd2"}, "form", "tucker2"),
        ({"finetune": {"epochs": 0}}, "finetune.epochs", "greater than or equal to 1"),
        ({"finetune": {"optimizer": "adam"}}, "finetune.optimizer", "'sgd' or 'adamw'"),
        ({"sweep": ["flops:3x", "speed:2"]}, "sweep", "flops:3x"),
        ({"sweep": []}, "sweep", "at least one more budget"),
        ({"sweep": [f"flops:{k}x" for k in range(3, 9)]}, "sweep", "at most 5"),
        ({"model_id": "not-a-uuid"}, "model_id", "UUID"),
        ({"surprise": 1}, "surprise", "not permitted"),
    ],
)
def test_invalid_job_requests_are_422_naming_the_field(api: Api, change: dict, field: str, words: str) -> None:
    user = api.user()
    model = api.upload_model(user)
    body = {"model_id": model["id"], "input_spec": "3,16,16", "budget": "flops:2x", **change}
    problem = assert_problem(api.client.post(f"{API}/jobs", headers=user, json=body), 422, "validation_error", field)
    assert words in problem["detail"], problem
    assert problem["errors"][0]["field"] == field
    assert api.enqueued.calls == []


def test_finetuning_without_a_dataset_is_accepted_as_data_free(api: Api) -> None:
    user = api.user()
    model = api.upload_model(user)
    body = {"model_id": model["id"], "input_spec": "3,16,16", "budget": "flops:2x", "finetune": {"epochs": 1}}
    r = api.client.post(f"{API}/jobs", headers=user, json=body)
    assert r.status_code == 201, r.text
    assert r.json()["dataset_id"] is None and r.json()["options"]["finetune"] == {"epochs": 1}
    # Fields left out are left to the engine (its defaults are the benchmarked recipe), not filled in here.
    r = api.client.post(f"{API}/jobs", headers=user, json={**body, "finetune": {}})
    assert r.status_code == 201, r.text
    assert r.json()["options"] == {"finetune": {}}


def test_a_sweep_is_recorded_once_per_budget_after_the_jobs_own(api: Api) -> None:
    user = api.user()
    model = api.upload_model(user)
    body = {"model_id": model["id"], "input_spec": "3,16,16", "budget": "flops:2x",
            "sweep": ["flops:3x", "flops:2x", " flops:3x", "params:50%"]}
    r = api.client.post(f"{API}/jobs", headers=user, json=body)
    assert r.status_code == 201, r.text
    assert r.json()["options"] == {"sweep": ["flops:3x", "params:50%"]}
    assert len(api.enqueued.calls) == 1


def test_manual_ranks_imply_the_manual_method_and_are_checked(api: Api) -> None:
    user = api.user()
    model = api.upload_model(user)
    body = {"model_id": model["id"], "input_spec": "3,16,16", "budget": "flops:2x"}
    problem = assert_problem(api.client.post(f"{API}/jobs", headers=user, json={**body, "method": "manual"}),
                             422, field="ranks")
    assert "needs ranks" in problem["detail"]
    problem = assert_problem(api.client.post(f"{API}/jobs", headers=user,
                                             json={**body, "method": "energy", "ranks": {"conv2": [4, 8]}}),
                             422, field="ranks")
    assert "only by method 'manual'" in problem["detail"]
    problem = assert_problem(api.client.post(f"{API}/jobs", headers=user, json={
        **body, "ranks": {"conv2": [4, 8]}, "sweep": ["flops:3x"]}), 422, field="sweep")
    assert "manual ranks ignore" in problem["detail"]
    assert api.enqueued.calls == []
    r = api.client.post(f"{API}/jobs", headers=user, json={**body, "ranks": {"conv2": [4, 8], "conv1": 0.5}})
    assert r.status_code == 201, r.text
    assert r.json()["method"] == "manual"
    assert r.json()["options"] == {"method_options": {"ranks": {"conv2": [4, 8], "conv1": 0.5}}}


def test_list_pages_with_a_cursor_and_filters_by_status(make_api: Callable[..., Api]) -> None:
    api = make_api(quota_concurrent_jobs=10)
    user = api.user()
    model = api.upload_model(user)
    ids = [api.create_job(user, model["id"])["id"] for _ in range(5)]
    for job_id in ids[:2]:
        assert api.client.post(f"{API}/jobs/{job_id}/cancel", headers=user).json()["status"] == "cancelled"

    seen, cursor = [], None
    while True:
        r = api.client.get(f"{API}/jobs", headers=user, params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        page = r.json()
        assert len(page["items"]) <= 2
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))  # newest first, each exactly once

    cancelled = api.client.get(f"{API}/jobs?status=cancelled", headers=user).json()["items"]
    assert sorted(j["id"] for j in cancelled) == sorted(ids[:2])
    both = api.client.get(f"{API}/jobs?status=cancelled&status=queued", headers=user).json()["items"]
    assert len(both) == 5
    assert_problem(api.client.get(f"{API}/jobs?status=done", headers=user), 422, field="status.0")
    assert_problem(api.client.get(f"{API}/jobs?cursor=garbage", headers=user), 422, "invalid_cursor", "cursor")


def test_concurrent_job_quota_is_429(make_api: Callable[..., Api]) -> None:
    api = make_api(quota_concurrent_jobs=2)
    user = api.user()
    model = api.upload_model(user)
    first = api.create_job(user, model["id"])
    api.create_job(user, model["id"])
    r = api.client.post(f"{API}/jobs", headers=user, json={"model_id": model["id"], "input_spec": "3,16,16",
                                                          "budget": "flops:2x"})
    body = assert_problem(r, 429, "too_many_jobs")
    assert "cancel" in body["detail"]
    assert len(api.enqueued.calls) == 2
    api.client.post(f"{API}/jobs/{first['id']}/cancel", headers=user)
    api.create_job(user, model["id"])  # a slot is free again


def test_storage_quota_is_429_on_job_create(make_api: Callable[..., Api]) -> None:
    api = make_api(quota_storage_bytes=len(model_bytes()))
    user = api.user()
    model = api.upload_model(user)
    r = api.client.post(f"{API}/jobs", headers=user, json={"model_id": model["id"], "input_spec": "3,16,16",
                                                          "budget": "flops:2x"})
    assert_problem(r, 429, "storage_quota_exceeded")


def test_cancel_queued_running_and_finished_jobs(api: Api) -> None:
    user = api.user()
    model = api.upload_model(user)
    queued = api.create_job(user, model["id"])["id"]
    running = api.create_job(user, model["id"])["id"]
    _claim(api, running)

    assert api.client.post(f"{API}/jobs/{queued}/cancel", headers=user).json()["status"] == "cancelled"
    assert api.client.post(f"{API}/jobs/{running}/cancel", headers=user).json()["status"] == "cancelling"
    # Asking again while the worker winds down is harmless.
    assert api.client.post(f"{API}/jobs/{running}/cancel", headers=user).json()["status"] == "cancelling"
    assert_problem(api.client.post(f"{API}/jobs/{queued}/cancel", headers=user), 409, "job_finished")


def test_delete_refuses_unfinished_jobs_and_removes_artifacts(api: Api) -> None:
    user = api.user()
    model = api.upload_model(user)
    job = api.create_job(user, model["id"])["id"]
    _claim(api, job)
    body = assert_problem(api.client.delete(f"{API}/jobs/{job}", headers=user), 409, "job_not_finished")
    assert "cancel it first" in body["detail"]

    with api.session() as s:
        attempt = s.get(state.Job, uuid.UUID(job)).attempt  # type: ignore[union-attr]
        stored = LocalStorage(api.storage_dir).save([b"weights"], kind="artifacts", max_bytes=100)
        s.add(Artifact(job_id=uuid.UUID(job), name="model.pt", storage_key=stored.key, sha256=stored.sha256,
                       size_bytes=stored.size))
        state.succeed(s, uuid.UUID(job), attempt, metrics={})
        s.commit()
    artifact_path = api.storage_dir / stored.key
    assert artifact_path.exists()

    assert api.client.delete(f"{API}/jobs/{job}", headers=user).status_code == 204
    assert not artifact_path.exists()
    assert_problem(api.client.get(f"{API}/jobs/{job}", headers=user), 404, "not_found")
    assert api.client.delete(f"{API}/models/{model['id']}", headers=user).status_code == 204


def test_finished_job_shows_ranks_metrics_and_downloads_with_a_matching_checksum(api: Api) -> None:
    user = api.user()
    model = api.upload_model(user)
    job = api.create_job(user, model["id"])["id"]
    payload = os.urandom(300_000)
    _finish(api, job, artifact=payload)

    detail = api.client.get(f"{API}/jobs/{job}", headers=user).json()
    assert detail["status"] == "succeeded" and detail["progress"] == 1.0
    assert detail["metrics"] == {"macs_ratio": 2.1}
    assert detail["layers"] == [{"layer": "conv2", "form": "tucker2", "ranks": [4, 6], "macs_before": 294912,
                                 "macs_after": 120000}]
    listed = api.client.get(f"{API}/jobs/{job}/artifacts", headers=user).json()["items"]
    digest = hashlib.sha256(payload).hexdigest()
    assert [(a["name"], a["sha256"], a["size_bytes"]) for a in listed] == [("model.pt", digest, len(payload))]

    r = api.client.get(listed[0]["url"], headers=user)
    assert r.status_code == 200
    assert hashlib.sha256(r.content).hexdigest() == digest
    assert r.headers["etag"] == f'"{digest}"'
    assert r.headers["digest"] == "sha-256=" + base64.b64encode(bytes.fromhex(digest)).decode()
    assert "model.pt" in r.headers["content-disposition"]
    assert api.client.get(listed[0]["url"], headers={**user, "If-None-Match": f'"{digest}"'}).status_code == 304
    assert_problem(api.client.get(f"{API}/jobs/{job}/artifacts/report.json", headers=user), 404, "not_found")


def test_every_object_route_is_404_for_another_user(api: Api) -> None:
    alice, bob = api.user(), api.user()
    model = api.upload_model(alice)
    job = api.create_job(alice, model["id"])["id"]
    _claim(api, job)
    state_job = uuid.UUID(job)
    with api.session() as s:
        stored = LocalStorage(api.storage_dir).save([b"x"], kind="artifacts", max_bytes=10)
        s.add(Artifact(job_id=state_job, name="model.pt", storage_key=stored.key, sha256=stored.sha256, size_bytes=1))
        s.commit()
    routes = [
        ("get", f"/models/{model['id']}"),
        ("delete", f"/models/{model['id']}"),
        ("get", f"/jobs/{job}"),
        ("post", f"/jobs/{job}/cancel"),
        ("delete", f"/jobs/{job}"),
        ("get", f"/jobs/{job}/events"),
        ("get", f"/jobs/{job}/artifacts"),
        ("get", f"/jobs/{job}/artifacts/model.pt"),
    ]
    for method, path in routes:
        assert_problem(api.client.request(method.upper(), API + path, headers=bob), 404, "not_found")
    # Bob cannot start a job on Alice's model either, and sees none of her objects in lists.
    r = api.client.post(f"{API}/jobs", headers=bob, json={"model_id": model["id"], "input_spec": "3,16,16",
                                                         "budget": "flops:2x"})
    assert_problem(r, 404, "not_found", "model_id")
    assert api.client.get(f"{API}/jobs", headers=bob).json()["items"] == []
    assert api.client.get(f"{API}/models", headers=bob).json()["items"] == []
    # Nothing Bob did touched Alice's job.
    assert api.client.get(f"{API}/jobs/{job}", headers=alice).json()["status"] == "running"


def test_errors_are_problem_details(api: Api) -> None:
    r = api.client.get(f"{API}/jobs")
    body = assert_problem(r, 401, "unauthorized")
    assert "tensortrim keys create --user NAME" in body["detail"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert_problem(api.client.get(f"{API}/jobs", headers={"Authorization": "Bearer tt_nope"}), 401, "unauthorized")
    assert_problem(api.client.get("/api/v1/nothing-here", headers=api.user()), 404, "not_found")
    assert_problem(api.client.put(f"{API}/jobs", headers=api.user()), 405, "method_not_allowed")
    assert_problem(api.client.get(f"{API}/jobs/not-a-uuid", headers=api.user()), 422, "validation_error", "job_id")
    reader = api.user(scopes=("read",))
    assert api.client.get(f"{API}/jobs", headers=reader).status_code == 200
    assert_problem(api.client.post(f"{API}/jobs", headers=reader, json={}), 403, "insufficient_scope")


def test_metrics_count_requests_by_route_and_jobs_by_status(api: Api) -> None:
    user = api.user()
    model = api.upload_model(user)
    api.create_job(user, model["id"])
    text = api.client.get("/metrics").text
    assert 'tensortrim_jobs{status="queued"} 1.0' in text
    assert 'route="/api/v1/jobs",status="201"' in text
    assert "tensortrim_http_request_duration_seconds_bucket" in text


def test_openapi_documents_every_route_with_a_summary(api: Api) -> None:
    spec = api.client.get("/openapi.json").json()
    ops = [op for path, item in spec["paths"].items() if path.startswith(API) for op in item.values()]
    assert len(ops) >= 13
    assert all(op.get("summary") for op in ops)
    assert "ProblemDetail" in spec["components"]["schemas"]
