"""Keras 3's own categorical cross-entropy tests with jxent in Keras's place.

Ported from keras-team/keras ``keras/src/losses/losses_test.py`` at commit
3422977a5e38fb2f7709aaa9a08e47f0c43d0f60 (CategoricalCrossentropyTest and
SparseCategoricalCrossentropyTest): Keras's inputs, expected values and tolerances
(Keras's ``TestCase``: ``assertAlmostEqual`` is ``np.testing.assert_almost_equal`` with
``decimal=3`` unless the test gives another; ``assertAllClose`` has ``atol = rtol = 1e-6``), with
``jxent.keras`` classes for ``keras.losses``. Each case runs eagerly and under ``jit``.

Deliberate difference, asserted as jxent documents it: ``SparseCategoricalCrossentropy(axis=0)``
raises on Keras's JAX backend ("Only axis=-1" / a shape error) but is supported by jxent, as on
Keras's torch backend; those cases assert the torch backend's expected values.
"""

import warnings

import jax
import numpy as np
import pytest

import jxent

keras = pytest.importorskip("keras")
losses = jxent.keras
MODES = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]

Y_TRUE = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
Y_PRED = np.array([[0.9, 0.05, 0.05], [0.5, 0.89, 0.6], [0.05, 0.01, 0.94]], dtype="float32")
LOGITS = np.array([[8.0, 1.0, 1.0], [0.0, 9.0, 1.0], [2.0, 3.0, 5.0]])
SAMPLE_WEIGHT = np.array([[1.2], [3.4], [5.6]]).reshape((3, 1))


def almost(a, b, decimal=3):
  np.testing.assert_almost_equal(np.asarray(a, np.float64), b, decimal=decimal)


def call(mode, obj, *args, **kw):
  return mode(lambda *a: obj(*a, **kw))(*args)


def round_trip(obj):
  config = keras.saving.serialize_keras_object(obj)
  back = keras.saving.deserialize_keras_object(config)
  assert type(back) is type(obj) and back.get_config() == obj.get_config()
  assert type(obj).from_config(obj.get_config()).get_config() == obj.get_config()


