"""The out-of-process inspectors the upload endpoints use when the worker's sandbox is absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.services.sandbox import InspectionError, subprocess_inspect_dataset, subprocess_inspect_model

try:
    from tests.api_support import image_zip_bytes, model_bytes, npz_bytes
except ImportError:  # pytest run from inside tests/
    from api_support import image_zip_bytes, model_bytes, npz_bytes  # type: ignore[no-redef]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("m") / "tiny.pt"
    path.write_bytes(model_bytes())
    return path


def test_a_wrong_input_shape_comes_back_as_the_engine_error(model_file: Path) -> None:
    with pytest.raises(InspectionError) as info:
        subprocess_inspect_model(model_file, "5,16,16", 120)
    assert info.value.code == "input_spec_mismatch"
    assert "5,16,16" in info.value.message


def test_an_inspection_past_its_timeout_is_killed(model_file: Path) -> None:
    with pytest.raises(InspectionError) as info:
        subprocess_inspect_model(model_file, "3,16,16", 0.2)
    assert info.value.code == "inspect_timeout"


def test_the_child_gets_no_secrets_from_the_api_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENSORTRIM_SECRET_KEY", "must-not-leak")
    path = tmp_path / "d.npz"
    path.write_bytes(npz_bytes(x=np.zeros((4, 2), np.float32)))
    import app.services.sandbox as sandbox

    captured: dict[str, dict[str, str]] = {}
    real_popen = sandbox.subprocess.Popen

    def spy(*args: object, **kwargs: object) -> object:
        captured["env"] = kwargs["env"]  # type: ignore[assignment]
        return real_popen(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(sandbox.subprocess, "Popen", spy)
    subprocess_inspect_dataset(path, None, 60)
    assert not any(k.startswith("TENSORTRIM") for k in captured["env"])


def test_npz_keys_and_shapes_are_read_from_headers(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(npz_bytes(x=np.zeros((6, 3, 16, 16), np.float32), y=np.arange(6)))
    info = subprocess_inspect_dataset(path, None, 60)
    assert info["format"] == "npz"
    assert info["num_samples"] == 6
    assert info["arrays"]["x"] == {"shape": [6, 3, 16, 16], "dtype": "float32"}


@pytest.mark.parametrize(
    ("arrays", "words"),
    [
        ({"x": np.array([{"a": 1}, None], dtype=object)}, "pickle"),
        ({"x": np.zeros((4, 3)), "y": np.zeros(5)}, "disagree"),
    ],
)
def test_npz_that_needs_pickle_or_disagrees_is_rejected(
    tmp_path: Path, arrays: dict[str, np.ndarray], words: str
) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(InspectionError) as info:
        subprocess_inspect_dataset(path, None, 60)
    assert info.value.code == "bad_dataset"
    assert words in info.value.message


def test_image_folder_zip_lists_classes(tmp_path: Path) -> None:
    path = tmp_path / "imgs.zip"
    path.write_bytes(image_zip_bytes({"cats": 2, "dogs": 3}))
    info = subprocess_inspect_dataset(path, None, 60)
    assert info == {"format": "image_folder", "num_samples": 5, "classes": ["cats", "dogs"], "sample_size": [16, 16]}
