"""Checkpoints: exact round trip of weights, optimizer, scheduler and RNG; atomic saves; clear
errors for incomplete or corrupt checkpoints; keep-last-K; nothing is unpickled."""

import json
import random

import numpy as np
import pytest
import torch
from train_tiny import TinyReward

import nemokern.engine.checkpoint as ck
from nemokern.engine.checkpoint import Checkpointer, CheckpointError
from nemokern.engine.state_format import decode_state, encode_state, load_state
from nemokern.errors import ConfigError
from nemokern.model import Llama


def _trained(seed=0, impl="foreach"):
    model = TinyReward(seed=seed)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=1e-2,
        foreach=impl == "foreach",
        fused=impl == "fused" or None,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    for _ in range(2):
        model(torch.randint(0, 61, (2, 5))).square().sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_round_trip_is_exact(tmp_path, impl):
    model, opt, sched = _trained(0, impl)
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    rng_draws = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    path = Checkpointer(tmp_path).save(
        2, model=model, optimizer=opt, scheduler=sched, state={"data": {"epoch": 1}}
    )
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "modules.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "rng-rank00000.json",
        "rng-rank00000.safetensors",
        "scheduler.json",
        "scheduler.safetensors",
        "trainer.json",
        "trainer.safetensors",
        "trunk",
    ]
    Llama.from_pretrained(path / "trunk")  # the trunk is an ordinary HF directory

    other, opt2, sched2 = _trained(1, impl)
    torch.manual_seed(99)
    state = Checkpointer(tmp_path).load(path, model=other, optimizer=opt2, scheduler=sched2)
    assert state == {"step": 2, "world_size": 1, "data": {"epoch": 1}}
    a, b = model.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(s1["state"][i][k], s2["state"][i][k])
    assert sched.state_dict() == sched2.state_dict()
    assert (random.random(), float(np.random.rand())) == rng_draws[:2]
    assert torch.equal(torch.rand(3), rng_draws[2])
    # the optimizers keep stepping identically
    for m, o in ((model, opt), (other, opt2)):
        torch.manual_seed(0)
        m(torch.randint(0, 61, (2, 5))).square().sum().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))


def test_state_codec_keeps_types():
    obj = {
        "a": (1, 2.5, None),
        3: [torch.ones(2), "x"],
        "n": np.arange(3, dtype=np.uint32),
        "t": torch.tensor(2.0),
    }
    tensors = {}
    text = json.dumps(encode_state(obj, tensors))
    back = decode_state(json.loads(text), tensors)
    assert back["a"] == (1, 2.5, None) and isinstance(back["a"], tuple)
    assert torch.equal(back[3][0], torch.ones(2)) and back[3][1] == "x"
    assert back["n"].dtype == np.uint32 and back["n"].tolist() == [0, 1, 2]
    with pytest.raises(TypeError, match="cannot store a object"):
        encode_state({"bad": object()}, {})


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = _trained()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, model=model, optimizer=opt)

    def dies(*args, **kwargs):
        raise KeyboardInterrupt  # the process is killed while writing weights

    monkeypatch.setattr(ck, "save_modules", dies)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(2, model=model, optimizer=opt)
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / ".tmp-step-00000002").is_dir()
    assert ckpt.latest().name == "step-00000001" and ckpt.resolve("auto") == ckpt.latest()
    other, _, _ = _trained(1)
    ckpt.load(ckpt.latest(), model=other)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))
    ckpt.save(3, model=model)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the leftover is cleaned up


def test_keep_last_below_one_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigError) as e:
        Checkpointer(tmp_path, keep_last=0)
    assert (e.value.option, e.value.message) == ("keep_last", "0 must be at least 1")


def test_keep_last_and_resave_same_step(tmp_path):
    model = TinyReward()
    ckpt = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3, 3):
        ckpt.save(step, model=model)
    assert [s for s, _ in ckpt.complete()] == [2, 3]
    assert ckpt.resolve("") is None and ckpt.resolve(str(tmp_path)) == ckpt.path(3)


