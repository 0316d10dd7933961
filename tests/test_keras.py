"""jxent.keras against tf.keras / Keras 3 recorded values (catalogues E, F) and a Keras 3 fit."""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent
from jxent.keras import CategoricalCrossentropy as CCE
from jxent.keras import SparseCategoricalCrossentropy as SCCE
from jxent.keras import categorical_crossentropy as cce
from helpers import assert_close

YT = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
YP = [[0.9, 0.05, 0.05], [0.5, 0.89, 0.6], [0.05, 0.01, 0.94]]
LG = [[8., 1, 1], [0, 9, 1], [2, 3, 5]]
DT = [[0, 1, 0], [0, 0, 1]]
DP = [[0.05, 0.95, 0], [0.1, 0.8, 0.1]]
Y27 = np.eye(3)[[[0, 1], [2, 0]]].astype(np.float32)
P27 = np.array([[[.2, .3, .5], [.1, .6, .3]], [[.3, .3, .4], [.5, .25, .25]]], np.float32)


@pytest.mark.parametrize("loss, args, expected", [
    (CCE(), (DT, DP), 1.1769392),                                                   # E1
    (CCE(), (DT, DP, [0.3, 0.7]), 0.8135988),                                       # E2
    (CCE(reduction="sum"), (DT, DP), 2.3538785),                                    # E3
    (CCE(reduction="none"), (DT, DP), [0.05129331, 2.3025851]),                     # E4
    (CCE(), (np.array(YT, np.int64), np.eye(3, dtype=np.float32)), 0.0),            # E5
    (CCE(from_logits=True), (YT, [[10., 0, 0], [0, 10, 0], [0, 0, 10]]), 9.083335e-05),
    (CCE(), (YT, YP), 0.3239681),                                                   # E6
    (CCE(reduction="none"), (YT, YP), [0.10536054, 0.8046684, 0.06187541]),
    (CCE(from_logits=True), (YT, LG), 0.05737559),                                  # E7
    (CCE(), (YT, YP, 2.3), 0.74512666),                                             # E8
    (CCE(from_logits=True), (YT, LG, 2.3), 0.13196386),                             # E9
    (CCE(), (YT, YP, [[1.2], [3.4], [5.6]]), 1.0696026),                            # E10
    (CCE(), (YT, YP, [1.2, 3.4, 5.6]), 1.0696026),
    (CCE(from_logits=True), (YT, LG, [[1.2], [3.4], [5.6]]), 0.31829464),
    (CCE(from_logits=True, reduction="none"), (YT, LG), [0.001822, 0.00045873, 0.16984604]),  # E11
    (CCE(from_logits=True, label_smoothing=0.1), ([[1, 0, 0]], [[100., -100, -100]]), 13.333334),
    (CCE(label_smoothing=0.1), (DT, DP), 1.4591359),                                # E26
    (CCE(label_smoothing=0.1, reduction="none"), (DT, DP), [0.6850014, 2.2332704]),
    (CCE(label_smoothing=-0.1, reduction="none"), (DT, DP), [-0.58241475, 2.3719]),
    (CCE(label_smoothing=1.0, reduction="none"), (DT, DP), [6.388374, 1.609438]),
    (CCE(reduction="none"), ([[1, 0, 0]], [[0, .5, .5]]), [16.118095]),             # E21
    (CCE(reduction="none"), ([[0, 1, 0]], [[0.2, 0.4, 0.2]]), [0.6931472]),         # E23
    (CCE(reduction="none"), ([[0, 1, 0]], [[1., 2, 1]]), [0.6931472]),
    (CCE(reduction="none"), ([[0, 1, 0]], [[0., 1, 0]]), [1.1920929e-07]),          # E24
    (CCE(), (YT, YP, 0.0), 0.0),                                                    # E30
    (CCE(), (YT, YP, [1., 0, 0]), 0.035120178),
    (CCE(), (YT, YP, [2.0]), 0.6479362),
    (CCE(reduction="none"), (Y27, P27), [[1.609438, 0.5108256], [0.9162907, 0.6931472]]),  # E31
    (CCE(), (Y27, P27, [1., 0]), 0.5300659),
    (CCE(), (Y27, P27, [[1.], [0]]), 0.5300659),
    (CCE(), (Y27, P27, [[1., 0], [0, 2]]), 0.7489331),
    (CCE(axis=1, reduction="none"), (Y27, P27), [[0.40546516, 0.4054651, 0], [0.47000363, 0, 0.4855078]]),
    (CCE(axis=1), (Y27, P27), 0.29440692),                                          # E32
    (CCE(from_logits=True, reduction="none"), (Y27, P27), [[1.239831, 0.85328656], [1.0330688, 0.93906987]]),
    (CCE(from_logits=True, axis=0, reduction="none"), (Y27, P27),
     [[0.7443967, 0, 0.7443967], [0.5130153, 0.5333821, 0]]),
    (CCE(axis=-2, reduction="none"), (Y27, P27), [[0.40546516, 0.4054651, 0], [0.47000363, 0, 0.4855078]]),
    (CCE(from_logits=True, axis=-2, reduction=None), (Y27, P27),                   # F9 (accepted)
     [[0.64439666, 0.55435526, 0], [0.5981389, 0, 0.6209571]]),
    (CCE(reduction="mean"), (DT, DP), 1.1769392),                                   # F6
    (CCE(reduction="mean_with_sample_weight"), (DT, DP, [0.3, 0.7]), 1.6271976),
    (CCE(reduction="mean_with_sample_weight"), (DT, DP), 1.1769392),
    (CCE(reduction=None), (DT, DP), [0.05129331, 2.3025851]),
])
def test_catalogue_e_f(loss, args, expected):
  out = jax.jit(lambda *a: loss(*a))(*[jnp.asarray(a) for a in args])
  assert_close(out, expected, scale=3)


