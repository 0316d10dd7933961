"""jxent-bench: the CLI runs, writes the documented fields, and rejects bad input with exit 2."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from jxent.bench import cases as C
from jxent.bench import cli

FIELDS = {"implementation", "mode", "shape", "dtype", "median_ms", "compile_ms", "temp_bytes",
          "gbps", "x_floor", "device", "jax_version"}


def test_small_run_writes_json_csv_plot(tmp_path, capsys):
  out = tmp_path / "out.json"
  rc = cli.main(["--shape", "64,1000", "--labels", "int,dense", "--implementations",
                 "xla,chunked_xla,optax,naive", "--reps", "10", "--json", str(out),
                 "--csv", str(tmp_path / "out.csv"), "--plot", str(tmp_path / "out.png"),
                 "--no-progress"])
  assert rc == 0
  rows = json.loads(out.read_text())
  assert {r["implementation"] for r in rows} == {"xla", "chunked_xla", "optax", "naive"}
  for r in rows:
    assert FIELDS <= set(r), set(r) ^ FIELDS
    assert r["median_ms"] > 0 and r["x_floor"] > 0
  assert (tmp_path / "out.csv").read_text().startswith("case") or (tmp_path / "out.csv").stat().st_size
  assert (tmp_path / "out.png").stat().st_size > 1000
  assert "x floor" in capsys.readouterr().out


def test_linear_case():
  rows_path = "/dev/null"
  rc = cli.main(["--shape", "64,32,500", "--implementations", "linear_chunked,linear_fused_grad,unfused",
                 "--modes", "forward_and_vjp", "--reps", "10", "--no-progress", "--json", rows_path])
  assert rc == 0


def test_dtype_list():
  """``--dtype`` takes a comma list, for custom shapes and presets alike."""
  args = cli.build_parser().parse_args(["--shape", "8,16", "--shape", "8,4,16", "--labels", "int,dense",
                                  "--dtype", "float32,bfloat16"])
  cases = cli.resolve(args)[0]
  assert sorted((c.kind, c.dtype, c.labels) for c in cases) == sorted(
      [("logits", d, lab) for d in ("float32", "bfloat16") for lab in ("int", "dense")]
      + [("linear", d, cases[-1].labels) for d in ("float32", "bfloat16")])
  quick = cli.resolve(cli.build_parser().parse_args([]))[0]
  both = cli.resolve(cli.build_parser().parse_args(["--dtype", "float16,bfloat16"]))[0]
  assert len(both) == 2 * len(quick) and {c.dtype for c in both} == {"float16", "bfloat16"}


def test_kernel_parameters_in_implementation_names(tmp_path):
  """``NAME[key=value,...]`` times a kernel object with those parameters beside the defaults."""
  out = tmp_path / "out.json"
  rc = cli.main(["--shape", "32,700", "--shape", "32,16,300", "--implementations",
                 "chunked_xla,chunked_xla[block=64],"
                 "linear_chunked[block_v=128],linear_fused_grad[block_n=8]", "--reps", "10",
                 "--modes", "forward_and_vjp", "--no-progress", "--json", str(out)])
  assert rc == 0
  names = {r["implementation"] for r in json.loads(out.read_text())}
  assert names == {"chunked_xla", "chunked_xla[block=64]", "linear_chunked[block_v=128]",
                   "linear_fused_grad[block_n=8]"}


def test_boolean_kernel_parameters():
  assert C.parse_implementation("pallas_triton[reverse_grad=True,block_c=4096]") == (
      "pallas_triton", {"reverse_grad": True, "block_c": 4096})
  with pytest.raises(ValueError, match="reverse_grad must be a bool"):
    C.parse_implementation("pallas_triton[reverse_grad=1]")


@pytest.mark.parametrize("argv", [
    ["--implementations", "nope"],
    ["--implementations", "pallas_triton[block_c=1000]"],
    ["--implementations", "pallas_triton[warps=4]"],
    ["--implementations", "optax[block=4]"],
    ["--implementations", "chunked_xla[block=x]"],
    ["--implementations", "chunked_xla[block=4"],
    ["--preset", "huge"],
    ["--shape", "12"],
    ["--shape", "a,b"],
    ["--shape", "0,10"],
    ["--modes", "backward"],
    ["--shape", "8,8", "--dtype", "float77"],
    ["--shape", "8,8", "--dtype", "float32,int32"],
    ["--dtype", "bfloat16,float32x"],
])
def test_bad_input_exit_2(argv, capsys):
  with pytest.raises(SystemExit) as e:
    raise SystemExit(cli.main(argv + ["--no-progress"]))
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err and "error" in err[-1]


def test_linear_memory_script():
  """benchmarks/linear_memory.py compiles (does not run) each linear algorithm and reports XLA's
  temporary memory; token passes of the lean algorithm need less than one pass."""
  root = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run([sys.executable, str(root / "benchmarks" / "linear_memory.py"), "--shape",
                        "512,64,4099", "--implementations",
                        "linear_chunked,linear_chunked[block_n=128],unfused"],
                       capture_output=True, text=True, check=True, cwd=root,
                       env={**os.environ, "PYTHONPATH": str(root)})
  rows = [json.loads(line) for line in out.stdout.splitlines()]
  temp = {r["implementation"]: r["temp_MB"] for r in rows}
  assert len(rows) == 3 and rows[0]["gradients_MB"] > 0
  assert temp["linear_chunked[block_n=128]"] < temp["linear_chunked"] < temp["unfused"]


def test_outputs_checked_before_measuring(tmp_path, capsys, monkeypatch):
  # a missing folder is created; the table goes to stdout with the header and notes
  out = tmp_path / "new" / "deeper" / "rows.json"
  rc = cli.main(["--shape", "16,300", "--implementations", "xla", "--modes", "forward",
                 "--reps", "10", "--no-progress", "--json", str(out)])
  assert rc == 0 and json.loads(out.read_text())
  text = capsys.readouterr().out
  assert text.startswith("jxent-bench on cpu") and "x floor is left out on CPU" in text
  # an unwritable path is refused at once (nothing measured), as is --plot without matplotlib
  calls = []
  monkeypatch.setattr(cli, "run_row", lambda *a, **k: calls.append(a))
  (tmp_path / "afile").write_text("")
  for argv in (["--json", str(tmp_path / "afile" / "sub" / "x.json")],
               ["--csv", str(tmp_path)]):
    assert cli.main(["--shape", "16,300", "--no-progress"] + argv) == 2
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  assert cli.main(["--shape", "16,300", "--no-progress", "--plot", str(tmp_path / "p.png")]) == 2
  assert 'pip install "jxent[bench]"' in capsys.readouterr().err
  assert not calls


@pytest.mark.parametrize("argv,message", [
    (["--implementations", "pallas_triton"], "cannot run here: needs a GPU"),
    (["--implementations", "pallas_mosaic_tpu"], "cannot run here: needs a TPU"),
    (["--implementations", "xla[foo=1]"], "takes no parameters"),
    (["--implementations", "linear_chunked"], "none of the implementations"),
])
def test_named_implementation_that_cannot_run(argv, message, capsys):
  assert cli.main(["--shape", "16,300", "--no-progress"] + argv) == 2
  assert message in capsys.readouterr().err


def test_default_run_names_missing_peers(capsys):
  rc = cli.main(["--shape", "16,300", "--modes", "forward", "--reps", "10", "--no-progress"])
  assert rc == 0
  assert "not run here: pallas_triton (needs a GPU" in capsys.readouterr().out


def test_float64_enables_x64(tmp_path):
  try:
    rc = cli.main(["--shape", "16,300", "--dtype", "float64", "--implementations", "xla",
                   "--modes", "forward", "--reps", "10", "--no-progress",
                   "--json", str(tmp_path / "f64.json")])
    assert rc == 0 and jax.config.jax_enable_x64
    assert json.loads((tmp_path / "f64.json").read_text())[0]["dtype"] == "float64"
  finally:
    jax.config.update("jax_enable_x64", False)


def test_tune_writes_a_shipped_format_config(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("JXENT_CACHE_DIR", str(tmp_path / "cache"))
  out = tmp_path / "tuned.json"
  rc = cli.main(["--shape", "32,2500", "--shape", "16,8,300", "--tune", "--tune-out", str(out),
                 "--reps", "10", "--no-progress"])
  assert rc == 0
  data = json.loads(out.read_text())
  assert set(data["entries"]) == {"xent|int|float32|scalar||32x4096",
                                  "xent|int|float32|rows||32x4096",
                                  "linear|int|float32|scalar||16x8x512"}
  assert all(e["candidates"] for e in data["entries"].values())
  # the next run names the tuned choice under the table
  cli.main(["--shape", "32,2500", "--implementations", "xla", "--modes", "forward", "--reps", "10",
            "--no-progress"])
  assert "[user cache]" in capsys.readouterr().out
