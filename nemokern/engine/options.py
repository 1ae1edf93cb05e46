"""Checks of run options (device, output directory, counts) shared by the demo and the CLI.

Each check raises ConfigError with `option` set to the option's Python keyword; the CLI turns
that into one line naming the command-line flag, with exit status 2.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from nemokern.errors import ConfigError


def int_at_least(option: str, value, low: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(
            f"{value!r} is not allowed; {what} must be an integer >= {low}", option=option
        )
    return value


def device(option: str, value) -> torch.device:
    """A torch.device of type cpu or cuda that this machine has."""
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"{value!r} is not a device; use cpu, cuda or cuda:N", option=option
        ) from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"{value!r} is not supported; use cpu, cuda or cuda:N", option=option)
    if torch.version.cuda is None:
        raise ConfigError(
            f"{value!r} needs a CUDA build of torch; this torch "
            f"({torch.__version__}) is CPU-only, so use cpu",
            option=option,
        )
    count = torch.cuda.device_count()
    if count == 0:
        raise ConfigError(f"{value!r}: no CUDA GPU is visible; use cpu", option=option)
    if dev.index is not None and dev.index >= count:
        raise ConfigError(
            f"{value!r}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}",
            option=option,
        )
    return dev


def out_dir(option: str, value) -> Path:
    """A directory that exists and is writable, or one that can be created."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"{str(path)!r} exists and is not a directory; name a directory", option=option
        )
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(
            f"{str(parent)!r} is not a directory, so {str(path)!r} cannot be created there",
            option=option,
        )
    try:  # a real write: permissions alone miss read-only mounts and /proc-like file systems
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".nemokern-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(
            f"cannot write in {str(parent)!r} ({e.strerror}); name a writable directory",
            option=option,
        ) from None
    return path
