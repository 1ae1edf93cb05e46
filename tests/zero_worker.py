"""One data-parallel rank of tests/test_shard_optimizer.py and tests/test_fsdp.py (env:// like
torchrun): `zero_worker.py OUT MODE RESUME [GRAD_ACCUM [BATCHES]]` trains train_tiny's reward
model for 6 steps (a checkpoint every 3) on BATCHES micro-batches (default 12 x GRAD_ACCUM), MODE
ddp, zero (--shard-optimizer), fsdp (--fsdp) or fsdp-bf16 (and --fsdp-param-dtype bfloat16),
RESUME '' or a checkpoint; each rank writes OUT/rank<R>.json (the losses, how many AdamW state
elements it holds, the dtypes a layer's weights had while it ran), rank 0 OUT/weights.safetensors
(whole tensors).
"""

import json
import sys

import torch
from safetensors.torch import save_file
from train_tiny import TinyReward, batches, config, step_fn

from helpers import leave_group
from nemokern.engine.loop import TrainLoop
from nemokern.parallel.fsdp import full_tensor, local_part

if __name__ == "__main__":
    torch.set_num_threads(1)
    out, mode, resume = sys.argv[1], sys.argv[2], sys.argv[3]
    grad_accum = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    n_batches = int(sys.argv[5]) if len(sys.argv) > 5 else 12 * grad_accum
    cfg = config(
        out,
        grad_accum=grad_accum,
        max_steps=6,
        save_every=3,
        keep_last=5,
        shard_optimizer=mode == "zero",
        fsdp=mode.startswith("fsdp"),
        fsdp_param_dtype="bfloat16" if mode == "fsdp-bf16" else "float32",
        resume=resume,
        optimizer_impl="foreach",
    )
    loop = TrainLoop(cfg, TinyReward(tie=True), batches(n_batches), step_fn)
    computed = set()  # the dtype a layer's weights have while it runs
    mlp = loop.model.trunk.layers[0].mlp
    mlp.register_forward_pre_hook(lambda m, args: computed.add(str(m.up_proj.weight.dtype)))
    history = loop.fit()
    opt = getattr(loop.optimizer, "optim", loop.optimizer)  # a ZeroRedundancyOptimizer's own share
    held = sum(local_part(t).numel() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    rank = torch.distributed.get_rank()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(
            {
                "losses": [r["loss"] for r in history],
                "state_elements": held,
                "computed_dtypes": sorted(computed),
            },
            f,
        )
    whole = {k: full_tensor(v).clone() for k, v in loop.model.state_dict().items()}
    if rank == 0:
        save_file(whole, f"{out}/weights.safetensors")
    leave_group()
