"""Tensor-parallel layers: each rank holds one slice (a `Shard`) of a full weight.

    ColumnParallelLinear   rows of W [out, in]: y's features split across ranks (q/k/v, gate/up,
                           the LM head over the vocabulary)
    RowParallelLinear      columns of W: partial products summed by all_reduce (o, down)
    VocabParallelEmbedding rows of the embedding: each rank looks up its vocabulary range

They subclass nn.Linear / nn.Embedding with the shard as their weight, so parameter names are
the unsharded model's, and with tp_group None they are exactly the plain layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from .all_reduce import all_reduce
from .collectives import all_gather, copy_to_tp, gather_from_tp, rank_and_size, reduce_from_tp


@dataclass(frozen=True)
class Shard:
    """This rank's slice [start, start + size) along `dim` of a weight `full` long on that dim.

    Shards are equal and in rank order; when `world * size` exceeds `full` (KV heads fewer than
    ranks) consecutive ranks hold the same slice, `replicas` of each.
    """

    dim: int
    full: int
    size: int
    rank: int = 0
    world: int = 1

    @classmethod
    def even(cls, dim: int, full: int, group, what: str) -> Shard:
        """`full` split into `world` equal parts; ValueError naming `what` if it does not divide."""
        rank, world = rank_and_size(group)
        if full % world:
            raise ValueError(
                f"{what}={full} is not divisible by the tensor-parallel size {world}; "
                f"choose a tp size that divides it"
            )
        return cls(dim, full, full // world, rank, world)

    @property
    def replicas(self) -> int:
        return self.world * self.size // self.full

    def start(self, rank: int | None = None) -> int:
        return ((self.rank if rank is None else rank) // self.replicas) * self.size

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the full tensor."""
        return full.narrow(self.dim, self.start(), self.size)

    def read(self, safetensors_slice) -> torch.Tensor:
        """This rank's slice read from a safetensors `get_slice` handle (only these bytes)."""
        span = slice(self.start(), self.start() + self.size)
        return safetensors_slice[span] if self.dim == 0 else safetensors_slice[:, span]

    def assemble(self, shards: torch.Tensor) -> torch.Tensor:
        """The full tensor from every rank's shard stacked [world, ...] (replicas taken once)."""
        return torch.cat(list(shards[:: self.replicas].unbind(0)), dim=self.dim)

    def full_tensor(self, local: torch.Tensor, group) -> torch.Tensor:
        """The full tensor on every rank from each rank's `local` shard (collective)."""
        return local if group is None else self.assemble(all_gather(local, group))


class _GroupRef:
    """A process group held by a module; deep copies of the module share it (a ProcessGroup is a
    handle to a communicator and cannot be copied, and a copied model, e.g. a frozen reference
    policy, runs on the same ranks)."""

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        return self


class _Sharded:
    """What the three layers share: `shard` (this rank's Shard) and `tp_group`."""

    @property
    def tp_group(self):
        return self._tp.group


class _SumReplicaGrads(torch.autograd.Function):
    """Identity on a replicated weight shard; backward sums its gradient over the replicas (each
    replica saw only its own ranks' queries), through one all-reduce of a full-size buffer."""

    @staticmethod
    def forward(ctx, weight, shard, group):
        ctx.shard, ctx.group = shard, group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        s = ctx.shard
        full = list(grad.shape)
        full[s.dim] = s.full
        buf = grad.new_zeros(full)
        buf.narrow(s.dim, s.start(), s.size).copy_(grad)
        all_reduce(buf, ctx.group)
        return buf.narrow(s.dim, s.start(), s.size).contiguous(), None, None


class ColumnParallelLinear(_Sharded, nn.Linear):
    """y[..., shard] = x @ W[shard].T for a replicated x [..., in]; no bias.

    reduce_input_grad=False when the caller already passed x through `copy_to_tp` once for
    several projections of the same x (q/k/v: one gradient all-reduce instead of three).
    gather_output=True returns the full y [..., out] on every rank (all-gather).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tp_group=None,
        *,
        shard: Shard | None = None,
        reduce_input_grad: bool = True,
        gather_output: bool = False,
        what: str = "out_features",
    ):
        shard = shard or Shard.even(0, out_features, tp_group, what)
        super().__init__(in_features, shard.size, bias=False)
        self.shard, self._tp = shard, _GroupRef(tp_group)
        self.reduce_input_grad, self.gather_output = reduce_input_grad, gather_output

    def forward(self, x):
        if self.tp_group is None:
            return F.linear(x, self.weight)
        w = self.weight
        if self.shard.replicas > 1:
            w = _SumReplicaGrads.apply(w, self.shard, self.tp_group)
        if self.reduce_input_grad:
            x = copy_to_tp(x, self.tp_group)
        y = F.linear(x, w)
        return gather_from_tp(y, self.tp_group) if self.gather_output else y


class RowParallelLinear(_Sharded, nn.Linear):
    """y = sum over ranks of x[..., shard] @ W[:, shard].T (x split as the previous column layer
    left it); the sum is `nemokern.parallel.all_reduce`. No bias."""

    def __init__(self, in_features: int, out_features: int, tp_group=None, *, what="in_features"):
        shard = Shard.even(1, in_features, tp_group, what)
        super().__init__(shard.size, out_features, bias=False)
        self.shard, self._tp = shard, _GroupRef(tp_group)

    def forward(self, x):
        return reduce_from_tp(F.linear(x, self.weight), self.tp_group)


class VocabParallelEmbedding(_Sharded, nn.Embedding):
    """Embedding whose rows (the vocabulary) are split across ranks: each rank looks up the ids in
    its range, zeros elsewhere, and the all-reduce completes every row."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_group=None):
        shard = Shard.even(0, num_embeddings, tp_group, "vocab_size")
        super().__init__(shard.size, embedding_dim)
        self.shard, self._tp = shard, _GroupRef(tp_group)

    def forward(self, ids):
        if self.tp_group is None:
            return F.embedding(ids, self.weight)
        local = ids - self.shard.start()
        outside = (local < 0) | (local >= self.shard.size)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_tp(x.masked_fill(outside[..., None], 0.0), self.tp_group)


def grad_norm_tp(model: nn.Module, group) -> torch.Tensor:
    """The global L2 norm [] (float64) of `model`'s gradients when its tensor-parallel weights are
    split over `group`: shards summed over the ranks (a replicated shard counted once), every
    other parameter (replicated on all ranks, same gradient) once. Collective over `group`; with
    FSDP also sharding them over the data-parallel processes (DTensor gradients, each process
    holding some rows), summed over those too."""
    replicas = {
        id(m.weight): m.shard.replicas
        for m in model.modules()
        if isinstance(m, _Sharded) and m.tp_group is not None
    }
    grads = [p for p in model.parameters() if p.grad is not None]
    device = grads[0].grad.device if grads else torch.device("cpu")
    sharded, replicated = (torch.zeros((), dtype=torch.float64, device=device) for _ in "ab")
    rows_group = None  # FSDP's group, when the gradients are sharded by rows too
    for p in grads:
        grad = p.grad
        if isinstance(grad, DTensor):
            rows_group, grad = grad.device_mesh.get_group(), grad.to_local()
        sq = torch.linalg.vector_norm(grad, dtype=torch.float64) ** 2
        if id(p) in replicas:
            sharded += sq / replicas[id(p)]
        else:
            replicated += sq
    total = all_reduce(sharded, group) + replicated
    return (total if rows_group is None else all_reduce(total, rows_group)).sqrt()
