"""``tf.compat.v1.losses`` (TF 2.21) and ``tf.contrib.losses`` (r1.4) softmax cross-entropy.

Thin front doors: validate and canonicalise as TF does, then call the core (through
:mod:`jxent._src.tf_nn`) and reduce with TF's weighting rules.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent._src import core, tf_nn


class Reduction:
  """``tf.compat.v1.losses.Reduction``: the reduction keys, with TF's string values."""

  NONE = "none"
  SUM = "weighted_sum"
  SUM_OVER_BATCH_SIZE = "weighted_sum_over_batch_size"
  MEAN = "weighted_mean"
  SUM_BY_NONZERO_WEIGHTS = "weighted_sum_by_nonzero_weights"
  SUM_OVER_NONZERO_WEIGHTS = SUM_BY_NONZERO_WEIGHTS

  @classmethod
  def all(cls):
    return (cls.NONE, cls.SUM, cls.MEAN, cls.SUM_OVER_BATCH_SIZE, cls.SUM_OVER_NONZERO_WEIGHTS,
            cls.SUM_BY_NONZERO_WEIGHTS)

  @classmethod
  def validate(cls, key):
    if key not in cls.all():
      raise ValueError(f"Invalid Reduction Key {key}. Key should be one of {cls.all()}.")


def div_no_nan(num, den):
  """``num / den``, 0 where ``den == 0``; gradients stay finite."""
  safe = jnp.where(den == 0, 1.0, den)
  return jnp.where(den == 0, 0.0, num / safe)


def _check_weights(weights):
  if weights is None:
    raise ValueError("Attempt to convert a value (None) with an unsupported type "
                     "(<class 'NoneType'>) to a Tensor: `weights` must not be None.")
  return jnp.asarray(weights)


def _assert_broadcastable(weights, values):
  """TF's ``assert_broadcastable``: scalar, or same rank with every dim 1 or equal."""
  if weights.ndim == 0:
    return
  ok = weights.ndim == values.ndim and all(w in (1, v) for w, v in zip(weights.shape, values.shape))
  if not ok:
    raise ValueError(f"weights can not be broadcast to values. values.rank={values.ndim}. "
                     f"weights.rank={weights.ndim}. values.shape={values.shape}. "
                     f"weights.shape={weights.shape}.")


def compute_weighted_loss(losses: ArrayLike, weights: ArrayLike = 1.0, scope: Any = None,
                          loss_collection: Any = None,
                          reduction: str = Reduction.SUM_BY_NONZERO_WEIGHTS) -> jax.Array:
  """``tf.compat.v1.losses.compute_weighted_loss``: weight, reduce in float32, cast back.

  Args:
    losses: ``[d0, ..., dN]`` losses.
    weights: a scalar or the rank of ``losses`` with every dimension 1 or equal.
    scope: ignored.
    loss_collection: ignored.
    reduction: a :class:`Reduction` key.

  Returns:
    The weighted losses (``NONE``) or a scalar, in the dtype of ``losses``.

  Example:
    >>> import jxent
    >>> jxent.losses.compute_weighted_loss([1., 2., 3.], [1., 0., 1.])
    Array(2., dtype=float32)
  """
  del scope, loss_collection
  Reduction.validate(reduction)
  losses = jnp.asarray(losses)
  weights = _check_weights(weights)
  _assert_broadcastable(weights, losses)
  input_dtype = losses.dtype
  lf = losses.astype(jnp.float32)
  wf = weights.astype(jnp.float32)
  weighted = lf * wf
  if reduction == Reduction.NONE:
    out = jnp.broadcast_to(weighted, losses.shape)
  else:
    total = jnp.sum(weighted)
    if reduction == Reduction.SUM:
      out = total
    elif reduction == Reduction.MEAN:
      out = div_no_nan(total, jnp.sum(jnp.ones_like(lf) * wf))
    elif reduction == Reduction.SUM_OVER_BATCH_SIZE:
      out = div_no_nan(total, jnp.asarray(losses.size, jnp.float32))
    else:  # SUM_BY_NONZERO_WEIGHTS: elements whose broadcast weight is non-zero
      present = jnp.sum(jnp.broadcast_to(jnp.where(wf == 0, 0.0, 1.0), losses.shape))
      out = div_no_nan(total, present)
  return out.astype(input_dtype)


def _none_check(onehot_labels, logits, labels_name="onehot_labels"):
  if onehot_labels is None:
    raise ValueError(f"Argument `{labels_name}` must not be None.")
  if logits is None:
    raise ValueError("Argument `logits` must not be None.")


def _smooth(labels, label_smoothing, class_dim: int, dtype):
  if isinstance(label_smoothing, jax.core.Tracer):
    raise TypeError("`label_smoothing` must be a Python number (TF compares it with 0 in Python).")
  if label_smoothing > 0:  # negative smoothing is silently ignored, as in TF
    num_classes = labels.shape[class_dim]
    labels = labels * (1 - label_smoothing) + jnp.asarray(label_smoothing / num_classes, dtype)
  return labels


