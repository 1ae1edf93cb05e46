"""What the policy trainers (sft.py, reinforce.py) share: building a policy (an HF directory or
'tiny') and exporting it, its frozen copy (the reference), packing prompt/response samples without
padding (pack), the REINFORCE coefficients of a packed micro-batch (KL-regularised RLOO
advantages, micro_batch_terms) and the two modules the trainers run: TokenLogprobs (a frozen
model's log-probs of the targets) and PolicyLoss (the policy under training, whose forward is the
update's loss).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from nemokern.data.tokenizer import HFTokenizer
from nemokern.engine.config import TrainConfig, option_error
from nemokern.engine.distributed import reads_deferred, tp_group_for
from nemokern.engine.loop import TrainLoop
from nemokern.errors import ConfigError
from nemokern.model import Llama, LlamaConfig
from nemokern.model.deferred import is_deferred
from nemokern.model.reward import EXPORT_MARKER, HEAD_WEIGHTS, model_kind
from nemokern.ops import linear_logprobs, linear_policy_loss, sequence_kl
from nemokern.trainers.losses import (
    TRUNCATED,
    normalise_advantages,
    policy_gradient_coefficients,
    rloo_advantages,
)


# ---- the policy ----------------------------------------------------------------------------------
def export_policy(loop: TrainLoop, policy: Llama, tokenizer) -> None:
    """OUT/final: the policy in HF layout (under --tp a collective of each tp group, whose rank 0
    writes; under --fsdp of all processes), with an HF tokenizer's files."""
    final = Path(loop.config.out) / "final"
    if loop.writes_weights:
        policy.save_pretrained(final)
    if loop.dist.rank == 0 and isinstance(tokenizer, HFTokenizer):
        tokenizer.tok.save_pretrained(final)
    if loop.dist.active:
        torch.distributed.barrier()


def build_policy(config: TrainConfig, tokenizer, field: str = "policy") -> Llama:
    """The Llama `config.<field>` names: an HF directory, or 'tiny' (random, seeded by
    config.seed, sized for `tokenizer`; under --tp built whole on every rank and split, so it is
    the same model at every tp), split over the --tp group."""
    name = getattr(config, field)
    if name != "tiny" and not Path(name).is_dir():
        raise option_error(field, f"{name} is not a directory (nor 'tiny')")
    if name != "tiny" and (kind := model_kind(name)) in ("reward model", "reward export"):
        # its lm_head is the policy it started from, or the head's row 0: not a trained policy
        raise option_error(
            field,
            f"{name} is a {kind} ({HEAD_WEIGHTS} or {EXPORT_MARKER} in config.json), not a "
            "policy; give an HF Llama policy (train-sft's OUT/final, a base or instruct model)",
        )
    tp_group = tp_group_for(config)
    if name == "tiny":
        torch.manual_seed(config.seed)
        full = Llama(
            LlamaConfig.tiny(
                vocab_size=tokenizer.vocab_size,
                bos_token_id=tokenizer.bos_id,
                eos_token_id=list(tokenizer.eos_ids),
            )
        )
        return Llama.split_from(full, tp_group)
    return Llama.from_pretrained(
        name, dtype=torch.float32, tp_group=tp_group, deferred=reads_deferred(config)
    )


def frozen_copy(policy: Llama, dtype: torch.dtype, source=None) -> Llama:
    """An eval-mode copy of `policy` (this rank's shard under TP) in `dtype` with no gradients:
    the reference. Built empty and filled tensor by tensor, so a bf16 copy of an fp32 policy
    never holds a second fp32 one. A policy whose weights are not read yet (deferred) gets a
    deferred reference read from the same directory, `source`."""
    if is_deferred(policy):
        ref = Llama.from_pretrained(source, dtype=dtype, tp_group=policy.tp_group, deferred=True)
        return ref.eval().requires_grad_(False)
    weight = policy.embed_tokens.weight
    if weight.dtype == dtype:
        return copy.deepcopy(policy).eval().requires_grad_(False)
    ref = Llama.empty(policy.config, dtype=dtype, device=weight.device, tp_group=policy.tp_group)
    with torch.no_grad():
        for name, target in ref.named_parameters():
            target.copy_(policy.get_parameter(name))
    return ref.eval().requires_grad_(False)


