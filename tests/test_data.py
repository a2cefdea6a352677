"""Dataset loading: .npz and image-folder zips, and a specific message for every
malformed file."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from compression.data import check_data, load_dataset, precheck_zip, save_npz, train_val_split
from compression.errors import TensorTrimError
from compression.input_spec import InputSpec
from compression.ranks.base import Data

PIL = pytest.importorskip("PIL.Image")


def bad(path: Path, match: str, **kwargs) -> TensorTrimError:
    with pytest.raises(TensorTrimError, match=match) as err:
        load_dataset(path, **kwargs)
    assert err.value.code == "bad_dataset"
    return err.value


def npz(path: Path, **arrays) -> Path:
    with path.open("wb") as f:  # a file object: numpy adds no suffix
        np.savez(f, **arrays)
    return path


def digits(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, size=n)


# --------------------------------------------------------------------------- npz


def test_npz_roundtrip(tmp_path):
    x, y = digits()
    path = tmp_path / "data.bin"  # stored names are the server's: the format is read from the content
    save_npz(path, Data((torch.from_numpy(x),), torch.from_numpy(y)))
    data = load_dataset(path, input_spec="1,8,8")
    assert torch.equal(data.x[0], torch.from_numpy(x)) and data.x[0].dtype == torch.float32
    assert torch.equal(data.y, torch.from_numpy(y).long()) and len(data) == 40


def test_npz_without_labels_for_distillation(tmp_path):
    x, _ = digits()
    path = npz(tmp_path / "d.npz", x=x)
    data = load_dataset(path, input_spec=InputSpec.parse("1,8,8"), labels=False)
    assert data.y is None and data.x[0].shape == (40, 1, 8, 8)
    err = bad(path, r"no 'y' array of labels \(found: x\)")
    assert "without labels" in err.message


def test_uint8_images_are_scaled_normalised_and_made_channels_first(tmp_path):
    img = np.full((3, 8, 8, 3), 255, dtype=np.uint8)  # N,H,W,C
    img[:, :, :, 1] = 0
    path = npz(tmp_path / "d.npz", x=img, y=np.array([0, 1, 2]))
    data = load_dataset(path, input_spec="3,8,8", mean=[0.5, 0.5, 0.5], std=[0.5, 0.25, 0.5])
    assert data.x[0].shape == (3, 3, 8, 8)
    assert torch.allclose(data.x[0][:, 0], torch.ones(3, 8, 8))  # (1 - 0.5) / 0.5
    assert torch.allclose(data.x[0][:, 1], torch.full((3, 8, 8), -2.0))  # (0 - 0.5) / 0.25
    gray = npz(tmp_path / "g.npz", x=np.zeros((2, 8, 8), np.uint8), y=np.array([1.0, 0.0]))  # N,H,W
    data = load_dataset(gray, input_spec="1,8,8")
    assert data.x[0].shape == (2, 1, 8, 8) and data.y.dtype == torch.int64


def test_multi_input_npz(tmp_path):
    path = npz(tmp_path / "d.npz", x0=np.zeros((4, 12), np.float32), x1=np.ones((4, 5), np.float32))
    data = load_dataset(path, input_spec="12;5", labels=False)
    assert [t.shape for t in data.x] == [(4, 12), (4, 5)]
    tokens = npz(tmp_path / "t.npz", x=np.arange(32).reshape(2, 16), y=np.array([0, 1]))
    assert load_dataset(tokens, input_spec="16:int64@100").x[0].dtype == torch.int64


@pytest.mark.parametrize(
    ("arrays", "spec", "match"),
    [
        ({"inputs": np.zeros((4, 1, 8, 8))}, None, r"no 'x' array of inputs \(found: inputs\)"),
        ({"x": np.zeros((4, 1, 8, 7)), "y": np.zeros(4)}, "1,8,8",
         r"per-sample shape \(1, 8, 7\) .* input spec is \(1,8,8\): store an array of shape \(N, 1,8,8\)"),
        ({"x": np.zeros((4, 1, 8, 8)), "y": np.zeros(3)}, None, "4 inputs but 3 labels: give exactly one label"),
        ({"x": np.array([[[[np.nan]]], [[[0.0]]]]), "y": np.zeros(2)}, None, "NaN or infinite values in 1 sample"),
        ({"x": np.zeros((2, 3)), "y": np.array([0.0, 1.5])}, None, r"non-integer labels \(e.g. 1.5 at index 1\)"),
        ({"x": np.zeros((2, 3)), "y": np.eye(2)}, None, r"one-hot\? store the class index"),
        ({"x": np.zeros((2, 3)), "y": np.array([0, -1])}, None, "negative labels"),
        ({"x": np.zeros((0, 3)), "y": np.zeros(0)}, None, "holds no samples"),
        ({"x": np.array(["a", "b"]), "y": np.zeros(2)}, None, "has dtype <U1: store numbers"),
        ({"x": np.zeros((2, 3))}, "3;4", r"takes 2 inputs; store them as x0 \.\.\. x1"),
    ],
)
def test_malformed_npz_says_what_is_wrong(tmp_path, arrays, spec, match):
    bad(npz(tmp_path / "d.npz", **arrays), match, input_spec=spec)


def test_object_arrays_are_never_unpickled(tmp_path):
    path = tmp_path / "d.npz"
    with path.open("wb") as f:
        np.savez(f, x=np.array([{"a": 1}, None], dtype=object), y=np.zeros(2))
    bad(path, r"object \(pickled\) arrays")


def test_files_that_are_not_datasets(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    bad(text, r"neither an \.npz file nor a zip archive: save it with numpy\.savez")
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    bad(empty, "is empty")
    bad(tmp_path / "missing.npz", "not found")
    truncated = tmp_path / "t.npz"
    npz(truncated, x=np.zeros((50, 50)), y=np.zeros(50))
    truncated.write_bytes(truncated.read_bytes()[:-30])
    bad(truncated, "zip archive|not a readable")


# --------------------------------------------------------------------------- image-folder zip


def png(color: int | tuple[int, int, int], size: tuple[int, int] = (10, 12), mode: str = "L") -> bytes:
    buf = io.BytesIO()
    PIL.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    PIL.new("RGB", (8, 8), color).save(buf, format="JPEG", quality=100)
    return buf.getvalue()


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in entries.items():
            zf.writestr(name, content)
    return path


def test_image_folder_zip(tmp_path):
    path = make_zip(tmp_path / "upload", {  # no suffix: detected by content
        "digits/zeros/a.png": png(0),
        "digits/zeros/b.png": png(0, size=(20, 20)),  # other sizes are resized
        "digits/ones/c.png": png(255),
        "digits/ones/d.jpeg": jpeg((255, 255, 255)),
        "digits/__MACOSX/._junk": b"x",
        "digits/.DS_Store": b"x",
    })  # fmt: skip
    data = load_dataset(path, input_spec="1,8,8", mean=0.5, std=0.5)
    assert data.x[0].shape == (4, 1, 8, 8)
    # class index = sorted folder names: "ones" -> 0, "zeros" -> 1
    assert data.y.tolist() == [0, 0, 1, 1]
    assert torch.allclose(data.x[0][:2], torch.ones(2, 1, 8, 8), atol=0.02)
    assert torch.allclose(data.x[0][2:], -torch.ones(2, 1, 8, 8))
    rgb = load_dataset(path, image_size=6, labels=False)  # no spec: channels from the images
    assert rgb.x[0].shape == (4, 1, 6, 6) and rgb.y is None
    red, green = png((255, 0, 0), mode="RGB"), png((0, 255, 0), mode="RGB")
    colour = make_zip(tmp_path / "c.zip", {"r/a.png": red, "g/b.png": green})
    data = load_dataset(colour, input_spec="3,4,4")
    assert data.x[0].shape == (2, 3, 4, 4) and data.y.tolist() == [0, 1]
    assert data.x[0][0, 1].mean() == 1.0 and data.x[0][1, 0].mean() == 1.0  # "g" first: green, then red


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ({"a/x.png": png(0), "b/readme.txt": b"hi"}, "'b/readme.txt', which is not a PNG or JPEG image"),
        ({"a/x.png": png(0), "b/y.png": b"not a png"}, "image 'b/y.png' cannot be decoded"),
        ({"a/x.png": png(0), "a/y.png": png(0)}, r"only one class folder \('a'\)"),
        ({"a/x.png": png(0), "b/y.png": png(0), "loose.png": png(0)}, "'loose.png' is not directly inside a class"),
        ({"a/x.png": png(0), "../b/y.png": png(0)}, "unsafe entry name '../b/y.png'"),
        ({"a/x.png": png(0), "/abs/y.png": png(0)}, "unsafe entry name '/abs/y.png'"),
        ({"docs/": b""}, "holds no PNG/JPEG images"),
    ],
)
def test_malformed_image_zip_says_what_is_wrong(tmp_path, entries, match):
    bad(make_zip(tmp_path / "d.zip", entries), match, input_spec="1,8,8")


def test_image_zip_needs_an_image_spec(tmp_path):
    path = make_zip(tmp_path / "d.zip", {"a/x.png": png(0), "b/y.png": png(0)})
    bad(path, "feeds one \\(C,H,W\\) image input", input_spec="12")
    mixed = make_zip(tmp_path / "m.zip", {"a/x.png": png(0, (8, 8)), "b/y.png": png(0, (9, 9))})
    bad(mixed, "image 'b/y.png' is 9x9 but 'a/x.png' is 8x8: pass image_size")


def test_zip_prechecks(tmp_path):
    path = make_zip(tmp_path / "d.zip", {f"a/{i}.png": png(0) for i in range(5)})
    with pytest.raises(TensorTrimError, match="has 5 entries \\(limit 3\\)"):
        precheck_zip(path, max_entries=3)
    with pytest.raises(TensorTrimError, match="declares .* uncompressed"):
        precheck_zip(path, max_uncompressed=100)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/x.npy", b"\0" * 5_000_000)
    with pytest.raises(TensorTrimError, match="expands .*x when unpacked"):
        precheck_zip(bomb)


# --------------------------------------------------------------------------- checks and splits


def test_check_data_in_memory():
    spec = InputSpec.parse("1,8,8")
    ok = Data((torch.zeros(4, 1, 8, 8),), torch.tensor([0, 1, 2, 3]))
    assert check_data(ok, spec, labels=True) is ok
    with pytest.raises(TensorTrimError, match="no labels"):
        check_data(Data((torch.zeros(4, 1, 8, 8),)), spec, labels=True)
    with pytest.raises(TensorTrimError, match="dtype torch.float32: use integer class indices"):
        check_data(Data((torch.zeros(2, 3),), torch.tensor([0.0, 1.0])))
    with pytest.raises(TensorTrimError, match="has 1 input array\\(s\\) but the model takes 2"):
        check_data(Data((torch.zeros(2, 3),)), InputSpec.parse("3;3"))


def test_split_is_deterministic_and_stratified():
    y = torch.arange(100) % 4
    data = Data((torch.arange(100).float().unsqueeze(1),), y)
    train, val = train_val_split(data, 0.2, seed=7)
    again, val2 = train_val_split(data, 0.2, seed=7)
    assert torch.equal(val.x[0], val2.x[0]) and torch.equal(train.x[0], again.x[0])
    assert len(val) == 20 and len(train) == 80
    assert torch.bincount(val.y).tolist() == [5, 5, 5, 5]
    assert set(val.x[0].flatten().tolist()).isdisjoint(train.x[0].flatten().tolist())
    other, _ = train_val_split(data, 0.2, seed=8)
    assert not torch.equal(other.x[0], train.x[0])
    assert train_val_split(data, 0.0) == (data, None)
    unlabelled_train, unlabelled_val = train_val_split(Data((torch.zeros(10, 2),)), 0.3)
    assert (len(unlabelled_train), len(unlabelled_val)) == (7, 3)
    with pytest.raises(TensorTrimError, match="must be in \\[0, 1\\)"):
        train_val_split(data, 1.0)
