"""A tiny reward model and synthetic micro-batches for the training-loop tests, and one DDP rank.

Imported by tests/test_train_loop.py; run as a script (one process per rank, env:// like torchrun)
by its DDP test: `train_tiny.py OUT GRAD_ACCUM` trains and rank 0 writes OUT/losses.json.
"""

import json
import sys

import torch
from torch import nn

from nemokern.engine.config import TrainConfig
from nemokern.engine.loop import StepOutput, TrainLoop
from nemokern.model import Llama, LlamaConfig
from nemokern.trainers.losses import regression_loss

VOCAB, K = 61, 3


class TinyReward(nn.Module):
    """A Llama trunk whose last hidden state feeds a K-output head with bias."""

    def __init__(self, seed=0, tie=False):
        super().__init__()
        torch.manual_seed(seed)
        cfg = LlamaConfig.tiny(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=tie,
        )
        self.trunk = Llama(cfg)
        if not tie:
            self.trunk.lm_head.weight.requires_grad_(False)  # unused by the reward: frozen
        self.head = nn.Linear(32, K)

    def forward(self, ids):
        return self.head(self.trunk.hidden_states(ids)[:, -1])


def batches(n=10, seed=1, poison=None):
    """n micro-batches of 2..4 rows x 5..9 tokens with labels in 0..4 (some -100).

    poison: a micro-batch index whose labels are NaN (for the non-finite guard).
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        b, t = 2 + i % 3, 5 + i % 5
        labels = torch.randint(0, 5, (b, K), generator=g).float()
        labels[torch.rand(b, K, generator=g) < 0.2] = -100
        if poison == i:
            labels[0, 0] = float("nan")
        out.append(
            {
                "ids": torch.randint(0, VOCAB, (b, t), generator=g),
                "labels": labels,
                "rows": list(range(100 * i, 100 * i + b)),
            }
        )
    return out


def step_fn(model, batch):
    rewards = model(batch["ids"])
    value = regression_loss(rewards, batch["labels"])
    return StepOutput(
        value.loss,
        weight=value.count,
        tokens=batch["ids"].numel(),
        rows=batch["rows"],
        metrics={"reward_mean": rewards.detach().mean()},
    )


def config(out, **kw):
    base = dict(
        out=str(out),
        lr=1e-2,
        weight_decay=0.1,
        schedule="cosine",
        warmup_steps=2,
        min_lr=1e-3,
        grad_accum=2,
        epochs=2,
        progress=False,
        tensorboard=False,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, accum = sys.argv[1], int(sys.argv[2])
    history = TrainLoop(
        config(out, grad_accum=accum, shuffle=True), TinyReward(tie=True), batches(12), step_fn
    ).fit()
    if torch.distributed.get_rank() == 0:
        with open(f"{out}/losses.json", "w") as f:
            json.dump([r["loss"] for r in history], f)
    from helpers import leave_group

    leave_group()