def test_functions_and_backend_values():
  assert_close(cce(DT, DP), [0.05129331, 2.3025851])
  eye = np.eye(3, dtype=np.float32)
  assert_close(cce(eye, [[.9, .05, .05], [.05, .89, .06], [.05, .01, .94]]),
               [0.10536054, 0.11653383, 0.06187541])                                # E17
  assert_close(cce(eye, [[.9, .05, .05], [.05, .89, .01], [.05, .06, .94]], axis=0),
               [0.10536054, 0.11653383, 0.06187541], scale=5)                        # E18
  assert_close(cce(eye, [[.9, .05, .05], [.05, .89, .06], [.05, .01, .94]], axis=0),
               [0.10536054, 0.06524054, 0.11066549], scale=5)                        # E19
  assert_close(cce(eye, LG, from_logits=True), [0.00181, 0.00046, 0.1698], scale=50)  # E20
  assert_close(cce(eye, LG, from_logits=True, axis=0), [0.00281022, 0.00281022, 0.03597625], scale=5)
  assert_close(cce(Y27, P27, label_smoothing=0.3, axis=1),                            # E27 tf.keras
               [[0.5094372, 0.5094372, 0.21762493], [0.5466275, 0.209189, 0.55600834]], scale=5)
  t = [[0.33008796, 0.0391289, 0.9503603], [0.80376694, 0.92363342, 0.19147756]]     # F5
  o = [[0.23446431, 0.35822914, 0.06683268], [0.3413979, 0.05420256, 0.81619654]]
  assert_close(cce(t, o), [2.54095299, 3.96374412], scale=5)
  assert_close(cce(t, o, axis=0), [0.71683073, 1.87988172, 2.46810762], scale=5)
  assert_close(cce(t, o, from_logits=True), [1.59419954, 2.49880593], scale=5)


