"""nemokern.parallel's tensor-parallel layers against float64 unsharded references, forward and
backward, in 2 gloo processes: a column -> row pair (Megatron's MLP), a column layer whose shard
is replicated on both ranks (KV heads fewer than ranks), the vocab-parallel embedding, and the
vocab-parallel LM head feeding linear_logprobs / linear_policy_loss. The row layer's reduction
and the column layer's gradient reduction take the custom all-reduce (counted). (init_parallel's
mesh is checked in test_tensor_parallel_train.py, which starts 4 processes anyway.)
"""

import sys

import pytest
import torch
import torch.distributed as dist

from helpers import join_gloo, run_ranks
from nemokern.ops import linear_logprobs, linear_policy_loss
from nemokern.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    Shard,
    VocabParallelEmbedding,
)

TOL = dict(rtol=1e-5, atol=1e-6)


def _grads64(fn, *tensors):
    """fn's output and d(sum)/d(tensors) in float64 (tensors are copied)."""
    leaves = [t.detach().double().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


def _set(layer, full):
    with torch.no_grad():
        layer.weight.copy_(layer.shard.take(full))
    return layer


def _layers_worker(rank, world, init_file):
    join_gloo(rank, world, init_file)
    ar = sys.modules["nemokern.parallel.all_reduce"]
    custom = []
    real = ar._custom_comm

    def spy(tensor, group):
        comm = real(tensor, group)
        custom.append(comm is not None)
        return comm

    ar._custom_comm = spy
    try:
        group = dist.new_group(list(range(world)))
        g = torch.Generator().manual_seed(0)  # every rank builds the same full tensors
        x = torch.randn(3, 5, 16, generator=g)
        w_col, w_row = torch.randn(12, 16, generator=g), torch.randn(7, 12, generator=g)
        gy = torch.randn(3, 5, 7, generator=g)

        # column -> row: y = (x W_col^T) W_row^T, one all-reduce in forward, one in backward
        col = _set(ColumnParallelLinear(16, 12, group), w_col)
        row = _set(RowParallelLinear(12, 7, group), w_row)
        xt = x.clone().requires_grad_(True)
        custom.clear()
        y = row(col(xt))
        (y * gy).sum().backward()
        assert custom == [True, True], f"rank {rank}: custom all-reduce taken {custom}"
        ref, (dx, dwc, dwr) = _grads64(lambda a, b, c: (a @ b.T @ c.T) * gy, x, w_col, w_row)
        torch.testing.assert_close(y, (ref / gy).float(), **TOL)
        torch.testing.assert_close(xt.grad, dx.float(), **TOL)
        torch.testing.assert_close(col.weight.grad, col.shard.take(dwc).float(), **TOL)
        torch.testing.assert_close(row.weight.grad, row.shard.take(dwr).float(), **TOL)

        # a shard replicated on every rank: each rank's loss reads it, its gradient is the sum
        rep = _set(ColumnParallelLinear(16, 4, group, shard=Shard(0, 4, 4, rank, world)), w_col[:4])
        assert rep.shard.replicas == world
        gys = torch.randn(world, 3, 5, 4, generator=g)
        (rep(x) * gys[rank]).sum().backward()
        _, (dw,) = _grads64(lambda w: torch.stack([x.double() @ w.T * gr for gr in gys]), w_col[:4])
        torch.testing.assert_close(rep.weight.grad, dw.float(), **TOL)

        # vocab-parallel embedding: ids in every rank's range, and the edges
        vocab = 6 * world
        table = torch.randn(vocab, 16, generator=g)
        ids = torch.randint(0, vocab, (3, 5), generator=g)
        ids[0, 0], ids[0, 1] = 0, vocab - 1
        emb = _set(VocabParallelEmbedding(vocab, 16, group), table)
        ge = torch.randn(3, 5, 16, generator=g)
        e = emb(ids)
        (e * ge).sum().backward()
        full = torch.nn.functional.embedding(ids, table.double().requires_grad_(True))
        (full * ge).sum().backward()
        torch.testing.assert_close(e, table[ids], rtol=0, atol=0)
        dtable = torch.zeros(vocab, 16, dtype=torch.float64).index_add_(
            0, ids.flatten(), ge.double().flatten(0, 1)
        )
        torch.testing.assert_close(emb.weight.grad, emb.shard.take(dtable).float(), **TOL)

        # vocab-parallel LM head: gathered logits, and its shard in the fused ops
        w_head = torch.randn(vocab, 16, generator=g) * 0.3
        head = _set(ColumnParallelLinear(16, vocab, group, gather_output=True), w_head)
        targets = torch.randint(0, vocab, (3, 5), generator=g)
        h = x.clone().requires_grad_(True)
        logits = head(h)
        torch.testing.assert_close(logits, x @ w_head.T, **TOL)
        (logits * torch.ones_like(logits)).sum().backward()
        torch.testing.assert_close(
            head.weight.grad, head.shard.take(x.flatten(0, 1).sum(0).expand(vocab, 16)), **TOL
        )
        hs = x.clone().requires_grad_(True)
        lp = linear_logprobs(hs, head.weight, targets, tp_group=group)
        ref_lp = torch.log_softmax(x.double() @ w_head.double().T, -1)
        ref_lp = ref_lp.gather(-1, targets[..., None])[..., 0]
        torch.testing.assert_close(lp, ref_lp.float(), **TOL)
        coef = torch.randn(3, 5, generator=g)
        loss = linear_policy_loss(hs, head.weight, targets, coef, tp_group=group)
        torch.testing.assert_close(loss, (coef.double() * ref_lp).sum().float(), **TOL)
    finally:
        ar._custom_comm = real


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_parallel_layers_equal_float64_unsharded():
    run_ranks(_layers_worker, 2)
