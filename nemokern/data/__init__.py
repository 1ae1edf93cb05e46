"""Data: readers of HelpSteer2 / HelpSteer2-Preference / RewardBench rows (readers.py), packed
reward batches (packing.py), the synthetic reward task (synthetic.py) and tokenizers
(tokenizer.py: a local HF tokenizer directory, or the built-in byte one)."""

from .packing import (
    RewardBatch,
    RewardBatches,
    RewardDataset,
    TokenizedExample,
    load_reward_data,
)
from .readers import (
    ATTRIBUTES,
    HELPFULNESS_INDEX,
    LAYOUTS,
    DataError,
    PreferencePair,
    ReadResult,
    RegressionExample,
    detect_layout,
    read_examples,
    write_rows,
)

__all__ = [
    "ATTRIBUTES",
    "HELPFULNESS_INDEX",
    "LAYOUTS",
    "DataError",
    "PreferencePair",
    "ReadResult",
    "RegressionExample",
    "RewardBatch",
    "RewardBatches",
    "RewardDataset",
    "TokenizedExample",
    "detect_layout",
    "load_reward_data",
    "read_examples",
    "write_rows",
]
