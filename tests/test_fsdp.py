"""--fsdp (torch FSDP2 over the data-parallel processes) on 2 gloo processes: the weights and losses
of DDP with a whole AdamW; each process holding about half the AdamW state; checkpoints with whole
weights (HF layout) and one optimizer file per process that resume exactly; a whole (DDP)
checkpoint resumed under --fsdp; an FSDP checkpoint refused without the flag; gradient
accumulation; --shard-optimizer refused with it; both trainers end to end against DDP; the
non-finite guard stopping every process (DDP and FSDP)."""

import copy
import json
import os

import pytest
import torch
from train_tiny import TinyReward, batches, config, step_fn

from helpers import join_gloo, run_ranks, train_tiny_ranks
from nemokern.data.synthetic import write_synthetic
from nemokern.engine.checkpoint import Checkpointer, load_modules
from nemokern.engine.config import ConfigError
from nemokern.engine.loop import NonFiniteError, TrainLoop
from nemokern.model import Llama, LlamaConfig, RewardModel
from nemokern.model.deferred import is_deferred
from nemokern.parallel.fsdp import local_part
from nemokern.trainers.reinforce import ReinforceConfig, ReinforceTrainer
from nemokern.trainers.reward import RewardConfig, RewardTrainer

train = train_tiny_ranks


