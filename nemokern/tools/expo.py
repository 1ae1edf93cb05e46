"""ExPO, model extrapolation (recipe.md section 3):
theta_aligned + alpha * (theta_aligned - theta_init), from two HF checkpoint directories into a
third, for policies and reward models alike.

Every tensor of every safetensors file is extrapolated: the model's weights (one file, or shards
with model.safetensors.index.json; written again in shards of at most max_shard_size) and any other
safetensors file beside them, such as a reward model's reward_head.safetensors (written under its
own name). Tensors are read from the memory-mapped inputs in row blocks of at most BLOCK_BYTES
(counted in float32) and each result block is written straight into the output file, whose
safetensors header is laid out beforehand from the input headers. The mapped inputs are page
cache, not private memory; what expo allocates is the float32 copies of one block (one copy for
float32 weights, two for bf16), so about one tensor, less for tensors larger than a block, never a
shard or a model.

Other files (config.json, reward_head.json, generation_config.json, tokenizer files) are copied
from the aligned directory. The output is assembled in a temporary directory beside out_dir and
renamed into place at the end, so a failure never leaves a half-written out_dir.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nemokern.errors import ConfigError
from nemokern.model.hf import (
    DERIVED_BUFFER,
    INDEX,
    SAFETENSORS_FLOATS,
    SINGLE,
    CheckpointError,
    open_safetensors,
    parse_size,
    staged_directory,
    weight_files,
)
from nemokern.model.reward import model_kind

# Rows per block are chosen so that one block is at most this many bytes in float32; at most two
# such float32 blocks are allocated at a time (the widened aligned rows and the result).
BLOCK_BYTES = 32 * 2**20
# Pickled weights are never copied: they would be the aligned model's, not the extrapolated one.
_PICKLED = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class _Tensor:
    """One tensor to extrapolate: where each input holds it, and its safetensors dtype and shape."""

    name: str
    aligned: Path
    init: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * SAFETENSORS_FLOATS[self.dtype].itemsize


def expo(
    init_dir, aligned_dir, alpha: float, out_dir, *, max_shard_size: int | str = "5GB"
) -> dict:
    """Write theta_aligned + alpha * (theta_aligned - theta_init) to out_dir, a new directory.

    alpha must be finite and >= 0; alpha = 0 copies the aligned tensors bit for bit. Each tensor is
    computed in float32 (float64 tensors in float64) and stored in the aligned tensor's dtype.
    Both checkpoints must hold the same tensor names, shapes and dtypes in the same safetensors
    files (model weights and e.g. reward_head.safetensors), else CheckpointError names the tensor
    and both files. With tie_word_embeddings the LM head is the embedding: a stored lm_head.weight
    is not read and the output stores the embedding once, as nemokern's save_pretrained does.

    Returns {"out_dir", "alpha", "tensors", "bytes", "files", "copied", "skipped", "seconds"}:
    tensors and bytes written, the safetensors files written, the other files copied from
    aligned_dir, and the entries of aligned_dir left out (subdirectories, pickled weights, stale
    shards, a tied lm_head.weight, RoPE inv_freq buffers).
    """
    start = time.perf_counter()
    alpha = _check_alpha(alpha)
    limit = parse_size(max_shard_size)
    if limit <= 0:
        raise ConfigError(
            f"{max_shard_size!r} must be positive, e.g. '5GB'", option="max_shard_size"
        )
    init, aligned, out = Path(init_dir), Path(aligned_dir), Path(out_dir)
    for what, path in (("init_dir", init), ("aligned_dir", aligned)):
        if not path.is_dir():
            raise CheckpointError(
                f"{what}={str(path)!r} is not a directory; ExPO reads two local HF model "
                "directories"
            )
    if init.resolve() == aligned.resolve():
        raise ConfigError(
            f"init_dir and aligned_dir are the same directory {str(aligned)!r}: ExPO of a model "
            "with itself is that model unchanged; give the model before alignment as init_dir "
            "(--init)"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"out_dir={str(out)!r} exists and is not empty; ExPO writes a new directory: "
            "remove it or choose another"
        )
    # a head present in one only is refused below, naming its file (_extra_files)
    if {model_kind(aligned), model_kind(init)} == {"policy", "reward export"}:
        raise CheckpointError(
            f"aligned_dir {aligned} is a {model_kind(aligned)} but init_dir {init} is a "
            f"{model_kind(init)}; ExPO extrapolates between two checkpoints of one kind: for an "
            "exported reward model, export the reward model it started from too (export-reward)"
        )

    tied = _tied(aligned)
    if _tied(init) != tied:
        raise CheckpointError(
            f"tie_word_embeddings is {tied} in {aligned / 'config.json'} but {not tied} in "
            f"{init / 'config.json'}; ExPO needs both checkpoints of the same architecture"
        )
    skipped: list[str] = []
    model = _pair(
        _model_tensors(aligned, tied, skipped), _model_tensors(init, tied, []), aligned, init
    )
    extra_files = _extra_files(aligned, init, skipped)
    extras = {
        name: _pair(_file_tensors(aligned / name), _file_tensors(init / name), aligned, init)
        for name in extra_files
    }

    written, total = [], 0
    with staged_directory(
        out, "expo"
    ) as tmp:  # out_dir is absent or empty: renamed to it at the end
        with _Inputs() as inputs:
            shards = _shards(model, limit)
            names = (
                [SINGLE]
                if len(shards) == 1
                else [
                    f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                    for i in range(1, len(shards) + 1)
                ]
            )
            for fname, shard in zip(names, shards):
                total += _write(tmp / fname, shard, alpha, inputs)
            if len(shards) > 1:
                weight_map = {t.name: fname for fname, shard in zip(names, shards) for t in shard}
                index = {
                    "metadata": {"total_size": sum(t.nbytes for t in model)},
                    "weight_map": dict(sorted(weight_map.items())),
                }
                (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
            written += names
            for fname, tensors in extras.items():
                total += _write(tmp / fname, tensors, alpha, inputs)
                written.append(fname)
        copied = _copy_other_files(aligned, tmp, skipped)
    return {
        "out_dir": str(out),
        "alpha": alpha,
        "tensors": len(model) + sum(map(len, extras.values())),
        "bytes": total,
        "files": written,
        "copied": copied,
        "skipped": sorted(skipped),
        "seconds": time.perf_counter() - start,
    }


def _check_alpha(alpha) -> float:
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, numbers.Real)
        or not math.isfinite(alpha)
        or alpha < 0
    ):
        raise ConfigError(
            f"{alpha!r}: ExPO's extrapolation strength must be a finite number >= 0 "
            "(a few tenths is typical; 0 gives the aligned model unchanged)",
            option="alpha",
        )
    return float(alpha)


def _tied(path: Path) -> bool:
    """config.json's tie_word_embeddings (False without a config.json, as transformers' Llama)."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text()).get("tie_word_embeddings", False))
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{config}: not a JSON object ({e})") from None


