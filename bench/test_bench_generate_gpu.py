"""Benchmark (GPU): greedy decoding of an 8B-shaped random Llama in bf16 at batch 1, 16, 64 and
256, nemokern's generate() (eager and compile=True, i.e. CUDA graphs) against transformers'
LlamaForCausalLM.generate with its static cache, and each decode step against the bandwidth bound.

    python -m pytest -m gpu bench/test_bench_generate_gpu.py --benchmark-enable \
        --benchmark-json=bench/results/<date>-<gpu>-generate.json
    python -m pytest -m gpu bench/test_bench_generate_gpu.py --generate-shape tiny  # smoke run,
                                                                                  # CPU if no GPU

Prompts: BATCH rows of PROMPT_LEN random tokens (no padding), greedy, exactly NEW_TOKENS new tokens
(no EOS). The two models share one set of weights (nemokern's parameters are transformers'
tensors). A decode step's time is (t(NEW_TOKENS) - t(1)) / (NEW_TOKENS - 1), the prefill and the
first token cancelling out. Its bound: the bytes a step must read (every weight but the embedding
table, plus the keys and values of the mean context, PROMPT_LEN + NEW_TOKENS / 2) over the copy
bandwidth measured in the same run (read + write counted, as bench/test_bench_ceilings.py does).
extra_info: step_s, bound_s, of_bound (bound / step: 1.0 is at the bandwidth limit), tokens
(generated per call, so bench/report.py shows tokens/s), the batch and the shape.
"""

import time

import pytest
import torch
from common import KEYS, device_name, use_times  # KEYS: hidden, layers, heads, KV heads, FFN, vocab

from helpers import hf_config
from nemokern.model import Llama, LlamaConfig, generate

pytestmark = pytest.mark.gpu

SHAPES = {
    "8b": dict(zip(KEYS, (4096, 32, 32, 8, 14336, 128256))),  # Llama-3.1-8B
    "tiny": dict(zip(KEYS, (256, 2, 8, 2, 704, 1000))),
}
BATCHES = (1, 16, 64, 256)
COMPILED_BATCHES = (1, 16)  # each batch size compiles its own decode graph
PROMPT_LEN, NEW_TOKENS, ROUNDS = 128, 64, 3


@pytest.fixture(scope="module")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def models(request, device):
    """(transformers model, nemokern model on the same tensors), bf16 on `device`."""
    from transformers import LlamaForCausalLM

    name = request.config.getoption("--generate-shape")
    if device.type != "cuda" and name != "tiny":
        pytest.skip("the 8B shape needs a CUDA GPU (--generate-shape tiny runs on the CPU)")
    cfg = hf_config(
        **SHAPES[name],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            hf = LlamaForCausalLM(cfg).eval()
        with torch.device("meta"):
            ours = Llama(LlamaConfig.from_dict(cfg.to_dict()))
    finally:
        torch.set_default_dtype(default)
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    ours.load_state_dict(state, assign=True)
    return name, hf, ours.eval()


@pytest.fixture(scope="module")
def copy_bandwidth(device):
    """Bytes/s of a large device-to-device copy (read + write)."""
    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step_bytes(model: Llama, batch: int) -> int:
    """What one decode step must read: the weights but the embedding table, and the keys and
    values of the mean context."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    context = PROMPT_LEN + NEW_TOKENS // 2
    kv = 2 * c.num_hidden_layers * batch * c.num_key_value_heads * c.head_dim * context * 2
    return weights + kv


def _runner(impl, hf, ours, ids):
    def run(new_tokens):
        if impl == "transformers":
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                cache_implementation="static",
            )
            assert out.shape[1] == ids.shape[1] + new_tokens
        else:
            out = generate(
                ours,
                list(ids),
                max_new_tokens=new_tokens,
                greedy=True,
                eos_token_id=[],
                compile=impl == "nemokern-compile",
            )
            assert out.lengths.tolist() == [new_tokens] * ids.shape[0]
        return out

    return run


@pytest.mark.benchmark(group="generate, greedy, bf16, 128-token prompts x 64 new tokens (GPU)")
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", ["nemokern", "nemokern-compile", "transformers"])
def test_generate_gpu(benchmark, models, copy_bandwidth, device, impl, batch):
    name, hf, ours = models
    if impl == "nemokern-compile" and batch not in COMPILED_BATCHES:
        pytest.skip(f"compiled at batch {COMPILED_BATCHES} only (a graph per batch size)")
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, ours.config.vocab_size, (batch, PROMPT_LEN), generator=g).to(device)
    run = _runner(impl, hf, ours, ids)
    with torch.no_grad():
        for n in (1, NEW_TOKENS):
            run(n)  # warm-up, and compiling/capturing for both lengths
        full, first = [], []
        for _ in range(ROUNDS):
            for n, times in ((NEW_TOKENS, full), (1, first)):
                _sync(device)
                start = time.perf_counter()
                run(n)
                _sync(device)
                times.append(time.perf_counter() - start)
    step = (sorted(full)[ROUNDS // 2] - min(first)) / (NEW_TOKENS - 1)
    bound = _step_bytes(ours, batch) / copy_bandwidth
    benchmark.pedantic(lambda: None, rounds=1)
    use_times(benchmark, full)
    benchmark.extra_info.update(
        device=device_name(device),
        shape=name,
        batch=batch,
        tokens=batch * NEW_TOKENS,
        step_s=step,
        bound_s=bound,
        of_bound=bound / step,
        copy_bytes_per_s=copy_bandwidth,
    )
