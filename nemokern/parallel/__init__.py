"""Process groups, tensor-parallel layers and the all-reduce front end.

Must never import nemokern.model, data, train or cli.
"""
