"""Fused linear + cross-entropy: the loss of ``x @ w`` without materialising ``[N, V]`` logits.

Two algorithms (``implementation=``):

* ``"linear_chunked"`` (lean, the default; alias ``"chunked_xla"``): the forward walks the vocabulary in blocks of ``block_v``
  columns with an online log-sum-exp; the backward recomputes each block's logits and accumulates
  ``dx`` (float32) and writes ``dw`` block by block. 4 matmuls; temporaries O(N x block_v).
  Residuals: the inputs and the per-row log-sum-exp. With ``block_n`` the tokens go in passes of
  ``block_n`` rows (temporaries O(block_n x block_v), ``dw`` accumulated across the passes).
* ``"linear_fused_grad"`` (fast, scalar reductions only; alias ``"fused_grad_xla"``): walks the tokens in chunks of ``block_n``
  rows, forms each chunk's full-vocabulary logits, loss and gradient in the forward pass, and
  accumulates ``dw`` in float32. 3 matmuls; temporaries O(block_n x V) plus the float32 ``dw``
  accumulator. The backward only scales the saved gradients by the cotangent.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jxent._src import configs, core
from jxent._src.kernels import rowmath, xla
from jxent._src.kernels.rowmath import fold_blocks
from jxent._src.options import XentOptions, make_options

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class LinearChunked:
  """Vocab-blocked linear cross-entropy with recompute (lean).

  Attributes:
    block_v: vocabulary columns per step (the ``[rows, block_v]`` float32 logits block).
    block_n: tokens per pass, or None for all. Smaller passes shrink both the logits block and
      the float32 ``dx`` accumulator to ``block_n`` rows, for the same matmul work; ``dw`` is then
      accumulated across the passes in the weights' dtype (one rounding per pass for bfloat16
      weights).
  """
  name = "linear_chunked"
  block_v: int = 2048
  block_n: Optional[int] = None

  def __post_init__(self):
    if not isinstance(self.block_v, int) or self.block_v < 1:
      raise ValueError(f"LinearChunked: block_v must be a positive int, got {self.block_v!r}.")
    if self.block_n is not None and (not isinstance(self.block_n, int) or self.block_n < 1):
      raise ValueError(f"LinearChunked: block_n must be None or a positive int, "
                       f"got {self.block_n!r}.")


@dataclasses.dataclass(frozen=True)
class LinearFusedGrad:
  """Token-chunked linear cross-entropy with the gradient formed in the forward pass (fast).

  Attributes:
    block_n: tokens per chunk (the chunk's ``[block_n, V]`` logits are formed whole).
    dw_accumulation: ``"float32"`` (exact: a float32 ``[D, V]`` accumulator, read and written
      once per chunk) or ``"weights"`` (accumulate in the weights' dtype: no extra buffer and half
      the traffic for bfloat16 weights, at one rounding per chunk).
  """
  name = "linear_fused_grad"
  block_n: int = 512
  dw_accumulation: str = "float32"

  def __post_init__(self):
    if not isinstance(self.block_n, int) or self.block_n < 1:
      raise ValueError(f"LinearFusedGrad: block_n must be a positive int, got {self.block_n!r}.")
    if self.dw_accumulation not in ("float32", "weights"):
      raise ValueError(f"LinearFusedGrad: dw_accumulation must be 'float32' or 'weights', got "
                       f"{self.dw_accumulation!r}.")


# The names used in the README and by jxent-bench, and the earlier aliases.
_LINEAR = {"linear_chunked": LinearChunked, "linear_fused_grad": LinearFusedGrad,
           "chunked_xla": LinearChunked, "fused_grad_xla": LinearFusedGrad}
# What a tuned choice may name: both algorithms and "unfused" (the logits x @ w, then the loss).
ALGORITHMS = {"linear_chunked": LinearChunked, "linear_fused_grad": LinearFusedGrad,
              "unfused": None}


def names() -> tuple[str, ...]:
  """The names ``linear_softmax_cross_entropy(implementation=...)`` takes."""
  return tuple(sorted(ALGORITHMS))


def _in_shard_map(*arrays) -> bool:
  """Whether the block loops must peel their first block (see :func:`fold_blocks`): only when
  an input varies over manual mesh axes. Elsewhere the loops start at block 0, so two blocks
  still make a loop: a peeled block and a one-trip loop are inlined, and XLA then merges
  (CSE) the backward's recomputed logits with the forward's and keeps them alive in between
  (at 512 x 64 -> 4099, f32: 13.1 -> 5.0 MB of temporaries; 6147: 8.9 -> 5.0)."""
  return any(rowmath.varying(a) for a in arrays)


def acc_dtype(*arrays):
  """The accumulation dtype: the wider of float32 and the inputs' (float64 stays float64)."""
  return rowmath.compute_dtype(jnp.result_type(*(a.dtype for a in arrays)))


def dot(a, b):
  """``a @ b`` accumulated in :func:`acc_dtype` of the operands (the linear forms' one matmul)."""
  return jnp.dot(a, b, preferred_element_type=acc_dtype(a, b))


def _dlogits_block(zraw, labels, start, stats, x_lab, g, opts, v_total, weights=None):
  """``g * (coef * p - target)`` of one block of logits (``p = exp(z - m) / z_sum``: shift
  invariant), with the label's entry from its logit ``x_lab`` (:func:`rowmath.label_grad`).
  ``weights = (class weight of the block's columns, w_y, sum(w))`` under a class weight."""
  z = rowmath.prep_logits(zraw, opts)
  eps = opts.label_smoothing
  t_lab = None
  if weights is None:
    coef = rowmath.grad_coef(stats, opts)
    smooth = eps / v_total if eps else 0.0
  else:
    cwb, w_y, wsum = weights
    sum_t, smooth, t_lab = rowmath.weighted_targets(cwb, None, w_y, wsum, opts, v_total,
                                                    sparse=True)
    coef = rowmath.grad_coef(stats, opts, sum_t, weighted=True)
    smooth = 0.0 if smooth is None else smooth[None, :]
  d = coef[:, None] * rowmath.softmax(z, stats[0], stats[2]) - smooth
  cols = start + lax.broadcasted_iota(labels.dtype, z.shape, 1)
  d_lab = rowmath.label_grad(x_lab, stats, coef, opts, v_total, t_lab=t_lab)
  d = jnp.where(cols == labels[:, None], d_lab[:, None], d)
  return g[:, None] * d * rowmath.softcap_factor(z, opts)


def _dcw_block(zraw, labels, start, stats, x_lab, g, cwb, opts, v_total):
  """``d sum(g * loss) / d w`` for one block's columns (:func:`rowmath.class_weight_grad`)."""
  z = rowmath.prep_logits(zraw, opts)
  xent = stats[1] - (x_lab - stats[0])
  return rowmath.class_weight_grad(z, labels - start, stats, g.astype(z.dtype), cwb.astype(z.dtype),
                                   opts, v_total, sparse=True, xent=xent)


# ------------------------------------------------------------------------------------------------
# Lean: vocab blocks, online log-sum-exp, recompute in the backward pass.
# ------------------------------------------------------------------------------------------------
def _chunked_forward(x, w, labels, opts, block_v, cw=None):
  n, v = x.shape[0], w.shape[1]
  glabels = labels
  labels = labels - rowmath.class_offset(v, opts)  # local ids when the vocabulary is sharded

  def stats(start, size, state):
    m0, z0, zc0, lab0, sx0 = state
    zb = rowmath.prep_logits(dot(x, lax.dynamic_slice_in_dim(w, start, size, axis=1)), opts)
    bm = jnp.max(zb, axis=-1)
    m = jnp.maximum(m0, bm)
    local = labels - start
    # (the label's term is left out of the sum: rowmath.label_log_z)
    e = jnp.where(lax.broadcasted_iota(local.dtype, zb.shape, 1) == local[:, None], 0.0,
                  jnp.exp(zb - m[:, None]))
    z, zc = rowmath.add_rescaled(z0, zc0, jnp.where(jnp.isneginf(m0), 0.0, rowmath.exp_diff(m0, m)),
                                 jnp.sum(e, axis=-1), 1.0)
    hit = (local >= 0) & (local < size)
    picked = jnp.take_along_axis(zb, jnp.clip(local, 0, size - 1)[:, None], axis=-1)[:, 0]
    lab = lab0 + jnp.where(hit, picked, 0.0)
    if opts.label_smoothing:  # sum(x), or sum(w x) under a class weight
      sx = sx0 + jnp.sum(zb if cw is None else zb * lax.dynamic_slice_in_dim(cw, start, size)[None],
                         axis=-1)
    else:
      sx = sx0
    return m, z, zc, lab, sx

  acc = acc_dtype(x, w)
  zero = jnp.zeros((n,), acc)
  init = (jnp.full((n,), -jnp.inf, acc), zero, zero, zero, zero)
  m, z, zc, lab, sx = fold_blocks(stats, v, block_v, init, peel=_in_shard_map(x, w, labels))
  z = z + zc
  weights = None if cw is None else rowmath.class_weight_rows(cw, glabels, opts, sparse=True)
  loss, row = rowmath.loss_from_stats(m, z, None, lab, sx, glabels, sparse=True, opts=opts,
                                      local_c=v, weights=weights)
  # the residual: the row statistics and the label's logit (global: summed over the shards)
  return loss, (*row, rowmath.psum(lab, opts))


def _pad_rows(n: int, block_n: int, *arrays):
  """Pads the leading axis to a multiple of ``block_n`` (zeros) and splits it into passes."""
  pad = (-n) % block_n
  out = []
  for a in arrays:
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) if pad else a
    out.append(a.reshape(-1, block_n, *a.shape[1:]))
  return out


