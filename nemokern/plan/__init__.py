"""`nemokern plan`: will a training run fit on the GPUs it is given, and how long must a step take
at least. memory.py counts the bytes per rank (sharding.py builds and shards the real models on
the meta device, activations.py measures what a forward saves), steptime.py bounds the step time.
"""

from __future__ import annotations

from dataclasses import replace

from ..model import LlamaConfig
from . import memory as bytes_per_rank
from .memory import Memory, Run, largest, model_counts
from .shapes import BUILTIN, model_shape
from .steptime import Hardware, step_time

__all__ = ["BUILTIN", "Hardware", "Run", "make_plan", "model_shape"]

_GB = 1e9


def _fits(shape, run, reward_shape, limit) -> tuple[bool, Memory]:
    counts, frozen = model_counts(shape, run, reward_shape)
    mem = bytes_per_rank.memory(shape, run, counts, frozen)
    return mem.peak <= limit, mem


def _layouts(run: Run, shape: LlamaConfig):
    """Other tensor-parallel sizes / FSDP settings on the same GPUs, the smallest change first:
    FSDP switched on, then each larger tp (with the run's FSDP setting, then with FSDP); then the
    same again with activation checkpointing, if the run has it off."""
    per_node = min(run.gpus, run.gpus_per_node)
    tps = [
        t
        for t in range(run.tp + 1, per_node + 1)
        if per_node % t == 0
        and run.gpus % t == 0
        and shape.num_attention_heads % t == 0
        and (run.trainer != "reinforce" or run.prompts_per_step % (run.gpus // t) == 0)
    ]
    checkpointing = [False] if run.activation_checkpointing else [False, True]
    for ac in checkpointing:
        base = replace(run, activation_checkpointing=True) if ac else run
        if ac:
            yield base
        if not run.fsdp:
            yield replace(base, fsdp=True)
        for t in tps:
            yield replace(base, tp=t)
            if not run.fsdp:
                yield replace(base, tp=t, fsdp=True)


def make_plan(
    shape: LlamaConfig,
    run: Run,
    *,
    memory_bytes: int,
    reward_shape: LlamaConfig | None = None,
    hardware: Hardware | None = None,
) -> dict:
    """The plan of `run` on GPUs of `memory_bytes` each: bytes per rank by term and phase, the
    peak and the verdict, the largest micro-batch and rollout batch that fit, a layout that fits
    when this one does not, and the step-time bound (a dict, what --json prints)."""
    counts, frozen = model_counts(shape, run, reward_shape)
    mem = bytes_per_rank.memory(shape, run, counts, frozen)
    tokens = run.micro_batch_tokens()
    fits = mem.peak <= memory_bytes
    binding, binding_bytes = mem.binding()
    report = {
        "trainer": run.trainer,
        "gpus": run.gpus,
        "tp": run.tp,
        "dp": run.dp,
        "fsdp": run.fsdp,
        "compute_dtype": run.compute,
        "activation_checkpointing": run.activation_checkpointing,
        "tokens_per_micro_batch": tokens,
        "parameters_per_rank": counts.stored,
        "persistent_bytes": mem.persistent,
        "phase_bytes": mem.phases,
        "phase_peak_bytes": mem.phase_totals,
        "peak_bytes": mem.peak,
        "peak_phase": mem.peak_phase,
        "memory_bytes": memory_bytes,
        "fits": fits,
        "binding_term": binding,
        "binding_bytes": binding_bytes,
    }

    def peak_at(n):
        return bytes_per_rank.memory(shape, run, counts, frozen, tokens=n).peak

    if run.trainer == "reinforce":
        step = run.tokens_per_prompt()

        def prompts_fit(p):
            return peak_at(p * step) <= memory_bytes

        p = largest(prompts_fit, 1, 1 << 16)
        report["largest_micro_batch_prompts"] = p
        report["largest_micro_batch_tokens"] = p * step

        def rows_fit(prompts):
            mem = bytes_per_rank.memory(shape, run, counts, frozen, rows=prompts * run.k)
            return mem.phase_totals["generate"] <= memory_bytes

        report["largest_rollout_rows"] = largest(rows_fit, 1, 1 << 20) * run.k
    else:
        report["largest_micro_batch_tokens"] = largest(
            lambda n: peak_at(n) <= memory_bytes, 1, 1 << 24
        )
    if not fits:
        report["suggestion"] = None
        for other in _layouts(run, shape):
            ok, other_mem = _fits(shape, other, reward_shape, memory_bytes)
            if ok:
                report["suggestion"] = {
                    "tp": other.tp,
                    "fsdp": other.fsdp,
                    "activation_checkpointing": other.activation_checkpointing,
                    "peak_bytes": other_mem.peak,
                }
                break
    report["step_time"] = step_time(shape, run, counts, frozen, hardware or Hardware.named("h100"))
    return report
