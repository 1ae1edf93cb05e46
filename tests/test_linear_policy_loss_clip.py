"""linear_policy_loss with importance-ratio clipping (old_logprobs=, clip=) against the plain
formula in float64: log_softmax of (hidden @ weight.T) / T, gather, r = exp(logp - old),
-sum_t w_t * min(r_t A_t, clamp(r_t, 1 - eps_low, 1 + eps_high) A_t), differentiated by
autograd. Loss and the gradients w.r.t. hidden, weight and the advantages (the op's coef is
-w * A), its ratio / clipped outputs, both back ends (Triton interpreted), token chunks, tokens
on both sides of each clip edge with both advantage signs, ignored positions; the vocab-parallel
path runs in tests/test_linear_policy_loss.py's 2-process test (its `clip` cases).

Accuracy rule (helpers.error_vs): at most 2x the error of the same formula in plain PyTorch in
the input dtype, plus a floor of a few fp32 ulps.
"""

import math

import pytest
import torch

import nemokern.kernels.linear_policy_loss as P
from helpers import IGNORE, INTERPRETER_NOISE, awkward_linear_inputs, errors_vs, fwd_bwd
from helpers import policy_small_tiles as small_tiles
from nemokern.ops import linear_policy_loss

pytestmark = INTERPRETER_NOISE

CLIP = (0.2, 0.28)


def plain_clipped(hidden, weight, targets, adv, w, old, clip, temperature):
    """(loss, ratio, clipped) of the clipped surrogate in the inputs' own dtype."""
    lsm = torch.log_softmax((hidden @ weight.t()) / temperature, dim=-1)
    valid = targets != IGNORE
    logp = lsm.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    dt = lsm.dtype
    ratio = torch.exp(logp - torch.where(valid, old, 0).to(dt))
    a = torch.where(valid, adv, 0).to(dt)
    lo, hi = 1 - clip[0], 1 + clip[1]
    objective = torch.min(ratio * a, torch.clamp(ratio, lo, hi) * a)
    loss = -(torch.where(valid, w.to(dt), 0) * objective).sum()
    clipped = valid & (((a > 0) & (ratio > hi)) | ((a < 0) & (ratio < lo)))
    return loss, torch.where(valid, ratio, 0), clipped


def make_clip_inputs(shape, hidden_size, vocab, dtype, temperature, margin, seed=0):
    """hidden, weight, targets (a quarter ignored), advantages (some 0), weights 1/n and
    old log-probs placing each counted token's float64 ratio at one of: just below / above
    1 - eps_low and 1 + eps_high (by `margin`), 1, or a random value in [0.3, 3]."""
    hidden, weight, targets, ignored, g = awkward_linear_inputs(
        shape, hidden_size, vocab, dtype, 2.0, seed=seed
    )
    adv = torch.randn(shape, generator=g).double()
    adv[torch.rand(shape, generator=g) < 0.1] = 0.0
    w = torch.full(shape, 1.0 / max(1, int((~ignored).sum())), dtype=torch.float64)
    lo, hi = 1 - CLIP[0], 1 + CLIP[1]
    spots = torch.tensor([lo - margin, lo + margin, hi - margin, hi + margin, 1.0, 0.0])
    r = spots[torch.randint(0, len(spots), shape, generator=g)].double()
    rand = torch.exp(torch.empty(shape).uniform_(math.log(0.3), math.log(3), generator=g))
    r = torch.where(r == 0, rand.double(), r)
    logits = (hidden.double() @ weight.double().t()) / temperature
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1))
    old = (logp.squeeze(-1) - torch.log(r)).float()
    old[ignored] = float("nan")  # never read
    return hidden, weight, targets, adv, w, old


def run(hidden, weight, adv, fn):
    """fn(h, wt, a) -> (loss, ratio, clipped): ((loss, dhidden, dweight, dadvantage), ratio,
    clipped)."""
    loss, ratio, clipped, *grads = fwd_bwd(fn, (hidden, weight, adv), (1.0, None, None))
    return (loss, *grads), ratio, clipped


