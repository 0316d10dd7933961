"""The README's commands and code, and the docstring examples, stay runnable."""

import doctest
import pathlib
import re

import pytest

from jxent._src import (api, autotune, dispatch, keras_losses, linear, logprobs,
                        tf_losses, tf_nn)
from jxent._src.kernels import pallas_mosaic_gpu, pallas_mosaic_tpu, pallas_triton

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_exactly_the_readme_test_command():
  cmd = next(l for l in README.splitlines() if "pytest" in l and l.startswith("pip install"))
  assert cmd in (ROOT / ".ci" / "run").read_text().splitlines()
  assert README.index("jxent-bench") < README.index("pytest")


@pytest.mark.parametrize("i", range(len(re.findall(r"```python\n(.*?)```", README, re.S))))
def test_readme_python_blocks_run(i):
  block = re.findall(r"```python\n(.*?)```", README, re.S)[i]
  exec(compile(block, f"README block {i}", "exec"), {})


@pytest.mark.parametrize(
    "module",
    [api, dispatch, tf_nn, tf_losses, keras_losses, linear, logprobs, autotune, pallas_triton,
     pallas_mosaic_tpu, pallas_mosaic_gpu])
def test_docstring_examples(module):
  failures, tried = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert tried > 0 and failures == 0


def test_the_bench_page_names_every_flag():
  from jxent.bench import cli
  page = (ROOT / "docs" / "cli.md").read_text()
  flags = {o for a in cli.build_parser()._actions for o in a.option_strings
           if o.startswith("--") and o != "--help"}
  missing = sorted(f for f in flags if f"`{f}" not in page)
  assert not missing, missing
  assert (ROOT / "benchmarks" / "results" / "2026-12-04_cpu_quick.txt").exists()
