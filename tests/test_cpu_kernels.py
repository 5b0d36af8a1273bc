"""jattn's CPU kernels (`jattn.ops.conv.conv2d`, `jattn.ops.activations.elu`): the switch,
and DeepFill's generators and critics with the kernels on and off.

With the kernels on, DeepFill's programs differ from plain XLA's on CPU only: forward mode
(`jax.jvp`), reverse mode (`jax.grad`) and the WGAN-GP penalty's second derivative give
the values plain XLA gives (with the kernels off), and the programs lowered for another
platform (CUDA here, no GPU needed) or with the kernels off are XLA's convolutions alone.

Tolerances: Winograd's values and derivatives differ from the exact convolution by about
1e-5 of their largest value per layer (`jattn.ops.conv.winograd_conv3x3`), the other
kernels by float32 rounding (1e-7); through a generator's ~40 layers, contextual
attention's softmax (scale 10) and the final clip, the outputs and gradients stay within
about 1e-4 of their largest value, so 1e-3 of it is asserted (a wrong derivative is off
by O(1)).
"""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn import losses
from jattn.models.deepfill import DeepFillV1Critics, DeepFillV1Generator
from jattn.models.deepfill_v2 import DeepFillV2Generator
from jattn.ops import conv2d, cpu_kernels, cpu_kernels_enabled
from jattn.ops.activations import elu

TOLERANCE = 1e-3  # of the largest value (module docstring)


def _relmax(exact, got) -> float:
    exact, got = np.asarray(exact, np.float64), np.asarray(got, np.float64)
    return float(np.abs(exact - got).max() / max(np.abs(exact).max(), 1e-30))


def _assert_close(on, off, what):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(off), jax.tree.leaves(on)):
        assert _relmax(a, b) < TOLERANCE, f"{what} {jax.tree_util.keystr(path)}: {_relmax(a, b):.2e}"


