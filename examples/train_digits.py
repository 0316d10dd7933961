"""A TF 1.x MNIST-style softmax classifier (sklearn digits), ported from TensorFlow to JAX with jxent.

One-hot labels, an MLP with dropout, Adam, 5 epochs, then evaluation on a held-out split -- as a
jit-compiled training loop with optax and ``jxent.losses.softmax_cross_entropy`` (the
``tf.compat.v1.losses.softmax_cross_entropy`` of the TF code, same argument order and values).
Data: scikit-learn's bundled 8x8 digits (no download).

  python examples/train_digits.py            # prints per-epoch loss, then "test accuracy: X"
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jxent


def init_params(key, sizes=(64, 256, 10)):
  params = []
  for k, (a, b) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
    params.append((jax.random.normal(k, (a, b)) * (2.0 / a) ** 0.5, jnp.zeros(b)))
  return params


def forward(params, x, key=None, rate=0.2):
  (w1, b1), (w2, b2) = params
  h = jax.nn.relu(x @ w1 + b1)
  if key is not None:  # dropout while training
    keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
    h = jnp.where(keep, h / (1.0 - rate), 0.0)
  return h @ w2 + b2  # logits


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--epochs", type=int, default=5)
  p.add_argument("--batch-size", type=int, default=32)
  args = p.parse_args(argv)
  t0 = time.time()
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  onehot = np.eye(10, dtype=np.float32)[digits.target]
  x_tr, x_te, y_tr, y_te = train_test_split(x, onehot, test_size=0.25, random_state=0)

  params = init_params(jax.random.key(0))
  opt = optax.adam(3e-3)
  state = opt.init(params)

  def loss_fn(params, xb, yb, key):
    logits = forward(params, xb, key)
    return jxent.losses.softmax_cross_entropy(yb, logits)  # onehot_labels first, as in TF

  @jax.jit
  def step(params, state, xb, yb, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb, key)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  key = jax.random.key(1)
  n = len(x_tr)
  for epoch in range(args.epochs):
    key, pk = jax.random.split(key)
    perm = np.asarray(jax.random.permutation(pk, n))
    losses = []
    for i in range(0, n - args.batch_size + 1, args.batch_size):
      idx = perm[i:i + args.batch_size]
      key, dk = jax.random.split(key)
      params, state, loss = step(params, state, x_tr[idx], y_tr[idx], dk)
      losses.append(loss)
    print(f"epoch {epoch + 1}: loss {float(jnp.mean(jnp.stack(losses))):.4f}")
  pred = jnp.argmax(jax.jit(forward)(params, x_te), -1)
  acc = float(jnp.mean(pred == jnp.argmax(y_te, -1)))
  print(f"({time.time() - t0:.1f} s)")
  print(f"test accuracy: {acc:.4f}")
  return acc


if __name__ == "__main__":
  main()
