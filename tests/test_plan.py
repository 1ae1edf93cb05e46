"""`nemokern plan`: parameter counts per rank against hand-derived numbers, the memory terms, the
activation model against a fresh measurement, option errors, and (slow) predicted vs measured
peak memory of the trainers on 1, 2 and 4 gloo processes (tests/plan_check.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import leave_group
from nemokern.cli import main
from nemokern.kernels import _policy_chunks as chunks
from nemokern.kernels import linear_logprobs as klp
from nemokern.kernels import linear_policy_loss as klpl
from nemokern.model import LlamaConfig
from nemokern.model.generate import _MIN_BUCKET
from nemokern.plan import Run, make_plan, model_shape
from nemokern.plan import memory as M
from nemokern.plan.activations import activation_model, measure_saved
from nemokern.plan.sharding import rank_counts

ROOT = Path(__file__).parents[1]
# tiny: vocab 320, hidden 64, intermediate 160, 2 layers, 4 heads of 16, 2 KV heads
TINY = LlamaConfig.tiny()
# per layer: q 64x64, k and v 32x64, o 64x64, gate and up 160x64, down 64x160, two norms of 64
LAYER = 4096 + 2048 + 2048 + 4096 + 3 * 10240 + 2 * 64
WHOLE = 2 * 320 * 64 + 2 * LAYER + 64


def counts(**kw):
    return rank_counts(TINY, **{"gpus": 1, "tp": 1, "fsdp": False, **kw})


def test_counts_whole_model():
    c = counts()
    assert (c.stored, c.trained, c.whole, c.layer) == (WHOLE, WHOLE, WHOLE, LAYER)
    assert c.root == 2 * 320 * 64 + 64
    assert c.matrices == WHOLE - 320 * 64 - 2 * 2 * 64 - 64  # no embedding, no norms
    assert (c.vocab, c.kv_heads) == (320, 2)


def test_counts_tensor_parallel_and_replicated_kv_heads():
    # tp 2: half of every matrix, one KV head per rank
    layer2 = 2048 + 1024 + 1024 + 2048 + 3 * 5120 + 2 * 64
    c = counts(gpus=2, tp=2)
    assert (c.stored, c.layer, c.vocab, c.kv_heads) == (
        2 * 160 * 64 + 2 * layer2 + 64,
        layer2,
        160,
        1,
    )
    # tp 4 > 2 KV heads: each rank keeps one whole KV head (replicated on two ranks)
    layer4 = 1024 + 1024 + 1024 + 1024 + 3 * 2560 + 2 * 64
    c = counts(gpus=4, tp=4)
    assert (c.layer, c.kv_heads) == (layer4, 1)


def test_counts_fsdp_pads_rows_as_fsdp2_does():
    # dp 3: each parameter's first dimension in ceil(rows / 3) rows per rank
    layer = 22 * 64 + 11 * 64 + 11 * 64 + 22 * 64 + 54 * 64 + 54 * 64 + 22 * 160 + 2 * 22
    c = counts(gpus=3, fsdp=True)
    assert c.stored == 2 * 107 * 64 + 2 * layer + 22
    assert (c.whole, c.layer) == (WHOLE, LAYER)  # what FSDP gathers: unchanged
    assert counts(gpus=4, tp=2, fsdp=True).stored == counts(gpus=2, tp=2).stored // 2


def test_counts_reward_model_freezes_the_lm_head():
    c = counts(reward_head=9)
    assert c.stored == WHOLE + 9 * 64 + 9
    assert c.trained == c.stored - 320 * 64


def test_persistent_terms_by_hand():
    run = Run("sft", gpus=2, device="cpu")
    c = counts(gpus=2)
    p = M.persistent(run, c, [])
    assert p == {"parameters": 4 * WHOLE, "optimizer": 8 * WHOLE, "ddp_buckets": 4 * WHOLE}
    fsdp = counts(gpus=2, fsdp=True)
    p = M.persistent(Run("sft", gpus=2, fsdp=True), fsdp, [])
    assert p["ddp_buckets"] == 0 and p["optimizer"] == 8 * fsdp.stored
    run = Run("reinforce", gpus=1, frozen_dtype="bfloat16")
    assert M.persistent(run, counts(), [counts(), counts()])["reference"] == 2 * WHOLE


def test_ddp_buckets_by_hand():
    """DDP (gradient_as_bucket_view off, as engine/loop.py builds it) keeps one float32 bucket
    slot per trained parameter beside .grad: the reward model's frozen trunk LM head has none."""
    reward = M.persistent(Run("reward", gpus=2, device="cpu"), counts(gpus=2, reward_head=9), [])
    assert reward["ddp_buckets"] == 4 * (WHOLE - 320 * 64 + 9 * 64 + 9)
    assert M.persistent(Run("sft", gpus=2, tp=2), counts(gpus=2, tp=2), [])["ddp_buckets"] == 0