def _header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (safetensors dtype, shape)} from a safetensors header, without reading any data."""
    with open_safetensors(file) as f:
        entries = {name: f.get_slice(name) for name in f.keys()}
        header = {name: (s.get_dtype(), tuple(s.get_shape())) for name, s in entries.items()}
    for name, (dtype, _) in header.items():
        if dtype not in SAFETENSORS_FLOATS:
            raise CheckpointError(
                f"{file}: tensor {name!r} has dtype {dtype}; ExPO extrapolates floating-point "
                f"tensors only ({sorted(SAFETENSORS_FLOATS)})"
            )
    return header


def _file_tensors(file: Path) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    return {name: (file, dtype, shape) for name, (dtype, shape) in _header(file).items()}


def _model_tensors(
    path: Path, tied: bool, skipped: list[str]
) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """{name: (file, dtype, shape)} for the model weights of an HF directory, checked against its
    index; a tied lm_head.weight and RoPE inv_freq buffers are left out (noted in skipped)."""
    assigned = weight_files(path)
    tensors = {}
    for file in dict.fromkeys(assigned.values()):
        for name, entry in _file_tensors(file).items():
            if None not in assigned and assigned.get(name) != file:
                raise CheckpointError(
                    f"{file}: tensor {name!r} is not assigned to this shard in {path / INDEX}"
                )
            if name in tensors:
                raise CheckpointError(f"{file}: tensor {name!r} is also in {tensors[name][0]}")
            tensors[name] = entry
    listed = set(assigned) - {None} - set(tensors)
    if listed:
        name = sorted(listed)[0]
        raise CheckpointError(
            f"{path / INDEX} assigns tensor {name!r} to {assigned[name].name}, which does not "
            "hold it; re-save the checkpoint"
        )
    for name in list(tensors):
        if (name == "lm_head.weight" and tied) or DERIVED_BUFFER.fullmatch(name):
            skipped.append(name)
            del tensors[name]
    return tensors


def _pair(aligned: dict, init: dict, aligned_dir: Path, init_dir: Path) -> list[_Tensor]:
    """The aligned tensors in file order, each checked against init's name, shape and dtype."""
    for have, lack, lack_dir in ((aligned, init, init_dir), (init, aligned, aligned_dir)):
        missing = [n for n in have if n not in lack]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            files = sorted({str(f.name) for f, _, _ in lack.values()}) or "no tensors"
            raise CheckpointError(
                f"tensor {missing[0]!r}{more} is in {have[missing[0]][0]} but not in {lack_dir} "
                f"(files: {files}); "
                "ExPO needs init and aligned checkpoints of the same architecture"
            )
    pairs = []
    for name, (a_file, a_dtype, a_shape) in aligned.items():
        i_file, i_dtype, i_shape = init[name]
        if a_shape != i_shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {a_shape} in {a_file} but {i_shape} in {i_file}; "
                "ExPO needs init and aligned checkpoints of the same architecture"
            )
        if a_dtype != i_dtype:
            raise CheckpointError(
                f"tensor {name!r} is {a_dtype} in {a_file} but {i_dtype} in {i_file}; save both "
                "checkpoints in one dtype (e.g. from_pretrained(dtype=...) + save_pretrained)"
            )
        pairs.append(_Tensor(name, a_file, i_file, a_dtype, a_shape))
    return pairs


