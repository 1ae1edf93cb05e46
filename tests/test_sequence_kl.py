"""nemokern.ops.sequence_kl against an independent float64 reference, forward and backward.

Accuracy rule (flash-attention's): the op's error against float64 may be at most 2x that of the
plain same-dtype PyTorch composite, plus a floor of a few fp32 ulps of the result.
"""

import pytest
import torch

from helpers import assert_2x, relative_floor
from nemokern.ops import sequence_kl

ESTIMATORS = ("k1", "abs", "k2", "k3")
REDUCTIONS = ("mean", "sum")


def kl_plain(lp, ref, mask, estimator, reduction):
    """The eager composite, in whatever dtype it is given (float64 inputs: the reference)."""
    k1 = lp - ref
    est = {
        "k1": lambda: k1,
        "abs": lambda: k1.abs(),
        "k2": lambda: 0.5 * k1 * k1,
        "k3": lambda: torch.exp(-k1) - 1 + k1,
    }[estimator]()
    m = mask.to(est.dtype)
    total = (torch.where(m != 0, est, 0) * m).sum(-1)
    if reduction == "sum":
        return total
    count = m.sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1), 0)


def make_inputs(shape, dtype, seed, spread=0.3, p_mask=0.7):
    g = torch.Generator().manual_seed(seed)
    lp = (-2.0 + torch.randn(shape, generator=g)).to(dtype)
    ref = (lp.float() + spread * torch.randn(shape, generator=g)).to(dtype)
    mask = torch.rand(shape, generator=g) < p_mask
    return lp, ref, mask


def errors(lp, ref, mask, estimator, reduction, **kw):
    """(op error, plain error) of forward and of backward against float64, as max abs."""
    w = torch.linspace(
        0.5, 1.5, mask.shape[0], dtype=torch.float64, device=lp.device
    )  # uneven upstream grad
    lp64 = lp.double().requires_grad_()
    want = kl_plain(lp64, ref.double(), mask, estimator, reduction)
    (want_g,) = torch.autograd.grad((want * w).sum(), lp64)

    lp_p = lp.clone().requires_grad_()
    plain = kl_plain(lp_p, ref, mask, estimator, reduction)
    (plain_g,) = torch.autograd.grad((plain * w.to(plain.dtype)).sum(), lp_p)

    lp_o = lp.clone().requires_grad_()
    got = sequence_kl(lp_o, ref, mask, estimator=estimator, reduction=reduction, **kw)
    assert got.dtype == torch.float32 and got.shape == (mask.shape[0],)
    (got_g,) = torch.autograd.grad((got * w.float()).sum(), lp_o)
    assert got_g.dtype == lp.dtype

    def err(a, b):
        return (a.double() - b).abs().max().item()

    return (
        err(got, want),
        err(plain, want),
        want.abs().max().item(),
        err(got_g, want_g),
        err(plain_g, want_g),
        want_g.abs().max().item(),
    )


def check_rule(e):
    fwd, fwd_plain, fwd_scale, bwd, bwd_plain, bwd_scale = e
    assert_2x(fwd, fwd_plain, relative_floor(fwd_scale), "forward")
    assert_2x(bwd, bwd_plain, relative_floor(bwd_scale), "backward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_path_vs_float64(torch_backend, dtype, estimator, reduction):
    lp, ref, mask = make_inputs((7, 1531), dtype, seed=1)
    mask[3] = False  # one empty sequence
    check_rule(errors(lp, ref, mask, estimator, reduction))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triton_kernel_vs_float64(triton_backend, dtype, estimator, reduction):
    lp, ref, mask = make_inputs((5, 1100), dtype, seed=2)  # > one 1024 block per sequence
    mask[1] = False
    check_rule(errors(lp, ref, mask, estimator, reduction))


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_packed_equals_padded(request, backend, estimator):
    request.getfixturevalue(backend)
    lengths = [13, 0, 1, 40, 7]
    B, T = len(lengths), max(lengths)
    lp, ref, _ = make_inputs((B, T), torch.float32, seed=3)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = torch.rand(n) < 0.8
    keep = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    cu = torch.tensor([0] + lengths).cumsum(0)
    pad = 3  # trailing tokens that belong to no sequence: ignored, zero gradient
    packed = [
        torch.cat([x[keep], torch.full((pad,), v, dtype=x.dtype)])
        for x, v in ((lp, float("nan")), (ref, 0.0), (mask, True))
    ]

    lp_pad = lp.clone().requires_grad_()
    lp_pk = packed[0].clone().requires_grad_()
    want = sequence_kl(lp_pad, ref, mask, estimator=estimator)
    got = sequence_kl(lp_pk, packed[1], packed[2], estimator=estimator, cu_seqlens=cu)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    w = torch.arange(1.0, B + 1)
    (g_pad,) = torch.autograd.grad((want * w).sum(), lp_pad)
    (g_pk,) = torch.autograd.grad((got * w).sum(), lp_pk)
    torch.testing.assert_close(g_pk[:-pad], g_pad[keep], rtol=1e-6, atol=1e-7)
    assert torch.equal(g_pk[-pad:], torch.zeros(pad))
    assert not torch.equal(g_pk, torch.zeros_like(g_pk))


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_empty_mask_and_masked_garbage(request, backend):
    request.getfixturevalue(backend)
    lp, ref, mask = make_inputs((3, 50), torch.float32, seed=4)
    mask[0] = False
    lp[~mask] = float("-inf")  # padding log-probs must not leak through the mask
    ref[~mask] = float("nan")
    for estimator in ESTIMATORS:
        x = lp.clone().requires_grad_()
        kl = sequence_kl(x, ref, mask, estimator=estimator)
        kl.sum().backward()
        assert kl[0].item() == 0.0 and torch.isfinite(kl).all()
        assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_abs_gradient_is_zero_where_k1_is_zero(request, backend):
    request.getfixturevalue(backend)
    lp = torch.tensor([[-1.0, -2.0, -3.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.0, -2.5, -2.0, -0.5]])
    sequence_kl(lp, ref, torch.ones(1, 4), estimator="abs", reduction="sum").sum().backward()
    assert lp.grad.tolist() == [[0.0, 1.0, -1.0, 0.0]]


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_k3_accurate_near_reference(request, backend):
    """Where the policy barely moved, exp(r) - 1 - r in fp32 is mostly rounding noise."""
    request.getfixturevalue(backend)
    lp, _, mask = make_inputs((4, 300), torch.float32, seed=5)
    ref = lp + 1e-3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(6))
    fwd, fwd_plain, scale, bwd, bwd_plain, bwd_scale = errors(lp, ref, mask, "k3", "mean")
    assert fwd < 1e-5 * scale < fwd_plain  # plain fp32 is off by ~10%
    assert bwd < 1e-5 * bwd_scale


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_mask_dtypes_agree(request, backend):
    request.getfixturevalue(backend)
    lp, ref, mask = make_inputs((3, 70), torch.float32, seed=7)
    want = sequence_kl(lp, ref, mask, estimator="k2")
    for m in (mask.float(), mask.bfloat16(), mask.long(), mask.to(torch.uint8)):
        torch.testing.assert_close(sequence_kl(lp, ref, m, estimator="k2"), want)


