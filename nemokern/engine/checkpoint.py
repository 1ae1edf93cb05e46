"""Resumable training checkpoints: written atomically, read back exactly, never unpickled.

A checkpoint is a directory OUT/checkpoints/step-NNNNNNNN/:
    <part>/                 HF layout (config.json + safetensors) of each module that has
                            save_pretrained: the model itself ("model/"), or its children by name
    modules.safetensors     every other parameter and buffer (e.g. a reward head), by state_dict
                            name
    optimizer.{json,safetensors}, scheduler.{json,safetensors}, trainer.{json,safetensors}
                            state dicts: tensors in safetensors, everything else in JSON
                            (engine/state_format.py)
    rng-rankNNNNN.{json,safetensors}   python, numpy, torch CPU and CUDA generator states per
                                       process
    local-rankNNNNN.{json,safetensors} a process's own trainer state (e.g. the rollout it made),
                                       when the trainer gives one
    manifest.json           written last: the step, the tensor-parallel size and every file's
                            size
Under tensor parallelism (tp > 1) the weights and the optimizer are stored as shards instead:
    model.tpR-of-N.safetensors, optimizer.tpR-of-N.{json,safetensors}
                            what tp rank R of N holds (its slices under the unsharded model's
                            names, replicated tensors in every shard), written by the N ranks of
                            the tp group of global rank 0 (the other data-parallel replicas hold
                            the same); a resume at another tp size M rebuilds each tensor
                            from the N pieces and keeps its slice (engine/reshard.py)
With a sharded optimizer (ZeroRedundancyOptimizer, --shard-optimizer) every process writes the
AdamW state of its own share instead of optimizer.{json,safetensors}:
    optimizer.rankNNNNN.{json,safetensors}   a resume needs the same number of processes
It is built in a hidden temp directory, each file fsync'ed, then renamed into place, so a run killed
mid-save leaves the previous checkpoints intact; a directory without a manifest, or whose files do
not match it, is incomplete and `load` names the file that is wrong.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

from nemokern.engine.reshard import load_fsdp_regrouped, load_resharded
from nemokern.engine.state_format import (
    REST_FILE,
    hf_parts,
    host_copy,
    load_state,
    open_tensors,
    part_dir,
    read_tensors,
    save_state,
)
from nemokern.errors import ConfigError
from nemokern.model.hf import CheckpointError, hf_name, save_safetensors, weight_files
from nemokern.parallel import rank_and_size
from nemokern.parallel.fsdp import (
    copy_into,
    first_holder,
    full_tensor,
    is_sharded,
    like,
    local_part,
)

FORMAT = "nemokern-checkpoint-1"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"step-(\d{8})")

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "get_rng_state",
    "load_modules",
    "load_shard",
    "save_modules",
    "save_shard",
    "set_rng_state",
    "validate",
]


# ---- RNG ----------------------------------------------------------------------------------------
def get_rng_state() -> dict:
    """Every generator a training step may draw from: python, numpy, torch CPU, CUDA (if
    initialised)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- model weights ------------------------------------------------------------------------------
def _rest_state(model: torch.nn.Module, parts: dict) -> dict[str, torch.Tensor]:
    """State-dict entries that no HF part stores (parameters of heads, any buffers)."""
    covered = set()
    for name, part in parts.items():
        prefix = f"{name}." if name else ""
        params = {id(p) for p in part.parameters()}
        covered |= {
            prefix + k for k, v in part.state_dict(keep_vars=True).items() if id(v) in params
        }
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in covered}


