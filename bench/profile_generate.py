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
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from test_bench_generate import NEW_TOKENS, PROMPTS, SHAPES  # noqa: E402

from nemokern.model import Llama, LlamaConfig, generate  # noqa: E402


def main(shape: str = "tiny") -> None:
    cfg = SHAPES[shape]
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny(**cfg, max_position_embeddings=1024)).eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 49, (PROMPTS,), generator=g).tolist()
    prompts = [torch.randint(0, cfg["vocab_size"], (n,), generator=g).tolist() for n in lengths]

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
