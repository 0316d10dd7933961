"""Benchmark cases as data, and the implementations that can run them."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from typing import Callable, Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmark shape. ``kind="logits"``: ``[n, v]`` logits; ``kind="linear"``: ``x [n, d]``
  times ``w [d, v]``. ``labels`` is "int", "dense", "weighted", "logprobs" or "selected"
  (logits cases only; "weighted" is the integer-label loss with a ``[v]`` class weight,
  PyTorch's ``weight=`` and its mean; "logprobs" is the RL objective ``mean(log_probs) + 0.01 *
  mean(entropy)`` at temperature 0.7, "selected" adds the mean log-prob of 16 chosen ids per
  token)."""

  kind: str
  n: int
  v: int
  d: int = 0
  dtype: str = "float32"
  labels: str = "int"

  @property
  def shape(self) -> str:
    return f"{self.n}x{self.d}->{self.v}" if self.kind == "linear" else f"{self.n}x{self.v}"


PRESETS = {
    "quick": (
        [Case("logits", 1024, 8192, labels="int"), Case("logits", 1024, 8192, labels="dense"),
         Case("logits", 256, 32003, labels="int"), Case("linear", 1024, 8192, d=256),
         Case("logits", 1024, 8192, labels="logprobs")],
        ("forward", "value_and_grad"),
    ),
    "llm": (
        [Case("logits", n, v, dtype="bfloat16", labels=lab)
         for (n, v) in ((8192, 128256), (32768, 32000), (4096, 256000), (8192, 151936))
         for lab in ("int", "dense")]
        + [Case("linear", 8192, 256000, d=2304, dtype="bfloat16"),
           Case("linear", 8192, 128256, d=4096, dtype="bfloat16")],
        ("forward", "value_and_grad"),
    ),
}

MODES = ("forward", "value_and_grad")
MODE_ALIASES = {"forward_and_vjp": "value_and_grad"}  # (the earlier name, still accepted)
MODE_LEGEND = {
    "forward": "the mean loss alone",
    "value_and_grad": "jax.value_and_grad of the mean loss (w.r.t. the logits; x and w for linear)",
}
LABEL_KINDS = ("int", "dense", "weighted", "logprobs", "selected")
SELECTED = 16  # "selected": the log-probs objective plus the log-probs of 16 chosen ids per token
JXENT_LOGPROBS = ("xla", "chunked_xla", "pallas_triton", "pallas_mosaic_gpu")
REDUCTION = "mean"  # every row times the mean over the rows
TEMPERATURE = 0.7

JXENT_LOGITS = ("xla", "xla_autodiff", "chunked_xla", "pallas_triton", "pallas_triton_rows",
                "pallas_mosaic_gpu", "pallas_mosaic_tpu")
JXENT_LINEAR = ("linear_chunked", "linear_fused_grad")
PEERS = ("optax", "naive", "keras", "unfused")


def all_implementations() -> tuple[str, ...]:
  return JXENT_LOGITS + JXENT_LINEAR + PEERS


def _kernel_classes() -> dict:
  import jxent
  return {"xla": jxent.XlaKernel, "xla_autodiff": jxent.XlaAutodiffKernel,
          "chunked_xla": jxent.ChunkedXlaKernel,
          "pallas_triton": jxent.PallasTritonKernel,
          "pallas_mosaic_tpu": jxent.PallasMosaicTpuKernel,
          "linear_chunked": jxent.LinearChunked, "linear_fused_grad": jxent.LinearFusedGrad}


def split_implementations(names: str) -> tuple[str, ...]:
  """``"xla,pallas_triton[programs=2,row_groups=4]"`` -> the names (commas inside brackets kept)."""
  return tuple(i for i in re.split(r",(?![^\[]*\])", names) if i)


def parse_implementation(name: str) -> tuple[str, dict]:
  """``"pallas_triton[programs=264,block_c=4096]"`` -> ``("pallas_triton", {...})``: a jxent
  implementation with kernel-object parameters (ints, floats, None, True/False or strings),
  validated by the kernel object. Raises ValueError."""
  base, _, rest = name.partition("[")
  if not rest:
    return name, {}
  if not rest.endswith("]"):
    raise ValueError(f"implementation {name!r}: expected NAME[key=value,...]")
  kernel = _kernel_classes().get(base.removesuffix("_rows"))
  if kernel is None:
    raise ValueError(f"implementation {name!r}: only jxent kernels take parameters "
                     f"({', '.join(sorted(_kernel_classes()))})")
  params, consts = {}, {"None": None, "True": True, "False": False}
  for item in filter(None, rest[:-1].split(",")):
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"implementation {name!r}: {item!r} is not key=value")
    try:
      params[key] = consts[value] if value in consts else (float(value) if "." in value
                                                           else int(value))
    except ValueError:
      params[key] = value  # a string option, e.g. dw_accumulation=weights
  fields = {f.name for f in dataclasses.fields(kernel)} - {"interpret"}
  for key in params:
    if key not in fields:
      has = (f"it has {', '.join(sorted(fields))}" if fields else "it takes no parameters")
      raise ValueError(f"implementation {name!r}: {kernel.__name__} has no parameter {key!r} "
                       f"({has})")
  try:
    kernel(**params)  # validates the values
  except (TypeError, ValueError) as e:
    raise ValueError(f"implementation {name!r}: {e}") from None
  return base, params


