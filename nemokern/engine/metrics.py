"""Per-step metrics: one JSON line per step in OUT/metrics.jsonl, TensorBoard scalars in
OUT/tensorboard when the `tensorboard` package is installed, and a tqdm progress bar.

Only the process that owns the logger (rank 0 under torchrun) writes; the others pass enabled=False.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
# What the bar shows, in this order, when a step reports it.
_BAR_KEYS = (
    ("loss", "loss", "{:.4f}"),
    ("accuracy", "acc", "{:.3f}"),
    ("tokens_per_s", "tok/s", "{:.0f}"),
)


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_values(record: dict) -> dict:
    """A step record without what measures the machine rather than the run (seconds, tokens/s,
    peak memory): two runs of the same command have equal run_values at every step."""
    return {k: v for k, v in record.items() if not (k.endswith("_s") or k == "peak_mem_mb")}


def truncate_metrics(path, step: int) -> None:
    """Drop records after `step` (a resumed run redoes those steps), atomically."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory of `device`, or this process's peak resident set on the CPU
    (MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # macOS reports bytes, Linux kB


def _tensorboard_writer(directory: Path):
    try:
        import tensorboard  # noqa: F401  (torch's SummaryWriter needs it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(directory))


def _scalar(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    return value


class MetricsLogger:
    """Appends each step's metrics to OUT/metrics.jsonl, TensorBoard and the progress bar.

    total_steps sizes the bar; start_step is where a resumed run continues (records after it are
    dropped from metrics.jsonl, as those steps run again).
    """

    def __init__(
        self,
        out_dir,
        *,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
    ):
        self.enabled = enabled
        self.path = Path(out_dir) / METRICS_FILE
        self.writer = None
        self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, start_step)
        self._file = open(self.path, "a")
        if tensorboard:
            self.writer = _tensorboard_writer(Path(out_dir) / "tensorboard")
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            dynamic_ncols=True,
            disable=not progress,
            file=sys.stderr,
        )

    def log(self, step: int, metrics: dict) -> dict:
        """Record `metrics` (numbers or 0-d tensors) for `step`; returns the record written."""
        record = {"step": step, **{k: _scalar(v) for k, v in metrics.items()}}
        if not self.enabled:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(k, v, step)
        if self.bar is not None:
            shown = {
                label: fmt.format(record[k])
                for k, label, fmt in _BAR_KEYS
                if isinstance(record.get(k), (int, float)) and math.isfinite(record[k])
            }
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(max(step - self.bar.n, 0))
        return record

    def write(self, message: str) -> None:
        """A line of text that does not break the progress bar."""
        if self.enabled:
            tqdm.write(message, file=sys.stderr)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
