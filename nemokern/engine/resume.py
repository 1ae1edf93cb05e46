"""What makes a resume exact or refused: a digest of the training data's content, and the
check that a checkpoint was saved with this run's values of the options a resume may not change."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import torch

from .checkpoint import Checkpointer, CheckpointError
from .config import TrainConfig


def content_digest(obj) -> str:
    """A short hash of the content of nested micro-batches: tensors and arrays by value, lists,
    tuples, dicts and dataclasses by their items, numbers and strings; of any other object only
    its type (never its address)."""
    digest = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().contiguous()
            digest.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            digest.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
        elif isinstance(x, np.ndarray):
            digest.update(f"A{x.dtype}{x.shape}".encode() + np.ascontiguousarray(x).tobytes())
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            digest.update(type(x).__name__.encode())
            for f in dataclasses.fields(x):
                digest.update(f.name.encode())
                walk(getattr(x, f.name))
        elif isinstance(x, dict):
            digest.update(b"{")
            for k in sorted(x, key=str):
                digest.update(str(k).encode())
                walk(x[k])
        elif isinstance(x, list | tuple):
            digest.update(b"[" + str(len(x)).encode())
            for v in x:
                walk(v)
        elif x is None or isinstance(x, bool | int | float | str):
            digest.update(repr(x).encode())
        else:
            digest.update(type(x).__name__.encode())

    walk(obj)
    return digest.hexdigest()[:16]


def check_resume_options(config: TrainConfig, path, saved: dict) -> None:
    """CheckpointError naming the first option a resume may not change (not in
    config.RESUME_CHANGEABLE) whose value differs from `saved`, the checkpoint's record of them."""
    for key, value in config.resume_identity().items():
        if key in saved and saved[key] != value:
            raise CheckpointError(
                f"{path}: saved by a run with --{key.replace('_', '-')} {saved[key]!r}, this run "
                f"has {value!r}; it cannot change on resume (docs/training.md lists what can). "
                "Resume with the saved value, or start a new run in another --out"
            )


def check_resume(config: TrainConfig) -> None:
    """Before any work: the checkpoint config.resume names, if any, is complete and was saved
    with this run's values of the options a resume may not change (TrainLoop checks the rest:
    the data, the batching)."""
    checkpointer = Checkpointer(config.out)
    path = checkpointer.resolve(config.resume)
    if path is not None:
        saved = checkpointer.trainer_state(path)["data"]
        check_resume_options(config, path, saved["identity"])
