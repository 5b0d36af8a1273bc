"""jattn: attention-based image models in JAX/Flax.

Layout: `jattn.ops` (pure functions on arrays), `jattn.nn` (Flax Linen modules),
`jattn.models`, `jattn.losses`, `jattn.data` (input pipelines; the only part that needs
TensorFlow / grain), `jattn.train`, `jattn.export`, and the `jattn` command line.

Importing jattn changes nothing in the process: the process settings (XLA:CPU flags,
tcmalloc) are made by the `jattn` command alone (`jattn/cli.py`).
"""

__version__ = "0.1.0"


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed. The message names what needs it and the
    `pip install 'jattn[EXTRA]'` that installs it; the `jattn` command prints it as a
    one-line error (exit status 2)."""


def _require_extra(module: str, extra: str, needed_by: str):
    """`import module`, or a MissingExtraError naming `extra` when `module` is not installed
    (a module that is installed but fails to import raises its own error)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != module.split(".")[0]:
            raise
        raise MissingExtraError(f"{needed_by} needs {module}, which is not installed: pip install 'jattn[{extra}]'",
                                name=module) from None


def inpaint(params_or_path, image, mask, *, max_memory=None):
    """`jattn.inpaint(workdir | Inpainter, uint8 [H, W, 3], mask [H, W]) -> uint8 [H, W, 3]`
    (`max_memory`, the loaded-model cache: `jattn.export.inference.inpaint`)."""
    from jattn.export.inference import inpaint as _inpaint

    return _inpaint(params_or_path, image, mask, max_memory=max_memory)
