"""Fully sharded data parallelism (FSDP2, `torch.distributed.fsdp.fully_shard`) for the trainers'
models, and what the rest of nemokern needs to read and write sharded parameters.

`shard(model, mesh, unit_types)`: each submodule of one of `unit_types` (the decoder layers)
becomes its own FSDP unit, the model the root one; every parameter is then a DTensor holding
1/dp of its rows on each process, and so are its gradient and its AdamW state. A unit's
parameters are all-gathered just before its forward (and backward) and freed after it.
`shard(..., frozen=True)`: the same for a model that only runs forward without gradients (the
REINFORCE reference and reward model): its root reshards after every forward too, so between calls
each process holds 1/dp of it; `offload` keeps those shards in host memory (FSDP2's
CPUOffloadPolicy), each unit copied to the device for its forward.
`full_weights(model)`: every parameter whole on every process for a block of code that calls the
model other than through its own forward (generation, scoring), freed again at its end.
`full_tensor` / `copy_into`: a parameter as a whole tensor (a collective for a DTensor, one
tensor at a time) and a whole tensor into a parameter (each process keeps its rows; no
communication). Plain tensors pass through both, so callers need not know which they hold.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor, distribute_tensor


def shard(
    model: nn.Module,
    mesh: DeviceMesh,
    unit_types: tuple[type, ...],
    *,
    frozen: bool = False,
    offload: bool = False,
    param_dtype: torch.dtype | None = None,
) -> None:
    """fully_shard each submodule of `unit_types`, then `model` (the root), over the 1-D `mesh`;
    in place (the parameters become DTensors). The root is initialised at once (init_root), so
    that code calling a unit directly before the first forward of the root (generation) finds it
    set up; a model on the meta device (deferred weights) is sharded where it is, and its
    `model.deferred.materialize` then allocates each process's rows only.
    frozen: the model is only called forward without gradients, its root reshards after it
    too (a trained root keeps its parameters gathered for the backward that follows).
    offload (with frozen): the shards stay in pinned host memory (CPUOffloadPolicy).
    param_dtype: the dtype the parameters are gathered and computed in (MixedPrecisionPolicy;
    the shards, gradients' reduction and optimizer stay in the parameters' own dtype)."""
    if offload and not frozen:
        raise ValueError("shard: offload applies to frozen models only")
    kwargs = {"reshard_after_forward": True} if frozen else {}
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if param_dtype is not None:
        reduce = next(model.parameters()).dtype
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce)
    for module in list(model.modules()):
        if isinstance(module, unit_types):
            fully_shard(module, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    if not any(p.is_meta for p in model.parameters()):
        init_root(model)


def init_root(model: nn.Module) -> None:
    """Make the model given to `shard` FSDP's root now, as `shard` does unless the model's
    parameters are still on the meta device (deferred: call it once they are allocated).
    Idempotent."""
    # FSDP2 takes the first module to run forward for the root; the root's lazy initialisation
    # is otherwise done in its first forward. (A private method, present from torch 2.4 on.)
    state = model._get_fsdp_state()
    if not hasattr(state, "_lazy_init"):
        raise RuntimeError(
            f"--fsdp: torch {torch.__version__} has no FSDPState._lazy_init, which nemokern calls "
            "so that a rollout may generate before the first forward; use torch 2.4 or newer"
        )
    state._lazy_init()


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (or a submodule) was given to fully_shard."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextmanager
def full_weights(model: nn.Module) -> Iterator[None]:
    """Inside the block every parameter of `model` is a whole, plain tensor on every process
    (all-gathered once, kept across forwards); at its end they are sharded again. A no-op for a
    model that is not sharded. The gathered copies are read-only views of the training state:
    what the block writes into them is lost."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    root = units[0]  # model.modules() lists the model first
    root.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        root.set_reshard_after_forward(True)
        root.set_reshard_after_forward(False, recurse=False)  # FSDP2's own setting for the root
        for unit in units:
            unit.reshard()


def first_holder(tensors) -> bool:
    """False on every process but the first of the mesh of the first DTensor among `tensors`
    (the one that writes what all of them gathered); True when none is a DTensor."""
    for t in tensors:
        if isinstance(t, DTensor):
            coordinate = t.device_mesh.get_coordinate()  # a list or a tuple, by torch version
            return coordinate is not None and not any(coordinate)
    return True


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` whole: a DTensor's all-gather (a collective: every process of its mesh calls it), any
    other tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_part(t):
    """This process's rows of a DTensor; any other value itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _laid_out_like(whole: torch.Tensor, target: DTensor) -> DTensor:
    """`whole` as a DTensor laid out like `target`: each process keeps its own rows of the whole
    tensor it holds (no communication)."""
    return distribute_tensor(
        whole.to(target.device), target.device_mesh, target.placements, src_data_rank=None
    )


@torch.no_grad()
def copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """target.copy_(source) for a whole `source`; a DTensor `target` takes only its own rows (each
    process reads the whole source and keeps its share: no communication)."""
    if not isinstance(target, DTensor):
        target.copy_(source)
        return
    target.to_local().copy_(_laid_out_like(source, target).to_local())


def like(value: torch.Tensor, param: torch.Tensor, *, whole: bool) -> torch.Tensor:
    """A saved state tensor of `param` (an AdamW moment) as a DTensor laid out like the DTensor
    `param`: `value` is either this process's piece of it (whole=False, as an FSDP run saves it)
    or the whole tensor (whole=True, as an unsharded run saves it). A 0-dim value (AdamW's step)
    or a plain `param` gives `value` unchanged."""
    if not isinstance(param, DTensor) or value.dim() == 0:
        return value
    if whole:
        return _laid_out_like(value, param)
    return DTensor.from_local(
        value.to(param.device),
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )
