"""Tensor parallelism on one host: peak RSS per rank while loading a checkpoint, and the time of
one training step (forward + backward through linear_logprobs), at TP = 1, 2, 4.

pytest-benchmark times one process and TP needs several, so this script is started by torchrun
(one run per TP size) after writing a checkpoint once:

    python bench/bench_tensor_parallel.py make /tmp/tp_ckpt
    torchrun --nproc-per-node 2 bench/bench_tensor_parallel.py load /tmp/tp_ckpt
    torchrun --nproc-per-node 2 bench/bench_tensor_parallel.py step /tmp/tp_ckpt --tokens 512

Rank 0 prints one JSON line per run. Memory: VmHWM (peak resident set, file-backed pages of the
memory-mapped safetensors included) after the load minus VmRSS before it, per rank, the peak
reset first (/proc/self/clear_refs). Step: the median of --steps timed steps after one warm-up.
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from common import TP_CONFIG as CONFIG  # the FSDP benchmark's model too

from nemokern.model import Llama, LlamaConfig
from nemokern.ops import linear_logprobs
from nemokern.parallel import init_parallel


def _kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def make(path):
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama(LlamaConfig.tiny(**CONFIG))
    model = model.to_empty(device="cpu")
    model.reset_parameters()
    model.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"checkpoint": path, "parameters": n, "bytes": 4 * n}))


def load(path, tp_group):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _kib("VmRSS")
    model = Llama.from_pretrained(path, tp_group=tp_group)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "rss_before_mib": before / 1024,
        "peak_rss_mib": _kib("VmHWM") / 1024,
        "peak_extra_mib": (_kib("VmHWM") - before) / 1024,
        "weights_held_mib": held / 2**20,
    }


def step(path, tp_group, tokens, steps):
    model = Llama.from_pretrained(path, tp_group=tp_group)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=g)
    targets = torch.randint(0, model.config.vocab_size, (1, tokens), generator=g)
    times = []
    for i in range(steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        hidden = model.hidden_states(ids)
        lp = linear_logprobs(hidden, model.lm_head.weight, targets, tp_group=tp_group)
        lp.sum().backward()
        dist.barrier()
        if i:
            times.append(time.perf_counter() - t0)
    return {"tokens": tokens, "step_s": statistics.median(times), "steps_s": times}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("make", "load", "step"))
    ap.add_argument("path")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    if args.mode == "make":
        return make(args.path)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    mesh = init_parallel(int(os.environ["WORLD_SIZE"]), "cpu")
    group = mesh.get_group("tp") if mesh.size() > 1 else None
    if args.mode == "load":
        out = load(args.path, group)
    else:
        out = step(args.path, group, args.tokens, args.steps)
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, out)
    if dist.get_rank() == 0:
        print(json.dumps({"mode": args.mode, "tp": dist.get_world_size(), "ranks": rows}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
