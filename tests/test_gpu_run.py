"""benchmarks/gpu_run.py --dry-run: every section runs on CPU (Pallas in interpret mode, tiny
shapes), writes JSON lines as it goes, gates the timing on the checks, and stays within the files
the device tool returns."""

import json
import os
import pathlib
import subprocess
import sys

import jxent

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
  assert not [l for l in lines if "crashed" in l or "error" in l or l.get("wrong")]
  # the Mosaic GPU kernel (#25): compiled first, checked (not gating), swept
  compiled = {l["variant"] for l in lines if l["section"] == "compile" and l.get("status") == "compiled"}
  assert {"mosaic_gpu", "mosaic_gpu_persistent", "mosaic_gpu_token_log_probs"} <= compiled, compiled
  assert len([l for l in checks if l["impl"] == "pallas_mosaic_gpu"]) == 4
  assert [l for l in lines if l["section"] == "tune" and l.get("impl") == "pallas_mosaic_gpu"
          and l.get("grad_rel", 1) <= 2e-2]
  reverse = [l["grad_rel"] for l in lines if l.get("reverse_grad")]
  assert len(reverse) == 1 and reverse[0] <= 2e-2, reverse
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
  # the report of the run, and its copy into a repository
  repo = tmp_path / "repo"
  res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), str(tmp_path),
                        "--ship", "--root", str(repo)], capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  assert "## Targets" in res.stdout and "gate: **pass**" in res.stdout
  assert "xent\\|int\\|bfloat16\\|scalar" in res.stdout  # (table cells keep their columns)
  shipped = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
  date = shipped[0].split("/")[-1].split("_")[0]
  assert shipped == [f"benchmarks/results/{date}_cpu_gpu_run.jsonl",
                     f"benchmarks/results/{date}_cpu_gpu_run.md", "jxent/_src/configs/cpu.json"]
  assert json.loads((repo / "jxent/_src/configs/cpu.json").read_text()) == config


def _lines(fwd_x, vg_x, dense_x, lin):
  """gpu_run.jsonl lines as the full run writes them (the fields the report reads)."""
  sweep = dict(section="tune", shape=[8192, 128256], block_c=4096, num_warps=8, num_stages=1,
               row_groups=64, programs=None, split_rows=1, fwd_ms=1.0, vg_ms=2.0,
               fwd_x_floor=fwd_x, vg_x_three_pass_floor=vg_x)
  rec = dict(section="record", case="8192x128256 bf16 dense", mode="value_and_grad", impl="xla",
             median_ms=3.0, x_floor=dense_x)
  linear = [dict(section="linear", shape=[8192, 4096, 128256], impl=name, ms=ms, temp_MB=mb, ok=True)
            for name, ms, mb in lin]
  return [dict(section="start", argv=[]), sweep, rec] + linear


def test_report_targets():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import gpu_report
  met = {t.split(":")[0]: (v, m) for t, v, m, _ in gpu_report.targets(_lines(
      0.95, 0.9, 1.0, [("unfused", 45.0, 12000), ("LinearFusedGrad(block_n=1024)", 38.0, 2000)]))}
  assert met["integer labels forward 8192x128256"] == (0.95, True)
  assert met["value_and_grad of the mean 8192x128256"] == (0.9, False)
  assert met["dense labels value_and_grad 8192x128256 bf16 dense"] == (1.0, True)
  assert met["linear 8192x4096->128256"] == (38.0, True)
  assert met["linear implementation=None never slower than unfused (memory allowing)"] == (38.0, True)
  # over the memory bound: not met, even when fast; nothing measured: None
  met = {t.split(":")[0]: (v, m) for t, v, m, _ in gpu_report.targets(_lines(
      1.2, 0.8, 1.1, [("unfused", 45.0, 12000), ("LinearChunked(block_v=4096)", 30.0, 3000)]))}
  assert met["linear 8192x4096->128256"] == (None, None)
  assert met["value_and_grad of the mean 8192x128256"] == (0.8, True)
  assert met["integer labels forward 8192x128256"] == (1.2, False)
  text = gpu_report.report(_lines(1.2, 0.8, 1.1, []))
  assert "| value_and_grad of the mean 8192x128256: <= 0.85x the three-pass floor | 0.8 | yes |" in text


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


