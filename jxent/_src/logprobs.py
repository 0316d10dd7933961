"""Per-token log-probabilities and entropies (RL fine-tuning), on logits and on hidden states.

With ``z = cap(logits) / T`` per row: ``log_prob = z[label] - lse(z)`` and
``entropy = lse(z) - sum(softmax(z) * z)``. One walk over the classes keeps three running
statistics per row (max ``m``, ``s = sum(exp(z - m))`` without the label's term, ``t =
sum(exp(z - m) * (z - m))``) and the label's ``z``; nothing of shape ``[rows, classes]`` outlives
the walk. ``log_prob = (z_y - m) - log1p(s + expm1(z_y - m))`` is exact on confident rows (the
sampled token of an RL policy: ``log(1 + s)`` would round ``s`` to the ulp of 1). The custom VJPs
keep the inputs and the row statistics ``(m, log_z, z)`` (never an absolute ``lse``: shift
invariant), the log-prob and the entropy, and recompute ``softmax = exp(z - m) / z`` block by
block:

* ``d log_prob / dz = onehot(label) - p``, at the label ``-expm1(log_prob)`` (no ``1 - p``
  cancellation)
* ``d entropy / dz = -p * ((z - m) - (log_z - entropy))``

then ``dlogits = dz / T * cap'(logits)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jxent._src import core, dispatch, linear
from jxent._src.kernels import rowmath
from jxent._src.kernels.rowmath import fold_blocks
from jxent._src.options import XentOptions, make_options


# ------------------------------------------------------------------------------------------------
# Per-row math shared by the logits and the linear forms.
# ------------------------------------------------------------------------------------------------
def _scaled(raw, inv_t, opts: XentOptions):
  """``(z, capped)``: the capped, upcast logits of a block and the same divided by T."""
  capped = rowmath.prep_logits(raw, opts)
  return capped * inv_t[:, None].astype(capped.dtype), capped


def _init(rows: int, dtype):
  zero = jnp.zeros((rows,), dtype)
  return jnp.full((rows,), -jnp.inf, dtype), zero, zero, zero


def _fold(state, x, inv_t, local):
  """Folds a block of capped logits ``x [R, B]`` at ``z = x * inv_t`` (``local``: the labels
  relative to its first class) into ``(m, s, t, lab)`` of ``z`` over every class (a select on
  the label's lane would make XLA:CPU write an ``[R, B]`` copy: :func:`_without_label` takes
  its term out after the walk); ``t`` is relative to ``m`` and is rebased with it.

  ``z`` itself is never formed: every reduction reads ``x`` and scales it in its own fusion
  (``max z = inv_t * max x``, since ``T > 0``), so a temperature adds no ``[R, B]`` temporary."""
  m0, s0, t0, lab0 = state
  it = inv_t.astype(x.dtype)
  m = jnp.maximum(m0, jnp.max(x, axis=-1) * it)
  m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
  d0 = jnp.where(jnp.isneginf(m0), 0.0, m0 - m_safe)  # rebase the running sums to m
  e0 = jnp.where(jnp.isneginf(m0), 1.0, rowmath.exp_diff(m0, m_safe))
  zs = x * it[:, None] - m_safe[:, None]
  e = jnp.exp(zs)
  s = s0 * e0 + jnp.sum(e, axis=-1)
  t = e0 * (t0 + d0 * s0) + jnp.sum(jnp.where(e == 0, 0.0, e * zs), axis=-1)
  size = x.shape[-1]
  hit = (local >= 0) & (local < size)
  picked = jnp.take_along_axis(x, jnp.clip(local, 0, size - 1)[:, None], axis=-1)[:, 0] * it
  return m, s, t, lab0 + jnp.where(hit, picked, 0.0)


def _without_label(state, owned):
  """The walk's ``(m, s, t, lab)`` over every class as :func:`_finish` takes them, without the
  label's term where this shard holds the label (``owned``; as the Pallas kernels sum them):
  ``s - exp(lab - m)`` cancels on a confident row, the naive formula's accuracy there."""
  m, s, t, lab = state
  m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
  e_lab = jnp.where(owned, jnp.exp(lab - m_safe), 0.0)
  return m, s - e_lab, t - jnp.where(e_lab == 0, 0.0, e_lab * (lab - m_safe)), lab


