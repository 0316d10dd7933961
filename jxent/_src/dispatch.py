"""Implementation registry: ``implementation=None | str | kernel instance`` -> a kernel object.

A kernel object is hashable (a frozen dataclass) and has ``forward`` / ``backward`` with the
signatures documented in :mod:`jxent._src.kernels.xla`, plus ``platforms`` (where it can run compiled) and
``interpret`` (Pallas kernels only: run in interpret mode on any backend).
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from typing import Any, Callable, ClassVar

import jax

from jxent._src import configs
from jxent._src.kernels import chunked, xla


@dataclasses.dataclass(frozen=True)
class XlaKernel:
  """Fused XLA cross-entropy (every backend).

  Example:
    >>> import jax.numpy as jnp, jxent
    >>> jxent.softmax_cross_entropy_with_integer_labels(
    ...     jnp.array([[1., 2., 3.]]), jnp.array([2]), implementation=jxent.XlaKernel())
    Array([0.40760595], dtype=float32)
  """

  name: ClassVar[str] = "xla"
  platforms: ClassVar[tuple[str, ...]] = ("cpu", "gpu", "cuda", "rocm", "tpu")
  # forward / backward take ``class_weight=`` (a [C] vector; see rowmath.class_weight_rows)
  class_weights: ClassVar[bool] = True
  # whether the backward may rebuild the forward's exponentials (xla.backward's ``shared``)
  shares_exp: ClassVar[bool] = True
  interpret: bool = False

  def forward(self, logits, labels, *, sparse, opts, need_lse=True, class_weight=None):
    return xla.forward(logits, labels, sparse=sparse, opts=opts, need_lse=need_lse,
                       class_weight=class_weight)

  def backward(self, logits, labels, stats, g, *, sparse, opts, want_dlabels=True,
               class_weight=None):
    return xla.backward(logits, labels, stats, g, sparse=sparse, opts=opts,
                        want_dlabels=want_dlabels, class_weight=class_weight,
                        shared=self.shares_exp)


@dataclasses.dataclass(frozen=True)
class XlaAutodiffKernel(XlaKernel):
  """The fused XLA forward of :class:`XlaKernel`, differentiated by JAX's own autodiff.

  No custom VJP: forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) and derivatives of
  every order work, as with optax. The cost is what JAX's autodiff keeps between the passes
  (``[rows, classes]`` residuals, like optax) instead of one log-sum-exp per row. The gradients
  are the true derivatives of the native API; TF's kernel gradient (``jxent.nn``) cannot be
  expressed this way and raises. At a ``-inf`` (masked) logit the labels gradient is finite here
  (``g * (lse - max(logits))``) where the custom VJP gives TF's ``+inf``.

  Example:
    >>> import jax, jax.numpy as jnp, jxent
    >>> f = lambda x: jxent.softmax_cross_entropy_with_integer_labels(
    ...     x, jnp.array([2]), reduction="sum", implementation="xla_autodiff")
    >>> _, tangent = jax.jvp(f, (jnp.array([[1., 2., 3.]]),), (jnp.array([[0., 0., 1.]]),))
    >>> round(float(tangent), 4)  # softmax(x)[2] - 1
    -0.3348
  """

  name: ClassVar[str] = "xla_autodiff"
  autodiff: ClassVar[bool] = True

  def forward(self, logits, labels, *, sparse, opts, need_lse=True, class_weight=None):
    if opts.tf_grad:
      raise ValueError("implementation 'xla_autodiff' differentiates the loss itself and cannot "
                       "give TF's kernel gradient (tf_grad); use 'xla'.")
    if jax.numpy.promote_types(logits.dtype, jax.numpy.float32) == jax.numpy.float64:
      return xla.autodiff_f64(logits, labels, sparse, opts, class_weight)  # (the tails, exactly)
    return xla.forward(logits, labels, sparse=sparse, opts=opts, autodiff=True, need_lse=need_lse,
                       class_weight=class_weight)


@dataclasses.dataclass(frozen=True)
class ChunkedXlaKernel(XlaKernel):
  """Online log-sum-exp over class blocks of ``block`` classes (every backend).

  Example:
    >>> import jax.numpy as jnp, jxent
    >>> jxent.softmax_cross_entropy_with_integer_labels(
    ...     jnp.array([[1., 2., 3.]]), jnp.array([2]), implementation=jxent.ChunkedXlaKernel(block=2))
    Array([0.40760595], dtype=float32)
  """

  name: ClassVar[str] = "chunked_xla"
  shares_exp: ClassVar[bool] = False  # (its forward writes no exponentials to share)
  block: int = chunked.BLOCK

  def __post_init__(self):
    if not isinstance(self.block, int) or self.block < 1:
      raise ValueError(f"ChunkedXlaKernel: block must be a positive int, got {self.block!r}.")

  def forward(self, logits, labels, *, sparse, opts, need_lse=True, class_weight=None):
    del need_lse  # (a hint: the lse comes at no extra cost here)
    return chunked.forward(logits, labels, sparse=sparse, opts=opts, block=self.block,
                           class_weight=class_weight)


_REGISTRY: dict[str, Callable[[], Any]] = {
    "xla": XlaKernel,
    "xla_autodiff": XlaAutodiffKernel,
    "chunked_xla": ChunkedXlaKernel,
}
# The Pallas kernels, imported on first use (so that `import jxent` does not load Pallas); the
# registry knows them, the kernel modules do not know the registry.
_LAZY: dict[str, tuple[str, str]] = {
    "pallas_triton": ("jxent._src.kernels.pallas_triton", "PallasTritonKernel"),
    "pallas_mosaic_tpu": ("jxent._src.kernels.pallas_mosaic_tpu", "PallasMosaicTpuKernel"),
    "pallas_mosaic_gpu": ("jxent._src.kernels.pallas_mosaic_gpu", "PallasMosaicGpuKernel"),
}


def register(name: str, factory: Callable[[], Any]) -> None:
  """Adds a user kernel under ``name`` (a factory taking no arguments)."""
  _REGISTRY[name] = factory


def names() -> tuple[str, ...]:
  """Every registered implementation name of the logits losses (not all run on every backend);
  :func:`jxent.implementations` adds the linear algorithms."""
  return tuple(sorted(set(_REGISTRY) | set(_LAZY)))


def _factory(name: str) -> Callable[[], Any]:
  if name in _REGISTRY:
    return _REGISTRY[name]
  module, attr = _LAZY[name]
  return getattr(importlib.import_module(module), attr)


def platform() -> str:
  """The platform a kernel is chosen for: the abstract device's while one is set (lowering for a
  GPU from a CPU host, :func:`jxent._src.configs.abstract_device`), else JAX's default backend."""
  device = configs.abstract_device()
  return device.platform if device is not None else jax.default_backend()


