"""RewardModel: packed equals dense, files round-trip, and the Nemotron-Reward-HF export gives
transformers' logits[last, 0] = reward - bias."""

import json

import pytest
import torch

from nemokern.model import CheckpointError, Llama, LlamaConfig
from nemokern.model.reward import RewardModel


def tiny_reward_model(tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    model = RewardModel(Llama(cfg))
    with torch.no_grad():
        model.head.bias.normal_()
    return model


def _batch(lengths, vocab=61, seed=1):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return seqs, torch.cat(seqs), cu, cu[1:] - 1


def test_packed_rewards_equal_each_sequence_alone():
    model = tiny_reward_model()
    seqs, ids, cu, last = _batch([5, 1, 12])
    packed = model(ids, last, cu_seqlens=cu)
    alone = torch.cat([model(s[None], torch.tensor([len(s) - 1])) for s in seqs])
    assert packed.shape == (3, 9) and packed.dtype == torch.float32
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    packed[:, 4].sum().backward()
    assert (
        model.head.weight.grad is not None
        and model.trunk.layers[0].mlp.gate_proj.weight.grad.abs().sum() > 0
    )


def test_save_and_load_round_trip(tmp_path):
    model = tiny_reward_model()
    seqs, ids, cu, last = _batch([7, 3])
    model.save_pretrained(tmp_path)
    again = RewardModel.from_pretrained(tmp_path)
    torch.testing.assert_close(again(ids, last, cu_seqlens=cu), model(ids, last, cu_seqlens=cu))
    # a plain Llama directory gets a fresh head; a head of the wrong shape is refused
    model.trunk.save_pretrained(tmp_path / "plain")
    fresh = RewardModel.from_pretrained(tmp_path / "plain", attributes=["helpfulness"])
    assert fresh.head.weight.shape == (1, 32)
    with pytest.raises(CheckpointError, match="attributes"):
        RewardModel.from_pretrained(tmp_path, attributes=["helpfulness"])


def test_attribute_lists_and_a_non_finite_head_are_checked(tmp_path):
    """A bare string was one attribute per character (an 11-output head for "helpfulness"), an
    empty list the 9 SteerLM ones; a NaN head loaded and scored NaN."""
    from safetensors.torch import save_file

    model = tiny_reward_model()
    model.trunk.save_pretrained(tmp_path / "plain")
    with pytest.raises(TypeError, match="attributes='helpfulness' is one string"):
        RewardModel.from_pretrained(tmp_path / "plain", attributes="helpfulness")
    for bad in ([], ["a", "a"], ["a", 3]):
        with pytest.raises(ValueError, match="must be a non-empty list of distinct names"):
            RewardModel(model.trunk, bad)
    model.save_pretrained(tmp_path / "rm")
    head = {"weight": torch.full((9, 32), float("nan")), "bias": torch.zeros(9)}
    save_file(head, str(tmp_path / "rm" / "reward_head.safetensors"))
    with pytest.raises(
        CheckpointError, match="reward_head.safetensors: tensor 'weight' is not all"
    ):
        RewardModel.from_pretrained(tmp_path / "rm")


@pytest.mark.parametrize("tie", [False, True])
def test_export_nemotron_reward_hf_layout_matches_transformers(tmp_path, tie):
    from transformers import LlamaForCausalLM

    model = tiny_reward_model(tie=tie)
    embed_before = model.trunk.embed_tokens.weight.clone()
    bias = model.export_hf(tmp_path, "helpfulness")
    assert torch.equal(model.trunk.embed_tokens.weight, embed_before)  # export changes nothing
    assert model.trunk.config.tie_word_embeddings == tie
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    seqs, ids, cu, last = _batch([9, 4])
    ours = model(ids, last, cu_seqlens=cu)[:, 4]
    with torch.no_grad():
        theirs = torch.stack([hf(s[None]).logits[0, -1, 0] for s in seqs])
    torch.testing.assert_close(theirs + bias, ours.detach(), rtol=1e-4, atol=1e-4)
    assert bias == pytest.approx(float(model.head.bias[4].detach()))
    # nemokern reads the exported directory back as a trunk
    Llama.from_pretrained(tmp_path)


def test_exported_layout_scores_like_the_model_it_came_from(tmp_path):
    model = tiny_reward_model()
    model.export_hf(tmp_path, "helpfulness")
    again = RewardModel.load_any(tmp_path)  # no head file: lm_head row 0 + recorded bias
    assert again.attributes == ("helpfulness",)
    seqs, ids, cu, last = _batch([6, 11])
    torch.testing.assert_close(
        again(ids, last, cu_seqlens=cu)[:, 0],
        model(ids, last, cu_seqlens=cu)[:, 4],
        rtol=1e-5,
        atol=1e-5,
    )


def test_export_under_tensor_parallelism_is_refused_by_name(tmp_path, monkeypatch):
    import nemokern.model.reward as reward

    model = tiny_reward_model()
    monkeypatch.setattr(reward, "rank_and_size", lambda group: (0, 2))
    with pytest.raises(ValueError, match="split over 2 tensor-parallel ranks: save_pretrained"):
        model.export_hf(tmp_path / "hf", "helpfulness")
    assert not (tmp_path / "hf").exists()


def test_export_streams_a_sharded_checkpoint_into_shards(tmp_path):
    """export_reward_hf from files (what `nemokern export-reward` runs): a checkpoint saved in
    several shards is copied tensor by tensor into several shards; every tensor as saved but
    lm_head's row 0, which is the head's row; bad inputs are named."""
    from safetensors.torch import load_file

    from nemokern.model.hf import hf_name
    from nemokern.model.reward import export_reward_hf

    model = tiny_reward_model()
    model.save_pretrained(tmp_path / "src")  # the head files and the trunk, whole
    model.trunk.save_pretrained(tmp_path / "src", max_shard_size="10KB")  # the trunk in shards
    assert len(list((tmp_path / "src").glob("model-*.safetensors"))) > 1
    bias = export_reward_hf(
        tmp_path / "src", tmp_path / "out", "correctness", max_shard_size="10KB"
    )
    files = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(files) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    got = {k: v for f in files for k, v in load_file(f).items()}
    want = {hf_name(k): v.detach() for k, v in model.trunk.state_dict().items()}
    assert got.keys() == want.keys()
    for name, value in want.items():
        if name == "lm_head.weight":
            assert torch.equal(got[name][0], model.head.weight[5].detach())
            assert torch.equal(got[name][1:], value[1:])
        else:
            assert torch.equal(got[name], value), name
    assert bias == float(model.head.bias[5].detach())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["nemokern_reward_attribute"] == "correctness"
    with pytest.raises(ValueError, match="'bogus' is not one of the head's"):
        export_reward_hf(tmp_path / "src", tmp_path / "x", "bogus")
    with pytest.raises(CheckpointError, match="no reward_head.safetensors"):
        export_reward_hf(tmp_path / "out", tmp_path / "y")
    with pytest.raises(ValueError, match="'bogus' is not a size"):
        export_reward_hf(tmp_path / "src", tmp_path / "z", max_shard_size="bogus")
    assert not (tmp_path / "z").exists()  # nothing written
