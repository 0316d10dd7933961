"""Per-row math shared by every kernel (below all of them): the compute dtype and soft-cap, the
vocab-parallel collectives and manual-axis (vma) helpers, the label handling, and the per-row
statistics -> loss / log-sum-exp step that the XLA, chunked, Pallas and linear kernels all end
with. No kernel's code lives here, and this module imports none.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jxent._src.options import XentOptions


def compute_dtype(dtype) -> jnp.dtype:
  """float32 for half types and float32; float64 stays float64."""
  return jnp.promote_types(dtype, jnp.float32)


def prep_logits(logits: jax.Array, opts: XentOptions) -> jax.Array:
  """Upcasts to the compute dtype and applies the soft-cap."""
  x = logits.astype(compute_dtype(logits.dtype))
  if opts.logit_softcap is not None:
    c = opts.logit_softcap
    x = c * jnp.tanh(x / c)
  return x


def softcap_factor(x: jax.Array, opts: XentOptions) -> jax.Array | float:
  """d(capped)/d(logits) given the capped logits ``x``: ``1 - (x / c)**2``."""
  if opts.logit_softcap is None:
    return 1.0
  t = x / opts.logit_softcap
  return 1.0 - t * t


def psum(x, opts: XentOptions):
  return x if opts.axis_name is None else lax.psum(x, opts.axis_name)


def pmax(x, opts: XentOptions):
  return x if opts.axis_name is None else lax.pmax(x, opts.axis_name)


def varying(x) -> set:
  """The manual mesh axes ``x`` varies over (``{V:...}`` in its type); empty outside shard_map."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)  # jax >= 0.10
  if mat is not None and hasattr(mat, "varying"):
    return set(mat.varying)
  return set(getattr(aval, "vma", ()) or ())


def match_vma(ct, like):
  """Gives a cotangent the manual-axis (``shard_map``) type of its primal: sums over the mesh axes
  it varies over and the primal does not (e.g. the data-parallel sum of a weight gradient), and
  marks as varying the axes the primal varies over. Outside ``shard_map`` it returns ``ct``."""
  if ct is None:
    return None
  have, want = varying(ct), varying(like)
  extra, missing = tuple(sorted(have - want)), tuple(sorted(want - have))
  if extra:
    ct = lax.psum(ct, extra)
  if missing:
    ct = lax.pcast(ct, missing, to="varying")
  return ct


def total_cotangent(g, like, opts: XentOptions):
  """The cotangent of a loss replicated over the vocab axis, as the custom VJPs expect it.

  With ``check_vma=True`` (the default) the cotangent of a replicated output arrives whole. With
  ``shard_map(..., check_vma=False)`` JAX splits it among the replicas (each shard gets
  ``g / n``) and relies on the transposes of the forward ``psum``s to add the parts back; the
  custom VJPs have no such transposes, so they add the parts here. ``like`` is an input sharded
  over ``axis_name``: without manual-axis types it does not vary over it.
  """
  if opts.axis_name is None or opts.axis_name in varying(like):
    return g
  return lax.psum(g, opts.axis_name)


def zero_ignored(labels, g, opts: XentOptions):
  """``g`` with 0 where the integer label is ``ignore_index`` (shapes that broadcast; in XLA and
  inside the Pallas kernels)."""
  if opts.ignore_index is None:
    return g
  return jnp.where(labels == opts.ignore_index, 0.0, g)


def local_rows(labels, g, opts: XentOptions, local_c: int):
  """Vocab parallel, integer labels: ``(labels as this shard's class ids, g with the
  ignore_index rows zeroed)``; ``ignore_index`` compares the global ids. ``g`` may be None."""
  if g is not None:
    g = zero_ignored(labels, g, opts)
  return labels - class_offset(local_c, opts), g


def sum_target(y, opts: XentOptions):
  """Per-row sum of the (smoothed) target over all the classes: ``(1 - eps) * sum(y) + eps``."""
  s = psum(jnp.sum(y, axis=-1), opts)
  eps = opts.label_smoothing
  return s if not eps else (1.0 - eps) * s + eps


def check_whole_rows(opts: XentOptions) -> None:
  """The fused (gradient-in-forward) kernels need whole rows: not with ``axis_name``."""
  if opts.axis_name is not None:
    raise ValueError("the fused kernel needs whole rows; with axis_name the loss uses the "
                     "forward and backward kernels.")


