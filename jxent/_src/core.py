"""The core: one custom VJP over canonical ``[rows, classes]`` inputs, and canonicalisation.

Residuals kept between forward and backward are the inputs and two float32 statistics per row, the
row max ``m`` and ``log_z = log(sum(exp(x - m)))`` (kept apart: the gradient is shift
invariant); nothing of shape ``[rows, classes]`` is created for the backward pass.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jxent._src import dispatch
from jxent._src.options import XentOptions
from jxent._src.kernels import rowmath
from jxent._src.kernels.rowmath import (class_offset, class_weight_rows, compute_dtype,
                                        gather_label, match_vma, nan_rows, num_classes,
                                        prep_logits, total_cotangent, zero_ignored)


# --------------------------------------------------------------------------------------------
# The custom VJP trio.
# --------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnames=("sparse", "opts", "kernel"))
def xent_2d(logits: jax.Array, labels: jax.Array, class_weight: Optional[jax.Array], sparse: bool,
            opts: XentOptions, kernel: Any) -> jax.Array:
  """Per-row cross-entropy of ``logits [R, C]``; returns the float32 (or float64) loss ``[R]``.
  ``class_weight``: None or ``[C]`` in the compute dtype (PyTorch's ``weight=``)."""
  return kernel.forward(logits, labels, sparse=sparse, opts=opts, need_lse=False,
                        **_weight_kw(class_weight))[0]


def _weight_kw(class_weight) -> dict:
  """``class_weight=`` for the kernels, only where one is given (kernels without
  ``class_weights`` take no such argument; :func:`dispatch.resolve` refused them)."""
  return {} if class_weight is None else {"class_weight": class_weight}


def _want_dlabels(labels, sparse):
  """A marker residual (static pytree structure): empty array if labels need a gradient."""
  return None if (sparse or not labels.perturbed) else jnp.zeros((0,), jnp.float32)


def _xent_2d_fwd(logits, labels, class_weight, sparse, opts, kernel):
  # symbolic_zeros=True: inputs arrive as CustomVJPPrimal(value, perturbed).
  want = _want_dlabels(labels, sparse)
  cw, want_dw = None, False
  if class_weight is not None:
    cw, want_dw = class_weight.value, class_weight.perturbed
  loss, stats = kernel.forward(logits.value, labels.value, sparse=sparse, opts=opts,
                               **_weight_kw(cw))
  return loss, (logits.value, labels.value, stats, want, cw,
                jnp.zeros((0,), jnp.float32) if want_dw else None)


def _xent_2d_bwd(sparse, opts, kernel, res, g):
  logits, labels, stats, want, cw, want_dw = res
  log_z = stats[1]
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    g = jnp.zeros(log_z.shape, log_z.dtype)
  g = nan_rows(total_cotangent(g, logits, opts), labels, log_z, sparse=sparse, opts=opts,
               local_c=logits.shape[1])
  dlogits, dlabels = kernel.backward(logits, labels, stats, g, sparse=sparse, opts=opts,
                                     want_dlabels=want is not None, **_weight_kw(cw))
  dw = None
  if want_dw is not None:
    dw = match_vma(class_weight_grad(logits, labels, stats, g, cw, sparse=sparse, opts=opts), cw)
  return (match_vma(dlogits, logits), (None if sparse else match_vma(dlabels, labels)), dw)


xent_2d.defvjp(_xent_2d_fwd, _xent_2d_bwd, symbolic_zeros=True)


def class_weight_grad(logits, labels, stats, g, class_weight, *, sparse: bool, opts: XentOptions):
  """``d sum(g * loss) / d class_weight`` (this shard's ``[C]``; :func:`rowmath.class_weight_grad`:
  one more read of the logits, only when the class weight is differentiated)."""
  x = prep_logits(logits, opts)
  stats = tuple(v.astype(x.dtype) for v in stats[:3])  # (m, log_z, z): a kernel may keep more
  g = g.astype(x.dtype)
  local_c = x.shape[-1]
  xent = None
  if sparse:
    g = zero_ignored(labels, g, opts)
    xent = stats[1] - (gather_label(logits, labels, opts) - stats[0])
    labels = labels - class_offset(local_c, opts)
  dw = rowmath.class_weight_grad(x, labels, stats, g, class_weight.astype(x.dtype), opts,
                                 num_classes(local_c, opts), sparse=sparse, xent=xent)
  return dw.astype(class_weight.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnames=("sparse", "opts", "kernel"))
def xent_2d_fused(logits: jax.Array, labels: jax.Array, weights: jax.Array, sparse: bool,
                  opts: XentOptions, kernel: Any) -> jax.Array:
  """``sum(weights * loss)`` with the gradient formed in the forward kernel (scalar reductions).

  The residual is the pre-scaled gradient itself, which replaces the buffer the backward pass
  would have written; the backward only multiplies it by the cotangent (skipped when it is 1).
  """
  loss = kernel.forward(logits, labels, sparse=sparse, opts=opts, need_lse=False)[0]  # no gradient
  return jnp.sum(jnp.where(weights == 0, 0.0, loss * weights))


def _xent_2d_fused_fwd(logits, labels, weights, sparse, opts, kernel):
  want = _want_dlabels(labels, sparse) is not None
  loss_w, dlogits, dlabels = kernel.fused(logits.value, labels.value, weights.value, sparse=sparse,
                                          opts=opts, want_dlabels=want)
  return jnp.sum(loss_w), (match_vma(dlogits, logits.value),
                           None if dlabels is None else match_vma(dlabels, labels.value))


def _xent_2d_fused_bwd(sparse, opts, kernel, res, g):
  dlogits, dlabels = res

  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    g = jnp.zeros((), jnp.float32)

  def scale(d):
    if d is None:
      return None
    return jax.lax.cond(g == 1, lambda: d, lambda: (d * g.astype(d.dtype)).astype(d.dtype))

  return scale(dlogits), (None if sparse else scale(dlabels)), None


xent_2d_fused.defvjp(_xent_2d_fused_fwd, _xent_2d_fused_bwd, symbolic_zeros=True)


def call_vjp(f, *args):
  """Calls the custom VJP ``f``; in an eager ``shard_map`` its primal instead.

  JAX cannot bind a custom VJP with symbolic zeros on an eager ``shard_map`` trace (it raises
  ``NotImplementedError``). That trace is only current when nothing above it differentiates (a
  ``grad`` inside the body would handle the call first), so the primal is all that is needed.
  """
  try:
    return f(*args)
  except NotImplementedError as err:
    if "symbolic_zeros" not in str(err):
      raise
    return f.fun(*args)


# --------------------------------------------------------------------------------------------
# Validation and canonicalisation.
# --------------------------------------------------------------------------------------------
def check_logits(logits, name: str = "logits") -> jax.Array:
  if logits is None:
    raise ValueError(f"`{name}` must not be None.")
  logits = jnp.asarray(logits)
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(f"`{name}` must have a floating dtype (float16, bfloat16, float32, float64), "
                    f"got {logits.dtype} with shape {logits.shape}.")
  return logits


def check_axis(axis, ndim: int, what: str = "logits") -> int:
  if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
    raise TypeError(f"`axis` must be an int, got {axis!r} of type {type(axis).__name__}.")
  if not -ndim <= axis < ndim:
    raise ValueError(f"`axis`={axis} is out of range for {what} of rank {ndim} "
                     f"(valid: {-ndim}..{ndim - 1}).")
  return int(axis) % ndim


def check_axes(axis, ndim: int, what: str = "logits") -> tuple[int, ...]:
  """The class axes as non-negative ints, in the order given: an int, a tuple or list of ints
  (optax: the classes are the flattened slice over them), or None (every axis)."""
  if axis is None:
    return tuple(range(ndim))
  if isinstance(axis, (tuple, list)):
    if not axis:
      raise ValueError(f"`axis` must name at least one class axis, got {axis!r}.")
    axes = tuple(check_axis(a, ndim, what) for a in axis)
    if len(set(axes)) != len(axes):
      raise ValueError(f"`axis`={axis!r} repeats an axis of {what} of rank {ndim}.")
    return axes
  return (check_axis(axis, ndim, what),)


def _to_rows(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """``x`` with the class ``axes`` moved last (in their order) and flattened: ``[rows, classes]``."""
  x = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
  batch = x.shape[:x.ndim - len(axes)]
  return x.reshape(num_rows(batch), num_rows(x.shape[len(batch):]))


def canonicalize(logits, labels, *, axis, sparse: bool, where=None):
  """Validates and reshapes to rows.

  Returns ``(logits2d [R, C], labels (dense [R, C] | int [R]), row_mask [R] | None, batch_shape)``.
  """
  logits = check_logits(logits)
  if logits.ndim == 0:
    raise ValueError("`logits` cannot be a scalar: it must have rank >= 1 (a class axis).")
  if labels is None:
    raise ValueError("`labels` must not be None.")
  labels = jnp.asarray(labels)
  ax = check_axes(axis, logits.ndim)
  batch_shape = tuple(d for i, d in enumerate(logits.shape) if i not in ax)
  if sparse:
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise TypeError(f"integer `labels` must have an integer dtype, got {labels.dtype} "
                      f"(shape {labels.shape}); for one-hot or soft labels use "
                      f"softmax_cross_entropy.")
    if labels.shape != batch_shape:
      raise ValueError(f"integer `labels` must have the shape of `logits` without the class axis: "
                       f"labels {labels.shape} vs logits {logits.shape} with axis={axis} "
                       f"(expected {batch_shape}).")
    labels2d = labels.reshape(-1)
  else:
    try:
      shape = jnp.broadcast_shapes(labels.shape, logits.shape)
    except ValueError:
      shape = None
    if shape != logits.shape:
      raise ValueError(f"`labels` {labels.shape} must have (or broadcast to) the shape of `logits` "
                       f"{logits.shape}.")
    if not jnp.issubdtype(labels.dtype, jnp.inexact):
      labels = labels.astype(logits.dtype)
    labels2d = _to_rows(jnp.broadcast_to(labels, logits.shape), ax)
  logits2d = _to_rows(logits, ax)
  row_mask = None
  if where is not None:
    where = jnp.asarray(where, dtype=bool)
    if where.ndim == logits.ndim:
      try:
        elem = jnp.broadcast_to(where, logits.shape)
      except ValueError:
        raise ValueError(f"`where` {where.shape} does not broadcast to logits {logits.shape}."
                         ) from None
      elem = _to_rows(elem, ax)
      row_mask = jnp.any(elem, axis=-1)
      # Masked classes become -inf; a row with no class left becomes finite zeros (then masked).
      fill = jnp.where(row_mask[:, None], -jnp.inf, 0.0).astype(logits.dtype)
      logits2d = jnp.where(elem, logits2d, fill)
      if not sparse:
        labels2d = jnp.where(elem, labels2d, 0)
    else:
      try:
        row_mask = jnp.broadcast_to(where, batch_shape).reshape(-1)
      except ValueError:
        raise ValueError(f"`where` {where.shape} must broadcast to logits {logits.shape} or to the "
                         f"per-example shape {batch_shape}.") from None
  return logits2d, labels2d, row_mask, batch_shape


def loss(logits, labels, *, axis, sparse: bool, opts: XentOptions, implementation=None,
         where=None, reduction: Optional[str] = "none", class_weight=None):
  """The native loss: per-example (``"none"``) or reduced (``"mean"``/``"sum"``), logits dtype.

  A scalar reduction with a kernel that can form the gradient in its forward pass (``fused``) uses
  :func:`xent_2d_fused` (not with ``axis_name``: the gradient needs the global log-sum-exp; not
  with ``class_weight``); otherwise the per-row custom VJP followed by the reduction. With
  ``class_weight`` and integer labels ``"mean"`` divides by the kept rows' ``sum(w[label])``
  (PyTorch: NaN when it is 0); dense labels divide by the number of kept rows.
  """
  logits = check_logits(logits)
  logits2d, labels2d, row_mask, batch_shape = canonicalize(logits, labels, axis=axis,
                                                           sparse=sparse, where=where)
  cw = check_class_weight(class_weight, class_shape(logits, axis), logits.dtype, opts,
                          what=f"logits {logits.shape} with axis={axis}")
  kernel = _kernel(implementation, sparse, logits2d, reduction, opts, class_weight=cw is not None)
  kept = _kept(labels2d, row_mask, sparse, opts)
  if (reduction in ("mean", "sum") and hasattr(kernel, "fused") and opts.axis_name is None
      and cw is None):
    w = jnp.ones(logits2d.shape[:1], jnp.float32) if kept is None else kept.astype(jnp.float32)
    if reduction == "mean":
      count = jnp.sum(w)
      w = jnp.where(count > 0, w / jnp.maximum(count, 1.0), 0.0)
    if sparse:  # out-of-range labels: NaN loss and NaN gradient rows (TF on GPU)
      c = logits2d.shape[1]
      w = jnp.where(((labels2d < 0) | (labels2d >= c)) & (w != 0), jnp.nan, w)
    w = jax.lax.stop_gradient(w)
    return call_vjp(xent_2d_fused, logits2d, labels2d, w, sparse, opts, kernel).astype(logits.dtype)
  per_row = _per_row(logits2d, labels2d, row_mask, sparse, opts, kernel, cw)
  if cw is not None and sparse and reduction == "mean":
    return (jnp.sum(per_row) / label_weight_sum(cw, labels2d, kept, opts)).astype(logits.dtype)
  kept = None if kept is None else kept.reshape(batch_shape)
  return reduce_native(per_row.reshape(batch_shape), kept, reduction, logits.dtype)


def check_class_weight(class_weight, class_shape, dtype, opts: XentOptions, *,
                       what: str = "logits"):
  """Validates ``class_weight`` (trace time): None, or a floating ``[num_classes]`` vector
  (this shard's classes with ``axis_name``; with several class axes, the flat ``[C]`` or the
  classes' own ``class_shape``). Returns it flat in the compute dtype of ``dtype`` (the logits'),
  or None. Negative weights are allowed, as in PyTorch."""
  if class_weight is None:
    return None
  if opts.tf_grad:
    raise ValueError("`class_weight` is not part of TF's losses (tf_grad); use the native API.")
  cw = jnp.asarray(class_weight)
  if not jnp.issubdtype(cw.dtype, jnp.floating):
    raise TypeError(f"`class_weight` must have a floating dtype, got {cw.dtype} with shape "
                    f"{cw.shape}.")
  class_shape = tuple(class_shape)
  c = num_rows(class_shape)
  if cw.shape not in ((c,), class_shape):
    shard = " (this shard's classes: axis_name is set)" if opts.axis_name is not None else ""
    raise ValueError(f"`class_weight` must have shape ({c},){shard}, one weight per class of "
                     f"{what}; got {cw.shape}.")
  return cw.reshape(c).astype(compute_dtype(dtype))


def class_shape(logits, axis) -> tuple[int, ...]:
  """The shape of the classes of ``logits`` (over the class ``axis``, in its order)."""
  return tuple(logits.shape[a] for a in check_axes(axis, logits.ndim))


def label_weight_sum(class_weight, labels2d, kept, opts: XentOptions):
  """PyTorch's ``"mean"`` denominator under a class weight, integer labels: ``sum(w[label])``
  over the rows ``kept`` (None: every row); differentiable in ``class_weight``."""
  w_y = class_weight_rows(class_weight, labels2d, opts, sparse=True)[0]
  return jnp.sum(w_y if kept is None else jnp.where(kept, w_y, 0.0))


def _kernel(implementation, sparse, logits2d, reduction=None, opts=None, *,
            class_weight: bool = False):
  """The kernel for these rows; None for zero classes (nothing to compute)."""
  if logits2d.shape[1] == 0:
    return None
  return dispatch.resolve(implementation, sparse=sparse, shape=logits2d.shape,
                          dtype=logits2d.dtype, reduction=reduction, opts=opts,
                          class_weight=class_weight)


def _kept(labels2d, row_mask, sparse, opts):
  kept = row_mask
  if sparse and opts.ignore_index is not None:
    not_ignored = labels2d != opts.ignore_index
    kept = not_ignored if kept is None else kept & not_ignored
  return kept


def _per_row(logits2d, labels2d, row_mask, sparse, opts, kernel, class_weight=None):
  if kernel is None:  # zero classes: TF 2.21 returns zeros
    loss = jnp.zeros(logits2d.shape[:1], jnp.promote_types(logits2d.dtype, jnp.float32))
  elif getattr(kernel, "autodiff", False):  # JAX differentiates the forward itself
    loss = kernel.forward(logits2d, labels2d, sparse=sparse, opts=opts, need_lse=False,
                          **_weight_kw(class_weight))[0]
  else:
    loss = call_vjp(xent_2d, logits2d, labels2d, class_weight, sparse, opts, kernel)
  if row_mask is not None:
    loss = jnp.where(row_mask, loss, 0.0)
  return loss


def rows_loss(logits, labels, *, axis, sparse: bool, opts: XentOptions, implementation=None,
              where=None, class_weight=None):
  """Per-example loss in the compute dtype, shape ``logits.shape`` without ``axis``.

  Returns ``(loss, kept)`` where ``kept`` is the mask of rows that count (``where`` and
  ``ignore_index``), or None when every row counts.
  """
  logits2d, labels2d, row_mask, batch_shape = canonicalize(
      logits, labels, axis=axis, sparse=sparse, where=where)
  logits = check_logits(logits)
  cw = check_class_weight(class_weight, class_shape(logits, axis), logits.dtype, opts,
                          what=f"logits {logits.shape} with axis={axis}")
  kernel = _kernel(implementation, sparse, logits2d, class_weight=cw is not None)
  loss = _per_row(logits2d, labels2d, row_mask, sparse, opts, kernel, cw).reshape(batch_shape)
  kept = _kept(labels2d, row_mask, sparse, opts)
  return loss, (None if kept is None else kept.reshape(batch_shape))


def num_rows(shape) -> int:
  return functools.reduce(operator.mul, shape, 1)


REDUCTIONS = (None, "none", "mean", "sum")


def check_reduction(reduction):
  if reduction not in REDUCTIONS:
    raise ValueError(f"Invalid reduction {reduction!r}; expected 'none', 'mean' or 'sum'.")


def reduce_native(loss, kept, reduction: Optional[str], dtype):
  """The native reductions: "none" (per example), "sum", "mean" (over the rows that count)."""
  if reduction in (None, "none"):
    return loss.astype(dtype)
  if reduction == "sum":
    return jnp.sum(loss).astype(dtype)
  if reduction == "mean":
    total = jnp.sum(loss)
    if kept is None:
      count = num_rows(loss.shape)
      return (total / count if count else total).astype(dtype)
    count = jnp.sum(kept, dtype=loss.dtype)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0).astype(dtype)
  raise ValueError(f"Invalid reduction {reduction!r}; expected 'none', 'mean' or 'sum'.")
