"""Shared helpers for the model tests: tiny random HF Llama configs and weight copying."""
import copy

import torch
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

from nemokern.model import Llama, LlamaConfig

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

# The parity matrix: GQA + llama3 rope (untied), tied embeddings, head_dim != hidden/heads,
# plain rope with multi-head attention. Small enough for 2 CPU cores.
CASES = {
    "gqa_llama3_untied": dict(num_attention_heads=4, num_key_value_heads=2, rope_scaling=LLAMA3_ROPE),
    "gqa_llama3_tied": dict(num_attention_heads=4, num_key_value_heads=1, rope_scaling=LLAMA3_ROPE,
                            tie_word_embeddings=True),
    "head_dim_32": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_scaling=LLAMA3_ROPE),
    "mha_default_rope": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0),
}


def hf_config(**overrides) -> HFConfig:
    kw = dict(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
              attn_implementation="eager")
    kw.update(copy.deepcopy(overrides))  # transformers adds rope_theta to the rope dict in place
    return HFConfig(**kw)


def random_hf_model(seed=0, dtype=torch.float32, **overrides) -> LlamaForCausalLM:
    """A random HF Llama; norm weights randomised too so that a missed norm cannot hide."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    # Randomise in fp32, then convert: the same seed gives the same (rounded) weights in every dtype.
    return model.to(dtype)


def nemokern_from_hf(hf: LlamaForCausalLM, dtype=None) -> Llama:
    """A nemokern Llama holding the same weights (in memory, no files involved)."""
    model = Llama(LlamaConfig.from_dict(hf.config.to_dict()))
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.to(dtype or hf.dtype).eval()


def test_helper_copies_every_weight():
    hf = random_hf_model(**CASES["gqa_llama3_tied"])
    model = nemokern_from_hf(hf)
    assert model.lm_head.weight is model.embed_tokens.weight
    ours = {k: v for k, v in model.state_dict().items()}
    for name, p in hf.state_dict().items():
        assert torch.equal(ours[name.removeprefix("model.")], p), name