def empty_rows(logits, labels, *, sparse: bool, want_dlabels: bool, fused: bool = False):
  """The outputs of a kernel call on zero rows (Pallas grids cannot be empty): ``(loss, stats)``,
  or ``(loss, dlogits, dlabels)`` when ``fused``; with ``want_dlabels`` also for dense labels."""
  loss = jnp.zeros((0,), jnp.float32)
  dlogits = jnp.zeros(logits.shape, logits.dtype)
  dlabels = None if (sparse or not want_dlabels) else jnp.zeros(labels.shape, labels.dtype)
  return (loss, dlogits, dlabels) if fused else (loss, (loss, loss, loss))


def out_struct(shape, dtype, like) -> jax.ShapeDtypeStruct:
  """A kernel output's ``ShapeDtypeStruct`` with the ``shard_map`` manual-axis type of ``like``
  (required for ``pallas_call`` outputs when ``check_vma`` is on); a plain one elsewhere."""
  mat = getattr(jax.typeof(like), "manual_axis_type", None)
  if mat is not None:
    try:
      return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
    except TypeError:  # a JAX without the keyword
      pass
  vma = getattr(jax.typeof(like), "vma", None)
  if vma:
    return jax.ShapeDtypeStruct(shape, dtype, vma=vma)
  return jax.ShapeDtypeStruct(shape, dtype)


def num_classes(local_c: int, opts: XentOptions):
  """Global number of classes (static when not sharded)."""
  if opts.axis_name is None:
    return local_c
  return local_c * lax.axis_size(opts.axis_name)


def class_offset(local_c: int, opts: XentOptions):
  """Global id of this shard's first class."""
  if opts.axis_name is None:
    return 0
  return lax.axis_index(opts.axis_name) * local_c


def safe_max(x: jax.Array, opts: XentOptions) -> jax.Array:
  """Row max over the (global) class axis; an all ``-inf`` row gives 0 instead of ``-inf``."""
  m = pmax(jnp.max(x, axis=-1), opts)
  return jnp.where(jnp.isneginf(m), 0.0, m).astype(x.dtype)


def top_scalars(m, log_z, coef, *, mosaic: bool = False):
  """Per-row ``(m_top, tc)`` for :func:`dense_grad`: the row max where its softmax is above 1/2
  (``log_z < log 2``; NaN elsewhere, which no entry equals) and ``tc = coef * (p_max - 1) =
  coef * expm1(-log_z)``, exact however small ``1 - p_max`` is (``mosaic``: see
  :func:`expm1`)."""
  m_top = jnp.where(log_z < 0.6931471805599453, m, jnp.nan)  # log 2
  return m_top, coef * expm1(-log_z, mosaic=mosaic)


def dense_grad(x, m, p, target, coef, m_top, tc):
  """``coef * softmax - target`` (dense labels) with the row maxima's entries free of
  cancellation: there ``softmax = 1 / z`` and the entry is ``tc + (coef - target)``
  (:func:`top_scalars`), so a confident one-hot row keeps its tiny ``-sum(tail) / z`` (``p - 1``
  rounds it to the ulp of 1: the naive formula's 1540 ulps). Only where the maximum's ``p > 1/2``
  (``m_top``): below, ``tc`` is near ``-coef`` and adding ``coef - target`` back would cancel (a
  common logit: 423 ulps). An exact 0 there is +0, as in TF. ``coef * p * (x - m)`` (0 there)
  is added for its derivative: JAX's derivative of this gradient (a Hessian) then has the
  maximum's own ``p`` term, which ``tc`` (a function of ``log_z`` only) leaves out where ``m``
  carries no derivative. Every argument broadcasts against ``x``."""
  at_top = (tc + (coef - target)) + coef * p * (x - m)
  at_top = jnp.where(at_top == 0, 0.0, at_top)  # (not `+ 0.0`, which XLA folds away)
  return jnp.where(x == m_top, at_top, coef * p - target)


