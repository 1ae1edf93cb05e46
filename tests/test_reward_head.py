"""nemokern.ops.reward_head against an independent float64 reference, forward and backward.

Accuracy rule (flash-attention's): the op's error against float64 may be at most 2x that of the
plain same-dtype PyTorch version (transformers' LlamaRMSNorm + nn.Linear in that dtype), plus a
floor of a few fp32 ulps of the result.
"""

import pytest
import torch

from helpers import error_vs, relative_floor
from nemokern.ops import reward_head

EPS = 1e-5


def index_of(hidden, last_index):
    """Index of the B gathered rows of hidden ([B, T, H] or packed [N, H])."""
    if hidden.dim() == 2:
        return (last_index,)
    return torch.arange(last_index.numel(), device=last_index.device), last_index


def rows_of(hidden, last_index):
    return hidden[index_of(hidden, last_index)]


def reward_f64(hidden, last_index, nw, w, bias):
    x = rows_of(hidden, last_index).double()
    y = nw.double() * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS))
    out = y @ w.double().T
    return out if bias is None else out + bias.double()


def reward_plain(hidden, last_index, nw, w, bias):
    """What a transformers model computes, in the parameters' dtype."""
    x = rows_of(hidden, last_index)
    x32 = x.float()
    normed = nw * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    return torch.nn.functional.linear(
        normed, w.to(normed.dtype), None if bias is None else bias.to(normed.dtype)
    )


