"""Helpers the test files share: float64 references and the accuracy rule of the log-prob ops,
tiny random HF Llama models, a published Llama-3.1 config, and peak-memory measurement.

Test files import from here (`from helpers import ...`); no test file imports another.
"""

import copy
import ctypes
import ctypes.util
import gc
import json
import os
from pathlib import Path

import pytest
import torch

from nemokern.model import Llama, LlamaConfig
from nemokern.ops import linear_policy_loss

IGNORE = -100
# The Triton interpreter evaluates both sides of tl.where with numpy (0 * inf in the branch that is
# thrown away): its warnings are noise; NaNs that reach an output still fail the tests.
INTERPRETER_NOISE = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def reference(logits, targets, temperature=1.0, ignore_index=IGNORE):
    """(logp, entropy) computed in logits' own dtype with plain PyTorch autograd-able ops.

    With float64 logits this is the reference; with the input dtype it is the "plain" baseline."""
    lsm = torch.log_softmax(logits / temperature, dim=-1)
    valid = targets != ignore_index
    idx = torch.where(valid, targets, 0).unsqueeze(-1)
    zero = torch.zeros((), dtype=lsm.dtype)
    logp = torch.where(valid, lsm.gather(-1, idx).squeeze(-1), zero)
    p = lsm.exp()
    # p * log p is 0 * -inf at masked logits; keep both the value and its gradient at 0.
    ent = -(p * torch.where(p > 0, lsm, zero)).sum(-1)
    return logp, torch.where(valid, ent, zero)


def relative_floor(scale):
    """The rule's floor as a few fp32 ulps of the result's largest magnitude `scale`, with no
    absolute part (sequence_kl, reward_head)."""
    return 4e-7 * scale + 1e-12


def assert_2x(err, err_plain, floor, what):
    """The accuracy rule (flash-attention's): our error against float64 is at most 2x the error of
    the same computation in plain PyTorch in the input dtype, plus `floor`."""
    assert err <= 2 * err_plain + floor, (
        f"{what}: error {err:.3g} vs float64 exceeds 2 x plain-PyTorch error {err_plain:.3g} "
        f"(+ floor {floor:.2g})"
    )


def error_vs(ours, plain, ref, what, ulp_floor=2.0**-21, floor=None):
    """Assert the 2x rule for one output; return (our error, plain error). The floor: `floor`
    where given, else ulp_floor times the larger of 1 and the result's largest magnitude."""
    err = (ours.double() - ref).abs().max().item() if ref.numel() else 0.0
    err_plain = (plain.double() - ref).abs().max().item() if ref.numel() else 0.0
    if floor is None:
        floor = ulp_floor * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert_2x(err, err_plain, floor, what)
    return err, err_plain


def errors_vs(ours, plain, ref, names, label):
    """error_vs for each named output of the three runs; prints their errors on one line."""
    errs = [error_vs(o, p, r, f"{label} {n}") for o, p, r, n in zip(ours, plain, ref, names)]
    print(
        f"\n{label}: "
        + ", ".join(f"{n} err {e:.2e} (plain {p:.2e})" for n, (e, p) in zip(names, errs))
    )
    return errs


def fwd_bwd(fn, tensors, upstream):
    """fn(*leaves) -> a tuple of outputs, on fresh leaf copies of `tensors`, then the backward of
    sum_i (upstream[i] * output_i).sum() over the upstream gradients that are not None (an
    output whose upstream is None gets no gradient at all). Returns the detached outputs, then
    each leaf's gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    outs = fn(*leaves)
    sum((u * o).sum() for u, o in zip(upstream, outs) if u is not None).backward()
    return (*(o.detach() for o in outs), *(x.grad for x in leaves))


def vs_float64(op, plain, tensors, upstream):
    """(ours, plain, ref): fwd_bwd of the op and of the plain formula on `tensors`, and of the
    plain formula on their float64 copies (the reference; tensor upstream gradients too)."""

    def double(x):
        return x.double() if isinstance(x, torch.Tensor) else x

    return (
        fwd_bwd(op, tensors, upstream),
        fwd_bwd(plain, tensors, upstream),
        fwd_bwd(plain, [double(t) for t in tensors], [double(u) for u in upstream]),
    )


def assert_shard_matches(part, full, rank, shard, names, dtype):
    """A vocab-parallel rank's run against the unsharded one, both (output, output, dhidden,
    dweight, ...): the first three (`names`) whole, dweight in this rank's `shard` rows, within
    the tolerance of the shards' other summation order for inputs of `dtype`."""
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, a, b in zip(names, part[:3], full[:3]):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"rank {rank} {name}: {m}")
    torch.testing.assert_close(
        part[3],
        full[3][rank * shard : (rank + 1) * shard],
        **tol,
        msg=lambda m: f"rank {rank} dweight shard: {m}",
    )


