"""Attention as pure functions on arrays (jit / vmap / grad friendly).

Shape letters used throughout (as in :func:`jax.nn.dot_product_attention`)::

    B  batch size
    T  query length (target)
    S  key / value length (source)
    N  number of heads
    H  head dimension
    D  feature dimension of a single-head ([B, T, D]) input
    A  hidden size of additive attention

Masks are boolean, ``True`` meaning "attend". Biases are added to the logits.
"""
from __future__ import annotations

from typing import Literal

import einops
import jax
import jax.numpy as jnp
import numpy as np

Implementation = Literal["xla", "cudnn"] | None

__all__ = [
    "dot_product_attention",
    "attention_weights",
    "additive_attention",
    "multi_head_attention",
    "relative_position_index",
]


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _check_rank(name: str, x: jax.Array, ranks: tuple[int, ...]) -> None:
    if x.ndim not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(f"{name} must have rank {want}, got shape {tuple(x.shape)}")


def _large_negative(dtype) -> jax.Array:
    """The masking value used by ``jax.nn.dot_product_attention`` (finite)."""
    big = min(float(jnp.finfo(dtype).max), float(jnp.finfo(jnp.float32).max))
    return jnp.asarray(-0.7 * big, dtype=dtype)


def _to_4d_logit_shape(name: str, arr, single_head: bool) -> jax.Array | None:
    """Brings a mask / bias to rank 4, broadcastable to ``[B, N, T, S]``.

    For single-head (3-D) inputs ``arr`` is broadcastable to ``[B, T, S]`` and a
    head axis is inserted; for 4-D inputs it is broadcastable to ``[B, N, T, S]``
    and leading axes are prepended (numpy broadcasting rules).
    """
    if arr is None:
        return None
    arr = jnp.asarray(arr)
    max_rank = 3 if single_head else 4
    if arr.ndim > max_rank:
        want = "[B, T, S]" if single_head else "[B, N, T, S]"
        raise ValueError(
            f"{name} must be broadcastable to {want}, got shape {tuple(arr.shape)}"
        )
    arr = arr.reshape((1,) * (max_rank - arr.ndim) + arr.shape)
    if single_head:
        arr = arr[:, None]
    return arr


def _check_qkv(query, key, value) -> bool:
    """Validates ``[B, T, N, H]`` / ``[B, T, D]`` q, k, v; returns single_head."""
    _check_rank("query", query, (3, 4))
    if key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError(
            "query, key and value must have the same rank, got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if key.shape[:-1] != value.shape[:-1]:
        lead = "[B, S]" if query.ndim == 3 else "[B, S, N]"
        raise ValueError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} must share {lead}"
        )
    if query.shape[0] != key.shape[0]:
        raise ValueError(
            f"batch sizes differ: query {query.shape[0]} vs key {key.shape[0]}"
        )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query and key feature dims differ: {query.shape[-1]} vs {key.shape[-1]}"
        )
    if query.ndim == 4 and query.shape[2] != key.shape[2]:
        raise ValueError(
            f"query and key head counts differ: {query.shape[2]} vs {key.shape[2]}"
        )
    return query.ndim == 3


def _pad_last(x: jax.Array, width: int) -> jax.Array:
    """Zero-pads the last axis of ``x`` to ``width``."""
    extra = width - x.shape[-1]
    if extra == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


# --------------------------------------------------------------------------- #
# scaled dot-product attention
# --------------------------------------------------------------------------- #
def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    scale: float | None = None,
    implementation: Implementation = None,
) -> jax.Array:
    """``softmax(scale * Q K^T + bias) V``, built on ``jax.nn.dot_product_attention``.

    Args:
      query: ``[B, T, N, H]`` or single-head ``[B, T, D]``.
      key: ``[B, S, N, H]`` or ``[B, S, D]``.
      value: ``[B, S, N, Hv]`` or ``[B, S, Dv]``. The value width may differ
        from the query / key width (handled by zero-padding the narrower side
        before calling ``jax.nn.dot_product_attention``).
      bias: added to the logits; broadcastable to ``[B, N, T, S]`` (4-D inputs)
        or ``[B, T, S]`` (3-D inputs).
      mask: boolean, ``True`` = attend; same broadcasting as ``bias``.
      scale: logit scale; ``None`` means ``1 / sqrt(H)`` (or ``1 / sqrt(D)``).
        Pass ``scale=1.0`` for unscaled (SAGAN / non-local) attention.
      implementation: ``None`` / ``"xla"`` or ``"cudnn"`` (GPU only; raises a
        ``RuntimeError`` from JAX where cuDNN is absent). cuDNN also needs
        fp16 / bf16 inputs and a supported head width, here
        ``max(H, Hv)`` after the zero-padding above.

    Returns:
      ``[B, T, N, Hv]`` (or ``[B, T, Dv]`` for 3-D inputs), in the inputs' dtype.
      q, k, v (and a bias) are promoted to a common dtype first.
    """
    query, key, value = (jnp.asarray(a) for a in (query, key, value))
    single_head = _check_qkv(query, key, value)
    dtype = jnp.result_type(query, key, value)
    query, key, value = (a.astype(dtype) for a in (query, key, value))
    bias = _to_4d_logit_shape("bias", bias, single_head)
    mask = _to_4d_logit_shape("mask", mask, single_head)
    if mask is not None:
        mask = mask.astype(bool)
    if single_head:
        query, key, value = (a[:, :, None, :] for a in (query, key, value))
    if scale is None:
        scale = 1.0 / float(np.sqrt(query.shape[-1]))
    # jax.nn.dot_product_attention needs key.shape == value.shape. When the value
    # width differs (SAGAN: q, k at C // 8, v at C), zero-pad the narrower side:
    # zero columns change neither the logits nor the kept output columns.
    width, v_width = max(query.shape[-1], value.shape[-1]), value.shape[-1]
    query, key, value = (_pad_last(a, width) for a in (query, key, value))
    out = jax.nn.dot_product_attention(
        query, key, value, bias=bias, mask=mask, scale=scale,
        implementation=implementation,
    )[..., :v_width]
    return out[:, :, 0, :] if single_head else out


