"""The pieces of a REINFORCE rollout and the loop that makes one every `updates_per_rollout`
optimizer steps: reward sources (a Python function with TRL's signature, a reward-model
directory), the KL-regularised RLOO advantages and update coefficients of a micro-batch, the
update's loss module (PolicyLoss), packing, and RolloutLoop. reinforce.py puts them
together into ReinforceTrainer.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from nemokern.engine.config import option_error
from nemokern.engine.loop import NonFiniteError, TrainLoop
from nemokern.model import Llama, RewardModel
from nemokern.model.reward import HEAD_WEIGHTS, check_reward_directory, check_trained
from nemokern.ops import linear_logprobs, linear_policy_loss, sequence_kl
from nemokern.trainers.losses import (
    TRUNCATED,
    normalise_advantages,
    policy_gradient_coefficients,
    rloo_advantages,
)

PHASES = ("generate_s", "score_s", "logprobs_s")
DEFERRED_SUMS = ("kl", "score", "entropy", "advantage", "advantage_sq")  # micro_batch_terms


# ---- the pieces of a rollout ---------------------------------------------------------------------
def load_reward_fn(spec: str) -> Callable:
    """The function named by 'module:function' (the module importable from sys.path)."""
    module_name, sep, name = spec.partition(":")
    if not (sep and module_name and name):
        raise option_error(
            "reward_fn", f"{spec!r} is not 'module:function' (e.g. my_rewards:exact_match)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise option_error(
            "reward_fn",
            f"cannot import module {module_name!r} ({e}); put its directory on "
            "PYTHONPATH or install it",
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise option_error(
            "reward_fn",
            f"module {module_name!r} ({getattr(module, '__file__', '?')}) has no function {name!r}",
        )
    return fn


def load_reward_model(
    path, attribute: str, tp_group=None, dtype=torch.float32, deferred=False
) -> tuple[RewardModel, int]:
    """(model, column) for a reward-model directory: RewardModel's layout (the head in
    reward_head.safetensors, column = `attribute`) or the Nemotron-Reward-HF layout (a plain Llama
    whose lm_head row 0 is the head, plus config.json's nemokern_reward_bias if any; column 0).
    deferred: read once sharded (RewardModel.from_pretrained)."""
    path = Path(path)
    if not path.is_dir():
        raise option_error("reward_model", f"{path} is not a directory")
    check_reward_directory(path, "--reward-model")
    model = RewardModel.load_any(path, dtype=dtype, tp_group=tp_group, deferred=deferred)
    if (path / HEAD_WEIGHTS).exists():
        if attribute not in model.attributes:
            raise option_error(
                "attribute",
                f"{attribute!r} is not an output of {path}'s head: {list(model.attributes)}",
            )
        check_trained(model.trained_attributes, attribute, "--attribute")
        return model, model.attributes.index(attribute)
    return model, 0


def stop_length(ids: list[int], decode: Callable, stop_strings) -> int | None:
    """The length of the shortest prefix of the response `ids` whose decoded text (special
    tokens kept) ends with one of `stop_strings`; None if none does. One decode when the text
    holds no stop string; otherwise a bisection for the first prefix that holds one (a longer
    prefix decodes to a longer text), then a scan from there for one that ends with one."""
    stops = tuple(stop_strings)
    if not any(s in decode(ids) for s in stops):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        text = decode(ids[:mid])
        if any(s in text for s in stops):
            hi = mid
        else:
            lo = mid + 1
    return next((n for n in range(lo, len(ids) + 1) if decode(ids[:n]).endswith(stops)), None)


class RewardFunctionError(RuntimeError):
    """The user's reward function raised: the message names it, the chained exception (and its
    traceback) is the function's own."""


