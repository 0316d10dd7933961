"""Triton kernel sweep on a GPU, one call (about 5 minutes on an H100):

1. correctness of the compiled kernels against the XLA path (default launch and the persistent
   launch, integer and dense labels, forward / row VJP / fused mean value_and_grad);
2. the copy floor (bytes / measured copy bandwidth, as in ``jxent-bench``);
3. integer-label forward and fused ``value_and_grad`` of the mean at 8192x128256, 4096x256000 and
   32768x32000 bf16, for the one-program-per-row launch and the persistent launch
   (``programs`` x ``block_c`` x ``num_warps``), each with and without ``row_groups`` (partial
   statistics per row, no block-wide reduction in the walk: aimed at the 1.05x forward target),
   and with ``num_stages`` 2 and 3 (Triton's software pipelining: the next block's load is in
   flight while this block is reduced; every earlier measurement used 1).
   The persistent launch bounds the rows in flight so that the fused kernel's second walk over a
   row finds it in L2: the target is 0.85x of the three-pass floor (one read + one write of the
   logits = 0.67x). For vocabularies up to 65536 it also tries one block per row
   (``block_c >= C``), where the fused kernel loads the row once.

Timing as in jxent-bench (median of batched, synced samples, rotated inputs).

  PYTHONPATH=. python benchmarks/gpu_sweep.py            # writes $OUT/gpu_sweep.jsonl
  PYTHONPATH=. python benchmarks/gpu_sweep.py --dry-run  # CPU: interpret mode, tiny shapes
  PYTHONPATH=. python benchmarks/gpu_sweep.py 32768,32000   # one shape (split a long run in two)

Earlier record (results/2026-11-22_h100_gpu_sweep_lane_sums.jsonl): a variant that kept the
sum-exp and label sums as per-lane vectors was slower at every block size, so every block is
reduced.
"""
import functools, itertools, os, sys
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax, jax.numpy as jnp
import jxent
from jxent.bench.cli import _median_ms, copy_bandwidth

from gpu_util import jsonl_log, rel

emit = jsonl_log("gpu_sweep.jsonl")

DRY = "--dry-run" in sys.argv
K = functools.partial(jxent.PallasTritonKernel, interpret=True) if DRY else jxent.PallasTritonKernel
SHAPES = ((64, 1000), (32, 3001)) if DRY else ((8192, 128256), (4096, 256000), (32768, 32000))
_only = [tuple(int(d) for d in a.split(",")) for a in sys.argv[1:] if "," in a]
SHAPES = tuple(_only) or SHAPES  # e.g. `gpu_sweep.py 32768,32000`: just that shape
emit(case="device", kind=jax.devices()[0].device_kind, jax=jax.__version__)
bw = copy_bandwidth(10)
emit(case="copy_bandwidth", gbps=bw / 1e9)
key = jax.random.key(0)
OPTS = dict(label_smoothing=0.1, z_loss=1e-4, logit_softcap=30.0, ignore_index=-100)

def inputs(n, v, copies):
  return [((jax.random.normal(jax.random.fold_in(key, i), (n, v), jnp.float32) * 3).astype(jnp.bfloat16),
           jax.random.randint(jax.random.fold_in(key, 100 + i), (n,), 0, v).at[3].set(-100)) for i in range(copies)]

# 1. correctness: each kernel configuration against XLA (row loss, row VJP, fused mean + grad)
CHECKS = [(SHAPES[0], K()), (SHAPES[0], K(programs=264, block_c=4096, num_warps=8, row_groups=64)),
          ((64, 1000) if DRY else (4096, 32000), K(block_c=1024 if DRY else 32768, num_warps=16))]
