"""nemokern.ops.linear_policy_loss against an independent float64 formula (log_softmax of
(hidden @ weight.T) / T, gather, weighted sum): loss, mean entropy and both gradients, torch path
and Triton kernels (interpreted, small tiles), incoming-gradient scaling, ignored positions,
vocab-parallel shards over 2 gloo processes, bad inputs, CPU peak memory.

Accuracy rule (helpers.error_vs, as for the log-prob ops): at most 2x the error of the same
formula in plain PyTorch in the input dtype, plus a floor of a few fp32 ulps.
"""

import contextlib
import json
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.distributed as dist

import nemokern.kernels.linear_logprobs as L
import nemokern.kernels.linear_policy_loss as P
from helpers import IGNORE, INTERPRETER_NOISE, assert_shard_matches, run_ranks
from helpers import policy_inputs as make_inputs
from helpers import policy_run as run
from helpers import policy_small_tiles as small_tiles
from helpers import policy_vs_float64 as check_against_float64
from nemokern.ops import linear_logprobs, linear_policy_loss

pytestmark = INTERPRETER_NOISE


TORCH_CASES = [
    # (leading shape, H, V, dtype, temperature, hidden scale)
    ((1,), 16, 1, torch.float32, 1.0, 1.0),
    ((9,), 33, 29, torch.bfloat16, 0.7, 1.0),
    ((515,), 48, 31, torch.float32, 1.3, 3.0),
    ((5,), 40, 32003, torch.bfloat16, 1.3, 3.0),
    ((2, 173), 64, 32003, torch.float32, 0.7, 1.0),
    ((6,), 64, 32003, torch.float32, 1.0, 1e4),  # logits of magnitude ~1e4
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_token_chunks(torch_backend, monkeypatch, dtype):
    monkeypatch.setattr(P, "_TORCH_CHUNK_ELEMENTS", 4 * 37)  # 4 tokens per chunk, last partial
    monkeypatch.setattr(P, "_TORCH_STATS_ELEMENTS", 3 * 37)  # statistics of 3 + 1 rows
    inputs = make_inputs((30,), 20, 37, dtype, 2.0)
    check_against_float64(*inputs, 1.3, label=f"torch chunked {dtype}")


TRITON_CASES = [
    ((1,), 16, 1, torch.float32, 1.0, 1.0),
    ((37,), 40, 301, torch.float32, 0.7, 2.0),
    ((2, 19), 64, 301, torch.bfloat16, 1.3, 2.0),
    ((5,), 33, 131, torch.float32, 1.0, 1e4),
]


@pytest.mark.parametrize("shape,hidden_size,vocab,dtype,temperature,scale", TRITON_CASES)
def test_triton_kernels_match_float64(
    triton_backend, monkeypatch, shape, hidden_size, vocab, dtype, temperature, scale
):
    small_tiles(monkeypatch)
    inputs = make_inputs(shape, hidden_size, vocab, dtype, scale)
    check_against_float64(
        *inputs,
        temperature,
        label=f"triton {shape} H={hidden_size} V={vocab} {dtype} T={temperature} x{scale:g}",
    )


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
@pytest.mark.parametrize("dtype,grad_scale", [(torch.float32, -0.37), (torch.bfloat16, 4.0)])
def test_incoming_gradient_scales_the_stored_gradients(
    request, monkeypatch, backend, dtype, grad_scale
):
    request.getfixturevalue(backend)
    small_tiles(monkeypatch)
    inputs = make_inputs((23,), 24, 67, dtype, 2.0, seed=5)
    check_against_float64(*inputs, 0.9, label=f"{backend} x{grad_scale}", grad_scale=grad_scale)


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_equals_linear_logprobs_then_weighted_sum(request, monkeypatch, backend):
    """Same loss and gradients as the 4-GEMM composition it replaces; ignored coefficients (nan
    here) are never read."""
    request.getfixturevalue(backend)
    small_tiles(monkeypatch)
    hidden, weight, targets, coef = make_inputs((3, 11), 24, 53, torch.float32, 2.0, seed=2)
    ours = run(
        hidden, weight, lambda h, w: linear_policy_loss(h, w, targets, coef, return_entropy=True)
    )
    valid = targets != IGNORE

    def composed(h, w):
        logp, ent = linear_logprobs(h, w, targets, return_entropy=True)
        return (torch.where(valid, coef, 0) * logp).sum(), ent.sum() / valid.sum()

    theirs = run(hidden, weight, composed)
    assert all(torch.isfinite(x).all() for x in ours)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
@pytest.mark.parametrize("others", [True, False])
def test_coef_gradient_is_logp_in_float64(request, monkeypatch, backend, others):
    """The loss is linear in coef: d/dcoef = logp (0 at ignored positions), e.g. for a learned
    baseline. It was silently None, with or without hidden/weight requiring grad."""
    request.getfixturevalue(backend)
    small_tiles(monkeypatch)
    hidden, weight, targets, coef = make_inputs((5, 7), 24, 53, torch.float32, 0.7, seed=5)
    coef = torch.where(targets != IGNORE, coef, 0.0).requires_grad_(True)
    h, w = hidden.clone().requires_grad_(others), weight.clone().requires_grad_(others)
    (2.5 * linear_policy_loss(h, w, targets, coef, temperature=0.7)).backward()
    z = (hidden.double() @ weight.double().t()) / 0.7
    logp = torch.log_softmax(z, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expect = torch.where(targets != IGNORE, 2.5 * logp, 0.0)
    torch.testing.assert_close(coef.grad.double(), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_all_ignored_and_no_tokens(request, backend):
    request.getfixturevalue(backend)
    for n in (3, 0):
        h = torch.randn(n, 8, requires_grad=True)
        w = torch.randn(11, 8, requires_grad=True)
        loss, ent = linear_policy_loss(
            h, w, torch.full((n,), IGNORE), torch.ones(n), return_entropy=True
        )
        assert loss.item() == 0.0 and ent.item() == 0.0
        loss.backward()
        assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_ignored_rows_garbage_is_harmless(request, monkeypatch, backend):
    """nan/inf hidden states and coefficients at ignored positions touch nothing; those rows get
    a zero dhidden."""
    request.getfixturevalue(backend)
    small_tiles(monkeypatch)
    hidden, weight, targets, coef = make_inputs((9,), 16, 37, torch.float32, 1.0, seed=11)
    targets[[0, 4, 5]] = IGNORE
    kept = targets != IGNORE
    dirty = hidden.clone()
    dirty[0], dirty[4] = float("nan"), float("inf")
    coef[~kept] = float("inf")
    a = run(
        dirty, weight, lambda h, w: linear_policy_loss(h, w, targets, coef, return_entropy=True)
    )
    b = run(
        hidden[kept],
        weight,
        lambda h, w: linear_policy_loss(h, w, targets[kept], coef[kept], return_entropy=True),
    )
    assert torch.equal(a[2][~kept], torch.zeros(int((~kept).sum()), 16))
    for x, y in ((a[0], b[0]), (a[1], b[1]), (a[2][kept], b[2]), (a[3], b[3])):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
def test_gradients_only_where_needed(request, monkeypatch, backend):
    """No grad mode: the forward is the statistics pass only (no fused gradient pass). A frozen
    LM head gets no dweight computed; dhidden is unchanged."""
    request.getfixturevalue(backend)
    small_tiles(monkeypatch)
    name = f"linear_policy_grads_{backend.split('_')[0]}"
    real = getattr(P, name)
    calls = []

    def spy(*args, **kwargs):
        calls.append((kwargs["need_dh"], kwargs["need_dw"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(P, name, spy)
    hidden, weight, targets, coef = make_inputs((13,), 16, 41, torch.float32, 1.0, seed=4)
    with torch.no_grad():
        loss = linear_policy_loss(hidden, weight, targets, coef)
    assert calls == []
    full = run(hidden, weight, lambda h, w: (linear_policy_loss(h, w, targets, coef), loss))
    torch.testing.assert_close(full[0], loss, rtol=0, atol=0)
    h = hidden.clone().requires_grad_(True)
    linear_policy_loss(h, weight, targets, coef).backward()
    assert calls == [(True, True), (True, False)]
    torch.testing.assert_close(h.grad, full[2], rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors():
    h, w, t, c = torch.randn(3, 8), torch.randn(11, 8), torch.tensor([0, 1, 2]), torch.ones(3)
    with pytest.raises(ValueError, match="coef has shape"):
        linear_policy_loss(h, w, t, torch.ones(1, 3))
    with pytest.raises(TypeError, match="coef must be a floating-point tensor"):
        linear_policy_loss(h, w, t, torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="coef must be a torch.Tensor, got list"):
        linear_policy_loss(h, w, t, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="coef is on meta but hidden is on cpu"):
        linear_policy_loss(h, w, t, torch.ones(3, device="meta"))
    with pytest.raises(ValueError, match="must end in H"):
        linear_policy_loss(torch.randn(3, 9), w, t, c)
    with pytest.raises(ValueError, match=r"LM head \[V, H\]"):
        linear_policy_loss(h, torch.randn(2, 11, 8), t, c)
    with pytest.raises(TypeError, match="hidden.to"):
        linear_policy_loss(h.double(), w, t, c)
    with pytest.raises(ValueError, match=r"targets\[2\].*\[0, 11\)"):
        linear_policy_loss(h, w, torch.tensor([0, 1, 11]), c)
    with pytest.raises(ValueError, match="targets has shape"):
        linear_policy_loss(h, w, torch.tensor([[0, 1, 2]]), c)
    with pytest.raises(TypeError, match="targets must be an int64"):
        linear_policy_loss(h, w, t.float(), c)
    with pytest.raises(ValueError, match="temperature"):
        linear_policy_loss(h, w, t, c, temperature=0.0)
    with pytest.raises(RuntimeError, match="not initialised"):
        linear_policy_loss(h, w, t, c, tp_group=object())


@pytest.mark.parametrize("grad", [True, False])
def test_triton_path_rejects_unsupported_dtype_clearly(triton_backend, grad):
    """The fused pass and the statistics pass (no grad) both name this op."""
    h, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    h.requires_grad_(grad)
    with pytest.raises(TypeError, match="^linear_policy_loss: .*float64.*NEMOKERN_BACKEND=torch"):
        linear_policy_loss(h, w, torch.tensor([0, 1, 2]), torch.ones(3))


def test_second_backward_raises_instead_of_a_wrong_answer(torch_backend):
    h = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    loss = linear_policy_loss(h, w, torch.tensor([1, 2, 3]), torch.ones(3))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


# ----------------------------------------------------------------------------- vocab-parallel

COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
)


def _tp_worker(rank, world, init_file, backend, dtype, clip):
    os.environ["NEMOKERN_BACKEND"] = backend
    for dt in (torch.float32, torch.bfloat16):
        L.TILE_CONFIGS[dt] = (16, 32, 16, 4, 1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    shard, hs = 13, 24  # vocabulary 13 * world, odd sizes
    hidden, weight, targets, coef = make_inputs((3, 5), hs, shard * world, dtype, 3.0, seed=1234)
    targets[1, 0], targets[1, 1] = 0, shard * world - 1  # first and last shard hit
    extra = {}
    if clip:  # ratios spread over [0.5, 2]: both clip edges bind somewhere
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            logp = linear_logprobs(hidden, weight, targets, temperature=0.7)
        extra = dict(old_logprobs=logp + torch.empty(logp.shape).uniform_(-0.7, 0.7, generator=g))
        extra["clip"] = (0.2, 0.28)
    full = run(
        hidden,
        weight,
        lambda h, w: linear_policy_loss(
            h, w, targets, coef, temperature=0.7, return_entropy=True, **extra
        ),
        grad_scale=0.5,
    )
    with contextlib.ExitStack() as stack:
        # sums are counted at nemokern.parallel.all_reduce, the op's one way to sum
        spies = {
            name: stack.enter_context(mock.patch.object(module, name, wraps=getattr(module, name)))
            for module, name in [(dist, n) for n in COLLECTIVES]
            + [(sys.modules["nemokern.ops.linear_policy_loss"], "all_reduce")]
        }

        def count_calls():
            return {name: spy.call_count for name, spy in spies.items() if spy.call_count}

        def sharded(h, w):
            out = linear_policy_loss(
                h, w, targets, coef, temperature=0.7, return_entropy=True, tp_group=group, **extra
            )
            fwd.update(count_calls())
            return out

        fwd = {}
        part = run(hidden, weight[rank * shard : (rank + 1) * shard], sharded, grad_scale=0.5)
        total = count_calls()
    # linear_logprobs' exchange: the fixed-size header, then the statistics
    assert fwd == {"all_gather": 2}, f"forward collectives: {fwd}"
    assert total == {"all_gather": 2, "all_reduce": 1}, f"fwd+bwd collectives: {total}"
    assert_shard_matches(part, full, rank, shard, ("loss", "entropy", "dhidden"), dtype)
    # ranks that disagree on the targets raise on every rank, naming this op
    other = targets.clone()
    other[0, 0] = (other[0, 0] + rank) % (shard * world)
    with pytest.raises(ValueError, match="^linear_policy_loss: .*different targets"):
        linear_policy_loss(
            hidden, weight[rank * shard : (rank + 1) * shard], other, coef, tp_group=group
        )


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(
    "backend,dtype,clip",
    [
        ("torch", torch.float32, False),
        ("torch", torch.bfloat16, False),
        ("triton", torch.float32, False),
        ("torch", torch.float32, True),
        ("triton", torch.bfloat16, True),
    ],
)
def test_vocab_parallel_equals_unsharded(backend, dtype, clip):
    """2 gloo processes, each with half of the LM head: the full loss, entropy and dhidden on
    every rank, its dweight shard; two all_gathers in forward (header, statistics), one all_reduce
    in backward; ranks with different targets raise ValueError. clip: the importance-ratio
    clipped loss (old_logprobs, clip), the same exchange (the coefficients are formed from the
    merged statistics on every rank)."""
    run_ranks(_tp_worker, 2, backend, dtype, clip)


# ----------------------------------------------------------------------------- memory, GPU

_MEMORY_SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from helpers import peak_extra_bytes
from nemokern.ops import linear_policy_loss

hs, v = 64, 32000
w = (torch.randn(v, hs) / 8).requires_grad_(True)
peaks = {}
for n in (2048, 8192):
    h = torch.randn(n, hs, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    coef = torch.randn(n) / n
    w.grad = None
    _, peaks[n] = peak_extra_bytes(lambda: linear_policy_loss(h, w, targets, coef).backward())
print(json.dumps(peaks))
"""


def test_cpu_peak_memory_does_not_grow_with_n_times_v():
    """Forward + backward: peak extra memory stays flat from N = 2048 to 8192 at V = 32000 (the
    gradients themselves, dweight 7.8 MiB and dhidden, plus two token-chunk blocks) and far below
    one fp32 logits tensor (1000 MiB at N = 8192). Fresh process, every block of 64 KiB or more
    its own mapping, as in test_linear_logprobs.py."""
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
    assert peaks[2048] > 0
    assert peaks[8192] < logits_bytes / 8
    assert peaks[8192] < 1.25 * peaks[2048] + (16 << 20)


@pytest.mark.gpu
@pytest.mark.gpu_small(n=33, hidden_size=16, vocab=101)
@pytest.mark.parametrize(
    "n,hidden_size,vocab,dtype",
    [
        (4096, 4096, 128256, torch.bfloat16),
        (2048, 4096, 128256, torch.float16),
        (513, 1024, 50257, torch.float32),
    ],
)
def test_triton_on_cuda_real_shapes(n, hidden_size, vocab, dtype):
    hidden, weight, targets, coef = (
        t.cuda() for t in make_inputs((n,), hidden_size, vocab, dtype, 1.0)
    )
    check_against_float64(
        hidden, weight, targets, coef, 0.7, label=f"cuda {n}x{hidden_size}x{vocab} {dtype}"
    )


@pytest.mark.parametrize("tp", [False, True])
def test_launches_under_the_device_guard(triton_backend, monkeypatch, tp):
    """Every kernel launch (all in the forward; backward only scales) runs with the inputs'
    device current, single-rank and vocab-parallel paths alike (the exchange faked: one rank)."""
    op_module = sys.modules["nemokern.ops.linear_policy_loss"]
    entered, inside = [], []

    @contextlib.contextmanager
    def spy(device):
        entered.append(torch.device(device))
        inside.append(True)
        yield
        inside.pop()

    monkeypatch.setattr(op_module, "device_guard", spy)
    launched = []
    for module, name in (
        (P, "linear_policy_grads_triton"),
        (L, "linear_stats_triton"),
        (L, "linear_backward_triton"),
    ):
        real = getattr(module, name)
        monkeypatch.setattr(
            module,
            name,
            lambda *a, _real=real, _name=name, **k: (
                launched.append((_name, bool(inside))) or _real(*a, **k)
            ),
        )
    kwargs = {}
    if tp:
        monkeypatch.setattr(op_module, "gather_parts", lambda parts, *a, **k: parts)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
        monkeypatch.setattr(op_module, "all_reduce", lambda t, group=None: t)
        kwargs["tp_group"] = object()
    h, w = torch.randn(2, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    linear_policy_loss(h, w, torch.tensor([1, 3]), torch.ones(2), **kwargs).backward()
    assert entered == [torch.device("cpu")]
    expected = (
        ["linear_stats_triton", "linear_backward_triton"] if tp else ["linear_policy_grads_triton"]
    )
    assert launched == [(name, True) for name in expected]
