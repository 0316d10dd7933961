"""One shared test base: every implementation against the float64 NumPy reference and optax."""

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads
from hypothesis import given, settings

import jxent
from jxent._src import reference
from conftest import kernels
from helpers import assert_close, rand_logits, rand_probs, tol

OPTION_SETS = [
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"logit_softcap": 4.0},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "logit_softcap": 6.0},
]


@pytest.mark.parametrize("kernel", kernels())
class TestKernels:
  """Values and VJPs (random cotangents) of each kernel, all options, unaligned shapes."""

  @pytest.mark.parametrize("options", OPTION_SETS)
  @pytest.mark.parametrize("shape", [(7, 33), (3, 5, 131)])
  def test_integer_labels(self, kernel, options, shape):
    rng = np.random.default_rng(1)
    x = rand_logits(rng, shape)
    y = jnp.asarray(rng.integers(0, shape[-1], size=shape[:-1]))
    y = y.reshape(-1).at[1].set(-100).reshape(y.shape)
    g = jnp.asarray(rng.normal(size=shape[:-1]), jnp.float32)
    f = lambda x: jxent.softmax_cross_entropy_with_integer_labels(
        x, y, ignore_index=-100, implementation=kernel, **options)
    out, vjp = jax.vjp(jax.jit(f), x)
    (dx,) = vjp(g)
    l, rdx, _ = reference.xent(x, y, sparse=True, ignore_index=-100, g=g, **options)
    assert_close(out, l, what="loss")
    assert_close(dx, rdx, what="dlogits")
    assert float(jnp.abs(dx.reshape(-1, shape[-1])[1]).max()) == 0.0  # ignored row

  @pytest.mark.parametrize("options", OPTION_SETS)
  @pytest.mark.parametrize("tf_grad", [False, True])
  def test_dense_labels(self, kernel, options, tf_grad):
    rng = np.random.default_rng(2)
    x = rand_logits(rng, (9, 37))
    y = jnp.asarray(rng.random((9, 37)) * 0.1, jnp.float32)  # unnormalised soft labels
    g = jnp.asarray(rng.normal(size=(9,)), jnp.float32)
    opts = jxent._src.options.make_options(tf_grad=tf_grad, **options)

    def f(x, y):
      loss, _ = jxent._src.core.rows_loss(x, y, axis=-1, sparse=False, opts=opts,
                                          implementation=kernel)
      return loss

    if tf_grad and getattr(kernel, "autodiff", False):
      with pytest.raises(ValueError, match="cannot give TF's kernel gradient"):
        f(x, y)
      return
    out, vjp = jax.vjp(jax.jit(f), x, y)
    dx, dy = vjp(g)
    l, rdx, rdy = reference.xent(x, y, g=g, tf_grad=tf_grad, **options)
    assert_close(out, l, what="loss")
    assert_close(dx, rdx, what="dlogits")
    assert_close(dy, rdy, what="dlabels")

  @pytest.mark.parametrize("reduction", ["mean", "sum"])
  @pytest.mark.parametrize("sparse", [True, False])
  def test_scalar_reductions(self, kernel, reduction, sparse):
    rng = np.random.default_rng(3)
    x = rand_logits(rng, (11, 29))
    if sparse:
      y = jnp.asarray(rng.integers(0, 29, size=11)).at[4].set(-1)
      f = lambda x, s: s * jxent.softmax_cross_entropy_with_integer_labels(
          x, y, ignore_index=-1, reduction=reduction, implementation=kernel, z_loss=1e-3)
      l, rdx, _ = reference.xent(x, y, sparse=True, ignore_index=-1, z_loss=1e-3)
      n = 10
    else:
      y = jnp.asarray(rand_probs(rng, (11, 29)))
      f = lambda x, s: s * jxent.softmax_cross_entropy(
          x, y, reduction=reduction, implementation=kernel, z_loss=1e-3)
      l, rdx, _ = reference.xent(x, y, z_loss=1e-3)
      n = 11
    scale = 1.0 / n if reduction == "mean" else 1.0
    for s in (1.0, -1.7):  # cotangent 1 skips the scaling in the fused kernels
      v, dx = jax.jit(jax.value_and_grad(f))(x, s)
      assert_close(v, s * scale * l.sum(), what="value")
      assert_close(dx, s * scale * rdx, what="grad")

  def test_dense_labels_gradient_when_requested(self, kernel):
    """Scalar reduction, gradients for logits and labels (the labels one only when asked for)."""
    rng = np.random.default_rng(11)
    x = rand_logits(rng, (6, 21))
    y = jnp.asarray(rand_probs(rng, (6, 21)))
    f = lambda x, y: jxent.softmax_cross_entropy(x, y, reduction="sum", implementation=kernel,
                                                 label_smoothing=0.1)
    (dx, dy) = jax.jit(jax.grad(f, argnums=(0, 1)))(x, y)
    _, rdx, rdy = reference.xent(x, y, label_smoothing=0.1)
    assert_close(dx, rdx)
    assert_close(dy, rdy)
    assert_close(jax.jit(jax.grad(f))(x, y), rdx)

  @pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
  def test_half_precision_rule(self, kernel, dtype):
    """bf16/f16: error vs float32 truth no worse than naive half-precision error + small tol."""
    rng = np.random.default_rng(4)
    x32 = rand_logits(rng, (16, 257))
    y = jnp.asarray(rng.integers(0, 257, size=16))
    x = x32.astype(dtype)
    truth, tdx, _ = reference.xent(np.asarray(x.astype(jnp.float32)), y, sparse=True)
    got, vjp = jax.vjp(lambda x: jxent.softmax_cross_entropy_with_integer_labels(
        x, y, implementation=kernel), x)
    (dx,) = vjp(jnp.ones((16,), dtype))
    assert got.dtype == dtype and dx.dtype == dtype
    naive = -jnp.take_along_axis(jax.nn.log_softmax(x), y[:, None], -1)[:, 0]
    err = np.abs(np.asarray(got, np.float64) - truth).max()
    naive_err = np.abs(np.asarray(naive, np.float64) - truth).max()
    assert err <= naive_err + tol(dtype, 0.5) * np.abs(truth).max()
    assert_close(dx, tdx, dtype=dtype, scale=0.5, what="dlogits")

  @pytest.mark.parametrize("mask_kind", ["element", "row"])
  def test_where_masks_mean(self, kernel, mask_kind):
    """`where` masks with scalar reductions (the fused path for Pallas) against optax."""
    rng = np.random.default_rng(13)
    x = rand_logits(rng, (6, 20))
    y = jnp.asarray(rand_probs(rng, (6, 20)))
    if mask_kind == "element":
      w = jnp.asarray(rng.random((6, 20)) > 0.3).at[:, :3].set(True).at[4].set(False)
      kept = np.asarray(w.any(-1))
    else:
      w = jnp.array([True, False, True, True, False, True])
      kept = np.asarray(w)
    v, g = jax.jit(jax.value_and_grad(lambda x: jxent.softmax_cross_entropy(
        x, y, where=w, reduction="mean", implementation=kernel)))(x)
    rv, rg = jax.value_and_grad(lambda x: optax.softmax_cross_entropy(x, y, where=w).sum() /
                                kept.sum())(x)
    assert_close(v, rv)
    assert_close(g, rg)

  def test_vmap_and_grad(self, kernel):
    rng = np.random.default_rng(5)
    x = rand_logits(rng, (4, 6, 19))
    y = jnp.asarray(rng.integers(0, 19, size=(4, 6)))
    f = lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(x, y, implementation=kernel)
    v = jax.vmap(f)(x, y)
    assert_close(v, reference.xent(x, y, sparse=True)[0])
    gv = jax.vmap(jax.grad(lambda x, y: f(x, y).sum()))(x, y)
    assert_close(gv, reference.xent(x, y, sparse=True)[1])

  def test_empty_batch(self, kernel):
    """Zero rows: empty losses, zero-size gradients, scalar reductions 0 (no empty Pallas grid)."""
    x = jnp.zeros((0, 37))
    y = jnp.zeros((0,), jnp.int32)
    for reduction in ("none", "mean", "sum"):
      f = lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(
          x, y, reduction=reduction, implementation=kernel).sum()
      v, dx = jax.jit(jax.value_and_grad(f))(x, y)
      assert float(v) == 0.0 and dx.shape == (0, 37)
      fd = lambda x, y: jxent.softmax_cross_entropy(x, y, reduction=reduction,
                                                    implementation=kernel).sum()
      v, (dx, dy) = jax.jit(jax.value_and_grad(fd, argnums=(0, 1)))(x, x)
      assert float(v) == 0.0 and dx.shape == dy.shape == (0, 37)

  def test_out_of_range_labels_give_nan(self, kernel):
    """Per-row NaN for labels outside [0, C) (the Triton kernel reads the label's logit at a
    clipped address), in the row losses and in the fused scalar path; other rows stay exact."""
    rng = np.random.default_rng(6)
    x = rand_logits(rng, (4, 37))
    y = jnp.array([3, 37, -1, 36])
    f = lambda x: jxent.softmax_cross_entropy_with_integer_labels(x, y, implementation=kernel)
    out = np.asarray(jax.jit(f)(x))
    ref = reference.xent(x, jnp.array([3, 0, 0, 36]), sparse=True)[0]
    assert np.isnan(out[1]) and np.isnan(out[2])
    assert_close(out[[0, 3]], ref[[0, 3]])
    mean = jax.jit(lambda x: jxent.softmax_cross_entropy_with_integer_labels(
        x, y, reduction="mean", implementation=kernel))(x)
    assert np.isnan(mean)