def kernel_class(name: str):
  """The kernel class registered under ``name``."""
  return _factory(name)


def platform_ok(name: str) -> bool:
  kernel = _factory(name)
  return platform() in kernel.platforms


def sm_count(device=None):
  """The device's streaming multiprocessors (``core_count`` of a JAX GPU device), or None."""
  device = device or configs.abstract_device() or jax.devices()[0]
  count = getattr(device, "core_count", None) or getattr(device, "num_cores", None)
  return count if isinstance(count, int) and count > 0 else None


_WARNED: set = set()


def _unavailable(kernel):
  """Why ``kernel`` cannot be built with this jax for the device it is chosen for, or None (a
  kernel without ``unavailable`` always can)."""
  return kernel.unavailable(configs.abstract_device()) if hasattr(kernel, "unavailable") else None


def _buildable(kernel) -> bool:
  """Whether a default's kernel can be built with this jax (:func:`_unavailable`); if not, one
  warning per cause, naming it, and the caller takes the next best path (``xla``)."""
  reason = _unavailable(kernel)
  if reason is None:
    return True
  if (kernel.name, reason) not in _WARNED:
    _WARNED.add((kernel.name, reason))
    warnings.warn(f"jxent: implementation=None uses 'xla' instead of {kernel.name!r} on this GPU: "
                  f"{reason}.", RuntimeWarning, stacklevel=4)
  return False


def heuristic(sparse: bool, shape, dtype) -> Any:
  """The default without a tuned entry, from the device's properties: ``"pallas_triton"`` on
  GPU for 2-D rows of >= 1024 classes of 16/32-bit logits (faster than XLA there on the H100 for
  integer labels), ``"xla"`` elsewhere. With fewer rows than twice the GPU's SM count, one
  program per row leaves SMs idle: the forward then splits each row over enough programs to
  give every SM two (``split_rows``, at most 8)."""
  plat = platform()
  if plat in ("gpu", "cuda") and jax.numpy.dtype(dtype).itemsize <= 4:
    # (imported here, not at the top: loading Pallas is heavy and only GPU defaults need it)
    from jxent._src.kernels import pallas_triton
    if pallas_triton.preferred(shape, dtype, sparse) and _buildable(pallas_triton.PallasTritonKernel()):
      sms, rows = sm_count(), shape[0]
      if sms and 0 < rows < 2 * sms:
        split = 1
        while split < 8 and rows * split < 2 * sms:
          split *= 2
        return pallas_triton.PallasTritonKernel(split_rows=split)
      return pallas_triton.PallasTritonKernel()
  return XlaKernel()


