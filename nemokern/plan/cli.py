"""The `nemokern plan` command's options, their checks and its printed report."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace

from ..errors import ConfigError
from .memory import Run
from .shapes import BUILTIN, model_shape
from .steptime import HARDWARE

_REINFORCE_COUNTS = (  # the integer options of the "reinforce" group
    "k",
    "prompts_per_step",
    "updates_per_rollout",
    "generation_batch_size",
    "max_prompt_tokens",
    "max_new_tokens",
)
_REINFORCE_ONLY = (*_REINFORCE_COUNTS, "reward_model", "frozen_dtype", "shared_prompt")
_DEFAULTS = Run("reinforce", gpus=1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `nemokern plan` (the trainers' names where they have one)."""
    a = p.add_argument
    a("--trainer", required=True, choices=("sft", "reward", "reinforce"))
    a(
        "--model",
        required=True,
        metavar="CONFIG",
        help=f"config.json, a model directory, or one "
        f"of {', '.join(BUILTIN)} (the published Llama-3.1 shapes)",
    )
    a("--gpus", required=True, type=int, metavar="N", help="GPUs (processes) in all")
    a(
        "--gpu-memory",
        default="80GB",
        metavar="SIZE",
        help="memory of one GPU, e.g. 80GB, 141GB, 79.6GiB (default: %(default)s)",
    )
    a("--gpus-per-node", type=int, default=8, metavar="N", help="default: %(default)s")
    a("--tp", type=int, default=1, metavar="T", help="tensor-parallel size (default: 1)")
    a(
        "--fsdp",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="FSDP2 over the data-parallel processes (default: off)",
    )
    a("--fsdp-param-dtype", choices=("float32", "bfloat16"), default="float32")
    a("--shard-optimizer", action=argparse.BooleanOptionalAction, default=False)
    a(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="compute dtype: bfloat16 is the trainers' --bf16 (autocast on CUDA; weights, "
        "gradients and AdamW stay float32), float32 their --no-bf16 (default: %(default)s)",
    )
    a(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: plan a run on this kind of machine (float32), e.g. to check the plan",
    )
    a("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    a(
        "--max-tokens-per-batch",
        "--tokens-per-micro-batch",
        dest="tokens",
        type=int,
        default=4096,
        metavar="M",
        help="sft/reward: tokens per micro-batch (default: 4096)",
    )
    a(
        "--response-share",
        type=float,
        default=1.0,
        metavar="F",
        help="sft: the share of a micro-batch's tokens that are response tokens, the rows of "
        "the fused loss (default: 1.0, the most)",
    )
    a("--grad-accum", type=int, default=1)
    a(
        "--max-length",
        type=int,
        default=4096,
        help="sft/reward: tokens per sequence, for the "
        "step-time bound's attention (default: %(default)s)",
    )
    g = p.add_argument_group("reinforce")
    for name in _REINFORCE_COUNTS:
        g.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=None,
            help=f"default: {getattr(_DEFAULTS, name)}",
        )
    g.add_argument(
        "--reward-model",
        metavar="CONFIG",
        default=None,
        help="the reward model's shape (config.json, directory or built-in name)",
    )
    g.add_argument("--frozen-dtype", choices=("float32", "bfloat16"), default=None)
    g.add_argument("--shared-prompt", action=argparse.BooleanOptionalAction, default=None)
    h = p.add_argument_group("step-time bound")
    h.add_argument("--hardware", choices=tuple(HARDWARE), default="h100")
    h.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak of the compute dtype (default: the hardware's)",
    )
    for name in ("memory-bandwidth", "nvlink-bandwidth", "network-bandwidth"):
        h.add_argument(f"--{name}", type=float, default=None, metavar="GB/s")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(GB|GiB|G|MB|MiB)?\s*", text, flags=re.I)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--gpu-memory {text!r}: give a size such as 80GB or 79.6GiB")
    unit = (m.group(2) or "GB").lower()
    scale = {"gb": 1e9, "g": 1e9, "gib": 2**30, "mb": 1e6, "mib": 2**20}[unit]
    return int(float(m.group(1)) * scale)


def _run(args) -> Run:
    for name in ("gpus", "tp", "gpus_per_node", "tokens", "grad_accum", "max_length"):
        value = getattr(args, name)
        if value < 1:
            flag = "--max-tokens-per-batch" if name == "tokens" else f"--{name.replace('_', '-')}"
            raise ConfigError(f"{flag} {value}: must be at least 1")
    if not 0 < args.response_share <= 1:
        raise ConfigError(f"--response-share {args.response_share}: must be in (0, 1]")
    if args.trainer != "reinforce":
        given = [n for n in _REINFORCE_ONLY if getattr(args, n) is not None]
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} applies to --trainer reinforce only")
    run = Run(
        args.trainer,
        gpus=args.gpus,
        tp=args.tp,
        fsdp=args.fsdp,
        device=args.device,
        bf16=args.dtype == "bfloat16",
        fsdp_param_dtype=args.fsdp_param_dtype,
        shard_optimizer=args.shard_optimizer,
        activation_checkpointing=args.activation_checkpointing,
        tokens_per_micro_batch=args.tokens,
        response_share=args.response_share,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        gpus_per_node=min(args.gpus_per_node, args.gpus),
    )
    if args.trainer == "reinforce":
        given = {n: getattr(args, n) for n in _REINFORCE_COUNTS if getattr(args, n) is not None}
        for name, value in given.items():
            if value < (0 if name == "generation_batch_size" else 1):
                raise ConfigError(f"--{name.replace('_', '-')} {value}: must be at least 1")
        run = replace(run, **given)
        for name in ("frozen_dtype", "shared_prompt"):
            if getattr(args, name) is not None:
                run = replace(run, **{name: getattr(args, name)})
        if run.prompts_per_step % (run.grad_accum * run.dp):
            raise ConfigError(
                f"--prompts-per-step {run.prompts_per_step} does not split into grad_accum x "
                f"data-parallel processes = {run.grad_accum * run.dp} equal micro-batches"
            )
    if args.fsdp and args.shard_optimizer:
        raise ConfigError(
            "--fsdp cannot be combined with --shard-optimizer (the trainers refuse it)"
        )
    if args.fsdp_param_dtype != "float32" and not args.fsdp:
        raise ConfigError(f"--fsdp-param-dtype {args.fsdp_param_dtype} needs --fsdp")
    return run


