"""HF checkpoint I/O for Llama: config.json + safetensors (one file, or shards with an index).

Names: HF's "model.<name>" is nemokern's "<name>", "lm_head.weight" is the same in both. With
tie_word_embeddings the LM head is the embedding and the checkpoint stores it once.
Loading reads safetensors only and never unpickles (no *.bin); under tensor parallelism each rank
reads only its slices of the memory-mapped files, and saving gathers them for one writer. Every
problem raises CheckpointError naming the file and tensor, including a tensor holding nan/inf (a
corrupted payload would otherwise load silently and give NaN logits; check_finite=False skips
that check).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError, ConfigError
from ..parallel import rank_and_size
from ..parallel.fsdp import copy_into, first_holder, full_tensor
from .config import LlamaConfig
from .deferred import defer

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the floating-point dtypes of safetensors headers (get_slice(...).get_dtype()), as torch dtypes
SAFETENSORS_FLOATS = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


# RoPE's inv_freq, which older transformers versions wrote into checkpoints (per layer, or once
# for the model): nemokern derives it from config.json, and transformers skips it when loading.
DERIVED_BUFFER = re.compile(r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")


def hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else "model." + name


def resolve_dtype(dtype, config: LlamaConfig) -> torch.dtype:
    """Explicit dtype (torch.dtype or name) > config.json's dtype > float32."""
    dtype = config.dtype if dtype is None else dtype
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in _DTYPES:
            raise ConfigError(f"dtype={dtype!r} is not supported; use one of {sorted(_DTYPES)}")
        return _DTYPES[dtype.removeprefix("torch.")]
    if dtype not in _DTYPES.values():
        raise ConfigError(
            f"dtype={dtype} is not supported; use torch.float32, torch.bfloat16 or torch.float16"
        )
    return dtype


def weight_files(path: Path) -> dict[str, Path | None]:
    """{tensor name -> the shard the index assigns it}, or {None: the single file}."""
    if (path / SINGLE).is_file():
        return {None: path / SINGLE}
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{path / INDEX}: not a safetensors index with a weight_map ({e!r})"
            ) from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()
        ):
            raise CheckpointError(
                f"{path / INDEX}: weight_map must map tensor names to shard file names"
            )
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).is_file():
                raise CheckpointError(
                    f"{path / INDEX} lists shard {f}, which is missing from {path}"
                )
        return {name: path / f for name, f in weight_map.items()}
    pickled = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise CheckpointError(
            f"{path} holds only pickled weights ({', '.join(pickled)}); nemokern loads safetensors "
            "only "
            "because unpickling can execute code. Convert them (e.g. transformers' "
            "save_pretrained(..., safe_serialization=True)) on a machine you trust."
        )
    raise CheckpointError(f"{path} has neither {SINGLE} nor {INDEX}")


def shards_by_name(model) -> dict:
    """{HF tensor name: the Shard of this rank} for every tensor-parallel weight of `model`."""
    return {
        hf_name(f"{name}.weight"): m.shard
        for name, m in model.named_modules()
        if getattr(m, "tp_group", None) is not None and hasattr(m, "shard")
    }


def empty(cls, config, *, dtype, device, tp_group=None, activation_checkpointing=False):
    """A model whose tensors are allocated but not initialised (built on the meta device: no time
    spent on a random init that is overwritten next), tied head included."""
    with torch.device("meta"):
        model = cls(config, tp_group=tp_group, activation_checkpointing=activation_checkpointing)
    model = model.to(dtype).to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty makes new Parameters
    return model


def split_from(cls, full, tp_group):
    """This rank's part of the unsplit model `full` under tp_group: what from_pretrained(...,
    tp_group=tp_group) would read from full's saved files (the same slices, in full's dtype and
    on its device), with no random init and no files."""
    if tp_group is None:
        return full
    weight = full.embed_tokens.weight
    model = empty(
        cls,
        full.config,
        dtype=weight.dtype,
        device=weight.device,
        tp_group=tp_group,
        activation_checkpointing=full.activation_checkpointing,
    )
    shards = shards_by_name(model)
    with torch.no_grad():
        for name, target in model.named_parameters():  # a tied head is listed once
            source, shard = full.get_parameter(name), shards.get(hf_name(name))
            target.copy_(source if shard is None else shard.take(source))
    return model