# ---- samples -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleGroups:
    """n_prompts prompts sampled k times each, a prompt's k samples consecutive: sample i is
    sample i % k of prompt i // k. The layout of a rollout's samples, of pack()'s shared prompts
    and of the RLOO advantages' [n_prompts, k] grid."""

    k: int
    n_prompts: int

    @classmethod
    def of(cls, n_samples: int, k: int) -> SampleGroups:
        """The groups of `n_samples` samples, k per prompt; ValueError unless they are whole."""
        if k < 1 or n_samples % k:
            raise ValueError(f"{n_samples} samples are not whole groups of k = {k}")
        return cls(k, n_samples // k)

    @property
    def n_samples(self) -> int:
        return self.n_prompts * self.k

    def repeat(self, per_prompt: Sequence) -> list:
        """One item per sample [n_samples] from one per prompt [n_prompts]."""
        return [x for x in per_prompt for _ in range(self.k)]

    def grid(self, per_sample: torch.Tensor) -> torch.Tensor:
        """[n_samples] -> [n_prompts, k] (a view)."""
        return per_sample.view(self.n_prompts, self.k)

    def samples(self, first_prompt: int, end_prompt: int) -> tuple[int, int]:
        """(start, end) of the samples of prompts first_prompt, ..., end_prompt - 1."""
        return first_prompt * self.k, end_prompt * self.k

    def firsts(self) -> range:
        """Each prompt's first sample."""
        return range(0, self.n_samples, self.k)


def pack(prompts: list, responses: list[torch.Tensor], k: int | None = None) -> dict:
    """One packed micro-batch of samples (prompt + response each).

    input_ids [N], cu_seqlens [S + 1] int32 (the model's segments), targets [N] (the next token
    at the positions that predict a response token, -100 elsewhere), last_index [n] (each
    sample's last token), sample_cu [n + 1] int64 (sample i's rows are
    sample_cu[i]:sample_cu[i + 1]; every response row falls in its own sample's range).

    k None: the samples back to back (S = n segments, sample_cu = cu_seqlens). k given: every k
    consecutive samples share their prompt, which is packed once: a segment with the prompt but
    its last token, then k segments of [last prompt token, response] that continue it (parents
    [S] int64, -1 for the prompt segments; Llama.hidden_states(..., parents=...)). A group's
    first sample's rows also hold the prompt segment (whose targets are all -100)."""
    if k is None:
        seqs = [
            torch.cat([torch.as_tensor(p, dtype=torch.long), r.long().cpu()])
            for p, r in zip(prompts, responses)
        ]
        ids = torch.cat(seqs)
        cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor([s.numel() for s in seqs]).cumsum(0)
        targets = torch.full_like(ids, -100)
        for i, (p, s) in enumerate(zip(prompts, seqs)):
            start = int(cu[i])
            targets[start + len(p) - 1 : start + s.numel() - 1] = s[len(p) :]
        return {
            "input_ids": ids,
            "cu_seqlens": cu,
            "targets": targets,
            "last_index": cu[1:].long() - 1,
            "sample_cu": cu.long(),
        }
    groups = SampleGroups.of(len(prompts), k)
    segments, parents, targets, sample_ends = [], [], [], []
    n = 0
    for g in groups.firsts():
        prompt = torch.as_tensor(prompts[g], dtype=torch.long)
        if any(
            prompts[g + j] is not prompts[g]
            and not torch.equal(torch.as_tensor(prompts[g + j], dtype=torch.long), prompt)
            for j in range(1, k)
        ):
            raise ValueError(f"samples {g} ... {g + k - 1} do not share one prompt")
        root = -1
        if prompt.numel() > 1:
            root = len(segments)
            segments.append(prompt[:-1])
            parents.append(-1)
            targets.append(torch.full((prompt.numel() - 1,), -100, dtype=torch.long))
            n += prompt.numel() - 1
        for r in responses[g : g + k]:
            r = r.long().cpu()
            segments.append(torch.cat([prompt[-1:], r]))
            parents.append(root)
            targets.append(torch.cat([r, torch.tensor([-100])]))
            n += r.numel() + 1
            sample_ends.append(n)
    lengths = torch.tensor([s.numel() for s in segments])
    cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    sample_cu = torch.tensor([0] + sample_ends, dtype=torch.long)
    return {
        "input_ids": torch.cat(segments),
        "cu_seqlens": cu,
        "parents": torch.tensor(parents, dtype=torch.long),
        "targets": torch.cat(targets),
        "last_index": sample_cu[1:] - 1,
        "sample_cu": sample_cu,
    }


# ---- the update's coefficients and loss ----------------------------------------------------------
@dataclass(frozen=True)
class PolicyLossSpec:
    """What the policy's log-probs, the REINFORCE coefficients and the update's loss depend on
    (ReinforceConfig.loss_spec() fills it from the options of the same names). The defaults are
    a plain loss: log-probs at temperature 1, no ratio clipping (all that SFT uses)."""

    temperature: float = 1.0  # every log-prob divides the logits by it
    clip: tuple[float, float] | None = None  # (eps_low, eps_high) of the ratio; None: no ratio
    k: int = 1  # samples per prompt (SampleGroups)
    beta: float = 0.0  # R = r - beta * KL
    kl_estimator: str = "abs"  # sequence_kl's estimator and reduction
    kl_reduction: str = "mean"
    truncated: str = "zero-advantage"  # kl_regularised_advantages' truncation handling
    truncation_penalty: float | None = None
    normalize_advantages: bool = False
    loss_normalisation: str = "token-mean"  # losses.policy_gradient_coefficients'


def kl_regularised_advantages(
    rewards,
    kl,
    ended,
    k: int,
    *,
    beta: float,
    truncation_penalty=None,
    truncated: str = "zero-advantage",
):
    """(R, advantages), both [P * k] float64, for P prompts of k samples (each prompt's k
    contiguous).

    R = r - beta * KL. A sample that did not end (no EOS or stop string), by `truncated`:
    zero-advantage: out of the baselines, advantage 0; trained: out of the baselines, advantage
    R minus the mean R of the prompt's ended samples; kept (also whenever truncation_penalty is
    given): like any other sample, with R - truncation_penalty. Advantages: RLOO
    (losses.rloo_advantages).
    """
    if truncated not in TRUNCATED:
        raise ConfigError(f"{truncated!r}; choose one of {TRUNCATED}", option="truncated")
    scores = rewards.double() - beta * kl.double()
    valid = ended.bool()
    if truncated == "kept" or truncation_penalty is not None:  # a penalty implies kept
        if truncation_penalty is not None:
            scores = torch.where(valid, scores, scores - truncation_penalty)
        valid = torch.ones_like(valid)
    groups = SampleGroups.of(scores.numel(), k)
    adv = rloo_advantages(
        groups.grid(scores), groups.grid(valid), train_invalid=truncated == "trained"
    ).flatten()
    return scores, adv


class Terms(NamedTuple):
    """What micro_batch_terms forms for one micro-batch."""

    coef: torch.Tensor  # [N] float32: the update's loss is sum_t coef_t * logp_t
    weight: int  # what the step's mean counts this micro-batch as (tokens or samples)
    stats: dict  # sums of kl, score, entropy, advantage, advantage_sq
    samples: dict  # per sample [S] float64: kl, score (R), baseline, advantage; logprobs [N]


def micro_batch_terms(
    logprobs, entropy, ref_logprobs, targets, sample_cu, rewards, ended, spec: PolicyLossSpec
):
    """One packed micro-batch of whole prompts (spec.k samples each): Terms (the update's
    coefficients by spec.loss_normalisation, losses.policy_gradient_coefficients, and the sums of
    its statistics). logprobs/entropy [N] of the policy, ref_logprobs [N] of the reference,
    targets [N] (-100 off the responses), sample_cu [S + 1] (sample s's rows, as pack() gives
    them), rewards [S] float64 and ended [S] bool per sample."""
    mask = targets != -100
    kl = sequence_kl(
        logprobs,
        ref_logprobs,
        mask,
        estimator=spec.kl_estimator,
        reduction=spec.kl_reduction,
        cu_seqlens=sample_cu,
    ).double()
    lengths = (sample_cu[1:] - sample_cu[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    per_seq_entropy = torch.zeros(lengths.numel(), dtype=torch.float64, device=lengths.device)
    per_seq_entropy.index_add_(0, seq, (entropy * mask).double())
    scores, raw = kl_regularised_advantages(
        rewards,
        kl,
        ended,
        spec.k,
        beta=spec.beta,
        truncation_penalty=spec.truncation_penalty,
        truncated=spec.truncated,
    )
    adv = raw
    if spec.normalize_advantages:
        adv = normalise_advantages(raw, ended.bool() | (spec.truncated != "zero-advantage"))
    coef, weight = policy_gradient_coefficients(adv, seq, mask, spec.loss_normalisation)
    a = adv.double()
    stats = {
        "kl": float(kl.sum()),
        "score": float(scores.double().sum()),
        "entropy": float(per_seq_entropy.sum()),
        "advantage": float(a.sum()),
        "advantage_sq": float((a * a).sum()),
    }
    samples = {
        "kl": kl,
        "score": scores.double(),
        "baseline": scores.double() - raw.double(),
        "advantage": a,
        "logprobs": logprobs.detach(),
    }
    return Terms(coef, weight, stats, samples)


def policy_gradient_loss(
    hidden,
    weight,
    targets,
    coef,
    *,
    temperature: float = 1.0,
    tp_group=None,
    old_logprobs=None,
    clip=None,
):
    """(loss, metrics) of the targets under softmax(hidden @ weight.T / temperature): loss =
    sum_t coef_t * logp_t, the REINFORCE update's loss when coef_t = -(R - b)/n_tokens on
    response tokens (targets -100 elsewhere), metrics {}. With old_logprobs [N] (the sampling
    policy's log-probs) and clip = (eps_low, eps_high): loss = sum_t max(coef_t r_t, coef_t
    clip(r_t, 1 - eps_low, 1 + eps_high)) with r = exp(logp - old_logprobs), and metrics the
    response tokens' clip_fraction and ratio_mean. hidden [N, H], weight [V, H], targets [N],
    coef [N] float32. Fused: the gradients w.r.t. hidden and weight are formed in the forward,
    no [N, V] logits. With tp_group, weight is this rank's vocabulary shard."""
    if old_logprobs is None:
        loss = linear_policy_loss(
            hidden, weight, targets, coef, temperature=temperature, tp_group=tp_group
        )
        return loss, {}
    loss, ratio, clipped = linear_policy_loss(
        hidden,
        weight,
        targets,
        coef,
        old_logprobs=old_logprobs,
        clip=clip,
        temperature=temperature,
        tp_group=tp_group,
        return_ratio=True,
    )
    n = max(int((targets != -100).sum()), 1)
    return loss, {"clip_fraction": float(clipped.sum()) / n, "ratio_mean": float(ratio.sum()) / n}


def _head(model: Llama, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's weight in the hidden states' dtype (bf16 under autocast; the cast is
    differentiable, so the fp32 master weight gets its gradient)."""
    w = model.lm_head.weight
    return w if w.dtype == hidden.dtype else w.to(hidden.dtype)


def policy_terms(
    policy, hidden, targets, sample_cu, ref_logprobs, rewards, ended, spec: PolicyLossSpec
):
    """micro_batch_terms from the policy's hidden states [N, H] (detached: the coefficients carry
    no gradient): its log-probs and entropy of the targets at spec.temperature, through
    the LM head (this rank's vocabulary shard under tensor parallelism). Returns Terms; its
    samples["logprobs"] are the log-probs [N]."""
    with torch.no_grad():
        lp, ent = linear_logprobs(
            hidden.detach(),
            _head(policy, hidden).detach(),
            targets,
            temperature=spec.temperature,
            return_entropy=True,
            tp_group=policy.tp_group,
        )
        return micro_batch_terms(lp, ent, ref_logprobs, targets, sample_cu, rewards, ended, spec)


class TokenLogprobs(nn.Module):
    """A frozen Llama's log-probs [N] of packed targets at `temperature` (the rollout's reference
    log-probs): its trunk and LM head in one forward, so that under --fsdp the root's parameters
    (embedding, final norm, LM head) are gathered for the whole of it."""

    def __init__(self, model: Llama, temperature: float = 1.0):
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, input_ids, cu_seqlens, targets, parents=None):
        hidden = self.model.hidden_states(input_ids, cu_seqlens=cu_seqlens, parents=parents)
        return linear_logprobs(
            hidden,
            _head(self.model, hidden),
            targets,
            temperature=self.temperature,
            tp_group=self.model.tp_group,
        )


class PolicyLoss(nn.Module):
    """The policy under training; its forward is the update's loss, so DDP sees the whole pass."""

    def __init__(self, policy: Llama, spec: PolicyLossSpec = PolicyLossSpec()):
        super().__init__()
        self.policy, self.spec = policy, spec
        self.terms: Terms | None = None
        self.metrics: dict = {}

    def forward(
        self,
        input_ids,
        cu_seqlens,
        targets,
        coef=None,
        ref_logprobs=None,
        rewards=None,
        ended=None,
        parents=None,
        sample_cu=None,
        old_logprobs=None,
    ):
        """The loss for given coef; or, with coef None, coef from this very forward's
        (detached) log-probs of the targets and the rollout's ref_logprobs, rewards and ended
        (micro_batch_terms over the samples sample_cu delimits; its Terms are left in
        self.terms): the policy log-probs that the KL needs, taken from the update's forward
        instead of a no-grad forward of their own. parents: pack()'s shared prompts. With ratio
        clipping (spec.clip), the ratio is to old_logprobs, the rollout's log-probs of
        the policy (with coef None: this forward's own, the policy that sampled), and
        policy_gradient_loss's metrics are left in self.metrics."""
        hidden = self.policy.hidden_states(input_ids, cu_seqlens=cu_seqlens, parents=parents)
        if coef is None:
            self.terms = policy_terms(
                self.policy,
                hidden,
                targets,
                cu_seqlens if sample_cu is None else sample_cu,
                ref_logprobs,
                rewards,
                ended,
                self.spec,
            )
            coef, old_logprobs = self.terms.coef, self.terms.samples["logprobs"]
        loss, self.metrics = policy_gradient_loss(
            hidden,
            _head(self.policy, hidden),
            targets,
            coef,
            temperature=self.spec.temperature,
            tp_group=self.policy.tp_group,
            old_logprobs=None if self.spec.clip is None else old_logprobs,
            clip=self.spec.clip,
        )
        return loss
