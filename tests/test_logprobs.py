"""nemokern.ops.logprobs against a float64 reference: torch path on awkward big shapes, Triton
kernels interpreted on small ones; forward and backward for log-probs and entropy.

Accuracy rule (flash-attention's): our error against float64 is at most 2x the error of the same
computation done in plain PyTorch in the input dtype, plus a floor of a few fp32 ulps of the
output (our outputs are fp32 even for bf16 inputs).
"""

import pytest
import torch

import nemokern.kernels.logprobs as K
from helpers import IGNORE, INTERPRETER_NOISE, errors_vs, peak_extra_bytes, reference, vs_float64
from nemokern.ops import logprobs

pytestmark = INTERPRETER_NOISE


def make_inputs(shape, vocab, dtype, scale, ignore_frac=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=g) * scale).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=g)
    targets[torch.rand(shape, generator=g) < ignore_frac] = IGNORE
    g_lp = torch.randn(shape, generator=g)
    g_ent = torch.randn(shape, generator=g)
    return logits, targets, g_lp, g_ent


def check_against_float64(logits, targets, g_lp, g_ent, temperature, label=""):
    def op(x):
        return logprobs(x, targets, temperature=temperature, return_entropy=True)

    def plain(x):
        return reference(x, targets, temperature)

    runs = vs_float64(op, plain, (logits,), (g_lp, g_ent))
    ours = runs[0]
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    assert ours[2].dtype == logits.dtype
    errors_vs(*runs, ("logp", "entropy", "dlogits"), label)
    # logp-only gradient (the common RLHF case): a separate, shorter backward on the torch path
    only = [run[2:] for run in vs_float64(op, plain, (logits,), (g_lp, None))]
    errors_vs(*only, ("logp-only dlogits",), label)
    return ours


# ----------------------------------------------------------------------------- torch path

TORCH_CASES = [
    # (leading shape, V, dtype, temperature, logit scale)
    ((1,), 1, torch.float32, 1.0, 1.0),
    ((7,), 31, torch.float32, 0.7, 1.0),
    ((7,), 31, torch.bfloat16, 1.3, 1.0),
    ((513,), 31, torch.float32, 1.3, 3.0),
    ((513,), 31, torch.bfloat16, 0.7, 3.0),
    ((1,), 50257, torch.bfloat16, 1.0, 1.0),
    ((7,), 50257, torch.float32, 0.7, 1e4),
    ((3, 171), 50257, torch.bfloat16, 1.3, 1e4),
    ((513,), 50257, torch.float32, 1.0, 2.0),
]


@pytest.mark.parametrize("shape,vocab,dtype,temperature,scale", TORCH_CASES)
def test_torch_path_matches_float64(torch_backend, shape, vocab, dtype, temperature, scale):
    check_against_float64(
        *make_inputs(shape, vocab, dtype, scale),
        temperature,
        label=f"torch {shape} V={vocab} {dtype} T={temperature} x{scale:g}",
    )


def test_torch_path_chunks_rows(torch_backend, monkeypatch):
    # Several row chunks, the last one partial: the chunk loop must cover every row exactly once.
    monkeypatch.setattr(K, "_TORCH_CHUNK_ELEMENTS", 3 * 31)
    logits, targets, g_lp, g_ent = make_inputs((50,), 31, torch.float32, 2.0)
    check_against_float64(logits, targets, g_lp, g_ent, 0.7, label="torch chunked")


# ----------------------------------------------------------------------------- Triton path

TRITON_CASES = [
    ((1,), 1, torch.float32, 1.0, 1.0),
    ((7,), 31, torch.bfloat16, 0.7, 1.0),
    ((2, 3), 300, torch.float32, 1.3, 1e4),
    ((5,), 300, torch.bfloat16, 1.3, 3.0),
]


