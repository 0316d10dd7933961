"""Shared by the GPU scripts here: a JSON-lines log under $OUT, and a relative error."""
import json, os

import jax.numpy as jnp
import numpy as np


def jsonl_log(name):
  """``emit(**fields)``: prints one JSON line and appends it to ``$OUT/<name>`` (or ./<name>)."""
  log = open(os.path.join(os.environ.get("OUT", "."), name), "w")

  def emit(**kw):
    print(json.dumps(kw), flush=True); log.write(json.dumps(kw) + "\n"); log.flush()
  return emit


def rel(a, b):
  """``|a - b| / |b|`` (Frobenius) in float64; NaN when ``a`` is not finite."""
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64); b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)) if np.all(np.isfinite(a)) else float("nan")
