"""Training augmentation (``data.augment``): the SR flips and rotations, the inception crop and
the CIFAR pad-and-crop; a pure function of (seed, example index), the same in grain and
tf.data, unchanged eval batches, one-line errors naming the key."""
import pathlib

import numpy as np
import pytest
from PIL import Image

from jattn.config import ConfigError, load_config
from jattn.data import images as I
from jattn.data import make_dataset
from jattn.data import sources as S
from jattn.data.examples import ExampleMaker

REPO = pathlib.Path(__file__).resolve().parents[1]

RECIPES = {
    "default": None,
    "sr": {"flip_lr": True, "flip_ud": True, "rot90": True},
    "inception": {"crop": "inception", "area": [0.08, 1.0], "ratio": [0.75, 4 / 3]},
    "pad": {"crop": "pad", "pad": 4},
    "reflect": {"crop": "pad", "pad": 3, "pad_mode": "reflect", "flip_ud": True},
}


def _image(i, size=(20, 24)):
    return np.random.default_rng([i, 7]).integers(0, 256, (*size, 3), dtype=np.uint8)


class NoiseSource:
    """Random-access source whose record ``i`` is a seeded noise image (every pixel differs)."""

    random_access = True

    def __init__(self, n, size=(20, 24)):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return S.Record(_image(i, self.size), f"noise-{i}", label=i % 3)

    def __repr__(self):
        return f"NoiseSource({self.n})"


def _maker(augment, size=16, **kw):
    return ExampleMaker(size, None, seed=kw.pop("seed", 4), mask_seed=0, train=kw.pop("train", True),
                        fields=kw.pop("fields", ()), augment=augment, **kw)


def _batches(loader, augment, n=3, train=True, seed=2, **kw):
    args = dict(image_size=16, batch_size=4, seed=seed, train=train, fields=("label",), process_index=0,
                process_count=1, augment=augment)
    args.update(kw)
    it = make_dataset(NoiseSource(12), loader=loader, **args)
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


# --------------------------------------------------------------------------- determinism


def test_the_default_is_the_pipelines_original_crop_and_flip():
    """augment None / {} / the schema's defaults draw exactly what the pipeline always drew."""
    rgb = _image(3, (30, 26))
    for augment in (None, {}, {"crop": "random", "flip_lr": True, "flip_ud": False, "rot90": False, "pad": 2}):
        maker = _maker(augment, size=(16, 12))
        for k in range(6):
            rng = np.random.default_rng([4, k, 1])
            top, left = int(rng.integers(0, 30 - 16 + 1)), int(rng.integers(0, 26 - 12 + 1))
            want = rgb[top:top + 16, left:left + 12]
            if rng.random() < 0.5:
                want = want[:, ::-1]
            np.testing.assert_array_equal(maker.image(rgb, "x", k)[0], I.to_float(np.ascontiguousarray(want)))


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r != "default"])
def test_a_pure_function_of_seed_and_index_and_the_same_in_grain_and_tfdata(recipe):
    augment = RECIPES[recipe]
    grain = _batches("grain", augment)
    assert _equal(grain, _batches("tf", augment))
    assert _equal(grain, _batches("grain", augment))
    assert not _equal(grain, _batches("grain", augment, seed=3))
    assert not _equal(grain, _batches("grain", None))  # the option really changes the training batches
    maker, rec = _maker(augment), NoiseSource(1)[0]
    assert all(np.array_equal(maker.image(rec.data, "x", k)[0], maker.image(rec.data, "x", k)[0]) for k in range(5))


@pytest.mark.parametrize("loader", ["grain", "tf"])
def test_a_restored_iterator_continues_with_the_same_augmented_batches(loader):
    augment = RECIPES["inception"]
    args = dict(image_size=16, batch_size=4, seed=2, train=True, process_index=0, process_count=1,
                augment=augment, fields=())
    it = make_dataset(NoiseSource(12), loader=loader, **args)
    whole = [next(it) for _ in range(5)]
    it = make_dataset(NoiseSource(12), loader=loader, **args)
    [next(it) for _ in range(2)]
    state = it.get_state()
    again = make_dataset(NoiseSource(12), loader=loader, **args)
    again.set_state(state)
    assert _equal(whole[2:], [next(again) for _ in range(3)])