def _kernel(base: str, params: dict):
  if not params:
    return {"linear_chunked": "chunked_xla", "linear_fused_grad": "fused_grad_xla"}.get(base, base)
  return _kernel_classes()[base](**params)


def why_not_here(name: str) -> Optional[str]:
  """Why implementation ``name`` cannot run on this machine, or None if it can."""
  name = parse_implementation(name)[0]
  plat = jax.default_backend()
  if name.startswith("pallas_triton") and plat not in ("gpu", "cuda", "rocm"):
    return f"needs a GPU, this backend is {plat}"
  if name == "pallas_mosaic_tpu" and plat != "tpu":
    return f"needs a TPU, this backend is {plat}"
  if name == "pallas_mosaic_gpu":
    if plat not in ("gpu", "cuda"):
      return f"needs an NVIDIA GPU (Hopper), this backend is {plat}"
    from jxent._src.kernels import pallas_mosaic_gpu  # (lazy: Pallas, only where it may run)
    return pallas_mosaic_gpu.unavailable()
  hints = {"optax": 'pip install "jxent[bench]"', "keras": 'pip install "jxent[examples]", '
           "which has keras, or pip install keras"}
  for peer, hint in hints.items():
    if name == peer and importlib.util.find_spec(peer) is None:
      return f"{peer} is not installed ({hint})"
  if name == "unfused" and importlib.util.find_spec("optax") is None:
    return 'needs optax (pip install "jxent[bench]")'
  return None


def _platform_ok(name: str) -> bool:
  return why_not_here(name) is None


def applies(name: str, case: Case) -> bool:
  """Whether implementation ``name`` runs ``case`` on this backend."""
  name = parse_implementation(name)[0]
  if not _platform_ok(name):
    return False
  if case.kind == "linear":
    # ("optax" would be the same code as "unfused": x @ w, then optax's loss; one row is kept)
    return name in JXENT_LINEAR + ("unfused",)
  if case.labels in ("logprobs", "selected"):
    return name in JXENT_LOGPROBS + ("naive",)
  if case.labels == "weighted":  # (Keras has no per-class weight in its losses)
    return name in JXENT_LOGITS + ("optax", "naive")
  return name in JXENT_LOGITS + ("optax", "naive", "keras")


def make_inputs(case: Case, key):
  """Random (never zero) inputs for one case."""
  dt = jnp.dtype(case.dtype)
  k1, k2, k3 = jax.random.split(key, 3)
  ids = jax.random.randint(k2, (case.n,), 0, case.v)
  if case.kind == "linear":
    x = jax.random.normal(k1, (case.n, case.d), jnp.float32).astype(dt)
    w = (jax.random.normal(k3, (case.d, case.v), jnp.float32) * case.d ** -0.5).astype(dt)
    return (x, w, ids)
  logits = (jax.random.normal(k1, (case.n, case.v), jnp.float32) * 3).astype(dt)
  if case.labels == "dense":
    return (logits, jax.nn.one_hot(ids, case.v, dtype=dt))
  if case.labels == "selected":
    return (logits, ids, jax.random.randint(k3, (case.n, SELECTED), 0, case.v))
  if case.labels == "weighted":  # a class weight in [0.5, 2)
    return (logits, ids, jax.random.uniform(k3, (case.v,), jnp.float32, 0.5, 2.0))
  return (logits, ids)


