"""Forward-mode derivatives (jax.jvp, jacfwd, linearize) with implementation="xla_autodiff",
against the float64 reference and optax; the custom-VJP implementations refuse forward mode."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jxent
from jxent._src import reference
from helpers import assert_close, rand_logits, rand_probs

OPTIONS = [{}, {"label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 5.0}]
AD = "xla_autodiff"


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_jvp_integer_labels(options, reduction):
  rng = np.random.default_rng(0)
  x = rand_logits(rng, (7, 33))
  y = jnp.asarray(rng.integers(0, 33, size=7)).at[2].set(-100)
  t = jnp.asarray(rng.normal(size=(7, 33)), jnp.float32)
  f = lambda x: jxent.softmax_cross_entropy_with_integer_labels(
      x, y, ignore_index=-100, reduction=reduction, implementation=AD, **options)
  out, tan = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(x, t)
  loss, dl, _ = reference.xent(x, y, sparse=True, ignore_index=-100, **options)
  rtan = (dl * np.asarray(t, np.float64)).sum(-1)
  if reduction == "mean":
    loss, rtan = loss.sum() / 6, rtan.sum() / 6
  assert_close(out, loss)
  assert_close(tan, rtan)
  # linearize gives the same tangent; jacfwd equals the custom VJP's jacrev
  _, lin = jax.linearize(f, x)
  assert_close(lin(t), rtan)
  jf = jax.jacfwd(f)(x)
  jr = jax.jacrev(lambda x: jxent.softmax_cross_entropy_with_integer_labels(
      x, y, ignore_index=-100, reduction=reduction, **options))(x)
  assert_close(jf, jr)


@pytest.mark.parametrize("options", OPTIONS)
def test_jvp_dense_labels(options):
  """Tangents in logits and labels (unnormalised soft labels), under vmap."""
  rng = np.random.default_rng(1)
  x = rand_logits(rng, (3, 5, 37))
  y = jnp.asarray(rand_probs(rng, (3, 5, 37)) * 1.3)
  tx, ty = (jnp.asarray(rng.normal(size=(3, 5, 37)), jnp.float32) for _ in range(2))
  f = lambda x, y: jxent.softmax_cross_entropy(x, y, implementation=AD, **options)
  out, tan = jax.vmap(lambda *a: jax.jvp(f, a[:2], a[2:]))(x, y, tx, ty)
  loss, dl, dy = reference.xent(x, y, **options)
  assert_close(out, loss)
  assert_close(tan, (dl * np.asarray(tx, np.float64)).sum(-1) +
               (dy * np.asarray(ty, np.float64)).sum(-1))


@pytest.mark.parametrize("classes", [4099, 5000])  # prime (whole rows); segmented on CPU (4 x 1250)
def test_matches_optax_forward_mode(classes):
  rng = np.random.default_rng(2)
  x = rand_logits(rng, (6, classes))
  y = jnp.asarray(rng.integers(0, classes, size=6))
  t = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  ours = jax.jvp(lambda x: jxent.softmax_cross_entropy_with_integer_labels(
      x, y, implementation=AD), (x,), (t,))
  theirs = jax.jvp(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, y), (x,), (t,))
  for a, b in zip(ours, theirs):
    assert_close(a, b, scale=5)
  h = jax.hessian(lambda x: jxent.softmax_cross_entropy_with_integer_labels(
      x, y[:2] % 5, reduction="sum", implementation=AD))(x[:2, :5])
  rh = jax.hessian(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, y[:2] % 5).sum())(
      x[:2, :5])
  assert_close(h, rh)


def test_masked_logit_keeps_labels_gradient_finite():
  x = jnp.array([[0.0, -jnp.inf, 1.0]])
  y = jnp.array([[1.0, 0.0, 0.0]])
  dx, dy = jax.grad(lambda x, y: jxent.softmax_cross_entropy(x, y, implementation=AD).sum(),
                    argnums=(0, 1))(x, y)
  np.testing.assert_allclose(dx, [[-0.7310586, 0.0, 0.7310586]], rtol=1e-6)
  lse = float(jax.nn.logsumexp(x))
  np.testing.assert_allclose(dy, [[lse, lse - 1.0, lse - 1.0]], rtol=1e-6)


def test_custom_vjp_implementations_refuse_forward_mode():
  x = jnp.ones((2, 5))
  y = jnp.array([0, 1])
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(lambda x: jxent.softmax_cross_entropy_with_integer_labels(x, y), (x,), (x,))


def test_tf_kernel_gradient_is_refused():
  opts = jxent._src.options.make_options(tf_grad=True)
  with pytest.raises(ValueError, match="tf_grad"):
    jxent._src.core.rows_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), axis=-1, sparse=False,
                              opts=opts, implementation=AD)
