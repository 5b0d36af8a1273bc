"""jattn: attention-based image models in JAX/Flax.

Layout: `jattn.ops` (pure functions on arrays), `jattn.nn` (Flax Linen modules),
`jattn.models`, `jattn.losses`, `jattn.data` (input pipelines; the only part that needs
TensorFlow / grain), `jattn.train`, `jattn.export`, and the `jattn` command line.
"""

from jattn._xla import apply_cpu_defaults as _apply_cpu_defaults

__version__ = "0.1.0"

_apply_cpu_defaults()  # XLA:CPU flags, before JAX starts its backends (see jattn/_xla.py)


def inpaint(params_or_path, image, mask):
    """`jattn.inpaint(workdir | Inpainter, uint8 [H, W, 3], mask [H, W]) -> uint8 [H, W, 3]`."""
    from jattn.export.inference import inpaint as _inpaint

    return _inpaint(params_or_path, image, mask)
