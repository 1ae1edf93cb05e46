"""Trainers (reward, REINFORCE/RLOO), losses, ExPO and checkpointing.

Must never import nemokern.cli.
"""
