"""Built-in tasks: how each model of `jattn.models` trains on the shared engine."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jattn import losses as L
from jattn.models.deepfill import DeepFillV1Critics, DeepFillV1Generator, offsets_to_flow
from jattn.ops.masks import hole_boxes
from jattn.train.task import Task, register_task
from jattn.train.tasks._gan import critic_generator_updates, inpainting_outputs

__all__ = ["deepfill_v1_task"]


def _dtype(config):
    return jnp.dtype(config.get("compute_dtype", "float32"))


@register_task("deepfill_v1")
def deepfill_v1_task(config) -> Task:
    """DeepFill v1: `n_critic` WGAN-GP critic updates, then one generator update.

    Config: model.{cnum, critic_cnum, local_size, ca_block_size}, loss.{l1_alpha,
    l1_loss_alpha, ae_loss_alpha, gan_loss_alpha, wgan_gp_lambda, global_wgan_loss_alpha,
    gamma}, optimizer.{generator, critic}.{lr, b1, b2, ...}, n_critic, compute_dtype.
    Each image has its own mask; its critic crop is a `local_size` box around its hole.
    """
    m, size = config.model, config.data.image_size
    local = int(m.get("local_size", size // 2))
    dtype = _dtype(config)
    gen = DeepFillV1Generator(cnum=int(m.cnum), dtype=dtype, ca_block_size=m.get("ca_block_size"))
    critics = DeepFillV1Critics(cnum=int(m.get("critic_cnum", 64)), dtype=dtype)
    weights = dict(config.loss.to_dict() if hasattr(config.loss, "to_dict") else config.loss)

    def init(key, batch):
        image, mask = batch["image"], batch["mask"]
        g = gen.init(jax.random.fold_in(key, 0), image * (1 - mask), mask)["params"]
        d = critics.init(jax.random.fold_in(key, 1), image[:, :local, :local], image)["params"]
        return {"generator": g, "critic": d}, {}

    def forward(params, batch):
        x_in = batch["image"] * (1.0 - batch["mask"])
        x1, x2, offsets = gen.apply({"params": params["generator"]}, x_in, batch["mask"])
        return x_in, x1.astype(jnp.float32), x2.astype(jnp.float32), offsets

    def all_losses(params, batch, key, *, critic_update):
        _, x1, x2, _ = forward(params, batch)
        if critic_update:
            x1, x2 = jax.lax.stop_gradient(x1), jax.lax.stop_gradient(x2)
        score = functools.partial(critics.apply, {"params": params["critic"]})
        return L.deepfill_v1_losses(
            functools.partial(score, method="score_local"),
            functools.partial(score, method="score_global"),
            batch["image"],
            x1,
            x2,
            batch["mask"],
            hole_boxes(batch["mask"], (local, local)),
            (local, local),
            key=key,
            generator_only=not critic_update,
            **weights,
        )

    def critic_loss(params, variables, batch, key):
        del variables
        out = all_losses(params, batch, key, critic_update=True)
        metrics = {
            "d_loss_local": out["d_loss_local"],
            "d_loss_global": out["d_loss_global"],
            "gp_loss": out["gp_loss"],
        }
        return out["d_loss"], (metrics, {})

    def generator_loss(params, variables, batch, key):
        del variables
        out = all_losses(params, batch, key, critic_update=False)
        metrics = {"l1_loss": out["l1_loss"], "ae_loss": out["ae_loss"], "g_loss_gan": out["g_loss_local"] + out["g_loss_global"]}
        return out["g_loss"], (metrics, {})

    def predict(params, variables, batch):
        del variables
        x_in, x1, x2, offsets = forward(params, batch)
        return inpainting_outputs(x_in, x1, x2, batch["mask"], offsets_to_flow(offsets))

    optimizers, updates = critic_generator_updates(config, critic_loss, generator_loss, default_n_critic=5)
    return Task("deepfill_v1", init, optimizers, updates, predict)
