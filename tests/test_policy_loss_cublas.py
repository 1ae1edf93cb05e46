"""nemokern/kernels/policy_loss_cublas.py: linear_policy_loss's cuBLAS-chunk path. Its Triton
kernel interpreted on float64 logits against float64 autograd; the whole path (torch.mm on CPU
tensors, the kernel interpreted) through the op, fwd+bwd, against float64; the path table that
picks it. The kernel's sm_80/sm_90 compile is tests/test_aot.py's (AOT_SPECS)."""

import json

import pytest
import torch

import nemokern.kernels._policy_chunks as chunks
import nemokern.kernels.linear_policy_loss as P
import nemokern.kernels.policy_loss_cublas as C
from helpers import INTERPRETER_NOISE
from helpers import policy_inputs as make_inputs
from helpers import policy_vs_float64 as check_against_float64
from nemokern.kernels.logprobs import combine_stats

pytestmark = INTERPRETER_NOISE


@pytest.mark.parametrize(
    "rows,vocab,block_v,temperature,scale",
    [(1, 1, 32, 1.0, 1.0), (7, 101, 32, 0.7, 3.0), (5, 64, 16, 1.3, 1.0), (3, 37, 64, 1.0, 1e4)],
)
def test_kernel_in_float64_matches_autograd(monkeypatch, rows, vocab, block_v, temperature, scale):
    """Statistics -> logp and entropy, and d(sum coef * logp)/d(logits) written over the block,
    against float64 autograd; several vocabulary blocks per row, the last partial."""
    monkeypatch.setattr(C, "_CONFIG", (block_v, 4))
    g = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, vocab, (rows,), generator=g)
    coef = torch.randn(rows, generator=g)
    z = logits.clone()
    parts = C.chunk_policy(z, targets, coef, 1.0 / temperature)
    logp, _, entropy = combine_stats(parts, torch.ones(rows, dtype=torch.bool))

    x = logits.clone().requires_grad_(True)
    lsm = torch.log_softmax(x / temperature, -1)
    want_logp = lsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    want_entropy = -(lsm.exp() * lsm).sum(-1)
    (coef.double() * want_logp).sum().backward()
    # the kernel's arithmetic is fp32: a few fp32 ulps of the largest magnitude involved
    tol = dict(rtol=1e-5, atol=1e-5 * max(1.0, scale / temperature))
    torch.testing.assert_close(logp.double(), want_logp.detach(), **tol)
    torch.testing.assert_close(entropy.double(), want_entropy.detach(), **tol)
    torch.testing.assert_close(z, x.grad, rtol=1e-5, atol=1e-6)


def _use_cublas_path(monkeypatch, chunk_rows):
    entry = {"path": "cublas", "chunk_rows": chunk_rows}
    table = {"cpu": {"float32": entry, "bfloat16": entry}}
    monkeypatch.setattr(C, "_table", lambda: table)
    launches = []
    real = C.chunk_policy
    monkeypatch.setattr(C, "chunk_policy", lambda z, *a: launches.append(z.shape) or real(z, *a))
    return launches


@pytest.mark.parametrize(
    "shape,hidden_size,vocab,dtype,temperature,scale,chunk_rows",
    [
        ((1,), 16, 1, torch.float32, 1.0, 1.0, None),
        ((37,), 40, 301, torch.float32, 0.7, 2.0, 8),
        ((2, 19), 64, 301, torch.bfloat16, 1.3, 2.0, 5),
        ((5,), 33, 131, torch.float32, 1.0, 1e4, 2),
    ],
)
def test_cublas_path_through_the_op_matches_float64(
    triton_backend, monkeypatch, shape, hidden_size, vocab, dtype, temperature, scale, chunk_rows
):
    """The op's forward + backward by this path (chosen by the table), token chunks of
    chunk_rows (the last partial), against float64: loss, entropy, dhidden, dweight."""
    monkeypatch.setattr(C, "_CONFIG", (32, 4))
    launches = _use_cublas_path(monkeypatch, chunk_rows)
    inputs = make_inputs(shape, hidden_size, vocab, dtype, scale)
    check_against_float64(*inputs, temperature, label=f"cublas {shape} V={vocab} {dtype}")
    kept = int((inputs[2] != -100).sum())
    step = chunk_rows or C.default_chunk_rows(vocab, inputs[0].element_size())
    assert [s[0] for s in launches] == [min(step, kept - i) for i in range(0, kept, step)]