@pytest.mark.parametrize("trainer", ["sft", "reward"])
def test_ddp_buckets_are_what_ddp_allocates(tmp_path, trainer):
    """The plan's DDP term against the buckets a real DistributedDataParallel hands its
    communication hook in one backward (a one-process gloo group)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from nemokern.model import Llama, RewardModel

    torch.manual_seed(0)
    model = Llama(TINY)
    ids = torch.tensor([[1, 2, 3]])
    if trainer == "reward":
        model = RewardModel(model)
        model.trunk.lm_head.weight.requires_grad_(False)  # as RewardTrainer does
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        ddp = DistributedDataParallel(model)  # the arguments engine/loop.py passes on the CPU
        seen = []

        def hook(_, bucket):
            seen.append(bucket.buffer().numel() * bucket.buffer().element_size())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        ddp.register_comm_hook(None, hook)
        out = ddp(ids, torch.tensor([2])) if trainer == "reward" else ddp(ids)
        out.sum().backward()
    finally:
        leave_group()
    c = counts(gpus=2, reward_head=9 if trainer == "reward" else 0)
    assert sum(seen) == M.persistent(Run(trainer, gpus=2, device="cpu"), c, [])["ddp_buckets"]


def test_kv_cache_and_micro_batch_tokens_by_hand():
    run = Run("reinforce", gpus=2, k=4, prompts_per_step=8, max_prompt_tokens=20, max_new_tokens=7)
    # per process 4 prompts x 4 samples; prompt bucket 32 (a power of two >= 20) + 7 slots
    assert run.rollout_rows() == 16
    per_slot = 2 * 2 * 2 * 16 * 4 + 1  # layers x (k, v) x KV heads x head_dim x fp32, + valid
    assert M.kv_cache_bytes(TINY, run, counts(), 16, 4) == 16 * 39 * per_slot
    assert run.micro_batch_tokens() == 4 * (19 + 4 * 8)
    assert M.PROMPT_BUCKET_MIN == _MIN_BUCKET


def test_loss_block_sizes_are_the_kernels():
    assert M.LOSS_BLOCK == {"cuda": chunks.CHUNK_BYTES, "cpu": klpl._TORCH_CHUNK_ELEMENTS * 4}
    assert M.LOSS_STATS_BLOCK["cpu"] == klpl._TORCH_STATS_ELEMENTS * 4
    assert M.LOGPROBS_FWD_BLOCK["cpu"] == klp._TORCH_FWD_CHUNK_ELEMENTS * 4
    assert M.LOGPROBS_BWD_BLOCK == {
        "cuda": klp._BWD_CHUNK_BYTES,
        "cpu": klp._TORCH_CHUNK_ELEMENTS * 4,
    }


def test_loss_input_is_what_the_fused_loss_holds(monkeypatch):
    """The forward's loss_input term against the tensors a real SFT micro-batch hands the fused
    loss: the final hidden states [N, H] and the copy of the rows with a target (the prompts'
    rows have none)."""
    import torch

    from nemokern.kernels import linear_policy_loss as kernel
    from nemokern.model import Llama
    from nemokern.trainers import policy

    seen = []
    loss, fused = policy.policy_gradient_loss, kernel.forward
    monkeypatch.setattr(
        policy, "policy_gradient_loss", lambda h, *a, **kw: seen.append(h) or loss(h, *a, **kw)
    )
    monkeypatch.setattr(
        kernel, "forward", lambda b, h, *a, **kw: seen.append(h) or fused(b, h, *a, **kw)
    )
    torch.manual_seed(0)
    batch = policy.pack([[1, 2, 3, 4, 5], list(range(6, 15))], [torch.arange(20, 24)] * 2)
    counted = batch["targets"] != -100
    coef = torch.where(counted, -1.0 / int(counted.sum()), 0.0)
    policy.PolicyLoss(Llama(TINY))(batch["input_ids"], batch["cu_seqlens"], batch["targets"], coef)
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in seen}
    n = batch["input_ids"].numel()
    run = Run("sft", gpus=1, device="cpu", tokens_per_micro_batch=n,
              response_share=int(counted.sum()) / n)  # fmt: skip
    assert len(held) == 2
    assert M.phases(TINY, run, counts(), [])["forward"]["loss_input"] == sum(held.values())


def test_checkpoint_copy_is_what_the_checkpointer_clones(tmp_path):
    """On the CPU a checkpoint (at the end of every run) copies the AdamW state it writes while
    the parameters and the state stay: the plan's checkpoint phase against the most copied bytes
    alive at once in a real Checkpointer.save after an AdamW step (one process)."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from nemokern.engine.checkpoint import Checkpointer
    from nemokern.model import Llama

    torch.manual_seed(0)
    model = Llama(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    live, peak = {}, []

    class Clones(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default):
                live[id(out)] = out.untyped_storage().nbytes()  # host_copy: empty + copy_
                weakref.finalize(out, live.pop, id(out))
                peak.append(sum(live.values()))
            return out

    with Clones():
        Checkpointer(tmp_path).save(1, model=model, optimizer=optimizer)
    steps = 4 * len(optimizer.state)  # AdamW's step count, a float32 scalar per parameter
    run = Run("sft", gpus=1, device="cpu")
    assert max(peak) - steps == M.phases(TINY, run, counts(), [])["checkpoint"]["copy"]
    assert "checkpoint" not in M.phases(TINY, Run("sft", gpus=1), counts(), [])  # CUDA: host


def test_save_terms_by_hand():
    """What save_pretrained writes (the unsplit model) and its largest tensor, at every layout;
    under tp or FSDP the checkpoint clones a rank's slice and OUT/final gathers the model."""
    for kw in ({}, {"gpus": 2, "tp": 2}, {"gpus": 4, "tp": 4}, {"gpus": 4, "tp": 2, "fsdp": True}):
        c = counts(**kw)
        assert (c.saved, c.largest_saved) == (WHOLE, 320 * 64)
    cpu = dict(device="cpu")
    assert "export" not in M.phases(TINY, Run("sft", gpus=1, **cpu), counts(), [])
    tp = counts(gpus=2, tp=2)
    phases = M.phases(TINY, Run("sft", gpus=2, tp=2, **cpu), tp, [])
    assert phases["export"] == {"gathered_model": 4 * (WHOLE + 320 * 64)}
    assert phases["checkpoint"] == {"copy": 8 * tp.trained}
    fsdp = counts(gpus=2, fsdp=True)
    phases = M.phases(TINY, Run("sft", gpus=2, fsdp=True, **cpu), fsdp, [])
    assert phases["checkpoint"] == {"copy": 4 * (WHOLE + 320 * 64)}


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_model_predicts_an_unseen_shape(compute, checkpointing):
    """Fitted on its seven shapes, the model gives another shape's saved bytes to the byte."""
    model = activation_model(compute, checkpointing)
    assert model.fit_error < 1e-6
    shape = LlamaConfig.tiny(
        hidden_size=80,
        num_attention_heads=5,
        num_key_value_heads=1,
        head_dim=12,
        intermediate_size=112,
        num_hidden_layers=3,
        vocab_size=64,
    )
    tokens = 90
    predicted = tokens * (3 * model.per_layer(80, 60, 12, 112, 5) + model.outside_layers(80, 12))
    if compute == "bfloat16" and not checkpointing:  # the layers' matrices' bf16 copies
        predicted += 2 * 3 * (60 * 80 + 2 * 12 * 80 + 80 * 60 + 3 * 112 * 80)
    assert measure_saved(shape, tokens, compute, checkpointing) == pytest.approx(predicted)


def test_plan_verdict_limits_and_suggestion():
    shape = model_shape("llama-3.1-8b")
    run = Run("sft", gpus=8, tokens_per_micro_batch=4096)
    plan = make_plan(shape, run, memory_bytes=80 * 10**9)
    assert not plan["fits"]  # 8B params x 16 bytes on one GPU, DDP buckets on top
    assert plan["suggestion"] == {
        "tp": 1,
        "fsdp": True,
        "activation_checkpointing": False,
        "peak_bytes": pytest.approx(0, abs=8e10),
    }
    fsdp = make_plan(shape, Run("sft", gpus=8, fsdp=True), memory_bytes=80 * 10**9)
    assert fsdp["fits"] and "suggestion" not in fsdp
    largest = fsdp["largest_micro_batch_tokens"]
    counts_, frozen = M.model_counts(shape, Run("sft", gpus=8, fsdp=True))
    at = lambda n: M.memory(shape, Run("sft", gpus=8, fsdp=True), counts_, frozen, n).peak  # noqa: E731
    assert at(largest) <= 80 * 10**9 < at(largest + 1)
    assert fsdp["step_time"]["bound_s"] > 0


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(["plan", *map(str, args)])
    return e.value.code, capsys.readouterr().err


def test_cli_json(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_dict()))
    assert (
        main(
            [
                "plan",
                "--trainer",
                "reinforce",
                "--model",
                str(tmp_path / "config.json"),
                "--gpus",
                "2",
                "--tp",
                "2",
                "--reward-model",
                str(tmp_path),
                "--json",
            ]
        )
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert plan["tp"] == 2 and plan["persistent_bytes"]["reference"] > 0
    assert set(plan["phase_bytes"]) == {"forward", "backward", "optimizer", "generate", "score"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tp", "3", "--gpus", "3"], "vocab_size=320 is not divisible by the tensor-parallel"),
        (["--tp", "2", "--gpus", "3"], "--tp 2 must divide --gpus 3"),
        (["--gpus", "0"], "--gpus 0"),
        (["--gpu-memory", "eighty"], "--gpu-memory 'eighty'"),
        (["--k", "4"], "--k applies to --trainer reinforce only"),
        (["--model", "llama-9b"], "--model llama-9b"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_dict()))
    base = {"--trainer": "sft", "--model": tmp_path / "config.json", "--gpus": "1"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    code, err = _cli(capsys, *[x for kv in base.items() for x in kv])
    assert code == 2 and message in err and err.count("\n") == 1


def test_cli_refuses_a_tp_that_does_not_divide_the_heads(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LlamaConfig.tiny(vocab_size=384).to_dict()))
    code, err = _cli(capsys, "--trainer", "sft", "--model", path, "--gpus", 3, "--tp", 3)
    assert code == 2 and err.count("\n") == 1
    assert "num_attention_heads=4 is not divisible by the tensor-parallel size 3" in err


@pytest.mark.parametrize(
    "content, message",
    [
        ({"model_type": "gpt2", "vocab_size": 10}, "model_type='gpt2'"),
        ("not json", "not a JSON config file"),
        ({"vocab_size": 10}, "required field(s)"),
    ],
)
def test_cli_refuses_a_file_that_is_no_llama_config(tmp_path, capsys, content, message):
    path = tmp_path / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    code, err = _cli(capsys, "--trainer", "sft", "--model", path, "--gpus", 1)
    assert code == 2 and message in err and err.count("\n") == 1


def _plan_check(*args):
    subprocess.run(
        [sys.executable, str(ROOT / "tests" / "plan_check.py"), *map(str, args)], check=True
    )


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 15 three-step trainings on 1 to 4 processes
def test_predicted_peak_within_ten_percent_of_measured(tmp_path):
    """Each trainer on 1, 2 and 4 gloo processes (DDP, tp, FSDP, tp + FSDP): plan_check.py
    measures the peak anonymous memory per process and compares it with the plan."""
    out = tmp_path / "results.json"
    _plan_check("--json", out)
    errors = {r["case"]: r["error"] for r in json.loads(out.read_text())}
    assert all(abs(e) <= 0.10 for e in errors.values()), errors


def test_step_time_bound_by_hand():
    from nemokern.plan.steptime import HARDWARE, step_time

    run = Run("sft", gpus=1, device="cpu", tokens_per_micro_batch=64, max_length=64)
    t = step_time(TINY, run, counts(), [], HARDWARE["h100"])
    matrices = 2 * (4096 + 2 * 2048 + 4096 + 3 * 10240)  # the layers'; the LM head apart
    attention = 4 * 2 * 4 * 16 * (64 * 65 // 2)  # layers x heads x head_dim x causal pairs
    flops = 3 * (2 * matrices * 64 + attention) + 6 * 64 * 64 * 320  # + the fused loss
    assert t["phases"]["update"]["flops"] == flops
    assert t["bound_s"] == pytest.approx(flops / 67e12)  # float32, one GPU: no collectives
    two = step_time(TINY, Run("sft", gpus=2, device="cpu"), counts(gpus=2), [], HARDWARE["h100"])
    # DDP: an all-reduce of the float32 gradients, 2 (n - 1) / n of them, over NVLink
    assert two["phases"]["update"]["comm_bytes"] == pytest.approx(WHOLE * 4)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_largest_micro_batch_within_one_step_of_a_search(tmp_path):
    """SFT on one process at 4, 6, ..., 12 rows per micro-batch: the largest whose measured peak
    stays within 150 MiB, against the plan's largest (within one step of the grid)."""
    out = tmp_path / "search.json"
    _plan_check("--search", "sft:1:-", "--limit-mib", 150, "--grid", "4,6,8,10,12", "--json", out)
    (found,) = json.loads(out.read_text())
    assert 0 < found["largest_found"] < 12
    assert abs(found["largest_predicted"] - found["largest_found"]) <= 2