def _hardware(args):
    hw = HARDWARE[args.hardware]
    if args.peak_tflops is not None:
        key = "bf16_flops" if args.dtype == "bfloat16" else "fp32_flops"
        hw = replace(hw, **{key: args.peak_tflops * 1e12})
    for name in ("memory_bandwidth", "nvlink_bandwidth", "network_bandwidth"):
        value = getattr(args, name)
        if value is not None:
            if value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} {value}: must be > 0")
            hw = replace(hw, **{name: value * 1e9})
    return hw


def run(args) -> int:
    """`nemokern plan`: check the options, plan, print."""
    from . import make_plan

    memory_bytes = parse_size(args.gpu_memory)
    plan_run = _run(args)
    hardware = _hardware(args)
    shape = model_shape(args.model, "--model")
    reward = model_shape(args.reward_model, "--reward-model") if args.reward_model else None
    report = make_plan(
        shape, plan_run, memory_bytes=memory_bytes, reward_shape=reward, hardware=hardware
    )
    report["model"] = args.model
    if reward is not None:
        report["reward_model"] = args.reward_model
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def format_report(r: dict) -> str:
    """The plan as text: terms per rank, phases, verdict, limits, the step-time bound."""
    fsdp = " + FSDP" if r["fsdp"] else ""
    lines = [
        f"nemokern plan: {r['trainer']} of {r['model']} on {r['gpus']} GPUs "
        f"(tp {r['tp']} x dp {r['dp']}{fsdp}), {r['compute_dtype']} compute"
        + (", activation checkpointing" if r["activation_checkpointing"] else ""),
        f"per rank: {r['parameters_per_rank']:,} trained-model parameters; "
        f"{r['tokens_per_micro_batch']:,} tokens per micro-batch",
        "persistent (whole run):",
    ]
    lines += [f"  {k:<22} {_gb(v):>12}" for k, v in r["persistent_bytes"].items() if v]
    lines.append("phases (persistent + these):")
    for phase, terms in r["phase_bytes"].items():
        parts = ", ".join(f"{k} {_gb(v)}" for k, v in terms.items() if v)
        lines.append(f"  {phase:<10} {_gb(r['phase_peak_bytes'][phase]):>12}   {parts}")
    verdict = "FITS" if r["fits"] else "DOES NOT FIT"
    lines.append(
        f"peak {_gb(r['peak_bytes'])} ({r['peak_phase']}) of {_gb(r['memory_bytes'])}: {verdict}; "
        f"largest term {r['binding_term']} ({_gb(r['binding_bytes'])})"
    )
    if r["trainer"] == "reinforce":
        lines.append(
            f"largest micro-batch that fits: {r['largest_micro_batch_prompts']} prompts "
            f"({r['largest_micro_batch_tokens']:,} tokens); largest generate() batch: "
            f"{r['largest_rollout_rows']:,} sequences per process"
        )
    else:
        lines.append(f"largest micro-batch that fits: {r['largest_micro_batch_tokens']:,} tokens")
    if "suggestion" in r:
        s = r["suggestion"]
        lines.append(
            "no tp/FSDP layout on these GPUs fits, with or without activation checkpointing; "
            "more GPUs or a smaller micro-batch are needed"
            if s is None
            else f"fits with: --tp {s['tp']}{' --fsdp' if s['fsdp'] else ''}"
            f"{' --activation-checkpointing' if s['activation_checkpointing'] else ''} "
            f"(peak {_gb(s['peak_bytes'])})"
        )
    t = r["step_time"]
    lines.append(f"step time LOWER BOUND on {t['hardware']['name']}: {t['bound_s']:.3f} s")
    for phase, p in t["phases"].items():
        lines.append(
            f"  {phase:<19} {p['bound_s']:8.3f} s  ({p['flops'] / 1e12:,.0f} TFLOP: "
            f"{p['compute_s']:.3f} s; memory {p['memory_s']:.3f} s; "
            f"collectives {p['comm_bytes'] / 1e9:,.1f} GB: {p['comm_s']:.3f} s)"
        )
    lines.append(
        "bytes are what the tensors need (allocator fragmentation and the CUDA context come "
        "on top); docs/plan.md says how each term is counted"
    )
    return "\n".join(lines)
