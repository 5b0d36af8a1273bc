"""A small registry of model factories: ``register(name)(factory)``, ``get(name, **kw)``, ``names()``.

A factory is any callable returning the model (a Flax module or a small bundle of
modules, e.g. :class:`DeepFillV1`); keyword arguments of :func:`get` are passed to it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

import jax.numpy as jnp

from jattn.models.deepfill import DeepFillV1Critics, DeepFillV1Generator

__all__ = ["DeepFillV1", "get", "names", "register"]

F = TypeVar("F", bound=Callable[..., Any])
_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str) -> Callable[[F], F]:
    """Decorator: ``@register("my_model") def make(**kw): ...``. Duplicate names raise ValueError."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def decorator(factory: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def names() -> list[str]:
    """Sorted names of the registered models."""
    return sorted(_REGISTRY)


def get(name: str, **kwargs: Any) -> Any:
    """Builds the model registered as ``name`` with ``kwargs``.

    Raises:
      KeyError: unknown name (the message lists the known ones).
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(names()) or '(none)'}") from None
    return factory(**kwargs)


@dataclasses.dataclass(frozen=True)
class DeepFillV1:
    """DeepFill v1: the generator and its local / global WGAN critics.

    ``local_size`` is the critic crop size (official 128, the hole's bounding box) and
    ``image_size`` the training image size (official 256); both fix the critics' dense layers.
    """

    generator: DeepFillV1Generator
    critics: DeepFillV1Critics
    image_size: int = 256
    local_size: int = 128


@register("deepfill_v1")
def _deepfill_v1(
    cnum: int = 32,
    critic_cnum: int = 64,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    ca_block_size: int | None = None,
    image_size: int = 256,
    local_size: int = 128,
) -> DeepFillV1:
    return DeepFillV1(
        generator=DeepFillV1Generator(cnum=cnum, dtype=dtype, param_dtype=param_dtype, ca_block_size=ca_block_size),
        critics=DeepFillV1Critics(cnum=critic_cnum, dtype=dtype, param_dtype=param_dtype),
        image_size=image_size,
        local_size=local_size,
    )


# --------------------------------------------------------------------------- DeepFill v2

from jattn.models.deepfill_v2 import DeepFillV2Generator, SNPatchGANCritic  # noqa: E402

__all__ += ["DeepFillV2"]


@dataclasses.dataclass(frozen=True)
class DeepFillV2:
    """DeepFill v2: the gated generator and its SN-PatchGAN critic (any image size)."""

    generator: DeepFillV2Generator
    critic: SNPatchGANCritic


@register("deepfill_v2")
def _deepfill_v2(
    cnum: int = 48,
    critic_cnum: int = 64,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    ca_block_size: int | None = None,
) -> DeepFillV2:
    return DeepFillV2(
        generator=DeepFillV2Generator(cnum=cnum, dtype=dtype, param_dtype=param_dtype, ca_block_size=ca_block_size),
        critic=SNPatchGANCritic(cnum=critic_cnum, dtype=dtype, param_dtype=param_dtype),
    )


# --------------------------------------------------------------------------- the other models

from jattn.models.classifiers import SEResNet, se_resnet18, se_resnet50, se_resnet_cifar  # noqa: E402
from jattn.models.rcan import RCAN  # noqa: E402
from jattn.models.sa_inpaint import PatchCritic, SAInpaintGenerator  # noqa: E402
from jattn.models.sagan import SAGANDiscriminator, SAGANGenerator  # noqa: E402
from jattn.models.unet import AttentionUNet  # noqa: E402

__all__ += ["GAN"]


@dataclasses.dataclass(frozen=True)
class GAN:
    """A generator and its critic (discriminator)."""

    generator: Any
    critic: Any


@register("sagan")
def _sagan(image_size: int = 128, num_classes: int = 0, **kwargs: Any) -> GAN:
    """SAGAN: keyword arguments go to both networks (ch, attention_resolution, dtype, ...)."""
    return GAN(SAGANGenerator(image_size=image_size, num_classes=num_classes, **kwargs),
               SAGANDiscriminator(image_size=image_size, num_classes=num_classes, **kwargs))


@register("sa_inpaint")
def _sa_inpaint(**kwargs: Any) -> GAN:
    return GAN(SAInpaintGenerator(**kwargs), PatchCritic())


register("rcan")(RCAN)
register("se_resnet")(SEResNet)
register("se_resnet18")(se_resnet18)
register("se_resnet50")(se_resnet50)
register("se_resnet_cifar")(se_resnet_cifar)
register("attention_unet")(AttentionUNet)
