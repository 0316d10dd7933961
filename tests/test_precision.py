"""The accuracy contract's parts that hold today (docs: README "Precision"; the rest is open work):
bit-determinism of every implementation, the linear algorithms and the log-probs, under jit.

Each program is compiled once and called twice on the same inputs; the losses and gradients must
be bit-identical (no atomics, no order that depends on scheduling), on an odd vocabulary and
with every option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent
from conftest import kernels
from helpers import rand_logits

OPTS = dict(label_smoothing=0.1, z_loss=1e-4, logit_softcap=30.0)


def _same_bits(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes(), np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_every_implementation_is_bit_deterministic(kernel, dense, reduction):
  rng = np.random.default_rng(21)
  x = rand_logits(rng, (9, 333), jnp.bfloat16 if dense else jnp.float32)
  ids = rng.integers(0, 333, size=9)
  if dense:
    y = jnp.asarray(jax.nn.softmax(jnp.asarray(rng.normal(size=(9, 333)), jnp.float32)),
                    jnp.bfloat16)
    f = lambda x, y: jxent.softmax_cross_entropy(x, y, reduction=reduction,
                                                 implementation=kernel, **OPTS)
  else:
    y = jnp.asarray(ids).at[2].set(-100)
    f = lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(
        x, y, reduction=reduction, ignore_index=-100, implementation=kernel, **OPTS)
  g = lambda x, y: jax.vjp(lambda x: f(x, y), x)[1](jnp.ones(f(x, y).shape, f(x, y).dtype))
  step = jax.jit(lambda x, y: (f(x, y), g(x, y)))
  _same_bits(step(x, y), step(x, y))


@pytest.mark.parametrize("impl", ["linear_chunked", "linear_fused_grad", "unfused",
                                  jxent.LinearChunked(block_v=64, block_n=8)],
                         ids=["chunked", "fused_grad", "unfused", "chunked_passes"])
def test_linear_dw_is_bit_deterministic(impl):
  """Linear dw is accumulated in a fixed order (no atomics): two calls give the same bits."""
  rng = np.random.default_rng(22)
  x = jnp.asarray(rng.normal(size=(37, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 333)) * 0.3, jnp.float32)
  y = jnp.asarray(rng.integers(0, 333, size=37))
  step = jax.jit(jax.value_and_grad(lambda x, w: jxent.linear_softmax_cross_entropy(
      x, w, y, implementation=impl, **OPTS), argnums=(0, 1)))
  _same_bits(step(x, w), step(x, w))


@pytest.mark.parametrize("kernel", [k for k in kernels() if k.id != "xla_autodiff"])
def test_token_log_probs_are_bit_deterministic(kernel):
  rng = np.random.default_rng(23)
  x = rand_logits(rng, (9, 333))
  y = jnp.asarray(rng.integers(0, 333, size=9))
  ids = jnp.asarray(rng.integers(0, 333, size=(9, 3)))
  t = jnp.asarray(rng.uniform(0.5, 2, size=9), jnp.float32)

  def objective(x, t):
    lp, ent, sel = jxent.token_log_probs(x, y, temperature=t, return_entropy=True,
                                         selected_ids=ids, logit_softcap=30.0,
                                         implementation=kernel)
    return jnp.sum(lp) + 0.1 * jnp.sum(ent) + jnp.sum(sel)

  step = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
  _same_bits(step(x, t), step(x, t))