def check_reward_fn(fn: Callable, columns: list[str], where: str) -> None:
    """That `fn` can be called as fn(prompts=..., completions=..., **columns), the prompts file
    `where`'s other columns being those keyword lists (TRL's convention); checked before any
    step, so that a mismatch does not surface at the first rollout."""
    clash = sorted({"prompts", "completions"} & set(columns))
    if clash:
        raise ValueError(
            f"{where}: column {clash[0]!r} would be passed to the reward function as a keyword "
            "it already receives (prompts=, completions=); rename the column"
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or extension function: nothing to check
        return
    try:
        signature.bind(prompts=[], completions=[], **dict.fromkeys(columns, []))
    except TypeError as e:
        name = getattr(fn, "__qualname__", repr(fn))
        raise option_error(
            "reward_fn",
            f"{name}{signature} cannot be called as fn(prompts=..., completions=..."
            + "".join(f", {c}=..." for c in columns)
            + f") ({e}); the columns come from {where}: accept them or **kwargs, "
            "as TRL's fn(prompts, completions, **kwargs)",
        ) from None


def completion(prompt, text: str):
    """A completion as a reward function receives it: the text, or for a prompt given as chat
    turns one assistant message [{"role": "assistant", "content": text}] (how TRL's GRPO and
    RLOO trainers pass completions of conversational prompts)."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _reward_values(out) -> list | None:
    """The rewards a function returned as a list of Python numbers, or None if they are not a
    1-D sequence of real numbers (bools count as 0/1)."""
    if isinstance(out, torch.Tensor | np.ndarray):
        return out.tolist() if out.ndim == 1 else None
    if not isinstance(out, list | tuple):
        return None  # a str, a dict, a scalar, a generator: not one reward per completion
    values = [v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v for v in out]
    return values if all(isinstance(v, numbers.Real) for v in values) else None


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[0]["content"]


def call_reward_fn(fn: Callable, prompts: list, completions: list, columns: dict) -> torch.Tensor:
    """fn(prompts=..., completions=..., **columns) as float64 [n]; errors name the function.
    completions: strings, or message lists (see `completion`)."""
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        out = fn(prompts=prompts, completions=completions, **columns)
    except Exception as e:
        raise RewardFunctionError(f"reward function {name} raised {type(e).__name__}: {e}") from e
    values = _reward_values(out)
    if values is None:
        shown = " ".join(repr(out).split())[:80]
        raise ValueError(
            f"reward function {name} must return a list (or 1-D array) of numbers, one per "
            f"completion; got {type(out).__name__} {shown}"
        )
    values = [float(v) for v in values]
    if len(values) != len(completions):
        raise ValueError(
            f"reward function {name} returned {len(values)} rewards for {len(completions)} "
            "completions"
        )
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(
            f"reward function {name} returned a non-finite reward for completion {bad[0]} "
            f"({values[bad[0]]}): {_text(completions[bad[0]])[:80]!r}"
        )
    return torch.tensor(values, dtype=torch.float64)


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
    (train/losses.rloo_advantages).
    """
    if truncated not in TRUNCATED:
        raise ValueError(f"truncated={truncated!r}; choose one of {TRUNCATED}")
    scores = rewards.double() - beta * kl.double()
    valid = ended.bool()
    if truncated == "kept" or truncation_penalty is not None:  # a penalty implies kept
        if truncation_penalty is not None:
            scores = torch.where(valid, scores, scores - truncation_penalty)
        valid = torch.ones_like(valid)
    adv = rloo_advantages(
        scores.view(-1, k), valid.view(-1, k), train_invalid=truncated == "trained"
    ).flatten()
    return scores, adv


class Terms(NamedTuple):
    """What micro_batch_terms forms for one micro-batch."""

    coef: torch.Tensor  # [N] float32: the update's loss is sum_t coef_t * logp_t
    weight: int  # what the step's mean counts this micro-batch as (tokens or samples)
    stats: dict  # sums of kl, score, entropy, advantage, advantage_sq
    samples: dict  # per sample [S] float64: kl, score (R), baseline, advantage; logprobs [N]


def micro_batch_terms(logprobs, entropy, ref_logprobs, targets, sample_cu, rewards, ended, cfg):
    """One packed micro-batch of whole prompts (k samples each): Terms (the update's
    coefficients by cfg.loss_normalisation, losses.policy_gradient_coefficients, and the sums of
    its statistics). logprobs/entropy [N] of the policy, ref_logprobs [N] of the reference,
    targets [N] (-100 off the responses), sample_cu [S + 1] (sample s's rows, as pack() gives
    them), rewards [S] float64 and ended [S] bool per sample."""
    mask = targets != -100
    kl = sequence_kl(
        logprobs,
        ref_logprobs,
        mask,
        estimator=cfg.kl_estimator,
        reduction=cfg.kl_reduction,
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
        cfg.k,
        beta=cfg.beta,
        truncation_penalty=cfg.truncation_penalty,
        truncated=cfg.truncated,
    )
    adv = raw
    if cfg.normalize_advantages:
        adv = normalise_advantages(raw, ended.bool() | (cfg.truncated != "zero-advantage"))
    coef, weight = policy_gradient_coefficients(adv, seq, mask, cfg.loss_normalisation)
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


def ratio_clip(cfg) -> tuple[float, float] | None:
    """(eps_low, eps_high) of the update's importance-ratio clipping, or None (no ratio): set
    when cfg.clip_eps_low or cfg.clip_eps_high is (the unset one takes the other's value)."""
    low, high = getattr(cfg, "clip_eps_low", None), getattr(cfg, "clip_eps_high", None)
    if low is None and high is None:
        return None
    return (high if low is None else low), (low if high is None else high)


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


def policy_terms(policy, hidden, targets, sample_cu, ref_logprobs, rewards, ended, cfg):
    """micro_batch_terms from the policy's hidden states [N, H] (detached: the coefficients carry
    no gradient): its log-probs and entropy of the targets at cfg.logprob_temperature, through
    the LM head (this rank's vocabulary shard under tensor parallelism). Returns Terms; its
    samples["logprobs"] are the log-probs [N]."""
    with torch.no_grad():
        lp, ent = linear_logprobs(
            hidden.detach(),
            _head(policy, hidden).detach(),
            targets,
            temperature=cfg.logprob_temperature,
            return_entropy=True,
            tp_group=policy.tp_group,
        )
        return micro_batch_terms(lp, ent, ref_logprobs, targets, sample_cu, rewards, ended, cfg)


def add_sums(into: dict, stats: dict) -> None:
    """Add a micro-batch's statistics (micro_batch_terms) to its step's sums."""
    for name, value in stats.items():
        into[name] += value


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

    def __init__(self, policy: Llama, temperature: float = 1.0, config=None):
        super().__init__()
        self.policy, self.temperature, self.config = policy, temperature, config
        self.clip = ratio_clip(config)
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
        clipping (config's clip_eps_*), the ratio is to old_logprobs, the rollout's log-probs of
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
                self.config,
            )
            coef, old_logprobs = self.terms.coef, self.terms.samples["logprobs"]
        loss, self.metrics = policy_gradient_loss(
            hidden,
            _head(self.policy, hidden),
            targets,
            coef,
            temperature=self.temperature,
            tp_group=self.policy.tp_group,
            old_logprobs=None if self.clip is None else old_logprobs,
            clip=self.clip,
        )
        return loss


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
    if len(prompts) % k:
        raise ValueError(f"{len(prompts)} samples are not whole groups of k = {k}")
    segments, parents, targets, sample_ends = [], [], [], []
    n = 0
    for g in range(0, len(prompts), k):
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


# ---- the loop ------------------------------------------------------------------------------------
class RolloutLoop(TrainLoop):
    """TrainLoop whose micro-batches come from rollouts: every `updates_per_rollout` steps,
    `rollout(first_step, groups)` (groups[s][m]: the prompt group of micro-batch m of step
    first_step + s, as micro_batch_indices orders them) returns
    {"steps": [[batch, ...] per step], "sums": [{name: float} per step], "seconds": {phase: s}}.
    An unfinished rollout is saved in every checkpoint (extra_state), so a resume inside it
    trains on the same samples. Each step's record adds the rollout's statistics of that step's
    samples (summed over processes) and the seconds per phase (0 on steps that made no rollout)."""

    def __init__(self, config, model, data, step_fn, *, rollout, updates_per_rollout: int):
        super().__init__(config, model, data, step_fn)
        self.rollout_fn, self.updates = rollout, updates_per_rollout
        self.rollout: dict | None = None
        self.seconds: dict = {}
        self.no_eos_steps, self.warned_no_eos = 0, False  # _check_eos

    def _covers(self, step: int) -> bool:
        r = self.rollout
        return r is not None and r["first"] <= step < r["first"] + len(r["steps"])

    def micro_batches(self, step):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        if not self._covers(step):
            end = min((step // self.updates + 1) * self.updates, self.total_steps)
            groups = [[self.data[i] for i in self.micro_batch_indices(s)] for s in range(step, end)]
            made = self.rollout_fn(step, groups)
            self.rollout = {"first": step, "steps": made["steps"], "sums": made["sums"]}
            self.seconds = made["seconds"]
        batches = self.rollout["steps"][step - self.rollout["first"]]
        return [
            (f"step {step + 1} micro-batch {j} (rollout from step {self.rollout['first'] + 1})", b)
            for j, b in enumerate(batches)
        ]

    def extra_state(self) -> dict:
        # self.step steps are done; keep the rollout while some of its steps are still to come
        return {"rollout": self.rollout} if self._covers(self.step) else {}

    def load_extra_state(self, state: dict) -> None:
        self.rollout = state.get("rollout")

    def add_to_step(self, stats: dict) -> None:
        """Add statistics formed during the update (micro_batch_terms) to the current step's."""
        add_sums(self.rollout["sums"][self.step - self.rollout["first"]], stats)

    def _train_step(self) -> dict:
        # TrainLoop has no public hook for adding to a step's record; this wraps its step.
        step = self.step
        try:
            metrics = super()._train_step()
        except NonFiniteError as e:
            raise NonFiniteError(f"{e}; {self._reward_size(step)}") from None
        sums = self.rollout["sums"][step - self.rollout["first"]]
        names = sorted(sums)
        s = dict(zip(names, self._reduce([torch.tensor(float(sums[k])) for k in names])))
        n, tok = max(s["samples"], 1.0), max(s["response_tokens"], 1.0)

        def std(total, squares):
            return math.sqrt(max(squares / n - (total / n) ** 2, 0.0))

        metrics.update(
            reward_mean=s["reward"] / n,
            reward_std=std(s["reward"], s["reward_sq"]),
            kl_mean=s["kl"] / n,
            score_mean=s["score"] / n,
            response_len_mean=s["response_tokens"] / n,
            eos_fraction=s["eos"] / n,
            entropy=s["entropy"] / tok,
            advantage_mean=s["advantage"] / n,
            advantage_std=std(s["advantage"], s["advantage_sq"]),
            **self.seconds,
            update_s=max(metrics["step_s"] - sum(self.seconds.values()), 0.0),
        )
        self._check_eos(step + 1, int(s["eos"]), int(s["samples"]))
        return metrics

    def _reward_size(self, step: int) -> str:
        """How large this process's rewards of `step` are, for the message of a non-finite loss
        or gradient (a reward of 1e30 makes the float32 gradient overflow)."""
        sums = self.rollout["sums"][step - self.rollout["first"]]
        rms = math.sqrt(sums["reward_sq"] / max(sums["samples"], 1))
        size = f"{rms:.3g}" if math.isfinite(rms) else "beyond 1e154"
        large = rms > 1e6
        return f"the step's rewards have a root-mean-square of {size}" + (
            " (too large for a float32 gradient: scale the reward, e.g. --reward-fn-weight or "
            "--reward-model-weight, to order 1)"
            if large
            else ""
        )

    def _check_eos(self, step: int, ended: int, samples: int) -> None:
        """A step none of whose samples ended (EOS or a stop string) learns nothing (every
        advantage is 0) unless truncated samples are trained (config.truncated): warn at the
        first, stop with a ValueError once more than config.allow_no_eos_steps such steps follow
        one another (-1: never)."""
        cfg = self.config
        if ended or cfg.truncated != "zero-advantage":  # truncation_penalty implies "kept"
            self.no_eos_steps = 0
            return
        self.no_eos_steps += 1
        fix = (
            f"raise --max-new-tokens (now {cfg.max_new_tokens}), or set --truncation-penalty "
            "(truncated samples then count, penalised)"
        )
        if 0 <= cfg.allow_no_eos_steps < self.no_eos_steps:
            raise ValueError(
                f"step {step}: no sample has ended with EOS for {self.no_eos_steps} steps in a "
                f"row (0 of {samples} in this one), so every advantage is 0 and nothing is "
                f"learned; {fix}; --allow-no-eos-steps N allows more such steps"
            )
        if not self.warned_no_eos and self.dist.rank == 0:
            self.warned_no_eos = True
            warnings.warn(
                f"step {step}: 0 of {samples} samples ended with EOS, so every advantage is 0 "
                f"and this step learns nothing; {fix}",
                UserWarning,
                stacklevel=2,
            )
