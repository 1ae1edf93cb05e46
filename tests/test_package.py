import pytest
import torch
import triton
import triton.language as tl

from nemokern.kernels._rounding import cast_to
from nemokern.ops._dispatch import backend_for


def test_extension_builds_and_imports():
    import nemokern

    assert nemokern.extension_available()  # `pip install` compiled csrc/ into nemokern._C


def test_dispatch_rule(monkeypatch):
    monkeypatch.delenv("NEMOKERN_BACKEND", raising=False)
    assert backend_for(torch.zeros(1)) == "torch"
    monkeypatch.setenv("NEMOKERN_BACKEND", "triton")
    assert backend_for(torch.zeros(1)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        backend_for(torch.zeros(1))
    monkeypatch.setenv("NEMOKERN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="NEMOKERN_BACKEND"):
        backend_for(torch.zeros(1))


def test_setup_py_never_imports_torch():
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).parents[1] / "setup.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert "pybind11" in names  # the walk sees imports at all
    assert "torch" not in names


def test_setup_py_reads_env_where_nemokern_is_not_installed(tmp_path):
    """pip builds in an isolated environment without nemokern: setup.py's _load_env must work
    there (a fresh clone's install once failed on env.py's import of nemokern.errors)."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    tree = ast.parse((root / "setup.py").read_text())
    (load,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_load_env"]
    code = (
        f"import sys\nfrom pathlib import Path\nROOT = Path({str(root)!r})\n{ast.unparse(load)}\n"
        "env = _load_env()\nprint(env.flag('NEMOKERN_NO_CUDA'), 'torch' in sys.modules)\n"
    )
    # -I -S: no site-packages (the editable install), no current directory on sys.path
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1] == "False"


def test_check_tensors_names_the_argument():
    from nemokern.ops._checks import tensors as check_tensors

    a = torch.zeros(2)
    with pytest.raises(TypeError, match="op: b must be a torch.Tensor"):
        check_tensors("op", {"a": a, "b": [1.0]})
    with pytest.raises(ValueError, match="op: b is on meta but a is on cpu"):
        check_tensors("op", {"a": a, "b": torch.zeros(2, device="meta")})
    with pytest.raises(TypeError, match="op: b has dtype torch.int64"):
        check_tensors(
            "op", {"a": a, "b": torch.zeros(2, dtype=torch.long)}, (torch.float32,), ("b",)
        )
    check_tensors("op", {"a": a, "b": torch.zeros(2, dtype=torch.long)}, (torch.float32,), ("a",))


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, cast_to(x, y_ptr.dtype.element_ty), mask=offs < n)


def test_bf16_rounding_helper_matches_torch_including_nan():
    """kernels/_rounding.cast_to must give torch's fp32 -> bf16 bits (nearest-even). NaN must stay
    NaN: a GPU's arithmetic NaN is 0x7FFFFFFF, which the rounding carry would turn into -0.0."""
    special = [
        0x7FFFFFFF,
        0xFFFFFFFF,
        0x7FC00000,
        0x7F800001,
        0xFFBFFFFF,
        0x7F800000,
        0xFF800000,
        0x7F7FFFFF,
        0x3F808000,
        0x3F818000,
        0x00000001,
        0x80008000,
        0,
    ]
    bits = torch.tensor(special, dtype=torch.int64).to(torch.int32)  # wraps to the same bits
    x = torch.cat(
        [
            bits.view(torch.float32),
            torch.randn(100, generator=torch.Generator().manual_seed(0)) * 1e3,
        ]
    )
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, x.numel(), BLOCK=128)
    want = x.to(torch.bfloat16)
    assert torch.equal(torch.isnan(y), torch.isnan(want)), (x[:13], y[:13], want[:13])
    ok = torch.isnan(want)
    assert torch.equal(y[~ok].view(torch.int16), want[~ok].view(torch.int16))


def test_device_guard_makes_the_tensors_gpu_current():
    # Triton launches on the current device; the ops make the inputs' device current first.
    import contextlib

    from nemokern.ops._dispatch import device_guard

    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)
    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter noise