class TestMosaicFused:
  """The TPU fused kernel (whole rows in VMEM, several row blocks and class chunks) and its
  two-kernel schedule for rows too long for the VMEM budget, against float64."""

  @pytest.mark.parametrize("vmem", [24 << 20, 1])
  @pytest.mark.parametrize("sparse", [True, False])
  def test_value_and_grads(self, vmem, sparse):
    from jxent._src.kernels.pallas_mosaic_tpu import PallasMosaicTpuKernel
    kernel = PallasMosaicTpuKernel(interpret=True, block_r=16, block_c=128, fused_vmem_bytes=vmem)
    assert (kernel.fused_rows(300, [jnp.float32] * 2) == 0) == (vmem == 1)
    rng = np.random.default_rng(21)
    x = rand_logits(rng, (37, 300))
    opts = dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0)
    if sparse:
      y = jnp.asarray(rng.integers(0, 300, size=37)).at[3].set(-100)
      f = lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(
          x, y, ignore_index=-100, reduction="mean", implementation=kernel, **opts)
      l, rdx, _ = reference.xent(x, y, sparse=True, ignore_index=-100, **opts)
      v, dx = jax.jit(jax.value_and_grad(f))(x, y)
      assert_close(v, l.sum() / 36)
      assert_close(dx, rdx / 36)
    else:
      y = jnp.asarray(rand_probs(rng, (37, 300)))
      f = lambda x, y: jxent.softmax_cross_entropy(x, y, reduction="sum", implementation=kernel,
                                                   **opts)
      l, rdx, rdy = reference.xent(x, y, **opts)
      v, (dx, dy) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, y)
      assert_close(v, l.sum())
      assert_close(dx, rdx)
      assert_close(dy, rdy)


  def test_row_blocks_are_sublane_aligned(self):
    from jxent._src.kernels.pallas_mosaic_tpu import PallasMosaicTpuKernel
    k = PallasMosaicTpuKernel(block_r=8)
    assert k._grid(3, 300, jnp.float32)[0] == 8
    assert k._grid(3, 300, jnp.bfloat16)[0] == 16  # 16-bit rows pack two per sublane
    # 24 MiB / (2 buffers x 128256 x (2 + 2) B) = 24 rows, aligned down to 16
    assert PallasMosaicTpuKernel().fused_rows(128256, [jnp.bfloat16] * 2) == 16
    assert PallasMosaicTpuKernel().fused_rows(32000, [jnp.bfloat16] * 2) == 96


