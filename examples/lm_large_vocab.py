"""A small language model over a large vocabulary, trained with jxent's fused linear cross-entropy.

Text: the Python standard library's own sources (ships with Python). Tokens: words and symbols,
the most frequent ``--vocab`` of them (0 = padding, 1 = unknown). Model: the previous three tokens'
embeddings -> a hidden layer -> ``linear_softmax_cross_entropy(h, w, targets, ignore_index=0,
z_loss=1e-4)``, which never builds the ``[tokens, vocab]`` logits. Padding positions are ignored.
It prints the compiled temporary memory of the fused loss against the unfused one.

  python examples/lm_large_vocab.py                 # CPU sizes, under 2 minutes
  python examples/lm_large_vocab.py --gpu           # GPU sizes (vocab 131072, hidden 1024)
"""

import argparse
import collections
import pathlib
import re
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jxent

TOKEN = re.compile(r"\w+|[^\w\s]")


def load_corpus(max_chars: int):
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  text, n = [], 0
  for path in sorted(root.glob("*.py")):
    try:
      t = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
      continue
    text.append(t)
    n += len(t)
    if n >= max_chars:
      break
  return [TOKEN.findall(line) for line in "\n".join(text).splitlines() if line.strip()]


def build_batches(lines, vocab_size, seq_len):
  counts = collections.Counter(t for line in lines for t in line)
  itos = ["<pad>", "<unk>"] + [t for t, _ in counts.most_common(vocab_size - 2)]
  stoi = {t: i for i, t in enumerate(itos)}
  seqs = np.zeros((len(lines), seq_len), np.int32)  # 0 = padding
  for r, line in enumerate(lines):
    ids = [stoi.get(t, 1) for t in line[:seq_len]]
    seqs[r, :len(ids)] = ids
  return seqs, itos


def init(key, vocab, d_emb, d_hidden):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"emb": jax.random.normal(k1, (vocab, d_emb)) * 0.02,
          "w_in": jax.random.normal(k2, (3 * d_emb, d_hidden)) * (3 * d_emb) ** -0.5,
          "b_in": jnp.zeros(d_hidden),
          "w_out": jax.random.normal(k3, (d_hidden, vocab)) * d_hidden ** -0.5}


def hidden(params, seqs):
  """h[b, t] from tokens t-1, t-2, t-3 (zeros = padding before the start)."""
  e = params["emb"][seqs]  # [B, L, D]
  shift = lambda a, k: jnp.pad(a, ((0, 0), (k, 0), (0, 0)))[:, :a.shape[1]]
  ctx = jnp.concatenate([shift(e, 1), shift(e, 2), shift(e, 3)], axis=-1)
  return jnp.tanh(ctx @ params["w_in"] + params["b_in"])


def fused_loss(params, seqs):
  return jxent.linear_softmax_cross_entropy(hidden(params, seqs), params["w_out"], seqs,
                                            ignore_index=0, z_loss=1e-4)


def unfused_loss(params, seqs):
  logits = hidden(params, seqs) @ params["w_out"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, seqs)
  lse = jax.nn.logsumexp(logits, -1)
  mask = seqs != 0
  return jnp.sum(jnp.where(mask, loss + 1e-4 * lse ** 2, 0.0)) / jnp.maximum(mask.sum(), 1)


def temp_mb(f, *args):
  return jax.jit(jax.grad(f)).lower(*args).compile().memory_analysis().temp_size_in_bytes / 1e6


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--gpu", action="store_true", help="GPU sizes")
  p.add_argument("--steps", type=int, default=None)
  p.add_argument("--vocab", type=int, default=None)
  args = p.parse_args(argv)
  t0 = time.time()
  if args.gpu and jax.default_backend() == "cpu":
    print("warning: --gpu sizes (vocab 131072, hidden 1024, 300 steps) on this CPU take hours; "
          "Ctrl-C to stop, or run without --gpu.", file=sys.stderr, flush=True)
  vocab = args.vocab or (131072 if args.gpu else 16384)
  d_emb, d_hidden, batch, seq_len = (256, 1024, 64, 128) if args.gpu else (64, 128, 32, 32)
  steps = args.steps or (300 if args.gpu else 150)
  lines = load_corpus(40_000_000 if args.gpu else 3_000_000)
  seqs, itos = build_batches(lines, vocab, seq_len)
  print(f"{len(seqs)} lines, vocab {len(itos)} (of {vocab}), {(seqs != 0).mean():.0%} non-padding")

  params = init(jax.random.key(0), vocab, d_emb, d_hidden)
  sample = jnp.asarray(seqs[:batch])
  fused, unfused = temp_mb(fused_loss, params, sample), temp_mb(unfused_loss, params, sample)
  n_tok = batch * seq_len
  print(f"compiled temporary memory of grad(loss), {n_tok} tokens x {vocab} classes: "
        f"fused {fused:.1f} MB, unfused {unfused:.1f} MB "
        f"(float32 logits alone: {n_tok * vocab * 4 / 1e6:.1f} MB)")

  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state, batch_seqs):
    loss, grads = jax.value_and_grad(fused_loss)(params, batch_seqs)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng(0)
  for i in range(steps):
    idx = rng.integers(0, len(seqs), size=batch)
    params, state, loss = step(params, state, jnp.asarray(seqs[idx]))
    if i % max(1, steps // 10) == 0 or i == steps - 1:
      print(f"step {i:4d}: loss {float(loss):.4f}")
  check = float(unfused_loss(params, sample)), float(fused_loss(params, sample))
  print(f"fused vs unfused loss on a batch: {check[1]:.5f} vs {check[0]:.5f}")
  print(f"({time.time() - t0:.1f} s)")
  return float(loss), fused, unfused


if __name__ == "__main__":
  main()
