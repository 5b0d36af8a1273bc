"""Inception Score, FID, activation statistics, the FID Inception-v3 and its weight files, evaluate_gan."""

import math
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.linalg

from jattn import gan_metrics as G
from jattn.train.sharding import make_mesh


# --------------------------------------------------------------------------- Inception Score


def test_inception_score_uniform_logits_is_one():
    mean, std = G.inception_score(np.zeros((40, 7)), splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [2, 10, 1008])
def test_inception_score_confident_distinct_classes_is_k(k):
    # each split holds every class once, predicted with (almost) certainty
    logits = 50.0 * np.tile(np.eye(k), (3, 1))
    mean, std = G.inception_score(logits, splits=3)
    assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6 * k


def test_inception_score_between_and_shift_invariant():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(100, 5)) * 2
    mean, _ = G.inception_score(logits, splits=5)
    assert 1.0 < mean < 5.0
    assert G.inception_score(logits + 7.0, splits=5)[0] == pytest.approx(mean, rel=1e-12)
    # every example predicting the same confident class: no diversity, IS 1
    assert G.inception_score(np.tile(50.0 * np.eye(5)[:1], (20, 1)), splits=2)[0] == pytest.approx(1.0, abs=1e-9)


def test_inception_score_errors():
    with pytest.raises(ValueError, match="splits"):
        G.inception_score(np.zeros((4, 3)), splits=5)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        G.inception_score(np.zeros((4, 3, 1)))


# --------------------------------------------------------------------------- FID


def _random_cov(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d


def test_fid_identical_statistics_is_zero():
    rng = np.random.default_rng(1)
    mu, sigma = rng.normal(size=16), _random_cov(rng, 16)
    assert G.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    singular = _random_cov(rng, 16, rank=4)  # fewer samples than dimensions
    assert G.frechet_distance(mu, singular, mu, singular) == pytest.approx(0.0, abs=1e-9)


def test_fid_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    d1, d2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert G.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(want, rel=1e-10)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2
    assert G.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_fid_matches_sqrtm_formula_and_is_symmetric():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    s1, s2 = _random_cov(rng, 12), _random_cov(rng, 12)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    got = G.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-8)
    assert G.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-8)
    with pytest.raises(ValueError, match="shapes"):
        G.frechet_distance(mu1, s1, mu2[:5], s2)


# --------------------------------------------------------------------------- statistics


