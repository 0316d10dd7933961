"""``jxent-bench``: how close each cross-entropy implementation is to the hardware floor and peers.

Examples::

  jxent-bench                                  # --quick, CPU-sized, under a minute
  jxent-bench --llm --json benchmarks/h100.json --plot benchmarks/h100.png
  jxent-bench --shape 2048,32000 --dtype float32 --implementations xla,optax --modes forward_and_vjp
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp

from jxent._src import autotune, configs
from jxent.bench import cases as C


class UsageError(Exception):
  pass


def _parse_shape(text: str) -> tuple[int, ...]:
  try:
    dims = tuple(int(t) for t in text.split(","))
  except ValueError:
    raise UsageError(f"malformed --shape {text!r}: expected N,V or N,D,V (positive integers)") from None
  if len(dims) not in (2, 3) or any(d <= 0 for d in dims):
    raise UsageError(f"malformed --shape {text!r}: expected N,V or N,D,V (positive integers)")
  return dims


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jxent-bench", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  g = p.add_mutually_exclusive_group()
  g.add_argument("--quick", action="store_true", help="CPU-sized preset (the default)")
  g.add_argument("--llm", action="store_true", help="LLM-sized preset (GPU/TPU)")
  g.add_argument("--preset", choices=sorted(C.PRESETS), help="a named preset")
  p.add_argument("--shape", action="append", default=[],
                 help="custom case N,V (logits) or N,D,V (linear); repeatable")
  p.add_argument("--dtype", default=None,
                 help="comma list of logits dtypes (float32, bfloat16, float16); default float32, "
                      "or a preset's own")
  p.add_argument("--labels", default="int", help="label kinds of custom logits cases: int,dense,logprobs (logprobs: RL per-token "
                      "log-probs and entropy, token_log_probs)")
  p.add_argument("--tune", action="store_true",
                 help="run jxent.autotune over the cases (the user cache gets the winners) and "
                      "write them as a config file in the shipped format (--tune-out)")
  p.add_argument("--tune-out", default=None,
                 help="the config file --tune writes (default ./jxent-tuning-<device kind>.json)")
  p.add_argument("--implementations", default=None,
                 help="comma list; default: every one that runs here. Known: "
                      + ", ".join(C.all_implementations())
                      + ". A jxent kernel takes parameters as NAME[key=value,...], e.g. "
                        "'pallas_triton[programs=264,block_c=4096]'")
  p.add_argument("--modes", default=None, help="comma list of " + ", ".join(C.MODES))
  p.add_argument("--reps", type=int, default=10, help="timed runs per row (median; >= 10)")
  p.add_argument("--json", metavar="PATH", help="write rows as a JSON list")
  p.add_argument("--csv", metavar="PATH", help="write rows as CSV")
  p.add_argument("--plot", metavar="PATH.png", help="bar chart (needs matplotlib: the bench extra)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def _parse_dtypes(text) -> tuple[str, ...]:
  """``--dtype``: a comma list of floating dtype names (empty when not given)."""
  dtypes = tuple(d for d in (text or "").split(",") if d)
  for d in dtypes:
    try:
      ok = jnp.issubdtype(jnp.dtype(d), jnp.floating)
    except TypeError:
      ok = False
    if not ok:
      raise UsageError(f"unknown --dtype {d!r}: expected a float dtype such as float32, "
                       "bfloat16 or float16")
  return dtypes


def resolve(args) -> tuple[list[C.Case], tuple[str, ...], tuple[str, ...]]:
  dtypes = _parse_dtypes(args.dtype)
  if args.shape:
    labels = [s for s in args.labels.split(",") if s]
    for lab in labels:
      if lab not in C.LABEL_KINDS:
        raise UsageError(f"unknown --labels {lab!r}: expected one of {', '.join(C.LABEL_KINDS)}")
    cases = []
    for text in args.shape:
      dims = _parse_shape(text)
      for dtype in dtypes or ("float32",):
        if len(dims) == 3:
          cases.append(C.Case("linear", dims[0], dims[2], d=dims[1], dtype=dtype))
        else:
          cases.extend(C.Case("logits", dims[0], dims[1], dtype=dtype, labels=lab)
                       for lab in labels)
    modes = C.MODES
  else:
    preset = "llm" if args.llm else (args.preset or "quick")
    cases, modes = C.PRESETS[preset]
    if dtypes:
      cases = [dataclasses.replace(c, dtype=d) for c in cases for d in dtypes]
  if args.modes:
    modes = tuple(m for m in args.modes.split(",") if m)
    for m in modes:
      if m not in C.MODES:
        raise UsageError(f"unknown mode {m!r}: expected one of {', '.join(C.MODES)}")
  if args.implementations:
    impls = C.split_implementations(args.implementations)
    for i in impls:
      try:
        base = C.parse_implementation(i)[0]
      except ValueError as e:
        raise UsageError(str(e)) from None
      if base not in C.all_implementations():
        raise UsageError(f"unknown implementation {i!r}: expected one of "
                         f"{', '.join(C.all_implementations())}")
  else:
    impls = C.all_implementations()
  if args.reps < 10:
    raise UsageError(f"--reps must be >= 10, got {args.reps}")
  return list(cases), modes, impls


# ------------------------------------------------------------------------------------------------
# Timing.
# ------------------------------------------------------------------------------------------------
def _median_ms(fn, arg_sets, reps: int, inner: int = 0) -> float:
  """Median over ``reps`` samples of the mean time of ``inner`` back-to-back calls (rotating
  inputs), each sample ended by a device sync. Enqueuing several calls before the sync keeps
  host dispatch out of the device time; warm-up runs first."""
  if not inner:
    inner = 1 if jax.default_backend() == "cpu" else 5
  for args in arg_sets[:2]:
    jax.block_until_ready(fn(*args))
  times, k = [], 0
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn(*arg_sets[k % len(arg_sets)])
      k += 1
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times) * 1e3


def _rotations(nbytes: int) -> int:
  """Rotate among input copies when one set would sit in cache (< 256 MB), up to 4 copies."""
  if nbytes >= 256 << 20:
    return 1
  return int(min(4, max(2, (256 << 20) // max(nbytes, 1))))


def copy_bandwidth(reps: int) -> float:
  """Bytes/s of a large elementwise read+write, measured now on the default device."""
  gpu = jax.default_backend() != "cpu"
  n = (1 << 31) if gpu else (1 << 26)  # 4 GiB of bfloat16 on accelerators, 256 MiB of float32 on CPU
  dt = jnp.bfloat16 if gpu else jnp.float32
  x = (jax.random.uniform(jax.random.key(7), (n,), jnp.float32) + 1.0).astype(dt)
  f = jax.jit(lambda a: a + jnp.asarray(1, dt))
  ms = _median_ms(f, [(x,)], reps)
  return 2 * x.nbytes / (ms * 1e-3)


def _compile(fn, args):
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_ms = (time.perf_counter() - t0) * 1e3
  return compiled, compile_ms, temp_bytes(compiled)


def temp_bytes(compiled) -> Optional[int]:
  """The compiled program's temporary allocation in bytes (None where not reported)."""
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # noqa: BLE001  (not every backend reports it)
    return None


