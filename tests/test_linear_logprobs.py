"""nemokern.ops.linear_logprobs against a float64 reference (logits = hidden @ weight.T, then
log-softmax): torch path on awkward big shapes, Triton kernels interpreted on small ones; forward
and backward (hidden and weight) for log-probs and entropy; peak memory of the CPU path.

Accuracy rule as in test_logprobs.py: at most 2x the error of plain PyTorch in the input dtype
(matmul + log_softmax + gather), plus a floor of a few fp32 ulps.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import nemokern.kernels.linear_logprobs as L
from helpers import (
    IGNORE,
    INTERPRETER_NOISE,
    awkward_linear_inputs,
    errors_vs,
    reference,
    vs_float64,
)
from nemokern.ops import linear_logprobs

pytestmark = INTERPRETER_NOISE


def make_inputs(shape, hidden_size, vocab, dtype, scale, ignore_frac=0.25, seed=0):
    """hidden, weight, targets and the upstream gradients of logp and of the entropy."""
    hidden, weight, targets, _, g = awkward_linear_inputs(
        shape, hidden_size, vocab, dtype, scale, ignore_frac, seed
    )
    return hidden, weight, targets, torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def op_and_plain(targets, temperature):
    """linear_logprobs and the plain formula (matmul + log_softmax + gather), as fn(h, w)."""

    def ours(h, w):
        return linear_logprobs(h, w, targets, temperature=temperature, return_entropy=True)

    def plain(h, w):
        return reference(h @ w.t(), targets, temperature)

    return ours, plain


def check_against_float64(hidden, weight, targets, g_lp, g_ent, temperature, label=""):
    fns = op_and_plain(targets, temperature)
    runs = vs_float64(*fns, (hidden, weight), (g_lp, g_ent))
    ours = runs[0]
    assert ours[2].dtype == hidden.dtype and ours[3].dtype == weight.dtype
    errors_vs(*runs, ("logp", "entropy", "dhidden", "dweight"), label)
    # logp-only gradient (entropy gets none: the common RLHF case, a shorter torch backward)
    only = [run[2:] for run in vs_float64(*fns, (hidden, weight), (g_lp, None))]
    errors_vs(*only, ("logp-only dhidden", "logp-only dweight"), label)
    return ours


TORCH_CASES = [
    # (leading shape, H, V, dtype, temperature, hidden scale)
    ((1,), 16, 1, torch.float32, 1.0, 1.0),
    ((7,), 33, 31, torch.bfloat16, 0.7, 1.0),
    ((513,), 64, 31, torch.float32, 1.3, 3.0),
    ((7,), 40, 50257, torch.bfloat16, 1.3, 3.0),
    ((3, 171), 64, 50257, torch.float32, 0.7, 1.0),
    ((7,), 64, 50257, torch.float32, 1.0, 1e4),  # logits of magnitude ~1e4
]


@pytest.mark.parametrize("shape,hidden_size,vocab,dtype,temperature,scale", TORCH_CASES)
def test_torch_path_matches_float64(
    torch_backend, shape, hidden_size, vocab, dtype, temperature, scale
):
    inputs = make_inputs(shape, hidden_size, vocab, dtype, scale)
    check_against_float64(
        *inputs,
        temperature,
        label=f"torch {shape} H={hidden_size} V={vocab} {dtype} T={temperature} x{scale:g}",
    )


def test_torch_path_token_chunks(torch_backend, monkeypatch):
    # forward: 4 tokens per chunk, the last partial; backward: 4 vocabulary rows per chunk
    monkeypatch.setattr(L, "_TORCH_FWD_CHUNK_ELEMENTS", 4 * 37)
    monkeypatch.setattr(L, "_TORCH_CHUNK_ELEMENTS", 4 * 30)
    inputs = make_inputs((30,), 20, 37, torch.float32, 2.0)
    check_against_float64(*inputs, 1.3, label="torch chunked")


TRITON_CASES = [
    ((1,), 16, 1, torch.float32, 1.0, 1.0),
    ((7,), 40, 300, torch.float32, 0.7, 2.0),
    ((2, 3), 64, 300, torch.bfloat16, 1.3, 2.0),
    ((5,), 33, 131, torch.float32, 1.0, 1e4),
]


@pytest.mark.parametrize("shape,hidden_size,vocab,dtype,temperature,scale", TRITON_CASES)
def test_triton_kernels_match_float64(
    triton_backend, monkeypatch, shape, hidden_size, vocab, dtype, temperature, scale
):
    # Small tiles, so the interpreter walks several token/vocabulary/H tiles and vocabulary
    # splits, and a 1-byte chunk budget, so the backward walks many 32-column chunks.
    for dt in (torch.float32, torch.bfloat16):
        monkeypatch.setitem(L.TILE_CONFIGS, dt, (16, 32, 16, 4, 1))
    monkeypatch.setattr(L, "_BWD_CHUNK_BYTES", 1)
    inputs = make_inputs(shape, hidden_size, vocab, dtype, scale)
    check_against_float64(
        *inputs,
        temperature,
        label=f"triton {shape} H={hidden_size} V={vocab} {dtype} T={temperature} x{scale:g}",
    )


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_all_ignored_and_logprob_only_grad(request, backend):
    request.getfixturevalue(backend)
    h = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    logp = linear_logprobs(h, w, torch.full((3,), IGNORE))
    assert torch.equal(logp, torch.zeros(3))
    logp.sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_bad_inputs_raise_clear_errors():
    h, w = torch.randn(3, 8), torch.randn(11, 8)
    with pytest.raises(ValueError, match="must end in H"):
        linear_logprobs(torch.randn(3, 9), w, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"LM head \[V, H\]"):
        linear_logprobs(h, torch.randn(2, 11, 8), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="hidden.to"):
        linear_logprobs(h.double(), w, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"targets\[2\].*\[0, 11\)"):
        linear_logprobs(h, w, torch.tensor([0, 1, 11]))
    with pytest.raises(ValueError, match="targets has shape"):
        linear_logprobs(h, w, torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(h, w, torch.tensor([0, 1, 2]), temperature=-0.5)
    with pytest.raises(RuntimeError, match="not initialised"):
        linear_logprobs(h, w, torch.tensor([0, 1, 2]), tp_group=object())


_MEMORY_SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from helpers import peak_extra_bytes
from nemokern.ops import linear_logprobs

hs, v = 64, 32000
w = (torch.randn(v, hs) / 8).requires_grad_(True)
peaks = {}
for n in (2048, 8192):
    h = torch.randn(n, hs, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    w.grad = None
    _, peaks[n] = peak_extra_bytes(lambda: linear_logprobs(h, w, targets).sum().backward())
print(json.dumps(peaks))
"""


