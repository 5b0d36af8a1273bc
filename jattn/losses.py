"""Losses of the inpainting / GAN models (pure functions, NHWC ``[B, H, W, C]``).

DeepFill v1 (official ``build_graph_with_losses`` of JiahuiYu/generative_inpainting v1.0.0
with neuralgym's GAN helpers, defaults of the official ``inpaint.yml``):

* :func:`spatial_discount` -- ``spatial_discounting_mask``;
* :func:`l1_loss`, :func:`deepfill_v1_l1_loss`, :func:`deepfill_v1_ae_loss`;
* :func:`wgan_d_loss`, :func:`wgan_g_loss` -- ``gan_wgan_loss``;
* :func:`interpolates`, :func:`gradient_penalty` -- ``random_interpolates``,
  ``gradients_penalty``;
* :func:`local_crop` -- ``local_patch``, with one box per image;
* :func:`deepfill_v1_losses` -- the official loss dict.

DeepFill v2 (master of the same repository, SN-PatchGAN, neuralgym ``gan_hinge_loss``):

* :func:`deepfill_v2_losses` -- the official loss dict (ae loss, hinge losses on the
  SN-PatchGAN scores of ``[real; completed]`` images with the mask channel).

Also hinge and non-saturating GAN losses for later models.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "pair",
    "unpair",
    "deepfill_v1_ae_loss",
    "deepfill_v1_l1_loss",
    "deepfill_v1_losses",
    "deepfill_v2_losses",
    "gradient_penalty",
    "hinge_d_loss",
    "hinge_g_loss",
    "interpolates",
    "l1_loss",
    "local_crop",
    "nonsaturating_d_loss",
    "nonsaturating_g_loss",
    "spatial_discount",
    "wgan_d_loss",
    "wgan_g_loss",
]

Critic = Callable[[jax.Array], jax.Array]


# --------------------------------------------------------------------------- basics


def pair(pos: jax.Array, neg: jax.Array) -> jax.Array:
    """[B, ...] and [B, ...] -> [2B, ...], interleaved (row 2i is pos[i], row 2i+1 neg[i]): one
    critic call scores both. Unlike a concatenation, a batch split over devices keeps every
    example on its device (no exchange of activations between devices)."""
    return jnp.stack([pos, neg], axis=1).reshape(-1, *pos.shape[1:])


def unpair(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse of `pair`: [2B, ...] -> ([B, ...], [B, ...])."""
    x = x.reshape(-1, 2, *x.shape[1:])
    return x[:, 0], x[:, 1]

