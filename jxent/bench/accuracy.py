"""``jxent-bench --accuracy``: errors in ulps against float64 truth on the rounded inputs.

The accuracy contract (docs/accuracy.md) is measured here, for jxent's implementations and the
peers (optax, the naive ``jax.nn.log_softmax`` formula, Keras 3), on a set of regimes that break
cross-entropy kernels: confident rows (the true class's ``p - 1`` cancels), large offsets (shift
invariance), a common logit of 2^24 or 3e35 (an absolute log-sum-exp rounds to the logit), masked
classes and single-class rows.

Everything is measured on the inputs as rounded to the dtype: the truth is float64 NumPy on those
same values, so an implementation is charged only for its own rounding. The gradient is that of
the summed per-row loss (integer labels; ``dense=True``: their one-hot rows as dense labels).
An error is ``|value - truth| / ulp(truth)`` in the dtype (below the smallest normal number the
ulp is that number: XLA flushes subnormals to zero); a NaN or an infinity where the truth is
finite counts as ``inf``.

The tests (``tests/test_precision.py``) assert the contract with these functions; the table of
docs/accuracy.md comes from ``jxent-bench --accuracy``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import numpy as np

# --------------------------------------------------------------------------------------------
# Regimes: float64 logits (before rounding) and integer labels.
# --------------------------------------------------------------------------------------------


def _normal(rng, rows, classes, scale=2.0, offset=0.0):
  return rng.normal(size=(rows, classes)) * scale + offset


def _labels(rng, rows, classes):
  return rng.integers(0, classes, size=rows)


def _confident(rng, rows, classes):
  x = _normal(rng, rows, classes, 1.0)
  y = _labels(rng, rows, classes)
  # p(true) in [0.99, 0.999]: the others' share 1 - p(true) = t / (1 + t), t in [1e-3, 1e-2]
  others = np.where(np.arange(classes)[None, :] == y[:, None], -np.inf, x)
  lse_others = np.log(np.sum(np.exp(others), axis=1))
  x[np.arange(rows), y] = lse_others - np.log(rng.uniform(1e-3, 1e-2, size=rows))
  return x, y


def _confidently_wrong(rng, rows, classes):
  x = _normal(rng, rows, classes, 1.0)
  y = _labels(rng, rows, classes)
  other = (y + 1 + rng.integers(0, max(classes - 1, 1), size=rows)) % classes
  x[np.arange(rows), other] = x.max(axis=1) + math.log(100.0 * classes) + 4.0
  return x, y


def _masked(rng, rows, classes):
  x = _normal(rng, rows, classes)
  y = _labels(rng, rows, classes)
  mask = rng.random((rows, classes)) < 0.3
  mask[np.arange(rows), y] = False
  return np.where(mask, -np.inf, x), y


def _common(value):
  def make(rng, rows, classes):
    return np.full((rows, classes), value), _labels(rng, rows, classes)
  return make


@dataclasses.dataclass(frozen=True)
class Regime:
  name: str
  make: Callable  # (rng, rows, classes) -> (x float64 [rows, classes], labels int [rows])
  classes: Optional[int] = None  # a fixed class count (single-class rows)
  max_abs: float = 0.0  # the largest finite logit (a dtype that cannot hold it is skipped)


REGIMES = (
    Regime("normal", lambda rng, r, c: (_normal(rng, r, c), _labels(rng, r, c)), max_abs=20),
    Regime("logits x 20", lambda rng, r, c: (_normal(rng, r, c, 40.0), _labels(rng, r, c)),
           max_abs=300),
    Regime("confident", _confident, max_abs=40),
    Regime("confidently wrong", _confidently_wrong, max_abs=40),
    Regime("offset +1e4", lambda rng, r, c: (_normal(rng, r, c, offset=1e4), _labels(rng, r, c)),
           max_abs=1.1e4),
    Regime("offset -1e4", lambda rng, r, c: (_normal(rng, r, c, offset=-1e4), _labels(rng, r, c)),
           max_abs=1.1e4),
    Regime("every logit 2^24", _common(2.0 ** 24), max_abs=2.0 ** 24),
    Regime("every logit 3e35", _common(3e35), max_abs=3e35),
    Regime("masked classes (-inf)", _masked, max_abs=20),
    Regime("single class", lambda rng, r, c: (_normal(rng, r, 1), np.zeros(r, np.int64)),
           classes=1, max_abs=20),
)


def regimes(dtype) -> tuple[Regime, ...]:
  """The regimes whose logits ``dtype`` can hold."""
  import jax.numpy as jnp
  big = float(jnp.finfo(dtype).max)
  return tuple(r for r in REGIMES if r.max_abs < big / 2)


def inputs(regime: Regime, dtype, rows: int, classes: int, seed: int = 0):
  """``(x in dtype, x64 = the same values as float64, labels)`` for ``regime``."""
  import jax.numpy as jnp
  rng = np.random.default_rng(seed)
  x, y = regime.make(rng, rows, regime.classes or classes)
  xd = jnp.asarray(x, jnp.float32).astype(dtype) if dtype != jnp.float64 else jnp.asarray(x)
  return xd, np.asarray(xd).astype(np.float64), y


# --------------------------------------------------------------------------------------------
# The float64 truth and the ulp measure.
# --------------------------------------------------------------------------------------------


def truth(x64: np.ndarray, labels: np.ndarray):
  """``(loss [R], grad [R, C])`` of the summed loss, float64, from the rounded logits.

  ``grad[r, y] = p_y - 1`` is formed as ``-sum_{j != y} p_j`` (no cancellation at ``p_y -> 1``);
  the loss as ``(m - x_y) + log(sum exp(x - m))`` with the sum's terms other than the label's
  added first (``log1p`` of them when the label is the maximum)."""
  rows = np.arange(x64.shape[0])
  m = np.max(x64, axis=1, keepdims=True)
  m = np.where(np.isneginf(m), 0.0, m)
  e = np.exp(x64 - m)
  others = e.copy()
  others[rows, labels] = 0.0
  t = others.sum(axis=1)
  e_y = e[rows, labels]
  s = t + e_y
  log_s = np.where(e_y == 1.0, np.log1p(t), np.log(s))
  loss = (m[:, 0] - x64[rows, labels]) + log_s
  p = e / s[:, None]
  grad = p.copy()
  grad[rows, labels] = -(others.sum(axis=1) / s)
  return loss, grad


def ulp(t: np.ndarray, dtype) -> np.ndarray:
  """The spacing of ``dtype`` at the float64 values ``t``; below the smallest normal number it is
  that number (XLA flushes subnormal results to zero: a flushed value is within 1 ulp)."""
  import jax.numpy as jnp
  fi = jnp.finfo(dtype)
  _, e = np.frexp(np.abs(np.where(np.isfinite(t), t, 0.0)))
  spacing = np.ldexp(1.0, e - 1 - int(fi.nmant))
  return np.where(np.abs(t) < float(fi.tiny), float(fi.tiny), spacing)


def ulps(value, t: np.ndarray, dtype) -> np.ndarray:
  """``|value - t|`` in ulps of ``dtype`` at ``t``; equal infinities count 0, a non-finite value
  where ``t`` is finite ``inf``."""
  v = np.asarray(value, np.float64)
  with np.errstate(invalid="ignore"):
    err = np.abs(v - t) / ulp(t, dtype)
  same = (v == t)
  err = np.where(same, 0.0, err)
  return np.where(np.isnan(err), np.inf, err)


# --------------------------------------------------------------------------------------------
# Implementations: (x [R, C], labels [R], dense) -> (loss [R], grad [R, C]) of the summed loss.
# --------------------------------------------------------------------------------------------
PEERS = ("naive", "optax", "keras")


def _jxent(impl) -> Callable:
  import jax
  import jax.numpy as jnp
  from jxent._src import api

  def fn(x, y, dense):
    if dense:
      oh = jax.nn.one_hot(y, x.shape[1], dtype=x.dtype)
      f = lambda x: api.softmax_cross_entropy(x, oh, implementation=impl)
    else:
      f = lambda x: api.softmax_cross_entropy_with_integer_labels(x, jnp.asarray(y),
                                                                  implementation=impl)
    loss, vjp = jax.vjp(f, x)
    return loss, vjp(jnp.ones_like(loss))[0]
  return fn


def _peer(name: str) -> Callable:
  import jax
  import jax.numpy as jnp

  if name == "naive":
    def per_row(x, y, oh):
      return -jnp.sum(oh * jax.nn.log_softmax(x, axis=-1), axis=-1)
  elif name == "optax":
    import optax

    def per_row(x, y, oh):
      return optax.softmax_cross_entropy(x, oh)
  elif name == "keras":
    import os
    os.environ.setdefault("KERAS_BACKEND", "jax")  # (Keras 3 on JAX; set before its import)
    import keras

    def per_row(x, y, oh):
      return keras.losses.categorical_crossentropy(oh, x, from_logits=True)
  else:
    raise ValueError(f"unknown peer {name!r}")

  def fn(x, y, dense):
    del dense  # (the peers compute both label kinds the same way)
    oh = jax.nn.one_hot(y, x.shape[1], dtype=x.dtype)
    loss, vjp = jax.vjp(lambda x: per_row(x, y, oh), x)
    return loss, vjp(jnp.ones_like(loss))[0]
  return fn


def implementation(name: str) -> Callable:
  """The measured function of a jxent implementation name (Pallas kernels: in interpret mode off
  their platform) or of a peer."""
  if name in PEERS:
    return _peer(name)
  import jax
  from jxent._src import dispatch
  kernel = dispatch.kernel_class(name)()
  if hasattr(kernel, "interpret") and jax.default_backend() not in kernel.platforms:
    kernel = dataclasses.replace(kernel, interpret=True)
  return _jxent(kernel)


@dataclasses.dataclass
class Row:
  implementation: str
  dtype: str
  labels: str
  regime: str
  loss_ulps: float
  grad_ulps: float
  true_class_ulps: float

  def as_dict(self):
    return dataclasses.asdict(self)


def measure(name: str, fn: Callable, regime: Regime, dtype, *, rows: int, classes: int,
            dense: bool = False, seed: int = 0) -> Row:
  """The largest errors of ``fn`` on ``regime``: loss, every gradient element, the true class's."""
  import jax
  import jax.numpy as jnp
  x, x64, y = inputs(regime, dtype, rows, classes, seed)
  loss, grad = jax.jit(fn, static_argnums=2)(x, jnp.asarray(y), dense)
  t_loss, t_grad = truth(x64, y)
  g = ulps(np.asarray(grad).astype(np.float64), t_grad, dtype)
  r = np.arange(x.shape[0])
  return Row(name, jnp.dtype(dtype).name, "dense" if dense else "int", regime.name,
             float(np.max(ulps(np.asarray(loss).astype(np.float64), t_loss, dtype))),
             float(np.max(g)), float(np.max(g[r, y])))


