"""Resumable checkpoints under --tp 2 (2 gloo processes, tiny models): each tp rank writes its
shard of the weights and the optimizer into the one atomically renamed checkpoint. A reward run of
4 steps equals a run of 2 steps resumed for 2 more, and a REINFORCE run of 4 steps one resumed
after step 1 (inside a rollout), bit for bit (losses, weight and optimizer shards); the REINFORCE
case also at --tp 1 on 2 data-parallel processes, each with its own rollout (with DDP and with
--fsdp). A checkpoint written
with a shard file missing or garbled is refused by name; one written at --tp 2 continues at
--tp 1 and one written at --tp 1 at --tp 2 (resharded) as the uninterrupted runs do."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import join_gloo, run_ranks
from nemokern.data.synthetic import write_synthetic
from nemokern.data.tokenizer import load_tokenizer
from nemokern.engine.checkpoint import Checkpointer, CheckpointError
from nemokern.engine.distributed import tp_group_for
from nemokern.model import Llama, LlamaConfig, RewardModel
from nemokern.trainers.reinforce import ReinforceConfig, ReinforceTrainer, build_policy
from nemokern.trainers.reward import RewardConfig, RewardTrainer

TP, STEPS = 2, 4
QUIET = dict(progress=False, tensorboard=False, device="cpu")


def _config(root, run, **kw):
    return RewardConfig(
        out=os.path.join(root, run),
        data=os.path.join(root, "pref.jsonl"),
        loss="bt",
        rows_per_batch=2,
        lr=3e-3,
        # AdamW's move is lr * m / (sqrt(v) + eps): with eps = 1 it is ~lr * m, so the runs at
        # different tp sizes (rounding apart) do not flip near-zero gradients into whole moves
        eps=1.0,
        seed=5,
        **QUIET,
        **kw,
    )


def _fit(root, run, **kw):
    cfg = _config(root, run, **kw)
    tp_group = tp_group_for(cfg) if cfg.tp > 1 else None
    model = RewardModel.from_pretrained(os.path.join(root, "reward"), tp_group=tp_group)
    return RewardTrainer(cfg, model=model).fit()


def _worker(rank, world, init_file, root):
    os.environ["WORLD_SIZE"] = str(world)
    join_gloo(rank, world, init_file)
    full = _fit(root, "full", tp=TP, max_steps=STEPS)
    _fit(root, "half", tp=TP, max_steps=STEPS // 2, save_every=1)
    rest = _fit(root, "half", tp=TP, max_steps=STEPS, resume="auto")
    # a garbled shard (same size, so the manifest's sizes still match): each rank names its own
    bad = os.path.join(root, "bad", f"rank{rank}")
    shutil.copytree(os.path.join(root, "half", "checkpoints", f"step-{STEPS:08d}"), bad)
    shard = os.path.join(bad, f"model.tp{rank}-of-{TP}.safetensors")
    with open(shard, "r+b") as f:
        f.write(b"\xff" * 16)
    cfg = _config(root, "bad", tp=TP)
    model = RewardModel.from_pretrained(os.path.join(root, "reward"), tp_group=tp_group_for(cfg))
    ckpt = Checkpointer(root, tp_group=model.trunk.tp_group)
    with pytest.raises(CheckpointError, match=f"model.tp{rank}-of-2.safetensors: not a readable"):
        ckpt.load(bad, model=model)
    # resharded: the --tp 1 run's step-2 checkpoint continued at --tp 2
    from_tp1 = _fit(
        root,
        "tp1_to_tp2",
        tp=TP,
        max_steps=STEPS,
        resume=os.path.join(root, "tp1", "checkpoints", f"step-{STEPS // 2:08d}"),
    )
    if rank == 0:
        with open(os.path.join(root, "histories.json"), "w") as f:
            json.dump({"full": full, "rest": rest, "from_tp1": from_tp1}, f)


def _assert_same_shards(resumed, straight):
    """The last checkpoints of two runs hold bit-identical weight and optimizer shards; returns
    the resumed run's checkpoint and the shard file names."""
    last = f"checkpoints/step-{STEPS:08d}"
    ours, ref = resumed / last, straight / last
    shards = [f"{kind}.tp{r}-of-2.safetensors" for kind in ("model", "optimizer") for r in (0, 1)]
    assert set(shards) <= {p.name for p in ours.iterdir()}
    assert json.loads((ours / "manifest.json").read_text())["tp"] == TP
    for name in shards:
        a, b = load_file(ours / name), load_file(ref / name)
        assert a.keys() == b.keys() and a, name
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    return ours, shards


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_reward_run_at_tp2_resumes_bit_for_bit_and_at_another_tp(tmp_path):
    root = str(tmp_path)
    write_synthetic(tmp_path / "pref.jsonl", 16, "hs2-preference", seed=0)
    torch.manual_seed(0)
    RewardModel(Llama(LlamaConfig.tiny())).save_pretrained(tmp_path / "reward")

    tp1 = _fit(root, "tp1", max_steps=STEPS, save_every=1, keep_last=STEPS)
    run_ranks(_worker, TP, root)

    histories = json.loads((tmp_path / "histories.json").read_text())
    assert [h["step"] for h in histories["rest"]] == [3, 4]
    assert [h["loss"] for h in histories["rest"]] == [h["loss"] for h in histories["full"][2:]]
    assert [h["grad_norm"] for h in histories["rest"]] == [
        h["grad_norm"] for h in histories["full"][2:]
    ]
    assert sorted(p.name for p in (tmp_path / "half" / "checkpoints").iterdir()) == [
        f"step-{STEPS // 2:08d}",
        f"step-{STEPS:08d}",
    ]  # keep_last = 2: step 1 pruned
    ours, shards = _assert_same_shards(tmp_path / "half", tmp_path / "full")
    assert not (ours / "trunk").exists() and not (ours / "optimizer.json").exists()
    # the shards differ: each holds its rank's slices of the split weights
    m0, m1 = load_file(ours / shards[0]), load_file(ours / shards[1])
    assert not torch.equal(m0["trunk.lm_head.weight"], m1["trunk.lm_head.weight"])

    # another tp size: each weight and AdamW moment rebuilt from the pieces, then sliced (here
    # whole); the steps after it equal the uninterrupted runs' to fp32 rounding, both ways
    step2 = tmp_path / "half" / "checkpoints" / f"step-{STEPS // 2:08d}"
    to_tp1 = _fit(root, "tp2_to_tp1", max_steps=STEPS, resume=str(step2))
    for resumed, straight in ((to_tp1, histories["full"]), (histories["from_tp1"], tp1)):
        assert [h["step"] for h in resumed] == [3, 4]
        for key in ("loss", "grad_norm"):
            assert [h[key] for h in resumed] == pytest.approx(
                [h[key] for h in straight[2:]], rel=1e-5, abs=1e-7
            ), key
    (ours / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=r"model\.tp1-of-2\.safetensors is missing"):
        _fit(root, "half", max_steps=STEPS + 1, resume="auto")