def _finish(state, labels, opts: XentOptions, local_c: int):
  """``(log_prob, entropy, stats)`` per row from the walk's statistics (``stats = (m, log_z,
  z)``: :func:`rowmath.stats_of`); with ``axis_name`` the shards' statistics are merged first.
  Out-of-range labels give a NaN log-prob (as the loss does)."""
  m, s, t, lab = state
  m = jnp.where(jnp.isneginf(m), 0.0, m)
  if opts.axis_name is not None:
    mg = rowmath.pmax(m, opts)
    e = rowmath.exp_diff(m, mg)
    s, t, lab = rowmath.psum((s * e, e * (t + (m - mg) * s), lab), opts)
    m = mg
  log_s = rowmath.label_log_z(s, lab, m)
  e_lab = jnp.exp(lab - m)  # the label's term, added back
  z = s + e_lab
  t = t + jnp.where(e_lab == 0, 0.0, e_lab * (lab - m))
  entropy = log_s - t / z
  log_prob = rowmath.finish_sparse((lab - m) - log_s, labels, rowmath.num_classes(local_c, opts),
                                   dataclasses.replace(opts, ignore_index=None))
  return log_prob, entropy, rowmath.stats_of(m, log_s, z)


def _dz(z, local, stats, ent, g_lp, g_ent, sel_local=None, g_sel=None, cols=None, lp=None):
  """``d(g_lp * log_prob + g_ent * entropy + sum_k g_sel_k * selected_k) / dz`` for one block
  (``sel_local [R, K]``: the selected ids relative to the block's first class), at the block's
  columns, or at the columns ``cols`` (``[R, B]``) that ``z`` was gathered from. With ``lp``
  (the log-probs) the label's ``1 - p`` is ``-expm1(lp)``, exact on confident rows."""
  m, log_z, zsum = stats
  p = rowmath.softmax(z, m, zsum)
  if cols is None:
    cols = lax.broadcasted_iota(local.dtype, z.shape, 1)
  at_label = cols == local[:, None]
  if lp is None:
    dz = g_lp[:, None] * (at_label.astype(z.dtype) - p)
  else:
    dz = g_lp[:, None] * jnp.where(at_label, -jnp.expm1(lp)[:, None], -p)
  if g_sel is not None:
    hits = cols[:, :, None] == sel_local[:, None, :]
    dz = dz + jnp.sum(jnp.where(hits, g_sel[:, None, :], 0.0), axis=-1) - jnp.sum(
        g_sel, axis=-1)[:, None] * p
  if g_ent is not None:
    zc = (z - m[:, None]) - (log_z - ent)[:, None]  # z - E_p[z]
    dz = dz - g_ent[:, None] * jnp.where(p == 0, 0.0, p * zc)
  return dz


def _cotangents(g, with_entropy, labels, stats, opts: XentOptions, local_c: int, keep, like):
  """``(g_lp, g_ent | None)``: zero on dropped rows (``keep`` false), NaN log-prob cotangents
  on out-of-range labels, each whole over the vocab shards (``like``: an input sharded over
  them, see :func:`rowmath.total_cotangent`)."""
  g_lp = rowmath.nan_rows(jnp.where(keep, g[0], 0.0), labels, stats[1], sparse=True,
                          opts=dataclasses.replace(opts, ignore_index=None), local_c=local_c)
  g_lp = rowmath.total_cotangent(g_lp, like, opts)
  if not with_entropy:
    return g_lp, None
  return g_lp, rowmath.total_cotangent(jnp.where(keep, g[1], 0.0), like, opts)


def _var_block(z, stats, ent):
  """``sum(p * (z - E_p[z])^2)`` over a block ``z [R, B]``: the block's part of the variance of
  ``z`` under the softmax (``E_p[z] = m + log_z - entropy``)."""
  m, log_z, zsum = stats
  p = rowmath.softmax(z, m, zsum)
  d = (z - m[:, None]) - (log_z - ent)[:, None]
  return jnp.sum(jnp.where(p == 0, 0.0, p * d * d), axis=-1)


def _d_inv_t(g_lp, g_ent, lp, ent, inv_t, var, g_sel=None, sel=None):
  """The cotangent of ``inv_t`` (``z = cap(x) * inv_t``): ``d log_prob / d inv_t = (log_prob +
  entropy) / inv_t`` (that is ``(z_y - E_p[z]) / inv_t``), the same for each selected log-prob,
  and ``d entropy / d inv_t = -Var_p(z) / inv_t``. Rows with a zero cotangent give 0 (their
  log-prob may be NaN)."""
  d = jnp.where(g_lp == 0, 0.0, g_lp * (lp + ent))
  if g_ent is not None:
    d = d - jnp.where(g_ent == 0, 0.0, g_ent * var)
  if g_sel is not None:
    d = d + jnp.sum(jnp.where(g_sel == 0, 0.0, g_sel * (sel + ent[:, None])), axis=-1)
  return d / inv_t


