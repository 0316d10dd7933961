"""Shared test helpers: random inputs and dtype-scaled tolerances."""

import jax.numpy as jnp
import numpy as np

TOL = {jnp.float32: 2e-5, jnp.float16: 2e-2, jnp.bfloat16: 6e-2, jnp.float64: 1e-9}


def tol(dtype, scale=1.0):
  return TOL[jnp.dtype(dtype).type] * scale


def rand_logits(rng, shape, dtype=jnp.float32, scale=3.0):
  return jnp.asarray(rng.normal(size=shape) * scale, dtype)


def rand_probs(rng, shape, axis=-1):
  p = rng.random(size=shape) + 0.05
  return (p / p.sum(axis=axis, keepdims=True)).astype(np.float32)


def assert_close(actual, expected, dtype=jnp.float32, scale=1.0, what=""):
  a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  e = np.asarray(expected, np.float64)
  t = tol(dtype, scale)
  np.testing.assert_allclose(a, e, rtol=t, atol=t, err_msg=what)


# The GPU that the CUDA lowering tests target from this CPU host. From jax 0.11 Triton lowering
# asks for the device's compute capability and, with no GPU, needs an abstract one.
H200 = dict(device_kind="NVIDIA H200", num_cores=132, platform="gpu")


def abstract_gpu():
  """``with abstract_gpu(): ...lower(lowering_platforms=("cuda",))`` lowers for an H200 on a host
  without a GPU (every supported jax: the APIs exist from 0.10)."""
  from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh
  return use_abstract_mesh(AbstractMesh((), (), abstract_device=AbstractDevice(**H200)))


def abstract_gpu_mesh(mesh):
  """``mesh`` (concrete, CPU devices) as an abstract mesh of H200s, for shard_map lowering."""
  from jax.sharding import AbstractDevice
  return mesh.abstract_mesh.update(abstract_device=AbstractDevice(**H200))
