"""jxent-bench: the CLI runs, writes the documented fields, and rejects bad input with exit 2."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

import jxent

from jxent.bench import cases as C
from jxent.bench import cli

FIELDS = {"implementation", "mode", "shape", "dtype", "median_ms", "compile_ms", "temp_bytes",
          "gbps", "x_floor", "device", "jax_version", "jxent_version", "reduction", "q1_ms",
          "q3_ms", "min_ms", "max_ms", "spread", "noisy", "x_optax", "default", "reps"}


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
                 "--modes", "value_and_grad", "--no-progress", "--json", str(out)])
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
    ["--labels", "dense"],  # (without --shape: the presets have their own label kinds)
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
  assert text.startswith(f"jxent-bench {jxent.__version__} on cpu") and "x floor is left out on CPU" in text
  # an unwritable path is refused at once (nothing measured), as is --plot without matplotlib
  calls = []
  monkeypatch.setattr(cli, "run_group", lambda *a, **k: calls.append(a))
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
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "tuned.json"]  # (no .lock)
  assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".json")]
  # the next run names the tuned choice under the table
  cli.main(["--shape", "32,2500", "--implementations", "xla", "--modes", "forward", "--reps", "10",
            "--no-progress"])
  assert "[user cache]" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Numbers a user can trust, and output that explains itself.
# ------------------------------------------------------------------------------------------------
def test_samples_are_taken_round_robin_and_paired():
  calls = []
  fns = {name: (lambda name: lambda x: calls.append(name) or x)(name) for name in "abc"}
  samples = cli.time_round_robin(fns, [(jax.numpy.ones(()),)], reps=4, inner=1)
  assert {k: len(v) for k, v in samples.items()} == {"a": 4, "b": 4, "c": 4}
  timed = calls[6:]  # (after a warm-up call per input set and one timed call each)
  rounds = [timed[i:i + 3] for i in range(0, 12, 3)]
  assert rounds == [list("abc"), list("bca"), list("cab"), list("abc")]  # each round has them all
  # the ratio is taken per round: a slow round slows both rows and cancels
  assert cli.paired_ratio([1.0, 10.0, 1.0], [2.0, 20.0, 2.0]) == 0.5
  stats = cli.summarize([1.0, 1.0, 1.0, 2.0, 5.0])
  assert stats["median_ms"] == 1.0 and stats["max_ms"] == 5.0 and stats["noisy"]
  assert not cli.summarize([1.0, 1.01, 0.99, 1.0])["noisy"]


def test_rows_explain_themselves(tmp_path, capsys):
  out = tmp_path / "rows.json"
  rc = cli.main(["--shape", "64,1000", "--shape", "32,16,300", "--implementations",
                 "xla,chunked_xla,optax,linear_chunked,unfused", "--modes", "value_and_grad",
                 "--reps", "10", "--no-progress", "--json", str(out), "--csv", str(tmp_path / "r.csv")])
  assert rc == 0
  rows = json.loads(out.read_text())
  for r in rows:
    assert FIELDS <= set(r), FIELDS - set(r)
    assert r["jxent_version"] == jxent.__version__ and r["reduction"] == "mean"
    assert r["min_ms"] <= r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] <= r["max_ms"]
  by = {(r["kind"], r["implementation"]): r for r in rows}
  assert by[("logits", "optax")]["x_optax"] == 1.0 and by[("linear", "unfused")]["x_optax"] == 1.0
  assert by[("logits", "xla")]["default"] and by[("linear", "linear_chunked")]["default"]
  assert not by[("logits", "chunked_xla")]["default"]
  assert ("linear", "optax") not in by  # (the same code as unfused: one row)
  text = capsys.readouterr().out
  assert text.count(f"jxent-bench {jxent.__version__} on") == 1  # the header, once
  assert "reduction 'mean'" in text.splitlines()[0]
  assert " xla *" in text and "legend:" in text and "value_and_grad: jax.value_and_grad" in text
  assert text.strip().splitlines()[-1].startswith("summary: 5 rows measured")
  header = (tmp_path / "r.csv").read_text().splitlines()[0].split(",")
  assert {"spread", "x_optax", "jxent_version", "reduction"} <= set(header)


def test_forward_and_vjp_is_value_and_grad():
  args = cli.build_parser().parse_args(["--shape", "8,16", "--modes", "forward_and_vjp,value_and_grad"])
  assert cli.resolve(args)[1] == ("value_and_grad",)


def test_ctrl_c_keeps_the_finished_rows(tmp_path, monkeypatch, capsys):
  real, seen = cli.run_group, []

  def interrupted_second(*a, **k):
    if seen:
      raise KeyboardInterrupt
    seen.append(1)
    return real(*a, **k)

  monkeypatch.setattr(cli, "run_group", interrupted_second)
  out, csv_path = tmp_path / "rows.json", tmp_path / "rows.csv"
  rc = cli.main(["--shape", "16,300", "--implementations", "xla,optax", "--reps", "10",
                 "--no-progress", "--json", str(out), "--csv", str(csv_path)])
  assert rc == 130
  rows = json.loads(out.read_text())
  assert {r["mode"] for r in rows} == {"forward"} and len(rows) == 2
  assert len(csv_path.read_text().splitlines()) == 3
  captured = capsys.readouterr()
  assert "interrupted" in captured.err and "interrupted" in captured.out.splitlines()[-1]


def test_a_closed_pipe_ends_without_a_traceback():
  code = ("import sys; from jxent.bench import cli; "
          "sys.exit(cli.main(['--shape', '16,300', '--implementations', 'xla', '--modes', "
          "'forward', '--reps', '10', '--no-progress']))")
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
  proc.stdout.readline()  # the header, as `| head -1` reads it
  proc.stdout.close()     # then the reader goes away
  err = proc.stderr.read().decode()
  assert proc.wait(timeout=300) == 1
  assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_missing_optax_is_said_in_the_header(monkeypatch, capsys):
  real = C.why_not_here
  monkeypatch.setattr(C, "why_not_here", lambda name: (
      'optax is not installed (pip install "jxent[bench]")' if name == "optax" else real(name)))
  assert cli.main(["--shape", "16,300", "--modes", "forward", "--reps", "10", "--no-progress"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[1].startswith("note: optax is not installed") and '"jxent[bench]"' in lines[1]


def test_the_keras_hint_names_an_extra_with_keras(monkeypatch):
  import tomllib
  monkeypatch.setattr(C.importlib.util, "find_spec", lambda name: None)
  hint = C.why_not_here("keras")
  extras = tomllib.loads((pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml")
                         .read_text())["project"]["optional-dependencies"]
  named = [e for e in extras if f'"jxent[{e}]"' in hint]
  assert named and all(any(d.startswith("keras") for d in extras[e]) for e in named), hint


def test_the_plot_draws_no_floor_where_it_is_not_a_bound(tmp_path, monkeypatch):
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib.axes import Axes
  lines = []
  real = Axes.axvline
  monkeypatch.setattr(Axes, "axvline", lambda self, *a, **k: lines.append(a) or real(self, *a, **k))
  rows = [dict(case="8x16 float32 int", mode="forward", implementation=n, median_ms=ms,
               floor_ms=0.5, device="cpu:cpu", jax_version="x", jxent_version="y", default=d)
          for n, ms, d in (("xla", 1.0, True), ("optax", 2.0, False))]
  cli.write_plot(rows, str(tmp_path / "cpu.png"), floor_shown=False)
  assert not lines and (tmp_path / "cpu.png").stat().st_size > 1000
  cli.write_plot(rows, str(tmp_path / "gpu.png"), floor_shown=True)
  assert len(lines) == 1


def test_selected_ids_rows(tmp_path):
  out = tmp_path / "sel.json"
  rc = cli.main(["--shape", "32,500", "--labels", "logprobs,selected", "--modes", "value_and_grad",
                 "--reps", "10", "--no-progress", "--json", str(out)])
  assert rc == 0
  rows = json.loads(out.read_text())
  assert {(r["labels"], r["implementation"]) for r in rows} == {
      (lab, i) for lab in ("logprobs", "selected") for i in ("xla", "chunked_xla", "naive")}
  # token_log_probs(implementation=None) takes "xla" on CPU: its rows are marked
  assert {(r["labels"], r["implementation"]) for r in rows if r["default"]} == {
      ("logprobs", "xla"), ("selected", "xla")}


def test_noisy_rows_get_more_rounds(monkeypatch):
  """While a row's spread is above 10%, rounds go on (up to max_reps); a steady row stops at
  reps. The clock is scripted, so the test does not depend on this machine's noise."""
  clock = [0.0]
  monkeypatch.setattr(cli.time, "perf_counter", lambda: clock[0])

  def fn(durations):
    it = iter(durations * 1000)

    def call(x):
      clock[0] += next(it)
      return x
    return call

  x = [(jax.numpy.ones(()),)]
  steady = cli.time_round_robin({"a": fn([0.010]), "b": fn([0.020])}, x, reps=10, inner=1,
                                max_reps=30)
  assert [len(v) for v in steady.values()] == [10, 10]
  noisy = cli.time_round_robin({"a": fn([0.010]), "b": fn([0.010, 0.030])}, x, reps=10,
                               inner=1, max_reps=30)
  assert [len(v) for v in noisy.values()] == [30, 30]