def spatial_discount(height: int, width: int, gamma: float = 0.9) -> jax.Array:
    """DeepFill's spatial discounting weights (neuralgym ``spatial_discounting_mask``).

    ``w[i, j] = max(gamma ** min(i, height - i), gamma ** min(j, width - j))``, computed in
    float64 and rounded to float32 as the official ``tf.constant`` does (1 on the top and
    left edges, smallest at the centre; note ``i = height - 1`` gives ``gamma``).

    Returns:
      float32 ``[height, width, 1]``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"spatial_discount: height and width must be >= 1, got {height}, {width}")
    i = np.arange(height, dtype=np.float64)[:, None]
    j = np.arange(width, dtype=np.float64)[None, :]
    w = np.maximum(gamma ** np.minimum(i, height - i), gamma ** np.minimum(j, width - j))
    return jnp.asarray(w[..., None], jnp.float32)


def l1_loss(a: jax.Array, b: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """``mean(|a - b| * weight)`` over all elements of the broadcast product (scalar)."""
    diff = jnp.abs(a - b)
    return jnp.mean(diff if weight is None else diff * weight)


def wgan_d_loss(pos: jax.Array, neg: jax.Array) -> jax.Array:
    """WGAN critic loss ``mean(neg - pos)``. pos, neg: critic outputs [B, ...] of real / fake."""
    return jnp.mean(neg - pos)


def wgan_g_loss(neg: jax.Array) -> jax.Array:
    """WGAN generator loss ``-mean(neg)``."""
    return -jnp.mean(neg)


def hinge_d_loss(pos: jax.Array, neg: jax.Array) -> jax.Array:
    """Hinge critic loss ``mean(relu(1 - pos)) + mean(relu(1 + neg))`` (SN-PatchGAN, SAGAN)."""
    return jnp.mean(jax.nn.relu(1.0 - pos)) + jnp.mean(jax.nn.relu(1.0 + neg))


def hinge_g_loss(neg: jax.Array) -> jax.Array:
    """Hinge generator loss ``-mean(neg)``."""
    return -jnp.mean(neg)


def nonsaturating_d_loss(pos_logits: jax.Array, neg_logits: jax.Array) -> jax.Array:
    """Standard GAN critic loss ``mean(softplus(-pos)) + mean(softplus(neg))`` on logits
    (= -mean(log sigmoid(pos)) - mean(log(1 - sigmoid(neg))))."""
    return jnp.mean(jax.nn.softplus(-pos_logits)) + jnp.mean(jax.nn.softplus(neg_logits))


def nonsaturating_g_loss(neg_logits: jax.Array) -> jax.Array:
    """Non-saturating generator loss ``mean(softplus(-neg)) = -mean(log sigmoid(neg))``."""
    return jnp.mean(jax.nn.softplus(-neg_logits))


# --------------------------------------------------------------------------- crops


def local_crop(images: jax.Array, boxes, size: tuple[int, int] | None = None) -> jax.Array:
    """Crops one box per image (DeepFill's ``local_patch``, per image).

    Args:
      images: ``[B, H, W, C]``; a batch of 1 is broadcast to the boxes' batch.
      boxes: int ``[B, 4]`` or ``[4]`` (shared) rows of (top, left, height, width).
        top / left may be traced; they are clamped so the crop stays inside the image
        (``lax.dynamic_slice``).
      size: static (height, width) of the crops. None: taken from ``boxes``, which must
        then be concrete with the same height / width in every row.

    Returns:
      ``[B, height, width, C]``.
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"local_crop: images must be [B, H, W, C], got shape {tuple(images.shape)}")
    if size is None:
        try:
            concrete = np.asarray(boxes).reshape(-1, 4)
        except (TypeError, jax.errors.ConcretizationTypeError) as err:
            raise ValueError("local_crop: boxes are traced; pass the static crop size=(height, width)") from err
        sizes = {tuple(int(v) for v in row[2:]) for row in concrete}
        if len(sizes) != 1:
            raise ValueError(f"local_crop: all boxes must have the same (height, width), got {sorted(sizes)}")
        size = sizes.pop()
    ch, cw = int(size[0]), int(size[1])
    if not (0 < ch <= images.shape[1] and 0 < cw <= images.shape[2]):
        raise ValueError(f"local_crop: crop size {(ch, cw)} does not fit images of size {images.shape[1:3]}")
    boxes = jnp.asarray(boxes, jnp.int32)
    if boxes.ndim == 1:
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"local_crop: boxes must be [B, 4] or [4], got shape {tuple(boxes.shape)}")
    batch = max(images.shape[0], boxes.shape[0])
    if images.shape[0] not in (1, batch) or boxes.shape[0] not in (1, batch):
        raise ValueError(f"local_crop: batch of images {images.shape[0]} and boxes {boxes.shape[0]} do not match")
    images = jnp.broadcast_to(images, (batch, *images.shape[1:]))
    boxes = jnp.broadcast_to(boxes, (batch, 4))

    def crop(image, box):
        return jax.lax.dynamic_slice(image, (box[0], box[1], 0), (ch, cw, image.shape[-1]))

    return jax.vmap(crop)(images, boxes)


# --------------------------------------------------------------------------- gradient penalty


def interpolates(real: jax.Array, fake: jax.Array, alpha: jax.Array) -> jax.Array:
    """``real + alpha * (fake - real)``; real, fake ``[B, ...]``, alpha ``[B, 1]`` or ``[B]``."""
    alpha = jnp.asarray(alpha, real.dtype).reshape((real.shape[0],) + (1,) * (real.ndim - 1))
    return real + alpha * (fake - real)


def _penalty_from_grad(grad: jax.Array, mask: jax.Array | None, norm: float, eps: float) -> jax.Array:
    sq = jnp.square(grad)
    if mask is not None:
        sq = sq * mask
    slopes = jnp.sqrt(jnp.sum(sq, axis=tuple(range(1, grad.ndim))) + eps)
    return jnp.mean(jnp.square(slopes - norm))


def gradient_penalty(
    critic_fn: Critic,
    real: jax.Array,
    fake: jax.Array,
    mask: jax.Array | None = None,
    alpha: jax.Array | None = None,
    *,
    key: jax.Array | None = None,
    norm: float = 1.0,
    eps: float = 0.0,
    return_output: bool = False,
):
    """WGAN-GP penalty on random interpolates (neuralgym ``gradients_penalty``).

    ``x = real + alpha (fake - real)``; ``g = d sum(critic_fn(x)) / dx``;
    ``penalty = mean_b((sqrt(sum_{H,W,C}(g^2 * mask) + eps) - norm)^2)``.
    The official code has eps = 0 and the mask inside the square root.

    Args:
      critic_fn: ``[B, H, W, C] -> [B, ...]`` (e.g. a closure over critic params).
      real, fake: ``[B, H, W, C]``.
      mask: None or broadcastable to ``[B, H, W, C]`` (DeepFill: the hole mask).
      alpha: ``[B, 1]`` interpolation weights; None: drawn ``U(0, 1)`` from ``key``.
      key: PRNG key, required when alpha is None.
      return_output: also return ``critic_fn(x)``.

    Returns:
      scalar penalty, or ``(penalty, critic_fn(x))`` with ``return_output``.
    """
    if alpha is None:
        if key is None:
            raise ValueError("gradient_penalty: pass alpha [B, 1] or a PRNG key to draw it")
        alpha = jax.random.uniform(key, (real.shape[0], 1), jnp.float32)
    x = interpolates(real, fake, alpha)
    out, vjp = jax.vjp(critic_fn, x)
    (grad,) = vjp(jnp.ones_like(out))
    penalty = _penalty_from_grad(grad, mask, norm, eps)
    return (penalty, out) if return_output else penalty


