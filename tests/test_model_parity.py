"""nemokern Llama vs transformers' LlamaForCausalLM on the same random weights: logits, gradients.

Also: packed == padded, activation checkpointing changes nothing, the hidden-state entry points.
"""

import pytest
import torch

from helpers import CASES, nemokern_from_hf, random_hf_model
from nemokern.model import Llama, LlamaConfig

B, T = 2, 19


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_grads_match_transformers_fp32(case):
    hf = random_hf_model(**CASES[case])
    ids = torch.randint(0, hf.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    _assert_parity(hf, ids)


def _assert_parity(hf, ids):
    """Logits and every parameter's gradient agree with transformers to fp32 rounding."""
    model = nemokern_from_hf(hf)
    ref, out = hf(ids).logits, model(ids)
    assert out.shape == (*ids.shape, hf.config.vocab_size)
    err = (out - ref).abs().max().item()
    assert err < 2e-5 * ref.abs().max().item(), err

    upstream = torch.randn_like(ref)
    (ref * upstream).sum().backward()
    (out * upstream).sum().backward()
    ours = dict(model.named_parameters())
    for name, p in hf.named_parameters():
        if name == "lm_head.weight" and hf.config.tie_word_embeddings:
            continue  # the same tensor as the embedding, checked there
        g = ours[name.removeprefix("model.")].grad
        assert (g - p.grad).abs().max().item() <= 1e-5 * p.grad.abs().max().item() + 1e-7, name


def test_fp32_error_vs_float64_reference_within_2x_of_transformers():
    # nemokern in float64 computes norms and rope angles in float64 (transformers keeps fp32 there),
    # so it serves as the independent reference for both fp32 implementations.
    hf = random_hf_model(**CASES["gqa_llama3_untied"])
    ref_model = nemokern_from_hf(hf, dtype=torch.float64)
    ids = torch.randint(0, hf.config.vocab_size, (B, T))
    ref = ref_model(ids)
    assert ref.dtype == torch.float64
    ours = (nemokern_from_hf(hf)(ids).double() - ref).abs().max().item()
    theirs = (hf(ids).logits.double() - ref).abs().max().item()
    assert 0 < ours <= 2 * theirs, (ours, theirs)
    assert (hf.double()(ids).logits - ref).abs().max().item() < 1e-5  # transformers' fp32 rope/norm


def test_bf16_error_vs_float64_within_2x_of_transformers_bf16():
    hf64 = random_hf_model(dtype=torch.float64, **CASES["gqa_llama3_untied"])
    hf16 = random_hf_model(dtype=torch.bfloat16, **CASES["gqa_llama3_untied"])
    model = nemokern_from_hf(hf64, dtype=torch.bfloat16)
    ids = torch.randint(0, hf64.config.vocab_size, (B, T))
    ref = hf64(ids).logits
    ours = (model(ids).double() - ref).abs().max().item()
    theirs = (hf16(ids).logits.double() - ref).abs().max().item()
    assert model(ids).dtype == torch.bfloat16
    assert ours <= 2 * theirs + 1e-6, (ours, theirs)


def test_llama3_rope_actually_differs_from_plain_rope():
    # Guard against a test matrix that passes because scaling is silently ignored on both sides.
    cfg = LlamaConfig.tiny(max_position_embeddings=256)
    plain = Llama(LlamaConfig.tiny(rope_scaling=None, max_position_embeddings=256))
    torch.manual_seed(0)
    scaled = Llama(cfg)
    plain.load_state_dict(scaled.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (1, 40))
    assert (scaled(ids) - plain(ids)).abs().max() > 1e-3


def _packed_case():
    torch.manual_seed(3)
    model = Llama(LlamaConfig.tiny(vocab_size=97))
    lengths = [5, 1, 11, 0, 7]
    ids = torch.randint(0, 97, (sum(lengths),))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return model, lengths, ids, cu


def test_packed_equals_each_sequence_alone_forward_and_backward():
    model, lengths, ids, cu = _packed_case()
    packed = model(ids, cu_seqlens=cu)
    assert packed.shape == (ids.numel(), model.config.vocab_size)
    upstream = torch.randn_like(packed)
    (packed * upstream).sum().backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    pieces = [model(ids[None, s:e])[0] for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s]
    alone = torch.cat(pieces)
    (alone * upstream).sum().backward()
    assert (packed - alone).abs().max() < 1e-5
    for n, p in model.named_parameters():
        assert (g_packed[n] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max() + 1e-7, n


def test_packed_equals_transformers_on_the_right_padded_batch():
    hf = random_hf_model(**CASES["gqa_llama3_untied"])
    model = nemokern_from_hf(hf)
    lengths = [9, 3, 14]
    padded = torch.randint(0, hf.config.vocab_size, (3, max(lengths)))
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        ref = hf(padded, attention_mask=mask.long()).logits[mask]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        out = model(padded[mask], cu_seqlens=cu)
    assert (out - ref).abs().max() < 1e-5


def test_packed_input_shapes_and_explicit_position_ids():
    model, lengths, ids, cu = _packed_case()
    flat = model(ids, cu_seqlens=cu)
    batched = model(ids[None], cu_seqlens=cu.to(torch.int32))
    assert batched.shape == (1, *flat.shape) and torch.equal(batched[0], flat)
    pos = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(model(ids, cu_seqlens=cu, position_ids=pos), flat)
    shifted = model(ids, cu_seqlens=cu, position_ids=pos + 3)
    assert not torch.allclose(shifted, flat)


def test_activation_checkpointing_same_loss_and_grads():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny()).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    model(ids).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing = True
    model(ids).square().mean().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(plain[n], p.grad, rtol=1e-5, atol=1e-8), n


def test_activation_checkpointing_bf16_runs_backward():
    model = Llama(LlamaConfig.tiny(), activation_checkpointing=True).to(torch.bfloat16).train()
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    model(ids, cu_seqlens=torch.tensor([0, 4, 9])).float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_hidden_states_entry_points():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny()).eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    h = model.hidden_states(ids)
    raw = model.hidden_states(ids, final_norm=False)
    assert h.shape == raw.shape == (2, 7, model.config.hidden_size)
    assert torch.allclose(model.norm(raw), h)
    assert not torch.allclose(raw, h)
    assert torch.allclose(h @ model.lm_head.weight.T, model(ids))
    assert model.lm_head.weight.shape == (model.config.vocab_size, model.config.hidden_size)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_ids=torch.zeros(2, 3)), "int64"),
        (dict(input_ids=torch.zeros(2, 3, 4, dtype=torch.long)), r"\[B, T\]"),
        (dict(input_ids=torch.zeros(6, dtype=torch.long)), r"\[B, T\]"),
        (
            dict(input_ids=torch.zeros(2, 6, dtype=torch.long), cu_seqlens=torch.tensor([0, 6])),
            "packed",
        ),
        (
            dict(input_ids=torch.zeros(6, dtype=torch.long), cu_seqlens=torch.tensor([0, 2, 5])),
            "end at N=6",
        ),
        (
            dict(input_ids=torch.zeros(6, dtype=torch.long), cu_seqlens=torch.tensor([0, 4, 2, 6])),
            "non-decreasing",
        ),
        (
            dict(input_ids=torch.zeros(6, dtype=torch.long), cu_seqlens=torch.tensor([0.0, 6.0])),
            "integer",
        ),
        (
            dict(input_ids=torch.zeros(1, 6, dtype=torch.long), position_ids=torch.arange(5)),
            "position_ids",
        ),
        (
            dict(
                input_ids=torch.zeros(1, 6, dtype=torch.long),
                valid=torch.ones(1, 6, dtype=torch.bool),
            ),
            "KV cache",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, match):
    model = Llama(LlamaConfig.tiny())
    with pytest.raises((ValueError, TypeError), match=match):
        model(**kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_larger_config_matches_transformers(case):
    hf = random_hf_model(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        vocab_size=1001,
        **{**CASES[case], **({"head_dim": 128} if "head_dim" in CASES[case] else {})},
    )
    _assert_parity(hf, torch.randint(0, 1001, (3, 200)))


@pytest.mark.gpu
def test_gpu_bf16_packed_within_2x_of_transformers_bf16():
    # Unmeasured on the development machine (no GPU): checks the CUDA packed backend
    # (flash_attn or torch varlen) against transformers run per sequence, both vs float64.
    case = CASES["gqa_llama3_untied"]
    hf64 = random_hf_model(dtype=torch.float64, **case)
    hf16 = random_hf_model(dtype=torch.bfloat16, attn_implementation="sdpa", **case).cuda()
    model = nemokern_from_hf(hf64, dtype=torch.bfloat16).cuda()
    lengths = [37, 1, 64, 18]
    ids = torch.randint(0, hf64.config.vocab_size, (sum(lengths),))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    segments = [ids[s:e] for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
    with torch.no_grad():
        ref = torch.cat([hf64(s[None]).logits[0] for s in segments])
        theirs = torch.cat([hf16(s[None].cuda()).logits[0] for s in segments]).cpu().double()
        ours = model(ids.cuda(), cu_seqlens=cu.cuda()).cpu().double()
    err, err_ref = (ours - ref).abs().max(), (theirs - ref).abs().max()
    assert err <= 2 * err_ref, (err, err_ref)


@pytest.mark.gpu
def test_gpu_packed_accepts_cu_seqlens_built_on_the_cpu():
    # Unmeasured on the development machine (no GPU).
    model, lengths, ids, cu = _packed_case()
    model = model.cuda().to(torch.bfloat16)
    with torch.no_grad():
        on_gpu = model(ids.cuda(), cu_seqlens=cu.cuda())
        from_cpu = model(ids.cuda(), cu_seqlens=cu)
    assert torch.equal(on_gpu, from_cpu)


def test_helper_copies_every_weight():
    hf = random_hf_model(**CASES["gqa_llama3_tied"])
    model = nemokern_from_hf(hf)
    assert model.lm_head.weight is model.embed_tokens.weight
    ours = {k: v for k, v in model.state_dict().items()}
    for name, p in hf.state_dict().items():
        assert torch.equal(ours[name.removeprefix("model.")], p), name
