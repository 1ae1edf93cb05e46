"""The public training API under its first import path: the trainers and their configs
(nemokern.trainers) and the engine's names (nemokern.engine), re-exported unchanged."""

from nemokern.engine import (
    Checkpointer,
    ConfigError,
    MetricsLogger,
    NonFiniteError,
    StepOutput,
    TrainConfig,
    TrainLoop,
    build_config,
    load_modules,
    option,
    parse_config,
    save_modules,
)
from nemokern.trainers import (
    ReinforceConfig,
    ReinforceTrainer,
    RewardConfig,
    RewardTrainer,
    SFTConfig,
    SFTTrainer,
)

__all__ = [
    "Checkpointer",
    "ConfigError",
    "MetricsLogger",
    "NonFiniteError",
    "ReinforceConfig",
    "ReinforceTrainer",
    "RewardConfig",
    "RewardTrainer",
    "SFTConfig",
    "SFTTrainer",
    "StepOutput",
    "TrainConfig",
    "TrainLoop",
    "build_config",
    "load_modules",
    "option",
    "parse_config",
    "save_modules",
]
