"""Losses and advantage estimators of the recipe, one implementation each;
the trainers and the demo call these.

Reward losses return a `LossValue(loss, count)`: the batch's mean loss and the number of terms
it averages (valid labels, or counted pairs). A trainer that accumulates micro-batches weighs each
by its count, so the global loss is the recipe's sum over the global batch / its total count.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from nemokern.errors import ConfigError
from nemokern.model.reward import ATTRIBUTES, HELPFULNESS, IGNORE_LABEL  # noqa: F401 (re-exported)

BT_KINDS = ("regular", "margin", "scaled")
TIES = ("drop", "count")  # bradley_terry_loss's tie handling
PG_NORMALISATIONS = ("token-mean", "sequence-mean", "sequence-sum")
TRUNCATED = ("zero-advantage", "trained", "kept")  # rloo_advantages' samples without EOS


class LossValue(NamedTuple):
    loss: (
        torch.Tensor
    )  # scalar float32, differentiable: the mean over the counted terms (0 if none)
    count: torch.Tensor  # scalar int64: how many terms the mean is over


def regression_loss(
    rewards: torch.Tensor, labels: torch.Tensor, *, columns=None, ignore_label: float = IGNORE_LABEL
) -> LossValue:
    """SteerLM attribute regression: sum(mask * (rewards - labels)^2) / n_valid.

    rewards [B, K] float (the reward head's outputs); labels [B, K] int or float, `ignore_label`
    (-100) where an attribute is not labelled. columns: a sequence of output columns to train
    (the helpfulness-only stage is `columns=(HELPFULNESS,)`); the labels of the other columns are
    ignored. A batch with no valid label gives loss 0 (and zero gradients), not NaN.
    """
    if rewards.dim() != 2 or labels.shape != rewards.shape:
        raise ValueError(
            f"rewards and labels must both be [B, K]; got {tuple(rewards.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if not rewards.dtype.is_floating_point:
        raise TypeError(f"rewards must be a float tensor; got {rewards.dtype}")
    mask = labels != ignore_label
    if columns is not None:
        cols = torch.as_tensor(list(columns), dtype=torch.long)
        if cols.numel() and (cols.min() < 0 or cols.max() >= rewards.shape[1]):
            raise ValueError(
                f"columns={list(columns)} out of range for K={rewards.shape[1]} outputs"
            )
        keep = torch.zeros(rewards.shape[1], dtype=torch.bool, device=labels.device)
        keep[cols.to(labels.device)] = True
        mask = mask & keep
    out = rewards.float() if rewards.dtype != torch.float64 else rewards
    # where, not mask * diff: the -100 of a masked label must not reach the square or its gradient
    diff = torch.where(mask, out - labels.to(out.dtype), torch.zeros_like(out))
    count = mask.sum()
    return LossValue(diff.square().sum() / count.clamp(min=1), count)


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    strength=None,
    *,
    kind: str = "regular",
    ties: str = "drop",
) -> LossValue:
    """Bradley-Terry pair losses on scalar rewards, averaged over the counted pairs.

    r_chosen, r_rejected [P] float: rewards of the better and the worse response (the caller has
    already ordered each pair by the sign of its preference strength). strength [P] (-3..3 in
    HelpSteer2-Preference), of which only m = |strength| is used; None means no strengths
    (e.g. RewardBench-style pairs), allowed for kind="regular" only.
      regular: -log sigmoid(r_c - r_r)
      margin:  -log sigmoid(r_c - r_r - m)
      scaled:  m * -log sigmoid(r_c - r_r)
    Ties (strength 0) have no better response. ties="drop": every kind skips them (scaled BT would
    weigh them 0 anyway), so `count` is the number of non-tie pairs and the mean is over those.
    ties="count": a tie is a pair like any other, in the order given (the hs2-preference reader
    puts response_2 first), so regular and margin BT push r_chosen above r_rejected and scaled BT
    adds a loss of 0 that still counts in the mean.
    """
    if kind not in BT_KINDS:
        raise ConfigError(f"{kind!r}; choose one of {BT_KINDS}", option="kind")
    if ties not in TIES:
        raise ConfigError(f"{ties!r}; choose one of {TIES}", option="ties")
    if r_chosen.dim() != 1 or r_rejected.shape != r_chosen.shape:
        raise ValueError(
            f"r_chosen and r_rejected must both be [P]; got {tuple(r_chosen.shape)} and "
            f"{tuple(r_rejected.shape)}"
        )
    diff = r_chosen - r_rejected
    diff = diff.float() if diff.dtype != torch.float64 else diff
    if strength is None:
        if kind != "regular":
            raise ConfigError(
                f"kind={kind!r} needs the pairs' preference strengths; got strength=None"
            )
        per_pair = -F.logsigmoid(diff)
        return LossValue(
            per_pair.sum() / max(diff.numel(), 1), torch.tensor(diff.numel(), device=diff.device)
        )
    strength = torch.as_tensor(strength, device=diff.device)
    if strength.shape != diff.shape:
        raise ValueError(
            f"strength must be [P] like the rewards; got {tuple(strength.shape)} for "
            f"P={diff.numel()}"
        )
    m = strength.abs().to(diff.dtype)
    counted = (m != 0) | (ties == "count")
    per_pair = -F.logsigmoid(diff - m if kind == "margin" else diff)
    if kind == "scaled":
        per_pair = m * per_pair
    count = counted.sum()
    per_pair = torch.where(counted, per_pair, torch.zeros_like(per_pair))
    return LossValue(per_pair.sum() / count.clamp(min=1), count)


def pair_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor, strength=None) -> torch.Tensor:
    """Share of pairs with r_chosen strictly greater than r_rejected (equal rewards count as
    wrong). With strength [P], pairs of strength 0 (preference ties: neither response is better)
    are left out, as bradley_terry_loss leaves them out; 0 when every pair is a tie."""
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(
            f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} differ"
        )
    right = r_chosen > r_rejected
    if strength is None:
        return right.float().mean()
    counted = torch.as_tensor(strength, device=right.device) != 0
    return (right & counted).sum().float() / counted.sum().clamp(min=1)


def rloo_advantages(
    scores: torch.Tensor, valid: torch.Tensor, *, train_invalid: bool = False
) -> torch.Tensor:
    """REINFORCE leave-one-out advantages.

    scores [P, k]: the KL-regularised reward R of each of k samples of P prompts.
    valid [P, k] bool: the sample ended properly (EOS or a stop string).
    Returns [P, k]: R minus the mean R of the OTHER valid samples of the same prompt; 0 for every
    sample of a prompt with at most one valid sample. An invalid sample is in no baseline; its own
    advantage is 0, or with train_invalid R minus the mean R of the prompt's valid samples.
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
    trained = valid | train_invalid
    return torch.where(trained & (n > 1), scores - others, torch.zeros_like(scores))


def normalise_advantages(advantages: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """(A - mean) / (std + 1e-4) over the samples where `trained` [S] bool is set (std with
    Bessel's correction; 0 for a single sample); the others keep advantage 0. advantages [S]."""
    a = advantages[trained]
    if a.numel() == 0:
        return advantages
    std = a.std() if a.numel() > 1 else torch.zeros((), dtype=a.dtype, device=a.device)
    out = (advantages - a.mean()) / (std + 1e-4)
    return torch.where(trained, out, torch.zeros_like(out))


def policy_gradient_coefficients(
    advantages: torch.Tensor, sample_of: torch.Tensor, mask: torch.Tensor, normalisation: str
) -> tuple[torch.Tensor, int]:
    """(coef [N] float32, weight) of a REINFORCE micro-batch: its loss is sum_t coef_t * logp_t
    over the packed rows, the mean the step averages micro-batches by `weight`, so the step's loss
    is, for S samples with advantages A_s and response tokens T_s in the whole step:
      token-mean     sum_s sum_t -A_s logp_t / sum_s |T_s|        (weight: response tokens)
      sequence-mean  mean_s (sum_t -A_s logp_t / |T_s|)            (weight: samples)
      sequence-sum   mean_s (sum_t -A_s logp_t)                    (weight: samples)
    advantages [S]; sample_of [N] int64 (each row's sample); mask [N] bool (response rows)."""
    if normalisation not in PG_NORMALISATIONS:
        raise ConfigError(
            f"{normalisation!r}; choose one of {PG_NORMALISATIONS}", option="normalisation"
        )
    n_samples = advantages.numel()
    per_row = -advantages.double()[sample_of]
    if normalisation == "token-mean":
        weight = int(mask.sum())
        per_row = per_row / max(weight, 1)
    else:
        weight = n_samples
        if normalisation == "sequence-mean":
            lengths = torch.zeros(n_samples, dtype=torch.float64, device=mask.device)
            lengths.index_add_(0, sample_of, mask.double())
            per_row = per_row / lengths.clamp(min=1)[sample_of]
        per_row = per_row / max(n_samples, 1)
    return torch.where(mask, per_row, torch.zeros_like(per_row)).float(), weight
