"""--shard-optimizer (ZeRO stage 1 through torch's ZeroRedundancyOptimizer) on 2 gloo processes:
the same weights as DDP with a whole AdamW, bit for bit; each process holding about half the
AdamW state; checkpoints with one optimizer file per process that resume exactly; a whole
(unsharded) checkpoint resumed sharded; a sharded one refused without the flag."""

import pytest
import torch
from train_tiny import TinyReward, batches, config, step_fn

from helpers import train_tiny_ranks
from nemokern.engine.checkpoint import CheckpointError
from nemokern.engine.loop import TrainLoop


def train(out, shard, resume=""):
    return train_tiny_ranks(out, "zero" if shard else "ddp", resume)


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    return root, train(root / "ddp", False), train(root / "zero", True)


def test_sharded_adamw_gives_ddp_weights_with_half_the_state_each(runs):
    _, (w_ddp, r_ddp), (w_zero, r_zero) = runs
    assert_same(w_zero, w_ddp)
    assert r_zero[0]["losses"] == r_ddp[0]["losses"] and len(r_ddp[0]["losses"]) == 6
    whole = r_ddp[0]["state_elements"]
    assert r_ddp[1]["state_elements"] == whole  # DDP: every process holds all of it
    held = [r["state_elements"] for r in r_zero]
    assert sum(held) == whole and max(held) < 0.75 * whole, (held, whole)


def test_sharded_checkpoint_resumes_exactly(runs):
    root, _, (w_zero, r_zero) = runs
    step3 = root / "zero" / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in step3.glob("optimizer*.json")) == [
        "optimizer.rank00000.json",
        "optimizer.rank00001.json",
    ]
    w, ranks = train(root / "zero-resumed", True, step3)
    assert_same(w, w_zero)
    assert ranks[0]["losses"] == r_zero[0]["losses"][3:]


def test_whole_checkpoint_resumes_sharded(runs):
    root, (w_ddp, r_ddp), _ = runs
    w, ranks = train(root / "ddp-to-zero", True, root / "ddp" / "checkpoints" / "step-00000003")
    assert_same(w, w_ddp)
    assert ranks[0]["losses"] == r_ddp[0]["losses"][3:]


def test_sharded_checkpoint_needs_the_flag(runs, tmp_path):
    root, _, _ = runs
    step3 = root / "zero" / "checkpoints" / "step-00000003"
    loop = TrainLoop(
        config(tmp_path, resume=str(step3)), TinyReward(tie=True), batches(12), step_fn
    )
    with pytest.raises(CheckpointError, match=r"sharded over 2 processes \(--shard-optimizer\)"):
        loop.fit()
