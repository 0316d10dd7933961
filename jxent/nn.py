"""``tf.nn`` front door: the TF 2.21 softmax cross-entropy functions."""

from jxent._src.tf_nn import softmax_cross_entropy_with_logits as softmax_cross_entropy_with_logits
from jxent._src.tf_nn import (
    softmax_cross_entropy_with_logits_v2 as softmax_cross_entropy_with_logits_v2,
)
from jxent._src.tf_nn import (
    sparse_softmax_cross_entropy_with_logits as sparse_softmax_cross_entropy_with_logits,
)

__all__ = [
    "softmax_cross_entropy_with_logits",
    "softmax_cross_entropy_with_logits_v2",
    "sparse_softmax_cross_entropy_with_logits",
]