def row_function(name: str, case: C.Case, mode: str):
  """The function one table row times: the loss, or its ``value_and_grad``."""
  f = C.loss_fn(name, case)
  if mode == "forward_and_vjp":
    argnums = (0, 1) if case.kind == "linear" else 0
    f = jax.value_and_grad(f, argnums=argnums)
  return f


def run_row(name: str, case: C.Case, mode: str, inputs, reps: int, compiled=None) -> dict:
  """Compiles (unless ``compiled`` is given: its compile time is then not measured) and times
  one row."""
  compile_ms = None
  if compiled is None:
    compiled, compile_ms, temp = _compile(row_function(name, case, mode), inputs[0])
  else:
    temp = temp_bytes(compiled)
  ms = _median_ms(compiled, inputs, reps)
  return dict(median_ms=ms, compile_ms=compile_ms, temp_bytes=temp)


def matmul_floor_ms(case: C.Case, mode: str, inputs, reps: int) -> float:
  """Linear cases: the matmuls alone (1 forward, 3 forward+backward), measured now."""
  if mode == "forward":
    f = lambda x, w, y: (x @ w)
  else:
    def f(x, w, y):
      z = x @ w
      return z, z @ w.T, x.T @ z
  compiled, _, _ = _compile(f, inputs[0])
  return _median_ms(compiled, inputs, reps)


