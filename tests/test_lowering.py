"""The compiled Pallas kernels lower for their real platform (CUDA / TPU) from this CPU machine.

CI has no GPU or TPU; interpret mode checks what the kernels compute, and these tests check that
the very same kernels, with ``interpret=False``, lower through Pallas to a Triton (CUDA) or Mosaic
(TPU) custom call: block shapes, masked loads, dtypes and every option combination are accepted by
the Pallas lowering. What remains for the device is the backend's own compile (Triton to PTX,
Mosaic to TPU code) and the timing.
"""

import sys
import warnings

import jax
import jax.numpy as jnp
import pytest

import jxent
from jxent._src import configs, dispatch
from jxent._src.kernels import pallas_mosaic_gpu, pallas_mosaic_tpu, pallas_triton
from helpers import abstract_gpu, abstract_gpu_mesh

TARGETS = {
    "pallas_triton": ("cuda", "__gpu$xla.gpu.triton"),
    "pallas_mosaic_tpu": ("tpu", "tpu_custom_call"),
    "pallas_mosaic_gpu": ("cuda", "custom_call @mosaic_gpu"),  # (mosaic_gpu_v2 in jax 0.10)
}
OPTIONS = [
    {},
    {"label_smoothing": 0.1, "z_loss": 1e-4, "logit_softcap": 30.0},
]


def _lower(fn, args, platform, monkeypatch):
  """Lowers ``fn`` for ``platform``: CUDA for an abstract H200 (the kernels are then chosen for
  that GPU, as on one), TPU by telling the registry it is on a TPU."""
  if platform == "cuda":
    with abstract_gpu():
      return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  monkeypatch.setattr(dispatch, "platform", lambda: platform)
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _kernels():
  return [
      pytest.param(pallas_triton.PallasTritonKernel(), id="pallas_triton"),
      pytest.param(pallas_triton.PallasTritonKernel(programs=264, block_c=4096, num_warps=8),
                   id="pallas_triton_persistent"),
      pytest.param(pallas_triton.PallasTritonKernel(row_groups=128), id="pallas_triton_groups"),
      pytest.param(pallas_mosaic_tpu.PallasMosaicTpuKernel(), id="pallas_mosaic_tpu"),
      pytest.param(pallas_mosaic_gpu.PallasMosaicGpuKernel(), id="pallas_mosaic_gpu"),
      # the largest tiles: the pipeline's stages, then block_c, shrink to fit shared memory
      pytest.param(pallas_mosaic_gpu.PallasMosaicGpuKernel(block_c=256, max_concurrent_steps=8),
                   id="pallas_mosaic_gpu_big_tiles"),
      # the persistent launch: 132 programs (an H200's SMs) walking the row blocks in turn
      pytest.param(pallas_mosaic_gpu.PallasMosaicGpuKernel(block_c=128, programs=132),
                   id="pallas_mosaic_gpu_persistent"),
  ]


@pytest.mark.parametrize("kernel", _kernels())
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("shape,dtype", [((64, 4099), jnp.bfloat16), ((37, 1000), jnp.float32),
                                         ((16, 128256), jnp.float16)])
class TestLowering:

  def test_integer_labels(self, kernel, options, shape, dtype, monkeypatch):
    platform, call = TARGETS[kernel.name]
    x = jax.ShapeDtypeStruct(shape, dtype)
    y = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    g = jax.ShapeDtypeStruct(shape[:1], dtype)  # the per-row loss has the logits' dtype

    def value_and_grad_mean(x, y):
      f = lambda x: jxent.softmax_cross_entropy_with_integer_labels(
          x, y, ignore_index=-100, reduction="mean", implementation=kernel, **options)
      return jax.value_and_grad(f)(x)

    def rows_vjp(x, y, g):
      out, vjp = jax.vjp(lambda x: jxent.softmax_cross_entropy_with_integer_labels(
          x, y, ignore_index=-100, implementation=kernel, **options), x)
      return out, vjp(g)

    for fn, args in ((value_and_grad_mean, (x, y)), (rows_vjp, (x, y, g))):
      text = _lower(fn, args, platform, monkeypatch)
      assert call in text, text[:2000]

  def test_dense_labels(self, kernel, options, shape, dtype, monkeypatch):
    platform, call = TARGETS[kernel.name]
    x = jax.ShapeDtypeStruct(shape, dtype)

    def value_and_grads(x, y):
      f = lambda x, y: jxent.softmax_cross_entropy(x, y, reduction="sum", implementation=kernel,
                                                   **options)
      return jax.value_and_grad(f, argnums=(0, 1))(x, y)

    text = _lower(value_and_grads, (x, x), platform, monkeypatch)
    assert call in text, text[:2000]