# --------------------------------------------------------------------------- DeepFill v1


def deepfill_v1_l1_loss(
    gt_crop: jax.Array, x1_crop: jax.Array, x2_crop: jax.Array, *, coarse_alpha: float = 1.2, gamma: float = 0.9
) -> jax.Array:
    """Official ``l1_loss``: ``coarse_alpha * mean(|gt - x1| w) + mean(|gt - x2| w)`` on the
    local crops ``[B, h, w, 3]``, w = :func:`spatial_discount` (h, w, gamma)."""
    w = spatial_discount(gt_crop.shape[1], gt_crop.shape[2], gamma)
    return coarse_alpha * l1_loss(gt_crop, x1_crop, w) + l1_loss(gt_crop, x2_crop, w)


def deepfill_v1_ae_loss(
    gt: jax.Array, x1: jax.Array, x2: jax.Array, mask: jax.Array, *, coarse_alpha: float = 1.2
) -> jax.Array:
    """Official ``ae_loss`` (reconstruction outside the hole):
    ``(coarse_alpha * mean(|gt - x1| (1 - m)) + mean(|gt - x2| (1 - m))) / mean(1 - m)``.
    gt, x1, x2 ``[B, H, W, 3]``; mask ``[1 or B, H, W, 1]``."""
    keep = 1.0 - mask
    return (coarse_alpha * l1_loss(gt, x1, keep) + l1_loss(gt, x2, keep)) / jnp.mean(keep)


def deepfill_v1_losses(
    critic_local: Critic,
    critic_global: Critic,
    batch_pos: jax.Array,
    x1: jax.Array,
    x2: jax.Array,
    mask: jax.Array,
    boxes,
    crop_size: tuple[int, int] | None = None,
    *,
    alpha_local: jax.Array | None = None,
    alpha_global: jax.Array | None = None,
    key: jax.Array | None = None,
    l1_alpha: float = 1.2,
    l1_loss_alpha: float = 1.2,
    ae_loss_alpha: float = 1.2,
    gan_loss_alpha: float = 0.001,
    wgan_gp_lambda: float = 10.0,
    global_wgan_loss_alpha: float = 1.0,
    gamma: float = 0.9,
    generator_only: bool = False,
) -> dict[str, jax.Array]:
    """The official DeepFill v1 losses (``build_graph_with_losses``, WGAN-GP, stage 2 on).

    Args:
      critic_local: crops ``[N, h, w, 3] -> [N, 1]``; critic_global: ``[N, H, W, 3] -> [N, 1]``
        (e.g. ``partial(critics.apply, {"params": p}, method="score_local")``).
      batch_pos: ground truth ``[B, H, W, 3]`` in [-1, 1].
      x1, x2: the generator's coarse / refined outputs ``[B, H, W, 3]``.
      mask: ``[1 or B, H, W, 1]``, 1 = hole.
      boxes: ``[B, 4]`` or ``[4]`` local boxes (top, left, height, width) containing the hole.
      crop_size: static (h, w); None: from concrete ``boxes`` (see :func:`local_crop`).
      alpha_local, alpha_global: GP interpolation weights ``[B, 1]``; None: drawn from
        ``key`` (split in two).
      l1_alpha: COARSE_L1_ALPHA; l1_loss_alpha, ae_loss_alpha, gan_loss_alpha,
        wgan_gp_lambda, global_wgan_loss_alpha: the official config weights; gamma:
        SPATIAL_DISCOUNTING_GAMMA.
      generator_only: only what the generator's update needs: the critics score the
        completed images alone (not the real ones, no gradient penalty), the same
        ``g_loss`` at half the critics' cost; returns ``l1_loss``, ``ae_loss``,
        ``g_loss``, ``g_loss_local``, ``g_loss_global``, ``batch_complete``.

    Returns:
      dict with the official entries ``l1_loss``, ``ae_loss``, ``g_loss`` (total generator
      loss), ``d_loss`` (total critic loss, gp included), ``gp_loss`` (weighted), and the
      parts: ``g_loss_local``, ``g_loss_global``, ``d_loss_local``, ``d_loss_global``,
      ``gp_penalty_local``, ``gp_penalty_global`` (unweighted), ``d_pos_neg_local`` /
      ``d_pos_neg_global`` ``[2B, 1]`` (real rows first), ``d_interp_local`` /
      ``d_interp_global`` ``[B, 1]``, ``batch_complete`` ``[B, H, W, 3]``.

    Gradients flow to everything; a training step takes the grad of ``g_loss`` w.r.t. the
    generator and of ``d_loss`` w.r.t. the critics (stop-gradient x1 / x2 for the latter).
    """
    if not generator_only and (alpha_local is None or alpha_global is None):
        if key is None:
            raise ValueError("deepfill_v1_losses: pass alpha_local and alpha_global, or a PRNG key")
        k_local, k_global = jax.random.split(key)
        b = batch_pos.shape[0]
        if alpha_local is None:
            alpha_local = jax.random.uniform(k_local, (b, 1), jnp.float32)
        if alpha_global is None:
            alpha_global = jax.random.uniform(k_global, (b, 1), jnp.float32)
    batch_incomplete = batch_pos * (1.0 - mask)
    batch_complete = x2 * mask + batch_incomplete * (1.0 - mask)

    crop = lambda t: local_crop(t, boxes, crop_size)  # noqa: E731
    pos_crop, x1_crop, x2_crop, complete_crop = crop(batch_pos), crop(x1), crop(x2), crop(batch_complete)
    mask_crop = crop(jnp.broadcast_to(mask, (batch_pos.shape[0], *mask.shape[1:])))

    l1 = deepfill_v1_l1_loss(pos_crop, x1_crop, x2_crop, coarse_alpha=l1_alpha, gamma=gamma)
    ae = deepfill_v1_ae_loss(batch_pos, x1, x2, mask, coarse_alpha=l1_alpha)

    def generator_total(g_local, g_global):
        g_gan = gan_loss_alpha * (global_wgan_loss_alpha * g_global + g_local)
        return g_gan + l1_loss_alpha * l1 + ae_loss_alpha * ae

    if generator_only:
        g_local, g_global = wgan_g_loss(critic_local(complete_crop)), wgan_g_loss(critic_global(batch_complete))
        return {"l1_loss": l1, "ae_loss": ae, "g_loss": generator_total(g_local, g_global), "g_loss_local": g_local,
                "g_loss_global": g_global, "batch_complete": batch_complete}

    pos_local, neg_local = unpair(critic_local(pair(pos_crop, complete_crop)))
    pos_global, neg_global = unpair(critic_global(pair(batch_pos, batch_complete)))
    g_local, g_global = wgan_g_loss(neg_local), wgan_g_loss(neg_global)
    dl_local, dl_global = wgan_d_loss(pos_local, neg_local), wgan_d_loss(pos_global, neg_global)

    gp_local, d_interp_local = gradient_penalty(
        critic_local, pos_crop, complete_crop, mask_crop, alpha_local, return_output=True
    )
    gp_global, d_interp_global = gradient_penalty(
        critic_global, batch_pos, batch_complete, mask, alpha_global, return_output=True
    )
    gp = wgan_gp_lambda * (gp_local + gp_global)

    return {
        "l1_loss": l1,
        "ae_loss": ae,
        "g_loss": generator_total(g_local, g_global),
        "d_loss": dl_global + dl_local + gp,
        "gp_loss": gp,
        "g_loss_local": g_local,
        "g_loss_global": g_global,
        "d_loss_local": dl_local,
        "d_loss_global": dl_global,
        "gp_penalty_local": gp_local,
        "gp_penalty_global": gp_global,
        "d_pos_neg_local": jnp.concatenate([pos_local, neg_local]),
        "d_pos_neg_global": jnp.concatenate([pos_global, neg_global]),
        "d_interp_local": d_interp_local,
        "d_interp_global": d_interp_global,
        "batch_complete": batch_complete,
    }


