"""Keras categorical cross-entropy: tf.keras 2.21 semantics, Keras 3 reduction names accepted.

The logits path calls the core (TF kernel gradients, gradient into ``y_true`` as in
``tf.nn.softmax_cross_entropy_with_logits``); the probability path renormalises, clips to
``[eps, 1 - eps]`` and takes the log. Keras's detection of softmax outputs (``_keras_logits``) has
no JAX equivalent: pass logits with ``from_logits=True``.
"""

from __future__ import annotations

import warnings
from typing import Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent._src import core, tf_nn
from jxent._src.tf_losses import div_no_nan

EPSILON = 1e-7

REDUCTIONS = ("auto", "none", "sum", "sum_over_batch_size", "mean", "mean_with_sample_weight", None)


def _check_axis_type(axis):
  if isinstance(axis, bool) or not isinstance(axis, int):
    raise ValueError(f"`axis` must be of type `int`. Received: axis={axis} of type {type(axis)}")


def _probs_xent(y_true, y_pred, axis):
  """The probability path: renormalise, clip, log (gradients through both, as TF)."""
  out = y_pred / jnp.sum(y_pred, axis=axis, keepdims=True)
  eps = jnp.asarray(EPSILON, y_pred.dtype)
  out = jnp.clip(out, eps, 1 - eps)
  return -jnp.sum(y_true * jnp.log(out), axis=axis)


def categorical_crossentropy(y_true: ArrayLike, y_pred: ArrayLike, from_logits: bool = False,
                             label_smoothing: float = 0.0, axis: int = -1) -> jax.Array:
  """``tf.keras.losses.categorical_crossentropy``: per-example loss, ``y_pred`` dtype.

  Args:
    y_true: one-hot or soft targets, the shape of ``y_pred``.
    y_pred: probabilities (``from_logits=False``) or logits, ``[..., num_classes]``.
    from_logits: whether ``y_pred`` holds logits.
    label_smoothing: applied for any value != 0, class count from ``shape[axis]``.
    axis: the class axis (negative values accepted on both paths).

  Returns:
    ``y_pred.shape`` without ``axis``.

  Example:
    >>> import jxent
    >>> jxent.keras.categorical_crossentropy([[0, 1, 0], [0, 0, 1]],
    ...                                      [[0.05, 0.95, 0], [0.1, 0.8, 0.1]])
    Array([0.05129331, 2.3025851 ], dtype=float32)
  """
  _check_axis_type(axis)
  y_pred = core.check_logits(jnp.asarray(y_pred), "y_pred")
  y_true = jnp.asarray(y_true).astype(y_pred.dtype)
  if y_pred.ndim == 0:
    raise IndexError("`y_pred` must have rank >= 1 (a class axis), got a scalar.")
  if y_true.shape != y_pred.shape:
    raise ValueError(f"Shapes {y_true.shape} and {y_pred.shape} are incompatible")
  ax = core.check_axis(axis, y_pred.ndim, "y_pred")
  if y_pred.shape[-1] == 1:
    warnings.warn("In loss categorical_crossentropy, expected y_pred.shape to be (batch_size, "
                  "num_classes) with num_classes > 1. Received: y_pred.shape="
                  f"{y_pred.shape}. Consider using 'binary_crossentropy' if you only have 2 "
                  "classes.", SyntaxWarning, stacklevel=2)
  if isinstance(label_smoothing, jax.core.Tracer):
    raise TypeError("`label_smoothing` must be a Python number.")
  if label_smoothing:
    num_classes = y_true.shape[ax]
    y_true = y_true * (1 - label_smoothing) + jnp.asarray(label_smoothing / num_classes, y_pred.dtype)
  if from_logits:
    return tf_nn.softmax_cross_entropy_with_logits_v2(y_true, y_pred, axis=ax)
  return _probs_xent(y_true, y_pred, ax)


