"""linear_logprobs over vocab-parallel shards (tp_group) equals the unsharded op, forward and
backward, with 2 and 4 gloo processes on the CPU; and it uses exactly two collectives in forward
(a fixed-size all_gather that checks N, shards and targets, then one of per-token statistics) and
one in backward (all_reduce of dhidden). Mismatched ranks raise ValueError on every rank.
"""

import datetime
import os
import re
import sys

import pytest
import torch
import torch.distributed as dist

from helpers import IGNORE, assert_shard_matches, fwd_bwd, run_ranks


def _count_collectives(counts):
    """Wrap torch.distributed collectives so the worker can count the calls the op makes; sums
    are counted at nemokern.parallel.all_reduce (the op's one way to sum, which may not reach
    torch.distributed at all)."""
    op_module = sys.modules["nemokern.ops.linear_logprobs"]  # the package exports the function

    for module, name in (
        (dist, "all_gather"),
        (dist, "all_gather_into_tensor"),
        (op_module, "all_reduce"),
        (dist, "broadcast"),
        (dist, "reduce_scatter"),
        (dist, "reduce_scatter_tensor"),
        (dist, "all_to_all"),
    ):
        fn = getattr(module, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        setattr(module, name, counted)


def _worker(rank, world, init_file, backend, dtype):
    os.environ["NEMOKERN_BACKEND"] = backend
    from nemokern.ops import linear_logprobs

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    shard, hs = 13, 24  # vocabulary 13 * world, odd sizes
    vocab = shard * world
    g = torch.Generator().manual_seed(1234)  # identical inputs on every rank
    hidden = torch.randn(3, 5, hs, generator=g).to(dtype)
    weight = (torch.randn(vocab, hs, generator=g) / hs**0.5 * 3).to(dtype)
    targets = torch.randint(0, vocab, (3, 5), generator=g)
    targets[0, 1] = targets[2, 2] = IGNORE
    targets[1, 0], targets[1, 1] = 0, vocab - 1  # first and last shard hit
    g_lp, g_ent = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)

    def run(w, tp_group):
        """(logp, entropy, dhidden, dweight, the collectives counted by the end of forward)."""
        counts_fwd = {}

        def op(h, w):
            out = linear_logprobs(
                h, w, targets, temperature=0.7, return_entropy=True, tp_group=tp_group
            )
            counts_fwd.update(counts)
            return out

        return (*fwd_bwd(op, (hidden, w), (g_lp, g_ent)), counts_fwd)

    counts = {}
    full = run(weight, None)
    _count_collectives(counts)
    sharded = run(weight[rank * shard : (rank + 1) * shard], group)
    # forward: the fixed-size header check, then the per-token statistics
    assert sharded[4] == {"all_gather": 2}, f"forward collectives: {sharded[4]}"
    assert counts == {"all_gather": 2, "all_reduce": 1}, f"fwd+bwd collectives: {counts}"
    assert_shard_matches(sharded, full, rank, shard, ("logp", "entropy", "dhidden"), dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(
    "world,backend,dtype",
    [(2, "torch", torch.float32), (4, "torch", torch.bfloat16), (2, "triton", torch.float32)],
)
def test_vocab_parallel_equals_unsharded(world, backend, dtype):
    # The Triton case runs interpreted: spawned workers inherit TRITON_INTERPRET from conftest.
    run_ranks(_worker, world, backend, dtype)


def _unequal_worker(rank, world, init_file):
    os.environ["NEMOKERN_BACKEND"] = "torch"
    from nemokern.ops import linear_logprobs

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # torch.tensor_split of a 25-row head: shards of 13 and 12 rows. Rank 1's ids start at
    # 13, not at rank * shard = 12: every one of its targets would hit the wrong column.
    weight = torch.randn(25, 8, generator=torch.Generator().manual_seed(0))
    shard = weight.tensor_split(world)[rank]
    hidden = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"shards of sizes \[13, 12\]"):
        linear_logprobs(hidden, shard, torch.tensor([0, 12, 13, 24]), tp_group=dist.group.WORLD)


def test_unequal_vocab_shards_raise():
    run_ranks(_unequal_worker, 2)


def _mismatch_worker(rank, world, init_file, ignore_differs):
    os.environ["NEMOKERN_BACKEND"] = "torch"
    from nemokern.ops import linear_logprobs

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    weight, hidden = torch.randn(10, 8, generator=g), torch.randn(5, 8, generator=g)
    targets = torch.tensor([0, 3, 7, 19, IGNORE])
    if rank == 1:  # a data-loader bug: rank 1 got another batch's targets
        targets = (
            torch.tensor([0, 3, IGNORE, 19, IGNORE])
            if ignore_differs
            else torch.tensor([0, 3, 8, 19, IGNORE])
        )
    with pytest.raises(ValueError, match="ranks of tp_group passed different targets"):
        linear_logprobs(hidden, weight, targets, tp_group=dist.group.WORLD)


@pytest.mark.parametrize("ignore_differs", [False, True])
def test_ranks_with_different_targets_raise_on_every_rank(ignore_differs):
    run_ranks(_mismatch_worker, 2, ignore_differs)


def _token_count_worker(rank, world, init_file):
    """Rank 1 passes 6 tokens, the others 5: a variable-size all_gather with these would be
    mismatched (gloo aborts or hangs in it); the fixed-size header exchange comes first, so every
    rank raises a ValueError naming the counts instead."""
    os.environ["NEMOKERN_BACKEND"] = "torch"
    from nemokern.ops import linear_logprobs

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    n = 6 if rank == 1 else 5
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(n, 8, generator=g), torch.randn(10, 8, generator=g)
    targets = torch.tensor([0, 3, 7, 19, IGNORE, 2][:n])
    counts = [6 if r == 1 else 5 for r in range(world)]
    with pytest.raises(ValueError, match=re.escape(f"different numbers of tokens {counts}")):
        linear_logprobs(h, w, targets, tp_group=dist.group.WORLD)
    dist.barrier()  # the group still works: nobody is stuck inside a mismatched collective


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_with_different_token_counts_raise_on_every_rank(world):
    run_ranks(_token_count_worker, world)
