"""jattn's CPU convolution kernels on and off, side by side in one process (not a test).

`JATTN_CPU_KERNELS` (`jattn.ops.cpu_kernels_enabled`) is read when a convolution is
traced: each variant below is traced and compiled ahead of time (`.lower().compile()`,
JAX's caches cleared first) with it set to 1 ("on") or 0 ("off", every convolution plain
XLA), and the compiled programs are then timed in turns (on, off, on, off, ...), so that a
busy machine slows both alike. Reported: the median.

* `step`: a whole training step of `configs/demo.py` (DeepFill v1, 64x64, cnum 16,
  batch 8: 5 critic updates and one generator update as one program, as `jattn train`
  runs it), in steps/s; `--set` changes the config.
* `layers`: DeepFill v1's layers at its paper size (256x256, cnum 32, batch `--batch`),
  one of each convolution path of `jattn.ops.conv.conv2d`: value and gradients of
  `sum(layer(x) * g)` with respect to the input and the parameters, in ms; the critic's
  layers also with the WGAN-GP penalty's second derivative (`gp`).

    python benchmarks/cpu_kernels.py [--what step layers] [--steps 5] [--repeats 5] [--batch 4] [--set KEY=VALUE ...]

e.g. the step at 128x128 with the paper's widths (Winograd and space-to-depth layers):
`--what step --set model.cnum=32 model.critic_cnum=64 model.local_size=64 data.image_size=128
data.source.crop_size=128 "data.mask.hole_size=[64,64]" batch_size=4`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jattn._xla import apply_cpu_defaults

apply_cpu_defaults()  # the `jattn` command's XLA:CPU flags (jattn/_xla.py), before JAX starts a backend

REPO = pathlib.Path(__file__).resolve().parents[1]
MODES = ("on", "off")


@contextlib.contextmanager
def _kernels(mode: str):
    """JATTN_CPU_KERNELS set for `mode` while a variant is traced, JAX's caches cleared
    (their keys do not hold it)."""
    old = os.environ.get("JATTN_CPU_KERNELS")
    os.environ["JATTN_CPU_KERNELS"] = "1" if mode == "on" else "0"
    jax.clear_caches()
    try:
        yield
    finally:
        if old is None:
            del os.environ["JATTN_CPU_KERNELS"]
        else:
            os.environ["JATTN_CPU_KERNELS"] = old
        jax.clear_caches()


def _interleaved(runs: dict, repeats: int) -> dict:
    """{mode: median seconds of runs[mode]()}, the modes timed in turns."""
    times = {mode: [] for mode in runs}
    for _ in range(repeats):
        for mode, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[mode].append(time.perf_counter() - t0)
    return {mode: statistics.median(t) for mode, t in times.items()}


# --------------------------------------------------------------------------- training step


def step(steps: int, repeats: int, overrides=()) -> dict:
    """{mode: steps/s} of `configs/demo.py`'s training step (with `overrides`, as
    `jattn train --set`)."""
    from jattn.config import load_config
    from jattn.train.input import stack_batches
    from jattn.train.loop import make_train_data
    from jattn.train.setup import state_init_fn
    from jattn.train.sharding import make_mesh, replicated, to_global_array
    from jattn.train.steps import make_train_step
    from jattn.train.task import build_task

    config = load_config(str(REPO / "configs" / "demo.py"), list(overrides))
    mesh = make_mesh()
    task = build_task(config)
    data = make_train_data(config, fields=task.fields)
    host = [stack_batches([next(data) for _ in task.updates]) for _ in range(steps)]
    init = jax.jit(state_init_fn(task, config), out_shardings=replicated(mesh))
    runs, compile_s = {}, {}
    with jax.set_mesh(mesh):
        batches = [to_global_array(b, mesh, stacked=True) for b in host]
        for mode in MODES:
            state = init(jax.random.key(0))
            with _kernels(mode):
                t0 = time.perf_counter()
                compiled = make_train_step(task.updates, mesh).lower(state, batches[0]).compile()
                compile_s[mode] = time.perf_counter() - t0
            box = [state]

            def run(compiled=compiled, box=box):
                for b in batches:
                    box[0], metrics = compiled(box[0], b)
                jax.block_until_ready(metrics)

            run()  # warm-up
            runs[mode] = run
        seconds = _interleaved(runs, repeats)
    return {mode: {"steps_per_s": steps / seconds[mode], "compile_s": compile_s[mode]} for mode in MODES}


# --------------------------------------------------------------------------- layers


def _layer_cases(batch: int):
    """(name, module, input shape, differentiate twice) of DeepFill v1 at 256x256, cnum 32."""
    from jattn.models.deepfill import DisConv
    from jattn.nn.conv import GenConv, GenDeconv

    b = batch
    return [
        ("conv1 5x5 5->32 @256 (few inputs)", GenConv(32, 5), (b, 256, 256, 5), False),
        ("conv2 3x3/2 32->64 @256 (strided)", GenConv(64, 3, 2), (b, 256, 256, 32), False),
        ("conv3 3x3 64->64 @128 (Winograd)", GenConv(64, 3), (b, 128, 128, 64), False),
        ("conv7 3x3 r2 128->128 @64 (Winograd)", GenConv(128, 3, rate=2), (b, 64, 64, 128), False),
        ("conv13 up 3x3 128->64 @64 (upsample)", GenDeconv(64), (b, 64, 64, 128), False),
        ("conv16 3x3 32->16 @256 (plain)", GenConv(16, 3), (b, 256, 256, 32), False),
        ("conv17 3x3 16->3 @256 (few outputs)", GenConv(3, 3, activation=None), (b, 256, 256, 16), False),
        ("critic1 5x5/2 3->64 @256 (strided)", DisConv(64), (2 * b, 256, 256, 3), True),
        ("critic2 5x5/2 64->128 @128 (s2d Winograd)", DisConv(128), (2 * b, 128, 128, 64), True),
    ]


def _layer_fns(module, shape, second_order: bool):
    """{name: (fn, args)} for one layer: `grad` (value and first gradients) and, for a
    critic layer, `gp` (the WGAN-GP penalty's gradient: a second derivative). Every array
    is an argument (XLA would fold computations on constants)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)
    params = module.init(jax.random.key(0), x)["params"]
    y = module.apply({"params": params}, x)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)

    def loss(p, x, g):
        return jnp.vdot(module.apply({"params": p}, x), g)

    fns = {"grad": (jax.value_and_grad(loss, (0, 1)), (params, x, g))}
    if second_order:
        def gp(p, x):
            d = jax.grad(lambda x_: jnp.sum(jnp.sin(module.apply({"params": p}, x_))))(x)
            return jnp.mean((jnp.sqrt(jnp.sum(d**2, axis=(1, 2, 3))) - 1.0) ** 2)

        fns["gp"] = (jax.grad(gp), (params, x))
    return fns