# --------------------------------------------------------------------------- DeepFill v2


def deepfill_v2_losses(
    critic: Callable,
    batch_pos: jax.Array,
    x1: jax.Array,
    x2: jax.Array,
    mask: jax.Array,
    *,
    critic_has_aux: bool = False,
    l1_loss_alpha: float = 1.0,
    gan_loss_alpha: float = 1.0,
    gan_with_mask: bool = True,
    ae_loss: bool = True,
) -> dict[str, jax.Array]:
    """The official DeepFill v2 losses (``build_graph_with_losses`` with ``gan: sngan``).

    ``ae_loss = l1_loss_alpha * (mean|gt - x1| + mean|gt - x2|)`` over whole images;
    ``batch_complete = x2 * mask + batch_incomplete * (1 - mask)`` with
    ``batch_incomplete = gt * (1 - mask)`` (as the official graph); the critic scores
    ``[gt; batch_complete]`` (with the mask as a 4th channel when ``gan_with_mask``) in one
    call; neuralgym ``gan_hinge_loss`` on its split ``pos, neg``:
    ``d_loss = 0.5 mean(relu(1 - pos)) + 0.5 mean(relu(1 + neg))``, ``g_hinge = -mean(neg)``;
    ``g_loss = gan_loss_alpha * g_hinge (+ ae_loss when ae_loss)``.

    Args:
      critic: ``[2B, H, W, C] -> [2B, K]`` scores of the real and completed images,
        interleaved (:func:`pair`; C = 4 with the mask, else 3); with
        ``critic_has_aux`` it returns ``(scores, aux)`` (e.g. the updated spectral-norm
        vectors), passed back as ``out["critic_aux"]``.
      batch_pos: ground truth ``[B, H, W, 3]`` in [-1, 1].
      x1, x2: the generator's coarse / refined outputs ``[B, H, W, 3]``.
      mask: ``[1 or B, H, W, 1]``, 1 = hole (one shared mask is tiled, as the official code).
      l1_loss_alpha, gan_loss_alpha, gan_with_mask, ae_loss: the official config entries
        (defaults: the official ``inpaint.yml``).

    Returns:
      dict with the official entries ``ae_loss``, ``g_loss`` (total generator loss),
      ``d_loss``, and ``g_loss_gan`` (``-mean(neg)``, unweighted), ``d_hinge_pos``,
      ``d_hinge_neg``, ``d_pos_neg`` ``[2B, K]`` (real rows first), ``batch_complete``
      ``[B, H, W, 3]``; ``critic_aux`` with ``critic_has_aux``.

    Gradients flow to everything; a training step takes the grad of ``g_loss`` w.r.t. the
    generator and of ``d_loss`` w.r.t. the critic (stop-gradient x1 / x2 for the latter).
    """
    batch = batch_pos.shape[0]
    batch_incomplete = batch_pos * (1.0 - mask)
    batch_complete = x2 * mask + batch_incomplete * (1.0 - mask)
    ae = l1_loss_alpha * l1_loss(batch_pos, x1) + l1_loss_alpha * l1_loss(batch_pos, x2)

    pos_neg = pair(batch_pos, batch_complete)
    if gan_with_mask:
        masks = jnp.broadcast_to(mask, (batch, *mask.shape[1:])).astype(pos_neg.dtype)
        pos_neg = jnp.concatenate([pos_neg, pair(masks, masks)], axis=-1)
    scores = critic(pos_neg)
    aux = None
    if critic_has_aux:
        scores, aux = scores
    scores = jnp.asarray(scores, jnp.float32)
    pos, neg = unpair(scores)
    hinge_pos = jnp.mean(jax.nn.relu(1.0 - pos))
    hinge_neg = jnp.mean(jax.nn.relu(1.0 + neg))
    g_gan = hinge_g_loss(neg)
    g_loss = gan_loss_alpha * g_gan
    if ae_loss:
        g_loss = g_loss + ae
    out = {
        "ae_loss": ae,
        "g_loss": g_loss,
        "d_loss": 0.5 * hinge_pos + 0.5 * hinge_neg,
        "g_loss_gan": g_gan,
        "d_hinge_pos": hinge_pos,
        "d_hinge_neg": hinge_neg,
        "d_pos_neg": jnp.concatenate([pos, neg]),
        "batch_complete": batch_complete,
    }
    if critic_has_aux:
        out["critic_aux"] = aux
    return out


