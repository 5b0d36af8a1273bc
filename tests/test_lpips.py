"""LPIPS (jattn.lpips): the AlexNet / VGG16 backbones against an independent NumPy LPIPS, the
weight files and their errors, and the PyTorch -> .npz conversion of docs/metrics.md (without torch)."""

import math
import pathlib
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from jattn import lpips as L

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "metrics.md"

# --------------------------------------------------------------------------- NumPy reference (NCHW, float64)

# torchvision's features: ("conv", index, stride, padding) + ReLU, ("pool", window, stride), "tap"
_NP_ALEX = [("conv", 0, 4, 2), "tap", ("pool", 3, 2), ("conv", 3, 1, 2), "tap", ("pool", 3, 2),
            ("conv", 6, 1, 1), "tap", ("conv", 8, 1, 1), "tap", ("conv", 10, 1, 1), "tap"]
_NP_VGG = [("conv", 0, 1, 1), ("conv", 2, 1, 1), "tap", ("pool", 2, 2),
           ("conv", 5, 1, 1), ("conv", 7, 1, 1), "tap", ("pool", 2, 2),
           ("conv", 10, 1, 1), ("conv", 12, 1, 1), ("conv", 14, 1, 1), "tap", ("pool", 2, 2),
           ("conv", 17, 1, 1), ("conv", 19, 1, 1), ("conv", 21, 1, 1), "tap", ("pool", 2, 2),
           ("conv", 24, 1, 1), ("conv", 26, 1, 1), ("conv", 28, 1, 1), "tap"]


def _np_conv(x, w, b, stride, pad):
    """Cross-correlation as torch.nn.functional.conv2d: x [N, C, H, W], w [O, C, k, k]."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(x, w.shape[2:], axis=(2, 3))[:, :, ::stride, ::stride]  # [N, C, Ho, Wo, k, k]
    n, c, ho, wo, k, _ = win.shape
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * k * k)  # im2col
    out = (cols @ w.reshape(w.shape[0], c * k * k).T).reshape(n, ho, wo, -1)
    return out.transpose(0, 3, 1, 2) + b[None, :, None, None]


def _np_maxpool(x, k, s):
    """torch MaxPool2d(k, s): no padding, floor mode."""
    return sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::s, ::s].max(axis=(-2, -1))


def _np_lpips(tensors, a, b, layers):
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    shift = np.array([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)
    scale = np.array([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)

    def taps(img):
        x = (np.asarray(img, np.float64).transpose(0, 3, 1, 2) - shift) / scale
        out = []
        for op in layers:
            if op == "tap":
                out.append(x)
            elif op[0] == "conv":
                _, i, s, p = op
                x = np.maximum(_np_conv(x, t[f"features.{i}.weight"], t[f"features.{i}.bias"], s, p), 0.0)
            else:
                x = _np_maxpool(x, op[1], op[2])
        return out

    total = np.zeros(len(a))
    for l, (fa, fb) in enumerate(zip(taps(a), taps(b))):
        na = fa / (np.sqrt(np.sum(fa ** 2, axis=1, keepdims=True)) + 1e-10)
        nb = fb / (np.sqrt(np.sum(fb ** 2, axis=1, keepdims=True)) + 1e-10)
        w = t[f"lin{l}.model.1.weight"][0, :, 0, 0]
        total += np.einsum("nchw,c->nhw", (na - nb) ** 2, w).mean(axis=(1, 2))
    return total


def _random_tensors(net, seed=0):
    """Random LPIPS tensors under their PyTorch names (He-scaled convs, non-negative lin weights)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in L.lpips_tensor_shapes(net).items():
        if name.startswith("lin"):
            out[name] = np.abs(rng.normal(size=shape)).astype(np.float32)
        elif name.endswith("weight"):
            out[name] = (rng.normal(size=shape) * math.sqrt(2.0 / math.prod(shape[1:]))).astype(np.float32)
        else:
            out[name] = (rng.normal(size=shape) * 0.05).astype(np.float32)
    return out


def _images(shape, seed):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


# --------------------------------------------------------------------------- architecture


