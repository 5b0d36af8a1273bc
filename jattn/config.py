"""Experiment configs: Python files with `get_config()` returning an `ml_collections.ConfigDict`.

Every key and its default is declared once, in a schema: :func:`trainer_schema` holds the
keys every run has, and each task adds its own (its `model`, `loss` and `optimizer` blocks
and any task-specific defaults, see `jattn.train.task.register_task`); :func:`schema_for`
joins the two. `load_config(path, overrides)` runs the file, overlays its values on the
schema of its task (an unknown key is a typo until proven otherwise: it is an error naming
the key and the valid keys), then applies command-line overrides `key.sub=value` (values
parsed as Python literals, else kept as strings; an unknown key is an error too). A loaded
config therefore has every key, with its default where the file does not set it.

In a schema, a block (a nested dict) is merged key by key; any other value, None included,
is replaced whole: None marks a free-form value (e.g. `data.source`, checked by the code
that reads it), an optional one, or a required one (:data:`REQUIRED`).

Values are checked against the type of their default (:func:`check_types`): a number where
the default is a float (an int will do), a whole number where it is an int, True / False
where it is a bool, a list or tuple where it is one; a key whose default is None takes any
value unless :data:`TYPED_KEYS` gives its type (the learning rates, the batch sizes), and a
string default any value (strings such as "auto" stand for other types too) unless
:data:`CHOICES` lists the values it may take (the optimizer's name, schedule and decay
mask). None is accepted everywhere. A value of the wrong type is an error naming the key.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import numbers
import pathlib
import sys
from collections.abc import Iterable

import ml_collections

__all__ = ["ConfigError", "REQUIRED", "TYPED_KEYS", "CHOICES", "OPTIMIZERS", "SCHEDULES", "DECAY_MASKS",
           "load_config", "apply_overrides", "check_types", "overlay", "optimizer_schema", "trainer_schema",
           "schema_for", "with_defaults"]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the problem."""


#: Keys a loaded config must set (their schema value is None).
REQUIRED = ("model.name", "data.source", "data.image_size", "batch_size", "total_steps")

#: The type of keys whose default is None, where they are set (`fnmatch` patterns of dotted
#: keys; an optimizer block is `optimizer` or one per network, `optimizer.generator`).
TYPED_KEYS = {
    "learning_rate": float,
    "optimizer.lr": float,
    "optimizer.*.lr": float,
    "optimizer.clip_norm": float,
    "optimizer.*.clip_norm": float,
    "batch_size": int,
    "eval_batch_size": int,
    "total_steps": int,
    "optimizer.boundaries": list,
    "optimizer.*.boundaries": list,
    "optimizer.boundaries_epochs": list,
    "optimizer.*.boundaries_epochs": list,
    "optimizer.steps_per_epoch": int,
    "optimizer.*.steps_per_epoch": int,
    "data.eval_resize_shorter": int,
}

#: The optimizers, learning-rate schedules and weight-decay masks of an optimizer block
#: (`jattn.train.optim`); "multistep" is another name of "step".
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear", "step", "multistep")
DECAY_MASKS = ("all", "kernels")

#: The values a key may take where it is set (`fnmatch` patterns of dotted keys, as in
#: :data:`TYPED_KEYS`).
CHOICES = {
    "optimizer.name": OPTIMIZERS,
    "optimizer.*.name": OPTIMIZERS,
    "optimizer.schedule": SCHEDULES,
    "optimizer.*.schedule": SCHEDULES,
    "optimizer.decay_mask": DECAY_MASKS,
    "optimizer.*.decay_mask": DECAY_MASKS,
    "eval_lpips_net": ("alex", "vgg"),
    "data.augment.crop": ("random", "inception", "pad"),
    "data.augment.pad_mode": ("zero", "reflect"),
}


def optimizer_schema(*networks: str) -> ml_collections.ConfigDict:
    """The optimizer block read by `jattn.train.optim.make_optimizer` (see there and
    docs/models.md); with `networks`, one such block per network (e.g.
    `optimizer_schema("generator", "critic")`). The defaults are plain Adam at a constant
    learning rate, the optimizer every config had before the block grew more keys."""
    if networks:
        return ml_collections.ConfigDict({net: optimizer_schema() for net in networks})
    return ml_collections.ConfigDict({
        "name": "adam",  # "adam" | "adamw" | "sgd" (OPTIMIZERS)
        "lr": None,  # None: the config's learning_rate
        "b1": 0.9,  # adam, adamw
        "b2": 0.999,
        "eps": 1e-8,
        "momentum": 0.0,  # sgd (0: plain SGD)
        "nesterov": False,  # sgd
        "weight_decay": 0.0,  # adam, sgd: L2 added to the gradient; adamw: decoupled
        "decay_mask": "all",  # "all" | "kernels" (no decay of 1-D parameters: biases, norm scales)
        "clip_norm": None,  # a global gradient-norm clip
        "schedule": "constant",  # SCHEDULES: "constant" | "cosine" | "linear" (to 0 over decay_steps) | "step"
        "warmup_steps": 0,  # linear warm-up from 0
        "decay_steps": 0,  # cosine, linear: after the warm-up
        "boundaries": None,  # step: updates (from step 0) where the lr is multiplied by factor
        "boundaries_epochs": None,  # step: the same in epochs of steps_per_epoch updates
        "steps_per_epoch": None,
        "factor": 0.1,  # step: the multiplier at each boundary
        "accumulate_steps": 1,  # k > 1: the gradients of k calls averaged into one update (optax.MultiSteps)
    })


