"""Network updates as pure functions, and the training step: one program over a device mesh.

A model describes its training as a list of *updates*; each updates one network from one
batch: `(state, batch, update_index) -> (state, metrics)`. A GAN step of DeepFill v1 is
`n_critic` critic updates (each on a fresh batch) then one generator update; a
supervised model has a single update. The engine is the same for every model.

`make_train_step` compiles a whole step, every update of it, as one jitted program over
the mesh: it takes the state (donated) and one stacked global batch, `[n_updates, B, ...]`
per field, every update written out in order (or repeated updates, the critic's, as a
`lax.scan` over their batches).
Its metrics stay on the device; `metrics["finite"]` is 1 when every update was applied.

A loss function has the signature

    loss_fn(params: dict, variables: dict, batch: dict, key) -> (loss, (metrics, new_variables))

where `params` / `variables` hold every network (the one being updated is differentiated,
the others are constants) and `new_variables` is the dict of updated non-parameter
variables by network (e.g. spectral-norm vectors), `{}` when none change.

Non-finite losses, gradients or updated parameters / optimizer state never reach the
state: the update is dropped inside the step (state unchanged) and reported in the metrics
as `<name>_finite = 0`; the loop stops with a message naming the step and loss, or goes on
when told to skip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jattn.train.sharding import data_sharding, replicated, stacked_data_sharding
from jattn.train.state import TrainState, update_key

__all__ = ["Update", "apply_update", "train_step", "make_train_step", "jit_update", "run_updates", "LossFn"]

LossFn = Callable[[dict, dict, dict, jax.Array], tuple[jax.Array, tuple[dict, dict]]]


@dataclasses.dataclass(frozen=True)
class Update:
    """One optimizer update: `net` is differentiated through `loss_fn` and stepped by `tx`.

    name: prefix of its metrics (`<name>_loss`, `<name>_grad_norm`, `<name>_finite`).
    advances_step: whether this update completes a step (the generator update of a GAN).
    ema_decay: when set, the engine keeps an exponential moving average of `net`'s params
      in `state.variables[f"{net}_ema"]` (decay * ema + (1 - decay) * new params, after
      each applied update); the task's `init` must return that entry (a copy of the
      params) among its variables.
    """

    name: str
    net: str
    loss_fn: LossFn
    tx: optax.GradientTransformation
    advances_step: bool = True
    ema_decay: float | None = None


def _all_finite(*trees: Any) -> jax.Array:
    """Whether every floating-point value of `trees` is finite (a scalar bool)."""
    counts = [jnp.sum(~jnp.isfinite(x), dtype=jnp.float32) for t in trees for x in jax.tree_util.tree_leaves(t)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not counts:
        return jnp.bool_(True)
    # The per-array counts are joined through a sqrt: XLA copies cheap scalar ops into every
    # fusion that reads them, and each state array's select reads this flag, so a plain sum
    # (or `and` of per-array flags) would be copied into each of them: a program, and a
    # compile time, quadratic in the number of arrays. A sqrt is not copied: the flag is
    # computed once.
    return jnp.sqrt(sum(counts)) == 0


def _select(ok: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)


def apply_update(update: Update, state: TrainState, batch: dict, update_index: jax.Array | int) -> tuple[TrainState, dict]:
    """One update of `update.net` on `batch`; returns the new state and scalar metrics."""
    key = update_key(state, update_index)

    def loss_of(p):
        return update.loss_fn({**state.params, update.net: p}, state.variables, batch, key)

    (loss, (metrics, new_vars)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params[update.net])
    updates, new_opt = update.tx.update(grads, state.opt_state[update.net], state.params[update.net])
    new_params = optax.apply_updates(state.params[update.net], updates)
    grad_norm = optax.tree.norm(grads)
    # A finite loss and gradient can still give infinite weights (an infinite or huge
    # learning rate): the update's results are checked too, one reduction per array. The
    # loss and the norm join the same flag: a cheap `isfinite(loss) & ...` beside it would be
    # copied, with the loss's own scalar arithmetic, into every fusion that selects a state
    # array, and in a step of several updates into the next updates' fusions as well.
    ok = _all_finite(loss, grad_norm, new_params, new_opt, new_vars)

    variables = dict(state.variables)
    for net, v in new_vars.items():
        variables[net] = _select(ok, v, state.variables[net])
    if update.ema_decay is not None:
        ema_name = f"{update.net}_ema"
        if ema_name not in variables:
            raise KeyError(f"update {update.name!r} keeps an EMA but the state has no variables[{ema_name!r}]; "
                           "the task's init must return it (a copy of the params)")
        d = jnp.float32(update.ema_decay)
        ema = jax.tree_util.tree_map(lambda e, p: (d * e + (1 - d) * p).astype(e.dtype), variables[ema_name], new_params)
        variables[ema_name] = _select(ok, ema, variables[ema_name])
    new_state = state.replace(
        step=state.step + (1 if update.advances_step else 0),  # a dropped update still uses its step
        params={**state.params, update.net: _select(ok, new_params, state.params[update.net])},
        opt_state={**state.opt_state, update.net: _select(ok, new_opt, state.opt_state[update.net])},
        variables=variables,
    )
    out = {
        f"{update.name}_loss": loss,
        f"{update.name}_grad_norm": grad_norm,
        f"{update.name}_finite": ok.astype(jnp.float32),
    }
    out.update({k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()})
    return new_state, out


def _groups(updates: Sequence[Update]) -> list[tuple[Update, int, int]]:
    """Consecutive repeats of one update: [(update, first index, count)]."""
    groups: list[tuple[Update, int, int]] = []
    for i, u in enumerate(updates):
        if groups and groups[-1][0] is u:
            groups[-1] = (u, groups[-1][1], groups[-1][2] + 1)
        else:
            groups.append((u, i, 1))
    return groups


def train_step(updates: Sequence[Update], state: TrainState, batches: dict, *, unroll: bool = True) -> tuple[TrainState, dict]:
    """All updates of one step, in order; `batches` holds one batch per update, stacked:
    each leaf `[len(updates), B, ...]`.

    unroll: True (the default) writes every update into the program one after the other;
      False runs repeats of one update (the critic's `n_critic`) as a `lax.scan` over their
      batches: a smaller program that compiles faster, but XLA:CPU runs a loop body several
      times slower than the same operations outside a loop (`benchmarks/step_dispatch.py`).

    Returns the new state and the step's metrics: each one averaged over the updates that
    report it, plus "finite" (1.0 when no update was dropped)."""
    collected: dict[str, list[jax.Array]] = {}
    for update, first, count in _groups(updates):
        if unroll or count == 1:
            for i in range(first, first + count):
                batch = jax.tree_util.tree_map(lambda x, i=i: x[i], batches)
                state, metrics = apply_update(update, state, batch, jnp.int32(i))
                for k, v in metrics.items():
                    collected.setdefault(k, []).append(v[None])
            continue
        part = jax.tree_util.tree_map(lambda x: x[first:first + count], batches)
        indices = jnp.arange(first, first + count, dtype=jnp.int32)

        def body(s, xs, update=update):
            batch, index = xs
            return apply_update(update, s, batch, index)

        state, metrics = jax.lax.scan(body, state, (part, indices))
        for k, v in metrics.items():
            collected.setdefault(k, []).append(v)
    out = {k: jnp.mean(jnp.concatenate(v)) for k, v in collected.items()}
    out["finite"] = jnp.min(jnp.stack([v for k, v in out.items() if k.endswith("_finite")]))
    return state, out


def make_train_step(updates: Sequence[Update], mesh: Mesh, *, unroll: bool = True, donate: bool = True):
    """`train_step` jitted over `mesh`: `fn(state, batches) -> (state, metrics)`, the state
    replicated (and donated), the stacked batches split along `data` (`[n, B, ...]`, B
    sharded). Call and lower it under `jax.set_mesh(mesh)` (tasks may constrain arrays they
    make, e.g. latents, to the data axis: `jattn.train.sharding.shard_batch`)."""
    updates = tuple(updates)
    rep = replicated(mesh)
    return jax.jit(
        lambda state, batches: train_step(updates, state, batches, unroll=unroll),
        in_shardings=(rep, stacked_data_sharding(mesh)),
        out_shardings=(rep, rep),
        donate_argnums=(0,) if donate else (),
    )


def jit_update(update: Update, mesh: Mesh, *, donate: bool = True):
    """`apply_update` jitted over `mesh`, one update alone (for profiling and tests):
    state replicated, batch split along `data`. Returns `fn(state, batch, update_index) -> (state, metrics)`; the state argument is
    donated (its buffers are reused for the new state).
    """
    rep = replicated(mesh)
    return jax.jit(
        lambda state, batch, index: apply_update(update, state, batch, index),
        in_shardings=(rep, data_sharding(mesh), rep),
        out_shardings=(rep, rep),
        donate_argnums=(0,) if donate else (),
    )


def run_updates(fns: Sequence[Callable], state: TrainState, batches: Sequence[dict]) -> tuple[TrainState, dict]:
    """Run separately jitted updates in order, one batch each: the step of `train_step`
    dispatched update by update (a reference for tests and benchmarks)."""
    if len(fns) != len(batches):
        raise ValueError(f"run_updates: {len(fns)} updates but {len(batches)} batches")
    metrics: dict = {}
    for i, (fn, batch) in enumerate(zip(fns, batches)):
        state, m = fn(state, batch, jnp.asarray(i, jnp.int32))
        for k, v in m.items():
            metrics.setdefault(k, []).append(v)
    # several updates of one network: report the mean of its metrics over the step
    return state, {k: jnp.mean(jnp.stack(v)) for k, v in metrics.items()}