# ------------------------------------------------------------------------------------------------
# Output.
# ------------------------------------------------------------------------------------------------
def _progress(i: int, total: int, label: str, enabled: bool):
  if not enabled:
    return
  width = 28
  done = int(width * i / max(total, 1))
  sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{total} {label[:60]:<60}")
  if i == total:
    sys.stderr.write("\n")
  sys.stderr.flush()


FLOOR_NOTE = ("x floor: the median over the floor, the time to move the bytes that must cross "
              "memory (forward: the logits once; forward+backward: read twice, the gradient "
              "written) at the copy bandwidth measured in this run; for linear cases, the bare "
              "matmuls timed in this run.")
CPU_FLOOR_NOTE = ("x floor is left out on CPU: the copy bandwidth measured there varies between "
                  "runs (2-8 GB/s seen) and is not a lower bound; the JSON/CSV keep floor_ms.")


def format_table(rows: list[dict], floor: bool = True) -> str:
  head = ["case", "mode", "implementation", "median ms", "x floor", "x optax", "GB/s", "TFLOP/s",
          "temp MB", "compile ms"]
  lines = []
  for r in rows:
    if "error" in r:
      lines.append([r["case"], r["mode"], r["implementation"], "error: " + r["error"][:60],
                    "", "", "", "", "", ""])
      continue
    f = lambda v, fmt: "-" if v is None else format(v, fmt)
    lines.append([r["case"], r["mode"], r["implementation"], f(r["median_ms"], ".3f"),
                  f(r["x_floor"], ".2f"), f(r["x_optax"], ".2f"), f(r["gbps"], ".0f"),
                  f(r["tflops"], ".1f"),
                  f(None if r["temp_bytes"] is None else r["temp_bytes"] / 1e6, ".1f"),
                  f(r["compile_ms"], ".0f")])
  if not floor:
    head, lines = head[:4] + head[5:], [l[:4] + l[5:] for l in lines]
  widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
  fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths))
  return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])


def table_notes(floor_shown: bool, missing: list[str]) -> list[str]:
  notes = [FLOOR_NOTE if floor_shown else CPU_FLOOR_NOTE]
  if missing:
    notes.append("not run here: " + "; ".join(missing))
  return notes


def chosen_notes(cases) -> list[str]:
  """What ``implementation=None`` picks for each case on this device, and from where."""
  notes = []
  for case in cases:
    if case.labels == "logprobs":
      continue
    op, shape = ("linear", (case.n, case.d, case.v)) if case.kind == "linear" else (
        "xent", (case.n, case.v))
    try:
      kernel, source = autotune.chosen_implementation(op, shape, case.dtype, labels=case.labels)
    except Exception as e:  # noqa: BLE001  (a note, never a failure)
      kernel, source = f"? ({e})", "error"
    name = kernel if isinstance(kernel, str) else repr(kernel)
    notes.append(f"implementation=None for {case.shape} {case.dtype} {case.labels} (mean): "
                 f"{name} [{source}]")
  return notes


