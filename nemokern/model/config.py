"""LlamaConfig: the architecture numbers of a Llama-3.x model, read from/written to config.json.

Only what the model actually supports is accepted: anything else (another rope type, attention or
MLP biases, another activation, ...) raises ConfigError naming the config.json field.
Plain Python, no torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nemokern.errors import ConfigError

_ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_DTYPES = ("float32", "bfloat16", "float16")
# transformers' LlamaConfig base when config.json names no rope_theta (in either spelling); a file
# must rotate the same in both libraries, so this is not the Llama-3 value of the dataclass.
_HF_DEFAULT_ROPE_THETA = 10000.0


@dataclass
class LlamaConfig:
    """Architecture of a Llama-3.x decoder. Field names follow HF config.json.

    rope_scaling is None for plain RoPE or the llama3 dict {"rope_type": "llama3", "factor",
    "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    dtype: str | None = None  # the checkpoint's parameter dtype, e.g. "bfloat16"
    extra: dict[str, Any] = field(
        default_factory=dict, repr=False
    )  # other config.json keys, kept on save

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = _positive_int(self, "hidden_size") // _positive_int(
                self, "num_attention_heads"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            _positive_int(self, name)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; grouped-query attention needs it "
                "to be"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise ConfigError(
                f"rms_norm_eps={self.rms_norm_eps} and rope_theta={self.rope_theta} must be > 0"
            )
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not supported; use one of {_DTYPES}")
        self.rope_scaling = _check_llama3_scaling(self.rope_scaling)

    @property
    def eos_token_ids(self) -> list[int]:
        """eos_token_id as a list (Llama-3.1 instruct lists several)."""
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    # ---- config.json -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> LlamaConfig:
        """Parse an HF config dict (either rope spelling). `source` names the file in errors."""
        if not isinstance(d, dict):
            raise ConfigError(
                f"{source}: expected a JSON object of settings, got {type(d).__name__}"
            )
        d = dict(d)

        def refuse(key, ok, fix):
            if key in d and d[key] is not None and not ok(d[key]):
                raise ConfigError(f"{source}: {key}={d[key]!r} is not supported by nemokern; {fix}")

        refuse(
            "model_type", lambda v: v == "llama", "only model_type 'llama' (Llama-3.x) is supported"
        )
        refuse("hidden_act", lambda v: v == "silu", "Llama uses hidden_act 'silu'")
        refuse("attention_bias", lambda v: v is False, "set attention_bias to false")
        refuse("mlp_bias", lambda v: v is False, "set mlp_bias to false")
        refuse("pretraining_tp", lambda v: v == 1, "set pretraining_tp to 1")
        refuse("attention_dropout", lambda v: v == 0, "set attention_dropout to 0.0")
        refuse("quantization_config", lambda v: False, "load an unquantized (bf16/fp32) checkpoint")
        missing = [
            k
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            )
            if k not in d
        ]
        if missing:
            raise ConfigError(f"{source}: required field(s) {missing} missing")

        rope = _read_rope(d, source)
        known = {
            f for f in cls.__dataclass_fields__ if f not in ("extra", "rope_scaling", "rope_theta")
        }
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        for k, v in kwargs.items():  # "false" (a string) would read as true
            if isinstance(cls.__dataclass_fields__[k].default, bool) and not isinstance(v, bool):
                raise ConfigError(f"{source}: {k}={v!r} must be true or false (a JSON boolean)")
        dtype = d.pop("torch_dtype", None)
        kwargs.setdefault("dtype", dtype)
        for k in (
            "rope_scaling",
            "rope_parameters",
            "rope_theta",
            "architectures",
            "transformers_version",
        ):
            d.pop(k, None)
        try:
            return cls(**kwargs, rope_theta=rope[0], rope_scaling=rope[1], extra=d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:  # e.g. a null where a number belongs
            raise ConfigError(f"{source}: bad value type: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> LlamaConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} not found; a model directory needs config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The HF config.json dict. Writes both rope spellings so transformers 4.x and 5.x agree."""
        d = dict(self.extra)
        d.update(
            {k: v for k, v in asdict(self).items() if k not in ("extra", "rope_scaling", "dtype")}
        )
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters.update(self.rope_scaling)
        d.update(
            model_type="llama",
            architectures=["LlamaForCausalLM"],
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            attention_dropout=0.0,
            pretraining_tp=1,
            rope_parameters=rope_parameters,
            rope_scaling=None if self.rope_scaling is None else dict(self.rope_scaling),
        )
        if self.dtype is not None:
            d["dtype"] = d["torch_dtype"] = self.dtype
        return dict(sorted(d.items()))

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def tiny(cls, **overrides) -> LlamaConfig:
        """A few-hundred-kB Llama-3.1-shaped config for demos and tests (GQA, llama3 rope)."""
        base = dict(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            max_position_embeddings=512,
        )
        base.update(overrides)
        return cls(**base)


def _positive_int(cfg, name):
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{name}={v!r} must be a positive integer")
    return v


def _read_rope(d, source):
    """(rope_theta, llama3 scaling dict or None) from `rope_parameters` or
    `rope_scaling` + `rope_theta`."""
    # transformers 5 precedence: a non-empty rope_scaling (old spelling) over rope_parameters.
    params = d.get("rope_scaling") or d.get("rope_parameters")
    key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    theta = d.get("rope_theta")
    if params is None:
        return (_HF_DEFAULT_ROPE_THETA if theta is None else _theta(theta, source)), None
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: {key} must be an object, got {params!r}")
    params = dict(params)
    # As in transformers: the rope dict's own rope_theta wins, then the top-level one, then 1e4.
    theta = params.pop("rope_theta", None) or theta or _HF_DEFAULT_ROPE_THETA
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in _ROPE_TYPES:
        raise ConfigError(
            f"{source}: {key}.rope_type={rope_type!r} is not supported; use one of {_ROPE_TYPES}"
        )
    if rope_type == "default":
        if params:
            raise ConfigError(
                f"{source}: {key} has unexpected keys {sorted(params)} for rope_type 'default'"
            )
        return _theta(theta, source), None
    theta = _theta(theta, source)
    try:
        return theta, _check_llama3_scaling({"rope_type": "llama3", **params})
    except ConfigError as e:
        raise ConfigError(f"{source}: {key}: {e}") from None


def _theta(value, source) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{source}: rope_theta={value!r} must be a positive number")
    return float(value)


def _check_llama3_scaling(s):
    if s is None:
        return None
    if not isinstance(s, dict) or s.get("rope_type", s.get("type")) != "llama3":
        raise ConfigError(
            f"rope_scaling={s!r} is not supported; use None or a rope_type 'llama3' dict"
        )
    s = {k: v for k, v in s.items() if k != "type"}
    s["rope_type"] = "llama3"
    missing = [k for k in _LLAMA3_KEYS if k not in s]
    extra = sorted(set(s) - set(_LLAMA3_KEYS) - {"rope_type"})
    if missing or extra:
        raise ConfigError(
            f"llama3 rope scaling needs exactly {list(_LLAMA3_KEYS)}; missing {missing}, unknown "
            f"{extra}"
        )
    for k in _LLAMA3_KEYS:
        v = s[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"rope scaling {k}={v!r} must be a positive number")
    if s["high_freq_factor"] <= s["low_freq_factor"]:
        raise ConfigError(
            f"rope scaling high_freq_factor={s['high_freq_factor']} must exceed "
            f"low_freq_factor={s['low_freq_factor']}"
        )
    s["original_max_position_embeddings"] = int(s["original_max_position_embeddings"])
    return s
