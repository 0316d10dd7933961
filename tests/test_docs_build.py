"""The documentation builds offline, with warnings as errors."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_sphinx_build_without_warnings(tmp_path):
  pytest.importorskip("sphinx")
  pytest.importorskip("myst_parser")
  res = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                        str(ROOT / "docs"), str(tmp_path / "html")],
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  api = (tmp_path / "html" / "api.html").read_text()
  for name in ("softmax_cross_entropy_with_integer_labels", "token_log_probs",
               "PallasTritonKernel", "CategoricalCrossentropy", "sparse_softmax_cross_entropy"):
    assert name in api, name
  assert "RL fine-tuning" in (tmp_path / "html" / "rl.html").read_text()
  # `ArrayLike` is shown as itself, not as the Union it stands for
  assert "<em>ArrayLike</em>" in api and "ndarray" not in api
  # the index starts with install and a quick start; the jxent-bench page has its reference run
  index = (tmp_path / "html" / "index.html").read_text()
  assert index.index("Install") < index.index("Quick start")
  assert "implementation=None" in (tmp_path / "html" / "cli.html").read_text()
