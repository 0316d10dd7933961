"""The shape of the code (docs/architecture.md): the kernels side by side in ``_src/kernels/`` over
the shared per-row math, no kernel importing another kernel or the registry, the tuned data below
dispatch and the autotuner on top, no import cycle among jxent's modules (function-level imports
counted), and no ``_src`` module importing the ``jxent`` package."""

import ast
import pathlib

import pytest

import jxent

PKG = pathlib.Path(jxent.__file__).resolve().parent  # (the installed package's source)
SRC = PKG / "_src"
KERNEL_DIR = SRC / "kernels"
KERNELS = {p.stem for p in KERNEL_DIR.glob("*.py")} - {"__init__", "rowmath"}


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _is_module(name: str) -> bool:
  return name in MODULES


def _edges(name: str):
  """``(target module, line, function-level?)`` for every import of a jxent module in ``name``:
  ``from a import b`` counts as importing ``a.b`` where that is a module, else ``a``."""
  tree = ast.parse(MODULES[name].read_text())
  top = set(map(id, tree.body))
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      targets = [f"{node.module}.{a.name}" if _is_module(f"{node.module}.{a.name}") else node.module
                 for a in node.names]
    else:
      continue
    for t in targets:
      if t == "jxent" or t.startswith("jxent."):
        out.append((t, node.lineno, id(node) not in top))
  return out


GRAPH = {m: {t for t, _, _ in _edges(m) if t in MODULES} for m in MODULES}


def test_the_kernels_stand_side_by_side():
  assert KERNELS == {"xla", "chunked", "pallas_triton", "pallas_mosaic_tpu", "pallas_mosaic_gpu"}, KERNELS
  assert not list(SRC.glob("xla.py")) and not list(SRC.glob("rowmath.py"))


def test_rowmath_is_below_every_kernel():
  assert GRAPH["jxent._src.kernels.rowmath"] <= {"jxent._src.options"}
  for k in KERNELS:
    assert "jxent._src.kernels.rowmath" in GRAPH[f"jxent._src.kernels.{k}"], k


def test_no_kernel_imports_another_kernel_or_anything_above():
  allowed = {"jxent._src.options", "jxent._src.kernels.rowmath"}
  for k in KERNELS:
    assert GRAPH[f"jxent._src.kernels.{k}"] <= allowed, (k, GRAPH[f"jxent._src.kernels.{k}"])


def test_the_tuned_data_is_below_dispatch_and_the_tuner_on_top():
  assert GRAPH["jxent._src.configs"] == set()  # (data and lookup: nothing of jxent)
  assert "jxent._src.configs" in GRAPH["jxent._src.dispatch"]
  assert "jxent._src.configs" in GRAPH["jxent._src.linear"]
  below_tuner = {m for m in MODULES if m.startswith("jxent._src.") and m != "jxent._src.autotune"}
  assert not any("jxent._src.autotune" in GRAPH[m] for m in below_tuner)


def test_no_src_module_imports_the_jxent_package():
  bad = [(m, line) for m in MODULES if m.startswith("jxent._src")
         for t, line, _ in _edges(m) if t == "jxent" or not t.startswith("jxent._src")]
  assert not bad, bad


def test_function_level_imports_only_for_heavy_backends():
  """Lazy imports of jxent modules inside ``_src`` are for the Pallas backends only (each with a
  comment saying why); everything else is imported at module level."""
  lazy = {(m, t) for m in MODULES if m.startswith("jxent._src") for t, _, inner in _edges(m)
          if inner}
  assert all(t.startswith("jxent._src.kernels.pallas_") for _, t in lazy), lazy
  for m, t in lazy:
    lines = MODULES[m].read_text().splitlines()
    where = [i for i, l in enumerate(lines) if t.rsplit(".", 1)[-1] in l and "import" in l]
    assert any("#" in lines[i] or "#" in lines[i - 1] for i in where), (m, t)


def _cycle(graph):
  """One import cycle as a list of modules, or None (iterative depth-first search)."""
  state = {}
  for root in sorted(graph):
    if root in state:
      continue
    stack = [(root, iter(sorted(graph[root])))]
    path = [root]
    state[root] = "open"
    while stack:
      node, children = stack[-1]
      child = next(children, None)
      if child is None:
        stack.pop()
        path.pop()
        state[node] = "done"
      elif state.get(child) == "open":
        return path[path.index(child):] + [child]
      elif child not in state:
        state[child] = "open"
        path.append(child)
        stack.append((child, iter(sorted(graph[child]))))
  return None


def test_no_import_cycle():
  assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH))


@pytest.mark.parametrize("graph, cyclic", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ({"a": {"a"}}, True),
])
def test_the_cycle_check_can_fail(graph, cyclic):
  assert (_cycle(graph) is not None) == cyclic


def test_a_function_level_import_counts():
  # dispatch imports the Triton module inside the GPU heuristic: the graph must see it
  inner = [t for t, _, lazy in _edges("jxent._src.dispatch") if lazy]
  assert inner == ["jxent._src.kernels.pallas_triton"], inner


def test_xla_holds_only_the_xla_kernel():
  tree = ast.parse((KERNEL_DIR / "xla.py").read_text())
  public = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
  assert public == {"cpu_fusible", "segments", "label_dot", "label_tail", "exact_tail", "forward",
                    "backward", "autodiff_f64"}, public


def test_import_jxent_loads_neither_keras_nor_pallas():
  import subprocess
  import sys
  code = ("import sys, jxent; jxent.softmax_cross_entropy_with_integer_labels; "
          "bad = [m for m in ('keras', 'jax.experimental.pallas', 'jxent._src.kernels.pallas_triton') "
          "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stdout + res.stderr
