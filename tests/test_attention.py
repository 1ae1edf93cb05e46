"""Packed (varlen) causal GQA attention and the KV-cache mask against a float64 reference."""

import pytest
import torch
import torch.nn.functional as F

from helpers import error_vs
from nemokern.model import KVCache, packed_attention, packed_backend
from nemokern.model.attention import (
    AttentionContext,
    _decode_cpu,
    attention,
    cache_mask,
    static_cache_context,
)

LENGTHS = [7, 1, 0, 23, 12]  # awkward: a single token, an empty segment


def reference(q, k, v, cu_seqlens):
    """float64 masked softmax over the whole packed batch with a block-diagonal causal mask."""
    q, k, v = q.double(), k.double(), v.double()
    n, hq, d = q.shape
    k = k.repeat_interleave(hq // k.shape[1], dim=1)
    v = v.repeat_interleave(hq // v.shape[1], dim=1)
    seg = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), cu_seqlens.diff())
    idx = torch.arange(n)
    allowed = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    scores = torch.einsum("qhd,khd->hqk", q, k) / d**0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _inputs(dtype, hq=6, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(n, h, d, generator=g).to(dtype).requires_grad_() for h in (hq, hkv, hkv))
    return q, k, v, cu


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_packed_matches_float64_forward_and_backward(dtype, tol):
    q, k, v, cu = _inputs(dtype)
    out = packed_attention(q, k, v, cu, max(LENGTHS))
    ref = reference(q, k, v, cu)
    assert out.dtype == dtype and out.shape == q.shape
    err = (out.double() - ref).abs().max().item()
    assert err < tol, err
    upstream = torch.randn_like(ref)
    grads = torch.autograd.grad(out.double(), (q, k, v), upstream)
    grads_ref = torch.autograd.grad(ref, (q, k, v), upstream)
    for name, g, gr in zip("qkv", grads, grads_ref):
        assert (g.double() - gr.double()).abs().max().item() < 10 * tol, name


def test_bf16_error_within_2x_of_plain_torch_bf16():
    q, k, v, cu = _inputs(torch.bfloat16, seed=1)
    ref = reference(q, k, v, cu)
    ours = (packed_attention(q, k, v, cu, max(LENGTHS)).double() - ref).abs().max()
    # plain PyTorch in bf16: the same masked softmax materialised, no fusion
    n, hq, d = q.shape
    kk, vv = (t.repeat_interleave(3, dim=1) for t in (k, v))
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff())
    idx = torch.arange(n)
    allowed = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    scores = (torch.einsum("qhd,khd->hqk", q, kk) / d**0.5).masked_fill(~allowed, float("-inf"))
    plain = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv)
    theirs = (plain.double() - ref).abs().max()
    assert ours <= 2 * theirs, (ours, theirs)


def test_no_attention_across_segments():
    q, k, v, cu = _inputs(torch.float32)
    out = packed_attention(q, k, v, cu, max(LENGTHS))
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:7] += 100.0  # perturb only the first segment's keys and values
    v2[:7] -= 50.0
    out2 = packed_attention(q, k2, v2, cu, max(LENGTHS))
    assert torch.equal(out[7:], out2[7:])
    assert not torch.allclose(out[:7], out2[:7])


def test_dense_path_is_causal_sdpa():
    q, k, v, _ = _inputs(torch.float32)
    ctx = AttentionContext()
    out = attention(q[None, :20], k[None, :20], v[None, :20], ctx, layer=0)[0]
    ref = reference(q[:20], k[:20], v[:20], torch.tensor([0, 20]))
    assert (out.double() - ref).abs().max() < 1e-5


def test_backend_selection(monkeypatch):
    q = torch.zeros(3, 2, 8)
    monkeypatch.delenv("NEMOKERN_ATTENTION", raising=False)
    assert packed_backend(q) == "sdpa"  # CPU: always the exact per-segment path
    monkeypatch.setenv("NEMOKERN_ATTENTION", "flash")
    with pytest.raises(ValueError, match="NEMOKERN_ATTENTION='flash'"):
        packed_backend(q)