def awkward_linear_inputs(shape, hidden_size, vocab, dtype, scale, ignore_frac=0.25, seed=0):
    """Inputs of the LM-head ops: hidden [*shape, H] (times `scale`), weight [V, H], targets
    `shape` with about ignore_frac of them IGNORE; also that mask and the generator, for the
    caller's further draws."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*shape, hidden_size, generator=g) * scale).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=g)
    ignored = torch.rand(shape, generator=g) < ignore_frac
    targets[ignored] = IGNORE
    return hidden, weight, targets, ignored, g


# ----------------------------------------------------------------------------- test progress log


def log_test_report(report):
    """With NEMOKERN_TEST_LOG=FILE, append one JSON line per test as it ends (stage: the
    variable NEMOKERN_TEST_STAGE; test; outcome passed / failed / skipped / error; seconds):
    bench/gpu_check.sh's stages keep their tests' names and outcomes when killed by their time
    limit. Both conftest.py files call this from pytest_runtest_logreport."""
    path = os.environ.get("NEMOKERN_TEST_LOG")
    if not path:
        return
    if report.when == "call":
        outcome = report.outcome
    elif report.failed:  # a setup or teardown error
        outcome = "error"
    elif report.when == "setup" and report.skipped:
        outcome = "skipped"
    else:
        return
    record = {
        "stage": os.environ.get("NEMOKERN_TEST_STAGE", ""),
        "test": report.nodeid,
        "outcome": outcome,
        "seconds": round(report.duration, 3),
    }
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- fake CUDA


def _is_cuda_device(d):
    return isinstance(d, (str, torch.device)) and torch.device(d).type == "cuda"


def _from_a_test():
    """Whether the torch call being intercepted was made by test code (tests/), not by nemokern
    or torch: only the tests' own device placement is checked."""
    import sys

    frame = sys._getframe(2)
    torch_dir = os.path.dirname(torch.__file__)
    while frame is not None and frame.f_code.co_filename.startswith(torch_dir):
        frame = frame.f_back
    here = os.path.dirname(os.path.abspath(__file__))
    return frame is not None and os.path.dirname(frame.f_code.co_filename) == here


