"""Tuned choices as data: keys, lookup order (user cache, shipped file, heuristic), the cache's
atomic merged writes and negative entries, the autotuner, and implementation=None following it."""

import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent
from jxent._src import autotune, configs, dispatch
from jxent._src.kernels import pallas_triton
from helpers import assert_close

H100 = "nvidia_h100_80gb_hbm3"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("JXENT_CACHE_DIR", str(tmp_path / "cache"))
  return tmp_path / "cache"


def test_keys_and_bad_input():
  k = configs.make_key("xent", (8192, 128256), "bfloat16", reduction="mean", z_loss=1e-4)
  assert k == "xent|int|bfloat16|scalar|z_loss|8192x131072"
  assert configs.make_key("linear", (8192, 2304, 256000), jnp.bfloat16, reduction="none") == \
      "linear|int|bfloat16|rows||8192x4096x262144"
  for bad in (dict(op="conv", shape=(2, 3)), dict(op="xent", shape=(2, 3, 4)),
              dict(op="xent", shape=(0, 3)), dict(op="linear", shape=(2, 3, 4), labels="dense"),
              dict(op="xent", shape=(2, 3), dtype="float77")):
    kw = dict(dict(dtype="float32"), **bad)
    with pytest.raises(ValueError):
      configs.make_key(kw.pop("op"), kw.pop("shape"), kw.pop("dtype"), **kw)
  with pytest.raises(ValueError, match="op"):
    jxent.chosen_implementation("conv", (2, 3), "float32")
  with pytest.raises(ValueError, match="memory_budget"):
    jxent.autotune("linear", (8, 4, 16), "float32", memory_budget=0)
  with pytest.raises(ValueError, match="memory_budget"):
    jxent.linear_softmax_cross_entropy(jnp.ones((2, 4)), jnp.ones((4, 8)), jnp.array([0, 1]),
                                       memory_budget=-1)


def test_shipped_h100_file_is_used_on_that_device(monkeypatch):
  monkeypatch.setattr(configs, "device_kind", lambda device=None: H100)
  monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
  monkeypatch.setattr(pallas_triton, "unavailable", lambda *a, **k: None)  # (buildable on that GPU)
  # integer labels: the Triton kernel measured faster; dense labels: XLA measured faster
  k, src = jxent.chosen_implementation("xent", (8192, 128256), "bfloat16")
  assert (k.name, src) == ("pallas_triton", f"shipped:{H100}.json")
  k, src = jxent.chosen_implementation("xent", (8192, 128256), "bfloat16", labels="dense")
  assert (k.name, src) == ("xla", f"shipped:{H100}.json")
  # linear: the fastest that fits the budget (unfused 12.6 GB, fused_grad 2.6 GB, lean 152 MB)
  shape = (8192, 2304, 256000)
  assert jxent.chosen_implementation("linear", shape, "bfloat16", memory_budget=20e9)[0] == "unfused"
  assert isinstance(jxent.chosen_implementation("linear", shape, "bfloat16", memory_budget=4e9)[0],
                    jxent.LinearFusedGrad)
  assert isinstance(jxent.chosen_implementation("linear", shape, "bfloat16", memory_budget=1e9)[0],
                    jxent.LinearChunked)
  k, src = jxent.chosen_implementation("linear", shape, "bfloat16", memory_budget=1e6)
  assert isinstance(k, jxent.LinearChunked) and src.endswith("(none viable)")
  # a miss: the heuristic, never an error
  assert jxent.chosen_implementation("xent", (3, 7), "float16")[1] == "heuristic"


def test_cache_beats_shipped_and_round_trips(cache, monkeypatch):
  monkeypatch.setattr(configs, "device_kind", lambda device=None: H100)
  monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
  monkeypatch.setattr(pallas_triton, "unavailable", lambda *a, **k: None)  # (buildable on that GPU)
  key = configs.make_key("xent", (8192, 128256), "bfloat16")
  configs.write_entries(configs.cache_path(), {key: {"candidates": [
      dict(implementation="chunked_xla", params={"block": 8192}, ms=1.0, temp_bytes=0)]}})
  k, src = jxent.chosen_implementation("xent", (8192, 128256), "bfloat16")
  assert k == jxent.ChunkedXlaKernel(block=8192) and src == "user cache"
  data = json.loads((cache / f"{H100}.json").read_text())
  assert key in data["entries"]


