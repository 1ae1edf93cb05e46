"""The collectives nemokern's tensor parallelism uses, and their autograd forms.

Sums go through `all_reduce` (the extension's single-host fast path where it applies); gathers
and broadcasts through torch.distributed. The three autograd functions are Megatron's conjugate
pairs: what one does in forward, the other does to the gradient in backward.

    copy_to_tp      forward identity          backward all-reduce   (replicated -> column shards)
    reduce_from_tp  forward all-reduce        backward identity     (row shards -> replicated)
    gather_from_tp  forward all-gather (dim)  backward own slice    (column shards -> replicated)

A `group` of None in these functions means no tensor parallelism: they return their input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .all_reduce import all_reduce


def rank_and_size(group) -> tuple[int, int]:
    """(this process's rank in `group`, the group's size); (0, 1) for group None."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather(tensor: torch.Tensor, group) -> torch.Tensor:
    """Every rank's `tensor` (same shape and dtype on all) stacked: [world, *tensor.shape]."""
    tensor = tensor.contiguous()
    out = tensor.new_empty((dist.get_world_size(group), *tensor.shape))
    dist.all_gather(list(out.unbind(0)), tensor, group=group)
    return out


def broadcast(tensor: torch.Tensor, group, src: int = 0) -> torch.Tensor:
    """`tensor` of the group's rank `src` on every rank of `group`, in place; returns it."""
    if group is None:
        return tensor
    dist.broadcast(tensor, src=dist.get_global_rank(group, src), group=group)
    return tensor


def _summed(x: torch.Tensor, group) -> torch.Tensor:
    out = x.contiguous().clone()  # the input may be saved by autograd or be a view
    return all_reduce(out, group)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _summed(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _summed(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        rank, _ = rank_and_size(group)
        ctx.rank, ctx.dim, ctx.size = rank, dim, x.shape[dim]
        return torch.cat(all_gather(x, group).unbind(0), dim=dim)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size), None, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """x (replicated on the group's ranks) as the input of column shards: the gradient each rank
    computes covers its shard's outputs only, so backward sums it over the group."""
    return x if group is None else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """The sum of x over the group's ranks (partial products of row shards); the gradient of a
    replicated output is already every rank's gradient, so backward passes it through."""
    return x if group is None else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """Equal shards of x along `dim` concatenated in rank order on every rank; backward keeps the
    gradient of this rank's slice."""
    if group is None:
        return x
    return _GatherFromTP.apply(x, group, dim % x.dim())