def _selected(z_sel, owned, ids, stats, keep, opts: XentOptions, local_c: int):
  """``log_softmax(z)`` at the selected ids ``[R, K]`` from their ``z`` (0 where this shard does
  not own the id; summed over the shards); NaN for ids outside ``[0, C)`` (the labels' policy),
  0 on dropped rows."""
  z_sel = rowmath.psum(jnp.where(owned, z_sel, 0.0), opts)
  n = rowmath.num_classes(local_c, opts)
  m, log_z, _ = stats
  sel = ((z_sel - m[:, None]) - log_z[:, None]) * jnp.where((ids >= 0) & (ids < n), 1.0, jnp.nan)
  return jnp.where(keep[:, None], sel, 0.0)


def _sel_cotangent(g_sel, ids, keep, like, opts: XentOptions, local_c: int):
  """The selected log-probs' cotangent: 0 on dropped rows, NaN (where not 0) at ids outside
  ``[0, C)``, whole over the vocab shards."""
  g_sel = jnp.where(keep[:, None], g_sel, 0.0)
  n = rowmath.num_classes(local_c, opts)
  g_sel = jnp.where(((ids < 0) | (ids >= n)) & (g_sel != 0), jnp.nan, g_sel)
  return rowmath.total_cotangent(g_sel, like, opts)


def _outputs(lp, ent, keep, with_entropy):
  """The primal outputs: 0 on dropped rows; the entropy only when asked for."""
  return jnp.where(keep, lp, 0.0), (jnp.where(keep, ent, 0.0) if with_entropy else None)


# ------------------------------------------------------------------------------------------------
# Logits form: one custom VJP over canonical rows; the walks are the kernel's.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class XlaRows:
  """The XLA walks (``block`` classes per step; whole rows for ``"xla"``): the protocol a kernel
  implements for :func:`token_log_probs` (``PallasTritonKernel`` has the same two methods)."""

  block: int

  def logprob_stats(self, logits, labels, inv_t, *, opts):
    rows, c = logits.shape

    def step(start, size, state):
      capped = rowmath.prep_logits(lax.dynamic_slice_in_dim(logits, start, size, axis=1), opts)
      return _fold(state, capped, inv_t, labels - start)

    return _without_label(fold_blocks(step, c, min(self.block, c),
                                      _init(rows, rowmath.compute_dtype(logits.dtype)),
                                      peel=bool(rowmath.varying(logits))),
                          (labels >= 0) & (labels < c))

  def logprob_grad(self, logits, labels, inv_t, stats, ent, g_lp, g_ent, *, opts):
    c = logits.shape[1]

    def step(start, size, dlogits):
      z, capped = _scaled(lax.dynamic_slice_in_dim(logits, start, size, axis=1), inv_t, opts)
      dz = _dz(z, labels - start, stats, ent, g_lp, g_ent)
      dx = (dz * inv_t[:, None] * rowmath.softcap_factor(capped, opts)).astype(logits.dtype)
      return lax.dynamic_update_slice_in_dim(dlogits, dx, start, axis=1)

    return fold_blocks(step, c, min(self.block, c), jnp.zeros(logits.shape, logits.dtype),
                       peel=bool(rowmath.varying(logits)))


def _logits_var(logits, inv_t, stats, ent, opts, block):
  """``Var_p(z)`` per row of this shard (``sum p (z - mu)^2``), in class blocks: the entropy's
  temperature derivative (a pass of its own, only when an array temperature and the entropy
  are differentiated; under ``jit`` it is dropped when nothing reads it)."""
  rows, c = logits.shape

  def step(start, size, acc):
    z, _ = _scaled(lax.dynamic_slice_in_dim(logits, start, size, axis=1), inv_t, opts)
    return acc + _var_block(z, stats, ent)

  return fold_blocks(step, c, min(block, c), jnp.zeros((rows,), ent.dtype),
                     peel=bool(rowmath.varying(logits)))


def _logits_forward(logits, labels, inv_t, opts, kernel):
  c = logits.shape[1]
  local = labels - rowmath.class_offset(c, opts)
  if logits.shape[0] == 0:  # (Pallas grids cannot be empty)
    stats = _init(0, jnp.float32)
  else:
    stats = kernel.logprob_stats(logits, local, inv_t, opts=opts)
  return _finish(tuple(v.astype(rowmath.compute_dtype(logits.dtype)) for v in stats), labels, opts, c)


def _logits_selected(logits, sel_ids, inv_t, stats, keep, opts: XentOptions):
  """The selected ids' log-probs ``[R, K]``: ``K`` logits gathered per row (no pass over the
  row), each shard the ids it owns."""
  c = logits.shape[1]
  local = sel_ids - rowmath.class_offset(c, opts)
  owned = (local >= 0) & (local < c)
  x_sel = jnp.take_along_axis(logits, jnp.clip(local, 0, c - 1), axis=1)
  z_sel = rowmath.prep_logits(x_sel, opts) * inv_t[:, None].astype(stats[0].dtype)
  return _selected(z_sel, owned, sel_ids, stats, keep, opts, c)


