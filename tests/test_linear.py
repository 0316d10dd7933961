"""linear_softmax_cross_entropy against the float64 reference: every option combination, both
algorithms, N not a multiple of the chunk, V prime, finite differences, bf16, memory bound."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jxent
from jxent._src import reference
from helpers import assert_close

ALGOS = [pytest.param(jxent.LinearChunked(block_v=16), id="chunked"),
         pytest.param(jxent.LinearChunked(block_v=16, block_n=10), id="chunked_token_passes"),
         pytest.param(jxent.LinearFusedGrad(block_n=8), id="fused_grad"),
         pytest.param(jxent.LinearFusedGrad(block_n=8, dw_accumulation="weights"),
                      id="fused_grad_dw_in_weights_dtype")]
# The four options on or off, as the half fraction of the 2^4 design with an even number on
# (a strength-3 orthogonal array: every combination of any three options appears, all-off and
# all-on included), 8 runs instead of 16.
COMBOS = [c for c in itertools.product((0.0, 0.1), (0.0, 1e-3), (None, 5.0), (None, -100))
          if sum((c[0] != 0.0, c[1] != 0.0, c[2] is not None, c[3] is not None)) % 2 == 0]


def data(seed, n=37, d=16, v=101):  # n not a multiple of the chunks, v prime
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, v)) * 0.5, jnp.float32)
  y = jnp.asarray(rng.integers(0, v, size=n)).at[3].set(-100).at[10].set(-100)
  return x, w, y


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("ls, z, cap, ign", COMBOS)
def test_options_against_reference(algo, ls, z, cap, ign):
  x, w, y = data(0)
  if ign is None:
    y = jnp.maximum(y, 0)
  kw = dict(label_smoothing=ls, z_loss=z, logit_softcap=cap, ignore_index=ign)
  for reduction, s in (("mean", 1.0), ("sum", 0.7)):
    f = lambda x, w: s * jxent.linear_softmax_cross_entropy(x, w, y, reduction=reduction,
                                                            implementation=algo, **kw)
    v, (dx, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w)
    kept = np.ones(37) if ign is None else np.asarray(y != ign, np.float64)
    scale = s / kept.sum() if reduction == "mean" else s
    loss, dl, _ = reference.xent(np.asarray(x, np.float64) @ np.asarray(w, np.float64), y,
                                 sparse=True, g=kept * scale, **kw)
    assert_close(v, scale * loss.sum(), scale=5)
    assert_close(dx, dl @ np.asarray(w, np.float64).T, scale=5)
    assert_close(dw, np.asarray(x, np.float64).T @ dl, scale=5)
    if ign is not None:
      assert float(jnp.abs(dx[3]).max()) == 0.0 and float(jnp.abs(dx[10]).max()) == 0.0


@pytest.mark.parametrize("algo", ALGOS)
def test_vmap(algo):
  """vmap over a batch of token sets, with w shared or per batch, under jit and grad."""
  rng = np.random.default_rng(5)
  b, n, d, v = 3, 13, 8, 37  # 2 blocks of 16 classes and a tail of 5; n not a multiple of 8 or 10
  x = jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(b, d, v)) * 0.5, jnp.float32)
  y = jnp.asarray(rng.integers(0, v, size=(b, n))).at[1, 2].set(-100)
  kw = dict(label_smoothing=0.1, z_loss=1e-3, ignore_index=-100)
  f = lambda x, w, y: jxent.linear_softmax_cross_entropy(x, w, y, implementation=algo, **kw)
  for w_axis in (None, 0):
    ww = w if w_axis == 0 else w[0]
    vals, (dx, dw) = jax.jit(jax.vmap(jax.value_and_grad(f, argnums=(0, 1)),
                                      in_axes=(0, w_axis, 0)))(x, ww, y)
    for i in range(b):
      wi = np.asarray(w[i] if w_axis == 0 else w[0], np.float64)
      xi, yi = np.asarray(x[i], np.float64), np.asarray(y[i])
      kept = (yi != -100).astype(np.float64)
      loss, dl, _ = reference.xent(xi @ wi, yi, sparse=True, g=kept / kept.sum(), **kw)
      assert_close(vals[i], loss.sum() / kept.sum(), scale=5)
      assert_close(dx[i], dl @ wi.T, scale=5)
      assert_close(dw[i], xi.T @ dl, scale=5)


def test_reduction_none_and_leading_dims():
  x, w, y = data(1)
  x3 = x[:36].reshape(4, 9, 16)
  y3 = y[:36].reshape(4, 9)
  out = jxent.linear_softmax_cross_entropy(x3, w, y3, reduction="none", ignore_index=-100)
  ref = reference.xent(np.asarray(x3, np.float64) @ np.asarray(w, np.float64), y3, sparse=True,
                       ignore_index=-100)[0]
  assert out.shape == (4, 9)
  assert_close(out, ref, scale=5)
  with pytest.raises(ValueError, match="fused_grad_xla"):
    jxent.linear_softmax_cross_entropy(x, w, y, reduction="none", implementation="fused_grad_xla")


def test_finite_differences():
  x, w, y = data(2, n=6, d=4, v=7)
  y = jnp.maximum(y, 0)
  for algo in (jxent.LinearChunked(block_v=3), jxent.LinearChunked(block_v=3, block_n=4),
               jxent.LinearFusedGrad(block_n=4)):
    f = lambda x, w: jxent.linear_softmax_cross_entropy(x, w, y, implementation=algo, z_loss=0.1,
                                                        label_smoothing=0.1, logit_softcap=3.0)
    check_grads(f, (x, w), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_bf16_rule():
  x, w, y = data(3, n=64, d=32, v=257)
  y = jnp.maximum(y, 0)
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  truth = reference.xent(np.asarray(xb, np.float64) @ np.asarray(wb, np.float64), y, sparse=True)[0].mean()
  naive = jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(xb @ wb), y[:, None], -1))
  for algo in ("chunked_xla", jxent.LinearChunked(block_v=64, block_n=16), "fused_grad_xla",
               jxent.LinearFusedGrad(block_n=16, dw_accumulation="weights")):
    got = jxent.linear_softmax_cross_entropy(xb, wb, y, implementation=algo)
    assert got.dtype == jnp.bfloat16
    assert abs(float(got) - truth) <= abs(float(naive) - truth) + 1e-2 * abs(truth)
    dx, dw = jax.grad(lambda a, b: jxent.linear_softmax_cross_entropy(a, b, y, implementation=algo),
                      argnums=(0, 1))(xb, wb)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    # the weight gradient against float64 truth, within a few bf16 roundings of its scale
    _, dl, _ = reference.xent(np.asarray(xb, np.float64) @ np.asarray(wb, np.float64), y,
                              sparse=True, g=np.full(64, 1 / 64))
    tdw = np.asarray(xb, np.float64).T @ dl
    assert np.abs(np.asarray(dw, np.float64) - tdw).max() <= 3e-2 * np.abs(tdw).max()


def test_memory_bound():
  """jit(value_and_grad) temporaries <= 10% of the float32 [N, V] logits (N=2048, D=256, V=32768)."""
  n, d, v = 2048, 256, 32768
  x = jax.ShapeDtypeStruct((n, d), jnp.float32)
  w = jax.ShapeDtypeStruct((d, v), jnp.float32)
  y = jax.ShapeDtypeStruct((n,), jnp.int32)
  f = jax.jit(jax.value_and_grad(lambda x, w, y: jxent.linear_softmax_cross_entropy(x, w, y),
                                 argnums=(0, 1)))
  temp = f.lower(x, w, y).compile().memory_analysis().temp_size_in_bytes
  assert temp <= 0.10 * n * v * 4, temp


@pytest.mark.parametrize("v", [4099, 6147])
def test_few_blocks_keep_one_block(v):
  """Two or three vocab blocks: about one [N, block_v] float32 block of temporaries. A peeled first
  block (and a one-trip loop, which XLA inlines) let XLA merge the backward's recomputed logits
  with the forward's by CSE and keep them alive in between: 13.1 MB (jax 0.10.2) or 17.3 MB
  (0.10.0) at V = 4099, more than unfused (16.8 MB); 8.9 MB at V = 6147."""
  n, d = 512, 64
  args = (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((n,), jnp.int32))
  f = jax.jit(jax.value_and_grad(lambda x, w, y: jxent.linear_softmax_cross_entropy(x, w, y),
                                 argnums=(0, 1)))
  temp = f.lower(*args).compile().memory_analysis().temp_size_in_bytes
  assert temp <= 1.5 * n * jxent.LinearChunked().block_v * 4, temp


@pytest.mark.parametrize("algo", ALGOS)
def test_empty_batch(algo):
  x, w, y = jnp.zeros((0, 16)), jnp.ones((16, 101)), jnp.zeros((0,), jnp.int32)
  for reduction in ("mean", "sum"):
    v, (dx, dw) = jax.value_and_grad(lambda x, w: jxent.linear_softmax_cross_entropy(
        x, w, y, reduction=reduction, implementation=algo), argnums=(0, 1))(x, w)
    assert float(v) == 0.0 and dx.shape == (0, 16) and float(jnp.abs(dw).max()) == 0.0


def test_token_passes_shrink_temporaries():
  """LinearChunked(block_n=...) runs the tokens in passes (a loop: one set of temporaries)."""
  n, d, v = 2048, 256, 32768
  args = (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((n,), jnp.int32))

  def temp(algo):
    f = jax.jit(jax.value_and_grad(lambda x, w, y: jxent.linear_softmax_cross_entropy(
        x, w, y, implementation=algo), argnums=(0, 1)))
    return f.lower(*args).compile().memory_analysis().temp_size_in_bytes

  full, passes = temp(jxent.LinearChunked()), temp(jxent.LinearChunked(block_n=256))
  assert passes <= 0.5 * full, (passes, full)


def test_bad_input():
  x, w, y = data(4)
  with pytest.raises(ValueError, match="hidden"):
    jxent.linear_softmax_cross_entropy(x, w.T, y)
  with pytest.raises(TypeError, match="integers"):
    jxent.linear_softmax_cross_entropy(x, w, y.astype(jnp.float32))
  with pytest.raises(ValueError, match="Unknown implementation"):
    jxent.linear_softmax_cross_entropy(x, w, y, implementation="nope")
  with pytest.raises(ValueError, match="label_smoothing"):
    jxent.linear_softmax_cross_entropy(x, w, y, label_smoothing=2.0)
  with pytest.raises(ValueError, match="block_n must be None or a positive int, got 0"):
    jxent.LinearChunked(block_n=0)
  with pytest.raises(ValueError, match="block_v must be a positive int, got -1"):
    jxent.LinearChunked(block_v=-1)
  with pytest.raises(ValueError, match="dw_accumulation must be 'float32' or 'weights', got 'bf16'"):
    jxent.LinearFusedGrad(dw_accumulation="bf16")


def test_implementations_name_the_linear_algorithms():
  assert jxent.implementations("linear") == ("linear_chunked", "linear_fused_grad", "unfused")
  assert set(jxent.implementations()) == set(jxent.implementations("logits")) | set(
      jxent.implementations("linear"))
  with pytest.raises(ValueError, match="kind"):
    jxent.implementations("conv")
  with pytest.raises(ValueError, match=r"\['linear_chunked', 'linear_fused_grad', 'unfused'\]"):
    jxent.linear_softmax_cross_entropy(jnp.ones((2, 4)), jnp.ones((4, 8)), jnp.array([0, 1]),
                                       implementation="nope")


@pytest.mark.parametrize("impl", ["linear_chunked", "linear_fused_grad",
                                  jxent.LinearChunked(block_v=64, block_n=8),
                                  jxent.LinearFusedGrad(block_n=8, dw_accumulation="weights")],
                         ids=["chunked", "fused_grad", "chunked_passes", "fused_grad_weights"])
def test_float64_is_computed_in_float64(impl):
  """float64 inputs accumulate in float64 in every algorithm (they hard-coded float32: errors of
  1e-9 to 1e-7 relative), against a float64 NumPy statement of the loss and its gradients."""
  jax.config.update("jax_enable_x64", True)
  try:
    rng = np.random.default_rng(3)
    n, d, v, eps, zl = 37, 16, 300, 0.1, 1e-3
    x = jnp.asarray(rng.normal(size=(n, d)))
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.3)
    y = rng.integers(0, v, size=n)
    f = lambda x, w: jxent.linear_softmax_cross_entropy(
        x, w, jnp.asarray(y), implementation=impl, label_smoothing=eps, z_loss=zl)
    loss, (dx, dw) = jax.value_and_grad(f, (0, 1))(x, w)
    assert loss.dtype == dx.dtype == dw.dtype == jnp.float64
    xn, wn = np.asarray(x), np.asarray(w)
    z = xn @ wn
    m = z.max(1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]
    target = np.full((n, v), eps / v)
    target[np.arange(n), y] += 1 - eps
    want = np.mean((target * (lse[:, None] - z)).sum(1) + zl * lse ** 2)
    dz = ((1 + 2 * zl * lse)[:, None] * np.exp(z - lse[:, None]) - target) / n
    np.testing.assert_allclose(float(loss), want, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(dx), dz @ wn.T, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(np.asarray(dw), xn.T @ dz, rtol=1e-12, atol=1e-15)
  finally:
    jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("algo", ALGOS + [pytest.param("unfused", id="unfused")])
@pytest.mark.parametrize("ls, z, cap, ign", COMBOS)
def test_class_weight_against_reference(algo, ls, z, cap, ign):
  """class_weight (PyTorch's weight=): value, dx, dw and dclass_weight of the "sum" and the
  "mean" (divided by the kept rows' sum of w[label]) against the float64 NumPy formula."""
  x, w, y = data(5)
  if ign is None:
    y = jnp.where(y < 0, 7, y)
  rng = np.random.default_rng(6)
  cw = jnp.asarray(rng.uniform(0.2, 2.5, size=w.shape[1]), jnp.float32).at[1].set(0.0).at[2].set(-0.7)
  y = y.at[5].set(1)  # a label of weight 0
  logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  l, dlog, _, dcw = reference.xent(logits, y, sparse=True, label_smoothing=ls, z_loss=z,
                                   logit_softcap=cap, ignore_index=ign, class_weight=cw)
  kept = np.ones(y.shape, bool) if ign is None else np.asarray(y) != ign
  denom = np.sum(np.where(kept, np.asarray(cw, np.float64)[np.clip(y, 0, None)], 0.0))
  counts = np.bincount(np.asarray(y)[kept], minlength=w.shape[1])
  for reduction in ("sum", "mean"):
    f = lambda x, w, cw: jxent.linear_softmax_cross_entropy(
        x, w, y, class_weight=cw, reduction=reduction, label_smoothing=ls, z_loss=z,
        logit_softcap=cap, ignore_index=ign, implementation=algo)
    v, (dx, dw, dc) = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, w, cw)
    s = 1.0 if reduction == "sum" else 1.0 / denom
    rdc = dcw * s if reduction == "sum" else dcw * s - counts * l.sum() / denom ** 2
    assert_close(v, l.sum() * s, scale=5, what="loss")
    assert_close(dx, s * dlog @ np.asarray(w, np.float64).T, scale=5, what="dx")
    assert_close(dw, s * np.asarray(x, np.float64).T @ dlog, scale=5, what="dw")
    assert_close(dc, rdc, scale=5, what="dclass_weight")


def test_class_weight_bad_shape():
  x, w, y = data(0)
  with pytest.raises(ValueError, match=r"`class_weight` must have shape \(101,\).*w \(16, 101\)"):
    jxent.linear_softmax_cross_entropy(x, w, y, class_weight=jnp.ones(100))