def merged_tail(m, t, mg, total):
  """The tail ``u = sum(exp(x - mg)) - 1`` of a row from its parts (blocks, groups, segments or
  vocab shards) with maxima ``m`` and tails ``t`` (each part's ``sum(exp(x - m)) - 1``, exact:
  :func:`block_tail`), merged at the row max ``mg`` without rounding ``u`` to the ulp of 1: the
  parts holding the row max add their tails, the others their rescaled sums ``(t + 1) * exp(m -
  mg)``, and each maximum beyond the first adds 1. ``total`` sums over the parts (``jnp.sum``
  along their axis, or :func:`psum`). A row of ``-inf`` gives -1."""
  top = m == mg
  tails = total(jnp.where(top, t, (t + 1.0) * exp_diff(m, mg)))
  return tails + (total(jnp.where(top, 1.0, 0.0).astype(t.dtype)) - 1.0)


def block_tail(z, zc):
  """A part's tail ``sum(exp(x - m)) - 1`` from its compensated sum ``z + zc``
  (:func:`add_rescaled`) in which the maxima entered as whole counts: ``(z - 1) + zc``, exact
  where ``z`` is 1 plus a tail (-1 for a part of ``-inf``)."""
  return (z - 1.0) + zc


def exp_diff(a, b):
  """``exp(a - b)`` with the rounding of ``a - b`` corrected (Knuth's TwoSum), for the rescaling
  of a sum of exponentials from one max to another (``a``, ``b`` per-row scalars).

  ``a - b`` rounds to the ulp of ``|a - b|`` (2^-20 at a difference of 20), which multiplies
  every term rescaled by it by up to ``1 +- 2^-20`` (8 ulps); ``exp(d) * (1 + err)`` is exact to
  the first order. A non-finite ``a`` or ``b`` gives ``exp(a - b)`` itself.
  """
  d = a - b
  bv = d - a
  err = (a - (d - bv)) + (-b - bv)
  # (|err| < inf is isfinite, in a form every Pallas backend lowers: Mosaic GPU has no is_finite)
  return jnp.exp(d) * (1.0 + jnp.where(jnp.abs(err) < jnp.inf, err, 0.0))


def add_rescaled(z0, c0, e0, z1, e1):
  """``z0 * e0 + z1 * e1`` with a running compensation ``c`` (Knuth's TwoSum): ``(z, c)``, the
  sum being ``z + c``.

  An online sum of exponentials holds its largest term (1 at the max) from the block that has
  it on; a later block's terms, each below half an ulp of the running sum, would then round
  away one by one (a confidently wrong row's tail of 1e-5 came out 70 % short in blocks of 16:
  60 ulps of the sum). The compensation keeps what each addition rounds off."""
  a, b = z0 * e0, z1 * e1
  z = a + b
  bv = z - a
  return z, c0 * e0 + ((a - (z - bv)) + (b - bv))


def stats_of(m, log_z, z):
  """A kernel's row statistics ``(m, log_z, z)`` from the row max ``m``, ``log_z =
  log(sum(exp(x - m)))`` and that sum ``z`` itself (1 for a row of ``-inf``, whose softmax is
  then ``0 / 1`` instead of ``0 / 0``).

  The sum is kept beside ``log_z`` because ``exp(-log_z)`` adds the rounding of ``log_z`` (up
  to 2 ulps of ``p`` at ``log_z`` near 8): ``exp(x - m) / z`` is the naive formula's softmax.
  """
  return m, log_z, jnp.where(z == 0, 1.0, z)


def softmax(x, m, z):
  """``softmax(x)`` of rows ``x [R, C]`` from their statistics: ``exp(x - m) / z``.

  Shift invariant: nothing is subtracted from ``x`` but the row max. An absolute log-sum-exp
  ``lse = m + log_z`` rounds away the low digits of ``x - lse`` when ``|lse|`` is large (at a
  common logit of 2^24 it gives ``p = 1``), and ``exp(x - lse)`` rounds ``x - lse`` to the ulp
  of ``|x - lse|`` (8 ulps of ``p`` at ``|x - lse|`` near 16).
  """
  return jnp.exp(x - m[:, None]) / z[:, None]


def expm1(a, *, mosaic: bool = False):
  """``exp(a) - 1`` without cancellation near 0; ``mosaic``: from ``exp`` and ``log`` (Kahan's
  ``(y - 1) * a / log(y)``, within 2 ulps), for Pallas on Mosaic TPU, which lowers no ``expm1``."""
  if not mosaic:
    return jnp.expm1(a)
  y = jnp.exp(a)
  ym1 = y - 1.0
  safe = jnp.where((ym1 == 0) | (ym1 == -1.0) | ~jnp.isfinite(y), 1.0, ym1)
  kahan = ym1 * a / jnp.log(jnp.where(safe == 1.0, 2.0, y))
  return jnp.where(ym1 == 0, a, jnp.where((ym1 == -1.0) | ~jnp.isfinite(y), ym1, kahan))


