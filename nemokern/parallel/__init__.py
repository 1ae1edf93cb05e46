"""Process groups, tensor-parallel layers and the all-reduce front end.

Must never import nemokern.model, data, train or cli.
"""

from .all_reduce import all_reduce  # noqa: E402,F401
