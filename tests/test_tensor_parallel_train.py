"""The trainers under --tp 2 on 4 gloo processes (TP = 2 x DP = 2) take the same optimizer step
as one process (TP = 1, DP = 1) on the same global batch: one reward-model step (RewardTrainer,
Bradley-Terry pairs, its OUT/final export, its checkpoint's shard files) and one REINFORCE
update (the policy-gradient loss of ReinforceTrainer on fixed rollout batches). Loss, gradient
norm and the updated weights agree to fp32 rounding. Also: init_parallel's (dp, tp) mesh; --tp
that does not divide the processes is refused by name; the 'tiny' models are the same at TP = 2.
"""

import functools
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import join_gloo, run_ranks
from nemokern.data.synthetic import write_synthetic
from nemokern.data.tokenizer import ByteTokenizer
from nemokern.engine.config import ConfigError
from nemokern.engine.distributed import setup_distributed, tp_group_for
from nemokern.engine.loop import TrainLoop
from nemokern.model import Llama, LlamaConfig, RewardModel
from nemokern.parallel import init_parallel
from nemokern.trainers.policy import PolicyLoss, build_policy, pack
from nemokern.trainers.reinforce import ReinforceConfig, ReinforceTrainer
from nemokern.trainers.reward import RewardConfig, RewardTrainer
from nemokern.trainers.reward import build_model as build_reward_model

# AdamW's first move is lr * g / (|g| + eps): with eps = 1 it is ~g (with the usual 1e-8 it is
# ~sign(g), which turns rounding in near-zero gradients into whole moves)
COMMON = dict(max_steps=1, lr=1.0, eps=1.0, progress=False, tensorboard=False, device="cpu", seed=3)
WORLD, TP = 4, 2  # 2 data-parallel replicas of a 2-way tensor-parallel model


def _accum(global_batch, tp):
    """grad_accum giving `global_batch` micro-batches per step: one process at tp 1, WORLD // tp
    data-parallel replicas otherwise."""
    return global_batch if tp == 1 else global_batch // (WORLD // tp)


def _reward_config(root, tp, mode="zero"):
    """mode (at tp > 1): "zero" (DDP over the dp pairs) or "fsdp" (--fsdp over them)."""
    return RewardConfig(
        out=os.path.join(root, f"reward_tp{tp}" + (f"_{mode}" if tp > 1 else "")),
        fsdp=tp > 1 and mode == "fsdp",
        data=os.path.join(root, "pref.jsonl"),
        loss="scaled-bt",
        rows_per_batch=2,
        grad_accum=_accum(2, tp),
        tp=tp,
        **COMMON,
    )


def _policy_batches():
    """4 micro-batches of fixed rollouts: packed prompt + response, per-token coefficients."""
    g = torch.Generator().manual_seed(11)
    batches = []
    for j in range(4):
        prompts = [torch.randint(3, 300, (int(n),), generator=g).tolist() for n in (4, 6)]
        responses = [torch.randint(3, 300, (int(n),), generator=g) for n in (5, 3 + j)]
        b = pack(prompts, responses)
        mask = b["targets"] != -100
        n = int(mask.sum())
        b["coef"] = torch.where(mask, torch.randn(mask.shape, generator=g) / n, 0.0).float()
        b.update(weight=n, rows=[j])  # weight: what the step's token mean counts it as
        batches.append(b)
    return batches


def _reinforce_config(root, tp, mode="zero"):
    # under TP2 x DP2 the AdamW state is also sharded over the dp pairs (--shard-optimizer), or
    # the weights, gradients and state all are (--fsdp); no-ops on one process
    return ReinforceConfig(
        out=os.path.join(root, f"reinforce_tp{tp}" + (f"_{mode}" if tp > 1 else "")),
        grad_accum=_accum(4, tp),
        tp=tp,
        shard_optimizer=tp > 1 and mode == "zero",
        fsdp=tp > 1 and mode == "fsdp",
        **COMMON,
    )


