"""The trainers, each a recipe over the engine: what a batch is and what the loss is.
Supervised fine-tuning (sft.py), the reward model (reward.py, with RewardBench's accuracy
formulas in rewardbench.py), REINFORCE/RLOO (reinforce.py, its options reinforce_config.py and
its rollout, rollout.py), the recipe's losses (losses.py) and the reference presets (presets.py)."""

from .reinforce import ReinforceTrainer
from .reinforce_config import ReinforceConfig
from .reward import RewardConfig, RewardTrainer
from .sft import SFTConfig, SFTTrainer

__all__ = [
    "ReinforceConfig",
    "ReinforceTrainer",
    "RewardConfig",
    "RewardTrainer",
    "SFTConfig",
    "SFTTrainer",
]
