"""jxent.nn against TF 2.21's recorded values (tf_semantics.md, catalogue A) and the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jxent import nn
from jxent._src import reference
from helpers import assert_close, rand_logits

L2 = [[0, 0, 0, 1], [0, .5, .5, 0]]
X2 = [[1., 1, 1, 1], [1, 2, 3, 4]]
L3 = [[[0, 0, 0, 1], [0, 1, 0, 0]], [[0, .5, .5, 0], [.5, .5, 0, 0]], [[0, 1, 0, 0], [0, 0, 1, 0]]]
X3 = [[[1., 1, 1, 1], [1, 2, 3, 4]], [[2, 3, 4, 5], [6, 7, 8, 9]], [[5, 4, 3, 2], [1, 2, 3, 4]]]
v2 = nn.softmax_cross_entropy_with_logits_v2
v1 = nn.softmax_cross_entropy_with_logits


def grads(f, labels, logits, g=None, dtype=jnp.float32):
  labels = jnp.asarray(labels, dtype)
  logits = jnp.asarray(logits, dtype)
  out, vjp = jax.vjp(f, labels, logits)
  g = jnp.ones(out.shape, out.dtype) if g is None else jnp.asarray(g, out.dtype)
  dlab, dlog = vjp(g)
  return out, dlog, dlab


def test_a1_a2_float():
  out, dlog, dlab = grads(v2, L2, X2)
  assert_close(out, [1.3862944, 1.9401896])
  assert_close(dlog, [[0.25, 0.25, 0.25, -0.75], [0.0320586, -0.4128557, -0.2631172, 0.6439143]])
  assert_close(dlab, [[1.3862944] * 4, [3.4401896, 2.4401896, 1.4401897, 0.4401897]])
  out, dlog, dlab = grads(v2, L2, X2, g=[2, 3])
  assert_close(dlog, [[0.5, 0.5, 0.5, -1.5], [0.0961758, -1.2385671, -0.7893515, 1.9317429]])
  assert_close(dlab, [[2.7725887] * 4, [10.320569, 7.320569, 4.320569, 1.320569]])


def test_a3_v1_no_label_gradient():
  f = lambda y, x: v1(labels=y, logits=x)
  out, dlog, dlab = grads(f, L2, X2)
  assert_close(out, [1.3862944, 1.9401896])
  assert_close(dlog, [[0.25, 0.25, 0.25, -0.75], [0.0320586, -0.4128557, -0.2631172, 0.6439143]])
  assert float(jnp.abs(dlab).max()) == 0.0


def test_a4_a5_half():
  out, dlog, _ = grads(v2, L2, X2, dtype=jnp.float16)
  assert out.dtype == jnp.float16 and dlog.dtype == jnp.float16
  assert_close(out, [1.387, 1.94], jnp.float16)
  assert_close(dlog, [[0.25, 0.25, 0.25, -0.75], [0.03204, -0.4128, -0.2632, 0.644]], jnp.float16)
  out = v2(jnp.asarray(L2, jnp.bfloat16), jnp.asarray(X2, jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), [1.38281, 1.9375], rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32, jnp.bfloat16])
def test_a7_single_class(dtype):
  out, dlog, _ = grads(v2, [[-1], [0], [1], [1]], [[1], [-1], [0], [1]], dtype=dtype)
  assert_close(out, [0, 0, 0, 0], dtype)
  assert_close(dlog, [[2], [1], [0], [0]], dtype)


def test_a8_a10_label_broadcast():
  out, dlog, _ = grads(v2, [[0, 0, 0, 1]], X2, dtype=jnp.float16)
  assert_close(out, [1.387, 0.4402], jnp.float16)
  assert_close(dlog, [[.25, .25, .25, -.75], [0.03204, 0.08716, 0.2369, -0.3562]], jnp.float16)
  out, dlog, _ = grads(v2, [[1.]], [[1.], [2.]], dtype=jnp.float16)
  assert_close(out, [0, 0], jnp.float16)
  assert_close(dlog, [[0], [0]], jnp.float16)
  out, dlog, _ = grads(v2, [[0.], [2.], [0.25]], [[1, 1, 1, 1], [1, 2, 3, 4], [1, 2, 3, 4]])
  assert_close(out, [0, 15.521518, 1.94019])
  assert_close(dlog, [[0.25] * 4, [-1.968, -1.913, -1.763, -1.355], [-0.218, -0.163, -0.013, 0.394]],
               jnp.float16)
  assert_close(v2([0, 0, 0, 1], X2), [1.3862944, 0.4401897])  # A34


def test_a11_shape_mismatch():
  with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 2\)"):
    v2([[0, 1, 0], [1, 0, 0]], [[0., 1], [2, 3]])
  with pytest.raises(ValueError):  # A36: logits [1,C] with labels [B,C]
    v2(L2, [[1., 1, 1, 1]])


def test_a12_gradient():
  labels = np.array([0, 0, 1, 0, 1, 0, 0, 0, 0, .5, 0, .5]).reshape(3, 4)
  logits = np.array([.1, .2, .3, .4, .1, .4, .9, 1.6, .1, .8, 2.7, 6.4]).reshape(3, 4)
  out, dlog, _ = grads(v2, labels, logits)
  assert_close(out, [1.342536, 2.203548, 2.829809])
  assert_close(dlog, [[0.213838, 0.236328, -0.738817, 0.288651],
                      [-0.889589, 0.149039, 0.245724, 0.494827],
                      [0.001782, -0.496411, 0.023997, 0.470631]])
  check_grads(lambda y: v2(y, jnp.asarray(logits, jnp.float32)),
                            (jnp.asarray(labels, jnp.float32),), order=1, modes=["rev"],
                            atol=1e-2, rtol=1e-2)


def test_a14_second_derivative():
  x = jnp.asarray([.1, .2, .3, .4, .1, .4, .9, 1.6, .1, .8, 2.7, 6.4], jnp.float32)
  y = jnp.asarray([0, 0, 1, 0, 1, 0, 0, 0, 0, .5, 0, .5], jnp.float32) / 3
  h = jax.hessian(lambda x: v2(y, x))(x)
  p = jax.nn.softmax(x)
  assert_close(h, jnp.diag(p) - jnp.outer(p, p), scale=10)


@pytest.mark.parametrize("axis, expected", [
    (0, [[0, 1.0235183, 0.1745061, 4.065884], [0.006693, 5.0200787, 5.013386, 0]]),
    (1, [[0, 0.3132616, 0, 3.0485873], [0.009075, 2.0181499, 2.009075, 0],
         [0, 0.126928, 0.6931472, 0]]),
    (-1, [[1.3862944, 2.4401896], [1.9401896, 2.9401896], [1.4401897, 1.4401897]]),
    (2, [[1.3862944, 2.4401896], [1.9401896, 2.9401896], [1.4401897, 1.4401897]]),
])
def test_a15_a17_3d_axis(axis, expected):
  assert_close(v2(L3, X3, axis=axis), expected, scale=5)
  assert_close(v1(labels=L3, logits=X3, dim=axis), expected, scale=5)


def test_a18_negative_axis_accepted():  # documented deviation: TF rejects -2
  assert_close(v2(L3, X3, axis=-2), v2(L3, X3, axis=1))


def test_a19_a21_shapes():
  assert v2(jnp.zeros((0, 2, 4)), jnp.zeros((0, 2, 4))).shape == (0, 2)
  assert_close(v2([[1, 0, 0], [0, .8, .2]], [[4., 2, 1], [0, 5, 1]]), [0.16984604, 0.82474494])
  out = v2([0, 0, 1], [1., 2, 3])
  assert out.shape == () and abs(float(out) - 0.40760595) < 1e-6
  with pytest.raises(ValueError):  # A22
    v2(1., 1.)
  assert v2(jnp.zeros((2, 0)), jnp.zeros((2, 0))).tolist() == [0.0, 0.0]  # A39 (TF 2.21)


def test_a23_a24_v1_arguments():
  with pytest.raises(ValueError, match="Cannot specify both 'dim' and 'axis'"):
    v1(labels=L3, logits=X3, dim=0, axis=1)
  assert_close(v1(labels=L3, logits=X3, axis=1, dim=1), v2(L3, X3, axis=1))
  with pytest.raises(ValueError, match="Both `labels` and `logits` must be provided"):
    v1(labels=None, logits=[[4., 2, 1]])
  with pytest.raises(ValueError, match="must be provided"):
    v2(None, [[4., 2, 1]])


def test_a25_a33_special_values():
  # A25: masked -inf logit with label 0 -> 0 contribution (deliberate deviation from TF's NaN).
  out, dlog, dlab = grads(v2, [[1, 0, 0]], [[0, -np.inf, 1]])
  assert_close(out, [1.3132616])
  assert_close(dlog, [[-0.7310586, 0, 0.7310586]])
  assert np.isinf(dlab[0, 1]) and abs(float(dlab[0, 0]) - 1.3132616) < 1e-6
  out, dlog, _ = grads(v2, [[0, 1, 0]], [[0, -np.inf, 1]])  # A26
  assert np.isinf(out[0])
  assert_close(dlog, [[0.26894143, -1, 0.7310586]])
  for x in ([[np.inf, 0]], [[np.nan, 0]]):  # A27
    assert np.isnan(v2([[1, 0]], x)[0])
  out, dlog, _ = grads(v2, [[1, 0, 0], [0, 1, 0]], [[1e30, 0, -1e30]] * 2)  # A28
  np.testing.assert_allclose(out, [0, 1e30])
  np.testing.assert_allclose(dlog, [[0, 0, 0], [1, -1, 0]])
  out, dlog, _ = grads(v2, [[0, 1, 0]], [[1000, 0, -1000]])  # A29
  assert_close(out, [1000.])
  assert_close(dlog, [[1, -1, 0]])
  out, dlog, _ = grads(v2, [[0, 1]], [[60000, -60000]], dtype=jnp.float16)  # A30
  assert np.isinf(np.asarray(out, np.float32)[0])
  assert_close(dlog, [[1, -1]], jnp.float16)
  out, dlog, _ = grads(v2, [[0, 2, 0]], [[1, 2, 3]])  # A31: TF kernel gradient
  assert_close(out, [2.8152118])
  assert_close(dlog, [[0.0900306, -1.7552716, 0.6652409]])
  out, dlog, _ = grads(v2, [[0, 0, 0]], [[1, 2, 3]])  # A32
  assert_close(out, [0])
  assert_close(dlog, [[0.09003057, 0.24472848, 0.66524094]])
  out, dlog, _ = grads(v2, [[-1, 2, 0]], [[1, 2, 3]])  # A33
  assert_close(out, [0.4076059])
  assert_close(dlog, [[1.0900306, -1.7552716, 0.66524094]])


def test_a37_a38_dtypes():
  out = v2(jnp.array([[0, 0, 0, 1]]), jnp.array([[1., 1, 1, 1]]))
  assert out.dtype == jnp.float32
  assert_close(out, [1.3862944])
  with pytest.raises(TypeError, match="floating"):
    v2([[0, 1]], jnp.array([[1, 2]], jnp.int32))


def test_sparse():
  f = nn.sparse_softmax_cross_entropy_with_logits
  x = jnp.asarray(X2)
  out, dx = jax.value_and_grad(lambda x: f(labels=jnp.array([3, 1]), logits=x).sum())(x)
  ref = reference.xent(x, np.array([3, 1]), sparse=True)
  assert_close(out, ref[0].sum())
  assert_close(dx, ref[1])
  assert f(labels=2, logits=[1., 2, 3]).shape == ()
  with pytest.raises(ValueError, match="Rank mismatch"):
    f(labels=[[1]], logits=x)
  with pytest.raises(TypeError, match="integer"):
    f(labels=jnp.array([1., 2.]), logits=x)
  assert np.isnan(f(labels=jnp.array([4, 1]), logits=x)[0])
  out = f(labels=jnp.array([3, 1]), logits=x.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize("seed", range(4))
def test_random_against_reference(seed):
  rng = np.random.default_rng(seed)
  shape = tuple(rng.integers(1, 6, size=rng.integers(1, 4))) + (int(rng.integers(2, 50)),)
  axis = int(rng.integers(-len(shape), len(shape)))
  x = jnp.moveaxis(rand_logits(rng, shape), -1, axis)
  y = jnp.moveaxis(jnp.asarray(rng.random(shape), jnp.float32), -1, axis)
  g = jnp.asarray(rng.normal(size=x.shape[:axis % len(shape)] + x.shape[axis % len(shape) + 1:]),
                  jnp.float32)
  out, vjp = jax.vjp(lambda y, x: v2(y, x, axis=axis), y, x)
  dy, dx = vjp(g)
  l, rdx, rdy = reference.xent(x, y, axis=axis, tf_grad=True, g=g)
  assert_close(out, l, scale=10)
  assert_close(dx, rdx, scale=10)
  assert_close(dy, rdy, scale=10)