def _set_columns(dlogits, logits, local_label, sel_local, inv_t, stats, ent, lp, g_lp, g_ent,
                 g_sel, opts: XentOptions):
  """Writes the exact gradient at each row's label and selected columns (``sel_local [R, K]``,
  ``K`` may be 0).

  The kernel's walk ran with ``g_p = g_lp + sum(g_sel)`` as the label's cotangent, which is
  right at every other column (``-g_p * p``); these K + 1 columns get their whole value, formed
  here in float32 from their gathered logits (``set``, not ``add``: no second rounding in the
  logits' dtype), by the shard that owns them; the label's ``1 - p`` is ``-expm1(lp)``."""
  c = logits.shape[1]
  cols = jnp.concatenate([local_label[:, None], sel_local], axis=1)        # [R, K + 1]
  owned = (cols >= 0) & (cols < c)
  capped = rowmath.prep_logits(jnp.take_along_axis(logits, jnp.clip(cols, 0, c - 1), axis=1), opts)
  it = inv_t[:, None].astype(stats[0].dtype)
  dz = _dz(capped * it, local_label, stats, ent, g_lp, g_ent, sel_local, g_sel, cols=cols, lp=lp)
  dx = (dz * it * rowmath.softcap_factor(capped, opts)).astype(dlogits.dtype)
  rows = jnp.broadcast_to(jnp.arange(cols.shape[0])[:, None], cols.shape)
  return dlogits.at[rows, jnp.where(owned, cols, c)].set(dx, mode="drop")


@functools.partial(jax.custom_vjp, nondiff_argnames=("opts", "kernel", "with_entropy", "t_grad"))
def token_stats_2d(logits, labels, inv_t, keep, sel_ids, opts: XentOptions, kernel: Any,
                   with_entropy: bool, t_grad: bool = False):
  """``(log_prob [R], entropy [R] | None, selected [R, K] | None)`` of ``logits [R, C]``
  (``sel_ids [R, K]``, ``K = 0`` for none); ``t_grad``: ``inv_t`` came from an array
  temperature, whose cotangent is then formed."""
  return _token_stats_2d_fwd(logits, labels, inv_t, keep, sel_ids, opts, kernel, with_entropy,
                             t_grad)[0]


def _token_stats_2d_fwd(logits, labels, inv_t, keep, sel_ids, opts, kernel, with_entropy, t_grad):
  lp, ent, stats = _logits_forward(logits, labels, inv_t, opts, kernel)
  sel = _logits_selected(logits, sel_ids, inv_t, stats, keep, opts) if sel_ids.shape[1] else None
  out = _outputs(lp, ent, keep, with_entropy) + (sel,)
  return out, (logits, labels, inv_t, keep, sel_ids, stats, ent, lp, sel)


def _token_stats_2d_bwd(opts, kernel, with_entropy, t_grad, res, g):
  logits, labels, inv_t, keep, sel_ids, stats, ent, lp, sel = res
  c = logits.shape[1]
  g_lp, g_ent = _cotangents(g, with_entropy, labels, stats, opts, c, keep, logits)
  local = labels - rowmath.class_offset(c, opts)
  g_sel = None
  g_p = g_lp
  if sel is not None:
    g_sel = _sel_cotangent(g[2], sel_ids, keep, logits, opts, c)
    g_p = g_lp + jnp.sum(g_sel, axis=-1)
  if logits.shape[0] == 0:
    dlogits = jnp.zeros(logits.shape, logits.dtype)
  else:
    dlogits = kernel.logprob_grad(logits, local, inv_t, stats, ent, g_p, g_ent, opts=opts)
    dlogits = _set_columns(dlogits, logits, local, sel_ids - rowmath.class_offset(c, opts),
                           inv_t, stats, ent, lp, g_lp, g_ent, g_sel, opts)
  d_inv_t = None
  if t_grad:
    var = None
    if g_ent is not None:
      var = rowmath.psum(_logits_var(logits, inv_t.astype(ent.dtype), stats, ent, opts,
                                     getattr(kernel, "block", 4096)), opts)
    d_inv_t = rowmath.match_vma(
        _d_inv_t(g_lp, g_ent, lp, ent, inv_t, var, g_sel, sel).astype(inv_t.dtype), inv_t)
  return rowmath.match_vma(dlogits, logits), None, d_inv_t, None, None


token_stats_2d.defvjp(_token_stats_2d_fwd, _token_stats_2d_bwd)


