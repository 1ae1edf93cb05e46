"""One data-parallel rank of tests/test_shard_optimizer.py (env:// like torchrun):
`zero_worker.py OUT SHARD RESUME` trains train_tiny's reward model for 6 steps (a checkpoint
every 3), SHARD 1 with --shard-optimizer, RESUME '' or a checkpoint; each rank writes
OUT/rank<R>.json (the losses and how many AdamW state elements it holds), rank 0
OUT/weights.safetensors.
"""

import json
import sys

import torch
from safetensors.torch import save_file
from train_tiny import TinyReward, batches, config, step_fn

from nemokern.train.loop import TrainLoop

if __name__ == "__main__":
    torch.set_num_threads(1)
    out, shard, resume = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
    cfg = config(
        out,
        grad_accum=1,
        max_steps=6,
        save_every=3,
        keep_last=5,
        shard_optimizer=shard,
        resume=resume,
        optimizer_impl="foreach",
    )
    loop = TrainLoop(cfg, TinyReward(tie=True), batches(12), step_fn)
    history = loop.fit()
    opt = getattr(loop.optimizer, "optim", loop.optimizer)  # a ZeroRedundancyOptimizer's own share
    held = sum(t.numel() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    rank = torch.distributed.get_rank()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"losses": [r["loss"] for r in history], "state_elements": held}, f)
    if rank == 0:
        save_file(
            {k: v.clone() for k, v in loop.model.state_dict().items()},
            f"{out}/weights.safetensors",
        )
    torch.distributed.destroy_process_group()
