"""optax's own softmax cross-entropy tests with jxent in optax's place.

Ported from google-deepmind/optax ``optax/losses/_classification_test.py`` at commit
2edbcbe2390da13983b92cbef94ac0460ecde1c5 (SoftmaxCrossEntropyTest,
SoftmaxCrossEntropyWithIntegerLabelsTest, SafeSoftmaxCrossEntropyTest's plain-implementation
case, PolyLossTest.test_equals_to_cross_entropy_when_eps0): the inputs, expected values and
tolerances are optax's; the function is jxent's, called with optax's signature (``axis`` and
``where`` by position). Each case runs eagerly and under ``jit``.

Deliberate difference: optax's ``check_grads`` checks forward and reverse mode. jxent's default
implementations are custom VJPs (reverse mode only, README "Forward mode"), so they are checked in
reverse mode and ``implementation="xla_autodiff"`` in both modes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jxent

sce = jxent.softmax_cross_entropy
sce_int = jxent.softmax_cross_entropy_with_integer_labels
MODES = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]

YS = np.array([[10.0, 1.0, -2.0], [1.0, 4.0, 0.2]], dtype=np.float32)
TS = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)
EXP = np.array([9.00013, 3.0696733], dtype=np.float32)
MASK = np.array([True, False])
PER_LOGIT_MASK = np.array([[1, 0, 0], [0, 0, 0]]).astype(bool)
TS_INT = np.array([1, 0], dtype=np.int32)


@pytest.mark.parametrize("mode", MODES)
class TestSoftmaxCrossEntropy:

  def test_scalar(self, mode):
    np.testing.assert_allclose(mode(sce)(YS[0], TS[0]), EXP[0], atol=1e-4)

  def test_batched(self, mode):
    np.testing.assert_allclose(mode(sce)(YS, TS), EXP, atol=1e-4)

  def test_per_logit_mask(self, mode):
    out = mode(functools.partial(sce, where=PER_LOGIT_MASK))(YS, TS)
    np.testing.assert_array_equal(jnp.where(jnp.any(PER_LOGIT_MASK, -1), 0.0, out), 0)

  @pytest.mark.parametrize("impl,modes", [(None, ["rev"]), ("xla_autodiff", ["fwd", "rev"])])
  def test_gradient(self, mode, impl, modes):
    check_grads(mode(functools.partial(sce, implementation=impl)), (YS[:2], TS[:2]), order=1,
                modes=modes)
    loss_fn = lambda *args, **kw: jnp.sum(sce(*args, implementation=impl, **kw))
    gs = mode(jax.grad(functools.partial(loss_fn, labels=TS, where=MASK)))(YS)
    assert jnp.all(jnp.isfinite(gs))

  @pytest.mark.parametrize("size", [5, 10])
  def test_mask(self, mode, size):
    rng = np.random.default_rng(size)
    preds = rng.normal(size=size)
    targets = rng.dirichlet(np.ones(size))
    mask = rng.integers(2, size=size).astype(bool)
    mask[0] = True
    x = mode(sce)(preds[mask], targets[mask])
    y = mode(functools.partial(sce, where=mask))(preds, targets)
    np.testing.assert_allclose(x, y, atol=1e-4)

  @pytest.mark.parametrize("axis", [0, 1, 2])
  def test_axis(self, mode, axis):
    shape = [4, 5, 6]
    rng = np.random.default_rng(axis)
    preds = rng.normal(size=shape)
    targets = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])
    x = mode(functools.partial(sce, axis=axis))(preds, targets)
    y = mode(sce)(np.moveaxis(preds, axis, -1), np.moveaxis(targets, axis, -1))
    np.testing.assert_allclose(x, y, atol=1e-4)

  def test_against_plain_implementation(self, mode):
    # SafeSoftmaxCrossEntropyTest: finite rows give the plain implementation's value and gradient
    # (jxent's default is already "safe": a -inf logit with label 0 contributes 0).
    ys = np.array([[10.0, 1.0, -2.0], [-np.inf, 0.0, 0.0], [-np.inf, 0.0, -np.inf]], np.float32)
    ts = np.array([[0.0, 1.0, 0.0], [0.0, 0.5, 0.5], [0.0, 1.0, 0.0]], np.float32)
    np.testing.assert_allclose(mode(sce)(ys, ts), [9.00013, 0.693147, 0.0], atol=1e-4)
    v, g = mode(jax.value_and_grad(lambda x: sce(x, ts[0])))(ys[0])
    pv, pg = jax.value_and_grad(lambda x: -jnp.sum(ts[0] * jax.nn.log_softmax(x)))(ys[0])
    np.testing.assert_allclose(v, pv, atol=1e-4)
    np.testing.assert_allclose(g, pg, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
class TestSoftmaxCrossEntropyWithIntegerLabels:

  def test_consistent_with_softmax_cross_entropy_scalar(self, mode):
    exp = sce(YS[0], jax.nn.one_hot(TS_INT[0], 3))
    np.testing.assert_allclose(mode(sce_int)(YS[0], TS_INT[0]), exp, rtol=1e-6)

  def test_consistent_with_softmax_cross_entropy_batched(self, mode):
    exp = sce(YS, jax.nn.one_hot(TS_INT, 3))
    np.testing.assert_allclose(mode(sce_int)(YS, TS_INT), exp, rtol=1e-6)

  @pytest.mark.parametrize("impl,modes", [(None, ["rev"]), ("xla_autodiff", ["fwd", "rev"])])
  def test_gradient(self, mode, impl, modes):
    check_grads(mode(functools.partial(sce_int, labels=TS_INT, implementation=impl)), (YS,),
                order=1, modes=modes)
    loss_fn = lambda *args, **kw: jnp.sum(sce_int(*args, implementation=impl, **kw))
    gs = mode(jax.grad(functools.partial(loss_fn, labels=TS_INT, where=MASK)))(YS)
    assert jnp.all(jnp.isfinite(gs))

  def test_per_logit_mask(self, mode):
    out = mode(functools.partial(sce_int, where=PER_LOGIT_MASK))(YS, TS_INT)
    np.testing.assert_array_equal(jnp.where(jnp.any(PER_LOGIT_MASK, -1), 0.0, out), 0)

  @pytest.mark.parametrize("axis", [0, 1, 2])
  def test_axis(self, mode, axis):
    shape = [4, 5, 6]
    rng = np.random.default_rng(axis)
    preds = rng.normal(size=shape)
    targets = rng.integers(shape[axis], size=shape[:axis] + shape[axis + 1:])
    x = mode(functools.partial(sce_int, axis=axis))(preds, targets)
    y = mode(sce_int)(np.moveaxis(preds, axis, -1), targets)
    np.testing.assert_allclose(x, y, atol=1e-4)

  @pytest.mark.parametrize("axis", [(1, 3), (3, 2), (2, 3), (-3, -1), (-1, -2), (-2, -1),
                                    (0, 1, 3), (-4, -3, -1)])
  def test_axes(self, mode, axis):
    shape = (2, 3, 4, 5)
    ndim = len(shape)
    logits_axis = tuple((x + ndim) % ndim for x in axis)
    labels_axis = tuple(x for x in range(ndim) if x not in logits_axis)
    logits_shape = tuple(shape[x] for x in logits_axis)
    labels_shape = tuple(shape[x] for x in labels_axis)
    num_classes = np.prod(logits_shape).item()
    keys = jax.random.split(jax.random.key(42), 2)
    logits = jax.random.uniform(keys[0], labels_shape + (num_classes,))
    labels = jax.random.randint(keys[1], labels_shape, 0, num_classes - 1)
    desired = sce_int(logits, labels)
    perm = labels_axis + logits_axis
    perm_inv = tuple(i for i, _ in sorted(enumerate(perm), key=lambda x: x[1]))
    logits = logits.reshape(labels_shape + logits_shape).transpose(perm_inv)
    assert logits.shape == shape
    actual = mode(lambda x, y: sce_int(x, y, axis))(logits, labels)
    np.testing.assert_allclose(actual, desired, rtol=1e-6)


@pytest.mark.parametrize("logits,labels", [
    (np.array([[4.0, 2.0, 1.0], [0.0, 5.0, 1.0], [0.134, 1.234, 3.235]]),
     np.array([[1.0, 0.0, 0.0], [0.0, 0.8, 0.2], [0.34, 0.33, 0.33]])),
    (np.array([[4.0, 2.0, 1.0], [0.0, 5.0, 1.0]]), np.array([[1.0, 0.0, 0.0], [0.0, 0.8, 0.2]])),
    (np.array([[4.0, 2.0, 1.0, 0.134, 1.3515], [0.0, 5.0, 1.0, 0.5215, 5.616]]),
     np.array([[0.5, 0.0, 0.0, 0.0, 0.5], [0.0, 0.12, 0.2, 0.56, 0.12]])),
    (np.array([1.89, 2.39]), np.array([0.34, 0.66])),
    (np.array([0.314]), np.array([1.0])),
])
def test_poly_loss_eps0_is_cross_entropy(logits, labels):
  # PolyLossTest.test_equals_to_cross_entropy_when_eps0: poly-1 with eps=0 is the cross-entropy.
  import optax
  np.testing.assert_allclose(jax.jit(sce)(logits, labels),
                             optax.losses.poly_loss_cross_entropy(logits, labels, epsilon=0.0), atol=1e-4)
