"""Overhead of selected_ids (K=16) on token_log_probs, paired round-robin samples (jxent-bench's timing)."""
import jax, numpy as np, json
from jxent.bench import cli, cases as C
cli.steady_cpu_allocator()
out = []
for n, v in ((1024, 8192), (256, 32003)):
  base, sel = C.Case("logits", n, v, labels="logprobs"), C.Case("logits", n, v, labels="selected")
  key = jax.random.key(0)
  ins = C.make_inputs(sel, key)
  for mode in ("forward", "value_and_grad"):
    for impl in ("xla", "chunked_xla"):
      fb = jax.jit(cli.row_function(impl, base, mode)).lower(*ins[:2]).compile()
      fs = jax.jit(cli.row_function(impl, sel, mode)).lower(*ins).compile()
      s = cli.time_round_robin({"base": lambda x, y, ids: fb(x, y), "sel": fs}, [ins], 60)
      r = cli.paired_ratio(s["sel"], s["base"])
      out.append(dict(shape=f"{n}x{v}", mode=mode, impl=impl, base_ms=float(np.median(s["base"])),
                      selected_ms=float(np.median(s["sel"])), ratio=r))
      print(json.dumps(out[-1]))