def sparse_categorical_crossentropy(y_true: ArrayLike, y_pred: ArrayLike, from_logits: bool = False,
                                    axis: int = -1, ignore_class: Optional[int] = None) -> jax.Array:
  """``tf.keras.losses.sparse_categorical_crossentropy``: integer targets ``[...]`` (or with a
  trailing 1), ``y_pred`` ``[..., num_classes]``. Entries equal to ``ignore_class`` give 0.

  Example:
    >>> import jxent
    >>> jxent.keras.sparse_categorical_crossentropy([1, 2], [[0.05, 0.95, 0], [0.1, 0.8, 0.1]])
    Array([0.05129344, 2.3025851 ], dtype=float32)
  """
  _check_axis_type(axis)
  y_pred = core.check_logits(jnp.asarray(y_pred), "y_pred")
  if y_pred.ndim == 0:
    raise IndexError("`y_pred` must have rank >= 1 (a class axis), got a scalar.")
  ax = core.check_axis(axis, y_pred.ndim, "y_pred")
  y_true = jnp.asarray(y_true)
  if y_true.ndim == y_pred.ndim and y_true.shape[-1] == 1:
    y_true = y_true[..., 0]
  if not jnp.issubdtype(y_true.dtype, jnp.integer):
    y_true = y_true.astype(jnp.int32)
  logits = y_pred
  if not from_logits:
    eps = jnp.asarray(EPSILON, y_pred.dtype)
    logits = jnp.log(jnp.clip(y_pred, eps, 1 - eps))
  labels = y_true
  if ignore_class is not None:
    valid = y_true != ignore_class
    labels = jnp.where(valid, y_true, 0)
  loss, _ = core.rows_loss(logits, labels, axis=ax, sparse=True, opts=tf_nn.TF_OPTS)
  loss = loss.astype(y_pred.dtype)
  if ignore_class is not None:
    loss = jnp.where(valid, loss, jnp.zeros((), loss.dtype))
  return loss


def _align_sample_weight(losses, sample_weight):
  """tf.keras ``squeeze_or_expand_dimensions(losses, None, sample_weight)``."""
  sw = jnp.asarray(sample_weight).astype(losses.dtype)
  if sw.ndim == 0:
    return sw
  if sw.ndim == losses.ndim + 1:
    if sw.shape[-1] != 1:
      raise ValueError(f"Can not squeeze dim[{sw.ndim - 1}], expected a dimension of 1, got "
                       f"{sw.shape[-1]} (sample_weight {sw.shape}, losses {losses.shape}).")
    sw = sw[..., 0]
  elif losses.ndim == sw.ndim + 1:
    sw = sw[..., None]
  try:
    jnp.broadcast_shapes(sw.shape, losses.shape)
  except ValueError:
    raise ValueError(f"Incompatible shapes: sample_weight {sw.shape} vs losses {losses.shape}") from None
  return sw


def reduce_weighted(losses, sample_weight, reduction, mask=None):
  """tf.keras ``compute_weighted_loss`` with Keras 3's extra names; ``mask`` (valid elements)
  turns the batch-size mean into a mean over valid elements, as Keras's masking does."""
  dtype = losses.dtype
  lf = losses.astype(jnp.float32)
  sw = None if sample_weight is None else _align_sample_weight(lf, sample_weight)
  weighted = lf if sw is None else lf * sw
  if mask is not None and reduction in ("auto", "sum_over_batch_size", "mean"):
    m = mask.astype(jnp.float32)
    weighted = weighted * m
    return div_no_nan(jnp.sum(weighted), jnp.sum(jnp.broadcast_to(m, weighted.shape))).astype(dtype)
  if reduction in (None, "none"):
    return weighted.astype(dtype)
  total = jnp.sum(weighted)
  if reduction == "sum":
    return total.astype(dtype)
  if reduction == "mean_with_sample_weight" and sw is not None:
    return div_no_nan(total, jnp.sum(jnp.broadcast_to(sw, weighted.shape))).astype(dtype)
  return div_no_nan(total, jnp.asarray(weighted.size, jnp.float32)).astype(dtype)


def _check_reduction(reduction):
  if reduction not in REDUCTIONS:
    raise ValueError(f"Invalid Reduction Key: {reduction}. Expected keys are "
                     f"{tuple(r for r in REDUCTIONS if r is not None)} or None.")


def _squeeze_or_expand(y_pred, y_true):
  """tf.keras LossFunctionWrapper: drop a trailing 1 when ranks differ by one."""
  if y_true.ndim == y_pred.ndim + 1 and y_true.shape[-1] == 1:
    y_true = y_true[..., 0]
  elif y_pred.ndim == y_true.ndim + 1 and y_pred.shape[-1] == 1:
    y_pred = y_pred[..., 0]
  return y_pred, y_true


