"""What each process holds under DDP, --shard-optimizer (ZeRO-1) and --fsdp (FSDP2), and the time
of a training step, on one host: the nemokern TrainLoop on a ~150M-parameter Llama
(bench_tensor_parallel.py's shape, common.TP_CONFIG), a forward + backward through linear_logprobs
per micro-batch.

pytest-benchmark times one process and data parallelism needs several, so torchrun starts it:

    torchrun --nproc-per-node 2 bench/bench_fsdp.py ddp|zero|fsdp [--steps 3] [--tokens 256]
        [--model DIR [--deferred]] [--param-dtype bfloat16]

With --model DIR the model is read from an HF directory (write one first, once, with
`python bench/bench_fsdp.py save DIR`) instead of built at random on every process; --deferred
reads it as the trainers do under --fsdp: on the meta device, sharded, then each process its rows
(Llama.from_pretrained(deferred=True)), so the peak RSS shows what loading costs each process.

Rank 0 prints one JSON line: the bytes each process holds of the parameters, of the gradients
(measured in the second micro-batch of a step, after the first one's backward) and of the AdamW
state, the peak RSS of each process once its TrainLoop is built (setup: model read or built and
placed, before any step) and at the end (without --deferred the whole model is built on every
process before it is sharded, so this includes one whole copy), and the median step time after
one warm-up step.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import TP_CONFIG as CONFIG  # noqa: E402

from nemokern.engine.config import TrainConfig  # noqa: E402
from nemokern.engine.loop import StepOutput, TrainLoop  # noqa: E402
from nemokern.model import Llama, LlamaConfig  # noqa: E402
from nemokern.ops import linear_logprobs  # noqa: E402
from nemokern.parallel.fsdp import local_part  # noqa: E402


class Policy(torch.nn.Module):
    """The log-prob loss of a packed sequence through the model's root forward (FSDP and DDP
    see the whole computation)."""

    def __init__(self, llama):
        super().__init__()
        self.llama = llama

    def forward(self, ids):
        h = self.llama.hidden_states(ids[None])[0]
        return -linear_logprobs(h[:-1], self.llama.lm_head.weight, ids[1:]).mean()


def _nbytes(tensors):
    return sum(local_part(t).numel() * t.element_size() for t in tensors if t is not None)


def _peak_rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("ddp", "zero", "fsdp", "save"))
    ap.add_argument("dir", nargs="?", help="save: where to write the model")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--model", help="read the model from this HF directory")
    ap.add_argument("--deferred", action="store_true", help="with --model: read it deferred")
    ap.add_argument(
        "--param-dtype", default="float32", choices=("float32", "bfloat16"), help="fsdp_param_dtype"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.mode == "save":
        Llama(LlamaConfig.tiny(**CONFIG)).save_pretrained(args.dir)
        return
    if args.model:
        llama = Llama.from_pretrained(args.model, dtype=torch.float32, deferred=args.deferred)
    else:
        llama = Llama(LlamaConfig.tiny(**CONFIG))
    model = Policy(llama)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, CONFIG["vocab_size"], (args.tokens,), generator=g) for _ in range(64)]
    grads = []

    def step_fn(module, ids):
        grads.append(_nbytes(p.grad for p in model.parameters()))
        return StepOutput(module(ids), tokens=ids.numel())

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            out=out,
            grad_accum=2,
            max_steps=args.steps + 1,
            lr=1e-4,
            shard_optimizer=args.mode == "zero",
            fsdp=args.mode == "fsdp",
            fsdp_param_dtype=args.param_dtype,
            optimizer_impl="foreach",
            progress=False,
            tensorboard=False,
            device="cpu",
        )
        loop = TrainLoop(cfg, model, data, step_fn)
        setup_rss = _peak_rss_mib()  # the model read (or built), sharded, AdamW not yet made
        print(f"setup {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        seconds = [loop.train_step()["step_s"] for _ in range(args.steps + 1)][1:]
        print(f"steps {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    opt = getattr(loop.optimizer, "optim", loop.optimizer)  # ZeRO: this process's share
    held = {
        "params": _nbytes(model.parameters()),
        "grads": max(grads),
        "adamw": _nbytes(t for s in opt.state.values() for t in s.values() if t.dim() > 0),
        "setup_peak_rss_mib": setup_rss,
        "peak_rss_mib": _peak_rss_mib(),
    }
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, held)
    if dist.get_rank() == 0:
        n = sum(p.numel() for p in model.parameters())  # a DTensor's numel is the whole one
        print(
            json.dumps(
                {
                    "mode": args.mode,
                    "load": ("deferred" if args.deferred else "whole") if args.model else "random",
                    "param_dtype": args.param_dtype,
                    "processes": dist.get_world_size(),
                    "tokens_per_micro_batch": args.tokens,
                    "parameters": n,
                    "per_process": every,
                    "step_s_median": statistics.median(seconds),
                    "step_s": seconds,
                }
            )
        )
    # DDP's reducer holds the process group: dropped first, so that the group is destroyed inside
    # destroy_process_group (which lets go of the GIL) rather than in the reducer's destructor at
    # exit, where gloo's worker thread, finishing all_gather_object, waits for the GIL that the
    # destructor holds (a hang seen here)
    del loop
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