def load_pretrained(
    cls,
    path,
    *,
    dtype=None,
    device=None,
    tp_group=None,
    activation_checkpointing=False,
    check_finite=True,
    deferred=False,
):
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is not a directory; from_pretrained wants a local HF model directory"
        )
    config = LlamaConfig.from_json_file(path / "config.json")
    dtype = resolve_dtype(dtype, config)
    assigned = weight_files(path)
    # a tied head is one tensor under two modules, which FSDP's unit boundaries and to_empty
    # would part: such a model (small: tying is for 1-3B models) is read at once
    deferred = deferred and not config.tie_word_embeddings
    model = empty(
        cls,
        config,
        dtype=dtype,
        device="meta" if deferred else torch.device("cpu" if device is None else device),
        tp_group=tp_group,
        activation_checkpointing=activation_checkpointing,
    )
    if deferred:
        defer(model, lambda: _fill(model, path, assigned, check_finite))
    else:
        _fill(model, path, assigned, check_finite)
    return model


def check_checkpoint(cls, path) -> LlamaConfig:
    """The HF directory `path` checked as from_pretrained(path) checks it, without reading a
    tensor: config.json is a valid LlamaConfig, and the weight files' headers hold exactly the
    tensors that config implies, each of the shape it implies. Returns that config; every
    problem raises ConfigError or CheckpointError naming the file and the field or tensor."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; a model directory is wanted")
    config = LlamaConfig.from_json_file(path / "config.json")
    assigned = weight_files(path)
    model = empty(cls, config, dtype=torch.float32, device="meta")  # shapes only: no memory
    for _ in _checked_tensors(model, path, assigned):
        pass
    return config


def _checked_tensors(model, path: Path, assigned):
    """Yield (file, name, slice handle, parameter of `model` or None, this rank's shard or None)
    for every tensor of the checkpoint at `path` that `model` takes, once its name and full shape
    are checked against `model`'s config (headers only: nothing is read); a tied model's stored
    lm_head comes with parameter None. CheckpointError for a tensor that is repeated, unexpected
    or misshapen, and at the end for one missing."""
    config = model.config
    expected = {hf_name(n): p for n, p in model.named_parameters()}  # tied head listed once
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    shards = shards_by_name(model)
    loaded: set[str] = set()
    for file in dict.fromkeys(assigned.values()):
        for name, stored in _read(file, assigned):
            if name in loaded:
                raise CheckpointError(f"{file}: tensor {name!r} appears in more than one shard")
            if DERIVED_BUFFER.fullmatch(name):
                continue  # RoPE's inv_freq (older transformers): follows from config.json
            if name == "lm_head.weight" and config.tie_word_embeddings:
                yield file, name, stored, None, shards.get(name)
                continue
            if name not in expected:
                raise CheckpointError(
                    f"{file}: unexpected tensor {name!r} for this config.json "
                    f"(num_hidden_layers={config.num_hidden_layers}, tie_word_embeddings="
                    f"{config.tie_word_embeddings}); is the config from another model?"
                )
            target, shard = expected[name], shards.get(name)
            implied = list(target.shape)
            if shard is not None:
                implied[shard.dim] = shard.full
            if tuple(stored.get_shape()) != tuple(implied):
                raise CheckpointError(
                    f"{file}: tensor {name!r} has shape {tuple(stored.get_shape())}, "
                    f"config.json implies {tuple(implied)}"
                )
            if stored.get_dtype() not in SAFETENSORS_FLOATS:  # an integer one was cast silently
                raise CheckpointError(
                    f"{file}: tensor {name!r} is stored as {stored.get_dtype()}; model weights "
                    "are floating point"
                )
            yield file, name, stored, target, shard
            loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        where = {str(assigned.get(n, assigned.get(None))) for n in missing}
        raise CheckpointError(
            f"{path}: tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} "
            f"missing (looked in {sorted(where)})"
        )


@torch.no_grad()
def _fill(model, path: Path, assigned, check_finite: bool) -> None:
    """Copy every tensor of the checkpoint at `path` into `model`'s parameters, one at a time
    (this rank's tensor-parallel slice of each; a parameter sharded by FSDP keeps its rows)."""
    tied_head = None
    for file, name, stored, target, shard in _checked_tensors(model, path, assigned):
        tensor = _slice(file, name, stored, shard)
        if target is None:  # a tied model's stored lm_head: must equal the embedding
            tied_head = (file, tensor)
            continue
        if check_finite:
            _check_finite(file, name, tensor)
        copy_into(target, tensor)
    head = model.lm_head.weight
    if tied_head is not None and not torch.equal(tied_head[1].to(head), head):
        raise CheckpointError(
            f"{tied_head[0]}: lm_head.weight differs from model.embed_tokens.weight although "
            "config.json has tie_word_embeddings=true; set it to false to load both"
        )


def read_tensor(path, name: str, rows: slice = slice(None)) -> torch.Tensor:
    """Rows `rows` of the tensor `name` in the HF directory `path` (sharded or not), read from
    the memory-mapped file alone; CheckpointError naming the file if it lacks the tensor."""
    path = Path(path)
    assigned = weight_files(path)
    file = assigned.get(name, assigned.get(None))
    if file is None:
        raise CheckpointError(f"{path}: no tensor {name!r} in {INDEX}")
    with open_safetensors(file) as f:
        if name not in f.keys():
            raise CheckpointError(f"{file}: no tensor {name!r}")
        return f.get_slice(name)[rows]


def _check_finite(file: Path, name: str, tensor: torch.Tensor):
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(
            f"{file}: tensor {name!r} holds {bad} nan/inf value(s) of "
            f"{tensor.numel()}; the file is corrupted or the model diverged "
            "(check_finite=False loads it anyway)"
        )


def _slice(file: Path, name: str, stored, shard) -> torch.Tensor:
    """The tensor behind a safetensors slice handle, or only this rank's `shard` of it."""
    try:
        return stored[:] if shard is None else shard.read(stored)
    except Exception as e:
        raise CheckpointError(f"{file}: tensor {name!r} cannot be read ({e})") from None


def open_safetensors(file: Path | str, fix: str = "re-download or re-save it"):
    """safe_open(file) on the CPU: a context manager over the memory-mapped file (nothing is read
    until a tensor is asked for). A missing file or an unreadable header raises CheckpointError
    naming the file, followed by `fix` (what the reader should do about it)."""
    if not Path(file).is_file():
        raise CheckpointError(f"{file} is missing; {fix}")
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for truncated/garbled headers
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); {fix}") from None


def _read(file: Path, assigned):
    """Yield (name, safetensors slice handle) from one memory-mapped safetensors file, with errors
    that name the file; nothing is read until the handle is sliced.

    The file is mapped anew for each tensor and unmapped before the next: the pages a slice
    touches count in the process's resident set while mapped (a row-parallel slice touches
    nearly every page of its tensor), so a whole shard file never stays resident per rank.
    """
    with open_safetensors(file) as f:
        names = list(f.keys())
    for name in names:
        if None not in assigned and assigned.get(name) != file:
            raise CheckpointError(
                f"{file}: tensor {name!r} is not assigned to this shard in {INDEX}"
            )
        with open_safetensors(file) as f:
            try:
                stored = f.get_slice(name)
            except Exception as e:
                raise CheckpointError(f"{file}: tensor {name!r} cannot be read ({e})") from None
            yield name, stored


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "200MB", "50KB" (decimal, as transformers)."""
    if isinstance(size, int):
        if size < 1:
            raise ConfigError(f"max_shard_size={size!r} must be at least 1 byte")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ConfigError(
            f"max_shard_size={size!r} is not a size; use bytes or a string like '5GB'"
        )
    unit = (m.group(2) or "B").upper()
    scale = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }[unit]
    size_bytes = int(float(m.group(1)) * scale)
    if size_bytes < 1:
        raise ConfigError(f"max_shard_size={size!r} must be at least 1 byte")
    return size_bytes


def save_pretrained(model, path, *, max_shard_size: int | str = "5GB") -> None:
    """Collective over model.tp_group when it has one, or over the data-parallel processes when
    FSDP shards the model: every rank joins the gathers (one tensor at a time), the first one
    writes; the others return without waiting for the files (barrier before reading them)."""
    path = Path(path)
    limit = parse_size(max_shard_size)
    params = {hf_name(n): p for n, p in model.named_parameters()}  # lists a tied weight once
    # sharded by FSDP: every process joins each gather, the first one writes
    writer = rank_and_size(model.tp_group)[0] == 0 and first_holder(params.values())
    slices = shards_by_name(model)

    def full(name):
        shard = slices.get(name)
        p = full_tensor(params[name].detach())
        return p if shard is None else shard.full_tensor(p, model.tp_group)

    def full_bytes(name):
        p, shard = params[name], slices.get(name)
        return p.numel() * p.element_size() * (1 if shard is None else shard.full // shard.size)

    if writer:
        path.mkdir(parents=True, exist_ok=True)
        dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
        dataclasses.replace(model.config, dtype=dtype).to_json_file(path / "config.json")

    write_safetensors(path, list(params), full_bytes, full, limit=limit, writer=writer)


def remove_weight_files(path: Path) -> None:
    """Delete the HF weight files in `path` (model*.safetensors and the index): an old shard set
    would otherwise shadow or mix with the one about to be written."""
    for stale in [*path.glob("model*.safetensors"), path / INDEX]:
        stale.unlink(missing_ok=True)


@contextmanager
def staged_directory(out: Path, label: str) -> Iterator[Path]:
    """A new directory beside `out` to write into, named .{out's name}.{label}-... On success it
    becomes `out`: renamed to it when `out` is absent or empty, otherwise its files replace those
    of `out` (whose old weight files are removed first). On failure it is removed and `out` is
    left as it was. Made with mkdir, not mkdtemp (0700), so `out` gets the usual permissions."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.{label}-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if not out.exists():
            os.replace(staging, out)
            return
        remove_weight_files(out)
        for file in staging.iterdir():
            os.replace(file, out / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    """This process's umask (from /proc where it is readable; elsewhere set and restored)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """safetensors' save_file with the permissions the umask gives a new file (0644 under 022):
    save_file writes a temporary file (mode 0600) and renames it into place."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def write_safetensors(path: Path, names, nbytes, load, *, limit: int, writer: bool = True) -> None:
    """The weight files of an HF directory: `names` in order, split into shards of at most
    `limit` bytes (`nbytes(name)`), each tensor from `load(name)`; one shard in memory at a time.
    model.safetensors when one shard, else model-0000i-of-0000n.safetensors and the index. Old
    weight files in `path` are removed first. Every process calls `load` for every name (it may
    be a collective); only the `writer` writes."""
    shards, size = [[]], 0
    for name in names:
        n = nbytes(name)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    if writer:
        remove_weight_files(path)
    files = (
        [SINGLE]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    for fname, shard in zip(files, shards):
        tensors = {}
        for name in shard:  # every rank joins each gather; only the writer keeps the result
            t = load(name)
            if writer:
                tensors[name] = t.to("cpu").contiguous()
        if writer:
            save_safetensors(tensors, path / fname, metadata={"format": "pt"})
    if len(shards) > 1 and writer:
        weight_map = {n: fname for fname, shard in zip(files, shards) for n in shard}
        total = sum(nbytes(n) for n in names)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
