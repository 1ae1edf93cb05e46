"""Triton kernels (one file per op) and their torch references. Knows nothing of models.

Must never import nemokern.ops or anything above it.
"""
