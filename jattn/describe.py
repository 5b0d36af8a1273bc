"""What a run will be, without training it: the report of `jattn describe`.

From a loaded config (`jattn.config.load_config`) and the task it builds
(`jattn.train.task.build_task`), nothing trained and no weight allocated:

* per network, its parameter count and its largest layers, from the shapes of the run's
  state (`jattn.train.setup.abstract_train_state`: `jax.eval_shape` of the state's
  initialiser, the same shapes `jattn train` and `jattn compile` build);
* the FLOPs per example of the inference forward, from XLA's cost analysis of
  `jax.jit(task.predict)` compiled for the CPU (never run) on one example. A task exposes
  no forward of each of its networks, only `predict`, which runs the network a run
  deploys (the generator of a GAN, whose EMA weights in SAGAN; the only network of a
  supervised task) plus the task's cheap post-processing (inpainting: the composite and
  the attention-flow picture): its FLOPs are reported for that network, and the other
  networks (the critics, which run only inside the losses) are listed as not measured;
* each network's optimizer in words, from its optimizer block (`jattn.train.optim`), and
  its learning rate at given training steps, evaluated from the schedule the run's
  optimizer is built with (`jattn.train.optim.learning_rate_schedule`). A step is one
  training step of the loop; a network's optimizer is called once per update of it in a
  step (DeepFill v1's critic: `n_critic` times) and, with `accumulate_steps` k, the
  schedule advances once every k calls, so the rate at step s is the schedule at update
  ``(s * calls_per_step) // k``;
* the data pipeline in words (source, image size, batch sizes, loader, fields, masks,
  the eval set).

XLA counts 2·M·N·K FLOPs for a [M, K] x [K, N] product or the equivalent convolution and
one per element of an elementwise op (see `jattn.train.aot`).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["DescribeError", "describe", "format_report", "describe_data", "describe_optimizer", "parameter_count",
           "largest_layers", "forward_flops", "predicted_network", "optimizer_block", "calls_per_step",
           "learning_rate_at", "default_lr_steps", "cpu_mesh"]

#: Layers listed per network.
TOP_LAYERS = 5


class DescribeError(ValueError):
    """Input `jattn describe` cannot use: the message names the problem in one line."""


def _plain(value):
    return value.to_dict() if hasattr(value, "to_dict") else value


def cpu_mesh():
    """A one-device mesh of the CPU: FLOPs are those of a program compiled for the CPU, and
    one example need not divide over every device."""
    import jax

    from jattn.train.sharding import make_mesh

    return make_mesh(jax.devices("cpu")[:1])


# --------------------------------------------------------------------------- parameters


def _size(shape) -> int:
    return int(math.prod(shape))


def parameter_count(tree) -> int:
    """The number of values in a pytree of arrays or `jax.ShapeDtypeStruct`s."""
    import jax

    return sum(_size(x.shape) for x in jax.tree_util.tree_leaves(tree))


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def largest_layers(tree, top: int = TOP_LAYERS) -> list[dict]:
    """The `top` layers of a network's parameters with the most values: a layer is the
    module holding parameter leaves (its path, "/"-joined), e.g. `conv1` with its `kernel`
    and `bias`. [{"layer", "parameters", "shapes": {leaf: [dims]}}], largest first."""
    import jax

    layers: dict[str, dict] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [_key_name(k) for k in path]
        layer, name = "/".join(names[:-1]) or "(top)", names[-1] if names else "(leaf)"
        entry = layers.setdefault(layer, {"layer": layer, "parameters": 0, "shapes": {}})
        entry["parameters"] += _size(leaf.shape)
        entry["shapes"][name] = [int(d) for d in leaf.shape]
    return sorted(layers.values(), key=lambda e: (-e["parameters"], e["layer"]))[:top]


# --------------------------------------------------------------------------- FLOPs


def predicted_network(task, params) -> str | None:
    """The network `task.predict` runs: the task's `export_network`, else "generator" where
    there is one, else the only network (as `jattn export` chooses); None if none of them."""
    if task.export_network is not None:
        return task.export_network
    if "generator" in params:
        return "generator"
    return next(iter(params)) if len(params) == 1 else None


def forward_flops(task, config, state=None, batch_size: int = 1) -> float:
    """FLOPs per example of `task.predict` on `batch_size` examples: XLA's cost analysis of
    the program compiled for the CPU (not run; LLVM optimisation off, which changes the
    compile time only), divided by `batch_size`. `state`: the abstract state on
    :func:`cpu_mesh` (made when None)."""
    import jax

    from jattn.train.aot import cost_of
    from jattn.train.setup import abstract_eval_batch, abstract_train_state

    mesh = cpu_mesh()
    if state is None:
        state = abstract_train_state(task, config, mesh)
    batch = abstract_eval_batch(task, config, mesh, batch_size)
    with jax.set_mesh(mesh):
        lowered = jax.jit(task.predict).lower(state.params, state.variables, batch)
        compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    flops, _ = cost_of(compiled)
    return flops / batch_size


# --------------------------------------------------------------------------- optimizers


def optimizer_block(config, net: str) -> tuple[Any, str]:
    """(block, its key) of network `net`'s optimizer: `optimizer.<net>` in a task with one
    block per network (the GANs, `jattn.config.optimizer_schema(*networks)`), else the
    config's one `optimizer` block."""
    import ml_collections

    block = config.optimizer
    if isinstance(block, ml_collections.ConfigDict) and isinstance(block.get(net), ml_collections.ConfigDict):
        return block[net], f"optimizer.{net}"
    return block, "optimizer"


