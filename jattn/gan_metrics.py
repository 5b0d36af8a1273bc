"""Inception Score and Frechet Inception Distance, and the FID Inception-v3 network in Flax.

* :func:`inception_score` -- IS of class logits ``[N, K]`` (``exp E_x KL(p(y|x) || p(y))``,
  mean and standard deviation over ``splits`` consecutive parts, as Salimans et al. 2016).
* :func:`frechet_distance` -- FID between two Gaussians, via symmetric eigendecompositions
  (float64; no matrix square root of a non-symmetric product).
* :func:`activation_statistics` -- mean and covariance of a feature function's activations
  over a whole set of batches (streamed: nothing but the moments is kept).
* :class:`InceptionV3` / :func:`load_inception_weights` / :func:`inception_network` -- the
  Inception-v3 of TensorFlow's FID code (``inception-2015-12-05``, as ported by pytorch-fid:
  TF average pools that ignore padding, a max pool in the last block, 1008 classes), giving
  the 2048-d pool3 features and the 1008 logits. Its weights are never downloaded: they come
  from a file the user gives (see :func:`load_inception_weights` for the tensor names).
* :func:`kernel_inception_distance` -- KID (Binkowski et al. 2018): the unbiased MMD^2 with
  the cubic polynomial kernel, mean and std over random subsets (float64, as torch-fidelity).
* :func:`collect_features` -- every feature row of a feature function over a set of batches
  (KID needs the features themselves, not just their moments).
* :func:`evaluate_gan` -- IS and FID of a GAN task against a whole evaluation set.

Every metric takes any feature / logit function, so tests can use a small stand-in network.
"""
from __future__ import annotations

import functools
import os
import pathlib
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "INCEPTION_SIZE",
    "InceptionV3",
    "activation_statistics",
    "collect_features",
    "evaluate_gan",
    "frechet_distance",
    "inception_network",
    "inception_score",
    "inception_tensor_shapes",
    "kernel_inception_distance",
    "load_inception_weights",
    "load_statistics",
    "save_statistics",
]

INCEPTION_SIZE = 299  # images are resized (bilinearly) to 299 x 299 before the network
FeatureFn = Callable[[jax.Array], Any]

