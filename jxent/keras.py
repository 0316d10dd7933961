"""Keras front door: tf.keras 2.21 categorical cross-entropy (Keras 3 reduction names accepted)."""

from jxent._src.keras_losses import CategoricalCrossentropy as CategoricalCrossentropy
from jxent._src.keras_losses import Reduction as Reduction
from jxent._src.keras_losses import SparseCategoricalCrossentropy as SparseCategoricalCrossentropy
from jxent._src.keras_losses import register_now_or_when_keras_loads as _register_now_or_when_keras_loads
from jxent._src.keras_losses import register_serializable as register_serializable
from jxent._src.keras_losses import categorical_crossentropy as categorical_crossentropy
from jxent._src.keras_losses import sparse_categorical_crossentropy as sparse_categorical_crossentropy

__all__ = ["CategoricalCrossentropy", "Reduction", "SparseCategoricalCrossentropy",
           "categorical_crossentropy", "register_serializable", "sparse_categorical_crossentropy"]

# Registered with Keras now if it is imported, else when it is (jxent never imports it).
_register_now_or_when_keras_loads()