def save_modules(model: torch.nn.Module, directory) -> None:
    """Write `model`'s weights: HF layout for the parts with save_pretrained (a Llama, e.g. "model/"
    or "<child>/"), modules.safetensors for the rest. `model` is the unwrapped module (not DDP).
    Under tensor parallelism every rank of the tp group calls it and its rank 0 writes; a model
    FSDP shards, every process (the first writes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    parts = hf_parts(model)
    for name, part in parts.items():
        part.save_pretrained(part_dir(directory, name))
    rest = {k: host_copy(full_tensor(v.detach())) for k, v in _rest_state(model, parts).items()}
    writer = all(rank_and_size(part.tp_group)[0] == 0 for part in parts.values())
    writer = writer and first_holder(model.parameters())  # under fsdp: a collective
    if (rest or not parts) and writer:
        save_safetensors(rest, directory / REST_FILE)


@torch.no_grad()
def load_modules(model: torch.nn.Module, directory) -> None:
    """Copy the weights save_modules wrote into `model`'s existing tensors (in place, so an
    optimizer built on them stays valid). Missing, unexpected or mis-shaped tensors raise
    CheckpointError."""
    directory = Path(directory)
    parts = hf_parts(model)
    for name, part in parts.items():
        sub = part_dir(directory, name)
        expected = {hf_name(n): p for n, p in part.named_parameters()}
        loaded = set()
        assigned = weight_files(sub) if sub.is_dir() else None
        if assigned is None:
            raise CheckpointError(
                f"{sub} is missing; the checkpoint has no weights for {name or 'the model'}"
            )
        for file in dict.fromkeys(assigned.values()):
            with open_tensors(file) as f:
                for key in f.keys():
                    if key not in expected:
                        raise CheckpointError(f"{file}: unexpected tensor {key!r} for this model")
                    _copy(expected[key], f.get_tensor(key), file, key)
                    loaded.add(key)
        missing = sorted(set(expected) - loaded)
        if missing:
            raise CheckpointError(f"{sub}: tensor(s) {missing[:8]} missing")
    rest = _rest_state(model, parts)
    if rest:
        _copy_file(rest, directory / REST_FILE)


def _copy_file(targets: dict[str, torch.Tensor], path: Path) -> None:
    """Copy the safetensors file `path` into `targets` (name -> tensor), which it must match."""
    stored = read_tensors(path)
    if set(stored) != set(targets):
        raise CheckpointError(
            f"{path}: holds {sorted(set(stored) - set(targets))[:8]} unexpected and lacks "
            f"{sorted(set(targets) - set(stored))[:8]}; was it written for another model?"
        )
    for key, target in targets.items():
        _copy(target, stored[key], path, key)


def _copy(target: torch.Tensor, source: torch.Tensor, file, key) -> None:
    if tuple(source.shape) != tuple(target.shape):
        raise CheckpointError(
            f"{file}: tensor {key!r} has shape {tuple(source.shape)}, the model has "
            f"{tuple(target.shape)}"
        )
    copy_into(target, source)  # an FSDP-sharded parameter keeps its own rows


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with each tensor once, under its first name (tied weights)."""
    seen, out = set(), {}
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) not in seen:
            seen.add(id(v))
            out[k] = v
    return out


def save_shard(model: torch.nn.Module, path, write: bool = True) -> None:
    """Write this rank's own tensors of `model` (the unwrapped module; under tensor parallelism
    its slices) to the safetensors file `path`, by state_dict name. Under FSDP those slices are
    gathered from the data-parallel processes first, a collective: each calls it, and those
    with write=False only join the gathers."""
    tensors = {k: host_copy(full_tensor(v.detach())) for k, v in _unique_state(model).items()}
    if write:
        save_safetensors(tensors, path)


@torch.no_grad()
def load_shard(model: torch.nn.Module, path) -> None:
    """Copy what save_shard wrote into `model`'s tensors in place; CheckpointError naming the file
    if it is missing, unreadable, or holds other names or shapes."""
    _copy_file(_unique_state(model), Path(path))


