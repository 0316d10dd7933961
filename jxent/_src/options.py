"""Static options shared by every cross-entropy kernel, and their validation."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class XentOptions:
  """Static (hashable) options of one cross-entropy call.

  Attributes:
    label_smoothing: epsilon; labels become ``(1 - eps) * y + eps / num_classes``.
    z_loss: coefficient of the ``z * lse**2`` auxiliary term.
    logit_softcap: ``c``; logits become ``c * tanh(logits / c)`` before the softmax.
    ignore_index: integer labels equal to it give zero loss and zero gradient.
    axis_name: mesh axis over which the class axis is sharded (vocab parallel).
    tf_grad: use TF's kernel gradient ``g * (softmax - labels)`` instead of the
      true derivative ``g * (softmax * sum(labels) - labels)``.
  """

  label_smoothing: float = 0.0
  z_loss: float = 0.0
  logit_softcap: Optional[float] = None
  ignore_index: Optional[int] = None
  axis_name: Optional[str] = None
  tf_grad: bool = False


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def make_options(
    *,
    label_smoothing=0.0,
    z_loss=0.0,
    logit_softcap=None,
    ignore_index=None,
    axis_name=None,
    tf_grad=False,
) -> XentOptions:
  """Validates user options (trace time) and returns a hashable XentOptions."""
  for name, value in (("label_smoothing", label_smoothing), ("z_loss", z_loss),
                      ("logit_softcap", logit_softcap)):
    if _is_traced(value):
      raise TypeError(f"`{name}` must be a Python number (static), got a traced value {value}.")
  label_smoothing = _real("label_smoothing", label_smoothing, "a float")
  if not 0.0 <= label_smoothing <= 1.0:
    raise ValueError(f"`label_smoothing` must be in [0, 1], got {label_smoothing}.")
  z_loss = _real("z_loss", z_loss, "a float")
  if z_loss < 0.0:
    raise ValueError(f"`z_loss` must be >= 0, got {z_loss}.")
  if logit_softcap is not None:
    logit_softcap = _real("logit_softcap", logit_softcap, "a positive float or None")
    if not logit_softcap > 0.0:
      raise ValueError(f"`logit_softcap` must be > 0, got {logit_softcap}.")
  if ignore_index is not None:
    if _is_traced(ignore_index):
      raise TypeError(f"`ignore_index` must be a Python int (static), got a traced value "
                      f"{ignore_index}.")
    if (isinstance(ignore_index, (bool, np.bool_))
        or not isinstance(ignore_index, (int, np.integer))
        and not (isinstance(ignore_index, np.ndarray) and ignore_index.ndim == 0
                 and np.issubdtype(ignore_index.dtype, np.integer))):
      raise TypeError(f"`ignore_index` must be an int or None, got {ignore_index!r}.")
    ignore_index = int(ignore_index)
  if axis_name is not None and not isinstance(axis_name, (str, tuple)):
    raise TypeError(f"`axis_name` must be a mesh axis name (str) or None, got {axis_name!r}.")
  return XentOptions(
      label_smoothing=label_smoothing,
      z_loss=z_loss,
      logit_softcap=logit_softcap,
      ignore_index=ignore_index,
      axis_name=axis_name,
      tf_grad=bool(tf_grad),
  )


def _real(name: str, value, what: str) -> float:
  """A static real option as a Python float: Python and NumPy numbers (config files often hold
  ``np.float32(0.1)``) and 0-d NumPy arrays; not bools, complex numbers or strings."""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value[()]
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating))):
    raise TypeError(f"`{name}` must be {what}, got {value!r} of type {type(value).__name__}.")
  return float(value)
