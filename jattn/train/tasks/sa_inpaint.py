"""Self-attention inpainting: L1 + adversarial generator, PatchGAN critic; one critic update,
then one generator update, per step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jattn import losses as L
from jattn.models.sa_inpaint import PatchCritic, SAInpaintGenerator
from jattn.train.task import Task, compute_dtype, register_task
from jattn.train.tasks._gan import critic_generator_updates, gan_optimizer_schema
from jattn.train.tasks._supervised import apply_net, init_net

__all__ = ["sa_inpaint_task", "schema", "masked_l1", "GAN_LOSSES"]

#: name -> (critic loss(pos, neg), generator loss(neg)), on the critic's logits.
GAN_LOSSES = {
    "hinge": (L.hinge_d_loss, L.hinge_g_loss),
    "nonsaturating": (L.nonsaturating_d_loss, L.nonsaturating_g_loss),
}


def masked_l1(a: jax.Array, b: jax.Array, weight: jax.Array) -> jax.Array:
    """``sum(|a - b| * weight) / sum(weight broadcast to a)``: the mean absolute error over
    the weighted pixels of the whole batch (0 when the weight is all zero)."""
    w = jnp.broadcast_to(weight, a.shape)
    return jnp.sum(jnp.abs(a - b) * w) / jnp.maximum(jnp.sum(w), 1.0)


def schema() -> ml_collections.ConfigDict:
    """Self-attention inpainting's config keys with their defaults."""
    return ml_collections.ConfigDict({
        "model": {
            "widths": (64, 128, 256),  # generator encoder widths (two stride-2 steps)
            "attention": True,  # self-attention at the bottleneck
            "critic_widths": (64, 128, 256, 512),
            "spectral_norm": False,  # in the critic
        },
        "loss": {"l1_hole": 1.0, "l1_valid": 1.0, "adv": 0.01, "gan": "hinge"},  # gan: "hinge" | "nonsaturating"
        "optimizer": gan_optimizer_schema(),
    })


@register_task("sa_inpaint", schema=schema)
def sa_inpaint_task(config) -> Task:
    """Self-attention inpainting GAN.

    Config (:func:`schema`): model.{widths, attention, critic_widths, spectral_norm};
    loss.{l1_hole, l1_valid, adv, gan}; optimizer.{generator, critic} (`jattn.train.optim`); n_critic (critic
    updates per generator update; 0 or None: 1); compute_dtype.

    Losses: the critic sees ``[image, mask]`` (real) and ``[composite, mask]`` (fake, the
    generator's output inside the hole pasted on the known pixels); the generator loss is
    ``l1_hole * L1(hole) + l1_valid * L1(known) + adv * gan_g_loss`` on its raw output.
    predict: "input" (hole shown white), "raw", "output" (the composite).
    """
    m, dtype = config.model, compute_dtype(config)
    gen = SAInpaintGenerator(tuple(m.widths), attention=bool(m.attention), dtype=dtype)
    critic = PatchCritic(tuple(m.critic_widths), spectral_norm=bool(m.spectral_norm), dtype=dtype)
    w = config.loss
    w_hole, w_valid, w_adv = float(w.l1_hole), float(w.l1_valid), float(w.adv)
    gan = w.gan
    if gan not in GAN_LOSSES:
        raise ValueError(f"unknown loss.gan {gan!r}; use one of {sorted(GAN_LOSSES)}")
    d_gan, g_gan = GAN_LOSSES[gan]

    def init(key, batch):
        image, mask = batch["image"], batch["mask"]
        g_params, g_vars = init_net(gen, jax.random.fold_in(key, 0), image, mask)
        d_params, d_vars = init_net(critic, jax.random.fold_in(key, 1), image, mask, train=False)
        return {"generator": g_params, "critic": d_params}, {"generator": g_vars, "critic": d_vars}

    def complete(params, batch):
        mask = batch["mask"]
        raw = gen.apply({"params": params["generator"]}, batch["image"], mask)
        return raw, raw * mask + batch["image"] * (1.0 - mask)

    def score(params, variables, image, mask, train):
        return apply_net(critic, params["critic"], variables.get("critic", {}), image, mask, train=train)

    def critic_loss(params, variables, batch, key):
        del key
        _, comp = complete(params, batch)
        image, mask = batch["image"], batch["mask"]
        both = L.pair(image, jax.lax.stop_gradient(comp))
        masks = jnp.broadcast_to(mask, (image.shape[0], *mask.shape[1:]))
        logits, new_vars = score(params, variables, both, L.pair(masks, masks), True)  # one call: one power iteration
        pos, neg = L.unpair(logits)
        loss = d_gan(pos, neg)
        return loss, ({"d_real": jnp.mean(pos), "d_fake": jnp.mean(neg)}, {"critic": new_vars} if new_vars else {})

    def generator_loss(params, variables, batch, key):
        del key
        raw, comp = complete(params, batch)
        image, mask = batch["image"], batch["mask"]
        l1_hole, l1_valid = masked_l1(raw, image, mask), masked_l1(raw, image, 1.0 - mask)
        neg, _ = score(params, variables, comp, mask, False)
        adv = g_gan(neg)
        loss = w_hole * l1_hole + w_valid * l1_valid + w_adv * adv
        return loss, ({"l1_loss": l1_hole + l1_valid, "l1_hole": l1_hole, "l1_valid": l1_valid, "g_loss_gan": adv}, {})

    def predict(params, variables, batch):
        del variables
        raw, comp = complete(params, batch)
        return {"input": batch["image"] * (1.0 - batch["mask"]) + batch["mask"], "raw": raw, "output": comp}

    optimizers, updates = critic_generator_updates(config, critic_loss, generator_loss, config.n_critic or 1)
    return Task("sa_inpaint", init, optimizers, updates, predict, fields=("mask",), export_network="generator")
