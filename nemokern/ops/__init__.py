"""Public fused ops: validation, backend dispatch and autograd, one file per op; the math of each
lives in the kernels/ file of the same name."""

from ._dispatch import default_backend
from .linear_logprobs import linear_logprobs
from .linear_policy_loss import linear_policy_loss
from .logprobs import logprobs
from .reward_head import reward_head
from .sequence_kl import sequence_kl

__all__ = [
    "default_backend",
    "linear_logprobs",
    "linear_policy_loss",
    "logprobs",
    "reward_head",
    "sequence_kl",
]