def _check_temperature(temperature, batch_shape):
  """``(1 / T per row, differentiable)``: a positive Python float (a constant), or an array of
  the batch shape (differentiable)."""
  if isinstance(temperature, (bool, str)) or temperature is None:
    raise TypeError(f"`temperature` must be a positive float or an array of the batch shape "
                    f"{batch_shape}, got {temperature!r}.")
  if isinstance(temperature, (int, float)):
    if not temperature > 0:
      raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    return jnp.full(batch_shape, 1.0 / float(temperature), jnp.float32), False
  if not isinstance(temperature, jax.core.Tracer):  # a concrete array: check its values now
    concrete = np.asarray(temperature)
    if concrete.dtype.kind in "fiu" and concrete.size and not (concrete > 0).all():
      raise ValueError(f"`temperature` must be > 0, got min {concrete.min()}.")
  t = jnp.asarray(temperature)
  if not jnp.issubdtype(t.dtype, jnp.floating) and not jnp.issubdtype(t.dtype, jnp.integer):
    raise TypeError(f"`temperature` must be real, got dtype {t.dtype}.")
  try:
    t = jnp.broadcast_to(t, batch_shape)
  except ValueError:
    raise ValueError(f"`temperature` {t.shape} must be a scalar or broadcast to the batch shape "
                     f"{batch_shape}.") from None
  if not jnp.issubdtype(t.dtype, jnp.floating):
    return 1.0 / t.astype(jnp.float32), False  # (integers have no gradient)
  return 1.0 / t.astype(jnp.promote_types(t.dtype, jnp.float32)), True


def _kernel_for(implementation, shape, dtype):
  """The walks for these rows: :class:`XlaRows` for ``"xla"`` (whole rows) and
  ``"chunked_xla"`` (class blocks), the kernel itself when it has them (``pallas_triton``);
  ``None`` takes the loss's default where that kernel has them, else ``"xla"``."""
  c = max(shape[1], 1)
  if implementation is None:
    kernel = dispatch.resolve(None, sparse=True, shape=shape, dtype=dtype)
    return kernel if hasattr(kernel, "logprob_stats") else XlaRows(c)
  kernel = dispatch.resolve(implementation, sparse=True, shape=shape, dtype=dtype)
  if getattr(kernel, "autodiff", False):
    raise ValueError("token_log_probs is one custom VJP (reverse mode); implementation "
                     "'xla_autodiff' (forward mode) does not compute it yet: use 'xla'.")
  if hasattr(kernel, "logprob_stats"):
    return kernel
  if isinstance(kernel, dispatch.ChunkedXlaKernel):
    return XlaRows(kernel.block)
  if isinstance(kernel, dispatch.XlaKernel):
    return XlaRows(c)
  raise ValueError(f"token_log_probs runs on implementation None, 'xla', 'chunked_xla', "
                   f"'pallas_triton', 'pallas_mosaic_gpu' or 'pallas_mosaic_tpu' (or their kernel "
                   f"objects); got "
                   f"{getattr(kernel, 'name', kernel)!r}, which does not compute it yet.")