class _LossBase:
  """A plain callable ``(y_true, y_pred, sample_weight=None)``: usable under ``jit``/``vmap``/
  ``grad`` and as ``model.compile(loss=...)`` in Keras 3."""

  fn_name: str = ""

  def __init__(self, reduction="auto", name=None):
    _check_reduction(reduction)
    self.reduction = reduction
    self.name = name

  def get_config(self) -> dict:
    return {"reduction": self.reduction, "name": self.name, "fn": self.fn_name}

  @classmethod
  def from_config(cls, config: dict):
    config = dict(config)
    config.pop("fn", None)
    return cls(**config)

  def __repr__(self):
    args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "fn")
    return f"{type(self).__name__}({args})"


class CategoricalCrossentropy(_LossBase):
  """``tf.keras.losses.CategoricalCrossentropy``.

  Reductions: "auto" (= "sum_over_batch_size"), "sum_over_batch_size", "sum", "none", and Keras 3's
  "mean", "mean_with_sample_weight" and None. ``sample_weight`` follows tf.keras: a scalar,
  ``[batch]``, ``[batch, 1]``, or per-sample weighting of ``[batch, T]`` losses.

  Example:
    >>> import jxent
    >>> cce = jxent.keras.CategoricalCrossentropy()
    >>> cce([[0, 1, 0], [0, 0, 1]], [[0.05, 0.95, 0], [0.1, 0.8, 0.1]])
    Array(1.1769392, dtype=float32)
  """

  fn_name = "categorical_crossentropy"

  def __init__(self, from_logits: bool = False, label_smoothing: float = 0.0, axis: int = -1,
               reduction: Optional[str] = "auto", name: str = "categorical_crossentropy"):
    super().__init__(reduction, name)
    _check_axis_type(axis)
    self.from_logits = from_logits
    self.label_smoothing = label_smoothing
    self.axis = axis

  def get_config(self) -> dict:
    return {"reduction": self.reduction, "name": self.name, "from_logits": self.from_logits,
            "label_smoothing": self.label_smoothing, "axis": self.axis, "fn": self.fn_name}

  def __call__(self, y_true: ArrayLike, y_pred: ArrayLike,
               sample_weight: Optional[ArrayLike] = None) -> jax.Array:
    y_pred = jnp.asarray(y_pred)
    y_true = jnp.asarray(y_true)
    y_pred, y_true = _squeeze_or_expand(y_pred, y_true)
    losses = categorical_crossentropy(y_true, y_pred, from_logits=self.from_logits,
                                      label_smoothing=self.label_smoothing, axis=self.axis)
    return reduce_weighted(losses, sample_weight, self.reduction)


class SparseCategoricalCrossentropy(_LossBase):
  """``tf.keras.losses.SparseCategoricalCrossentropy`` with ``ignore_class`` (entries equal to it
  give 0 and are left out of the batch-size mean).

  Example:
    >>> import jxent
    >>> scce = jxent.keras.SparseCategoricalCrossentropy()
    >>> scce([1, 2], [[0.05, 0.95, 0], [0.1, 0.8, 0.1]])
    Array(1.1769392, dtype=float32)
  """

  fn_name = "sparse_categorical_crossentropy"

  def __init__(self, from_logits: bool = False, ignore_class: Optional[int] = None,
               reduction: Optional[str] = "auto", name: str = "sparse_categorical_crossentropy"):
    super().__init__(reduction, name)
    self.from_logits = from_logits
    self.ignore_class = ignore_class

  def get_config(self) -> dict:
    return {"reduction": self.reduction, "name": self.name, "from_logits": self.from_logits,
            "ignore_class": self.ignore_class, "fn": self.fn_name}

  def __call__(self, y_true: ArrayLike, y_pred: ArrayLike,
               sample_weight: Optional[ArrayLike] = None) -> jax.Array:
    y_pred = jnp.asarray(y_pred)
    y_true = jnp.asarray(y_true)
    losses = sparse_categorical_crossentropy(y_true, y_pred, from_logits=self.from_logits,
                                             ignore_class=self.ignore_class)
    mask = None
    if self.ignore_class is not None:
      yt = y_true[..., 0] if (y_true.ndim == y_pred.ndim and y_true.shape[-1] == 1) else y_true
      mask = yt != self.ignore_class
    return reduce_weighted(losses, sample_weight, self.reduction, mask=mask)
