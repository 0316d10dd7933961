"""Test configuration: 8 simulated CPU devices (set before JAX starts) and the kernels under test."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

import jxent  # noqa: E402


def kernels():
  """Every implementation, runnable on CPU (Pallas kernels in interpret mode)."""
  from jxent._src import pallas_mosaic_tpu, pallas_triton
  return [
      pytest.param(jxent.XlaKernel(), id="xla"),
      pytest.param(jxent.XlaAutodiffKernel(), id="xla_autodiff"),
      pytest.param(jxent.ChunkedXlaKernel(block=16), id="chunked_xla"),
      pytest.param(pallas_triton.PallasTritonKernel(interpret=True, block_c=16), id="pallas_triton"),
      # block_c=64: rows up to 64 classes take the fused kernel's one-load path
      pytest.param(pallas_triton.PallasTritonKernel(interpret=True, block_c=64, programs=3,
                                                    row_groups=4),
                   id="pallas_triton_persistent_groups"),
      pytest.param(pallas_mosaic_tpu.PallasMosaicTpuKernel(interpret=True, block_r=8, block_c=128),
                   id="pallas_mosaic_tpu"),
  ]


@pytest.fixture(scope="session", autouse=True)
def _devices():
  assert jax.device_count() == 8, "tests expect 8 simulated CPU devices"