def test_tensor_lists_match_torchvision():
    alex, vgg = L.lpips_tensor_shapes("alex"), L.lpips_tensor_shapes("vgg")
    assert list(alex)[:4] == ["features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias"]
    assert alex["features.0.weight"] == (64, 3, 11, 11) and alex["features.3.weight"] == (192, 64, 5, 5)
    assert alex["features.10.weight"] == (256, 256, 3, 3) and alex["lin2.model.1.weight"] == (1, 384, 1, 1)
    assert vgg["features.28.weight"] == (512, 512, 3, 3) and vgg["lin4.model.1.weight"] == (1, 512, 1, 1)

    def count(shapes, prefix):
        return sum(math.prod(s) for k, s in shapes.items() if k.startswith(prefix))

    # torchvision alexnet().features: 2,469,696 parameters; vgg16().features: 14,714,688
    assert count(alex, "features") == 2_469_696 and count(vgg, "features") == 14_714_688
    assert count(alex, "lin") == 64 + 192 + 384 + 256 + 256 and count(vgg, "lin") == 64 + 128 + 256 + 512 + 512
    assert L.lpips_min_size("alex") == 31 and L.lpips_min_size("vgg") == 16
    with pytest.raises(ValueError, match="unknown LPIPS network 'squeeze'"):
        L.lpips_tensor_shapes("squeeze")


# --------------------------------------------------------------------------- against NumPy


@pytest.fixture(scope="module")
def alex(tmp_path_factory):
    tensors = _random_tensors("alex")
    path = tmp_path_factory.mktemp("lpips") / "alex.npz"
    np.savez(path, **tensors)
    return tensors, path, L.load_lpips_weights(path, net="alex")


