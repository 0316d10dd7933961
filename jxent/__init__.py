"""jxent: softmax cross-entropy for JAX with exact TF/Keras semantics and fused, lean kernels."""

from jxent import contrib as contrib
from jxent import keras as keras
from jxent import losses as losses
from jxent import nn as nn
from jxent._src.api import check_integer_labels as check_integer_labels
from jxent._src.api import softmax_cross_entropy as softmax_cross_entropy
from jxent._src.api import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from jxent._src.dispatch import ChunkedXlaKernel as ChunkedXlaKernel
from jxent._src.dispatch import XlaAutodiffKernel as XlaAutodiffKernel
from jxent._src.dispatch import XlaKernel as XlaKernel
from jxent._src.api import implementations as implementations
from jxent._src.linear import LinearChunked as LinearChunked
from jxent._src.linear import LinearFusedGrad as LinearFusedGrad
from jxent._src.linear import linear_softmax_cross_entropy as linear_softmax_cross_entropy
from jxent._src.logprobs import linear_token_log_probs as linear_token_log_probs
from jxent._src.logprobs import token_log_probs as token_log_probs
from jxent._src.autotune import autotune as autotune
from jxent._src.autotune import chosen_implementation as chosen_implementation
from jxent._version import __version__ as __version__

__all__ = [
    "autotune",
    "chosen_implementation",
    "check_integer_labels",
    "implementations",
    "linear_softmax_cross_entropy",
    "linear_token_log_probs",
    "LinearChunked",
    "LinearFusedGrad",
    "contrib",
    "keras",
    "losses",
    "nn",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "token_log_probs",
    "ChunkedXlaKernel",
    "PallasMosaicGpuKernel",
    "PallasMosaicTpuKernel",
    "PallasTritonKernel",
    "XlaAutodiffKernel",
    "XlaKernel",
]

_LAZY = {
    "PallasTritonKernel": "jxent._src.kernels.pallas_triton",
    "PallasMosaicTpuKernel": "jxent._src.kernels.pallas_mosaic_tpu",
    "PallasMosaicGpuKernel": "jxent._src.kernels.pallas_mosaic_gpu",
}


def __getattr__(name: str):
  # The Pallas kernel objects are imported on first use, so `import jxent` does not load Pallas.
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'jxent' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
