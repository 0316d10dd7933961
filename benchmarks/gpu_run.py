"""One prepared GPU run: checks, records and tunes, in priority order, under one deadline.

  PYTHONPATH=. python3 benchmarks/gpu_run.py --out $OUT              # the H200 run (timeout_s=540)
  PYTHONPATH=. python3 benchmarks/gpu_run.py --out /tmp/g --dry-run  # CPU: interpret mode, tiny

The run ends by itself ``--budget`` seconds (default 520) after its process started, imports
and compiles included, so a device call of ``timeout_s=540`` gets its last line. Each section
gets a share of the time left when it starts (``SHARES``; what a section leaves passes on).
Sections, each appending JSON lines to ``<out>/gpu_run.jsonl`` as it finishes a case (a deadline
or a crash loses nothing already measured):

1. ``device``: name, SM count, L2 and SM count from the CUDA driver (by ctypes: torch is not
   imported here), memory, copy bandwidth, bf16 matmul TFLOP/s at 8192^3 and at the LM-head
   shapes;
2. ``compile``: the variants never compiled on a GPU before (persistent ``programs``,
   ``row_groups``, both, ``split_rows``, ``reverse_grad``, the one-load 32768 block at 16 and 32
   warps, the ``token_log_probs`` kernels), each on a daemon thread, all at once, under this
   section's cap: one that fails, or still compiles at the cap (a hung compiler), is recorded
   and its features are left out of everything that follows;
3. ``check``: the ``pallas_triton`` default and the persistent launch with row groups, against
   ``xla`` (float32) and a float64 NumPy reference on sampled rows: forward, row VJP, fused mean
   value_and_grad; integer and dense labels; the LLM options; vocab 128256, 256000 and 32003.
   Only the default path and ``xla`` gate the timing; another variant that is wrong or fails is
   recorded (``status``) and left out of the sweep, the autotuner and the config;
4. ``record``: integer and dense labels, forward and value_and_grad of the mean, at 8192x128256,
   32768x32000, 4096x256000 and 8192x151936 bf16, for ``pallas_triton``, ``xla``, optax and the
   naive formula, with floors measured in the same run;
5. ``tune``: Triton launch candidates (``block_c``, ``num_warps``, ``num_stages``,
   ``row_groups``, ``programs``, ``split_rows``, ``reverse_grad``) at 8192x128256 bf16, then ``jxent.autotune``
   there for both label kinds and reductions; then the same at 32768x32000, where the whole row
   as one block (the fused kernel's one-load path: two passes over HBM instead of three) is
   swept against the walks. Every measured candidate is written to
   ``<out>/gpu_run_config.json`` in the shipped format after each shape (copy it to
   ``jxent/_src/configs/<device kind>.json`` to ship it);
6. ``linear``: 8192x2304->256000 and 8192x4096->128256 bf16: both algorithms over block sizes
   and ``dw_accumulation``, unfused, and the three bare matmuls; each algorithm's loss, dx and dw
   checked against unfused, then time and temporaries; the checked ones are added to the config
   (what ``implementation=None`` picks under its memory budget);
7. ``peers``: ``benchmarks/gpu_peers.py`` (Liger, Cut Cross-Entropy, torch.compile) when torch
   is installed, in a subprocess bounded by the time left. The GPU machine has torch and triton
   but neither Liger nor CCE, and no network: download their pure-Python wheels here into the
   ignored ``.whl/`` folder and carry it (``carry: [".whl"]``); they are installed offline into
   a temporary folder for the subprocess:

     python3 -m pip download --no-deps --only-binary=:all: -d .whl liger-kernel cut-cross-entropy

The check, the record, the launch sweep and linear trace their programs first and compile them
together on ``--compile-threads`` threads (XLA and Triton compile outside the GIL), then run them
in turn: compiling is most of a short run's time.

At most three files are written under ``--out`` (the device tool returns up to 8).
"""

from __future__ import annotations

import time

START = time.monotonic()  # (the budget counts from here: imports and compiles included)

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import ctypes  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jxent  # noqa: E402
from jxent.bench import cases as C  # noqa: E402
from jxent._src import autotune, configs  # noqa: E402
from jxent.bench.cli import (_median_ms, copy_bandwidth, row_function, run_row,  # noqa: E402
                             temp_bytes)

HERE = os.path.dirname(os.path.abspath(__file__))
OPTS = dict(label_smoothing=0.1, z_loss=1e-4, logit_softcap=30.0)
CONFIG = "gpu_run_config.json"  # the tuned entries, in the shipped format
TOL = {"float32": 2e-4, "bfloat16": 2e-2}  # relative error vs xla (Frobenius)


