"""HF checkpoint I/O: transformers <-> nemokern both ways, shards, dtypes, the error messages."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from helpers import CASES, LLAMA31_8B, random_hf_model
from nemokern.model import CheckpointError, ConfigError, Llama, LlamaConfig

IDS = torch.randint(0, 301, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "case, shard",
    [("gqa_llama3_untied", None), ("gqa_llama3_tied", "40KB"), ("head_dim_32", "100KB")],
)
def test_transformers_save_nemokern_load(tmp_path, case, shard):
    hf = random_hf_model(**CASES[case])
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    model = Llama.from_pretrained(tmp_path)
    assert model.embed_tokens.weight.dtype == torch.float32
    assert (model.lm_head.weight is model.embed_tokens.weight) == hf.config.tie_word_embeddings
    with torch.no_grad():
        assert (model(IDS) - hf(IDS).logits).abs().max() < 1e-5


@pytest.mark.parametrize("case, shard", [("gqa_llama3_untied", "5GB"), ("gqa_llama3_tied", "30KB")])
def test_nemokern_save_transformers_load(tmp_path, case, shard):
    model = Llama(LlamaConfig.from_dict(random_hf_model(**CASES[case]).config.to_dict())).eval()
    model.save_pretrained(tmp_path, max_shard_size=shard)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert (len(shards) > 1) == (shard == "30KB")
    hf = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.config.tie_word_embeddings == model.config.tie_word_embeddings
    with torch.no_grad():
        assert (model(IDS) - hf(IDS).logits).abs().max() < 1e-5
    again = Llama.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_dtype_and_device_options(tmp_path):
    model = Llama(LlamaConfig.tiny()).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert Llama.from_pretrained(tmp_path).lm_head.weight.dtype == torch.bfloat16  # config's dtype
    as32 = Llama.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    assert as32.lm_head.weight.dtype == torch.float32
    assert torch.equal(as32.lm_head.weight.bfloat16(), model.lm_head.weight)
    assert Llama.from_pretrained(tmp_path, dtype="float32").norm.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        Llama.from_pretrained(tmp_path, dtype="int8")


def test_resave_removes_stale_shards(tmp_path):
    model = Llama(LlamaConfig.tiny())
    model.save_pretrained(tmp_path, max_shard_size="30KB")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


@pytest.fixture
def saved(tmp_path):
    Llama(LlamaConfig.tiny()).save_pretrained(tmp_path)
    return tmp_path


def _edit(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(saved):
    _edit(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        Llama.from_pretrained(saved)


def test_extra_tensor_is_named(saved):
    _edit(saved, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(3)}))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.2"
    ):
        Llama.from_pretrained(saved)


def test_saved_rope_inv_freq_buffers_are_ignored_like_transformers(saved):
    """Checkpoints written by older transformers carry each layer's rotary_emb.inv_freq; it is
    derived from config.json, so loading skips it (as transformers does) with identical logits."""
    ids = torch.randint(0, LlamaConfig.tiny().vocab_size, (2, 9))
    before = Llama.from_pretrained(saved)(ids)
    _edit(
        saved,
        lambda t: t.update(
            {
                f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.full((8,), 7.0)
                for i in range(2)
            }
            | {"model.rotary_emb.inv_freq": torch.ones(8)}
        ),
    )
    torch.testing.assert_close(Llama.from_pretrained(saved)(ids), before, rtol=0, atol=0)
    _edit(saved, lambda t: t.update({"model.rotary_emb.inv_freq_extra": torch.ones(8)}))
    with pytest.raises(
        CheckpointError, match="unexpected tensor 'model.rotary_emb.inv_freq_extra'"
    ):
        Llama.from_pretrained(saved)


def test_wrong_shape_is_named(saved):
    _edit(saved, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(65,\).*\(64,\)"):
        Llama.from_pretrained(saved)


def test_integer_weights_are_refused(saved):
    """An I64 norm weight was cast to float and loaded without a word."""
    _edit(saved, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int64)}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' is stored as I64"):
        Llama.from_pretrained(saved)


def test_tied_head_that_differs_is_refused(tmp_path):
    Llama(LlamaConfig.tiny(tie_word_embeddings=True)).save_pretrained(tmp_path)
    _edit(
        tmp_path,
        lambda t: t.update({"lm_head.weight": torch.zeros_like(t["model.embed_tokens.weight"])}),
    )
    with pytest.raises(CheckpointError, match="tie_word_embeddings"):
        Llama.from_pretrained(tmp_path)


def test_corrupt_file_is_named(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Llama.from_pretrained(saved)
    (saved / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Llama.from_pretrained(saved)


def test_pickled_checkpoints_are_refused_without_unpickling(saved):
    (saved / "model.safetensors").unlink()
    # A file that would run code if unpickled: loading must not even open it.
    (saved / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError, match="pickled.*pytorch_model.bin.*safetensors"):
        Llama.from_pretrained(saved)
    (saved / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="neither"):
        Llama.from_pretrained(saved)


def test_sharded_index_problems(tmp_path):
    Llama(LlamaConfig.tiny()).save_pretrained(tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / first).rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match=f"lists shard {first}, which is missing"):
        Llama.from_pretrained(tmp_path)
    (tmp_path / "elsewhere.safetensors").rename(tmp_path / first)
    wm = index["weight_map"]
    a = next(n for n, f in wm.items() if f == first)
    b = next(n for n, f in wm.items() if f != first)
    wm[a], wm[b] = (
        wm[b],
        wm[a],
    )  # both shards still listed, each holding a tensor assigned elsewhere
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not assigned to this shard"):
        Llama.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(CheckpointError, match="weight_map"):
        Llama.from_pretrained(tmp_path)
    for bad in ('{"weight_map": 3}', '{"weight_map": ["a"]}', '{"weight_map": {"x": null}}'):
        (tmp_path / "model.safetensors.index.json").write_text(bad)  # AttributeError before
        with pytest.raises(CheckpointError, match="weight_map must map tensor names to shard"):
            Llama.from_pretrained(tmp_path)


def test_bad_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        Llama.from_pretrained(tmp_path / "nope")
    Llama(LlamaConfig.tiny()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, attention_bias=True)))
    with pytest.raises(ConfigError, match="config.json: attention_bias=True"):
        Llama.from_pretrained(tmp_path)


def test_bf16_llama31_shaped_checkpoint_loads_in_transformers(tmp_path):
    # What a Llama-3.1 instruct directory carries: an eos list, llama3 rope, bf16 weights.
    small = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=301,
        rope_scaling={**LLAMA31_8B["rope_scaling"], "original_max_position_embeddings": 16},
    )
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_dict(dict(LLAMA31_8B, **small))).to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert hf.dtype == torch.bfloat16
    assert hf.config.eos_token_id == [128001, 128008, 128009]
    assert hf.config.rope_parameters["rope_type"] == "llama3"
    assert hf.config.rope_parameters["rope_theta"] == 500000.0
    with torch.no_grad():
        assert torch.equal(model(IDS), hf(IDS).logits)
