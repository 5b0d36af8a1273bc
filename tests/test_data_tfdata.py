"""tf.data pipeline and TFDS sources, on a tiny TFDS dataset built locally (no download)."""
import io
import json
import logging
import os

os.environ.setdefault("NO_GCE_CHECK", "true")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from PIL import Image  # noqa: E402

from jattn.data import grain as jgrain  # noqa: E402
from jattn.data import masks as M  # noqa: E402
from jattn.data import sources as S  # noqa: E402
from jattn.data import tfdata  # noqa: E402

TOY = "jattn_test_toy_images"
BOX = {"kind": "box", "hole_size": 16, "max_delta": 8}


def _constant_png(i, gray=False):
    img = np.zeros((20 + i % 5, 28, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = i % 256, i // 256, 77
    b = io.BytesIO()
    Image.fromarray(img[..., 0] if gray else img).save(b, "PNG")
    return b.getvalue()


class JattnTestToyImages(tfds.core.GeneratorBasedBuilder):
    """train: ids 0..36, test: ids 100..110, mixed: ids 200..207 with 3 bad records."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "id": tfds.features.Scalar(np.int64)}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(range(37)),
                "test": self._generate_examples(range(100, 111)),
                "mixed": self._generate_examples(range(200, 208))}

    def _generate_examples(self, ids):
        for i in ids:
            data = _constant_png(i, gray=(i == 206))
            if i in (202, 205):
                data = b"\x00 not an image " * 8
            if i == 207:
                data = data[: len(data) // 2]
            yield i, {"image": io.BytesIO(data), "id": i}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    tfds.disable_progress_bar()
    root = tmp_path_factory.mktemp("tfds")
    for fmt in ("tfrecord", "array_record"):
        JattnTestToyImages(data_dir=os.fspath(root / fmt), file_format=fmt).download_and_prepare()
    # 4 files a split: the shuffled file order and the interleave of files matter
    JattnTestToyImages(data_dir=os.fspath(root / "tfrecord4"), file_format="tfrecord").download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=4))
    return root


def toy(toy_dir, split, fmt="tfrecord"):
    return S.tfds_source(TOY, split, data_dir=os.fspath(toy_dir / fmt))


def split_ids(toy_dir, split):
    """Example ids in split order."""
    builder = tfds.builder(TOY, data_dir=os.fspath(toy_dir / "tfrecord"))
    ds = builder.as_dataset(split=split, read_config=tfds.ReadConfig(interleave_cycle_length=1),
                            decoders={"image": tfds.decode.SkipDecoding()})
    return [int(e["id"]) for e in ds.as_numpy_iterator()]


def decode_ids(images):
    c = np.rint((images[:, 0, 0, :2] + 1) * 127.5).astype(int)
    return c[:, 0] + 256 * c[:, 1]


def _kw(**kw):
    args = dict(image_size=16, batch_size=4, mask_spec=BOX, seed=5, train=True,
                process_index=0, process_count=1)
    args.update(kw)
    return args


def _take(it, n):
    out = [next(it) for _ in range(n)]
    if hasattr(it, "close"):
        it.close()
    return out


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() == {"image", "mask"}
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_tensorflow_sees_no_gpu():
    assert tf.config.get_visible_devices("GPU") == []


@pytest.mark.parametrize("train", [True, False])
def test_random_access_source_matches_grain_exactly(train):
    src = S.sample_photos_source(num_examples=30, crop_size=40)
    kw = _kw(train=train, process_index=1, process_count=2, image_size=(24, 32), batch_size=3,
             resize_shorter=36, mask_spec="free_form")
    n = 6 if train else 5  # 15 examples per process: 5 eval batches
    a = _take(tfdata.make_dataset(src, **kw), n)
    assert_batches_equal(a, _take(jgrain.make_dataset(src, **kw), n))
    assert a[0]["image"].shape == (3, 24, 32, 3) and a[0]["mask"].shape == (3, 24, 32, 1)
    assert a[0]["image"].dtype == np.float32 and a[0]["mask"].dtype == np.float32


def test_tfds_tfrecord_same_seed_same_batches(toy_dir):
    src = toy(toy_dir, "train")
    assert not src.random_access and len(src) == 37
    a = _take(tfdata.make_dataset(src, **_kw(shuffle_buffer=8)), 12)  # > 1 epoch
    assert_batches_equal(a, _take(tfdata.make_dataset(src, **_kw(shuffle_buffer=8)), 12))
    c = _take(tfdata.make_dataset(src, **_kw(shuffle_buffer=8, seed=6)), 12)
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))
    ids = np.concatenate([decode_ids(b["image"]) for b in a])
    assert sorted(ids[:37]) == list(range(37))  # first epoch covers the split once


def test_tfds_tfrecord_processes_read_disjoint_examples(toy_dir):
    src = toy(toy_dir, "train")
    parts = []
    for p in range(2):  # 18 examples per process, 1 dropped
        batches = _take(tfdata.make_dataset(src, **_kw(batch_size=6, process_index=p,
                                                       process_count=2)), 3)
        parts.append(set(np.concatenate([decode_ids(b["image"]) for b in batches]).tolist()))
    assert len(parts[0]) == len(parts[1]) == 18 and not parts[0] & parts[1]


def test_tfds_tfrecord_eval_masks_follow_split_position(toy_dir):
    src = toy(toy_dir, "train")
    batches = list(tfdata.make_dataset(src, **_kw(train=False, process_index=1, process_count=2,
                                                  batch_size=4, mask_spec="lama_box",
                                                  image_size=128, max_upscale=None)))
    assert len(batches) == 4  # 18 examples: 4 full batches
    order = split_ids(toy_dir, "train")
    ids = np.concatenate([decode_ids(b["image"]) for b in batches])
    positions = [order.index(i) for i in ids]
    assert positions == list(range(18, 34))  # process 1 reads positions 18..35 in order
    masks = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(masks, M.masks_for_indices("lama_box", 128, 5, positions))


@pytest.mark.parametrize("train", [True, False])
def test_tfds_array_record_tfdata_matches_grain(toy_dir, train):
    src = toy(toy_dir, "train", "array_record")
    assert src.random_access
    kw = _kw(train=train, process_index=0, process_count=2)
    a = _take(tfdata.make_dataset(src, **kw), 4)
    assert_batches_equal(a, _take(jgrain.make_dataset(src, **kw), 4))
    if not train:  # eval order: process 0 reads the first half of each global batch of 8
        order = split_ids(toy_dir, "train")
        ids = np.concatenate([decode_ids(b["image"]) for b in a])
        assert [order.index(i) for i in ids] == [g * 8 + r for g in range(4) for r in range(4)]


def test_tfds_bad_records_are_skipped_and_counted(toy_dir, caplog):
    for fmt, loader in (("tfrecord", tfdata), ("array_record", tfdata), ("array_record", jgrain)):
        src = toy(toy_dir, "mixed", fmt)
        with caplog.at_level(logging.WARNING, logger="jattn.data"):
            caplog.clear()
            it = loader.make_dataset(src, **_kw(train=False, batch_size=1, drop_remainder=False))
            # Channel 0 holds the id (< 256); the grayscale image repeats it in all channels.
            ids = [int(np.rint((b["image"][0, 0, 0, 0] + 1) * 127.5)) for b in it]
        warned = [r.getMessage() for r in caplog.records if "skipping bad image" in r.getMessage()]
        assert len(warned) == 3, warned
        assert it.bad_data.skipped == 3 and it.bad_data.converted == 1
        assert 206 in ids and not {202, 205, 207} & set(ids)
        if fmt == "tfrecord":
            assert sorted(ids) == [200, 201, 203, 204, 206]  # bad records dropped
        else:
            assert len(ids) == 8  # bad slots take the next readable record


def test_tfds_errors_are_clear(toy_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown TFDS dataset 'no_such_dataset_xyz'"):
        S.tfds_source("no_such_dataset_xyz", "train", data_dir=os.fspath(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"TFDS dataset '{TOY}' is not prepared"):
        S.tfds_source(TOY, "train", data_dir=os.fspath(tmp_path))
    with pytest.raises(ValueError, match="invalid split 'nope'"):
        toy(toy_dir, "nope")
    with pytest.raises(ValueError, match="has no feature 'hr'"):
        S.tfds_source(TOY, "train", data_dir=os.fspath(toy_dir / "tfrecord"), image_key="hr")
    with pytest.raises(ValueError, match="not random access"):
        jgrain.make_dataset(toy(toy_dir, "train"), **_kw())


def test_tfds_source_pickles_for_workers(toy_dir):
    import pickle

    src = toy(toy_dir, "test", "array_record")
    clone = pickle.loads(pickle.dumps(src))
    assert clone._builder is None and len(clone) == 11
    assert clone[3].data == src[3].data and clone[3].name == f"{TOY}/test[3]"


# ----------------------------------------------------------------------------- exact resume


def _resumed(make, n, k, encode=True):
    """n batches straight; k batches, the state, a fresh iterator restored from it, n - k
    batches.  Returns (straight, resumed, straight iterator, restored iterator, state)."""
    straight = make()
    a = [next(straight) for _ in range(n)]
    first = make()
    b = [next(first) for _ in range(k)]
    state = first.get_state()
    first.close()
    restored = make()
    # grain's orbax handler passes a non-grain iterator's state back as the JSON bytes
    restored.set_state(json.dumps(state).encode() if encode else state)
    b += [next(restored) for _ in range(n - k)]
    return a, b, straight, restored, state


class _CountingSource:
    """A random-access source that records which records are read."""

    random_access = True

    def __init__(self, source):
        self.source, self.read = source, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        self.read.append(int(i))
        return self.source[i]


@pytest.mark.parametrize("kind", ["sample_photos", "folder"])
def test_random_access_state_restore_is_exact(kind, tmp_path):
    if kind == "folder":
        for i in range(23):
            (tmp_path / f"{i:02d}.png").write_bytes(_constant_png(i))
        src = S.folder_source(tmp_path)
    else:
        src = S.sample_photos_source(num_examples=23, crop_size=40)
    # 2 processes x 3 = 6 a global batch: 3 batches an epoch per process, restored inside epoch 2
    kw = _kw(batch_size=3, process_index=1, process_count=2)
    a, b, straight, restored, state = _resumed(lambda: tfdata.make_dataset(src, **kw), n=8, k=4)
    assert_batches_equal(a, b)
    assert state["format"] == tfdata.STATE_FORMAT and state["position"] == 12 and state["batches"] == 4
    assert state["pipeline"]["num_records"] == 23 and state["pipeline"]["process_index"] == 1
    assert restored.get_state() == straight.get_state()
    assert restored.bad_data == straight.bad_data
    # the same batches as grain's
    assert_batches_equal(a, _take(jgrain.make_dataset(src, **kw), 8))


def test_random_access_restore_reads_no_skipped_example():
    src = _CountingSource(S.sample_photos_source(num_examples=30, crop_size=40))
    kw = _kw(batch_size=3, num_epochs=1)
    it = tfdata.make_dataset(src, **kw)
    _take(it, 8)
    state = it.get_state()
    assert state["position"] == 24
    restored = tfdata.make_dataset(src, **kw)
    restored.set_state(state)
    src.read.clear()  # the build checks that a record is readable
    rest = list(restored)
    assert len(rest) == 2
    perm = np.random.default_rng([5, 0, 2]).permutation(30)  # epoch 0 of seed 5 (ExampleOrder)
    assert sorted(src.read) == sorted(perm[24:].tolist())  # only positions 24..29 are read


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2)])
def test_tfds_tfrecord_state_restore_is_exact(toy_dir, process_index, process_count):
    src = toy(toy_dir, "train", "tfrecord4")
    kw = _kw(shuffle_buffer=8, process_index=process_index, process_count=process_count)
    per_process = 37 // process_count
    n = 2 * per_process // 4 + 2  # over 2 epochs, restored in the first
    a, b, straight, restored, _ = _resumed(lambda: tfdata.make_dataset(src, **kw), n=n, k=5)
    assert_batches_equal(a, b)
    assert restored.get_state() == straight.get_state()
    ids = np.concatenate([decode_ids(x["image"]) for x in a])
    assert len(set(ids[:per_process].tolist())) == per_process  # a shuffled epoch, then the next
    assert not np.array_equal(ids[:per_process], ids[per_process:2 * per_process])


def test_tfds_tfrecord_restore_counts_dropped_records_exactly(toy_dir):
    src = toy(toy_dir, "mixed")  # ids 200..207; 202, 205, 207 are bad (207 last), 206 gray
    kw = _kw(train=False, batch_size=1, drop_remainder=False)
    straight = tfdata.make_dataset(src, **kw)
    a = list(straight)
    first = tfdata.make_dataset(src, **kw)
    b = _take(first, 3)  # 200, 201, 203: one dropped on the way
    assert first.bad_data.skipped == 1
    restored = tfdata.make_dataset(src, **kw)
    restored.set_state(first.get_state())
    b += list(restored)
    assert_batches_equal(a, b)
    assert restored.bad_data == straight.bad_data == tfdata.ex.BadDataStats(skipped=3, converted=1)


def test_restore_refuses_a_grain_state_and_warns_on_another_pipeline(caplog):
    src = S.sample_photos_source(num_examples=30, crop_size=40)
    grain_it = jgrain.make_dataset(src, **_kw())
    _take(grain_it, 2)
    it = tfdata.make_dataset(src, **_kw())
    with pytest.raises(ValueError, match=r"^the saved data-iterator state is not a tf\.data one \(written by "
                       r"the grain loader\?\)[^\n]*$"):
        it.set_state(json.dumps(grain_it.get_state()).encode())
    with pytest.raises(ValueError, match="not a tf.data one"):
        it.set_state(b"not json")
    first = tfdata.make_dataset(src, **_kw())
    _take(first, 2)
    other = tfdata.make_dataset(src, **_kw(seed=6))
    with caplog.at_level(logging.WARNING, logger="jattn.data"):
        other.set_state(first.get_state())
    assert any("seed (5 -> 6)" in r.getMessage() for r in caplog.records)
    assert other.get_state()["position"] == 8
    next(other)
    assert other.get_state()["position"] == 12 and other.get_state()["batches"] == 3
