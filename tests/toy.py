"""A small GAN task and config for tests of the engine, the loop and inference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jattn.train.steps import Update
from jattn.train.task import Task, make_optimizer, register_task


class _G(nn.Module):
    width: int = 8

    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Conv(3, (3, 3))(nn.elu(nn.Conv(self.width, (3, 3))(x))))


class _D(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.leaky_relu(nn.Conv(8, (3, 3), strides=4)(x), 0.2).reshape(x.shape[0], -1))


@register_task("toy_gan")
def _toy_task(config):
    g, d = _G(int(config.model.get("width", 8))), _D()
    poison = float(config.model.get("poison_after", -1))

    def init(key, batch):
        return {"generator": g.init(key, batch["image"])["params"], "critic": d.init(key, batch["image"])["params"]}, {}

    def fake(params, batch):
        return g.apply({"params": params["generator"]}, batch["image"] * (1 - batch["mask"]))

    def d_loss(params, variables, batch, key):
        f = jax.lax.stop_gradient(fake(params, batch)) + 0.01 * jax.random.normal(key, batch["image"].shape)
        loss = jnp.mean(d.apply({"params": params["critic"]}, f)) - jnp.mean(d.apply({"params": params["critic"]}, batch["image"]))
        return loss, ({}, {})

    def g_loss(params, variables, batch, key):
        f = fake(params, batch)
        loss = jnp.mean(jnp.abs(f - batch["image"])) - 0.01 * jnp.mean(d.apply({"params": params["critic"]}, f))
        if poison >= 0:  # NaN once the generator's bias has moved (a deterministic "blow-up")
            loss = loss * jnp.where(jnp.abs(params["generator"]["Conv_1"]["bias"][0]) > poison, jnp.nan, 1.0)
        return loss, ({"l1_loss": jnp.mean(jnp.abs(f - batch["image"]))}, {})

    def predict(params, variables, batch):
        out = fake(params, batch)
        return {"output": out * batch["mask"] + batch["image"] * (1 - batch["mask"]), "raw": out}

    opts = {"generator": make_optimizer(config.optimizer), "critic": make_optimizer(config.optimizer)}
    du = Update("d", "critic", d_loss, opts["critic"], advances_step=False)
    gu = Update("g", "generator", g_loss, opts["generator"])
    return Task("toy_gan", init, opts, (du, du, gu), predict)


def toy_config(total=6, **model):
    c = ml_collections.ConfigDict()
    c.seed = 3
    c.model = ml_collections.ConfigDict({"name": "toy_gan", **model})
    c.data = ml_collections.ConfigDict(
        {
            "source": {"kind": "sample_photos", "num_examples": 64, "crop_size": 16},
            "image_size": 16,
            "mask": {"kind": "box", "hole_size": [8, 8], "margin": [0, 0], "max_delta": [2, 2]},
            "shuffle_buffer": None,
            "worker_count": 0,
        }
    )
    c.batch_size = 8
    c.total_steps = total
    c.optimizer = ml_collections.ConfigDict({"lr": 1e-2, "b1": 0.5, "b2": 0.9, "schedule": "constant"})
    c.log_every = 1
    c.image_every = 3
    c.checkpoint_every = 2
    c.keep_checkpoints = 5
    c.skip_nonfinite = False
    return c


class _Classifier(nn.Module):
    classes: int = 3

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


@register_task("toy_classifier")
def _toy_classifier(config):
    """A supervised single-network task on labelled images (fields=("label",))."""
    net = _Classifier()

    def init(key, batch):
        return {"model": net.init(key, batch["image"])["params"]}, {}

    def loss_fn(params, variables, batch, key):
        logits = net.apply({"params": params["model"]}, batch["image"])
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))
        return loss, ({}, {})

    def predict(params, variables, batch):
        return {"output": net.apply({"params": params["model"]}, batch["image"]), "image": batch["image"]}

    def metrics(outputs, batch):
        return {"accuracy": jnp.mean(jnp.argmax(outputs["output"], -1) == batch["label"])}

    tx = make_optimizer(config.optimizer)
    return Task("toy_classifier", init, {"model": tx}, (Update("train", "model", loss_fn, tx),), predict,
                fields=("label",), eval_metrics=metrics)


class _Upscaler(nn.Module):
    scale: int = 2

    @nn.compact
    def __call__(self, x):
        s = self.scale
        y = nn.Conv(3 * s * s, (3, 3))(nn.relu(nn.Conv(8, (3, 3))(x)))
        b, h, w, _ = y.shape
        y = y.reshape(b, h, w, s, s, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, 3)
        return y + jnp.repeat(jnp.repeat(x, s, axis=1), s, axis=2)


@register_task("toy_sr")
def _toy_sr(config):
    """A tiny super-resolution task (fields=("lowres",)); receptive field 2 low-res pixels."""
    net = _Upscaler(int(config.data.scale))

    def init(key, batch):
        return {"model": net.init(key, batch["lowres"])["params"]}, {}

    def loss_fn(params, variables, batch, key):
        return jnp.mean(jnp.abs(net.apply({"params": params["model"]}, batch["lowres"]) - batch["image"])), ({}, {})

    def predict(params, variables, batch):
        return {"output": net.apply({"params": params["model"]}, batch["lowres"])}

    tx = make_optimizer(config.optimizer)
    return Task("toy_sr", init, {"model": tx}, (Update("train", "model", loss_fn, tx),), predict, fields=("lowres",))


def train_toy_sr(workdir, total: int) -> dict:
    """Train the toy x2 super-resolution task for `total` steps in `workdir`; its summary."""
    from jattn.train.loop import train

    config = toy_config(total=total)
    config.model.name = "toy_sr"
    config.data.mask = None
    config.data.scale = 2
    config.image_every = 0
    return train(config, workdir, progress=False)
