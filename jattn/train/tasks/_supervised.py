"""Pieces shared by the tasks of RCAN, SE-ResNet, Attention U-Net and SA inpainting.

(Private module: the package does not import it on its own; the task modules do.)

* :func:`apply_net` -- apply one network with its non-parameter variables
  (``"batch_stats"`` of batch norm or spectral norm), updating them in train mode;
* :func:`init_net`, :func:`split_params` -- init a network and split its params from its
  other collections;
* :func:`supervised_schema`, :func:`supervised_task` -- the config schema and the task of a
  single-network supervised task (one update per step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import ml_collections

from jattn.config import optimizer_schema
from jattn.train.steps import Update
from jattn.train.task import Task, make_optimizer

__all__ = ["apply_net", "init_net", "split_params", "supervised_schema", "supervised_task"]

Outputs = Any


def split_params(variables) -> tuple[dict, dict]:
    """Flax variables -> ``(params, other collections)`` (e.g. ``{"batch_stats": ...}``, or {})."""
    variables = flax.core.unfreeze(variables)
    params = variables.pop("params", {})
    return params, variables


def init_net(module, key: jax.Array, *args, **kwargs) -> tuple[dict, dict]:
    """``module.init`` (``key`` as the "params" key) -> ``(params, other collections)``."""
    return split_params(module.init({"params": key}, *args, **kwargs))


def apply_net(module, params, variables: Mapping, *args, train: bool, train_arg: str | None = "train", **kwargs):
    """Apply ``module`` with ``params`` and its other collections ``variables``.

    ``train_arg`` names the module's train-mode argument (None: the module has none). In
    train mode every collection in ``variables`` is mutable (batch statistics, spectral-norm
    vectors). Returns ``(outputs, new variables)``; the new variables are ``variables``
    unchanged outside train mode.
    """
    if train_arg is not None:
        kwargs[train_arg] = train
    collections = {"params": params, **variables}
    if train and variables:
        out, updated = module.apply(collections, *args, mutable=list(variables), **kwargs)
        return out, {**variables, **flax.core.unfreeze(updated)}
    return module.apply(collections, *args, **kwargs), dict(variables)


def supervised_schema(model: dict, loss: dict | None = None) -> ml_collections.ConfigDict:
    """The schema of a single-network task: its `model` and `loss` blocks (keys and defaults)
    and one `optimizer` block (`jattn.config.optimizer_schema`)."""
    return ml_collections.ConfigDict({"model": model, "loss": loss or {}, "optimizer": optimizer_schema()})


def supervised_task(
    name: str,
    config,
    model,
    *,
    inputs: Callable[[dict], tuple],
    loss: Callable[[Outputs, dict], tuple[jax.Array, dict]],
    predict: Callable[[Callable[..., Outputs], dict], dict],
    fields: tuple[str, ...],
    eval_metrics: Callable[[dict, dict], dict] | None = None,
    train_arg: str | None = "train",
    init_variables: Callable[..., dict] | None = None,
    net: str = "model",
    train_call: Callable[[dict, jax.Array], tuple[tuple, dict]] | None = None,
) -> Task:
    """A task with one network ``net`` trained by one update per step.

    Args:
      model: the Flax module; called as ``model(*inputs(batch), train=...)`` (or without a
        train argument when ``train_arg`` is None).
      inputs: the model's positional inputs from a batch (also used by ``init`` on the
        example batch).
      loss: ``(outputs in train mode, batch) -> (scalar loss, metrics dict)``.
      predict: ``(run, batch) -> dict`` with ``run(**kwargs)`` the model's eval-mode outputs
        on the batch (extra keyword arguments go to the model, e.g. ``return_attention=True``).
      fields, eval_metrics: as in :class:`jattn.train.task.Task`.
      init_variables: ``(key, *inputs) -> variables`` replacing ``model.init`` (e.g. an
        initialisation with other variances).
      train_call: ``(batch, key) -> (args, kwargs)`` of the train-mode call, replacing
        ``inputs(batch)`` there (e.g. a model whose training losses are another method
        that takes the batch and the step's PRNG key: ``((batch, key), {"method": ...})``).

    The optimizer comes from the ``config.optimizer`` block (``config.learning_rate`` the
    default lr); the update is named ``net`` (metrics ``<net>_loss``, ``<net>_grad_norm``, ...) and
    returns the network's updated non-parameter variables (batch norm statistics).
    """

    def init(key, batch):
        if init_variables is not None:
            params, variables = split_params(init_variables(key, *inputs(batch)))
        else:
            params, variables = init_net(model, key, *inputs(batch), **({train_arg: False} if train_arg else {}))
        return {net: params}, {net: variables}

    def loss_fn(params, variables, batch, key):
        args, kwargs = (inputs(batch), {}) if train_call is None else train_call(batch, key)
        own = variables.get(net, {})
        outputs, new_vars = apply_net(model, params[net], own, *args, train=True, train_arg=train_arg, **kwargs)
        value, metrics = loss(outputs, batch)
        return value, (metrics, {net: new_vars} if new_vars else {})

    def predict_fn(params, variables, batch):
        def run(**kwargs):
            own = variables.get(net, {})
            out, _ = apply_net(model, params[net], own, *inputs(batch), train=False, train_arg=train_arg, **kwargs)
            return out

        return predict(run, batch)

    tx = make_optimizer(config.optimizer, config.learning_rate)
    return Task(name, init, {net: tx}, (Update(net, net, loss_fn, tx),), predict_fn, fields=fields,
                eval_metrics=eval_metrics, export_network=net)
