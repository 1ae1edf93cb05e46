"""Per-rank parameter counts, exact: the real model classes built on the meta device, split by
the real tensor-parallel layers and sharded by the real FSDP2 code (parallel.fsdp.shard), at
the requested world size, in this one process, over torch.distributed's fake process group
(no communication; rank 0 stands for every rank, as every rank holds as much)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from ..errors import ConfigError
from ..model import Llama, LlamaConfig, RewardModel
from ..model.hf import hf_name, shards_by_name
from ..model.llama import DecoderLayer
from ..parallel.fsdp import shard


@dataclass(frozen=True)
class Counts:
    """Elements of one model on one rank.

    stored: what the rank keeps between uses (its tensor-parallel slice, and under FSDP its
        padded 1/dp rows of it), split into `trained` (gets gradients and AdamW state) and the
        rest; whole: the rank's tensor-parallel slice unsharded (what FSDP gathers); layer: one
        decoder layer of it; root: the parameters outside the layers (embedding, final norm,
        LM head, a reward head); matrices: the elements of the linear layers' weights (what
        bf16 autocast casts), lm_head included; vocab: this rank's LM-head rows; kv_heads:
        this rank's key/value heads; saved: what save_pretrained writes, the whole model
        unsplit (every tensor-parallel slice gathered); largest_saved: the largest tensor of
        it."""

    stored: int
    trained: int
    whole: int
    layer: int
    root: int
    matrices: int
    vocab: int
    kv_heads: int
    saved: int
    largest_saved: int


def _fsdp_rows(p: torch.Tensor) -> int:
    """Elements FSDP2 allocates for this rank's shard: dim 0 split in dp chunks, every chunk
    padded to the first one's size (torch.chunk's)."""
    if not isinstance(p, DTensor):
        return p.numel()
    dp = p.device_mesh.size()
    rows = math.ceil(p.shape[0] / dp) if p.dim() else 1
    return rows * math.prod(p.shape[1:])


@contextmanager
def fake_world(world: int, tp: int):
    """A fake process group of `world` ranks (this process rank 0) and its ("dp", "tp") mesh, laid
    out as init_parallel lays out torchrun's ranks; the group is destroyed on exit."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("nemokern plan runs outside a torch.distributed process group")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        # init_parallel's layout; built here because init_parallel keeps its meshes for the life
        # of a real process group
        yield init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
    finally:
        dist.destroy_process_group()


def _counts(model: torch.nn.Module, trunk: Llama, trained: set[int] | None) -> Counts:
    params = list(model.parameters())
    stored = sum(_fsdp_rows(p) for p in params)
    local = {id(p): p.shape.numel() for p in params}
    layer = sum(p.shape.numel() for p in trunk.layers[0].parameters())
    whole = sum(local.values())
    matrices = sum(
        m.weight.shape.numel() for m in trunk.modules() if isinstance(m, torch.nn.Linear)
    )
    train = sum(_fsdp_rows(p) for p in params if trained is None or id(p) in trained)
    attn = trunk.layers[0].self_attn
    by_name = shards_by_name(trunk)  # what save_pretrained gathers whole
    slices = {
        id(p): by_name[hf_name(name)]
        for name, p in trunk.named_parameters()
        if hf_name(name) in by_name
    }
    unsplit = [
        p.shape.numel() * (slices[id(p)].full // slices[id(p)].size if id(p) in slices else 1)
        for p in params
    ]
    return Counts(
        stored=stored,
        trained=train,
        whole=whole,
        layer=layer,
        root=whole - layer * len(trunk.layers),
        matrices=matrices,
        vocab=trunk.lm_head.weight.shape[0],
        kv_heads=attn.k_proj.weight.shape[0] // attn.head_dim,
        saved=sum(unsplit),
        largest_saved=max(unsplit),
    )


def rank_counts(
    config: LlamaConfig,
    *,
    gpus: int,
    tp: int,
    fsdp: bool,
    reward_head: int = 0,
    gpus_per_node: int | None = None,
) -> Counts:
    """Counts of `config`'s model on rank 0 of `gpus` processes at tensor-parallel size `tp`,
    FSDP-sharded over the data-parallel processes when `fsdp` (and more than one). reward_head:
    the outputs of a RewardModel's head (0: a plain Llama); a reward model's trunk LM head gets
    no gradient, as the reward trainer freezes it. ConfigError naming the field when `tp` cannot
    split the model (heads, vocabulary, intermediate size)."""
    per_node = gpus_per_node or gpus
    if gpus % tp or per_node % tp:
        raise ConfigError(
            f"--tp {tp} must divide --gpus {gpus} and the GPUs per node ({per_node}): "
            "tensor-parallel groups stay inside a node"
        )
    with fake_world(gpus, tp) as mesh, torch.device("meta"):
        trunk = Llama(config, tp_group=mesh.get_group("tp") if tp > 1 else None)
        model = trunk
        if reward_head:
            model = RewardModel(trunk, [f"output{i}" for i in range(reward_head)])
        if fsdp and gpus // tp > 1:
            shard(model, mesh["dp"], (DecoderLayer,))
        trained = None
        if reward_head:  # after fully_shard, which replaces the parameters
            trained = {id(p) for n, p in model.named_parameters() if n != "trunk.lm_head.weight"}
        return _counts(model, trunk, trained)
