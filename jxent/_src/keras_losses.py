"""Keras categorical cross-entropy: tf.keras 2.21 semantics, Keras 3 reduction names accepted.

The logits path calls the core (TF kernel gradients, gradient into ``y_true`` as in
``tf.nn.softmax_cross_entropy_with_logits``); the probability path renormalises, clips to
``[eps, 1 - eps]`` and takes the log. Keras's detection of softmax outputs (``_keras_logits``) has
no JAX equivalent: pass logits with ``from_logits=True``.
"""

from __future__ import annotations

import enum
import importlib.abc
import sys
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent._src import core, tf_nn
from jxent._src.options import make_options
from jxent._src.tf_losses import div_no_nan

EPSILON = 1e-7

REDUCTIONS = ("auto", "none", "sum", "sum_over_batch_size", "mean", "mean_with_sample_weight", None)


class ScalarInputError(ValueError, IndexError):
  """A 0-d ``y_pred``: a ``ValueError`` (Keras 3's checks) that is also the ``IndexError``
  tf.keras raised for it, so that code catching either keeps working."""


class Reduction(str, enum.Enum):
  """``tf.keras.losses.Reduction`` (``ReductionV2``): the same names and string values.

  Example:
    >>> import jxent
    >>> jxent.keras.CategoricalCrossentropy(reduction=jxent.keras.Reduction.SUM).reduction
    'sum'
  """

  AUTO = "auto"
  NONE = "none"
  SUM = "sum"
  SUM_OVER_BATCH_SIZE = "sum_over_batch_size"

  def __str__(self):
    return self.value

  @classmethod
  def all(cls) -> tuple:
    return (cls.AUTO, cls.NONE, cls.SUM, cls.SUM_OVER_BATCH_SIZE)

  @classmethod
  def validate(cls, key) -> None:
    if key not in REDUCTIONS:
      raise ValueError(f"Invalid Reduction Key: {key}. Expected keys are "
                       f"{tuple(r for r in REDUCTIONS if r is not None)} or None.")


def _check_rank(y_pred):
  if y_pred.ndim == 0:
    raise ScalarInputError(f"`y_pred` cannot be a scalar: it must have rank >= 1 (a class axis). "
                           f"Received: y_pred.shape={y_pred.shape}")


def _check_axis_type(axis):
  if isinstance(axis, bool) or not isinstance(axis, int):
    raise ValueError(f"`axis` must be of type `int`. Received: axis={axis} of type {type(axis)}")


def _probs_xent(y_true, y_pred, axis):
  """The probability path: renormalise, clip, log (gradients through both, as TF)."""
  out = y_pred / jnp.sum(y_pred, axis=axis, keepdims=True)
  eps = jnp.asarray(EPSILON, y_pred.dtype)
  out = jnp.clip(out, eps, 1 - eps)
  return -jnp.sum(y_true * jnp.log(out), axis=axis)


def class_weight_vector(class_weight, num_classes: int):
  """A Keras-style ``class_weight`` as a ``[num_classes]`` float vector: None, a sequence or array
  of weights (integers become float32), or a dict ``{class index: weight}`` as ``Model.fit``
  takes it (classes it does not name weigh 1; keys may be strings, as a JSON config holds them)."""
  if class_weight is None:
    return None
  if isinstance(class_weight, dict):
    w = [1.0] * num_classes
    for key, value in class_weight.items():
      k = int(key)
      if not 0 <= k < num_classes:
        raise ValueError(f"`class_weight` names class {key!r}, outside [0, {num_classes}).")
      w[k] = float(value)
    return jnp.asarray(w, jnp.float32)
  w = jnp.asarray(class_weight)
  if jnp.issubdtype(w.dtype, jnp.integer) or w.dtype == jnp.bool_:
    w = w.astype(jnp.float32)
  return w


def _config_class_weight(class_weight):
  """``class_weight`` as JSON-ready config: a list of floats, a dict, or None."""
  if class_weight is None or isinstance(class_weight, dict):
    return class_weight
  import numpy as np
  return np.asarray(class_weight, np.float64).tolist()


