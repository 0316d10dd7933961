"""``jxent-bench``: how close each cross-entropy implementation is to the hardware floor and peers.

Examples::

  jxent-bench                                  # --quick, CPU-sized, about 2 minutes on 2 cores
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

from jxent._src import autotune, configs, logprobs
from jxent._version import __version__ as _VERSION
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
  p.add_argument("--labels", default=None,
                 help="label kinds of custom logits cases (with --shape): int,dense,weighted,"
                      "logprobs,selected (weighted: integer labels with a class weight, "
                      "PyTorch's weight=; logprobs: RL per-token log-probs and entropy, "
                      "token_log_probs; selected: the same plus 16 selected ids per token); "
                      "default int")
  p.add_argument("--accuracy", action="store_true",
                 help="the accuracy table instead of timings: max errors in ulps against float64 "
                      "truth on the rounded inputs (loss / gradient / true class), per regime, "
                      "for --implementations (default: xla, chunked_xla and the peers; Pallas "
                      "kernels in interpret mode off their platform) and --dtype; with --json")
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
  p.add_argument("--modes", default=None,
                 help="comma list of " + ", ".join(C.MODES) + " (forward_and_vjp: the earlier "
                      "name of value_and_grad)")
  p.add_argument("--reps", type=int, default=20,
                 help="timed samples per row, taken round-robin across a case's implementations "
                      "(median and spread; >= 10, default 20; up to 3x as many while a row of "
                      "the case is noisy)")
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
  if args.labels is not None and not args.shape:
    raise UsageError("--labels applies to --shape cases; the presets have their own label kinds "
                     "(add --shape N,V to choose them)")
  if args.shape:
    labels = [s for s in (args.labels or "int").split(",") if s]
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
    modes = tuple(C.MODE_ALIASES.get(m, m) for m in args.modes.split(",") if m)
    for m in modes:
      if m not in C.MODES:
        raise UsageError(f"unknown mode {m!r}: expected one of {', '.join(C.MODES)}")
    modes = tuple(dict.fromkeys(modes))
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
  inner = inner or _inner()
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


def _inner() -> int:
  return 1 if jax.default_backend() == "cpu" else 5


SAMPLE_MS = 25.0  # a sample lasts at least this long (calls back to back), so that the
                  # scheduler's noise is a small part of it


def time_round_robin(fns: dict, arg_sets, reps: int, inner: int = 0,
                     max_reps: Optional[int] = None) -> dict:
  """``{name: [ms, ...]}``: ``reps`` samples of each function, taken round-robin (sample ``i`` of
  every function, in an order rotated by ``i``, before sample ``i + 1`` of any), so that a slow
  spell of the machine falls on all of them alike and the samples pair up across functions.
  While any function's spread is above :data:`NOISY`, more rounds follow, up to ``max_reps``
  (default: ``reps``, no more).

  Each sample is the mean of back-to-back calls (rotating inputs) ended by a device sync:
  ``inner`` calls, or (``inner=0``) as many as fill :data:`SAMPLE_MS` after warm-up (at least
  one on CPU, five on accelerators, where enqueuing keeps host dispatch out of the time)."""
  names = list(fns)
  counts = {}
  for name in names:
    for args in arg_sets[:2]:
      jax.block_until_ready(fns[name](*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fns[name](*arg_sets[0]))
    one = (time.perf_counter() - t0) * 1e3
    counts[name] = inner or int(min(1000, max(_inner(), -(-SAMPLE_MS // max(one, 1e-3)))))
  samples = {name: [] for name in names}
  k, i = 0, 0
  max_reps = max(reps, max_reps or reps)
  while i < reps or (i < max_reps and any(summarize(v)["noisy"] for v in samples.values())):
    order = names[i % len(names):] + names[:i % len(names)]
    i += 1
    for name in order:
      t0 = time.perf_counter()
      for _ in range(counts[name]):
        out = fns[name](*arg_sets[k % len(arg_sets)])
        k += 1
      jax.block_until_ready(out)
      samples[name].append((time.perf_counter() - t0) / counts[name] * 1e3)
  return samples


NOISY = 0.10  # a row whose spread (IQR / median) exceeds this is flagged
EXTRA_ROUNDS = 3  # while a row of the case is noisy, rounds go on up to this many times --reps


def summarize(ms: list) -> dict:
  """Median, quartiles, extremes and the spread ``(q3 - q1) / median`` of a row's samples."""
  q1, med, q3 = statistics.quantiles(ms, n=4, method="inclusive")
  spread = (q3 - q1) / med if med > 0 else 0.0
  return dict(median_ms=med, q1_ms=q1, q3_ms=q3, min_ms=min(ms), max_ms=max(ms), spread=spread,
              noisy=spread > NOISY)


