"""SAGAN (Zhang et al. 2019): hinge-loss GAN with spectral norm, self-attention and TTUR.

One step is `n_critic` (default 1) discriminator updates, then one generator update, each on
its own batch and key. The generator's parameters are averaged (EMA, `model.ema_decay`) and
the EMA generator draws the samples of `predict`.

Batch norm of the EMA generator (`model.ema_stats`):
* "track" (default): every generator update also runs the EMA generator (no gradient) in
  training mode on the same latents, so the EMA weights get their own batch-norm running
  averages and spectral-norm vectors, kept in `variables["generator_ema_stats"]` (one extra
  generator forward per step). `predict` uses those running averages.
* "batch": no extra forward; `predict` normalises with the statistics of the batch being
  sampled (like BigGAN's "standing statistics" on one batch) and the generator's SN vectors.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import ml_collections

from jattn import losses as L
from jattn.models.sagan import SAGANDiscriminator, SAGANGenerator
from jattn.train.sharding import shard_batch
from jattn.train.task import Task, compute_dtype, register_task
from jattn.train.tasks._gan import critic_generator_updates, gan_optimizer_schema

__all__ = ["sagan_task", "schema", "SAMPLE_SEED", "sample_latents"]

SAMPLE_SEED = 1234  # the latents of `predict` never depend on the training seed
_LOSSES = {"hinge": (L.hinge_d_loss, L.hinge_g_loss), "nonsaturating": (L.nonsaturating_d_loss, L.nonsaturating_g_loss)}


def sample_latents(index: jax.Array, z_dim: int, seed: int = SAMPLE_SEED) -> jax.Array:
    """Fixed latents: ``z[i] = normal(fold_in(key(seed), index[i]))``; index [B] int -> [B, z_dim]."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), (z_dim,)))(index)


def schema() -> ml_collections.ConfigDict:
    """SAGAN's config keys with their defaults (the paper's where it has one)."""
    return ml_collections.ConfigDict({
        "model": {
            "ch": 64,
            "z_dim": 128,
            "num_classes": 0,  # 0: unconditional
            "attention_resolution": "auto",  # feature size of the self-attention; "auto": 32 at 64 px and up, else 16
            "bn_momentum": 0.9,
            "ema_decay": 0.9999,  # None: no EMA; samples from the generator
            "ema_stats": "track",  # "track" | "batch" (see the module docstring)
            "inception_weights": None,  # .npz / .safetensors of the FID Inception: enables IS / FID
            "is_splits": 10,  # Inception Score splits
        },
        "loss": {"kind": "hinge"},  # "hinge" (the paper's) | "nonsaturating"
        "optimizer": gan_optimizer_schema(),
    })


def _attention_resolution(value, image_size: int):
    """`model.attention_resolution` with "auto" resolved for `image_size`."""
    if value == "auto":
        return 32 if image_size >= 64 else 16
    return value