def softmax_cross_entropy(onehot_labels: ArrayLike, logits: ArrayLike, weights: ArrayLike = 1.0,
                          label_smoothing: float = 0, scope: Any = None, loss_collection: Any = None,
                          reduction: str = Reduction.SUM_BY_NONZERO_WEIGHTS) -> jax.Array:
  """``tf.compat.v1.losses.softmax_cross_entropy`` (TF 2.21 semantics).

  Labels are cast to the logits dtype, their shape must equal the logits shape, smoothing applies
  only when ``label_smoothing > 0`` (class count from the last dimension), no gradient flows into
  the labels, and the weights gradient flows.

  Args:
    onehot_labels: ``[batch, num_classes]`` (or any shape equal to ``logits``).
    logits: floating ``[batch, num_classes]``.
    weights: scalar or losses-shaped (``[batch]``, ``[1]``) weights.
    label_smoothing: smoothing epsilon.
    scope: ignored.
    loss_collection: ignored.
    reduction: a :class:`Reduction` key.

  Returns:
    The weighted loss, in the logits dtype.

  Example:
    >>> import jxent
    >>> jxent.losses.softmax_cross_entropy([0, 0, 0, 1, 0], [-2., 2., 4., -1., 3.])
    Array(5.4137187, dtype=float32)
  """
  _none_check(onehot_labels, logits)
  Reduction.validate(reduction)
  logits = core.check_logits(logits)
  labels = jnp.asarray(onehot_labels).astype(logits.dtype)
  if labels.shape != logits.shape:
    raise ValueError(f"Shapes {logits.shape} and {labels.shape} are incompatible")
  labels = jax.lax.stop_gradient(_smooth(labels, label_smoothing, -1, logits.dtype))
  losses = tf_nn.softmax_cross_entropy_with_logits_v2(labels, logits)
  return compute_weighted_loss(losses, weights, reduction=reduction)


def sparse_softmax_cross_entropy(labels: ArrayLike, logits: ArrayLike, weights: ArrayLike = 1.0,
                                 scope: Any = None, loss_collection: Any = None,
                                 reduction: str = Reduction.SUM_BY_NONZERO_WEIGHTS) -> jax.Array:
  """``tf.compat.v1.losses.sparse_softmax_cross_entropy``: integer labels ``[batch]`` (or
  ``[batch, 1]``, squeezed), logits ``[batch, num_classes]``.

  Example:
    >>> import jxent
    >>> jxent.losses.sparse_softmax_cross_entropy([2], [[1., 2., 3.]])
    Array(0.40760595, dtype=float32)
  """
  _none_check(labels, logits, "labels")
  Reduction.validate(reduction)
  logits = core.check_logits(logits)
  labels = jnp.asarray(labels)
  weights = _check_weights(weights)
  if labels.ndim == logits.ndim and labels.ndim > 0 and labels.shape[-1] == 1:
    labels = labels[..., 0]  # _remove_squeezable_dimensions
  if weights.ndim == labels.ndim + 1 and weights.shape[-1] == 1:
    weights = weights[..., 0]
  losses = tf_nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
  return compute_weighted_loss(losses, weights, reduction=reduction)


# ------------------------------------------------------------------------------------------------
# tf.contrib.losses (r1.4)
# ------------------------------------------------------------------------------------------------
def contrib_compute_weighted_loss(losses: ArrayLike, weights: ArrayLike = 1.0,
                                  scope: Any = None) -> jax.Array:
  """``tf.contrib.losses.compute_weighted_loss`` (r1.4): the mean over non-zero weights.

  ``[B, 1]`` weights are squeezed; weights ``[d0..dk]`` scale the sum of the losses over their
  remaining dimensions; the count is the non-zero weights times the size of those dimensions.
  """
  del scope
  losses = jnp.asarray(losses)
  input_dtype = losses.dtype
  lf = losses.astype(jnp.float32)
  wf = _check_weights(weights).astype(jnp.float32)
  if wf.ndim > 1 and wf.shape[-1] == 1:
    wf = wf[..., 0]
  if wf.ndim > lf.ndim or any(w not in (1, l) for w, l in zip(wf.shape, lf.shape)):
    raise ValueError(f"weights {wf.shape} are incompatible with losses {lf.shape}.")
  inner = tuple(range(wf.ndim, lf.ndim))
  total = jnp.sum(jnp.sum(lf, axis=inner) * wf)
  per = 1
  for d in lf.shape[wf.ndim:]:
    per *= d
  if wf.ndim == 0:
    present = jnp.where(wf == 0, 0.0, float(lf.size))
  else:
    present = jnp.sum(jnp.where(wf == 0, 0.0, 1.0)) * per
  mean = jnp.where(present > 0, total / jnp.where(present > 0, present, 1.0), 0.0)
  return mean.astype(input_dtype)


def contrib_softmax_cross_entropy(logits: ArrayLike, onehot_labels: ArrayLike,
                                  weights: ArrayLike = 1.0, label_smoothing: float = 0,
                                  scope: Any = None) -> jax.Array:
  """``tf.contrib.losses.softmax_cross_entropy`` (r1.4): logits first, no labels gradient,
  smoothing class count from ``shape[1]``, the mean over non-zero weights.

  Example:
    >>> import jxent
    >>> jxent.contrib.softmax_cross_entropy([[10., 0., 0.]], [[0, 0, 1]], weights=2.0)
    Array(20.000181, dtype=float32)
  """
  del scope
  if logits is None or onehot_labels is None:
    raise ValueError("Both `logits` and `onehot_labels` must be provided.")
  logits = core.check_logits(logits)
  labels = jnp.asarray(onehot_labels).astype(logits.dtype)
  if labels.shape != logits.shape:
    raise ValueError(f"Shapes {logits.shape} and {labels.shape} are incompatible")
  labels = _smooth(labels, label_smoothing, 1 if labels.ndim > 1 else 0, logits.dtype)
  losses = tf_nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits)
  return contrib_compute_weighted_loss(losses, weights)
