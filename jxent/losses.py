"""``tf.compat.v1.losses`` front door (TF 2.21 semantics)."""

from jxent._src.tf_losses import Reduction as Reduction
from jxent._src.tf_losses import compute_weighted_loss as compute_weighted_loss
from jxent._src.tf_losses import softmax_cross_entropy as softmax_cross_entropy
from jxent._src.tf_losses import sparse_softmax_cross_entropy as sparse_softmax_cross_entropy

__all__ = ["Reduction", "compute_weighted_loss", "softmax_cross_entropy",
           "sparse_softmax_cross_entropy"]