@pytest.mark.parametrize("shape,vocab,dtype,temperature,scale", TRITON_CASES)
def test_triton_kernels_match_float64(
    triton_backend, monkeypatch, shape, vocab, dtype, temperature, scale
):
    # 64-column blocks so V = 300 walks five blocks, the last partial: exercises the online merge.
    monkeypatch.setattr(K, "FWD_CONFIG", (64, 4))
    monkeypatch.setattr(K, "BWD_CONFIG", (64, 4))
    check_against_float64(
        *make_inputs(shape, vocab, dtype, scale),
        temperature,
        label=f"triton {shape} V={vocab} {dtype} T={temperature} x{scale:g}",
    )


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_all_ignored_rows_give_zero_and_no_grad(request, backend):
    request.getfixturevalue(backend)
    x = torch.randn(4, 37, requires_grad=True)
    targets = torch.full((4,), IGNORE)
    logp, ent = logprobs(x, targets, return_entropy=True)
    assert torch.equal(logp, torch.zeros(4)) and torch.equal(ent, torch.zeros(4))
    (logp.sum() + ent.sum()).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_masked_vocabulary_entries_stay_finite(request, backend, monkeypatch):
    # -inf logits (a banned token range, here the whole first kernel block) must not make NaNs.
    request.getfixturevalue(backend)
    monkeypatch.setattr(K, "FWD_CONFIG", (16, 4))
    monkeypatch.setattr(K, "BWD_CONFIG", (16, 4))
    logits, targets, g_lp, g_ent = make_inputs((6,), 40, torch.float32, 1.0, ignore_frac=0.0)
    logits[:, :20] = -float("inf")
    targets = 20 + targets % 20
    ours = check_against_float64(logits, targets, g_lp, g_ent, 1.0, label=f"{backend} -inf")
    assert all(torch.isfinite(t).all() for t in ours)