@register_task("sagan", schema=schema)
def sagan_task(config) -> Task:
    """SAGAN from the config.

    Config (:func:`schema`): model.{ch, z_dim, num_classes, attention_resolution, ema_decay,
    ema_stats, bn_momentum, inception_weights (for IS / FID, see jattn.gan_metrics)},
    data.image_size (32, 64, 128), optimizer.{generator, critic} (paper: TTUR 1e-4 / 4e-4,
    betas 0 / 0.9), n_critic (1), loss.kind, compute_dtype.
    Conditional models need the "label" field; fake images get uniformly drawn labels.
    """
    m, size = config.model, int(config.data.image_size)
    num_classes = int(m.num_classes)
    z_dim = int(m.z_dim)
    attention = _attention_resolution(m.attention_resolution, size)
    dtype = compute_dtype(config)
    gen = SAGANGenerator(size, int(m.ch), z_dim, num_classes, attention, float(m.bn_momentum), dtype=dtype)
    disc = SAGANDiscriminator(size, int(m.ch), num_classes, attention, dtype=dtype)
    ema_decay = None if m.ema_decay is None else float(m.ema_decay)
    ema_stats = m.ema_stats
    if ema_stats not in ("track", "batch"):
        raise ValueError(f"model.ema_stats must be 'track' or 'batch', got {ema_stats!r}")
    track = ema_decay is not None and ema_stats == "track"
    loss_kind = config.loss.kind
    if loss_kind not in _LOSSES:
        raise ValueError(f"loss.kind must be one of {sorted(_LOSSES)}, got {loss_kind!r}")
    d_loss_fn, g_loss_fn = _LOSSES[loss_kind]

    def labels_of(batch):
        return batch["label"].astype(jnp.int32) if num_classes else None

    def latents(key, n):
        """z [n, z_dim], y [n] (or None), split over the data axis like the batch: drawn
        from one replicated key, they would otherwise make every device generate them all."""
        z = shard_batch(jax.random.normal(jax.random.fold_in(key, 0), (n, z_dim)))
        y = shard_batch(jax.random.randint(jax.random.fold_in(key, 1), (n,), 0, num_classes)) if num_classes else None
        return z, y

    def generate(gparams, gvars, z, y):
        """Training-mode generator: (images [B, S, S, 3] float32, updated batch_stats)."""
        out, new = gen.apply({"params": gparams, **gvars}, z, y, train=True, mutable=["batch_stats"])
        return out.astype(jnp.float32), new

    def init(key, batch):
        n = batch["image"].shape[0]
        z, y = jnp.zeros((n, z_dim)), labels_of(batch)
        g = gen.init(jax.random.fold_in(key, 0), z, y, train=True)
        d = disc.init(jax.random.fold_in(key, 1), batch["image"], y, update_stats=True)
        params = {"generator": g["params"], "critic": d["params"]}
        variables = {"generator": {"batch_stats": g["batch_stats"]}, "critic": {"batch_stats": d["batch_stats"]}}
        if ema_decay is not None:
            variables["generator_ema"] = jax.tree_util.tree_map(jnp.copy, g["params"])
        if track:
            variables["generator_ema_stats"] = {"batch_stats": jax.tree_util.tree_map(jnp.copy, g["batch_stats"])}
        return params, variables

    def critic_loss(params, variables, batch, key):
        real, y_real = batch["image"], labels_of(batch)
        z, y_fake = latents(key, real.shape[0])
        # G runs in training mode; its statistics are only kept from its own update
        fake, _ = generate(params["generator"], variables["generator"], z, y_fake)
        x = L.pair(real.astype(fake.dtype), jax.lax.stop_gradient(fake))
        y = None if y_real is None else L.pair(y_real, y_fake)
        logits, new_d = disc.apply({"params": params["critic"], **variables["critic"]}, x, y,
                                   update_stats=True, mutable=["batch_stats"])
        pos, neg = L.unpair(logits)
        metrics = {"d_real": jnp.mean(pos), "d_fake": jnp.mean(neg)}
        return d_loss_fn(pos, neg), (metrics, {"critic": new_d})

    def generator_loss(params, variables, batch, key):
        z, y = latents(key, batch["image"].shape[0])
        fake, new_g = generate(params["generator"], variables["generator"], z, y)
        neg = disc.apply({"params": params["critic"], **variables["critic"]}, fake, y, update_stats=False)
        new = {"generator": new_g}
        if track:
            _, new["generator_ema_stats"] = generate(variables["generator_ema"], variables["generator_ema_stats"], z, y)
        metrics = {"g_attention_gamma": params["generator"]["attention"]["gamma"]} if attention else {}
        return g_loss_fn(neg), (metrics, new)

    def predict(params, variables, batch):
        """Samples "output" [B, S, S, 3] of the EMA generator for latents fixed by batch["index"]
        ([B] int, default 0..B-1) and batch["label"] (conditional); "real": the batch's images."""
        real = batch["image"]
        index = batch.get("index", jnp.arange(real.shape[0], dtype=jnp.int32))
        z, y = sample_latents(index, z_dim), labels_of(batch)
        if ema_decay is None:
            gparams, gvars = params["generator"], variables["generator"]
        else:
            gparams = variables["generator_ema"]
            gvars = variables["generator_ema_stats"] if track else variables["generator"]
        if track or ema_decay is None:
            out = gen.apply({"params": gparams, **gvars}, z, y, train=False)
        else:
            out, _ = generate(gparams, gvars, z, y)
        return {"output": out.astype(jnp.float32), "real": real}

    optimizers, updates = critic_generator_updates(config, critic_loss, generator_loss, config.n_critic, ema_decay)
    task = Task("sagan", init, optimizers, updates, predict,
                fields=("label",) if num_classes else (), eval_metrics=None, export_network="generator")

    predict_jit = jax.jit(predict)  # compiled at the first evaluation, reused by every later one

    def evaluate(state, config, mesh, real_batches, save_outputs=None):
        """FID and Inception Score with the user's Inception weights (model.inception_weights;
        none: no metrics, at no cost); see `jattn.gan_metrics.evaluate_gan`."""
        from jattn.gan_metrics import evaluate_gan
        from jattn.train.evaluate import SaveOutputsError

        if save_outputs is not None:
            raise SaveOutputsError("--save-outputs writes images per example, and SAGAN's evaluation takes the whole set "
                                   "at once (FID, IS); it has no per-example outputs to save")

        return evaluate_gan(task, state, config, real_batches, mesh=mesh, predict=predict_jit)

    return dataclasses.replace(task, evaluate=evaluate)
