"""The shape of the code: shared per-row math below every kernel, no kernel importing another
kernel, and no import circle between the registry and the kernels."""

import ast
import pathlib

import jxent

SRC = pathlib.Path(jxent.__file__).resolve().parent / "_src"  # (the installed package's source)
KERNELS = {"xla", "chunked", "pallas_triton", "pallas_mosaic_tpu"}


def _imports(name: str) -> set:
  tree = ast.parse((SRC / f"{name}.py").read_text())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module == "jxent._src":
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jxent._src."):
      out.add(node.module.split(".")[2])
    elif isinstance(node, ast.Import):
      out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("jxent._src.")}
  return out


def test_rowmath_is_below_every_kernel():
  assert _imports("rowmath") <= {"options"}
  for k in KERNELS:
    assert "rowmath" in _imports(k), k


def test_no_kernel_imports_another_kernel_or_the_registry():
  for k in KERNELS:
    assert not (_imports(k) & (KERNELS - {k})), (k, _imports(k))
    assert "dispatch" not in _imports(k), k


def test_xla_holds_only_the_xla_kernel():
  tree = ast.parse((SRC / "xla.py").read_text())
  public = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
  assert public == {"cpu_fusible", "segments", "label_dot", "forward", "backward",
                    "autodiff_f64"}, public


def test_import_jxent_loads_neither_keras_nor_pallas():
  import subprocess
  import sys
  code = ("import sys, jxent; jxent.softmax_cross_entropy_with_integer_labels; "
          "bad = [m for m in ('keras', 'jax.experimental.pallas', 'jxent._src.pallas_triton') "
          "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stdout + res.stderr