def tune(cases, args) -> int:
  """``--tune``: autotune each case (mean, and per-row losses for logits cases), then write the
  results in the shipped config format."""
  kind = configs.device_kind()
  out = args.tune_out or f"jxent-tuning-{kind}.json"
  entries, lines = {}, []
  for case in cases:
    if case.labels == "logprobs":
      continue
    op, shape = ("linear", (case.n, case.d, case.v)) if case.kind == "linear" else (
        "xent", (case.n, case.v))
    for reduction in (("mean",) if op == "linear" else ("mean", "none")):
      res = autotune.autotune(op, shape, case.dtype, labels=case.labels, reduction=reduction,
                              reps=args.reps, force=True)
      entries[res["key"]] = dict(candidates=res["candidates"], rejected=res["rejected"])
      w = res["winner"]
      lines.append(f"{res['key']}: " + ("no viable candidate" if w is None else
                                        f"{w['implementation']} {w['params']} {w['ms']:.3f} ms"))
  try:
    configs.write_entries(os.path.abspath(out), entries, device_kind=kind,
                          source=f"jxent-bench --tune, jax {jax.__version__}")
    os.remove(os.path.abspath(out) + ".lock")
  except OSError as e:
    print(f"jxent-bench: error: cannot write {out}: {e}", file=sys.stderr)
    return 2
  print("\n".join(lines))
  print(f"wrote {out} (and the user cache {configs.cache_path()})")
  return 0


def check_outputs(args) -> None:
  """Output files are checked before anything is measured: their folders are created, and a
  path that cannot be written, or --plot without matplotlib, is refused at once."""
  for flag in ("json", "csv", "plot"):
    path = getattr(args, flag)
    if not path:
      continue
    folder = os.path.dirname(os.path.abspath(path))
    try:
      os.makedirs(folder, exist_ok=True)
    except OSError as e:
      raise UsageError(f"--{flag} {path}: cannot create its folder ({e.strerror})") from None
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
      raise UsageError(f"--{flag} {path}: not a writable file path")
  if args.plot:
    try:
      import matplotlib  # noqa: F401
    except ImportError:
      raise UsageError('--plot needs matplotlib: pip install "jxent[bench]"') from None


def unavailable(args, cases, impls) -> list[str]:
  """Raises if an implementation asked for by name cannot run here; otherwise the default run's
  implementations that cannot (named in a note under the table)."""
  missing = []
  for name in impls:
    why = C.why_not_here(name)
    if why is None:
      continue
    if args.implementations:
      raise UsageError(f"implementation {name!r} cannot run here: {why}")
    missing.append(f"{name} ({why})")
  if args.implementations and not any(C.applies(i, c) for c in cases for i in impls):
    raise UsageError(f"none of the implementations {', '.join(impls)} applies to the cases asked "
                     f"for ({', '.join(sorted({c.shape + ' ' + c.labels for c in cases}))})")
  return missing