# --------------------------------------------------------------------------- flips and rotations


def _dihedral(a):
    """The 8 symmetries of a square array [H, W, ...]."""
    out = []
    for flipped in (a, a[:, ::-1]):
        out += [np.rot90(flipped, k, axes=(0, 1)) for k in range(4)]
    return out


def test_flips_and_rotations_give_all_8_orientations_and_lowres_follows():
    rgb = _image(1, (16, 16))  # the crop is the whole image: only its orientation changes
    maker = _maker(RECIPES["sr"], fields=("lowres",), scale=2)
    variants = [I.to_float(np.ascontiguousarray(v)) for v in _dihedral(rgb)]
    assert len({v.tobytes() for v in variants}) == 8
    seen = set()
    for k in range(64):
        out = maker.example(rgb, "x", k)[0]
        match = [j for j, v in enumerate(variants) if np.array_equal(out["image"], v)]
        assert len(match) == 1, k
        seen.add(match[0])
        # the low-res input is made from the augmented high-res crop
        np.testing.assert_array_equal(out["lowres"], I.downscale(out["image"], 2))
        assert out["lowres"].shape == (8, 8, 3)
    assert seen == set(range(8))


def test_lowres_is_the_downscaled_augmented_crop_in_the_pipelines():
    for b in _batches("grain", RECIPES["sr"], n=2, fields=("lowres",), scale=4):
        for image, lowres in zip(b["image"], b["lowres"]):
            np.testing.assert_array_equal(lowres, I.downscale(image, 4))


def test_segmentation_maps_follow_the_flips_rotations_and_crops():
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 4, (20, 24)).astype(np.uint8)
    rgb = np.stack([seg * 60, rng.integers(0, 255, (20, 24)), np.full((20, 24), 9)], -1).astype(np.uint8)
    for recipe in ("sr", "pad", "reflect", "inception"):
        maker = _maker(RECIPES[recipe], fields=("segmentation",))
        for k in range(8):
            out = maker.example(rgb, "x", k, segmentation=seg)[0]
            if recipe == "inception":  # bicubic image, nearest map: compare where the map is flat
                continue
            np.testing.assert_array_equal(out["image"][..., 0], I.to_float((out["segmentation"] * 60).astype(np.uint8)))
        assert out["segmentation"].shape == (16, 16) and out["segmentation"].dtype == np.int32


# --------------------------------------------------------------------------- inception crop


@pytest.mark.parametrize("shape", [(60, 80), (90, 90), (50, 40)])
def test_inception_boxes_stay_in_the_area_and_aspect_ratio_ranges(shape):
    H, W = shape
    rng = np.random.default_rng(0)
    fractions, ratios = [], []
    for _ in range(400):
        top, left, h, w = I.inception_box(shape, rng)
        assert 0 < h <= H and 0 < w <= W and 0 <= top <= H - h and 0 <= left <= W - w
        # in range up to the rounding of each side to whole pixels
        assert (h + 0.5) * (w + 0.5) >= 0.08 * H * W and (h - 0.5) * (w - 0.5) <= H * W
        assert (w + 0.5) / (h - 0.5) >= 3 / 4 and (w - 0.5) / (h + 0.5) <= 4 / 3
        fractions.append(h * w / (H * W))
        ratios.append(w / h)
    assert min(fractions) < 0.15 and max(fractions) > 0.85  # the whole range is used
    assert min(ratios) < 0.85 and max(ratios) > 1.2


