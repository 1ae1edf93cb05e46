"""Data: HelpSteer2 / HS2-Preference / RewardBench readers, packing, tokenizers, demo task.

Must never import nemokern.train or cli.
"""
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
    "ATTRIBUTES", "HELPFULNESS_INDEX", "LAYOUTS", "DataError", "PreferencePair", "ReadResult",
    "RegressionExample", "RewardBatch", "RewardBatches", "RewardDataset", "TokenizedExample",
    "detect_layout", "load_reward_data", "read_examples", "write_rows",
]