def _update_policy(root, tp, mode="zero"):
    """One update of the policy in root/policy on _policy_batches; returns (policy, history)."""
    cfg = _reinforce_config(root, tp, mode)
    # under fsdp read deferred, as the trainers do: each process its rows of its tp slice
    policy = Llama.from_pretrained(
        os.path.join(root, "policy"), tp_group=tp_group_for(cfg), deferred=cfg.fsdp
    )
    update = functools.partial(ReinforceTrainer._update, None)
    loop = TrainLoop(cfg, PolicyLoss(policy), _policy_batches(), update)
    return policy, loop.fit(), loop


def _worker(rank, world, init_file, root, mode):
    os.environ["WORLD_SIZE"] = str(world)
    join_gloo(rank, world, init_file)
    with pytest.raises(ConfigError, match="--tp: 3 needs a multiple of 3 processes"):
        setup_distributed("cpu", 3)
    with pytest.raises(ValueError, match=r"tp_size=3 does not divide the 4 process\(es\)"):
        init_parallel(3)
    mesh = init_parallel(TP)  # the layout the trainers get: (dp, tp), tp ranks consecutive
    assert mesh.mesh_dim_names == ("dp", "tp") and tuple(mesh.mesh.shape) == (2, 2)
    ranks = torch.distributed.get_process_group_ranks
    assert ranks(mesh.get_group("tp")) == [rank // 2 * 2, rank // 2 * 2 + 1]
    assert ranks(mesh.get_group("dp")) == [rank % 2, rank % 2 + 2]
    cfg = _reward_config(root, TP, mode)
    model = RewardModel.from_pretrained(os.path.join(root, "reward"), tp_group=tp_group_for(cfg))
    reward_history = RewardTrainer(cfg, model=model).fit()
    policy, history, loop = _update_policy(root, TP, mode)
    if loop.writes_weights:  # a collective of the tp group (under fsdp, of all)
        policy.save_pretrained(os.path.join(root, f"policy_tp_{mode}"))
    if rank == 0:
        with open(os.path.join(root, f"histories_{mode}.json"), "w") as f:
            json.dump({"reward": reward_history, "reinforce": history}, f)


_SHARD_FILES = [("model", "safetensors"), ("optimizer", "json"), ("optimizer", "safetensors")]


def _assert_step_equal(ours, ref, what):
    for key in ("loss", "grad_norm", "weight"):
        assert ours[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (what, key, ours, ref)


def _assert_weights_equal(ours: dict, ref: dict, start: dict, what):
    worst = 0.0
    for name, w in ref.items():
        # after one AdamW step each weight moved by ~ its clipped gradient: compare the moves
        moved = ref[name] - start[name]
        torch.testing.assert_close(
            ours[name] - start[name], moved, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
        worst = max(worst, (ours[name] - w).abs().max().item())
    print(f"PARITY {what}: max |weight(TP2xDP2) - weight(TP1)| = {worst:.2e}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("mode", ["zero", "fsdp"])
def test_reward_step_and_reinforce_update_at_tp2_dp2_equal_one_process(tmp_path, mode):
    root = str(tmp_path)
    write_synthetic(tmp_path / "pref.jsonl", 16, "hs2-preference", seed=0)
    torch.manual_seed(0)
    start_reward = RewardModel(Llama(LlamaConfig.tiny()))
    start_reward.save_pretrained(tmp_path / "reward")
    torch.manual_seed(1)
    Llama(LlamaConfig.tiny()).save_pretrained(tmp_path / "policy")

    ref_reward = RewardTrainer(
        _reward_config(root, 1), model=RewardModel.from_pretrained(tmp_path / "reward")
    )
    ref_reward_history = ref_reward.fit()
    ref_policy, ref_history, _ = _update_policy(root, 1)

    run_ranks(_worker, WORLD, root, mode)

    histories = json.loads((tmp_path / f"histories_{mode}.json").read_text())
    _assert_step_equal(histories["reward"][0], ref_reward_history[0], "reward step")
    _assert_step_equal(histories["reinforce"][0], ref_history[0], "REINFORCE update")
    # the end-of-run checkpoint: one shard per tp rank (from dp rank 0), an RNG file per process;
    # under fsdp one optimizer file per process instead of per tp rank
    ckpt = tmp_path / f"reward_tp2_{mode}" / "checkpoints" / "step-00000001"
    kept = (".tp", "rng") if mode == "zero" else (".tp", "rng", "optimizer")
    shard_files = _SHARD_FILES if mode == "zero" else _SHARD_FILES[:1]
    per_process = ("rng",) if mode == "zero" else ("rng", "optimizer.")
    assert sorted(p.name for p in ckpt.iterdir() if any(k in p.name for k in kept)) == sorted(
        [f"{kind}.tp{r}-of-2.{ext}" for r in (0, 1) for kind, ext in shard_files]
        + [
            f"{kind}{'-' if kind == 'rng' else ''}rank{r:05d}.{ext}"
            for kind in per_process
            for r in range(WORLD)
            for ext in ("json", "safetensors")
        ]
    )
    ours = RewardModel.from_pretrained(tmp_path / f"reward_tp2_{mode}" / "final").state_dict()
    _assert_weights_equal(
        ours, ref_reward.model.state_dict(), start_reward.state_dict(), "reward step"
    )
    ckpt = tmp_path / f"reinforce_tp2_{mode}" / "checkpoints" / "step-00000001"
    assert sorted(p.name for p in ckpt.glob("optimizer*.json")) == [
        f"optimizer.rank{r:05d}.json" for r in range(WORLD)
    ]
    start_policy = Llama.from_pretrained(tmp_path / "policy").state_dict()
    ours = Llama.from_pretrained(tmp_path / f"policy_tp_{mode}").state_dict()
    _assert_weights_equal(ours, ref_policy.state_dict(), start_policy, "REINFORCE update")


def _rollout_worker(rank, world, init_file, root):
    os.environ["WORLD_SIZE"] = str(world)
    join_gloo(rank, world, init_file)
    cfg = ReinforceConfig(
        prompts=os.path.join(root, "prompts.jsonl"),
        reward_model=os.path.join(root, "reward"),
        out=os.path.join(root, "run"),
        max_new_tokens=5,
        prompts_per_step=2,
        k=2,
        tp=2,
        max_steps=1,
        progress=False,
        tensorboard=False,
        device="cpu",
    )
    history = ReinforceTrainer(cfg).fit()
    assert len(history) == 1 and history[0]["response_len_mean"] >= 1, history


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_reinforce_trainer_runs_whole_steps_at_tp2(tmp_path):
    """Rollout (generation with one token per step on both ranks, reward model and reference
    split like the policy), log-probs and update at --tp 2; OUT/final loads at TP = 1."""
    rows = [{"prompt": f"Say {c}."} for c in "abcd"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    RewardModel(Llama(LlamaConfig.tiny())).save_pretrained(tmp_path / "reward")
    run_ranks(_rollout_worker, 2, str(tmp_path))
    Llama.from_pretrained(tmp_path / "run" / "final")


def _tiny_worker(rank, world, init_file, root):
    """--policy tiny / --model tiny at --tp 2: the split of the TP = 1 model (logits, rewards)."""
    os.environ["WORLD_SIZE"] = str(world)
    join_gloo(rank, world, init_file)
    tok = ByteTokenizer()
    ids = torch.tensor([[tok.bos_id, 72, 105, 33, 10, 200]])
    policy = build_policy(ReinforceConfig(tp=2, seed=5, device="cpu"), tok)
    reward = build_reward_model(RewardConfig(tp=2, seed=5, device="cpu"))
    with torch.no_grad():
        out = {
            "logits": policy(ids),
            "rewards": reward(ids, torch.tensor([ids.shape[1] - 1])),
        }
    if rank == 0:
        save_file(out, os.path.join(root, "tp2.safetensors"))


def test_tiny_models_are_the_same_at_every_tp(tmp_path):
    tok = ByteTokenizer()
    ids = torch.tensor([[tok.bos_id, 72, 105, 33, 10, 200]])
    policy = build_policy(ReinforceConfig(seed=5, device="cpu"), tok)
    reward = build_reward_model(RewardConfig(seed=5, device="cpu"))
    run_ranks(_tiny_worker, 2, str(tmp_path))
    split = load_file(tmp_path / "tp2.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(split["logits"], policy(ids), rtol=1e-5, atol=1e-6)
        rewards = reward(ids, torch.tensor([ids.shape[1] - 1]))
        torch.testing.assert_close(split["rewards"], rewards, rtol=1e-5, atol=1e-6)
    assert rewards.abs().max() > 0
