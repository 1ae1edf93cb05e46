"""The optimizer and the learning-rate schedule: AdamW (optionally sharded over the
data-parallel processes) and the warmup + constant/cosine/linear schedule."""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from .config import ConfigError, TrainConfig


def lr_factor(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    lr: float,
    min_lr: float,
    constant_steps: int = 0,
    warmup_formula: str = "(s+1)/w",
) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based). Warmup over w =
    warmup_steps by warmup_formula: "(s+1)/w" for s < w (the first step already moves), "s/w"
    for s <= w (the first step at lr 0) or "(s+1)/(w+1)" for s <= w. Then constant, or cosine /
    linear from lr at step w down to min_lr over D = total_steps - w - constant_steps steps,
    progress (s - w) / D, and min_lr from there on (the last constant_steps steps)."""
    if step < warmup_steps or (step == warmup_steps > 0 and warmup_formula != "(s+1)/w"):
        if warmup_formula == "s/w":
            return step / warmup_steps
        if warmup_formula == "(s+1)/(w+1)":
            return (step + 1) / (warmup_steps + 1)
        return (step + 1) / warmup_steps
    if schedule == "constant" or lr == 0:
        return 1.0
    decay = total_steps - warmup_steps - constant_steps
    progress = min((step - warmup_steps) / max(decay, 1), 1.0)
    if schedule == "linear":
        return (min_lr + (lr - min_lr) * (1 - progress)) / lr
    return (min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))) / lr


def build_optimizer(model: nn.Module, config: TrainConfig, dp_group=None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; matrices decay, vectors (norms, biases) do not.

    With config.shard_optimizer and a data-parallel group of more than one process, a
    ZeroRedundancyOptimizer over that group: each process keeps the AdamW state of its share of
    the parameters (whole tensors, balanced by size), steps them, and broadcasts them to the
    others; the result is the same AdamW step."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no parameter with requires_grad=True; nothing to train")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    kw = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps)
    shard = config.shard_optimizer and dist.is_initialized() and dist.get_world_size(dp_group) > 1

    def adamw(**impl_kw):
        if shard:
            return ZeroRedundancyOptimizer(
                groups,
                optimizer_class=torch.optim.AdamW,
                process_group=dp_group,
                **kw,
                **impl_kw,
            )
        return torch.optim.AdamW(groups, **kw, **impl_kw)

    impl = config.optimizer_impl
    if impl == "auto":
        try:
            return adamw(fused=True)
        except (RuntimeError, ValueError, TypeError):  # a device/dtype without the fused kernel
            impl = "foreach"
    return adamw(fused=impl == "fused" or None, foreach=impl == "foreach")


def lr_schedule(config: TrainConfig, total_steps: int):
    """step -> lr_factor of `config`'s schedule over total_steps."""
    return lambda s: lr_factor(
        s,
        total_steps=total_steps,
        warmup_steps=config.warmup_steps,
        schedule=config.schedule,
        lr=config.lr,
        min_lr=config.min_lr,
        constant_steps=config.constant_steps,
        warmup_formula=config.warmup_formula,
    )


def build_scheduler(optimizer, config: TrainConfig, total_steps: int, *, step: int = 0):
    """The lr schedule of `config` (lr, warmup, schedule, min_lr over total_steps), at optimizer
    step `step`: a resume sets every param group's lr from this run's options, not the saved
    run's."""
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule(config, total_steps), last_epoch=step - 1
    )


def warn_if_no_step_moves(config: TrainConfig, total_steps: int) -> None:
    """A UserWarning (the command line prints it in one line) when every optimizer step has lr 0
    (--lr 0, or one step at the first warmup step of --warmup-formula s/w): the run would end
    with the weights it started from."""
    factor = lr_schedule(config, total_steps)
    if total_steps and not any(config.lr * factor(s) > 0 for s in range(total_steps)):
        warnings.warn(
            f"every one of the {total_steps} optimizer step(s) has lr 0 (--lr {config.lr}, "
            f"--warmup-steps {config.warmup_steps}, --warmup-formula {config.warmup_formula}): "
            "the weights never change and this run learns nothing",
            UserWarning,
            stacklevel=3,
        )