def test_compile_all_keeps_order_and_records_failures(tmp_path):
  # the check and the sweep compile their programs together on threads: results come back in
  # order, and a program that fails to trace or compile comes back as its exception
  import jax.numpy as jnp
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import gpu_run
  run = gpu_run.Run(str(tmp_path), 60, True, threads=3)
  x = jnp.arange(4.0)
  progs = [gpu_run._lower(lambda x, k=k: x * k, x) for k in range(5)]
  progs.insert(2, gpu_run._lower(lambda x: x.reshape(3), x))  # fails to trace
  out = gpu_run.compile_all(run, progs)
  assert isinstance(out[2], TypeError)
  assert [float(c(x)[1]) for c in out[:2] + out[3:]] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_full_run_sweep_candidates_are_valid_and_distinct(tmp_path):
  # (the dry run sweeps tiny shapes: the H200 run's candidates are at least built and checked here)
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import gpu_run
  run = gpu_run.Run(str(tmp_path), 60, False)
  shapes = gpu_run._sweep_shapes(run)
  assert [(n, v) for n, v, _ in shapes] == [(8192, 128256), (32768, 32000)]
  for _, _, cands in shapes:
    assert len(set(cands)) == len(cands) and not any(k.interpret for k in cands)
  assert any(k.block_c >= 32000 for k in shapes[1][2] if k.name == "pallas_triton")  # one-load
  mosaic = [k for k in shapes[0][2] if k.name == "pallas_mosaic_gpu"]
  assert len(mosaic) == 11 and {k.block_c for k in mosaic} == {64, 128, 256}  # (default: a grid point)
  assert {k.programs for k in mosaic} == {None, 132}
  assert gpu_run.features(jxent.PallasMosaicGpuKernel(programs=132), 128256) == {
      "mosaic_gpu", "mosaic_gpu_programs"}
  assert gpu_run.features(mosaic[0], 128256) == {"mosaic_gpu"}
  assert gpu_run.features(jxent.PallasMosaicGpuKernel(block_c=128), 128256) == {
      "mosaic_gpu", "mosaic_gpu_block_c_128"}


def _tiny_wheel(folder: pathlib.Path) -> str:
  import zipfile
  folder.mkdir()
  name = "tinypeer-1.0-py3-none-any.whl"
  files = {"tinypeer/__init__.py": "VALUE = 7\n",
           "tinypeer-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinypeer\nVersion: 1.0\n",
           "tinypeer-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                           "Tag: py3-none-any\n"}
  record = "".join(f"{p},,\n" for p in files) + "tinypeer-1.0.dist-info/RECORD,,\n"
  with zipfile.ZipFile(folder / name, "w") as z:
    for p, text in dict(files, **{"tinypeer-1.0.dist-info/RECORD": record}).items():
      z.writestr(p, text)
  return name


def test_carried_peer_wheels_are_installed_offline(tmp_path):
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import gpu_run
  assert gpu_run.peer_site(str(tmp_path / "none")) == (None, "no wheels carried in .whl/")
  name = _tiny_wheel(tmp_path / "whl")
  site, names = gpu_run.peer_site(str(tmp_path / "whl"))
  assert names == [name]
  res = subprocess.run([sys.executable, "-c", "import tinypeer; print(tinypeer.VALUE)"],
                       env=dict(os.environ, PYTHONPATH=site), capture_output=True, text=True)
  assert res.stdout.strip() == "7", res.stderr
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
  site, err = gpu_run.peer_site(str(tmp_path / "bad"))
  assert site is None and err.startswith("pip install failed")


def _dry(tmp_path, *args, inject="", timeout=900):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JXENT_CACHE_DIR=str(tmp_path / "cache"),
             GPU_RUN_INJECT=inject)
  res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_run.py"), "--dry-run",
                        "--out", str(tmp_path), *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
  assert res.returncode == 0, res.stderr[-3000:]
  return [json.loads(l) for l in (tmp_path / "gpu_run.jsonl").read_text().splitlines()]


def test_a_bad_variant_does_not_cost_the_run(tmp_path):
  """A variant that fails to compile, hangs the compiler, or gives wrong values is recorded and
  left out of the sweep, the autotuner and the config; the default path and xla alone gate the
  timing, and the run ends by itself."""
  lines = _dry(tmp_path, "--budget", "400",
               inject="fail:split_rows,hang:reverse_grad,wrong:pallas_triton_persistent_groups,"
                      "fail:mosaic_gpu")
  status = {l["variant"]: l["status"] for l in lines if l["section"] == "compile" and "variant" in l}
  assert status["split_rows"] == "error" and status["reverse_grad"] == "timeout"
  assert status["row_groups"] == "compiled" and status["mosaic_gpu"] == "error"
  # (a Mosaic GPU kernel that fails to compile is in neither the check nor the sweep)
  assert not [l for l in lines if l.get("impl") == "pallas_mosaic_gpu"]
  wrong = [l for l in lines if l["section"] == "check" and l.get("status") == "wrong"]
  assert wrong and all({"programs", "row_groups"} <= set(l["excluded"]) for l in wrong)
  assert lines[-1] == {"section": "end", "gate": "pass"}
  swept = [l for l in lines if l["section"] == "tune" and "grad_rel" in l]
  assert swept and not [l for l in swept if l.get("split_rows", 1) > 1 or l.get("reverse_grad")
                        or (l.get("programs") and l.get("row_groups", 1) > 1)]
  record = [l for l in lines if l["section"] == "record" and "median_ms" in l]
  assert record  # (timed although a variant failed)
  config = json.loads((tmp_path / "gpu_run_config.json").read_text())
  for entry in config["entries"].values():
    for c in entry["candidates"]:
      p = c.get("params", {})
      assert p.get("split_rows", 1) == 1 and not p.get("reverse_grad"), c


def test_the_run_ends_inside_its_budget(tmp_path):
  import time
  t0 = time.monotonic()
  lines = _dry(tmp_path, "--budget", "25", timeout=120)
  assert time.monotonic() - t0 < 25 + 15  # (the interpreter's own start and exit beside it)
  assert lines[-1]["section"] == "end"
  assert [l for l in lines if "skipped" in l]  # (what did not fit was skipped, and said so)