def rel(a, b):
  """``|a - b| / |b|`` (Frobenius) in float64; NaN when ``a`` is not finite."""
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  if not np.all(np.isfinite(a)):
    return float("nan")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def injected(kind: str) -> set:
  """Names given to ``$GPU_RUN_INJECT`` (``fail:NAME``, ``hang:NAME``, ``wrong:NAME``, comma
  separated): faults the tests inject to show that one bad variant does not cost the run."""
  items = [i.split(":", 1) for i in os.environ.get("GPU_RUN_INJECT", "").split(",") if ":" in i]
  return {name for k, name in items if k == kind}


def features(kernel, classes: int) -> frozenset:
  """The launch features of a Triton or Mosaic GPU configuration that were never compiled on a
  GPU before this run (a failure of one excludes every configuration that has all of its
  features: a failing Mosaic GPU default excludes every Mosaic GPU configuration)."""
  if getattr(kernel, "name", "") == "pallas_mosaic_gpu":
    default = type(kernel)()
    f = {"mosaic_gpu"}
    if kernel.block_c != default.block_c:
      f.add(f"mosaic_gpu_block_c_{kernel.block_c}")
    if kernel.max_concurrent_steps != default.max_concurrent_steps:
      f.add(f"mosaic_gpu_steps_{kernel.max_concurrent_steps}")
    if kernel.programs is not None:
      f.add("mosaic_gpu_programs")
    return frozenset(f)
  if not hasattr(kernel, "block_c"):
    return frozenset({"other"})
  f = set()
  if kernel.programs is not None:
    f.add("programs")
  if kernel.row_groups > 1:
    f.add("row_groups")
  if kernel.split_rows > 1:
    f.add("split_rows")
  if kernel.reverse_grad:
    f.add("reverse_grad")
  if kernel.block_c >= classes:  # (the whole row as one block)
    f.add(f"one_load_{kernel.num_warps}_warps")
  return frozenset(f)


class Run:
  """The log, the deadline and the sizes of one run (full or dry)."""

  def __init__(self, out: str, budget: float, dry: bool, threads: int = 8):
    os.makedirs(out, exist_ok=True)
    self.out, self.dry = out, dry
    self.deadline = START + budget
    self.section_deadline = self.deadline  # (main sets each section's share)
    self.failed = []  # feature sets of the variants that failed to compile or check
    self.log = open(os.path.join(out, "gpu_run.jsonl"), "a")
    self.reps = 2 if dry else 10  # (dry-run timings mean nothing; they only show the code runs)
    self.bw = None  # copy bandwidth, bytes/s, once the device section has measured it
    self.threads = threads  # compile threads (the sections compile their programs ahead, together)
    self.kernel = functools.partial(jxent.PallasTritonKernel, interpret=True) if dry else \
        jxent.PallasTritonKernel
    # the Mosaic GPU kernel (#25): compiled, checked, timed and tuned beside Triton, never gating
    self.mosaic = functools.partial(jxent.PallasMosaicGpuKernel, interpret=True) if dry else \
        jxent.PallasMosaicGpuKernel

  def left(self) -> float:
    return min(self.deadline, self.section_deadline) - time.monotonic()

  def allowed(self, kernel, classes: int) -> bool:
    """Whether a launch configuration avoids every feature set that failed to compile or to
    check (such variants are left out of the sweep, the autotuner and the shipped config)."""
    feats = features(kernel, classes)
    return not any(bad <= feats for bad in self.failed)

  def emit(self, section: str, **kw):
    line = json.dumps(dict(section=section, **kw), default=str)
    print(line, flush=True)
    self.log.write(line + "\n")
    self.log.flush()

  def case(self, section: str, need_s: float, fn, **fields):
    """Runs one case if ``need_s`` seconds are left; records its result or its error."""
    if self.left() < need_s:
      self.emit(section, **fields, skipped=f"deadline ({self.left():.0f} s left, {need_s} s needed)")
      return None
    try:
      res = fn()
    except Exception as e:  # noqa: BLE001  (one failing case must not stop the run)
      self.emit(section, **fields, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
      return None
    self.emit(section, **fields, **(res or {}))
    return res


# ------------------------------------------------------------------------------------------------
# 1. device facts
# ------------------------------------------------------------------------------------------------
def cuda_attributes() -> dict:
  """L2 size and SM count from the CUDA driver (``libcuda``, by ctypes: nothing heavy is
  imported for them); ``{}`` where there is no driver."""
  try:
    cuda = ctypes.CDLL("libcuda.so.1")
    dev, val = ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), 0):
      return {}
    out = {}
    for name, attr in (("l2_bytes", 38), ("sm_count_driver", 16)):  # CU_DEVICE_ATTRIBUTE_*
      if not cuda.cuDeviceGetAttribute(ctypes.byref(val), attr, dev):
        out[name] = val.value
    return out
  except (OSError, AttributeError):
    return {}