def paired_ratio(ms: list, base: list) -> float:
  """The median of the per-sample ratios of two round-robin rows (sample ``i`` of each was taken
  in the same round): steadier than the ratio of two medians."""
  return statistics.median(a / b for a, b in zip(ms, base))


def _rotations(nbytes: int) -> int:
  """Rotate among input copies when one set would sit in cache (< 256 MB), up to 4 copies."""
  if nbytes >= 256 << 20:
    return 1
  return int(min(4, max(2, (256 << 20) // max(nbytes, 1))))


def steady_cpu_allocator() -> bool:
  """On CPU with glibc: keep freed memory in the process (no fresh ``mmap`` per large buffer, no
  trimming), so that no timed sample pays the page faults of zeroing a new mapping: that cost,
  the kernel's and not the loss's, made two runs of the same row differ by up to 30 % on a
  2-core machine. Returns whether it applied (never on accelerators, whose buffers come from
  their own allocator)."""
  if jax.default_backend() != "cpu" or not sys.platform.startswith("linux"):
    return False
  try:
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    big = 2 ** 31 - 1
    # M_MMAP_THRESHOLD (-3), M_TRIM_THRESHOLD (-1), M_TOP_PAD (-2)
    return bool(libc.mallopt(-3, big) and libc.mallopt(-1, big) and libc.mallopt(-2, 256 << 20))
  except (OSError, AttributeError):  # (not glibc)
    return False


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
  if C.MODE_ALIASES.get(mode, mode) == "value_and_grad":
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


def matmul_floor_fn(mode: str):
  """Linear cases' floor: the matmuls alone (1 forward, 3 for value_and_grad)."""
  if mode == "forward":
    return lambda x, w, y: (x @ w)

  def f(x, w, y):
    z = x @ w
    return z, z @ w.T, x.T @ z
  return f


def matmul_floor_ms(case: C.Case, mode: str, inputs, reps: int) -> float:
  """Linear cases: the matmuls alone (1 forward, 3 forward+backward), measured now."""
  compiled, _, _ = _compile(matmul_floor_fn(mode), inputs[0])
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
              "memory (forward: the logits once; value_and_grad: read twice, the gradient "
              "written) at the copy bandwidth measured in this run; for linear cases, the bare "
              "matmuls timed in this run, round-robin with the rows.")
CPU_FLOOR_NOTE = ("x floor is left out on CPU: the copy bandwidth measured there varies between "
                  "runs (2-8 GB/s seen) and is not a lower bound; the JSON/CSV keep floor_ms.")
HEAD = ["case", "mode", "implementation", "median ms", "spread", "x floor", "x optax", "GB/s",
        "TFLOP/s", "temp MB", "compile ms"]


def legend(floor_shown: bool) -> list[str]:
  """What the table's modes and columns mean, and which direction is better."""
  lines = ["legend:"]
  lines += [f"  {m}: {what}" for m, what in C.MODE_LEGEND.items()]
  lines += [
      "  median ms: per call, lower is better; spread: (q3 - q1) / median of the samples, "
      f"'!' above {NOISY:.0%} after up to {EXTRA_ROUNDS}x the rounds (a noisy row: rerun on a quieter "
      "machine)",
      "  x optax: this row's time over optax's in the same case and mode (the median of the "
      "per-round ratios of the round-robin samples); < 1 is faster than optax. Linear cases: "
      "over unfused (x @ w, then optax's loss)",
      "  '*': the row implementation=None picks for that case (see the notes)",
      "  temp MB: the compiled program's temporaries (lower is leaner); compile ms: jit compile",
  ]
  if floor_shown:
    lines.append("  x floor: >= 1, lower is better (1 is the floor); GB/s: floor bytes over the "
                 "median; TFLOP/s: linear cases' matmul rate")
  return lines


def _cells(r: dict) -> list:
  if "error" in r:
    return [r["case"], r["mode"], r["implementation"], "error: " + r["error"][:60]] + [""] * 7
  f = lambda v, fmt: "-" if v is None else format(v, fmt)
  name = r["implementation"] + (" *" if r.get("default") else "")
  spread = f"{r['spread']:.0%}" + (" !" if r["noisy"] else "")
  return [r["case"], r["mode"], name, f(r["median_ms"], ".3f"), spread, f(r["x_floor"], ".2f"),
          f(r.get("x_optax"), ".2f"), f(r["gbps"], ".0f"), f(r["tflops"], ".1f"),
          f(None if r["temp_bytes"] is None else r["temp_bytes"] / 1e6, ".1f"),
          f(r["compile_ms"], ".0f")]


def format_table(rows: list[dict], floor: bool = True) -> str:
  head, lines = HEAD, [_cells(r) for r in rows]
  if not floor:
    drop = HEAD.index("x floor")
    head, lines = head[:drop] + head[drop + 1:], [l[:drop] + l[drop + 1:] for l in lines]
  widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
  fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
  return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])


