"""Advantage estimators and losses, one implementation each; the demo calls these."""

from __future__ import annotations

import torch


def rloo_advantages(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out advantages.

    scores [P, k]: the KL-regularised reward R of each of k samples of P prompts.
    valid [P, k] bool: the sample ended properly with EOS.
    Returns [P, k]: R minus the mean R of the OTHER valid samples of the same prompt; 0 for
    invalid samples and for every sample of a prompt with at most one valid sample.
    """
    if scores.dim() != 2 or valid.shape != scores.shape:
        raise ValueError(
            f"scores and valid must both be [P, k]; got {tuple(scores.shape)} and "
            f"{tuple(valid.shape)}"
        )
    valid = valid.bool()
    v = valid.to(scores.dtype)
    n = v.sum(-1, keepdim=True)
    # where, not scores * v: an invalid sample's NaN/inf score times 0 would still poison the sum
    kept = torch.where(valid, scores, torch.zeros_like(scores))
    others = (kept.sum(-1, keepdim=True) - kept) / (n - v).clamp(min=1)
    return torch.where(valid & (n > 1), scores - others, torch.zeros_like(scores))
