"""ReinforceConfig: every option of `nemokern train-reinforce` (recipe.md section 2's defaults),
its checks, and the PolicyLossSpec the update's loss takes from them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from nemokern.engine.config import SCHEDULES, ConfigError, TrainConfig, option, option_error
from nemokern.trainers import presets
from nemokern.trainers.losses import PG_NORMALISATIONS, TRUNCATED
from nemokern.trainers.policy import PolicyLossSpec

KL_ESTIMATORS = ("k1", "abs", "k2", "k3")


@dataclass
class ReinforceConfig(TrainConfig):
    """Everything `nemokern train-reinforce` takes. Defaults: recipe.md section 2 (NeMo-Aligner's
    k = 4, temperature 1, beta 0.01, |k1| masked-mean KL, lr 9e-7 cosine to 9e-8)."""

    PRESETS: ClassVar[dict[str, dict]] = presets.REINFORCE
    RESUME_CHANGEABLE: ClassVar[tuple[str, ...]] = (
        *TrainConfig.RESUME_CHANGEABLE,
        "generation_batch_size",
        "offload",
        "allow_no_eos_steps",
        "save_rollouts",
    )

    lr: float = option(9e-7, "peak learning rate (recipe: 9e-7)")
    schedule: str = option("cosine", "learning-rate schedule after the warmup", choices=SCHEDULES)
    min_lr: float = option(9e-8, "final learning rate of the cosine schedule")
    policy: str = option(
        "tiny",
        "the initial policy (and reference): an HF Llama directory, or 'tiny' for "
        "a small random Llama-3.1",
    )
    tokenizer: str = option("byte", "a local HF tokenizer directory, or 'byte' (built in)")
    prompts: str = option(
        "",
        "prompts file: .jsonl, .jsonl.gz or .parquet with a `prompt` column (a string "
        "or chat turns); other columns go to --reward-fn as keyword lists",
    )
    reward_model: str = option(
        "",
        "a reward model directory (RewardModel's layout with reward_head.*, or "
        "the Nemotron-Reward-HF layout: lm_head row 0 on the last token)",
    )
    reward_fn: str = option(
        "",
        "a Python reward 'module:function' with TRL's signature "
        "fn(prompts, completions, **columns) -> list[float]",
    )
    reward_model_weight: float = option(1.0, "weight of the reward model's score in r")
    reward_fn_weight: float = option(1.0, "weight of the reward function's score in r")
    attribute: str = option(
        "helpfulness",
        "the reward model's output used as the reward (a head with "
        "one output, e.g. Nemotron-Reward-HF, has only that one)",
    )
    k: int = option(4, "samples per prompt (RLOO needs at least 2)")
    max_new_tokens: int = option(
        256, "longest response; a sample that reaches it without EOS is truncated"
    )
    temperature: float = option(1.0, "sampling temperature (also used for every log-prob)")
    top_p: float = option(1.0, "nucleus sampling mass (1: off)")
    top_k: int = option(0, "sample among the k most likely tokens (0: off)")
    beta: float = option(0.01, "KL coefficient: R = r - beta * KL")
    kl_estimator: str = option(
        "abs", "per-token KL estimate (abs: |logp - logp_ref|, NeMo-Aligner)", choices=KL_ESTIMATORS
    )
    kl_reduction: str = option(
        "mean",
        "per-sequence KL: masked mean or sum over the response tokens",
        choices=("mean", "sum"),
    )
    truncation_penalty: float | None = option(
        None,
        "count truncated samples (no EOS or stop string) in the baseline with R - this penalty "
        "(implies --truncated kept)",
    )
    truncated: str = option(
        "zero-advantage",
        "samples that end without EOS or a stop string: zero-advantage (out of the baselines, "
        "advantage 0, counted in the loss's mean), trained (out of the baselines, advantage R "
        "minus the mean R of the prompt's ended samples) or kept (like any other sample)",
        choices=TRUNCATED,
    )
    loss_normalisation: str = option(
        "token-mean",
        "the update's loss over a step's samples s with advantage A_s: token-mean (sum of "
        "-A_s logp_t over every response token / their number), sequence-mean (mean over samples "
        "of -A_s times the sample's mean logp_t) or sequence-sum (mean over samples of -A_s "
        "times the sample's summed logp_t)",
        choices=PG_NORMALISATIONS,
    )
    normalize_advantages: bool = option(
        False,
        "scale each micro-batch's advantages to mean 0, std 1 (std + 1e-4) over its trained "
        "samples",
    )
    temperature_in_logprobs: bool = option(
        True, "divide the logits by --temperature in every log-prob (off: the raw logits)"
    )
    stop_strings: list[str] = option(
        [],
        "a sample also ends (and counts as ended) when its decoded text ends with one of these; "
        "it is cut there, the stop string kept",
    )
    save_rollouts: int = option(
        0,
        "every N steps write OUT/rollouts/step-XXXXXXXX.jsonl, one line per sample of the step "
        "(0: never)",
    )
    allow_no_eos_steps: int = option(
        4,
        "consecutive steps in which no sample ends with EOS (without --truncation-penalty "
        "every advantage is then 0: nothing is learned) that a run allows; the first warns, one "
        "more than this stops the run; -1: any number",
    )
    prompts_per_step: int = option(
        8, "prompts per optimizer step (each sampled k times) on all processes"
    )
    updates_per_rollout: int = option(
        1, "optimizer steps each rollout is split into (its prompts are prompts_per_step x this)"
    )
    clip_eps_low: float | None = option(
        None,
        "importance-ratio clipping of the update: the ratio r to the log-probs of the policy "
        "that sampled is clipped below at 1 - this (in [0, 1)), loss -min(r A, clip(r) A); "
        "unset (and --clip-eps-high unset): no ratio, loss -logp A; unset alone: "
        "--clip-eps-high's value",
    )
    clip_eps_high: float | None = option(
        None, "importance-ratio clipping: r clipped above at 1 + this; unset: --clip-eps-low's"
    )
    generation_batch_size: int = option(
        0,
        "sequences per generate() call, rounded down to whole prompts' k samples (0: the "
        "whole rollout at once)",
    )
    offload: bool = option(
        False, "keep the reference and the reward model on the CPU between rollouts (CUDA)"
    )
    frozen_dtype: str = option(
        "float32",
        "dtype of the frozen reference and reward model: bfloat16 halves their memory (under "
        "CUDA's bf16 autocast their matmuls read the same bf16 weights either way; the "
        "residual stream and norms then run in bf16 too)",
        choices=("float32", "bfloat16"),
    )
    shared_prompt: bool = option(
        True,
        "pack each prompt once for its k samples in the reward-model, reference and update "
        "forwards (its k responses attend to that one copy); off: k full copies",
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("k", "max_new_tokens", "prompts_per_step", "updates_per_rollout"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} = {getattr(self, name)} must be at least 1")
        if self.allow_no_eos_steps < -1:
            raise ConfigError(
                f"allow_no_eos_steps = {self.allow_no_eos_steps} must be >= 0, or -1 (any number)"
            )
        if self.truncation_penalty is not None:
            if self.truncated == "trained":
                raise option_error(
                    "truncation_penalty",
                    "applies to samples kept in the baselines; --truncated trained leaves them "
                    "out: drop one of the two",
                )
            self.truncated = "kept"  # the penalty's meaning since it exists
        if any(not s for s in self.stop_strings):
            raise option_error("stop_strings", "an empty stop string would end every sample")
        for name in ("top_k", "generation_batch_size", "beta", "save_rollouts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} = {getattr(self, name)} must not be negative")
        for name in ("clip_eps_low", "clip_eps_high"):
            eps = getattr(self, name)
            if eps is not None and not eps >= 0:  # nan too
                raise option_error(
                    name, f"{eps} must be >= 0 (r is clipped to [1 - low, 1 + high])"
                )
        low = self.clip_eps_high if self.clip_eps_low is None else self.clip_eps_low
        if low is not None and low >= 1:  # a ratio exp(logp - old) is > 0: that clip never binds
            taken = " (taken from --clip-eps-high)" if self.clip_eps_low is None else ""
            raise option_error(
                "clip_eps_low",
                f"{low}{taken} puts the lower clip 1 - {low} at or below 0, which no ratio "
                "reaches: it would never clip; give a value in [0, 1)",
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(
                f"temperature = {self.temperature} must be > 0 (the log-probs divide by it)"
            )
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p = {self.top_p} must be in (0, 1]")

    @property
    def logprob_temperature(self) -> float:
        """The temperature every log-prob divides the logits by."""
        return self.temperature if self.temperature_in_logprobs else 1.0

    def loss_spec(self) -> PolicyLossSpec:
        """What the update's loss and coefficients take from these options. Ratio clipping is on
        when clip_eps_low or clip_eps_high is set (the unset one takes the other's value)."""
        low, high = self.clip_eps_low, self.clip_eps_high
        clip = (
            None
            if low is None and high is None
            else (
                high if low is None else low,
                low if high is None else high,
            )
        )
        return PolicyLossSpec(
            temperature=self.logprob_temperature,
            clip=clip,
            k=self.k,
            beta=self.beta,
            kl_estimator=self.kl_estimator,
            kl_reduction=self.kl_reduction,
            truncated=self.truncated,
            truncation_penalty=self.truncation_penalty,
            normalize_advantages=self.normalize_advantages,
            loss_normalisation=self.loss_normalisation,
        )
