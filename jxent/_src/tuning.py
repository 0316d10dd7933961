"""Tuned choices as data: per-device config files, a user cache, and the autotuner.

A *key* is ``(op, labels, dtype, reduction, options, bucket)``:

* ``op``: ``"xent"`` (logits ``[rows, classes]``) or ``"linear"`` (``x [N, D] @ w [D, V]``);
* ``labels``: ``"int"`` or ``"dense"`` (``"int"`` for linear);
* ``reduction``: ``"scalar"`` (``"mean"``/``"sum"``: the fused kernels apply) or ``"rows"``;
* ``options``: the options that change a kernel (``label_smoothing``, ``z_loss``,
  ``logit_softcap`` present or not), as a sorted string, ``""`` for none;
* ``bucket``: each dimension rounded up to a power of two.

An *entry* holds the measured candidates of a key, ``[{implementation, params, ms, temp_bytes}]``
(``[]`` when none was viable: such a key is not swept again). The choice is the fastest candidate
whose compiled temporaries fit the memory budget.

Lookup order (:func:`lookup`): the user's cache (``$JXENT_CACHE_DIR`` or ``~/.cache/jxent``,
one file per device kind), the shipped file for this device kind (``jxent/_src/configs/``), then
the heuristic (``None``: the caller's default). A miss never raises and never tunes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import statistics
import tempfile
import time
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
OPS = ("xent", "linear")
ALGORITHM_NAMES = ("linear_chunked", "linear_fused_grad", "unfused")
FALLBACK_MEMORY_BUDGET = 4 << 30  # bytes, where the device does not report its memory


def default_memory_budget(device=None) -> int:
  """The linear choice's default budget of compiled temporaries: a quarter of the device's
  memory where it reports it (20 GB on an 80 GB H100), else 4 GiB."""
  device = device or jax.devices()[0]
  try:
    limit = (device.memory_stats() or {}).get("bytes_limit")
  except Exception:  # noqa: BLE001  (not every backend reports it)
    limit = None
  return int(limit) // 4 if limit else FALLBACK_MEMORY_BUDGET


# ------------------------------------------------------------------------------------------------
# Keys.
# ------------------------------------------------------------------------------------------------
def device_kind(device=None) -> str:
  """This device's kind as a file name: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia_h100_80gb_hbm3"``."""
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", None) or device.platform
  if device.platform == "cpu":
    kind = "cpu"
  return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")


def _bucket(n: int) -> int:
  return 1 << max(0, math.ceil(math.log2(max(int(n), 1))))


def make_key(op: str, shape, dtype, *, labels: str = "int", reduction: Optional[str] = "mean",
             **options) -> str:
  """The key string of a call (see the module docstring). Raises ``ValueError`` on bad input."""
  if op not in OPS:
    raise ValueError(f"unknown op {op!r}: expected one of {OPS}.")
  shape = tuple(shape)
  if len(shape) != (2 if op == "xent" else 3) or any(
      not isinstance(d, (int, np.integer)) or d < 1 for d in shape):
    raise ValueError(f"op {op!r} takes shape={'(rows, classes)' if op == 'xent' else '(N, D, V)'} "
                     f"of positive ints, got {shape!r}.")
  if labels not in ("int", "dense") or (op == "linear" and labels != "int"):
    raise ValueError(f"labels must be 'int' or 'dense' ('int' for linear), got {labels!r}.")
  try:
    dt = jnp.dtype(dtype).name
  except TypeError:
    raise ValueError(f"unknown dtype {dtype!r}.") from None
  red = "scalar" if reduction in ("mean", "sum") else "rows"
  opts = ",".join(sorted(k for k in ("label_smoothing", "z_loss", "logit_softcap")
                         if options.get(k) not in (None, 0, 0.0)))
  bucket = "x".join(str(_bucket(d)) for d in shape)
  return f"{op}|{labels}|{dt}|{red}|{opts}|{bucket}"


