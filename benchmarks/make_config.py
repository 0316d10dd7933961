"""A shipped tuning config (``jxent/_src/configs/<device kind>.json``) from jxent-bench JSON.

  python benchmarks/make_config.py benchmarks/results/2026-11-22_h100_llm.json \\
      benchmarks/results/2026-11-22_h100_linear_final.json --source "H100 runs of 2026-11-22"

Every jxent implementation measured for ``forward_and_vjp`` becomes a candidate of its key
(``jxent._src.tuning.make_key``): ``pallas_triton`` (the fused kernel) for scalar reductions,
``pallas_triton_rows`` for per-row losses, ``xla`` for both (it has no fused path); for linear
cases the two algorithms and ``unfused`` (jxent-bench's ``unfused`` row, else optax's, which
computes the same unfused logits). The device kind comes from the rows' ``device`` field.
"""

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jxent._src import tuning  # noqa: E402
from jxent.bench import cases as C  # noqa: E402


def candidates(rows):
  entries = {}
  for r in rows:
    if r.get("mode") != "forward_and_vjp" or "median_ms" not in r:
      continue
    base, params = C.parse_implementation(r["implementation"])
    cand = dict(ms=r["median_ms"], temp_bytes=r.get("temp_bytes"))
    if r["kind"] == "linear":
      name = {"optax": "unfused"}.get(base, base)
      if name not in tuning.ALGORITHM_NAMES:
        continue
      keys = [tuning.make_key("linear", r["shape"], r["dtype"], reduction="mean")]
    else:
      reductions = {"xla": ("mean", "none"), "pallas_triton": ("mean",),
                    "pallas_triton_rows": ("none",), "chunked_xla": ("mean", "none"),
                    "pallas_mosaic_tpu": ("mean",)}.get(base, ())
      name = base.removesuffix("_rows")
      keys = [tuning.make_key("xent", r["shape"], r["dtype"], labels=r["labels"], reduction=red)
              for red in reductions]
    for key in keys:
      entry = entries.setdefault(key, {"candidates": []})
      if name == "unfused" and any(c["implementation"] == "unfused" for c in entry["candidates"]):
        continue  # (jxent-bench's own unfused row wins over optax's)
      entry["candidates"].append(dict(cand, implementation=name, params=params))
  return entries


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("results", nargs="+", help="jxent-bench --json files of one device")
  p.add_argument("--source", default="", help="where the measurements come from")
  p.add_argument("--out-dir", default=tuning.CONFIG_DIR)
  args = p.parse_args(argv)
  rows = [r for path in args.results for r in json.load(open(path))]
  devices = {r["device"] for r in rows}
  if len(devices) != 1:
    raise SystemExit(f"make_config: the results must come from one device, got {devices}")
  kind = re.sub(r"[^a-z0-9]+", "_", devices.pop().split(":", 1)[1].lower()).strip("_")
  path = os.path.join(args.out_dir, f"{kind}.json")
  tuning.write_entries(path, candidates(rows), device_kind=kind, source=args.source)
  os.remove(path + ".lock")
  print(path)


if __name__ == "__main__":
  main()
