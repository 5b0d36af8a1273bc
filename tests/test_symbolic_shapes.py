"""Symbolic H, W (jax.export shape polymorphism): the in-graph TF1 resize indices equal the
numpy ones, and every inpainting model exports once and runs at other sizes unchanged."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.ops import resize


def test_in_graph_resize_indices_equal_numpy():
    for n_in in (1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 33):
        for n_out in (2, 3, 5, 2 * n_in, 2 * n_in + 1, max(2, n_in // 2), 64):
            np.testing.assert_array_equal(np.asarray(resize._symbolic_nearest_indices(n_in, n_out)),
                                          resize.nearest_align_corners_indices(n_in, n_out))
            # the bilinear axis through its symbolic branch (the sizes as JAX integers)
            ref = resize._bilinear_axis(n_in, n_out)
            got = resize._bilinear_axis(jnp.int32(n_in), jnp.int32(n_out))
            for a, b in zip(got, ref):
                np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("config,overrides", [
    ("demo_deepfill_v2.py", ["model.cnum=4"]),
    ("demo_sa_inpaint.py", []),
])
def test_inpainting_models_export_with_symbolic_sizes(config, overrides):
    from jattn.config import load_config
    from jattn.export.formats import _symbolic_specs
    from jattn.train.task import build_task

    cfg = load_config(pathlib.Path(__file__).resolve().parents[1] / "configs" / config, [*overrides, "data.image_size=32"])
    task = build_task(cfg)
    params, variables = jax.jit(task.init)(jax.random.key(0), {"image": jnp.zeros((1, 32, 32, 3)),
                                                                "mask": jnp.zeros((1, 32, 32, 1))})

    def run(image, mask):
        out = task.predict(params, variables, {"image": image, "mask": mask})
        return out["output"], out.get("flow", out["output"])

    exported = jax.export.export(jax.jit(run), platforms=("cpu",))(*_symbolic_specs("any", 32, 32))
    # Bit for bit as users run them: both programs at XLA's default backend optimisation (the
    # suite compiles without it, conftest.py), whose code generation differs in the last bit.
    default_opt = {"xla_backend_optimization_level": 3}
    call = jax.jit(exported.call, compiler_options=default_opt)
    direct = jax.jit(run, compiler_options=default_opt)
    rng = np.random.default_rng(0)
    for b, h, w in ((1, 32, 32), (2, 40, 24)):
        image = rng.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
        mask = np.zeros((b, h, w, 1), np.float32)
        mask[:, 8:20, 4:16] = 1
        for got, ref in zip(call(image, mask), direct(image, mask)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
