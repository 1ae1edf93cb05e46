"""torch.profiler over one greedy generate() call of test_bench_generate.py's shapes (16 prompts,
32 new tokens, random weights, fp32, CPU): time per call, operator self time, the top operators
and the aten call count.

    PYTHONPATH=$PWD python bench/profile_generate.py [tiny|mid]
"""

import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import GENERATE_SHAPES, NEW_TOKENS, generate_prompts  # noqa: E402

from nemokern.model import Llama, LlamaConfig, generate  # noqa: E402


def main(shape: str = "tiny") -> None:
    cfg = GENERATE_SHAPES[shape]
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny(**cfg, max_position_embeddings=1024)).eval()
    prompts = generate_prompts(cfg["vocab_size"])

    def call():
        return generate(model, prompts, max_new_tokens=NEW_TOKENS, greedy=True, eos_token_id=[])

    for _ in range(3):
        call()
    rounds = 10 if shape == "tiny" else 2
    t = time.perf_counter()
    for _ in range(rounds):
        call()
    print(f"{shape}: {(time.perf_counter() - t) / rounds * 1e3:.1f} ms per call")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    calls = sum(e.count for e in events if e.key.startswith("aten::"))
    print(f"operator self time {total:.1f} ms, {calls} aten calls")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main(*sys.argv[1:])
