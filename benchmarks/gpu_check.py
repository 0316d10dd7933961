"""GPU check and tuning, one call: compiled Pallas Triton kernels vs the XLA path (correctness),
then block-size sweeps for the Triton kernels and the linear cross-entropy.

Run on a GPU machine from the repo root:  PYTHONPATH=. python benchmarks/gpu_check.py
Writes $OUT/gpu_check.jsonl (one JSON object per line).
"""
import itertools, os
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax, jax.numpy as jnp
import jxent
from jxent._src.pallas_triton import PallasTritonKernel
from jxent.bench.cli import _median_ms

from gpu_util import jsonl_log, rel

emit = jsonl_log("gpu_check.jsonl")

emit(case="device", kind=jax.devices()[0].device_kind, jax=jax.__version__)
key = jax.random.key(0)
OPTS = dict(label_smoothing=0.1, z_loss=1e-4, logit_softcap=30.0)

def int_rows(x, y, impl, o): return jxent.softmax_cross_entropy_with_integer_labels(x, y, ignore_index=-100, implementation=impl, **o)
def int_mean(x, y, impl, o): return jxent.softmax_cross_entropy_with_integer_labels(x, y, ignore_index=-100, implementation=impl, reduction="mean", **o)
def dense_rows(x, y, impl, o): return jxent.softmax_cross_entropy(x, y, implementation=impl, **o)
def dense_mean(x, y, impl, o): return jxent.softmax_cross_entropy(x, y, implementation=impl, reduction="mean", **o)

for (n, v), dt in (((8192, 128256), jnp.bfloat16), ((4096, 256000), jnp.bfloat16), ((1000, 32003), jnp.float32), ((513, 4099), jnp.float16)):
  k1, k2 = jax.random.split(jax.random.fold_in(key, n))
  x = (jax.random.normal(k1, (n, v), jnp.float32) * 3).astype(dt)
  yi = jax.random.randint(k2, (n,), 0, v).at[5].set(-100)
  yd = (jax.nn.one_hot(jnp.maximum(yi, 0), v, dtype=dt) * 0.9 + 0.1 / v).astype(dt)
  g = jax.random.normal(k2, (n,), jnp.float32).astype(dt)
  for o, (rows_f, mean_f, y) in itertools.product(({}, OPTS), ((int_rows, int_mean, yi), (dense_rows, dense_mean, yd))):
    res = {}
    for impl in ("xla", "pallas_triton"):
      fr = jax.jit(lambda x, y, g: jax.vjp(lambda x: rows_f(x, y, impl, o), x)[1](g)[0])
      fo = jax.jit(lambda x, y: rows_f(x, y, impl, o))
      fm = jax.jit(jax.value_and_grad(lambda x, y, s: s * mean_f(x, y, impl, o)))
      try:
        res[impl] = (fo(x, y), fr(x, y, g)) + fm(x, y, 2.0)
      except Exception as e:
        emit(case="check", shape=[n, v], impl=impl, error=repr(e)[:1500])
    if len(res) == 2:
      a, b = res["pallas_triton"], res["xla"]
      emit(case="check", shape=[n, v], dtype=str(jnp.dtype(dt)), labels="int" if y is yi else "dense", opts=bool(o),
           loss_rel=rel(a[0], b[0]), dlogits_rel=rel(a[1], b[1]), mean_rel=rel(a[2], b[2]), mean_grad_rel=rel(a[3], b[3]))
  del x, yd

n, v = 8192, 128256
xs = [((jax.random.normal(jax.random.fold_in(key, i), (n, v), jnp.float32) * 3).astype(jnp.bfloat16),
       jax.random.randint(jax.random.fold_in(key, 100 + i), (n,), 0, v)) for i in range(2)]
for bc, nw, ns in itertools.product((2048, 4096, 8192), (4, 8, 16), (1, 3)):
  k = PallasTritonKernel(block_c=bc, num_warps=nw, num_stages=ns)
  try:
    fwd = jax.jit(lambda x, y: int_rows(x, y, k, {}))
    rows = jax.jit(jax.value_and_grad(lambda x, y: int_rows(x, y, k, {}).mean()))
    fused = jax.jit(jax.value_and_grad(lambda x, y: int_mean(x, y, k, {})))
    emit(case="tune", block_c=bc, num_warps=nw, num_stages=ns, fwd_ms=_median_ms(fwd, xs, 10),
         rows_vg_ms=_median_ms(rows, xs, 10), fused_vg_ms=_median_ms(fused, xs, 10))
  except Exception as e:
    emit(case="tune", block_c=bc, num_warps=nw, num_stages=ns, error=repr(e)[:300])
del xs

n, d, v = 8192, 2304, 256000
lx = jax.random.normal(key, (n, d), jnp.float32).astype(jnp.bfloat16)
lw = (jax.random.normal(jax.random.fold_in(key, 1), (d, v), jnp.float32) * d ** -0.5).astype(jnp.bfloat16)
ly = jax.random.randint(key, (n,), 0, v)
for impl in [jxent.LinearChunked(block_v=b) for b in (2048, 4096, 8192)] + [jxent.LinearFusedGrad(block_n=b) for b in (512, 1024, 2048)]:
  f = jax.jit(jax.value_and_grad(lambda x, w, y: jxent.linear_softmax_cross_entropy(x, w, y, implementation=impl), argnums=(0, 1)))
  try:
    c = f.lower(lx, lw, ly).compile()
    emit(case="linear_tune", impl=repr(impl), vg_ms=_median_ms(c, [(lx, lw, ly)], 10),
         temp_MB=c.memory_analysis().temp_size_in_bytes / 1e6)
  except Exception as e:
    emit(case="linear_tune", impl=repr(impl), error=repr(e)[:300])
