"""jattn: attention-based image models in JAX/Flax.

Layout: `jattn.ops` (pure functions on arrays), `jattn.nn` (Flax Linen modules),
`jattn.models`, `jattn.losses`, `jattn.data` (input pipelines; the only part that needs
TensorFlow / grain), `jattn.train`, `jattn.export`, and the `jattn` command line.
"""

__version__ = "0.1.0"