def section_device(run: Run):
  dev = jax.devices()[0]
  facts = dict(kind=getattr(dev, "device_kind", dev.platform), platform=dev.platform,
               jax=jax.__version__, jxent=jxent.__version__,
               sm_count=getattr(dev, "core_count", None))
  try:
    facts["memory_bytes"] = (dev.memory_stats() or {}).get("bytes_limit")
  except Exception:  # noqa: BLE001  (not every backend reports it)
    pass
  facts.update(cuda_attributes())
  run.emit("device", **facts)
  def copy():
    run.bw = copy_bandwidth(run.reps)
    return dict(copy_gbps=run.bw / 1e9)
  run.case("device", 8, copy, what="copy")
  shapes = [(256, 256, 256)] if run.dry else [(8192, 8192, 8192), (8192, 2304, 256000),
                                              (8192, 4096, 128256)]
  for m, k, n in shapes:
    def mm(m=m, k=k, n=n):
      a = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
      b = jax.random.normal(jax.random.key(2), (k, n), jnp.bfloat16)
      f = jax.jit(lambda a, b: a @ b)
      ms = _median_ms(f, [(a, b)], run.reps)
      return dict(ms=ms, tflops=2 * m * k * n / (ms * 1e-3) / 1e12)
    run.case("device", 5, mm, what="matmul_bf16", shape=[m, k, n])


# ------------------------------------------------------------------------------------------------
# 2. correctness (gates the timing)
# ------------------------------------------------------------------------------------------------
def _np_reference(x, y, sparse: bool, rows):
  """float64 per-row loss (no options) on ``rows``."""
  xs = np.asarray(jnp.asarray(x[rows], jnp.float32), np.float64)
  m = xs.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(xs - m).sum(-1, keepdims=True)))[:, 0]
  if sparse:
    return lse - xs[np.arange(len(rows)), np.asarray(y)[rows]]
  ys = np.asarray(jnp.asarray(y[rows], jnp.float32), np.float64)
  return (ys * (lse[:, None] - xs)).sum(-1)


def section_check(run: Run) -> bool:
  """Every case's programs (forward, row VJP, mean value_and_grad; ``xla`` and each kernel) are
  traced here, compiled together on ``run.threads`` threads, then run and compared in order."""
  K = run.kernel
  kernels = {"pallas_triton": K(), "pallas_triton_persistent_groups": K(programs=4 if run.dry else 264,
                                                                         block_c=4096, row_groups=64)}
  if run.allowed(run.mosaic(), 0):  # (unless it failed to compile)
    kernels["pallas_mosaic_gpu"] = run.mosaic()
  shapes = [(16, 1000)] if run.dry else [(256, 128256), (128, 256000), (512, 32003)]
  key = jax.random.key(0)
  cases = []
  for (n, v) in shapes:
    for dt in ("float32",) if run.dry else ("float32", "bfloat16"):
      k1, k2 = jax.random.split(jax.random.fold_in(key, n * v))
      x = (jax.random.normal(k1, (n, v), jnp.float32) * 3).astype(dt)
      yi = jax.random.randint(k2, (n,), 0, v).at[1].set(-100)
      yd = (jax.nn.one_hot(jnp.maximum(yi, 0), v, dtype=dt) * 0.9 + 0.1 / v).astype(dt)
      g = jax.random.normal(k2, (n,), jnp.float32).astype(dt)
      for labels, y, fn in (("int", yi, jxent.softmax_cross_entropy_with_integer_labels),
                            ("dense", yd, jxent.softmax_cross_entropy)):
        for opts in ({}, OPTS):
          kw = dict(opts, ignore_index=-100) if labels == "int" else dict(opts)
          progs = {}
          for name, impl in [("xla", "xla")] + list(kernels.items()):
            f = functools.partial(fn, implementation=impl, **kw)
            progs[name] = [
                _lower(f, x, y),
                _lower(lambda x, y, g, f=f: jax.vjp(lambda x: f(x, y), x)[1](g)[0], x, y, g),
                _lower(jax.value_and_grad(lambda x, y, f=f: f(x, y, reduction="mean")), x, y)]
          cases.append(dict(n=n, v=v, dt=dt, labels=labels, opts=opts, x=x, y=y, g=g, progs=progs))
  t0 = time.monotonic()
  flat = compile_all(run, [p for c in cases for ps in c["progs"].values() for p in ps])
  run.emit("check", compiled=len(flat), compile_s=round(time.monotonic() - t0, 1),
           threads=run.threads)
  compiled = iter(flat)  # (in the order they were traced)
  for c in cases:
    c["progs"] = {name: [next(compiled) for _ in ps] for name, ps in c["progs"].items()}
  ok = True
  for c in cases:
    n, dt, labels, x, y, g = c["n"], c["dt"], c["labels"], c["x"], c["y"], c["g"]

    def outs(progs):
      bad = [p for p in progs if isinstance(p, Exception)]
      if bad:
        raise bad[0]
      return (progs[0](x, y), progs[1](x, y, g)) + tuple(progs[2](x, y))

    try:
      ref = outs(c["progs"]["xla"])
    except Exception as e:  # noqa: BLE001  (recorded; the kernels' cases then fail)
      run.emit("check", impl="xla", shape=[n, c["v"]], error=f"{type(e).__name__}: {e}"[:300])
      ok = False
      continue
    rows = np.arange(2, min(n, 8))
    ref64 = None if c["opts"] else _np_reference(x, y, labels == "int", rows)
    for name in kernels:
      def check(progs=c["progs"][name], ref=ref, ref64=ref64, name=name):
        got = outs(progs)
        if name in injected("wrong"):
          got = (2 * got[0],) + tuple(got[1:])
        errs = dict(loss_rel=rel(got[0], ref[0]), dlogits_rel=rel(got[1], ref[1]),
                    mean_rel=rel(got[2], ref[2]), mean_grad_rel=rel(got[3], ref[3]))
        if ref64 is not None:
          errs["loss_rel_f64"] = rel(np.asarray(jnp.asarray(got[0], jnp.float32))[rows], ref64)
          errs["xla_loss_rel_f64"] = rel(np.asarray(jnp.asarray(ref[0], jnp.float32))[rows],
                                         ref64)
        errs["ok"] = all(e <= TOL[dt] for e in errs.values())  # (NaN fails)
        return errs
      res = run.case("check", 3, check, impl=name, shape=[n, c["v"]], dtype=dt, labels=labels,
                     options=bool(c["opts"]))
      good = bool(res and res.get("ok"))
      if name == "pallas_triton":  # (the default path and xla gate the timing)
        ok = ok and good
      elif not good:  # (another variant: recorded, and left out of what follows)
        bad = features(kernels[name], c["v"])
        if bad and bad not in run.failed:
          run.failed.append(bad)
        run.emit("check", impl=name, shape=[n, c["v"]], status="wrong" if res else "error",
                 excluded=sorted(bad))
  run.emit("check", gate="pass" if ok else "fail", excluded=[sorted(b) for b in run.failed])
  return ok


