"""Minimal Llama-3.1 model: config, layers, attention backends, generation, HF load/save.

Must never import nemokern.data, train or cli.
"""