def test_autotune_then_none_follows_the_winner(monkeypatch):
  shape = (32, 96)
  wrong = _WrongKernel()
  res = jxent.autotune("xent", shape, "float32", reps=3, candidates=[
      jxent.ChunkedXlaKernel(block=32), wrong])
  assert res["winner"]["implementation"] == "chunked_xla"
  assert res["winner"]["params"] == {"block": 32}
  assert [r["implementation"] for r in res["rejected"]] == ["xla"]  # (the wrong one's name)
  assert "wrong" in res["rejected"][0]["reason"]
  assert jxent.chosen_implementation("xent", shape, "float32") == (
      jxent.ChunkedXlaKernel(block=32), "user cache")
  calls = []
  orig = jxent.ChunkedXlaKernel.forward
  monkeypatch.setattr(jxent.ChunkedXlaKernel, "forward",
                      lambda self, *a, **k: calls.append(self.block) or orig(self, *a, **k))
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  y = jnp.arange(32) % 96
  f = lambda impl: jax.jit(jax.value_and_grad(lambda x: jxent.softmax_cross_entropy_with_integer_labels(
      x, y, reduction="mean", implementation=impl)))(x)
  got, want = f(None), f("xla")
  assert calls == [32]
  assert_close(got[0], want[0])
  assert_close(got[1], want[1])


class _WrongKernel(jxent.XlaKernel):
  """Gives twice the loss: the autotuner must discard it."""

  def forward(self, logits, labels, *, sparse, opts, need_lse=True):
    loss, lse = super().forward(logits, labels, sparse=sparse, opts=opts, need_lse=need_lse)
    return 2 * loss, lse


def test_negative_entry_is_not_swept_again(monkeypatch):
  res = jxent.autotune("xent", (16, 64), "float32", reps=3, candidates=[_WrongKernel()])
  assert res["winner"] is None and res["candidates"] == []
  assert jxent.chosen_implementation("xent", (16, 64), "float32") == (
      jxent.XlaKernel(), "user cache (none viable)")
  monkeypatch.setattr(autotune, "_candidates", lambda *a: pytest.fail("swept again"))
  again = jxent.autotune("xent", (16, 64), "float32", reps=3)
  assert again["source"] == "user cache" and again["winner"] is None


def test_autotune_linear_and_memory_budget():
  shape = (64, 32, 700)
  res = jxent.autotune("linear", shape, "float32", reps=3)
  names = {c["implementation"] for c in res["candidates"]}
  assert {"linear_chunked", "linear_fused_grad", "unfused"} <= names
  temps = {c["implementation"]: c["temp_bytes"] for c in res["candidates"]}
  lean = min(c["temp_bytes"] for c in res["candidates"])
  k, src = jxent.chosen_implementation("linear", shape, "float32", memory_budget=lean)
  chosen = next(c for c in res["candidates"] if c["temp_bytes"] == lean)
  assert src == "user cache" and (k if isinstance(k, str) else k.name) == chosen["implementation"]
  assert temps["unfused"] > lean
  # implementation=None follows it, values unchanged
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=shape[:2]), jnp.float32)
  w = jnp.asarray(rng.normal(size=shape[1:]) * 0.2, jnp.float32)
  y = jnp.asarray(rng.integers(0, shape[2], size=shape[0]))
  for budget in (None, lean):
    assert_close(jxent.linear_softmax_cross_entropy(x, w, y, memory_budget=budget),
                 jxent.linear_softmax_cross_entropy(x, w, y, implementation="unfused"))


def test_no_tuning_inside_jit():
  @jax.jit
  def f(x):
    jxent.autotune("xent", (8, 16), "float32")
    return x

  with pytest.raises(RuntimeError, match="inside a jit"):
    f(jnp.ones(()))


def test_unwritable_cache_warns_and_the_loss_still_runs(tmp_path, monkeypatch):
  blocker = tmp_path / "file"
  blocker.write_text("")
  monkeypatch.setenv("JXENT_CACHE_DIR", str(blocker / "cache"))
  with pytest.warns(UserWarning, match="could not write the cache"):
    res = jxent.autotune("xent", (8, 16), "float32", reps=3)
  assert res["winner"]["implementation"] == "xla"
  assert jxent.chosen_implementation("xent", (8, 16), "float32")[1] == "heuristic"
  # an unreadable cache file: a warning, and the heuristic
  monkeypatch.setenv("JXENT_CACHE_DIR", str(tmp_path / "bad"))
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / f"{configs.device_kind()}.json").write_text("{not json")
  with warnings.catch_warnings(record=True):
    warnings.simplefilter("always")
    out = jxent.softmax_cross_entropy_with_integer_labels(jnp.ones((2, 3)), jnp.array([0, 1]))
  assert out.shape == (2,)