def token_log_probs(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    temperature: Union[float, ArrayLike] = 1.0,
    where: Optional[ArrayLike] = None,
    ignore_index: Optional[int] = None,
    logit_softcap: Optional[float] = None,
    return_entropy: bool = False,
    selected_ids: Optional[ArrayLike] = None,
    axis_name: Optional[str] = None,
    implementation: Any = None,
):
  r"""Per-token log-probabilities of ``labels`` (and the entropy) at a sampling temperature.

  With ``z = cap(logits) / temperature`` (``cap(x) = c * tanh(x / c)`` for ``logit_softcap=c``):
  ``log_probs = log_softmax(z)[label]`` and ``entropy = -sum(softmax(z) * log_softmax(z))``, in
  one pass over the classes, differentiable (reverse mode) through one custom VJP that keeps
  per-row statistics only. The outputs are float32 for every input dtype (float64 for float64
  logits), so that ratios ``exp(log_probs - old_log_probs)`` are not rounded to bfloat16.

  Args:
    logits: ``[..., num_classes, ...]`` floating logits; the class axis is ``axis``.
    labels: ``[...]`` integer token ids (``logits.shape`` without ``axis``); with ``axis_name``
      global ids.
    axis: the class axis.
    temperature: a positive Python float, or an array of the batch shape ``[...]`` (one per
      token) or a scalar array. An array temperature is differentiable: ``d log_prob / dT =
      -(z_y - E_p[z]) / T`` and ``d entropy / dT = Var_p(z) / T`` from per-row statistics (the
      entropy's adds one pass over the logits in the backward, when it is differentiated).
    where: optional mask: ``[...]`` per token, or the shape of ``logits`` (masked classes are
      left out of the softmax).
    ignore_index: tokens with this label give 0 for both outputs and 0 gradient (as do tokens
      masked by ``where``).
    logit_softcap: ``c > 0`` or None.
    return_entropy: also return the entropy.
    selected_ids: optional ``[..., K]`` integer token ids per token (K small: a verifier's
      yes/no ids, a reward head's tokens, the allowed tokens of constrained decoding): also
      return their log-probs ``log_softmax(z)[selected_ids]``, from ``K`` gathered logits per
      row and the row statistics (no second pass over the row, no ``[N, V]`` log-softmax),
      differentiable. With ``axis_name`` the ids are global; each shard gathers those it owns.
      Ids outside ``[0, num_classes)`` give NaN, as labels do (find them with
      :func:`jxent.check_integer_labels` under ``checkify``).
    axis_name: mesh axis name when the class axis is sharded (vocab parallel).
    implementation: None (the loss's default where it computes this, else ``"xla"``),
      ``"xla"`` (whole rows, fused by XLA), ``"chunked_xla"`` / :class:`jxent.ChunkedXlaKernel`
      (class blocks of ``block``), or ``"pallas_triton"`` / :class:`jxent.PallasTritonKernel`
      (one pass per row on GPU), ``"pallas_mosaic_gpu"`` / :class:`jxent.PallasMosaicGpuKernel`
      (64-row blocks, TMA-pipelined class tiles, Hopper), or ``"pallas_mosaic_tpu"`` (row x
      class tiles on TPU).

  Returns:
    ``log_probs [...]``; ``(log_probs [...], entropy [...])`` with ``return_entropy``; and, with
    ``selected_ids``, ``selected_log_probs [..., K]`` (float32) appended:
    ``(log_probs, selected_log_probs)`` or ``(log_probs, entropy, selected_log_probs)``.

  Example:
    >>> import jax.numpy as jnp, jxent
    >>> lp, ent = jxent.token_log_probs(jnp.array([[1., 2., 3.]]), jnp.array([2]),
    ...                                 temperature=2.0, return_entropy=True)
    >>> [round(float(v), 4) for v in (lp[0], ent[0])]
    [-0.6803, 1.0202]
    >>> lp, yes_no = jxent.token_log_probs(jnp.array([[1., 2., 3.]]), jnp.array([2]),
    ...                                    selected_ids=jnp.array([[0, 1]]))
    >>> [round(float(v), 4) for v in yes_no[0]]
    [-2.4076, -1.4076]
  """
  logits = core.check_logits(logits)
  opts = make_options(logit_softcap=logit_softcap, ignore_index=ignore_index, axis_name=axis_name)
  logits2d, labels2d, row_mask, batch_shape = core.canonicalize(logits, labels, axis=axis,
                                                                sparse=True, where=where)
  inv_t, t_grad = _check_temperature(temperature, batch_shape)
  inv_t = inv_t.reshape(-1)
  keep = jnp.ones(labels2d.shape, bool) if row_mask is None else row_mask
  if ignore_index is not None:
    keep = keep & (labels2d != opts.ignore_index)
  if logits2d.shape[1] == 0:
    raise ValueError(f"`logits` {logits.shape} has no classes on axis {axis}.")
  kernel = _kernel_for(implementation, logits2d.shape, logits2d.dtype)
  sel_ids = check_selected_ids(selected_ids, batch_shape)
  lp, ent, sel = core.call_vjp(token_stats_2d, logits2d, labels2d, inv_t, keep,
                               sel_ids.reshape(labels2d.shape[0], sel_ids.shape[-1]), opts, kernel,
                               bool(return_entropy), t_grad)
  return _returned(lp, ent, sel, batch_shape, return_entropy, selected_ids is not None)


def check_selected_ids(selected_ids, batch_shape) -> jax.Array:
  """``selected_ids`` as an integer ``[..., K]`` array of the batch shape (``[..., 0]`` for
  None); raises at trace time, naming the shapes and dtype."""
  if selected_ids is None:
    return jnp.zeros(tuple(batch_shape) + (0,), jnp.int32)
  ids = jnp.asarray(selected_ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"`selected_ids` must be integer token ids, got dtype {ids.dtype}.")
  if ids.ndim != len(batch_shape) + 1 or tuple(ids.shape[:-1]) != tuple(batch_shape):
    raise ValueError(f"`selected_ids` {ids.shape} must be the batch shape {tuple(batch_shape)} "
                     f"plus one axis of K ids, i.e. {tuple(batch_shape) + ('K',)}.")
  if ids.shape[-1] == 0:
    raise ValueError("`selected_ids` has K = 0 ids per token; pass None for none.")
  return ids.astype(jnp.int32)


def _returned(lp, ent, sel, batch_shape, with_entropy, with_selected):
  out = [lp.reshape(batch_shape)]
  if with_entropy:
    out.append(ent.reshape(batch_shape))
  if with_selected:
    out.append(sel.reshape(tuple(batch_shape) + sel.shape[-1:]))
  return out[0] if len(out) == 1 else tuple(out)


