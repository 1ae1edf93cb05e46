"""Trainers (reward, REINFORCE/RLOO), losses, ExPO and the training infrastructure they share:
config (config.py), checkpoints (checkpoint.py), metrics (metrics.py) and the loop (loop.py).
`ReinforceTrainer` / `ReinforceConfig` (reinforce.py) are importable from here.

Must never import nemokern.cli.
"""
from .checkpoint import Checkpointer, load_modules, save_modules
from .config import ConfigError, TrainConfig, build_config, option, parse_config
from .loop import NonFiniteError, StepOutput, TrainLoop
from .metrics import MetricsLogger
from .reinforce import ReinforceConfig, ReinforceTrainer

__all__ = [
    "Checkpointer", "ConfigError", "MetricsLogger", "NonFiniteError", "ReinforceConfig", "ReinforceTrainer",
    "StepOutput", "TrainConfig", "TrainLoop",
    "build_config", "load_modules", "option", "parse_config", "save_modules",
]
