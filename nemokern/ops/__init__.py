"""Public fused ops: dispatch between Triton kernels and torch references, plus autograd.

Must never import nemokern.parallel, model, data, train or cli (tp_group arguments are plain
torch.distributed process groups).
"""
from .sequence_kl import sequence_kl  # noqa: F401
from .logprobs import linear_logprobs, logprobs  # noqa: F401
from .reward_head import reward_head  # noqa: F401
from .linear_policy_loss import linear_policy_loss  # noqa: F401
