"""grain pipeline: determinism, per-process disjointness, exact state save / restore."""
import numpy as np
import pytest

from jattn.data import grain as jgrain
from jattn.data import masks as M
from jattn.data import sources as S

BOX = {"kind": "box", "hole_size": 16, "max_delta": 8}


class IndexSource:
    """Random-access source whose record ``i`` is a constant image encoding ``i``."""

    def __init__(self, n, size=(20, 28)):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img = np.zeros((*self.size, 3), np.uint8)
        img[..., 0], img[..., 1], img[..., 2] = i % 256, i // 256, 77
        return S.Record(img, f"index-{i}")

    def __repr__(self):
        return f"IndexSource({self.n})"


def decode_indices(images):
    """Source indices of constant images ``[B, H, W, 3]`` in [-1, 1]."""
    c = np.rint((images[:, 0, 0, :2] + 1) * 127.5).astype(int)
    assert np.all(np.rint((images + 1) * 127.5)[..., :2] == c[:, None, None, :])
    return c[:, 0] + 256 * c[:, 1]


def _iter(src, **kw):
    args = dict(image_size=16, batch_size=4, mask_spec=BOX, seed=5, train=True,
                process_index=0, process_count=1)
    args.update(kw)
    return jgrain.make_dataset(src, **args)


def _take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() == {"image", "mask"}
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture(scope="module")
def photos():
    return S.sample_photos_source(num_examples=40, crop_size=40)


def test_batches_have_the_stated_format(photos):
    b = next(_iter(photos, image_size=(24, 32), batch_size=3))
    assert b["image"].shape == (3, 24, 32, 3) and b["image"].dtype == np.float32
    assert b["mask"].shape == (3, 24, 32, 1) and b["mask"].dtype == np.float32
    assert -1 <= b["image"].min() < b["image"].max() <= 1
    assert set(np.unique(b["mask"])) == {0.0, 1.0}
    # One mask per image, not one per batch.
    assert not np.array_equal(b["mask"][0], b["mask"][1])


def test_same_seed_same_batches_different_seed_different(photos):
    a = _take(_iter(photos), 4)
    assert_batches_equal(a, _take(_iter(photos), 4))
    c = _take(_iter(photos, seed=6), 4)
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_processes_read_disjoint_examples_each_epoch():
    n, P, B = 50, 3, 4  # 16 examples per process and epoch, 2 dropped
    seen = []
    for p in range(P):
        it = _iter(IndexSource(n), batch_size=B, process_index=p, process_count=P)
        idx = np.concatenate([decode_indices(b["image"]) for b in _take(it, 8)])  # 2 epochs
        seen.append((idx[:16], idx[16:]))
    for epoch in range(2):
        parts = [s[epoch] for s in seen]
        assert all(len(set(x)) == 16 for x in parts)
        union = set().union(*map(set, parts))
        assert len(union) == 48 and union <= set(range(n))
    assert not np.array_equal(seen[0][0], seen[0][1])  # reshuffled per epoch


def test_global_batches_do_not_depend_on_the_process_count():
    n, B = 50, 12
    single = [decode_indices(b["image"]) for b in _take(_iter(IndexSource(n), batch_size=B), 9)]
    for P in (2, 3, 4):
        per = [[decode_indices(b["image"]) for b in _take(_iter(IndexSource(n), batch_size=B // P,
                                                                process_index=p, process_count=P), 9)]
               for p in range(P)]
        for i in range(9):  # crosses an epoch boundary (4 global batches per epoch)
            np.testing.assert_array_equal(np.concatenate([per[p][i] for p in range(P)]), single[i])


def test_eval_is_in_order_with_eval_set_masks(photos, tmp_path):
    src = IndexSource(23)
    it = _iter(src, train=False, batch_size=5, process_index=1, process_count=2, mask_seed=9,
               mask_spec="lama_box", image_size=128, max_upscale=None)
    batches = list(it)
    assert len(batches) == 2  # 11 examples for process 1 (2 slices of 5 + 1), batches of 5
    idx = np.concatenate([decode_indices(b["image"]) for b in batches])
    # process 1 reads the second half of each global batch of 10
    np.testing.assert_array_equal(idx, np.r_[5:10, 15:20])
    masks = np.concatenate([b["mask"] for b in batches])
    ref = M.eval_set("lama_box", 21, 128, seed=9, directory=tmp_path).masks
    np.testing.assert_array_equal(masks, ref[idx])  # mask index = example index


def test_state_restore_yields_the_next_batches_exactly(photos):
    it = _iter(photos, batch_size=6)  # 40 examples: epoch boundary inside batch 7
    _take(it, 5)
    state = it.get_state()
    expected = _take(it, 4)
    restored = _iter(photos, batch_size=6)
    restored.set_state(state)
    assert_batches_equal(expected, _take(restored, 4))
    assert restored.get_state() == it.get_state()


def test_orbax_style_checkpoint_handler_roundtrip(photos, tmp_path):
    import grain
    from etils import epath

    it = _iter(photos)
    _take(it, 3)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), it)
    expected = _take(it, 2)
    fresh = _iter(photos)
    handler.restore(epath.Path(tmp_path), fresh)
    assert_batches_equal(expected, _take(fresh, 2))


def test_non_random_access_source_is_rejected(photos):
    class Stream:
        random_access = False

    with pytest.raises(ValueError, match="not random access"):
        _iter(Stream())


@pytest.mark.slow
def test_state_restore_with_worker_processes(photos):
    it = _iter(photos, worker_count=2)
    first = _take(it, 3)
    state = it.get_state()
    expected = _take(it, 3)
    it.close()
    assert_batches_equal(first, _take(_iter(photos), 3))  # workers change nothing
    restored = _iter(photos, worker_count=2)
    restored.set_state(state)
    assert_batches_equal(expected, _take(restored, 3))
    restored.close()


def test_config_driven_entry_point():
    import jattn.data

    cfg = {"kind": "sample_photos", "num_examples": 12, "crop_size": 24}
    it = jattn.data.make_dataset(cfg, loader="grain", image_size=16, batch_size=4,
                                 mask_spec=[(1, BOX), (1, "lama_thin")], seed=1, train=False,
                                 process_index=0, process_count=1)
    assert len(list(it)) == 3
    with pytest.raises(ValueError, match="unknown loader 'torch'"):
        jattn.data.make_dataset(cfg, loader="torch")


def test_mask_spec_that_does_not_fit_fails_before_the_first_batch(photos):
    with pytest.raises(ValueError, match="does not fit in a 16x16 image"):
        _iter(photos, mask_spec="box")