def test_incomplete_and_corrupt_checkpoints_are_named(tmp_path):
    model, opt, _ = _trained()
    ckpt = Checkpointer(tmp_path)
    path = ckpt.save(4, model=model, optimizer=opt)
    # truncated optimizer state
    f = path / "optimizer.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors has \d+ bytes.*truncated"):
        ckpt.load(path, model=model, optimizer=opt)
    # same size but garbled header
    f.write_bytes(b"\xff" * len(data))
    with pytest.raises(
        CheckpointError, match=r"optimizer\.safetensors: not a readable safetensors"
    ):
        ckpt.load(path, model=model, optimizer=opt)
    # garbled JSON
    j = path / "trainer.json"
    j.write_text("{" + " " * (len(j.read_text()) - 1))
    with pytest.raises(CheckpointError, match=r"trainer\.json: not valid JSON"):
        load_state(path, "trainer")
    # a missing file
    (path / "modules.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"modules\.safetensors is missing"):
        ckpt.load(path, model=model)
    # no manifest: the save never finished
    (path / "manifest.json").unlink()
    with pytest.raises(
        CheckpointError, match=r"manifest\.json is missing: the checkpoint is incomplete"
    ):
        ckpt.resolve(str(path))
    assert ckpt.latest() is None
    # a directory that is no checkpoint at all (a data folder): said so, not "incomplete"
    (tmp_path / "data").mkdir()
    with pytest.raises(CheckpointError, match=r"data is not a checkpoint \(no manifest\.json\)"):
        ckpt.resolve(str(tmp_path / "data"))


def test_a_manifest_without_its_tp_size_is_refused(tmp_path):
    """Every manifest records the tensor-parallel size; one without it is not read as --tp 1."""
    path = Checkpointer(tmp_path).save(1, model=TinyReward())
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["tp"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        CheckpointError, match=r"manifest\.json: not a nemokern checkpoint manifest"
    ):
        Checkpointer(tmp_path).load(path, model=TinyReward())


def test_load_into_another_model_names_the_tensor(tmp_path):
    path = Checkpointer(tmp_path).save(1, model=TinyReward())
    wider = TinyReward()
    wider.head = torch.nn.Linear(32, 5)
    with pytest.raises(
        CheckpointError, match=r"modules\.safetensors: tensor 'head\.weight' has shape \(3, 32\)"
    ):
        Checkpointer(tmp_path).load(path, model=wider)


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    model, opt, sched = _trained()
    path = Checkpointer(tmp_path).save(1, model=model, optimizer=opt, scheduler=sched)

    def no_pickle(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickle)
    Checkpointer(tmp_path).load(path, model=model, optimizer=opt, scheduler=sched)
    assert not [p for p in path.rglob("*") if p.suffix in (".pt", ".bin", ".pkl", ".pth")]


def test_reshard_rebuilds_replicated_and_split_pieces():
    """engine/reshard.reshard: 4 saved pieces of a 2-head KV projection (each head replicated on 2
    ranks) become rank 1's slice at tp 2 (head 1), and the whole tensor at tp 1; an unsplit or
    0-dim tensor is the first piece; pieces that cannot make the model's size are refused."""
    from nemokern.engine.reshard import reshard
    from nemokern.parallel.layers import Shard

    full = torch.arange(4 * 3.0).view(4, 3)  # 2 heads of 2 rows
    pieces = [full[:2], full[:2], full[2:], full[2:]]  # tp 4: ranks 0-1 head 0, ranks 2-3 head 1
    assert torch.equal(reshard(pieces, Shard(0, 4, 2, rank=1, world=2), "w"), full[2:])
    assert torch.equal(reshard(pieces, Shard(0, 4, 4, rank=0, world=1), "w"), full)
    rows = [full[:, :1], full[:, 1:2], full[:, 2:]]  # split by input at tp 3 (dim 1)
    assert torch.equal(reshard(rows, Shard(1, 3, 3), "w"), full)
    assert torch.equal(reshard([full, full + 1], None, "norm"), full)
    assert reshard([torch.tensor(5.0), torch.tensor(5.0)], Shard(0, 4, 2), "step") == 5.0
    with pytest.raises(CheckpointError, match="w: 2 saved piece"):
        reshard([full[:1], full[1:2]], Shard(0, 4, 4), "w")


def test_resume_from_a_path_that_does_not_exist_names_the_option(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; give auto") as e:
        Checkpointer(tmp_path / "out").resolve(str(tmp_path / "nope"))
    assert e.value.option == "--resume"
