"""benchmarks/gpu_run.py --dry-run: every section runs on CPU (Pallas in interpret mode, tiny
shapes), writes JSON lines as it goes, gates the timing on the checks, and stays within the files
the device tool returns."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_dry_run(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JXENT_CACHE_DIR=str(tmp_path / "cache"))
  res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_run.py"), "--dry-run",
                        "--out", str(tmp_path), "--budget", "400"], env=env, capture_output=True,
                       text=True, timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  lines = [json.loads(l) for l in (tmp_path / "gpu_run.jsonl").read_text().splitlines()]
  sections = {l["section"] for l in lines}
  assert {"start", "device", "check", "record", "tune", "linear", "peers", "end"} <= sections
  checks = [l for l in lines if l["section"] == "check" and "ok" in l]
  assert checks and all(l["ok"] for l in checks), [l for l in checks if not l["ok"]]
  assert lines[-1] == {"section": "end", "gate": "pass"}
  assert not [l for l in lines if "crashed" in l or "error" in l]
  record = [l for l in lines if l["section"] == "record" and "median_ms" in l]
  assert {l["impl"] for l in record} >= {"xla", "optax", "naive"}
  config = json.loads((tmp_path / "gpu_run_config.json").read_text())
  assert set(config["entries"]) == {f"xent|{lab}|bfloat16|{red}||{bucket}"
                                    for lab in ("int", "dense") for red in ("scalar", "rows")
                                    for bucket in ("32x4096", "16x512")} | {
                                        "linear|int|bfloat16|scalar||64x32x1024"}
  linear = [l for l in lines if l["section"] == "linear" and "impl" in l]
  assert len(linear) == 4 and all(l.get("ok", True) and "ms" in l for l in linear), linear
  assert {c["implementation"] for c in config["entries"]["linear|int|bfloat16|scalar||64x32x1024"]
          ["candidates"]} == {"unfused", "linear_chunked", "linear_fused_grad"}
  # the second sweep shape tries the whole row as one block (the fused kernel's one-load path)
  one_load = [l for l in lines if l["section"] == "tune" and l.get("shape") == [16, 500]
              and l.get("block_c") == 512]
  assert len(one_load) == 2 and all(l["grad_rel"] <= 2e-2 for l in one_load), one_load
  assert all(e["candidates"] for e in config["entries"].values())
  assert len([p for p in tmp_path.iterdir() if p.name != "cache"]) <= 8


def test_deadline_skips_and_refuses_cpu_without_dry_run(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_run.py"), "--dry-run",
                        "--out", str(tmp_path), "--budget", "0", "--sections", "device,linear"],
                       env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0
  lines = [json.loads(l) for l in (tmp_path / "gpu_run.jsonl").read_text().splitlines()]
  assert any("skipped" in l for l in lines if l["section"] == "linear")
  res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_run.py"), "--out",
                        str(tmp_path)], env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=300)
  assert res.returncode == 2 and "--dry-run" in res.stderr
