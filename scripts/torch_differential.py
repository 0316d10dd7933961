"""Differential run of jxent against PyTorch's ``F.cross_entropy`` (``weight=``, ``ignore_index=``,
``label_smoothing=``, the three reductions, class indices and probability targets, the class
axis at dim 1 of ``[N, C, d]`` inputs), values and logits gradients.

``--record PATH`` (needs torch only) draws the random cases, runs PyTorch in float64 and writes
the cases with PyTorch's outputs as JSON: ``tests/peers/data/torch_cross_entropy.json``, which
``tests/peers/test_peer_torch.py`` checks jxent against on every run, without torch. Without
``--record`` (needs torch and jxent) it runs both and prints the comparison, and also how far
the usual hand port of ``weight=`` (``mean(w[y] * optax_loss)``) is from PyTorch.

    python scripts/torch_differential.py --record tests/peers/data/torch_cross_entropy.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import numpy as np

N, C, D = 4, 6, 2
IGNORE = -100  # PyTorch's default ignore_index


def _rounded(tree, digits):
  """Nested lists of floats rounded to ``digits`` significant digits (a smaller JSON file)."""
  if isinstance(tree, list):
    return [_rounded(v, digits) for v in tree]
  return float(f"{tree:.{digits}g}") if isinstance(tree, float) else tree


def cases(seeds=(0, 1)):
  """Every option combination, per seed: ``dict`` of inputs and options (JSON-ready)."""
  out = []
  for seed, kind, weighted, eps, reduction, ignore in itertools.product(
      seeds, ("int", "int_nd", "probs"), (False, True), (0.0, 0.1, 0.3), ("none", "sum", "mean"),
      (False, True)):
    if kind == "probs" and ignore:
      continue  # (ignore_index applies to class indices only)
    rng = np.random.default_rng([seed, len(out)])
    shape = (N, C, D) if kind == "int_nd" else (N, C)
    logits = rng.normal(size=shape) * 2.0
    batch = (N, D) if kind == "int_nd" else (N,)
    if kind == "probs":
      t = rng.random(size=shape) + 0.05
      target = (t / t.sum(axis=1, keepdims=True)).tolist()
    else:
      y = rng.integers(0, C, size=batch)
      if ignore:
        y.reshape(-1)[1] = IGNORE
      target = y.tolist()
    weight = None
    if weighted:
      w = rng.uniform(0.2, 2.5, size=C)
      w[3] = 0.0  # a zero weight (negative weights: PyTorch allows them too; see the tests)
      weight = w.tolist()
    cot = rng.normal(size=batch).tolist() if reduction == "none" else 1.0
    # (inputs to 7 digits: PyTorch runs on exactly these values, in float64)
    out.append(dict(kind=kind, logits=_rounded(logits.tolist(), 7), target=_rounded(target, 7),
                    weight=_rounded(weight, 7), label_smoothing=eps, reduction=reduction,
                    cotangent=_rounded(cot, 7)))
  return out


def run_torch(case):
  """PyTorch's loss and logits gradient, float64."""
  import torch
  import torch.nn.functional as F
  x = torch.tensor(case["logits"], dtype=torch.float64, requires_grad=True)
  target = torch.tensor(case["target"], dtype=torch.float64 if case["kind"] == "probs" else torch.long)
  weight = None if case["weight"] is None else torch.tensor(case["weight"], dtype=torch.float64)
  loss = F.cross_entropy(x, target, weight=weight, ignore_index=IGNORE,
                         label_smoothing=case["label_smoothing"], reduction=case["reduction"])
  (loss * torch.tensor(case["cotangent"], dtype=torch.float64)).sum().backward()
  return loss.detach().numpy().tolist(), x.grad.numpy().tolist()


def run_jxent(case, dtype="float32"):
  """jxent's loss and logits gradient for ``case`` (the one-line port of the PyTorch call)."""
  import jax
  import jax.numpy as jnp
  import jxent
  x = jnp.asarray(case["logits"], dtype)
  weight = None if case["weight"] is None else jnp.asarray(case["weight"], dtype)
  kw = dict(axis=1, class_weight=weight, label_smoothing=case["label_smoothing"],
            reduction=case["reduction"])
  if case["kind"] == "probs":
    target = jnp.asarray(case["target"], dtype)
    f = lambda x: jxent.softmax_cross_entropy(x, target, **kw)
  else:
    target = jnp.asarray(case["target"])
    f = lambda x: jxent.softmax_cross_entropy_with_integer_labels(x, target, ignore_index=IGNORE,
                                                                  **kw)
  cot = jnp.asarray(case["cotangent"], dtype)
  loss, vjp = jax.vjp(f, x)
  return np.asarray(loss, np.float64), np.asarray(vjp(cot.astype(loss.dtype))[0], np.float64)


def hand_port(case):
  """The usual hand emulation of ``weight=`` over optax: ``mean(w[y] * loss)`` (or the sum)."""
  import jax.numpy as jnp
  import optax
  x = jnp.moveaxis(jnp.asarray(case["logits"], jnp.float32), 1, -1)
  w = jnp.asarray(case["weight"], jnp.float32)
  y = jnp.asarray(case["target"])
  keep = y != IGNORE
  yk = jnp.where(keep, y, 0)
  eps = case["label_smoothing"]
  labels = optax.smooth_labels(jnp.eye(C)[yk], eps) if eps else jnp.eye(C)[yk]
  loss = jnp.where(keep, w[yk] * optax.softmax_cross_entropy(x, labels), 0.0)
  return {"none": loss, "sum": loss.sum(), "mean": loss.sum() / keep.sum()}[case["reduction"]]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--record", metavar="PATH", help="write the cases and PyTorch's outputs here")
  args = p.parse_args(argv)
  import torch
  all_cases = cases()
  if args.record:
    for case in all_cases:
      case["torch_loss"], case["torch_dlogits"] = _rounded(list(run_torch(case)), 10)
    with open(args.record, "w") as f:
      json.dump(dict(torch=torch.__version__, n=len(all_cases), cases=all_cases), f,
                separators=(",", ":"))
    print(f"{len(all_cases)} cases, torch {torch.__version__} -> {args.record}")
    return 0
  worst, bad, hand_bad, hand_n = 0.0, 0, 0, 0
  for case in all_cases:
    t_loss, t_dx = map(np.asarray, run_torch(case))
    j_loss, j_dx = run_jxent(case)
    err = max(np.max(np.abs(j_loss - t_loss) / (1 + np.abs(t_loss))),
              np.max(np.abs(j_dx - t_dx) / (1 + np.abs(t_dx))))
    worst = max(worst, err)
    bad += err > 2e-5
    if case["weight"] is not None and case["kind"] != "probs":
      hand_n += 1
      hand_bad += not np.allclose(np.asarray(hand_port(case)), t_loss, rtol=2e-5, atol=2e-5)
  print(f"torch {torch.__version__}: {len(all_cases)} cases, {bad} beyond 2e-5 (worst relative "
        f"error {worst:.2e}); the hand port mean(w[y] * optax loss) differs from PyTorch in "
        f"{hand_bad} of its {hand_n} weighted cases")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
