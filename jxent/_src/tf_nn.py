"""``tf.nn`` softmax cross-entropy with TF 2.21 semantics (values, dtypes, and the TF kernel's
gradient ``g * (softmax - labels)``). Thin: validate, canonicalise, call the core."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent._src import core
from jxent._src.options import XentOptions

TF_OPTS = XentOptions(tf_grad=True)


def _missing(name, labels, logits):
  if labels is None or logits is None:
    raise ValueError(f"Both `labels` and `logits` must be provided for {name}. "
                     f"Received: labels={labels} and logits={logits}")


def softmax_cross_entropy_with_logits_v2(labels: ArrayLike, logits: ArrayLike, axis: Optional[int] = -1,
                                         name: Optional[str] = None, dim: Optional[int] = None) -> jax.Array:
  """``tf.nn.softmax_cross_entropy_with_logits`` (TF2) / ``tf.compat.v1.nn.softmax_cross_entropy_with_logits_v2``.

  Gradients flow into ``labels`` (``-g * log_softmax(logits)``) and into ``logits`` as TF's kernel
  gives them, ``g * (softmax - labels)``, even when the labels do not sum to 1. Deviation from TF:
  a ``-inf`` logit with label 0 contributes 0 instead of NaN; negative axes are all accepted.

  Args:
    labels: ``[..., num_classes]`` (class axis ``axis``), or broadcastable to ``logits``
      (``[num_classes]``, ``[1, num_classes]``); any numeric dtype (cast as TF does).
    logits: floating ``[..., num_classes]``.
    axis: the class axis; None means -1.
    name: ignored (TF op name).
    dim: deprecated alias of ``axis`` (``tf.compat.v1``).

  Returns:
    ``logits.shape`` without ``axis``, in the logits dtype.

  Example:
    >>> import jxent
    >>> jxent.nn.softmax_cross_entropy_with_logits_v2([[0., 0., 1.]], [[1., 2., 3.]])
    Array([0.40760595], dtype=float32)
  """
  del name
  _missing("softmax_cross_entropy_with_logits", labels, logits)
  if dim is not None:
    if axis not in (None, -1) and axis != dim:
      raise ValueError("Cannot specify both 'dim' and 'axis'.")
    axis = dim
  axis = -1 if axis is None else axis
  logits = core.check_logits(logits)
  loss, _ = core.rows_loss(logits, labels, axis=axis, sparse=False, opts=TF_OPTS)
  return loss.astype(logits.dtype)


def softmax_cross_entropy_with_logits(labels: Optional[ArrayLike] = None, logits: Optional[ArrayLike] = None,
                                      dim: Optional[int] = None, name: Optional[str] = None,
                                      axis: Optional[int] = None) -> jax.Array:
  """``tf.compat.v1.nn.softmax_cross_entropy_with_logits`` (v1): as v2, but no gradient into labels.

  ``dim`` and ``axis`` are aliases; giving both with different values raises ``ValueError``.

  Example:
    >>> import jxent
    >>> jxent.nn.softmax_cross_entropy_with_logits(labels=[[0., 0., 1.]], logits=[[1., 2., 3.]])
    Array([0.40760595], dtype=float32)
  """
  del name
  _missing("softmax_cross_entropy_with_logits", labels, logits)
  if dim is not None and axis is not None and dim != axis:
    raise ValueError(f"Cannot specify both 'dim' and 'axis' (got dim={dim}, axis={axis}).")
  axis = axis if axis is not None else (dim if dim is not None else -1)
  labels = jax.lax.stop_gradient(jnp.asarray(labels))
  return softmax_cross_entropy_with_logits_v2(labels, logits, axis=axis)


def sparse_softmax_cross_entropy_with_logits(labels: Optional[ArrayLike] = None,
                                             logits: Optional[ArrayLike] = None,
                                             name: Optional[str] = None) -> jax.Array:
  """``tf.nn.sparse_softmax_cross_entropy_with_logits``: integer labels ``[...]``, logits ``[..., C]``.

  Labels outside ``[0, num_classes)`` give NaN for that example (TF on GPU does the same; TF on CPU
  raises, which is impossible under ``jit``).

  Example:
    >>> import jxent
    >>> jxent.nn.sparse_softmax_cross_entropy_with_logits(labels=[2], logits=[[1., 2., 3.]])
    Array([0.40760595], dtype=float32)
  """
  del name
  _missing("sparse_softmax_cross_entropy_with_logits", labels, logits)
  logits = core.check_logits(logits)
  labels = jnp.asarray(labels)
  if logits.ndim == 0:  # TF 2.21's messages
    raise ValueError(f"`logits` cannot be a scalar. Received logits={logits}")
  if labels.ndim != logits.ndim - 1:
    raise ValueError(f"`labels.shape.rank` must equal `logits.shape.rank - 1`. Received: "
                     f"labels.shape={labels.shape} of rank {labels.ndim} and logits.shape="
                     f"{logits.shape} of rank {logits.ndim} (Rank mismatch).")
  loss, _ = core.rows_loss(logits, labels, axis=-1, sparse=True, opts=TF_OPTS)
  return loss.astype(logits.dtype)
