"""Experiment configs: Python files with `get_config()` returning an `ml_collections.ConfigDict`.

`load_config(path, overrides)` runs the file, checks its keys against the schema below
(an unknown key is a typo until proven otherwise: it is an error naming the key), then
applies command-line overrides `key.sub=value` (values parsed as Python literals, else
kept as strings) to the locked config, so an override of an unknown key is an error too.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import sys
from collections.abc import Iterable

import ml_collections

__all__ = ["ConfigError", "load_config", "apply_overrides", "validate"]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the problem."""


# Keys every training config may have. Blocks marked None are free-form (checked by the
# code that reads them: the task for `model` and `loss`, the data package for `source`
# and `mask`).
SCHEMA = {
    "seed": True,
    "model": None,
    "data": {
        "source": None,
        "image_size": True,
        "mask": None,
        "scale": True,  # super-resolution: the "lowres" field is the image downscaled by it
        "shuffle_buffer": True,
        "worker_count": True,
        "loader": True,
        "eval_source": None,
        "eval_mask": None,
    },
    "batch_size": True,
    "total_steps": True,
    "learning_rate": True,
    "n_critic": True,
    "compute_dtype": True,
    "optimizer": None,
    "loss": None,
    "log_every": True,
    "image_every": True,
    "checkpoint_every": True,
    "keep_checkpoints": True,
    "eval_every": True,
    "eval_images": True,
    "eval_batch_size": True,
    "best_metric": True,
    "best_mode": True,
    "skip_nonfinite": True,
    "jattn": None,  # provenance written by the loop (version, git commit) into saved configs
}


def validate(config, schema=SCHEMA, prefix: str = "") -> None:
    """Raise ConfigError naming every key of `config` that the schema does not know."""
    unknown = []
    for key in config.keys():
        if key not in schema:
            unknown.append(prefix + key)
        elif isinstance(schema[key], dict) and isinstance(config[key], (ml_collections.ConfigDict, dict)):
            validate(config[key], schema[key], prefix + key + ".")
    if unknown:
        valid = ", ".join(prefix + k for k in schema)
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}; valid keys here: {valid}")


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Apply `key.sub=value` strings to `config` (in place; returns it)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        path = key.strip().split(".")
        node = config
        for i, part in enumerate(path[:-1]):
            if part not in node:
                raise ConfigError(f"override {key!r}: unknown config key {'.'.join(path[: i + 1])!r}")
            node = node[part]
        leaf = path[-1]
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or leaf not in node:
            valid = ", ".join(sorted(node.keys())) if isinstance(node, (ml_collections.ConfigDict, dict)) else "(none)"
            raise ConfigError(f"override {key!r}: unknown config key; valid keys here: {valid}")
        value = _parse_value(text)
        old = node[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            node[leaf] = value
        except (TypeError, KeyError, AttributeError) as err:
            raise ConfigError(f"override {key!r}: {err}") from None
    return config


def load_config(path: str | pathlib.Path, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Load `path` (a Python file with `get_config()`), validate it, apply `overrides`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"jattn_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # configs may import their siblings (a base config)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - any error in the file is the user's to fix
        raise ConfigError(f"config file {path} failed to load: {type(err).__name__}: {err}") from err
    finally:
        sys.path.remove(str(path.resolve().parent))
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config() function")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict, got {type(config).__name__}")
    validate(config)
    return apply_overrides(config, overrides)
