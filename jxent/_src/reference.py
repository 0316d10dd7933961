"""Independent float64 NumPy references (values and analytic gradients) used by the tests."""

from __future__ import annotations

import numpy as np


def xent(logits, labels, *, axis=-1, sparse=False, label_smoothing=0.0, z_loss=0.0,
         logit_softcap=None, ignore_index=None, tf_grad=False, g=None, class_weight=None):
  """Returns ``(loss, dlogits, dlabels)`` in float64 for cotangent ``g`` (ones by default).

  ``dlabels`` is None for integer labels. ``tf_grad`` selects TF's kernel gradient
  ``g * (softmax - labels)``; otherwise the true derivative. ``class_weight`` ``w [C]``:
  PyTorch's ``weight=``, ``loss = -sum(w * labels' * log p) + z_loss * lse**2`` with the
  smoothed labels ``labels'`` (for integer labels ``(1 - eps) w_y (-log p_y) + (eps / C)
  sum_c w_c (-log p_c)``); with it the function also returns ``d loss / d w`` (summed over the
  rows) as a fourth value.
  """
  x0 = np.moveaxis(np.asarray(logits, np.float64), axis, -1)
  c = x0.shape[-1]
  if logit_softcap is not None:
    x = logit_softcap * np.tanh(x0 / logit_softcap)
    cap = 1.0 - (x / logit_softcap) ** 2
  else:
    x, cap = x0, 1.0
  m = np.max(x, axis=-1, keepdims=True)
  m = np.where(np.isneginf(m), 0.0, m)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    lse = m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))
    logp = x - lse
    p = np.exp(logp)
  eps = label_smoothing
  if sparse:
    lab = np.asarray(labels)
    valid = (lab >= 0) & (lab < c)
    y = (np.arange(c) == lab[..., None]).astype(np.float64)
  else:
    y = np.moveaxis(np.broadcast_to(np.asarray(labels, np.float64), np.shape(logits)), axis, -1)
  yt = (1 - eps) * y + eps / c
  w = np.ones(c) if class_weight is None else np.asarray(class_weight, np.float64)
  with np.errstate(invalid="ignore", over="ignore"):
    per_class = np.where(yt == 0, 0.0, -yt * logp)  # d loss / d w, per row and class
    loss = np.sum(w * per_class, axis=-1) + z_loss * lse[..., 0] ** 2
  yt = w * yt
  gg = np.ones(loss.shape) if g is None else np.asarray(g, np.float64)
  if sparse:
    loss = np.where(valid, loss, np.nan)
    if ignore_index is not None:
      keep = lab != ignore_index
      loss = np.where(keep, loss, 0.0)
      gg = gg * keep
  coef = (np.sum(yt, -1, keepdims=True) if not tf_grad else 1.0) + 2 * z_loss * lse
  with np.errstate(invalid="ignore"):
    dx = gg[..., None] * (coef * p - yt) * cap
  dlogits = np.moveaxis(dx, -1, axis)
  dlabels = None
  if not sparse:
    with np.errstate(invalid="ignore"):
      dlabels = np.moveaxis(-gg[..., None] * (1 - eps) * logp, -1, axis)
  if class_weight is None:
    return loss, dlogits, dlabels
  if not sparse:
    dlabels = dlabels * np.moveaxis(np.broadcast_to(w, x.shape), -1, axis)
  with np.errstate(invalid="ignore"):
    dw = np.sum((gg[..., None] * per_class).reshape(-1, c), axis=0)
  return loss, dlogits, dlabels, dw

