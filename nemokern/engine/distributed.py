"""The run's processes: joining torchrun's process group, the device, the (dp, tp) layout of
the ranks, the data-parallel size a run will have, and seeding."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..parallel import init_parallel
from . import options
from .config import ConfigError, TrainConfig, option_error


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # the (dp, tp) layout: tp_group None without tensor parallelism, dp_group None = every rank
    tp_group: Any = None
    dp_group: Any = None
    dp_rank: int = 0
    dp_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto", tp: int = 1) -> Dist:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs) when WORLD_SIZE > 1; pick the
    device; with tp > 1 lay the ranks out as init_parallel's (dp, tp) mesh (the same groups on
    every call).

    device: "auto" (this process's GPU, else the CPU), "cpu", "cuda" or "cuda:N".
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        device = f"cuda:{local_rank}"
    try:  # the one device check (engine/options.py), as the CLI makes it before any work
        dev = options.device("device", device)
    except ConfigError as e:
        raise option_error("device", e.message) from None
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if tp > 1:
        if world % tp:
            raise option_error(
                "tp",
                f"{tp} needs a multiple of {tp} processes (torchrun --nproc-per-node); this run "
                f"has WORLD_SIZE={world}",
            )
        mesh = init_parallel(tp, dev.type)
        dp = mesh.get_group("dp")
        return Dist(
            dist.get_rank(),
            dist.get_world_size(),
            local_rank,
            dev,
            tp_group=mesh.get_group("tp"),
            dp_group=dp,
            dp_rank=dist.get_rank(dp),
            dp_size=dist.get_world_size(dp),
        )
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return Dist(rank, world, local_rank, dev, dp_rank=rank, dp_size=world)
    return Dist(0, 1, 0, dev)


def tp_group_for(config: TrainConfig):
    """The tensor-parallel group a run's models are split over (None when config.tp is 1). Joins
    the torchrun process group; the TrainLoop built later gets the same groups."""
    return setup_distributed(config.device, config.tp).tp_group if config.tp > 1 else None


def dp_size_of(config: TrainConfig) -> int:
    """The run's data-parallel size before its TrainLoop exists: the joined process group's
    size (torchrun's WORLD_SIZE before joining) over --tp."""
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    return world // config.tp


def reads_deferred(config: TrainConfig) -> bool:
    """Whether a run's models are loaded deferred (from_pretrained(deferred=True)): under fsdp
    over more than one data-parallel process, where each process then reads its rows only
    (TrainLoop and place_frozen materialize them once sharded; a deferred model in a run that
    does not shard is read whole there)."""
    return config.fsdp and dp_size_of(config) > 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