def test_float_mask_weights_the_mean(torch_backend):
    lp = torch.tensor([[0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.0, -2.0, -4.0]])
    w = torch.tensor([[1.0, 0.5, 0.0]])
    got = sequence_kl(lp, ref, w, estimator="k1")
    torch.testing.assert_close(got, torch.tensor([(1.0 + 0.5 * 2.0) / 1.5]))


def test_reference_gets_no_gradient(torch_backend):
    lp, ref, mask = make_inputs((2, 9), torch.float32, seed=8)
    ref.requires_grad_()
    sequence_kl(lp.requires_grad_(), ref, mask).sum().backward()
    assert ref.grad is None and lp.grad is not None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(estimator="kl"), "estimator='kl'"),
        (dict(reduction="token_mean"), "reduction='token_mean'"),
    ],
)
def test_unknown_options(kwargs, match):
    lp, ref, mask = make_inputs((2, 5), torch.float32, seed=9)
    with pytest.raises(ValueError, match=match):
        sequence_kl(lp, ref, mask, **kwargs)


def test_bad_tensors():
    lp, ref, mask = make_inputs((2, 5), torch.float32, seed=10)
    with pytest.raises(ValueError, match="ref_logprobs has shape"):
        sequence_kl(lp, ref[:, :4], mask)
    with pytest.raises(ValueError, match="mask has shape"):
        sequence_kl(lp, ref, mask[0])
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        sequence_kl(lp.flatten(), ref.flatten(), mask.flatten())
    with pytest.raises(TypeError, match="logprobs has dtype torch.int64"):
        sequence_kl(lp.long(), ref, mask)
    with pytest.raises(ValueError, match="packed"):
        sequence_kl(lp, ref, mask, cu_seqlens=torch.tensor([0, 5, 10]))
    flat = [x.flatten() for x in (lp, ref, mask)]
    with pytest.raises(ValueError, match="cu_seqlens=.*non-decreasing"):
        sequence_kl(*flat, cu_seqlens=torch.tensor([0, 6, 4]))
    with pytest.raises(ValueError, match="logprobs.numel"):
        sequence_kl(*flat, cu_seqlens=torch.tensor([0, 5, 11]))
    with pytest.raises(TypeError, match="cu_seqlens has dtype"):
        sequence_kl(*flat, cu_seqlens=torch.tensor([0.0, 10.0]))


# ---------------------------------------------------------------- GPU (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_kernel_vs_float64_real_shape(dtype, estimator, reduction):
    lp, ref, mask = (x.cuda() for x in make_inputs((64, 4096), dtype, seed=11))
    check_rule(errors(lp, ref, mask, estimator, reduction))


@pytest.mark.gpu
def test_cuda_packed_real_shape():
    lengths = torch.randint(1, 4096, (64,), generator=torch.Generator().manual_seed(12))
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).cuda()
    n = int(cu[-1])
    lp, ref, mask = (x.cuda() for x in make_inputs((n,), torch.float32, seed=13))
    got = sequence_kl(lp, ref, mask, estimator="k3", cu_seqlens=cu)
    want = torch.stack(
        [
            kl_plain(lp[a:b].double(), ref[a:b].double(), mask[a:b], "k3", "mean")
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())
        ]
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
