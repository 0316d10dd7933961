"""GPU check: compiled Pallas Triton kernels vs the XLA path (correctness), then block-size tuning.

Run on a GPU machine from the repo root:  PYTHONPATH=. python benchmarks/gpu_check.py [--tune]
"""
import itertools, json, os, statistics, sys, time
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax, jax.numpy as jnp, numpy as np
import jxent
from jxent._src.pallas_triton import PallasTritonKernel

out_dir = os.environ.get("OUT", ".")
log = open(os.path.join(out_dir, "gpu_check.jsonl"), "w")
def emit(**kw):
  print(json.dumps(kw), flush=True); log.write(json.dumps(kw) + "\n"); log.flush()

def rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64); b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  if not np.all(np.isfinite(a)) or not np.all(np.isfinite(b)): return float("nan")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

emit(case="device", kind=jax.devices()[0].device_kind, jax=jax.__version__)
key = jax.random.key(0)
checks = [((8192, 128256), jnp.bfloat16), ((4096, 256000), jnp.bfloat16), ((1000, 32003), jnp.float32),
          ((513, 4099), jnp.float16)]
optsets = [{}, dict(label_smoothing=0.1, z_loss=1e-4, logit_softcap=30.0)]
for (n, v), dt in checks:
  k1, k2 = jax.random.split(jax.random.fold_in(key, n))
  x = (jax.random.normal(k1, (n, v), jnp.float32) * 3).astype(dt)
  y = jax.random.randint(k2, (n,), 0, v).at[5].set(-100)
  yd = jax.nn.one_hot(jnp.maximum(y, 0), v, dtype=dt) * 0.9 + 0.1 / v
  g = jax.random.normal(k2, (n,), jnp.float32)
  for opts, sparse in itertools.product(optsets, (True, False)):
    res = {}
    for impl in ("xla", "pallas_triton"):
      if sparse:
        f = lambda x: jxent.softmax_cross_entropy_with_integer_labels(x, y, ignore_index=-100, implementation=impl, **opts)
        fm = lambda x: jxent.softmax_cross_entropy_with_integer_labels(x, y, ignore_index=-100, reduction="mean", implementation=impl, **opts)
      else:
        f = lambda x: jxent.softmax_cross_entropy(x, yd, implementation=impl, **opts)
        fm = lambda x: jxent.softmax_cross_entropy(x, yd, reduction="mean", implementation=impl, **opts)
      try:
        out, vjp = jax.vjp(jax.jit(f), x)
        dx, = vjp(g.astype(out.dtype))
        vm, gm = jax.jit(jax.value_and_grad(lambda x, s: s * fm(x)))(x, 2.0)
        res[impl] = (out, dx, vm, gm)
      except Exception as e:
        emit(case="check", shape=[n, v], dtype=str(jnp.dtype(dt)), sparse=sparse, opts=opts, impl=impl, error=repr(e)[:2000])
    if len(res) == 2:
      a, b = res["pallas_triton"], res["xla"]
      emit(case="check", shape=[n, v], dtype=str(jnp.dtype(dt)), sparse=sparse, opts=opts,
           loss_rel=rel(a[0], b[0]), dlogits_rel=rel(a[1], b[1]), mean_rel=rel(a[2], b[2]), mean_grad_rel=rel(a[3], b[3]),
           ignored_row_grad_zero=bool(jnp.all(a[1][5] == 0)) if sparse else None)

def bench(f, args_list, reps=20):
  for a in args_list[:2]: jax.block_until_ready(f(*a))
  ts = []
  for i in range(reps):
    a = args_list[i % len(args_list)]
    t = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t)
  return statistics.median(ts) * 1e3

if "--tune" in sys.argv:
  n, v = 8192, 128256
  xs = [((jax.random.normal(jax.random.fold_in(key, i), (n, v), jnp.float32) * 3).astype(jnp.bfloat16),
         jax.random.randint(jax.random.fold_in(key, 100 + i), (n,), 0, v)) for i in range(2)]
  for bc, nw in itertools.product((1024, 2048, 4096, 8192), (4, 8, 16)):
    k = PallasTritonKernel(block_c=bc, num_warps=nw)
    try:
      fwd = jax.jit(lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(x, y, implementation=k))
      rows = jax.jit(jax.value_and_grad(lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(x, y, implementation=k).mean()))
      fused = jax.jit(jax.value_and_grad(lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(x, y, implementation=k, reduction="mean")))
      emit(case="tune", block_c=bc, num_warps=nw, fwd_ms=bench(fwd, xs), rows_vg_ms=bench(rows, xs), fused_vg_ms=bench(fused, xs))
    except Exception as e:
      emit(case="tune", block_c=bc, num_warps=nw, error=repr(e)[:500])
