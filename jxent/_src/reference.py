"""Independent float64 NumPy references (values and analytic gradients) used by the tests."""

from __future__ import annotations

import numpy as np


def xent(logits, labels, *, axis=-1, sparse=False, label_smoothing=0.0, z_loss=0.0,
         logit_softcap=None, ignore_index=None, tf_grad=False, g=None):
  """Returns ``(loss, dlogits, dlabels)`` in float64 for cotangent ``g`` (ones by default).

  ``dlabels`` is None for integer labels. ``tf_grad`` selects TF's kernel gradient
  ``g * (softmax - labels)``; otherwise the true derivative.
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
  with np.errstate(invalid="ignore", over="ignore"):
    loss = -np.sum(np.where(yt == 0, 0.0, yt * logp), axis=-1) + z_loss * lse[..., 0] ** 2
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
  return loss, dlogits, dlabels