_FUZZ_KERNELS = {
    "pallas_triton_walk": lambda: jxent.PallasTritonKernel(interpret=True, block_c=16),
    "pallas_triton_one_load": lambda: jxent.PallasTritonKernel(interpret=True, block_c=512,
                                                               row_groups=8, programs=2),
    "pallas_mosaic_tpu": lambda: jxent.PallasMosaicTpuKernel(interpret=True, block_r=8,
                                                             block_c=128),
    "pallas_mosaic_gpu": lambda: jxent.PallasMosaicGpuKernel(interpret=True, block_c=64,
                                                             max_concurrent_steps=2),
}



@pytest.mark.parametrize("sparse", [True, False], ids=["int", "dense"])
def test_mosaic_gpu_persistent_launch(sparse):
  """``programs=P``: P programs walk the blocks of 64 rows p, p + P, ... (300 rows are 5 blocks
  over 2 programs: one program takes a third block, the other skips its third step), for the
  statistics walk, the gradient walk and token_log_probs, against the float64 reference."""
  kernel = jxent.PallasMosaicGpuKernel(interpret=True, block_c=64, max_concurrent_steps=2,
                                       programs=2)
  rng = np.random.default_rng(11)
  x = rand_logits(rng, (300, 130))
  opts = dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0)
  g = jnp.asarray(rng.normal(size=300), jnp.float32)
  if sparse:
    y = jnp.asarray(rng.integers(0, 130, size=300)).at[7].set(-100)
    fn = lambda x: jxent.softmax_cross_entropy_with_integer_labels(
        x, y, ignore_index=-100, implementation=kernel, **opts)
    loss, dl, _ = reference.xent(x, y, sparse=True, ignore_index=-100, **opts)
  else:
    y = jnp.asarray(rand_probs(rng, (300, 130)))
    fn = lambda x: jxent.softmax_cross_entropy(x, y, implementation=kernel, **opts)
    loss, dl, _ = reference.xent(x, y, **opts)
  out, vjp = jax.vjp(fn, x)
  assert_close(out, loss)
  assert_close(vjp(g)[0], np.asarray(dl) * np.asarray(g)[:, None])
  v, dx = jax.value_and_grad(lambda x: fn(x).sum())(x)  # (the fused form: both walks)
  assert_close(v, loss.sum(), scale=5)
  assert_close(dx, dl, scale=5)
  if sparse:
    lp = jxent.token_log_probs(x, jnp.maximum(y, 0), implementation=kernel)
    assert_close(lp, jax.nn.log_softmax(x)[jnp.arange(300), jnp.maximum(y, 0)])
  with pytest.raises(ValueError, match="programs must be a positive int, got 0"):
    jxent.PallasMosaicGpuKernel(programs=0)

class TestPallasRandom:
  """Random shapes (block boundaries included), options and reductions for the Pallas kernels in
  interpret mode, against the float64 reference."""

  @pytest.mark.parametrize("name", sorted(_FUZZ_KERNELS))
  def test_random(self, name):
    kernel = _FUZZ_KERNELS[name]()

    @given(rows=st.integers(1, 11), classes=st.sampled_from([1, 2, 15, 16, 17, 127, 128, 129, 300]),
           sparse=st.booleans(), reduction=st.sampled_from(["none", "mean", "sum"]),
           eps=st.sampled_from([0.0, 0.1, 1.0]), z=st.sampled_from([0.0, 1e-2]),
           cap=st.sampled_from([None, 3.0]), seed=st.integers(0, 2**16))
    @settings(max_examples=6, deadline=None)
    def check(rows, classes, sparse, reduction, eps, z, cap, seed):
      rng = np.random.default_rng(seed)
      x = rand_logits(rng, (rows, classes))
      opts = dict(label_smoothing=eps, z_loss=z, logit_softcap=cap)
      if sparse:
        y = jnp.asarray(rng.integers(0, classes, size=rows)).at[0].set(-100)
        fn = lambda x: jxent.softmax_cross_entropy_with_integer_labels(
            x, y, ignore_index=-100, reduction=reduction, implementation=kernel, **opts)
        loss, dl, _ = reference.xent(x, y, sparse=True, ignore_index=-100, **opts)
        kept = np.asarray(y) != -100
      else:
        y = jnp.asarray(rand_probs(rng, (rows, classes)))
        fn = lambda x: jxent.softmax_cross_entropy(x, y, reduction=reduction,
                                                   implementation=kernel, **opts)
        loss, dl, _ = reference.xent(x, y, **opts)
        kept = np.ones(rows, bool)
      scale = 1.0 / max(kept.sum(), 1) if reduction == "mean" else 1.0
      v, dx = jax.value_and_grad(lambda x: fn(x).sum())(x)
      assert_close(v, loss.sum() * scale, scale=5)
      assert_close(dx, dl * scale, scale=5)

    check()