# =========================================================================== #
# Detection losses (Faster R-CNN; Attention R-CNN, jattn.models.attention_rcnn)
# =========================================================================== #
#
# Target assignment and losses of torchvision's Faster R-CNN (``RegionProposalNetwork``,
# ``RoIHeads``), with static shapes (per-image functions, vmapped over the batch; random
# subsets by per-image PRNG keys). Ground truth comes padded: boxes ``[B, M, 4]`` (x1, y1,
# x2, y2, image pixels) and classes ``[B, M]`` int in ``[0, K)``, ``-1`` on padding rows
# (a row is a ground-truth box when its class is >= 0 and it has positive width and height).
#
# Normalisation (torchvision's): every term is a sum over the batch's sampled anchors /
# RoIs divided by the number of sampled anchors / RoIs of the whole batch (positives and
# negatives), not by the number of positives:
#
#   rpn_objectness = sum_{sampled} BCE(logit, label) / #sampled anchors
#   rpn_box        = sum_{positive sampled} smooth_l1(delta - target, beta = 1/9) / #sampled anchors
#   roi_classification = sum_{sampled} CE(logits, label) / #sampled RoIs
#   roi_box        = sum_{foreground sampled} smooth_l1(delta_label - target, 1/9) / #sampled RoIs
#                    (or 1 - GIoU(decoded box, ground truth), same normalisation)
#
# (each count clamped at 1). RPN deltas use box-coder weights (1, 1, 1, 1), the box head
# (10, 10, 5, 5) (`jattn.ops.boxes.encode`).

from jattn.ops import boxes as _boxes  # noqa: E402

__all__ += [
    "RPN_BOX_WEIGHTS",
    "ROI_BOX_WEIGHTS",
    "gt_valid",
    "match_boxes",
    "roi_loss",
    "rpn_loss",
    "rpn_targets",
    "sample_balanced",
    "sample_rois",
    "smooth_l1",
]

RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = _boxes.DEFAULT_WEIGHTS  # (10, 10, 5, 5)
_UNIT_BOX = (0.0, 0.0, 1.0, 1.0)  # stands in for unmatched boxes, so that encode / decode stay finite


def smooth_l1(x: jax.Array, beta: float = 1.0 / 9) -> jax.Array:
    """Element-wise smooth L1 (torchvision's ``smooth_l1_loss`` before the reduction):
    ``0.5 x^2 / beta`` where ``|x| < beta``, else ``|x| - 0.5 beta``; ``beta = 0`` is ``|x|``."""
    ax = jnp.abs(x)
    if beta <= 0:
        return ax
    return jnp.where(ax < beta, 0.5 * jnp.square(x) / beta, ax - 0.5 * beta)


