"""Benchmark: a small Llama-3.1 trunk, forward + backward, on a batch of sequences of uneven
length: nemokern packed (no padding computed; flash-attn or torch varlen attention) against
transformers' LlamaForCausalLM with SDPA attention on the same weights, padded to the longest.

    python -m pytest -m gpu bench/test_bench_attention.py --benchmark-enable

test_trunk_shared_prompt_gpu times the trunk work of a REINFORCE micro-batch with each prompt packed
once for its k responses (parents) against k full copies.

extra_info["tokens"] is the count of real tokens (for the rollout: prompt + response of every
sample, as if each were whole), so bench/report.py shows comparable tokens/s.
"""

import pytest
import torch
from common import run_benchmark as _run

DEVICE = "cuda"
LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 4, 2048, 16, 4, 5632, 32000


def _lengths(n=16, low=64, high=2048):
    g = torch.Generator().manual_seed(0)
    return torch.randint(low, high + 1, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from nemokern.model import Llama

    torch.manual_seed(0)
    cfg = HFConfig(
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    hf = LlamaForCausalLM(cfg).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("trunk")
    hf.save_pretrained(path)
    hf = LlamaForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="sdpa"
    ).to(DEVICE)
    ours = Llama.from_pretrained(path, dtype=torch.bfloat16, device=DEVICE)
    return {"transformers-sdpa-padded": hf, "nemokern-packed": ours}


@pytest.mark.gpu
@pytest.mark.benchmark(
    group=f"trunk fwd+bwd (GPU, {LAYERS} layers H={HIDDEN} GQA {HEADS}/{KV_HEADS}, "
    "16 sequences of 64-2048 tokens, bf16)"
)
@pytest.mark.parametrize("impl", ["nemokern-packed", "transformers-sdpa-padded"])
def test_trunk_packed_vs_padded_gpu(benchmark, models, impl):
    model = models[impl]
    lengths = _lengths()
    g = torch.Generator(device=DEVICE).manual_seed(1)
    seqs = [torch.randint(0, VOCAB, (n,), device=DEVICE, generator=g) for n in lengths]
    if impl == "nemokern-packed":
        ids = torch.cat(seqs)
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=DEVICE)

        def step():
            model.zero_grad(set_to_none=True)
            model(ids, cu_seqlens=cu).float().sum().backward()
    else:
        t = max(lengths)
        ids = torch.zeros(len(seqs), t, dtype=torch.long, device=DEVICE)
        mask = torch.zeros(len(seqs), t, dtype=torch.long, device=DEVICE)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1

        def step():
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids, attention_mask=mask).logits
            (logits.float() * mask[..., None]).sum().backward()

    _run(
        benchmark,
        step,
        DEVICE,
        10,
        tokens=sum(lengths),
        shape=f"{len(lengths)} seqs, {sum(lengths)} tokens, padded to {max(lengths)}",
    )


def _rollout_batch(device, prompts=8, k=4, prompt_len=1024, response=(128, 512), vocab=VOCAB):
    """A REINFORCE micro-batch: `prompts` prompts of prompt_len tokens, k responses each of
    uneven length; pack()'s two layouts ({"shared-prompt": ..., "full-copies": ...})."""
    from nemokern.trainers.policy import pack

    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(prompts)]
    rows = [r for r in rows for _ in range(k)]
    responses = [
        torch.randint(0, vocab, (int(n),), generator=g)
        for n in torch.randint(*response, (len(rows),), generator=g)
    ]
    out = {}
    for name, share in (("shared-prompt", k), ("full-copies", None)):
        b = pack(rows, responses, share)
        out[name] = {key: v.to(device) for key, v in b.items()}
    return out


@pytest.mark.gpu
@pytest.mark.benchmark(
    group=f"trunk fwd+bwd of a rollout (GPU, {LAYERS} layers H={HIDDEN}, 8 prompts of 1024 "
    "tokens x k=4 responses of 128-512, bf16)"
)
@pytest.mark.parametrize("layout", ["shared-prompt", "full-copies"])
def test_trunk_shared_prompt_gpu(benchmark, models, layout):
    """The REINFORCE update's trunk work with each prompt packed once for its k responses
    (parents) against k full copies; the loss reads the response rows only, as the update's."""
    model = models["nemokern-packed"]
    batches = _rollout_batch(DEVICE)
    b = batches[layout]
    rows = b["targets"] != -100

    def step():
        model.zero_grad(set_to_none=True)
        h = model.hidden_states(
            b["input_ids"], cu_seqlens=b["cu_seqlens"], parents=b.get("parents")
        )
        h[rows].float().sum().backward()

    _run(
        benchmark,
        step,
        DEVICE,
        10,
        tokens=int(batches["full-copies"]["input_ids"].numel()),
        shape=f"{b['input_ids'].numel()} tokens packed, {int(rows.sum())} response rows",
    )
