"""Class-embedding attention over the proposals of an image (the attention of Attention R-CNN).

Every one of ``K`` learned class embeddings ``h_k`` attends over the ``R`` proposal features
``x_i`` of an image (the box-head features of :class:`jattn.models.AttentionRCNN`)::

    e_ki = f(x_i, h_k)                  score of proposal i for class embedding k
    a_ki = softmax_i(e_k)_i             over the image's valid proposals (padding: a = 0)
    z_k  = sum_i a_ki x_i               class k's attended context  [K, D]

with ``f`` either

* ``score="dot"``: the scaled dot product of the projected proposal and the embedding,
  ``e_ki = h_k . (W x_i) / sqrt(A)`` (``W: D -> A``, ``h_k`` in ``R^A``), computed by
  :func:`jattn.ops.attention.attention_weights`; or
* ``score="additive"``: Bahdanau, ``e_ki = v^T tanh(W x_i + U h_k)`` (``W: D -> A``,
  ``U: A -> A``, ``v`` in ``R^A``), computed by :func:`jattn.ops.attention.additive_attention`.

How the contexts feed the heads: each proposal gathers the contexts of the classes it
resembles, weighted by the same scores normalised over the classes instead of the proposals,
and adds a projection of that to its own feature::

    b_ik = softmax_k(e_.i)_k            (the same e, normalised over the K classes)
    c_i  = sum_k b_ik z_k               proposal i's context  [R, D]
    x_i' = x_i + W_o c_i                (W_o: D -> D, with bias)

``x'`` goes to the classification and box-regression layers. Padded proposals (``valid``
False) get ``a = 0`` (they add nothing to any ``z_k``) and ``x_i' = x_i``; an image without a
valid proposal has ``z = 0``.

Cost: ``O(K R A)`` for the scores (the additive ``tanh`` runs twice, once per
normalisation: ``2 B K R A`` elements), ``O(K R D)`` for ``z`` and ``c``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jattn.nn._util import Dtype, compute_dtype
from jattn.ops import attention as ops

__all__ = ["ProposalAttention", "SCORES"]

#: The score functions ``f(x, h)`` of :class:`ProposalAttention`.
SCORES = ("dot", "additive")


class ProposalAttention(nn.Module):
    """Class embeddings ``h [K, A]`` attending over an image's proposals (see the module docstring).

    Attributes:
      num_classes: K, the number of class embeddings (the foreground classes).
      score: ``"dot"`` (scaled dot product) or ``"additive"`` (Bahdanau).
      attention_dim: A, the width of the embeddings and of the projected proposals.
      return_attention: also return a dict of ``weights`` ``a [B, K, R]`` (float32; sums to 1
        over each image's valid proposals, 0 on padding), ``class_weights``
        ``b [B, R, K]`` (float32, 0 on padded proposals), ``context`` ``z [B, K, D]``.

    Call: ``x [B, R, D]``, ``valid [B, R]`` bool (None: all valid) ``-> x' [B, R, D]``.
    Params: ``class_embeddings`` ``[K, A]``, ``w_x`` ``[D, A]``, with ``"additive"`` also
    ``w_h`` ``[A, A]`` and ``v`` ``[A]``; ``output`` (Dense D -> D).
    """

    num_classes: int
    score: str = "dot"
    attention_dim: int = 256
    return_attention: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array | None = None):
        x = jnp.asarray(x)
        if x.ndim != 3:
            raise ValueError(f"x must be [B, R, D] (proposal features), got shape {tuple(x.shape)}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.num_classes < 1 or self.attention_dim < 1:
            raise ValueError(
                f"num_classes and attention_dim must be >= 1, got {self.num_classes}, {self.attention_dim}"
            )
        b, r, d = x.shape
        valid = jnp.ones((b, r), bool) if valid is None else jnp.asarray(valid, bool)
        if valid.shape != (b, r):
            raise ValueError(f"valid must be [B, R] = {(b, r)}, got shape {tuple(valid.shape)}")
        dtype = compute_dtype(x, self.dtype, self.param_dtype)
        x = x.astype(dtype)
        k, a_dim = self.num_classes, self.attention_dim

        h = self.param("class_embeddings", nn.initializers.normal(1.0), (k, a_dim), self.param_dtype).astype(dtype)
        w_x = self.param("w_x", nn.initializers.lecun_normal(), (d, a_dim), self.param_dtype).astype(dtype)
        hb = jnp.broadcast_to(h[None], (b, k, a_dim))
        mask = valid[:, None, :]  # [B, 1, R]: class k attends to the valid proposals
        if self.score == "dot":
            xp = x @ w_x  # [B, R, A]
            weights = ops.attention_weights(hb, xp, mask=mask)[:, 0]  # [B, K, R] softmax over R
            class_weights = ops.attention_weights(xp, hb)[:, 0]  # [B, R, K] softmax over K
        else:
            w_h = self.param("w_h", nn.initializers.lecun_normal(), (a_dim, a_dim), self.param_dtype).astype(dtype)
            v = self.param("v", nn.initializers.normal(a_dim**-0.5), (a_dim,), self.param_dtype).astype(dtype)
            _, weights = ops.additive_attention(hb, x, x, w_h, w_x, v, mask=mask)  # [B, K, R]
            _, class_weights = ops.additive_attention(x, hb, hb, w_x, w_h, v)  # [B, R, K]
        vf = valid.astype(jnp.float32)
        # exact zeros on padding (and everywhere in an image without valid proposals)
        weights = weights.astype(jnp.float32) * vf[:, None, :]
        class_weights = class_weights.astype(jnp.float32) * vf[:, :, None]
        z = jnp.einsum("bkr,brd->bkd", weights.astype(dtype), x)  # z_k = sum_i a_ki x_i
        c = jnp.einsum("brk,bkd->brd", class_weights.astype(dtype), z)  # c_i = sum_k b_ik z_k
        y = x + nn.Dense(d, dtype=dtype, param_dtype=self.param_dtype, name="output")(c) * vf[..., None].astype(dtype)
        if self.return_attention:
            return y, {"weights": weights, "class_weights": class_weights, "context": z}
        return y
