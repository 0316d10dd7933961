"""Compiled temporary memory of linear cross-entropy's forward+backward, without running it.

Compiles ``jit(value_and_grad(loss, argnums=(0, 1)))`` of ``linear_softmax_cross_entropy`` for
each algorithm at one shape from ShapeDtypeStructs (nothing is allocated or computed) and prints
XLA's memory analysis: ``temp`` is the memory beyond the inputs and the gradients (the issue's
"beyond the gradients"). On a GPU this is the GPU's buffer assignment; on CPU use float32, because
XLA:CPU upcasts bfloat16 matmul operands (a float32 copy of ``w``).

  python benchmarks/linear_memory.py --shape 8192,2304,256000 --dtype float32   # CPU
  python benchmarks/linear_memory.py --shape 8192,2304,256000 --dtype bfloat16  # GPU
"""
import argparse
import json

import jax
import jax.numpy as jnp

from jxent.bench import cases

ALGOS = ["linear_chunked", "linear_chunked[block_n=2048]", "linear_chunked[block_n=1024]",
         "linear_chunked[block_n=512]", "linear_fused_grad",
         "linear_fused_grad[block_n=1024,dw_accumulation=weights]", "unfused"]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="8192,2304,256000", help="N,D,V")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--implementations", default=",".join(ALGOS),
                 help="as in jxent-bench (NAME[key=value,...]), comma-separated")
  args = p.parse_args()
  n, d, v = (int(s) for s in args.shape.split(","))
  case = cases.Case("linear", n, v, d=d, dtype=args.dtype)
  dt = jnp.dtype(args.dtype)
  structs = (jax.ShapeDtypeStruct((n, d), dt), jax.ShapeDtypeStruct((d, v), dt),
             jax.ShapeDtypeStruct((n,), jnp.int32))
  for name in cases.split_implementations(args.implementations):
    f = jax.jit(jax.value_and_grad(cases.loss_fn(name, case), argnums=(0, 1)))
    mem = f.lower(*structs).compile().memory_analysis()
    print(json.dumps({"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                      "shape": args.shape, "dtype": args.dtype, "implementation": name,
                      "temp_MB": round(mem.temp_size_in_bytes / 1e6, 1),
                      "gradients_MB": round(mem.output_size_in_bytes / 1e6, 1)}), flush=True)


if __name__ == "__main__":
  main()
