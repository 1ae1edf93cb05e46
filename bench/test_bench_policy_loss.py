"""Benchmarks: nemokern.ops.linear_policy_loss (sum_t coef_t * logp_t, gradients formed in the
forward) against eager PyTorch (matmul + log_softmax + gather + weighted sum), against
linear_logprobs followed by the weighted sum, and (GPU, where installed) Liger-Kernel's
LigerFusedLinearGRPOLoss.

    python -m pytest bench/test_bench_policy_loss.py --benchmark-enable -k cpu  # CPU, CI-sized
    python -m pytest -m gpu bench/test_bench_policy_loss.py --benchmark-enable  # GPU, real shapes

Every benchmark is one training step's worth of work: the loss and its gradients w.r.t. hidden
and weight. No target is ignored (ignored rows would cost the nemokern ops nothing and eager its
full share). extra_info: `flops` = 6*N*H*V, the model FLOPs of the three GEMMs (nemokern's single-
rank path does exactly these; linear_logprobs recomputes the logits in backward:
`flops_with_recompute` = 8*N*H*V there), and peak extra memory.
"""

import pytest
import torch
from common import POLICY_LOSS_IMPLS as IMPLS
from common import run_benchmark as _run


def _liger_grpo():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        loss = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)
    except (ImportError, TypeError) as exc:
        pytest.skip(f"Liger-Kernel's LigerFusedLinearGRPOLoss is not usable here: {exc}")

    def fn(hidden, weight, targets, coef):
        # one sequence per row; advantages [B]; no ratio clipping at ratio 1, no KL (beta = 0)
        h = hidden.unsqueeze(1)
        return loss(h, weight, targets.unsqueeze(1), torch.ones_like(h[..., 0]), coef)[0]

    return fn


def _bench(benchmark, impl, n, hs, vocab, dtype, device, rounds):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, hs, device=device, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hs, device=device, generator=g) / hs**0.5).to(dtype)
    weight.requires_grad_(True)
    targets = torch.randint(0, vocab, (n,), device=device, generator=g)
    coef = torch.randn(n, device=device, generator=g) / n
    fn = IMPLS.get(impl) or _liger_grpo()

    def step():
        return torch.autograd.grad(fn(hidden, weight, targets, coef), (hidden, weight))

    nhv = n * hs * vocab
    info = {"flops": 6 * nhv}
    if impl == "linear_logprobs":
        info["flops_with_recompute"] = 8 * nhv
    _run(benchmark, step, device, rounds, shape=f"N={n} H={hs} V={vocab} {dtype}", **info)


@pytest.mark.benchmark(group="policy loss fwd+bwd (CPU, N=4096 H=1024 V=32000 fp32)")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_policy_loss_cpu(benchmark, impl):
    _bench(benchmark, impl, 4096, 1024, 32000, torch.float32, "cpu", 5)


@pytest.mark.gpu
@pytest.mark.benchmark(group="policy loss fwd+bwd (GPU, N=16384 H=4096 V=128256 bf16)")
@pytest.mark.parametrize("impl", list(IMPLS) + ["liger"])
def test_policy_loss_gpu(benchmark, impl):
    _bench(benchmark, impl, 16384, 4096, 128256, torch.bfloat16, "cuda", 10)
