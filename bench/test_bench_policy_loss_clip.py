"""Benchmarks: the importance-ratio clipped policy loss (several updates per rollout):
nemokern.ops.linear_policy_loss with old_logprobs= and clip= against eager PyTorch (matmul +
fp32 log_softmax + gather + the clipped surrogate) and Liger-Kernel's LigerFusedLinearGRPOLoss
(beta = 0, no reference model, loss_type "dapo": the token sum over all tokens, the same
normalisation as coef = -A / n_tokens) where it installs.

    python -m pytest bench/test_bench_policy_loss_clip.py --benchmark-enable -k cpu

One training step's worth of work per call: the loss and its gradients w.r.t. hidden and weight,
no ignored token, 16 sequences of 256 tokens with one advantage each, sampling log-probs within
+-0.3 of the current ones (about a tenth of the tokens clipped), clip (0.2, 0.28). Liger runs
with compiled=False on the CPU (its torch.compile covers only the per-sequence loss math, and
costs about a minute of compilation here). extra_info: `flops` = 6*N*H*V, peak extra memory.
test_clipped_losses_agree checks that the three compute the same loss and clip fraction.
"""

import pytest
import torch
from common import run_benchmark as _run

from nemokern.ops import linear_logprobs, linear_policy_loss

CLIP = (0.2, 0.28)


def clipped_eager(hidden, weight, targets, adv, old):
    """What RLHF codebases write: fp32 log-softmax over the whole vocabulary, gather, ratio,
    -min(r A, clip(r) A), mean over all tokens; returns (loss, clip fraction)."""
    lsm = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
    logp = lsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    r = torch.exp(logp - old)
    a = adv.unsqueeze(-1).expand_as(r)
    lo, hi = 1 - CLIP[0], 1 + CLIP[1]
    loss = -torch.min(r * a, torch.clamp(r, lo, hi) * a).sum() / r.numel()
    clipped = ((a > 0) & (r > hi)) | ((a < 0) & (r < lo))
    return loss, clipped.float().mean()


def clipped_nemokern(hidden, weight, targets, adv, old):
    coef = (-adv / targets.numel()).unsqueeze(-1).expand_as(targets)
    loss, _, clipped = linear_policy_loss(
        hidden, weight, targets, coef, old_logprobs=old, clip=CLIP, return_ratio=True
    )
    return loss, clipped.float().mean()


def _liger():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as exc:
        pytest.skip(f"Liger-Kernel is not installed: {exc}")
    loss = LigerFusedLinearGRPOLoss(
        beta=0.0,
        use_ref_model=False,
        compiled=False,
        epsilon_low=CLIP[0],
        epsilon_high=CLIP[1],
        loss_type="dapo",
    )

    def fn(hidden, weight, targets, adv, old):
        out, metrics = loss(
            hidden, weight, targets, torch.ones_like(old), adv, old_per_token_logps=old
        )
        return out, metrics[-1]

    return fn


def _inputs(b, t, hs, vocab, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(b, t, hs, device=device, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hs, device=device, generator=g) / hs**0.5).to(dtype)
    weight.requires_grad_(True)
    targets = torch.randint(0, vocab, (b, t), device=device, generator=g)
    adv = torch.randn(b, device=device, generator=g)
    with torch.no_grad():
        logp = linear_logprobs(hidden, weight, targets)
    noise = torch.rand(b, t, device=device, generator=g) * 0.6 - 0.3
    return hidden, weight, targets, adv, logp + noise


def _impl(name):
    return {"nemokern": clipped_nemokern, "eager": clipped_eager}.get(name) or _liger()


def test_clipped_losses_agree():
    """Same loss and clip fraction from the three (small shapes), so the timings compare like
    with like."""
    inputs = _inputs(4, 33, 32, 257, torch.float32, "cpu")
    results = {name: _impl(name)(*inputs) for name in ("nemokern", "eager", "liger")}
    loss, frac = results["eager"]
    assert 0.05 < frac < 0.5
    for name, (other_loss, other_frac) in results.items():
        torch.testing.assert_close(other_loss, loss, rtol=1e-5, atol=1e-7, msg=name)
        assert float(other_frac) == float(frac), name


def _bench(benchmark, impl, b, t, hs, vocab, dtype, device, rounds):
    fn = _impl(impl)
    hidden, weight, targets, adv, old = _inputs(b, t, hs, vocab, dtype, device)

    def step():
        loss, _ = fn(hidden, weight, targets, adv, old)
        return torch.autograd.grad(loss, (hidden, weight))

    n = b * t
    shape = f"N={n} ({b}x{t}) H={hs} V={vocab} {dtype}"
    _run(benchmark, step, device, rounds, shape=shape, flops=6 * n * hs * vocab)


@pytest.mark.benchmark(group="clipped policy loss fwd+bwd (CPU, N=4096 H=1024 V=32000 fp32)")
@pytest.mark.parametrize("impl", ["nemokern", "eager", "liger"])
def test_clipped_policy_loss_cpu(benchmark, impl):
    _bench(benchmark, impl, 16, 256, 1024, 32000, torch.float32, "cpu", 3)


@pytest.mark.gpu
@pytest.mark.benchmark(group="clipped policy loss fwd+bwd (GPU, N=16384 H=4096 V=128256 bf16)")
@pytest.mark.parametrize("impl", ["nemokern", "eager", "liger"])
def test_clipped_policy_loss_gpu(benchmark, impl):
    _bench(benchmark, impl, 64, 256, 4096, 128256, torch.bfloat16, "cuda", 10)