def label_log_z(t, x_lab, m, *, mosaic: bool = False):
  """``log_z = log(sum(exp(x - m)))`` from ``t``, the sum without the label's term, and the
  label's logit ``x_lab``: ``log1p(t + expm1(x_lab - m))``. When the label is the maximum this
  is ``log1p(t)``, exact however small ``t`` is (``log(1 + t)`` rounds ``t`` to the ulp of 1: a
  confident row's loss and its ``p_y - 1 = expm1(-log_z)`` lose every digit below 6e-8); its
  derivative in ``x_lab`` stays ``p_y`` (``xla_autodiff``). A row of ``-inf`` gives ``-inf``."""
  return jnp.log1p(t + expm1(x_lab - m, mosaic=mosaic))


def grad_coef(stats, opts: XentOptions, sum_t=None, *, weighted: bool = False):
  """The softmax's factor in the gradient, ``1 + 2 z_loss lse`` (z-loss), plus ``sum(target) -
  1`` for dense labels whose rows do not sum to 1 (``sum_t``; not with ``tf_grad``). With
  ``weighted`` (a class weight) it is ``sum_t + 2 z_loss lse``, ``sum_t`` taken as it is."""
  zl = 2.0 * opts.z_loss * lse_of(stats) if opts.z_loss else None
  if weighted:
    return sum_t if zl is None else sum_t + zl
  coef = 1.0 + zl if zl is not None else jnp.ones_like(stats[1])
  if sum_t is not None and not opts.tf_grad:
    coef = coef + (sum_t - 1.0)
  return coef


def label_grad(x_lab, stats, coef, opts: XentOptions, n_classes, *, mosaic: bool = False,
               t_lab=None):
  """The label's gradient entry per row (integer labels), before the cotangent and the soft-cap
  factor: ``coef * p_y - target_y = coef * expm1(log p_y) + (coef - target_y)`` with ``log p_y =
  (x_y - m) - log_z``: on a confident row ``p_y - 1`` is ``-t / (1 + t)`` to the last bit
  instead of a difference of two numbers near 1. ``t_lab``: the label's target where a class
  weight scales it (:func:`weighted_targets`); else ``1 - eps + eps / C``."""
  m, log_z, _ = stats
  eps = opts.label_smoothing
  if t_lab is None:
    t_lab = (1.0 - eps) + (eps / n_classes if eps else 0.0)
  d = coef * expm1((x_lab - m) - log_z, mosaic=mosaic) + (coef - t_lab)
  return jnp.where(jnp.isneginf(log_z), 0.0, d)  # (a row of -inf: its cotangent brings the NaN)


def fused_weights(w, stats):
  """The fused kernels' row weights with NaN on rows of ``-inf`` logits whose weight is not 0
  (the unfused path's :func:`nan_rows`, for the gradient formed in the forward pass)."""
  return jnp.where(jnp.isneginf(stats[1]) & (w != 0), jnp.nan, w)


def lse_of(stats):
  """The absolute log-sum-exp ``m + log_z`` of a kernel's row statistics (the z-loss and the
  reports; never subtracted from the logits)."""
  return stats[0] + stats[1]


def combine(m, log_z, xent, sum_s, opts: XentOptions, n_classes, wsum=None):
  """Per-row loss from the per-row statistics (shared by the XLA and chunked kernels).

  ``xent`` is the plain cross-entropy term, ``sum(y * (lse - x))``: with ``s = x - m`` (capped,
  upcast logits minus the row max) it is ``log_z * sum(y) - sum(y*s)`` for dense labels and
  ``log_z - s[label]`` for integer ones. Label smoothing mixes in ``log_z - sum(s)/C``, and the
  z-loss adds ``z * lse**2``. With a class weight ``w`` (``wsum = sum(w)``, over every class)
  ``xent`` is the weighted term and ``sum_s = sum(w * s)``: the smoothing term is ``(wsum *
  log_z - sum_s) / C``.
  """
  eps = opts.label_smoothing
  loss = xent
  if eps:
    smooth = log_z - sum_s / n_classes if wsum is None else (wsum * log_z - sum_s) / n_classes
    loss = (1.0 - eps) * loss + eps * smooth
  if opts.z_loss:
    lse = m + log_z
    loss = loss + opts.z_loss * lse * lse
  return loss