def check_clipped(hidden, weight, targets, adv, w, old, temperature, label):
    def ours_fn(h, wt, a):
        coef = -(w * a).to(torch.float32)
        return linear_policy_loss(
            h,
            wt,
            targets,
            coef,
            old_logprobs=old,
            clip=CLIP,
            temperature=temperature,
            return_ratio=True,
        )

    def plain_fn(dtype):
        return lambda h, wt, a: plain_clipped(
            h.to(dtype), wt.to(dtype), targets, a, w, old, CLIP, temperature
        )

    ours, ratio, clipped = run(hidden, weight, adv, ours_fn)
    plain = run(hidden, weight, adv, plain_fn(hidden.dtype))[0]
    ref, ref_ratio, ref_clipped = run(hidden, weight, adv, plain_fn(torch.float64))
    # At A = 0 the objective has a kink in A: autograd's min() takes the mean of its two sides,
    # the op the unclipped side, -w * r. Compared there on their own.
    zero = adv == 0
    torch.testing.assert_close(ours[3][zero], -(w * ratio.double())[zero], rtol=1e-6, atol=0)
    ours, plain, ref = ([*x[:3], x[3][~zero]] for x in (ours, plain, ref))
    assert ours[0].dtype == torch.float32 and ours[0].shape == ()
    assert ours[1].dtype == hidden.dtype and ours[2].dtype == weight.dtype
    errors_vs(ours, plain, ref, ("loss", "dhidden", "dweight", "dadvantage"), label)
    assert ratio.dtype == torch.float32 and ratio.shape == targets.shape
    assert torch.equal(clipped, ref_clipped), f"{label}: clipped tokens differ"
    torch.testing.assert_close(ratio.double(), ref_ratio, rtol=0.05, atol=0)
    valid = targets != IGNORE
    return ref_clipped, ref_ratio, valid


def assert_both_edges(clipped, ratio, valid, adv):
    """The case really has tokens clipped on each side, and unclipped ones beyond each edge
    (whose advantage sign leaves them in the gradient)."""
    lo, hi = 1 - CLIP[0], 1 + CLIP[1]
    assert (clipped & (ratio < lo)).any() and (clipped & (ratio > hi)).any()
    assert (valid & ~clipped & (ratio < lo)).any() and (valid & ~clipped & (ratio > hi)).any()


TORCH_CASES = [
    # (leading shape, H, V, dtype, temperature, ratio margin around each edge)
    ((37,), 24, 53, torch.float32, 0.7, 0.01),
    ((2, 61), 33, 301, torch.bfloat16, 1.3, 0.1),
    ((3, 29), 40, 131, torch.float16, 1.0, 0.1),
    ((45,), 40, 32003, torch.float32, 1.0, 0.01),
]


@pytest.mark.parametrize("shape,hidden_size,vocab,dtype,temperature,margin", TORCH_CASES)
def test_torch_path_matches_float64(
    torch_backend, shape, hidden_size, vocab, dtype, temperature, margin
):
    inputs = make_clip_inputs(shape, hidden_size, vocab, dtype, temperature, margin)
    label = f"torch {shape} H={hidden_size} V={vocab} {dtype} T={temperature}"
    clipped, ratio, valid = check_clipped(*inputs, temperature, label)
    assert_both_edges(clipped, ratio, valid, inputs[3])


@pytest.mark.parametrize("dtype,margin", [(torch.float32, 0.01), (torch.bfloat16, 0.1)])
def test_torch_path_token_chunks(torch_backend, monkeypatch, dtype, margin):
    """Each token chunk forms its own coefficients from its own log-probs."""
    monkeypatch.setattr(P, "_TORCH_CHUNK_ELEMENTS", 4 * 37)  # 4 tokens per chunk, last partial
    monkeypatch.setattr(P, "_TORCH_STATS_ELEMENTS", 3 * 37)
    inputs = make_clip_inputs((43,), 20, 37, dtype, 1.3, margin, seed=3)
    check_clipped(*inputs, 1.3, f"torch chunked {dtype}")


TRITON_CASES = [
    ((37,), 40, 301, torch.float32, 0.7, 0.01),
    ((2, 29), 64, 131, torch.bfloat16, 1.3, 0.1),
]


