"""The plain-XLA cross-entropy kernels: forward (per-row loss and log-sum-exp) and backward.

Every kernel backend implements the same two functions on canonical 2-D inputs:

* ``forward(logits [R, C], labels, *, sparse, opts, need_lse=True) -> (loss f32 [R], stats)``
  with the row statistics ``stats = (m, log_z, z)``: ``m`` the row max of the capped logits (0
  for a row of ``-inf``), ``z = sum(exp(x - m))`` (1 for a row of ``-inf``) and ``log_z =
  log(z)``, each f32 ``[R]`` (:func:`rowmath.stats_of`; ``need_lse=False``: the caller keeps
  only the loss, a hint a kernel may use or ignore)
* ``backward(logits, labels, stats, g f32 [R], *, sparse, opts) -> (dlogits [R, C], dlabels | None)``

The statistics are kept apart, never as an absolute ``lse = m + log_z`` subtracted from the
logits, so the gradient is shift invariant (:func:`rowmath.softmax`); the sum is taken apart
from the row's maxima where XLA fuses that (:func:`exact_tail`), so a confident row's loss and
``p_y - 1`` are exact.

``labels`` are ``[R, C]`` (dense, any float dtype) or ``[R]`` integers (``sparse=True``). With
``opts.axis_name`` the class axis is a local shard of a larger vocabulary and the per-row statistics
are combined with collectives.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jxent._src.options import XentOptions
from jxent._src.kernels.rowmath import (class_offset, class_weight_rows, class_weight_tangent,
                                        combine, dense_grad, exp_diff, finish_sparse,
                                        gather_label, grad_coef, ignored_rows, label_grad,
                                        local_label, loss_from_stats, num_classes, pmax,
                                        prep_logits, psum,
                                        safe_max, softcap_factor, softmax, stats_of, sum_target,
                                        top_scalars, weighted_targets)


def cpu_fusible(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """``arrays``, behind one optimization barrier on CPU when any is bfloat16.

  XLA:CPU fuses the upcast of bfloat16 data into each reduction that reads it, unless that
  upcast has other users (another reduction, a gather, a reshape): it then materialises one
  float32 copy for all of them, which made the bfloat16 forward 3-5x slower. Passing the same
  array several times gives each user its own handle; the barrier copies nothing. (float16 is
  upcast differently and gained nothing from it.)
  """
  if jax.default_backend() == "cpu" and any(a.dtype == jnp.bfloat16 for a in arrays):
    return tuple(lax.optimization_barrier(arrays))
  return arrays


def segments(c: int) -> int:
  """How many segments to split each row into for the reductions.

  XLA:CPU reduces a few very long rows slowly (one 128256-wide row at a time is ~6x slower than
  the same data as 256-wide rows), so on CPU rows longer than 4096 are viewed as ``[k, c // k]``
  with a segment length in [128, 2048] that divides ``c``. Other backends keep whole rows.
  """
  if c <= 4096 or jax.default_backend() != "cpu":
    return 1
  for seg in range(2048, 127, -1):
    if c % seg == 0:
      return c // seg
  return 1


def label_dot(opts: XentOptions) -> bool:
  """Whether the dense label term is one fused reduction once the row statistics are known,
  ``sum(y * min(log_z - (x - m), max))`` (XLA:CPU; see :func:`forward`)."""
  return jax.default_backend() == "cpu" and opts.axis_name is None


def forward(logits: jax.Array, labels: jax.Array, *, sparse: bool, opts: XentOptions,
            autodiff: bool = False, need_lse: bool = True, class_weight=None):
  """Per-row loss and log-sum-exp, float32 accumulation (see module docstring).

  ``autodiff=True`` (``xla_autodiff``) keeps every derivative JAX takes of it finite at masked
  logits. ``need_lse=False`` says the caller keeps only the loss (a primal with no gradient): the
  lse is still returned, but the CPU dense path then takes a form that fuses better alone and
  worse beside the lse.

  Each reduction recomputes ``x - m`` from the inputs rather than sharing an ``[R, C]`` array,
  so XLA fuses every one of them into a single read of the logits. Rows may be reduced in
  segments (:func:`segments`) whose statistics are then combined per row.

  ``class_weight`` (``[C]``, the compute dtype, or None) weighs the classes as PyTorch's
  ``weight=``: it scales the dense labels and the smoothing sum inside the same reductions
  (broadcast, no ``[R, C]`` copy), and the label's term by ``w[label]``.
  """
  rows, c = logits.shape
  k = segments(c)
  if sparse and label_tail(logits.dtype, autodiff=autodiff):
    return _label_tail_forward(logits, labels, k, opts, need_lse=need_lse,
                               class_weight=class_weight)

  def seg(v):
    return v.reshape(rows * k, c // k)

  def weigh(v):  # v [rows * k, c // k] times the class weight, segment by segment
    if class_weight is None:
      return v
    return (v.reshape(rows, k, c // k) * class_weight.reshape(k, c // k)).reshape(rows * k, c // k)

  # Segment, then upcast, with a handle for each reduction (see cpu_fusible).
  if sparse:
    raw, raw_sum, logits_lab = cpu_fusible(seg(logits), seg(logits), logits)
  else:
    raw, raw_sum, raw_lab, labels_seg = cpu_fusible(seg(logits), seg(logits), seg(logits),
                                                    seg(labels))
  xs = prep_logits(raw, opts)
  cdt = xs.dtype
  loss_only = not need_lse and label_dot(opts) and not autodiff and not sparse
  ms, m, shift, u, z = _row_stats(xs, raw, rows, k, opts, fusible_max=loss_only)
  n_cls = num_classes(c, opts)
  w_y, wsum = (None, None)
  if class_weight is not None:
    w_y, wsum = class_weight_rows(class_weight, labels, opts, sparse=sparse)
  dense_cpu = not sparse and label_dot(opts) and not autodiff and rows
  sum_s = None
  if opts.label_smoothing and not dense_cpu:  # (the dense CPU form folds it into its targets)
    # sum(w * (x - m)), shift invariant (sum(w * x) - sum(w) * m cancelled: 52 ulps of the loss
    # at a logit offset of -1000); m behind a barrier, as for the dense label term below
    m_seg = jnp.repeat(lax.optimization_barrier(m), k)[:, None]
    sum_s = psum(jnp.sum(jnp.sum(weigh(prep_logits(raw_sum, opts) - m_seg), axis=-1)
                         .reshape(rows, k), axis=-1), opts)
  log_z = jnp.log(z) if u is None else jnp.log1p(u)
  stats = stats_of(m, log_z, z)
  if sparse:
    x_lab = gather_label(logits_lab, labels, opts)
    xent = log_z - (x_lab - m)
    loss = combine(m, log_z, xent if w_y is None else w_y * xent, sum_s, opts, n_cls, wsum)
    return finish_sparse(loss, labels, n_cls, opts), stats
  ys = weigh(labels_seg.astype(cdt))
  xd = prep_logits(raw_lab, opts)  # xs again, from its own handle for the label terms
  if not dense_cpu:  # (autodiff: see _exact_xent)
    return combine(m, log_z, _exact_xent(xd, ys, ms, shift, log_z, opts, autodiff=autodiff),
                   sum_s, opts, n_cls, wsum), stats
  # One reduction that reads the inputs themselves, with the row statistics already known:
  # sum(y * min(log_z - (x - m), cap)), shift invariant, and the same in the plain forward and
  # in the forward of a VJP (value_and_grad returns the plain forward's value bit for bit).
  # XLA:CPU fuses it with the max and the sum of exponentials into one read of x and y with no
  # [R, C] temporary. (Earlier forms: sum(y * x) - m * sum(y) as a row dot product cancelled at
  # a logit offset, 1150 ulps at 1e4; a NaN check with a fallback kept an [R, C] temporary,
  # 1.9x optax at 16384x1000.) The row values pass a barrier: sharing the broadcast of m with
  # the sum of exponentials made XLA:CPU write it out as an [R, C] temporary (2x optax there).
  log_z_seg, m_seg = (jnp.repeat(v, k)[:, None] for v in lax.optimization_barrier((log_z, m)))
  # The gap is capped at the float32 maximum where the label is 0 only: a zero label on a -inf
  # logit (`where` masks) then contributes 0, not 0 * inf, and a non-zero one +inf, as in TF.
  # Only `minimum`, not a `where`, keeps XLA:CPU to one fused read (a loop over row blocks
  # upcast bfloat16 inputs whole: 218.7 MB at 512x50257). |y| * 2^127 * 2^127 is +inf for every
  # non-zero label, denormal ones included; 2^127 comes through a barrier, or XLA folds the two
  # constants into inf and 0 * inf is NaN.
  big = lax.optimization_barrier(jnp.asarray(2.0 ** 127, cdt))
  cap = jnp.finfo(cdt).max + (jnp.abs(ys) * big) * big
  gap = jnp.minimum(log_z_seg - (xd - m_seg), cap)
  eps = opts.label_smoothing
  if eps:  # the smoothing in the targets, (1 - eps) w y + eps w / C: one sum, one rounding less
    ys = (1.0 - eps) * ys + (eps / n_cls) * weigh(jnp.ones_like(ys))
  xent = jnp.sum(jnp.sum(ys * gap, axis=-1).reshape(rows, k), axis=-1)
  # (XLA:CPU's minimum drops a NaN: rows of all -inf, or with a NaN or +inf logit, have a
  # non-finite log_z and stay NaN, as in TF and optax.)
  xent = jnp.where(jnp.isfinite(log_z), xent, jnp.nan)
  return combine(m, log_z, xent, None, dataclasses.replace(opts, label_smoothing=0.0), n_cls,
                 wsum), stats


def label_tail(dtype, *, autodiff: bool = False) -> bool:
  """Whether integer labels take :func:`_label_tail_forward` (XLA:CPU, float32 logits; not
  ``xla_autodiff``), the sum of exponentials without the label's term."""
  return jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32 and not autodiff


def _without_label(x, m, idx):
  """``exp(x - m)`` ``[R, C]`` with each row's label entry (``idx``; out of range: none) set to
  0. The forward of a VJP and its backward build it alike: under one jit XLA:CPU computes it once,
  sums it, and scales it in place into the gradient (the exponentials are that path's main cost
  on a CPU)."""
  return jnp.exp(x - m[:, None]).at[jnp.arange(x.shape[0]), idx].set(0.0, mode="drop")


def _label_tail_forward(logits, labels, k: int, opts: XentOptions, *, need_lse: bool,
                        class_weight=None):
  """Integer labels on XLA:CPU (float32): the row max, then ``t = sum_{j != label} exp(x_j - m)``
  and the loss from ``(m, t, x_label)`` as the chunked and Pallas kernels form it
  (:func:`rowmath.loss_from_stats`: ``log_z = log1p(t + expm1(x_label - m))``, exact on
  confident rows, and the label's gradient ``-t / z`` from it). The smoothing sum is ``sum(w *
  (x - m))``, shift invariant.

  ``t`` leaves the label's term out by its index, so it never holds the 1 of a confident row's
  maximum, whose ulp would round the tail away (the plain sum: ~1500 ulps on the true class).
  Two forms with the same sums, so that ``value_and_grad`` returns the plain forward's value bit
  for bit: the primal (``need_lse=False``) masks the label inside one fused reduction,
  ``min(exp(x - m), (j - label)^2)`` (no ``[R, C]`` temporary; XLA:CPU fuses no select into
  it); the forward of the VJP sums :func:`_without_label`, which its backward shares. Rows are
  summed in segments (:func:`segments`), all against the row max.
  """
  rows, c = logits.shape
  seg = c // k
  x = prep_logits(logits, opts)
  m = pmax(jnp.max(jnp.max(x.reshape(rows * k, seg), axis=-1).reshape(rows, k), axis=-1), opts)
  m = lax.stop_gradient(jnp.where(jnp.isneginf(m), 0.0, m))
  x_lab, local, in_shard = local_label(logits, labels, opts)
  idx = jnp.where(in_shard, local, c)  # (c: no entry of this shard)
  if need_lse:
    e = _without_label(x, m, idx).reshape(rows * k, seg)
  else:
    lab = (idx[:, None] - jnp.arange(k)[None, :] * seg).reshape(-1).astype(x.dtype)
    gap = jnp.square(jnp.arange(seg, dtype=x.dtype)[None, :] - lab[:, None])  # >= 1 off the label
    e = jnp.minimum(jnp.exp(x.reshape(rows * k, seg) - jnp.repeat(m, k)[:, None]), gap)
  t = jnp.sum(jnp.sum(e, axis=-1).reshape(rows, k), axis=-1)
  sum_s = sum_w = None
  if opts.label_smoothing:  # sum(w * (x - m)), shift invariant
    s = x - m[:, None] if class_weight is None else (x - m[:, None]) * class_weight[None, :]
    sum_s = jnp.sum(jnp.sum(s.reshape(rows * k, seg), axis=-1).reshape(rows, k), axis=-1)
    sum_w = jnp.full_like(m, c if class_weight is None else jnp.sum(class_weight))
  weights = None
  if class_weight is not None:
    weights = class_weight_rows(class_weight, labels, opts, sparse=True)
  return loss_from_stats(m, t, None, jnp.where(in_shard, x_lab, 0.0), sum_s, labels, sparse=True,
                         opts=opts, local_c=c, weights=weights, sum_w=sum_w)


def exact_tail(dtype) -> bool:
  """Whether :func:`_row_stats` sums a row's tail apart from its maxima: everywhere but on
  XLA:CPU for 16- and 32-bit logits, whose reduction fusions take no select or compare (each
  such reduction, and each second reduction beside it, writes an ``[R, C]`` copy first: 33.6
  MB at 1024 x 8192); there the sum is the naive formula's (float64 keeps the exact form)."""
  return jax.default_backend() != "cpu" or jnp.dtype(dtype) == jnp.float64


def _row_stats(xs, raw, rows: int, k: int, opts: XentOptions, *, fusible_max: bool = False):
  """Segment maxima ``ms`` [rows, k], row maxima ``m``, ``shift = ms - m``, the global ``u =
  sum(exp(x - m)) - 1`` summed without cancellation (the tail beside the max's 1; None
  where :func:`exact_tail` is off) and the sum ``z`` itself.

  A row's sum of exponentials is 1 (its maximum) plus a tail; ``1 + tail`` rounds the tail to
  the ulp of 1, which a confident row's loss ``log1p(tail)`` and its ``p_max - 1 =
  expm1(-log_z)`` need to the last digit. So (:func:`exact_tail`) each segment sums its terms
  other than its maxima and counts the maxima; the segments holding the row max add their
  count less one, the others their count rescaled. The maxima enter as ``x - max`` (0, with
  derivative 1: JAX's own derivative of the forward stays exact, ``xla_autodiff``). Elsewhere
  only the plain sum is taken (the naive formula's accuracy). A row of ``-inf`` gives ``u =
  -1`` and ``z = 0``.

  ``xs`` are the upcast, capped logits ``[rows * k, C / k]`` and ``raw`` the same before that.
  For bfloat16 the maxima are taken of ``raw`` and then upcast and capped (both monotone), so
  that the upcast has one reader, the sum of exponentials (see :func:`cpu_fusible`).

  The maxima only shift the exponents: no derivative flows through them (the result does not
  depend on them), so JAX's own autodiff of :func:`forward` is exact (``xla_autodiff``). A
  segment or row of ``-inf`` gets 0 as its maximum (so that its exponentials are 0 and its lse
  ``-inf``), or with ``fusible_max`` the most negative float, by a ``maximum`` that XLA:CPU
  fuses into the reductions that follow (a ``where`` it does not; but beside the lse the
  ``where`` form measured faster: 38 vs 42 ms for value_and_grad at 16384x1000).
  """
  if raw.dtype == jnp.bfloat16:  # (float16 measured slower so: its max is upcast anyway)
    ms = lax.stop_gradient(prep_logits(jnp.max(raw, axis=-1), opts))
  else:
    ms = lax.stop_gradient(jnp.max(xs, axis=-1))
  if fusible_max:
    ms = jnp.maximum(ms, jnp.finfo(ms.dtype).min)
  else:
    ms = jnp.where(jnp.isneginf(ms), 0.0, ms)
  sh = xs - ms[:, None]
  exact = exact_tail(xs.dtype)
  if exact:  # the segments' sums without their maxima, and the maxima's counts
    # (by `xs == ms`, not `sh == 0`: the two reductions may be separate fusions, and XLA may
    # contract a soft-cap's product into `x - m` in one of them only)
    top = xs == ms[:, None]
    rest = jnp.sum(jnp.where(top, sh, jnp.exp(sh)), axis=-1).reshape(rows, k)
    count = jnp.sum(jnp.where(top, 1.0, 0.0).astype(xs.dtype), axis=-1).reshape(rows, k)
  else:
    zs = jnp.sum(jnp.exp(sh), axis=-1).reshape(rows, k)
  ms = ms.reshape(rows, k)
  m = pmax(jnp.max(ms, axis=-1), opts)
  if not fusible_max:
    m = jnp.where(jnp.isneginf(m), 0.0, m)
  shift = ms - m[:, None]  # <= 0
  scale = exp_diff(ms, m[:, None])
  if not exact:
    return ms, m, shift, None, psum(jnp.sum(zs * scale, axis=-1), opts)
  at_top = shift == 0
  rest, count = psum((jnp.sum(rest * scale + jnp.where(at_top, 0.0, count * scale), axis=-1),
                      jnp.sum(jnp.where(at_top, count, 0.0), axis=-1)), opts)
  u = rest + (count - 1.0)  # (count - 1 first: it may be 0)
  return ms, m, shift, u, u + 1.0


def _exact_xent(xs, ys, ms, shift, log_z, opts: XentOptions, *, autodiff: bool):
  """``sum(y * (lse - x))`` per row, with a zero label contributing nothing even at ``x = -inf``.

  For autodiff both factors are masked, so that the labels' derivative there is ``0 * finite``,
  not ``0 * inf``.
  """
  rows, k = ms.shape
  sum_y_seg = jnp.sum(ys, axis=-1).reshape(rows, k)
  zero = ys == 0
  xm = xs - ms.reshape(-1)[:, None]
  if autodiff:
    # Only a zero label on a -inf logit is masked, and only in the logit factor: the labels'
    # derivative stays x - m elsewhere (a zero label included) and is finite at -inf.
    prod = ys * jnp.where(zero & jnp.isneginf(xm), 0.0, xm)
    shifted = shift * sum_y_seg  # (finite: no segment maximum is -inf here)
  else:
    prod = jnp.where(zero, 0.0, ys * xm)
    shifted = jnp.where(sum_y_seg == 0, 0.0, shift * sum_y_seg)
  sum_ys_seg = jnp.sum(prod, axis=-1).reshape(rows, k)
  sum_ys = jnp.sum(sum_ys_seg + shifted, axis=-1)
  sum_y, sum_ys = psum((jnp.sum(sum_y_seg, axis=-1), sum_ys), opts)
  return log_z * sum_y - sum_ys


def backward(logits, labels, stats, g, *, sparse: bool, opts: XentOptions, want_dlabels: bool = True,
             class_weight=None, shared: bool = True):
  """``dlogits`` (logits dtype) and, for dense labels, ``dlabels`` (labels dtype), from the
  forward's row statistics ``stats = (m, log_z, z)``.

  ``softmax = exp(x - m) / z`` (:func:`rowmath.softmax`). For integer labels the
  label's entry is written per row as ``coef * expm1(log p_y) + (coef - target_y)``, where
  ``log p_y = (x_y - m) - log_z``: no ``p_y - 1`` cancellation on confident rows. A
  ``class_weight`` ``w`` scales the targets (:func:`rowmath.weighted_targets`), broadcast in the
  same elementwise pass. ``shared``: the forward was :func:`forward`, whose exponentials the
  float32 CPU integer-label path rebuilds alike (:func:`_without_label`); False for a forward
  that writes none (the chunked kernel's), which the softmax's own form serves better."""
  logits_lab, logits = cpu_fusible(logits, logits)  # see cpu_fusible
  x = prep_logits(logits, opts)
  local_c = x.shape[-1]
  n_cls = num_classes(local_c, opts)
  eps = opts.label_smoothing
  g = g.astype(x.dtype)
  stats = tuple(v.astype(x.dtype) for v in stats)
  m, log_z, z = stats
  cw = None if class_weight is None else class_weight.astype(x.dtype)
  if sparse:
    t_lab = None
    if cw is None:
      coef = grad_coef(stats, opts)
      smooth = eps / n_cls if eps else 0.0
    else:
      w_y, wsum = class_weight_rows(cw, labels, opts, sparse=True)
      sum_t, smooth, t_lab = weighted_targets(cw, None, w_y, wsum, opts, n_cls, sparse=True)
      coef = grad_coef(stats, opts, sum_t, weighted=True)
      smooth = 0.0 if smooth is None else smooth[None, :]
    ign = ignored_rows(labels, opts)
    if ign is not None:
      g = jnp.where(ign, 0.0, g)
    # Every class gets g * (coef * p - eps / C); the label's entry is then overwritten with its
    # exact value, computed per row (a scatter of R values instead of an [R, C] one-hot).
    x_lab, local, in_shard = local_label(logits_lab, labels, opts)
    rows = jnp.arange(x.shape[0])
    idx = jnp.where(in_shard, local, local_c)  # out of bounds: dropped
    if shared and label_tail(logits.dtype):  # the forward's own exponentials (_without_label)
      base = _without_label(x, m, idx) * (g * coef / z)[:, None] - g[:, None] * smooth
    else:
      base = g[:, None] * (coef[:, None] * softmax(x, m, z) - smooth)
    dlogits = (base * softcap_factor(x, opts)).astype(logits.dtype)
    d_lab = g * label_grad(x_lab, stats, coef, opts, n_cls, t_lab=t_lab) * softcap_factor(x_lab, opts)
    if jax.default_backend() == "cpu" and logits.dtype == jnp.bfloat16:
      # XLA:CPU scatters bfloat16 through a float32 copy of the whole gradient (1.6x slower at
      # 2048x32000): a select against the class index fuses into the elementwise pass.
      is_lab = jnp.arange(local_c)[None, :] == idx[:, None]
      return jnp.where(is_lab, d_lab[:, None].astype(logits.dtype), dlogits), None
    dlogits = dlogits.at[rows, idx].set(d_lab.astype(logits.dtype), mode="drop")
    return dlogits, None
  labels_sum, labels = cpu_fusible(labels, labels)
  y = labels.astype(x.dtype)
  if cw is None:
    target = y if not eps else (1.0 - eps) * y + eps / n_cls
    coef = grad_coef(stats, opts, None if opts.tf_grad else sum_target(labels_sum.astype(x.dtype), opts))
  else:
    sum_t, target, _ = weighted_targets(cw[None, :], y, None, psum(jnp.sum(cw), opts), opts, n_cls,
                                        sparse=False)
    coef = grad_coef(stats, opts, sum_t, weighted=True)
  # (the row maxima's entries without cancellation on confident rows: dense_grad)
  m_top, tc = top_scalars(m, log_z, coef)
  dx = g[:, None] * dense_grad(x, m[:, None], softmax(x, m, z), target, coef[:, None],
                               m_top[:, None], tc[:, None])
  dlabels = None
  if want_dlabels:
    # d loss / d y = (1 - eps) * w * (lse - x) = (1 - eps) * w * ((m - x) + log_z)
    gy = (g * (1.0 - eps))[:, None]
    if cw is not None:
      gy = gy * cw[None, :]
    dlabels = (gy * ((m[:, None] - x) + log_z[:, None])).astype(labels.dtype)
  dlogits = (dx * softcap_factor(x, opts)).astype(logits.dtype)
  return dlogits, dlabels


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def autodiff_f64(logits, labels, sparse: bool, opts: XentOptions, class_weight=None):
  """``xla_autodiff`` for float64: the forward of :func:`forward`, with a JVP written from
  :func:`backward`'s tail-exact gradient (JAX's own derivative of the forward computes
  ``softmax - 1`` at a confident row's maximum and rounds ``-sum(tail)`` to 0). Forward mode,
  reverse mode and higher orders (the rule is plain JAX) all see the exact tails; the class
  weight's tangent is :func:`rowmath.class_weight_tangent`."""
  return forward(logits, labels, sparse=sparse, opts=opts, autodiff=True, class_weight=class_weight)


@autodiff_f64.defjvp
def _autodiff_f64_jvp(sparse, opts, primals, tangents):
  logits, labels, cw = primals
  t_logits, t_labels, t_cw = tangents
  loss, stats = autodiff_f64(logits, labels, sparse, opts, cw)
  m, log_z, z = stats
  dlogits, _ = backward(logits, labels, stats, jnp.ones_like(log_z), sparse=sparse,
                        opts=opts, want_dlabels=False, class_weight=cw)
  t_loss = jnp.sum(dlogits * t_logits, axis=-1)
  x = prep_logits(logits, opts)
  p = softmax(x, m, z) * softcap_factor(x, opts)
  # (the statistics' tangents: m moves with the row's maximum, log_z = log sum exp(x - m))
  _, t_m = jax.jvp(lambda v: safe_max(prep_logits(v, opts), opts), (logits,), (t_logits,))
  t_log_z = psum(jnp.sum(jnp.where(p == 0, 0.0, p * t_logits), axis=-1), opts) - t_m
  if not sparse:
    # d loss / d labels = (1 - eps) w (lse - x); at a -inf logit the finite lse - max, as
    # xla_autodiff documents (0 * inf would make every tangent NaN)
    dy = (1.0 - opts.label_smoothing) * jnp.where(jnp.isneginf(x), log_z[:, None],
                                                  (m[:, None] - x) + log_z[:, None])
    if cw is not None:
      dy = dy * cw[None, :]
    t_loss = t_loss + psum(jnp.sum(dy * t_labels.astype(dy.dtype), axis=-1), opts)
  if cw is not None:
    local = labels - class_offset(x.shape[-1], opts) if sparse else labels
    xent = log_z - (gather_label(logits, labels, opts) - m) if sparse else None
    t_loss = t_loss + psum(class_weight_tangent(x, local, stats, t_cw, opts,
                                                num_classes(x.shape[-1], opts), sparse=sparse,
                                                xent=xent), opts)
  # (the tangent of z = exp(log_z) is z * t_log_z)
  return (loss, stats), (t_loss, (t_m, t_log_z, z * t_log_z))