# ------------------------------------------------------------------------------------------------
# Linear form: x @ w in vocabulary blocks, never [N, V].
# ------------------------------------------------------------------------------------------------
# The default vocabulary block: the backward holds a block's logits and its gradient at once
# (with the entropy term), so half the loss's 2048 keeps the same temporaries (N=2048, D=256,
# V=32768, float32: 33.6 MB at 2048 columns, within 10% of the [N, V] logits at 1024).
BLOCK_V = 1024


def _linear_forward(x, w, labels, inv_t, sel_ids, opts, block_v):
  """``(log_prob, entropy, stats, z at the selected ids [N, K], owned [N, K])``: one walk over
  the vocabulary blocks; each block's selected logits are gathered from the block's own
  ``x @ w`` (no extra pass over ``w``)."""
  v = w.shape[1]
  local = labels - rowmath.class_offset(v, opts)
  sel_local = sel_ids - rowmath.class_offset(v, opts)
  k = sel_ids.shape[1]

  def step(start, size, carry):
    state, z_sel = carry
    wb = lax.dynamic_slice_in_dim(w, start, size, axis=1)
    capped = rowmath.prep_logits(linear.dot(x, wb), opts)
    state = _fold(state, capped, inv_t, local - start)
    if k:
      at = sel_local - start
      hit = (at >= 0) & (at < size)
      picked = jnp.take_along_axis(capped, jnp.clip(at, 0, size - 1), axis=1)
      z_sel = z_sel + jnp.where(hit, picked * inv_t[:, None].astype(capped.dtype), 0.0)
    return state, z_sel

  dtype = linear.acc_dtype(x, w)
  init = (_init(x.shape[0], dtype), jnp.zeros(sel_ids.shape, dtype))
  state, z_sel = fold_blocks(step, v, min(block_v, v), init,
                             peel=bool(rowmath.varying(x) or rowmath.varying(w)))
  lp, ent, stats = _finish(_without_label(state, (local >= 0) & (local < v)), labels, opts, v)
  return lp, ent, stats, z_sel, (sel_local >= 0) & (sel_local < v)


@functools.partial(jax.custom_vjp, nondiff_argnames=("opts", "block_v", "with_entropy", "t_grad"))
def linear_token_stats(x, w, labels, inv_t, keep, sel_ids, opts: XentOptions, block_v: int,
                       with_entropy: bool, t_grad: bool = False):
  """``(log_prob [N], entropy [N] | None, selected [N, K] | None)`` of ``x [N, D] @ w [D, V]``
  (``sel_ids [N, K]``, ``K = 0`` for none; ``t_grad``: form the cotangent of ``inv_t``, from an
  array temperature)."""
  return _linear_token_stats_fwd(x, w, labels, inv_t, keep, sel_ids, opts, block_v, with_entropy,
                                 t_grad)[0]


def _linear_token_stats_fwd(x, w, labels, inv_t, keep, sel_ids, opts, block_v, with_entropy,
                            t_grad):
  lp, ent, stats, z_sel, owned = _linear_forward(x, w, labels, inv_t, sel_ids, opts, block_v)
  sel = (_selected(z_sel, owned, sel_ids, stats, keep, opts, w.shape[1]) if sel_ids.shape[1]
         else None)
  out = _outputs(lp, ent, keep, with_entropy) + (sel,)
  return out, (x, w, labels, inv_t, keep, sel_ids, stats, ent, lp, sel)


def _linear_token_stats_bwd(opts, block_v, with_entropy, t_grad, res, g):
  x, w, labels, inv_t, keep, sel_ids, stats, ent, lp, sel = res
  v = w.shape[1]
  g_lp, g_ent = _cotangents(g, with_entropy, labels, stats, opts, v, keep, w)
  local = labels - rowmath.class_offset(v, opts)
  sel_local = sel_ids - rowmath.class_offset(v, opts)
  g_sel = None if sel is None else _sel_cotangent(g[2], sel_ids, keep, w, opts, v)
  want_var = t_grad and g_ent is not None  # (the entropy's temperature derivative)

  def step(start, size, carry):
    dx, dw, var = carry
    wb = lax.dynamic_slice_in_dim(w, start, size, axis=1)
    z, capped = _scaled(linear.dot(x, wb), inv_t, opts)
    dz = _dz(z, local - start, stats, ent, g_lp, g_ent, sel_local - start, g_sel, lp=lp)
    if want_var:
      var = var + _var_block(z, stats, ent)
    dz = (dz * inv_t[:, None] * rowmath.softcap_factor(capped, opts)).astype(x.dtype)
    dx = dx + linear.dot(dz, wb.T)
    dw = lax.dynamic_update_slice_in_dim(dw, linear.dot(x.T, dz).astype(w.dtype), start,
                                         axis=1)
    return dx, dw, var

  init = (jnp.zeros(x.shape, rowmath.compute_dtype(x.dtype)), jnp.zeros(w.shape, w.dtype),
          jnp.zeros(ent.shape, ent.dtype))
  dx, dw, var = fold_blocks(step, v, min(block_v, v), init,
                            peel=bool(rowmath.varying(x) or rowmath.varying(w)))
  d_inv_t = None
  if t_grad:
    var = rowmath.psum(var, opts) if want_var else None
    d_inv_t = rowmath.match_vma(
        _d_inv_t(g_lp, g_ent, lp, ent, inv_t, var, g_sel, sel).astype(inv_t.dtype), inv_t)
  return (rowmath.match_vma(dx.astype(x.dtype), x), rowmath.match_vma(dw, w), None, d_inv_t, None,
          None)