def test_inception_boxes_of_other_ranges_and_the_fallback():
    rng = np.random.default_rng(1)
    for _ in range(50):
        top, left, h, w = I.inception_box((64, 64), rng, area=(0.25, 0.25), ratio=(1.0, 1.0))
        assert h == w == 32
    # a strip no box of the ratio range fits: the centre of the whole height, the widest ratio
    assert I.inception_box((10, 400), rng, area=(0.5, 1.0)) == (0, (400 - 13) // 2, 10, 13)


@pytest.mark.parametrize("size", [16, (12, 20)])
def test_the_inception_crop_is_the_box_resized_to_the_crop_size(size):
    rgb = _image(5, (40, 48))
    maker = _maker(RECIPES["inception"], size=size)
    H, W = maker.image_size
    outs = set()
    for k in range(8):
        img = maker.image(rgb, "x", k)[0]
        assert img.shape == (H, W, 3) and img.dtype == np.float32
        rng = np.random.default_rng([4, k, 1])
        top, left, h, w = I.inception_box(rgb.shape, rng, (0.08, 1.0), (0.75, 4 / 3))
        want = np.asarray(Image.fromarray(np.ascontiguousarray(rgb[top:top + h, left:left + w])).resize(
            (W, H), Image.BICUBIC))
        if rng.random() < 0.5:
            want = want[:, ::-1]
        np.testing.assert_array_equal(img, I.to_float(np.ascontiguousarray(want)))
        outs.add(img.tobytes())
    assert len(outs) == 8


# --------------------------------------------------------------------------- pad and crop


@pytest.mark.parametrize("mode", ["zero", "reflect"])
def test_the_pad_crop_is_a_crop_of_the_padded_image(mode):
    rgb = _image(2, (8, 8))
    pad = 4
    maker = _maker({"crop": "pad", "pad": pad, "pad_mode": mode}, size=8)
    padded = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), mode="constant" if mode == "zero" else "reflect")
    crops = {}
    for t in range(2 * pad + 1):
        for l in range(2 * pad + 1):
            c = padded[t:t + 8, l:l + 8]
            for v in (c, c[:, ::-1]):
                crops[I.to_float(np.ascontiguousarray(v)).tobytes()] = (t, l)
    offsets = []
    for k in range(40):
        img = maker.image(rgb, "x", k)[0]
        assert img.shape == (8, 8, 3)
        offsets.append(crops[img.tobytes()])
    assert len(set(offsets)) > 10
    borders = [(t, l) for t, l in offsets if (t, l) != (pad, pad)]
    assert borders  # the crop reaches into the padding
    if mode == "zero":
        black = [maker.image(rgb, "x", k)[0] for k in range(40)]
        assert any((b == -1.0).all(-1).any() for b in black)  # zero padding: black pixels at the borders


def test_cifar_like_pad_crop_through_the_pipelines():
    src = NoiseSource(8, size=(16, 16))
    args = dict(image_size=16, batch_size=4, seed=0, train=True, process_index=0, process_count=1,
                augment={"crop": "pad", "pad": 4}, fields=())
    a = next(make_dataset(src, loader="grain", **args))["image"]
    assert a.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(a, next(make_dataset(src, loader="tf", **args))["image"])


# --------------------------------------------------------------------------- eval


@pytest.mark.parametrize("loader", ["grain", "tf"])
def test_eval_batches_ignore_the_augment_options(loader):
    base = _batches(loader, None, n=2, train=False, num_epochs=1)
    for recipe, augment in RECIPES.items():
        assert _equal(base, _batches(loader, augment, n=2, train=False, num_epochs=1)), recipe
    rgb = _image(0, (30, 30))
    want = I.to_float(np.ascontiguousarray(rgb[7:23, 7:23]))  # the centre crop
    for augment in RECIPES.values():
        np.testing.assert_array_equal(_maker(augment, train=False).image(rgb, "x", 3)[0], want)


def test_the_eval_resize_then_centre_crop():
    """resize_shorter 256 -> centre 224 (the ImageNet eval), here 40 -> 32 of a 60x50 image."""
    rgb = _image(4, (60, 50))
    maker = ExampleMaker(32, None, seed=0, mask_seed=0, train=False, fields=(), resize_shorter=40)
    resized = I.resize_shorter_side(rgb, 40)
    assert resized.shape == (48, 40, 3)
    np.testing.assert_array_equal(maker.image(rgb, "x", 0)[0], I.to_float(np.ascontiguousarray(resized[8:40, 4:36])))


