"""Minimal Llama-3.1 model: config, layers, attention backends, generation, HF load/save."""

from .attention import KVCache, packed_attention, packed_backend
from .config import ConfigError, LlamaConfig
from .generate import Generation, generate, sample_next
from .hf import CheckpointError
from .llama import Llama
from .reward import ATTRIBUTES, RewardModel

__all__ = [
    "ATTRIBUTES",
    "CheckpointError",
    "ConfigError",
    "Generation",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "RewardModel",
    "generate",
    "packed_attention",
    "packed_backend",
    "sample_next",
]
