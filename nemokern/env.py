"""Every NEMOKERN_* environment variable: its name, default, meaning and how its value is read.

No other module reads these variables from os.environ; they call `flag`, `choice`, `number` or
`text`.
Booleans are spelled 0/1, false/true or off/on (any case) everywhere. An empty value means the
default. `python -m nemokern.env` prints the README's table; a test keeps the two equal.
It imports only nemokern.errors (which imports nothing) and not torch, so setup.py can read it
from the source tree.
"""

import os
from dataclasses import dataclass

from nemokern.errors import EnvError

MiB = 1 << 20
_TRUE, _FALSE = ("1", "true", "on"), ("0", "false", "off")


@dataclass(frozen=True)
class Variable:
    name: str
    default: object  # bool, str (a choice, or free text), int or float
    meaning: str
    choices: tuple = ()
    shown: str = ""  # how the README writes the default, when not str(default)


VARIABLES = {
    v.name: v
    for v in (
        Variable(
            "NEMOKERN_BACKEND",
            "auto",
            "op kernels: auto (CUDA tensors run Triton, CPU "
            "tensors the torch reference), or force triton / torch",
            ("auto", "triton", "torch"),
        ),
        Variable(
            "NEMOKERN_ATTENTION",
            "auto",
            "packed attention: auto, or force flash_attn / torch_varlen / sdpa",
            ("auto", "flash_attn", "torch_varlen", "sdpa"),
        ),
        Variable(
            "NEMOKERN_CHECK_TARGETS",
            True,
            "check target ids against the vocabulary (one "
            "host sync per call) and tp_group ranks against each other",
        ),
        Variable("NEMOKERN_CUSTOM_ALLREDUCE", True, "0 = always torch.distributed"),
        Variable(
            "NEMOKERN_ALLREDUCE_MAX_BYTES",
            16 * MiB,
            "custom path up to this size (CUDA: IPC buffer size)",
            shown="16 MiB",
        ),
        Variable("NEMOKERN_ALLREDUCE_TIMEOUT", 300.0, "seconds to wait for a peer", shown="300"),
        Variable(
            "NEMOKERN_ALLREDUCE_ONE_SHOT_BYTES",
            256 * 1024,
            "one-shot / two-shot switch",
            shown="256 KiB",
        ),
        Variable(
            "NEMOKERN_SHM_CHUNK_BYTES", 4 * MiB, "CPU workspace per rank and parity", shown="4 MiB"
        ),
        Variable("NEMOKERN_NO_CUDA", False, "build: 1 = skip the CUDA part of the extension"),
        Variable("NEMOKERN_CUDA_ARCHS", "80;90", "build: GPU architectures of the CUDA part"),
    )
}


def _raw(name: str) -> str:
    if name not in VARIABLES:
        raise KeyError(f"{name} is not in nemokern.env.VARIABLES; add it there first")
    return os.environ.get(name, "").strip()


def flag(name: str) -> bool:
    """A boolean variable: 0/1, false/true, off/on; unset or empty gives the default."""
    raw = _raw(name).lower()
    if not raw:
        return VARIABLES[name].default
    if raw in _TRUE or raw in _FALSE:
        return raw in _TRUE
    raise EnvError(f"{name}={raw!r} is not a boolean; use 0/1, false/true or off/on, or unset it")


def choice(name: str) -> str:
    """A variable holding one of a fixed set of names (lower-cased); unset gives the default."""
    var = VARIABLES[name]
    raw = _raw(name).lower() or var.default
    if var.choices and raw not in var.choices:
        raise EnvError(
            f"{name}={raw!r} is not allowed; use one of {', '.join(var.choices)} or unset it"
        )
    return raw


def number(name: str):
    """A positive number (int or float, as the default is); unset gives the default."""
    var = VARIABLES[name]
    raw = _raw(name)
    if not raw:
        return var.default
    try:
        value = type(var.default)(raw)
    except ValueError:
        raise EnvError(
            f"{name}={raw!r} is not a number; unset it or give e.g. {var.default}"
        ) from None
    if value <= 0:
        raise EnvError(f"{name}={raw!r} must be positive")
    return value


def text(name: str) -> str:
    """A free-text variable (e.g. a list); unset or empty gives the default."""
    return _raw(name) or VARIABLES[name].default


def check_all() -> None:
    """Read every variable once: raises EnvError for the first one holding a bad value."""
    for v in VARIABLES.values():
        if isinstance(v.default, bool):
            flag(v.name)
        elif v.choices:
            choice(v.name)
        elif isinstance(v.default, (int, float)):
            number(v.name)


def markdown_table() -> str:
    """The README's table of variables."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for v in VARIABLES.values():
        default = v.shown or (str(int(v.default)) if isinstance(v.default, bool) else v.default)
        rows.append(f"| {v.name} | {default} | {v.meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