def test_dtypes_and_gradients():
  out = CCE(reduction="none")(np.array([[1, 0, 0]], np.float16), np.array([[0, .5, .5]], np.float16))
  assert out.dtype == jnp.float16 and abs(float(out[0]) - 15.945) < 1e-2           # E21 f16
  out = CCE(reduction="none")(np.array([[0, 1, 0]], np.float64), np.array([[0.2, 0.7, 0.1]], np.float64))
  assert abs(float(out[0]) - 0.35667494) < 1e-6                                      # E34
  assert cce([0, 1, 0], [0.2, 0.7, 0.1]).shape == ()
  g = jax.grad(lambda p: cce(jnp.array([[0., 1, 0]]), p).sum())
  assert_close(g(jnp.array([[0.2, 0.5, 0.3]])), [[1, -1, 1]])                        # E25
  assert_close(g(jnp.array([[0.2, 0.4, 0.2]])), [[1.25, -1.25, 1.25]])
  assert_close(g(jnp.array([[0., 1, 0]])), [[0, 0, 0]])                              # E24
  # from_logits: TF kernel gradient, gradient into y_true (v2 semantics)
  dy, dx = jax.grad(lambda y, x: CCE(from_logits=True, reduction="sum")(y, x), argnums=(0, 1))(
      jnp.array([[0., 2, 0]]), jnp.array([[1., 2, 3]]))
  assert_close(dx, [[0.0900306, -1.7552716, 0.6652409]])
  assert_close(dy, -jax.nn.log_softmax(jnp.array([[1., 2, 3]])))


def test_errors():
  with pytest.raises(ValueError, match="Shapes .+ are incompatible"):                # E13
    CCE()([[0], [1], [2]], YP)
  with pytest.raises(ValueError, match="Invalid Reduction Key"):                     # E35
    CCE(reduction="avg")
  with pytest.raises(ValueError, match="`axis` must be of type `int`"):
    cce(DT, DP, axis=True)
  with pytest.raises(ValueError, match="squeeze"):                                   # E30
    CCE()(YT, YP, np.ones((3, 3)))
  with pytest.raises(ValueError, match="Incompatible shapes"):
    CCE()(YT, YP, [2.0, 1.0])
  with pytest.raises(IndexError):                                                    # F14
    CCE()(1., 1.)
  with warnings.catch_warnings(record=True) as w:                                    # E16
    warnings.simplefilter("always")
    out = CCE()([[1.], [0.]], [[1.], [1.]])
    assert any(issubclass(x.category, SyntaxWarning) for x in w)
  assert abs(float(out) - 5.96e-08) < 1e-8
  assert float(CCE()(np.zeros((0, 3)), np.zeros((0, 3)))) == 0.0                     # E35 empty
  assert np.isnan(CCE(reduction="none")([[1, 0, 0]], [[0., 0, 0]])[0])               # E22


def test_config_round_trip():
  c = CCE(from_logits=True, label_smoothing=0.2, axis=1, reduction="sum", name="x")
  cfg = c.get_config()
  assert cfg == {"reduction": "sum", "name": "x", "from_logits": True, "label_smoothing": 0.2,
                 "axis": 1, "fn": "categorical_crossentropy"}                         # E36
  assert CCE.from_config(cfg).get_config() == cfg
  assert CCE().get_config() == {"reduction": "auto", "name": "categorical_crossentropy",
                                "from_logits": False, "label_smoothing": 0.0, "axis": -1,
                                "fn": "categorical_crossentropy"}
  s = SCCE(ignore_class=0)
  assert SCCE.from_config(s.get_config()).get_config() == s.get_config()


def test_sparse():
  scce = SCCE()
  assert_close(scce([1, 2], DP), 1.1769392)
  assert_close(SCCE(from_logits=True, reduction="none")([0, 1, 2], LG), [0.001822, 0.00045873, 0.16984604])
  assert_close(scce([[1], [2]], DP), 1.1769392)
  # ignore_class: 0 loss, mean over the valid entries
  out = SCCE(ignore_class=-1, reduction="none")([1, -1], DP)
  assert_close(out, [0.05129344, 0.0])
  assert_close(SCCE(ignore_class=-1)([1, -1], DP), 0.05129344)


