"""How a checkpoint stores state; checkpoint.py writes and reads it, reshard.py reads it at
another tensor-parallel size or process count.

A state dict (optimizer, scheduler, trainer, RNG) is two files, NAME.json and NAME.safetensors:
the JSON holds its structure and every value that is not a tensor, each tensor a reference into
the safetensors file (`encode_state` / `decode_state`). Nothing is pickled.
A model's weights are its Llama parts in HF layout (`hf_parts`: "model/" for a Llama, else a
directory per Llama child, named after it) and every other parameter or buffer in REST_FILE, by
state-dict name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from nemokern.model.hf import CheckpointError, open_safetensors, save_safetensors
from nemokern.model.llama import Llama

REST_FILE = "modules.safetensors"
DAMAGED = "the checkpoint is incomplete or corrupt"


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of `tensor` that shares no memory with it, made in one copy: from a
    GPU, `.to("cpu").contiguous().clone()` would make a second host copy of every tensor (of the
    whole AdamW state, at a checkpoint)."""
    tensor = tensor.detach()
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu").copy_(tensor)


def encode_state(obj, tensors: dict, key: str = "s"):
    """A JSON-able copy of `obj` in which every tensor is replaced by a reference into `tensors`.

    Tuples, non-string dict keys and numpy arrays are tagged so that decode_state rebuilds them
    exactly (optimizer state dicts have int keys; RNG states are tuples).
    """
    if isinstance(obj, torch.Tensor):
        if key in tensors:  # a dict key with a dot in it can spell another entry's path
            key = f"{key}#{len(tensors)}"
        tensors[key] = host_copy(obj)
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_state(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {
            "__items__": [
                [encode_state(k, tensors, f"{key}.k{i}"), encode_state(v, tensors, f"{key}.{i}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(
        f"checkpoint state {key}: cannot store a {type(obj).__name__} (only tensors, numbers, "
        "strings, lists, tuples, dicts and numpy arrays)"
    )


def decode_state(obj, tensors: dict, where: str = "state"):
    """Inverse of encode_state; `where` names the file in errors."""
    if isinstance(obj, list):
        return [decode_state(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        if obj["__tensor__"] not in tensors:
            raise CheckpointError(f"{where}: tensor {obj['__tensor__']!r} is missing")
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(decode_state(v, tensors, where) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {
            decode_state(k, tensors, where): decode_state(v, tensors, where)
            for k, v in obj["__items__"]
        }
    return {k: decode_state(v, tensors, where) for k, v in obj.items()}


def save_state(obj, directory: Path, name: str) -> None:
    """Write `obj` as directory/NAME.json and directory/NAME.safetensors."""
    tensors: dict = {}
    encoded = encode_state(obj, tensors)
    (directory / f"{name}.json").write_text(json.dumps(encoded))
    save_safetensors(tensors, directory / f"{name}.safetensors")


def read_encoded(directory: Path, name: str):
    """directory/NAME.json as encode_state wrote it; CheckpointError naming the file if it is
    missing or not JSON."""
    path = directory / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the checkpoint is corrupt") from None


def load_state(directory: Path, name: str):
    """What save_state(obj, directory, name) wrote: `obj`, its tensors on the CPU."""
    encoded = read_encoded(directory, name)
    tensors = read_tensors(directory / f"{name}.safetensors")
    return decode_state(encoded, tensors, str(directory / f"{name}.json"))


def open_tensors(path: Path):
    """A safetensors file opened for reading (a context manager); CheckpointError naming it if it
    is missing or unreadable."""
    return open_safetensors(path, DAMAGED)


def read_tensors(path: Path) -> dict:
    """Every tensor of the safetensors file `path`, by name."""
    with open_tensors(path) as f:
        try:
            return {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # a header promising more bytes than the file holds
            raise CheckpointError(f"{path}: a tensor cannot be read ({e}); {DAMAGED}") from None


def hf_parts(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The submodules stored in HF layout, by name: the model itself ("") if it is a Llama, else
    its Llama children (a RewardModel's trunk)."""
    if isinstance(model, Llama):
        return {"": model}
    return {name: child for name, child in model.named_children() if isinstance(child, Llama)}


def part_dir(directory: Path, name: str) -> Path:
    """The HF-layout directory of hf_parts' part `name` in a checkpoint."""
    return directory / (name or "model")