def loss_from_stats(m, z, a, b, sum_x, labels, *, sparse: bool, opts: XentOptions, local_c: int,
                    mosaic: bool = False, weights=None, sum_w=None):
  """Per-row ``(loss, stats)`` from a row's online statistics over this shard's classes
  (``stats``: :func:`stats_of`).

  ``m`` is the running max, ``sum_x = sum(x)`` (label smoothing only). ``z`` is the sum of
  exponentials ``sum(exp(x - m))`` less one term, so that it holds no 1 whose ulp would round a
  confident row's tail away: dense, less one maximum's 1 (:func:`block_tail`; ``log_z =
  log1p(z)``); sparse, less the label's term (:func:`label_log_z`). Dense: ``a = sum(y)``, ``b
  = sum(y * (x - m))``; sparse: ``b`` is the label's logit (0 when the label is not among this
  shard's classes). With ``axis_name`` the shards' statistics are merged first (rescaled to the
  global max; :func:`merged_tail`). Shared by the chunked and Pallas kernels (``mosaic``: inside
  a Mosaic TPU kernel, see :func:`expm1`). With a class weight ``w``, ``weights = (w_y,
  sum(w))`` (:func:`class_weight_rows`; ``w_y`` per row, integer labels), ``sum_x = sum(w * x)``
  and, dense, ``a``, ``b`` are of ``w * y``. With ``sum_w`` (this shard's ``sum(w)``, or its
  class count) ``sum_x`` is ``sum(w * (x - m))`` instead, shift invariant (``sum(w * x) - sum(w)
  * m`` cancels at a large logit offset).
  """
  if opts.axis_name is not None:
    mg = pmax(m, opts)
    if sparse:
      z = psum(z * exp_diff(m, mg), opts)
      b = psum(b, opts)
    else:
      z = merged_tail(m, z, mg, lambda v: psum(v, opts))
      a, b = psum((a, b + (m - mg) * a), opts)
    if opts.label_smoothing:
      sum_x = psum(sum_x if sum_w is None else sum_x + (m - mg) * sum_w, opts)
    m = mg
  n_cls = num_classes(local_c, opts)
  w_y, wsum = (None, None) if weights is None else weights
  sum_s = None
  if opts.label_smoothing:
    sum_s = sum_x if sum_w is not None else sum_x - (n_cls if wsum is None else wsum) * m
  if sparse:
    log_z = label_log_z(z, b, m, mosaic=mosaic)
    xent = log_z - (b - m)
    loss = combine(m, log_z, xent if w_y is None else w_y * xent, sum_s, opts, n_cls, wsum)
    return finish_sparse(loss, labels, n_cls, opts), stats_of(m, log_z, z + jnp.exp(b - m))
  log_z = jnp.log1p(z)
  return combine(m, log_z, log_z * a - b, sum_s, opts, n_cls, wsum), stats_of(m, log_z, z + 1.0)


def class_weight_rows(class_weight, labels, opts: XentOptions, *, sparse: bool):
  """``(w_y [R] or None, wsum)`` of a class weight ``w`` (this shard's ``[C]``, float32 or
  float64): the label's weight per row (integer labels; 0 for a label out of range, whose loss
  is NaN anyway) and ``sum(w)`` over every class (the smoothing term's mass)."""
  c = class_weight.shape[0]
  wsum = psum(jnp.sum(class_weight), opts)
  if not sparse:
    return None, wsum
  local = labels - class_offset(c, opts)
  hit = (local >= 0) & (local < c)
  w_y = psum(jnp.where(hit, class_weight[jnp.clip(local, 0, c - 1)], 0.0), opts)
  return w_y, wsum