def trainer_schema() -> ml_collections.ConfigDict:
    """The keys every run has, with their defaults (a task's schema adds to it)."""
    return ml_collections.ConfigDict({
        "seed": 0,
        "model": None,  # the task's block; "name" picks the task (jattn.train.task)
        "data": {
            "source": None,  # where the images come from (jattn.data.sources)
            "image_size": None,  # training crop: an int or (height, width)
            "mask": None,  # the hole masks (jattn.data.masks); None: no masks
            "scale": None,  # super-resolution: the "lowres" field is the image downscaled by it
            "max_boxes": 50,  # detection: boxes per example in the "boxes" field (padded)
            "shuffle_buffer": None,
            "worker_count": 0,
            "loader": "grain",  # "grain" | "tfdata"
            "eval_source": None,  # None: the training source, in order, centre crops
            "eval_mask": None,  # None: the training masks (with the fixed eval seed)
            "eval_resize_shorter": None,  # eval: the shorter side resized to this before the centre crop
            # training only (jattn.data.images.Augment; the defaults are a uniform crop + left-right flip)
            "augment": {
                "crop": "random",  # "random" | "inception" (random size + aspect ratio) | "pad" (pad, then crop)
                "pad": 4,  # crop "pad": pixels added on every side
                "pad_mode": "zero",  # "zero" (black) | "reflect"
                "area": [0.08, 1.0],  # crop "inception": fraction of the image's area
                "ratio": [3 / 4, 4 / 3],  # crop "inception": aspect ratio (width / height), log-uniform
                "flip_lr": True,
                "flip_ud": False,
                "rot90": False,  # rotations by 0, 90, 180, 270 degrees (square crops)
            },
        },
        "batch_size": None,  # global: split over every device of every process
        "total_steps": None,
        "learning_rate": None,  # every network's, unless its optimizer block sets lr
        "n_critic": 1,  # critic updates per generator update (GAN tasks)
        "compute_dtype": "float32",  # "bfloat16": bf16 compute, float32 parameters
        "optimizer": None,  # the task's block (optimizer_schema)
        "loss": None,  # the task's block
        "log_every": 10,
        "image_every": 0,  # 0: never
        "checkpoint_every": 0,  # 0: only at the end
        "keep_checkpoints": 3,  # the latest ones, plus the best by best_metric
        "eval_every": 0,  # 0: never
        "eval_images": 64,
        "eval_batch_size": None,  # None: batch_size
        # image-to-image tasks (inpainting, super-resolution): FID and KID of the outputs against the
        # targets with the FID Inception's weights, LPIPS with an LPIPS weights file (docs/metrics.md)
        "eval_inception_weights": None,
        "eval_lpips_weights": None,
        "eval_lpips_net": "alex",  # "alex" | "vgg"
        "best_metric": None,  # e.g. "eval_psnr"; None: no best checkpoint kept
        "best_mode": "max",  # "max" | "min"
        "skip_nonfinite": False,  # False: stop on a non-finite loss; True: drop the update, go on
        "step_unroll": True,  # every update written out in the step program (False: repeats as a lax.scan)
        "prefetch_steps": 2,  # steps of batches put on the devices ahead
        "jattn": None,  # provenance written by the loop (version, git commit) into saved configs
    })


def _plain(value):
    """A ConfigDict (at any depth) as plain dicts; anything else unchanged."""
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def _merge(base: dict, top: dict, *, strict: bool, prefix: str = "") -> dict:
    """`top`'s values over `base`: a block of `base` (a dict) is merged key by key, any other
    value replaced whole. strict: a key of `top` that `base` lacks is a ConfigError naming it
    and the valid keys; a block given a value that is no dict is one too."""
    unknown = [prefix + key for key in top if key not in base]
    if strict and unknown:
        valid = ", ".join(prefix + key for key in base) or "(none)"
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}; valid keys here: {valid}")
    out = dict(base)
    for key, value in top.items():
        value = _plain(value)
        if isinstance(base.get(key), dict) and isinstance(value, dict):
            out[key] = _merge(base[key], value, strict=strict, prefix=f"{prefix}{key}.")
        elif isinstance(base.get(key), dict) and strict:
            raise ConfigError(f"config key {prefix}{key} must be a block of keys ({', '.join(base[key])}), "
                              f"got {value!r}")
        else:
            out[key] = value
    return out