@pytest.mark.parametrize("shape,hidden_size,vocab,dtype,temperature,margin", TRITON_CASES)
def test_triton_kernels_match_float64(
    triton_backend, monkeypatch, shape, hidden_size, vocab, dtype, temperature, margin
):
    small_tiles(monkeypatch)  # several token chunks, vocabulary splits and tiles
    inputs = make_clip_inputs(shape, hidden_size, vocab, dtype, temperature, margin, seed=1)
    label = f"triton {shape} H={hidden_size} V={vocab} {dtype} T={temperature}"
    check_clipped(*inputs, temperature, label)


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_ratio_one_is_the_unclipped_gradient(request, monkeypatch, backend):
    """old_logprobs = the current log-probs (an update right after sampling): r = 1, nothing is
    clipped, the loss is sum(coef) and the gradients are the unclipped op's."""
    request.getfixturevalue(backend)
    small_tiles(monkeypatch)
    hidden, weight, targets, adv, w, _ = make_clip_inputs((29,), 24, 67, torch.float32, 1.0, 0)
    coef = -(w * adv).float()
    with torch.no_grad():
        logp = torch.log_softmax(hidden.double() @ weight.double().t(), -1)
        old = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).float()

    def grads(**kw):
        h, wt = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = linear_policy_loss(h, wt, targets, coef, **kw)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return out, h.grad, wt.grad

    (loss, ratio, clipped), dh, dw = grads(old_logprobs=old, clip=CLIP, return_ratio=True)
    _, dh0, dw0 = grads()
    valid = targets != IGNORE
    assert not clipped.any()
    torch.testing.assert_close(ratio[valid], torch.ones(int(valid.sum())), rtol=0, atol=1e-5)
    assert torch.equal(ratio[~valid], torch.zeros(int((~valid).sum())))
    torch.testing.assert_close(loss, coef[valid].sum(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dh, dh0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dw, dw0, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_no_clip_is_the_plain_ratio_and_no_grad_matches(request, monkeypatch, backend):
    """clip=None: the importance-weighted loss sum(coef * r), nothing clipped; under no_grad
    (the statistics pass only) the same loss as with gradients."""
    request.getfixturevalue(backend)
    small_tiles(monkeypatch)
    hidden, weight, targets, adv, w, old = make_clip_inputs((31,), 24, 53, torch.float32, 1.0, 0.01)
    coef = -(w * adv).float()
    h = hidden.clone().requires_grad_(True)
    loss, ratio, clipped = linear_policy_loss(
        h, weight, targets, coef, old_logprobs=old, return_ratio=True
    )
    loss.backward()
    valid = targets != IGNORE
    assert not clipped.any()
    torch.testing.assert_close(loss.double(), (coef.double() * ratio.double())[valid].sum())
    with torch.no_grad():
        nograd = linear_policy_loss(hidden, weight, targets, coef, old_logprobs=old, clip=CLIP)
    with_grad = linear_policy_loss(
        hidden.clone().requires_grad_(True), weight, targets, coef, old_logprobs=old, clip=CLIP
    )
    torch.testing.assert_close(nograd, with_grad.detach(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_zero_coef_and_infinite_ratio_stay_finite(request, backend):
    """A token with coef 0 (advantage 0) adds nothing even where r overflows to inf; a clipped
    token at r = inf contributes coef * (1 + eps_high) and no gradient."""
    request.getfixturevalue(backend)
    hidden, weight = torch.randn(3, 8), torch.randn(11, 8)
    targets = torch.tensor([1, 2, 3])
    old = torch.tensor([-200.0, -200.0, -1.0])  # r = exp(~200) = inf in float32 for two
    coef = torch.tensor([0.0, -0.5, 0.25])
    h = hidden.clone().requires_grad_(True)
    loss, ratio, clipped = linear_policy_loss(
        h, weight, targets, coef, old_logprobs=old, clip=CLIP, return_ratio=True
    )
    loss.backward()
    loss = loss.detach()
    assert torch.isinf(ratio[:2]).all() and clipped.tolist()[:2] == [False, True]
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()
    assert torch.equal(h.grad[:2], torch.zeros(2, 8))
    expect = -0.5 * (1 + CLIP[1]) + 0.25 * max(float(ratio[2]), 1 - CLIP[0])
    assert math.isclose(loss.item(), expect, rel_tol=1e-5)


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_ignored_positions_are_never_read(request, monkeypatch, backend):
    """nan/inf old log-probs, coefficients and hidden states at ignored positions change
    nothing: the same results as the counted rows alone; ratio 0 and clipped False there."""
    request.getfixturevalue(backend)
    small_tiles(monkeypatch)
    hidden, weight, targets, adv, w, old = make_clip_inputs((17,), 16, 37, torch.float32, 1.0, 0.01)
    targets[[0, 4, 5]] = IGNORE
    kept = targets != IGNORE
    coef = -(w * adv).float()
    dirty_h, dirty_old, dirty_coef = hidden.clone(), old.clone(), coef.clone()
    dirty_h[0], dirty_h[4] = float("nan"), float("inf")
    dirty_old[~kept], dirty_coef[~kept] = float("inf"), float("nan")

    def go(h, t, c, o):
        h = h.clone().requires_grad_(True)
        loss, ratio, clipped = linear_policy_loss(
            h, weight, t, c, old_logprobs=o, clip=CLIP, return_ratio=True
        )
        loss.backward()
        return loss, h.grad, ratio, clipped

    a = go(dirty_h, targets, dirty_coef, dirty_old)
    b = go(hidden[kept], targets[kept], coef[kept], old[kept])
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    for x, y in zip(a[1:], b[1:]):
        assert torch.equal(x[kept], y)
    assert not a[1][~kept].any() and not a[2][~kept].any() and not a[3][~kept].any()


def test_bad_clip_arguments_raise_clear_errors():
    h, w, t, c = torch.randn(3, 8), torch.randn(11, 8), torch.tensor([0, 1, 2]), torch.ones(3)
    old = torch.zeros(3)
    with pytest.raises(ValueError, match="^linear_policy_loss: clip needs old_logprobs"):
        linear_policy_loss(h, w, t, c, clip=CLIP)
    with pytest.raises(ValueError, match="^linear_policy_loss: return_ratio needs old_logprobs"):
        linear_policy_loss(h, w, t, c, return_ratio=True)
    with pytest.raises(ValueError, match=r"old_logprobs has shape \(1, 3\) but targets \(3,\)"):
        linear_policy_loss(h, w, t, c, old_logprobs=old.view(1, 3))
    with pytest.raises(TypeError, match="old_logprobs must be a floating-point tensor"):
        linear_policy_loss(h, w, t, c, old_logprobs=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="old_logprobs is on meta but hidden is on cpu"):
        linear_policy_loss(h, w, t, c, old_logprobs=torch.zeros(3, device="meta"))
    for bad in (0.2, (0.2,), (0.2, "x"), (True, 0.2)):
        with pytest.raises(TypeError, match=r"clip must be a pair \(eps_low, eps_high\)"):
            linear_policy_loss(h, w, t, c, old_logprobs=old, clip=bad)
    for bad in ((-0.1, 0.2), (0.2, float("nan"))):
        with pytest.raises(ValueError, match="eps_low and eps_high must be >= 0"):
            linear_policy_loss(h, w, t, c, old_logprobs=old, clip=bad)
    # inf leaves a side open: nothing clips there
    loss, ratio, clipped = linear_policy_loss(
        h, w, t, -c, old_logprobs=old - 50, clip=(0.2, math.inf), return_ratio=True
    )
    assert not clipped.any() and torch.isfinite(loss)


@pytest.mark.parametrize("shape,hidden_size,vocab,dtype,temperature,margin", TRITON_CASES)
def test_cublas_chunk_path_matches_float64(
    triton_backend, monkeypatch, shape, hidden_size, vocab, dtype, temperature, margin
):
    """The second CUDA path (kernels/policy_loss_cublas.py, chosen through its path table;
    torch.mm on CPU tensors, its kernel interpreted): statistics pass, the chunk's clipped
    coefficients, then the d(logits) pass, in token chunks of 8 rows."""
    import nemokern.kernels.policy_loss_cublas as C

    entry = {"path": "cublas", "chunk_rows": 8}
    monkeypatch.setattr(C, "_table", lambda: {"cpu": {"float32": entry, "bfloat16": entry}})
    monkeypatch.setattr(C, "_CONFIG", (32, 4))
    passes = []
    real = C.chunk_dlogits
    monkeypatch.setattr(C, "chunk_dlogits", lambda z, *a: passes.append(len(z)) or real(z, *a))
    inputs = make_clip_inputs(shape, hidden_size, vocab, dtype, temperature, margin, seed=1)
    check_clipped(*inputs, temperature, f"cublas {shape} V={vocab} {dtype}")
    kept = int((inputs[2] != IGNORE).sum())
    assert passes == [min(8, kept - i) for i in range(0, kept, 8)]