def test_under_jit_vmap_grad():
  loss = CCE(from_logits=True)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5, 3)), jnp.float32)
  y = jax.nn.one_hot(jnp.arange(20).reshape(4, 5) % 3, 3)
  per_batch = jax.jit(jax.vmap(loss))(y, x)
  assert_close(per_batch, [loss(y[i], x[i]) for i in range(4)])
  g = jax.jit(jax.grad(lambda x: loss(y, x)))(x)
  assert g.shape == x.shape and np.all(np.isfinite(g))


def test_keras3_compile_and_fit():
  os.environ.setdefault("KERAS_BACKEND", "jax")
  keras = pytest.importorskip("keras")
  if keras.backend.backend() != "jax":
    pytest.skip("Keras is not on the JAX backend")
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(64, 8)).astype(np.float32)
  ys = np.eye(3, dtype=np.float32)[(xs[:, 0] > 0).astype(int) + (xs[:, 1] > 1)]
  model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
  model.compile(optimizer="adam", loss=jxent.keras.CategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
  hist = model.fit(xs, ys, epochs=3, batch_size=16, verbose=0)
  assert len(hist.history["loss"]) == 3 and np.isfinite(hist.history["loss"]).all()
  ref = float(jxent.keras.CategoricalCrossentropy(from_logits=True)(ys, model.predict(xs, verbose=0)))
  assert abs(model.evaluate(xs, ys, verbose=0)[0] - ref) < 1e-4


_SAVE = """
import keras, jxent
m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
m.compile(optimizer="adam", loss=jxent.keras.SparseCategoricalCrossentropy(from_logits=True))
m.save(PATH)
"""
_LOAD = """
import sys
m = keras.models.load_model(PATH)
assert type(m.loss).__module__.startswith("jxent"), type(m.loss)
assert type(m.loss).__name__ == "SparseCategoricalCrossentropy"
assert not [f for f in sys.meta_path if type(f).__name__ == "_AfterKerasImport"]  # (removed)
print("loaded")
"""


@pytest.mark.parametrize("imports", [
    "import jxent\nimport keras",          # isort order: jxent before keras
    "import keras\nimport jxent",
    "import jxent.keras\nimport keras",
    "import jxent\nfrom keras import models\nimport keras",  # keras first reached by a submodule
])
def test_saved_model_loads_in_a_fresh_process_whatever_the_import_order(imports, tmp_path):
  """A `.keras` model compiled with a jxent loss loads without custom_objects in a new process:
  jxent registers its classes when Keras is imported, before or after jxent."""
  import subprocess
  import sys
  pytest.importorskip("keras")
  env = dict(os.environ, KERAS_BACKEND="jax")
  path = repr(str(tmp_path / "m.keras"))
  run = lambda code: subprocess.run([sys.executable, "-c", f"PATH = {path}\n{code}"], env=env,
                                    capture_output=True, text=True, timeout=300)
  saved = run(_SAVE)
  assert saved.returncode == 0, saved.stderr[-3000:]
  loaded = run(imports + "\n" + _LOAD)
  assert loaded.returncode == 0 and "loaded" in loaded.stdout, loaded.stderr[-3000:]


def test_import_jxent_alone_does_not_import_keras():
  import subprocess
  import sys
  code = "import sys, jxent, jxent.keras; sys.exit('keras' in sys.modules)"
  assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_class_weight_values_and_gradients():
  """class_weight (PyTorch's weight=) on every path, against float64 NumPy; for one-hot targets
  without smoothing it equals Keras's fit(class_weight=): class_weight[argmax] as sample weight."""
  rng = np.random.default_rng(7)
  w = np.array([0.5, 2.0, 1.5, 0.0], np.float32)
  logits = rng.normal(size=(6, 4)).astype(np.float32)
  probs = np.asarray(jax.nn.softmax(logits))
  ids = rng.integers(0, 4, size=6)
  onehot = np.eye(4, dtype=np.float32)[ids]
  soft = np.asarray(jax.nn.softmax(rng.normal(size=(6, 4)))).astype(np.float32)
  logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float64)))
  for eps in (0.0, 0.1):
    for y in (onehot, soft):
      ys = (1 - eps) * y + eps / 4
      want = -(w * ys * logp).sum(-1)
      for from_logits, pred in ((True, logits), (False, probs)):
        got = CCE(from_logits=from_logits, label_smoothing=eps, class_weight=w,
                  reduction="none")(y, pred)
        assert_close(got, want, scale=5)
    want_s = (1 - eps) * w[ids] * -logp[np.arange(6), ids] - eps / 4 * (w * logp).sum(-1)
    for from_logits, pred in ((True, logits), (False, probs)):
      got = SCCE(from_logits=from_logits, label_smoothing=eps, class_weight=list(w),
                 reduction="none")(ids, pred)
      assert_close(got, want_s, scale=5)
  # Keras's fit(class_weight=) semantics for one-hot targets: a per-sample weight w[label]
  assert_close(CCE(from_logits=True, class_weight=w)(onehot, logits),
               CCE(from_logits=True)(onehot, logits, sample_weight=w[ids]))
  assert_close(SCCE(from_logits=True, class_weight={0: 0.5, 1: 2.0, 2: 1.5, 3: 0.0})(ids, logits),
               SCCE(from_logits=True)(ids, logits, sample_weight=w[ids]))
  # the logits gradient against jax.grad of the float64 formula
  f = lambda x: CCE(from_logits=True, class_weight=w, label_smoothing=0.1)(soft, x)
  ref = lambda x: jnp.mean(-(w * (0.9 * soft + 0.025) * jax.nn.log_softmax(x)).sum(-1))
  assert_close(jax.grad(f)(jnp.asarray(logits)), jax.grad(ref)(jnp.asarray(logits, jnp.float32)))