def overlay(schema, values) -> ml_collections.ConfigDict:
    """A new ConfigDict: `schema` with `values` (a ConfigDict or dict) over it; an unknown key
    of `values` is a ConfigError naming it and the valid keys."""
    return ml_collections.ConfigDict(_merge(_plain(schema), _plain(values), strict=True))


def schema_for(name: str | None) -> ml_collections.ConfigDict:
    """The schema of a config whose `model.name` is `name`: :func:`trainer_schema` with the
    task's own schema over it (None: no task, the trainer's keys only). An unknown task name
    is a ConfigError naming the known ones."""
    schema = _plain(trainer_schema())
    if name is not None:
        from jattn.train.task import task_schema  # the task registry imports JAX: only when needed

        schema = _merge(schema, _plain(task_schema(name)), strict=False)
    return ml_collections.ConfigDict(schema)


def _task_name(config) -> str | None:
    model = _plain(config).get("model")
    return model.get("name") if isinstance(model, dict) else None


def with_defaults(config) -> ml_collections.ConfigDict:
    """`config` (a ConfigDict or dict) completed: a new ConfigDict with every key of the schema
    of its task, the defaults where `config` has no value. An unknown key is a ConfigError."""
    return overlay(schema_for(_task_name(config)), config)


def _missing(config) -> list[str]:
    """The keys of :data:`REQUIRED` that `config` leaves None."""
    missing = []
    for key in REQUIRED:
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if node is None:
            missing.append(key)
    return missing


def _type_problem(value, kind: type) -> str | None:
    """What `value` should be, as a key whose values are of type `kind`, or None when it is
    fine (None always is)."""
    if value is None or kind is str:
        return None
    if kind is bool:
        ok = isinstance(value, (bool, numbers.Integral)) or type(value).__name__ == "bool_"
        return None if ok else "expected True or False"
    if kind is int:
        whole = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
        return None if whole and not isinstance(value, bool) else "expected a whole number"
    if kind is float:
        return None if isinstance(value, numbers.Real) and not isinstance(value, bool) else "expected a number"
    if kind in (list, tuple):
        return None if isinstance(value, (list, tuple)) else "expected a list or tuple"
    return None


def _type_problems(values: dict, schema, prefix: str = "") -> list[str]:
    problems = []
    for key, value in values.items():
        dotted = prefix + key
        default = schema.get(key) if isinstance(schema, dict) else None
        if isinstance(value, dict):
            problems += _type_problems(value, default, dotted + ".")
            continue
        if isinstance(default, dict):
            continue  # a block given a value: _merge reports it
        kind = type(default) if default is not None else next(
            (t for pattern, t in TYPED_KEYS.items() if fnmatch.fnmatchcase(dotted, pattern)), None)
        problem = None if kind is None else _type_problem(value, kind)
        choices = next((c for pattern, c in CHOICES.items() if fnmatch.fnmatchcase(dotted, pattern)), None)
        if problem is None and choices is not None and value is not None and value not in choices:
            problem = f"expected one of {', '.join(map(str, choices))}"
        if problem is not None:
            problems.append(f"{dotted}: {problem}, got {value!r}")
    return problems


def check_types(config) -> None:
    """A ConfigError naming each key of `config` whose value does not have the type of its
    default in the schema of its task (or the one :data:`TYPED_KEYS` gives a key whose
    default is None); see the module's docstring for what each type accepts."""
    problems = _type_problems(_plain(config), _plain(schema_for(_task_name(config))))
    if problems:
        raise ConfigError("; ".join(problems))


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
    """Load `path` (a Python file with `get_config()`): its values over the schema of its
    task (:func:`with_defaults`), then `overrides`; a required key left unset is an error, and
    `eval_batch_size` left None becomes `batch_size`."""
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
    try:
        config = module.get_config()
    except Exception as err:  # noqa: BLE001 - as above
        raise ConfigError(f"config file {path}: get_config() failed: {type(err).__name__}: {err}") from err
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict, got {type(config).__name__}")
    config = with_defaults(config)
    try:
        check_types(config)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    # completed again: an override of model.name changes the schema the keys must fit
    config = with_defaults(apply_overrides(config, overrides))
    try:
        check_types(config)
    except ConfigError as err:
        raise ConfigError(f"override {err}") from None
    missing = _missing(config)
    if missing:
        raise ConfigError(f"{path}: required config key(s) not set: {', '.join(missing)}")
    if config.eval_batch_size is None:
        config.eval_batch_size = config.batch_size
    return config
