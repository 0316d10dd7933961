"""The native, optax-compatible API (logits first, per-example output, keyword-only options)."""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
from jax.typing import ArrayLike

from jxent._src import core, dispatch, linear
from jxent._src.options import make_options

def implementations(kind: Optional[str] = None) -> tuple[str, ...]:
  """The names ``implementation=`` takes (not all run on every backend).

  Args:
    kind: ``None`` for all of them, ``"logits"`` for the logits losses (and
      :func:`jxent.token_log_probs`), ``"linear"`` for :func:`jxent.linear_softmax_cross_entropy`.

  Returns:
    A sorted tuple of names.

  Example:
    >>> import jxent
    >>> jxent.implementations("logits")
    ('chunked_xla', 'pallas_mosaic_gpu', 'pallas_mosaic_tpu', 'pallas_triton', 'xla', 'xla_autodiff')
    >>> jxent.implementations("linear")
    ('linear_chunked', 'linear_fused_grad', 'unfused')
  """
  kinds = {"logits": dispatch.names(), "linear": linear.names()}
  if kind is None:
    return tuple(sorted(set(kinds["logits"]) | set(kinds["linear"])))
  if kind not in kinds:
    raise ValueError(f"`kind` must be None, 'logits' or 'linear', got {kind!r}.")
  return kinds[kind]


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: Union[int, tuple[int, ...], None] = -1,
    where: Optional[ArrayLike] = None,
    *,
    reduction: Optional[str] = "none",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: Optional[float] = None,
    axis_name: Optional[str] = None,
    implementation: Any = None,
    class_weight: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Softmax cross-entropy with dense (one-hot or soft) labels.

  ``loss = -sum(labels' * log_softmax(cap(logits)), axis) + z_loss * logsumexp(cap(logits))**2``
  with ``labels' = (1 - label_smoothing) * labels + label_smoothing / num_classes`` and
  ``cap(x) = c * tanh(x / c)`` when ``logit_softcap=c``. The values and gradients (for logits and
  labels) equal optax's ``softmax_cross_entropy`` with the default options. A ``-inf`` logit whose
  label is 0 contributes 0. Half-precision inputs are computed in float32; the result has the
  logits dtype.

  Args:
    logits: ``[..., num_classes, ...]`` floating logits; the class axis is ``axis``.
    labels: the shape of ``logits`` (or broadcastable to it, e.g. ``[num_classes]``).
    axis: the class axis (negative values count from the end); a tuple of axes (their slice,
      flattened, holds the classes) or None (every axis), as in optax. ``axis`` and ``where``
      may be passed by position, as in optax; the other options are keyword-only.
    where: optional boolean mask. With the rank of ``logits``: a per-element mask (masked classes
      are left out of the softmax, as in optax); otherwise a per-example mask of shape ``[...]``.
      Rows with nothing kept give 0 loss and 0 gradient.
    reduction: ``"none"`` (per example, ``logits.shape`` without ``axis``), ``"sum"``, or
      ``"mean"`` (over the examples that ``where`` keeps).
    label_smoothing: epsilon in ``[0, 1]``.
    z_loss: coefficient ``>= 0`` of ``logsumexp**2``.
    logit_softcap: ``c > 0`` or None.
    axis_name: mesh axis name when the class axis is sharded (inside ``shard_map`` / ``pmap``).
    implementation: None (best for the backend), ``"xla"``, ``"chunked_xla"``, ``"pallas_triton"``,
      ``"pallas_mosaic_gpu"``, ``"pallas_mosaic_tpu"``, or a kernel object.
    class_weight: optional ``[num_classes]`` floating weights (PyTorch's ``weight=``; with
      ``axis_name``, this shard's slice of the global vector). The loss becomes ``-sum(w *
      labels' * log_softmax(x))`` (no ``[..., num_classes]`` temporary); ``"mean"`` still divides
      by the number of examples. Negative weights are allowed, as in PyTorch. Differentiable
      (the gradient in ``class_weight`` is exact). Every implementation takes it (the Pallas
      kernels read it in their row walks; scalar reductions then use their forward and
      backward kernels, not the fused one).

  Returns:
    The per-example loss ``[...]`` or a scalar, in the dtype of ``logits``.

  Example:
    >>> import jax.numpy as jnp, jxent
    >>> jxent.softmax_cross_entropy(jnp.array([[1., 2., 3.]]), jnp.array([[0., 0., 1.]]))
    Array([0.40760595], dtype=float32)
  """
  core.check_reduction(reduction)
  opts = make_options(label_smoothing=label_smoothing, z_loss=z_loss, logit_softcap=logit_softcap,
                      axis_name=axis_name)
  return core.loss(logits, labels, axis=axis, sparse=False, opts=opts,
                   implementation=implementation, where=where, reduction=reduction,
                   class_weight=class_weight)


def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: Union[int, tuple[int, ...], None] = -1,
    where: Optional[ArrayLike] = None,
    *,
    ignore_index: Optional[int] = None,
    reduction: Optional[str] = "none",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: Optional[float] = None,
    axis_name: Optional[str] = None,
    implementation: Any = None,
    class_weight: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Softmax cross-entropy with integer class ids, without building a one-hot.

  ``loss = logsumexp(x) - (1 - eps) * x[label] - eps * mean(x) + z_loss * logsumexp(x)**2`` with
  ``x = cap(logits)``. Values and logits gradients equal optax's
  ``softmax_cross_entropy_with_integer_labels`` with the default options. Labels outside
  ``[0, num_classes)`` (other than ``ignore_index``) give NaN for that example; use
  :func:`jxent.check_integer_labels` under ``jax.experimental.checkify`` to report them.

  Args:
    logits: ``[..., num_classes, ...]`` floating logits; the class axis is ``axis``.
    labels: ``[...]`` integer class ids (``logits.shape`` without ``axis``).
    axis: the class axis, or a tuple of axes: a label is then the flat (row-major) index into
      the slice over those axes in the order given, as in optax.
    where: optional mask, as in :func:`softmax_cross_entropy`.
    ignore_index: examples whose label equals it give 0 loss and 0 gradient, and are left out of
      ``"mean"``.
    reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over examples not masked or ignored).
    label_smoothing: epsilon in ``[0, 1]``.
    z_loss: coefficient ``>= 0`` of ``logsumexp**2``.
    logit_softcap: ``c > 0`` or None.
    axis_name: mesh axis name when the class axis is sharded; labels are global class ids.
    implementation: see :func:`softmax_cross_entropy`.
    class_weight: optional ``[num_classes]`` floating weights, PyTorch's ``weight=`` exactly:
      ``loss = (1 - eps) * w[label] * (lse - x[label]) + (eps / C) * sum_c w[c] * (lse - x[c])``
      (+ the unweighted z-loss), and ``"mean"`` divides the sum by ``sum(w[label])`` over the
      examples not masked or ignored (NaN when that is 0, as in PyTorch). With ``axis_name``,
      this shard's slice of the global vector. See :func:`softmax_cross_entropy`.

  Returns:
    The per-example loss ``[...]`` or a scalar, in the dtype of ``logits``.

  Example:
    >>> import jax.numpy as jnp, jxent
    >>> jxent.softmax_cross_entropy_with_integer_labels(jnp.array([[1., 2., 3.]]), jnp.array([2]))
    Array([0.40760595], dtype=float32)
  """
  core.check_reduction(reduction)
  opts = make_options(label_smoothing=label_smoothing, z_loss=z_loss, logit_softcap=logit_softcap,
                      ignore_index=ignore_index, axis_name=axis_name)
  return core.loss(logits, labels, axis=axis, sparse=True, opts=opts,
                   implementation=implementation, where=where, reduction=reduction,
                   class_weight=class_weight)


def check_integer_labels(labels: ArrayLike, num_classes: int, *,
                         ignore_index: Optional[int] = None) -> None:
  """Reports labels outside ``[0, num_classes)`` through ``jax.experimental.checkify``.

  Call it inside a function transformed by ``checkify.checkify`` (out-of-range labels cannot raise
  under ``jit`` otherwise; the loss gives NaN for them).

  Example:
    >>> import jax, jax.numpy as jnp, jxent
    >>> from jax.experimental import checkify
    >>> f = checkify.checkify(lambda y: jxent.check_integer_labels(y, 3))
    >>> err, _ = jax.jit(f)(jnp.array([0, 5]))
    >>> err.get() is not None
    True
  """
  from jax.experimental import checkify
  import jax.numpy as jnp
  labels = jnp.asarray(labels)
  ok = (labels >= 0) & (labels < num_classes)
  if ignore_index is not None:
    ok = ok | (labels == ignore_index)
  checkify.check(jnp.all(ok), "integer labels out of range [0, {n}): min {lo}, max {hi}",
                 n=jnp.asarray(num_classes), lo=jnp.min(labels), hi=jnp.max(labels))