class FakeCuda(torch.overrides.TorchFunctionMode):
    """Run a GPU test's own code on the CPU: tensors created on "cuda" (device=..., .cuda(),
    .to("cuda")) are CPU tensors marked as CUDA ones (their .device says cuda), results of marked
    tensors are marked, and an op that mixes marked tensors with unmarked CPU tensors of one or
    more dimensions raises as CUDA would, where the test's own code makes the call (inside
    nemokern, results are only marked). It finds the test bugs (a tensor built on the CPU, a
    changed torch signature) that cost GPU time; the ops themselves run their torch reference
    (is_cuda stays False), so it says nothing about the kernels."""

    MIXING_ALLOWED = {torch.Tensor.copy_, torch.Tensor.__setitem__, torch.Tensor.__getitem__}

    def __init__(self):
        super().__init__()
        self._marked = {}  # id -> weakref (a WeakSet compares tensors with ==)

    def mark(self, t):
        import weakref

        self._marked[id(t)] = weakref.ref(t)

    def is_marked(self, t):
        ref = self._marked.get(id(t))
        return ref is not None and ref() is t

    def _tensors(self, obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                yield from self._tensors(x)
        elif isinstance(obj, dict):
            for x in obj.values():
                yield from self._tensors(x)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func == torch.Tensor.grad.__get__:  # formed by autograd, outside any torch function
            out = func(*args)
            if out is not None and self.is_marked(args[0]):
                self.mark(out)
            return out
        if func == torch.Tensor.device.__get__:  # (a new method-wrapper each time: ==)
            return torch.device("cuda", 0) if self.is_marked(args[0]) else func(*args)
        to_cuda = func is torch.Tensor.cuda or _is_cuda_device(kwargs.get("device"))
        to_cpu = func is torch.Tensor.cpu
        if func is torch.Tensor.to:
            target = kwargs.get("device", next((a for a in args[1:] if _is_cuda_device(a)), None))
            if target is None and any(isinstance(a, (str, torch.device)) for a in args[1:]):
                to_cpu = True
            to_cuda = _is_cuda_device(target)
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
            kwargs["copy"] = to_cuda or to_cpu or kwargs.get("copy", False)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            out = args[0].clone()
        elif to_cpu and func is torch.Tensor.cpu:
            out = args[0].clone()
        else:
            inputs = list(self._tensors((args, kwargs)))
            on = [self.is_marked(t) for t in inputs]
            if func not in self.MIXING_ALLOWED and any(on) and not all(on) and _from_a_test():
                cpu = [t for t, m in zip(inputs, on) if not m and t.dim() > 0]
                if cpu:
                    raise RuntimeError(
                        f"fake CUDA: {getattr(func, '__name__', func)} mixes tensors on cuda:0 "
                        f"and a CPU tensor of shape {tuple(cpu[0].shape)} (built on the CPU?)"
                    )
            to_cuda = to_cuda or (any(on) and not to_cpu)
            out = func(*args, **kwargs)
        if to_cuda:
            for t in self._tensors(out):
                self.mark(t)
        return out


class _NoDevice:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def fake_cuda_patches(monkeypatch):
    """What the GPU tests (and the ops under them) call on torch.cuda and torch.Generator,
    answered on a machine without CUDA."""
    real_generator = torch.Generator

    def generator(device="cpu"):
        return real_generator("cpu" if _is_cuda_device(device) else device)

    monkeypatch.setattr(torch, "Generator", generator)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", _NoDevice)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "fake CUDA")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


# ----------------------------------------------------------------------------- linear_policy_loss
# Its float64 check, shared by the tests of both of its CUDA paths.


def policy_reference(hidden, weight, targets, coef, temperature=1.0):
    """(sum_t coef_t logp_t, mean entropy over counted positions) in the inputs' own dtype."""
    lsm = torch.log_softmax((hidden @ weight.t()) / temperature, dim=-1)
    valid = targets != IGNORE
    logp = lsm.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    loss = (torch.where(valid, coef.to(lsm.dtype), 0) * torch.where(valid, logp, 0)).sum()
    p = lsm.exp()
    entropy = -(p * torch.where(p > 0, lsm, torch.zeros((), dtype=lsm.dtype))).sum(-1)
    mean_entropy = torch.where(valid, entropy, 0).sum() / valid.sum().clamp(min=1)
    return loss, mean_entropy


def policy_inputs(shape, hidden_size, vocab, dtype, scale, ignore_frac=0.25, seed=0):
    hidden, weight, targets, ignored, g = awkward_linear_inputs(
        shape, hidden_size, vocab, dtype, scale, ignore_frac, seed
    )
    coef = torch.randn(shape, generator=g) / max(1, targets.numel())
    coef[ignored] = float("nan")  # never read
    return hidden, weight, targets, coef


def policy_run(hidden, weight, fn, grad_scale=1.0):
    """fn(h, w) -> (loss, entropy): both, and the gradients of grad_scale * loss."""
    return fwd_bwd(fn, (hidden, weight), (grad_scale, None))


def policy_vs_float64(hidden, weight, targets, coef, temperature, label="", grad_scale=1.0):
    def ours(h, w):
        return linear_policy_loss(h, w, targets, coef, temperature=temperature, return_entropy=True)

    # policy_reference takes coef in the logits' dtype: float64 for the reference
    def plain(h, w):
        return policy_reference(h, w, targets, coef, temperature)

    ours, plain, ref = vs_float64(ours, plain, (hidden, weight), (grad_scale, None))
    assert ours[0].dtype == torch.float32 and ours[0].shape == ()
    assert ours[2].dtype == hidden.dtype and ours[3].dtype == weight.dtype
    errors_vs(ours, plain, ref, ("loss", "entropy", "dhidden", "dweight"), label)
    return ours


def policy_small_tiles(monkeypatch):
    """Tiles small enough that the interpreter walks several token/vocabulary/H tiles, vocabulary
    splits and token chunks (the chunk budget rounds up to one 16-token tile)."""
    import nemokern.kernels._policy_chunks as chunks
    import nemokern.kernels.linear_logprobs as L
    import nemokern.kernels.linear_policy_loss as P

    for dt in (torch.float32, torch.bfloat16):
        monkeypatch.setitem(L.TILE_CONFIGS, dt, (16, 32, 16, 4, 1))
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 1)
    monkeypatch.setattr(P, "_DLOGITS_CONFIG", (8, 32, 4))
    monkeypatch.setattr(L, "_BWD_CHUNK_BYTES", 1)


