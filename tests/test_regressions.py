"""Regression tests for faults found by running the peers' test suites with jxent in their place
(NaN rows, labels gradients, eager shard_map, float64 tails, optax's axis forms, option types)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import jxent
from conftest import kernels
from helpers import assert_close, rand_logits, rand_probs


def _sum(fn, **kw):
  return lambda x, y: jnp.sum(fn(x, y, **kw))


def test_autodiff_labels_gradient_at_zero_labels():
  # optax SoftmaxCrossEntropyTest.test_gradient's inputs: d/dlabels = lse - x, zero labels too.
  x = jnp.array([[10.0, 1.0, -2.0], [1.0, 4.0, 0.2]])
  y = jnp.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  expect = jax.grad(lambda y: jnp.sum(optax.softmax_cross_entropy(x, y)))(y)
  for impl in ("xla", "xla_autodiff"):
    f = lambda y: jnp.sum(jxent.softmax_cross_entropy(x, y, implementation=impl))
    assert_close(jax.grad(f)(y), expect, what=impl)
    np.testing.assert_allclose(jax.grad(f)(y)[0], [1.2e-4, 9.0001, 12.0001], atol=1e-4)
  f = lambda y: jnp.sum(jxent.softmax_cross_entropy(x, y, implementation="xla_autodiff"))
  _, tangent = jax.jvp(f, (y,), (jnp.ones_like(y),))
  assert_close(tangent, jnp.sum(expect))


def test_autodiff_labels_gradient_segmented_rows():
  # Rows above 4096 classes are reduced in segments on CPU: the labels derivative must not lose
  # the segments' shift where a segment's labels are all 0.
  rng = np.random.default_rng(0)
  x = rand_logits(rng, (3, 5000))
  y = jnp.asarray(np.eye(5000, dtype=np.float32)[[1, 4999, 2500]])
  expect = jax.grad(lambda y: jnp.sum(optax.softmax_cross_entropy(x, y)))(y)
  got = jax.grad(lambda y: jnp.sum(jxent.softmax_cross_entropy(
      x, y, implementation="xla_autodiff")))(y)
  assert_close(got, expect, scale=5)


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_out_of_range_labels_nan_gradient_rows(kernel, reduction):
  # TF SparseXentOpTestBase.testInvalidLabelGPU: loss and gradient rows NaN for labels outside
  # [0, C); ignore_index rows and rows masked by `where` keep 0.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)), jnp.float32)
  y = jnp.array([4, 0, -1, -100, 2])
  where = jnp.array([True, True, True, True, False])
  f = lambda x: jnp.sum(jxent.softmax_cross_entropy_with_integer_labels(
      x, y, where=where, ignore_index=-100, reduction=reduction, implementation=kernel))
  loss = np.asarray(jxent.softmax_cross_entropy_with_integer_labels(
      x, y, ignore_index=-100, implementation=kernel))
  grad = np.asarray(jax.grad(f)(x))
  assert np.isnan(loss[[0, 2]]).all() and np.isfinite(loss[[1, 3, 4]]).all()
  assert np.isnan(grad[[0, 2]]).all(), grad
  assert np.isfinite(grad[1]).all() and not np.asarray(grad[[3, 4]]).any()


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_all_neginf_row_nan_loss_and_gradient(kernel, reduction):
  # TF and optax: a row of -inf logits gives NaN for the loss and its gradient alike.
  x = jnp.array([[-jnp.inf, -jnp.inf], [1.0, 2.0]])
  y = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  f = lambda x: jnp.sum(jxent.softmax_cross_entropy(x, y, reduction=reduction,
                                                    implementation=kernel))
  loss, grad = jax.value_and_grad(f)(x)
  grad = np.asarray(grad)
  assert np.isnan(loss)
  assert np.isnan(grad[0]).all() and np.isfinite(grad[1]).all()
  _, ograd = jax.value_and_grad(lambda x: jnp.sum(optax.softmax_cross_entropy(x, y)))(x)
  assert np.isnan(ograd[0]).all()
  # sparse labels too
  f = lambda x: jnp.sum(jxent.softmax_cross_entropy_with_integer_labels(
      x, jnp.array([0, 1]), reduction=reduction, implementation=kernel))
  grad = np.asarray(jax.grad(f)(x))
  assert np.isnan(grad[0]).all() and np.isfinite(grad[1]).all()


def _mesh():
  return Mesh(np.array(jax.devices()[:4]), ("model",))


@pytest.mark.parametrize("impl,eager", [("xla", "shard_map"), ("xla", "disable_jit"),
                                        ("xla_autodiff", "shard_map")])
def test_eager_shard_map(impl, eager):
  # shard_map without jit used to raise NotImplementedError (custom_vjp symbolic zeros). (Every
  # custom-VJP kernel goes through core.call_vjp: "xla" stands for them. Eager shard_map
  # dispatches op by op: the full set of forms runs once, the other cases the vocab form.)
  rng = np.random.default_rng(3)
  x = rand_logits(rng, (6, 16))
  y = jnp.asarray(rng.integers(0, 16, size=6))
  yd = jnp.asarray(rand_probs(rng, (6, 16)))
  m = Mesh(np.array(jax.devices()[:2]), ("model",))
  vocab = jax.shard_map(lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(
      x, y, axis_name="model", implementation=impl), mesh=m, in_specs=(P(None, "model"), P()),
      out_specs=P())
  ref = jxent.softmax_cross_entropy_with_integer_labels(x, y)
  if eager == "disable_jit":
    with jax.disable_jit():
      assert_close(vocab(x, y), ref)
    return
  assert_close(vocab(x, y), ref)
  assert_close(jax.grad(lambda x: jnp.sum(vocab(x, y)))(x),
               jax.grad(lambda x: jnp.sum(jxent.softmax_cross_entropy_with_integer_labels(x, y)))(x))
  if impl != "xla":
    return
  dense = jax.shard_map(lambda x, y: jxent.softmax_cross_entropy(
      x, y, axis_name="model", implementation=impl), mesh=m,
      in_specs=(P(None, "model"), P(None, "model")), out_specs=P())
  data = jax.shard_map(lambda x, y: jxent.softmax_cross_entropy(x, y, implementation=impl)[None],
                       mesh=m, in_specs=(P(), P()), out_specs=P("model"))
  ref_d = jxent.softmax_cross_entropy(x, yd)
  assert_close(dense(x, yd), ref_d)
  assert_close(data(x, yd).reshape(2, 6)[0], ref_d)
  inner = jax.shard_map(lambda x, y: jax.grad(lambda x: jnp.sum(
      jxent.softmax_cross_entropy_with_integer_labels(x, y, implementation=impl)))(x),
      mesh=m, in_specs=(P("model"), P("model")), out_specs=P("model"))
  ref_g = jax.grad(lambda x: jnp.sum(jxent.softmax_cross_entropy_with_integer_labels(x, y)))(x)
  assert_close(inner(x, y), ref_g)


# ---- float64 tails (TF xent_op_test.py, newer than 2.21) ---------------------------------------
TAIL = 37.42994775023705


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("impl", ["xla", "chunked_xla", "xla_autodiff"])
@pytest.mark.parametrize("target", [0, 1])
def test_float64_small_gradient(x64, impl, target):
  # testSmallGradientAcrossDtypes / testSmallGradientThroughPublicApi: the dominant class's
  # gradient is -exp(-37.43) = -5.55e-17, not 0.
  logits = np.zeros((4096, 2))
  logits[:, target] = TAIL
  labels = np.zeros((4096, 2))
  labels[:, target] = 1.0
  tail = np.exp(-TAIL)
  expected = np.full_like(logits, tail)
  expected[:, target] = -tail
  x = jnp.asarray(logits)
  for f in (lambda x: jxent.softmax_cross_entropy(x, labels, implementation=impl),
            lambda x: jxent.softmax_cross_entropy_with_integer_labels(
                x, jnp.full((4096,), target), implementation=impl),
            lambda x: jxent.nn.softmax_cross_entropy_with_logits_v2(labels, x)):
    grad = jax.grad(lambda x: jnp.sum(f(x)))(x)
    assert grad.dtype == jnp.float64
    np.testing.assert_allclose(grad, expected, rtol=1e-14, atol=0)
    assert (grad[:, target] < 0).all() and (grad[:, 1 - target] > 0).all()


# (TF's multi-class tail and positive-zero cases: tests/peers/test_peer_tf.py)


def test_float64_matches_float64_reference(x64):
  # the exact-tail form is still the gradient: random rows, options, vs float64 autodiff of the
  # naive formula (optax).
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(7, 33)) * 4)
  y = jnp.asarray(rng.integers(0, 33, size=7))
  yd = jnp.asarray(rand_probs(rng, (7, 33)), jnp.float64)
  g = jnp.asarray(rng.normal(size=7))
  for impl in ("xla", "chunked_xla"):
    _, vjp = jax.vjp(lambda x: jxent.softmax_cross_entropy_with_integer_labels(
        x, y, implementation=impl, z_loss=1e-3, label_smoothing=0.1), x)
    _, rvjp = jax.vjp(lambda x: optax.softmax_cross_entropy(
        x, 0.9 * jax.nn.one_hot(y, 33) + 0.1 / 33)
        + 1e-3 * jax.nn.logsumexp(x, -1) ** 2, x)
    np.testing.assert_allclose(vjp(g)[0], rvjp(g)[0], rtol=1e-12, atol=1e-14)
    _, vjp = jax.vjp(lambda x: jxent.softmax_cross_entropy(x, yd, implementation=impl), x)
    _, rvjp = jax.vjp(lambda x: optax.softmax_cross_entropy(x, yd), x)
    np.testing.assert_allclose(vjp(g)[0], rvjp(g)[0], rtol=1e-12, atol=1e-14)


def test_float64_autodiff_exact_tails_every_mode(x64):
  # xla_autodiff's float64 JVP is written from the tail-exact gradient: jvp, grad and hessian.
  logits = jnp.array([[TAIL, 0.0, -1.0]])
  f = lambda x: jnp.sum(jxent.softmax_cross_entropy_with_integer_labels(
      x, jnp.array([0]), implementation="xla_autodiff"))
  tail = np.exp(-TAIL) + np.exp(-TAIL - 1)
  _, t = jax.jvp(f, (logits,), (jnp.array([[1.0, 0.0, 0.0]]),))
  np.testing.assert_allclose(t, -tail, rtol=1e-13)
  np.testing.assert_allclose(jax.grad(f)(logits)[0, 0], -tail, rtol=1e-13)
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(3, 5)))
  yd = jnp.asarray(rng.random((3, 5)))
  kw = dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=3.0)
  ours = lambda a, b: jxent.softmax_cross_entropy(a, b, reduction="sum",
                                                  implementation="xla_autodiff", **kw)
  cap = lambda a: 3.0 * jnp.tanh(a / 3.0)
  ref = lambda a, b: jnp.sum(optax.softmax_cross_entropy(cap(a), 0.9 * b + 0.02)
                             + 1e-3 * jax.nn.logsumexp(cap(a), -1) ** 2)
  np.testing.assert_allclose(jax.hessian(ours)(x, yd), jax.hessian(ref)(x, yd), atol=1e-12)
  np.testing.assert_allclose(jax.jacfwd(jax.grad(ours, argnums=1))(x, yd),
                             jax.jacfwd(jax.grad(ref, argnums=1))(x, yd), atol=1e-12)


def test_pallas_refuses_float64(x64):
  from jxent._src.kernels.pallas_triton import PallasTritonKernel
  with pytest.raises(ValueError, match="float64"):
    jxent.softmax_cross_entropy(jnp.ones((2, 3)), jnp.ones((2, 3)),
                                implementation=PallasTritonKernel(interpret=True))


# ---- optax's signature: tuple axes, positional axis / where --------------------------------------
@pytest.mark.parametrize("axis", [(1, 3), (3, 2), (2, 3), (-3, -1), (-1, -2), (0, 1, 3),
                                  (-4, -3, -1)])
def test_tuple_axis(axis):
  rng = np.random.default_rng(7)
  shape = (2, 3, 4, 5)
  x = rand_logits(rng, shape)
  ndim = len(shape)
  axes = tuple(a % ndim for a in axis)
  batch = tuple(shape[i] for i in range(ndim) if i not in axes)
  n = int(np.prod([shape[a] for a in axes]))
  y = jnp.asarray(rng.integers(0, n, size=batch))
  ref = optax.softmax_cross_entropy_with_integer_labels(x, y, axis)
  assert_close(jxent.softmax_cross_entropy_with_integer_labels(x, y, axis), ref)
  yd = jnp.asarray(rng.random(shape), jnp.float32)
  assert_close(jxent.softmax_cross_entropy(x, yd, axis), optax.softmax_cross_entropy(x, yd, axis))
  gd = jax.grad(lambda x: jnp.sum(jxent.softmax_cross_entropy(x, yd, axis)))(x)
  assert_close(gd, jax.grad(lambda x: jnp.sum(optax.softmax_cross_entropy(x, yd, axis)))(x))
  where = jnp.asarray(rng.random(shape) > 0.3)
  assert_close(jxent.softmax_cross_entropy(x, yd, axis, where),
               optax.softmax_cross_entropy(x, yd, axis, where))


def test_axis_none_and_positional_where():
  rng = np.random.default_rng(8)
  x = rand_logits(rng, (3, 4))
  y = jnp.asarray(rand_probs(rng, (3, 4)))
  assert_close(jxent.softmax_cross_entropy(x, y, None), optax.softmax_cross_entropy(x, y, None))
  mask = jnp.array([True, False, True])
  assert_close(jxent.softmax_cross_entropy(x, y, -1, mask),
               jnp.where(mask, optax.softmax_cross_entropy(x, y), 0.0))
  with pytest.raises(ValueError, match="repeats"):
    jxent.softmax_cross_entropy(x, y, (1, -1))
  with pytest.raises(TypeError):
    jxent.softmax_cross_entropy(x, y, -1, None, "mean")  # options stay keyword-only


def test_numpy_scalar_options():
  x = jnp.asarray(np.random.default_rng(9).normal(size=(4, 5)), jnp.float32)
  y = jnp.array([0, 1, -100, 4])
  a = jxent.softmax_cross_entropy_with_integer_labels(
      x, y, label_smoothing=np.float32(0.1), ignore_index=np.int64(-100), z_loss=np.float64(1e-3),
      logit_softcap=np.array(5.0))
  b = jxent.softmax_cross_entropy_with_integer_labels(
      x, y, label_smoothing=0.1, ignore_index=-100, z_loss=1e-3, logit_softcap=5.0)
  assert_close(a, b)
  with pytest.raises(TypeError, match="label_smoothing"):
    jxent.softmax_cross_entropy_with_integer_labels(x, y, label_smoothing="0.1")
  with pytest.raises(TypeError, match="ignore_index"):
    jxent.softmax_cross_entropy_with_integer_labels(x, y, ignore_index=np.float32(-100))
  with pytest.raises(TypeError, match="ignore_index"):
    jxent.softmax_cross_entropy_with_integer_labels(x, y, ignore_index=True)


# ---- CPU memory: half-precision dense labels without float32 copies -----------------------------
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dense_temporaries_without_float32_copies(dtype):
  # 512 x 50257 bfloat16 dense forward: 218.7 MB of temporaries before (optax: 102.9 MB), when
  # a loop over row blocks in the -inf fallback made XLA:CPU upcast the inputs whole.
  n, v = 512, 50257
  a = jax.ShapeDtypeStruct((n, v), dtype)
  f = lambda x, y: jxent.softmax_cross_entropy(x, y, reduction="mean")
  one_copy = n * v * 4
  for fn in (f, jax.value_and_grad(f)):
    temp = jax.jit(fn).lower(a, a).compile().memory_analysis().temp_size_in_bytes
    assert temp < 0.02 * one_copy, temp


def test_dense_neginf_fallback_rows():
  # Rows with a zero label on a -inf logit take the exact form; other rows keep the fast value
  # (+inf for a non-zero label on a -inf logit), in float32 and bfloat16.
  x = jnp.array([[-jnp.inf, 1.0, 2.0], [-jnp.inf, 1.0, 2.0], [0.5, 1.0, 2.0]])
  y = jnp.array([[0.0, 0.3, 0.7], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
  for dt in (jnp.float32, jnp.bfloat16):
    out = np.asarray(jxent.softmax_cross_entropy(x.astype(dt), y.astype(dt), reduction=None),
                     np.float32)
    ref = np.asarray(optax.safe_softmax_cross_entropy(x.astype(dt).astype(jnp.float32), y))
    assert np.isposinf(out[1])
    assert_close(out[[0, 2]], ref[[0, 2]], dtype=dt)


# ---- the fused kernel's gradient walk from the last block (pallas_triton reverse_grad) -----------
@pytest.mark.parametrize("c", [4099, 300])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reverse_grad_walk_matches_xla(c, reduction):
  k = jxent.PallasTritonKernel(interpret=True, block_c=128, reverse_grad=True)
  rng = np.random.default_rng(c)
  x = rand_logits(rng, (4, c)).at[2, : c // 2].set(-jnp.inf)
  y = jnp.asarray(rng.integers(0, c, size=4)).at[1].set(-100)
  yd = jnp.asarray(rand_probs(rng, (4, c)))
  opts = dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0, reduction=reduction)
  for fn, lab, kw in ((jxent.softmax_cross_entropy_with_integer_labels, y, {"ignore_index": -100}),
                      (jxent.softmax_cross_entropy, yd, {})):
    f = lambda x, impl: fn(x, lab, implementation=impl, **kw, **opts)
    val, grad = jax.value_and_grad(f)(x, k)
    rval, rgrad = jax.value_and_grad(f)(x, "xla")
    assert_close(val, rval)
    assert_close(grad, rgrad)


# ---- split-row forward (pallas_triton split_rows) ------------------------------------------------
@pytest.mark.parametrize("c,split", [(4096, 4), (4098, 8), (4099, 4), (96, 2)])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3,
                                          "logit_softcap": 5.0}])
def test_split_row_forward_matches_xla(c, split, options):
  k = jxent.PallasTritonKernel(interpret=True, block_c=256, split_rows=split)
  rng = np.random.default_rng(c)
  x = rand_logits(rng, (5, c)).at[2, :c // 3].set(-jnp.inf)
  y = jnp.asarray(rng.integers(0, c, size=5)).at[1].set(-100).at[2].set(c - 1)
  yd = jnp.asarray(rand_probs(rng, (5, c)))
  g = jnp.asarray(rng.normal(size=5), jnp.float32)
  for fn, lab, kw in ((jxent.softmax_cross_entropy_with_integer_labels, y, {"ignore_index": -100}),
                      (jxent.softmax_cross_entropy, yd, {})):
    f = lambda x, impl: fn(x, lab, implementation=impl, **kw, **options)
    out, vjp = jax.vjp(lambda x: f(x, k), x)
    ref, rvjp = jax.vjp(lambda x: f(x, "xla"), x)
    assert_close(out, ref)
    assert_close(vjp(g)[0], rvjp(g)[0])
  assert k._split(c) == {4096: 4, 4098: 2, 4099: 1, 96: 2}[c]