# ---- durability ---------------------------------------------------------------------------------
def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [*(p for p in root.rglob("*") if p.is_dir()), root]:
        _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_sizes(root: Path) -> dict[str, int]:
    return {
        p.relative_to(root).as_posix(): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def validate(path) -> dict:
    """The manifest of a complete checkpoint; CheckpointError naming the file if it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    mpath = path / MANIFEST
    if not mpath.is_file() and not re.fullmatch(r"step-\d+", path.name):
        raise CheckpointError(
            f"{path} is not a checkpoint (no {MANIFEST}); give a checkpoint directory "
            "(OUT/checkpoints/step-N), a run directory (OUT) or auto"
        )
    if not mpath.is_file():
        raise CheckpointError(
            f"{mpath} is missing: the checkpoint is incomplete (a save interrupted before "
            "it finished); resume from an older one or with resume=auto"
        )
    try:
        manifest = json.loads(mpath.read_text())
        files, step = manifest["files"], int(manifest["step"])
        manifest["tp"] = int(manifest["tp"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{mpath}: not a nemokern checkpoint manifest ({e!r}); the checkpoint is corrupt"
        ) from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"{mpath}: format {manifest.get('format')!r}, this nemokern reads {FORMAT!r}"
        )
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(
                f"{f} is missing (listed in {mpath}); the checkpoint is incomplete"
            )
        if f.stat().st_size != size:
            raise CheckpointError(
                f"{f} has {f.stat().st_size} bytes, {mpath} records {size}: the file is "
                "truncated or was modified; the checkpoint is corrupt"
            )
    manifest["step"] = step
    return manifest


class Checkpointer:
    """Saves to and finds checkpoints in OUT/checkpoints, keeping the newest `keep_last`.

    Under torch.distributed every process calls save/load: rank 0 writes the shared state
    (weights, optimizer, scheduler, trainer state) and each rank its own RNG and `local` files,
    with barriers in between, so OUT must be on a file system that all ranks of a node share.
    With a `tp_group` (tensor parallelism) the ranks of global rank 0's tp group each write their
    shard of the weights and the optimizer instead, and every rank loads its tp rank's shards.
    """

    def __init__(self, out_dir, *, keep_last: int = 2, tp_group=None):
        if keep_last < 1:
            raise ConfigError(f"{keep_last} must be at least 1", option="keep_last")
        self.root = Path(out_dir) / "checkpoints"
        self.keep_last = keep_last
        dist = torch.distributed
        self._dist = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self._dist else 0
        self.world_size = dist.get_world_size() if self._dist else 1
        self.tp_rank, self.tp_size = rank_and_size(tp_group)
        self.shard_writer = (
            self.rank == 0 if tp_group is None else 0 in dist.get_process_group_ranks(tp_group)
        )

    def _shard(self, kind: str) -> str:
        """The name of this rank's shard of `kind` ("model", "optimizer") under tp > 1."""
        return f"{kind}.tp{self.tp_rank}-of-{self.tp_size}"

    def _barrier(self):
        if self._dist:
            torch.distributed.barrier()

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def complete(self) -> list[tuple[int, Path]]:
        """(step, dir) of the complete checkpoints, oldest first; incomplete ones are skipped."""
        found = []
        for d in self.root.glob("step-*") if self.root.is_dir() else []:
            if STEP_DIR.fullmatch(d.name) and (d / MANIFEST).is_file():
                found.append((int(d.name[5:]), d))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def resolve(self, resume: str) -> Path | None:
        """'' -> None; 'auto' -> the newest complete checkpoint or None; a directory -> itself,
        checked."""
        if not resume:
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not path.exists():
            raise ConfigError(
                f"{path} does not exist; give auto (the newest checkpoint in --out), a "
                "checkpoint directory (OUT/checkpoints/step-N) or a run's OUT",
                option="--resume",
            )
        if (path / "checkpoints").is_dir() and not (path / MANIFEST).exists():
            latest = Checkpointer(path).latest()
            if latest is None:
                raise CheckpointError(f"{path / 'checkpoints'} holds no complete checkpoint")
            return latest
        validate(path)
        return path

    def trainer_state(self, path) -> dict:
        """The trainer state a checkpoint holds ({"step", "world_size", ...}: what `load`
        returns), read without loading anything else."""
        validate(path)
        return load_state(Path(path), "trainer")

    def save(
        self,
        step: int,
        *,
        model,
        optimizer=None,
        scheduler=None,
        state: dict | None = None,
        rng: dict | None = None,
        local: dict | None = None,
    ) -> Path:
        """Write checkpoint `step` atomically and prune old ones; returns its directory.

        model: the unwrapped module. state: the trainer's own JSON/tensor state (data position,
        ...), the same on every process (rank 0 writes it).
        rng: this process's generator states (default: the current ones).
        local: this process's own state (each process writes its own), given back by load as
        state["local"].
        """
        final, tmp = self.path(step), self.root / f".tmp-step-{step:08d}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step-*"):  # left by a run killed mid-save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self._barrier()
        save_state(get_rng_state() if rng is None else rng, tmp, f"rng-rank{self.rank:05d}")
        if local is not None:
            save_state(local, tmp, f"local-rank{self.rank:05d}")
        fsdp = is_sharded(model)
        sharded = isinstance(optimizer, ZeroRedundancyOptimizer) or (fsdp and optimizer is not None)
        if sharded:  # every process its own share (its tp shard's, under tp)
            if fsdp:  # the AdamW state of this process's rows
                own = optimizer.state_dict()
                own["state"] = {
                    i: {k: local_part(v) for k, v in st.items()} for i, st in own["state"].items()
                }
            else:
                own = optimizer.optim.state_dict()
                # the wrapper holds the current lr etc. (the scheduler sets them there; its
                # share's optimizer gets them only at the next step)
                for group, current in zip(own["param_groups"], optimizer.param_groups):
                    group.update({k: v for k, v in current.items() if k != "params"})
            save_state(own, tmp, f"optimizer.rank{self.rank:05d}")
            optimizer = None
        # the weights; under fsdp every process joins the gathers, one writes
        if self.tp_size > 1:
            if self.shard_writer or fsdp:
                save_shard(model, tmp / f"{self._shard('model')}.safetensors", self.shard_writer)
            if self.shard_writer and optimizer is not None:
                save_state(optimizer.state_dict(), tmp, self._shard("optimizer"))
        elif self.rank == 0 or fsdp:
            save_modules(model, tmp)
        if self.rank == 0:
            if self.tp_size == 1 and optimizer is not None:
                save_state(optimizer.state_dict(), tmp, "optimizer")
            if scheduler is not None:
                save_state(scheduler.state_dict(), tmp, "scheduler")
            save_state(
                {"step": step, "world_size": self.world_size, **(state or {})}, tmp, "trainer"
            )
        self._barrier()
        if self.rank == 0:
            _fsync_tree(tmp)
            manifest = {
                "format": FORMAT,
                "step": step,
                "tp": self.tp_size,
                "files": _file_sizes(tmp),
            }
            if sharded:
                manifest["sharded_optimizer"] = self.world_size
                manifest["optimizer_sharding"] = "fsdp" if fsdp else "zero"
            with open(tmp / MANIFEST, "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if final.exists():  # the same step saved again (e.g. after a resume): replace it
                old = self.root / f".old-step-{step:08d}"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
            _fsync_dir(self.root)
            for _, old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def load(self, path, *, model, optimizer=None, scheduler=None) -> dict:
        """Restore a checkpoint into `model` (in place), the optimizer, the scheduler and this
        process's RNG; returns the trainer state ({"step": ..., "world_size": ..., ...}, and
        "local": this process's `local` state if the save had one).
        A checkpoint written at another tensor-parallel size is resharded (engine/reshard.py),
        unless its optimizer state is sharded (--shard-optimizer or --fsdp); an --fsdp one
        resumes on another number of processes at its tp size, or without --fsdp. One saved
        inside a rollout resumes only at the process count and tp size it was saved at. What
        cannot resume raises CheckpointError naming both layouts."""
        path = Path(path)
        manifest = validate(path)
        saved_tp = manifest["tp"]
        fsdp = is_sharded(model)
        if fsdp and saved_tp != self.tp_size:
            raise CheckpointError(
                f"{path}: written with --tp {saved_tp}, this run has --tp {self.tp_size}; under "
                "--fsdp a checkpoint resumes at the --tp it was written with"
            )
        if saved_tp != self.tp_size:
            self._check_reshard(path, manifest, saved_tp)
            load_resharded(path, saved_tp, _unique_state(model), model, optimizer)
            optimizer = None  # loaded
        elif self.tp_size > 1:
            load_shard(model, path / f"{self._shard('model')}.safetensors")
        else:
            load_modules(model, path)
        if optimizer is not None and (fsdp or manifest.get("optimizer_sharding") == "fsdp"):
            self._load_fsdp_optimizer(path, manifest, optimizer, fsdp)
        elif optimizer is not None:
            name = self._shard("optimizer") if self.tp_size > 1 else "optimizer"
            self._load_optimizer(path, manifest, optimizer, name)
        if scheduler is not None:
            scheduler.load_state_dict(load_state(path, "scheduler"))
        state = load_state(path, "trainer")
        own = f"rank{self.rank:05d}"
        if not (path / f"rng-{own}.json").is_file():
            own = "rank00000"  # resumed on more processes than saved: not bit-exact anyway
        set_rng_state(load_state(path, f"rng-{own}"))
        if (path / f"local-{own}.json").is_file():
            state["local"] = load_state(path, f"local-{own}")
            saved_world = state["world_size"]
            regrouped = saved_tp != self.tp_size or saved_world != self.world_size
            if regrouped and any(state["local"].get("extra", {}).values()):
                raise CheckpointError(
                    f"{path}: saved inside a rollout (each data-parallel group's own) on "
                    f"{saved_world} process(es) at --tp {saved_tp}, this run has "
                    f"{self.world_size} at --tp {self.tp_size}; resume it as it was saved, or "
                    "from a checkpoint at a rollout's end"
                )
        return state

    def _check_reshard(self, path: Path, manifest: dict, saved_tp: int) -> None:
        """Refuse what a resume at another tp size cannot continue."""
        if manifest.get("sharded_optimizer"):
            raise CheckpointError(
                f"{path}: written with --tp {saved_tp} and --shard-optimizer, this run has --tp "
                f"{self.tp_size}; a sharded optimizer state resumes only at the same --tp and "
                "process count"
            )

    def _load_fsdp_optimizer(self, path: Path, manifest: dict, optimizer, fsdp: bool) -> None:
        """The AdamW state of an FSDP run from each process's own file (on another process count,
        or without --fsdp, regrouped from all of them: reshard.load_fsdp_regrouped), or from a
        whole one (a run without sharding: each process keeps its rows of it)."""
        saved = manifest.get("sharded_optimizer")
        kind = manifest.get("optimizer_sharding")
        if kind == "zero" or isinstance(optimizer, ZeroRedundancyOptimizer):
            was = f"sharded over {saved} processes (--shard-optimizer)" if saved else "whole"
            now = "--fsdp" if fsdp else "--shard-optimizer"
            raise CheckpointError(
                f"{path}: its optimizer state is {was}, this run has {now}; a --shard-optimizer "
                "state resumes only as it was saved, and an --fsdp one under --fsdp or without "
                "sharding"
            )
        if kind == "fsdp" and (saved != self.world_size or not fsdp):
            # this tp rank's files, in data-parallel order (mesh ("dp", "tp"): tp consecutive)
            names = [f"optimizer.rank{r:05d}" for r in range(self.tp_rank, saved, self.tp_size)]
            load_fsdp_regrouped(path, names, optimizer)
            return
        name = f"optimizer.rank{self.rank:05d}" if kind == "fsdp" else "optimizer"
        state = load_state(path, name)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        try:
            state["state"] = {
                i: {k: like(v, params[int(i)], whole=kind is None) for k, v in st.items()}
                for i, st in state["state"].items()
            }
            optimizer.load_state_dict(state)
        except (ValueError, KeyError, IndexError, RuntimeError) as e:
            raise CheckpointError(
                f"{path / name}.json: does not fit this optimizer ({e})"
            ) from None

    def _load_optimizer(self, path: Path, manifest: dict, optimizer, name: str) -> None:
        saved = manifest.get("sharded_optimizer")
        sharded = isinstance(optimizer, ZeroRedundancyOptimizer)
        if saved and (not sharded or saved != self.world_size):
            now = f"{self.world_size} process(es)" + (
                ""
                if sharded
                else " (one process shards nothing)"
                if self.world_size == 1
                else " without it"
            )
            raise CheckpointError(
                f"{path}: its optimizer state is sharded over {saved} processes "
                f"(--shard-optimizer); this run has {now}; resume with --shard-optimizer on "
                f"{saved} processes"
            )
        # a whole state into a sharded optimizer: ZeroRedundancyOptimizer takes its own share
        target = optimizer.optim if saved else optimizer
        if saved:
            name = f"optimizer.rank{self.rank:05d}"
        try:
            target.load_state_dict(load_state(path, name))
        except (ValueError, KeyError) as e:
            raise CheckpointError(
                f"{path / name}.json: does not fit this optimizer ({e})"
            ) from None
        if saved:  # the wrapper's lr etc. from the local optimizer's, as its step expects
            for local, group in zip(target.param_groups, optimizer.param_groups):
                group.update({k: v for k, v in local.items() if k != "params"})
