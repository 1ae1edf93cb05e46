"""Benchmark: batched greedy generation on the CPU, nemokern's generate() (eager, and with
compile=True) against transformers' LlamaForCausalLM.generate on the same random weights.

    PYTHONPATH=$PWD python -m pytest bench/test_bench_generate.py --benchmark-enable \
        --benchmark-json=bench/results/<machine>-<date>-generate.json

Both get the same 16 left-padded prompts (8-48 tokens, fixed seed), greedy decoding, exactly 32
new tokens (no EOS: nemokern eos_token_id=[], transformers eos_token_id=None; every row is
checked to have 32 tokens), fp32, torch's default thread count, transformers' default cache
(DynamicCache) and SDPA attention. Shapes: Llama-3.1-shaped, untied,
  tiny  hidden 256, 4 layers, 8 query / 2 KV heads, FFN 704, vocab 262 (the RLOO benchmark's policy)
  mid   hidden 1024, 8 layers, 16 query / 4 KV heads, FFN 2816, vocab 32000.
The three run in turn, one call each, ROUNDS times (a shared machine's changing load then weighs
on all alike); the benchmark's rounds are those calls. extra_info: tokens (generated, so
bench/report.py shows tokens/s), threads, seconds (every round); for the compiled run compile_s,
the first call's time with torch.compile's caches off (compiling the decode step) minus the
fastest steady call.
"""

import time

import pytest
import torch
from common import GENERATE_PROMPTS as PROMPTS
from common import GENERATE_SHAPES as SHAPES
from common import NEW_TOKENS, device_name, generate_prompts, use_times

from helpers import nemokern_from_hf, random_hf_model
from nemokern.model import generate

ROUNDS = {"tiny": 10, "mid": 3}


@pytest.fixture(scope="module", params=list(SHAPES))
def shape(request):
    cfg = SHAPES[request.param]
    hf = random_hf_model(
        **cfg, max_position_embeddings=1024, tie_word_embeddings=False, attn_implementation="sdpa"
    )
    return request.param, hf, nemokern_from_hf(hf), generate_prompts(cfg["vocab_size"])


def _transformers(hf, prompts):
    t = max(map(len, prompts))
    ids = torch.zeros(len(prompts), t, dtype=torch.long)
    mask = torch.zeros(len(prompts), t, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p) :], mask[i, t - len(p) :] = torch.tensor(p), 1

    def run():
        out = hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        assert out.shape == (len(prompts), t + NEW_TOKENS)
        return out

    return run


def _nemokern(model, prompts, compile):
    def run():
        out = generate(
            model,
            prompts,
            max_new_tokens=NEW_TOKENS,
            greedy=True,
            eos_token_id=[],
            compile=compile,
        )
        assert out.lengths.tolist() == [NEW_TOKENS] * len(prompts)
        return out

    return run


@pytest.fixture(scope="module")
def interleaved(shape):
    """Seconds per call of each implementation, one call of each in turn, ROUNDS times, so that
    the load of the shared machine weighs on all of them alike; and the compile time."""
    name, hf, ours, prompts = shape
    calls = {
        "nemokern": _nemokern(ours, prompts, compile=False),
        "nemokern-compile": _nemokern(ours, prompts, compile=True),
        "transformers": _transformers(hf, prompts),
    }
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        start = time.perf_counter()
        calls["nemokern-compile"]()
        first = time.perf_counter() - start
    for call in calls.values():
        call()  # warm-up
    times = {impl: [] for impl in calls}
    for _ in range(ROUNDS[name]):
        for impl, call in calls.items():
            start = time.perf_counter()
            call()
            times[impl].append(time.perf_counter() - start)
    return times, first - min(times["nemokern-compile"])


@pytest.mark.benchmark(group="generate: 16 prompts x 32 new tokens, greedy, fp32, CPU, interleaved")
@pytest.mark.parametrize("impl", ["nemokern", "nemokern-compile", "transformers"])
def test_generate_tokens_per_second(benchmark, shape, interleaved, impl):
    times, compile_s = interleaved
    benchmark.pedantic(lambda: None, rounds=1)
    use_times(benchmark, times[impl])
    benchmark.extra_info.update(
        device=device_name("cpu"),
        shape=shape[0],
        tokens=PROMPTS * NEW_TOKENS,
        threads=torch.get_num_threads(),
        seconds=times[impl],
        **({"compile_s": compile_s} if impl == "nemokern-compile" else {}),
    )