class _TinyNet(nn.Module):
    """Stand-in feature network: images [B, H, W, 3] -> (features [B, 8], logits [B, 5])."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        f = jnp.mean(h, axis=(1, 2))
        return f, nn.Dense(5)(f)


@pytest.fixture(scope="module")
def tiny_net():
    net = _TinyNet()
    params = net.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    return jax.jit(lambda x: net.apply(params, x))


def test_activation_statistics_match_numpy(tiny_net):
    rng = np.random.default_rng(4)
    batches = [rng.uniform(-1, 1, (b, 16, 16, 3)).astype(np.float32) for b in (5, 7, 4)]
    feats = np.concatenate([np.asarray(tiny_net(b)[0], np.float64) for b in batches])
    mu, sigma = G.activation_statistics(tiny_net, [batches[0], {"image": batches[1]}, batches[2]])
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-8, atol=1e-12)
    # large offsets do not cost precision (moments are shifted by the first batch's mean)
    mu2, sigma2 = G.activation_statistics(lambda x: np.asarray(x) + 1e6, [feats[:6], feats[6:]])
    np.testing.assert_allclose(mu2 - 1e6, feats.mean(0), atol=1e-7)
    np.testing.assert_allclose(sigma2, np.cov(feats, rowvar=False), atol=1e-7)
    with pytest.raises(ValueError, match="at least 2"):
        G.activation_statistics(tiny_net, [batches[0][:1]])


def test_statistics_file_round_trip(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    G.save_statistics(tmp_path / "s.npz", mu, sigma)
    mu2, sigma2 = G.load_statistics(tmp_path / "s.npz")
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)


# --------------------------------------------------------------------------- Inception-v3


def test_inception_architecture_tensor_list():
    shapes = G.inception_tensor_shapes()
    assert len(shapes) == 94 * 5 + 2  # 94 conv + BN layers and the classifier, as pytorch-fid's state dict
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert shapes["fc.weight"] == (1008, 2048)
    trainable = sum(math.prod(s) for k, s in shapes.items() if not k.endswith(("running_mean", "running_var")))
    # torchvision inception_v3: 27,161,264 parameters, of which AuxLogits 3,326,696; +8 classes
    # (1008 instead of 1000) add 8 * 2049
    assert trainable == 27_161_264 - 3_326_696 + 8 * 2049


def _weights(shapes, rng=None):
    if rng is None:
        return {k: np.full(s, 0.01, np.float32) for k, s in shapes.items()}
    return {k: (rng.normal(size=s) * (0.05 if k.endswith("conv.weight") or k == "fc.weight" else 0.1)
                + (1.0 if k.endswith(("running_var", "bn.weight")) else 0.0)).astype(np.float32)
            for k, s in shapes.items()}


def test_inception_weights_errors(tmp_path):
    missing = tmp_path / "nothing.npz"
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        G.load_inception_weights(missing)
    bad_suffix = tmp_path / "w.pth"
    bad_suffix.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"w\.pth.*\.npz or \.safetensors"):
        G.load_inception_weights(bad_suffix)
    shapes = G.inception_tensor_shapes()
    weights = _weights(shapes)
    del weights["Mixed_6c.branch7x7dbl_3.bn.running_var"]
    weights["fc.weight"] = np.zeros((1000, 2048), np.float32)
    np.savez(tmp_path / "partial.npz", **weights)
    with pytest.raises(ValueError) as err:
        G.load_inception_weights(tmp_path / "partial.npz")
    msg = str(err.value)
    assert "partial.npz" in msg and "2 problem(s)" in msg
    assert "missing tensor 'Mixed_6c.branch7x7dbl_3.bn.running_var'" in msg
    assert "'fc.weight' has shape (1000, 2048), expected (1008, 2048)" in msg
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt.safetensors could not be read"):
        G.load_inception_weights(corrupt)


def test_inception_weights_layout(tmp_path):
    from safetensors.numpy import save_file

    shapes = G.inception_tensor_shapes()
    weights = _weights(shapes)
    conv = np.arange(32 * 3 * 3 * 3, dtype=np.float32).reshape(32, 3, 3, 3)
    fc = np.arange(1008 * 2048, dtype=np.float32).reshape(1008, 2048)
    weights.update({"Conv2d_1a_3x3.conv.weight": conv, "fc.weight": fc,
                    "Conv2d_1a_3x3.bn.num_batches_tracked": np.zeros((), np.int64)})  # extra tensors are ignored
    save_file(weights, str(tmp_path / "w.safetensors"))
    params = G.load_inception_weights(tmp_path / "w.safetensors")
    np.testing.assert_array_equal(params["Conv2d_1a_3x3"]["kernel"], conv.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    np.testing.assert_array_equal(params["fc"]["kernel"], fc.T)
    assert params["Mixed_7c"]["branch_pool"]["var"].shape == (192,)
    assert set(params) == {"Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                           "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                           "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "fc"}


def test_inception_pool_variants():
    # TF average pooling ignores the padding: a constant map stays constant at the border
    x = jnp.ones((1, 4, 4, 1))
    np.testing.assert_allclose(G._avg_pool_same(x), 1.0)
    y = jnp.arange(16.0).reshape(1, 4, 4, 1)
    np.testing.assert_allclose(G._max_pool_same(y)[0, 0, 0, 0], 5.0)  # max over the 2x2 corner window
    assert G._max_pool_down(jnp.zeros((1, 299, 299, 1))).shape == (1, 149, 149, 1)


@pytest.mark.slow
def test_inception_network_forward(tmp_path):
    shapes = G.inception_tensor_shapes()
    np.savez(tmp_path / "w.npz", **_weights(shapes, np.random.default_rng(0)))
    net = G.inception_network(tmp_path / "w.npz")
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    feats, logits = net(images)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert np.isfinite(np.asarray(feats)).all() and np.isfinite(np.asarray(logits)).all()
    assert float(jnp.min(feats)) >= 0.0  # pool3 averages ReLU outputs
    # images are resized to 299 first: a 299-pixel input gives the same as its own resize
    big = jax.image.resize(images, (2, 299, 299, 3), "bilinear", antialias=False)
    np.testing.assert_allclose(net(big)[0], feats, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- evaluate_gan


def _stub_task():
    """A GAN stand-in: sample i is a constant image of value sin(index_i + label_i)."""

    def predict(params, variables, batch):
        del variables
        v = jnp.sin(batch["index"].astype(jnp.float32) * params["scale"] + batch["label"])
        return {"output": jnp.broadcast_to(v[:, None, None, None], batch["image"].shape), "real": batch["image"]}

    state = types.SimpleNamespace(params={"scale": jnp.float32(1.0)}, variables={})
    return types.SimpleNamespace(predict=predict), state


def _config(**model):
    return ml_collections.ConfigDict({"model": {"name": "sagan", **model}})


def _feature_fn(images):
    """features: per-channel means and a corner pixel; logits from them."""
    f = jnp.concatenate([jnp.mean(images, axis=(1, 2)), images[:, 0, 0, :]], axis=-1)
    return f, 3.0 * f[:, :4]


@pytest.mark.parametrize("use_mesh", [False, True])
def test_evaluate_gan_whole_set_statistics(use_mesh):
    task, state = _stub_task()
    rng = np.random.default_rng(5)
    batches = [{"image": rng.uniform(-1, 1, (8, 4, 4, 3)).astype(np.float32),
                "label": rng.integers(0, 3, 8).astype(np.int32),
                "mask": np.zeros((8, 4, 4, 1), np.float32)} for _ in range(3)]
    out = G.evaluate_gan(task, state, _config(), iter(batches), network=_feature_fn,
                         mesh=make_mesh() if use_mesh else None, splits=2)
    # expected: samples for indices 0..23 (distinct across batches) with the batches' labels
    index = np.arange(24)
    labels = np.concatenate([b["label"] for b in batches])
    fake = np.broadcast_to(np.sin(index + labels)[:, None, None, None].astype(np.float32), (24, 4, 4, 3))
    real = np.concatenate([b["image"] for b in batches])
    ff, fl = (np.asarray(a, np.float64) for a in _feature_fn(jnp.asarray(fake)))
    rf, rl = (np.asarray(a, np.float64) for a in _feature_fn(jnp.asarray(real)))
    want = G.frechet_distance(ff.mean(0), np.cov(ff, rowvar=False), rf.mean(0), np.cov(rf, rowvar=False))
    assert out["eval_images"] == 24
    assert out["eval_fid"] == pytest.approx(want, rel=1e-6)
    assert out["eval_is"] == pytest.approx(G.inception_score(fl, 2)[0], rel=1e-6)
    assert out["eval_is_real"] == pytest.approx(G.inception_score(rl, 2)[0], rel=1e-6)
    assert out["eval_kid"] == pytest.approx(G.kernel_inception_distance(ff, rf, subset_size=24)[0], rel=1e-6)
    # precomputed real statistics give the same FID
    again = G.evaluate_gan(task, state, _config(), iter(batches), network=_feature_fn,
                           real_stats=(rf.mean(0), np.cov(rf, rowvar=False)), splits=2)
    assert again["eval_fid"] == pytest.approx(want, rel=1e-6) and "eval_is_real" not in again
    assert "eval_kid" not in again  # the statistics hold no features


def test_evaluate_gan_weights_from_config(tmp_path):
    task, state = _stub_task()
    batches = [{"image": np.zeros((2, 4, 4, 3), np.float32), "label": np.zeros(2, np.int32)}]
    assert G.evaluate_gan(task, state, _config(inception_weights=None), batches) == {}
    with pytest.raises(FileNotFoundError, match="fid_inception.npz"):
        G.evaluate_gan(task, state, _config(inception_weights=str(tmp_path / "fid_inception.npz")), batches)
    with pytest.raises(ValueError, match="no images"):
        G.evaluate_gan(task, state, _config(), [], network=_feature_fn)


# --------------------------------------------------------------------------- KID


def _mmd2_loops(x, y, degree=3, gamma=None, coef0=1.0):
    """The unbiased MMD^2 estimate, term by term."""
    m, d = x.shape
    gamma = 1.0 / d if gamma is None else gamma

    def k(u, v):
        return (gamma * sum(float(p) * float(q) for p, q in zip(u, v)) + coef0) ** degree

    s_xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    s_yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    s_xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return s_xx / (m * (m - 1)) + s_yy / (m * (m - 1)) - 2.0 * s_xy / (m * m)


def test_kid_whole_sets_match_loops():
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=(12, 5)), rng.normal(0.3, 1.2, size=(12, 5))
    # subsets of all rows are permutations: every subset's estimate is the whole sets'
    mean, std = G.kernel_inception_distance(a, b, subsets=3, subset_size=1000)
    assert mean == pytest.approx(_mmd2_loops(a, b), rel=1e-10) and std == pytest.approx(0.0, abs=1e-12)
    mean, _ = G.kernel_inception_distance(a, b, subsets=1, subset_size=12, degree=2, gamma=0.5, coef0=0.0)
    assert mean == pytest.approx(_mmd2_loops(a, b, degree=2, gamma=0.5, coef0=0.0), rel=1e-10)


def test_kid_subsets_match_loops():
    # subset rows drawn as torch-fidelity draws them: RandomState(seed), a's rows then b's, per subset
    rng = np.random.default_rng(11)
    a, b = rng.normal(size=(15, 4)), rng.normal(0.5, 1.0, size=(25, 4))
    mean, std = G.kernel_inception_distance(a, b, subsets=4, subset_size=10, seed=3)
    draw = np.random.RandomState(3)
    want = []
    for _ in range(4):
        x = a[draw.choice(15, 10, replace=False)]
        y = b[draw.choice(25, 10, replace=False)]
        want.append(_mmd2_loops(x, y))
    assert mean == pytest.approx(np.mean(want), rel=1e-10) and std == pytest.approx(np.std(want), rel=1e-8)
    # subset_size is capped at min(N, M) = 15
    mean, _ = G.kernel_inception_distance(a, b, subsets=2, subset_size=1000, seed=4)
    draw = np.random.RandomState(4)
    want = [_mmd2_loops(a[draw.choice(15, 15, replace=False)], b[draw.choice(25, 15, replace=False)])
            for _ in range(2)]
    assert mean == pytest.approx(np.mean(want), rel=1e-10)


def test_kid_same_distribution_near_zero_and_grows_with_shift():
    rng = np.random.default_rng(12)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, _ = G.kernel_inception_distance(a, b, subsets=20, subset_size=200)
    shifted = [G.kernel_inception_distance(a, b + s, subsets=20, subset_size=200)[0] for s in (0.25, 0.5, 1.0, 2.0)]
    assert abs(same) < 0.1 * shifted[0]
    assert 0 < shifted[0] < shifted[1] < shifted[2] < shifted[3]
    # a set against itself (whole-set subsets): -2 (mean k(x, x) - mean_{i != j} k(x_i, x_j)) / m,
    # slightly negative (unbiased within-set terms, the cross term keeps the diagonal) and -> 0 as m grows
    itself = []
    for m in (50, 400):
        k = (a[:m] @ a[:m].T / 16 + 1) ** 3
        want = -2 * (np.mean(np.diag(k)) - (k.sum() - np.trace(k)) / (m * (m - 1))) / m
        itself.append(G.kernel_inception_distance(a[:m], a[:m], subsets=1, subset_size=m)[0])
        assert itself[-1] == pytest.approx(want, rel=1e-9) and itself[-1] < 0
    assert itself[0] == pytest.approx(_mmd2_loops(a[:50], a[:50]), rel=1e-9)
    assert abs(itself[1]) < abs(itself[0]) / 5


def test_kid_deterministic_by_seed_and_float64():
    rng = np.random.default_rng(13)
    a, b = rng.normal(size=(60, 8)).astype(np.float32), rng.normal(0.2, 1, size=(50, 8)).astype(np.float32)
    first = G.kernel_inception_distance(a, b, subsets=5, subset_size=20, seed=7)
    assert G.kernel_inception_distance(a, b, subsets=5, subset_size=20, seed=7) == first
    assert G.kernel_inception_distance(a, b, subsets=5, subset_size=20, seed=8) != first
    # float32 inputs are computed in float64
    assert first == G.kernel_inception_distance(a.astype(np.float64), b.astype(np.float64),
                                                subsets=5, subset_size=20, seed=7)
    assert all(isinstance(v, float) for v in first)


def test_kid_errors():
    a = np.zeros((10, 4))
    for bad, match in [((np.zeros(10), a), r"\[N, D\]"), ((a, np.zeros((10, 5))), r"\[N, D\]"),
                       ((a[:1], a), "at least 2")]:
        with pytest.raises(ValueError, match=match):
            G.kernel_inception_distance(*bad)
    for kwargs, match in [({"subsets": 0}, "subsets"), ({"subsets": 2.5}, "subsets"),
                          ({"subset_size": 1}, "subset_size"), ({"degree": 0}, "degree"),
                          ({"gamma": -1.0}, "gamma"), ({"gamma": 0.0}, "gamma")]:
        with pytest.raises(ValueError, match=match):
            G.kernel_inception_distance(a, a, **kwargs)


def test_collect_features(tiny_net):
    rng = np.random.default_rng(14)
    batches = [rng.uniform(-1, 1, (b, 16, 16, 3)).astype(np.float32) for b in (5, 7, 4)]
    want = np.concatenate([np.asarray(tiny_net(b)[0]) for b in batches])
    got = G.collect_features(tiny_net, [batches[0], {"image": batches[1]}, batches[2]])
    assert got.shape == (16, 8) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)

    drawn = []

    def stream():
        for b in batches:
            drawn.append(len(b))
            yield b

    got = G.collect_features(tiny_net, stream(), limit=9)
    np.testing.assert_array_equal(got, want[:9])
    assert drawn == [5, 7]  # the third batch is never drawn
    assert G.collect_features(lambda x: np.arange(6).reshape(3, 2), [0, 0], limit=100).dtype == np.float64
    with pytest.raises(ValueError, match="no features"):
        G.collect_features(tiny_net, [])
    with pytest.raises(ValueError, match="limit"):
        G.collect_features(tiny_net, batches, limit=0)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        G.collect_features(lambda x: np.zeros((2, 3, 4)), [0])


def test_docs_fid_conversion_snippet_without_torch(tmp_path, monkeypatch):
    """docs/metrics.md's pytorch-fid -> .npz snippet, run with a stand-in for torch."""
    import pathlib
    import re
    import sys

    class FakeTensor:
        def __init__(self, a):
            self.a = np.asarray(a)

        def float(self):
            return FakeTensor(self.a.astype(np.float32))

        def numpy(self):
            return self.a

    state = {"fc.weight": FakeTensor(np.ones((2, 3), np.float64)), "fc.bias": FakeTensor(np.zeros(2, np.float16))}
    torch = types.ModuleType("torch")
    torch.load = lambda path, map_location=None: state if path == "pt_inception-2015-12-05-6726825d.pth" else None
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.chdir(tmp_path)
    docs = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    [snippet] = [b for b in re.findall(r"```python\n(.*?)```", docs, flags=re.S) if "fid_inception.npz\", **" in b]
    exec(compile(snippet, "docs/metrics.md", "exec"), {})
    with np.load(tmp_path / "fid_inception.npz") as f:
        assert set(f.files) == {"fc.weight", "fc.bias"} and f["fc.bias"].dtype == np.float32
