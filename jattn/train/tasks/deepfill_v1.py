"""DeepFill v1 on the shared engine: generator with contextual attention, local and global
WGAN-GP critics."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from jattn import losses as L
from jattn.models.deepfill import DeepFillV1Critics, DeepFillV1Generator, offsets_to_flow
from jattn.ops.masks import hole_boxes
from jattn.train.task import Task, compute_dtype, register_task
from jattn.train.tasks._gan import critic_generator_updates, gan_optimizer_schema, inpainting_outputs

__all__ = ["deepfill_v1_task", "schema"]


def schema() -> ml_collections.ConfigDict:
    """DeepFill v1's config keys with the official defaults (inpaint.yml of the v1 code)."""
    return ml_collections.ConfigDict({
        "model": {
            "cnum": 32,
            "critic_cnum": 64,
            "local_size": None,  # the local critic's crop (the official 128); None: image_size // 2
            "ca_block_size": None,  # contextual attention in blocks of this many positions; None: whole
        },
        "loss": {
            "l1_alpha": 1.2,  # COARSE_L1_ALPHA
            "l1_loss_alpha": 1.2,
            "ae_loss_alpha": 1.2,
            "gan_loss_alpha": 0.001,
            "wgan_gp_lambda": 10.0,
            "global_wgan_loss_alpha": 1.0,
            "gamma": 0.9,  # spatial discounting
        },
        "optimizer": gan_optimizer_schema(),
        "n_critic": 5,
    })


@register_task("deepfill_v1", schema=schema)
def deepfill_v1_task(config) -> Task:
    """DeepFill v1: `n_critic` WGAN-GP critic updates, then one generator update.

    Config (:func:`schema`): model.{cnum, critic_cnum, local_size, ca_block_size}, loss.{l1_alpha,
    l1_loss_alpha, ae_loss_alpha, gan_loss_alpha, wgan_gp_lambda, global_wgan_loss_alpha,
    gamma}, optimizer.{generator, critic}.{lr, b1, b2, ...}, n_critic, compute_dtype.
    Each image has its own mask; its critic crop is a `local_size` box around its hole.
    """
    m, size = config.model, config.data.image_size
    local = size // 2 if m.local_size is None else int(m.local_size)
    dtype = compute_dtype(config)
    gen = DeepFillV1Generator(cnum=int(m.cnum), dtype=dtype, ca_block_size=m.ca_block_size)
    critics = DeepFillV1Critics(cnum=int(m.critic_cnum), dtype=dtype)
    weights = config.loss.to_dict()

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

    optimizers, updates = critic_generator_updates(config, critic_loss, generator_loss, config.n_critic)
    return Task("deepfill_v1", init, optimizers, updates, predict)
