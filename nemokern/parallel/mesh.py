"""The process layout: a 2-D DeviceMesh (dp, tp) over the torchrun ranks.

Ranks are laid out row-major, so the `tp_size` ranks of one tensor-parallel group are
consecutive, i.e. on one node (torchrun numbers a node's ranks consecutively); data parallelism
runs across the groups, over nodes too. gloo on CPUs, NCCL on GPUs.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

_MESHES: dict = {}


def init_parallel(tp_size: int, device_type: str | None = None) -> DeviceMesh:
    """Join the torchrun process group (if not joined yet) and return the mesh ("dp", "tp").

    tp_size must divide the ranks per node (LOCAL_WORLD_SIZE, set by torchrun; the world size
    without it). device_type: "cpu" or "cuda" (default: cuda when torch sees a GPU). The groups:
    `mesh.get_group("tp")` for the model, `mesh.get_group("dp")` for DDP / FSDP2. Calling it
    again with the same tp_size returns the same mesh.
    """
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size={tp_size!r} must be a positive integer")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    world = dist.get_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local % tp_size or world % tp_size:
        raise ValueError(
            f"tp_size={tp_size} does not divide the {local} process(es) per node "
            f"(LOCAL_WORLD_SIZE={local}, WORLD_SIZE={world}); tensor-parallel groups stay inside "
            f"a node, so pick a tp size dividing {local} or start {tp_size} x k processes per "
            "node (torchrun --nproc-per-node)"
        )
    key = (tp_size, device_type, id(dist.group.WORLD))
    if key not in _MESHES:  # new groups are collective and costly: one mesh per layout
        _MESHES[key] = init_device_mesh(
            device_type, (world // tp_size, tp_size), mesh_dim_names=("dp", "tp")
        )
    return _MESHES[key]
