"""Vocab-parallel (axis_name inside shard_map), data parallel (jit + NamedSharding) and pmap, on 8
simulated CPU devices, against the single-device result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jxent
from helpers import assert_close, rand_logits, rand_probs

OPTIONS = [{}, {"label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 5.0}]


def mesh(tp):
  devs = np.array(jax.devices()[:8]).reshape(8 // tp, tp)
  return Mesh(devs, ("data", "model"))


def smap(f, m, in_specs, out_specs, check_vma=True):
  return jax.shard_map(f, mesh=m, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)


def _triton(**kw):
  from jxent._src.kernels.pallas_triton import PallasTritonKernel
  return PallasTritonKernel(interpret=True, block_c=16, **kw)


def _mosaic():
  from jxent._src.kernels.pallas_mosaic_tpu import PallasMosaicTpuKernel
  return PallasMosaicTpuKernel(interpret=True, block_r=8, block_c=128)


def _mosaic_gpu():
  from jxent._src.kernels.pallas_mosaic_gpu import PallasMosaicGpuKernel
  return PallasMosaicGpuKernel(interpret=True, block_c=64, max_concurrent_steps=2)


@pytest.mark.parametrize("tp", [2, 8])  # (the smallest and the widest model axis)
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("impl", ["xla", "xla_autodiff", "chunked_xla", "pallas_triton",
                                  "pallas_triton_groups", "pallas_mosaic_tpu", "pallas_mosaic_gpu"])
def test_vocab_parallel_integer_labels(tp, options, impl):
  # Pallas interpret mode (the HLO interpreter) cannot type-check manual axes yet (JAX asks for
  # check_vma=False); tests/test_lowering.py lowers the compiled kernel with check_vma=True.
  vma = not impl.startswith("pallas")
  impl = {"pallas_triton": _triton(), "pallas_triton_groups": _triton(row_groups=4, programs=3),
          "pallas_mosaic_tpu": _mosaic(), "pallas_mosaic_gpu": _mosaic_gpu()}.get(impl, impl)
  rng = np.random.default_rng(tp)
  b, v = 16, 8 * 13
  x = rand_logits(rng, (b, v))
  y = jnp.asarray(rng.integers(0, v, size=b)).at[3].set(-100)
  g = jnp.asarray(rng.normal(size=b), jnp.float32)
  kw = dict(ignore_index=-100, implementation=impl, **options)
  m = mesh(tp)
  sharded = smap(lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(
      x, y, axis_name="model", **kw), m, (P("data", "model"), P("data")), P("data"), vma)
  full = lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(x, y, **kw)
  out, vjp = jax.vjp(jax.jit(sharded), x, y)
  ref, rvjp = jax.vjp(full, x, y)
  assert_close(out, ref)
  # (the backward jitted too: Mosaic GPU's interpreter waits for every device of the mesh in one
  # barrier, which eager shard_map, running the devices in turn, never reaches)
  assert_close(jax.jit(vjp)(g)[0], rvjp(g)[0])
  # a scalar reduction per data shard (kernels with a fused path use forward + backward here)
  total = smap(lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(
      x, y, axis_name="model", reduction="sum", **kw)[None], m, (P("data", "model"), P("data")),
      P("data"), vma)
  v, dx = jax.jit(jax.value_and_grad(lambda x: total(x, y).sum()))(x)
  rv, rdx = jax.value_and_grad(lambda x: full(x, y).sum())(x)
  assert_close(v, rv)
  assert_close(dx, rdx)


@pytest.mark.parametrize("tp", [2, 8])  # (the smallest and the widest model axis)
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("impl", ["xla", "xla_autodiff", "pallas_triton", "pallas_mosaic_tpu",
                                  "pallas_mosaic_gpu"])
def test_vocab_parallel_dense_labels(tp, options, impl):
  vma = impl.startswith("xla")  # see test_vocab_parallel_integer_labels
  impl = {"pallas_triton": _triton(), "pallas_mosaic_tpu": _mosaic(),
          "pallas_mosaic_gpu": _mosaic_gpu()}.get(impl, impl)
  options = dict(options, implementation=impl)
  rng = np.random.default_rng(10 + tp)
  b, v = 8, 8 * 9
  x = rand_logits(rng, (b, v))
  y = jnp.asarray(rand_probs(rng, (b, v)) * 1.3)  # not normalised: exercises sum(labels)
  g = jnp.asarray(rng.normal(size=b), jnp.float32)
  m = mesh(tp)
  sharded = smap(lambda x, y: jxent.softmax_cross_entropy(x, y, axis_name="model", **options), m,
                 (P("data", "model"), P("data", "model")), P("data"), vma)
  full = lambda x, y: jxent.softmax_cross_entropy(x, y, **options)
  out, vjp = jax.vjp(jax.jit(sharded), x, y)
  ref, rvjp = jax.vjp(full, x, y)
  assert_close(out, ref)
  for a, b_ in zip(jax.jit(vjp)(g), rvjp(g)):  # (jitted: see above)
    assert_close(a, b_)


def _plain_jax_vocab_parallel(x, y):
  """Vocab-parallel cross-entropy written in plain JAX (autodiff through the collectives)."""
  mx = jax.lax.pmax(jax.lax.stop_gradient(x.max(-1)), "model")
  z = jax.lax.psum(jnp.exp(x - mx[:, None]).sum(-1), "model")
  local = y - jax.lax.axis_index("model") * x.shape[1]
  hit = (local >= 0) & (local < x.shape[1])
  picked = jnp.take_along_axis(x, jnp.clip(local, 0, x.shape[1] - 1)[:, None], -1)[:, 0]
  return jnp.log(z) + mx - jax.lax.psum(jnp.where(hit, picked, 0.0), "model")


@pytest.mark.parametrize("check_vma", [True, False])
def test_vocab_parallel_gradients_match_plain_jax(check_vma):
  """shard_map with check_vma=False splits a replicated output's cotangent among the shards; the
  custom VJPs add the parts back, so gradients equal plain JAX (and the unsharded ones)."""
  rng = np.random.default_rng(31)
  x = rand_logits(rng, (8, 32))
  y = jnp.asarray(rng.integers(0, 32, size=8))
  m = mesh(2)
  for impl in ("xla", "xla_autodiff", "chunked_xla"):
    f = smap(lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(
        x, y, axis_name="model", implementation=impl), m, (P("data", "model"), P("data")),
        P("data"), check_vma)
    plain = smap(_plain_jax_vocab_parallel, m, (P("data", "model"), P("data")), P("data"),
                 check_vma)
    g = jax.jit(jax.grad(lambda x: f(x, y).sum()))(x)
    assert_close(g, jax.grad(lambda x: plain(x, y).sum())(x))
    assert_close(g, jax.grad(lambda x: jxent.softmax_cross_entropy_with_integer_labels(
        x, y).sum())(x))
  h = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(6, 32)), jnp.float32)
  impl = jxent.LinearChunked(block_v=4)
  lin = smap(lambda h, w, y: jxent.linear_softmax_cross_entropy(
      h, w, y, axis_name="model", reduction="none", implementation=impl), m,
      (P("data"), P(None, "model"), P("data")), P("data"), check_vma)
  grads = jax.jit(jax.grad(lambda h, w: lin(h, w, y).sum(), argnums=(0, 1)))(h, w)
  ref = jax.grad(lambda h, w: jxent.linear_softmax_cross_entropy(
      h, w, y, reduction="sum", implementation=impl), argnums=(0, 1))(h, w)
  for a, b in zip(grads, ref):
    assert_close(a, b)


def test_vocab_parallel_under_pmap_matches_plain_jax():
  """Under pmap a psum transposes to a psum (each device's gradient of a replicated loss is
  summed over the devices); jxent follows plain JAX there too."""
  rng = np.random.default_rng(32)
  x = rand_logits(rng, (8, 32))
  y = jnp.asarray(rng.integers(0, 32, size=8))
  xs = x.reshape(8, 2, 16).transpose(1, 0, 2)
  grad = lambda f: jax.pmap(jax.grad(lambda x, y: f(x, y).sum()), axis_name="model",
                            in_axes=(0, None))(xs, y)
  got = grad(lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(x, y, axis_name="model"))
  assert_close(got, grad(_plain_jax_vocab_parallel))


@pytest.mark.parametrize("tp, block_n", [(2, None), (4, None), (8, None), (2, 3)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vocab_parallel_linear(tp, reduction, block_n):
  rng = np.random.default_rng(20 + tp)
  n, d, v = 16, 12, 8 * 11
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32)
  y = jnp.asarray(rng.integers(0, v, size=n)).at[0].set(-1)
  kw = dict(ignore_index=-1, z_loss=1e-3, label_smoothing=0.1, reduction=reduction,
            implementation=jxent.LinearChunked(block_v=4, block_n=block_n))
  m = mesh(tp)
  out_spec = P() if reduction == "mean" else P("data")
  # Mean over the local rows of each data shard, then the mean of those (equal sizes).
  def local(x, w, y):
    out = jxent.linear_softmax_cross_entropy(x, w, y, axis_name="model", **kw)
    return jax.lax.pmean(out, "data") if reduction == "mean" else out
  sharded = smap(local, m, (P("data", None), P(None, "model"), P("data")), out_spec)
  def full(x, w, y):
    if reduction == "mean":  # mean of per-shard means, as above
      parts = [jxent.linear_softmax_cross_entropy(x[i::1][k * (n // (8 // tp)):(k + 1) * (n // (8 // tp))],
                                                  w, y[k * (n // (8 // tp)):(k + 1) * (n // (8 // tp))], **kw)
               for k in range(8 // tp) for i in [0]]
      return sum(parts) / len(parts)
    return jxent.linear_softmax_cross_entropy(x, w, y, **kw)
  f_s = lambda x, w: jnp.sum(sharded(x, w, y) * 1.7)
  f_r = lambda x, w: jnp.sum(full(x, w, y) * 1.7)
  assert_close(jax.jit(f_s)(x, w), f_r(x, w))
  gs = jax.jit(jax.grad(f_s, argnums=(0, 1)))(x, w)
  gr = jax.grad(f_r, argnums=(0, 1))(x, w)
  assert_close(gs[0], gr[0])
  assert_close(gs[1], gr[1])


def test_data_parallel_jit_keeps_batch_sharding():
  m = Mesh(np.array(jax.devices()[:8]), ("batch",))
  rng = np.random.default_rng(0)
  x = jax.device_put(rand_logits(rng, (32, 50)), NamedSharding(m, P("batch")))
  y = jax.device_put(jnp.asarray(rng.integers(0, 50, size=32)), NamedSharding(m, P("batch")))
  f = jax.jit(lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(x, y))
  out = f(x, y)
  assert out.sharding.is_equivalent_to(NamedSharding(m, P("batch")), 1)
  assert_close(out, jxent.softmax_cross_entropy_with_integer_labels(np.asarray(x), np.asarray(y)))
  g = jax.jit(jax.grad(lambda x: jxent.softmax_cross_entropy_with_integer_labels(
      x, y, reduction="mean")))(x)
  assert g.sharding.is_equivalent_to(NamedSharding(m, P("batch")), 2)
  hlo = f.lower(x, y).compile().as_text()
  assert "all-gather" not in hlo  # no logits gathered


def test_pmap_and_keras_under_pmap_vmap():
  rng = np.random.default_rng(1)
  x = rand_logits(rng, (8, 4, 10))
  y = jnp.asarray(rng.integers(0, 10, size=(8, 4)))
  out = jax.pmap(lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(x, y, reduction="mean"))(x, y)
  ref = jax.vmap(lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(x, y, reduction="mean"))(x, y)
  assert_close(out, ref)
  loss = jxent.keras.CategoricalCrossentropy(from_logits=True)
  yd = jax.nn.one_hot(y, 10)
  assert_close(jax.pmap(loss)(yd, x), jax.vmap(loss)(yd, x))
  # pmap with a vocab-parallel axis name
  xs = x[0].reshape(4, 10).T.reshape(10, 4)  # unused shape check
  del xs
  xv = rand_logits(rng, (4, 8 * 5))
  yv = jnp.asarray(rng.integers(0, 40, size=4))
  shards = xv.reshape(4, 8, 5).transpose(1, 0, 2)
  out = jax.pmap(lambda s: jxent.softmax_cross_entropy_with_integer_labels(s, yv, axis_name="i"),
                 axis_name="i")(shards)
  assert_close(out[0], jxent.softmax_cross_entropy_with_integer_labels(xv, yv))


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("impl", ["xla", "xla_autodiff", "chunked_xla", "pallas_triton",
                                  "pallas_triton_groups", "pallas_mosaic_tpu", "pallas_mosaic_gpu"])
def test_vocab_parallel_class_weight(sparse, impl):
  """class_weight with axis_name: each shard passes its slice of the global weight vector;
  loss, dlogits and dclass_weight match the single-device call."""
  vma = not impl.startswith("pallas")  # see test_vocab_parallel_integer_labels
  impl = {"pallas_triton": _triton(), "pallas_triton_groups": _triton(row_groups=4, programs=3),
          "pallas_mosaic_tpu": _mosaic(), "pallas_mosaic_gpu": _mosaic_gpu()}.get(impl, impl)
  rng = np.random.default_rng(40)
  b, v = 8, 8 * 7
  x = rand_logits(rng, (b, v))
  w = jnp.asarray(rng.uniform(0.2, 2.0, size=v), jnp.float32)
  g = jnp.asarray(rng.normal(size=b), jnp.float32)
  kw = dict(implementation=impl, label_smoothing=0.1, z_loss=1e-3)
  if sparse:
    y = jnp.asarray(rng.integers(0, v, size=b)).at[3].set(-100)
    fn = lambda x, y, w, **a: jxent.softmax_cross_entropy_with_integer_labels(
        x, y, ignore_index=-100, class_weight=w, **kw, **a)
    y_spec = P("data")
  else:
    y = jnp.asarray(rand_probs(rng, (b, v)))
    fn = lambda x, y, w, **a: jxent.softmax_cross_entropy(x, y, class_weight=w, **kw, **a)
    y_spec = P("data", "model")
  m = mesh(4)
  sharded = smap(lambda x, y, w: fn(x, y, w, axis_name="model"), m,
                 (P("data", "model"), y_spec, P("model")), P("data"), vma)
  out, vjp = jax.vjp(jax.jit(sharded), x, y, w)
  ref, rvjp = jax.vjp(lambda x, y, w: fn(x, y, w), x, y, w)
  assert_close(out, ref)
  got, want = vjp(g), rvjp(g)
  assert_close(got[0], want[0], what="dlogits")
  assert_close(got[2], want[2], what="dclass_weight")


@pytest.mark.parametrize("block_n", [None, 5])
def test_vocab_parallel_linear_class_weight(block_n):
  """linear_chunked with axis_name and each shard's slice of the class weight."""
  rng = np.random.default_rng(41)
  n, d, v = 16, 12, 8 * 11
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32)
  cw = jnp.asarray(rng.uniform(0.2, 2.0, size=v), jnp.float32)
  y = jnp.asarray(rng.integers(0, v, size=n)).at[0].set(-1)
  kw = dict(ignore_index=-1, z_loss=1e-3, label_smoothing=0.1, reduction="none",
            implementation=jxent.LinearChunked(block_v=4, block_n=block_n))
  m = mesh(4)
  sharded = smap(lambda x, w, cw: jxent.linear_softmax_cross_entropy(
      x, w, y, axis_name="model", class_weight=cw, **kw), m,
      (P(), P(None, "model"), P("model")), P())
  full = lambda x, w, cw: jxent.linear_softmax_cross_entropy(x, w, y, class_weight=cw, **kw)
  g = jnp.asarray(rng.normal(size=n), jnp.float32)
  out, vjp = jax.vjp(jax.jit(sharded), x, w, cw)
  ref, rvjp = jax.vjp(full, x, w, cw)
  assert_close(out, ref)
  for a, b, what in zip(vjp(g), rvjp(g), ("dx", "dw", "dclass_weight")):
    assert_close(a, b, what=what)