def _chunked_backward(x, w, labels, res, g, opts, block_v, block_n=None, cw=None):
  """``(dx, dw, dcw)``: ``dcw`` (the class weight's, None without one) in its dtype."""
  v = w.shape[1]
  v_total = rowmath.num_classes(v, opts)
  acc = acc_dtype(x, w)
  glabels = labels
  g = rowmath.zero_ignored(labels, g, opts).astype(acc)
  labels = labels - rowmath.class_offset(v, opts)
  if cw is not None:  # the labels' weights and sum(w) (per row: token passes split it), all shards
    w_y, wsum = rowmath.class_weight_rows(cw.astype(acc), glabels, opts, sparse=True)
    res = (*res, w_y, jnp.broadcast_to(wsum, w_y.shape))

  def one_pass(xs, ys, ls, gs, dw, dcw, accumulate):
    def step(start, size, carry):
      dx, dw, dcw = carry
      wb = lax.dynamic_slice_in_dim(w, start, size, axis=1)
      zraw = dot(xs, wb)
      weights = None
      if cw is not None:
        cwb = lax.dynamic_slice_in_dim(cw, start, size).astype(acc)
        weights = (cwb, ls[4], ls[5])
        dcw = lax.dynamic_update_slice_in_dim(
            dcw, lax.dynamic_slice_in_dim(dcw, start, size)
            + _dcw_block(zraw, ys, start, ls[:3], ls[3], gs, cwb, opts, v_total), start, axis=0)
      dz = _dlogits_block(zraw, ys, start, ls[:3], ls[3], gs, opts, v_total,
                          weights).astype(x.dtype)
      dx = dx + dot(dz, wb.T)
      dwb = dot(xs.T, dz)
      if accumulate:  # later token passes add to the columns written by the earlier ones
        dwb = dwb + lax.dynamic_slice_in_dim(dw, start, size, axis=1).astype(acc)
      dw = lax.dynamic_update_slice_in_dim(dw, dwb.astype(dw.dtype), start, axis=1)
      return dx, dw, dcw

    dx, dw, dcw = fold_blocks(step, v, block_v, (jnp.zeros(xs.shape, acc), dw, dcw),
                              peel=_in_shard_map(xs, ys, *ls, gs, w))
    return dx.astype(x.dtype), dw, dcw

  n = x.shape[0]
  dw = jnp.zeros(w.shape, w.dtype)
  dcw = None if cw is None else jnp.zeros(cw.shape, acc)
  if block_n is None or block_n >= n:
    dx, dw, dcw = one_pass(x, labels, res, g, dw, dcw, accumulate=False)
  else:
    # Token passes in a loop (one set of temporaries); padded rows have g = 0.
    xp, yp, gp, *rp = _pad_rows(n, block_n, x, labels, g, *res)
    rp[2] = jnp.where(rp[2] == 0, 1.0, rp[2])  # (padded rows: z = 1, as stats_of gives)

    def body(i, _, carry):  # the first pass (static i = 0) writes dw, the others add to it
      dxp, dw, dcw = carry
      dx_i, dw, dcw = one_pass(xp[i], yp[i], tuple(r[i] for r in rp), gp[i], dw, dcw,
                               accumulate=not (isinstance(i, int) and i == 0))
      return dxp.at[i].set(dx_i), dw, dcw

    dxp, dw, dcw = fold_blocks(body, xp.shape[0], 1, (jnp.zeros(xp.shape, x.dtype), dw, dcw))
    dx = dxp.reshape(-1, x.shape[1])[:n]
  # dx is this shard's part; match_vma (check_vma=True) or shard_map's transpose sums the parts.
  return dx, dw, (None if dcw is None else dcw.astype(cw.dtype))