def build_kernel(cand: dict):
  """The kernel object of a stored candidate ``{implementation, params}``; None where it cannot
  run on this backend."""
  name = cand["implementation"]
  if name not in names():
    return None
  return kernel_class(name)(**dict(cand.get("params") or {})) if platform_ok(name) else None


def tuned_kernel(key: str, sparse: bool, shape, dtype):
  """``(kernel, source)`` for a call keyed ``key`` (:func:`jxent._src.configs.make_key`): the
  tuned choice (user cache, then the shipped config) where it can run here and takes ``dtype``,
  else :func:`heuristic`. A miss never raises and never tunes."""
  cand, source = configs.lookup(key)
  kernel = None if cand is None else build_kernel(cand)
  if kernel is not None and jax.numpy.dtype(dtype) in (getattr(kernel, "dtypes", None) or
                                                       (jax.numpy.dtype(dtype),)) and _buildable(kernel):
    return kernel, source
  return heuristic(sparse, shape, dtype), source


def _default(sparse: bool, shape, dtype, reduction=None, opts=None) -> Any:
  """``implementation=None``: :func:`tuned_kernel` for this device and call."""
  options = {} if opts is None else dict(label_smoothing=opts.label_smoothing,
                                         z_loss=opts.z_loss, logit_softcap=opts.logit_softcap)
  try:
    key = configs.make_key("xent", shape, dtype, labels="int" if sparse else "dense",
                           reduction=reduction, **options)
    return tuned_kernel(key, sparse, shape, dtype)[0]
  except Exception:  # noqa: BLE001  (a broken tuning file must never break the loss)
    return heuristic(sparse, shape, dtype)


def resolve(implementation, *, sparse: bool, shape, dtype, reduction=None, opts=None,
            class_weight: bool = False) -> Any:
  """Returns the kernel object for ``implementation``; raises if it cannot run here.
  ``reduction`` and ``opts`` key the tuned choice of ``implementation=None``; ``class_weight``:
  the call weighs its classes, which only kernels with ``class_weights`` take (every built-in
  kernel does; a user kernel without it is refused)."""
  if implementation is None:
    kernel = _default(sparse, shape, dtype, reduction, opts)
    _check_class_weights(kernel, class_weight)
    return kernel
  if isinstance(implementation, str):
    if implementation not in names():
      raise ValueError(f"Unknown implementation {implementation!r}; expected one of "
                       f"{list(names())} or None.")
    kernel = _factory(implementation)()
  elif hasattr(implementation, "forward") and hasattr(implementation, "backward"):
    kernel = implementation
  else:
    raise TypeError(f"`implementation` must be None, a name or a kernel object, got {implementation!r}.")
  allowed = getattr(kernel, "dtypes", None)
  if allowed is not None and jax.numpy.dtype(dtype) not in allowed:
    raise ValueError(
        f"implementation {kernel.name!r} does not take {jax.numpy.dtype(dtype)} logits (it takes "
        f"{', '.join(str(d) for d in allowed)}); pass implementation=None or 'xla' (or "
        f"'chunked_xla'), which compute float64 in float64.")
  plat = platform()
  if not kernel.interpret and plat not in kernel.platforms:
    raise ValueError(
        f"implementation {kernel.name!r} cannot run on the {plat!r} backend (it runs on "
        f"{', '.join(kernel.platforms)}); pass implementation=None or 'xla', or an interpret-mode "
        f"kernel object for testing.")
  reason = _unavailable(kernel)
  if reason is not None:
    raise ValueError(f"implementation {kernel.name!r} cannot be built here: {reason}. Pass "
                     f"implementation=None (which falls back to 'xla') or 'xla'.")
  _check_class_weights(kernel, class_weight)
  return kernel


def _check_class_weights(kernel, class_weight: bool) -> None:
  if class_weight and not getattr(kernel, "class_weights", False):
    raise ValueError(f"implementation {getattr(kernel, 'name', kernel)!r} does not take "
                     f"`class_weight` (its forward and backward have no class_weight=); pass "
                     f"implementation=None or 'xla'.")
