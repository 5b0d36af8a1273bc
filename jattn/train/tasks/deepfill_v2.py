"""DeepFill v2 on the shared engine: gated generator, SN-PatchGAN critic, hinge loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jattn import losses as L
from jattn.models.deepfill_v2 import DeepFillV2Generator, SNPatchGANCritic, offsets_to_flow_v2
from jattn.train.task import Task, compute_dtype, register_task
from jattn.train.tasks._gan import critic_generator_updates, gan_optimizer_schema, inpainting_outputs

__all__ = ["deepfill_v2_task", "schema"]


def schema() -> ml_collections.ConfigDict:
    """DeepFill v2's config keys with the official defaults (inpaint.yml of the v2 code)."""
    return ml_collections.ConfigDict({
        "model": {"cnum": 48, "critic_cnum": 64, "ca_block_size": None},
        "loss": {
            "l1_loss_alpha": 1.0,  # ae loss = alpha * (mean|gt - x1| + mean|gt - x2|)
            "gan_loss_alpha": 1.0,  # hinge generator loss weight
            "gan_with_mask": True,  # the critic sees the mask as a 4th channel
            "ae_loss": True,
        },
        "optimizer": gan_optimizer_schema(),
        "n_critic": 1,  # D:G = 1:1
    })


@register_task("deepfill_v2", schema=schema)
def deepfill_v2_task(config) -> Task:
    """DeepFill v2: `n_critic` (official 1) SN-PatchGAN hinge updates, then one generator update.

    Config (:func:`schema`): model.{cnum (official 48), critic_cnum (64), ca_block_size},
    loss.{l1_loss_alpha, gan_loss_alpha, gan_with_mask, ae_loss}, optimizer.{generator,
    critic}.{lr, b1, b2, ...} (official Adam 1e-4, (0.5, 0.999)), n_critic, compute_dtype.

    The critic's spectral-norm vectors live in `variables["critic"]["batch_stats"]`; every
    critic forward pass (in the critic's and in the generator's update, as every run of the
    official graph) does one power iteration and returns the updated vectors. Each image has
    its own mask; the critic sees `[image, mask]` of the real and the completed images.
    """
    m = config.model
    dtype = compute_dtype(config)
    gen = DeepFillV2Generator(cnum=int(m.cnum), dtype=dtype, ca_block_size=m.ca_block_size)
    critic = SNPatchGANCritic(cnum=int(m.critic_cnum), dtype=dtype)
    weights = config.loss.to_dict()

    def init(key, batch):
        image, mask = batch["image"], batch["mask"]
        g = gen.init(jax.random.fold_in(key, 0), image * (1 - mask), mask)["params"]
        channels = 4 if weights["gan_with_mask"] else 3
        d = critic.init(jax.random.fold_in(key, 1), jnp.zeros((*image.shape[:3], channels), image.dtype))
        return {"generator": g, "critic": d["params"]}, {"critic": {"batch_stats": d["batch_stats"]}}

    def forward(params, batch):
        x_in = batch["image"] * (1.0 - batch["mask"])
        x1, x2, offsets = gen.apply({"params": params["generator"]}, x_in, batch["mask"])
        return x_in, x1.astype(jnp.float32), x2.astype(jnp.float32), offsets

    def all_losses(params, variables, batch, *, critic_update):
        _, x1, x2, _ = forward(params, batch)
        if critic_update:
            x1, x2 = jax.lax.stop_gradient(x1), jax.lax.stop_gradient(x2)

        def score(x):
            return critic.apply(
                {"params": params["critic"], **variables["critic"]}, x, update_stats=True, mutable=["batch_stats"]
            )

        out = L.deepfill_v2_losses(score, batch["image"], x1, x2, batch["mask"], critic_has_aux=True, **weights)
        return out, {"critic": dict(out["critic_aux"])}

    def critic_loss(params, variables, batch, key):
        del key
        out, new_vars = all_losses(params, variables, batch, critic_update=True)
        metrics = {"d_hinge_pos": out["d_hinge_pos"], "d_hinge_neg": out["d_hinge_neg"]}
        return out["d_loss"], (metrics, new_vars)

    def generator_loss(params, variables, batch, key):
        del key
        out, new_vars = all_losses(params, variables, batch, critic_update=False)
        metrics = {"ae_loss": out["ae_loss"], "g_loss_gan": out["g_loss_gan"]}
        return out["g_loss"], (metrics, new_vars)

    def predict(params, variables, batch):
        del variables
        x_in, x1, x2, offsets = forward(params, batch)
        return inpainting_outputs(x_in, x1, x2, batch["mask"], offsets_to_flow_v2(offsets))

    optimizers, updates = critic_generator_updates(config, critic_loss, generator_loss, config.n_critic)
    return Task("deepfill_v2", init, optimizers, updates, predict)
