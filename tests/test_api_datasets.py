"""Data set uploads: streamed like models, checked in a child process, rejected files not kept."""

from __future__ import annotations

import numpy as np

try:
    from tests.api_support import API, Api, api, assert_problem, image_zip_bytes, make_api, npz_bytes  # noqa: F401
except ImportError:  # pytest run from inside tests/
    from api_support import (  # type: ignore[no-redef]  # noqa: F401
        API,
        Api,
        api,
        assert_problem,
        image_zip_bytes,
        make_api,
        npz_bytes,
    )


def test_npz_upload_reports_arrays_and_samples(api: Api) -> None:
    user = api.user()
    data = npz_bytes(x=np.zeros((8, 3, 16, 16), np.float32), y=np.arange(8))
    r = api.client.post(f"{API}/datasets", headers=user, files={"file": ("calib.npz", data)})
    assert r.status_code == 201, r.json()
    body = r.json()
    assert (body["format"], body["num_samples"], body["name"], body["status"]) == ("npz", 8, "calib.npz", "ready")
    assert body["details"]["arrays"]["x"]["shape"] == [8, 3, 16, 16]
    listed = api.client.get(f"{API}/datasets", headers=user).json()["items"]
    assert [d["id"] for d in listed] == [body["id"]]


def test_image_folder_zip_upload_as_raw_body(api: Api) -> None:
    r = api.client.post(
        f"{API}/datasets?name=imgs.zip", headers=api.user(), content=image_zip_bytes({"a": 1, "b": 2})
    )
    assert r.status_code == 201, r.json()
    assert (r.json()["format"], r.json()["num_samples"]) == ("image_folder", 3)
    assert r.json()["details"]["classes"] == ["a", "b"]


def test_object_arrays_are_422_and_not_kept(api: Api) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, x=np.array([None, {"a": 1}], dtype=object))
    r = api.client.post(f"{API}/datasets", headers=api.user(), files={"file": ("evil.npz", buf.getvalue())})
    body = assert_problem(r, 422, "bad_dataset", "file")
    assert "pickle" in body["detail"]
    assert api.stored_files() == []


def test_unknown_format_is_422_naming_the_field(api: Api) -> None:
    r = api.client.post(
        f"{API}/datasets?format=csv", headers=api.user(), content=npz_bytes(x=np.zeros((2, 2)))
    )
    assert_problem(r, 422, field="format")
    assert api.stored_files() == []


def test_another_users_data_set_is_404(api: Api) -> None:
    alice, bob = api.user(), api.user()
    r = api.client.post(f"{API}/datasets", headers=alice, content=npz_bytes(x=np.zeros((2, 2))))
    ds = r.json()["id"]
    for method in ("get", "delete"):
        assert_problem(getattr(api.client, method)(f"{API}/datasets/{ds}", headers=bob), 404, "not_found")
    assert api.client.delete(f"{API}/datasets/{ds}", headers=alice).status_code == 204
    assert api.stored_files() == []
