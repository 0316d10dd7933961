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


def smap(f, m, in_specs, out_specs):
  return jax.shard_map(f, mesh=m, in_specs=in_specs, out_specs=out_specs)


@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("impl", ["xla", "chunked_xla"])
def test_vocab_parallel_integer_labels(tp, options, impl):
  rng = np.random.default_rng(tp)
  b, v = 16, 8 * 13
  x = rand_logits(rng, (b, v))
  y = jnp.asarray(rng.integers(0, v, size=b)).at[3].set(-100)
  g = jnp.asarray(rng.normal(size=b), jnp.float32)
  kw = dict(ignore_index=-100, implementation=impl, **options)
  m = mesh(tp)
  sharded = smap(lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(
      x, y, axis_name="model", **kw), m, (P("data", "model"), P("data")), P("data"))
  full = lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(x, y, **kw)
  out, vjp = jax.vjp(jax.jit(sharded), x, y)
  ref, rvjp = jax.vjp(full, x, y)
  assert_close(out, ref)
  assert_close(vjp(g)[0], rvjp(g)[0])
  mean = smap(lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(
      x, y, axis_name="model", **kw), m, (P("data", "model"), P("data")), P("data"))
  assert_close(jax.jit(jax.grad(lambda x: mean(x, y).sum()))(x), jax.grad(lambda x: full(x, y).sum())(x))


@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("options", OPTIONS)
def test_vocab_parallel_dense_labels(tp, options):
  rng = np.random.default_rng(10 + tp)
  b, v = 8, 8 * 9
  x = rand_logits(rng, (b, v))
  y = jnp.asarray(rand_probs(rng, (b, v)) * 1.3)  # not normalised: exercises sum(labels)
  g = jnp.asarray(rng.normal(size=b), jnp.float32)
  m = mesh(tp)
  sharded = smap(lambda x, y: jxent.softmax_cross_entropy(x, y, axis_name="model", **options), m,
                 (P("data", "model"), P("data", "model")), P("data"))
  full = lambda x, y: jxent.softmax_cross_entropy(x, y, **options)
  out, vjp = jax.vjp(jax.jit(sharded), x, y)
  ref, rvjp = jax.vjp(full, x, y)
  assert_close(out, ref)
  for a, b_ in zip(vjp(g), rvjp(g)):
    assert_close(a, b_)


@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vocab_parallel_linear(tp, reduction):
  rng = np.random.default_rng(20 + tp)
  n, d, v = 16, 12, 8 * 11
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32)
  y = jnp.asarray(rng.integers(0, v, size=n)).at[0].set(-1)
  kw = dict(ignore_index=-1, z_loss=1e-3, label_smoothing=0.1, reduction=reduction,
            implementation=jxent.LinearChunked(block_v=4))
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
