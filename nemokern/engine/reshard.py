"""Resuming a checkpoint at another tensor-parallel size.

A checkpoint written at --tp N holds each weight and each optimizer-state tensor as N pieces (one
file per tp rank, consecutive equal pieces where a KV head was replicated) or, at N = 1, whole.
A run at --tp M takes, one tensor at a time, the full tensor from those pieces and keeps its own
slice: the same slice `from_pretrained(..., tp_group=...)` would read, so the model and AdamW's
moments continue where they were, at most one full tensor held at a time. Tensors that are not
split (norms, heads, AdamW's step counts) are taken from the first piece.

An --fsdp checkpoint's AdamW state (one file per process, each its rows) resumes on another
number of processes, or without --fsdp, the same way along dim 0: `load_fsdp_regrouped`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch

from nemokern.engine.state_format import (
    REST_FILE,
    decode_state,
    hf_parts,
    open_tensors,
    part_dir,
    read_encoded,
)
from nemokern.model.hf import CheckpointError, hf_name, weight_files
from nemokern.parallel.fsdp import like


def shards_of(model: torch.nn.Module) -> dict[int, object]:
    """{id(weight): this rank's Shard} for every tensor-parallel weight of `model` (its layers
    carry a Shard at every tp size, 1 included)."""
    return {
        id(m.weight): m.shard
        for m in model.modules()
        if getattr(m, "shard", None) is not None
        and isinstance(getattr(m, "weight", None), torch.Tensor)
    }


def reshard(pieces: list[torch.Tensor], shard, where: str) -> torch.Tensor:
    """This rank's part of a tensor saved as `pieces` (one per saved tp rank, in rank order):
    the first piece when the tensor is not split (shard None, or a 0-dim state), else the full
    tensor rebuilt along shard.dim (consecutive equal pieces are replicas) and sliced by shard."""
    first = pieces[0]
    if shard is None or first.dim() == 0:
        return first
    size, n = first.shape[shard.dim], len(pieces)
    if size * n < shard.full or (size * n) % shard.full:
        raise CheckpointError(
            f"{where}: {n} saved piece(s) of {size} along dim {shard.dim} do not make the "
            f"{shard.full} this model has there; was it written for another model?"
        )
    full = torch.cat(pieces[:: size * n // shard.full], dim=shard.dim)
    if full.shape[shard.dim] != shard.full:
        raise CheckpointError(f"{where}: rebuilt {tuple(full.shape)}, expected {shard.full}")
    return shard.take(full).clone()


def _get(handle, key: str, file: Path) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except Exception:
        raise CheckpointError(f"{file}: tensor {key!r} is missing") from None


def _model_reader(stack: ExitStack, path: Path, saved_tp: int, model) -> Callable:
    """name -> the pieces of state-dict tensor `name` in the checkpoint at `path`."""
    if saved_tp > 1:
        files = [path / f"model.tp{r}-of-{saved_tp}.safetensors" for r in range(saved_tp)]
        handles = [stack.enter_context(open_tensors(f)) for f in files]
        return lambda name: [_get(h, name, f) for h, f in zip(handles, files)]
    # --tp 1: HF layout per Llama part, REST_FILE the rest
    where: dict[str, tuple[Path, str]] = {}
    for part_name, part in hf_parts(model).items():
        assigned = weight_files(part_dir(path, part_name))
        prefix = f"{part_name}." if part_name else ""
        for n, _ in part.named_parameters():
            key = hf_name(n)
            where[prefix + n] = (assigned.get(key, assigned.get(None)), key)
    opened: dict[Path, object] = {}

    def read(name):
        file, key = where.get(name, (path / REST_FILE, name))
        if file not in opened:
            opened[file] = stack.enter_context(open_tensors(file))
        return [_get(opened[file], key, file)]

    return read


class _Key(str):
    """A tensor's key in an optimizer file, standing in for the tensor while its JSON is decoded."""


class _Keys(dict):
    def __contains__(self, key):
        return True

    def __getitem__(self, key):
        return _Key(key)


@torch.no_grad()
def load_resharded(path: Path, saved_tp: int, targets: dict, model, optimizer=None) -> None:
    """Fill `targets` (state-dict name -> this rank's tensor of `model`, each once) and the
    optimizer's state from the checkpoint at `path`, written at --tp saved_tp."""
    shards = shards_of(model)
    with ExitStack() as stack:
        read = _model_reader(stack, path, saved_tp, model)
        for name, target in targets.items():
            piece = reshard(read(name), shards.get(id(target)), f"{path}: {name}")
            if tuple(piece.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{path}: {name} becomes {tuple(piece.shape)} at this tp size, the model has "
                    f"{tuple(target.shape)}"
                )
            target.copy_(piece)
    if optimizer is None:
        return
    names = (
        [f"optimizer.tp{r}-of-{saved_tp}" for r in range(saved_tp)]
        if saved_tp > 1
        else ["optimizer"]
    )

    def combine(pieces, param, key):
        return reshard(pieces, shards.get(id(param)), f"{path}: optimizer {key}")

    _load_optimizer_pieces(path, names, optimizer, combine)


@torch.no_grad()
def load_fsdp_regrouped(path: Path, names: list[str], optimizer) -> None:
    """An FSDP run's AdamW state, saved as one file per process (`names`: those of this run's tp
    rank, in data-parallel order), into `optimizer` on another number of processes (or without
    FSDP): each state tensor's rows are concatenated across the files, one tensor at a time, and
    each process keeps the rows its parameter holds (parallel.fsdp.like), so the moments continue
    exactly. Step counts (0-dim) are taken from the first file."""

    def combine(pieces, param, key):
        whole = pieces[0] if pieces[0].dim() == 0 else torch.cat(pieces)
        if whole.dim() and whole.shape != param.shape:
            raise CheckpointError(
                f"{path}: optimizer {key} rebuilt from {len(names)} files is "
                f"{tuple(whole.shape)}, the parameter is {tuple(param.shape)}"
            )
        return like(whole, param, whole=True)

    _load_optimizer_pieces(path, names, optimizer, combine)


def _load_optimizer_pieces(path: Path, names: list[str], optimizer, combine: Callable) -> None:
    """Load into `optimizer` the state saved in pieces as the optimizer files `names` at `path`
    (one structure, the first file's JSON): each state tensor is combine(its pieces in file
    order, its parameter, its key), read one tensor at a time."""
    first = path / f"{names[0]}.json"
    state = decode_state(read_encoded(path, names[0]), _Keys(), str(first))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with ExitStack() as stack:
        files = [path / f"{n}.safetensors" for n in names]
        handles = [stack.enter_context(open_tensors(f)) for f in files]
        for index, entries in state.get("state", {}).items():
            if not 0 <= index < len(params):
                raise CheckpointError(f"{first}: state for parameter {index}, which this has not")
            for key, value in entries.items():
                if isinstance(value, _Key):
                    pieces = [_get(h, value, f) for h, f in zip(handles, files)]
                    entries[key] = combine(pieces, params[index], value)
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the optimizer state does not fit ({e})") from None
