"""Helpers for the model-task tests: a config from blocks, fast initialisation, and fitting
one fixed batch through `jattn.train.steps.apply_update` (the engine's update, jitted).

Compilation dominates these tests' time on CPU, so two things keep it down:
* initialisation uses "rbg" PRNG keys: XLA on CPU compiles threefry's many per-parameter
  draws about 4x slower (20 s vs 5 s for a small ResNet here), and the tests only need
  parameters drawn from the right initialisers, not threefry's bits;
* `jit` compiles with XLA's backend optimisation level 0 (about half the compile time; the
  tiny test programs run in milliseconds either way).
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import ml_collections

from jattn.train.state import create_state
from jattn.train.steps import apply_update


#: XLA options of `jit`: no LLVM optimisation of the (tiny) test programs.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def jit(fun=None, **kwargs):
    """`jax.jit` with :data:`FAST_COMPILE` (also usable as a decorator)."""
    if fun is None:
        return functools.partial(jit, **kwargs)
    return jax.jit(fun, compiler_options=FAST_COMPILE, **kwargs)


def init_key(seed: int = 0) -> jax.Array:
    """A PRNG key for `init` calls in tests (rbg: see the module docstring)."""
    return jax.random.key(seed, impl="rbg")


def init(module, *args, seed: int = 0, **kwargs):
    """`module.init(init_key(seed), *args, **kwargs)`, jitted (static keyword arguments)."""
    return jit(lambda key, *a: module.init(key, *a, **kwargs))(init_key(seed), *args)


def task_config(model: dict, *, image_size: int, lr: float = 1e-3, data=None, loss=None, optimizer=None, **top):
    """A ConfigDict with the blocks a task reads (model, data, optimizer, loss, learning_rate, ...)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(model)
    c.data = ml_collections.ConfigDict({"image_size": image_size, **(data or {})})
    c.learning_rate = lr
    c.optimizer = ml_collections.ConfigDict(optimizer or {"lr": None, "b1": 0.9, "b2": 0.999, "schedule": "constant"})
    c.loss = ml_collections.ConfigDict(loss or {})
    for k, v in top.items():
        c[k] = v
    return c


def example_batch(batch: dict) -> dict:
    """The init example: the batch's first row, zeroed (as the loop builds it)."""
    return jax.tree_util.tree_map(lambda x: jnp.zeros_like(x[:1]), batch)


def init_state(task, batch: dict, seed: int = 0):
    """The step-0 train state of `task`, initialised (jitted, as the loop does) on the example."""
    params, variables = jit(task.init)(init_key(seed), example_batch(batch))
    return create_state(params, task.optimizers, jax.random.key(seed + 1), variables)


def fit(task, batch: dict, steps: int, seed: int = 0, state=None):
    """Run `steps` steps of the task's updates (in order) on the same `batch`; returns the
    final state and the metrics of every step (a list of dicts of floats)."""
    state = init_state(task, batch, seed) if state is None else state
    fns = {}
    history = []
    for _ in range(steps):
        metrics = {}
        for i, u in enumerate(task.updates):
            fn = fns.setdefault(id(u), jit(lambda s, b, k, u=u: apply_update(u, s, b, k)))
            state, m = fn(state, batch, jnp.asarray(i, jnp.int32))
            metrics.update({k: float(v) for k, v in m.items()})
        history.append(metrics)
    return state, history


@contextlib.contextmanager
def count_compiles():
    """Yields a list that gets the duration of every XLA compile made inside (the persistent
    compilation cache is off meanwhile: a cache hit is no compile event)."""
    from jax._src.dispatch import BACKEND_COMPILE_EVENT

    compiles = []

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    cached = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield compiles
    finally:
        jax.config.update("jax_enable_compilation_cache", cached)
        jax.monitoring.unregister_event_duration_listener(listener)


@contextlib.contextmanager
def count_loads_and_compiles(module, monkeypatch):
    """Yields (restores, compiles): the checkpoint restores of `module` (jattn.export.inference
    or .upscale, given an empty cache of 2 models) and the XLA compiles made inside."""
    monkeypatch.setattr(module, "LOADED", module.LoadedModels(size=2))
    restores = []
    real_restore = module.restore_trained
    monkeypatch.setattr(module, "restore_trained", lambda *a, **k: restores.append(a[0]) or real_restore(*a, **k))
    with count_compiles() as compiles:
        yield restores, compiles
