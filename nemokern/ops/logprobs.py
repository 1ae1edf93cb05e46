"""Public op `logprobs`: log-probs of target tokens (and entropy) from logits.

Validation, dispatch and autograd; the math lives in nemokern/kernels/logprobs.py. These
conventions hold for `linear_logprobs` (ops/linear_logprobs.py) too:
- z = logits / temperature; logp = z[target] - logsumexp(z) (float32);
  entropy = -sum_v p_v log p_v of softmax(z) (float32).
- Positions whose target == ignore_index give logp = 0 AND entropy = 0, and no gradient.
- Gradients flow from both outputs in one backward pass; a second derivative raises (the
  backward is not itself differentiable) rather than returning a wrong one.
- A nan logit in a counted row gives a nan log-prob and nan gradients in that row, as eager
  PyTorch does; ignored rows give 0 and a zero gradient whatever they hold.
- Targets outside [0, V) (other than ignore_index) raise ValueError. The check costs one small
  reduction and, on a GPU, one host sync per call; NEMOKERN_CHECK_TARGETS=0 skips it (and, with
  tp_group, the fixed-size all_gather that checks N, shard sizes and targets first). Unchecked,
  the Triton kernels never read out of bounds: `logprobs` returns NaN for such a row and
  `linear_logprobs` returns -logsumexp (the target logit counts as 0).
"""

import torch
from torch.autograd.function import once_differentiable

from ..kernels import logprobs as _k
from . import _checks
from ._dispatch import backend_for, device_guard

OP = "logprobs"


def upstream(grad, valid, keep_none=False):
    """Upstream grad as contiguous float32, zero on ignored rows (None -> zeros, or None with
    keep_none: the kernels skip or zero the entropy term themselves)."""
    if grad is None:
        if keep_none:
            return None
        return torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    return torch.where(valid, grad.float(), torch.zeros((), device=grad.device)).contiguous()


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, inv_t, ignore_index, with_entropy):
        backend = backend_for(logits)
        with device_guard(logits.device):
            parts = _k.forward(backend, logits, targets, inv_t, ignore_index, with_entropy)
        valid = targets != ignore_index
        logp, norm, entropy = _k.combine_stats(parts, valid)
        ctx.save_for_backward(logits, targets, norm, entropy)
        ctx.inv_t, ctx.ignore_index, ctx.backend = inv_t, ignore_index, backend
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_ent):
        logits, targets, norm, entropy = ctx.saved_tensors
        valid = targets != ctx.ignore_index
        g_lp, g_ent = upstream(g_lp, valid), upstream(g_ent, valid, keep_none=True)
        with device_guard(logits.device):
            grad = _k.backward(
                ctx.backend,
                logits,
                targets,
                norm,
                entropy,
                g_lp,
                g_ent,
                ctx.inv_t,
                ctx.ignore_index,
            )
        return grad, None, None, None, None


def logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    """Log-probability of each target token under softmax(logits / temperature).

    logits [..., V] any float dtype, targets [...] int64 -> logp [...] float32 (0 where
    target == ignore_index); with return_entropy, (logp, entropy [...] float32, 0 where ignored).
    Differentiable w.r.t. logits through both outputs. Never allocates an [..., V] float32
    temporary (CUDA: one Triton pass over V forward, one backward; CPU: row chunks).
    """
    _checks.tensors(OP, {"logits": logits}, float_names=("logits",))
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"{OP}: logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}"
        )
    inv_t = _checks.inv_temperature(OP, temperature)
    ignore_index = _checks.ignore_index_of(OP, ignore_index)
    flat_t = _checks.flat_targets(OP, targets, logits.shape[:-1], "logits[..., V]")
    _checks.tensors(OP, {"logits": logits, "targets": flat_t})
    vocab = logits.shape[-1]
    _checks.targets_in_vocab(OP, flat_t, vocab, ignore_index)
    x = logits.reshape(-1, vocab)
    if x.stride(-1) != 1:
        x = x.contiguous()
    logp, entropy = _LogProbs.apply(x, flat_t, inv_t, ignore_index, return_entropy)
    logp = logp.reshape(targets.shape)
    return (logp, entropy.reshape(targets.shape)) if return_entropy else logp
