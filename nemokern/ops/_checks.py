"""Checks of the arguments a user passes to the public ops. Every message starts with the op's
name and names the argument, what it got and what it needs."""

import math
import numbers

import torch
import torch.distributed as dist

from nemokern import env


def tensors(op: str, named: dict, float_dtypes=(), float_names=()):
    """Each value of `named` must be a tensor on the device of the first one; those in
    float_names must have one of float_dtypes (any floating dtype when float_dtypes is empty)."""
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first_name} is on "
                f"{first.device}; move them to one device"
            )
        if name not in float_names:
            continue
        if float_dtypes and t.dtype not in float_dtypes:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; use one of {tuple(float_dtypes)}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def inv_temperature(op: str, temperature) -> float:
    """1 / temperature for a finite temperature > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(
            f"{op}: temperature must be a real number (e.g. 0.7), got {type(temperature).__name__}"
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature}")
    return 1.0 / float(temperature)


def clip_bounds(op: str, clip) -> tuple[float, float]:
    """(1 - eps_low, 1 + eps_high) for clip = (eps_low, eps_high), each a real number >= 0
    (inf: that side unclipped); None: (-inf, inf), no clipping."""
    if clip is None:
        return -math.inf, math.inf
    if (
        not isinstance(clip, tuple | list)
        or len(clip) != 2
        or any(isinstance(e, bool) or not isinstance(e, numbers.Real) for e in clip)
    ):
        raise TypeError(
            f"{op}: clip must be a pair (eps_low, eps_high) of real numbers, e.g. (0.2, 0.28), "
            f"got {clip!r}"
        )
    eps_low, eps_high = float(clip[0]), float(clip[1])
    if not (eps_low >= 0 and eps_high >= 0):  # nan fails too
        raise ValueError(
            f"{op}: clip = ({eps_low}, {eps_high}): eps_low and eps_high must be >= 0 (the "
            "ratio is clipped to [1 - eps_low, 1 + eps_high]; inf leaves that side open)"
        )
    return 1.0 - eps_low, 1.0 + eps_high


def ignore_index_of(op: str, ignore_index) -> int:
    """ignore_index as an int (a Python or numpy integer, or a 0-d integer tensor)."""
    if isinstance(ignore_index, torch.Tensor) and ignore_index.dim() == 0:
        ignore_index = ignore_index.item()
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(
            f"{op}: ignore_index must be an integer id (e.g. -100), got {ignore_index!r}"
        )
    return int(ignore_index)


def flat_targets(op: str, targets, lead_shape, what: str) -> torch.Tensor:
    """targets [*lead_shape] int32/int64 -> [N] int64 contiguous."""
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"{op}: targets must be an int64 tensor of token ids, got {got}")
    if tuple(targets.shape) != tuple(lead_shape):
        raise ValueError(
            f"{op}: targets has shape {tuple(targets.shape)} but {what} needs "
            f"{tuple(lead_shape)} (one target id per position)"
        )
    return targets.reshape(-1).to(torch.int64).contiguous()


def targets_checked() -> bool:
    """False when NEMOKERN_CHECK_TARGETS turns the target checks (and their host sync) off."""
    return env.flag("NEMOKERN_CHECK_TARGETS")


def targets_in_vocab(op: str, targets, vocab: int, ignore_index: int):
    """Every target id is in [0, vocab) or ignore_index. One reduction and one host sync."""
    if not targets_checked():
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{op}: targets[{i}] (flattened) = {int(targets[i])} is outside the "
            f"vocabulary [0, {vocab}) and is not ignore_index={ignore_index}; fix "
            f"the ids or mark the position with ignore_index"
        )


def lm_head(op: str, hidden, weight, targets, temperature, ignore_index, tp_group):
    """The arguments the LM-head ops share (linear_logprobs, linear_policy_loss): hidden [..., H]
    and weight [V, H] (or this rank's vocabulary shard with tp_group) floating, same dtype and
    device; targets [...] ids; temperature > 0. Returns (inv_t, ignore_index, flat targets [N]
    int64, vocab_start: this shard's first vocabulary id). Without tp_group the target ids are
    checked here; with it, after the exchange that tells the whole vocabulary."""
    tensors(op, {"hidden": hidden, "weight": weight}, float_names=("hidden", "weight"))
    if weight.dim() != 2:
        raise ValueError(
            f"{op}: weight must be the LM head [V, H], got shape {tuple(weight.shape)}"
        )
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: hidden {tuple(hidden.shape)} must end in H = weight.shape[1] = "
            f"{weight.shape[1]}"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"{op}: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one "
            f"(usually hidden.to(weight.dtype))"
        )
    if weight.shape[0] < 1:
        raise ValueError(f"{op}: weight has no vocabulary rows")
    inv_t = inv_temperature(op, temperature)
    ignore_index = ignore_index_of(op, ignore_index)
    flat_t = flat_targets(op, targets, hidden.shape[:-1], "hidden[..., H]")
    tensors(op, {"hidden": hidden, "targets": flat_t})
    vocab_start = 0
    if tp_group is not None:
        if not dist.is_initialized():
            raise RuntimeError(f"{op}: tp_group given but torch.distributed is not initialised")
        vocab_start = dist.get_rank(tp_group) * weight.shape[0]
    else:
        targets_in_vocab(op, flat_t, weight.shape[0], ignore_index)
    return inv_t, ignore_index, flat_t, vocab_start