def _novel(run: Run):
  """``[(name, kernel, (n, v), what)]``: the programs never compiled on a GPU before this run,
  compiled first, under the section's own cap."""
  K = run.kernel
  if run.dry:
    big, small, few = (32, 3000), (16, 500), (8, 3000)
    one = [("one_load_8_warps", K(block_c=512, num_warps=8), small, "vg")]
  else:
    big, small, few = (8192, 128256), (32768, 32000), (64, 128256)
    one = [(f"one_load_{nw}_warps", K(block_c=32768, num_warps=nw), small, "vg") for nw in (16, 32)]
  bc, programs = (512, 4) if run.dry else (4096, 264)
  # one new feature each where it can stand alone (a failure then excludes just that feature),
  # and the persistent launch with row groups as the check runs it
  return [("programs", K(programs=programs, block_c=bc, num_warps=8), big, "vg"),
          ("row_groups", K(block_c=bc, num_warps=8, row_groups=64), big, "vg"),
          ("persistent_groups", K(programs=programs, block_c=bc, num_warps=8, row_groups=64), big,
           "vg"),
          ("split_rows", K(split_rows=8, block_c=bc, num_warps=8), few, "fwd"),
          ("reverse_grad", K(block_c=bc, num_warps=8, reverse_grad=True), big, "vg"),
          ("token_log_probs", K(), big, "logprobs"),
          # the Mosaic GPU kernels: statistics and gradient walks, and their token_log_probs walks
          ("mosaic_gpu", run.mosaic(), big, "vg"),
          ("mosaic_gpu_persistent", run.mosaic(programs=programs), big, "vg"),
          ("mosaic_gpu_token_log_probs", run.mosaic(), big, "logprobs")] + one


