"""The `jattn` command line.

    jattn train     train (or resume) a model from a config file into a workdir
    jattn eval      metrics of a workdir's checkpoint on the fixed eval set
    jattn import-deepfill   an official DeepFill TF checkpoint as a jattn workdir
    jattn export    write a trained generator in a portable format
    jattn inpaint   fill the holes of images with a trained checkpoint
    jattn upscale   super-resolve images with a trained super-resolution checkpoint
    jattn detect    detect objects in images with a trained detection checkpoint (COCO results JSON)
    jattn demo      the main job on bundled data: a short training run, then an inpainted photo
    jattn devices   the JAX devices this process sees
    jattn compile   compile a run's training step for a TPU topology (or this machine): cost, memory, fit
    jattn describe  what a run will be: parameters, forward FLOPs, optimizers, learning rates, data
    jattn configs   the bundled configs, usable by name: `--config demo`

JAX and the models are imported inside each command, so `jattn --help` is instant. This
module is the only place that changes process settings, and only when it runs as the
program: the memory allocator and XLA:CPU flags (`process_settings`).
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main", "build_parser", "bundled_configs", "config_path", "version_string"]


class UserError(Exception):
    """An error in the user's input: printed as one line, exit status 2, no traceback."""


def bundled_configs_dir():
    """The folder of the configs that ship with jattn, or None.

    Installed, it is the package data folder `jattn/configs` (built from the source tree's
    top-level `configs/`, see pyproject.toml); running from a source tree, it is that
    `configs/` folder itself."""
    import importlib.resources
    import pathlib

    installed = importlib.resources.files("jattn").joinpath("configs")
    if isinstance(installed, pathlib.Path) and installed.is_dir():
        return installed
    tree = pathlib.Path(__file__).resolve().parents[1]
    if (tree / "pyproject.toml").is_file() and (tree / "configs").is_dir():
        return tree / "configs"
    return None


def bundled_configs() -> dict:
    """{name: path} of the bundled configs, sorted by name."""
    folder = bundled_configs_dir()
    if folder is None:
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.py")) if not p.name.startswith("_")}


def config_path(arg: str):
    """The config file `--config ARG` names: ARG itself when it is a file, else the bundled
    config of that name (`demo`, `deepfill_v1_places2`; `.py` may be added). UserError if
    neither."""
    import os
    import pathlib

    path = pathlib.Path(arg)
    if path.is_file():
        return path
    is_name = os.sep not in arg and "/" not in arg
    if is_name:
        bundled = bundled_configs().get(arg.removesuffix(".py"))
        if bundled is not None:
            return bundled
    hint = " and no bundled config has that name (`jattn configs` lists them)" if is_name else ""
    raise UserError(f"config file not found: {arg}{hint}")


def _load_config(args: argparse.Namespace):
    from jattn.config import ConfigError, load_config

    overrides = list(args.set or [])
    if getattr(args, "total_steps", None) is not None:
        overrides.append(f"total_steps={args.total_steps}")
    try:
        return load_config(config_path(str(args.config)), overrides)
    except ConfigError as err:
        raise UserError(str(err)) from None


def _docstring_summary(path) -> str:
    """The first line of a Python file's docstring ("" without one), read without running
    the file; "..." marks a sentence that goes on in the next line."""
    import ast

    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return ""
    lines = (doc or "").strip().splitlines()
    if not lines:
        return ""
    first = lines[0].strip()
    goes_on = len(lines) > 1 and lines[1].strip() and not first.endswith((".", ":", "!", "?"))
    return first + " ..." if goes_on else first


def _cmd_configs(args: argparse.Namespace) -> int:
    del args
    configs = bundled_configs()
    if not configs:
        raise UserError("no bundled configs found (is jattn installed completely?)")
    width = max(map(len, configs))
    for name, path in configs.items():
        print(f"{name:<{width}}  {_docstring_summary(path)}".rstrip())
    return 0


def _run_errors() -> tuple[type[Exception], ...]:
    """What a training or evaluation run raises for the user to fix: refused runs and configs
    that cannot make one, unreadable, corrupt or unsaved checkpoints, an unusable eval mask
    file, eval data that gives no image, eval metrics whose weight files are unusable, logs or
    files (config.json) that cannot be written."""
    from jattn._paths import WriteError
    from jattn.data.masks import EvalMaskError
    from jattn.train.checkpoint import CheckpointError
    from jattn.train.evaluate import EvalDataError, EvalMetricError
    from jattn.train.logging import LogWriteError
    from jattn.train.loop import TrainError

    return TrainError, CheckpointError, EvalMaskError, EvalDataError, EvalMetricError, LogWriteError, WriteError