def calls_per_step(task) -> dict[str, int]:
    """{network: its updates in one training step} (DeepFill v1: critic 5, generator 1)."""
    calls: dict[str, int] = {}
    for update in task.updates:
        calls[update.net] = calls.get(update.net, 0) + 1
    return calls


def _lr_of(cfg, config) -> float:
    return float(config.learning_rate if cfg.lr is None else cfg.lr)


def _schedule(cfg, config, where: str):
    from jattn.train.optim import learning_rate_schedule

    return learning_rate_schedule(cfg, _lr_of(cfg, config), where=where)


def _complete(block):
    from jattn.config import optimizer_schema, overlay

    return overlay(optimizer_schema(), block)


def _g(x: float) -> str:
    return f"{x:g}"


def describe_optimizer(block, config, calls: int = 1, *, where: str = "optimizer") -> str:
    """The optimizer of `block` (completed with the schema's defaults) in words: the
    optimizer and its hyper-parameters, weight decay, clipping, learning rate and schedule,
    accumulation, and the optax chain `jattn.train.optim.make_optimizer` builds."""
    from jattn.train.optim import schedule_boundaries

    cfg = _complete(block)
    wd = float(cfg.weight_decay or 0.0)
    on = "all parameters" if cfg.decay_mask == "all" else "kernels only (no decay of 1-D parameters)"
    chain = []
    if cfg.clip_norm:
        chain.append(f"clip_by_global_norm({_g(cfg.clip_norm)})")
    if cfg.name in ("adam", "adamw"):
        head = f"{'Adam' if cfg.name == 'adam' else 'AdamW'} (b1 {_g(cfg.b1)}, b2 {_g(cfg.b2)}, eps {_g(cfg.eps)})"
    else:
        m = float(cfg.momentum or 0.0)
        head = f"SGD ({f'momentum {_g(m)}' + (', Nesterov' if cfg.nesterov else '') if m else 'no momentum'})"
    if not wd:
        decay = "no weight decay"
    elif cfg.name == "adamw":
        decay = f"decoupled weight decay {_g(wd)} on {on}"
    else:
        decay = f"L2 weight decay {_g(wd)} on {on}, added to the gradient first"
        chain.append(f"add_decayed_weights({_g(wd)}{', mask=kernels' if cfg.decay_mask != 'all' else ''})")
    chain.append(f"inject_hyperparams({cfg.name})")
    source = where + ".lr" if cfg.lr is not None else "learning_rate"
    lr = f"lr {_g(_lr_of(cfg, config))} ({source})"
    name = cfg.schedule
    if name == "constant":
        sched = "constant"
    elif name in ("cosine", "linear"):
        sched = f"{name} decay to 0 over {int(cfg.decay_steps or 0)} updates"
    else:
        bounds = schedule_boundaries(cfg, where=where)
        sched = f"x{_g(cfg.factor)} at updates {', '.join(map(str, bounds))}"
        if cfg.get("boundaries_epochs") is not None:
            epochs = ", ".join(_g(e) for e in cfg.boundaries_epochs)
            sched += f" (epochs {epochs} of {cfg.steps_per_epoch} updates)"
    warmup = int(cfg.warmup_steps or 0)
    if warmup:
        sched += f", after {warmup} updates of linear warm-up from 0"
    clip = f"gradients clipped to global norm {_g(cfg.clip_norm)}" if cfg.clip_norm else "no gradient clipping"
    k = int(cfg.accumulate_steps)
    text = f"{head}, {lr}, {sched}; {decay}; {clip}"
    optax_chain = f"chain({', '.join(chain)})"
    if k > 1:
        text += f"; gradients of {k} calls averaged into one update (optax.MultiSteps)"
        optax_chain = f"MultiSteps({optax_chain}, every {k})"
    else:
        text += "; no accumulation"
    per_step = f"{calls} call{'s' if calls != 1 else ''} per training step"
    return f"{text}; {per_step}. optax: {optax_chain}"