def test_cpu_peak_memory_does_not_grow_with_n_times_v():
    """Forward + backward: peak extra memory stays flat from N = 2048 to 8192 at V = 32000 and far
    below one fp32 logits tensor (1000 MiB at N = 8192). Measured in a fresh process where every
    block of 64 KiB or more is its own mapping, so freed memory leaves the resident set and each
    call's peak is its own (in a long-lived process, reused heap memory hides allocations)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", NEMOKERN_BACKEND="torch")
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, tests],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    peaks = {int(n): p for n, p in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    logits_bytes = 8192 * 32000 * 4
    print(
        f"\npeak extra MiB { ({n: round(p / 2**20, 1) for n, p in peaks.items()}) } vs fp32 "
        f"logits {logits_bytes / 2**20:.0f} MiB at N = 8192"
    )
    assert peaks[2048] > 0  # the measurement sees the op's own scratch
    assert peaks[8192] < logits_bytes / 4
    assert peaks[8192] < 1.25 * peaks[2048] + (16 << 20)


@pytest.mark.gpu
@pytest.mark.gpu_small(n=33, hidden_size=16, vocab=101)
@pytest.mark.parametrize(
    "n,hidden_size,vocab,dtype",
    [
        (1024, 4096, 128256, torch.bfloat16),
        (1024, 4096, 128256, torch.float16),
        (513, 1024, 50257, torch.float32),
    ],
)
def test_triton_on_cuda_real_shapes(n, hidden_size, vocab, dtype):
    hidden, weight, targets, g_lp, g_ent = (
        t.cuda() for t in make_inputs((n,), hidden_size, vocab, dtype, 1.0)
    )
    runs = vs_float64(*op_and_plain(targets, 0.7), (hidden, weight), (g_lp, g_ent))
    errors_vs(
        *runs, ("logp", "entropy", "dhidden", "dweight"), f"cuda {n}x{hidden_size}x{vocab} {dtype}"
    )


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_no_tokens(request, backend):
    request.getfixturevalue(backend)
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    logp, ent = linear_logprobs(h, w, torch.zeros(0, dtype=torch.int64), return_entropy=True)
    assert logp.shape == ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and h.grad.shape == (0, 8)


def test_triton_path_rejects_unsupported_dtype_clearly(triton_backend):
    # float64 works on the torch path; the Triton kernels have no float64 tiles.
    h, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64.*NEMOKERN_BACKEND=torch"):
        linear_logprobs(h, w, torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_unchecked_out_of_range_target_gives_minus_logsumexp(request, backend, monkeypatch):
    # The ops docstring's promise when NEMOKERN_CHECK_TARGETS=0: the target logit counts as 0, and
    # an id past V must not match a padding column of the last (partial) vocabulary tile.
    request.getfixturevalue(backend)
    monkeypatch.setenv("NEMOKERN_CHECK_TARGETS", "0")
    monkeypatch.setitem(L.TILE_CONFIGS, torch.float32, (16, 32, 16, 4, 1))
    h, w = torch.randn(3, 8), torch.randn(37, 8)
    logp = linear_logprobs(h, w, torch.tensor([5, 37, 40]))
    lse = torch.logsumexp((h @ w.t()).double(), -1)
    torch.testing.assert_close(logp[1:].double(), -lse[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        logp[0].double(), (h @ w.t()).double()[0, 5] - lse[0], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_input_skips_its_gradient(request, backend, frozen, monkeypatch):
    """A frozen LM head (or detached hidden) gets no gradient computed: no [V, H] buffer, one GEMM
    per vocabulary chunk less; the other gradient is unchanged."""
    request.getfixturevalue(backend)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 16, generator=g)
    weight = torch.randn(37, 16, generator=g)
    targets = torch.randint(0, 37, (5,), generator=g)
    seen = []
    real = L.backward_by_vocab_chunks

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(tuple(x is not None for x in out))
        return out

    monkeypatch.setattr(L, "backward_by_vocab_chunks", spy)
    h_full, w_full = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    linear_logprobs(h_full, w_full, targets).sum().backward()
    h, w = hidden.clone(), weight.clone()
    (w if frozen == "hidden" else h).requires_grad_()
    linear_logprobs(h, w, targets).sum().backward()
    assert seen == [(True, True), (frozen == "weight", frozen == "hidden")]
    live, ref = (h, h_full) if frozen == "weight" else (w, w_full)
    torch.testing.assert_close(live.grad, ref.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_ignored_rows_cost_nothing_and_garbage_there_is_harmless(request, backend, monkeypatch):
    """The GEMMs run on the counted rows only (prompt tokens are free), so nan/inf hidden states
    in ignored rows (padding, prompts) leave every output and gradient exactly as without them;
    the ignored rows get 0 and a zero dhidden."""
    request.getfixturevalue(backend)
    monkeypatch.setitem(L.TILE_CONFIGS, torch.float32, (16, 32, 16, 4, 1))
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(9, 16, generator=g)
    weight = torch.randn(37, 16, generator=g)
    targets = torch.randint(0, 37, (9,), generator=g)
    targets[[0, 4, 5]] = IGNORE
    kept = targets != IGNORE
    fwd_rows = []
    stats = L.linear_stats_torch if backend == "torch_backend" else L.linear_stats_triton
    monkeypatch.setattr(
        L, stats.__name__, lambda h, *a, **k: fwd_rows.append(h.shape[0]) or stats(h, *a, **k)
    )
    dirty = hidden.clone()
    dirty[0] = float("nan")
    dirty[4] = float("inf")
    res = []
    for h, t in ((dirty, targets), (hidden[kept], targets[kept])):
        h, w = h.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        logp, ent = linear_logprobs(h, w, t, return_entropy=True)
        (logp.sum() + 0.5 * ent.sum()).backward()
        res.append((logp.detach(), ent.detach(), h.grad, w.grad))
    assert fwd_rows == [6, 6]
    (lp, ent, dh, dw), (lp_k, ent_k, dh_k, dw_k) = res
    assert torch.equal(lp[~kept], torch.zeros(3)) and torch.equal(ent[~kept], torch.zeros(3))
    assert torch.equal(dh[~kept], torch.zeros(3, 16))
    for a, b in ((lp[kept], lp_k), (ent[kept], ent_k), (dh[kept], dh_k), (dw, dw_k)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_double_backward_raises_instead_of_a_wrong_answer(torch_backend):
    h = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    (g,) = torch.autograd.grad(
        linear_logprobs(h, w, torch.tensor([1, 2, 3])).sum(), h, create_graph=True
    )
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()