for (n, v), kern in CHECKS:
  (x, y), = inputs(n, v, 1)
  yd = jax.nn.one_hot(jnp.maximum(y, 0), v, dtype=jnp.bfloat16)
  gr = jax.random.normal(key, (n,), jnp.float32).astype(jnp.bfloat16)
  cfg = dict(shape=[n, v], programs=kern.programs, block_c=kern.block_c, num_warps=kern.num_warps,
             row_groups=kern.row_groups)
  for o in ({}, OPTS):
    for lab, f, yy in (("int", jxent.softmax_cross_entropy_with_integer_labels, y), ("dense", jxent.softmax_cross_entropy, yd)):
      oo = dict(o, ignore_index=-100) if lab == "int" else {k: w for k, w in o.items() if k != "ignore_index"}
      def run(impl, x, yy):
        fo = jax.jit(lambda x, y: f(x, y, implementation=impl, **oo))
        fr = jax.jit(lambda x, y, g: jax.vjp(lambda x: f(x, y, implementation=impl, **oo), x)[1](g)[0])
        fm = jax.jit(jax.value_and_grad(lambda x, y: 2.0 * f(x, y, implementation=impl, reduction="mean", **oo)))
        return (fo(x, yy), fr(x, yy, gr)) + fm(x, yy)
      try:
        a, b = run(kern, x, yy), run("xla", x, yy)
        emit(case="check", **cfg, labels=lab, opts=bool(o), loss_rel=rel(a[0], b[0]),
             dlogits_rel=rel(a[1], b[1]), mean_rel=rel(a[2], b[2]), mean_grad_rel=rel(a[3], b[3]))
      except Exception as e:
        emit(case="check", **cfg, labels=lab, error=repr(e)[:1500])
  del x, y, yd

# 2.-3. floors and sweep
for n, v in SHAPES:
  xs = inputs(n, v, 2)
  nbytes = n * v * 2
  floor_fwd, floor_3 = nbytes / bw * 1e3, 3 * nbytes / bw * 1e3
  emit(case="floor", shape=[n, v], fwd_ms=floor_fwd, three_pass_ms=floor_3)
  ref = jax.jit(jax.value_and_grad(lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(
      x, y, implementation="xla", reduction="mean")))
  emit(case="time", shape=[n, v], impl="xla", vg_ms=_median_ms(ref, xs, 10))
  tiles = ((2048, 4), (4096, 4), (4096, 8), (8192, 8))
  configs = [K()]
  configs += [K(block_c=bc, num_warps=nw, row_groups=gr)
              for gr, (bc, nw) in itertools.product((16, 64, 256), tiles)]
  # software pipelining of the row walk (the next block's load issued before this block's math)
  configs += [K(block_c=bc, num_warps=nw, num_stages=st, row_groups=gr)
              for st, (bc, nw), gr in itertools.product((2, 3), tiles[:3], (1, 64))]
  configs += [K(programs=p * 132, block_c=bc, num_warps=nw, row_groups=gr)
              for p, (bc, nw), gr in itertools.product((1, 2, 4), ((2048, 4), (4096, 8), (8192, 16)), (1, 64))]
  if v <= 65536:  # whole row in one block: the fused kernel loads it once (one read, one write)
    whole = 1 << (v - 1).bit_length()
    configs += [K(block_c=whole, num_warps=nw, row_groups=gr)
                for nw, gr in itertools.product((8, 16, 32), (1, 64))]
  configs = configs[:3] + configs[-2:] if DRY else configs
  for k in configs:
    cfg = dict(programs=k.programs, block_c=k.block_c, num_warps=k.num_warps,
               num_stages=k.num_stages, row_groups=k.row_groups)
    try:
      fwd = jax.jit(lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(x, y, implementation=k))
      vg = jax.jit(jax.value_and_grad(lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(
          x, y, implementation=k, reduction="mean")))
      f_ms, vg_ms = _median_ms(fwd, xs, 10), _median_ms(vg, xs, 10)
      emit(case="time", shape=[n, v], **cfg, fwd_ms=f_ms, fwd_x_floor=f_ms / floor_fwd,
           vg_ms=vg_ms, vg_x_three_pass_floor=vg_ms / floor_3)
    except Exception as e:
      emit(case="time", shape=[n, v], **cfg, error=repr(e)[:300])
  del xs