def test_every_op_launches_under_the_device_guard(triton_backend, monkeypatch):
    import contextlib
    import importlib

    from nemokern.ops import linear_logprobs, logprobs, reward_head, sequence_kl

    # (nemokern.ops.logprobs the attribute is the function; the module comes from importlib)
    mods = [
        importlib.import_module(f"nemokern.ops.{m}")
        for m in ("logprobs", "linear_logprobs", "reward_head", "sequence_kl")
    ]

    entered = []

    @contextlib.contextmanager
    def spy(device):
        entered.append(torch.device(device))
        yield

    for mod in mods:
        monkeypatch.setattr(mod, "device_guard", spy)
    x, h, w = (torch.randn(*s, requires_grad=True) for s in ((2, 5), (2, 4), (5, 4)))
    t = torch.tensor([1, 3])
    calls = [
        lambda: logprobs(x, t),
        lambda: linear_logprobs(h, w, t),
        lambda: sequence_kl(x, x.detach(), torch.ones(2, 5)),
        lambda: reward_head(h[:, None], torch.tensor([0, 0]), w[0], w),
    ]
    for call in calls:
        entered.clear()
        call().sum().backward()
        assert entered == [torch.device("cpu")] * 2, entered  # forward and backward


@pytest.mark.gpu
def test_ops_on_a_gpu_that_is_not_current():
    """Inputs on cuda:1 while cuda:0 is current (e.g. the reference model on a second GPU): the
    kernels must run on cuda:1 and agree with the CPU path, forward and backward."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from nemokern.ops import linear_logprobs, logprobs, reward_head, sequence_kl

    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)
    logits, h = torch.randn(33, 1000, generator=g), torch.randn(33, 64, generator=g)
    w, t = torch.randn(1000, 64, generator=g) / 8, torch.randint(0, 1000, (33,), generator=g)
    lp, ref, mask = (
        torch.randn(3, 11, generator=g),
        torch.randn(3, 11, generator=g),
        torch.rand(3, 11, generator=g) < 0.7,
    )
    hid, last = torch.randn(3, 11, 64, generator=g), torch.tensor([10, 0, 5])
    nw, hw = torch.ones(64), torch.randn(9, 64, generator=g)
    ops = [
        lambda d, x: logprobs(x[0], t.to(d)),
        lambda d, x: linear_logprobs(x[0], x[1], t.to(d)),
        lambda d, x: sequence_kl(x[0], ref.to(d), mask.to(d)),
        lambda d, x: reward_head(x[0], last.to(d), x[1], hw.to(d)),
    ]
    for op, leaves in zip(ops, [(logits,), (h, w), (lp,), (hid, nw)]):
        results = []
        for d in ("cpu", "cuda:1"):
            xs = [x.to(d).requires_grad_(True) for x in leaves]
            out = op(d, xs)
            out.sum().backward()
            results.append([out.cpu()] + [x.grad.cpu() for x in xs])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_public_names_hold_under_their_stable_paths():
    """docs/architecture.md's public API: the names scripts outside the package import."""
    import nemokern.engine
    import nemokern.model
    import nemokern.ops
    import nemokern.parallel
    import nemokern.train
    import nemokern.trainers

    for name in ("logprobs", "linear_logprobs", "linear_policy_loss", "sequence_kl", "reward_head"):
        assert callable(getattr(nemokern.ops, name)), name
    for name in ("Llama", "LlamaConfig", "generate"):
        assert hasattr(nemokern.model, name), name
    assert callable(nemokern.parallel.all_reduce)
    for name in ("SFTTrainer", "SFTConfig", "RewardTrainer", "RewardConfig", "ReinforceTrainer"):
        assert getattr(nemokern.train, name) is getattr(nemokern.trainers, name), name
    assert nemokern.train.ReinforceConfig is nemokern.trainers.ReinforceConfig
    for name in nemokern.engine.__all__:  # the engine's names, re-exported as before the split
        assert getattr(nemokern.train, name) is getattr(nemokern.engine, name), name
    assert set(nemokern.train.__all__) == set(nemokern.engine.__all__) | set(
        nemokern.trainers.__all__
    )