def categorical_crossentropy(y_true: ArrayLike, y_pred: ArrayLike, from_logits: bool = False,
                             label_smoothing: float = 0.0, axis: int = -1, *,
                             class_weight: Any = None) -> jax.Array:
  """``tf.keras.losses.categorical_crossentropy``: per-example loss, ``y_pred`` dtype.

  Args:
    y_true: one-hot or soft targets, the shape of ``y_pred``.
    y_pred: probabilities (``from_logits=False``) or logits, ``[..., num_classes]``.
    from_logits: whether ``y_pred`` holds logits.
    label_smoothing: applied for any value != 0, class count from ``shape[axis]``.
    axis: the class axis (negative values accepted on both paths).
    class_weight: optional per-class weights (``[num_classes]``, or a dict ``{class: weight}``
      as ``Model.fit`` takes it): ``loss = -sum(w * y_true' * log(y_pred))``, PyTorch's
      ``weight=`` (for one-hot targets without smoothing, Keras's ``fit(class_weight=)``).

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
  _check_rank(y_pred)
  if y_true.shape != y_pred.shape:  # tf.keras's and Keras 3's messages both
    raise ValueError(f"Arguments `target` and `output` must have the same shape. Received: "
                     f"target.shape={y_true.shape}, output.shape={y_pred.shape} (Shapes "
                     f"{y_true.shape} and {y_pred.shape} are incompatible)")
  ax = core.check_axis(axis, y_pred.ndim, "y_pred")
  if y_pred.shape[ax] == 1:  # the class axis, as current Keras checks it
    warnings.warn("In loss categorical_crossentropy, expected y_pred.shape to be (batch_size, "
                  "num_classes) with num_classes > 1. Received: y_pred.shape="
                  f"{y_pred.shape}. Consider using 'binary_crossentropy' if you only have 2 "
                  "classes.", SyntaxWarning, stacklevel=2)
  if isinstance(label_smoothing, jax.core.Tracer):
    raise TypeError("`label_smoothing` must be a Python number.")
  if label_smoothing:
    num_classes = y_true.shape[ax]
    y_true = y_true * (1 - label_smoothing) + jnp.asarray(label_smoothing / num_classes, y_pred.dtype)
  cw = class_weight_vector(class_weight, y_pred.shape[ax])
  if cw is not None:
    cw = core.check_class_weight(cw, (y_pred.shape[ax],), y_pred.dtype, make_options(),
                                 what=f"y_pred {y_pred.shape} with axis={axis}")
    if from_logits:
      loss, _ = core.rows_loss(y_pred, y_true, axis=ax, sparse=False, opts=make_options(),
                               class_weight=cw)
      return loss.astype(y_pred.dtype)
    shape = [1] * y_pred.ndim
    shape[ax] = -1
    return _probs_xent(y_true * cw.reshape(shape).astype(y_pred.dtype), y_pred, ax)
  if from_logits:
    return tf_nn.softmax_cross_entropy_with_logits_v2(y_true, y_pred, axis=ax)
  return _probs_xent(y_true, y_pred, ax)


def sparse_categorical_crossentropy(y_true: ArrayLike, y_pred: ArrayLike, from_logits: bool = False,
                                    axis: int = -1, ignore_class: Optional[int] = None,
                                    label_smoothing: float = 0.0, *,
                                    class_weight: Any = None) -> jax.Array:
  """``keras.losses.sparse_categorical_crossentropy``: integer targets ``[...]`` (or with a
  size-1 dimension at ``axis``), ``y_pred`` ``[..., num_classes, ...]`` with the classes on
  ``axis``. Entries equal to ``ignore_class`` give 0.

  ``label_smoothing`` ε gives the loss of the smoothed one-hot ``(1 - ε)·onehot + ε / C``
  without building it: ``(1 - ε)·nll + ε·(lse - mean(log p))``. ``class_weight`` (``[C]`` or
  a dict ``{class: weight}``): PyTorch's ``weight=``, ``(1 - ε)·w[y]·nll + (ε / C)·Σ_c w_c·(-log
  p_c)`` (Keras's ``fit(class_weight=)`` without smoothing); the reduction stays Keras's.

  Example:
    >>> import jxent
    >>> jxent.keras.sparse_categorical_crossentropy([1, 2], [[0.05, 0.95, 0], [0.1, 0.8, 0.1]])
    Array([0.0512934, 2.3025851], dtype=float32)
  """
  _check_axis_type(axis)
  y_pred = core.check_logits(jnp.asarray(y_pred), "y_pred")
  _check_rank(y_pred)
  ax = core.check_axis(axis, y_pred.ndim, "y_pred")
  y_true = jnp.asarray(y_true)
  if y_true.ndim == y_pred.ndim and y_true.shape[ax] == 1:
    y_true = jnp.squeeze(y_true, ax)
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
  opts = tf_nn.TF_OPTS
  cw = class_weight_vector(class_weight, y_pred.shape[ax])
  if cw is not None:  # (no TF kernel gradient to follow: the true derivative)
    opts = make_options(label_smoothing=label_smoothing)
  elif label_smoothing:
    opts = make_options(label_smoothing=label_smoothing, tf_grad=True)
  loss, _ = core.rows_loss(logits, labels, axis=ax, sparse=True, opts=opts, class_weight=cw)
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
  Reduction.validate(reduction)


def _squeeze_or_expand(y_pred, y_true):
  """tf.keras LossFunctionWrapper: drop a trailing 1 when ranks differ by one."""
  if y_true.ndim == y_pred.ndim + 1 and y_true.shape[-1] == 1:
    y_true = y_true[..., 0]
  elif y_pred.ndim == y_true.ndim + 1 and y_pred.shape[-1] == 1:
    y_pred = y_pred[..., 0]
  return y_pred, y_true


def register_serializable() -> bool:
  """Registers the loss classes with Keras 3's serialization (package ``"jxent"``), so that
  ``keras.saving.deserialize_keras_object`` and ``keras.saving.load_model`` find them without
  ``custom_objects``. Runs by itself when Keras is already imported as jxent is, and when a loss
  object is made; jxent never imports Keras. Returns whether Keras was there to register with.
  """
  keras = sys.modules.get("keras")
  saving = getattr(keras, "saving", None)
  if saving is None or not hasattr(saving, "register_keras_serializable"):
    return False
  known = saving.get_custom_objects()
  for cls in (CategoricalCrossentropy, SparseCategoricalCrossentropy):
    if f"jxent>{cls.__name__}" not in known:
      saving.register_keras_serializable(package="jxent")(cls)
  return True


class _AfterKerasImport(importlib.abc.MetaPathFinder):
  """A post-import hook: when ``keras`` is first imported (after jxent), the loss classes are
  registered as soon as its package has run, so that ``keras.models.load_model`` finds them
  whatever the import order. It wraps the loader of the ``keras`` package's own spec (found by
  the other finders) and removes itself once it has fired; it never imports Keras."""

  def find_spec(self, fullname, path=None, target=None):
    if fullname != "keras":
      return None
    for finder in sys.meta_path:
      if finder is self or not hasattr(finder, "find_spec"):
        continue
      spec = finder.find_spec(fullname, path, target)
      if spec is not None and spec.loader is not None:
        spec.loader = _RegisteringLoader(spec.loader)
        return spec
    return None


class _RegisteringLoader(importlib.abc.Loader):
  """``loader``, then :func:`register_serializable`; the module keeps the real loader."""

  def __init__(self, loader):
    self.loader = loader

  def create_module(self, spec):
    return self.loader.create_module(spec)

  def exec_module(self, module):
    try:
      self.loader.exec_module(module)
    finally:
      module.__loader__ = self.loader
      if getattr(module, "__spec__", None) is not None:
        module.__spec__.loader = self.loader
      _remove_hook()
    register_serializable()

  def __getattr__(self, name):  # (resource readers and the like: the real loader's)
    return getattr(self.loader, name)


def _remove_hook():
  sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterKerasImport)]


def register_now_or_when_keras_loads() -> bool:
  """:func:`register_serializable` now if Keras is imported, else as soon as it is (see
  :class:`_AfterKerasImport`). Keras 3 has no entry point for custom objects, so this is how a
  model saved with a jxent loss loads without ``custom_objects`` in a fresh process."""
  if register_serializable():
    return True
  if not any(isinstance(f, _AfterKerasImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterKerasImport())
  return False


def _check_keras_class_weight(class_weight):
  """A constructor's ``class_weight``, checked early: None, a dict ``{class: weight}``, or a
  1-D sequence/array of numbers (kept as given; made a vector at the call)."""
  if class_weight is None:
    return None
  if isinstance(class_weight, dict):
    for key, value in class_weight.items():
      try:
        int(key), float(value)
      except (TypeError, ValueError):
        raise TypeError(f"`class_weight` dict must map class indices to numbers, got "
                        f"{key!r}: {value!r}.") from None
    return dict(class_weight)
  w = jnp.asarray(class_weight)
  if w.ndim != 1 or not (jnp.issubdtype(w.dtype, jnp.floating) or jnp.issubdtype(w.dtype, jnp.integer)):
    raise ValueError(f"`class_weight` must be None, a dict {{class: weight}} or a 1-D sequence of "
                     f"numbers (one per class), got shape {w.shape} and dtype {w.dtype}.")
  return class_weight


class _LossBase:
  """A plain callable ``(y_true, y_pred, sample_weight=None)``: usable under ``jit``/``vmap``/
  ``grad`` and as ``model.compile(loss=...)`` in Keras 3, and serializable by Keras 3."""

  fn_name: str = ""

  def __init__(self, reduction="auto", name=None, dtype=None):
    if isinstance(reduction, Reduction):
      reduction = reduction.value
    _check_reduction(reduction)
    if dtype is not None:
      dtype = getattr(dtype, "name", dtype)  # a Keras DTypePolicy or a dtype
      if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(f"`dtype` must be a floating dtype or None, got {dtype!r}.")
      dtype = jnp.dtype(dtype).name
    self.reduction = reduction
    self.name = name
    self.dtype = dtype
    register_serializable()

  def _cast(self, y_pred):
    """Keras 3's ``dtype``: the loss is computed and returned in it (None: the input's dtype)."""
    return y_pred if self.dtype is None else y_pred.astype(self.dtype)

  def get_config(self) -> dict:
    config = {"reduction": self.reduction, "name": self.name, "fn": self.fn_name}
    if self.dtype is not None:  # (tf.keras's config has no dtype; Keras 3's does)
      config["dtype"] = self.dtype
    return config

  @classmethod
  def from_config(cls, config: dict):
    config = dict(config)
    config.pop("fn", None)
    return cls(**config)

  def __repr__(self):
    args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "fn")
    return f"{type(self).__name__}({args})"


class CategoricalCrossentropy(_LossBase):
  """``tf.keras.losses.CategoricalCrossentropy`` (and Keras 3's).

  Reductions: "auto" (= "sum_over_batch_size"), "sum_over_batch_size", "sum", "none", and Keras 3's
  "mean", "mean_with_sample_weight" and None (or a :class:`Reduction`). ``sample_weight`` follows
  tf.keras: a scalar, ``[batch]``, ``[batch, 1]``, or per-sample weighting of ``[batch, T]``
  losses. ``dtype`` (Keras 3): compute and return the loss in that floating dtype.
  ``class_weight`` (a jxent extension: ``[num_classes]`` or a dict ``{class: weight}``) weighs
  each class's term, PyTorch's ``weight=`` (see :func:`categorical_crossentropy`); the
  reductions are unchanged (``"sum_over_batch_size"`` divides by the batch size, as Keras's
  sample weights do). It round-trips through :meth:`get_config` as a list (or the dict).

  Example:
    >>> import jxent
    >>> cce = jxent.keras.CategoricalCrossentropy()
    >>> cce([[0, 1, 0], [0, 0, 1]], [[0.05, 0.95, 0], [0.1, 0.8, 0.1]])
    Array(1.1769392, dtype=float32)
  """

  fn_name = "categorical_crossentropy"

  def __init__(self, from_logits: bool = False, label_smoothing: float = 0.0, axis: int = -1,
               reduction: Optional[str] = "auto", name: str = "categorical_crossentropy",
               dtype: Any = None, class_weight: Any = None):
    super().__init__(reduction, name, dtype)
    _check_axis_type(axis)
    self.from_logits = from_logits
    self.label_smoothing = label_smoothing
    self.axis = axis
    self.class_weight = _check_keras_class_weight(class_weight)

  def get_config(self) -> dict:
    config = {**super().get_config(), "from_logits": self.from_logits,
              "label_smoothing": self.label_smoothing, "axis": self.axis}
    if self.class_weight is not None:
      config["class_weight"] = _config_class_weight(self.class_weight)
    return config

  def __call__(self, y_true: ArrayLike, y_pred: ArrayLike,
               sample_weight: Optional[ArrayLike] = None) -> jax.Array:
    y_pred = self._cast(jnp.asarray(y_pred))
    y_true = jnp.asarray(y_true)
    _check_rank(y_pred)
    y_pred, y_true = _squeeze_or_expand(y_pred, y_true)
    losses = categorical_crossentropy(y_true, y_pred, from_logits=self.from_logits,
                                      label_smoothing=self.label_smoothing, axis=self.axis,
                                      class_weight=self.class_weight)
    return reduce_weighted(losses, sample_weight, self.reduction)


class SparseCategoricalCrossentropy(_LossBase):
  """``tf.keras.losses.SparseCategoricalCrossentropy`` (and Keras 3's) with ``ignore_class``
  (entries equal to it give 0 and are left out of the batch-size mean), ``axis`` (the class axis
  of ``y_pred``), ``label_smoothing`` (no one-hot is built), ``dtype`` and ``class_weight``
  (a jxent extension, as in :class:`CategoricalCrossentropy`: PyTorch's ``weight=`` with
  Keras's reductions).

  Example:
    >>> import jxent
    >>> scce = jxent.keras.SparseCategoricalCrossentropy()
    >>> scce([1, 2], [[0.05, 0.95, 0], [0.1, 0.8, 0.1]])
    Array(1.1769392, dtype=float32)
  """

  fn_name = "sparse_categorical_crossentropy"

  def __init__(self, from_logits: bool = False, ignore_class: Optional[int] = None,
               reduction: Optional[str] = "auto", axis: int = -1,
               name: str = "sparse_categorical_crossentropy", dtype: Any = None,
               label_smoothing: float = 0.0, class_weight: Any = None):
    super().__init__(reduction, name, dtype)
    _check_axis_type(axis)
    self.from_logits = from_logits
    self.ignore_class = ignore_class
    self.axis = axis
    self.label_smoothing = label_smoothing
    self.class_weight = _check_keras_class_weight(class_weight)

  def get_config(self) -> dict:
    config = {**super().get_config(), "from_logits": self.from_logits,
              "ignore_class": self.ignore_class, "axis": self.axis,
              "label_smoothing": self.label_smoothing}
    if self.class_weight is not None:
      config["class_weight"] = _config_class_weight(self.class_weight)
    return config

  def __call__(self, y_true: ArrayLike, y_pred: ArrayLike,
               sample_weight: Optional[ArrayLike] = None) -> jax.Array:
    y_pred = self._cast(jnp.asarray(y_pred))
    y_true = jnp.asarray(y_true)
    losses = sparse_categorical_crossentropy(y_true, y_pred, from_logits=self.from_logits,
                                             ignore_class=self.ignore_class, axis=self.axis,
                                             label_smoothing=self.label_smoothing,
                                             class_weight=self.class_weight)
    mask = None
    if self.ignore_class is not None:
      mask = (y_true.reshape(losses.shape) if y_true.size == losses.size else y_true
              ) != self.ignore_class
    return reduce_weighted(losses, sample_weight, self.reduction, mask=mask)
