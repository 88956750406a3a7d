"""jaxent: cross-entropy, KL divergence and entropy losses for JAX.

Every loss is a pure function whose gradient is a hand-written ``jax.custom_vjp``
rule (the analytic ``softmax(x) - y`` family). :mod:`jaxent.reference` holds the
same functions in plain JAX, for forward-mode differentiation.
"""

from importlib import metadata as _metadata

from . import reference as reference
from ._cross_entropy import poly_loss_cross_entropy as poly_loss_cross_entropy
from ._cross_entropy import safe_softmax_cross_entropy as safe_softmax_cross_entropy
from ._cross_entropy import softmax_cross_entropy as softmax_cross_entropy
from ._cross_entropy import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,  # noqa: E501
)
from ._distill import softmax_generalized_jsd as softmax_generalized_jsd
from ._divergence import convex_kl_divergence as convex_kl_divergence
from ._divergence import cross_entropy as cross_entropy
from ._divergence import entropy as entropy
from ._divergence import generalized_kl_divergence as generalized_kl_divergence
from ._divergence import kl_divergence as kl_divergence
from ._divergence import (
    kl_divergence_with_log_targets as kl_divergence_with_log_targets,
)
from ._divergence import softmax_entropy as softmax_entropy
from ._divergence import softmax_kl_divergence as softmax_kl_divergence
from ._linear import LinearCrossEntropyAux as LinearCrossEntropyAux
from ._linear import linear_softmax_cross_entropy as linear_softmax_cross_entropy
from ._linear_distill import (
    linear_softmax_distillation as linear_softmax_distillation,
)
from ._linear_topk import linear_topk_distillation as linear_topk_distillation
from ._log_probs import linear_log_probs as linear_log_probs
from ._sigmoid import sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy
from ._sigmoid import sigmoid_focal_loss as sigmoid_focal_loss
from ._softmax import log_softmax as log_softmax
from ._softmax import softmax as softmax
from ._topk import softmax_topk_kl_divergence as softmax_topk_kl_divergence

try:
    __version__ = _metadata.version("jaxent")
except _metadata.PackageNotFoundError:
    # Imported from a source tree that was never installed: no metadata.
    __version__ = "0+unknown"

__all__ = [
    "LinearCrossEntropyAux",
    "convex_kl_divergence",
    "cross_entropy",
    "entropy",
    "generalized_kl_divergence",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "linear_log_probs",
    "linear_softmax_cross_entropy",
    "linear_softmax_distillation",
    "linear_topk_distillation",
    "log_softmax",
    "poly_loss_cross_entropy",
    "reference",
    "safe_softmax_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "softmax_entropy",
    "softmax_generalized_jsd",
    "softmax_kl_divergence",
    "softmax_topk_kl_divergence",
]