def _chunked_forward_passes(x, w, labels, opts, block_v, block_n, cw=None):
  n = x.shape[0]
  if block_n is None or block_n >= n:
    return _chunked_forward(x, w, labels, opts, block_v, cw)
  xp, yp = _pad_rows(n, block_n, x, labels)
  loss, res = lax.map(lambda a: _chunked_forward(a[0], w, a[1], opts, block_v, cw), (xp, yp))
  return loss.reshape(-1)[:n], tuple(r.reshape(-1)[:n] for r in res)


@functools.partial(jax.custom_vjp, nondiff_argnames=("opts", "block_v", "block_n"))
def linear_xent_chunked(x, w, labels, class_weight, opts: XentOptions, block_v: int,
                        block_n: Optional[int] = None):
  """Per-row loss ``[N]`` (float32; float64 for float64 inputs) of ``x [N, D] @ w [D, V]``;
  lean memory. ``class_weight``: None or ``[V]`` (PyTorch's ``weight=``)."""
  return _chunked_forward_passes(x, w, labels, opts, block_v, block_n, class_weight)[0]


def _linear_xent_chunked_fwd(x, w, labels, class_weight, opts, block_v, block_n):
  loss, stats = _chunked_forward_passes(x, w, labels, opts, block_v, block_n, class_weight)
  return loss, (x, w, labels, class_weight, stats)