@pytest.mark.parametrize("kernel", _kernels())
@pytest.mark.parametrize("sparse", [True, False])
def test_class_weight_kernels_lower(kernel, sparse, monkeypatch):
  """The weighted forward and backward kernels (the class weight read in the row walk) lower for
  their platform: value_and_grad of the mean, in the logits and the class weight, label
  smoothing on."""
  x = jax.ShapeDtypeStruct((64, 4099), jnp.bfloat16)
  y = jax.ShapeDtypeStruct((64,), jnp.int32) if sparse else x
  w = jax.ShapeDtypeStruct((4099,), jnp.float32)
  kw = dict(reduction="mean", implementation=kernel, label_smoothing=0.1, z_loss=1e-4)

  def fn(x, y, w):
    if sparse:
      f = lambda x, w: jxent.softmax_cross_entropy_with_integer_labels(x, y, class_weight=w, **kw)
    else:
      f = lambda x, w: jxent.softmax_cross_entropy(x, y, class_weight=w, **kw)
    return jax.value_and_grad(f, argnums=(0, 1))(x, w)

  platform, call = TARGETS[kernel.name]
  text = _lower(fn, (x, y, w), platform, monkeypatch)
  assert text.count(call) == 2  # forward and backward kernels


def test_interpret_kernels_do_not_lower_to_custom_calls(monkeypatch):
  """The counterpart: the interpret-mode kernels the shared test base runs call no device kernel."""
  x = jax.ShapeDtypeStruct((8, 300), jnp.float32)
  y = jax.ShapeDtypeStruct((8,), jnp.int32)
  for kernel in (pallas_triton.PallasTritonKernel(interpret=True),
                 pallas_mosaic_tpu.PallasMosaicTpuKernel(interpret=True),
                 pallas_mosaic_gpu.PallasMosaicGpuKernel(interpret=True)):
    fn = lambda x, y: jax.value_and_grad(lambda x: jxent.softmax_cross_entropy_with_integer_labels(
        x, y, reduction="mean", implementation=kernel))(x)
    text = jax.jit(fn).trace(x, y).lower().as_text()
    # (Mosaic GPU's interpret mode simulates its memory through CPU callbacks: custom calls too)
    for name, call in TARGETS.values():
      assert call not in text, (kernel.name, name)
    if kernel.name != "pallas_mosaic_gpu":
      assert "custom_call" not in text


@pytest.mark.parametrize("kernel", [pallas_triton.PallasTritonKernel(),
                                    pallas_mosaic_tpu.PallasMosaicTpuKernel(),
                                    pallas_mosaic_gpu.PallasMosaicGpuKernel()],
                         ids=["pallas_triton", "pallas_mosaic_tpu", "pallas_mosaic_gpu"])
@pytest.mark.parametrize("sparse", [True, False])
def test_vocab_parallel_lowers_under_shard_map(kernel, sparse, monkeypatch):
  """The compiled kernels inside shard_map with axis_name and check_vma=True (the interpret-mode
  tests need check_vma=False): the outputs carry their manual-axis types."""
  import numpy as np
  from jax.sharding import Mesh, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  platform, call = TARGETS[kernel.name]
  if platform == "cuda":
    mesh = abstract_gpu_mesh(mesh)  # (the mesh's own device is the kernels' target)
  opts = dict(axis_name="model", implementation=kernel, reduction="sum", label_smoothing=0.1)

  def body(x, y):
    if sparse:
      return jxent.softmax_cross_entropy_with_integer_labels(x, y, ignore_index=-100, **opts)[None]
    return jxent.softmax_cross_entropy(x, y, **opts)[None]

  f = jax.shard_map(body, mesh=mesh, out_specs=P("data"),
                    in_specs=(P("data", "model"), P("data") if sparse else P("data", "model")))
  x = jax.ShapeDtypeStruct((64, 4096), jnp.bfloat16)
  y = jax.ShapeDtypeStruct((64,), jnp.int32) if sparse else x
  text = _lower(lambda x, y: jax.value_and_grad(lambda x: f(x, y).sum())(x), (x, y), platform,
                monkeypatch)
  assert text.count(call) == 2  # forward and backward kernels


@pytest.mark.parametrize("kernel", [pallas_triton.PallasTritonKernel(),
                                    pallas_triton.PallasTritonKernel(programs=264, block_c=4096),
                                    pallas_mosaic_tpu.PallasMosaicTpuKernel(),
                                    pallas_mosaic_gpu.PallasMosaicGpuKernel()],
                         ids=["pallas_triton", "pallas_triton_persistent", "pallas_mosaic_tpu",
                              "pallas_mosaic_gpu"])
