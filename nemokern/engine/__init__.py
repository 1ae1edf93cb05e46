"""The engine every trainer shares and none of them is: the loop with its extension points
(loop.py) and what it is built from: the run's processes and device (distributed.py), AdamW and
the lr schedule (optimizer.py), the checks that make a resume exact (resume.py); checkpoints and
their resharding (checkpoint.py, reshard.py; the formats both read in state_format.py), the
dataclass + TOML config (config.py), the run directory's identity and lock (run_dir.py), metrics
(metrics.py), signal handling (stop.py) and the checks of run options (options.py)."""

from .checkpoint import Checkpointer, load_modules, save_modules
from .config import ConfigError, TrainConfig, build_config, option, parse_config
from .loop import NonFiniteError, StepOutput, TrainLoop
from .metrics import MetricsLogger

__all__ = [
    "Checkpointer",
    "ConfigError",
    "MetricsLogger",
    "NonFiniteError",
    "StepOutput",
    "TrainConfig",
    "TrainLoop",
    "build_config",
    "load_modules",
    "option",
    "parse_config",
    "save_modules",
]
