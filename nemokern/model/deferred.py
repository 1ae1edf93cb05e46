"""Models whose weights are read after they are placed: built on the meta device (no memory), then
sharded or moved, then filled from their files where they will live.

Under FSDP a model loaded whole first would need its whole size in host memory on every process
before sharding; a deferred one holds only this process's rows of each parameter once
`materialize` has run (and while it runs, one stored tensor at a time, its tensor-parallel slice).

`defer(module, fill)`: `module`'s parameters are on the meta device; `fill()` copies their values
in once they are allocated (through `parallel.fsdp.copy_into`, so that a sharded parameter keeps
only its rows). One pending fill per module; a second replaces the first.
`materialize(model, device)`: allocate every tensor of `model` on `device` (`to_empty`: under FSDP
each process's shards) and run the pending fills of its modules, in the order the modules are
listed. A model with nothing pending is left as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_PENDING = "_nemokern_deferred_fill"


def defer(module: nn.Module, fill: Callable[[], None]) -> None:
    """Record `fill` as what gives `module`'s (meta) parameters their values."""
    module.__dict__[_PENDING] = fill


def is_deferred(model: nn.Module) -> bool:
    """Whether a module of `model` waits for its values (materialize has not run)."""
    return any(_PENDING in m.__dict__ for m in model.modules())


def materialize(model: nn.Module, device) -> None:
    """Allocate `model`'s tensors on `device` and fill the deferred ones (see the module doc).
    Every parameter and buffer must then be on the meta device: to_empty would drop the values
    of any other."""
    fills = [m.__dict__.pop(_PENDING) for m in model.modules() if _PENDING in m.__dict__]
    if not fills:
        return
    real = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if not t.is_meta]
    if real:
        raise ValueError(
            f"materialize: {real[:4]} of {type(model).__name__} already hold values, which "
            "allocating the deferred weights would overwrite; defer every part of the model"
        )
    model.to_empty(device=device)
    with torch.no_grad():
        for fill in fills:
            fill()
