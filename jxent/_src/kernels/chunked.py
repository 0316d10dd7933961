"""``implementation="chunked_xla"``: the forward pass walks the class axis in blocks with an online
max / log-sum-exp, so its temporaries are O(rows x block) whatever the vocabulary size.

The backward pass is one elementwise pass that writes ``dlogits`` (the XLA kernel's backward); it
needs no temporaries beyond its output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jxent._src.kernels import rowmath
from jxent._src.options import XentOptions

BLOCK = 4096


def _block_stats(xb, yb, start, labels, sparse, opts, want_sum_x, wb=None):
  """Block max and the block's partial statistics ``(m, z, n, a, b, sum_x)`` (see
  :func:`_merge`); for integer labels ``z`` leaves out the label's term
  (:func:`rowmath.label_log_z`, ``n = 0``); for dense ones the block's maxima, counted in ``n``
  (a sum that holds the max's 1 rounds its tail to the ulp of 1). ``wb``: the block's class
  weights (``sum_x = sum(w x)``, dense labels ``w y``)."""
  bm = jnp.max(xb, axis=-1)
  bm = jnp.where(jnp.isneginf(bm), 0.0, bm)
  s = xb - bm[:, None]
  e = jnp.exp(s)
  if sparse:
    e = jnp.where(jnp.arange(xb.shape[-1])[None, :] == (labels - start)[:, None], 0.0, e)
    n = jnp.zeros_like(bm)
  else:
    # (the maxima by `xb == bm`, not `s == 0`: the mask and the count are separate reductions,
    # and XLA may contract a soft-cap's product into `x - m` in one of them only)
    top = xb == bm[:, None]
    e = jnp.where(top, 0.0, e)
    n = jnp.sum(jnp.where(top, 1.0, 0.0).astype(e.dtype), axis=-1)
  z = jnp.sum(e, axis=-1)
  if want_sum_x:  # sum(w * (x - bm)) and sum(w): shift invariant (see _merge)
    sum_x = jnp.sum(s if wb is None else s * wb[None, :], axis=-1)
    sum_w = jnp.broadcast_to(xb.shape[-1] if wb is None else jnp.sum(wb), bm.shape)
    sum_w = sum_w.astype(bm.dtype)
  else:
    sum_x = sum_w = jnp.zeros_like(bm)
  if sparse:
    local = labels - start
    hit = (local >= 0) & (local < xb.shape[-1])
    picked = jnp.take_along_axis(xb, jnp.clip(local, 0, xb.shape[-1] - 1)[:, None], axis=-1)[:, 0]
    return bm, z, n, jnp.zeros_like(bm), jnp.where(hit, picked, 0.0), (sum_x, sum_w)
  y = yb.astype(xb.dtype)
  if wb is not None:
    y = y * wb[None, :]
  sum_y = jnp.sum(y, axis=-1)
  sum_ys = jnp.sum(jnp.where(y == 0, 0.0, y * s), axis=-1)
  return bm, z, n, sum_y, sum_ys, (sum_x, sum_w)


def _merge(state, new):
  """Merges running (m, z, zc, a, b, sum_x) with a block's (m, z, n, a, b, sum_x); for dense
  ``a = sum(y)``, ``b = sum(y*(x-m))`` and for sparse ``b`` = the label's logit (``a = 0``);
  ``zc`` compensates the sum (:func:`rowmath.add_rescaled`), to which the block's ``n`` maxima
  are added last; ``sum_x = (sum(w * (x - m)), sum(w))``, rescaled to the new max like ``b``."""
  m0, z0, c0, a0, b0, (sx0, w0) = state
  m1, z1, n1, a1, b1, (sx1, w1) = new
  m = jnp.maximum(m0, m1)
  d0 = jnp.where(jnp.isneginf(m0), 0.0, m0 - m)
  d1 = m1 - m
  e1 = rowmath.exp_diff(m1, m)
  z, zc = rowmath.add_rescaled(z0, c0, jnp.where(jnp.isneginf(m0), 0.0, rowmath.exp_diff(m0, m)),
                               z1, e1)
  z, zc = rowmath.add_rescaled(z, zc, 1.0, n1, e1)
  b = b0 + d0 * a0 + b1 + d1 * a1
  return m, z, zc, a0 + a1, b, (sx0 + d0 * w0 + sx1 + d1 * w1, w0 + w1)


def forward(logits: jax.Array, labels: jax.Array, *, sparse: bool, opts: XentOptions,
            block: int = BLOCK, class_weight=None):
  x_all = logits
  rows, c = x_all.shape
  dt = rowmath.compute_dtype(logits.dtype)
  want_sum_x = bool(opts.label_smoothing)
  offset = rowmath.class_offset(c, opts)
  glabels = labels
  if sparse:
    labels = labels - offset  # block starts below are local

  def stats(start, size):
    xb = rowmath.prep_logits(lax.dynamic_slice_in_dim(x_all, start, size, axis=1), opts)
    yb = None if sparse else lax.dynamic_slice_in_dim(labels, start, size, axis=1)
    wb = None if class_weight is None else lax.dynamic_slice_in_dim(class_weight, start, size)
    return _block_stats(xb, yb, start, labels, sparse, opts, want_sum_x, wb)

  zero = jnp.zeros((rows,), dt)
  state = (jnp.full((rows,), -jnp.inf, dt), zero, zero, zero, zero, (zero, zero))
  state = rowmath.fold_blocks(lambda start, size, st: _merge(st, stats(start, size)), c, block, state)
  m, z, zc, a, b, (sum_x, sum_w) = state
  m = jnp.where(jnp.isneginf(m), 0.0, m)
  z = z + zc if sparse else rowmath.block_tail(z, zc)
  weights = None
  if class_weight is not None:
    weights = rowmath.class_weight_rows(class_weight, glabels, opts, sparse=sparse)
  return rowmath.loss_from_stats(m, z, a, b, sum_x, glabels, sparse=sparse, opts=opts, local_c=c,
                                 weights=weights, sum_w=sum_w)