def _update_index(step: int, calls: int, k: int) -> int:
    return (int(step) * calls) // k


def learning_rate_at(block, config, steps, calls: int = 1, *, where: str = "optimizer") -> dict[int, float]:
    """{step: the learning rate of the network's updates in training step `step`} (steps
    from 0), the schedule of `block` evaluated at update ``(step * calls) // k``."""
    cfg = _complete(block)
    sched = _schedule(cfg, config, where)
    k = int(cfg.accumulate_steps)
    return {int(s): float(f"{float(sched(_update_index(s, calls, k))):.7g}") for s in steps}


def default_lr_steps(config, task) -> list[int]:
    """Step 0, the first step after each network's warm-up and after each boundary of a step
    schedule (those up to total_steps), and total_steps."""
    from jattn.train.optim import schedule_boundaries

    total = int(config.total_steps)
    steps = {0, total}
    for net, calls in calls_per_step(task).items():
        block, where = optimizer_block(config, net)
        cfg = _complete(block)
        k = int(cfg.accumulate_steps)
        updates = [int(cfg.warmup_steps or 0)]
        if cfg.schedule in ("step", "multistep"):
            updates += schedule_boundaries(cfg, where=where)
        steps.update(-(-u * k // calls) for u in updates if u > 0)  # the first step at that update
    return sorted(s for s in steps if s <= total)


# --------------------------------------------------------------------------- data


def _spec(spec) -> str:
    """A source or mask block in a few words: its kind, then its set keys."""
    spec = _plain(spec)
    if spec is None:
        return "none"
    if not isinstance(spec, dict):
        return type(spec).__name__
    rest = ", ".join(f"{k} {v}" for k, v in spec.items() if k != "kind" and v is not None)
    return f"{spec.get('kind', '?')}" + (f" ({rest})" if rest else "")


def describe_data(config, task) -> dict:
    """The data pipeline of a run: {"source", "image_size" [h, w], "batch_size" (global,
    processes, per process, devices, per device), "loader", "fields", "masks", "scale",
    "images_per_step", "eval"} and "text": the same in lines."""
    import jax

    from jattn.data.examples import image_size_pair

    d = config.data
    h, w = image_size_pair(d.image_size)
    b = int(config.batch_size)
    processes, devices = jax.process_count(), jax.device_count()
    per_process = b // processes if b % processes == 0 else None
    per_device = b // devices if b % devices == 0 else None
    loader = str(d.loader)
    workers = int(d.worker_count or 0)
    loader_words = loader + ((f", {workers} worker processes" if workers else ", in the main process")
                             if loader == "grain" else "")
    if d.shuffle_buffer is not None:
        loader_words += f", shuffle buffer {d.shuffle_buffer}"
    images_per_step = b * len(task.updates)
    eval_batch = int(config.eval_batch_size or b)
    masks = _spec(d.mask) if "mask" in task.fields else None
    eval_masks = _spec(d.eval_mask or d.mask) if "mask" in task.fields else None
    eval_source = d.eval_source if d.eval_source is not None else d.source
    out = {
        "source": _spec(d.source),
        "image_size": [h, w],
        "batch_size": {"global": b, "processes": processes, "per_process": per_process, "devices": devices,
                       "per_device": per_device},
        "loader": loader,
        "fields": ["image", *task.fields],
        "masks": masks,
        "scale": d.scale,
        "images_per_step": images_per_step,
        "eval": {"source": _spec(eval_source) + ("" if d.eval_source is not None else " (the training source)"),
                 "images": int(config.eval_images), "batch_size": eval_batch, "masks": eval_masks,
                 "every": int(config.eval_every)},
    }
    platform = jax.devices()[0].platform.upper()
    split = (f"split evenly over the run's processes (each loads {b} / P) and devices (each computes {b} / D); "
             f"here {processes} process(es) and {devices} {platform} device(s): "
             + (f"{per_process}" if per_process is not None else "not divisible") + " per process, "
             + (f"{per_device}" if per_device is not None else "not divisible") + " per device")
    fields = ", ".join(out["fields"])
    augment = d.get("augment")
    if "boxes" in task.fields:  # detection: no crops (jattn.data.detection.preprocess)
        augment = {k: augment[k] for k in ("flip_lr", "flip_ud")} if augment is not None else None
        crops = ("each image resized to fit, aspect preserved, and padded bottom / right; flips in training; "
                 f"up to {d.max_boxes} boxes per image")
    else:
        crops = ("training crops as data.augment says" if augment is not None
                 else "random crops and left-right flips in training") + ", centre crops in evaluation"
    lines = [
        f"source: {out['source']}",
        f"image size: {h}x{w} (H x W): {crops}",
        f"batch: {b} global ({split}); {len(task.updates)} batch(es) per step, one per update: "
        f"{images_per_step} images per step",
        f"loader: {loader_words}",
        f"fields: {fields}" + (f" (lowres: the crop downscaled x{d.scale}, bicubic)" if "lowres" in task.fields
                               else ""),
    ]
    if augment is not None:
        out["augment"] = _plain(augment)
        lines.append("augmentation: " + ", ".join(f"{k} {v}" for k, v in out["augment"].items()))
    if masks is not None:
        lines.append(f"masks: {masks}")
    when = f"every {config.eval_every} steps" if config.eval_every else "not during training (eval_every 0)"
    lines.append(f"eval set: the first {config.eval_images} images of {out['eval']['source']}, batches of "
                 f"{eval_batch}" + (f", masks {eval_masks} (fixed seed)" if eval_masks is not None else "")
                 + f"; evaluated {when}")
    out["text"] = lines
    return out


# --------------------------------------------------------------------------- the report


def describe(config, lr_steps=None, *, flops: bool = True, config_name: str | None = None) -> dict:
    """The report of `jattn describe` for a loaded config. `lr_steps`: the training steps
    whose learning rates are given (None: :func:`default_lr_steps`); `flops` False: no
    compile. Returns {"config", "model", "batch_size", "total_steps", "compute_dtype",
    "updates_per_step", "parameters": {net: int}, "parameters_total", "largest_layers":
    {net: [...]}, "flops_per_example": {net: float} (the measured networks only),
    "flops_measured": a sentence saying what was measured, "optimizer": {net: str},
    "learning_rate": {net: {"<step>": float}}, "data": describe_data(...)}.
    A config that cannot make a task or a state is a DescribeError (one line)."""
    import jax

    from jattn.config import with_defaults
    from jattn.train.optim import make_optimizer
    from jattn.train.setup import abstract_train_state
    from jattn.train.task import build_task

    config = with_defaults(config)
    try:
        task = build_task(config)
        state = abstract_train_state(task, config, cpu_mesh())
    except (ValueError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DescribeError(f"cannot build this config's model: {first}") from None
    if lr_steps is None:
        lr_steps = default_lr_steps(config, task)
    calls = calls_per_step(task)
    nets = sorted(state.params, key=lambda n: (n != "generator", n))  # the deployed network first
    params = {net: parameter_count(state.params[net]) for net in nets}
    layers = {net: largest_layers(state.params[net]) for net in nets}

    optimizers, rates = {}, {}
    for net in nets:
        block, where = optimizer_block(config, net)
        tx_shape = jax.tree_util.tree_structure(state.opt_state[net])
        mine = make_optimizer(block, config.learning_rate, where=where)
        if jax.tree_util.tree_structure(jax.eval_shape(mine.init, state.params[net])) != tx_shape:
            optimizers[net] = f"the task's own optimizer (not the {where} block): not described"
            continue
        optimizers[net] = describe_optimizer(block, config, calls.get(net, 0), where=where)
        rates[net] = {str(s): lr for s, lr in learning_rate_at(block, config, lr_steps, calls.get(net, 0),
                                                               where=where).items()}

    flops_per_example: dict[str, float] = {}
    deployed = predicted_network(task, state.params)
    if not flops:
        measured = "not measured (--no-flops)"
    elif deployed is None:
        measured = "not measured: the task's predict runs no single network of the run"
    else:
        flops_per_example[deployed] = forward_flops(task, config, state, batch_size=1)
        others = [n for n in nets if n != deployed]
        measured = (f"{deployed}: task.predict, the inference forward"
                    f"{' with the inpainting composite' if 'mask' in task.fields else ''}, on 1 example; XLA's cost "
                    "analysis of the program compiled for the CPU")
        if others:
            measured += f"; {', '.join(others)}: not measured (the task runs it only inside its losses)"

    return {
        "config": config_name,
        "model": str(config.model.name),
        "batch_size": int(config.batch_size),
        "total_steps": int(config.total_steps),
        "compute_dtype": str(config.compute_dtype),
        "updates_per_step": [u.net for u in task.updates],
        "parameters": params,
        "parameters_total": sum(params.values()),
        "largest_layers": layers,
        "flops_per_example": flops_per_example,
        "flops_measured": measured,
        "optimizer": optimizers,
        "learning_rate": rates,
        "data": describe_data(config, task),
    }


def _millions(n: int) -> str:
    return f"{n:,} ({n / 1e6:.2f} M)"


def format_report(report: dict) -> str:
    """The report as readable text."""
    r = report
    calls: dict[str, int] = {}
    for net in r["updates_per_step"]:
        calls[net] = calls.get(net, 0) + 1
    order = ", then ".join(f"{n} {net} update{'s' if n != 1 else ''}" for net, n in calls.items())
    lines = [f"{r['config'] or 'config'}: model {r['model']}, compute_dtype {r['compute_dtype']}, "
             f"{r['total_steps']:,} training steps, each: {order}", "", "networks"]
    width = max(len(net) for net in r["parameters"])
    for net, n in r["parameters"].items():
        flops = r["flops_per_example"].get(net)
        fl = f"{flops / 1e9:.4g} GFLOP per example (forward)" if flops is not None else "forward FLOPs not measured"
        lines.append(f"  {net:<{width}}  {_millions(n)} parameters; {fl}")
        for layer in r["largest_layers"][net]:
            shapes = ", ".join(f"{k} {'x'.join(map(str, v)) or 'scalar'}" for k, v in layer["shapes"].items())
            lines.append(f"      {layer['parameters']:>12,}  {layer['layer']}: {shapes}")
    if len(r["parameters"]) > 1:
        lines.append(f"  {'total':<{width}}  {_millions(r['parameters_total'])} parameters")
    lines.append(f"  FLOPs: {r['flops_measured']}")
    lines += ["", "optimizers"]
    for net, text in r["optimizer"].items():
        lines.append(f"  {net}: {text}")
    if r["learning_rate"]:
        nets = list(r["learning_rate"])
        steps = list(next(iter(r["learning_rate"].values())))
        lines += ["", "learning rate at training step (steps from 0)"]
        col = max(12, *(len(n) for n in nets))
        lines.append(f"  {'step':>12}  " + "  ".join(f"{n:>{col}}" for n in nets))
        for s in steps:
            lines.append(f"  {int(s):>12,}  " + "  ".join(f"{r['learning_rate'][n][s]:>{col}.6g}" for n in nets))
    lines += ["", "data"]
    lines += [f"  {line}" for line in r["data"]["text"]]
    return "\n".join(lines)
