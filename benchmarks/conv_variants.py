"""DeepFill v1's convolution variants, each against the one it replaced (not a test).

1. The critics' part of a critic update: both critics on [real; fake] (WGAN) plus the
   gradient penalty on interpolates (a second derivative), gradient w.r.t. the critics'
   parameters, with `DisConv`'s convolution as
   - `strided`: `jattn.ops.conv.conv2d` (what DisConv uses: on CPU polyphase input
     gradients, and Winograd convolutions of the space-to-depth input for wide layers),
   - `im2col`: `jattn.ops.conv.conv2d_im2col` (what it used before),
   - `native`: `jax.lax.conv_general_dilated` differentiated by XLA (slow: ~25 s; the
     same as `strided` with `JATTN_CPU_KERNELS=0`).
2. `gen_deconv` (2x nearest upsampling, then a 3x3 conv), forward and backward at the two
   DeepFill v1 shapes, as `upsample_conv3x3` and as upsampling followed by the conv.

    python benchmarks/conv_variants.py [--batch 4] [--critic strided im2col native] [--repeats 5]

Prints median milliseconds per call (after one warm-up call) and XLA's FLOP count.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jattn._xla import apply_cpu_defaults
import jattn.models.deepfill as deepfill
from jattn import losses
from jattn.ops.conv import DN, conv2d, conv2d_im2col, upsample_conv3x3
from jattn.ops.resize import resize_nearest_align_corners

apply_cpu_defaults()  # the `jattn` command's XLA:CPU flags (jattn/_xla.py), before JAX starts a backend


def _native(x, kernel, stride, *, preferred_element_type=None):
    return jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (stride, stride), "SAME", dimension_numbers=DN,
                                        preferred_element_type=preferred_element_type)


def _im2col(x, kernel, stride, *, preferred_element_type=None):
    return conv2d_im2col(x, kernel.astype(x.dtype), stride, preferred_element_type=preferred_element_type)


CRITIC_CONVS = {"strided": conv2d, "im2col": _im2col, "native": _native}


def _median_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def critic_gp(variant: str, batch: int, repeats: int) -> tuple[float, float]:
    """(ms, XLA GFLOP) of grad w.r.t. the critics of WGAN + GP on 256x256 / 128x128 inputs."""
    original = deepfill.conv2d
    deepfill.conv2d = CRITIC_CONVS[variant]  # DisConv looks it up at trace time
    try:
        critics = deepfill.DeepFillV1Critics()
        rng = np.random.default_rng(0)
        real, fake = (jnp.asarray(rng.uniform(-1, 1, (batch, 256, 256, 3)), jnp.float32) for _ in range(2))
        mask = jnp.asarray(rng.uniform(0, 1, (batch, 256, 256, 1)) > 0.5, jnp.float32)
        alpha_l, alpha_g = (jnp.asarray(rng.uniform(0, 1, (batch, 1)), jnp.float32) for _ in range(2))
        params = critics.init(jax.random.key(0), real[:, :128, :128], real)["params"]

        def loss(p):
            local = functools.partial(critics.apply, {"params": p}, method="score_local")
            global_ = functools.partial(critics.apply, {"params": p}, method="score_global")
            d_l = local(jnp.concatenate([real[:, :128, :128], fake[:, :128, :128]]))
            d_g = global_(jnp.concatenate([real, fake]))
            gp = losses.gradient_penalty(local, real[:, :128, :128], fake[:, :128, :128], mask[:, :128, :128], alpha_l)
            gp = gp + losses.gradient_penalty(global_, real, fake, mask, alpha_g)
            wgan = jnp.mean(d_l[batch:]) - jnp.mean(d_l[:batch]) + jnp.mean(d_g[batch:]) - jnp.mean(d_g[:batch])
            return wgan + 10.0 * gp

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    finally:
        deepfill.conv2d = original
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return _median_ms(compiled, params, repeats=repeats), float(cost.get("flops", 0.0)) / 1e9


def gen_deconv(batch: int, repeats: int) -> list[tuple[str, float, float, float, float]]:
    """Per shape: (shape, upsample-then-conv fwd, bwd, upsample_conv3x3 fwd, bwd) in ms."""
    def separate(x, k):
        up = resize_nearest_align_corners(x, 2 * x.shape[1], 2 * x.shape[2])
        return jax.lax.conv_general_dilated(up, k, (1, 1), "SAME", dimension_numbers=DN)

    rng = np.random.default_rng(0)
    rows = []
    for size, cin, cout in ((64, 128, 64), (128, 64, 32)):  # conv13_upsample, conv15_upsample
        x = jnp.asarray(rng.standard_normal((batch, size, size, cin)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.05, jnp.float32)
        g = jnp.asarray(rng.standard_normal((batch, 2 * size, 2 * size, cout)), jnp.float32)
        row = [f"[{batch}, {size}, {size}, {cin}] -> {cout}"]
        for fn in (separate, upsample_conv3x3):
            row.append(_median_ms(jax.jit(fn), x, k, repeats=repeats))
            row.append(_median_ms(jax.jit(lambda x, k, g, fn=fn: jax.vjp(fn, x, k)[1](g)), x, k, g, repeats=repeats))
        rows.append(tuple(row))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--critic", nargs="*", default=["strided", "im2col"], choices=sorted(CRITIC_CONVS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s), batch {args.batch}")
    for variant in args.critic:
        ms, gflop = critic_gp(variant, args.batch, args.repeats)
        print(f"critics WGAN-GP, DisConv conv = {variant:8s} {ms:9.1f} ms  ({gflop:.1f} XLA GFLOP)", flush=True)
    for shape, sep_f, sep_b, up_f, up_b in gen_deconv(args.batch, args.repeats):
        print(f"gen_deconv {shape}: upsample then conv fwd {sep_f:.1f} / bwd {sep_b:.1f} ms;"
              f" upsample_conv3x3 fwd {up_f:.1f} / bwd {up_b:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