def _random_params(model, *args, seed=0):
    """Glorot-uniform kernels, U(-0.1, 0.1) biases, drawn with numpy (no per-shape
    compilation of jax.random)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == "kernel":
            a = np.sqrt(6.0 / (np.prod(leaf.shape[:-1]) + leaf.shape[-1]))
            return jnp.asarray(rng.uniform(-a, a, leaf.shape), jnp.float32)
        return jnp.asarray(rng.uniform(-0.1, 0.1, leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _inpainting_inputs(batch=1, size=64, seed=1):
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    mask = np.zeros((batch, size, size, 1), np.float32)
    mask[:, 16:44, 20:48] = 1
    return jnp.asarray(image * (1 - mask)), jnp.asarray(mask)


# --------------------------------------------------------------------------- the switch


def test_switch_reads_the_environment_and_the_in_process_setting(monkeypatch):
    monkeypatch.delenv("JATTN_CPU_KERNELS", raising=False)
    assert cpu_kernels_enabled()
    for value, on in (("0", False), ("false", False), (" OFF ", False), ("no", False), ("1", True), ("", True)):
        monkeypatch.setenv("JATTN_CPU_KERNELS", value)
        assert cpu_kernels_enabled() is on, value
    monkeypatch.setenv("JATTN_CPU_KERNELS", "0")
    with cpu_kernels(True):
        assert cpu_kernels_enabled()
        with cpu_kernels(False):
            assert not cpu_kernels_enabled()
        assert cpu_kernels_enabled()
    assert not cpu_kernels_enabled()
    try:
        cpu_kernels(True)  # called: holds from then on
        assert cpu_kernels_enabled()
    finally:
        cpu_kernels(None)  # back to the environment's
    assert not cpu_kernels_enabled()


@pytest.mark.parametrize("shape,kernel,stride,rate", [
    ((1, 16, 16, 17), (5, 5, 17, 8), 2, 1),    # polyphase
    ((1, 66, 66, 16), (5, 5, 16, 48), 2, 1),   # space-to-depth Winograd
    ((1, 36, 36, 48), (3, 3, 48, 48), 1, 2),   # Winograd
    ((1, 9, 7, 16), (3, 3, 16, 3), 1, 1),      # few outputs
    ((1, 9, 7, 5), (5, 5, 5, 12), 1, 1),       # few inputs
])
def test_kernels_off_is_xla_convolution(shape, kernel, stride, rate):
    """With the kernels off the CPU program of a conv2d's value, gradient and tangent is
    XLA's convolution's, bit for bit (the same StableHLO as `conv_general_dilated`'s); with
    them on, the CPU program differs and the CUDA lowering is XLA's again."""
    x, k = jnp.ones(shape), jnp.ones(kernel) * 0.01

    def programs(conv):
        def grad_and_tangent(a, b):
            y, vjp = jax.vjp(conv, a, b)
            return vjp(y), jax.jvp(conv, (a, b), (a, b))[1]
        return grad_and_tangent

    def lowered(fn, platform):
        return jax.jit(fn).trace(x, k).lower(lowering_platforms=(platform,)).as_text()

    def xla(a, b):
        return jax.lax.conv_general_dilated(a, b, (stride, stride), "SAME", rhs_dilation=(rate, rate),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    ours = programs(lambda a, b: conv2d(a, b, stride, rate))
    plain = lowered(programs(xla), "cpu")
    with cpu_kernels(False):
        assert _ops(lowered(ours, "cpu")) == _ops(plain)
    with cpu_kernels(True):
        assert _ops(lowered(ours, "cpu")) != _ops(plain)
        cuda = _ops(lowered(ours, "cuda"))
    assert cuda["convolution"] == _ops(plain)["convolution"]
    assert not {"custom_call", "while"} & set(cuda)


def _ops(stablehlo: str) -> collections.Counter:
    """How many of each StableHLO operation a lowered program has, other than the
    platform dispatch's `case` and the constants and returns around it."""
    names = re.findall(r"(?:\"?stablehlo\.)([a-z_]+)", stablehlo)
    return collections.Counter(n for n in names if n not in ("case", "return", "constant"))


def test_elu_forward_mode_and_kernels_off():
    x = jnp.linspace(-6.0, 6.0, 97)
    t = jnp.cos(jnp.arange(97.0))
    y, ty = jax.jvp(elu, (x,), (t,))
    y_ref, ty_ref = jax.jvp(jax.nn.elu, (x,), (t,))
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ty, ty_ref, rtol=1e-6, atol=1e-7)
    hvp = lambda f: jax.jvp(jax.grad(lambda v: jnp.sum(f(v) * t)), (x,), (t,))[1]  # noqa: E731
    np.testing.assert_allclose(hvp(elu), hvp(jax.nn.elu), rtol=1e-5, atol=1e-6)
    with cpu_kernels(False):
        assert str(jax.make_jaxpr(elu)(x)) == str(jax.make_jaxpr(jax.nn.elu)(x))


# --------------------------------------------------------------------------- generators

GENERATORS = {
    # widths of 48+ on 32x32 maps: Winograd layers (conv3, conv14, xconv3, ...) at 64x64
    "deepfill_v1": lambda **kw: DeepFillV1Generator(cnum=24, **kw),
    "deepfill_v2": lambda **kw: DeepFillV2Generator(cnum=48, **kw),
}


@pytest.fixture(scope="module", params=sorted(GENERATORS))
def generator(request):
    """(name, outputs(params, x_in) -> (x1, x2), params, x_in) of the generator as
    configured by default (dense contextual attention)."""
    x_in, mask = _inpainting_inputs()
    params = _random_params(GENERATORS[request.param](), x_in, mask)

    def outputs_of(model):
        def outputs(p, x):
            x1, x2, _ = model.apply({"params": p}, x, mask)
            return x1, x2
        return outputs

    return request.param, outputs_of(GENERATORS[request.param]()), params, x_in


def _derivatives(outputs, params, x_in):
    """(outputs and their tangent along a fixed direction, gradient of a loss, the
    gradient's compiled program) of a generator, traced and compiled now (under the
    current switch)."""
    rng = np.random.default_rng(2)
    t_params = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype) * 0.01, params)
    t_x = jnp.asarray(rng.standard_normal(x_in.shape), jnp.float32)

    def loss(p, x):
        x1, x2 = outputs(p, x)
        return jnp.mean(jnp.abs(x1 - x)) + jnp.mean(jnp.abs(x2 - x) * jnp.cos(x2))

    jvp = jax.jit(lambda p, x: jax.jvp(outputs, (p, x), (t_params, t_x)))
    grad = jax.jit(jax.grad(loss, (0, 1)))
    return jvp(params, x_in), grad(params, x_in), grad.lower(params, x_in).compile().as_text()