def gt_valid(boxes: jax.Array, classes: jax.Array) -> jax.Array:
    """``[..., M, 4]``, ``[..., M] -> [..., M]`` bool: a ground-truth row (class >= 0, width and height > 0)."""
    boxes = jnp.asarray(boxes)
    return (jnp.asarray(classes) >= 0) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


def match_boxes(iou: jax.Array, valid: jax.Array, high: float, low: float, allow_low_quality: bool):
    """torchvision's ``Matcher`` on one image.

    Args:
      iou: ``[N, M]`` IoU of N candidates (anchors, proposals) with M ground-truth boxes.
      valid: ``[M]`` bool, the real ground-truth rows.
      high, low: IoU ``>= high`` is foreground, ``< low`` background, in between ignored.
      allow_low_quality: also make foreground every candidate whose IoU with some
        ground-truth box equals that box's highest IoU (its best candidates, ties included),
        when that IoU is > 0 (torchvision has no such guard: a box overlapping nothing would
        make every non-overlapping candidate foreground).

    Returns:
      ``(matched [N] int32, labels [N] int32)``: the index of each candidate's best valid
      box (0 when there is none) and 1 (foreground), 0 (background), -1 (ignored). Without
      valid boxes every candidate is background.
    """
    iou = jnp.where(valid[None, :], iou, -1.0)
    best = jnp.max(iou, axis=1) if iou.shape[1] else jnp.full(iou.shape[:1], -1.0)
    matched = jnp.argmax(iou, axis=1).astype(jnp.int32) if iou.shape[1] else jnp.zeros(iou.shape[:1], jnp.int32)
    labels = jnp.where(best >= high, 1, jnp.where(best < low, 0, -1)).astype(jnp.int32)
    if allow_low_quality and iou.shape[1]:
        best_per_gt = jnp.max(iou, axis=0)  # [M]
        low_quality = jnp.any((iou == best_per_gt[None, :]) & valid[None, :] & (best_per_gt[None, :] > 0), axis=1)
        labels = jnp.where(low_quality, 1, labels)
    return matched, labels


def sample_balanced(labels: jax.Array, key: jax.Array, batch_size: int, positive_fraction: float):
    """torchvision's ``BalancedPositiveNegativeSampler`` on one image, with static shapes.

    ``num_pos = min(#positives, int(batch_size * positive_fraction))`` positives and
    ``min(#negatives, batch_size - num_pos)`` negatives, each a uniformly random subset
    (the top-k of uniform draws from ``key``; the same key gives the same subsets).

    Args:
      labels: ``[N]`` int: 1 positive, 0 negative, anything else never sampled.

    Returns:
      ``(positive [N] bool, negative [N] bool)`` masks of the sampled candidates.
    """
    labels = jnp.asarray(labels)
    n = labels.shape[0]
    pos, neg = labels == 1, labels == 0
    u = jax.random.uniform(key, (n,), jnp.float32)
    cap = int(batch_size * positive_fraction)
    num_pos = jnp.minimum(jnp.sum(pos), cap)
    num_neg = jnp.minimum(jnp.sum(neg), batch_size - num_pos)

    def pick(mask, count, k):
        k = min(k, n)
        if k <= 0:
            return jnp.zeros((n,), bool)
        _, idx = jax.lax.top_k(jnp.where(mask, u, -1.0), k)
        return jnp.zeros((n,), bool).at[idx].set(jnp.arange(k) < count)

    return pick(pos, num_pos, cap), pick(neg, num_neg, batch_size)


def rpn_targets(
    anchors: jax.Array,
    gt_boxes: jax.Array,
    gt_classes: jax.Array,
    key: jax.Array,
    *,
    fg_iou_thresh: float = 0.7,
    bg_iou_thresh: float = 0.3,
    batch_size: int = 256,
    positive_fraction: float = 0.5,
    weights=RPN_BOX_WEIGHTS,
) -> dict[str, jax.Array]:
    """RPN training targets of one image (torchvision ``assign_targets_to_anchors`` + sampler).

    Anchors with IoU ``>= fg_iou_thresh`` with a ground-truth box are positive, ``<
    bg_iou_thresh`` with all of them negative, and every box's best anchors (ties included)
    positive; then `sample_balanced` keeps ``batch_size`` of them (up to
    ``positive_fraction`` positive).

    Args:
      anchors: ``[A, 4]``; gt_boxes ``[M, 4]``; gt_classes ``[M]`` (-1: padding).

    Returns:
      dict of ``labels [A]`` int32 (1 / 0 / -1 before sampling), ``positive``, ``negative``
      ``[A]`` bool (sampled), ``matched [A]`` int32 (ground-truth row), ``box_targets
      [A, 4]`` (`jattn.ops.boxes.encode` of the matched box, 0 off the positives).
    """
    anchors, gt_boxes = jnp.asarray(anchors, jnp.float32), jnp.asarray(gt_boxes, jnp.float32)
    valid = gt_valid(gt_boxes, gt_classes)
    matched, labels = match_boxes(
        _boxes.box_iou(anchors, gt_boxes), valid, fg_iou_thresh, bg_iou_thresh, allow_low_quality=True
    )
    positive, negative = sample_balanced(labels, key, batch_size, positive_fraction)
    fg = (labels == 1)[:, None]
    unit = jnp.asarray(_UNIT_BOX, jnp.float32)
    target_boxes = jnp.where(fg, gt_boxes[matched] if gt_boxes.shape[0] else unit, unit)
    targets = jnp.where(fg, _boxes.encode(target_boxes, jnp.where(fg, anchors, unit), weights), 0.0)
    return {"labels": labels, "positive": positive, "negative": negative, "matched": matched,
            "box_targets": jax.lax.stop_gradient(targets)}


