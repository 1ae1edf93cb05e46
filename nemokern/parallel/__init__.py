"""Tensor and data parallelism: the process mesh, the collectives (the all-reduce front end of the
nemokern._C extension among them) and the tensor-parallel layers."""

from .all_reduce import all_reduce  # noqa: F401
from .collectives import (  # noqa: F401
    all_gather,
    broadcast,
    copy_to_tp,
    gather_from_tp,
    rank_and_size,
    reduce_from_tp,
)
from .layers import (  # noqa: F401
    ColumnParallelLinear,
    RowParallelLinear,
    Shard,
    VocabParallelEmbedding,
    grad_norm_tp,
)
from .mesh import init_parallel  # noqa: F401