# ----------------------------------------------------------------------------- models

# A Llama-3.1-8B config.json as Meta/HF published it (transformers 4.x spelling).
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

# The parity matrix: GQA + llama3 rope (untied), tied embeddings, head_dim != hidden/heads,
# plain rope with multi-head attention. Small enough for 2 CPU cores.
CASES = {
    "gqa_llama3_untied": dict(
        num_attention_heads=4, num_key_value_heads=2, rope_scaling=LLAMA3_ROPE
    ),
    "gqa_llama3_tied": dict(
        num_attention_heads=4,
        num_key_value_heads=1,
        rope_scaling=LLAMA3_ROPE,
        tie_word_embeddings=True,
    ),
    "head_dim_32": dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_scaling=LLAMA3_ROPE
    ),
    "mha_default_rope": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0),
}


def hf_config(**overrides):
    from transformers import LlamaConfig as HFConfig

    kw = dict(
        vocab_size=301,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        attn_implementation="eager",
    )
    kw.update(copy.deepcopy(overrides))  # transformers adds rope_theta to the rope dict in place
    return HFConfig(**kw)


def random_hf_model(seed=0, dtype=torch.float32, **overrides):
    """A random HF Llama; norm weights randomised too so that a missed norm cannot hide."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    # Randomise in fp32, then convert: one seed gives the same (rounded) weights in every dtype.
    return model.to(dtype)


def nemokern_from_hf(hf, dtype=None) -> Llama:
    """A nemokern Llama holding the same weights (in memory, no files involved)."""
    model = Llama(LlamaConfig.from_dict(hf.config.to_dict()))
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.to(dtype or hf.dtype).eval()


# ----------------------------------------------------------------------------- memory


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_freed_heap():
    """Return freed heap memory to the OS (glibc malloc_trim). glibc raises its mmap threshold
    after a large free, so later large blocks come from the heap and stay resident once freed:
    without this, a call measured after a bigger one in the same process would reuse that
    memory and show next to no extra."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def peak_extra_bytes(fn, device="cpu"):
    """Run fn() once; return (result, peak bytes allocated above the level before the call)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base
    _release_freed_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    out = fn()
    return out, max(0, _status_kib("VmHWM") - base) * 1024


# ----------------------------------------------------------------------------- processes


def leave_group():
    """How every multi-process test's process leaves its process group once its work is done: a
    barrier (no process still has a collective in flight, and gloo's worker thread has let go of
    the last one's tensors: without it a process sometimes aborted, 'terminate called without an
    active exception'), then destroy_process_group. A process that fails skips it and exits."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _spawned(rank, worker, world, init_file, *args):
    worker(rank, world, init_file, *args)
    leave_group()


def run_ranks(worker, world, *args):
    """Run worker(rank, world, init_file, *args) in `world` spawned processes (any failure raises
    here); the worker joins gloo with `join_gloo` and returns without leaving the group (each
    process leaves through `leave_group` after it)."""
    import os
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "store")
        mp.spawn(_spawned, args=(worker, world, init_file, *args), nprocs=world, join=True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for MASTER_PORT)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script_ranks(script, world, *args, env=None, timeout=180):
    """Run `script *args` as `world` ranks the way torchrun does (env:// rendezvous on a free local
    port, one thread each, the repository and tests/ on PYTHONPATH) over the environment `env`
    (default os.environ); [(returncode, output)] by rank. A rank still running at `timeout` is
    killed (and the wait raises)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    port, tests = free_port(), Path(__file__).parent
    procs = []
    for rank in range(world):
        rank_env = dict(
            os.environ if env is None else env,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), *map(str, args)],
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    results = []
    try:
        for p in procs:
            out = p.communicate(timeout=timeout)[0]
            results.append((p.returncode, out))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def launch_script(script, world, *args, timeout=180):
    """run_script_ranks, raising with every rank's output if one fails."""
    results = run_script_ranks(script, world, *args, timeout=timeout)
    assert all(rc == 0 for rc, _ in results), [out for _, out in results]