def table(names, dtypes, *, rows: int = 64, classes: int = 32003, dense: bool = False,
          kernel_rows: int = 8, progress: Optional[Callable] = None) -> list[Row]:
  """Every ``(implementation, dtype, regime)`` row; Pallas kernels in interpret mode run on
  ``kernel_rows`` rows (interpret mode is slow)."""
  out = []
  for dtype in dtypes:
    for regime in regimes(dtype):
      for name in names:
        n = kernel_rows if name.startswith("pallas") else rows
        out.append(measure(name, implementation(name), regime, dtype, rows=n, classes=classes,
                           dense=dense))
        if progress is not None:
          progress(out[-1])
  return out


def format_table(rows: list[Row]) -> str:
  """A Markdown table: one line per (dtype, labels, regime), one column group per implementation
  (loss / gradient / true class, max ulps)."""
  names = list(dict.fromkeys(r.implementation for r in rows))
  keys = list(dict.fromkeys((r.dtype, r.labels, r.regime) for r in rows))
  by = {(r.dtype, r.labels, r.regime, r.implementation): r for r in rows}

  def f(v):
    if v == math.inf:
      return "inf"
    return f"{v:.3g}" if v < 1e4 else f"{v:.1e}"

  head = "| dtype | labels | regime | " + " | ".join(names) + " |"
  lines = [head, "|" + "---|" * (3 + len(names))]
  for k in keys:
    cells = []
    for n in names:
      r = by.get((*k, n))
      cells.append("" if r is None else f"{f(r.loss_ulps)} / {f(r.grad_ulps)} / {f(r.true_class_ulps)}")
    lines.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