def weighted_targets(class_weight, y, w_y, wsum, opts: XentOptions, n_classes, *, sparse: bool):
  """The gradient's targets under a class weight ``w``: ``(sum_t [R], target, t_lab)``. Integer
  labels: ``sum_t = (1 - eps) w_y + eps * wsum / C``, ``target = (eps / C) * w [C]`` for every
  class (None without smoothing, or when ``class_weight`` is None: a kernel scales its own
  block) and the label's own ``t_lab = ((1 - eps) + eps / C) * w_y``. Dense (``y [R, C]``,
  ``t_lab`` None): ``target = w * ((1 - eps) y + eps / C)``, ``sum_t`` its row sum (``(1 -
  eps) * sum(w y) + eps * wsum / C``, over every shard)."""
  eps = opts.label_smoothing
  if sparse:
    sum_t = (1.0 - eps) * w_y + (eps * wsum / n_classes if eps else 0.0)
    target = (eps / n_classes) * class_weight if (eps and class_weight is not None) else None
    t_lab = ((1.0 - eps) + (eps / n_classes if eps else 0.0)) * w_y
    return sum_t, target, t_lab
  wy = class_weight * y
  sum_t = psum(jnp.sum(wy, axis=-1), opts)
  if eps:
    sum_t = (1.0 - eps) * sum_t + eps * wsum / n_classes
    wy = (1.0 - eps) * wy + (eps / n_classes) * class_weight
  return sum_t, wy, None


def grad_scalars(labels, stats, opts: XentOptions, n_classes, *, sparse: bool,
                 class_weight=None):
  """``(coef [R], t_lab [R] or None)``: the gradient's per-row scalars that a kernel's backward
  walk takes (:func:`grad_coef`; ``t_lab``, the label's target under a class weight, for
  :func:`label_grad`). ``labels``: the global ones (integer) or ``[R, C]`` (dense);
  ``class_weight``: this shard's ``[C]`` or None."""
  if class_weight is None:
    sum_t = None if sparse or opts.tf_grad else sum_target(labels.astype(jnp.float32), opts)
    return grad_coef(stats, opts, sum_t), None
  cw = class_weight.astype(jnp.float32)
  w_y, wsum = class_weight_rows(cw, labels, opts, sparse=sparse)
  sum_t, _, t_lab = weighted_targets(None if sparse else cw[None, :],
                                     None if sparse else labels.astype(jnp.float32), w_y, wsum,
                                     opts, n_classes, sparse=sparse)
  return grad_coef(stats, opts, sum_t, weighted=True), t_lab


def class_weight_tangent(x, labels, stats, t_w, opts: XentOptions, n_classes, *, sparse: bool,
                         xent=None):
  """The per-row tangent ``sum_c d loss / d w_c * t_w[c]`` of the loss in the class weight, over
  the classes of ``x [R, B]`` (capped logits: a block or a shard of the classes; the caller sums
  the parts). Linear in ``t_w [B]``: its transpose (``jax.linear_transpose``) is ``d loss / d w``
  for these classes. ``stats`` are the rows' :func:`stats_of`. Integer labels (``labels`` local
  to the block, ``xent = lse - x_y`` per row): ``(1 - eps) * xent * t_w[y] + (eps / C) *
  sum_c (lse - x_c) t_w[c]``; dense (``labels [R, B]``): ``sum_c l'_c (lse - x_c) t_w[c]`` with
  the smoothed labels ``l'`` (a zero label at a ``-inf`` logit adds 0). XLA code, for the
  derivative in ``class_weight`` only."""
  m, log_z, _ = stats
  eps = opts.label_smoothing
  gap = (m[:, None] - x) + log_z[:, None]  # lse - x, shift invariant
  if sparse:
    b = x.shape[-1]
    hit = (labels >= 0) & (labels < b)
    out = (1.0 - eps) * xent * jnp.where(hit, t_w[jnp.clip(labels, 0, b - 1)], 0.0)
    if eps:
      out = out + (eps / n_classes) * jnp.sum(gap * t_w[None, :], axis=-1)
    return out
  y = labels.astype(x.dtype)
  if eps:
    y = (1.0 - eps) * y + eps / n_classes
  return jnp.sum(jnp.where(y == 0, 0.0, y * gap) * t_w[None, :], axis=-1)


def class_weight_grad(x, labels, stats, g, class_weight, opts: XentOptions, n_classes, *,
                      sparse: bool, xent=None):
  """``d sum(g * loss) / d w`` for the classes of ``x``: the transpose of
  :func:`class_weight_tangent` (same arguments; ``g [R]`` the rows' cotangents)."""
  tangent = lambda t: class_weight_tangent(x, labels, stats, t, opts, n_classes, sparse=sparse,
                                           xent=xent)
  out = jax.eval_shape(tangent, class_weight)
  # (under shard_map the rows' tangent varies over the axes of x: so must its cotangent)
  return jax.linear_transpose(tangent, class_weight)(match_vma(g.astype(out.dtype), out))[0]