linear_token_stats.defvjp(_linear_token_stats_fwd, _linear_token_stats_bwd)


def linear_token_log_probs(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: Union[float, ArrayLike] = 1.0,
    ignore_index: Optional[int] = None,
    logit_softcap: Optional[float] = None,
    return_entropy: bool = False,
    selected_ids: Optional[ArrayLike] = None,
    axis_name: Optional[str] = None,
    implementation: Any = None,
):
  """:func:`token_log_probs` of the logits ``x @ w``, never building ``[N, V]``.

  The vocabulary is walked in blocks of ``block_v`` columns (online statistics); the backward
  recomputes each block's logits and accumulates ``dx`` in float32 and writes ``dw`` block by
  block: temporaries O(N x block_v).

  Args:
    x: ``[..., hidden]`` activations.
    w: ``[hidden, num_classes]`` projection (pass ``emb.T`` for tied embeddings).
    labels: ``[...]`` integer token ids (global ids with ``axis_name``).
    temperature: a positive Python float, or an array ``[...]`` (one per token) or a scalar
      array; an array is differentiable (see :func:`token_log_probs`).
    ignore_index: tokens with this label give 0 for both outputs and 0 gradient.
    logit_softcap: ``c > 0`` or None.
    return_entropy: also return the entropy.
    selected_ids: optional ``[..., K]`` token ids per token: also return their log-probs,
      gathered from each vocabulary block as the walk passes it (no extra pass over ``w``).
    axis_name: mesh axis over which the class dimension of ``w`` is sharded.
    implementation: None or ``"linear_chunked"`` (``block_v=1024``), or a
      ``jxent.LinearChunked(block_v=...)`` (``block_n`` is not supported here).

  Returns:
    float32 ``log_probs [...]``, or ``(log_probs, entropy)``; with ``selected_ids``, the
    ``selected_log_probs [..., K]`` appended (as :func:`token_log_probs`).

  Example:
    >>> import jax.numpy as jnp, jxent
    >>> x = jnp.ones((2, 4)); w = jnp.ones((4, 8)); y = jnp.array([0, 7])
    >>> jxent.linear_token_log_probs(x, w, y)
    Array([-2.0794415, -2.0794415], dtype=float32)
  """
  x, w, labels = linear.check_linear_inputs(x, w, labels)
  if w.shape[1] == 0:
    raise ValueError(f"`w` {w.shape} has no classes.")
  if implementation is None or implementation in ("linear_chunked", "chunked_xla"):
    algo = linear.LinearChunked(block_v=BLOCK_V)
  elif isinstance(implementation, linear.LinearChunked):
    algo = implementation
  else:
    raise ValueError(f"linear_token_log_probs runs on implementation None or 'linear_chunked' (or a "
                     f"LinearChunked); got {implementation!r}.")
  if algo.block_n is not None:
    raise ValueError("linear_token_log_probs does not take LinearChunked(block_n=...); pass "
                     "block_v only.")
  opts = make_options(logit_softcap=logit_softcap, ignore_index=ignore_index, axis_name=axis_name)
  batch_shape = labels.shape
  inv_t, t_grad = _check_temperature(temperature, batch_shape)
  inv_t = inv_t.reshape(-1)
  y2 = labels.reshape(-1)
  keep = jnp.ones(y2.shape, bool) if ignore_index is None else y2 != opts.ignore_index
  sel_ids = check_selected_ids(selected_ids, batch_shape)
  lp, ent, sel = core.call_vjp(linear_token_stats, x.reshape(-1, x.shape[-1]), w, y2, inv_t, keep,
                               sel_ids.reshape(y2.shape[0], sel_ids.shape[-1]), opts, algo.block_v,
                               bool(return_entropy), t_grad)
  return _returned(lp, ent, sel, batch_shape, return_entropy, selected_ids is not None)
