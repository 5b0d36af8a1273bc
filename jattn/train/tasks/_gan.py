"""Pieces the GAN inpainting tasks share (DeepFill v1 / v2): optimizers and updates of a
critic-then-generator step, and the outputs shown in grids and evaluated."""

from __future__ import annotations

import jax

from jattn.train.steps import Update
from jattn.train.task import make_optimizer


def critic_generator_updates(config, critic_loss, generator_loss, default_n_critic: int):
    """(optimizers, updates): `n_critic` critic updates then one generator update, Adam per
    network from `config.optimizer.{critic, generator}`."""
    optimizers = {
        "generator": make_optimizer(config.optimizer.generator, config.get("learning_rate")),
        "critic": make_optimizer(config.optimizer.critic, config.get("learning_rate")),
    }
    d_update = Update("d", "critic", critic_loss, optimizers["critic"], advances_step=False)
    g_update = Update("g", "generator", generator_loss, optimizers["generator"])
    n_critic = int(config.get("n_critic", default_n_critic))
    return optimizers, (d_update,) * n_critic + (g_update,)


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
