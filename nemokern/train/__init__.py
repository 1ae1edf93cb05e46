"""Training: the supervised fine-tuning trainer (sft.py), the reward trainer (reward.py), the
REINFORCE/RLOO trainer (reinforce.py), ExPO (expo.py), the embedded demo (demo.py), the recipe's
losses (losses.py), RewardBench scoring (rewardbench.py), checks of run options (options.py) and
the infrastructure the trainers share: config (config.py), checkpoints (checkpoint.py), metrics
(metrics.py) and the loop (loop.py)."""

from .checkpoint import Checkpointer, load_modules, save_modules
from .config import ConfigError, TrainConfig, build_config, option, parse_config
from .loop import NonFiniteError, StepOutput, TrainLoop
from .metrics import MetricsLogger
from .reinforce import ReinforceConfig, ReinforceTrainer
from .reward import RewardConfig, RewardTrainer
from .sft import SFTConfig, SFTTrainer

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