def section_compile(run: Run):
  """Compiles each never-before-compiled variant on a daemon thread and waits until this
  section's cap: a variant that fails or is still compiling then (a hung compiler) is recorded
  and left out of the check, the sweep, the autotuner and the config, and the run goes on."""
  f = jxent.softmax_cross_entropy_with_integer_labels
  jobs = []
  for name, k, (n, v), what in _novel(run):
    x = jax.ShapeDtypeStruct((n, v), jnp.bfloat16)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)
    if what == "fwd":
      fn = lambda x, y, k=k: f(x, y, implementation=k)
    elif what == "vg":
      fn = jax.value_and_grad(lambda x, y, k=k: f(x, y, implementation=k, reduction="mean"))
    else:
      fn = jax.value_and_grad(lambda x, y, k=k: jnp.sum(jxent.token_log_probs(
          x, y, temperature=0.7, return_entropy=True, implementation=k)[0]))
    box = {}

    def work(fn=fn, x=x, y=y, box=box, name=name):
      t0 = time.monotonic()
      try:
        if name in injected("hang"):
          time.sleep(3600)
        if name in injected("fail"):
          raise RuntimeError("injected compile failure")
        jax.jit(fn).lower(x, y).compile()
        box["compile_s"] = round(time.monotonic() - t0, 1)
      except Exception as e:  # noqa: BLE001  (recorded by the waiting loop)
        box["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"

    jobs.append((name, k, (n, v), what, threading.Thread(target=work, daemon=True), box))
  for job in jobs:  # (all at once: a hung one holds no other back)
    job[4].start()
  while any(job[4].is_alive() for job in jobs) and run.left() > 0:
    time.sleep(0.05)
  for name, k, (n, v), what, _thread, box in jobs:
    status = "compiled" if "compile_s" in box else ("error" if "error" in box else "timeout")
    if status != "compiled":
      bad = frozenset({name}) if what == "logprobs" else features(k, v)
      if bad and bad not in run.failed:  # (an empty set would leave nothing out but everything)
        run.failed.append(bad)
    run.emit("compile", variant=name, shape=[n, v], status=status, **box)


def _lower(fn, *args):
  """``jax.jit(fn).lower(*args)``, or the exception it raised (the case that needs it records
  it; the others go on)."""
  try:
    return jax.jit(fn).lower(*args)
  except Exception as e:  # noqa: BLE001
    return e


def compile_all(run: Run, lowered: list) -> list:
  """Compiles traced programs on ``run.threads`` threads (XLA and Triton compile outside the
  GIL), in order; a program that failed to trace or compile is returned as its exception."""
  def one(prog):
    if isinstance(prog, Exception):
      return prog
    try:
      return prog.compile()
    except Exception as e:  # noqa: BLE001  (the case that needs it records the error)
      return e
  if run.threads <= 1:
    return [one(p) for p in lowered]
  with concurrent.futures.ThreadPoolExecutor(run.threads) as pool:
    return list(pool.map(one, lowered))


# ------------------------------------------------------------------------------------------------
# 3. the record
# ------------------------------------------------------------------------------------------------
def _row(run: Run, name: str, case: C.Case, mode: str, inputs, bw: float, compiled):
  if isinstance(compiled, Exception):
    raise compiled
  r = run_row(name, case, mode, inputs, run.reps, compiled=compiled)
  fb = C.floor_bytes(case, mode)
  if fb is not None:
    r["floor_ms"] = fb / bw * 1e3
    r["x_floor"] = r["median_ms"] / r["floor_ms"]
  return r


def section_record(run: Run, bw: float):
  """Per shape and label kind: every row's program compiled together, then each timed."""
  shapes = [(64, 4099)] if run.dry else [(8192, 128256), (32768, 32000),
                                                       (4096, 256000), (8192, 151936)]
  impls = ["pallas_triton", "xla", "optax", "naive"]
  if run.allowed(run.mosaic(), 0):  # (unless it failed to compile or to check)
    impls.insert(1, "pallas_mosaic_gpu")
  for n, v in shapes:
    for labels in ("int", "dense"):
      case = C.Case("logits", n, v, dtype="bfloat16", labels=labels)
      if run.left() < 30:
        run.emit("record", case=f"{n}x{v} {labels}", skipped="deadline")
        continue
      inputs = [C.make_inputs(case, jax.random.key(r)) for r in range(2)]
      # (in a dry run the Pallas kernels' interpret-mode timings mean nothing; the check ran them)
      rows = [(mode, name) for mode in C.MODES for name in impls if C.applies(name, case)
              and not (run.dry and name.startswith("pallas"))]
      progs = compile_all(run, [_lower(row_function(name, case, mode), *inputs[0])
                                for mode, name in rows])
      for (mode, name), prog in zip(rows, progs):
        run.case("record", 8, lambda: _row(run, name, case, mode, inputs, bw, prog),
                 case=f"{n}x{v} bf16 {labels}", mode=mode, impl=name)


# ------------------------------------------------------------------------------------------------
# 4. tuning: Triton launch candidates; the winners are written as the config to ship
# ------------------------------------------------------------------------------------------------
def _sweep_shapes(run: Run):
  """``[(n, v, candidates)]``: the launch sweep, the large vocabulary first."""
  K, M = run.kernel, run.mosaic
  if run.dry:
    return [(32, 3000, [K(), K(block_c=1024, row_groups=4), K(block_c=512, split_rows=4),
                        K(block_c=512, programs=4, reverse_grad=True), M(block_c=128)]),
            (16, 500, [K(block_c=autotune.one_block(500), num_warps=nw) for nw in (8, 16)])]
  cands = [K()]
  cands += [K(block_c=bc, num_warps=nw, num_stages=st, row_groups=gr)
            for bc, nw in ((2048, 4), (4096, 8), (8192, 8)) for st in (1, 2, 3) for gr in (1, 64)]
  cands += [K(programs=p * 132, block_c=bc, num_warps=nw, row_groups=64, reverse_grad=rev)
            for p in (1, 2) for bc, nw in ((4096, 8), (8192, 16)) for rev in (False, True)]
  # the gradient walk from the row's last block, one program per row
  cands += [K(reverse_grad=True), K(block_c=4096, num_warps=8, row_groups=64, reverse_grad=True)]
  # split-row forward: several programs per row (the forward only; value_and_grad is fused)
  cands += [K(split_rows=sp, block_c=bc, num_warps=nw) for sp in (2, 4, 8)
            for bc, nw in ((4096, 8), (8192, 8))]
  # 32000 classes: the whole row as one block (value_and_grad reads it once: two passes, not
  # three), against the default walk and the best walks above
  small = [K(), K(block_c=4096, num_warps=8)]
  small += [K(block_c=autotune.one_block(32000), num_warps=nw) for nw in (8, 16, 32)]
  # Mosaic GPU: class tiles of 64 to 256, 2 to 4 TMA copies in flight
  mosaic = [M()] + [M(block_c=bc, max_concurrent_steps=st) for bc in (64, 128, 256)
                    for st in (2, 3, 4)]
  cands += mosaic + [M(programs=132), M(block_c=128, max_concurrent_steps=4, programs=132)]
  # (32768 rows are 512 blocks of 64: the persistent launch walks ~4 per SM)
  small += [M(), M(block_c=128, max_concurrent_steps=4), M(programs=132)]
  # (the defaults are also a grid point: each configuration is timed once)
  return [(8192, 128256, list(dict.fromkeys(cands))), (32768, 32000, small)]


def section_tune(run: Run, bw: float):
  """Per shape (the large vocabulary first): the launch sweep, then the autotuner (all
  candidates, value_and_grad, temporaries) for both label kinds and reductions. Its entries, with
  the sweep's launch configurations, are the config to ship; the file is written after each
  shape, so a deadline keeps what was tuned."""
  keys = 0
  for n, v, cands in _sweep_shapes(run):
    out = [k for k in cands if not run.allowed(k, v)]
    if out:
      run.emit("tune", shape=[n, v], excluded=len(out), why="failed to compile or check")
    swept = _sweep(run, bw, n, v, [k for k in cands if run.allowed(k, v)])
    entries = {}
    for labels in ("int", "dense"):
      for reduction in ("mean", "none"):
        def tuned(labels=labels, reduction=reduction):
          allowed = [c for c in autotune._candidates("xent", (n, v), reduction)
                     if run.allowed(c, v)]  # (variants that failed to compile or check: out)
          r = autotune.autotune("xent", (n, v), "bfloat16", labels=labels, reduction=reduction,
                                reps=run.reps, force=True, candidates=allowed)
          cands = r["candidates"] + (swept if (labels, reduction) == ("int", "mean") else [])
          entries[r["key"]] = dict(candidates=cands, rejected=r["rejected"])
          return dict(key=r["key"], winner=min(cands, key=lambda c: c["ms"]) if cands else None,
                      rejected=len(r["rejected"]))
        run.case("tune", 30, tuned, what="autotune", shape=[n, v], labels=labels,
                 reduction=reduction)
    keys += _ship(run, entries)
  run.emit("tune", wrote=CONFIG, keys=keys)


def _ship(run: Run, entries: dict) -> int:
  """Merges tuned ``entries`` into ``<out>/gpu_run_config.json`` (the shipped format)."""
  if not entries:
    return 0
  dev = jax.devices()[0]
  path = os.path.join(run.out, CONFIG)
  configs.write_entries(path, entries, device_kind=configs.device_kind(dev),
                        source=f"benchmarks/gpu_run.py on {getattr(dev, 'device_kind', dev.platform)}"
                               f", jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
  return len(entries)


def _sweep(run: Run, bw: float, n: int, v: int, cands) -> list:
  """Times each launch configuration (forward, value_and_grad of the mean) at ``[n, v]`` bf16
  integer labels after checking its gradient against ``xla``; returns the autotuner's rows."""
  key = jax.random.key(3)
  xs = [((jax.random.normal(jax.random.fold_in(key, i), (n, v), jnp.float32) * 3)
         .astype(jnp.bfloat16), jax.random.randint(jax.random.fold_in(key, 9 + i), (n,), 0, v))
        for i in range(2)]
  nbytes = n * v * 2
  sweep = []
  f = jxent.softmax_cross_entropy_with_integer_labels
  ref = jax.jit(jax.value_and_grad(lambda x, y: f(x, y, implementation="xla", reduction="mean")))(
      *xs[0])
  # every candidate's forward and value_and_grad, traced here and compiled together
  progs = compile_all(run, [p for k in cands for p in (
      _lower(lambda x, y, k=k: f(x, y, implementation=k), *xs[0]),
      _lower(jax.value_and_grad(lambda x, y, k=k: f(x, y, implementation=k, reduction="mean")),
             *xs[0]))])
  for i, k in enumerate(cands):
    cfg = {f.name: getattr(k, f.name) for f in dataclasses.fields(k) if f.name != "interpret"}

    def one(fwd=progs[2 * i], vg=progs[2 * i + 1]):
      for prog in (fwd, vg):
        if isinstance(prog, Exception):
          raise prog
      out = vg(*xs[0])
      err = rel(out[1], ref[1])
      if not err <= TOL["bfloat16"]:
        return dict(wrong=True, grad_rel=err)
      if run.dry:
        return dict(grad_rel=err)
      f_ms, vg_ms = _median_ms(fwd, xs, run.reps), _median_ms(vg, xs, run.reps)
      return dict(grad_rel=err, fwd_ms=f_ms, fwd_x_floor=f_ms / (nbytes / bw * 1e3), vg_ms=vg_ms,
                  vg_x_three_pass_floor=vg_ms / (3 * nbytes / bw * 1e3))

    res = run.case("tune", 5, one, shape=[n, v], impl=k.name, **cfg)
    if res and not res.get("wrong") and "vg_ms" in res:
      sweep.append(dict(autotune.describe(k), ms=res["vg_ms"], fwd_ms=res["fwd_ms"], temp_bytes=None))
  return sweep


# ------------------------------------------------------------------------------------------------
# 5. linear cross-entropy
# ------------------------------------------------------------------------------------------------
def section_linear(run: Run):
  """Each algorithm's value_and_grad (dx, dw) is checked against the unfused one, then timed;
  the checked ones, with their temporaries, are the config's linear entries (what
  ``implementation=None`` picks under a memory budget)."""
  shapes = [(64, 32, 1000)] if run.dry else [(8192, 2304, 256000), (8192, 4096, 128256)]
  entries = {}
  for n, d, v in shapes:
    key = jax.random.key(5)
    x = jax.random.normal(key, (n, d), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(jax.random.fold_in(key, 1), (d, v), jnp.float32) * d ** -0.5
         ).astype(jnp.bfloat16)
    y = jax.random.randint(key, (n,), 0, v)
    algos = ([jxent.LinearChunked(block_v=b) for b in (2048, 4096, 8192)]
             + [jxent.LinearFusedGrad(block_n=b, dw_accumulation=a)
                for b in (512, 1024, 2048) for a in ("float32", "weights")])
    if run.dry:
      algos = [jxent.LinearChunked(block_v=256), jxent.LinearFusedGrad(block_n=16)]
    fns = {"unfused": ("unfused", lambda x, w, y: jxent.softmax_cross_entropy_with_integer_labels(
        (x @ w), y, reduction="mean"))}
    fns.update({repr(a): (a, (lambda a=a: lambda x, w, y: jxent.linear_softmax_cross_entropy(
        x, w, y, implementation=a))()) for a in algos})

    def bare(x, w, y):
      z = x @ w
      return z, z @ w.T, x.T @ z

    rows = list(fns.items()) + [("three_bare_matmuls", (None, None))]
    progs = compile_all(run, [_lower(bare if f is None else jax.value_and_grad(f, argnums=(0, 1)),
                                     x, w, y) for _, (_, f) in rows])
    ref, good = None, []
    for (name, (algo, f)), compiled in zip(rows, progs):
      def one(algo=algo, f=f, compiled=compiled):
        nonlocal ref
        if isinstance(compiled, Exception):
          raise compiled
        temp = temp_bytes(compiled)
        res = {}
        if f is not None:
          out = compiled(x, w, y)
          ref = out if ref is None else ref  # (unfused runs first)
          res = dict(loss_rel=rel(out[0], ref[0]), dx_rel=rel(out[1][0], ref[1][0]),
                     dw_rel=rel(out[1][1], ref[1][1]))
          res["ok"] = all(e <= TOL["bfloat16"] for e in res.values())
          if not res["ok"]:
            return res
        res.update(ms=_median_ms(compiled, [(x, w, y)], run.reps),
                   temp_MB=None if temp is None else temp / 1e6)
        if f is not None:
          good.append(dict(autotune.describe(algo), ms=res["ms"], temp_bytes=temp))
        return res
      run.case("linear", 15, one, shape=[n, d, v], impl=name)
    if good:
      entries[configs.make_key("linear", (n, d, v), "bfloat16", labels="int", reduction="mean")] = \
          dict(candidates=good, rejected=[])
  run.emit("linear", wrote=CONFIG, keys=_ship(run, entries))


# ------------------------------------------------------------------------------------------------
# 6. PyTorch peers
# ------------------------------------------------------------------------------------------------
WHEELS = os.path.join(os.path.dirname(HERE), ".whl")  # the peers' wheels, carried (see below)


def peer_site(wheels: str = WHEELS):
  """Installs the carried peer wheels (``<repo>/.whl/*.whl``: Liger, Cut Cross-Entropy, pure
  Python) into a fresh folder, offline; ``(folder | None, names or the error)``."""
  found = sorted(f for f in (os.listdir(wheels) if os.path.isdir(wheels) else [])
                 if f.endswith(".whl"))
  if not found:
    return None, "no wheels carried in .whl/"
  site = tempfile.mkdtemp(prefix="jxent-peers-")
  res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--target", site] + [os.path.join(wheels, f) for f in found],
                       capture_output=True, text=True, timeout=300)
  if res.returncode:
    return None, f"pip install failed: {res.stderr.strip()[-300:]}"
  return site, found


def section_peers(run: Run):
  # (torch is imported only by gpu_peers.py, in its own process)
  if importlib.util.find_spec("torch") is None:
    run.emit("peers", skipped="torch is not installed")
    return
  if run.dry:
    run.emit("peers", skipped="dry run")
    return
  left = run.left() - 5
  if left < 60:
    run.emit("peers", skipped=f"deadline ({left:.0f} s left)")
    return
  site, what = peer_site()
  run.emit("peers", wheels=what)  # (without them gpu_peers.py times torch.compile and eager only)
  env = dict(os.environ)
  if site:
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH")) if p)
  left = run.left() - 5
  try:
    res = subprocess.run([sys.executable, os.path.join(HERE, "gpu_peers.py")], capture_output=True,
                         text=True, timeout=left, env=env)
    for line in res.stdout.splitlines():
      if line.startswith("{"):
        run.emit("peers", **json.loads(line))
    if res.returncode:
      run.emit("peers", error=res.stderr[-500:])
  except subprocess.TimeoutExpired:
    run.emit("peers", error=f"timed out after {left:.0f} s")


SECTIONS = ("device", "compile", "check", "record", "tune", "linear", "peers")
# Each section's share of the time left when it starts (time a section does not use passes on)
SHARES = {"device": 25, "compile": 50, "check": 100, "record": 90, "tune": 150, "linear": 65,
          "peers": 40}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default=os.environ.get("OUT", "gpu_out"), help="output folder")
  p.add_argument("--budget", type=float, default=520.0,
                 help="global deadline in seconds from the process start (imports and compiles "
                      "included; the run ends by itself inside a device call of timeout_s=540)")
  p.add_argument("--dry-run", action="store_true", help="CPU: interpret mode, tiny shapes")
  p.add_argument("--compile-threads", type=int, default=min(8, os.cpu_count() or 1),
                 help="threads compiling each section's programs ahead (1: in turn)")
  p.add_argument("--sections", default=",".join(SECTIONS),
                 help=f"comma list, in this order: {','.join(SECTIONS)}")
  args = p.parse_args(argv)
  sections = [s for s in args.sections.split(",") if s]
  bad = [s for s in sections if s not in SECTIONS]
  if bad:
    print(f"gpu_run: error: unknown sections {bad}; expected {SECTIONS}", file=sys.stderr)
    return 2
  if not args.dry_run and jax.default_backend() == "cpu":
    print("gpu_run: error: no GPU here; use --dry-run on CPU", file=sys.stderr)
    return 2
  run = Run(args.out, args.budget, args.dry_run, threads=max(1, args.compile_threads))
  run.emit("start", sections=sections, budget_s=args.budget, dry_run=args.dry_run, argv=sys.argv[1:])
  bw = None
  gate = True
  for i, s in enumerate(sections):
    t0 = time.monotonic()
    later = sum(SHARES[x] for x in sections[i:])
    run.section_deadline = t0 + max(0.0, run.deadline - t0) * SHARES[s] / later
    try:
      if s == "device":
        section_device(run)
      elif s == "compile":
        section_compile(run)
      elif s == "check":
        gate = section_check(run)
      elif not gate and s in ("record", "tune", "linear"):
        run.emit(s, skipped="the correctness check failed: nothing is timed")
      else:
        if bw is None and s in ("record", "tune"):
          bw = run.bw or copy_bandwidth(run.reps)
        {"record": lambda: section_record(run, bw), "tune": lambda: section_tune(run, bw),
         "linear": lambda: section_linear(run), "peers": lambda: section_peers(run)}[s]()
    except Exception:  # noqa: BLE001  (a crashing section is recorded; the next one runs)
      run.emit(s, crashed=traceback.format_exc()[-1500:])
    run.emit(s, done_s=round(time.monotonic() - t0, 1), left_s=round(run.left(), 1))
  run.emit("end", gate="pass" if gate else "fail")
  run.log.close()
  if any(t.is_alive() for t in threading.enumerate() if t.daemon):
    os._exit(0)  # (a compile still hung on a daemon thread must not hold the exit)
  return 0


if __name__ == "__main__":
  sys.exit(main())