def rpn_loss(
    objectness: jax.Array,
    deltas: jax.Array,
    anchors: jax.Array,
    gt_boxes: jax.Array,
    gt_classes: jax.Array,
    key: jax.Array,
    *,
    beta: float = 1.0 / 9,
    **target_kw,
) -> dict[str, jax.Array]:
    """RPN losses of a batch (torchvision ``RegionProposalNetwork.compute_loss``).

    Args:
      objectness: ``[B, A]`` logits; deltas ``[B, A, 4]`` (in the order of ``anchors [A, 4]``).
      gt_boxes ``[B, M, 4]``, gt_classes ``[B, M]``: the padded ground truth.
      key: PRNG key, split into one per image for the anchor sampling.
      beta: smooth L1 beta (torchvision: 1/9).
      target_kw: `rpn_targets` keywords (thresholds, batch size, positive fraction).

    Returns:
      dict of ``rpn_objectness`` (BCE), ``rpn_box`` (smooth L1), both normalised by the
      batch's number of sampled anchors (module comment), and ``rpn_num_positive``,
      ``rpn_num_sampled`` (float32 counts).
    """
    objectness = jnp.asarray(objectness, jnp.float32)
    deltas = jnp.asarray(deltas, jnp.float32)
    keys = jax.random.split(key, objectness.shape[0])
    t = jax.vmap(lambda b, c, k: rpn_targets(anchors, b, c, k, **target_kw))(gt_boxes, gt_classes, keys)
    sampled = t["positive"] | t["negative"]
    count = jnp.sum(sampled).astype(jnp.float32)
    n = jnp.maximum(count, 1.0)
    label = t["positive"].astype(jnp.float32)
    bce = jax.nn.softplus(objectness) - objectness * label
    box = jnp.sum(smooth_l1(deltas - t["box_targets"], beta), axis=-1)
    return {
        "rpn_objectness": jnp.sum(jnp.where(sampled, bce, 0.0)) / n,
        "rpn_box": jnp.sum(jnp.where(t["positive"], box, 0.0)) / n,
        "rpn_num_positive": jnp.sum(t["positive"]).astype(jnp.float32),
        "rpn_num_sampled": count,
    }


