"""The model shapes `nemokern plan` knows by name (the published Llama-3.1 config.json values),
and reading any other one from a config.json file."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..model import LlamaConfig

_LLAMA_31 = dict(
    model_type="llama",
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    num_key_value_heads=8,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
    torch_dtype="bfloat16",
)
# meta-llama/Llama-3.1-{8B,70B,405B}/config.json: the fields that differ between the three
BUILTIN = {
    "llama-3.1-8b": dict(
        _LLAMA_31,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
    ),
    "llama-3.1-70b": dict(
        _LLAMA_31,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
    ),
    "llama-3.1-405b": dict(
        _LLAMA_31,
        hidden_size=16384,
        intermediate_size=53248,
        num_hidden_layers=126,
        num_attention_heads=128,
    ),
}


def model_shape(name: str, option: str = "--model") -> LlamaConfig:
    """A built-in name, a config.json file, or a model directory holding one; ConfigError naming
    `option` and the file otherwise."""
    if name in BUILTIN:
        return LlamaConfig.from_dict(BUILTIN[name], source=name)
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{option} {name}: neither a file, a model directory with config.json, nor one of "
            f"{', '.join(BUILTIN)}"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{option} {path}: not a JSON config file ({e})") from None
    try:
        return LlamaConfig.from_dict(data, source=f"{option} {path}")
    except ConfigError as e:
        raise ConfigError(str(e).replace("\n", " ")) from None