def _extra_files(aligned: Path, init: Path, skipped: list[str]) -> list[str]:
    """The safetensors files beside the model weights (e.g. reward_head.safetensors), which both
    checkpoints must hold. model*.safetensors files that the weights do not use (stale shards) are
    skipped."""

    def extras(path: Path) -> set[str]:
        used = {f.name for f in weight_files(path).values()}
        return {
            f.name
            for f in path.glob("*.safetensors")
            if f.name not in used and not f.name.startswith("model")
        }

    mine, theirs = extras(aligned), extras(init)
    for name in sorted(mine ^ theirs):
        have, lack = (aligned, init) if name in mine else (init, aligned)
        raise CheckpointError(
            f"{have / name} has no counterpart in {lack}; ExPO extrapolates every safetensors "
            "file, so both checkpoints need it (for a reward model: pass as init the checkpoint "
            "saved before training, head included)"
        )
    used = {f.name for f in weight_files(aligned).values()}
    skipped += [f.name for f in aligned.glob("model*.safetensors") if f.name not in used]
    return sorted(mine)


def _shards(tensors: list[_Tensor], limit: int) -> list[list[_Tensor]]:
    """Consecutive tensors grouped into shards of at most limit bytes (a larger tensor alone)."""
    shards: list[list[_Tensor]] = [[]]
    for t in tensors:
        if shards[-1] and sum(s.nbytes for s in shards[-1]) + t.nbytes > limit:
            shards.append([])
        shards[-1].append(t)
    return shards


class _Inputs(contextlib.ExitStack):
    """Open safetensors handles (memory maps), one per input file, closed together."""

    def __init__(self):
        super().__init__()
        self.handles = {}

    def slice(self, file: Path, name: str):
        if file not in self.handles:
            self.handles[file] = self.enter_context(open_safetensors(file))
        return self.handles[file].get_slice(name)


def _write(path: Path, tensors: list[_Tensor], alpha: float, inputs: _Inputs) -> int:
    """Write one safetensors file: the header first (offsets follow from the shapes), then each
    tensor's blocks as they are computed. Returns the data bytes written."""
    # Wider elements first: with the header padded to 8 bytes every tensor starts aligned to its
    # element size, which memory-mapped readers need.
    order = sorted(tensors, key=lambda t: -SAFETENSORS_FLOATS[t.dtype].itemsize)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in order:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in order:
            for block in _blocks(t, alpha, inputs):
                f.write(block.reshape(-1).view(torch.uint8).numpy().data)
                del block  # before the next read, so that one block pair at a time is alive
        f.flush()
        os.fsync(f.fileno())
    return offset


def _blocks(t: _Tensor, alpha: float, inputs: _Inputs):
    """The extrapolated tensor as consecutive row blocks in its own dtype (the aligned rows
    themselves when alpha is 0)."""
    aligned, init = inputs.slice(t.aligned, t.name), inputs.slice(t.init, t.name)
    if not t.shape:
        spans = [...]
    else:
        row = 4 * math.prod(t.shape[1:])
        step = max(1, BLOCK_BYTES // max(row, 1))
        spans = [slice(s, s + step) for s in range(0, t.shape[0], step)]
    for span in spans:
        a = aligned[span]
        if alpha == 0:
            yield a
            del a
            continue
        wide = torch.float64 if a.dtype == torch.float64 else torch.float32
        # Slices are copy-on-write views of the memory-mapped files: writing into one would turn
        # its pages into private memory that stays until the file is closed. So d is a fresh copy.
        d = init[span].to(wide, copy=True)
        a_wide = a.to(wide)
        del a
        torch.sub(a_wide, d, out=d)
        d.mul_(alpha).add_(a_wide)
        del a_wide
        yield d.to(SAFETENSORS_FLOATS[t.dtype])
        del d


def _copy_other_files(aligned: Path, out: Path, skipped: list[str]) -> list[str]:
    """Copy aligned_dir's non-weight files (configs, tokenizer); note what is left out."""
    copied = []
    for entry in sorted(aligned.iterdir()):
        if entry.name.endswith(".safetensors") or entry.name == INDEX:
            continue
        if entry.is_dir() or entry.suffix in _PICKLED:
            skipped.append(entry.name + ("/" if entry.is_dir() else ""))
            continue
        shutil.copyfile(entry, out / entry.name)
        copied.append(entry.name)
    return copied