def local_label(logits: jax.Array, labels: jax.Array, opts: XentOptions):
  """``(cap(logits[r, local[r]]), local, in_shard)`` for global class ids ``labels``.

  Gathers from the raw logits, so no ``[R, C]`` intermediate is shared with the reductions."""
  local_c = logits.shape[-1]
  local = labels - class_offset(local_c, opts)
  in_shard = (local >= 0) & (local < local_c)
  picked = jnp.take_along_axis(logits, jnp.clip(local, 0, local_c - 1)[:, None], axis=-1)[:, 0]
  return prep_logits(picked, opts), local, in_shard


def gather_label(logits: jax.Array, labels: jax.Array, opts: XentOptions) -> jax.Array:
  """The label's capped, upcast logit, combined over shards."""
  x_lab, _, in_shard = local_label(logits, labels, opts)
  return psum(jnp.where(in_shard, x_lab, 0.0), opts)


def ignored_rows(labels: jax.Array, opts: XentOptions):
  if opts.ignore_index is None:
    return None
  return labels == opts.ignore_index


def finish_sparse(loss, labels, n_classes, opts: XentOptions):
  """NaN for labels outside ``[0, n_classes)``, then 0 for ``ignore_index`` rows.

  The NaN is a factor of the loss, not a select, so that JAX's own derivative of it
  (``xla_autodiff``) is NaN on that row too, as the custom VJPs make it (:func:`nan_rows`)."""
  ok = (labels >= 0) & (labels < n_classes)
  if opts.ignore_index is not None:
    ok = ok | (labels == opts.ignore_index)
  loss = loss * jnp.where(ok, jnp.ones_like(loss), jnp.full_like(loss, jnp.nan))
  return zero_ignored(labels, loss, opts)


def nan_rows(g, labels, log_z, *, sparse: bool, opts: XentOptions, local_c: int):
  """The cotangent with NaN on the rows whose loss is NaN by construction, where it is not 0.

  Those rows are the ones with an integer label outside ``[0, C)`` (not ``ignore_index``; TF on
  GPU) and the rows whose logits are all ``-inf`` (``log_z = -inf``; TF and optax): their gradient
  row is then NaN too, instead of a finite row that hides the fault. Rows with a zero cotangent
  (masked by ``where``, ignored) keep a zero gradient.
  """
  bad = jnp.isneginf(log_z)
  if sparse:
    bad = bad | (labels < 0) | (labels >= num_classes(local_c, opts))
    if opts.ignore_index is not None:
      bad = bad & (labels != opts.ignore_index)
  return jnp.where(bad & (g != 0), jnp.nan, g)


def merge_stats(m, z, a, b, sum_x, *, sparse: bool):
  """Merges row statistics ``[..., S]`` of S segments of each row (as :func:`loss_from_stats`
  merges vocab shards, without collectives): rescaled to the row max. ``m`` is finite."""
  mg = jnp.max(m, axis=-1)
  if sparse:
    z = jnp.sum(z * exp_diff(m, mg[..., None]), axis=-1)
    b = jnp.sum(b, axis=-1)
  else:
    z = merged_tail(m, z, mg[..., None], lambda v: jnp.sum(v, axis=-1))
    a, b = jnp.sum(a, axis=-1), jnp.sum(b + (m - mg[..., None]) * a, axis=-1)
  return mg, z, a, b, jnp.sum(sum_x, axis=-1)


def fold_blocks(step, size: int, block: int, state, *, peel: bool = True):
  """``state = step(start, block_size, state)`` over ``[0, size)`` in blocks of ``block``.

  With ``peel`` the first block is peeled off the loop so that the carry takes the sharding type
  (under ``shard_map``) of what the blocks produce; a single block is always a straight step, and
  the last, shorter block is a static step.
  """
  nb, tail = divmod(size, block)
  first = 1 if nb and (peel or nb == 1) else 0  # blocks before the loop
  if first:
    state = step(0, block, state)
  if nb > first:
    state = lax.fori_loop(first, nb, lambda i, st: step(i * block, block, st), state)
  if tail:
    state = step(nb * block, tail, state)
  return state
