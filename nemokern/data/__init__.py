"""Data: HelpSteer2 / HS2-Preference / RewardBench readers, packing, tokenizers, demo task.

Must never import nemokern.train or cli.
"""
