"""``implementation="pallas_mosaic_tpu"``: the cross-entropy kernels for TPU (Pallas on Mosaic).

* forward: grid (row blocks, class blocks), the class axis innermost and sequential
  ("arbitrary"); per-row online max / sum-exp / label statistics live in VMEM scratch and the
  loss and row statistics ``(m, log_z, z)`` (:func:`rowmath.stats_of`) are written at the last
  class block (one HBM read of the logits). For integer labels the sum leaves out the label's
  term, so a confident row's loss is exact (:func:`rowmath.label_log_z`).
* backward: fully parallel; writes ``dlogits`` with ``softmax = exp(x - m) / z`` (shift
  invariant) and the label's exact entry (:func:`rowmath.label_grad`, one value per row from
  XLA) (one read, one write).
* fused (scalar reductions): grid (row blocks,) over whole rows held in VMEM; one walk folds the
  statistics, a second walk over the same VMEM block writes the gradient pre-scaled by the row
  weights (one HBM read and one write, the 0.67x of the three-pass floor). Rows too long for the
  VMEM budget use the forward and backward kernels.

Tested in interpret mode on CPU, and lowered to Mosaic for TPU from CPU (tests/test_lowering.py);
not yet compiled or timed on a TPU. With ``axis_name`` (vocab parallel) the forward kernel
writes each shard's raw row statistics, merged over the shards in XLA, and scalar reductions use
the forward and backward kernels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jxent._src.kernels import rowmath

_NEG = float(jnp.finfo(jnp.float32).min)


def _pltpu():
  from jax.experimental.pallas import tpu as pltpu
  return pltpu


def _sublanes(dtype) -> int:
  """Row-block alignment: 8 rows of 32-bit values, 16 of 16-bit (packed two per sublane)."""
  return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def _cols(start, shape):
  return start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)


# ------------------------------------------------------------------------------------------------
# Block math shared by the kernels: statistics of a [rows, block] tile, the row results, and the
# gradient of a tile. Row vectors are [rows, 1].
# ------------------------------------------------------------------------------------------------
def _init_stats(rows):
  zero = jnp.zeros((rows, 1), jnp.float32)
  return (jnp.full((rows, 1), _NEG, jnp.float32), zero, zero, zero, zero, zero)


def _finished(stats, sparse):
  """The online ``(m, z, zc, a, b, sum_x)`` as :func:`rowmath.loss_from_stats` takes them
  (dense: :func:`rowmath.block_tail`)."""
  m, z, zc, a, b, sx = stats
  return m, z + zc if sparse else rowmath.block_tail(z, zc), a, b, sx


def _update_stats(stats, x, y, col, *, sparse, opts, c, wv=None):
  """Folds one tile into the online ``(max, sum-exp, its compensation, sum y, label term, sum
  x)`` statistics (:func:`rowmath.add_rescaled`); ``wv [1, block]``: the tile's class weights
  (``sum(w x)``, dense ``w y``)."""
  m_old, z, zc, a, b, sx = stats
  mask = col < c
  if wv is not None:
    wv = jnp.where(mask, wv.astype(jnp.float32), 0.0)  # (padded lanes hold anything)
  x = jnp.where(mask, rowmath.prep_logits(x, opts).astype(jnp.float32), -jnp.inf)
  m_new = jnp.maximum(m_old, jnp.max(x, axis=1, keepdims=True))
  e = jnp.exp(x - m_new)
  if sparse:  # (the label's term is left out of the sum)
    e = jnp.where(col == y, 0.0, e)
  else:  # (the tile's maxima enter as a count, after its tail: rowmath.block_tail)
    top = x == m_new
    e = jnp.where(top, 0.0, e)
  z, zc = rowmath.add_rescaled(z, zc, rowmath.exp_diff(m_old, m_new),
                               jnp.sum(e, axis=1, keepdims=True), 1.0)
  if not sparse:
    z, zc = rowmath.add_rescaled(z, zc, 1.0,
                                 jnp.sum(jnp.where(top, 1.0, 0.0), axis=1, keepdims=True), 1.0)
  if opts.label_smoothing:
    sx = sx + jnp.sum(jnp.where(mask, x if wv is None else x * wv, 0.0), axis=1, keepdims=True)
  if sparse:
    # (a local label id may point past this shard's classes, into the masked lanes)
    b = b + jnp.sum(jnp.where((col == y) & mask, x, 0.0), axis=1, keepdims=True)
  else:
    yv = jnp.where(mask, y.astype(jnp.float32), 0.0)
    if wv is not None:
      yv = yv * wv
    b = (b + jnp.where(a == 0, 0.0, (m_old - m_new) * a)
         + jnp.sum(jnp.where(yv == 0, 0.0, yv * (x - m_new)), axis=1, keepdims=True))
    a = a + jnp.sum(yv, axis=1, keepdims=True)
  return m_new, z, zc, a, b, sx


def _grad_tile(x, y, col, row, g, *, sparse, opts, n_cls, wv=None):
  """``(dlogits, dlabels)`` of one tile; ``g`` already holds the row weights and masking;
  ``row = (m, log_z, z, coef, fifth)`` are ``[rows, 1]`` (``fifth``: integer labels, the label's
  entry, :func:`rowmath.label_grad`; dense, ``(m_top, tc)``, :func:`rowmath.top_scalars`);
  ``n_cls`` is the global class count (vocab parallel); ``wv [1, block]`` the tile's class
  weights."""
  eps = opts.label_smoothing
  m, log_z, z, coef, fifth = row
  x = rowmath.prep_logits(x, opts).astype(jnp.float32)
  p = jnp.exp(x - m) * (1.0 / z)
  dy = None
  if wv is not None:
    wv = wv.astype(jnp.float32)
  if sparse:
    smooth = (eps / n_cls if eps else 0.0) if wv is None else (eps / n_cls) * wv
    d = jnp.where(col == y, fifth, coef * p - smooth)
  else:
    target = (1.0 - eps) * y.astype(jnp.float32)
    dy = g * (1.0 - eps) * ((m - x) + log_z)
    if eps:
      target = target + eps / n_cls
    if wv is not None:
      target, dy = target * wv, dy * wv
    d = rowmath.dense_grad(x, m, p, target, coef, *fifth)
  return g * d * rowmath.softcap_factor(x, opts), dy


# ------------------------------------------------------------------------------------------------
# Kernels.
# ------------------------------------------------------------------------------------------------
def _fwd_kernel(x_ref, y_ref, *refs, sparse, opts, block_c, c, weighted=False):
  """Grid (row blocks, class blocks): online statistics in VMEM scratch across class blocks.

  Writes the loss and ``(m, log_z, z)``; with ``axis_name``, this shard's raw statistics instead
  (merged over the shards by the caller). ``weighted``: the class weight ``[1, block]`` tile,
  ``sum(w)`` and (integer labels) ``w[label]`` per row follow the labels."""
  w_ref, weights = None, None
  if weighted:
    if sparse:
      w_ref, ws_ref, wy_ref, *refs = refs
      weights = (wy_ref, ws_ref)
    else:
      w_ref, ws_ref, *refs = refs
      weights = (None, ws_ref)
  n_out = 4 if opts.axis_name is None else 5
  outs, scratch = refs[:n_out], refs[n_out:]
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    for ref, val in zip(scratch, _init_stats(x_ref.shape[0])):
      ref[...] = val

  col = _cols(j * block_c, x_ref.shape)
  wv = None
  if w_ref is not None and (not sparse or opts.label_smoothing):
    wv = w_ref[...]
  stats = _update_stats(tuple(ref[...] for ref in scratch), x_ref[...], y_ref[...], col,
                        sparse=sparse, opts=opts, c=c, wv=wv)
  for ref, val in zip(scratch, stats):
    ref[...] = val

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    if opts.axis_name is not None:
      for ref, val in zip(outs, _finished(stats, sparse)):
        ref[...] = val
      return
    w_rows = None if weights is None else tuple(None if r is None else r[...] for r in weights)
    loss, row = rowmath.loss_from_stats(*_finished(stats, sparse), y_ref[...], sparse=sparse,
                                        opts=opts, local_c=c, mosaic=True, weights=w_rows)
    for ref, val in zip(outs, (loss, *row)):
      ref[...] = val


def _bwd_kernel(*refs, sparse, opts, block_c, n_cls, weighted=False):
  """Grid (row blocks, class blocks), all parallel: one tile of ``dlogits`` from the saved row
  statistics and the per-row ``coef`` and (integer labels) label entry ``d_lab`` or (dense) the
  row max's scalars ``(m_top, tc)``; ``weighted``: the class weight's ``[1, block]`` tile
  follows ``g``.

  With ``axis_name`` the caller passes local labels and ``g`` with ignored rows zeroed."""
  w_ref = None
  if sparse:
    x_ref, y_ref, m_ref, lz_ref, z_ref, coef_ref, dl_ref, g_ref, *refs = refs
    if weighted:
      w_ref, *refs = refs
    (dx_ref,) = refs
    dy_ref = None
  else:
    x_ref, y_ref, m_ref, lz_ref, z_ref, coef_ref, mt_ref, tc_ref, g_ref, *refs = refs
    if weighted:
      w_ref, *refs = refs
    dx_ref, *dy = refs
    dy_ref = dy[0] if dy else None
  col = _cols(pl.program_id(1) * block_c, x_ref.shape)
  y = y_ref[...]
  g = g_ref[...]
  if sparse and opts.axis_name is None:
    g = rowmath.zero_ignored(y, g, opts)
  row = (m_ref[...], lz_ref[...], z_ref[...], coef_ref[...],
         dl_ref[...] if sparse else (mt_ref[...], tc_ref[...]))
  wv = None
  if w_ref is not None and (not sparse or opts.label_smoothing):
    wv = w_ref[...]
  dx, dy = _grad_tile(x_ref[...], y, col, row, g, sparse=sparse, opts=opts, n_cls=n_cls, wv=wv)
  dx_ref[...] = dx.astype(dx_ref.dtype)
  if dy_ref is not None:
    dy_ref[...] = dy.astype(dy_ref.dtype)


def _walk(c, chunk, body, carry):
  """``body(start, size, carry)`` over ``[0, c)`` in chunks of ``chunk`` (static tail)."""
  n = c // chunk
  if n:
    carry = jax.lax.fori_loop(
        0, n, lambda j, cr: body(pl.multiple_of(j * chunk, chunk), chunk, cr), carry)
  if c % chunk:
    carry = body(n * chunk, c % chunk, carry)
  return carry


def _fused_kernel(*refs, sparse, opts, chunk, c):
  """Grid (row blocks,): whole rows sit in VMEM, so the gradient walk reads them on chip.

  Walk 1 folds the statistics chunk by chunk; walk 2 writes the gradient of
  ``sum(weights * loss)``. One HBM read of the logits and one write of the gradient.
  """
  x_ref, y_ref, w_ref, loss_ref, dx_ref, *dy = refs
  dy_ref = dy[0] if dy else None
  rows = x_ref.shape[0]
  y_row = y_ref[...] if sparse else None

  def y_tile(start, size):
    return y_row if sparse else y_ref[:, pl.ds(start, size)]

  def stats_body(start, size, stats):
    col = _cols(start, (rows, size))
    return _update_stats(stats, x_ref[:, pl.ds(start, size)], y_tile(start, size), col,
                         sparse=sparse, opts=opts, c=c)

  stats = _finished(_walk(c, chunk, stats_body, _init_stats(rows)), sparse)
  loss, row_stats = rowmath.loss_from_stats(*stats, y_row, sparse=sparse, opts=opts, local_c=c,
                                            mosaic=True)
  w = w_ref[...]
  loss_ref[...] = jnp.where(w == 0, 0.0, loss * w)
  g = rowmath.fused_weights(rowmath.zero_ignored(y_row, w, opts) if sparse else w, row_stats)
  sum_t = None
  if not sparse and not opts.tf_grad:
    sum_t = (1.0 - opts.label_smoothing) * stats[2] + opts.label_smoothing
  coef = rowmath.grad_coef(row_stats, opts, sum_t)
  # (integer labels: stats[3] is the label's capped logit, folded in the walk)
  if sparse:
    fifth = rowmath.label_grad(stats[3], row_stats, coef, opts, c, mosaic=True)
  else:
    fifth = rowmath.top_scalars(row_stats[0], row_stats[1], coef, mosaic=True)
  row = (*row_stats, coef, fifth)

  def grad_body(start, size, carry):
    col = _cols(start, (rows, size))
    dx, dyv = _grad_tile(x_ref[:, pl.ds(start, size)], y_tile(start, size), col, row, g,
                         sparse=sparse, opts=opts, n_cls=c)
    dx_ref[:, pl.ds(start, size)] = dx.astype(dx_ref.dtype)
    if dy_ref is not None:
      dy_ref[:, pl.ds(start, size)] = dyv.astype(dy_ref.dtype)
    return carry

  _walk(c, chunk, grad_body, 0)


# ------------------------------------------------------------------------------------------------
# Per-token log-probs and entropy (jxent.token_log_probs): z = cap(x) / T per row.
# ------------------------------------------------------------------------------------------------
def _lp_fwd_kernel(x_ref, y_ref, t_ref, m_out, s_out, t_out, lab_out, m_sc, s_sc, t_sc, lab_sc, *,
                   opts, block_c, c):
  """Grid (row blocks, class blocks): the online ``(m, s, t, z[label])`` in VMEM scratch; the
  raw statistics are written at the last class block (merged and finished in XLA)."""
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
    for ref in (s_sc, t_sc, lab_sc):
      ref[...] = jnp.zeros(ref.shape, jnp.float32)

  col = _cols(j * block_c, x_ref.shape)
  mask = col < c
  z = jnp.where(mask, rowmath.prep_logits(x_ref[...], opts).astype(jnp.float32), -jnp.inf) * t_ref[...]
  m_old, s_old = m_sc[...], s_sc[...]
  m_new = jnp.maximum(m_old, jnp.max(z, axis=1, keepdims=True))
  d = m_old - m_new
  e0 = rowmath.exp_diff(m_old, m_new)
  zs = z - m_new
  e = jnp.where(col == y_ref[...], 0.0, jnp.exp(zs))  # (s and t leave out the label's term)
  t_sc[...] = (jnp.where(s_old == 0, 0.0, e0 * (t_sc[...] + d * s_old))
               + jnp.sum(jnp.where(e == 0, 0.0, e * zs), axis=1, keepdims=True))
  s_sc[...] = s_old * e0 + jnp.sum(e, axis=1, keepdims=True)
  m_sc[...] = m_new
  lab_sc[...] += jnp.sum(jnp.where((col == y_ref[...]) & mask, z, 0.0), axis=1, keepdims=True)

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    for out, ref in ((m_out, m_sc), (s_out, s_sc), (t_out, t_sc), (lab_out, lab_sc)):
      out[...] = ref[...]


def _lp_bwd_kernel(*refs, opts, block_c, with_entropy):
  """Grid (row blocks, class blocks), all parallel: one tile of ``dlogits`` (the label's column
  is rewritten exactly by the caller)."""
  if with_entropy:
    x_ref, y_ref, t_ref, m_ref, lz_ref, z_ref, ent_ref, glp_ref, gent_ref, dx_ref = refs
  else:
    x_ref, y_ref, t_ref, m_ref, lz_ref, z_ref, glp_ref, dx_ref = refs
  col = _cols(pl.program_id(1) * block_c, x_ref.shape)
  capped = rowmath.prep_logits(x_ref[...], opts).astype(jnp.float32)
  inv_t = t_ref[...]
  zs = capped * inv_t - m_ref[...]
  p = jnp.exp(zs) * (1.0 / z_ref[...])
  dz = glp_ref[...] * (jnp.where(col == y_ref[...], 1.0, 0.0) - p)
  if with_entropy:
    dz = dz - gent_ref[...] * jnp.where(p == 0, 0.0, p * (zs - (lz_ref[...] - ent_ref[...])))
  dx_ref[...] = (dz * inv_t * rowmath.softcap_factor(capped, opts)).astype(dx_ref.dtype)


@dataclasses.dataclass(frozen=True)
class PallasMosaicTpuKernel:
  """Pallas-on-Mosaic kernels (TPU; ``interpret=True`` runs them anywhere, for tests).

  Attributes:
    interpret: run the kernels in Pallas interpret mode (any backend).
    block_r, block_c: the tile of the forward and backward grids (rows x classes).
    fused_vmem_bytes: VMEM budget of the fused kernel's whole-row blocks (double-buffered logits,
      gradient and dense labels); it sets how many rows one program holds. Rows too long for even
      one aligned row block (8 rows of float32, 16 of bfloat16/float16) in this budget use the
      forward and backward kernels instead (same results, one more read of the logits).

  Example:
    >>> import jax, jax.numpy as jnp, jxent
    >>> kernel = jxent.PallasMosaicTpuKernel(interpret=True)
    >>> x, y = jnp.array([[1., 2., 3.], [3., 2., 1.]]), jnp.array([2, 0])
    >>> dx = jax.grad(lambda x: jxent.softmax_cross_entropy_with_integer_labels(
    ...     x, y, reduction="sum", implementation=kernel))(x)
    >>> dx[0].round(4)
    Array([ 0.09  ,  0.2447, -0.3348], dtype=float32)
  """

  name: ClassVar[str] = "pallas_mosaic_tpu"
  platforms: ClassVar[tuple[str, ...]] = ("tpu",)
  class_weights: ClassVar[bool] = True  # (forward and backward; scalar reductions use them too)
  # float32 accumulation: float64 logits are refused (use XLA)
  dtypes: ClassVar[tuple] = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
  interpret: bool = False
  block_r: int = 256
  block_c: int = 2048
  fused_vmem_bytes: int = 24 << 20

  def __post_init__(self):
    for field in ("block_r", "block_c", "fused_vmem_bytes"):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"PallasMosaicTpuKernel: {field} must be a positive int, got {value!r}.")
    if self.block_c % 128:
      raise ValueError(f"PallasMosaicTpuKernel: block_c must be a multiple of 128 (TPU lanes), "
                       f"got {self.block_c}.")

  def _grid(self, rows, c, dtype):
    align = _sublanes(dtype)
    br = pl.cdiv(min(self.block_r, rows), align) * align
    bc = min(self.block_c, pl.cdiv(c, 128) * 128)
    return br, bc, (pl.cdiv(rows, br), pl.cdiv(c, bc))

  def _params(self, semantics, vmem_limit_bytes=None):
    if self.interpret:
      return None
    return _pltpu().CompilerParams(dimension_semantics=semantics,
                                   vmem_limit_bytes=vmem_limit_bytes)

  def fused_rows(self, c, dtypes) -> int:
    """Rows per program of the fused kernel for rows of ``c`` classes (0: they do not fit)."""
    per_row = 2 * c * sum(jnp.dtype(d).itemsize for d in dtypes)  # double-buffered
    align = _sublanes(dtypes[0])
    block_r = pl.cdiv(self.block_r, align) * align
    return min(block_r, self.fused_vmem_bytes // per_row) // align * align

  def fused(self, logits, labels, weights, *, sparse, opts, want_dlabels=True):
    """Weighted per-row loss and the gradient of ``sum(loss * weights)`` in one kernel."""
    rowmath.check_whole_rows(opts)
    rows, c = logits.shape
    if rows == 0:
      return rowmath.empty_rows(logits, labels, sparse=sparse, want_dlabels=want_dlabels, fused=True)
    want_dy = not sparse and want_dlabels
    blocks = [logits.dtype, logits.dtype] + ([] if sparse else [labels.dtype])
    blocks += [labels.dtype] if want_dy else []
    br = self.fused_rows(c, blocks)
    if br == 0:
      loss, stats = self.forward(logits, labels, sparse=sparse, opts=opts)
      dx, dy = self.backward(logits, labels, stats, weights, sparse=sparse, opts=opts,
                             want_dlabels=want_dlabels)
      return jnp.where(weights == 0, 0.0, loss * weights), dx, dy
    br = min(br, pl.cdiv(rows, _sublanes(logits.dtype)) * _sublanes(logits.dtype))
    row_spec = pl.BlockSpec((br, 1), lambda i: (i, 0))
    full_spec = pl.BlockSpec((br, c), lambda i: (i, 0))
    out_shape = [rowmath.out_struct((rows, 1), jnp.float32, logits),
                 rowmath.out_struct((rows, c), logits.dtype, logits)]
    if want_dy:
      out_shape.append(rowmath.out_struct((rows, c), labels.dtype, logits))
    vmem = 2 * br * c * sum(jnp.dtype(d).itemsize for d in blocks) + (4 << 20)
    res = pl.pallas_call(
        functools.partial(_fused_kernel, sparse=sparse, opts=opts,
                          chunk=min(self.block_c, pl.cdiv(c, 128) * 128), c=c),
        grid=(pl.cdiv(rows, br),),
        in_specs=[full_spec, row_spec if sparse else full_spec, row_spec],
        out_specs=[row_spec] + [full_spec] * (len(out_shape) - 1), out_shape=tuple(out_shape),
        compiler_params=self._params(("parallel",), vmem), interpret=self.interpret,
        name="jxent_xent_fused")(logits, labels[:, None] if sparse else labels,
                                 weights.astype(jnp.float32)[:, None])
    return res[0][:, 0], res[1], (res[2] if want_dy else None)

  def forward(self, logits, labels, *, sparse, opts, need_lse=True, class_weight=None):
    del need_lse  # (a hint: the lse comes at no extra cost here)
    rows, c = logits.shape
    if rows == 0:
      return rowmath.empty_rows(logits, labels, sparse=sparse, want_dlabels=False)
    glabels = labels
    if sparse and opts.axis_name is not None:  # local ids; merged over the shards below
      labels = rowmath.local_rows(labels, None, opts, c)[0]
    br, bc, grid = self._grid(rows, c, logits.dtype)
    row_spec = pl.BlockSpec((br, 1), lambda i, j: (i, 0))
    y_spec = row_spec if sparse else pl.BlockSpec((br, bc), lambda i, j: (i, j))
    y = labels[:, None] if sparse else labels
    args, in_specs = [logits, y], [pl.BlockSpec((br, bc), lambda i, j: (i, j)), y_spec]
    weights = None
    if class_weight is not None:  # w as a [1, C] row of tiles; sum(w), w[label] per row
      cw = class_weight.astype(jnp.float32)
      weights = rowmath.class_weight_rows(cw, glabels, opts, sparse=sparse)
      args += [cw[None, :], jnp.broadcast_to(weights[1], (rows, 1))]
      in_specs += [pl.BlockSpec((1, bc), lambda i, j: (0, j)), row_spec]
      if sparse:
        args.append(weights[0][:, None])
        in_specs.append(row_spec)
    vmem = _pltpu().VMEM((br, 1), jnp.float32)  # the six online statistics
    n_out = 4 if opts.axis_name is None else 5
    out_shape = (rowmath.out_struct((rows, 1), jnp.float32, logits),) * n_out
    res = pl.pallas_call(
        functools.partial(_fwd_kernel, sparse=sparse, opts=opts, block_c=bc, c=c,
                          weighted=class_weight is not None),
        grid=grid, in_specs=in_specs,
        out_specs=(row_spec,) * n_out, out_shape=out_shape, scratch_shapes=[vmem] * 6,
        compiler_params=self._params(("parallel", "arbitrary")), interpret=self.interpret,
        name="jxent_xent_fwd")(*args)
    res = [r[:, 0] for r in res]
    if opts.axis_name is None:
      return res[0], tuple(res[1:])
    return rowmath.loss_from_stats(*res, glabels, sparse=sparse, opts=opts, local_c=c,
                                   weights=weights)

  def backward(self, logits, labels, stats, g, *, sparse, opts, want_dlabels=True,
               class_weight=None):
    rows, c = logits.shape
    if rows == 0:
      return rowmath.empty_rows(logits, labels, sparse=sparse, want_dlabels=want_dlabels,
                            fused=True)[1:]
    n_cls = rowmath.num_classes(c, opts)
    stats = tuple(v.astype(jnp.float32) for v in stats)
    coef, t_lab = rowmath.grad_scalars(labels, stats, opts, n_cls, sparse=sparse,
                                       class_weight=class_weight)
    row = [*stats, coef]
    if sparse:  # the label's entry per row, from its logit (a gather of one value per row)
      x_lab, _, _ = rowmath.local_label(logits, labels, opts)
      row.append(rowmath.label_grad(x_lab, stats, coef, opts, n_cls, t_lab=t_lab))
    else:  # the row max's exact entry (rowmath.dense_grad)
      row += list(rowmath.top_scalars(stats[0], stats[1], coef))
    if sparse and opts.axis_name is not None:  # what needs the other shards is done here
      labels, g = rowmath.local_rows(labels, g, opts, c)
    br, bc, grid = self._grid(rows, c, logits.dtype)
    row_spec = pl.BlockSpec((br, 1), lambda i, j: (i, 0))
    blk_spec = pl.BlockSpec((br, bc), lambda i, j: (i, j))
    args = [logits, labels[:, None] if sparse else labels, *(v[:, None] for v in row),
            g.astype(jnp.float32)[:, None]]
    in_specs = [blk_spec, row_spec if sparse else blk_spec] + [row_spec] * (len(row) + 1)
    if class_weight is not None:
      args.append(class_weight.astype(jnp.float32)[None, :])
      in_specs.append(pl.BlockSpec((1, bc), lambda i, j: (0, j)))
    out_shape = [rowmath.out_struct((rows, c), logits.dtype, logits)]
    if not sparse and want_dlabels:
      out_shape.append(rowmath.out_struct((rows, c), labels.dtype, logits))
    res = pl.pallas_call(
        functools.partial(_bwd_kernel, sparse=sparse, opts=opts, block_c=bc, n_cls=n_cls,
                          weighted=class_weight is not None),
        grid=grid, in_specs=in_specs, out_specs=[blk_spec] * len(out_shape),
        out_shape=tuple(out_shape), compiler_params=self._params(("parallel", "parallel")),
        interpret=self.interpret, name="jxent_xent_bwd")(*args)
    return res[0], (res[1] if len(res) > 1 else None)

  def logprob_stats(self, logits, labels, inv_t, *, opts):
    """``(m, s, t, z[label])`` per row for :func:`jxent.token_log_probs` (``labels``: this
    shard's class ids; rows >= 1)."""
    rows, c = logits.shape
    br, bc, grid = self._grid(rows, c, logits.dtype)
    row_spec = pl.BlockSpec((br, 1), lambda i, j: (i, 0))
    vmem = _pltpu().VMEM((br, 1), jnp.float32)
    res = pl.pallas_call(
        functools.partial(_lp_fwd_kernel, opts=opts, block_c=bc, c=c),
        grid=grid, in_specs=[pl.BlockSpec((br, bc), lambda i, j: (i, j)), row_spec, row_spec],
        out_specs=(row_spec,) * 4,
        out_shape=(rowmath.out_struct((rows, 1), jnp.float32, logits),) * 4,
        scratch_shapes=[vmem] * 4, compiler_params=self._params(("parallel", "arbitrary")),
        interpret=self.interpret, name="jxent_logprob_fwd")(
            logits, labels[:, None], inv_t.astype(jnp.float32)[:, None])
    return tuple(r[:, 0] for r in res)

  def logprob_grad(self, logits, labels, inv_t, stats, ent, g_lp, g_ent, *, opts):
    """``dlogits`` of ``g_lp * log_prob + g_ent * entropy`` (``g_ent`` None: log-probs only;
    rows >= 1)."""
    rows, c = logits.shape
    with_entropy = g_ent is not None
    br, bc, grid = self._grid(rows, c, logits.dtype)
    row_spec = pl.BlockSpec((br, 1), lambda i, j: (i, 0))
    blk_spec = pl.BlockSpec((br, bc), lambda i, j: (i, j))
    col = lambda v: v.astype(jnp.float32)[:, None]
    args = [logits, labels[:, None], col(inv_t), *map(col, stats)]
    args += [col(ent), col(g_lp), col(g_ent)] if with_entropy else [col(g_lp)]
    return pl.pallas_call(
        functools.partial(_lp_bwd_kernel, opts=opts, block_c=bc, with_entropy=with_entropy),
        grid=grid, in_specs=[blk_spec] + [row_spec] * (len(args) - 1), out_specs=blk_spec,
        out_shape=rowmath.out_struct((rows, c), logits.dtype, logits),
        compiler_params=self._params(("parallel", "parallel")), interpret=self.interpret,
        name="jxent_logprob_bwd")(*args)