def _strict_json(obj, **kwargs) -> str:
    """JSON of `obj` with NaN and infinities as null (the undefined metrics, e.g. COCO's AP of
    an object size the eval set has none of): strict parsers (jq, JavaScript) read it."""
    import math

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), allow_nan=False, **kwargs)


def _one_line(err: BaseException) -> UserError:
    return UserError((str(err).strip().splitlines() or [type(err).__name__])[0])


def _cmd_train(args: argparse.Namespace) -> int:
    config = _load_config(args)
    from jattn.train.distributed import initialize

    try:
        initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed == "auto")
    except ValueError as err:
        raise UserError(str(err)) from None
    from jattn.train.loop import NonFiniteLossError, train

    try:
        result = train(config, args.workdir, progress=not args.no_progress,
                       allow_config_change=args.allow_config_change)
    except _run_errors() as err:
        raise _one_line(err) from None
    except NonFiniteLossError as err:
        print(f"jattn train: stopped: {err}", file=sys.stderr)
        return 1
    print(_strict_json({"workdir": str(args.workdir), **result}))
    return 0


def _checkpoint_steps(workdir) -> list[int]:
    """The checkpoint steps of a workdir, read from its folders (nothing is created); a
    missing workdir or one without checkpoints is a UserError."""
    import pathlib

    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"{workdir}: a file, not a workdir")
    if not workdir.is_dir():
        raise UserError(f"{workdir}: no such workdir")
    folder = workdir / "checkpoints"
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
    if not steps:
        raise UserError(f"{workdir}: no checkpoints in this workdir (nothing in {folder})")
    return steps


def _saved_config(args: argparse.Namespace, step: int):
    """The config saved with checkpoint `step` of `args.workdir`, completed with the schema's
    defaults, with `args.set` applied."""
    import pathlib

    import ml_collections

    from jattn.config import ConfigError, apply_overrides, with_defaults
    from jattn.train.checkpoint import Checkpointer

    ckpt = Checkpointer(pathlib.Path(args.workdir) / "checkpoints")
    try:
        saved = ckpt.restore_config(step)
    except Exception as err:  # noqa: BLE001 - an unreadable checkpoint is the user's to fix
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{args.workdir}: cannot read the config saved with checkpoint {step} ({first})") from None
    finally:
        ckpt.close()
    if not saved:
        raise UserError(f"{args.workdir}: checkpoint {step} has no saved config; pass --config")
    try:
        config = apply_overrides(with_defaults(ml_collections.ConfigDict(saved)), args.set or [])
    except ConfigError as err:
        raise UserError(str(err)) from None
    if config.eval_batch_size is None:
        config.eval_batch_size = config.batch_size
    return config


def _cmd_eval(args: argparse.Namespace) -> int:
    import pathlib

    steps = _checkpoint_steps(args.workdir)
    if args.step is not None and args.step not in steps:
        raise UserError(f"{args.workdir}: no checkpoint for step {args.step} (have {', '.join(map(str, steps))})")
    config = _load_config(args) if args.config else _saved_config(args, steps[-1] if args.step is None else args.step)
    from jattn._paths import check_writable, write_atomic
    from jattn.train.evaluate import SaveOutputsError, check_eval_data, check_eval_metrics, check_save_outputs, evaluate
    from jattn.train.setup import restore_for_eval

    workdir = pathlib.Path(args.workdir)
    try:
        # what can be checked before the checkpoint is read: the result's file, the eval data, the outputs' folder
        check_writable(workdir / f"eval_{steps[-1] if args.step is None else args.step}.json")
        check_eval_data(config)
        check_eval_metrics(config)
        if args.save_outputs is not None:
            check_save_outputs(args.save_outputs)
        task, state, mesh, step = restore_for_eval(config, workdir, args.step)
        result = {"step": step, **evaluate(task, state, config, mesh, workdir, save_outputs=args.save_outputs)}
        write_atomic(workdir / f"eval_{step}.json", _strict_json(result, indent=2))
    except (FileNotFoundError, SaveOutputsError, *_run_errors()) as err:
        raise _one_line(err) from None
    print(_strict_json(result))
    return 0


