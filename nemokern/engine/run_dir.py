"""What a training run keeps in its output directory besides its checkpoints: the lock that keeps a
second process out while it writes, the check that a fresh run does not start over another run
(or, with --overwrite, the removal of that run), and OUT/run.json, the record of what the run is
(its options, the package and library versions, the sha256 of its data files).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nemokern

from .config import config_fields, option_error

LOCK_FILE = "run.lock"
RECORD_FILE = "run.json"
# what a run writes into OUT: --overwrite removes these and nothing else
RUN_ENTRIES = ("checkpoints", "metrics.jsonl", "tensorboard", "final", "config.toml", RECORD_FILE)


# ---- a fresh run into OUT ------------------------------------------------------------------------
def earlier_run(out) -> str | None:
    """What in `out` belongs to a run (checkpoints, step records, a final model), in words; None
    when there is none."""
    out = Path(out)
    found = []
    steps = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    if steps:
        found.append(f"checkpoints up to {steps[-1].name}")
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        found.append("metrics.jsonl")
    if (out / "final").exists():
        found.append("final/")
    return ", ".join(found) or None


def prepare_out(out, *, resume: str, overwrite: bool, clear: bool = True) -> None:
    """Refuse a fresh run (resume '') into an `out` that holds another run, naming what it holds
    and the three ways on; with `overwrite` (and `clear`), remove that run's entries
    (RUN_ENTRIES) instead. clear=False checks only (before a run holds OUT's lock)."""
    if resume:
        return
    if overwrite:
        for name in RUN_ENTRIES if clear else ():
            path = Path(out) / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return
    held = earlier_run(out)
    if held:
        raise option_error(
            "out",
            f"{out} already holds a run ({held}); continue it with --resume auto, choose another "
            "--out, or give --overwrite to remove it and start fresh",
        )


# ---- one writer at a time ------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """OUT/run.lock, holding the pid, host and start time of the process writing into OUT.

    acquire() creates it atomically (a complete file linked into place), or raises ConfigError
    naming the process that holds it; a lock of this same process is already held (acquire does
    nothing and release leaves it to whoever took it). A lock left by a process of this host that
    no longer runs is stale and taken over. release() removes the lock this object took."""

    def __init__(self, out):
        self.path = Path(out) / LOCK_FILE
        self.held = False

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) and "pid" in holder else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: not a lock this code wrote

    def acquire(self) -> None:
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staged = self.path.with_name(f".{LOCK_FILE}.{me['pid']}.{secrets.token_hex(4)}")
        staged.write_text(json.dumps(me) + "\n")
        try:
            while True:
                try:
                    os.link(staged, self.path)
                    self.held = True
                    return
                except FileExistsError:
                    pass
                holder = self._holder()
                if holder is None:  # released meanwhile
                    continue
                pid, host = holder.get("pid"), holder.get("host")
                if host == me["host"] and pid == me["pid"]:
                    return
                if holder and (host != me["host"] or _alive(int(pid))):
                    gone = (
                        f"; if it is no longer running, remove {self.path}"
                        if host != me["host"]
                        else ""
                    )
                    raise option_error(
                        "out",
                        f"{self.path.parent} is in use by another nemokern process (pid {pid} on "
                        f"{host}, started {holder.get('started', '?')}); wait for it to end or "
                        f"choose another --out{gone}",
                    )
                self.path.unlink(missing_ok=True)  # stale: its process is gone
        finally:
            staged.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False


# ---- the run's identity --------------------------------------------------------------------------
def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git(*args) -> str | None:
    root = Path(nemokern.__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(distribution: str) -> str | None:
    """The installed version, read from its metadata: importing transformers only for its version
    string would add ~16 MiB to every training process."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_record(config, *, processes: int, device: str) -> dict:
    """What identifies a run: its resolved options, the command line, nemokern's version and git
    commit (when it runs from a checkout), the versions of the libraries that compute it, and
    the sha256 of every option that names a file (the data) and the absolute path of every one
    that names a directory (models, tokenizers)."""
    options = {f.name: getattr(config, f.name) for f in config_fields(type(config))}
    files = {
        name: {"path": str(Path(value).resolve()), "sha256": sha256_file(value)}
        for name, value in options.items()
        if isinstance(value, str) and value and Path(value).is_file()
    }
    directories = {
        name: str(Path(value).resolve())
        for name, value in options.items()
        if isinstance(value, str) and value and Path(value).is_dir() and name != "out"
    }
    import torch

    commit = _git("rev-parse", "HEAD")
    return {
        "command": sys.argv,
        "options": json.loads(json.dumps(options, default=list)),
        "data_files": files,
        "directories": directories,  # models, tokenizers: by path (their weights are not hashed)
        "nemokern": {
            "version": nemokern.__version__,
            "commit": commit,
            "modified": bool(_git("status", "--porcelain", "--untracked-files=no"))
            if commit
            else None,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            **{m: _version(m) for m in ("triton", "transformers", "safetensors", "numpy")},
        },
        "processes": processes,
        "device": device,
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def write_run_record(out, record: dict) -> None:
    """Write OUT/run.json; the records of the runs it continues (a resume) are kept in it, oldest
    first, under "earlier"."""
    path = Path(out) / RECORD_FILE
    if record.get("resumed_from") and path.is_file():
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = None
        if isinstance(before, dict):
            record["earlier"] = [*before.pop("earlier", []), before]
    staged = path.with_name(f".{RECORD_FILE}.tmp")
    staged.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(staged, path)
