"""Pieces the GAN tasks share (DeepFill v1 / v2, SAGAN, self-attention inpainting): the
optimizer schema and updates of a critic-then-generator step, and the outputs of the
inpainting GANs shown in grids and evaluated."""

from __future__ import annotations

import jax

from jattn.config import optimizer_schema
from jattn.train.steps import Update
from jattn.train.task import make_optimizer

NETWORKS = ("generator", "critic")


def gan_optimizer_schema():
    """The `optimizer` block of a GAN task: one block per network (`jattn.train.optim`)."""
    return optimizer_schema(*NETWORKS)


def critic_generator_updates(config, critic_loss, generator_loss, n_critic: int, ema_decay: float | None = None):
    """(optimizers, updates): `n_critic` critic updates then one generator update (keeping an
    EMA of the generator's parameters when `ema_decay` is set), an optimizer per network from
    `config.optimizer.{generator, critic}` with `config.learning_rate` as the default lr."""
    optimizers = {net: make_optimizer(config.optimizer[net], config.learning_rate) for net in NETWORKS}
    d_update = Update("d", "critic", critic_loss, optimizers["critic"], advances_step=False)
    g_update = Update("g", "generator", generator_loss, optimizers["generator"], ema_decay=ema_decay)
    return optimizers, (d_update,) * int(n_critic) + (g_update,)


def inpainting_outputs(x_in: jax.Array, x1: jax.Array, x2: jax.Array, mask: jax.Array, flow: jax.Array) -> dict:
    """The input with the hole shown white, both stages, the composite ("output") and the
    attention flow picture; all [B, H, W, 3] except the flow ([B, H/4, W/4, 3])."""
    return {
        "input": x_in + mask,
        "coarse": x1,
        "refined": x2,
        "output": x2 * mask + x_in * (1.0 - mask),
        "flow": flow,
    }