@pytest.mark.parametrize("shape,dtype", [((64, 4099), jnp.bfloat16), ((16, 128256), jnp.float32)])
@pytest.mark.parametrize("entropy", [True, False])
def test_token_log_probs_lower(kernel, shape, dtype, entropy, monkeypatch):
  """token_log_probs' kernels (statistics, gradient) with temperature per token, soft-cap and
  ignore_index lower to two Triton (CUDA) or Mosaic (TPU) calls."""
  platform, call = TARGETS[kernel.name]
  x = jax.ShapeDtypeStruct(shape, dtype)
  y = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
  t = jax.ShapeDtypeStruct(shape[:1], jnp.float32)

  def objective(x, y, t):
    out = jxent.token_log_probs(x, y, temperature=t, logit_softcap=30.0, ignore_index=-100,
                                return_entropy=entropy, implementation=kernel)
    return jnp.sum(out[0]) + 0.01 * jnp.sum(out[1]) if entropy else jnp.sum(out)

  text = _lower(lambda x, y, t: jax.value_and_grad(objective)(x, y, t), (x, y, t), platform,
                monkeypatch)
  assert text.count(call) == 2


@pytest.mark.parametrize("sparse", [True, False])
def test_split_row_forward_lowers_for_cuda(sparse, monkeypatch):
  """The split-row forward (several programs per row) lowers to one Triton call for the
  statistics; the per-row VJP adds the backward kernel."""
  kernel = pallas_triton.PallasTritonKernel(split_rows=8, block_c=4096)
  x = jax.ShapeDtypeStruct((64, 128256), jnp.bfloat16)
  y = jax.ShapeDtypeStruct((64,), jnp.int32) if sparse else x
  fn = (jxent.softmax_cross_entropy_with_integer_labels if sparse else jxent.softmax_cross_entropy)
  text = _lower(lambda x, y: jax.vjp(lambda x: fn(x, y, implementation=kernel), x)[1](
      jnp.ones(64, x.dtype)), (x, y), "cuda", monkeypatch)
  assert text.count("__gpu$xla.gpu.triton") == 2


@pytest.mark.parametrize("kernel,shape", [
    # the gradient walk reversed, with persistent programs and row groups
    (pallas_triton.PallasTritonKernel(block_c=4096, num_warps=8, programs=264, row_groups=64,
                                      reverse_grad=True), (512, 128256)),
    # a whole 32000-class row as one block (the autotuner's one-load candidate)
    (pallas_triton.PallasTritonKernel(block_c=32768, num_warps=16), (256, 32000))],
    ids=["reverse_grad", "one_load"])
@pytest.mark.parametrize("sparse", [True, False])
def test_fused_candidates_lower_for_cuda(kernel, shape, sparse, monkeypatch):
  """The fused-kernel candidates of the sweep: value_and_grad of the mean is one Triton call (the
  backward only scales its gradient)."""
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  y = jax.ShapeDtypeStruct(shape[:1], jnp.int32) if sparse else x
  fn = (jxent.softmax_cross_entropy_with_integer_labels if sparse else jxent.softmax_cross_entropy)
  text = _lower(lambda x, y: jax.value_and_grad(lambda x: fn(x, y, implementation=kernel,
                                                             reduction="mean"))(x), (x, y), "cuda",
                monkeypatch)
  assert text.count("__gpu$xla.gpu.triton") == 1


def _mean_value_and_grad(implementation):
  def fn(x, y):
    return jax.value_and_grad(lambda x: jxent.softmax_cross_entropy_with_integer_labels(
        x, y, reduction="mean", implementation=implementation))(x)
  return fn, (jax.ShapeDtypeStruct((64, 4099), jnp.bfloat16), jax.ShapeDtypeStruct((64,), jnp.int32))


def test_triton_lowering_warns_of_its_deprecation_and_nothing_else(monkeypatch):
  """JAX deprecates the Pallas Triton backend from 0.11: its lowering warns with one message,
  which the suite filters by that message alone (pyproject.toml), never the whole class."""
  fn, args = _mean_value_and_grad(pallas_triton.PallasTritonKernel())
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    text = _lower(fn, args, "cuda", monkeypatch)
  assert "__gpu$xla.gpu.triton" in text
  other = [f"{w.category.__name__}: {w.message}" for w in caught
           if pallas_triton.DEPRECATION not in str(w.message)]
  assert not other, other
  deprecated = [w for w in caught if pallas_triton.DEPRECATION in str(w.message)]
  assert all(issubclass(w.category, DeprecationWarning) for w in deprecated)
  if jax.__version_info__ >= (0, 11):
    assert deprecated, "jax >= 0.11 no longer warns that Pallas Triton is deprecated"


@pytest.fixture
def no_triton(monkeypatch):
  """This jax without its Pallas Triton backend, as when JAX removes it."""
  import jax.experimental.pallas as pallas
  monkeypatch.delattr(pallas, "triton", raising=False)
  monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)
  monkeypatch.setattr(dispatch, "_WARNED", set())
  pallas_triton.unavailable.cache_clear()
  yield
  pallas_triton.unavailable.cache_clear()