def layers(batch: int, repeats: int) -> list[tuple[str, str, dict]]:
    """[(layer, what, {mode: ms})] of each layer path, on and off."""
    rows = []
    for name, module, shape, second_order in _layer_cases(batch):
        for what, (fn, args) in _layer_fns(module, shape, second_order).items():
            runs = {}
            for mode in MODES:
                with _kernels(mode):
                    compiled = jax.jit(fn).lower(*args).compile()
                jax.block_until_ready(compiled(*args))
                runs[mode] = lambda compiled=compiled: jax.block_until_ready(compiled(*args))
            seconds = _interleaved(runs, repeats)
            rows.append((name, what, {mode: 1e3 * s for mode, s in seconds.items()}))
            print(f"{name:<44} {what:<5} " + "  ".join(f"{m} {1e3 * seconds[m]:8.1f} ms" for m in MODES), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", nargs="*", default=["step", "layers"], choices=["step", "layers"])
    parser.add_argument("--steps", type=int, default=5, help="steps per timing (step)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per mode, interleaved")
    parser.add_argument("--batch", type=int, default=4, help="batch of the layers (critic layers: twice this)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides of the step")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPU(s)", flush=True)
    if "step" in args.what:
        result = step(args.steps, args.repeats, args.set)
        for mode in MODES:
            r = result[mode]
            print(f"demo training step, kernels {mode:<3}: {r['steps_per_s']:.3f} steps/s"
                  f" (compiled in {r['compile_s']:.1f} s)", flush=True)
    if "layers" in args.what:
        layers(args.batch, args.repeats)


if __name__ == "__main__":
    main()
