"""LlamaConfig: both rope spellings, round trips through transformers' config, clear errors."""

import copy
import dataclasses
import json

import pytest
from transformers import LlamaConfig as HFConfig

from helpers import LLAMA3_ROPE, LLAMA31_8B, hf_config
from nemokern.model import ConfigError, LlamaConfig


def test_llama31_rope_scaling_spelling():
    cfg = LlamaConfig.from_dict(LLAMA31_8B)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.rope_theta) == (8, 128, 500000.0)
    assert cfg.rope_scaling == {**LLAMA31_8B["rope_scaling"]}
    assert cfg.eos_token_ids == [128001, 128008, 128009]
    assert cfg.dtype == "bfloat16" and cfg.rms_norm_eps == 1e-5


def test_rope_parameters_spelling_as_transformers5_writes_it():
    d = hf_config(rope_scaling=LLAMA3_ROPE, rope_theta=123.0).to_dict()
    assert "rope_parameters" in d and d["rope_parameters"]["rope_theta"] == 123.0
    cfg = LlamaConfig.from_dict(d)
    assert cfg.rope_theta == 123.0
    assert cfg.rope_scaling == LLAMA3_ROPE


@pytest.mark.parametrize(
    "edit",
    [
        dict(rope_parameters={**LLAMA3_ROPE, "rope_theta": 42.0}),  # both spellings present
        dict(rope_scaling=None, rope_parameters={**LLAMA3_ROPE, "rope_theta": 42.0}),
        dict(rope_scaling={**LLAMA3_ROPE, "rope_theta": 42.0}),
        dict(rope_scaling=None, rope_parameters={"rope_type": "default"}, rope_theta=7.0),
    ],
)
def test_rope_precedence_as_in_transformers(edit):
    d = dict(LLAMA31_8B, **edit)
    theirs = HFConfig(**copy.deepcopy(d)).rope_parameters
    ours = LlamaConfig.from_dict(d)
    assert ours.rope_theta == theirs["rope_theta"]
    assert (ours.rope_scaling or {}).get("original_max_position_embeddings") == theirs.get(
        "original_max_position_embeddings"
    )


def test_old_type_key_and_default_rope():
    d = dict(LLAMA31_8B, rope_scaling={**LLAMA31_8B["rope_scaling"], "type": "llama3"})
    del d["rope_scaling"]["rope_type"]
    assert LlamaConfig.from_dict(d).rope_scaling["factor"] == 8.0
    plain = LlamaConfig.from_dict(dict(LLAMA31_8B, rope_scaling=None))
    assert plain.rope_scaling is None and plain.rope_theta == 500000.0
    d5 = hf_config(rope_theta=7.0).to_dict()
    assert d5["rope_parameters"]["rope_type"] == "default"
    assert (
        LlamaConfig.from_dict(d5).rope_scaling is None
        and LlamaConfig.from_dict(d5).rope_theta == 7.0
    )


@pytest.mark.parametrize("scaling", [LLAMA3_ROPE, None])
def test_round_trip_through_transformers(tmp_path, scaling):
    ours = LlamaConfig.tiny(
        rope_scaling=scaling,
        rope_theta=9876.0,
        tie_word_embeddings=True,
        head_dim=32,
        eos_token_id=[5, 6],
        dtype="bfloat16",
    )
    ours.to_json_file(tmp_path / "config.json")
    theirs = HFConfig.from_pretrained(tmp_path)
    assert theirs.rope_parameters["rope_theta"] == 9876.0
    assert theirs.rope_parameters["rope_type"] == ("llama3" if scaling else "default")
    if scaling:
        assert theirs.rope_parameters["factor"] == scaling["factor"]
    assert theirs.head_dim == 32 and theirs.tie_word_embeddings and theirs.num_key_value_heads == 2
    theirs.save_pretrained(tmp_path / "hf")
    back = LlamaConfig.from_json_file(tmp_path / "hf" / "config.json")
    assert dataclasses.replace(back, extra={}) == dataclasses.replace(ours, extra={})
    # What transformers 4.x reads: the rope_scaling + rope_theta spelling.
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_theta"] == 9876.0 and written["rope_scaling"] == scaling
    assert written["model_type"] == "llama" and written["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_type='yarn'"),
        ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "missing"),
        ("rope_scaling", {**LLAMA3_ROPE, "factor": -1.0}, "factor"),
        ("rope_scaling", {**LLAMA3_ROPE, "extra_key": 1}, "extra_key"),
        ("rope_scaling", "llama3", "must be an object"),
        ("attention_bias", True, "attention_bias"),
        ("mlp_bias", True, "mlp_bias"),
        ("hidden_act", "gelu", "hidden_act"),
        ("model_type", "mistral", "model_type"),
        ("pretraining_tp", 2, "pretraining_tp"),
        ("attention_dropout", 0.1, "attention_dropout"),
        ("num_key_value_heads", 3, "num_key_value_heads"),
        ("hidden_size", 0, "hidden_size"),
        ("torch_dtype", "int8", "dtype"),
        ("quantization_config", {"quant_method": "gptq"}, "quantization_config"),
    ],
)
def test_unsupported_values_name_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        LlamaConfig.from_dict(dict(LLAMA31_8B, **{field: value}), source="x/config.json")


def test_missing_fields_and_bad_files(tmp_path):
    d = dict(LLAMA31_8B)
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        LlamaConfig.from_dict(d)
    with pytest.raises(ConfigError, match="config.json not found"):
        LlamaConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LlamaConfig.from_json_file(tmp_path / "config.json")
    for key, value, match in [
        ("rope_theta", "abc", "rope_theta='abc' must be a positive number"),
        ("tie_word_embeddings", "false", "tie_word_embeddings='false' must be true or false"),
    ]:
        bad = {k: v for k, v in LLAMA31_8B.items() if k != "rope_parameters"} | {key: value}
        with pytest.raises(ConfigError, match=match):
            LlamaConfig.from_dict(bad)
    for text in ("[1]", "1", '"abc"'):  # JSON, but not an object: a TypeError traceback before
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ConfigError, match="config.json: expected a JSON object of settings"):
            LlamaConfig.from_json_file(tmp_path / "config.json")


@pytest.mark.parametrize("scaling", [None, LLAMA3_ROPE])
def test_config_without_rope_theta_uses_transformers_default(scaling):
    # A config.json may omit rope_theta; transformers then rotates with its default base, and a
    # checkpoint must give the same logits in both libraries whatever the rope spelling.
    d = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_theta", "rope_scaling")}
    if scaling is not None:
        d["rope_scaling"] = dict(scaling)
    theirs = HFConfig(**copy.deepcopy(d)).rope_parameters["rope_theta"]
    assert LlamaConfig.from_dict(d).rope_theta == theirs