def test_without_a_table_the_all_triton_path_runs(triton_backend, monkeypatch, tmp_path):
    monkeypatch.setattr(C, "TABLE", tmp_path / "absent.json")
    C._table.cache_clear()
    try:
        hidden, weight, targets, coef = make_inputs((6,), 16, 37, torch.float32, 1.0)
        assert C.read_table(C.TABLE) == {} and C.choose(hidden) is None
        calls = []
        real = P.linear_policy_grads_triton
        monkeypatch.setattr(
            P, "linear_policy_grads_triton", lambda *a, **k: calls.append(1) or real(*a, **k)
        )
        monkeypatch.setattr(chunks, "CHUNK_BYTES", 1)
        check_against_float64(hidden, weight, targets, coef, 1.0, label="no table")
        assert calls == [1]
    finally:
        C._table.cache_clear()


def test_table_entries(tmp_path):
    path = tmp_path / "t.json"
    table = {
        "cpu": {"float32": {"path": "cublas", "chunk_rows": 64}, "bfloat16": {"path": "triton"}}
    }
    path.write_text(json.dumps({"measured": {"device": "cpu"}, "paths": table}))
    assert C.read_table(path) == table
    for bad in ({"path": "cuda"}, {"path": "cublas", "chunk_rows": 0}, "cublas"):
        path.write_text(json.dumps({"paths": {"NVIDIA H200": {"bfloat16": bad}}}))
        with pytest.raises(ValueError, match=r"t\.json: paths\['NVIDIA H200'\]\['bfloat16'\]"):
            C.read_table(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"t\.json: not a path table"):
        C.read_table(path)


def test_written_table_picks_the_fastest_and_reads_back(tmp_path, monkeypatch):
    """The GPU tuner's timings -> the table the dispatch reads: the fastest path per device
    and dtype, the cuBLAS path with its chunk rows."""
    timings = [
        {"device": "cpu", "dtype": "float32", "path": "triton", "chunk_rows": None, "seconds": 2.0},
        {"device": "cpu", "dtype": "float32", "path": "cublas", "chunk_rows": 4, "seconds": 1.0},
        {"device": "cpu", "dtype": "float32", "path": "cublas", "chunk_rows": 8, "seconds": 1.5},
        {"device": "cpu", "dtype": "bfloat16", "path": "triton", "chunk_rows": None, "seconds": 1},
        {"device": "cpu", "dtype": "bfloat16", "path": "cublas", "chunk_rows": 4, "seconds": 3.0},
    ]
    path = tmp_path / "paths.json"
    C.write_table(path, timings, {"device": "cpu (test)"})
    want = {"cpu": {"float32": {"path": "cublas", "chunk_rows": 4}, "bfloat16": {"path": "triton"}}}
    assert C.read_table(path) == want
    monkeypatch.setattr(C, "TABLE", path)
    C._table.cache_clear()
    try:
        hidden = torch.zeros(3, 4)
        assert C.choose(hidden).keywords == {"chunk_rows": 4}
        assert C.choose(hidden.bfloat16()) is None
    finally:
        C._table.cache_clear()


@pytest.mark.gpu
@pytest.mark.gpu_small(shape=(33, 16, 101))
@pytest.mark.parametrize(
    "dtype,shape",
    [
        (torch.bfloat16, (2048, 4096, 128256)),
        (torch.float16, (2048, 4096, 128256)),
        (torch.float32, (513, 1024, 50257)),
    ],
)
def test_cublas_path_on_cuda_real_shapes(monkeypatch, dtype, shape):
    """The path on a GPU, forced through the table for this device, at an 8B-like head."""
    n, hidden_size, vocab = shape
    entry = {"path": "cublas", "chunk_rows": 512}
    table = {C.device_key("cuda"): {str(dtype).split(".")[-1]: entry}}
    monkeypatch.setattr(C, "_table", lambda: table)
    hidden, weight, targets, coef = (
        t.cuda() for t in make_inputs((n,), hidden_size, vocab, dtype, 1.0)
    )
    assert C.choose(hidden) is not None
    check_against_float64(hidden, weight, targets, coef, 0.7, label=f"cuda cublas {dtype}")