def test_accuracy_table_against_float64_truth(tmp_path, capsys):
  """``--accuracy``: the ulps table (jxent.bench.accuracy) for integer and dense labels, written
  to --json; a common logit of 2^24 is within 1 ulp (an absolute lse gave 3.9e6)."""
  out = tmp_path / "acc.json"
  rc = cli.main(["--accuracy", "--implementations", "xla,naive", "--dtype", "bfloat16",
                 "--json", str(out), "--no-progress"])
  assert rc == 0
  rows = json.loads(out.read_text())
  assert {r["implementation"] for r in rows} == {"xla", "naive"}
  assert {r["labels"] for r in rows} == {"int", "dense"}
  common = [r for r in rows if r["implementation"] == "xla" and r["regime"] == "every logit 2^24"]
  assert common and all(r["loss_ulps"] <= 1 and r["grad_ulps"] <= 1 for r in common), common
  assert "every logit 2^24" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--implementations", "unfused"],
                                  ["--implementations", "nonesuch"],
                                  ["--dtype", "int8"],
                                  ["--json", "/proc/nonesuch/acc.json"]])
def test_accuracy_table_refuses_bad_input(argv, capsys):
  assert cli.main(["--accuracy", "--no-progress"] + argv) == 2
  assert "jxent-bench: error:" in capsys.readouterr().err
