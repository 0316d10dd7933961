"""Keras 3 on the JAX backend with a jxent loss: ``model.compile(loss=...)`` and ``fit``.

A common porting pitfall: a model whose last layer already applies softmax, trained with a loss
that expects logits (``from_logits=True``), applies softmax twice; it trains poorly and reports
wrong losses. tf.keras sometimes "detected" the softmax output and silently used the logits
underneath; Keras 3 on JAX (and jxent) cannot detect it. The two right ways:

  1. a linear last layer (logits) with ``CategoricalCrossentropy(from_logits=True)`` -- this file;
  2. a softmax last layer (probabilities) with ``CategoricalCrossentropy(from_logits=False)``.

  python examples/keras_compile.py
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import jxent  # noqa: E402


def build(last_activation=None):
  return keras.Sequential([
      keras.Input((64,)),
      keras.layers.Dense(128, activation="relu"),
      keras.layers.Dropout(0.2),
      keras.layers.Dense(10, activation=last_activation),
  ])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--epochs", type=int, default=10)
  args = p.parse_args(argv)
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = np.eye(10, dtype=np.float32)[digits.target]
  x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0)
  keras.utils.set_random_seed(0)

  # Right way 1: logits out, from_logits=True.
  model = build(None)
  model.compile(optimizer="adam", loss=jxent.keras.CategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
  model.fit(x_tr, y_tr, epochs=args.epochs, batch_size=32, verbose=0)
  _, acc_logits = model.evaluate(x_te, y_te, verbose=0)
  print(f"linear output + from_logits=True:    test accuracy {acc_logits:.4f}")

  # Right way 2: probabilities out, from_logits=False.
  model = build("softmax")
  model.compile(optimizer="adam", loss=jxent.keras.CategoricalCrossentropy(from_logits=False),
                metrics=["accuracy"])
  model.fit(x_tr, y_tr, epochs=args.epochs, batch_size=32, verbose=0)
  _, acc_probs = model.evaluate(x_te, y_te, verbose=0)
  print(f"softmax output + from_logits=False:  test accuracy {acc_probs:.4f}")

  # The pitfall: probabilities out, but the loss told they are logits (softmax applied twice).
  # softmax of values in [0, 1] is nearly flat, so the reported loss cannot fall below
  # log(9 + e) - 1 = 1.46 however good the model is, and the gradients are weak.
  model = build("softmax")
  model.compile(optimizer="adam", loss=jxent.keras.CategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
  model.fit(x_tr, y_tr, epochs=args.epochs, batch_size=32, verbose=0)
  reported, acc_twice = model.evaluate(x_te, y_te, verbose=0)
  probs = model.predict(x_te, verbose=0)
  true_loss = float(jxent.keras.CategoricalCrossentropy()(y_te, probs))
  print(f"PITFALL softmax output + from_logits=True: test accuracy {acc_twice:.4f}, reported "
        f"loss {reported:.3f} (floor 1.46) vs its true cross-entropy {true_loss:.3f}")
  print(f"test accuracy: {acc_logits:.4f}")
  return acc_logits, acc_probs, reported, true_loss


if __name__ == "__main__":
  main()
