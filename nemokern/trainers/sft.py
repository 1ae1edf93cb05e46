"""The supervised fine-tuning trainer (`nemokern train-sft`): next-token cross-entropy on the
response tokens of prompt/response rows, the warm start of a policy before REINFORCE.

Rows are read by data/sft.py, planned into micro-batches as the reward data is (packing.py's
RewardBatches: a number of rows, or a token budget) and packed with no padding by policy.py's
`pack`. The loss is the masked token mean of -logp over the response tokens, computed by
ops.linear_policy_loss with the constant coefficient -1/n_tokens (a fused linear cross-entropy:
no [N, V] logits, the gradients formed in the forward), on the same PolicyLoss module the
REINFORCE update uses. The shared TrainLoop does the rest (accumulation weighted by tokens,
clipping, AdamW, checkpoints, exact resume, metrics, DDP). OUT/final is the policy in HF layout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from nemokern.data.packing import RewardBatches
from nemokern.data.sft import read_sft
from nemokern.data.tokenizer import load_tokenizer
from nemokern.engine.config import TrainConfig, check_data_and_batching, option
from nemokern.engine.loop import StepOutput, TrainLoop, move_to
from nemokern.model import Llama
from nemokern.trainers.policy import PolicyLoss, build_policy, export_policy, pack


@dataclass
class SFTConfig(TrainConfig):
    """Everything `nemokern train-sft` takes."""

    # the training data's content is checked on resume (TrainLoop), not its path
    RESUME_CHANGEABLE: ClassVar[tuple[str, ...]] = (
        *TrainConfig.RESUME_CHANGEABLE,
        "data",
        "eval_data",
    )

    lr: float = option(1e-5, "peak learning rate")
    model: str = option(
        "tiny", "the policy to fine-tune: an HF Llama directory, or 'tiny' for a small random one"
    )
    tokenizer: str = option("byte", "a local HF tokenizer directory, or 'byte' (built in)")
    data: str = option(
        "", "training rows: .jsonl, .jsonl.gz or .parquet with `prompt` and `response`"
    )
    eval_data: str = option("", "evaluation rows (same layout); eval_loss every eval_every steps")
    max_length: int = option(
        4096, "tokens per row; longer rows lose prompt tokens on the left, then response tokens"
    )
    rows_per_batch: int = option(8, "rows per micro-batch")
    max_tokens_per_batch: int = option(0, "token budget per micro-batch instead of rows (0: off)")
    skip_bad_rows: bool = option(False, "skip malformed rows (counted) instead of stopping")


def sft_batches(dataset, config: SFTConfig, *, shuffle: bool) -> list[dict]:
    """The packed micro-batches of `dataset`: input_ids, cu_seqlens, targets (response tokens,
    -100 elsewhere), coef (-1/n_tokens on the targets) and n_tokens."""
    tokens = config.max_tokens_per_batch or None
    plan = RewardBatches(
        dataset,
        max_tokens_per_batch=tokens,
        rows_per_batch=None if tokens else config.rows_per_batch,
        shuffle=shuffle,
        seed=config.seed,
    ).plan(0)
    out = []
    for rows in plan:
        exs = [dataset.examples[i] for i in rows]
        batch = pack(
            [e.prompt_ids for e in exs],
            [torch.tensor(e.response_ids, dtype=torch.long) for e in exs],
        )
        mask = batch["targets"] != -100
        n_tokens = int(mask.sum())
        batch["coef"] = torch.where(mask, -1.0 / n_tokens, 0.0).float()
        batch["n_tokens"] = n_tokens
        batch["rows"] = [e.where for e in exs]
        del batch["last_index"]
        out.append(batch)
    return out


def sft_step(model, batch) -> StepOutput:
    """One micro-batch's mean response-token cross-entropy (model: PolicyLoss, or its DDP)."""
    loss = model(batch["input_ids"], batch["cu_seqlens"], batch["targets"], batch["coef"])
    return StepOutput(
        loss, weight=batch["n_tokens"], tokens=batch["input_ids"].numel(), rows=batch["rows"]
    )


class SFTTrainer:
    """`SFTTrainer(config).fit()`: fine-tune, write OUT/final, return the per-step metrics.

    Python-API extras: `model` (a Llama to start from instead of config.model) and `tokenizer`.
    """

    def __init__(self, config: SFTConfig, *, model: Llama | None = None, tokenizer=None):
        check_data_and_batching(config)
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer)
        kw = dict(max_length=config.max_length, skip_bad_rows=config.skip_bad_rows)
        self.train_data = read_sft(config.data, self.tokenizer, **kw)
        self.eval_data = (
            read_sft(config.eval_data, self.tokenizer, **kw) if config.eval_data else None
        )
        self.policy = model if model is not None else build_policy(config, self.tokenizer, "model")
        for data in filter(None, (self.train_data, self.eval_data)):
            data.check_vocab(self.policy.config.vocab_size)
            data.check_positions(self.policy.config.max_position_embeddings)
        self.micro_batches = sft_batches(self.train_data, config, shuffle=True)

    def _evaluate(self, model) -> dict:
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for batch in sft_batches(self.eval_data, self.config, shuffle=False):
            out = sft_step(model, move_to(batch, device))
            total += float(out.loss) * out.weight
            count += out.weight
        return {"loss": total / count}

    def fit(self) -> list[dict]:
        """Train; write OUT/final (the policy in HF layout, and an HF tokenizer's files) on rank 0;
        return the per-step records."""
        start = time.perf_counter()
        self.loop = TrainLoop(
            self.config,
            PolicyLoss(self.policy),
            self.micro_batches,
            sft_step,
            evaluate=self._evaluate if self.eval_data is not None else None,
        )
        history = self.loop.fit()
        export_policy(self.loop, self.policy, self.tokenizer)
        self.seconds = time.perf_counter() - start
        return history
