"""The wheel and the sdist build, hold what they should, and the sdist's tests collect from it."""

import pathlib
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_and_sdist(tmp_path):
  # (one test: builds write build/ in the source tree, so two at once under xdist would race)
  pytest.importorskip("build")
  out = tmp_path / "dist"
  subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                 check=True, capture_output=True, text=True, timeout=600)
  wheel, sdist = next(out.glob("*.whl")), next(out.glob("*.tar.gz"))
  _check_wheel(wheel)
  _check_sdist(sdist, tmp_path / "unpacked")


def _check_wheel(wheel):
  names = zipfile.ZipFile(wheel).namelist()
  for need in ("jxent/__init__.py", "jxent/_src/core.py", "jxent/_src/logprobs.py",
               "jxent/bench/cli.py", "jxent/py.typed",
               "jxent/_src/configs/nvidia_h100_80gb_hbm3.json"):
    assert need in names, need
  assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
  assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names)
  meta = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("METADATA"))
  assert "License-Expression: Apache-2.0" in meta and "Classifier:" in meta
  assert "Keywords:" in meta and "Author: the jxent developers" in meta
  for label in ("Source", "Documentation", "Issues"):
    assert f"Project-URL: {label}, https://" in meta, label
  assert "Programming Language :: Python :: 3.13" in meta
  assert re.search(r"^Requires-Dist: jax(<0\.13,>=0\.10\.2|>=0\.10\.2,<0\.13)$", meta, re.M), meta[:2000]


def _check_sdist(sdist, tmp_path):
  tmp_path.mkdir()
  with tarfile.open(sdist) as tar:
    names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tar.extractall(tmp_path, filter="data")
  for need in ("LICENSE", "pyproject.toml", "README.md", "tests/conftest.py", "tests/helpers.py",
               "tests/peers/test_peer_optax.py", "examples/train_digits.py",
               "benchmarks/gpu_run.py", "benchmarks/linear_memory.py", "docs/conf.py",
               "docs/index.md", ".ci/run"):
    assert need in names, need
  assert not any(n.startswith("docs/_build") for n in names)
  root = next(tmp_path.iterdir())
  res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                        "no:cacheprovider", "tests"], cwd=root, capture_output=True, text=True,
                       timeout=600)
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
  assert "error" not in res.stdout.lower().split("\n")[-2]


def test_the_jax_version_check_matches_the_declared_range():
  """scripts/check_jax_versions.sh parses, and its oldest jax is pyproject's lower bound."""
  script = ROOT / "scripts" / "check_jax_versions.sh"
  subprocess.run(["bash", "-n", str(script)], check=True, timeout=60)
  oldest = re.search(r"^OLDEST=(\S+)", script.read_text(), re.M).group(1)
  pyproject = (ROOT / "pyproject.toml").read_text()
  assert re.search(rf'"jax>={re.escape(oldest)},<0\.13"', pyproject), oldest
