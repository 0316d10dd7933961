"""The report of one ``gpu_run.py`` output folder: the figures, the targets met or not, and the
files to commit.

  python benchmarks/gpu_report.py $OUT                 # a Markdown report on stdout
  python benchmarks/gpu_report.py $OUT --ship          # and copy the run into the repository:
      benchmarks/results/<date>_<device kind>_gpu_run.jsonl   (the raw lines)
      benchmarks/results/<date>_<device kind>_gpu_run.md      (this report)
      jxent/_src/configs/<device kind>.json                   (the tuned config, shipped)

Only the standard library: it runs anywhere, on the lines the device tool brought back. The
targets are those of the H200 issue, each with the measured figure and the configuration that
reached it; a figure that was not measured (a skipped or failed case) is reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM = (8192, 128256)  # the target shape of the kernel targets
LINEAR = [8192, 4096, 128256]  # the linear target shape
LINEAR_MS, LINEAR_TEMP_MB = 40.0, 2500.0
FWD_TARGET, VG_TARGET, DENSE_TARGET = 1.0, 0.85, 1.0

# value_and_grad rows: the mode's name since 2026-12-04, and the earlier one in older runs
VG_MODES = ("value_and_grad", "forward_and_vjp")


def load(folder: str) -> list:
  path = os.path.join(folder, "gpu_run.jsonl")
  if not os.path.exists(path):
    raise SystemExit(f"gpu_report: error: no gpu_run.jsonl in {folder!r}")
  lines = []
  with open(path) as fh:
    for i, text in enumerate(fh, 1):
      if text.strip():
        try:
          lines.append(json.loads(text))
        except json.JSONDecodeError:  # (a run killed mid-line: keep the rest)
          lines.append(dict(section="report", error=f"line {i} is not JSON: {text[:80]!r}"))
  return lines


def _f(v, fmt="{:.3g}") -> str:
  return "—" if v is None else fmt.format(v)


def _table(header, rows) -> list:
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
  return out


KERNELS = ("pallas_triton", "pallas_mosaic_gpu")  # (the GPU kernels the record times by default)


def _cfg(l) -> str:
  keys = ("block_c", "num_warps", "num_stages", "row_groups", "programs", "split_rows",
          "reverse_grad", "max_concurrent_steps")
  cfg = ", ".join(f"{k}={l[k]}" for k in keys if l.get(k) not in (None, False))
  return f"{l['impl']}: {cfg}" if l.get("impl", "pallas_triton") != "pallas_triton" else cfg


def _best(rows, field):
  rows = [r for r in rows if isinstance(r.get(field), (int, float))]
  return min(rows, key=lambda r: r[field]) if rows else None


def targets(lines) -> list:
  """``[(target, measured, met | None, how)]``."""
  sweep = [l for l in lines if l["section"] == "tune" and l.get("shape") == list(LM)
           and "what" not in l]
  rec = [l for l in lines if l["section"] == "record" and "x_floor" in l]
  lm_case = f"{LM[0]}x{LM[1]} bf16"
  out = []
  fwd = [dict(l, how=f"sweep: {_cfg(l)}", x=l["fwd_x_floor"]) for l in sweep if "fwd_x_floor" in l]
  fwd += [dict(l, how=f"record: {l['impl']} defaults", x=l["x_floor"]) for l in rec
          if l["case"] == f"{lm_case} int" and l["mode"] == "forward" and l["impl"] in KERNELS]
  b = _best(fwd, "x")
  out.append((f"integer labels forward {LM[0]}x{LM[1]}: <= {FWD_TARGET}x the copy floor",
              b and b["x"], b and b["x"] <= FWD_TARGET, b and b["how"]))
  vg = [dict(l, how=f"sweep: {_cfg(l)}", x=l["vg_x_three_pass_floor"]) for l in sweep
        if "vg_x_three_pass_floor" in l]
  vg += [dict(l, how=f"record: {l['impl']} defaults", x=l["x_floor"]) for l in rec
         if l["case"] == f"{lm_case} int" and l["mode"] in VG_MODES
         and l["impl"] in KERNELS]
  b = _best(vg, "x")
  out.append((f"value_and_grad of the mean {LM[0]}x{LM[1]}: <= {VG_TARGET}x the three-pass floor",
              b and b["x"], b and b["x"] <= VG_TARGET, b and b["how"]))
  for case in sorted({l["case"] for l in rec if l["case"].endswith(" dense")}):
    d = [dict(l, how=l["impl"], x=l["x_floor"]) for l in rec if l["case"] == case
         and l["mode"] in VG_MODES and l["impl"] in KERNELS + ("xla",)]
    b = _best(d, "x")
    out.append((f"dense labels value_and_grad {case}: <= {DENSE_TARGET}x the floor",
                b and b["x"], b and b["x"] <= DENSE_TARGET, b and b["how"]))
  lin = [l for l in lines if l["section"] == "linear" and l.get("shape") == LINEAR and "ms" in l]
  algos = [l for l in lin if l["impl"] not in ("unfused", "three_bare_matmuls") and l.get("ok", True)]
  fit = [l for l in algos if (l.get("temp_MB") or 0) <= LINEAR_TEMP_MB]
  b = _best(fit, "ms")
  out.append((f"linear {'x'.join(map(str, LINEAR[:2]))}->{LINEAR[2]}: <= {LINEAR_MS:g} ms within "
              f"{LINEAR_TEMP_MB / 1e3:g} GB of temporaries", b and b["ms"],
              b and b["ms"] <= LINEAR_MS, b and f"{b['impl']}, {_f(b.get('temp_MB'), '{:.0f}')} MB"))
  unf = next((l for l in lin if l["impl"] == "unfused"), None)
  pick = _best(algos + ([unf] if unf else []), "ms")
  out.append(("linear implementation=None never slower than unfused (memory allowing)",
              pick and pick["ms"], (pick["ms"] <= unf["ms"]) if (pick and unf) else None,
              pick and f"fastest checked: {pick['impl']}; unfused {_f(unf and unf['ms'])} ms"))
  return out


def report(lines) -> str:
  md = []
  start = next((l for l in lines if l["section"] == "start"), {})
  dev = next((l for l in lines if l["section"] == "device" and "kind" in l), {})
  md += [f"# gpu_run on {dev.get('kind', '?')}", "",
         f"jax {dev.get('jax', '?')}, jxent {dev.get('jxent', '?')}"
         + (f", torch {dev['torch']}" if dev.get("torch") else "")
         + f"; SMs {dev.get('sm_count') or dev.get('sm_count_torch') or '?'}"
         + (f", L2 {dev['l2_bytes'] / 2**20:.0f} MiB" if dev.get("l2_bytes") else "")
         + f"; command: `gpu_run.py {' '.join(start.get('argv', []))}`"
         + (" (dry run: CPU, interpret mode, tiny shapes)" if start.get("dry_run") else ""), ""]
  copy = next((l for l in lines if l.get("what") == "copy" and "copy_gbps" in l), None)
  mm = [l for l in lines if l.get("what") == "matmul_bf16" and "ms" in l]
  md += [f"Copy bandwidth: {_f(copy and copy['copy_gbps'], '{:.0f}')} GB/s. bf16 matmuls: "
         + ", ".join(f"{'x'.join(map(str, l['shape']))} {l['tflops']:.0f} TFLOP/s" for l in mm), ""]

  md += ["## Targets", ""]
  md += _table(["target", "measured", "met", "how"],
               [(t, _f(v), {True: "yes", False: "**no**", None: "not measured"}[m], h or "—")
                for t, v, m, h in targets(lines)])

  checks = [l for l in lines if l["section"] == "check" and "ok" in l]
  gate = next((l["gate"] for l in lines if l["section"] == "check" and "gate" in l), "not run")
  worst = {}
  for l in checks:
    for k, v in l.items():
      if k.endswith("_rel") or k.endswith("_f64"):
        worst[(l["dtype"], k)] = max(worst.get((l["dtype"], k), 0.0), v if v == v else float("inf"))
  md += ["", "## Correctness gate", "", f"{len(checks)} cases, gate: **{gate}**; failed: "
         + (", ".join(f"{l['impl']} {l['shape']} {l['dtype']} {l['labels']}"
                      + (" +options" if l["options"] else "") for l in checks if not l["ok"]) or "none")
         + ". Worst relative errors: "
         + "; ".join(f"{dt} {k} {v:.2e}" for (dt, k), v in sorted(worst.items())), ""]

  rec = [l for l in lines if l["section"] == "record" and "median_ms" in l]
  if rec:
    optax = {(l["case"], l["mode"]): l["median_ms"] for l in rec if l["impl"] == "optax"}
    md += ["## Record (bf16, mean loss)", ""]
    md += _table(["case", "mode", "impl", "ms", "x floor", "optax / this", "temporaries MB"],
                 [(l["case"], l["mode"], l["impl"], _f(l["median_ms"]), _f(l.get("x_floor")),
                   _f(optax.get((l["case"], l["mode"])) and optax[(l["case"], l["mode"])]
                      / l["median_ms"]), _f(l.get("temp_bytes") and l["temp_bytes"] / 1e6))
                  for l in rec])
    md += [""]

  sweep = [l for l in lines if l["section"] == "tune" and "shape" in l and "what" not in l
           and "excluded" not in l]
  if sweep:
    md += ["## Launch sweep (integer labels)", ""]
    md += _table(["shape", "configuration", "fwd ms", "fwd x floor", "v&g ms", "v&g x 3-pass"],
                 [("x".join(map(str, l["shape"])), _cfg(l),
                   _f(l.get("fwd_ms")), _f(l.get("fwd_x_floor")), _f(l.get("vg_ms")),
                   _f(l.get("vg_x_three_pass_floor"))) if "error" not in l and not l.get("wrong")
                  else ("x".join(map(str, l["shape"])), _cfg(l), "wrong" if l.get("wrong") else
                        l.get("error", "")[:60], "", "", "") for l in sweep])
    md += [""]
  tuned = [l for l in lines if l.get("what") == "autotune" and l.get("key")]
  if tuned:
    md += ["## Autotuner winners (the shipped config)", ""]
    md += _table(["key", "winner", "ms", "rejected"],
                 [(l["key"], (l["winner"] or {}).get("implementation", "none") + " "
                   + json.dumps((l["winner"] or {}).get("params", {})),
                   _f((l["winner"] or {}).get("ms")), l["rejected"]) for l in tuned])
    md += [""]
  lin = [l for l in lines if l["section"] == "linear" and "impl" in l]
  if lin:
    md += ["## Linear cross-entropy (value_and_grad, dx and dw)", ""]
    md += _table(["shape", "impl", "ms", "temporaries MB", "checked"],
                 [("x".join(map(str, l["shape"])), l["impl"], _f(l.get("ms")),
                   _f(l.get("temp_MB"), "{:.0f}"),
                   {True: "yes", False: "**wrong**"}.get(l.get("ok"), "—")
                   if "error" not in l else l["error"][:60]) for l in lin])
    md += [""]
  peers = [l for l in lines if l["section"] == "peers" and len(l) > 1 and "done_s" not in l]
  if peers:
    md += ["## PyTorch peers", ""] + [f"- `{json.dumps({k: v for k, v in l.items() if k != 'section'})}`"
                                      for l in peers] + [""]
  novel = [l for l in lines if l["section"] == "compile" and "variant" in l]
  excluded = [l for l in lines if l.get("status") in ("wrong", "error") and "impl" in l]
  if novel or excluded:
    md += ["## Variants compiled for the first time, and those left out", ""]
    md += _table(["variant", "shape", "status", "compile s / error"],
                 [(l["variant"], "x".join(map(str, l["shape"])), l["status"],
                   l.get("compile_s", l.get("error", ""))) for l in novel])
    md += list(dict.fromkeys(f"- left out after the check: `{l['impl']}` ({l['status']}): "
                             f"features {', '.join(l.get('excluded', []))}" for l in excluded))
    md += [""]
  bad = [l for l in lines if (any(k in l for k in ("error", "crashed", "skipped"))
                              or l.get("status") == "timeout") and l["section"] != "peers"]
  md += ["## Errors, crashes and skipped cases", ""]
  md += [f"- {l['section']}: " + json.dumps({k: (v[-300:] if isinstance(v, str) else v)
                                             for k, v in l.items() if k != "section"})
         for l in bad] or ["none"]
  return "\n".join(md) + "\n"


def ship(folder: str, text: str, root: str) -> list:
  """Copies the run into ``root``: the raw lines and the report under benchmarks/results/, the
  config under jxent/_src/configs/. Returns the paths written."""
  cfg_path = os.path.join(folder, "gpu_run_config.json")
  kind = None
  if os.path.exists(cfg_path):
    with open(cfg_path) as fh:
      kind = json.load(fh).get("device_kind")
  kind = kind or "unknown_device"
  stem = os.path.join(root, "benchmarks", "results", f"{time.strftime('%Y-%m-%d')}_{kind}_gpu_run")
  os.makedirs(os.path.dirname(stem), exist_ok=True)
  shutil.copyfile(os.path.join(folder, "gpu_run.jsonl"), stem + ".jsonl")
  with open(stem + ".md", "w") as fh:
    fh.write(text)
  written = [stem + ".jsonl", stem + ".md"]
  if os.path.exists(cfg_path):
    dest = os.path.join(root, "jxent", "_src", "configs", f"{kind}.json")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copyfile(cfg_path, dest)
    written.append(dest)
  return written


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("folder", help="the --out folder of benchmarks/gpu_run.py")
  p.add_argument("--ship", action="store_true",
                 help="copy the lines, this report and the config into the repository")
  p.add_argument("--root", default=ROOT, help="the repository to ship into (default: this one)")
  args = p.parse_args(argv)
  text = report(load(args.folder))
  sys.stdout.write(text)
  if args.ship:
    for path in ship(args.folder, text, args.root):
      print(f"wrote {os.path.relpath(path, args.root)}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