def summary_line(rows: list[dict], interrupted: bool = False) -> str:
  """One line: rows measured, how the default path compares with optax, noisy rows."""
  ok = [r for r in rows if "error" not in r]
  parts = [f"summary: {len(ok)} rows measured"]
  if len(ok) < len(rows):
    parts.append(f"{len(rows) - len(ok)} failed")
  vs = [r["x_optax"] for r in ok if r.get("default") and r.get("x_optax") is not None]
  if vs:
    wins = sum(v <= 1.0 for v in vs)
    parts.append(f"the implementation=None rows are at or below optax in {wins} of {len(vs)} "
                 f"(x optax {min(vs):.2f} to {max(vs):.2f}, median {statistics.median(vs):.2f})")
  noisy = sum(r["noisy"] for r in ok)
  parts.append(f"{noisy} noisy (spread > {NOISY:.0%})")
  if interrupted:
    parts.append("interrupted: the rows above are those finished")
  return "; ".join(parts)


def table_notes(floor_shown: bool, missing: list[str]) -> list[str]:
  notes = [FLOOR_NOTE if floor_shown else CPU_FLOOR_NOTE]
  if missing:
    notes.append("not run here: " + "; ".join(missing))
  return notes


def _chosen(case: C.Case):
  """``(kernel, source)`` that ``implementation=None`` takes for ``case`` (mean reduction)."""
  op, shape = ("linear", (case.n, case.d, case.v)) if case.kind == "linear" else (
      "xent", (case.n, case.v))
  labels = "int" if case.labels == "weighted" else case.labels  # (tuned as integer labels)
  return autotune.chosen_implementation(op, shape, case.dtype, labels=labels)


def _chosen_logprobs(case: C.Case):
  """What ``token_log_probs(implementation=None)`` runs for ``case``: the loss's default where
  that kernel computes log-probs, else ``"xla"`` (whole rows)."""
  kernel = logprobs._kernel_for(None, (case.n, case.v), jnp.dtype(case.dtype))
  return "xla" if isinstance(kernel, logprobs.XlaRows) else kernel


def default_names(cases) -> dict:
  """``{case: row name}`` of what ``implementation=None`` picks for each case, where the pick is
  a row jxent-bench can time (a kernel with its parameters, ``NAME[key=value,...]``)."""
  out = {}
  for case in cases:
    try:
      if case.labels in ("logprobs", "selected"):
        desc = autotune.describe(_chosen_logprobs(case))
      else:
        desc = autotune.describe(_chosen(case)[0])
    except Exception:  # noqa: BLE001  (a mark, never a failure)
      continue
    params = ",".join(f"{k}={v}" for k, v in sorted(desc["params"].items()))
    out[case] = desc["implementation"] + (f"[{params}]" if params else "")
  return out


def chosen_notes(cases) -> list[str]:
  """What ``implementation=None`` picks for each case on this device, and from where."""
  notes = []
  for case in (c for c in cases if c.labels not in ("logprobs", "selected")):
    try:
      kernel, source = _chosen(case)
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
    if case.labels in ("logprobs", "selected", "weighted"):
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