def sample_rois(
    proposals: jax.Array,
    proposal_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_classes: jax.Array,
    key: jax.Array,
    *,
    batch_size: int = 512,
    positive_fraction: float = 0.25,
    fg_iou_thresh: float = 0.5,
    bg_iou_thresh: float = 0.5,
    add_gt_boxes: bool = True,
    weights=ROI_BOX_WEIGHTS,
) -> dict[str, jax.Array]:
    """The box head's training RoIs (torchvision ``RoIHeads.select_training_samples``).

    Per image: the ground-truth boxes are appended to the proposals (``add_gt_boxes``),
    each candidate is matched to its best box (IoU ``>= fg_iou_thresh`` foreground, ``<
    bg_iou_thresh`` background, no low-quality matches), and `sample_balanced` keeps
    ``batch_size`` (up to ``positive_fraction`` foreground). Sampled RoIs are gathered to
    the front, foreground first, into ``S = min(batch_size, P + M)`` slots (``P + M``
    without ``add_gt_boxes``: ``P``); unused slots have ``valid`` False and zero boxes.

    Args:
      proposals: ``[B, P, 4]`` (stop-gradient them); proposal_valid ``[B, P]`` bool.
      gt_boxes ``[B, M, 4]``, gt_classes ``[B, M]`` (-1: padding).
      key: PRNG key, split into one per image.

    Returns:
      dict of ``rois [B, S, 4]``, ``valid [B, S]`` bool, ``labels [B, S]`` int32 (0
      background, ``class + 1`` foreground, 0 on unused slots), ``matched_boxes [B, S, 4]``
      (the ground truth of foreground RoIs, the RoI itself elsewhere), ``box_targets
      [B, S, 4]`` (`jattn.ops.boxes.encode` with ``weights``, 0 off the foreground).
    """
    proposals = jnp.asarray(proposals, jnp.float32)
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    gt_classes = jnp.asarray(gt_classes, jnp.int32)
    proposal_valid = jnp.asarray(proposal_valid, bool)

    def one(props, pvalid, gboxes, gclasses, k):
        gvalid = gt_valid(gboxes, gclasses)
        cands = jnp.concatenate([props, gboxes]) if add_gt_boxes else props
        cvalid = jnp.concatenate([pvalid, gvalid]) if add_gt_boxes else pvalid
        matched, labels = match_boxes(
            _boxes.box_iou(cands, gboxes), gvalid, fg_iou_thresh, bg_iou_thresh, allow_low_quality=False
        )
        labels = jnp.where(cvalid, labels, -1)
        pos, neg = sample_balanced(labels, k, batch_size, positive_fraction)
        s = min(batch_size, cands.shape[0])
        rank = jnp.where(pos, 2.0, jnp.where(neg, 1.0, 0.0))
        top, idx = jax.lax.top_k(rank, s)  # foreground, then background, then unused (ties: index order)
        valid = top > 0
        fg = pos[idx]
        rois = jnp.where(valid[:, None], cands[idx], 0.0)
        m = matched[idx]
        out_labels = jnp.where(fg, gclasses[m] + 1, 0) if gboxes.shape[0] else jnp.zeros((s,), jnp.int32)
        unit = jnp.asarray(_UNIT_BOX, jnp.float32)
        gt_of = gboxes[m] if gboxes.shape[0] else jnp.broadcast_to(unit, (s, 4))
        matched_boxes = jnp.where(fg[:, None], gt_of, rois)
        targets = jnp.where(
            fg[:, None],
            _boxes.encode(jnp.where(fg[:, None], gt_of, unit), jnp.where(fg[:, None], rois, unit), weights),
            0.0,
        )
        return {"rois": rois, "valid": valid, "labels": out_labels.astype(jnp.int32),
                "matched_boxes": matched_boxes, "box_targets": targets}

    keys = jax.random.split(key, proposals.shape[0])
    out = jax.vmap(one)(proposals, proposal_valid, gt_boxes, gt_classes, keys)
    return jax.tree_util.tree_map(jax.lax.stop_gradient, out)


def roi_loss(
    class_logits: jax.Array,
    box_deltas: jax.Array,
    samples: dict[str, jax.Array],
    *,
    box_loss: str = "smooth_l1",
    beta: float = 1.0 / 9,
    weights=ROI_BOX_WEIGHTS,
) -> dict[str, jax.Array]:
    """Box-head losses of a batch (torchvision ``fastrcnn_loss``).

    Args:
      class_logits: ``[B, S, K + 1]`` (column 0: background).
      box_deltas: ``[B, S, K, 4]`` class-specific deltas (relative to the RoI, ``weights``).
      samples: `sample_rois`'s dict (``rois``, ``valid``, ``labels``, ``matched_boxes``,
        ``box_targets``) for the same RoIs.
      box_loss: ``"smooth_l1"`` (torchvision: on the deltas of the RoI's ground-truth class,
        ``beta`` 1/9) or ``"giou"`` (``1 - GIoU`` of the decoded box of that class and the
        ground-truth box).

    Returns:
      dict of ``roi_classification`` (cross-entropy), ``roi_box``, both normalised by the
      batch's number of sampled RoIs (module comment), ``roi_num_foreground``,
      ``roi_num_sampled`` (float32 counts).
    """
    if box_loss not in ("smooth_l1", "giou"):
        raise ValueError(f"box_loss must be 'smooth_l1' or 'giou', got {box_loss!r}")
    class_logits = jnp.asarray(class_logits, jnp.float32)
    box_deltas = jnp.asarray(box_deltas, jnp.float32)
    valid, labels = samples["valid"], samples["labels"]
    count = jnp.sum(valid).astype(jnp.float32)
    n = jnp.maximum(count, 1.0)
    logp = jax.nn.log_softmax(class_logits, axis=-1)
    ce = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    fg = valid & (labels > 0)
    cls_index = jnp.clip(labels - 1, 0, box_deltas.shape[2] - 1)
    pred = jnp.take_along_axis(box_deltas, cls_index[:, :, None, None], axis=2)[:, :, 0]  # [B, S, 4]
    if box_loss == "smooth_l1":
        per_roi = jnp.sum(smooth_l1(pred - samples["box_targets"], beta), axis=-1)
    else:
        unit = jnp.asarray(_UNIT_BOX, jnp.float32)
        rois = jnp.where(fg[..., None], samples["rois"], unit)
        gt = jnp.where(fg[..., None], samples["matched_boxes"], unit)
        per_roi = 1.0 - _boxes.giou(_boxes.decode(pred, rois, weights), gt)
    return {
        "roi_classification": jnp.sum(jnp.where(valid, ce, 0.0)) / n,
        "roi_box": jnp.sum(jnp.where(fg, per_roi, 0.0)) / n,
        "roi_num_foreground": jnp.sum(fg).astype(jnp.float32),
        "roi_num_sampled": count,
    }