def test_class_weight_config_round_trip_and_errors():
  for cw in ([0.5, 2.0, 1.0], np.array([0.5, 2.0, 1.0], np.float32), {0: 0.5, "1": 2.0}):
    for cls in (CCE, SCCE):
      loss = cls(from_logits=True, class_weight=cw)
      cfg = loss.get_config()
      assert cfg["class_weight"] == ([0.5, 2.0, 1.0] if not isinstance(cw, dict) else cw)
      again = cls.from_config(cfg)
      assert again.get_config() == cfg
      assert_close(again([[0, 1, 0]] if cls is CCE else [1], LG[:1]),
                   loss([[0, 1, 0]] if cls is CCE else [1], LG[:1]))
  assert "class_weight" not in CCE().get_config()  # (unset: the config Keras knows)
  with pytest.raises(ValueError, match="1-D sequence"):
    CCE(class_weight=[[1.0, 2.0]])
  with pytest.raises(TypeError, match="class indices to numbers"):
    SCCE(class_weight={"a": 1.0})
  with pytest.raises(ValueError, match=r"must have shape \(3,\)"):
    CCE(from_logits=True, class_weight=[1.0, 2.0])([[0, 1, 0]], LG[:1])
  with pytest.raises(ValueError, match=r"names class 5, outside \[0, 3\)"):
    SCCE(from_logits=True, class_weight={5: 1.0})([1], LG[:1])


def test_class_weight_keras3_serialization():
  os.environ.setdefault("KERAS_BACKEND", "jax")
  keras = pytest.importorskip("keras")
  loss = SCCE(from_logits=True, class_weight=[1.0, 3.0, 0.5])
  again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
  assert type(again) is SCCE and again.get_config() == loss.get_config()