def attention_weights(
    query: jax.Array,
    key: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """The softmax weights that :func:`dot_product_attention` uses (jnp, any device).

    Mirrors ``jax.nn.dot_product_attention``'s XLA path: logits in at least
    float32, masked logits set to a large finite negative, softmax in float32.

    Args:
      query: ``[B, T, N, H]`` or ``[B, T, D]``.
      key: ``[B, S, N, H]`` or ``[B, S, D]``.
      bias, mask, scale: as in :func:`dot_product_attention`.

    Returns:
      ``[B, N, T, S]`` weights (``N = 1`` for 3-D inputs) in the query's dtype;
      each row over ``S`` sums to 1.
    """
    query, key = jnp.asarray(query), jnp.asarray(key)
    single_head = _check_qkv(query, key, key)
    if single_head:
        query, key = query[:, :, None, :], key[:, :, None, :]
    bias = _to_4d_logit_shape("bias", bias, single_head)
    mask = _to_4d_logit_shape("mask", mask, single_head)
    if scale is None:
        scale = 1.0 / np.sqrt(query.shape[-1])
    logits_dtype = jnp.promote_types(jnp.result_type(query, key), jnp.float32)
    logits = jnp.einsum(
        "btnh,bsnh->bnts", query, key, preferred_element_type=logits_dtype
    )
    logits = logits * jnp.asarray(scale, logits_dtype)
    if bias is not None:
        logits = (logits + bias).astype(logits_dtype)
    if mask is not None:
        logits = jnp.where(mask.astype(bool), logits, _large_negative(logits_dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return probs.astype(jnp.result_type(query, key))


# --------------------------------------------------------------------------- #
# additive (Bahdanau) attention
# --------------------------------------------------------------------------- #
def additive_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    w_q: jax.Array,
    w_k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Bahdanau attention: ``score = v^T tanh(W_q q + W_k k)``, softmax over keys.

    Args:
      query: ``[B, T, Dq]``.
      key: ``[B, S, Dk]``.
      value: ``[B, S, Dv]``.
      w_q: ``[Dq, A]``.
      w_k: ``[Dk, A]``.
      v: ``[A]``.
      mask: boolean, broadcastable to ``[B, T, S]``, ``True`` = attend. Masked
        keys get weight exactly 0 (a fully masked row becomes uniform).

    Returns:
      ``(out [B, T, Dv], weights [B, T, S])``.
    """
    query, key, value, w_q, w_k, v = (
        jnp.asarray(a) for a in (query, key, value, w_q, w_k, v)
    )
    for name, arr, rank in (
        ("query", query, 3), ("key", key, 3), ("value", value, 3),
        ("w_q", w_q, 2), ("w_k", w_k, 2), ("v", v, 1),
    ):
        _check_rank(name, arr, (rank,))
    if key.shape[:2] != value.shape[:2]:
        raise ValueError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} must share [B, S]"
        )
    if query.shape[0] != key.shape[0]:
        raise ValueError(f"batch sizes differ: query {query.shape[0]} vs key {key.shape[0]}")
    if w_q.shape[0] != query.shape[-1]:
        raise ValueError(f"w_q {tuple(w_q.shape)} does not match query dim {query.shape[-1]}")
    if w_k.shape[0] != key.shape[-1]:
        raise ValueError(f"w_k {tuple(w_k.shape)} does not match key dim {key.shape[-1]}")
    if not (w_q.shape[1] == w_k.shape[1] == v.shape[0]):
        raise ValueError(
            "attention dims differ: w_q "
            f"{w_q.shape[1]}, w_k {w_k.shape[1]}, v {v.shape[0]}"
        )
    q_proj = query @ w_q  # [B, T, A]
    k_proj = key @ w_k  # [B, S, A]
    hidden = jnp.tanh(q_proj[:, :, None, :] + k_proj[:, None, :, :])  # [B, T, S, A]
    scores = jnp.einsum("btsa,a->bts", hidden, v)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.ndim > 3:
            raise ValueError(
                f"mask must be broadcastable to [B, T, S], got shape {tuple(mask.shape)}"
            )
        scores = jnp.where(mask.astype(bool), scores, _large_negative(scores.dtype))
    weights = jax.nn.softmax(scores.astype(jnp.promote_types(scores.dtype, jnp.float32)))
    weights = weights.astype(scores.dtype)
    out = jnp.einsum("bts,bsd->btd", weights, value)
    return out, weights


# --------------------------------------------------------------------------- #
# multi-head attention
# --------------------------------------------------------------------------- #
def multi_head_attention(
    x_q: jax.Array,
    x_kv: jax.Array,
    w_q: jax.Array,
    w_k: jax.Array,
    w_v: jax.Array,
    w_o: jax.Array,
    *,
    num_heads: int,
    b_q: jax.Array | None = None,
    b_k: jax.Array | None = None,
    b_v: jax.Array | None = None,
    b_o: jax.Array | None = None,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    implementation: Implementation = None,
) -> jax.Array:
    """Multi-head attention: project, split heads, attend, merge, project out.

    Args:
      x_q: queries ``[B, T, Dq]``.
      x_kv: keys / values source ``[B, S, Dkv]``.
      w_q: ``[Dq, F]``; ``w_k``, ``w_v``: ``[Dkv, F]``; ``F = num_heads * H``.
      w_o: ``[F, Do]``.
      num_heads: N; must divide F.
      b_q, b_k, b_v: optional ``[F]`` projection biases; ``b_o`` optional ``[Do]``.
      mask, bias: broadcastable to ``[B, N, T, S]`` (see :func:`dot_product_attention`).
      scale: logit scale, default ``1 / sqrt(H)``.
      implementation: passed to ``jax.nn.dot_product_attention``.

    Returns:
      ``[B, T, Do]``.
    """
    x_q, x_kv = jnp.asarray(x_q), jnp.asarray(x_kv)
    _check_rank("x_q", x_q, (3,))
    _check_rank("x_kv", x_kv, (3,))
    for name, w in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v), ("w_o", w_o)):
        _check_rank(name, jnp.asarray(w), (2,))
    if x_q.shape[0] != x_kv.shape[0]:
        raise ValueError(f"batch sizes differ: x_q {x_q.shape[0]} vs x_kv {x_kv.shape[0]}")
    if w_q.shape[0] != x_q.shape[-1]:
        raise ValueError(f"w_q {tuple(w_q.shape)} does not match x_q dim {x_q.shape[-1]}")
    for name, w in (("w_k", w_k), ("w_v", w_v)):
        if w.shape[0] != x_kv.shape[-1]:
            raise ValueError(
                f"{name} {tuple(w.shape)} does not match x_kv dim {x_kv.shape[-1]}"
            )
    features = w_q.shape[1]
    if not (w_k.shape[1] == w_v.shape[1] == w_o.shape[0] == features):
        raise ValueError(
            "projection widths differ: w_q/w_k/w_v out "
            f"{w_q.shape[1]}/{w_k.shape[1]}/{w_v.shape[1]}, w_o in {w_o.shape[0]}"
        )
    if num_heads < 1 or features % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide the projection width {features}")

    def project(x, w, b):
        y = jnp.einsum("bld,df->blf", x, w)
        return y if b is None else y + b

    q, k, v = project(x_q, w_q, b_q), project(x_kv, w_k, b_k), project(x_kv, w_v, b_v)
    q, k, v = (einops.rearrange(a, "b l (n h) -> b l n h", n=num_heads) for a in (q, k, v))
    o = dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=scale, implementation=implementation
    )
    o = einops.rearrange(o, "b t n h -> b t (n h)")
    return project(o, w_o, b_o)


# --------------------------------------------------------------------------- #
# relative positions
# --------------------------------------------------------------------------- #
def relative_position_index(height: int, width: int) -> np.ndarray:
    """Static index into a ``[(2H-1)(2W-1), N]`` relative-position bias table.

    ``index[i, j] = (dy + H - 1) * (2W - 1) + (dx + W - 1)`` with
    ``(dy, dx) = pos(i) - pos(j)`` for row-major positions ``i, j`` of an
    ``H x W`` grid.

    Returns:
      ``int32`` numpy array ``[H*W, H*W]``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[:, None] - ys[None, :] + height - 1
    dx = xs[:, None] - xs[None, :] + width - 1
    return (dy * (2 * width - 1) + dx).astype(np.int32)