class TestAgainstOptax:
  """Native API with default options == optax (values and gradients)."""

  @given(rows=st.integers(1, 6), classes=st.integers(1, 40), extra=st.integers(1, 3),
         axis=st.integers(-3, 2), seed=st.integers(0, 2**16),
         dtype=st.sampled_from([jnp.float32, jnp.float16, jnp.bfloat16]))
  @settings(max_examples=25, deadline=None)
  def test_random(self, rows, classes, extra, axis, seed, dtype):
    rng = np.random.default_rng(seed)
    shape = (rows, extra, classes)
    x = rand_logits(rng, shape).astype(dtype)
    yd = jnp.asarray(rand_probs(rng, shape))
    x = jnp.moveaxis(x, -1, axis)
    yd = jnp.moveaxis(yd, -1, axis)
    yi = jnp.asarray(rng.integers(0, classes, size=(rows, extra)))
    # Dense.
    # (jit: one compile per example instead of one per primitive, eagerly)
    ours, (dx, dy) = jax.jit(jax.value_and_grad(
        lambda a, b: jxent.softmax_cross_entropy(a, b, axis=axis).astype(jnp.float32).sum(),
        argnums=(0, 1)))(x, yd)
    theirs, (tdx, tdy) = jax.jit(jax.value_and_grad(
        lambda a, b: optax.softmax_cross_entropy(a.astype(jnp.float32), b, axis=axis).sum(),
        argnums=(0, 1)))(x, yd)
    assert_close(ours, theirs, dtype, scale=rows * extra)
    assert_close(dx, tdx, dtype)
    assert_close(dy, tdy, dtype, scale=10)
    # Integer (class axis moved to the same place).
    ours = jax.jit(lambda x, yi: jxent.softmax_cross_entropy_with_integer_labels(x, yi,
                                                                                 axis=axis))(x, yi)
    theirs = jax.jit(lambda x, yi: optax.softmax_cross_entropy_with_integer_labels(
        x.astype(jnp.float32), yi, axis=axis))(x, yi)
    assert ours.dtype == dtype
    assert_close(ours, theirs, dtype, scale=3)

  def test_where_matches_optax(self):
    rng = np.random.default_rng(6)
    x = rand_logits(rng, (5, 12))
    y = jnp.asarray(rand_probs(rng, (5, 12)))
    yi = jnp.asarray(rng.integers(0, 6, size=5))
    w_elem = jnp.asarray(rng.random((5, 12)) > 0.3).at[:, :6].set(True).at[2].set(False)
    w_row = jnp.array([True, False, True, True, False])
    for w in (w_elem, w_row):
      a, ga = jax.value_and_grad(lambda x: jxent.softmax_cross_entropy(x, y, where=w).sum())(x)
      b, gb = jax.value_and_grad(lambda x: optax.softmax_cross_entropy(x, y, where=w).sum())(x)
      assert_close(a, b)
      assert_close(ga, gb)
      a = jxent.softmax_cross_entropy_with_integer_labels(x, yi, where=w)
      b = optax.softmax_cross_entropy_with_integer_labels(x, yi, where=w)
      assert_close(a, b)
    # mean over kept rows
    m = jxent.softmax_cross_entropy_with_integer_labels(x, yi, where=w_row, reduction="mean")
    assert_close(m, optax.softmax_cross_entropy_with_integer_labels(x, yi)[w_row].mean())


