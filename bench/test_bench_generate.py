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
extra_info: tokens (generated, so bench/report.py shows tokens/s), threads; for the compiled run
compile_s, the first call's time with torch.compile's caches off (compiling one prefill and one
decode graph) minus a steady call's.
"""

import time

import pytest
import torch
from _memory import run_benchmark

from helpers import nemokern_from_hf, random_hf_model
from nemokern.model import generate

PROMPTS, NEW_TOKENS = 16, 32


# hidden, layers, query heads, KV heads, FFN, vocab
KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
KEYS += ("intermediate_size", "vocab_size")
SHAPES = {
    "tiny": dict(zip(KEYS, (256, 4, 8, 2, 704, 262))),
    "mid": dict(zip(KEYS, (1024, 8, 16, 4, 2816, 32000))),
}
ROUNDS = {"tiny": 10, "mid": 3}


@pytest.fixture(scope="module", params=list(SHAPES))
def shape(request):
    cfg = SHAPES[request.param]
    hf = random_hf_model(
        **cfg, max_position_embeddings=1024, tie_word_embeddings=False, attn_implementation="sdpa"
    )
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 49, (PROMPTS,), generator=g).tolist()
    prompts = [torch.randint(0, cfg["vocab_size"], (n,), generator=g).tolist() for n in lengths]
    return request.param, hf, nemokern_from_hf(hf), prompts


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


@pytest.mark.benchmark(group="generate: 16 prompts x 32 new tokens, greedy, fp32, CPU")
@pytest.mark.parametrize("impl", ["nemokern", "nemokern-compile", "transformers"])
def test_generate_tokens_per_second(benchmark, shape, impl):
    name, hf, ours, prompts = shape
    info = {"tokens": PROMPTS * NEW_TOKENS, "threads": torch.get_num_threads(), "shape": name}
    if impl == "transformers":
        fn = _transformers(hf, prompts)
    else:
        fn = _nemokern(ours, prompts, compile=impl == "nemokern-compile")
    if impl == "nemokern-compile":
        torch._dynamo.reset()
        with torch._inductor.config.patch(force_disable_caches=True):
            start = time.perf_counter()
            fn()
            first = time.perf_counter() - start
        start = time.perf_counter()
        fn()
        info["compile_s"] = first - (time.perf_counter() - start)
    run_benchmark(benchmark, fn, "cpu", ROUNDS[name], **info)