def _inpaint_pairs(image: str, mask: str, output: str):
    """[(image, mask, output)] for a file or a folder of images (paired with masks by name)."""
    import pathlib

    from jattn.data.sources import IMAGE_EXTENSIONS

    img, msk, out = pathlib.Path(image), pathlib.Path(mask), pathlib.Path(output)
    if not img.is_dir():
        return [(img, msk, out)]
    if not msk.is_dir():
        raise UserError(f"{msk}: with a folder of images, --mask must be a folder of masks")
    masks = {p.stem: p for p in msk.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    if not masks:
        raise UserError(f"{msk}: no mask images in this folder")
    images = sorted(p for p in img.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise UserError(f"{img}: no images in this folder")
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        raise UserError(f"{msk}: no mask for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    return [(p, masks[p.stem], out / (p.stem + ".png")) for p in images]


def _run_inference(args: argparse.Namespace, pairs: list, load, process, desc: str) -> tuple[object, list]:
    """Shared by inpaint / upscale: the optional --config, the model from --checkpoint
    (`load(path, config)`), a progress bar for several files, `process(model, pairs,
    progress)`; inference errors become one-line user errors. Returns (model, written)."""
    from jattn.export.inference import InferenceError

    bar = None
    try:
        config = _load_config(argparse.Namespace(config=args.config, set=None, total_steps=None)) if args.config else None
        model = load(args.checkpoint, config)
        if len(pairs) > 1:
            from tqdm import tqdm

            bar = tqdm(total=len(pairs), desc=desc, unit="image")
        written = process(model, pairs, bar.update if bar is not None else None)
    except InferenceError as err:
        raise UserError(str(err)) from None
    finally:
        if bar is not None:
            bar.close()
    return model, written


def _cmd_inpaint(args: argparse.Namespace) -> int:
    from jattn.export.inference import InpaintError, Inpainter, check_inpaint_files, inpaint_files

    try:
        pairs = _inpaint_pairs(args.image, args.mask, args.output)
        check_inpaint_files(pairs, save_flow=args.save_flow, batch_size=args.batch_size)  # before the model loads
    except InpaintError as err:
        raise UserError(str(err)) from None
    def load(path, config):
        return Inpainter.from_checkpoint(path, config, max_memory=args.max_memory)

    _, written = _run_inference(
        args, pairs, load,
        lambda m, p, progress: inpaint_files(m, p, save_flow=args.save_flow, batch_size=args.batch_size, progress=progress),
        "inpaint")
    print(json.dumps({"written": [str(o) for o in written]}))
    return 0


def _input_images(image: str) -> list:
    """The image files `--image` names: the file itself, or a folder's images (sorted)."""
    import pathlib

    from jattn.data.sources import IMAGE_EXTENSIONS

    img = pathlib.Path(image)
    if not img.exists():
        raise UserError(f"{img}: image not found")
    if img.is_file():
        return [img]
    images = sorted(p for p in img.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise UserError(f"{img}: no images in this folder")
    return images


def _upscale_pairs(image: str, output: str) -> list[tuple]:
    import pathlib

    out = pathlib.Path(output)
    images = _input_images(image)
    if images == [pathlib.Path(image)]:
        return [(images[0], out)]
    return [(p, out / (p.stem + ".png")) for p in images]


def _cmd_upscale(args: argparse.Namespace) -> int:
    from jattn.export.inference import check_outputs
    from jattn.export.upscale import UpscaleError, Upscaler, upscale_files

    pairs = _upscale_pairs(args.image, args.output)
    try:
        check_outputs([out for _, out in pairs], UpscaleError)  # before the model loads
    except UpscaleError as err:
        raise UserError(str(err)) from None
    upscaler, written = _run_inference(
        args, pairs, Upscaler.from_checkpoint,
        lambda m, p, progress: upscale_files(m, p, tile=args.tile, overlap=args.overlap, progress=progress),
        "upscale")
    print(json.dumps({"written": [str(o) for o in written], "scale": upscaler.scale}))
    return 0


def _cmd_detect(args: argparse.Namespace) -> int:
    from jattn.export.detect import DetectError, Detector, check_detect_files, detect_files

    images = _input_images(args.image)
    options = {"score_threshold": args.score_threshold, "draw_threshold": args.draw_threshold,
               "batch_size": args.batch_size}
    try:
        check_detect_files(images, args.output, args.draw, **options)  # before the model loads
    except DetectError as err:
        raise UserError(str(err)) from None
    _, result = _run_inference(
        args, images, Detector.from_checkpoint,
        lambda m, paths, progress: detect_files(m, paths, args.output, args.draw, progress=progress, **options),
        "detect")
    print(json.dumps(result))
    return 0


def _cmd_import_deepfill(args: argparse.Namespace) -> int:
    config = _load_config(argparse.Namespace(config=args.config or f"deepfill_{args.version}_base", set=args.set,
                                             total_steps=None))
    from jattn.export.deepfill_import import import_official_checkpoint

    try:
        result = import_official_checkpoint(args.checkpoint, args.output, config, version=args.version)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise UserError(str(err).splitlines()[0]) from None
    print(json.dumps(result))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from jattn.export import formats

    exporter = {"safetensors": formats.export_safetensors, "jax-export": formats.export_jax,
                "saved_model": formats.export_saved_model, "onnx": formats.export_onnx}[args.format]
    kwargs = {} if args.batch_size is None else {"batch_size": args.batch_size}
    if kwargs and args.format not in ("saved_model", "onnx"):
        raise UserError(f"--batch-size applies to saved_model and onnx exports, not {args.format}")
    if args.spatial is not None:
        if args.format != "jax-export":
            raise UserError(f"--spatial applies to jax-export, not {args.format}")
        kwargs["spatial"] = args.spatial
    if args.weights is not None:
        if args.format != "safetensors":
            raise UserError(f"--weights applies to safetensors exports, not {args.format}")
        kwargs["weights"] = args.weights
    try:
        metadata = exporter(args.workdir, args.output, step=args.step, **kwargs)
    except (formats.ExportError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    print(json.dumps({"written": str(args.output), **metadata}))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.attention_only:
        from jattn.demo import run_demo

        result = run_demo(args.output, photo=args.photo, size=args.size, block_size=args.block_size)
        print(json.dumps(result))
        return 0
    from jattn.config import ConfigError
    from jattn.demo import run_main_demo
    from jattn.export.inference import InferenceError

    try:
        result = run_main_demo(args.workdir, args.output, config_path=config_path(args.config or "demo"),
                               overrides=args.set or [], photo=args.photo)
    except (ConfigError, FileNotFoundError, InferenceError, *_run_errors()) as err:
        raise _one_line(err) from None
    print(json.dumps(result))
    return 0


def _cmd_devices(args: argparse.Namespace) -> int:
    del args
    import jax

    info = {
        "backend": jax.default_backend(),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": [str(d) for d in jax.local_devices()],
        "device_count": jax.device_count(),
    }
    print(json.dumps(info))
    return 0


def _aot_platforms(environ=None, jax_imported: bool | None = None, tpu_chips: int | None = None) -> None:
    """Process settings of `jattn compile` for a TPU topology, which compiles with libtpu and
    must open no TPU:
    - JAX runs on the CPU (JAX_PLATFORMS=cpu) unless the user chose platforms. JAX reads
      the variable when it is imported; if it already is (jattn called from Python), its
      `jax_platforms` setting is changed instead while no backend has started, and once one
      has, the running backends are kept (compiling for a topology needs none of them).
    - On a machine with no TPU chip (`tpu_chips`: those on its PCI bus), libtpu may load in
      several processes at once (ALLOW_MULTIPLE_LIBTPU_LOAD=1): its lock file guards the
      chips, and there are none to guard. On a TPU VM the lock stays."""
    import os

    environ = os.environ if environ is None else environ
    if not (("jax" in sys.modules) if jax_imported is None else jax_imported):
        environ.setdefault("JAX_PLATFORMS", "cpu")
    else:
        import jax
        from jax._src import xla_bridge

        if not jax.config.jax_platforms and not xla_bridge.backends_are_initialized():
            jax.config.update("jax_platforms", "cpu")
    if tpu_chips is None:
        try:
            from jax._src.hardware_utils import num_available_tpu_chips_and_device_id

            tpu_chips = num_available_tpu_chips_and_device_id()[0]
        except (ImportError, OSError):
            tpu_chips = 1  # unknown: keep libtpu's lock
    if tpu_chips == 0:
        environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _cmd_compile(args: argparse.Namespace) -> int:
    import os
    import pathlib

    if args.topology != "local":
        _aot_platforms()
    if args.batch_size is not None and args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, not {args.batch_size}")
    batch = [] if args.batch_size is None else [f"batch_size={args.batch_size}"]
    config = _load_config(argparse.Namespace(config=args.config, set=[*(args.set or []), *batch], total_steps=None))
    from jattn.train import aot

    try:
        devices = aot.topology_devices(args.topology)
        if args.require_fit and aot.chip_figures(devices[0].device_kind) is None:
            raise UserError(f"--require-fit: no HBM figure for chip {devices[0].device_kind!r} "
                            "(jattn.train.aot.CHIPS), so the fit cannot be checked")
        result = aot.compile_run(config, devices, args.topology)
    except aot.CompileError as err:
        raise UserError(str(err)) from None
    print(aot.format_report(result))
    if args.json:
        out = pathlib.Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result.report, indent=2) + "\n")
        os.replace(tmp, out)
    step = result.report["step"]
    if step["fits"] is False:
        if step["hbm_gib_per_chip"] is not None:
            need = f"the step needs {step['hbm_gib_per_chip']:.2f} GiB of HBM per chip"
        else:  # the compiler could not lay the step out at all: its arguments are a lower bound
            args_gib = max(p["hbm_gib_per_chip"]["arguments"] for p in result.report["programs"] if p["runs_per_step"])
            need = (f"the step needs more HBM per chip than the compiler can lay out (its arguments alone take "
                    f"{args_gib:.2f} GiB)")
        print(f"jattn compile: DOES NOT FIT: {need}, which one {result.report['chip']} does not have "
              f"({args.topology}, global batch {result.report['global_batch']})", file=sys.stderr)
        return 1 if args.require_fit else 0
    return 0


def _lr_steps(values: list[str] | None) -> list[int] | None:
    """`--lr-at` as whole numbers of steps >= 0 (None: not given); a UserError otherwise."""
    if values is None:
        return None
    if not values:
        raise UserError("--lr-at: give one or more training steps, e.g. --lr-at 0 1000 200000")
    steps = []
    for text in values:
        try:
            number = float(text.replace("_", ""))
        except ValueError:
            number = float("nan")
        if not (number >= 0 and number.is_integer()):
            raise UserError(f"--lr-at: expected whole numbers of training steps >= 0, got {text!r}")
        steps.append(int(number))
    return sorted(set(steps))


def _cmd_describe(args: argparse.Namespace) -> int:
    import pathlib

    steps = _lr_steps(args.lr_at)
    from jattn._paths import WriteError, check_writable, write_atomic

    if args.json:
        try:
            check_writable(args.json)  # before the config is loaded and anything compiled
        except WriteError as err:
            raise UserError(str(err)) from None
    if "jax" not in sys.modules:  # nothing runs and one CPU program compiles: leave GPUs / TPUs to training runs
        import os

        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    config = _load_config(args)
    from jattn.config import ConfigError
    from jattn.describe import DescribeError, describe, format_report

    try:
        report = describe(config, steps, flops=not args.no_flops, config_name=str(args.config))
    except (DescribeError, ConfigError) as err:
        raise _one_line(err) from None
    print(format_report(report))
    if args.json:
        out = pathlib.Path(args.json)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(out, json.dumps(report, indent=2) + "\n")
        except OSError as err:
            raise UserError(f"cannot write {out}: {err.strerror or err}") from None
        except WriteError as err:
            raise UserError(str(err)) from None
    return 0


def version_string() -> str:
    """`jattn <version> (jax <version>, jaxlib <version>)`, from the installed distributions'
    metadata (nothing is imported); jattn's own `__version__` when it is not installed."""
    import importlib.metadata

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    if (jattn_version := version("jattn")) is None:
        from jattn import __version__ as jattn_version
    others = ", ".join(f"{dist} {v}" for dist in ("jax", "jaxlib") if (v := version(dist)) is not None)
    return f"jattn {jattn_version}" + (f" ({others})" if others else "")


class _VersionAction(argparse.Action):
    """`--version`: print `version_string()` and exit (looked up only when asked)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_string())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jattn", description="Attention-based image models in JAX/Flax.")
    parser.add_argument("--version", action=_VersionAction, help="print the versions of jattn, jax and jaxlib, and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train (or resume) a model from a config file into a workdir",
        description="Config values can be overridden with --config.KEY=VALUE or --set KEY=VALUE.",
    )
    train.add_argument("--config", required=True, help="a config file, or the name of a bundled config (`jattn configs` lists them)")
    train.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and TensorBoard logs go here")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    train.add_argument("--total-steps", type=int, dest="total_steps", help="shortcut for --set total_steps=N")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--allow-config-change", action="store_true",
                       help="resume even though the config changes what is computed (batch size, seed, data, model, "
                            "...); without it such a resume is refused, naming the keys")
    train.add_argument("--coordinator", help="multi-process: HOST:PORT of process 0 (or $JATTN_COORDINATOR)")
    train.add_argument("--num-processes", type=int, help="multi-process: number of processes")
    train.add_argument("--process-id", type=int, help="multi-process: this process's id")
    train.add_argument("--distributed", choices=["off", "auto"], default="off",
                       help="auto: let jax.distributed detect the cluster (TPU pod, SLURM)")
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="metrics of a workdir's checkpoint on the fixed eval set")
    ev.add_argument("--config", default=None,
                    help="a config file or bundled config name (default: the config saved with the checkpoint)")
    ev.add_argument("--workdir", required=True, help="the training workdir whose checkpoint is evaluated")
    ev.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    ev.add_argument("--save-outputs", default=None, metavar="DIR",
                    help="also write every evaluated example as PNG files into DIR (a new or empty folder): "
                         "NNNN_output.png, NNNN_target.png and, for inpainting, NNNN_mask.png")
    ev.set_defaults(func=_cmd_eval)

    inp = sub.add_parser("inpaint", help="fill the holes of images with a trained checkpoint")
    inp.add_argument("--checkpoint", required=True,
                     help="a training workdir (latest checkpoint), WORKDIR/checkpoints/STEP, or a jax-export file")
    inp.add_argument("--image", required=True, help="an image file, or a folder of images")
    inp.add_argument("--mask", required=True, help="a mask image (white = hole, same size), or a folder paired by name")
    inp.add_argument("--output", required=True, help="output image file, or folder in folder mode")
    inp.add_argument("--save-flow", action="store_true", help="also write the attention flow picture (<output>_flow)")
    inp.add_argument("--batch-size", type=int, default=8, help="folder mode: images of one size per model call")
    inp.add_argument("--max-memory", default=None, metavar="SIZE",
                     help="memory one model call may use, in bytes or e.g. 8GB (default: from the machine's memory); "
                          "contextual attention runs in blocks where it would not fit whole")
    inp.add_argument("--config", default=None,
                     help="a config file or bundled config name to use instead of the one saved with the checkpoint")
    inp.set_defaults(func=_cmd_inpaint)

    up = sub.add_parser("upscale", help="super-resolve images with a trained super-resolution checkpoint")
    up.add_argument("--checkpoint", required=True, help="a training workdir (latest checkpoint) or WORKDIR/checkpoints/STEP")
    up.add_argument("--image", required=True, help="an image file, or a folder of images")
    up.add_argument("--output", required=True, help="output image file, or folder in folder mode")
    up.add_argument("--tile", type=int, default=None, help="process in tiles of this many low-res pixels (bounds memory)")
    up.add_argument("--overlap", type=int, default=8, help="context pixels around each tile (default 8)")
    up.add_argument("--config", default=None,
                    help="a config file or bundled config name to use instead of the one saved with the checkpoint")
    up.set_defaults(func=_cmd_upscale)

    det = sub.add_parser("detect", help="detect objects in images with a trained detection checkpoint")
    det.add_argument("--checkpoint", required=True, help="a training workdir (latest checkpoint) or WORKDIR/checkpoints/STEP")
    det.add_argument("--image", required=True, help="an image file, or a folder of images")
    det.add_argument("--output", required=True, help="the COCO results file to write (.json)")
    det.add_argument("--draw", default=None, metavar="DIR",
                     help="also write each image with its detections drawn, as DIR/<name>.png")
    det.add_argument("--score-threshold", type=float, default=0.05,
                     help="keep the detections scoring at least this (default 0.05, COCO evaluation's)")
    det.add_argument("--draw-threshold", type=float, default=0.5,
                     help="--draw: draw the detections scoring at least this too (default 0.5)")
    det.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    det.add_argument("--config", default=None,
                     help="a config file or bundled config name to use instead of the one saved with the checkpoint")
    det.set_defaults(func=_cmd_detect)

    imp = sub.add_parser("import-deepfill", help="an official DeepFill TF checkpoint as a jattn workdir")
    imp.add_argument("--checkpoint", required=True, help="TF checkpoint prefix (.../snap-0) or its folder")
    imp.add_argument("--version", default="v1", choices=["v1", "v2"], help="DeepFill version of the checkpoint (default v1)")
    imp.add_argument("--output", required=True, help="new workdir to write (checkpoint 0)")
    imp.add_argument("--config", default=None,
                     help="config file or bundled config name to store with it (default: deepfill_<version>_base)")
    imp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    imp.set_defaults(func=_cmd_import_deepfill)

    exp = sub.add_parser("export", help="write a trained generator in a portable format")
    exp.add_argument("--workdir", required=True, help="the training workdir whose checkpoint is exported")
    exp.add_argument("--format", required=True, choices=["safetensors", "jax-export", "saved_model", "onnx"],
                     help="export format (see docs/export.md)")
    exp.add_argument("--output", required=True, help="output file (a folder for saved_model)")
    exp.add_argument("--batch-size", type=int, default=None,
                     help="saved_model / onnx: a fixed batch size (default: any for saved_model, 1 for onnx)")
    exp.add_argument("--spatial", choices=["any", "fixed"], default=None,
                     help="jax-export: H, W any multiples of 8 (default) or fixed to the config's image size")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    exp.add_argument("--weights", choices=["ema", "trained"], default=None,
                     help="safetensors: the EMA weights (the default where the run keeps them, as SAGAN samples "
                          "from them) or the trained ones")
    exp.set_defaults(func=_cmd_export)

    demo = sub.add_parser("demo", help="the main job on bundled data: train DeepFill v1 briefly, then inpaint a photo")
    demo.add_argument("--workdir", default="workdirs/demo", help="training workdir (default: workdirs/demo; resumed if present)")
    demo.add_argument("--output", default="demo_out", help="folder for the PNGs (default: demo_out)")
    demo.add_argument("--config", default=None, help="a config file or bundled config name (default: demo)")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    demo.add_argument("--photo", default="astronaut", help="a scikit-image bundled photo (default: astronaut)")
    demo.add_argument("--attention-only", action="store_true",
                      help="no training: contextual attention alone fills the hole after a diffusion coarse fill")
    demo.add_argument("--size", type=int, default=256, help="with --attention-only: photo size (default 256)")
    demo.add_argument("--block-size", type=int, default=None, help="with --attention-only: blocked attention")
    demo.set_defaults(func=_cmd_demo)

    comp = sub.add_parser(
        "compile",
        help="compile a run's training step for a TPU topology (or this machine): cost, memory, fit",
        description="Ahead-of-time compilation of the training step (and the inference function of inpainting "
                    "models) for a TPU topology described, not attached (needs libtpu: pip install 'jattn[tpu]'), "
                    "or for this process's devices. Prints FLOPs, HBM traffic, memory and collectives per chip, "
                    "whether the step fits the chip's HBM and a roofline time estimate. Config values can be "
                    "overridden with --config.KEY=VALUE or --set KEY=VALUE.",
    )
    comp.add_argument("--config", required=True, help="a config file, or the name of a bundled config (`jattn configs` lists them)")
    comp.add_argument("--topology", required=True,
                      help="a TPU topology NAME:AxB[xC] (v5e:2x2, v5e:4x4, v5p:4x4x8, v4:2x2x1, v6e:16x16, ...) "
                           "or 'local' (this process's devices)")
    comp.add_argument("--batch-size", type=int, default=None, dest="batch_size",
                      help="global batch (default: the config's batch_size); must divide by the chip count")
    comp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    comp.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON to FILE")
    comp.add_argument("--require-fit", action="store_true", dest="require_fit",
                      help="exit with status 1 when the step does not fit the chip's HBM")
    comp.set_defaults(func=_cmd_compile)

    desc = sub.add_parser(
        "describe",
        help="what a run will be: parameters, forward FLOPs, optimizers, learning rates, data",
        description="What a config's run will be, without training and without allocating its weights: per "
                    "network the parameter count and largest layers (jax.eval_shape), the FLOPs per example of "
                    "the inference forward (XLA's cost analysis of task.predict compiled for the CPU), each "
                    "optimizer in words, the learning rate at given steps, the data pipeline. Config values can "
                    "be overridden with --config.KEY=VALUE or --set KEY=VALUE.",
    )
    desc.add_argument("--config", required=True, help="a config file, or the name of a bundled config (`jattn configs` lists them)")
    desc.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    desc.add_argument("--lr-at", nargs="*", default=None, metavar="STEP", dest="lr_at",
                      help="training steps (from 0) whose learning rates are shown (default: 0, the ends of the "
                           "warm-ups, the schedule's boundaries and total_steps)")
    desc.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON to FILE")
    desc.add_argument("--no-flops", action="store_true", dest="no_flops",
                      help="skip the forward's compile (FLOPs not measured; parameter counts need none)")
    desc.set_defaults(func=_cmd_describe)

    devices = sub.add_parser("devices", help="print the JAX devices this process sees")
    devices.set_defaults(func=_cmd_devices)

    configs = sub.add_parser("configs", help="list the bundled configs (names for --config) with their summaries")
    configs.set_defaults(func=_cmd_configs)
    return parser


def _config_flags(extra: list[str]) -> tuple[list[str], list[str]]:
    """Split `--config.KEY=VALUE` / `--config.KEY VALUE` overrides from other leftovers."""
    overrides, rest = [], []
    i = 0
    while i < len(extra):
        arg = extra[i]
        if arg.startswith("--config.") and "=" in arg:
            overrides.append(arg[len("--config."):])
        elif arg.startswith("--config.") and i + 1 < len(extra):
            overrides.append(f"{arg[len('--config.'):]}={extra[i + 1]}")
            i += 1
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


#: Commands that run no JAX computation: no process settings for them.
_PLAIN_COMMANDS = ("configs",)
#: Commands that compile but execute no XLA program: XLA flags, but the allocator as it is
#: (keeping freed memory for reuse would only raise a large compile's peak memory).
_COMPILE_ONLY = ("compile",)


def process_settings(allocator: bool = True) -> None:
    """The `jattn` command's process settings, made before anything is computed and only
    when it runs as a program (importing jattn changes nothing):
    - with `allocator`, re-execute under tcmalloc where the machine has it, else under tuned
      glibc malloc (`jattn/_alloc.py`; `JATTN_MALLOC=0` off); raises FileNotFoundError for
      a bad `JATTN_MALLOC` path;
    - add jattn's XLA:CPU flags to `XLA_FLAGS` (`jattn/_xla.py`; `JATTN_XLA_DEFAULTS=0` off).
    Each says so in one line on stderr when it applies."""
    from jattn._alloc import reexec_with_allocator
    from jattn._xla import apply_cpu_defaults

    if allocator:
        reexec_with_allocator(announce=True)
    added = apply_cpu_defaults()
    if added:
        print(f"jattn: XLA_FLAGS += {' '.join(added)} (jattn/_xla.py); JATTN_XLA_DEFAULTS=0 turns this off",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """The `jattn` command. With `argv` None it runs as the program (arguments from
    `sys.argv`) and makes its process settings (`process_settings`); called from Python with
    a list, it makes none."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides, rest = _config_flags(extra)
    if rest or (overrides and not hasattr(args, "set")):
        parser.error(f"unrecognized arguments: {' '.join(rest or extra)}")
    if overrides:
        args.set = list(args.set or []) + overrides
    if argv is None and args.command not in _PLAIN_COMMANDS:
        try:
            process_settings(allocator=args.command not in _COMPILE_ONLY)
        except FileNotFoundError as err:
            print(f"jattn: error: {err}", file=sys.stderr)
            return 2
    from jattn import MissingExtraError

    try:
        return args.func(args)
    except (UserError, MissingExtraError) as err:
        print(f"jattn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
