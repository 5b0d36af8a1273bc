"""DeepFill's contextual attention (Yu et al., CVPR 2018) as a batched pure function.

Numerically the official TF1 op (`inpaint_ops.contextual_attention` of
JiahuiYu/generative_inpainting), step by step as `shared/specs/contextual_attention.md`
describes it, but batched (no loop over images), with an optional mask per image, and an
optional blocked evaluation whose memory grows with N x block instead of N^2.

Notation: B, H, W, C = f's shape; r = rate; h, w = H // r, W // r; N = h * w query cells;
L = h * w background patches (f and b have the same size).

The two heavy steps are batched matrix products:
  scores  C = Fr @ Br^T  [B, N, k*C] x [B, L, k*C]                  -> [B, N, L]
  paste   Y = P @ Bblk   [B, (h+1)(w+1), (h+1)(w+1)] x [.., r*r*C] -> the padded output
Fr and Br are the 1 x k horizontal windows of the downsampled f and b, one row per cell. The
official scores, the products of f's k x k windows with b's L2-normalised k x k patches, are
the sum over the k row offsets o of C shifted diagonally by o rows (query row y + o against
key row y' + o, zero outside the map), divided by each patch's norm: k times fewer FLOPs
than a product of the k x k windows. Bblk are the r x r blocks of padded b and P is the sum
of four diagonal shifts of the attention A. That is the official
`conv2d_transpose(A, raw 2r x 2r patches, strides=r) / 4` rearranged so the product has
r*r*C columns instead of (2r)^2 C: 4x fewer paste FLOPs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from jattn.ops.conv import extract_patches as _extract_patches
from jattn.ops.conv import same_padding as _same_padding
from jattn.ops.resize import resize_nearest_align_corners

__all__ = ["contextual_attention", "ContextualAttentionOutput"]


class ContextualAttentionOutput(NamedTuple):
    """`y` [B, H, W, C] (the official op's first output); `offsets` int32 [B, h, w, 2]."""

    y: jax.Array
    offsets: jax.Array


# --------------------------------------------------------------------------- helpers


def _in_memory(fn, x: jax.Array, when: jax.Array) -> jax.Array:
    """fn(x), computed on its own and kept as one array in memory.

    `when` must be true at run time (a traced value, so XLA cannot fold it): fn runs in a
    branch of a conditional, which XLA fuses neither with what makes x nor with what reads
    the result. Without it, XLA fuses the stages of the blocked scores into each other and
    keeps their shifted terms, arrays as large as the scores, in memory instead.
    """
    out = jax.eval_shape(fn, x)
    return jax.lax.cond(when, fn, lambda _: jnp.zeros(out.shape, out.dtype), x)


def _diag_shift(s: jax.Array, d: int) -> jax.Array:
    """t[b, u, q] = s[b, u + d, q + d], zero where out of range. s: [B, U, L]."""
    if d == 0:
        return s
    if d > 0:
        return jnp.pad(s[:, d:, d:], ((0, 0), (0, d), (0, d)))
    return jnp.pad(s[:, :d, :d], ((0, 0), (-d, 0), (-d, 0)))


def _window_offsets(k: int) -> range:
    """Offsets d of a k-wide 'SAME' window's taps from its centre (as TF pads): out[p] reads
    in[p + d]. The fuse step's identity-kernel conv and the k x k matching windows use them."""
    before = (k - 1) // 2
    return range(-before, k - before)


def _row_major_fuse(s: jax.Array, offsets, valid=None) -> jax.Array:
    """sum_d s[:, u + d, q + d] (zero outside), each term times valid(d) [U] if given."""
    out = 0.0
    for d in offsets:
        t = _diag_shift(s, d)
        out = out + (t if valid is None else t * valid(d)[None, :, None])
    return out


def _col_major_fuse(s: jax.Array, offsets, h: int, w: int, queries=None) -> jax.Array:
    """sum_e of the column-major shift by e on the key axis and on the query axis.

    `queries(s, e)` overrides the query-side shift (blocked path); by default both axes
    of s [B, h * w, h * w] are shifted by `_cm_shift`.
    """
    out = 0.0
    for e in offsets:
        q = _cm_shift(s, e, h, w, axis=1) if queries is None else queries(s, e)
        out = out + _cm_shift(q, e, h, w, axis=2)
    return out


def _fuse_dense_forward(s: jax.Array, h: int, w: int, fuse_k: int) -> jax.Array:
    offsets = _window_offsets(fuse_k)
    return _col_major_fuse(_row_major_fuse(s, offsets), offsets, h, w)


def _fuse_dense_adjoint(g: jax.Array, h: int, w: int, fuse_k: int) -> jax.Array:
    """The fuse's adjoint: it is linear and each shift's adjoint is the opposite shift, so
    the adjoint is the two stages in reverse order with negated offsets, about half the
    cost of what reverse mode derives from the shifts' pads and slices."""
    negated = tuple(-d for d in _window_offsets(fuse_k))
    return _row_major_fuse(_col_major_fuse(g, negated, h, w), negated)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _fuse_dense(s: jax.Array, h: int, w: int, fuse_k: int) -> jax.Array:
    """The fuse step on all scores s [B, N, L] (N = L = h * w). Its tangent is the fuse of
    the score tangent written as the transpose of `_fuse_dense_adjoint`, so reverse mode
    (transposing it) runs the adjoint, and forward mode works to any order."""
    return _fuse_dense_forward(s, h, w, fuse_k)


@_fuse_dense.defjvp
def _fuse_dense_jvp(h, w, fuse_k, primals, tangents):
    (s,), (ds,) = primals, tangents
    y = _fuse_dense(s, h, w, fuse_k)
    adjoint = functools.partial(_fuse_dense_adjoint, h=h, w=w, fuse_k=fuse_k)
    (dy,) = jax.linear_transpose(adjoint, jax.ShapeDtypeStruct(y.shape, y.dtype))(ds)
    return y, dy


def _fuse_block(s: jax.Array, *, y0, rows: int, h: int, w: int, fuse_k: int) -> jax.Array:
    """The official 'fuse' step for a block of query rows.

    s: [B, U, L] scores of the flat (row-major) query positions y0 * w - a * (w + 1) ...
    (y0 + rows) * w + b * (w + 1) - 1, taken modulo N = h * w, where the fuse offsets run
    from -a to b (`_block_extent`). Returns the fused scores of rows y0 ... y0 + rows:
    [B, rows * w, L].

    The official code sums S[p + d, q + d] over d with (p, q) flattened row-major (wrapping
    across row ends, zero beyond the ends of the flattened ranges), then the same with both
    axes flattened column-major (p' = x * h + y). The column-major stage reads rows
    y0 - a ... y0 + rows + b - 1 of the row-major stage, which reads a cells before and b
    after each of them: the extended range. Everything here is slicing and padding (no
    gathers), so the backward pass has no scatters either.
    """
    offsets = _window_offsets(fuse_k)
    a, _ = _block_extent(offsets)
    n_total = h * w
    # Row-major stage on the extended range. Zero padding at its ends only reaches its first
    # a and last b cells, which the column-major stage does not read; the mask removes the
    # (modular) wrap from the last global position to the first.
    p_ext = (y0 * w - a * (w + 1) + jnp.arange(s.shape[1])) % n_total

    def valid(d):
        return ((p_ext + d >= 0) & (p_ext + d < n_total)).astype(s.dtype)

    s1 = _in_memory(lambda x: _row_major_fuse(x, offsets, valid), s, y0 >= 0)

    def queries(x, e):
        return _cm_shift_block_queries(x, e, y0, rows, a, h, w)

    return _col_major_fuse(s1, offsets, h, w, queries)


def _block_extent(offsets) -> tuple[int, int]:
    """(a, b): a block of query rows needs the fuse step's scores of a rows and a cells
    before it and b rows and b cells after it, for fuse offsets -a ... b."""
    return -min(0, offsets[0]), max(0, offsets[-1])


def _shift_axis(x: jax.Array, k: int, axis: int) -> jax.Array:
    """t[.., i, ..] = x[.., i + k, ..] along `axis`, zero where out of range."""
    if k == 0:
        return x
    n = x.shape[axis]
    widths = [(0, 0)] * x.ndim
    if k > 0:
        widths[axis] = (0, k)
        return jnp.pad(jax.lax.slice_in_dim(x, k, n, axis=axis), widths)
    widths[axis] = (-k, 0)
    return jnp.pad(jax.lax.slice_in_dim(x, 0, n + k, axis=axis), widths)


def _cm_shift(s: jax.Array, e: int, h: int, w: int, axis: int) -> jax.Array:
    """Shift a flattened h x w grid axis by e in column-major order, zero beyond the ends.

    t[.., (y, x), ..] = s[.., the position whose column-major index is x * h + y + e, ..]:
    (y + e, x) inside the column, else a row of the next (previous) column. |e| < h.
    """
    if e == 0:
        return s
    shape = s.shape
    x = s.reshape(*shape[:axis], h, w, *shape[axis + 1 :])
    row, col = axis, axis + 1
    if e > 0:  # rows y >= h - e read (y + e - h, x + 1)
        wrap = _shift_axis(jax.lax.slice_in_dim(x, 0, e, axis=row), 1, col)
        t = jnp.concatenate([jax.lax.slice_in_dim(x, e, h, axis=row), wrap], axis=row)
    else:  # rows y < -e read (y + e + h, x - 1)
        wrap = _shift_axis(jax.lax.slice_in_dim(x, h + e, h, axis=row), -1, col)
        t = jnp.concatenate([wrap, jax.lax.slice_in_dim(x, 0, h + e, axis=row)], axis=row)
    return t.reshape(shape)


def _cm_shift_block_queries(s1: jax.Array, e: int, y0, rows: int, a: int, h: int, w: int) -> jax.Array:
    """The query side of `_cm_shift` for a block of rows y0 .. y0 + rows.

    s1: [B, U, L], the extended range of `_fuse_block` (row y0 starts at a * (w + 1))
    -> [B, rows * w, L]. Row y reads row y + e; where y + e leaves [0, h) (the global
    column-major wrap) it also moves one column, with zero beyond the ends of the grid.
    """
    batch, _, keys = s1.shape
    start = a * (w + 1) + e * w
    t = jax.lax.slice_in_dim(s1, start, start + rows * w, axis=1).reshape(batch, rows, w, keys)
    if e != 0:
        y = y0 + jnp.arange(rows) + e
        wraps = ((y < 0) | (y >= h))[None, :, None, None]
        t = jnp.where(wraps, _shift_axis(t, 1 if e > 0 else -1, axis=2), t)
    return t.reshape(batch, rows * w, keys)


def _row_windows(x: jax.Array, ksize: int) -> jax.Array:
    """The 1 x k horizontal windows of x [B, H, W, C] ('SAME', zero padded): [B, H, W, k*C]."""
    return jnp.concatenate([_shift_axis(x, ox, axis=2) for ox in _window_offsets(ksize)], axis=-1)


def _window_scores(fq: jax.Array, b_rows: jax.Array, ksize: int, row_valid=None, *, precision, acc_dtype) -> jax.Array:
    """Products of f's k x k windows with b's k x k patches, from products of 1 x k windows.

    fq: [B, U + (k - 1) w, k*C], the 1 x k windows (`_row_windows`) of U consecutive flat
    (row-major) query positions and of the k - 1 rows of positions their k x k windows
    reach before and after them; b_rows: [B, h, w, k*C], b's. row_valid(oy): [U] 0/1,
    whether each query's row at offset oy lies inside the map (None: fq's extra rows are
    zeros where they leave it). Returns [B, U, h * w]: S[u, q] = sum_oy Frow[u + oy w] .
    Brow[q + oy w] over the k row offsets, zero where a row leaves the map: the product of
    the zero-padded k x k windows of `extract_patches`, in k times fewer FLOPs (a product
    with k*C columns instead of k*k*C, then k shifted sums).
    """
    batch, length, kc = fq.shape
    _, h, w, _ = b_rows.shape
    u_count = length - (ksize - 1) * w
    c = jnp.einsum("bpc,bqc->bpq", fq, b_rows.reshape(batch, h * w, kc),
                   precision=precision, preferred_element_type=acc_dtype)
    c = c.reshape(batch, length, h, w)
    before = (ksize - 1) // 2
    s = 0.0
    for oy in _window_offsets(ksize):
        # Queries u + oy w are a slice (fq holds them); key rows shift by oy.
        t = _shift_axis(jax.lax.slice_in_dim(c, (before + oy) * w, (before + oy) * w + u_count, axis=1), oy, axis=2)
        s = s + (t if row_valid is None else t * row_valid(oy)[None, :, None, None])
    return s.reshape(batch, u_count, h * w)


def _paste(a: jax.Array, blocks: jax.Array, *, rows: int, h: int, w: int, rate: int, precision) -> jax.Array:
    """The official `conv2d_transpose(a, raw_patches, strides=r)` for a block of rows.

    a: [B, rows * w, L] attention of the block's cells; blocks: [B, (h + 1) * (w + 1), r*r*C],
    the r x r blocks of b padded as for the raw 2r x 2r patches. Returns the padded output
    rows [B, (rows + 1) r, (w + 1) r, C].

    Each raw patch is the 2 x 2 group of blocks starting at its own block, so
    out[g] = sum_{a, c in {0, 1}} sum_q A[g - (a, c), q] blocks[q + (a, c)]
           = sum_q' P[g, q'] blocks[q'],  P = sum of four diagonal shifts of A.
    The four shifts cost additions on A; the product then has r*r*C columns instead of the
    (2r)^2 C of pasting raw patches (4x fewer FLOPs than the official algorithm).
    """
    batch = a.shape[0]
    a = a.reshape(batch, rows, w, h, w)
    p = 0.0
    for dy in (0, 1):
        for dx in (0, 1):
            p = p + jnp.pad(a, ((0, 0), (dy, 1 - dy), (dx, 1 - dx), (dy, 1 - dy), (dx, 1 - dx)))
    p = p.reshape(batch, (rows + 1) * (w + 1), (h + 1) * (w + 1))
    out = jnp.einsum("bgq,bqk->bgk", p.astype(blocks.dtype), blocks, precision=precision,
                     preferred_element_type=jnp.promote_types(blocks.dtype, jnp.float32))
    return rearrange(out, "b (gy gx) (u v c) -> b (gy u) (gx v) c", gy=rows + 1, u=rate, v=rate)


def _attend(s: jax.Array, mm: jax.Array, softmax_scale: float) -> tuple[jax.Array, jax.Array]:
    """The official mask, softmax, mask and first argmax of fused scores s [B, U, L] with
    patch validity mm [1 or B, 1, L]: (attention [B, U, L], argmax int32 [B, U])."""
    a = jax.nn.softmax(s * mm * softmax_scale, axis=-1) * mm
    return a, jnp.argmax(a, axis=-1).astype(jnp.int32)


def _choose_rows(block_size: int | None, h: int, w: int, extra: int) -> int:
    """Query rows per block: whole rows, a divisor of h; h (dense) when blocking gains
    nothing (a block's scores would cover all h rows: `extra`, the rows a block adds)."""
    if block_size is None:
        return h
    rows = max(1, block_size // w)
    while h % rows:
        rows -= 1
    if rows + extra >= h:
        return h
    return rows


# --------------------------------------------------------------------------- validation


def _check_inputs(f, b, mask, ksize, stride, rate, fuse_k, block_size):
    for name, x in (("f", f), ("b", b)):
        if x.ndim != 4:
            raise ValueError(f"contextual_attention: {name} must be 4-D [B, H, W, C], got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"contextual_attention: {name} must be a float array, got dtype {x.dtype}")
    if tuple(f.shape) != tuple(b.shape):
        raise ValueError(
            "contextual_attention: f and b must have the same shape [B, H, W, C] "
            f"(as in the official op), got f {tuple(f.shape)} and b {tuple(b.shape)}"
        )
    for name, v in (("ksize", ksize), ("rate", rate), ("fuse_k", fuse_k)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"contextual_attention: {name} must be a positive int, got {v!r}")
    if stride != 1:
        raise ValueError(f"contextual_attention: only stride=1 is supported (the official network uses 1), got {stride!r}")
    batch, height, width, _ = f.shape
    if height % rate or width % rate:
        raise ValueError(
            f"contextual_attention: H and W must be divisible by rate={rate}, got H={height}, W={width}"
        )
    if block_size is not None and (not isinstance(block_size, (int, np.integer)) or block_size < 1):
        raise ValueError(f"contextual_attention: block_size must be a positive int or None, got {block_size!r}")
    if mask is not None:
        if mask.ndim != 4 or mask.shape[-1] != 1:
            raise ValueError(f"contextual_attention: mask must be [1 or B, H, W, 1], got shape {tuple(mask.shape)}")
        if tuple(mask.shape[1:3]) != (height, width):
            raise ValueError(
                f"contextual_attention: mask size {tuple(mask.shape[1:3])} does not match the features' "
                f"size {(height, width)}"
            )
        if mask.shape[0] not in (1, batch):
            raise ValueError(
                f"contextual_attention: mask batch must be 1 (shared) or B={batch} (one per image), "
                f"got {mask.shape[0]}"
            )


# --------------------------------------------------------------------------- the op


def contextual_attention(
    f: jax.Array,
    b: jax.Array,
    mask: jax.Array | None = None,
    *,
    ksize: int = 3,
    stride: int = 1,
    rate: int = 1,
    fuse_k: int = 3,
    softmax_scale: float = 10.0,
    fuse: bool = True,
    block_size: int | None = None,
    precision=None,
) -> ContextualAttentionOutput:
    """Contextual attention: fill f's cells with softmax-weighted patches of b.

    Args:
      f: foreground features [B, H, W, C] (float).
      b: background features [B, H, W, C] (in DeepFill, the same array as f).
      mask: [1, H, W, 1] shared by the batch (the official behaviour) or [B, H, W, 1], one
        per image; 1 = hole. Background patches touching the hole are not attended to.
        None: every patch is valid.
      ksize: matching patch size. stride: must be 1. rate: downsampling of the matching.
      fuse_k: size of the identity kernel of the fuse step. softmax_scale: logit scale.
      fuse: apply the official fuse step (encourages coherent, larger patches).
      block_size: None evaluates all N query cells at once (N x L scores in memory);
        an int evaluates about that many queries at a time (whole rows, plus the halo the
        fuse step needs), so memory grows with N x block_size; the backward pass is blocked
        too (each block is rematerialised). Same result as the dense path.
      precision: `jax.lax.Precision` for the two matrix products (None: JAX's default;
        use HIGHEST on GPU/TPU for bit-level parity with the float32 official op).

    Returns:
      (y [B, H, W, C] in f's dtype, offsets int32 [B, H // rate, W // rate, 2]): for each
      cell, (row, col) of the most attended patch minus the cell's own (row, col).
    """
    f = jnp.asarray(f)
    b = jnp.asarray(b)
    mask = None if mask is None else jnp.asarray(mask)
    _check_inputs(f, b, mask, ksize, stride, rate, fuse_k, block_size)
    # Always one compiled computation (inlined into an enclosing jit): XLA contracts the
    # products feeding the fuse step's sums into fused multiply-adds, so an op-by-op call
    # would round differently from a jitted one.
    return _contextual_attention(
        f, b, mask, ksize=ksize, rate=rate, fuse_k=fuse_k, softmax_scale=softmax_scale, fuse=fuse,
        block_size=block_size, precision=precision,
    )


@functools.partial(jax.jit, static_argnames=("ksize", "rate", "fuse_k", "softmax_scale", "fuse", "block_size", "precision"))
def _contextual_attention(f, b, mask, *, ksize, rate, fuse_k, softmax_scale, fuse, block_size, precision):
    """`contextual_attention` on checked inputs (see there)."""
    batch, height, width, _ = f.shape
    h, w = height // rate, width // rate
    n = h * w
    dtype = f.dtype
    acc_dtype = jnp.promote_types(dtype, jnp.float32)

    # 1. b for pasting: raw patch q is the 2 x 2 group of r x r blocks of padded b starting
    #    at block q, so keep the blocks: [B, (h + 1) * (w + 1), r*r*C]
    pad_h, pad_w = _same_padding(height, 2 * rate, rate), _same_padding(width, 2 * rate, rate)
    b_blocks = rearrange(jnp.pad(b, ((0, 0), pad_h, pad_w, (0, 0))), "b (gy u) (gx v) c -> b (gy gx) (u v c)",
                         u=rate, v=rate)
    # 2. nearest (align_corners) downsampling by 1/r
    f_down = resize_nearest_align_corners(f, h, w)
    b_down = resize_nearest_align_corners(b, h, w)
    # 3. the L2 norms of b's k x k matching patches: [B, 1, L] (the scores are divided by them)
    # (One reduction over each extracted patch's squares: summing per cell first, then over
    # the window, rounded differently for different batch sizes on XLA:CPU.)
    wpat = _extract_patches(b_down.astype(acc_dtype), ksize, 1)
    norm = jnp.sqrt(jnp.sum(jnp.square(wpat), axis=-1)).reshape(batch, 1, n)
    norm = jnp.maximum(norm, 1e-4)
    # 4. patch validity mm: [1 or B, 1, L]
    if mask is None:
        mm = jnp.ones((1, 1, n), acc_dtype)
    else:
        m_down = resize_nearest_align_corners(mask.astype(acc_dtype), h, w)
        m_pat = _extract_patches(m_down, ksize, 1).reshape(mask.shape[0], 1, n, -1)
        mm = (jnp.mean(m_pat, axis=-1) == 0.0).astype(acc_dtype)[:, 0][:, None, :]

    # A block's scores cover its rows, plus (a + b) rows and as many cells of the fuse
    # step's reach (`_block_extent`); f's windows reach `before` rows above, `after` below.
    fuse_a, fuse_b = _block_extent(_window_offsets(fuse_k)) if fuse else (0, 0)
    rows = _choose_rows(block_size, h, w, fuse_a + fuse_b)
    n_blocks = h // rows
    taps = _window_offsets(ksize)
    before, after = -taps[0], taps[-1]
    f_rows = _row_windows(f_down, ksize)
    b_rows = _row_windows(b_down, ksize)
    kc = f_rows.shape[-1]

    if n_blocks == 1:
        f_ext = jnp.pad(f_rows, ((0, 0), (before, after), (0, 0), (0, 0))).reshape(batch, -1, kc)
        s = _window_scores(f_ext, b_rows, ksize, precision=precision, acc_dtype=acc_dtype) / norm
        if fuse:
            s = _fuse_dense(s, h, w, fuse_k)
        a, arg = _attend(s, mm, softmax_scale)
        y_pad = _paste(a, b_blocks, rows=h, h=h, w=w, rate=rate, precision=precision)
    else:
        # Each block's queries: a flat (row-major) range of positions taken modulo N (so
        # each block is a slice), plus the rows their windows reach; a row reached across
        # the map's edge is masked out (row_valid), not wrapped.
        lead = fuse_a * (w + 1) + before * w
        u_count = rows * w + (fuse_a + fuse_b) * (w + 1)
        length = u_count + (before + after) * w
        f_ext = jnp.take(f_rows.reshape(batch, n, kc), np.arange(-lead, (h - rows) * w - lead + length) % n, axis=1)

        def block(tail, y0):
            """Rows y0 .. y0 + rows: tail [B, r, W + r, C] of the previous block's paste ->
            (this block's tail, (output rows [B, rows r, W + r, C], argmax [B, rows*w]))."""
            fq = jax.lax.dynamic_slice_in_dim(f_ext, y0 * w, length, axis=1)
            rows_global = ((y0 * w - fuse_a * (w + 1) + jnp.arange(u_count)) % n) // w

            def row_valid(oy):
                return ((rows_global + oy >= 0) & (rows_global + oy < h)).astype(acc_dtype)

            s = _in_memory(lambda x: _window_scores(x, b_rows, ksize, row_valid, precision=precision,
                                                    acc_dtype=acc_dtype) / norm, fq, y0 >= 0)
            if fuse:
                s = _fuse_block(s, y0=y0, rows=rows, h=h, w=w, fuse_k=fuse_k)
            a, arg = _attend(s, mm, softmax_scale)
            out = _paste(a, b_blocks, rows=rows, h=h, w=w, rate=rate, precision=precision)
            # Consecutive blocks overlap by r rows: this block's first r rows add the previous tail.
            head = out[:, :rate] + tail
            return out[:, rows * rate :], (jnp.concatenate([head, out[:, rate : rows * rate]], axis=1), arg)

        tail0 = jnp.zeros((batch, rate, (w + 1) * rate, b.shape[-1]), acc_dtype)
        tail, (parts, args) = jax.lax.scan(jax.checkpoint(block), tail0, jnp.arange(n_blocks) * rows)
        # parts: [n_blocks, B, rows r, W + r, C]; the last tail lands on the pad row.
        y_pad = jnp.concatenate([rearrange(parts, "n b x wp c -> b (n x) wp c"), tail], axis=1)
        arg = rearrange(args, "n b u -> b (n u)")

    pad_top, pad_left = pad_h[0], pad_w[0]
    y = y_pad[:, pad_top : pad_top + height, pad_left : pad_left + width] / 4.0

    arg = arg.reshape(batch, h, w)
    own_y = jnp.arange(h, dtype=jnp.int32)[None, :, None]
    own_x = jnp.arange(w, dtype=jnp.int32)[None, None, :]
    offsets = jnp.stack([arg // w - own_y, arg % w - own_x], axis=-1)
    return ContextualAttentionOutput(y.astype(dtype), offsets)