def test_gpu_default_falls_back_to_xla_when_triton_is_gone(no_triton, monkeypatch):
  fn, args = _mean_value_and_grad(None)
  with pytest.warns(RuntimeWarning, match="uses 'xla' instead of 'pallas_triton'.*no Pallas Triton"):
    text = _lower(fn, args, "cuda", monkeypatch)
  assert "triton" not in text and "custom_call" not in text  # (the XLA kernel)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # one warning per cause, not one per call
    _lower(fn, args, "cuda", monkeypatch)
  # the tuned choice (the shipped H100 config names pallas_triton here) falls back the same way
  monkeypatch.setattr(configs, "device_kind", lambda device=None: "nvidia_h100_80gb_hbm3")
  with abstract_gpu():
    kernel, source = jxent.chosen_implementation("xent", (8192, 128256), "bfloat16")
  assert kernel == jxent.XlaKernel() and source.startswith("shipped:")


def test_explicit_triton_raises_a_clear_error_when_it_is_gone(no_triton, monkeypatch):
  fn, args = _mean_value_and_grad("pallas_triton")
  with pytest.raises(ValueError, match="'pallas_triton' cannot be built here: jax .* has no Pallas "
                                       "Triton backend"):
    _lower(fn, args, "cuda", monkeypatch)


def test_a_triton_lowering_failure_also_falls_back(monkeypatch):
  class Broken:
    def CompilerParams(self, **kw):  # noqa: N802  (plgpu's name)
      raise NotImplementedError("no Triton lowering rule for pallas_call")

  monkeypatch.setattr(pallas_triton, "_plgpu", lambda: Broken())
  monkeypatch.setattr(dispatch, "_WARNED", set())
  pallas_triton.unavailable.cache_clear()
  try:
    fn, args = _mean_value_and_grad(None)
    with pytest.warns(RuntimeWarning, match="does not lower for CUDA.*no Triton lowering rule"):
      _lower(fn, args, "cuda", monkeypatch)
    with pytest.raises(ValueError, match="cannot be built here.*does not lower for CUDA"):
      _lower(*_mean_value_and_grad("pallas_triton"), "cuda", monkeypatch)
  finally:
    pallas_triton.unavailable.cache_clear()


@pytest.mark.parametrize("sparse", [True, False])
def test_mosaic_gpu_fused_mean_is_its_two_walks(sparse, monkeypatch):
  """value_and_grad of the mean with the Mosaic GPU kernel: its fused form is the statistics walk
  and the gradient walk, two Mosaic GPU calls (the backward only scales the gradient)."""
  kernel = pallas_mosaic_gpu.PallasMosaicGpuKernel()
  x = jax.ShapeDtypeStruct((512, 128256), jnp.bfloat16)
  y = jax.ShapeDtypeStruct((512,), jnp.int32) if sparse else x
  fn = (jxent.softmax_cross_entropy_with_integer_labels if sparse else jxent.softmax_cross_entropy)
  text = _lower(lambda x, y: jax.value_and_grad(lambda x: fn(x, y, implementation=kernel,
                                                             reduction="mean"))(x), (x, y), "cuda",
                monkeypatch)
  assert text.count(TARGETS["pallas_mosaic_gpu"][1]) == 2


def test_mosaic_gpu_tiles_fit_shared_memory():
  """The tile plan: stages first, then block_c, shrink until the tiles fit the budget; aligned
  LLM shapes need no padding."""
  k = pallas_mosaic_gpu.PallasMosaicGpuKernel(block_c=256, max_concurrent_steps=8)
  f32, bf16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
  for piped, slotted in (((bf16,), ()), ((f32,), ()), ((f32, f32), (f32, f32)), ((bf16,), (bf16,))):
    rp, cp, bc, steps, stages = k._geometry(8192, 128256, piped, slotted)
    used = 64 * bc * (stages * sum(d.itemsize for d in piped) + 2 * sum(d.itemsize for d in slotted))
    assert used <= pallas_mosaic_gpu.SMEM_BUDGET and bc % 64 == 0 and cp == steps * bc
    assert stages >= 2 or bc == 64
  assert k._geometry(8192, 128256, (bf16,)) == (8192, 128256, 256, 501, 6)
  assert k._geometry(8192, 128256, (f32, f32), (f32, f32)) == (8192, 128256, 64, 2004, 2)
  with pytest.raises(ValueError, match="block_c must be a multiple of 64 up to 256, got 512"):
    pallas_mosaic_gpu.PallasMosaicGpuKernel(block_c=512)
  assert pallas_mosaic_gpu.PallasMosaicGpuKernel()._geometry(100, 4099, (bf16,)) == (128, 4352, 256, 17, 3)
