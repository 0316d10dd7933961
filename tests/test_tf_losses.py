"""jxent.losses and jxent.contrib against TF's recorded values (catalogues B, C, D)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent
from jxent.losses import Reduction
from helpers import assert_close

X = [[10., 0, 0], [0, 10, 0], [0, 0, 10]]
Y_RIGHT = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
Y_WRONG = [[0, 0, 1], [1, 0, 0], [0, 1, 0]]
sce = jxent.losses.softmax_cross_entropy
csce = jxent.contrib.softmax_cross_entropy
cwl = jxent.losses.compute_weighted_loss


@pytest.mark.parametrize("args, kwargs, expected", [
    ((Y_RIGHT, X), {}, 9.083335e-05),                                   # B1
    ((Y_WRONG, X), {}, 10.000091),                                      # B2
    ((Y_WRONG, X, 2.3), {}, 23.000208),                                 # B3
    ((Y_WRONG, X, jnp.asarray(2.3)), {}, 23.000208),                    # B4
    ((Y_WRONG, X, (1.2, 3.4, 5.6)), {}, 34.00031),                      # B5
    ((Y_WRONG, X, jnp.array([0, 0, 0])), {}, 0.0),                      # B6
    ((Y_WRONG, X, [1.2, 0, 0]), {}, 12.00011),                          # B7
    (([[1, 0, 0]], [[100., -100, -100]]), {"label_smoothing": 0.1}, 13.333334),  # B10
    (([[0, 1, 0], [0, 0, 1]], [[0.05, 0.95, 0], [0.1, 0.8, 0.1]], [0.3, 0.7]),
     {"label_smoothing": 0.2}, 0.5761805),                              # B11
    ((Y_WRONG, X, jnp.array([2.0])), {}, 20.000181),                    # B13
    ((Y_WRONG, X, 0.0), {}, 0.0),                                       # B15
    ((Y_WRONG, X, [-1., 1, 1]), {}, 3.3333635),                         # B16
    ((Y_WRONG, X, [-1., 1, 0]), {}, 0.0),
    ((Y_WRONG, X, [-1., 1, 0]), {"reduction": Reduction.MEAN}, 0.0),
    (([[1, 0, 0]], [[100., -100, -100]]), {"label_smoothing": -0.1}, 0.0),  # B17
    (([[1, 0, 0]], [[100., -100, -100]]), {"label_smoothing": 1.0}, 133.33334),  # B18
    (([0, 0, 1], [1., 2, 3]), {}, 0.40760595),                          # B23
    (([0, 0, 1], [1., 2, 3], 2.0), {}, 0.8152119),
    (([0, 0, 0, 1, 0], [-2., 2, 4, -1, 3]), {}, 5.4137187),             # seed
])
def test_catalogue_b(args, kwargs, expected):
  out = jax.jit(lambda *a: sce(*a, **kwargs))(*[jnp.asarray(a) for a in args])
  np.testing.assert_allclose(out, expected, rtol=2e-6, atol=1e-6)


def test_b14_reductions():
  w = [1.2, 0, 3]
  expected = {Reduction.NONE: [12.00011, 0, 30.00027], Reduction.SUM: 42.00038,
              Reduction.MEAN: 10.000092, Reduction.SUM_OVER_BATCH_SIZE: 14.000127,
              Reduction.SUM_BY_NONZERO_WEIGHTS: 21.00019, Reduction.SUM_OVER_NONZERO_WEIGHTS: 21.00019}
  for red, val in expected.items():
    np.testing.assert_allclose(sce(Y_WRONG, X, w, reduction=red), val, rtol=2e-6)
  assert len(Reduction.all()) == 6


def test_errors():
  with pytest.raises(ValueError, match="weights can not be broadcast to values"):  # B8
    sce(Y_RIGHT, [[100., -100, -100], [-100, 100, -100], [-100, -100, 100]],
        [[3, 4, 5], [2, 6, 0], [8, 0, 1]])
  with pytest.raises(ValueError):  # B9
    sce(Y_WRONG, X, None)
  with pytest.raises(ValueError, match=r"values.rank=1. weights.rank=2"):  # B12
    sce(Y_WRONG, X, [[1.2], [3.4], [5.6]])
  with pytest.raises(ValueError, match=r"Shapes \(2, 3\) and \(2, 2\) are incompatible"):  # B19
    sce([[0, 1], [0, 0]], [[0., 1, 2], [3, 4, 5]])
  with pytest.raises(ValueError, match="Argument `onehot_labels` must not be None."):  # B20
    sce(None, X)
  with pytest.raises(ValueError, match="Argument `logits` must not be None."):
    sce(Y_WRONG, None)
  with pytest.raises(ValueError, match="Invalid Reduction Key mean"):  # B24
    sce(Y_WRONG, X, reduction="mean")
  with pytest.raises(TypeError):
    sce(Y_WRONG, jnp.asarray(X, jnp.int32))


def test_b21_b22_dtypes_and_3d():
  out = sce(Y_WRONG, jnp.asarray(X, jnp.float16))
  assert out.dtype == jnp.float16 and abs(float(out) - 10.0) < 1e-2
  out = sce(Y_WRONG, jnp.asarray(X, jnp.float16), reduction=Reduction.NONE)
  assert out.dtype == jnp.float16 and out.shape == (3,)
  labels = np.eye(3)[[[0, 1], [2, 0]]]
  logits = np.arange(12.).reshape(2, 2, 3).astype(np.float32)
  assert_close(sce(labels, logits, [[1.], [0.]]), 1.9076058864593506)
  assert_close(sce(labels, logits, [[1, 0], [0, 2]]), 3.6114087104797363)
  with pytest.raises(ValueError):
    sce(labels, logits, [1., 2.])
  assert_close(sce(labels, logits, [[1.], [0.]], reduction=Reduction.NONE),
               [[2.40760589, 1.40760601], [0, 0]])


def test_b25_gradients():
  labels = jnp.array([[0., 1, 0]])
  logits = jnp.array([[1., 2, 3]])
  w = jnp.array([2.0])
  f = lambda y, x, w, ls: sce(y, x, w, label_smoothing=ls)
  dy, dx, dw = jax.grad(f, argnums=(0, 1, 2))(labels, logits, w, 0.0)
  assert float(jnp.abs(dy).max()) == 0.0
  assert_close(dx, [[0.18006115, -1.5105431, 1.3304819]])
  assert_close(dw, [1.4076059])
  dx = jax.grad(f, argnums=1)(labels, logits, w, 0.3)
  assert_close(dx, [[-0.01993886, -1.110543, 1.1304818]])


RAW = np.arange(24.).reshape(3, 2, 4)


@pytest.mark.parametrize("weights, expected", [
    (1.0, (276, 11.5, 11.5, 11.5)),
    (np.ones((3, 2, 1)), (276, 11.5, 11.5, 11.5)),
    (np.ones((1, 2, 4)), (276, 11.5, 11.5, 11.5)),
    (17.0, (4692, 11.5, 195.5, 195.5)),
    ([[[17., 0, 2, 5]]], (1554, 10.791667, 64.75, 86.333336)),
    ([[[17.]], [[5.]], [[2.]]], (1248, 6.5, 52.0, 52.0)),
    ([[[17.], [3.]], [[5.], [31.]], [[2.], [7.]]], (2774, 10.66923, 115.583336, 115.583336)),
    (np.zeros((3, 2, 4)), (0, 0, 0, 0)),
    (0.0, (0, 0, 0, 0)),
])
def test_catalogue_c(weights, expected):
  reds = (Reduction.SUM, Reduction.MEAN, Reduction.SUM_OVER_BATCH_SIZE, Reduction.SUM_BY_NONZERO_WEIGHTS)
  for red, val in zip(reds, expected):
    np.testing.assert_allclose(cwl(RAW.astype(np.float32), weights, reduction=red), val, rtol=1e-6)
  none = cwl(RAW.astype(np.float32), weights, reduction=Reduction.NONE)
  assert none.shape == RAW.shape


@pytest.mark.parametrize("weights", [(17, 5, 2), ((17,), (5,), (2,)), ((17, 3), (5, 31), (2, 7)),
                                     (17, 3), (17,), np.zeros((2, 2, 2, 2))])
def test_c7_invalid_weights(weights):
  with pytest.raises(ValueError, match="weights can not be broadcast to values"):
    cwl(RAW, weights)


def test_c8_int_and_f64():
  out = cwl(jnp.array([1, 2, 3]), jnp.array([1, 0, 1]))
  assert jnp.issubdtype(out.dtype, jnp.integer) and int(out) == 2


@pytest.mark.parametrize("args, kwargs, expected", [
    ((X, Y_RIGHT), {}, 0.0),                                # D1
    ((X, Y_WRONG), {}, 10.0),                               # D2
    ((X, Y_WRONG, 2.3), {}, 23.0),                          # D3
    ((X, Y_WRONG, jnp.asarray(2.3)), {}, 23.0),             # D4
    ((X, Y_WRONG, [1.2, 3.4, 5.6]), {}, 34.0),              # D5
    ((X, Y_WRONG, [0., 0, 0]), {}, 0.0),                    # D6
    ((X, Y_WRONG, [1.2, 0, 0]), {}, 12.0),                  # D7
    (([[100., -100, -100]], [[1, 0, 0]]), {"label_smoothing": 0.1}, 13.333),  # D10
    (([[0., 100], [100, 0], [100, 0]], [[0, 1], [1, 0], [0, 1]]), {"label_smoothing": 0.1},
     (100 + 50 * 0.1) / 3),                                 # D11
    ((X, Y_WRONG, [[1.2], [3.4], [5.6]]), {}, 34.0),        # D12: [B,1] squeezed
    ((X, Y_WRONG, [2.0]), {}, 60.0),                        # D13: num_present = 1
])
def test_catalogue_d(args, kwargs, expected):
  out = jax.jit(lambda *a: csce(*a, **kwargs))(*[jnp.asarray(a) for a in args])
  np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-3)


def test_d_errors_and_gradients():
  with pytest.raises(ValueError):  # D8
    csce([[100., -100, -100]] * 3, Y_RIGHT, [[3., 4, 5], [2, 6, 0], [8, 0, 1]])
  with pytest.raises(ValueError):  # D9
    csce(X, Y_WRONG, None)
  with pytest.raises(ValueError):
    csce(X, [[0, 1]])
  dy = jax.grad(lambda y: csce(jnp.asarray(X), y))(jnp.asarray(Y_WRONG, jnp.float32))
  assert float(jnp.abs(dy).max()) == 0.0


def test_sparse_losses():
  ssce = jxent.losses.sparse_softmax_cross_entropy
  x = jnp.asarray(X)
  np.testing.assert_allclose(ssce([2, 0, 1], x), 10.000091, rtol=1e-6)
  np.testing.assert_allclose(ssce([[2], [0], [1]], x, [1.2, 0, 0]), 12.00011, rtol=1e-6)
  np.testing.assert_allclose(ssce([2, 0, 1], x, [[1.2], [0], [0]]), 12.00011, rtol=1e-6)
  with pytest.raises(ValueError, match="labels"):
    ssce(None, x)
