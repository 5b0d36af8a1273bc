"""Ops, modules, models, train steps, checkpointing and inference need no TF / TFDS / grain."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    BLOCKED = ("tensorflow", "tensorflow_datasets", "grain")

    class Block:  # as on a machine where they are not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, Block())
    import importlib.util
    _find_spec = importlib.util.find_spec
    importlib.util.find_spec = lambda name, package=None: (  # probes see them as absent
        None if name.split(".")[0] in BLOCKED else _find_spec(name, package))
    import jax, jax.numpy as jnp, numpy as np, optax
    from jattn.ops import contextual_attention, flow_to_color, dot_product_attention
    from jattn.nn import SelfAttention2D, GatedConv
    from jattn.models.deepfill import DeepFillV1Generator
    from jattn.losses import deepfill_v1_losses
    from jattn.metrics import psnr
    from jattn.train.steps import Update, apply_update
    from jattn.train.state import create_state
    from jattn.train.checkpoint import Checkpointer
    from jattn.export.inference import Inpainter
    from jattn.export.formats import export_safetensors
    import jattn.cli
    f = jnp.ones((1, 16, 16, 4))
    y, off = contextual_attention(f, f, rate=2)
    gen = DeepFillV1Generator(cnum=4)
    x = jnp.zeros((1, 32, 32, 3)); m = jnp.zeros((1, 32, 32, 1))
    params = jax.jit(gen.init)(jax.random.key(0), x, m)["params"]
    loss = lambda p, v, b, k: (jnp.mean(gen.apply({"params": p["g"]}, b["x"], b["m"])[1] ** 2), ({}, {}))
    state = create_state({"g": params}, {"g": optax.adam(1e-3)}, jax.random.key(1))
    update = Update("g", "g", loss, optax.adam(1e-3))
    state, metrics = jax.jit(lambda s, b: apply_update(update, s, b, 0))(state, {"x": x, "m": m})
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        ck = Checkpointer(d, async_save=False)
        ck.save(1, state.params)
        assert ck.restore(state.params).step == 1
    bad = [n for n in BLOCKED if n in sys.modules]
    assert not bad, bad
    print("OK", float(metrics["g_loss"]))
    """
)


def test_core_runs_without_tensorflow_tfds_and_grain():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