def _linear_xent_chunked_bwd(opts, block_v, block_n, res, g):
  x, w, labels, cw, stats = res
  g = rowmath.total_cotangent(g, w, opts)
  dx, dw, dcw = _chunked_backward(x, w, labels, stats, g, opts, block_v, block_n, cw)
  return (rowmath.match_vma(dx, x), rowmath.match_vma(dw, w), None,
          None if cw is None else rowmath.match_vma(dcw, cw))


linear_xent_chunked.defvjp(_linear_xent_chunked_fwd, _linear_xent_chunked_bwd)


# ------------------------------------------------------------------------------------------------
# Fast: token chunks, gradient formed in the forward pass (scalar reductions).
# ------------------------------------------------------------------------------------------------
def _fused_all(x, w, labels, weights, opts, block_n, dw_dtype=_F32, cw=None):
  """``(total, dx, dw, dcw)``; ``dcw`` (None without a class weight) in the class weight's dtype."""
  n, v = x.shape[0], w.shape[1]
  acc = acc_dtype(x, w)
  if n == 0:
    return (jnp.zeros((), acc), jnp.zeros(x.shape, x.dtype), jnp.zeros(w.shape, w.dtype),
            None if cw is None else jnp.zeros(cw.shape, cw.dtype))
  # padded rows get weight 0 (and label 0): they add nothing
  xp, yp, wp = _pad_rows(n, block_n, x, labels, weights)
  cwa = None if cw is None else cw.astype(acc)

  def body(i, carry):
    total, dxp, dw, dcw = carry
    xs, ys, ws = xp[i], yp[i], wp[i]
    zraw = dot(xs, w)
    loss, stats = xla.forward(zraw, ys, sparse=True, opts=opts,
                              **({} if cw is None else {"class_weight": cwa}))
    total = total + jnp.sum(jnp.where(ws == 0, 0.0, loss * ws))
    g = jnp.where(rowmath.ignored_rows(ys, opts) if opts.ignore_index is not None else False, 0.0, ws)
    x_lab = rowmath.local_label(zraw, ys, opts)[0]
    weights = None
    if cw is not None:
      weights = (cwa, *rowmath.class_weight_rows(cwa, ys, opts, sparse=True))
      dcw = dcw + _dcw_block(zraw, ys, 0, stats, x_lab, g, cwa, opts, v)
    dz = _dlogits_block(zraw, ys, 0, stats, x_lab, g, opts, v, weights).astype(x.dtype)
    dxp = dxp.at[i].set(dot(dz, w.T).astype(x.dtype))
    dw = (dw + dot(xs.T, dz)).astype(dw_dtype)
    return total, dxp, dw, dcw

  init = (jnp.zeros((), acc), jnp.zeros(xp.shape, x.dtype), jnp.zeros(w.shape, dw_dtype),
          None if cw is None else jnp.zeros(cw.shape, acc))
  total, dxp, dw, dcw = lax.fori_loop(0, xp.shape[0], body, init)
  return (total, dxp.reshape(-1, x.shape[1])[:n], dw.astype(w.dtype),
          None if cw is None else dcw.astype(cw.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnames=("opts", "block_n", "dw_dtype"))
def linear_xent_fused(x, w, labels, weights, class_weight, opts: XentOptions, block_n: int,
                      dw_dtype=_F32):
  """``sum(weights * loss)`` of ``x @ w`` with the gradients formed in the forward pass
  (``class_weight``: None or ``[V]``, whose gradient is formed there too)."""
  return _fused_all(x, w, labels, weights, opts, block_n, dw_dtype, class_weight)[0]


def _linear_xent_fused_fwd(x, w, labels, weights, class_weight, opts, block_n, dw_dtype):
  total, dx, dw, dcw = _fused_all(x, w, labels, weights, opts, block_n, dw_dtype, class_weight)
  return total, (rowmath.match_vma(dx, x), rowmath.match_vma(dw, w),
                 None if dcw is None else rowmath.match_vma(dcw, class_weight))


def _linear_xent_fused_bwd(opts, block_n, dw_dtype, res, g):
  dx, dw, dcw = res
  scale = lambda d: lax.cond(g == 1, lambda: d, lambda: (d * g.astype(d.dtype)).astype(d.dtype))
  return scale(dx), scale(dw), None, None, (None if dcw is None else scale(dcw))


linear_xent_fused.defvjp(_linear_xent_fused_fwd, _linear_xent_fused_bwd)


# ------------------------------------------------------------------------------------------------
# Public entry point.
# ------------------------------------------------------------------------------------------------
def build_algorithm(cand: dict):
  """The linear algorithm of a stored candidate ``{implementation, params}``: an object, or the
  name ``"unfused"``."""
  name = cand["implementation"]
  if name == "unfused":
    return name
  return ALGORITHMS[name](**dict(cand.get("params") or {}))


def tuned_algorithm(key: str, memory_budget: Optional[int] = None):
  """``(algorithm, source)`` for a linear call keyed ``key``: the fastest tuned candidate whose
  compiled temporaries fit ``memory_budget`` (default: a quarter of the device's memory), else
  the lean :class:`LinearChunked`."""
  budget = configs.default_memory_budget() if memory_budget is None else memory_budget
  cand, source = configs.lookup(key, memory_budget=budget)
  return (LinearChunked() if cand is None else build_algorithm(cand)), source


def check_linear_inputs(x, w, labels):
  """Validates ``x [..., hidden]``, ``w [hidden, num_classes]`` and integer ``labels [...]``
  (trace time); returns them as arrays."""
  x = core.check_logits(x, "x")
  w = core.check_logits(w, "w")
  labels = jnp.asarray(labels)
  if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"expected x [..., hidden] and w [hidden, num_classes]; got x {x.shape}, "
                     f"w {w.shape}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"`labels` must be integers, got {labels.dtype}.")
  if labels.shape != x.shape[:-1]:
    raise ValueError(f"`labels` {labels.shape} must have the shape of x without its last axis "
                     f"{x.shape[:-1]}.")
  return x, w, labels


def linear_softmax_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    reduction: Optional[str] = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: Optional[float] = None,
    axis_name: Optional[str] = None,
    implementation: Any = None,
    memory_budget: Optional[int] = None,
    class_weight: Optional[ArrayLike] = None,
) -> jax.Array:
  """Cross-entropy of ``x @ w`` with integer labels, never building ``[N, V]`` logits.

  Args:
    x: ``[..., hidden]`` activations.
    w: ``[hidden, num_classes]`` projection (a flax ``Dense`` kernel; pass ``emb.T`` for tied
      embeddings).
    labels: ``[...]`` integer class ids.
    reduction: ``"mean"`` (over rows not ignored), ``"sum"`` or ``"none"`` (``[...]``).
    ignore_index: rows with this label give 0 loss and 0 gradient.
    label_smoothing: epsilon in ``[0, 1]``.
    z_loss: coefficient ``>= 0`` of ``logsumexp**2``.
    logit_softcap: ``c > 0`` or None.
    axis_name: mesh axis over which the class dimension of ``w`` is sharded (vocab parallel);
      labels are global ids. Uses the lean algorithm.
    implementation: None or ``"linear_chunked"`` (lean: vocab blocks, recompute, O(N x block)
      temporaries), ``"linear_fused_grad"`` (fast: 3 matmuls, gradient formed in the forward pass,
      float32 dW accumulator; scalar reductions only), or a ``LinearChunked(block_v=...,
      block_n=...)`` /
      ``LinearFusedGrad(block_n=..., dw_accumulation=...)`` object, or ``"unfused"`` (the
      ``[N, V]`` logits, then the loss: fastest where memory allows). ``None`` takes the fastest
      tuned choice for this device and shape whose compiled temporaries fit ``memory_budget``
      (:func:`jxent.chosen_implementation`), and the lean algorithm without one.
    memory_budget: bytes of compiled temporaries the ``None`` choice may use (default: a
      quarter of the device's memory where it reports it, else 4 GiB); must be > 0.
    class_weight: optional ``[num_classes]`` floating weights, PyTorch's ``weight=`` (see
      :func:`jxent.softmax_cross_entropy_with_integer_labels`: ``"mean"`` divides by the sum
      of the kept rows' ``w[label]``); with ``axis_name``, this shard's slice. Every algorithm
      takes it inside its vocabulary blocks; its gradient is exact.

  Returns:
    The reduced loss (scalar) or per-row losses ``[...]``, in the dtype of ``x``.

  Example:
    >>> import jax, jax.numpy as jnp, jxent
    >>> x = jnp.ones((4, 8)); w = jnp.ones((8, 10)); y = jnp.array([0, 1, 2, 3])
    >>> jxent.linear_softmax_cross_entropy(x, w, y)
    Array(2.3025851, dtype=float32)
  """
  x, w, labels = check_linear_inputs(x, w, labels)
  core.check_reduction(reduction)
  opts = make_options(label_smoothing=label_smoothing, z_loss=z_loss, logit_softcap=logit_softcap,
                      ignore_index=ignore_index, axis_name=axis_name)
  if memory_budget is not None and (isinstance(memory_budget, bool) or not memory_budget > 0):
    raise ValueError(f"`memory_budget` must be a positive number of bytes, got {memory_budget!r}.")
  cw = core.check_class_weight(class_weight, (w.shape[1],), jnp.result_type(x.dtype, w.dtype), opts,
                               what=f"w {w.shape}")
  if implementation is None:
    try:
      key = configs.make_key(
          "linear", (max(1, x.size // max(x.shape[-1], 1)), x.shape[-1], w.shape[1]), x.dtype,
          reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
          logit_softcap=logit_softcap)
      algo, _ = tuned_algorithm(key, memory_budget)
    except Exception:  # noqa: BLE001  (a broken tuning file must never break the loss)
      algo = LinearChunked()
    if (isinstance(algo, LinearFusedGrad) and (reduction not in ("mean", "sum") or axis_name)) or (
        algo == "unfused" and axis_name is not None):
      algo = LinearChunked()  # (the tuned choice does not apply to this call)
  elif implementation == "unfused":
    algo = "unfused"
  elif isinstance(implementation, str):
    if implementation not in _LINEAR:
      raise ValueError(f"Unknown implementation {implementation!r} for linear_softmax_cross_entropy; "
                       f"expected one of {list(names())} (or the earlier names 'chunked_xla', "
                       f"'fused_grad_xla'), a LinearChunked / LinearFusedGrad object, or None.")
    algo = _LINEAR[implementation]()
  elif isinstance(implementation, (LinearChunked, LinearFusedGrad)):
    algo = implementation
  else:
    raise TypeError(f"`implementation` must be None, a name or a Linear* object, got {implementation!r}.")
  if algo == "unfused":
    logits = jnp.dot(x, w, preferred_element_type=jnp.promote_types(x.dtype, w.dtype))
    return core.loss(logits, labels, axis=-1, sparse=True, opts=opts, reduction=reduction,
                     class_weight=cw)
  batch_shape = labels.shape
  x2 = x.reshape(-1, x.shape[-1])
  y2 = labels.reshape(-1)
  kept = None if ignore_index is None else (y2 != ignore_index)
  if isinstance(algo, LinearFusedGrad):
    if reduction not in ("mean", "sum"):
      raise ValueError("implementation 'linear_fused_grad' (fused_grad_xla) forms the gradient in "
                       "the forward pass and "
                       f"needs reduction 'mean' or 'sum', got {reduction!r}.")
    if axis_name is not None:
      raise ValueError("implementation 'linear_fused_grad' (fused_grad_xla) does not support "
                       "axis_name; use 'linear_chunked'.")
    acc = acc_dtype(x, w)
    wts = jnp.ones(y2.shape, acc) if kept is None else kept.astype(acc)
    denom = None
    if reduction == "mean" and cw is not None:  # PyTorch: / sum(w[label]) (NaN when 0)
      denom = core.label_weight_sum(cw, y2, kept, opts).astype(acc)
      wts = wts / lax.stop_gradient(denom)
    elif reduction == "mean":
      count = jnp.sum(wts)
      wts = jnp.where(count > 0, wts / jnp.maximum(count, 1.0), 0.0)
    # ("float32": the wider of float32 and the weights' dtype, so float64 stays float64)
    dw_dtype = jnp.dtype(acc if algo.dw_accumulation == "float32" else w.dtype)
    total = linear_xent_fused(x2, w, y2, lax.stop_gradient(wts), cw, opts, algo.block_n, dw_dtype)
    if denom is not None:  # the denominator's own derivative in w (the value is unchanged)
      total = total + lax.stop_gradient(total) * (1.0 - denom / lax.stop_gradient(denom))
    return total.astype(x.dtype)
  loss = linear_xent_chunked(x2, w, y2, cw, opts, algo.block_v, algo.block_n)
  if cw is not None and reduction == "mean":
    return (jnp.sum(loss) / core.label_weight_sum(cw, y2, kept, opts)).astype(x.dtype)
  return core.reduce_native(loss.reshape(batch_shape), None if kept is None else
                            kept.reshape(batch_shape), reduction, x.dtype)
