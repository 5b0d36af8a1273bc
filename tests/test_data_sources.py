"""Sources: image folders, scikit-image sample photos, configs (no TensorFlow needed)."""
import pickle

import numpy as np
import pytest
from PIL import Image

from jattn.data import sources as S
from jattn.data.images import decode_rgb


def _write(path, size=(24, 20), color=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    for i in range(40):
        _write(root / f"sub{i % 3}" / f"deep{i % 2}" / f"img{i:03d}.png", color=(i, 0, 0))
    _write(root / "a.JPG")
    _write(root / "b.jpeg")
    _write(root / "c.webp")
    _write(root / "d.bmp")
    (root / "notes.txt").write_text("not an image")
    (root / "e.gif").write_bytes(b"GIF89a")
    return root


def test_folder_source_is_recursive_and_filters_extensions(folder):
    src = S.folder_source(folder)
    names = [src.path(i)[len(str(folder)) + 1:] for i in range(len(src))]
    assert len(src) == 44
    assert names == sorted(names)
    assert {"a.JPG", "b.jpeg", "c.webp", "d.bmp", "sub2/deep1/img005.png"} <= set(names)
    assert not any(n.endswith((".txt", ".gif")) for n in names)
    rec = src[names.index("sub1/deep0/img004.png")]
    assert rec.name.endswith("img004.png")
    assert decode_rgb(rec.data, rec.name)[0][0, 0].tolist() == [4, 0, 0]


def test_folder_split_is_stable_disjoint_and_complete(folder, tmp_path):
    train = S.folder_source(folder, "train", val_fraction=0.3)
    val = S.folder_source(folder, "val", val_fraction=0.3)
    rel = lambda src: {src.path(i)[len(str(src.root)) + 1:] for i in range(len(src))}  # noqa: E731
    assert not rel(train) & rel(val)
    assert rel(train) | rel(val) == rel(S.folder_source(folder))
    assert 0 < len(val) < len(train)
    # Stable: the split depends on the relative path only (moving the folder or adding
    # files does not move existing files between splits).
    moved = tmp_path / "moved"
    folder.rename(moved)
    _write(moved / "new" / "extra.png")
    assert rel(S.folder_source(moved, "val", val_fraction=0.3)) - {"new/extra.png"} == rel(val)
    assert S.hash_split("sub0/deep0/img000.png", 0.3) == S.hash_split("sub0/deep0/img000.png", 0.3)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found: .*missing"):
        S.folder_source(tmp_path / "missing")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files .* under .*empty"):
        S.folder_source(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown split"):
        S.folder_source(tmp_path / "empty", "test")


def test_folder_source_pickles(folder):
    src = S.folder_source(folder, "train", val_fraction=0.2)
    clone = pickle.loads(pickle.dumps(src))
    assert len(clone) == len(src) and clone[3].data == src[3].data


def test_sample_photos_are_offline_distinct_and_deterministic():
    src = S.sample_photos_source()
    assert len(src) == 4096
    boxes = [src.crop_box(i) for i in range(len(src))]
    assert len(set(boxes)) == len(boxes)  # a few thousand distinct crops
    assert {b[0] for b in boxes} == set(S.SAMPLE_PHOTOS)
    rec = src[17]
    assert rec.data.shape == (256, 256, 3) and rec.data.dtype == np.uint8
    np.testing.assert_array_equal(rec.data, S.sample_photos_source()[17].data)
    assert not np.array_equal(rec.data, src[18].data)
    val = S.sample_photos_source(64, 32, split="val")
    assert {val.crop_box(i) for i in range(64)}.isdisjoint(boxes[:64])
    clone = pickle.loads(pickle.dumps(val))
    assert clone._images is None
    np.testing.assert_array_equal(clone[5].data, val[5].data)


def test_sample_photos_bad_arguments():
    with pytest.raises(ValueError, match="unknown scikit-image photo 'nope'"):
        S.sample_photos_source(8, photos=("nope",))
    with pytest.raises(ValueError, match="num_examples"):
        S.sample_photos_source(0)


def test_source_from_config(folder):
    src = S.source_from_config({"kind": "folder", "root": str(folder), "split": "val",
                                "val_fraction": 0.5})
    assert isinstance(src, S.FolderSource) and src.split == "val"
    src = S.source_from_config({"kind": "sample_photos", "num_examples": 10, "crop_size": 32})
    assert len(src) == 10
    with pytest.raises(ValueError, match="'kind'"):
        S.source_from_config({"kind": "ftp"})
    with pytest.raises(ValueError, match="bad parameters for a 'folder' source"):
        S.source_from_config({"kind": "folder", "rooot": "x"})