def loss_fn(name: str, case: Case) -> Callable:
  """The scalar (mean) loss of implementation ``name`` for ``case`` (:data:`REDUCTION`); differentiated w.r.t. arg 0
  (logits) or args 0 and 1 (x, w) for linear cases."""
  import jxent
  dense = case.labels == "dense"
  name, params = parse_implementation(name)
  if case.labels in ("logprobs", "selected"):
    return _logprobs_fn(name, params, case.labels == "selected")
  if case.labels == "weighted":
    return _weighted_fn(name, params)
  if case.kind == "linear":
    if name in JXENT_LINEAR:
      algo = _kernel(name, params)
      return lambda x, w, y: jxent.linear_softmax_cross_entropy(x, w, y, implementation=algo)
    if name == "unfused":
      import optax
      return lambda x, w, y: optax.softmax_cross_entropy_with_integer_labels(
          (x @ w).astype(jnp.float32), y).mean()
  if name in JXENT_LOGITS:
    impl = _kernel(name.removesuffix("_rows"), params)
    if name.endswith("_rows"):  # per-row custom VJP (separate forward and backward kernels)
      if dense:
        return lambda x, y: jxent.softmax_cross_entropy(x, y, implementation=impl).astype(jnp.float32).mean()
      return lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(
          x, y, implementation=impl).astype(jnp.float32).mean()
    if dense:
      return lambda x, y: jxent.softmax_cross_entropy(x, y, reduction="mean", implementation=impl)
    return lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(
        x, y, reduction="mean", implementation=impl)
  if name == "optax":
    import optax
    if dense:
      return lambda x, y: optax.softmax_cross_entropy(x, y).mean()
    return lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y).mean()
  if name == "naive":
    if dense:
      return lambda x, y: -(y * jax.nn.log_softmax(x)).sum(-1).mean()
    return lambda x, y: -jnp.take_along_axis(jax.nn.log_softmax(x), y[:, None], -1).mean()
  if name == "keras":
    import os
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras
    if dense:
      return lambda x, y: keras.losses.categorical_crossentropy(y, x, from_logits=True).mean()
    return lambda x, y: keras.losses.sparse_categorical_crossentropy(y, x, from_logits=True).mean()
  raise ValueError(f"implementation {name!r} does not apply to {case}")


def _weighted_fn(name: str, params: dict) -> Callable:
  """PyTorch's ``F.cross_entropy(logits, y, weight=w)`` (mean: ``sum(w[y] * nll) / sum(w[y])``):
  jxent's ``class_weight``, or the hand port over optax's or the naive per-row loss."""
  import jxent
  if name in JXENT_LOGITS:
    impl = _kernel(name.removesuffix("_rows"), params)
    if name.endswith("_rows"):
      return lambda x, y, w: jnp.sum(jxent.softmax_cross_entropy_with_integer_labels(
          x, y, class_weight=w, implementation=impl).astype(jnp.float32)) / jnp.sum(w[y])
    return lambda x, y, w: jxent.softmax_cross_entropy_with_integer_labels(
        x, y, class_weight=w, reduction="mean", implementation=impl)
  if name == "optax":
    import optax
    return lambda x, y, w: jnp.sum(
        w[y] * optax.softmax_cross_entropy_with_integer_labels(x, y)) / jnp.sum(w[y])
  if name == "naive":
    return lambda x, y, w: -jnp.sum(
        w[y] * jnp.take_along_axis(jax.nn.log_softmax(x), y[:, None], -1)[:, 0]) / jnp.sum(w[y])
  raise ValueError(f"implementation {name!r} does not apply to weighted labels")


def _logprobs_fn(name: str, params: dict, selected: bool = False) -> Callable:
  """The RL objective: fused (jxent) or the naive log_softmax + gather + entropy formula; with
  ``selected``, plus the mean log-prob of :data:`SELECTED` chosen ids per token."""
  import jxent

  def objective(lp, ent, sel=None):
    return jnp.mean(lp) + 0.01 * jnp.mean(ent) + (0.0 if sel is None else jnp.mean(sel))

  if name in JXENT_LOGPROBS:
    impl = _kernel(name, params)
    if selected:
      return lambda x, y, ids: objective(*jxent.token_log_probs(
          x, y, temperature=TEMPERATURE, return_entropy=True, selected_ids=ids,
          implementation=impl))
    return lambda x, y: objective(*jxent.token_log_probs(
        x, y, temperature=TEMPERATURE, return_entropy=True, implementation=impl))
  if name == "naive":
    def naive(x, y, ids=None):
      logp = jax.nn.log_softmax(x.astype(jnp.float32) / TEMPERATURE)
      lp = jnp.take_along_axis(logp, y[:, None], -1)[:, 0]
      sel = None if ids is None else jnp.take_along_axis(logp, ids, -1)
      return objective(lp, -jnp.sum(jnp.exp(logp) * logp, -1), sel)
    return naive
  raise ValueError(f"implementation {name!r} does not compute log-probs")


def floor_bytes(case: Case, mode: str) -> Optional[int]:
  """Bytes that must cross memory (docs/architecture.md, "Floors and targets"): forward reads
  the logits (and dense labels); forward+backward reads the logits twice and writes the gradient
  (dense: labels read twice)."""
  if case.kind == "linear":
    return None
  lb = case.n * case.v * jnp.dtype(case.dtype).itemsize
  dense = case.labels == "dense"
  if mode == "forward":
    return lb * (2 if dense else 1)
  return lb * 3 + (2 * lb if dense else 0)


def matmul_flops(case: Case, mode: str) -> Optional[int]:
  if case.kind != "linear":
    return None
  return 2 * case.n * case.d * case.v * (1 if mode == "forward" else 3)
