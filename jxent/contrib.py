"""``tf.contrib.losses`` front door (TF r1.4 semantics: logits first, mean over non-zero weights)."""

from jxent._src.tf_losses import contrib_compute_weighted_loss as compute_weighted_loss
from jxent._src.tf_losses import contrib_softmax_cross_entropy as softmax_cross_entropy

__all__ = ["compute_weighted_loss", "softmax_cross_entropy"]