def write_plot(rows: list[dict], path: str, *, floor_shown: bool = True) -> None:
  """One panel per case and mode: a bar per implementation, its median on the bar, jxent and the
  peers in two colours, the default row hatched; the floor line only where it is a lower bound
  (not on CPU)."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
  except ImportError:
    raise UsageError('--plot needs matplotlib: pip install "jxent[bench]"') from None
  groups = {}
  for r in rows:
    if "error" not in r:
      groups.setdefault((r["case"], r["mode"]), []).append(r)
  if not groups:
    return
  tallest = max(len(v) for v in groups.values())
  fig, axes = plt.subplots(len(groups), 1, squeeze=False,
                           figsize=(9, 0.9 + len(groups) * (0.75 + 0.3 * tallest)))
  jxent_names = set(C.JXENT_LOGITS + C.JXENT_LINEAR + C.JXENT_LOGPROBS)
  colour = lambda r: "tab:blue" if C.parse_implementation(r["implementation"])[0] in jxent_names \
      else "tab:orange"
  for ax, ((case, mode), rs) in zip(axes[:, 0], groups.items()):
    ms = [r["median_ms"] for r in rs]
    bars = ax.barh([r["implementation"] for r in rs], ms, color=[colour(r) for r in rs],
                   hatch=None)
    for bar, r in zip(bars, rs):
      if r.get("default"):
        bar.set_hatch("//")
    ax.bar_label(bars, labels=[f"{v:.3g}" for v in ms], padding=3, fontsize=7)
    floor = rs[0].get("floor_ms")
    if floor_shown and floor:
      ax.axvline(floor, color="tab:red", linestyle="--", linewidth=1)
      ax.text(floor, -0.7, f" floor {floor:.3g}", color="tab:red", fontsize=7, va="top")
    ax.set_xlim(0, max(ms + [floor if floor_shown and floor else 0]) * 1.22)
    ax.invert_yaxis()
    ax.tick_params(labelsize=8)
    ax.set_title(f"{case}, {mode}", fontsize=9, loc="left")
    ax.set_xlabel("ms per call (median; lower is better)", fontsize=8)
  fig.legend(handles=[Patch(color="tab:blue", label="jxent"), Patch(color="tab:orange", label="peers"),
                      Patch(facecolor="white", edgecolor="black", hatch="//",
                            label="implementation=None")],
             loc="upper right", fontsize=8, ncol=3, frameon=False)
  r0 = rows[0]
  fig.suptitle(f"jxent-bench {r0.get('jxent_version', '')} on {r0['device']} "
               f"(jax {r0['jax_version']})", fontsize=10, x=0.01, ha="left")
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
  fig.savefig(path, dpi=110)
  plt.close(fig)


_FLOOR = "\0floor"  # the linear cases' matmul floor, timed round-robin with the rows


def run_group(case: C.Case, mode: str, names, inputs, reps: int, bw: float, base_row: dict,
              default: Optional[str] = None) -> list[dict]:
  """The rows of one case and mode: every implementation compiled, then timed round-robin (with
  the linear floor's matmuls), each summarised with its spread and its paired ratio to the
  baseline (optax; unfused for linear cases)."""
  rows, fns = {}, {}
  for name in names:
    row = dict(base_row, implementation=name, mode=mode, default=name == default)
    try:
      compiled, row["compile_ms"], row["temp_bytes"] = _compile(row_function(name, case, mode),
                                                                 inputs[0])
      jax.block_until_ready(compiled(*inputs[0]))  # (a run-time failure is this row's error)
      fns[name] = compiled
    except Exception as e:  # noqa: BLE001  (one failing implementation must not stop the run)
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    rows[name] = row
  fb = C.floor_bytes(case, mode)
  if fb is None and fns:
    fns[_FLOOR] = _compile(matmul_floor_fn(mode), inputs[0])[0]
  samples = time_round_robin(fns, inputs, reps, max_reps=EXTRA_ROUNDS * reps) if fns else {}
  floor_ms = fb / bw * 1e3 if fb is not None else (statistics.median(samples.pop(_FLOOR))
                                                   if _FLOOR in samples else None)
  base = samples.get("unfused" if case.kind == "linear" else "optax")
  flops = C.matmul_flops(case, mode)
  for name, ms in samples.items():
    r = rows[name]
    r.update(summarize(ms), floor_ms=floor_ms)
    r["x_floor"] = r["median_ms"] / floor_ms if floor_ms else None
    r["gbps"] = None if fb is None else fb / (r["median_ms"] * 1e-3) / 1e9
    r["tflops"] = None if flops is None else flops / (r["median_ms"] * 1e-3) / 1e12
    r["x_optax"] = None if base is None else paired_ratio(ms, base)
  return list(rows.values())


def main(argv: Optional[list[str]] = None) -> int:
  try:
    rc = _main(argv)
    sys.stdout.flush()  # (inside the try: a reader gone by now is met here, not at exit)
    return rc
  except BrokenPipeError:
    # `jxent-bench | head`: the reader has gone. Python's documented recipe: point stdout at
    # devnull so that the interpreter's final flush does not raise again; no traceback.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1


def accuracy_table(args) -> int:
  """``--accuracy``: the table of docs/accuracy.md (jxent.bench.accuracy)."""
  from jxent.bench import accuracy
  names = (C.split_implementations(args.implementations) if args.implementations
           else ("xla", "chunked_xla") + accuracy.PEERS)
  known = set(C.all_implementations()) | set(accuracy.PEERS)
  for n in names:
    if n not in known or n in ("unfused", "xla_autodiff") or n.startswith("linear"):
      raise UsageError(f"--accuracy measures the logits implementations and the peers "
                       f"{', '.join(accuracy.PEERS)}; not {n!r}")
    why = C.why_not_here(n) if n in C.PEERS else None
    if why:
      raise UsageError(f"{n}: {why}")
  dtypes = [jnp.dtype(d) for d in (_parse_dtypes(args.dtype) or ("float32",))]
  check_outputs(args)
  rows = []
  for labels in ("int", "dense"):
    rows += accuracy.table(names, dtypes, dense=labels == "dense", progress=None if
                           args.no_progress else lambda r: print(
                               f"  {r.dtype} {r.labels} {r.regime}: {r.implementation}",
                               file=sys.stderr))
  print("max error in ulps, loss / every gradient element / true class "
        f"(jxent {_jxent_version()}, jax {jax.__version__}, {jax.devices()[0].platform})")
  print(accuracy.format_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump([r.as_dict() for r in rows], f, indent=1)
  return 0


def _main(argv: Optional[list[str]]) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    if args.accuracy:
      return accuracy_table(args)
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
  version = _jxent_version()
  steady = steady_cpu_allocator()
  try:
    bw = copy_bandwidth(args.reps)
  except KeyboardInterrupt:
    print("jxent-bench: interrupted before any row was measured", file=sys.stderr)
    return 130
  print(f"jxent-bench {version} on {dev_name}, jax {jax.__version__}, reduction "
        f"{C.REDUCTION!r} (every row), copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
  if "optax" in impls and C.why_not_here("optax"):
    print(f"note: {C.why_not_here('optax')}: the x optax column stays empty", flush=True)
  groups = {}
  for c in cases:
    for m in modes:
      names = [i for i in impls if C.applies(i, c)]
      if names:
        groups[(c, m)] = names
  defaults = default_names(cases)
  rows, key, interrupted = [], jax.random.key(0), False
  show = not args.no_progress and sys.stderr.isatty()
  try:
    inputs, last = None, None
    for g, ((case, mode), names) in enumerate(groups.items()):
      _progress(g, len(groups), f"{case.shape} {case.labels} {mode}", show)
      if case != last:
        inputs = None  # (free the previous case's inputs first)
        one = C.make_inputs(case, key)
        inputs = [one] + [C.make_inputs(case, jax.random.fold_in(key, r))
                          for r in range(1, _rotations(sum(a.nbytes for a in one)))]
        last = case
      base_row = dict(case=f"{case.shape} {case.dtype} {case.labels}" if case.kind == "logits"
                      else f"linear {case.shape} {case.dtype}", kind=case.kind,
                      shape=[case.n, case.d, case.v] if case.kind == "linear" else [case.n, case.v],
                      dtype=case.dtype, labels=case.labels, reduction=C.REDUCTION,
                      device=dev_name, jax_version=jax.__version__, jxent_version=version,
                      copy_gbps=bw / 1e9, reps=args.reps, steady_allocator=steady,
                      date=datetime.date.today().isoformat())
      rows += run_group(case, mode, names, inputs, args.reps, bw, base_row, defaults.get(case))
      if args.json:  # written as it goes, so an interrupted run keeps what it measured
        _write_json(args.json, rows)
    _progress(len(groups), len(groups), "done", show)
  except KeyboardInterrupt:
    interrupted = True
    if show:
      sys.stderr.write("\n")
    print("jxent-bench: interrupted (Ctrl-C); the finished rows follow", file=sys.stderr)
  floor_shown = device.platform != "cpu"
  print(format_table(rows, floor=floor_shown))
  notes = table_notes(floor_shown, missing) + chosen_notes(cases)
  if steady:
    notes.append("CPU timing: freed memory stays in the process (glibc mallopt), so that no "
                 "sample pays the page faults of a fresh mapping.")
  for line in notes + legend(floor_shown):
    print(line)
  print(summary_line(rows, interrupted))
  if args.json:
    _write_json(args.json, rows)
  if args.csv:
    keys = sorted({k for r in rows for k in r})
    with open(args.csv, "w", newline="") as fh:
      w = csv.DictWriter(fh, fieldnames=keys)
      w.writeheader()
      w.writerows(rows)
  if args.plot and rows:
    try:
      write_plot(rows, args.plot, floor_shown=floor_shown)
    except UsageError as e:
      print(f"jxent-bench: error: {e}", file=sys.stderr)
      return 2
  return 130 if interrupted else 0


def _write_json(path: str, rows: list[dict]) -> None:
  with open(path, "w") as fh:
    json.dump(rows, fh, indent=1)


def _jxent_version() -> str:
  return _VERSION


if __name__ == "__main__":
  os.environ.setdefault("KERAS_BACKEND", "jax")
  sys.exit(main())
