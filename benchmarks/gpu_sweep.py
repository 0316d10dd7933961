"""Triton kernel sweep at 8192x128256 bf16 (integer labels): forward and fused value_and_grad for
block_c x num_warps, plus a compiled correctness check against XLA. Same timing as jxent-bench
(median of batched, synced samples).

Recorded (results/2026-11-22_h100_gpu_sweep_lane_sums.jsonl): a variant that kept the sum-exp and
label sums as per-lane vectors (one cross-lane reduction per block instead of two) was slower at
every block size (best 0.98 ms forward vs 0.905 ms), so the kernel reduces every block.

  PYTHONPATH=. python benchmarks/gpu_sweep.py       # writes $OUT/gpu_sweep.jsonl
"""
import itertools, json, os
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax, jax.numpy as jnp, numpy as np
import jxent
from jxent._src.pallas_triton import PallasTritonKernel
from jxent.bench.cli import _median_ms

log = open(os.path.join(os.environ.get("OUT", "."), "gpu_sweep.jsonl"), "w")
def emit(**kw):
  print(json.dumps(kw), flush=True); log.write(json.dumps(kw) + "\n"); log.flush()

n, v = 8192, 128256
key = jax.random.key(0)
xs = [((jax.random.normal(jax.random.fold_in(key, i), (n, v), jnp.float32) * 3).astype(jnp.bfloat16),
       jax.random.randint(jax.random.fold_in(key, 100 + i), (n,), 0, v)) for i in range(2)]
x, y = xs[0]
yd = jax.nn.one_hot(y, v, dtype=jnp.bfloat16)
def rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64); b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))
k = PallasTritonKernel()
for name, f, lab in (("int", jxent.softmax_cross_entropy_with_integer_labels, y), ("dense", jxent.softmax_cross_entropy, yd)):
  g = jax.jit(jax.value_and_grad(lambda x, l, impl: f(x, l, reduction="mean", implementation=impl)), static_argnums=2)
  a, b = g(x, lab, k), g(x, lab, "xla")
  emit(case="check", labels=name, value_rel=rel(a[0], b[0]), grad_rel=rel(a[1], b[1]),
       fwd_rel=rel(jax.jit(lambda x, l: f(x, l, implementation=k))(x, lab), jax.jit(lambda x, l: f(x, l, implementation="xla"))(x, lab)))
for bc, nw in itertools.product((1024, 2048, 4096), (2, 4, 8)):
  k = PallasTritonKernel(block_c=bc, num_warps=nw)
  try:
    fwd = jax.jit(lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(x, y, implementation=k))
    fused = jax.jit(jax.value_and_grad(lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(x, y, implementation=k, reduction="mean")))
    emit(case="sweep", block_c=bc, num_warps=nw, fwd_ms=_median_ms(fwd, xs, 10), fused_vg_ms=_median_ms(fused, xs, 10))
  except Exception as e:
    emit(case="sweep", block_c=bc, num_warps=nw, error=repr(e)[:300])
