"""jxent against PyTorch's ``F.cross_entropy``: 180 random cases recorded from PyTorch 2.13.0
(CPU, float64) by ``scripts/torch_differential.py --record`` in ``data/torch_cross_entropy.json``
(no torch needed here).

Each case is the one-line port of ``F.cross_entropy(logits, target, weight=w,
ignore_index=-100, label_smoothing=eps, reduction=r)``: class indices (``[N]``, and ``[N, D]``
with the classes at dim 1 of ``[N, C, D]`` logits: ``axis=1``) with some labels at PyTorch's
default ``ignore_index`` -100, or probability targets; with and without ``weight`` (one of them
0); smoothing 0, 0.1, 0.3; the three reductions. The loss and the logits gradient (a random
cotangent for ``"none"``) must match PyTorch's within float32 rounding.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent

DATA = json.loads((pathlib.Path(__file__).parent / "data" / "torch_cross_entropy.json").read_text())
IGNORE = -100


def _port(case):
  """The jxent call of the recorded PyTorch call, as the README's porting guide writes it."""
  weight = None if case["weight"] is None else jnp.asarray(case["weight"], jnp.float32)
  kw = dict(axis=1, class_weight=weight, label_smoothing=case["label_smoothing"],
            reduction=case["reduction"])
  if case["kind"] == "probs":
    target = jnp.asarray(case["target"], jnp.float32)
    return lambda x: jxent.softmax_cross_entropy(x, target, **kw)
  target = jnp.asarray(case["target"])
  return lambda x: jxent.softmax_cross_entropy_with_integer_labels(
      x, target, ignore_index=IGNORE, **kw)


def test_the_recording():
  assert DATA["torch"].startswith("2.13") and DATA["n"] == len(DATA["cases"]) == 180


@pytest.mark.parametrize("i", range(len(DATA["cases"])))
def test_matches_pytorch(i):
  case = DATA["cases"][i]
  x = jnp.asarray(case["logits"], jnp.float32)
  loss, vjp = jax.vjp(jax.jit(_port(case)), x)
  (dx,) = vjp(jnp.asarray(case["cotangent"], jnp.float32))
  np.testing.assert_allclose(np.asarray(loss, np.float64), case["torch_loss"], rtol=2e-6,
                             atol=2e-6, err_msg="loss")
  np.testing.assert_allclose(np.asarray(dx, np.float64), case["torch_dlogits"], rtol=2e-6,
                             atol=2e-6, err_msg="dlogits")