# ------------------------------------------------------------------------------------------------
# Files: shipped configs and the user cache.
# ------------------------------------------------------------------------------------------------
def cache_dir() -> str:
  return os.environ.get("JXENT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "jxent")


def cache_path(kind: Optional[str] = None) -> str:
  return os.path.join(cache_dir(), f"{kind or device_kind()}.json")


def shipped_path(kind: Optional[str] = None) -> str:
  return os.path.join(CONFIG_DIR, f"{kind or device_kind()}.json")


_MEMO: dict = {}


def _read(path: str) -> dict:
  """The entries of a tuning file (``{}`` if absent or unreadable), memoised on its mtime so
  that a loss traced many times reads it once."""
  try:
    stamp = os.stat(path).st_mtime_ns
  except OSError:
    return {}
  hit = _MEMO.get(path)
  if hit and hit[0] == stamp:
    return hit[1]
  try:
    with open(path) as fh:
      data = json.load(fh)
    entries = data.get("entries", {}) if isinstance(data, dict) else {}
  except (OSError, ValueError) as e:
    warnings.warn(f"jxent: ignoring unreadable tuning file {path}: {e}", stacklevel=3)
    entries = {}
  _MEMO[path] = (stamp, entries)
  return entries


@contextlib.contextmanager
def _locked(path: str):
  """An exclusive lock beside ``path`` (two processes merge their results, not overwrite)."""
  import fcntl
  with open(path + ".lock", "w") as fh:
    fcntl.flock(fh, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(fh, fcntl.LOCK_UN)


def write_entries(path: str, entries: dict, **meta) -> None:
  """Merges ``entries`` into the file at ``path`` atomically (temporary file, then rename)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with _locked(path):
    merged = dict(_read(path))
    merged.update(entries)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
      json.dump(dict(meta, entries=merged), fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Lookup.
# ------------------------------------------------------------------------------------------------
def _pick(entry: dict, memory_budget: Optional[int]):
  cands = [c for c in entry.get("candidates", [])
           if memory_budget is None or (c.get("temp_bytes") or 0) <= memory_budget]
  return min(cands, key=lambda c: c["ms"]) if cands else None


def lookup(key: str, *, memory_budget: Optional[int] = None, kind: Optional[str] = None):
  """``(candidate | None, source)``: the user cache, the shipped file, or ``(None,
  "heuristic")``. A key stored with no viable candidate gives ``(None, "<source> (none
  viable)")``; the caller then uses its heuristic default."""
  for source, path in (("user cache", cache_path(kind)), ("shipped", shipped_path(kind))):
    entries = _read(path)
    if key in entries:
      label = source if source == "user cache" else f"shipped:{os.path.basename(path)}"
      cand = _pick(entries[key], memory_budget)
      return cand, (label if cand else f"{label} (none viable)")
  return None, "heuristic"


def build_kernel(cand: dict):
  """The implementation object of a stored candidate (None: it cannot run on this backend)."""
  from jxent._src import dispatch, linear
  name, params = cand["implementation"], dict(cand.get("params") or {})
  if name == "unfused":
    return name
  if name in linear.ALGORITHMS:
    return linear.ALGORITHMS[name](**params)
  return dispatch.kernel_class(name)(**params) if dispatch.platform_ok(name) else None


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
  key = make_key(op, shape, dtype, labels=labels, reduction=reduction, **options)
  if op == "linear":
    budget = default_memory_budget() if memory_budget is None else memory_budget
    cand, source = lookup(key, memory_budget=budget)
    if cand is not None:
      return build_kernel(cand), source
    from jxent._src import linear
    return linear.LinearChunked(), source
  cand, source = lookup(key)
  if cand is not None:
    kernel = build_kernel(cand)
    if kernel is not None:
      return kernel, source
  from jxent._src import dispatch
  return dispatch.heuristic(labels == "int", tuple(shape), dtype), source


# ------------------------------------------------------------------------------------------------
# The autotuner.
# ------------------------------------------------------------------------------------------------
# The longest row tried as one block (32768 float32 values: 32 per thread at 32 warps).
ONE_LOAD_MAX_CLASSES = 32768


def one_block(classes: int) -> int:
  """The Triton ``block_c`` that holds a whole row of ``classes`` (a power of two, >= 16)."""
  return max(16, 1 << (int(classes) - 1).bit_length())


def _candidates(op: str, shape, reduction) -> list:
  from jxent._src import dispatch, linear
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
  if plat == "tpu":
    k = dispatch.kernel_class("pallas_mosaic_tpu")
    cands += [k(), k(block_r=128, block_c=4096)]
  return cands


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
  import jxent
  if op == "linear":
    return lambda x, w, y: jxent.linear_softmax_cross_entropy(
        x, w, y, reduction=reduction, implementation=kernel, **options).astype(jnp.float32).sum()
  fn = (jxent.softmax_cross_entropy_with_integer_labels if labels == "int" else
        jxent.softmax_cross_entropy)
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
  key = make_key(op, shape, dtype, labels=labels, reduction=reduction, **options)
  path = cache_path()
  if not force and key in _read(path):
    cand = _pick(_read(path)[key], memory_budget)
    return dict(key=key, source="user cache", winner=cand,
                candidates=_read(path)[key].get("candidates", []), rejected=[])
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
    write_entries(path, {key: entry}, device_kind=device_kind())
  except OSError as e:
    warnings.warn(f"jxent.autotune: could not write the cache {path} ({e}); the result is "
                  f"returned but not stored.", stacklevel=2)
  return dict(key=key, source="tuned", winner=_pick(entry, memory_budget), candidates=good,
              rejected=rejected)