def test_cache_mask_hides_padding_and_future():
    cache = KVCache.allocate(1, 2, 1, 6, 4, dtype=torch.float32, device="cpu")
    valid = torch.tensor([[False, False, True], [True, True, True]])
    mask = cache_mask(cache, valid)[:, 0]  # [B, T, slots]
    assert mask.shape == (2, 3, 3)
    assert mask[0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert mask[1].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    cache.length = 3
    step = cache_mask(cache, torch.ones(2, 1, dtype=torch.bool))[:, 0, 0]
    assert step.tolist() == [[False, False, True, True], [True, True, True, True]]
    cache.length = 6
    with pytest.raises(ValueError, match="KV cache overflow"):
        cache_mask(cache, torch.ones(2, 1, dtype=torch.bool))


def test_static_cache_mask_spans_the_whole_cache_and_equals_the_eager_one():
    eager = KVCache.allocate(1, 2, 1, 6, 4, dtype=torch.float32, device="cpu")
    static = KVCache.allocate(1, 2, 1, 6, 4, dtype=torch.float32, device="cpu")
    valid = torch.tensor([[False, True, True], [True, True, True]])
    want = cache_mask(eager, valid)
    ctx = static_cache_context(static, torch.arange(3), valid)
    assert ctx.cache_mask.shape == (2, 1, 3, 6)  # every step the same shape: all 6 slots
    assert torch.equal(ctx.cache_mask[..., :3], want) and not ctx.cache_mask[..., 3:].any()
    eager.length = 3
    want = cache_mask(eager, torch.ones(2, 1, dtype=torch.bool))
    ctx = static_cache_context(static, torch.tensor([3]), torch.ones(2, 1, dtype=torch.bool))
    assert torch.equal(ctx.cache_mask[..., :4], want) and not ctx.cache_mask[..., 4:].any()
    assert torch.equal(static.key_valid, eager.key_valid)


def _cuda_inputs(dtype):
    q, k, v, cu = _inputs(dtype)
    return [t.detach().cuda() for t in (q, k, v)] + [cu.cuda()]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_gpu_varlen_backends_match_reference(monkeypatch, backend):
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    q, k, v, cu = _cuda_inputs(torch.bfloat16)
    ref = reference(q.cpu(), k.cpu(), v.cpu(), cu.cpu())
    monkeypatch.setenv("NEMOKERN_ATTENTION", "sdpa")
    plain = (packed_attention(q, k, v, cu, max(LENGTHS)).cpu().double() - ref).abs().max()
    monkeypatch.setenv("NEMOKERN_ATTENTION", backend)
    fused = (packed_attention(q, k, v, cu, max(LENGTHS)).cpu().double() - ref).abs().max()
    assert fused <= 2 * plain + 1e-3, (fused, plain)


def _fake_varlen_2_13(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
    assert window_size == (-1, 0) and enable_gqa == (q.shape[1] != k.shape[1])
    return reference(q, k, v, cu_q).to(q.dtype)


def _fake_varlen_2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1)):
    assert window_size == (-1, 0)
    assert k.shape[1] == q.shape[1], "this signature has no enable_gqa: heads must be repeated"
    return reference(q, k, v, cu_q).to(q.dtype)


def _fake_varlen_is_causal(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False):
    assert is_causal and k.shape[1] == q.shape[1]
    return reference(q, k, v, cu_q).to(q.dtype)


@pytest.mark.parametrize("fake", [_fake_varlen_2_13, _fake_varlen_2_11, _fake_varlen_is_causal])
def test_torch_varlen_called_right_across_signatures(monkeypatch, fake):
    # torch 2.11 (the GPU machine's) has no enable_gqa: calling it with one was a TypeError there.
    import nemokern.model.attention as A

    monkeypatch.setattr(A, "_torch_varlen", lambda: fake)
    monkeypatch.setenv("NEMOKERN_ATTENTION", "torch_varlen")
    q, k, v, cu = _inputs(torch.float32)
    out = packed_attention(q, k, v, cu, max(LENGTHS))
    torch.testing.assert_close(out.double(), reference(q, k, v, cu))


def test_torch_varlen_without_a_causal_argument_is_refused(monkeypatch):
    import nemokern.model.attention as A

    monkeypatch.setattr(A, "_torch_varlen", lambda: lambda q, k, v, a, b, c, d: q)
    monkeypatch.setenv("NEMOKERN_ATTENTION", "torch_varlen")
    with pytest.raises(RuntimeError, match="NEMOKERN_ATTENTION=sdpa"):
        packed_attention(*_inputs(torch.float32)[:3], _inputs(torch.float32)[3], max(LENGTHS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(6, 2), (5, 5), (4, 1)])
def test_cpu_decode_step_within_2x_of_sdpa_error(dtype, heads):
    """The CPU's one-query decode attention (grouped fp32 matmuls) against float64, at most 2x
    the error of SDPA in the same dtype, over a mask with holes (padding, the future)."""
    hq, hkv = heads
    g = torch.Generator().manual_seed(hq)
    b, s, d = 7, 37, 24
    q = torch.randn(b, 1, hq, d, generator=g).to(dtype)
    keys, values = (torch.randn(b, hkv, s, d, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(b, 1, 1, s, generator=g) > 0.3
    mask[..., 0] = True

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=hq != hkv
        ).transpose(1, 2)

    ours = _decode_cpu(q, keys, values, mask)
    assert ours.shape == q.shape and ours.dtype == dtype
    ref = sdpa(q.double(), keys.double(), values.double())
    error_vs(ours, sdpa(q, keys, values), ref, f"decode {dtype} heads {heads}")
