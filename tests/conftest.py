"""Test configuration: 8 simulated CPU devices (set before JAX starts), a compile set-up for a fast
suite, and the kernels under test.

Most of the suite's time is XLA compiling small programs for the CPU, so three settings are made
here (together they take the suite on 2 cores from about 6 min to about 3 min):

* ``--xla_cpu_use_fusion_emitters=false``: XLA's CPU backend generates its fusions with the
  older, direct LLVM IR emitters instead of the MLIR fusion emitters, which take about twice as
  long to compile these small programs. The HLO the tests check is the same.
* ``--xla_backend_optimization_level=0``: LLVM does not optimise the generated code. Without
  fast-math LLVM keeps IEEE results either way (an FMA contraction at most moves a last bit).
* JAX's persistent compilation cache, one fresh folder per pytest process (an xdist worker never
  shares it, so there is no write race), removed at exit: tests that build the same program again
  (the references, the same kernel at the same shape) load it instead of compiling it.

The two flags are probed once in a subprocess (an XLA that no longer knows a flag aborts at start):
only the accepted ones are used. Subprocesses (the CLI, the examples, ``gpu_run.py --dry-run``)
inherit them through ``XLA_FLAGS``. ``JXENT_TEST_XLA_OPT=1`` runs the suite with XLA's default
compiler settings instead (what users get), at about twice the time.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

_FAST_COMPILE = ("--xla_cpu_use_fusion_emitters=false", "--xla_backend_optimization_level=0")


def _accepted(flags) -> bool:
  env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                         capture_output=True, timeout=120)
  return probe.returncode == 0


def _set_xla_flags():
  flags = os.environ.get("XLA_FLAGS", "").split()
  if "--xla_force_host_platform_device_count=8" not in flags:
    flags.append("--xla_force_host_platform_device_count=8")
  # The controller probes; xdist workers and subprocesses inherit the result through the marker.
  if os.environ.get("JXENT_TEST_XLA_OPT") != "1" and "JXENT_TEST_FAST_COMPILE" not in os.environ:
    fast = list(_FAST_COMPILE) if _accepted(_FAST_COMPILE) else [f for f in _FAST_COMPILE
                                                                 if _accepted([f])]
    flags += [f for f in fast if f not in flags]
    os.environ["JXENT_TEST_FAST_COMPILE"] = " ".join(fast)
  os.environ["XLA_FLAGS"] = " ".join(flags)


os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_set_xla_flags()

import jax  # noqa: E402
import pytest  # noqa: E402

import jxent  # noqa: E402

_CACHE = tempfile.mkdtemp(prefix="jxent-test-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _per_device_barrier_check():
  """Mosaic GPU interpret mode on several devices (``shard_map``): JAX's interpreter checks, as a
  kernel ends on one device, that no barrier of *any* device is still allocated, while the other
  devices may still be running theirs (jax 0.10.2-0.12: ``gpu_callbacks._assert_no_barriers_allocated``
  reads the one shared memory of all devices). The failed check leaves that device out of the
  clean-up barrier, and the suite hangs. The check is kept where it is sound (one device) and
  skipped on meshes; each device's barriers are still deallocated and checked by the interpreter
  as the kernel frees them."""
  try:
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
  except ImportError:  # (no Mosaic GPU interpreter in this jax: nothing to patch)
    return
  check = getattr(gpu_callbacks, "_assert_no_barriers_allocated", None)
  if check is None:
    return

  def per_device(token):
    if gpu_callbacks._get_shared_memory().num_devices == 1:
      return check(token)
    return token
  gpu_callbacks._assert_no_barriers_allocated = per_device


_per_device_barrier_check()


def kernels():
  """Every implementation, runnable on CPU (Pallas kernels in interpret mode)."""
  from jxent._src.kernels import pallas_mosaic_gpu, pallas_mosaic_tpu, pallas_triton
  return [
      pytest.param(jxent.XlaKernel(), id="xla"),
      pytest.param(jxent.XlaAutodiffKernel(), id="xla_autodiff"),
      pytest.param(jxent.ChunkedXlaKernel(block=16), id="chunked_xla"),
      pytest.param(pallas_triton.PallasTritonKernel(interpret=True, block_c=16), id="pallas_triton"),
      # block_c=64: rows up to 64 classes take the fused kernel's one-load path; longer rows
      # walk their gradient from the last block (the default kernel above: from the first)
      pytest.param(pallas_triton.PallasTritonKernel(interpret=True, block_c=64, programs=3,
                                                    row_groups=4, reverse_grad=True),
                   id="pallas_triton_persistent_groups"),
      pytest.param(pallas_mosaic_tpu.PallasMosaicTpuKernel(interpret=True, block_r=8, block_c=128),
                   id="pallas_mosaic_tpu"),
      # block_c=64: rows over 64 classes walk several pipelined tiles (two in flight)
      pytest.param(pallas_mosaic_gpu.PallasMosaicGpuKernel(interpret=True, block_c=64,
                                                           max_concurrent_steps=2),
                   id="pallas_mosaic_gpu"),
  ]


@pytest.fixture(scope="session", autouse=True)
def _devices():
  assert jax.device_count() == 8, "tests expect 8 simulated CPU devices"
