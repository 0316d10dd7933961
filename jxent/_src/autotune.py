"""The autotuner: the top of the package. It times candidate implementations for one call shape on
this device and stores them in the user cache (:mod:`jxent._src.configs`), which
``implementation=None`` then reads. It imports the losses it times (:mod:`jxent._src.api`,
:mod:`jxent._src.linear`) and the registry, never the ``jxent`` package; nothing below imports
it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jxent._src import api, configs, dispatch, linear


def chosen_implementation(op: str, shape, dtype, *, labels: str = "int",
                          reduction: Optional[str] = "mean", memory_budget: Optional[int] = None,
                          **options):
  """``(kernel, source)``: what ``implementation=None`` uses for such a call, and where the
  choice came from (``"user cache"``, ``"shipped:<file>"`` or ``"heuristic"``).

  Example:
    >>> import jxent
    >>> kernel, source = jxent.chosen_implementation("xent", (8, 1000), "float32")
    >>> kernel.name, source
    ('xla', 'heuristic')
  """
  key = configs.make_key(op, shape, dtype, labels=labels, reduction=reduction, **options)
  if op == "linear":
    return linear.tuned_algorithm(key, memory_budget)
  return dispatch.tuned_kernel(key, labels == "int", tuple(shape), dtype)


# ------------------------------------------------------------------------------------------------
# Candidates.
# ------------------------------------------------------------------------------------------------
# The longest row tried as one block (32768 float32 values: 32 per thread at 32 warps).
ONE_LOAD_MAX_CLASSES = 32768


def one_block(classes: int) -> int:
  """The Triton ``block_c`` that holds a whole row of ``classes`` (a power of two, >= 16)."""
  return max(16, 1 << (int(classes) - 1).bit_length())


def _candidates(op: str, shape, reduction) -> list:
  plat = dispatch.platform()
  if op == "linear":
    cands = [linear.LinearChunked(block_v=b) for b in (1024, 2048, 4096)]
    if reduction in ("mean", "sum"):
      cands += [linear.LinearFusedGrad(block_n=b, dw_accumulation=a) for b in (256, 512, 1024)
                for a in ("float32", "weights")]
    return cands + ["unfused"]
  cands = [dispatch.XlaKernel()] + [dispatch.ChunkedXlaKernel(block=b) for b in (1024, 4096, 16384)
                                    if b < shape[1]]
  if plat in ("gpu", "cuda"):
    k = dispatch.kernel_class("pallas_triton")
    cands += [k()] + [k(block_c=bc, num_warps=nw, row_groups=g) for bc, nw in ((4096, 8),
                                                                               (8192, 8))
                      for g in (1, 64)]
    if reduction not in ("mean", "sum"):  # (the split-row forward: per-row losses only)
      cands += [k(split_rows=s, block_c=4096, num_warps=8) for s in (2, 4, 8)]
    elif shape[1] > ONE_LOAD_MAX_CLASSES:
      # the fused kernel's gradient walk from the row's last block (the likeliest in L2)
      cands += [k(block_c=4096, num_warps=8, row_groups=64, reverse_grad=True)]
    else:
      # The whole row as one block: the fused kernel reads it once for the loss and the gradient
      # (two passes over HBM instead of three), if the compiler keeps it in registers.
      cands += [k(block_c=one_block(shape[1]), num_warps=nw) for nw in (8, 16, 32)]
    # Mosaic GPU (the backend JAX keeps): class tiles of 128 or 256, 2 to 4 TMA copies in flight;
    # tried where this jax builds it (never the default until measured at least as fast)
    m = dispatch.kernel_class("pallas_mosaic_gpu")
    if m().unavailable(configs.abstract_device()) is None:
      cands += [m(block_c=bc, max_concurrent_steps=s) for bc in (128, 256) for s in (2, 4)]
  if plat == "tpu":
    k = dispatch.kernel_class("pallas_mosaic_tpu")
    cands += [k(), k(block_r=128, block_c=4096)]
  return cands


# ------------------------------------------------------------------------------------------------
# Timing and the sweep.
# ------------------------------------------------------------------------------------------------
def describe(kernel) -> dict:
  """``{"implementation", "params"}`` of a kernel or linear algorithm object (the parameters that
  differ from its defaults), or of a name such as ``"unfused"``: a candidate's identity."""
  if isinstance(kernel, str):
    return dict(implementation=kernel, params={})
  fields = {f.name: getattr(kernel, f.name) for f in dataclasses.fields(kernel)
            if f.name != "interpret"}
  defaults = type(kernel)()
  params = {k: v for k, v in fields.items() if v != getattr(defaults, k)}
  return dict(implementation=kernel.name, params=params)


def _loss_fn(op, kernel, labels, reduction, options):
  if op == "linear":
    return lambda x, w, y: linear.linear_softmax_cross_entropy(
        x, w, y, reduction=reduction, implementation=kernel, **options).astype(jnp.float32).sum()
  fn = (api.softmax_cross_entropy_with_integer_labels if labels == "int" else
        api.softmax_cross_entropy)
  return lambda x, y: fn(x, y, reduction=reduction, implementation=kernel,
                         **options).astype(jnp.float32).sum()