def test_generator_jvp_and_grad_equal_with_kernels_on_and_off(generator):
    """`jax.jvp` and `jax.grad` through the generator give XLA's values with the CPU
    kernels on (within the module docstring's tolerance), and the gradient's program with
    them on does use them (on CPU: no convolution of a zero-dilated gradient, XLA's input
    gradient of a strided convolution)."""
    name, outputs, params, x_in = generator
    with cpu_kernels(True):
        (y_on, t_on), g_on, hlo_on = _derivatives(outputs, params, x_in)
    with cpu_kernels(False):
        (y_off, t_off), g_off, hlo_off = _derivatives(outputs, params, x_in)
    _assert_close(y_on, y_off, f"{name} outputs")
    _assert_close(t_on, t_off, f"{name} tangents")
    _assert_close(g_on, g_off, f"{name} gradient")
    if jax.default_backend() == "cpu":
        assert "lhs_dilate" in hlo_off and "lhs_dilate" not in hlo_on


def test_generator_programs_are_xla_convolutions_off_cpu(generator):
    """The generator's forward pass and gradient, lowered for CUDA with the kernels on, and
    for CPU with them off: no custom calls, no loops, and as many convolutions as plain
    XLA's program has (with the kernels off the CPU program is plain XLA's)."""
    _, outputs, params, x_in = generator

    def loss(p, x):
        return sum(jnp.sum(y) for y in outputs(p, x))

    def lowered(fn, platform):
        return _ops(jax.jit(fn).trace(params, x_in).lower(lowering_platforms=(platform,)).as_text())

    n_layers = len([p for p in jax.tree_util.tree_leaves_with_path(params) if p[0][-1].key == "kernel"])
    for fn in (outputs, jax.grad(loss, (0, 1))):
        with cpu_kernels(False):
            plain = lowered(fn, "cpu")
        with cpu_kernels(True):
            cuda = lowered(fn, "cuda")
        assert not {"custom_call", "while"} & (set(plain) | set(cuda))
        assert cuda["convolution"] == plain["convolution"] >= n_layers
        assert cuda["dot_general"] == plain["dot_general"]


# --------------------------------------------------------------------------- critics


def test_wgan_gp_second_order_equals_xla():
    """DeepFill v1's critic loss, WGAN plus the gradient penalty (a second derivative
    through every strided convolution: polyphase input gradients, and the space-to-depth
    Winograd layer of the global critic's conv2), differentiated with respect to the
    critics: the same with the CPU kernels on as with plain XLA."""
    critics = DeepFillV1Critics(cnum=24)  # global conv2: 4 * 24 = 96 channels after space-to-depth, 32x32
    rng = np.random.default_rng(3)
    real, fake = (jnp.asarray(rng.uniform(-1, 1, (2, 128, 128, 3)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(rng.uniform(0, 1, (2, 128, 128, 1)) > 0.5, jnp.float32)
    alpha = jnp.asarray(rng.uniform(0, 1, (2, 1)), jnp.float32)
    params = _random_params(critics, real[:, :64, :64], real)

    def loss(p):
        local = lambda x: critics.apply({"params": p}, x, method="score_local")  # noqa: E731
        global_ = lambda x: critics.apply({"params": p}, x, method="score_global")  # noqa: E731
        wgan = jnp.mean(global_(fake) - global_(real)) + jnp.mean(local(fake[:, :64, :64]) - local(real[:, :64, :64]))
        gp = losses.gradient_penalty(global_, real, fake, mask, alpha)
        gp = gp + losses.gradient_penalty(local, real[:, :64, :64], fake[:, :64, :64], mask[:, :64, :64], alpha)
        return wgan + 10.0 * gp

    with cpu_kernels(True):
        fn = jax.jit(jax.grad(loss))
        on = fn(params)
        hlo_on = fn.lower(params).compile().as_text()
    with cpu_kernels(False):
        off = jax.jit(jax.grad(loss))(params)
    _assert_close(on, off, "critics' gradient")
    if jax.default_backend() == "cpu":  # no convolution of a zero-dilated gradient (XLA's)
        assert "lhs_dilate" not in hlo_on
