"""Tuned choices as data: keys, the per-device config files shipped beside this module, and the
user cache. This is the low half of tuning: it imports nothing of jxent, so the dispatch layer
(:mod:`jxent._src.dispatch`, :mod:`jxent._src.linear`) reads it at module level; the autotuner
that writes it (:mod:`jxent._src.autotune`) sits on top of every loss it times.

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
import json
import math
import os
import re
import tempfile
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))  # (the shipped ``<device kind>.json``)
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


def abstract_device():
  """The abstract device that lowering targets, or None: set by
  ``jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=AbstractDevice(...)))``
  to lower for a GPU from a host without one (and by a mesh's own abstract device). Where it is
  set, the platform, the device kind and the SM count that choose a kernel are its own."""
  try:
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  except Exception:  # noqa: BLE001  (a jax without abstract devices)
    return None
  return device if getattr(device, "platform", None) else None


# ------------------------------------------------------------------------------------------------
# Keys.
# ------------------------------------------------------------------------------------------------
def device_kind(device=None) -> str:
  """This device's kind as a file name: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia_h100_80gb_hbm3"``
  (the abstract device's kind while one is set, see :func:`abstract_device`)."""
  device = device or abstract_device() or jax.devices()[0]
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


def read_entries(path: str) -> dict:
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
  """An exclusive lock on the folder of ``path``, so that two processes merge their results
  instead of overwriting them; it leaves no lock file behind."""
  import fcntl  # (POSIX only: imported where a file is written, not by every loss)
  fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # (closing releases the lock)


def write_entries(path: str, entries: dict, **meta) -> None:
  """Merges ``entries`` into the file at ``path`` atomically (temporary file, then rename)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with _locked(path):
    merged = dict(read_entries(path))
    merged.update(entries)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
      json.dump(dict(meta, entries=merged), fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Lookup.
# ------------------------------------------------------------------------------------------------
def pick(entry: dict, memory_budget: Optional[int]):
  cands = [c for c in entry.get("candidates", [])
           if memory_budget is None or (c.get("temp_bytes") or 0) <= memory_budget]
  return min(cands, key=lambda c: c["ms"]) if cands else None


def lookup(key: str, *, memory_budget: Optional[int] = None, kind: Optional[str] = None):
  """``(candidate | None, source)``: the user cache, the shipped file, or ``(None,
  "heuristic")``. A key stored with no viable candidate gives ``(None, "<source> (none
  viable)")``; the caller then uses its heuristic default."""
  for source, path in (("user cache", cache_path(kind)), ("shipped", shipped_path(kind))):
    entries = read_entries(path)
    if key in entries:
      label = source if source == "user cache" else f"shipped:{os.path.basename(path)}"
      cand = pick(entries[key], memory_budget)
      return cand, (label if cand else f"{label} (none viable)")
  return None, "heuristic"