@pytest.mark.parametrize("mode", MODES)
class TestCategoricalCrossentropy:

  def test_config(self, mode):
    round_trip(losses.CategoricalCrossentropy(name="cce", axis=-1))

  def test_all_correct_unweighted(self, mode):
    y_true = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype="int64")
    y_pred = np.eye(3, dtype="float32")
    almost(call(mode, losses.CategoricalCrossentropy(), y_true, y_pred), 0.0)
    logits = np.array([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    almost(call(mode, losses.CategoricalCrossentropy(from_logits=True), y_true, logits), 0.0)

  def test_unweighted(self, mode):
    almost(call(mode, losses.CategoricalCrossentropy(), Y_TRUE, Y_PRED), 0.3239)
    almost(call(mode, losses.CategoricalCrossentropy(from_logits=True), Y_TRUE, LOGITS), 0.0573)

  def test_scalar_weighted(self, mode):
    almost(call(mode, losses.CategoricalCrossentropy(), Y_TRUE, Y_PRED, sample_weight=2.3),
           0.7449)
    almost(call(mode, losses.CategoricalCrossentropy(from_logits=True), Y_TRUE, LOGITS,
                sample_weight=2.3), 0.1317)

  def test_warning_for_invalid_shape(self, mode):
    with pytest.warns(SyntaxWarning, match=r"expected y_pred.shape to be \(batch_size, num_classes\)"):
      losses.categorical_crossentropy(np.array([[1], [1]], "float32"), np.array([[0.5], [0.5]], "float32"))
    with pytest.warns(SyntaxWarning, match=r"expected y_pred.shape to be \(batch_size, num_classes\)"):
      losses.categorical_crossentropy(np.ones((2, 1, 4), "float32"), np.ones((2, 1, 4), "float32"),
                                      axis=1)
    with warnings.catch_warnings(record=True) as w:
      warnings.simplefilter("always")
      losses.categorical_crossentropy(np.ones((2, 4, 1), "float32"), np.ones((2, 4, 1), "float32"),
                                      axis=1)
      assert not [x for x in w if issubclass(x.category, SyntaxWarning)]

  def test_sample_weighted(self, mode):
    almost(call(mode, losses.CategoricalCrossentropy(), Y_TRUE, Y_PRED,
                sample_weight=SAMPLE_WEIGHT), 1.0696)
    almost(call(mode, losses.CategoricalCrossentropy(from_logits=True), Y_TRUE, LOGITS,
                sample_weight=SAMPLE_WEIGHT), 0.31829)

  def test_no_reduction(self, mode):
    loss = call(mode, losses.CategoricalCrossentropy(from_logits=True, reduction=None), Y_TRUE,
                LOGITS)
    np.testing.assert_allclose(loss, (0.001822, 0.000459, 0.169846), rtol=1e-6, atol=1e-6)

  @pytest.mark.parametrize("as_array", [False, True])
  def test_label_smoothing(self, mode, as_array):
    logits = np.array([[100.0, -100.0, -100.0]])
    y_true = np.array([[1, 0, 0]])
    obj = losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    almost(call(mode, obj, y_true, np.asarray(logits) if as_array else logits),
           400.0 * 0.1 / 3.0)

  def test_label_smoothing_with_axis(self, mode):
    y_true = np.array([[[1, 0], [0, 1], [0, 0]], [[0, 1], [1, 0], [0, 0]]], dtype="float32")
    y_pred = np.array([[[0.8, 0.1], [0.1, 0.8], [0.1, 0.1]],
                       [[0.1, 0.8], [0.8, 0.1], [0.1, 0.1]]], dtype="float32")
    loss = call(mode, losses.CategoricalCrossentropy(label_smoothing=0.1, axis=1), y_true, y_pred)
    smoothed = y_true * 0.9 + 0.1 / 3
    expected = np.mean(-np.sum(smoothed * np.log(y_pred), axis=1))
    almost(loss, expected, 5)

  def test_shape_mismatch(self, mode):
    y_true = np.array([[0], [1], [2]])
    with pytest.raises(ValueError, match="must have the same shape"):
      losses.CategoricalCrossentropy()(y_true, Y_PRED)
    with pytest.raises(ValueError, match="Shapes .+ are incompatible"):  # tf.keras's words
      losses.CategoricalCrossentropy()(y_true, Y_PRED)

  def test_dtype_arg(self, mode):
    loss = call(mode, losses.CategoricalCrossentropy(dtype="bfloat16"),
                np.eye(3, dtype="int64"), np.eye(3, dtype="float32"))
    assert loss.dtype == "bfloat16"


@pytest.mark.parametrize("mode", MODES)
class TestSparseCategoricalCrossentropy:

  def test_config(self, mode):
    round_trip(losses.SparseCategoricalCrossentropy(name="scce"))
    obj = losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=3, axis=0, name="scce")
    config = obj.get_config()
    assert config["from_logits"] is True and config["ignore_class"] == 3 and config["axis"] == 0
    round_trip(obj)

  def test_all_correct_unweighted(self, mode):
    y_true = np.array([[0], [1], [2]], dtype="int64")
    almost(call(mode, losses.SparseCategoricalCrossentropy(), y_true, np.eye(3, dtype="float32")),
           0.0, 3)
    logits = np.array([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    almost(call(mode, losses.SparseCategoricalCrossentropy(from_logits=True), y_true, logits), 0.0, 3)

  def test_unweighted(self, mode):
    y_true = np.array([0, 1, 2])
    almost(call(mode, losses.SparseCategoricalCrossentropy(), y_true, Y_PRED), 0.3239, 3)
    almost(call(mode, losses.SparseCategoricalCrossentropy(from_logits=True), y_true, LOGITS),
           0.0573, 3)

  def test_scalar_weighted(self, mode):
    y_true = np.array([[0], [1], [2]])
    almost(call(mode, losses.SparseCategoricalCrossentropy(), y_true, Y_PRED, sample_weight=2.3),
           0.7449, 3)
    almost(call(mode, losses.SparseCategoricalCrossentropy(from_logits=True), y_true, LOGITS,
                sample_weight=2.3), 0.1317, 3)

  def test_sample_weighted(self, mode):
    y_true = np.array([[0], [1], [2]])
    almost(call(mode, losses.SparseCategoricalCrossentropy(), y_true, Y_PRED,
                sample_weight=SAMPLE_WEIGHT), 1.0696, 3)
    almost(call(mode, losses.SparseCategoricalCrossentropy(from_logits=True), y_true, LOGITS,
                sample_weight=SAMPLE_WEIGHT), 0.31829, 3)

  def test_no_reduction(self, mode):
    loss = call(mode, losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None),
                np.array([[0], [1], [2]]), LOGITS)
    np.testing.assert_allclose(loss, (0.001822, 0.000459, 0.169846), rtol=1e-6, atol=1e-6)

  def test_ignore_class(self, mode):
    logits = np.array([[[0.854, 0.698, 0.598], [0.088, 0.86, 0.018]]])
    obj = losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1, reduction=None)
    for y_true in (np.array([[-1, 2]]), np.array([[[-1], [2]]])):
      np.testing.assert_allclose(call(mode, obj, y_true, logits), [[0.0, 1.480129]], rtol=1e-6,
                                 atol=1e-6)

  def test_binary_segmentation(self, mode):
    y_true = np.array([[0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1]])
    y_pred = np.eye(2)[y_true]
    np.testing.assert_allclose(call(mode, losses.SparseCategoricalCrossentropy(), y_true, y_pred),
                               0.0, atol=1e-6)
    y_pred[0, 3] = [0.2, 0.8]
    y_pred[3, 3] = [0.6, 0.4]
    expected = np.array([-np.log(0.2), -np.log(0.4)])
    np.testing.assert_allclose(call(mode, losses.SparseCategoricalCrossentropy(), y_true, y_pred),
                               expected.sum() / 16.0, rtol=1e-6, atol=1e-6)

  def test_binary_segmentation_different_axis(self, mode):
    # Keras's torch-backend expectations (jxent supports axis=0, see the module docstring).
    y_true = np.array([[0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1]])
    y_pred = np.eye(2)[y_true]
    out = call(mode, losses.SparseCategoricalCrossentropy(axis=0), y_true,
               np.moveaxis(y_pred, 2, 0))
    np.testing.assert_allclose(out, 0.0, atol=1e-6)
    y_pred[0, 3] = [0.2, 0.8]
    y_pred[3, 3] = [0.6, 0.4]
    expected = np.array([-np.log(0.2), -np.log(0.4)]).sum() / 16.0
    moved = np.moveaxis(y_pred, 2, 0)
    np.testing.assert_allclose(call(mode, losses.SparseCategoricalCrossentropy(axis=0), y_true,
                                    moved), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(call(mode, losses.SparseCategoricalCrossentropy(axis=1),
                                    np.array([y_true] * 3), np.array([moved] * 3)),
                               expected, rtol=1e-6, atol=1e-6)

  def test_multi_class_segmentation(self, mode):
    y_true = np.array([[0, 1, 2, 0], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1]])
    y_pred = np.eye(3)[y_true]
    np.testing.assert_allclose(call(mode, losses.SparseCategoricalCrossentropy(), y_true, y_pred),
                               0.0, atol=1e-6)
    y_pred[0, 3] = [0.2, 0.0, 0.8]
    y_pred[1, 0] = [0.7, 0.3, 0.0]
    y_pred[3, 2] = [0.5, 0.5, 0.0]
    expected = np.array([-np.log(0.2), -np.log(0.3), -np.log(0.5)]).sum() / 16.0
    np.testing.assert_allclose(call(mode, losses.SparseCategoricalCrossentropy(), y_true, y_pred),
                               expected, rtol=1e-6, atol=1e-6)
    moved = np.moveaxis(y_pred, 2, 0)  # the torch backend's axis cases
    np.testing.assert_allclose(call(mode, losses.SparseCategoricalCrossentropy(axis=0), y_true,
                                    moved), expected, rtol=1e-6, atol=1e-6)

  def test_dtype_arg(self, mode):
    loss = call(mode, losses.SparseCategoricalCrossentropy(dtype="bfloat16"),
                np.array([[0], [1], [2]], dtype="int64"), np.eye(3, dtype="float32"))
    assert loss.dtype == "bfloat16"


def test_sparse_label_smoothing_matches_dense():
  # Keras 3.16's sparse label_smoothing: the dense loss of the smoothed one-hot, no one-hot built.
  y = np.array([0, 1, 2])
  for from_logits, pred in ((True, LOGITS), (False, Y_PRED)):
    a = losses.SparseCategoricalCrossentropy(from_logits=from_logits, label_smoothing=0.2)(y, pred)
    b = losses.CategoricalCrossentropy(from_logits=from_logits, label_smoothing=0.2)(
        np.eye(3)[y], pred / (1 if from_logits else pred.sum(-1, keepdims=True)))
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_model_saves_and_loads_without_custom_objects(tmp_path):
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
  model.compile(optimizer="sgd", loss=losses.SparseCategoricalCrossentropy(from_logits=True,
                                                                           label_smoothing=0.1))
  model.fit(np.random.default_rng(0).random((8, 4)), np.arange(8) % 3, verbose=0)
  model.save(tmp_path / "m.keras")
  back = keras.saving.load_model(tmp_path / "m.keras")
  assert isinstance(back.loss, losses.SparseCategoricalCrossentropy)
  assert back.loss.label_smoothing == 0.1


def test_reduction_enum_and_zero_d():
  assert losses.Reduction.SUM == "sum" and losses.Reduction.SUM.value == "sum"
  assert set(losses.Reduction.all()) == {"auto", "none", "sum", "sum_over_batch_size"}
  out = losses.CategoricalCrossentropy(reduction=losses.Reduction.SUM)(Y_TRUE, Y_PRED)
  np.testing.assert_allclose(out, 0.3239 * 3, atol=1e-3)
  with pytest.raises(ValueError):
    losses.CategoricalCrossentropy()(1.0, 1.0)