def test_custom_ignore_index_and_entropy_only_grad(torch_backend):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 9, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.tensor([0, -1, 8, -1, 3])
    _, ent = logprobs(x, targets, ignore_index=-1, return_entropy=True)
    ent.sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    reference(ref_x, targets, 1.0, -1)[1].sum().backward()
    # the torch path's arithmetic is float32 even for float64 logits
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-6, atol=1e-6)
    assert torch.equal(x.grad[1], torch.zeros(9))


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"targets\[1\].*outside the vocabulary \[0, 10\)"):
        logprobs(x, torch.tensor([0, 10, 2]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        logprobs(x, torch.tensor([0, -5, 2]))
    with pytest.raises(ValueError, match="targets has shape"):
        logprobs(x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="int64"):
        logprobs(x, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        logprobs(torch.ones(3, 10, dtype=torch.int64), torch.tensor([0, 1, 2]))
    for bad_t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            logprobs(x, torch.tensor([0, 1, 2]), temperature=bad_t)
    with pytest.raises(ValueError, match="V >= 1"):
        logprobs(torch.randn(3, 0), torch.tensor([0, 1, 2]))
    for bad in (None, "x", 1.5, True):  # None raised "int() argument must be ..."
        with pytest.raises(TypeError, match="ignore_index must be an integer id"):
            logprobs(x, torch.tensor([0, 1, 2]), ignore_index=bad)
    taken = logprobs(x, torch.tensor([0, 1, -100]), ignore_index=torch.tensor(-100))
    assert taken[2].item() == 0.0


def test_target_check_can_be_disabled_and_kernel_gives_nan(triton_backend, monkeypatch):
    monkeypatch.setenv("NEMOKERN_CHECK_TARGETS", "0")
    logp = logprobs(torch.randn(2, 10), torch.tensor([3, 12]))
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1])


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.gpu_small(n=33, vocab=101)
@pytest.mark.parametrize(
    "n,vocab,dtype",
    [
        (2048, 128256, torch.bfloat16),
        (513, 50257, torch.float32),
        (4096, 32000, torch.bfloat16),
        (2048, 128256, torch.float16),
    ],
)
def test_triton_on_cuda_real_shapes(n, vocab, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(n, vocab, device="cuda", generator=g) * 4).to(dtype)
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    targets[::5] = IGNORE
    g_lp = torch.randn(n, device="cuda", generator=g)
    g_ent = torch.randn(n, device="cuda", generator=g)
    runs = vs_float64(
        lambda x: logprobs(x, targets, temperature=0.7, return_entropy=True),
        lambda x: reference(x, targets, 0.7),
        (logits,),
        (g_lp, g_ent),
    )
    errors_vs(*runs, ("logp", "entropy", "dlogits"), f"cuda {n}x{vocab} {dtype}")


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_strided_logits_rows(request, backend):
    # A vocabulary slice of a wider tensor: rows are not adjacent (row stride 40, V = 31).
    request.getfixturevalue(backend)
    wide, targets, g_lp, g_ent = make_inputs((6,), 40, torch.float32, 2.0)
    logits = wide[:, :31]
    targets = targets % 31
    check_against_float64(logits, targets, g_lp, g_ent, 1.3, label=f"{backend} strided")


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_no_tokens(request, backend):
    request.getfixturevalue(backend)
    x = torch.randn(2, 0, 5, requires_grad=True)
    logp, ent = logprobs(x, torch.zeros(2, 0, dtype=torch.int64), return_entropy=True)
    assert logp.shape == ent.shape == (2, 0)
    (logp.sum() + ent.sum()).backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_without_entropy_same_logp_and_grad(request, backend):
    # The torch path skips the entropy sums when entropy is not asked for.
    request.getfixturevalue(backend)
    logits, targets, g_lp, _ = make_inputs((9,), 50, torch.float32, 2.0)
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    lp1 = logprobs(x1, targets, temperature=0.7)
    lp2, _ = logprobs(x2, targets, temperature=0.7, return_entropy=True)
    (g_lp * lp1).sum().backward()
    (g_lp * lp2).sum().backward()
    torch.testing.assert_close(lp1, lp2, rtol=0, atol=0)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    ref = reference(logits.double(), targets, 0.7)[0]
    torch.testing.assert_close(lp1.double(), ref, rtol=1e-6, atol=1e-6)


def test_torch_path_never_holds_fp32_logits(torch_backend, monkeypatch):
    """The docstring's promise: no [N, V] float32 temporary on the CPU path. Forward + backward of
    bf16 logits may add the bf16 gradient (the result) and row-chunk scratch, nothing of N x V
    fp32 (twice the margin allowed here)."""
    n, v = 4096, 32000
    x = torch.randn(n, v).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, v, (n,))
    _, peak = peak_extra_bytes(
        lambda: logprobs(x, targets, return_entropy=True)[1].sum().backward()
    )
    grad_bytes, fp32_bytes = n * v * 2, n * v * 4
    print(
        f"\npeak extra {peak / 2**20:.0f} MiB; bf16 grad {grad_bytes / 2**20:.0f} MiB, "
        f"fp32 logits {fp32_bytes / 2**20:.0f} MiB"
    )
    assert peak < grad_bytes + fp32_bytes / 2


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_nan_logits_surface_and_ignored_rows_stay_zero(request, backend):
    """A nan logit in a counted row gives a nan log-prob and nan gradients in that row (a diverged
    model must not train on silent zeros); the other rows are unchanged, and a nan in an
    ignored row changes nothing (0 log-prob, 0 gradient)."""
    request.getfixturevalue(backend)
    g = torch.Generator().manual_seed(5)
    clean = torch.randn(4, 37, generator=g)
    targets = torch.tensor([3, 7, IGNORE, 0])
    dirty = clean.clone()
    dirty[1, 20] = float("nan")
    dirty[2, 5] = float("nan")
    out = {}
    for name, x in (("clean", clean), ("dirty", dirty)):
        x = x.clone().requires_grad_(True)
        logp, ent = logprobs(x, targets, return_entropy=True)
        (logp.sum() + ent.sum()).backward()
        out[name] = (logp.detach(), ent.detach(), x.grad)
    logp, ent, grad = out["dirty"]
    assert logp[1].isnan() and ent[1].isnan() and grad[1].isnan().all()
    assert logp[2] == 0 and ent[2] == 0 and torch.equal(grad[2], torch.zeros(37))
    keep = [0, 3]
    for a, b in zip(out["dirty"], out["clean"]):
        torch.testing.assert_close(a[keep], b[keep], rtol=0, atol=0)


def test_double_backward_raises_instead_of_a_wrong_answer(torch_backend):
    x = torch.randn(3, 11, requires_grad=True)
    (g,) = torch.autograd.grad(logprobs(x, torch.tensor([1, 2, 3])).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()