def _char_reward(prompts, completions, **columns):
    return [float(sum(map(ord, c)) % 7) for c in completions]


def _reinforce(root, run, tp, **kw):
    cfg = ReinforceConfig(
        prompts=os.path.join(root, "prompts.jsonl"),
        out=os.path.join(root, run),
        tp=tp,
        lr=1e-3,
        schedule="constant",  # the same lr whether the run is told 2 or 4 steps
        truncation_penalty=0.0,  # responses without EOS count: advantages are not all 0
        max_new_tokens=4,
        prompts_per_step=2,
        k=2,
        updates_per_rollout=2,
        seed=7,
        **QUIET,
        **kw,
    )
    return ReinforceTrainer(cfg, reward_fn=_char_reward).fit()


def _reinforce_worker(rank, world, init_file, root, tp, fsdp):
    os.environ["WORLD_SIZE"] = str(world)
    join_gloo(rank, world, init_file)
    # under --fsdp the policy comes from a directory, so it and the reference are read deferred
    kw = {"fsdp": fsdp, **({"policy": os.path.join(root, "policy")} if fsdp else {})}
    full = _reinforce(root, "full", tp, max_steps=STEPS, **kw)
    _reinforce(root, "half", tp, max_steps=STEPS // 2, save_every=1, keep_last=4, **kw)
    # step 1 is inside the first rollout (2 updates): the resume must train on its samples
    step1 = os.path.join(root, "half", "checkpoints", f"step-{1:08d}")
    rest = _reinforce(root, "half", tp, max_steps=STEPS, resume=step1, keep_last=4, **kw)
    if rank == 0:
        with open(os.path.join(root, "histories.json"), "w") as f:
            json.dump({"full": full, "rest": rest}, f)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "tp, fsdp", [(TP, False), (1, False), (1, True)], ids=["tp2", "dp2", "fsdp2"]
)
def test_reinforce_run_resumes_inside_a_rollout_bit_for_bit(tmp_path, tp, fsdp):
    """At --tp 2, and at --tp 1 on 2 processes (data parallel: each process's own rollout), with
    DDP and with --fsdp (the rollout generating from the gathered policy, each process resuming
    its own AdamW rows)."""
    rows = [{"prompt": f"Say {c}."} for c in "abcdefgh"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if fsdp:  # the policy 'tiny' would build, as a directory
        build_policy(ReinforceConfig(seed=7), load_tokenizer("byte")).save_pretrained(
            tmp_path / "policy"
        )

    run_ranks(_reinforce_worker, 2, str(tmp_path), tp, fsdp)

    histories = json.loads((tmp_path / "histories.json").read_text())
    assert [h["step"] for h in histories["rest"]] == [2, 3, 4]
    assert all(h["grad_norm"] > 0 for h in histories["full"]), histories["full"]
    for key in ("loss", "grad_norm", "response_len_mean"):
        assert [h[key] for h in histories["rest"]] == [h[key] for h in histories["full"][1:]], key
    if tp > 1:
        _assert_same_shards(tmp_path / "half", tmp_path / "full")
    manifest = tmp_path / "half" / "checkpoints" / f"step-{STEPS:08d}" / "manifest.json"
    assert json.loads(manifest.read_text()).get("optimizer_sharding") == ("fsdp" if fsdp else None)
    if tp == 1:  # step 1 is inside a rollout, each process's own: one process cannot continue it
        step1 = tmp_path / "half" / "checkpoints" / f"step-{1:08d}"
        with pytest.raises(CheckpointError, match=r"inside a rollout .* on 2 process\(es\) at "):
            _reinforce(str(tmp_path), "one", 1, max_steps=STEPS, resume=str(step1), grad_accum=2)
