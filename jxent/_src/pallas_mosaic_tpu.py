"""``implementation="pallas_mosaic_tpu"``: the cross-entropy kernels for TPU (Pallas on Mosaic).

The grid is (row blocks, class blocks) with the class axis innermost and sequential
("arbitrary"): the forward keeps per-row online max / sum-exp / label statistics in VMEM scratch and
writes loss and log-sum-exp at the last class block (one HBM read of the logits). The backward is
fully parallel and writes ``dlogits`` from the saved log-sum-exp (one read, one write).
Tested in interpret mode on CPU; ``axis_name`` is not supported (use ``"xla"``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jxent._src import dispatch, xla
from jxent._src.options import XentOptions

_NEG = float(jnp.finfo(jnp.float32).min)


def _pltpu():
  from jax.experimental.pallas import tpu as pltpu
  return pltpu


def _cols(j, shape, block_c):
  return j * block_c + jax.lax.broadcasted_iota(jnp.int32, shape, 1)


def _fwd_kernel(x_ref, y_ref, loss_ref, lse_ref, m_sc, z_sc, a_sc, b_sc, sx_sc, *, sparse, opts,
                block_c, c):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
    for ref in (z_sc, a_sc, b_sc, sx_sc):
      ref[...] = jnp.zeros(ref.shape, jnp.float32)

  col = _cols(j, x_ref.shape, block_c)
  mask = col < c
  x = jnp.where(mask, xla.prep_logits(x_ref[...], opts).astype(jnp.float32), -jnp.inf)
  m_old = m_sc[...]
  m_new = jnp.maximum(m_old, jnp.max(x, axis=1, keepdims=True))
  z_sc[...] = z_sc[...] * jnp.exp(m_old - m_new) + jnp.sum(jnp.exp(x - m_new), axis=1, keepdims=True)
  if opts.label_smoothing:
    sx_sc[...] += jnp.sum(jnp.where(mask, x, 0.0), axis=1, keepdims=True)
  if sparse:
    b_sc[...] += jnp.sum(jnp.where(col == y_ref[...], x, 0.0), axis=1, keepdims=True)
  else:
    y = jnp.where(mask, y_ref[...].astype(jnp.float32), 0.0)
    a = a_sc[...]
    b_sc[...] = (b_sc[...] + (m_old - m_new) * a
                 + jnp.sum(jnp.where(y == 0, 0.0, y * (x - m_new)), axis=1, keepdims=True))
    a_sc[...] = a + jnp.sum(y, axis=1, keepdims=True)
  m_sc[...] = m_new

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    m = m_sc[...]
    log_z = jnp.log(z_sc[...])
    sum_s = sx_sc[...] - c * m
    if sparse:
      loss, lse = xla.combine(m, log_z, None, None, sum_s, b_sc[...] - m, opts, c)
      loss = xla.finish_sparse(loss, y_ref[...], c, opts)
    else:
      loss, lse = xla.combine(m, log_z, a_sc[...], b_sc[...], sum_s, None, opts, c)
    loss_ref[...] = loss
    lse_ref[...] = lse


def _bwd_kernel(*refs, sparse, opts, block_c, c):
  if sparse:
    x_ref, y_ref, lse_ref, g_ref, dx_ref = refs
  else:
    x_ref, y_ref, lse_ref, g_ref, st_ref, dx_ref, *dy = refs
    dy_ref = dy[0] if dy else None
  j = pl.program_id(1)
  col = _cols(j, x_ref.shape, block_c)
  eps = opts.label_smoothing
  x = xla.prep_logits(x_ref[...], opts).astype(jnp.float32)
  lse = lse_ref[...]
  g = g_ref[...]
  p = jnp.exp(x - lse)
  coef = 1.0 + 2.0 * opts.z_loss * lse
  if sparse:
    if opts.ignore_index is not None:
      g = jnp.where(y_ref[...] == opts.ignore_index, 0.0, g)
    target = jnp.where(col == y_ref[...], 1.0 - eps, 0.0)
  else:
    y = y_ref[...].astype(jnp.float32)
    target = (1.0 - eps) * y
    if not opts.tf_grad:
      coef = coef + (st_ref[...] - 1.0)
    if dy_ref is not None:
      dy_ref[...] = (g * (1.0 - eps) * (lse - x)).astype(dy_ref.dtype)
  if eps:
    target = target + eps / c
  dx = g * (coef * p - target) * xla.softcap_factor(x, opts)
  dx_ref[...] = dx.astype(dx_ref.dtype)


@dataclasses.dataclass(frozen=True)
class PallasMosaicTpuKernel:
  """Pallas-on-Mosaic kernels (TPU; ``interpret=True`` runs them anywhere, for tests)."""

  name: ClassVar[str] = "pallas_mosaic_tpu"
  platforms: ClassVar[tuple[str, ...]] = ("tpu",)
  interpret: bool = False
  block_r: int = 256
  block_c: int = 2048

  def _grid(self, rows, c):
    br = min(self.block_r, max(8, rows))
    bc = min(self.block_c, pl.cdiv(c, 128) * 128)
    return br, bc, (pl.cdiv(rows, br), pl.cdiv(c, bc))

  def _params(self, semantics):
    if self.interpret:
      return None
    return _pltpu().CompilerParams(dimension_semantics=semantics)

  def forward(self, logits, labels, *, sparse, opts):
    _check(opts)
    rows, c = logits.shape
    br, bc, grid = self._grid(rows, c)
    row_spec = pl.BlockSpec((br, 1), lambda i, j: (i, 0))
    y_spec = row_spec if sparse else pl.BlockSpec((br, bc), lambda i, j: (i, j))
    y = labels[:, None] if sparse else labels
    vmem = _pltpu().VMEM((br, 1), jnp.float32)
    out_shape = (jax.ShapeDtypeStruct((rows, 1), jnp.float32),) * 2
    loss, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, sparse=sparse, opts=opts, block_c=bc, c=c),
        grid=grid, in_specs=[pl.BlockSpec((br, bc), lambda i, j: (i, j)), y_spec],
        out_specs=(row_spec, row_spec), out_shape=out_shape, scratch_shapes=[vmem] * 5,
        compiler_params=self._params(("parallel", "arbitrary")), interpret=self.interpret,
        name="jxent_xent_fwd")(logits, y)
    return loss[:, 0], lse[:, 0]

  def backward(self, logits, labels, lse, g, *, sparse, opts, want_dlabels=True):
    _check(opts)
    rows, c = logits.shape
    br, bc, grid = self._grid(rows, c)
    row_spec = pl.BlockSpec((br, 1), lambda i, j: (i, 0))
    blk_spec = pl.BlockSpec((br, bc), lambda i, j: (i, j))
    args = [logits, labels[:, None] if sparse else labels, lse[:, None],
            g.astype(jnp.float32)[:, None]]
    in_specs = [blk_spec, row_spec if sparse else blk_spec, row_spec, row_spec]
    out_shape = [jax.ShapeDtypeStruct((rows, c), logits.dtype)]
    if not sparse:
      sum_t = jnp.sum(labels.astype(jnp.float32), axis=-1)
      args.append(((1.0 - opts.label_smoothing) * sum_t + opts.label_smoothing)[:, None])
      in_specs.append(row_spec)
      if want_dlabels:
        out_shape.append(jax.ShapeDtypeStruct((rows, c), labels.dtype))
    res = pl.pallas_call(
        functools.partial(_bwd_kernel, sparse=sparse, opts=opts, block_c=bc, c=c),
        grid=grid, in_specs=in_specs, out_specs=[blk_spec] * len(out_shape),
        out_shape=tuple(out_shape), compiler_params=self._params(("parallel", "parallel")),
        interpret=self.interpret, name="jxent_xent_bwd")(*args)
    return res[0], (res[1] if len(res) > 1 else None)


def _check(opts: XentOptions):
  if opts.axis_name is not None:
    raise ValueError("implementation 'pallas_mosaic_tpu' does not support axis_name "
                     "(vocab-parallel); use implementation='xla'.")


dispatch.register("pallas_mosaic_tpu", PallasMosaicTpuKernel)