def test_alexnet_lpips_matches_numpy(alex):
    tensors, path, params = alex
    a, b = _images((3, 64, 64, 3), 1), _images((3, 64, 64, 3), 2)  # feature maps 15, 7, 3, 3, 3
    b[0] = a[0] + 0.05 * b[0]  # one near pair, two unrelated
    want = _np_lpips(tensors, a, b, _NP_ALEX)
    got = np.asarray(L.lpips(params, a, b))
    assert got.shape == (3,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    assert want[0] < want[1] and want[0] < want[2]
    # the Flax module, the wrapped params and the cached network give the same
    np.testing.assert_allclose(L.LPIPS("alex").apply({"params": params}, a, b), got, rtol=1e-6)
    np.testing.assert_allclose(L.lpips({"params": params}, a, b), got, rtol=1e-6)
    np.testing.assert_allclose(L.lpips_network(path)(jnp.asarray(a), jnp.asarray(b)), got, rtol=1e-6)
    # a non-square size at the minimum
    a2, b2 = _images((2, 31, 40, 3), 3), _images((2, 31, 40, 3), 4)
    np.testing.assert_allclose(L.lpips(params, a2, b2), _np_lpips(tensors, a2, b2, _NP_ALEX), rtol=2e-5, atol=1e-7)


def test_lpips_identical_is_zero_and_symmetric(alex):
    _, _, params = alex
    a, b = _images((2, 48, 48, 3), 5), _images((2, 48, 48, 3), 6)
    np.testing.assert_allclose(L.lpips(params, a, a), 0.0, atol=1e-7)
    d_ab, d_ba = np.asarray(L.lpips(params, a, b)), np.asarray(L.lpips(params, b, a))
    np.testing.assert_allclose(d_ab, d_ba, rtol=1e-6)
    assert (d_ab > 0).all()
    # differentiable with finite gradients, also where feature vectors are all zero (here: every
    # ReLU off, by very negative biases; sqrt's infinite slope at 0 never passes a ReLU that is off)
    dead = {m: dict(v, bias=v["bias"] - 100.0) if "bias" in v else v for m, v in params.items()}
    assert float(jnp.max(L.lpips(dead, a, b))) == 0.0
    for p, x, y in [(params, a, b), (params, a, a), (dead, a, b)]:
        grad = jax.grad(lambda u, p=p, y=y: jnp.sum(L.lpips(p, u, y)))(jnp.asarray(x))
        assert np.isfinite(np.asarray(grad)).all()


def test_vgg_lpips_matches_numpy(tmp_path):
    tensors = _random_tensors("vgg", seed=7)
    from safetensors.numpy import save_file

    save_file(tensors, str(tmp_path / "vgg.safetensors"))
    params = L.load_lpips_weights(tmp_path / "vgg.safetensors", net="vgg")
    a, b = _images((2, 32, 32, 3), 8), _images((2, 32, 32, 3), 9)  # feature maps 32, 16, 8, 4, 2
    np.testing.assert_allclose(L.lpips(params, a, b), _np_lpips(tensors, a, b, _NP_VGG), rtol=2e-5, atol=1e-7)


def test_image_errors(alex):
    _, _, params = alex
    with pytest.raises(ValueError, match=r"30x40 images are too small for the 'alex' network \(at least 31x31\)"):
        L.lpips(params, np.zeros((1, 30, 40, 3)), np.zeros((1, 30, 40, 3)))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        L.lpips(params, np.zeros((1, 32, 32, 3)), np.zeros((1, 33, 32, 3)))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        L.lpips(params, np.zeros((1, 32, 32, 1)), np.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="not those of an LPIPS network"):
        L.lpips({"conv": {}}, np.zeros((1, 32, 32, 3)), np.zeros((1, 32, 32, 3)))


# --------------------------------------------------------------------------- weight files


def _one_line_error(path, net="alex"):
    with pytest.raises(ValueError) as err:
        L.load_lpips_weights(path, net=net)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_weight_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.npz.*never downloads.*docs/metrics\.md"):
        L.load_lpips_weights(tmp_path / "nothing.npz")
    (tmp_path / "alex.pth").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"alex\.pth.*use \.npz or \.safetensors"):
        L.load_lpips_weights(tmp_path / "alex.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"bad\.safetensors could not be read"):
        L.load_lpips_weights(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="unknown LPIPS network 'vgg19'"):
        L.load_lpips_weights(tmp_path / "nothing.npz", net="vgg19")

    good = _random_tensors("alex")
    missing = {k: v for k, v in good.items() if k not in ("features.6.bias", "lin3.model.1.weight")}
    np.savez(tmp_path / "missing.npz", **missing)
    msg = _one_line_error(tmp_path / "missing.npz")
    assert "2 problem(s): missing tensor 'features.6.bias' (shape (384,)) (and 1 more)" in msg

    shaped = dict(good, **{"lin1.model.1.weight": np.ones((1, 191, 1, 1), np.float32)})
    np.savez(tmp_path / "shaped.npz", **shaped)
    msg = _one_line_error(tmp_path / "shaped.npz")
    assert "1 problem(s): tensor 'lin1.model.1.weight' has shape (1, 191, 1, 1), expected (1, 192, 1, 1)" in msg

    negative = dict(good)
    negative["lin0.model.1.weight"] = -negative["lin0.model.1.weight"]
    np.savez(tmp_path / "negative.npz", **negative)
    assert "'lin0.model.1.weight' has negative weights" in _one_line_error(tmp_path / "negative.npz")

    # AlexNet's file read as VGG16: the first VGG tensor that differs is named
    np.savez(tmp_path / "alex.npz", **good)
    msg = _one_line_error(tmp_path / "alex.npz", net="vgg")
    assert msg.startswith(f"LPIPS (vgg) weights file {tmp_path / 'alex.npz'}: ")
    assert "tensor 'features.0.weight' has shape (64, 3, 11, 11), expected (64, 3, 3, 3)" in msg


def test_weight_layout_and_extra_tensors(tmp_path):
    good = _random_tensors("alex")
    extra = dict(good, **{"classifier.1.weight": np.zeros((4, 3), np.float32),
                          "scaling_layer.shift": np.zeros((1, 3, 1, 1), np.float32)})
    np.savez(tmp_path / "w.npz", **extra)
    params = L.load_lpips_weights(tmp_path / "w.npz")
    assert set(params) == {"features_0", "features_3", "features_6", "features_8", "features_10",
                           "lin0", "lin1", "lin2", "lin3", "lin4"}
    np.testing.assert_array_equal(params["features_3"]["kernel"], good["features.3.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["features_3"]["bias"], good["features.3.bias"])
    np.testing.assert_array_equal(params["lin2"]["kernel"][:, 0], good["lin2.model.1.weight"][0, :, 0, 0])


# --------------------------------------------------------------------------- conversion from PyTorch


class _FakeTensor:
    """The part of torch.Tensor the conversions use."""

    def __init__(self, array):
        self.array = np.asarray(array)

    def detach(self):
        return self

    def cpu(self):
        return self

    def float(self):
        return _FakeTensor(self.array.astype(np.float32))

    def numpy(self):
        return self.array


def _fake_state_dicts(seed=0):
    good = _random_tensors("alex", seed)
    backbone = {k: _FakeTensor(v.astype(np.float64)) for k, v in good.items() if k.startswith("features.")}
    backbone["classifier.1.weight"] = _FakeTensor(np.zeros((4096, 9216), np.float32))
    lin = {k: _FakeTensor(v) for k, v in good.items() if k.startswith("lin")}
    return good, backbone, lin


def test_lpips_tensors_from_torch():
    good, backbone, lin = _fake_state_dicts()
    out = L.lpips_tensors_from_torch(backbone, lin)
    assert set(out) == set(good)
    for k, v in good.items():
        assert out[k].dtype == np.float32
        np.testing.assert_array_equal(out[k], v)
    # a whole lpips.LPIPS state dict: net.slice<k>.<i>.* -> features.<i>.*, buffers dropped
    slices = {"features.0": 1, "features.3": 2, "features.6": 3, "features.8": 4, "features.10": 5}
    whole = {"scaling_layer.shift": _FakeTensor(np.zeros((1, 3, 1, 1))), **lin}
    for k, v in backbone.items():
        if k.startswith("features."):
            stem, _, leaf = k.rpartition(".")
            whole[f"net.slice{slices[stem]}.{stem.split('.')[1]}.{leaf}"] = v
    out = L.lpips_tensors_from_torch(whole)
    assert set(out) == set(good)
    np.testing.assert_array_equal(out["features.10.weight"], good["features.10.weight"])
    # plain numpy arrays are taken as they are
    assert set(L.lpips_tensors_from_torch(good)) == set(good)


def _docs_snippet(marker):
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"docs/metrics.md: expected one python block with {marker!r}"
    return found[0]


def test_docs_conversion_snippet_without_torch(tmp_path, monkeypatch):
    """Run docs/metrics.md's PyTorch -> .npz snippet with stand-ins for torch and torchvision."""
    good, backbone, lin = _fake_state_dicts(seed=3)
    calls = []
    torch = types.ModuleType("torch")

    def load(path, map_location=None):
        calls.append(("load", path, map_location))
        return lin

    torch.load = load
    torchvision = types.ModuleType("torchvision")

    def alexnet(weights=None):
        calls.append(("alexnet", weights))
        return types.SimpleNamespace(state_dict=lambda: backbone)

    torchvision.models = types.SimpleNamespace(alexnet=alexnet)
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.chdir(tmp_path)
    exec(compile(_docs_snippet("np.savez(\"lpips_alex.npz\""), "docs/metrics.md", "exec"), {})
    assert calls == [("alexnet", "IMAGENET1K_V1"), ("load", "alex.pth", "cpu")]
    with np.load(tmp_path / "lpips_alex.npz") as f:
        assert set(f.files) == set(good)  # classifier.* left out
    params = L.load_lpips_weights(tmp_path / "lpips_alex.npz")
    np.testing.assert_array_equal(params["features_0"]["kernel"], good["features.0.weight"].transpose(2, 3, 1, 0))


def test_against_torch_when_installed(alex):
    """Only where torch is importable: the LPIPS forward of torch's conv / max pool on the same weights."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    tensors, _, params = alex
    t = {k: torch.from_numpy(v) for k, v in tensors.items()}
    a, b = _images((2, 64, 64, 3), 11), _images((2, 64, 64, 3), 12)

    def taps(img):
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        x = (torch.from_numpy(img).permute(0, 3, 1, 2) - shift) / scale
        out = []
        for op in _NP_ALEX:
            if op == "tap":
                out.append(x)
            elif op[0] == "conv":
                _, i, s, p = op
                x = F.relu(F.conv2d(x, t[f"features.{i}.weight"], t[f"features.{i}.bias"], stride=s, padding=p))
            else:
                x = F.max_pool2d(x, op[1], op[2])
        return out

    total = 0
    with torch.no_grad():
        for l, (fa, fb) in enumerate(zip(taps(a), taps(b))):
            na = fa / (torch.sqrt(torch.sum(fa ** 2, dim=1, keepdim=True)) + 1e-10)
            nb = fb / (torch.sqrt(torch.sum(fb ** 2, dim=1, keepdim=True)) + 1e-10)
            total = total + F.conv2d((na - nb) ** 2, t[f"lin{l}.model.1.weight"]).mean(dim=(2, 3))[:, 0]
    np.testing.assert_allclose(L.lpips(params, a, b), total.numpy(), rtol=1e-4, atol=1e-6)