def make_inputs(B, T, H, K, dtype, param_dtype=None, packed=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype
    hidden = (3.0 * torch.randn(B, T, H, generator=g)).to(dtype)
    last = torch.randint(0, T, (B,), generator=g)
    if packed:  # rows of [B*T, H]; sequence b ends somewhere in its own stretch
        hidden, last = hidden.reshape(B * T, H), last + T * torch.arange(B)
    nw = (1.0 + 0.2 * torch.randn(H, generator=g)).to(param_dtype)
    w = (torch.randn(K, H, generator=g) / H**0.5).to(param_dtype)
    b = torch.randn(K, generator=g).to(param_dtype) if bias else None
    return hidden, last, nw, w, b


def grads(fn, tensors, upstream):
    """fn's output and its gradients w.r.t. hidden and each parameter that is not None."""
    hidden, last, *params = tensors
    leaves = [
        t.detach().clone().requires_grad_() if t is not None else None for t in [hidden] + params
    ]
    out = fn(leaves[0], last, *leaves[1:])
    wrt = [t for t in leaves if t is not None]
    return out, torch.autograd.grad((out * upstream.to(out.dtype)).sum(), wrt)


def check_vs_float64(hidden, last, nw, w, b):
    inputs = (hidden, last, nw, w, b)
    upstream = torch.randn(
        last.numel(), w.shape[0], generator=torch.Generator().manual_seed(99)
    ).to(hidden.device)
    want, want_g = grads(reward_f64, inputs, upstream.double())
    plain, plain_g = grads(reward_plain, inputs, upstream)
    got, got_g = grads(reward_head, inputs, upstream)
    assert got.dtype == torch.float32 and got.shape == want.shape
    names = ["rewards", "hidden", "norm_weight", "head_weight", "head_bias"]
    for name, a, p, r in zip(names, (got,) + got_g, (plain,) + plain_g, (want,) + want_g):
        assert a.dtype == (torch.float32 if name == "rewards" else p.dtype), name
        error_vs(a, p, r, name, floor=relative_floor(r.abs().max().item()))
    # hidden's gradient lives only in the gathered rows
    d_hidden = got_g[0].clone()
    assert rows_of(d_hidden, last).abs().sum() > 0
    d_hidden[index_of(d_hidden, last)] = 0
    assert torch.equal(d_hidden, torch.zeros_like(d_hidden))


CASES = [  # (dtype, param dtype, K, packed, bias)
    (torch.float32, None, 1, False, True),
    (torch.float32, None, 9, True, False),
    (torch.bfloat16, None, 1, True, True),
    (torch.bfloat16, None, 9, False, True),
    (torch.bfloat16, torch.float32, 9, False, True),
]


@pytest.mark.parametrize("dtype, param_dtype, K, packed, bias", CASES)
def test_torch_path_vs_float64(torch_backend, dtype, param_dtype, K, packed, bias):
    check_vs_float64(*make_inputs(6, 37, 1000, K, dtype, param_dtype, packed, bias, seed=1))


@pytest.mark.parametrize("dtype, param_dtype, K, packed, bias", CASES)
def test_triton_kernel_vs_float64(triton_backend, dtype, param_dtype, K, packed, bias):
    check_vs_float64(*make_inputs(3, 11, 300, K, dtype, param_dtype, packed, bias, seed=2))


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
@pytest.mark.parametrize(
    "dtype, param_dtype",
    [(torch.bfloat16, None), (torch.float32, None), (torch.bfloat16, torch.float32)],
)
def test_norm_matches_transformers_llama_rmsnorm(request, backend, dtype, param_dtype):
    """With head_weight = I the rewards are the normed features: bit-identical to HF's."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    request.getfixturevalue(backend)
    H = 40  # K = H > 16 also runs the kernels' loop over K blocks
    hidden, last, nw, _, _ = make_inputs(3, 5, H, 1, dtype, param_dtype, seed=3)
    norm = LlamaRMSNorm(H, eps=EPS).to(nw.dtype)
    norm.weight.data.copy_(nw)
    want = rows_of(norm(hidden), last).float()
    got = reward_head(hidden, last, nw, torch.eye(H, dtype=nw.dtype), eps=EPS)
    assert torch.equal(got, want)


def test_lm_head_row0_is_nemotron_reward_hf_layout(torch_backend):
    """The HF reward model's score is logits[b, last, 0]: the same op on lm_head.weight[:1]."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=EPS,
    )
    model = LlamaForCausalLM(cfg).eval()
    captured = {}
    model.model.norm.register_forward_hook(lambda m, inp, out: captured.update(h=inp[0]))
    ids = torch.randint(0, 32, (2, 7))
    last = torch.tensor([6, 3])
    with torch.no_grad():
        logits = model(ids).logits
        got = reward_head(captured["h"], last, model.model.norm.weight, model.lm_head.weight[:1])
    torch.testing.assert_close(got[:, 0], logits[torch.arange(2), last, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_packed_equals_padded(request, backend):
    request.getfixturevalue(backend)
    hidden, last, nw, w, b = make_inputs(3, 6, 70, 9, torch.float32, seed=5)
    flat_last = (last + 6 * torch.arange(3)).int()  # int32 indices are accepted too
    padded = grads(reward_head, (hidden, last, nw, w, b), torch.ones(3, 9))
    packed = grads(reward_head, (hidden.reshape(18, 70), flat_last, nw, w, b), torch.ones(3, 9))
    torch.testing.assert_close(packed[0], padded[0])
    torch.testing.assert_close(packed[1][0], padded[1][0].reshape(18, 70))
    for a, p in zip(packed[1][1:], padded[1][1:]):
        torch.testing.assert_close(a, p)


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_hidden_is_not_kept_for_backward(request, backend):
    """Only the B gathered rows are saved: the [B, T, H] activations can be freed after forward."""
    import weakref

    request.getfixturevalue(backend)
    base, last, nw, w, b = make_inputs(2, 9, 33, 1, torch.float32, seed=9)
    base.requires_grad_()
    hidden = base * 2.0  # a non-leaf, as the trunk's output is
    alive = weakref.ref(hidden)
    out = reward_head(hidden, last, nw, w, b)
    del hidden
    assert alive() is None
    out.sum().backward()
    assert base.grad[torch.arange(2), last].abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_frozen_trunk_gives_same_head_gradients(request, backend):
    request.getfixturevalue(backend)
    hidden, last, nw, w, b = make_inputs(3, 5, 40, 9, torch.bfloat16, seed=10)
    _, full = grads(reward_head, (hidden, last, nw, w, b), torch.ones(3, 9))
    params = [t.clone().requires_grad_() for t in (nw, w, b)]
    out = reward_head(hidden, last, *params)  # hidden.requires_grad is False
    for got, want in zip(torch.autograd.grad(out.sum(), params), full[1:]):
        assert torch.equal(got, want)


def test_non_contiguous_hidden(triton_backend):
    hidden, last, nw, w, b = make_inputs(4, 9, 33, 1, torch.float32, seed=6)
    strided = hidden.transpose(0, 1).contiguous().transpose(0, 1)  # [B, T, H], T-major memory
    torch.testing.assert_close(
        reward_head(strided, last, nw, w, b), reward_head(hidden, last, nw, w, b)
    )


def test_bad_inputs():
    hidden, last, nw, w, b = make_inputs(2, 5, 8, 3, torch.float32, seed=7)
    with pytest.raises(IndexError, match=r"last_index holds \[5\] outside \[0, T = 5\)"):
        reward_head(hidden, torch.tensor([1, 5]), nw, w, b)
    with pytest.raises(IndexError, match="last_index holds \\[-1\\]"):
        reward_head(hidden, torch.tensor([-1, 0]), nw, w, b)
    with pytest.raises(IndexError, match="N \\(packed rows\\) = 10"):
        reward_head(hidden.reshape(10, 8), torch.tensor([3, 10]), nw, w, b)
    with pytest.raises(ValueError, match="repeats a row"):
        reward_head(hidden.reshape(10, 8), torch.tensor([3, 3]), nw, w, b)
    with pytest.raises(ValueError, match="B = 2"):
        reward_head(hidden, torch.tensor([1, 2, 3]), nw, w, b)
    with pytest.raises(ValueError, match="integer tensor"):
        reward_head(hidden, torch.tensor([1.0, 2.0]), nw, w, b)
    with pytest.raises(ValueError, match="norm_weight has shape"):
        reward_head(hidden, last, nw[:7], w, b)
    with pytest.raises(ValueError, match="head_weight has shape"):
        reward_head(hidden, last, nw, w.T, b)
    with pytest.raises(ValueError, match="head_bias has shape"):
        reward_head(hidden, last, nw, w, b[:2])
    with pytest.raises(ValueError, match="hidden has shape"):
        reward_head(hidden[0, 0], last, nw, w, b)
    with pytest.raises(TypeError, match="hidden has dtype torch.int64"):
        reward_head(hidden.long(), last, nw, w, b)
    with pytest.raises(TypeError, match="eps must be a real number"):
        reward_head(hidden, last, nw, w, b, eps=None)
    with pytest.raises(ValueError, match="eps=inf must be a finite number"):
        reward_head(hidden, last, nw, w, b, eps=float("inf"))


# ---------------------------------------------------------------- GPU (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.gpu_small(shape=(3, 16, 64))
@pytest.mark.parametrize("shape", [(64, 512, 8192)])  # B, T, H
@pytest.mark.parametrize(
    "dtype, param_dtype, K, packed, bias", CASES + [(torch.float16, None, 9, True, True)]
)
def test_cuda_kernel_vs_float64_real_shape(shape, dtype, param_dtype, K, packed, bias):
    inputs = make_inputs(*shape, K, dtype, param_dtype, packed, bias, seed=8)
    check_vs_float64(*(t.cuda() if t is not None else None for t in inputs))