# --------------------------------------------------------------------------- the metrics


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Inception Score of class logits ``[N, K]``: mean and std over ``splits`` parts.

    Each part (consecutive rows) scores ``exp(mean_i KL(p(y|x_i) || mean_j p(y|x_j)))``,
    with ``p = softmax(logits)``. Uniform logits give 1; confident, distinct predictions
    spread evenly over K classes give K.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, K], got shape {logits.shape}")
    n = logits.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, N={n}], got {splits}")
    logp = logits - logits.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
    scores = []
    for k in range(splits):
        part = logp[k * n // splits:(k + 1) * n // splits]
        p = np.exp(part)
        log_py = np.log(p.mean(axis=0))
        kl = np.sum(p * (part - log_py[None]), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` of two Gaussians.

    ``tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))`` (similar matrices), computed
    in float64 with symmetric eigendecompositions: stable for singular covariances (fewer
    samples than dimensions) where ``scipy.linalg.sqrtm`` of the product can turn complex.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)))
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt, 0.0))


class _Moments:
    """Streaming mean and covariance of rows ``[b, D]`` (float64, shifted by the first batch's mean)."""

    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, None, None

    def add(self, x) -> None:
        x = np.asarray(x, np.float64)
        if x.ndim != 2:
            raise ValueError(f"activations must be [B, D], got shape {x.shape}")
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.s1 = np.zeros_like(self.shift)
            self.s2 = np.zeros((x.shape[1], x.shape[1]))
        x = x - self.shift
        self.n += x.shape[0]
        self.s1 += x.sum(axis=0)
        self.s2 += x.T @ x

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"statistics need at least 2 activations, got {self.n}")
        m = self.s1 / self.n
        sigma = (self.s2 - self.n * np.outer(m, m)) / (self.n - 1)
        return self.shift + m, (sigma + sigma.T) / 2


def activation_statistics(feature_fn: FeatureFn, batches: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (ddof 1, float64) of ``feature_fn`` over all batches.

    ``batches``: image arrays ``[B, H, W, C]`` or dicts with ``"image"``. ``feature_fn(images)``
    returns ``[B, D]`` activations, or a tuple whose first entry is them (as the Inception
    network's ``(pool3, logits)``).
    """
    moments = _Moments()
    for batch in batches:
        images = batch["image"] if isinstance(batch, dict) else batch
        moments.add(_to_host(_features(feature_fn(images))))
    return moments.statistics()


def save_statistics(path, mu, sigma) -> None:
    """Write FID statistics to an ``.npz`` with entries ``mu`` and ``sigma``."""
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_statistics(path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(mu, sigma)`` written by :func:`save_statistics` (or pytorch-fid's ``--save-stats``)."""
    with np.load(path) as f:
        return f["mu"], f["sigma"]


def _polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> np.ndarray:
    return (gamma * (x @ y.T) + coef0) ** degree


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    """Unbiased MMD^2 of two equal-size samples ``[m, D]``: the within-set kernel means leave
    out the diagonal (``k(x_i, x_i)``), the cross term keeps every pair."""
    m = x.shape[0]
    k_xx = _polynomial_kernel(x, x, degree, gamma, coef0)
    k_yy = _polynomial_kernel(y, y, degree, gamma, coef0)
    k_xy = _polynomial_kernel(x, y, degree, gamma, coef0)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(features_a, features_b, subsets: int = 100, subset_size: int = 1000,
                              degree: int = 3, gamma: float | None = None, coef0: float = 1.0,
                              seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance of features ``[N, D]`` and ``[M, D]``: ``(mean, std)`` over subsets.

    Each of ``subsets`` rounds draws ``m = min(subset_size, N, M)`` rows of ``features_a`` and
    then ``m`` rows of ``features_b``, each without replacement, and computes the unbiased
    estimate of the squared MMD with the kernel ``k(x, y) = (gamma x.y + coef0)^degree``
    (``gamma`` default ``1 / D``)::

        sum_{i != j} k(a_i, a_j) / (m (m-1)) + sum_{i != j} k(b_i, b_j) / (m (m-1))
            - 2 sum_{i, j} k(a_i, b_j) / m^2

    The result is the mean and (population, ddof 0) standard deviation of these estimates.
    This is Binkowski et al. 2018's definition as the MMD-GAN code, torch-fidelity and clean-fid
    compute it; the subsets come from ``numpy.random.RandomState(seed)`` in torch-fidelity's
    order, so with its seed (2020) and subset size the same features give the same subsets.
    (torch-fidelity refuses a ``subset_size`` above ``N`` or ``M``; clean-fid caps it, as here.)
    Computed in float64 on the host (each subset converted; the features stay as given). The
    estimate is unbiased, so independent samples of one distribution give values scattered
    around 0, some negative; a set against itself (whole-set subsets) gives the slightly
    negative ``-2 (mean_i k(x_i, x_i) - mean_{i != j} k(x_i, x_j)) / m``. KIDs are often
    reported x 1000.

    Raises ValueError for features that are not 2-D, differ in ``D``, or have fewer than 2
    rows, and for ``subsets < 1``, ``subset_size < 2``, ``degree < 1`` or ``gamma <= 0``.
    """
    a, b = np.asarray(features_a), np.asarray(features_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D], got shapes {a.shape} and {b.shape}")
    if min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"KID needs at least 2 feature rows in each set, got {a.shape[0]} and {b.shape[0]}")
    if isinstance(subsets, bool) or not isinstance(subsets, (int, np.integer)) or subsets < 1:
        raise ValueError(f"subsets must be a positive int, got {subsets!r}")
    if isinstance(subset_size, bool) or not isinstance(subset_size, (int, np.integer)) or subset_size < 2:
        raise ValueError(f"subset_size must be an int >= 2, got {subset_size!r}")
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 1:
        raise ValueError(f"degree must be a positive int, got {degree!r}")
    gamma = 1.0 / a.shape[1] if gamma is None else float(gamma)
    if not gamma > 0:
        raise ValueError(f"gamma must be positive (or None for 1 / D), got {gamma!r}")
    m = min(int(subset_size), a.shape[0], b.shape[0])
    rng = np.random.RandomState(seed)
    mmds = np.empty(int(subsets))
    for i in range(int(subsets)):
        x = a[rng.choice(a.shape[0], m, replace=False)].astype(np.float64)
        y = b[rng.choice(b.shape[0], m, replace=False)].astype(np.float64)
        mmds[i] = _unbiased_mmd2(x, y, int(degree), gamma, float(coef0))
    return float(np.mean(mmds)), float(np.std(mmds))


def collect_features(feature_fn: FeatureFn, batches: Iterable, limit: int | None = None) -> np.ndarray:
    """Every feature row of ``feature_fn`` over ``batches``, concatenated: ``[N, D]`` (host numpy).

    ``batches`` and ``feature_fn`` as for :func:`activation_statistics` (arrays or dicts with
    ``"image"``; ``[B, D]`` features or a tuple whose first entry is them). With ``limit``,
    stops after ``limit`` rows: the last batch used is truncated and no further batch is
    drawn from ``batches``. Float features keep their dtype (float32 from a network: half the
    memory of float64; :func:`kernel_inception_distance` computes in float64 anyway).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    parts, n = [], 0
    for batch in batches:
        images = batch["image"] if isinstance(batch, dict) else batch
        x = _to_host(_features(feature_fn(images)))
        if x.ndim != 2:
            raise ValueError(f"features must be [B, D], got shape {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        if limit is not None:
            x = x[: limit - n]
        parts.append(x)
        n += x.shape[0]
        if limit is not None and n >= limit:
            break
    if n == 0:
        raise ValueError("collect_features saw no features: the batches were empty")
    return np.concatenate(parts, axis=0)


def _features(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _to_host(x) -> np.ndarray:
    """A (possibly multi-process, sharded) array as a numpy array of its global value."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


# --------------------------------------------------------------------------- Inception-v3 (FID)


class BasicConv(nn.Module):
    """conv (no bias) -> batch norm (inference, eps 1e-3) -> ReLU, as torchvision's ``BasicConv2d``.

    Params: ``kernel [kh, kw, Cin, features]``, ``scale``, ``bias``, ``mean``, ``var`` ``[features]``
    (the batch-norm running statistics are stored as (frozen) parameters).
    """

    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f = self.features
        w = self.param("kernel", nn.initializers.lecun_normal(), (*self.kernel, x.shape[-1], f))
        scale = self.param("scale", nn.initializers.ones_init(), (f,))
        bias = self.param("bias", nn.initializers.zeros_init(), (f,))
        mean = self.param("mean", nn.initializers.zeros_init(), (f,))
        var = self.param("var", nn.initializers.ones_init(), (f,))
        ph, pw = self.padding
        y = jax.lax.conv_general_dilated(
            x, w, (self.stride, self.stride), ((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return nn.relu((y - mean) * (scale * jax.lax.rsqrt(var + 1e-3)) + bias)


def _avg_pool_same(x):
    """3x3 stride-1 average pool, padding 1, padded zeros not counted (TF's)."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x):
    return nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))


def _max_pool_down(x):
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class _Mixed(nn.Module):
    """One Inception mixing block ``kind`` in A, B, C, D, E (torchvision's branch names)."""

    kind: str
    pool_features: int = 0  # A: branch_pool width; C: the 7x7 branches' width
    max_pool: bool = False  # E: max (the FID network's Mixed_7c) instead of average pooling

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def conv(name, f, k=(1, 1), s=1, p=(0, 0)):
            return BasicConv(f, k, s, p, name=name)

        def conv_n(name, f, kp):  # a factorised (1 x n or n x 1) conv with its padding
            return BasicConv(f, kp[0], 1, kp[1], name=name)

        k1x7, k7x1, k1x3, k3x1 = ((1, 7), (0, 3)), ((7, 1), (3, 0)), ((1, 3), (0, 1)), ((3, 1), (1, 0))
        if self.kind == "A":
            b5 = conv("branch5x5_2", 64, (5, 5), p=(2, 2))(conv("branch5x5_1", 48)(x))
            b3 = conv("branch3x3dbl_1", 64)(x)
            b3 = conv("branch3x3dbl_3", 96, (3, 3), p=(1, 1))(conv("branch3x3dbl_2", 96, (3, 3), p=(1, 1))(b3))
            outs = [conv("branch1x1", 64)(x), b5, b3, conv("branch_pool", self.pool_features)(_avg_pool_same(x))]
        elif self.kind == "B":
            b3 = conv("branch3x3", 384, (3, 3), 2)(x)
            bd = conv("branch3x3dbl_2", 96, (3, 3), p=(1, 1))(conv("branch3x3dbl_1", 64)(x))
            outs = [b3, conv("branch3x3dbl_3", 96, (3, 3), 2)(bd), _max_pool_down(x)]
        elif self.kind == "C":
            c7 = self.pool_features
            b7 = conv_n("branch7x7_2", c7, k1x7)(conv("branch7x7_1", c7)(x))
            b7 = conv_n("branch7x7_3", 192, k7x1)(b7)
            bd = conv("branch7x7dbl_1", c7)(x)
            for i, (f, kp) in enumerate([(c7, k7x1), (c7, k1x7), (c7, k7x1), (192, k1x7)], start=2):
                bd = conv_n(f"branch7x7dbl_{i}", f, kp)(bd)
            outs = [conv("branch1x1", 192)(x), b7, bd, conv("branch_pool", 192)(_avg_pool_same(x))]
        elif self.kind == "D":
            b3 = conv("branch3x3_2", 320, (3, 3), 2)(conv("branch3x3_1", 192)(x))
            b7 = conv_n("branch7x7x3_2", 192, k1x7)(conv("branch7x7x3_1", 192)(x))
            b7 = conv("branch7x7x3_4", 192, (3, 3), 2)(conv_n("branch7x7x3_3", 192, k7x1)(b7))
            outs = [b3, b7, _max_pool_down(x)]
        elif self.kind == "E":
            b3 = conv("branch3x3_1", 384)(x)
            b3 = jnp.concatenate([conv_n("branch3x3_2a", 384, k1x3)(b3), conv_n("branch3x3_2b", 384, k3x1)(b3)], -1)
            bd = conv("branch3x3dbl_2", 384, (3, 3), p=(1, 1))(conv("branch3x3dbl_1", 448)(x))
            bd = jnp.concatenate([conv_n("branch3x3dbl_3a", 384, k1x3)(bd), conv_n("branch3x3dbl_3b", 384, k3x1)(bd)], -1)
            pooled = _max_pool_same(x) if self.max_pool else _avg_pool_same(x)
            outs = [conv("branch1x1", 320)(x), b3, bd, conv("branch_pool", 192)(pooled)]
        else:
            raise ValueError(f"unknown Inception block kind {self.kind!r}")
        return jnp.concatenate(outs, axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception-v3 (TF ``inception-2015-12-05`` as in pytorch-fid's ``fid_inception_v3``).

    Call: ``images [B, H, W, 3]`` in [-1, 1] (any size; resized bilinearly, without
    antialiasing, to 299 x 299 unless ``resize=False``) ``-> (pool3 [B, 2048], logits [B, 1008])``.
    Params: torchvision's module names (``Conv2d_1a_3x3``, ..., ``Mixed_7c``, ``fc``), each
    conv a :class:`BasicConv`.
    """

    num_classes: int = 1008
    resize: bool = True

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = jnp.clip(jnp.asarray(images, jnp.float32), -1.0, 1.0)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3], got shape {tuple(x.shape)}")
        if self.resize and x.shape[1:3] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = jax.image.resize(x, (x.shape[0], INCEPTION_SIZE, INCEPTION_SIZE, 3), "bilinear", antialias=False)
        x = BasicConv(32, (3, 3), 2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = _max_pool_down(BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x))
        x = BasicConv(80, name="Conv2d_3b_1x1")(x)
        x = _max_pool_down(BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x))
        for name, kind, width in [("Mixed_5b", "A", 32), ("Mixed_5c", "A", 64), ("Mixed_5d", "A", 64),
                                  ("Mixed_6a", "B", 0), ("Mixed_6b", "C", 128), ("Mixed_6c", "C", 160),
                                  ("Mixed_6d", "C", 160), ("Mixed_6e", "C", 192), ("Mixed_7a", "D", 0),
                                  ("Mixed_7b", "E", 0)]:
            x = _Mixed(kind, width, name=name)(x)
        x = _Mixed("E", max_pool=True, name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        return pool3, nn.Dense(self.num_classes, name="fc")(pool3)


_TORCH_NAMES = {"kernel": "conv.weight", "scale": "bn.weight", "bias": "bn.bias",
                "mean": "bn.running_mean", "var": "bn.running_var"}


def _tensor_name(path: tuple[str, ...]) -> str:
    """The pytorch-fid state-dict name of a Flax parameter path."""
    if path[0] == "fc":
        return "fc." + {"kernel": "weight", "bias": "bias"}[path[-1]]
    return ".".join(path[:-1]) + "." + _TORCH_NAMES[path[-1]]


def _to_flax(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    """Torch layout -> Flax layout (conv OIHW -> HWIO, linear [out, in] -> [in, out])."""
    if path[-1] == "kernel":
        return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
    return array


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel":
        return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else (shape[1], shape[0])
    return tuple(shape)


@functools.lru_cache(maxsize=1)
def _param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    images = jnp.zeros((1, INCEPTION_SIZE, INCEPTION_SIZE, 3))
    shapes = jax.eval_shape(InceptionV3(resize=False).init, jax.random.key(0), images)
    flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def inception_tensor_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor a weights file must hold: pytorch-fid state-dict name -> shape (torch layout)."""
    return {_tensor_name(p): _torch_shape(p, s) for p, s in _param_shapes().items()}


def _read_tensors(path: pathlib.Path, what: str = "Inception",
                  howto: str = "jattn.gan_metrics.load_inception_weights") -> dict[str, np.ndarray]:
    """The named tensors of an ``.npz`` / ``.safetensors`` file; errors say ``what`` weights it should hold."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights file not found: {path} (jattn never downloads it; "
                                f"see {howto} for how to make one)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - a corrupt file is the user's to fix
        raise ValueError(f"{what} weights file {path} could not be read: {type(err).__name__}: {err}") from err
    raise ValueError(f"{what} weights file {path}: unsupported format {suffix!r}; use .npz or .safetensors")


def load_inception_weights(path: str | os.PathLike) -> dict:
    """Flax params of :class:`InceptionV3` from a ``.npz`` or ``.safetensors`` file.

    The file holds the FID Inception's tensors under pytorch-fid's state-dict names and in
    torch layout (float32): for every conv ``X`` (``Conv2d_1a_3x3``, ...,
    ``Mixed_7c.branch_pool``) ``X.conv.weight [out, in, kh, kw]``, ``X.bn.weight``,
    ``X.bn.bias``, ``X.bn.running_mean``, ``X.bn.running_var`` ``[out]``; and ``fc.weight
    [1008, 2048]``, ``fc.bias [1008]`` (:func:`inception_tensor_shapes` lists them all).
    Other tensors (e.g. ``num_batches_tracked``) are ignored. Made from pytorch-fid's
    ``pt_inception-2015-12-05-6726825d.pth`` on a machine with torch::

        sd = torch.load("pt_inception-2015-12-05-6726825d.pth")
        np.savez("fid_inception.npz", **{k: v.float().numpy() for k, v in sd.items()})

    Raises FileNotFoundError (no file) or ValueError naming the file and the missing or
    mis-shaped tensors.
    """
    path = pathlib.Path(path)
    tensors = _read_tensors(path)
    flat, problems = {}, []
    for p, shape in _param_shapes().items():
        name, want = _tensor_name(p), _torch_shape(p, shape)
        if name not in tensors:
            problems.append(f"missing tensor {name!r} (shape {want})")
            continue
        got = tuple(np.shape(tensors[name]))
        if got != want:
            problems.append(f"tensor {name!r} has shape {got}, expected {want}")
            continue
        flat[p] = jnp.asarray(_to_flax(p, np.asarray(tensors[name], np.float32)))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
        raise ValueError(f"Inception weights file {path}: {len(problems)} problem(s): {shown}")
    params: dict = {}
    for p, value in flat.items():
        node = params
        for k in p[:-1]:
            node = node.setdefault(k, {})
        node[p[-1]] = value
    return params


def inception_network(path: str | os.PathLike) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """``images [B, H, W, 3]`` in [-1, 1] ``-> (pool3 [B, 2048], logits [B, 1008])``, jitted,
    with the weights of ``path`` (see :func:`load_inception_weights`). Cached by path: repeated
    evaluations reuse the loaded weights and the compiled network."""
    return _inception_network(str(pathlib.Path(path).resolve()))


@functools.lru_cache(maxsize=2)
def _inception_network(path: str):
    params = load_inception_weights(path)
    apply = jax.jit(InceptionV3().apply)
    return lambda images: apply({"params": params}, images)


# --------------------------------------------------------------------------- GAN evaluation


def evaluate_gan(task, state, config, real_batches: Iterable[dict], *, network: FeatureFn | None = None,
                 mesh=None, real_stats: tuple[np.ndarray, np.ndarray] | None = None,
                 splits: int | None = None, predict: Callable | None = None) -> dict[str, float]:
    """IS, FID and KID of a GAN task's samples over a whole evaluation set.

    For every batch of ``real_batches`` (this process's host batches: ``"image" [b, H, W, 3]``
    in [-1, 1] plus the task's fields, e.g. ``"label"``), the task's ``predict`` draws ``b``
    samples (with the batch's labels, latents from the examples' global indices, passed as
    ``"index" [b]``: distinct across batches, the same at every evaluation); ``network`` maps
    the real and generated images to ``(features [b, D], logits [b, K] or None)``. With
    ``mesh`` the batches are made global arrays over it (every process calls this together).

    network: default the Inception-v3 of ``config.model.inception_weights`` (no weights
      configured: returns ``{}``: nothing is computed).
    real_stats: precomputed ``(mu, sigma)`` of the real set (skips the real images' features).
    splits: IS splits (default ``config.model.is_splits``, at most the sample count).
    predict: ``task.predict`` jitted (default: jitted here, so compiled at every call; pass one
      jitted function to compile it once for all evaluations of a run).

    Returns ``eval_fid``, ``eval_kid`` (:func:`kernel_inception_distance`'s mean, subsets of
    ``min(1000, samples)``; not with ``real_stats``, which holds no features), ``eval_is``,
    ``eval_is_std`` (when there are logits), ``eval_is_real`` (IS of the real images) and
    ``eval_images`` (the number of samples).
    """
    if network is None:
        weights = config.model.inception_weights
        if not weights:
            return {}
        network = inception_network(weights)
    if mesh is not None:
        from jattn.train.sharding import to_global_array
    predict = jax.jit(task.predict) if predict is None else predict
    real, fake = _Moments(), _Moments()
    fake_logits, real_logits = [], []
    fake_features, real_features = [], []  # for KID, which needs the features themselves
    offset = 0
    for host in real_batches:
        b = len(host["image"])
        index = offset + jax.process_index() * b + np.arange(b, dtype=np.int32)
        batch = {k: v for k, v in host.items() if k != "mask" and not k.startswith("_")}  # e.g. "_bad_data"
        batch["index"] = index
        if mesh is not None:
            batch = to_global_array(batch, mesh)
        samples = predict(state.params, state.variables, batch)["output"]
        f_feat, f_logits = _split(network(samples))
        fake_features.append(_to_host(f_feat))
        fake.add(fake_features[-1])
        if f_logits is not None:
            fake_logits.append(_to_host(f_logits))
        if real_stats is None:
            r_feat, r_logits = _split(network(batch["image"]))
            real_features.append(_to_host(r_feat))
            real.add(real_features[-1])
            if r_logits is not None:
                real_logits.append(_to_host(r_logits))
        offset += b * jax.process_count()
    if fake.n == 0:
        raise ValueError("GAN evaluation saw no images: eval_images must be at least the eval batch size")
    mu_r, sigma_r = real.statistics() if real_stats is None else real_stats
    mu_f, sigma_f = fake.statistics()
    out = {"eval_fid": frechet_distance(mu_f, sigma_f, mu_r, sigma_r), "eval_images": fake.n}
    if real_features:
        out["eval_kid"] = kernel_inception_distance(np.concatenate(fake_features), np.concatenate(real_features),
                                                    subset_size=min(1000, fake.n))[0]
    n_splits = int(splits if splits is not None else config.model.is_splits)
    if fake_logits:
        logits = np.concatenate(fake_logits)
        out["eval_is"], out["eval_is_std"] = inception_score(logits, min(n_splits, len(logits)))
    if real_logits:
        logits = np.concatenate(real_logits)
        out["eval_is_real"] = inception_score(logits, min(n_splits, len(logits)))[0]
    return out


def _split(out) -> tuple[Any, Any]:
    if isinstance(out, (tuple, list)):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None
