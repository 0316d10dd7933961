"""Each example runs from the repository in a fast mode."""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_train_digits_reaches_095(capsys):
  acc = load("train_digits").main([])
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1].startswith("test accuracy: ")
  assert acc >= 0.95


def test_keras_compile():
  pytest.importorskip("keras")
  acc_logits, acc_probs, reported, true_loss = load("keras_compile").main(["--epochs", "3"])
  assert acc_logits > 0.8 and acc_probs > 0.5
  assert reported > 1.45 and reported > true_loss  # softmax twice: a loss floored at 1.46


def test_lm_large_vocab():
  loss, fused, unfused = load("lm_large_vocab").main(["--steps", "5", "--vocab", "4096"])
  assert loss == loss and fused < unfused