def write_plot(rows: list[dict], path: str) -> None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    raise UsageError('--plot needs matplotlib: pip install "jxent[bench]"') from None
  groups = {}
  for r in rows:
    if "error" not in r:
      groups.setdefault((r["case"], r["mode"]), []).append(r)
  fig, axes = plt.subplots(len(groups), 1, figsize=(9, 2.0 + 0.35 * max(
      (len(v) for v in groups.values()), default=1) * max(len(groups), 1)), squeeze=False)
  for ax, ((case, mode), rs) in zip(axes[:, 0], groups.items()):
    names = [r["implementation"] for r in rs]
    ax.barh(names, [r["median_ms"] for r in rs], color="tab:blue")
    floor = rs[0].get("floor_ms")
    if floor:
      ax.axvline(floor, color="tab:red", linestyle="--", label=f"floor {floor:.3g} ms")
      ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{case}  {mode}", fontsize=9)
    ax.set_xlabel("ms (median)")
  fig.suptitle(f"jxent-bench on {rows[0]['device']} (jax {rows[0]['jax_version']})", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv: Optional[list[str]] = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    cases, modes, impls = resolve(args)
    check_outputs(args)
    if any(c.dtype == "float64" for c in cases) and not jax.config.jax_enable_x64:
      jax.config.update("jax_enable_x64", True)  # otherwise float64 rows would run in float32
      print("jxent-bench: note: --dtype float64 enables JAX's 64-bit mode for this run",
            file=sys.stderr)
    missing = unavailable(args, cases, impls)
  except UsageError as e:
    print(f"jxent-bench: error: {e}", file=sys.stderr)
    return 2
  device = jax.devices()[0]
  dev_name = f"{device.platform}:{getattr(device, 'device_kind', device.platform)}"
  if args.tune:
    return tune(cases, args)
  if device.platform == "cpu" and (args.llm or args.preset == "llm"):
    print("jxent-bench: warning: the --llm preset is sized for a GPU or TPU (8192x128256 and "
          "larger); on this CPU it takes hours. Ctrl-C to stop; --quick is the CPU preset.",
          file=sys.stderr)
  bw = copy_bandwidth(args.reps)
  header = (f"jxent-bench on {dev_name}, jax {jax.__version__}, copy bandwidth "
            f"{bw / 1e9:.0f} GB/s")
  print(header, file=sys.stderr)
  plan = [(c, m, i) for c in cases for m in modes for i in impls if C.applies(i, c)]
  rows, key = [], jax.random.key(0)
  inputs_cache = {}
  show = not args.no_progress and sys.stderr.isatty()
  floors = {}
  for k, (case, mode, name) in enumerate(plan):
    _progress(k, len(plan), f"{case.shape} {case.labels} {mode} {name}", show)
    if case not in inputs_cache:
      inputs_cache.clear()
      one = C.make_inputs(case, key)
      nbytes = sum(a.nbytes for a in one)
      inputs_cache[case] = [one] + [C.make_inputs(case, jax.random.fold_in(key, r))
                                    for r in range(1, _rotations(nbytes))]
    inputs = inputs_cache[case]
    row = dict(implementation=name, mode=mode, case=f"{case.shape} {case.dtype} {case.labels}"
               if case.kind == "logits" else f"linear {case.shape} {case.dtype}",
               kind=case.kind, shape=[case.n, case.d, case.v] if case.kind == "linear"
               else [case.n, case.v], dtype=case.dtype, labels=case.labels, device=dev_name,
               jax_version=jax.__version__, copy_gbps=bw / 1e9,
               date=datetime.date.today().isoformat())
    try:
      row.update(run_row(name, case, mode, inputs, args.reps))
    except Exception as e:  # noqa: BLE001  (one failing implementation must not stop the run)
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      rows.append(row)
      continue
    fb = C.floor_bytes(case, mode)
    flops = C.matmul_flops(case, mode)
    if fb is not None:
      row["floor_ms"] = fb / bw * 1e3
      row["gbps"] = fb / (row["median_ms"] * 1e-3) / 1e9
    else:
      if (case, mode) not in floors:
        floors[(case, mode)] = matmul_floor_ms(case, mode, inputs, args.reps)
      row["floor_ms"] = floors[(case, mode)]
      row["gbps"] = None
    row["x_floor"] = row["median_ms"] / row["floor_ms"]
    row["tflops"] = None if flops is None else flops / (row["median_ms"] * 1e-3) / 1e12
    rows.append(row)
    if args.json:  # written as it goes, so an interrupted run keeps what it measured
      with open(args.json, "w") as fh:
        json.dump(rows, fh, indent=1)
  _progress(len(plan), len(plan), "done", show)
  optax_ms = {(r["case"], r["mode"]): r["median_ms"] for r in rows
              if r["implementation"] in ("optax",) and "error" not in r}
  for r in rows:
    if "error" not in r:
      base = optax_ms.get((r["case"], r["mode"]))
      r["x_optax"] = None if base is None else r["median_ms"] / base
  floor_shown = device.platform != "cpu"
  print(header)
  print(format_table(rows, floor=floor_shown))
  for line in table_notes(floor_shown, missing) + chosen_notes(cases):
    print(line)
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(rows, fh, indent=1)
  if args.csv:
    keys = sorted({k for r in rows for k in r})
    with open(args.csv, "w", newline="") as fh:
      w = csv.DictWriter(fh, fieldnames=keys)
      w.writeheader()
      w.writerows(rows)
  if args.plot:
    try:
      write_plot(rows, args.plot)
    except UsageError as e:
      print(f"jxent-bench: error: {e}", file=sys.stderr)
      return 2
  return 0


if __name__ == "__main__":
  os.environ.setdefault("KERAS_BACKEND", "jax")
  sys.exit(main())