def train_tiny_ranks(out, mode, resume="", grad_accum=1, world=2, n_batches=None):
    """tests/zero_worker.py on `world` processes (mode ddp, zero or fsdp): (rank 0's whole
    weights, [each rank's losses and AdamW state count])."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    worker = Path(__file__).with_name("zero_worker.py")
    extra = [] if n_batches is None else [str(n_batches)]
    launch_script(worker, world, out, mode, resume, str(grad_accum), *extra)
    ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]
    return load_file(Path(out) / "weights.safetensors"), ranks


def join_gloo(rank, world, init_file):
    """This process as rank `rank` of a gloo group of `world` (file rendezvous)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


@pytest.fixture
def single_thread():
    """One intra-op thread for a test of tiny models: on a shared 2-core machine more only
    contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- REINFORCE on a tiny policy (test_train_reinforce*.py) ------------------------------------
def tiny_policy(seed=0):
    """A tiny random Llama-3.1 over the byte tokenizer's vocabulary, seeded."""
    from nemokern.data.tokenizer import ByteTokenizer
    from nemokern.model import Llama, LlamaConfig

    tok = ByteTokenizer()
    torch.manual_seed(seed)
    return Llama(
        LlamaConfig.tiny(
            vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=list(tok.eos_ids)
        )
    )


def count_a(prompts, completions, **kw):
    """Share of the letter 'a' in each completion (a reward function)."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [t.count("a") / max(len(t), 1) for t in texts]


def reinforce_config(tmp_path, prompts, **kw):
    """A ReinforceConfig of a few short CPU steps into tmp_path/run; kw overrides."""
    from nemokern.trainers.reinforce import ReinforceConfig

    base = {
        "prompts": str(prompts),
        "out": str(tmp_path / "run"),
        "max_new_tokens": 6,
        "prompts_per_step": 2,
        "k": 3,
        "lr": 1e-3,
        "progress": False,
        "tensorboard": False,
        "device": "cpu",
    }
    base.update(kw)
    return ReinforceConfig(**base)


# ----------------------------------------------------------------------------- the package's source
# What the static checks of the package (test_layering, test_private_imports) walk.
PACKAGE = Path(__file__).resolve().parents[1] / "nemokern"


def package_modules():
    """(dotted module name, path, is_package) for every .py file of nemokern, sorted."""
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        is_package = rel.name == "__init__"
        yield ".".join(rel.parts[:-1] if is_package else rel.parts), path, is_package


def is_module(dotted: str) -> bool:
    """Whether `dotted` (nemokern.x.y) names a module of the package: a .py file, a package, or a
    compiled extension such as nemokern._C."""
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return (
        path.with_suffix(".py").is_file()
        or (path / "__init__.py").is_file()
        or any(path.parent.glob(path.name + ".*.so"))
    )


def import_from_base(module: str, node, is_package: bool = False) -> str:
    """The absolute module an `ast.ImportFrom` in `module` imports from (relative levels
    resolved against `module`'s package)."""
    base = node.module or ""
    if not node.level:
        return base
    anchor = (module if is_package else module.rpartition(".")[0]).split(".")
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join(anchor + ([base] if base else []))