def assert_close(a, b):
    """The same weights up to the order of a sum: the gradient norm that clipping divides by is
    summed per shard under FSDP."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    return root, train(root / "ddp", "ddp"), train(root / "fsdp", "fsdp")


def test_fsdp_trains_like_ddp_with_half_the_state_each(runs):
    _, (w_ddp, r_ddp), (w_fsdp, r_fsdp) = runs
    assert_close(w_fsdp, w_ddp)
    torch.testing.assert_close(r_fsdp[0]["losses"], r_ddp[0]["losses"], rtol=1e-5, atol=0)
    assert len(r_fsdp[0]["losses"]) == 6 and r_fsdp[0]["losses"] == r_fsdp[1]["losses"]
    whole = r_ddp[0]["state_elements"]
    held = [r["state_elements"] for r in r_fsdp]
    assert sum(held) == whole and max(held) < 0.6 * whole, (held, whole)


def test_fsdp_checkpoint_holds_whole_weights_and_resumes_exactly(runs):
    root, _, (w_fsdp, r_fsdp) = runs
    step3 = root / "fsdp" / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in step3.glob("optimizer*.json")) == [
        "optimizer.rank00000.json",
        "optimizer.rank00001.json",
    ]
    manifest = json.loads((step3 / "manifest.json").read_text())
    assert manifest["optimizer_sharding"] == "fsdp" and manifest["sharded_optimizer"] == 2
    model = TinyReward(seed=7, tie=True)  # other weights: the load must overwrite every one
    load_modules(model, root / "fsdp" / "checkpoints" / "step-00000006")
    for k, v in model.state_dict().items():
        assert torch.equal(v, w_fsdp[k]), k
    w, ranks = train(root / "fsdp-resumed", "fsdp", step3)
    for k in w:
        assert torch.equal(w[k], w_fsdp[k]), k
    assert ranks[0]["losses"] == r_fsdp[0]["losses"][3:]


def test_whole_checkpoint_resumes_under_fsdp(runs):
    root, (w_ddp, r_ddp), _ = runs
    w, ranks = train(root / "ddp-to-fsdp", "fsdp", root / "ddp" / "checkpoints" / "step-00000003")
    assert_close(w, w_ddp)
    torch.testing.assert_close(ranks[0]["losses"], r_ddp[0]["losses"][3:], rtol=1e-5, atol=0)


def test_fsdp_bf16_params_compute_in_bf16_and_keep_fp32_state(runs, tmp_path):
    """--fsdp-param-dtype bfloat16: the layers run on bf16 weights (gathered so), the shards,
    their AdamW state and the checkpoint stay fp32, and the run tracks the fp32 one to bf16's
    precision."""
    root, _, (w_fsdp, r_fsdp) = runs
    assert r_fsdp[0]["computed_dtypes"] == ["torch.float32"]
    w, ranks = train(tmp_path / "bf16", "fsdp-bf16")
    assert ranks[0]["computed_dtypes"] == ["torch.bfloat16"]
    assert ranks[0]["state_elements"] == r_fsdp[0]["state_elements"]
    assert {v.dtype for v in w.values()} == {torch.float32}
    ours, ref = ranks[0]["losses"], r_fsdp[0]["losses"]
    assert ours != ref
    assert ours[0] == pytest.approx(ref[0], rel=2e-3)  # the same weights, rounded to bf16
    torch.testing.assert_close(ours, ref, rtol=5e-2, atol=0)  # 6 AdamW steps at lr 1e-2 apart


def test_fsdp_gradient_accumulation_matches_ddp(tmp_path):
    w_ddp, r_ddp = train(tmp_path / "ddp", "ddp", grad_accum=2)
    w_fsdp, r_fsdp = train(tmp_path / "fsdp", "fsdp", grad_accum=2)
    assert_close(w_fsdp, w_ddp)
    torch.testing.assert_close(r_fsdp[0]["losses"], r_ddp[0]["losses"], rtol=1e-5, atol=0)


def test_fsdp_checkpoint_resumes_on_one_process_without_the_flag(runs, tmp_path):
    """Half the processes, twice the accumulation: the same global batch; the AdamW state is
    regrouped from both processes' files, and the steps after it equal the 2-process run's."""
    root, _, (w_fsdp, r_fsdp) = runs
    step3 = root / "fsdp" / "checkpoints" / "step-00000003"
    cfg = config(tmp_path, resume=str(step3), grad_accum=2, max_steps=6, optimizer_impl="foreach")
    loop = TrainLoop(cfg, TinyReward(tie=True), batches(12), step_fn)
    history = loop.fit()
    assert [h["step"] for h in history] == [4, 5, 6]
    losses = [h["loss"] for h in history]
    torch.testing.assert_close(losses, r_fsdp[0]["losses"][3:], rtol=1e-5, atol=0)
    assert_close(dict(loop.model.state_dict()), w_fsdp)


def test_fsdp_checkpoint_resumes_on_another_process_count(tmp_path):
    """--fsdp on 2 processes (grad_accum 2) and on 4 (grad_accum 1) train the same global batches;
    a checkpoint of either resumes on the other, each process taking its rows of the AdamW state
    regrouped from the saved files, and continues that run."""
    w2, r2 = train(tmp_path / "two", "fsdp", grad_accum=2, n_batches=24)
    w4, r4 = train(tmp_path / "four", "fsdp", n_batches=24, world=4)
    assert len(r4) == 4 and len(r4[0]["losses"]) == 6
    torch.testing.assert_close(r4[0]["losses"], r2[0]["losses"], rtol=1e-5, atol=0)
    step3 = "checkpoints/step-00000003"
    w, r = train(tmp_path / "two-to-four", "fsdp", tmp_path / "two" / step3, n_batches=24, world=4)
    torch.testing.assert_close(r[0]["losses"], r2[0]["losses"][3:], rtol=1e-5, atol=0)
    assert_close(w, w2)
    w, r = train(
        tmp_path / "four-to-two", "fsdp", tmp_path / "four" / step3, grad_accum=2, n_batches=24
    )
    torch.testing.assert_close(r[0]["losses"], r4[0]["losses"][3:], rtol=1e-5, atol=0)
    assert_close(w, w4)


def test_fsdp_with_shard_optimizer_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="--fsdp: cannot be combined with --shard-optimizer"):
        config(tmp_path, fsdp=True, shard_optimizer=True)


# ---- the trainers under --fsdp ------------------------------------------------------------------
def _trainers_worker(rank, world, init_file, root, mode):
    """RewardTrainer and ReinforceTrainer for 2 steps (a checkpoint after each) on 2 processes,
    `mode` ddp or fsdp; rank 0 writes root/<mode>.json with both histories."""
    os.environ["WORLD_SIZE"] = str(world)
    join_gloo(rank, world, init_file)
    common = dict(
        max_steps=2,
        save_every=1,
        lr=1e-3,
        fsdp=mode == "fsdp",
        activation_checkpointing=mode == "fsdp",  # recomputed layers are FSDP units too
        progress=False,
        tensorboard=False,
        device="cpu",
        seed=3,
    )
    reward_trainer = RewardTrainer(
        RewardConfig(
            out=os.path.join(root, f"reward_{mode}"),
            data=os.path.join(root, "pref.jsonl"),
            model=os.path.join(root, "reward"),
            loss="scaled-bt",
            rows_per_batch=2,
            **common,
        )
    )
    assert is_deferred(reward_trainer.model) == (mode == "fsdp")
    reward = reward_trainer.fit()
    trainer = ReinforceTrainer(
        ReinforceConfig(
            out=os.path.join(root, f"policy_{mode}"),
            policy=os.path.join(root, "policy"),
            prompts=os.path.join(root, "prompts.jsonl"),
            reward_model=os.path.join(root, "reward"),
            max_new_tokens=5,
            prompts_per_step=2,
            k=2,
            **common,
        )
    )
    # under --fsdp the policy and the reference are built on the meta device and read once
    # sharded (each process its rows): nothing read yet
    for model in (trainer.policy, trainer.reference, trainer.reward_model):
        assert is_deferred(model) == (mode == "fsdp")
    policy = trainer.fit()
    assert not any(map(is_deferred, (trainer.policy, trainer.reference, trainer.reward_model)))
    # what this process holds of the frozen reference and reward model
    frozen = [*trainer.reference.parameters(), *trainer.reward_model.parameters()]
    held = sum(local_part(p).numel() for p in frozen)
    if rank == 0:
        with open(os.path.join(root, f"{mode}.json"), "w") as f:
            json.dump({"reward": reward, "reinforce": policy, "frozen_held": held}, f)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_reward_and_reinforce_trainers_under_fsdp_match_ddp(tmp_path):
    """Both trainers end to end (the REINFORCE rollout generates from the gathered policy and
    scores with a sharded reference and reward model; the FSDP run recomputes its layers in
    backward): the step records and OUT/final of --fsdp agree with DDP's to fp32 rounding."""
    write_synthetic(tmp_path / "pref.jsonl", 8, "hs2-preference", seed=0)
    rows = [{"prompt": f"Say {c}."} for c in "abcd"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    RewardModel(Llama(LlamaConfig.tiny())).save_pretrained(tmp_path / "reward")
    torch.manual_seed(1)
    Llama(LlamaConfig.tiny()).save_pretrained(tmp_path / "policy")
    for mode in ("ddp", "fsdp"):
        run_ranks(_trainers_worker, 2, str(tmp_path), mode)
    ddp, fsdp = (json.loads((tmp_path / f"{m}.json").read_text()) for m in ("ddp", "fsdp"))
    # under --fsdp the reference and the reward model are sharded too (rows split 2 ways; the
    # reward head's 9 rows unevenly)
    assert fsdp["frozen_held"] <= ddp["frozen_held"] // 2 + 64
    for trainer, keys in (
        ("reward", ("loss", "grad_norm")),
        ("reinforce", ("loss", "grad_norm", "reward_mean", "kl_mean", "response_len_mean")),
    ):
        assert len(fsdp[trainer]) == 2
        for ours, ref in zip(fsdp[trainer], ddp[trainer]):
            for key in keys:
                assert ours[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (trainer, key)
    for load, name in ((RewardModel.from_pretrained, "reward"), (Llama.from_pretrained, "policy")):
        manifest = tmp_path / f"{name}_fsdp" / "checkpoints" / "step-00000002" / "manifest.json"
        assert json.loads(manifest.read_text())["optimizer_sharding"] == "fsdp"
        ours = load(tmp_path / f"{name}_fsdp" / "final").state_dict()
        ref = load(tmp_path / f"{name}_ddp" / "final").state_dict()
        start = load(tmp_path / name).state_dict()
        assert ours.keys() == ref.keys()
        assert sum(not torch.equal(ref[k], start[k]) for k in ref) > len(ref) // 2  # trained
        for k in ref:
            torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)


# ---- on a GPU (gpu_check's gpu-tests stage) -----------------------------------------------------
class _LogpLoss(torch.nn.Module):
    """The mean negative log-prob of a sequence, through the root forward (as a trainer's)."""

    def __init__(self, llama):
        super().__init__()
        self.llama = llama

    def forward(self, ids):
        from nemokern.ops import linear_logprobs

        h = self.llama.hidden_states(ids)[0, :-1]
        return -linear_logprobs(h, self.llama.lm_head.weight.to(h.dtype), ids[0, 1:]).mean()


def _one_process_worker(rank, world, init_file, root, device):
    """FSDP2 over a 1-process mesh (on a GPU: NCCL refuses two processes on one GPU): a CPU model
    sharded unit by unit onto `device`, a step (on CUDA under bf16 autocast, through the Triton
    log-probs) whose gradients match the unsharded model's, generation inside full_weights, and
    the HF-layout save of the sharded model; the same step gathered in bf16 (fp32 shards and
    gradients); a frozen model sharded with its root resharded after each forward (and its shards
    in host memory on CUDA)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from nemokern.engine.checkpoint import save_modules
    from nemokern.model import generate
    from nemokern.model.llama import DecoderLayer
    from nemokern.parallel import init_parallel
    from nemokern.parallel.fsdp import full_weights, shard
    from nemokern.trainers.policy import TokenLogprobs

    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    if device == "cuda":
        torch.cuda.set_device(0)
    torch.manual_seed(0)
    whole = _LogpLoss(Llama(LlamaConfig.tiny()))
    model = _LogpLoss(Llama(LlamaConfig.tiny()))
    model.load_state_dict(whole.state_dict())
    dp = init_parallel(1, device)["dp"]
    shard(model, dp, (DecoderLayer,))
    whole = whole.to(device)
    assert all(p.device.type == device and hasattr(p, "device_mesh") for p in model.parameters())
    prompts = [[1, 2, 3], [4, 5]]
    ref = generate(whole.llama, prompts, max_new_tokens=6, greedy=True, eos_token_id=[])
    with full_weights(model):
        ours = generate(model.llama, prompts, max_new_tokens=6, greedy=True, eos_token_id=[])
        assert torch.equal(ours.tokens, ref.tokens)
        if device == "cuda":  # the decode step as a CUDA graph over the gathered units
            ours = generate(
                model.llama,
                prompts,
                max_new_tokens=6,
                greedy=True,
                eos_token_id=[],
                compile=True,
            )
            assert torch.equal(ours.tokens, ref.tokens)
    ids = torch.randint(3, 200, (1, 40), device=device)
    for m in (model, whole):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = m(ids)
        loss.backward()
    grad = model.llama.layers[0].mlp.up_proj.weight.grad.full_tensor()
    torch.testing.assert_close(grad, whole.llama.layers[0].mlp.up_proj.weight.grad)
    save_modules(model.llama, os.path.join(root, "saved"))
    # gathered and computed in bf16 (--fsdp-param-dtype), its shards and gradients fp32
    bf16 = _LogpLoss(copy.deepcopy(whole.llama).cpu())
    shard(bf16, dp, (DecoderLayer,), param_dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        loss_bf16 = bf16(ids)
    loss_bf16.backward()
    assert float(loss_bf16) == pytest.approx(float(loss), rel=2e-2)
    grad16 = bf16.llama.layers[0].mlp.up_proj.weight.grad
    assert (
        grad16.dtype == torch.float32
        and bf16.llama.layers[0].mlp.up_proj.weight.dtype == grad16.dtype
    )
    torch.testing.assert_close(grad16.full_tensor(), grad, rtol=0.1, atol=2e-3)
    # a frozen model (the REINFORCE reference): resharded after its forward, root included;
    # on CUDA its shards stay in host memory between forwards (offload)
    frozen = TokenLogprobs(copy.deepcopy(whole.llama).requires_grad_(False).cpu())
    shard(frozen, dp, (DecoderLayer,), frozen=True, offload=device == "cuda")
    targets = ids[0, 1:].clone()
    targets[:5] = -100
    cu = torch.tensor([0, 17, 39], dtype=torch.int32, device=device)
    with torch.no_grad():
        ours = frozen(ids[0, :-1], cu, targets)
        expected = TokenLogprobs(whole.llama)(ids[0, :-1], cu, targets)
    torch.testing.assert_close(ours, expected)
    weight = frozen.model.embed_tokens.weight  # the root unit's: a shard again
    assert isinstance(weight, DTensor) and weight.to_local().device.type == "cpu"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fsdp_one_process_mesh(tmp_path, device):
    torch.manual_seed(0)
    expected = Llama(LlamaConfig.tiny()).state_dict()
    run_ranks(_one_process_worker, 1, str(tmp_path), device)
    saved = Llama.from_pretrained(tmp_path / "saved" / "model").state_dict()
    for k, v in expected.items():
        assert torch.equal(saved[k], v), k


def _non_finite_worker(rank, world, init_file, root, mode):
    """One poisoned micro-batch (on rank 1's share) under DDP or --fsdp: both processes stop."""
    os.environ["WORLD_SIZE"] = str(world)
    join_gloo(rank, world, init_file)
    cfg = config(root, grad_accum=1, shuffle=False, fsdp=mode == "fsdp")
    loop = TrainLoop(cfg, TinyReward(tie=True), batches(12, poison=5), step_fn)
    with pytest.raises(NonFiniteError, match=r"loss at step 3 .*rank 1: \[\[500, 501") as err:
        loop.fit()
    assert "step-00000002" in str(err.value)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_non_finite_loss_stops_every_process(tmp_path, mode):
    """Micro-batch 5 is rank 1's in step 3 (2 processes, 1 micro-batch each per step): every
    process raises naming rank 1's rows, after the last good state (step 2) was saved whole."""
    run_ranks(_non_finite_worker, 2, str(tmp_path), mode)
    ckpt = Checkpointer(tmp_path).latest()
    assert ckpt.name == "step-00000002"
    model = TinyReward(seed=9, tie=True)
    Checkpointer(tmp_path).load(ckpt, model=model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- deferred loading ----------------------------------------------------------------------------
def _deferred_worker(rank, world, init_file, root):
    """A checkpoint read deferred: built on the meta device, sharded, then each process reads its
    rows; the gathered weights and a loss equal the whole load's."""
    from nemokern.model.deferred import materialize
    from nemokern.model.llama import DecoderLayer
    from nemokern.parallel import init_parallel
    from nemokern.parallel.fsdp import full_tensor, init_root, shard

    join_gloo(rank, world, init_file)
    whole = _LogpLoss(Llama.from_pretrained(os.path.join(root, "policy")))
    model = _LogpLoss(Llama.from_pretrained(os.path.join(root, "policy"), deferred=True))
    assert all(p.is_meta for p in model.parameters()) and is_deferred(model)
    shard(model, init_parallel(1, "cpu")["dp"], (DecoderLayer,))
    materialize(model, torch.device("cpu"))
    init_root(model)
    assert not is_deferred(model)
    for (name, ours), ref in zip(model.named_parameters(), whole.parameters()):
        assert 0 < local_part(ours).numel() <= ref.numel() // 2 + ref.shape[-1], name
        assert torch.equal(full_tensor(ours.detach()), ref), name
    ids = torch.randint(3, 200, (1, 30), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids), whole(ids))
    # reward models: with a saved head, a fresh head (the same random draws as a whole load) and
    # the Nemotron-Reward-HF layout (the head is lm_head's row 0, read from the file)
    for name, load in (
        ("reward", RewardModel.from_pretrained),
        ("policy", RewardModel.from_pretrained),
        ("reward-hf", RewardModel.from_reward_hf),
    ):
        torch.manual_seed(5)
        whole = load(os.path.join(root, name))
        torch.manual_seed(5)
        model = load(os.path.join(root, name), deferred=True)
        assert is_deferred(model) and all(p.is_meta for p in model.parameters())
        shard(model, init_parallel(1, "cpu")["dp"], (DecoderLayer,))
        materialize(model, torch.device("cpu"))
        init_root(model)
        for (key, ours), ref in zip(model.named_parameters(), whole.parameters()):
            assert torch.equal(full_tensor(ours.detach()), ref), (name, key)
        last = torch.tensor([9, 29])
        cu = torch.tensor([0, 10, 30], dtype=torch.int32)
        assert torch.equal(model(ids[0], last, cu_seqlens=cu), whole(ids[0], last, cu_seqlens=cu))


def test_deferred_load_under_fsdp_reads_each_process_rows(tmp_path):
    torch.manual_seed(1)
    Llama(LlamaConfig.tiny()).save_pretrained(tmp_path / "policy")
    reward = RewardModel(Llama(LlamaConfig.tiny()))
    reward.save_pretrained(tmp_path / "reward")
    reward.export_hf(tmp_path / "reward-hf")
    run_ranks(_deferred_worker, 2, str(tmp_path))


def test_deferred_load_refuses_a_model_with_values_and_reads_tied_models_at_once(tmp_path):
    from nemokern.model.deferred import defer, materialize

    torch.manual_seed(1)
    Llama(LlamaConfig.tiny(tie_word_embeddings=True)).save_pretrained(tmp_path / "tied")
    tied = Llama.from_pretrained(tmp_path / "tied", deferred=True)
    assert not is_deferred(tied) and not tied.embed_tokens.weight.is_meta
    assert tied.lm_head.weight is tied.embed_tokens.weight
    half = Llama(LlamaConfig.tiny())
    defer(half.layers[0], lambda: None)
    with pytest.raises(ValueError, match=r"materialize: \['embed_tokens.weight'"):
        materialize(half, "cpu")