def _inputs(op, shape, dtype, labels, seed):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  if op == "linear":
    n, d, v = shape
    return (jax.random.normal(k1, (n, d), jnp.float32).astype(dtype),
            (jax.random.normal(k3, (d, v), jnp.float32) * d ** -0.5).astype(dtype),
            jax.random.randint(k2, (n,), 0, v))
  r, c = shape
  x = (jax.random.normal(k1, (r, c), jnp.float32) * 3).astype(dtype)
  ids = jax.random.randint(k2, (r,), 0, c)
  return (x, ids if labels == "int" else jax.nn.one_hot(ids, c, dtype=dtype))


def _rel(a, b) -> float:
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  if not np.all(np.isfinite(a)):
    return float("inf")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _median_ms(fn, arg_sets, reps: int) -> float:
  for args in arg_sets[:2]:
    jax.block_until_ready(fn(*args))
  times = []
  for i in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3


def autotune(op: str, shape, dtype, *, labels: str = "int", reduction: Optional[str] = "mean",
             memory_budget: Optional[int] = None, reps: int = 10, force: bool = False,
             candidates: Optional[list] = None, **options) -> dict:
  """Times the candidates for one call shape on this device and stores them in the user cache.

  Each candidate's loss and gradients are first checked against ``"xla"`` (``unfused`` for
  linear); a wrong one is discarded and recorded. Then ``jit(value_and_grad)`` is timed
  (device-synchronised, median of ``reps``, two rotated input sets) and its compiled
  temporaries recorded. The entry (all viable candidates, or none) is merged into the cache
  atomically; :func:`chosen_implementation` and ``implementation=None`` then use the fastest
  one within the memory budget. A key already in the cache is not swept again unless ``force``.

  Args:
    op: ``"xent"`` with ``shape=(rows, classes)`` or ``"linear"`` with ``shape=(N, D, V)``.
    shape, dtype: the call's shape and logits (or activations) dtype.
    labels: ``"int"`` or ``"dense"``.
    reduction: the loss's reduction.
    memory_budget: bytes; candidates above it are still stored, but not chosen (linear).
    reps: timed samples per candidate.
    force: sweep even if the key is cached.
    candidates: implementation objects to try instead of the built-in list.
    **options: the loss's own options (``label_smoothing``, ``z_loss``, ``logit_softcap``).

  Returns:
    ``{"key", "source", "winner", "candidates", "rejected"}``.

  Example:
    >>> import jxent, tempfile, os
    >>> os.environ["JXENT_CACHE_DIR"] = tempfile.mkdtemp()
    >>> res = jxent.autotune("xent", (64, 512), "float32", reps=3)
    >>> jxent.chosen_implementation("xent", (64, 512), "float32")[1]
    'user cache'
    >>> del os.environ["JXENT_CACHE_DIR"]
  """
  if isinstance(jnp.zeros(()), jax.core.Tracer):
    raise RuntimeError("jxent.autotune cannot run inside a jit (or other) trace: call it "
                       "before, outside the traced function.")
  if memory_budget is not None and not memory_budget > 0:
    raise ValueError(f"memory_budget must be > 0 bytes, got {memory_budget}.")
  key = configs.make_key(op, shape, dtype, labels=labels, reduction=reduction, **options)
  path = configs.cache_path()
  if not force and key in configs.read_entries(path):
    cand = configs.pick(configs.read_entries(path)[key], memory_budget)
    return dict(key=key, source="user cache", winner=cand,
                candidates=configs.read_entries(path)[key].get("candidates", []), rejected=[])
  sets = [_inputs(op, tuple(shape), dtype, labels, s) for s in range(2)]
  argnums = (0, 1) if op == "linear" else (0,)
  ref_impl = "unfused" if op == "linear" else "xla"
  ref = jax.jit(jax.value_and_grad(_loss_fn(op, ref_impl, labels, reduction, options),
                                   argnums=argnums))(*sets[0])
  tol = 2e-2 if jnp.dtype(dtype).itemsize < 4 else 1e-4
  good, rejected = [], []
  for kernel in candidates if candidates is not None else _candidates(op, shape, reduction):
    desc = describe(kernel)
    try:
      f = jax.jit(jax.value_and_grad(_loss_fn(op, kernel, labels, reduction, options),
                                     argnums=argnums))
      compiled = f.lower(*sets[0]).compile()
      val, grads = compiled(*sets[0])
      err = max([_rel(val, ref[0])] + [_rel(a, b) for a, b in zip(grads, ref[1])])
      if not err <= tol:
        rejected.append(dict(desc, reason=f"wrong: relative error {err:.3g} > {tol}"))
        continue
      try:
        temp = int(compiled.memory_analysis().temp_size_in_bytes)
      except Exception:  # noqa: BLE001  (not every backend reports it)
        temp = None
      good.append(dict(desc, ms=_median_ms(compiled, sets, reps), temp_bytes=temp,
                       rel_err=err))
    except Exception as e:  # noqa: BLE001  (a candidate that fails is recorded, not fatal)
      rejected.append(dict(desc, reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
  entry = dict(candidates=good, rejected=rejected, date=time.strftime("%Y-%m-%d"),
               jax=jax.__version__)
  try:
    configs.write_entries(path, {key: entry}, device_kind=configs.device_kind())
  except OSError as e:
    warnings.warn(f"jxent.autotune: could not write the cache {path} ({e}); the result is "
                  f"returned but not stored.", stacklevel=2)
  return dict(key=key, source="tuned", winner=configs.pick(entry, memory_budget), candidates=good,
              rejected=rejected)