def test_eval_batches_use_data_eval_resize_shorter():
    from jattn.train.evaluate import eval_batches
    from toy import toy_config

    c = toy_config()
    c.data.source = {"kind": "sample_photos", "num_examples": 16, "crop_size": 40}
    c.data.eval_resize_shorter = 24
    c.eval_images = 8
    c.eval_batch_size = 8
    batch = next(eval_batches(c, fields=()))
    want = next(make_dataset(c.data.source.to_dict(), loader="grain", image_size=16, batch_size=8, seed=3,
                             train=False, num_epochs=1, fields=(), resize_shorter=24))
    np.testing.assert_array_equal(batch["image"], want["image"])


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("augment, key", [
    ({"crop": "center"}, "data.augment.crop"),
    ({"pad": -1}, "data.augment.pad"),
    ({"pad": 2.5}, "data.augment.pad"),
    ({"pad": True}, "data.augment.pad"),
    ({"pad_mode": "wrap"}, "data.augment.pad_mode"),
    ({"area": [0.0, 1.0]}, "data.augment.area"),
    ({"area": [0.5, 0.2]}, "data.augment.area"),
    ({"area": [0.1, 1.5]}, "data.augment.area"),
    ({"area": 0.5}, "data.augment.area"),
    ({"ratio": [0, 1]}, "data.augment.ratio"),
    ({"ratio": [2.0, 1.0]}, "data.augment.ratio"),
    ({"ratio": [1.0, 2.0, 3.0]}, "data.augment.ratio"),
    ({"flip_ud": "yes"}, "data.augment.flip_ud"),
    ({"rotate": True}, "data.augment: unknown key"),
    ("inception", "data.augment"),
])
def test_bad_values_are_one_line_errors_naming_the_key(augment, key):
    for make in (lambda: I.parse_augment(augment), lambda: _maker(augment)):
        with pytest.raises(ValueError) as err:
            make()
        assert len(str(err.value).splitlines()) == 1 and str(err.value).startswith(key), err.value


def test_rotations_need_a_square_crop():
    with pytest.raises(ValueError, match=r"^data\.augment\.rot90 needs a square crop"):
        _maker({"rot90": True}, size=(16, 24))
    _maker({"flip_ud": True}, size=(16, 24))  # flips do not


TOY = """from toy import toy_config


def get_config():
    c = toy_config(total=2)
    c.image_every = 0
    return c
"""


def test_bad_values_stop_jattn_train_before_the_workdir_exists(tmp_path, capsys):
    from jattn.cli import main

    config = tmp_path / "toy_config.py"
    config.write_text(TOY)
    cases = [("--config.data.augment.crop=centre", "data.augment.crop"),
             ("--config.data.augment.pad_mode=wrap", "data.augment.pad_mode"),
             ("--config.data.augment.area=[0.0, 1.0]", "data.augment.area"),
             ("--config.data.augment.ratio=[2.0, 1.0]", "data.augment.ratio")]
    for override, key in cases:
        code = main(["train", "--config", str(config), "--workdir", str(tmp_path / "runs" / "w"), "--no-progress",
                     override])
        out = capsys.readouterr()
        assert code == 2, out
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and key in lines[0] and "Traceback" not in out.err, out.err
        assert not (tmp_path / "runs").exists(), override


def test_the_paper_configs_set_their_recipes():
    aug = {name: load_config(REPO / "configs" / f"{name}.py").data.augment.to_dict()
           for name in ("rcan_div2k_x2", "rcan_div2k_x4", "se_resnet50_imagenet", "se_resnet_cifar10", "demo")}
    for name in ("rcan_div2k_x2", "rcan_div2k_x4"):
        assert aug[name]["crop"] == "random" and aug[name]["flip_lr"] and aug[name]["flip_ud"] and aug[name]["rot90"]
    imagenet = load_config(REPO / "configs" / "se_resnet50_imagenet.py")
    assert aug["se_resnet50_imagenet"]["crop"] == "inception" and aug["se_resnet50_imagenet"]["flip_lr"]
    assert I.parse_augment(aug["se_resnet50_imagenet"]).area == (0.08, 1.0)
    assert I.parse_augment(aug["se_resnet50_imagenet"]).ratio == (0.75, 4 / 3)
    assert imagenet.data.image_size == 224 and imagenet.data.eval_resize_shorter == 256
    assert aug["se_resnet_cifar10"]["crop"] == "pad" and aug["se_resnet_cifar10"]["pad"] == 4
    assert aug["se_resnet_cifar10"]["pad_mode"] == "zero" and aug["se_resnet_cifar10"]["flip_lr"]
    assert I.parse_augment(aug["demo"]) == I.Augment()  # every other config keeps the default
    with pytest.raises(ConfigError, match="data.augment.crop"):
        load_config(REPO / "configs" / "demo.py", ["data.augment.crop=centre"])