class TestCore:

  def test_residuals_are_per_row(self, capsys):
    """Between forward and backward: the inputs and three float32 values per row (the row
    statistics m, log_z and z), nothing [R, C]."""
    x = jnp.ones((64, 1000))
    yi = jnp.zeros((64,), jnp.int32)
    yd = jax.nn.one_hot(yi, 1000)
    from jax.ad_checkpoint import print_saved_residuals
    for impl in ("xla", "chunked_xla"):
      print_saved_residuals(lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(
          x, y, reduction="mean", implementation=impl), x, yi)
      print_saved_residuals(lambda x, y: jxent.softmax_cross_entropy(
          x, y, implementation=impl).sum(), x, yd)
    lines = capsys.readouterr().out.strip().splitlines()
    big = [l for l in lines if "64,1000]" in l and "from the argument" not in l]
    assert not big, lines
    assert sum("f32[64] output" in l for l in lines) == 4 * 3, lines

  @pytest.mark.parametrize("sparse", [True, False])
  def test_long_rows_segmented(self, sparse):
    """Rows longer than 4096 are reduced in segments on CPU; with options and a -inf logit."""
    rng = np.random.default_rng(12)
    x = rand_logits(rng, (3, 5000)).at[1, 7].set(-jnp.inf)
    y = jnp.asarray(rng.integers(0, 5000, size=3)) if sparse else jnp.asarray(rand_probs(rng, (3, 5000))).at[1, 7].set(0.0)
    kw = dict(label_smoothing=0.1, z_loss=1e-3) if sparse else dict(z_loss=1e-3)
    f = jxent.softmax_cross_entropy_with_integer_labels if sparse else jxent.softmax_cross_entropy
    out, vjp = jax.vjp(lambda x: f(x, y, implementation="xla", **kw), x)
    l, rdx, _ = reference.xent(x, y, sparse=sparse, **kw)
    assert_close(out, l, scale=5)
    assert_close(vjp(jnp.ones(3))[0], rdx)

  def test_masked_neg_inf_logit(self):
    x = jnp.array([[0.0, -jnp.inf, 1.0]])
    y = jnp.array([[1.0, 0.0, 0.0]])
    loss, dx = jax.value_and_grad(lambda x: jxent.softmax_cross_entropy(x, y).sum())(x)
    np.testing.assert_allclose(loss, 1.3132616, rtol=1e-6)
    np.testing.assert_allclose(dx, [[-0.7310586, 0.0, 0.7310586]], rtol=1e-6)

  @pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
  @pytest.mark.parametrize("sparse", [True, False])
  @pytest.mark.parametrize("classes", [257, 5000])
  def test_half_precision_forms(self, dtype, sparse, classes):
    """16-bit logits through every XLA form (on CPU: whole or segmented rows, loss-only or
    beside the lse, bfloat16's barriers and select): float32-accurate on the rounded inputs,
    with options."""
    rng = np.random.default_rng(21)
    x = rand_logits(rng, (9, classes)).astype(dtype)
    y = (jnp.asarray(rng.integers(0, classes, size=9)) if sparse
         else jnp.asarray(rand_probs(rng, (9, classes))).astype(dtype))
    kw = dict(label_smoothing=0.1, z_loss=1e-3)
    f = jxent.softmax_cross_entropy_with_integer_labels if sparse else jxent.softmax_cross_entropy
    g = np.asarray(jnp.asarray(rng.normal(size=9), dtype), np.float64)
    loss, tdx, tdy = reference.xent(np.asarray(x, np.float32), y if sparse else
                                    np.asarray(y, np.float32), sparse=sparse, g=g, **kw)
    out = jax.jit(lambda x, y: f(x, y, implementation="xla", **kw))(x, y)
    assert out.dtype == dtype
    assert_close(out, loss, dtype=dtype, scale=0.5, what="loss only")
    out, vjp = jax.vjp(lambda x, y: f(x, y, implementation="xla", **kw), x, y)
    assert_close(out, loss, dtype=dtype, scale=0.5, what="loss beside the lse")
    dx, dy = vjp(jnp.asarray(g, dtype))
    assert_close(dx, tdx, dtype=dtype, scale=2, what="dlogits")
    if not sparse:
      assert_close(dy, tdy, dtype=dtype, scale=2, what="dlabels")

  @pytest.mark.parametrize("shape", [(7, 33), (420, 5000)])
  def test_masked_logits_forward_only(self, shape):
    """The loss without a gradient, at masked logits, row by row, as the gradient path gives it.

    (On CPU both dense forms, loss-only and beside the lse, are NaN at ``0 * inf``; such rows
    take the exact form, one capped reduction; a row of all -inf stays NaN.)"""
    rng = np.random.default_rng(3)
    x = rand_logits(rng, shape).at[::5, 3].set(-jnp.inf).at[1, 4].set(-jnp.inf)
    x = x.at[2].set(-jnp.inf)  # a whole row masked
    y = jnp.asarray(rand_probs(rng, shape)).at[::5, 3].set(0.0)  # zero labels where masked
    f = lambda x, y: jxent.softmax_cross_entropy(x, y, implementation="xla")
    loss = jax.jit(f)(x, y)
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m = np.where(np.isneginf(x64.max(-1)), 0.0, x64.max(-1))[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
      lse = m + np.log(np.sum(np.exp(x64 - m), axis=-1, keepdims=True))
      want = np.sum(np.where(y64 == 0, 0.0, y64 * (lse - x64)), axis=-1)
    assert np.isinf(loss[1]) and loss[1] > 0  # a positive label on a masked logit
    assert np.isnan(loss[2]) and np.isnan(want[2])
    keep = np.ones(shape[0], bool)
    keep[[1, 2]] = False
    assert_close(loss[keep], want[keep], scale=5)
    # the same values where the lse is kept for a gradient, and under vmap
    assert_close(jax.value_and_grad(lambda x: f(x, y)[keep].sum())(x)[0], want[keep].sum(), scale=50)
    assert_close(jax.vmap(f)(x[:, None], y[:, None])[keep, 0], want[keep], scale=5)

  def test_out_of_range_labels_give_nan(self):
    x = jnp.zeros((3, 4))
    out = jax.jit(jxent.softmax_cross_entropy_with_integer_labels)(x, jnp.array([0, 4, -1]))
    assert np.isfinite(out[0]) and np.isnan(out[1]) and np.isnan(out[2])
    from jax.experimental import checkify
    f = checkify.checkify(lambda y: jxent.check_integer_labels(y, 4))
    err, _ = jax.jit(f)(jnp.array([0, 4]))
    assert err.get() is not None and "out of range" in err.get()
    err, _ = jax.jit(f)(jnp.array([0, 3]))
    assert err.get() is None

  def test_check_grads(self):
    rng = np.random.default_rng(7)
    x = rand_logits(rng, (3, 5), scale=1.0)
    y = jnp.asarray(rand_probs(rng, (3, 5)))
    f = lambda x, y: jxent.softmax_cross_entropy(x, y, z_loss=0.1, logit_softcap=3.0,
                                                 label_smoothing=0.1).sum()
    check_grads(f, (x, y), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
    yi = jnp.array([0, 4, 2])
    fi = lambda x: jxent.softmax_cross_entropy_with_integer_labels(x, yi, z_loss=0.1,
                                                                   label_smoothing=0.2).sum()
    check_grads(fi, (x,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)

  def test_no_retrace(self):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, y):
      return jxent.softmax_cross_entropy_with_integer_labels(x, y, reduction="mean")

    rng = np.random.default_rng(8)
    for _ in range(3):
      f(rand_logits(rng, (4, 9)), jnp.asarray(rng.integers(0, 9, size=4)))

  @pytest.mark.parametrize("bad, exc, match", [
      (dict(logits=jnp.ones((2, 3), jnp.int32)), TypeError, "floating"),
      (dict(labels=jnp.ones((2,), jnp.float32)), TypeError, "integer dtype"),
      (dict(labels=jnp.ones((3,), jnp.int32)), ValueError, r"\(3,\)"),
      (dict(axis=2), ValueError, "out of range"),
      (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
      (dict(z_loss=-1.0), ValueError, "z_loss"),
      (dict(logit_softcap=0.0), ValueError, "logit_softcap"),
      (dict(reduction="avg"), ValueError, "reduction"),
      (dict(implementation="nope"), ValueError, "Unknown implementation"),
      (dict(implementation="pallas_triton"), ValueError, "cannot run on the 'cpu'"),
      (dict(implementation="pallas_mosaic_tpu"), ValueError, "cannot run on the 'cpu'"),
      (dict(implementation="pallas_mosaic_gpu"), ValueError, "cannot run on the 'cpu'"),
  ])
  def test_bad_input(self, bad, exc, match):
    args = dict(logits=jnp.ones((2, 3)), labels=jnp.zeros((2,), jnp.int32))
    args.update(bad)
    logits, labels = args.pop("logits"), args.pop("labels")
    with pytest.raises(exc, match=match):
      jax.jit(lambda a, b: jxent.softmax_cross_entropy_with_integer_labels(a, b, **args))(
          logits, labels)

  @pytest.mark.parametrize("bad, match", [
      (dict(block_c=1000), "power of two, got 1000"),
      (dict(block_c=0), "block_c must be a positive int, got 0"),
      (dict(num_warps=-4), "num_warps must be a positive int, got -4"),
      (dict(programs=0), "programs must be None or a positive int, got 0"),
      (dict(row_groups=3), "row_groups must be a power of two, got 3"),
      (dict(block_c=16, row_groups=32), r"row_groups \(32\) must not exceed block_c \(16\)"),
  ])
  def test_bad_triton_kernel_parameters(self, bad, match):
    with pytest.raises(ValueError, match=match):
      jxent.PallasTritonKernel(**bad)

  def test_gpu_default_thresholds(self, monkeypatch):
    """implementation=None on a GPU: Triton from 1024 classes for 16/32-bit logits, else XLA."""
    from jxent._src import dispatch
    from helpers import abstract_gpu

    def pick(shape, dtype):
      with abstract_gpu():  # (an H200, as lowering for it from this host sees it)
        return dispatch.resolve(None, sparse=True, shape=shape, dtype=dtype).name

    assert pick((8, 1024), jnp.bfloat16) == "pallas_triton"
    assert pick((8, 128256), jnp.float32) == "pallas_triton"
    assert pick((8, 1023), jnp.float32) == "xla"
    assert pick((8, 4096), jnp.float64) == "xla"

  @pytest.mark.parametrize("kernel, bad, match", [
      ("PallasMosaicTpuKernel", dict(block_c=100), "multiple of 128"),
      ("PallasMosaicTpuKernel", dict(block_r=0), "block_r must be a positive int, got 0"),
      ("ChunkedXlaKernel", dict(block=-2), "block must be a positive int, got -2"),
      ("PallasMosaicGpuKernel", dict(block_c=96), "multiple of 64 up to 256, got 96"),
      ("PallasMosaicGpuKernel", dict(max_concurrent_steps=0),
       "max_concurrent_steps must be a positive int, got 0"),
  ])
  def test_bad_kernel_parameters(self, kernel, bad, match):
    with pytest.raises(ValueError, match=match):
      getattr(jxent, kernel)(**bad)

  def test_dense_shape_mismatch(self):
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 2\)"):
      jxent.softmax_cross_entropy(jnp.ones((2, 2)), jnp.ones((2, 3)))

  def test_reductions(self):
    rng = np.random.default_rng(9)
    x = rand_logits(rng, (6, 10))
    y = jnp.array([1, 2, -100, 3, -100, 0])
    per = reference.xent(x, y, sparse=True, ignore_index=-100)[0]
    f = lambda r: jxent.softmax_cross_entropy_with_integer_labels(x, y, ignore_index=-100,
                                                                  reduction=r)
    assert_close(f("none"), per)
    assert_close(f("sum"), per.sum())
    assert_close(f("mean"), per.sum() / 4)
    all_ignored = jxent.softmax_cross_entropy_with_integer_labels(
        x, jnp.full((6,), -100), ignore_index=-100, reduction="mean")
    assert float(all_ignored) == 0.0


# --------------------------------------------------------------------------------------------
# class_weight: PyTorch's weight=, against the float64 NumPy statement of its formula
# (jxent._src.reference.xent with class_weight), every implementation.
# --------------------------------------------------------------------------------------------
def _class_weight(rng, c):
  """Random positive weights with one zero and one negative weight (PyTorch allows both)."""
  w = rng.uniform(0.2, 2.5, size=c)
  w[1], w[2] = 0.0, -0.7
  return jnp.asarray(w, jnp.float32)


@pytest.mark.parametrize("kernel", kernels())
class TestClassWeight:

  @pytest.mark.parametrize("options", OPTION_SETS)
  @pytest.mark.parametrize("shape", [(7, 33), (3, 5, 131)])
  def test_integer_labels(self, kernel, options, shape):
    rng = np.random.default_rng(21)
    x = rand_logits(rng, shape)
    y = jnp.asarray(rng.integers(0, shape[-1], size=shape[:-1]))
    y = y.reshape(-1).at[1].set(-100).at[2].set(1).reshape(y.shape)  # ignored; weight 0
    w = _class_weight(rng, shape[-1])
    g = jnp.asarray(rng.normal(size=shape[:-1]), jnp.float32)
    f = lambda x, w: jxent.softmax_cross_entropy_with_integer_labels(
        x, y, ignore_index=-100, implementation=kernel, class_weight=w, **options)
    out, vjp = jax.vjp(jax.jit(f), x, w)
    dx, dw = vjp(g)
    l, rdx, _, rdw = reference.xent(x, y, sparse=True, ignore_index=-100, g=g, class_weight=w,
                                    **options)
    assert_close(out, l, what="loss")
    assert_close(dx, rdx, what="dlogits")
    assert_close(dw, rdw, what="dclass_weight")
    assert float(jnp.abs(dx.reshape(-1, shape[-1])[1]).max()) == 0.0  # ignored row

  @pytest.mark.parametrize("options", OPTION_SETS)
  def test_dense_labels(self, kernel, options):
    rng = np.random.default_rng(22)
    x = rand_logits(rng, (9, 37))
    y = jnp.asarray(rng.random((9, 37)) * 0.1, jnp.float32)  # unnormalised soft labels
    w = _class_weight(rng, 37)
    g = jnp.asarray(rng.normal(size=(9,)), jnp.float32)
    f = lambda x, y, w: jxent.softmax_cross_entropy(x, y, implementation=kernel, class_weight=w,
                                                    **options)
    out, vjp = jax.vjp(jax.jit(f), x, y, w)
    dx, dy, dw = vjp(g)
    l, rdx, rdy, rdw = reference.xent(x, y, g=g, class_weight=w, **options)
    assert_close(out, l, what="loss")
    assert_close(dx, rdx, what="dlogits")
    assert_close(dy, rdy, what="dlabels")
    assert_close(dw, rdw, what="dclass_weight")

  @pytest.mark.parametrize("reduction", ["mean", "sum"])
  @pytest.mark.parametrize("sparse", [True, False])
  def test_reductions(self, kernel, reduction, sparse):
    """PyTorch's reductions: integer labels' "mean" divides by sum(w[label]) over the rows not
    ignored; dense labels' by the number of rows."""
    rng = np.random.default_rng(23)
    x = rand_logits(rng, (11, 29))
    w = _class_weight(rng, 29)
    if sparse:
      y = jnp.asarray(rng.integers(3, 29, size=11)).at[4].set(-1).at[5].set(2)
      f = lambda x, w: jxent.softmax_cross_entropy_with_integer_labels(
          x, y, ignore_index=-1, reduction=reduction, implementation=kernel, class_weight=w,
          label_smoothing=0.1)
      l, rdx, _, rdw = reference.xent(x, y, sparse=True, ignore_index=-1, class_weight=w,
                                      label_smoothing=0.1)
      wy = np.where(np.asarray(y) == -1, 0.0, np.asarray(w, np.float64)[np.clip(y, 0, None)])
      denom = wy.sum()
    else:
      y = jnp.asarray(rand_probs(rng, (11, 29)))
      f = lambda x, w: jxent.softmax_cross_entropy(
          x, y, reduction=reduction, implementation=kernel, class_weight=w, label_smoothing=0.1)
      l, rdx, _, rdw = reference.xent(x, y, class_weight=w, label_smoothing=0.1)
      wy, denom = None, 11.0
    v, (dx, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w)
    if reduction == "sum":
      assert_close(v, l.sum(), what="value")
      assert_close(dx, rdx, what="dlogits")
      assert_close(dw, rdw, what="dclass_weight")
      return
    assert_close(v, l.sum() / denom, what="value")
    assert_close(dx, rdx / denom, what="dlogits")
    if sparse:  # the denominator's own derivative: - mean / denom at each kept label's class
      counts = np.bincount(np.asarray(y)[np.asarray(y) >= 0], minlength=29)
      rdw = rdw / denom - counts * (l.sum() / denom ** 2)
    else:
      rdw = rdw / denom
    assert_close(dw, rdw, what="dclass_weight")

  def test_zero_weight_sum_mean_is_nan(self, kernel):
    """As PyTorch: "mean" with every kept label's weight 0 is 0 / 0."""
    x = jnp.asarray(np.random.default_rng(24).normal(size=(4, 19)), jnp.float32)
    w = jnp.ones(19).at[3].set(0.0)
    f = lambda: jxent.softmax_cross_entropy_with_integer_labels(
        x, jnp.full((4,), 3), reduction="mean", implementation=kernel, class_weight=w)
    assert np.isnan(float(f()))
    # (the sum is an ordinary 0)
    assert float(jxent.softmax_cross_entropy_with_integer_labels(
        x, jnp.full((4,), 3), reduction="sum", implementation=kernel, class_weight=w)) == 0.0

  @pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
  def test_half_precision(self, kernel, dtype):
    rng = np.random.default_rng(25)
    x = rand_logits(rng, (6, 45), dtype)
    y = jnp.asarray(rng.integers(0, 45, size=6))
    w = _class_weight(rng, 45)
    f = lambda x: jxent.softmax_cross_entropy_with_integer_labels(
        x, y, implementation=kernel, class_weight=w, label_smoothing=0.1, reduction="sum")
    v, dx = jax.jit(jax.value_and_grad(f))(x)
    assert v.dtype == dtype and dx.dtype == dtype
    l, rdx, _, _ = reference.xent(x.astype(jnp.float32), y, sparse=True, class_weight=w,
                                  label_smoothing=0.1)
    assert_close(v, l.sum(), dtype, scale=float(np.abs(l).sum()))
    assert_close(dx, rdx, dtype)

  def test_vmap(self, kernel):
    rng = np.random.default_rng(26)
    x = rand_logits(rng, (3, 5, 23))
    y = jnp.asarray(rng.integers(0, 23, size=(3, 5)))
    w = _class_weight(rng, 23)
    f = lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(
        x, y, implementation=kernel, class_weight=w, label_smoothing=0.2)
    got = jax.jit(jax.vmap(jax.grad(lambda x, y: f(x, y).sum())))(x, y)
    _, rdx, _, _ = reference.xent(x, y, sparse=True, class_weight=w, label_smoothing=0.2)
    assert_close(got, rdx)


class TestClassWeightErrors:

  @pytest.mark.parametrize("bad, exc, match", [
      (np.ones(32, np.float32), ValueError, r"`class_weight` must have shape \(33,\).*got \(32,\)"),
      (np.ones((1, 33), np.float32), ValueError, r"must have shape \(33,\)"),
      (np.ones(33, np.int32), TypeError, "`class_weight` must have a floating dtype, got int32"),
  ])
  def test_bad_class_weight(self, bad, exc, match):
    x = jnp.zeros((2, 33)) + jnp.arange(33.0)
    with pytest.raises(exc, match=match):
      jxent.softmax_cross_entropy_with_integer_labels(x, jnp.array([0, 1]), class_weight=bad)
    with pytest.raises(exc, match=match):
      jxent.softmax_cross_entropy(x, jax.nn.one_hot(jnp.array([0, 1]), 33), class_weight=bad)

  def test_several_class_axes(self):
    """With a tuple of class axes the weight is flat [C] or the classes' own shape."""
    rng = np.random.default_rng(27)
    x = rand_logits(rng, (4, 3, 5))
    y = jnp.asarray(rng.integers(0, 15, size=4))
    w = _class_weight(rng, 15)
    flat = jxent.softmax_cross_entropy_with_integer_labels(x.reshape(4, 15), y, class_weight=w)
    for cw in (w, w.reshape(3, 5)):
      got = jxent.softmax_cross_entropy_with_integer_labels(x, y, axis=(1, 2), class_weight=cw)
      np.testing.assert_allclose(got, flat, rtol=1e-6)

  def test_a_kernel_without_class_weights_is_refused(self):
    """A user kernel whose forward / backward take no class_weight= gets a clear error."""
    class Plain:
      name, platforms, interpret = "plain", ("cpu",), False
      forward = staticmethod(lambda logits, labels, **kw: jxent.XlaKernel().forward(logits, labels, **kw))
      backward = staticmethod(lambda *a, **kw: jxent.XlaKernel().backward(*a, **kw))
    x = jnp.ones((2, 5))
    with pytest.raises(ValueError, match="'plain' does not take `class_weight`"):
      jxent.softmax_cross_entropy_with_integer_labels(x, jnp.array([0, 1]), implementation=Plain(),
                                                      class_weight=jnp.ones(5))
    jxent.softmax_cross_entropy_with_integer_labels(x, jnp.array([0, 1]), implementation=Plain())

  def test_default_takes_a_weighted_kernel(self):
    rng = np.random.default_rng(28)
    x = rand_logits(rng, (5, 17))
    y = jnp.asarray(rng.integers(0, 17, size=5))
    w = _class_weight(rng, 17)
    np.testing.assert_array_equal(
        jxent.softmax_cross_entropy_with_integer_labels(x, y, class_weight=w),
        jxent.softmax_cross_entropy_with_integer_labels(x, y, class_weight=w, implementation="xla"))

  def test_unit_weights_are_the_unweighted_loss(self):
    rng = np.random.default_rng(29)
    x = rand_logits(rng, (6, 40))
    y = jnp.asarray(rng.integers(0, 40, size=6))
    kw = dict(label_smoothing=0.1, z_loss=1e-3, reduction="mean")
    f = lambda x, w: jxent.softmax_cross_entropy_with_integer_labels(x, y, class_weight=w, **kw)
    v, dx = jax.value_and_grad(f)(x, jnp.ones(40))
    rv, rdx = jax.value_and_grad(lambda x: jxent.softmax_cross_entropy_with_integer_labels(
        x, y, **kw))(x)
    np.testing.assert_allclose(v, rv, rtol=1e-6)
    np.testing.assert_allclose(dx, rdx, rtol=1e-5, atol=1e-7)