def test_two_processes_merge_their_entries(cache):
  code = ("import sys; from jxent._src import configs; "
          "[configs.write_entries(configs.cache_path('k'), {f'{sys.argv[1]}{i}': {'candidates': []}})"
          " for i in range(20)]")
  procs = [subprocess.Popen([sys.executable, "-c", code, tag], env=dict(os.environ))
           for tag in ("a", "b")]
  assert all(p.wait(timeout=120) == 0 for p in procs)
  entries = json.loads((cache / "k.json").read_text())["entries"]
  assert {f"{t}{i}" for t in "ab" for i in range(20)} == set(entries)
  assert sorted(p.name for p in cache.iterdir()) == ["k.json"]  # (no lock or temporary file left)


def test_heuristic_from_the_device_properties(monkeypatch):
  # an unknown GPU (no tuned entry): one program per row, unless the rows cannot fill its SMs,
  # then the split-row forward (two programs per SM, at most 8 per row)
  monkeypatch.setattr(configs, "device_kind", lambda device=None: "some_new_gpu")
  monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
  monkeypatch.setattr(pallas_triton, "unavailable", lambda *a, **k: None)  # (buildable on that GPU)
  monkeypatch.setattr(dispatch, "sm_count", lambda device=None: 132)
  k, src = jxent.chosen_implementation("xent", (8192, 128256), "bfloat16")
  assert (k, src) == (jxent.PallasTritonKernel(), "heuristic")
  assert jxent.chosen_implementation("xent", (64, 128256), "bfloat16")[0].split_rows == 8
  assert jxent.chosen_implementation("xent", (100, 128256), "bfloat16")[0].split_rows == 4
  assert jxent.chosen_implementation("xent", (100, 512), "bfloat16")[0] == jxent.XlaKernel()
  monkeypatch.setattr(dispatch, "sm_count", lambda device=None: None)
  assert jxent.chosen_implementation("xent", (64, 128256), "bfloat16")[0].split_rows == 1


def test_gpu_candidates_try_the_whole_row_as_one_block(monkeypatch):
  # value_and_grad of a scalar loss with rows up to 32768 classes: the fused kernel's one-load
  # path (block_c >= classes) is a candidate; per-row losses take the split-row forwards instead
  monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
  monkeypatch.setattr(pallas_triton, "unavailable", lambda *a, **k: None)  # (buildable on that GPU)
  one = lambda shape, red: {(k.block_c, k.num_warps) for k in autotune._candidates("xent", shape, red)
                            if getattr(k, "name", "") == "pallas_triton" and k.block_c >= shape[1]}
  assert one((32768, 32000), "mean") == {(32768, 8), (32768, 16), (32768, 32)}
  assert one((64, 5000), "sum") == {(8192, 8), (8192, 16), (8192, 32)}
  assert one((32768, 32000), "none") == set()
  assert one((8192, 128256), "mean") == set()
  assert [autotune.one_block(c) for c in (1, 16, 17, 32000, 32768)] == [16, 16, 32, 32768, 32768]


def test_gpu_candidates_include_mosaic_gpu_where_it_builds(monkeypatch):
  """The autotuner tries the Mosaic GPU kernel beside Triton (so a GPU run can make it the
  default where it measures faster), and leaves it out where this jax cannot build it."""
  from jxent._src.kernels import pallas_mosaic_gpu
  monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
  monkeypatch.setattr(pallas_triton, "unavailable", lambda *a, **k: None)
  mosaic = lambda: [k for k in autotune._candidates("xent", (8192, 128256), "mean")
                    if getattr(k, "name", "") == "pallas_mosaic_gpu"]
  monkeypatch.setattr(pallas_mosaic_gpu, "unavailable", lambda *a, **k: None)
  assert {(k.block_c, k.max_concurrent_steps) for k in mosaic()} == {
      (128, 2), (128, 4), (256, 2), (256, 4)}
  monkeypatch.setattr(pallas_mosaic_gpu, "unavailable", lambda *a, **k: "no Mosaic GPU here")
  assert mosaic() == []
