"""A LOWER BOUND on the time of one optimizer step: no run can be faster, real runs are slower.

Per phase, the largest of: its FLOPs on one rank over the GPU's peak, the bytes it must move
through the GPU's memory over the memory bandwidth (decoding: every weight and the KV cache read
once per token), and its collectives' bytes over the link they cross (tensor-parallel groups
over NVLink; data-parallel groups over the network when they span nodes). Phases run one after
the other, so the bound is their sum. FLOPs: 2 per multiply-add of every matrix (the LM head
included) per token, attention 4 x heads x head_dim per (query, key) pair with causal keys
(a query at position i sees i + 1 keys); backward 2 x forward; the fused LM-head loss 6 N.H.V
on one rank, 8 N.H.V vocab-parallel (kernels/linear_policy_loss.py); activation checkpointing
one more forward of the layers. Ring collectives: an all-reduce moves 2 (n - 1)/n of the tensor
per rank, an all-gather or reduce-scatter (n - 1)/n.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model import LlamaConfig
from .memory import Run
from .sharding import Counts


@dataclass(frozen=True)
class Hardware:
    """Peak numbers of one GPU (per direction for links), in FLOP/s and bytes/s."""

    name: str
    bf16_flops: float
    fp32_flops: float
    memory_bandwidth: float
    nvlink_bandwidth: float
    network_bandwidth: float

    @classmethod
    def named(cls, name: str) -> Hardware:
        return HARDWARE[name]


# NVIDIA's data sheets, SXM parts: dense bf16 tensor-core peak, fp32 without TF32 (torch's default
# for float32 matmuls), HBM bandwidth, NVLink 4 (900 GB/s both ways), one 400 Gb/s NIC per GPU
HARDWARE = {
    "h100": Hardware("H100 SXM", 989e12, 67e12, 3.35e12, 450e9, 50e9),
    "h200": Hardware("H200 SXM", 989e12, 67e12, 4.8e12, 450e9, 50e9),
}


def _attention_pairs(prefix: int, length: int) -> int:
    """Causal (query, key) pairs of `length` tokens after `prefix` tokens they all see."""
    return length * prefix + length * (length + 1) // 2


def _ring(n: int, nbytes: float, kind: str) -> float:
    if n <= 1:
        return 0.0
    return (2 if kind == "all_reduce" else 1) * (n - 1) / n * nbytes


def step_time(shape: LlamaConfig, run: Run, counts: Counts, frozen: list[Counts], hw: Hardware):
    """{"phases": {phase: {"flops", "compute_s", "memory_s", "comm_bytes", "comm_s", "bound_s"}},
    "bound_s": their sum, "hardware": ...} for one optimizer step on one rank."""
    peak = hw.bf16_flops if run.compute == "bfloat16" else hw.fp32_flops
    act_bytes = 2 if run.compute == "bfloat16" else 4
    heads_d = shape.num_attention_heads // run.tp * shape.head_dim
    layers = shape.num_hidden_layers
    h, v_local = shape.hidden_size, counts.vocab
    head = v_local * h
    dp_link = hw.network_bandwidth if run.gpus > run.gpus_per_node else hw.nvlink_bandwidth
    layer_mats = counts.matrices - head

    def forward_flops(c: Counts, tokens: int, pairs: int, lm_head_tokens: int) -> float:
        return (
            2 * (c.matrices - c.vocab * h) * tokens
            + 2 * c.vocab * h * lm_head_tokens
            + (4 * layers * heads_d * pairs)
        )

    def tp_bytes(tokens: int, passes: int) -> float:  # two all-reduces per layer per pass
        return passes * 2 * layers * _ring(run.tp, tokens * h * act_bytes, "all_reduce")

    phases = {}

    def add(name, flops, memory_bytes=0.0, tp_comm=0.0, dp_comm=0.0):
        comm_s = tp_comm / hw.nvlink_bandwidth + dp_comm / dp_link
        phases[name] = {
            "flops": flops,
            "compute_s": flops / peak,
            "memory_s": memory_bytes / hw.memory_bandwidth,
            "comm_bytes": tp_comm + dp_comm,
            "comm_s": comm_s,
        }
        phases[name]["bound_s"] = max(phases[name]["compute_s"], phases[name]["memory_s"], comm_s)

    whole_gather = counts.whole * (2 if run.fsdp_param_dtype == "bfloat16" else 4)
    if run.trainer == "reinforce":
        prompts = max(1, run.prompts_per_step // run.dp)  # per rank per optimizer step
        p, n, k = run.max_prompt_tokens, run.max_new_tokens, run.k
        rows = prompts * k
        tokens = prompts * run.tokens_per_prompt()
        pairs = prompts * (_attention_pairs(0, p - 1) + k * _attention_pairs(p - 1, n + 1))
        # generate: prefill once per prompt, then n decode steps of all rows
        prefill = forward_flops(counts, prompts * p, prompts * _attention_pairs(0, p), prompts)
        decode_pairs = rows * sum(p + i for i in range(n))
        decode = 2 * counts.matrices * rows * n + 4 * layers * heads_d * decode_pairs
        kv_per_token = layers * 2 * counts.kv_heads * shape.head_dim * 4
        weights = counts.whole * 4
        mem = n * weights + kv_per_token * decode_pairs
        fsdp = _ring(run.dp, whole_gather, "all_gather") if run.sharded else 0.0
        add("generate", prefill + decode, mem, tp_bytes(prompts * p + rows * n, 1), fsdp)
        models = [("reference_logprobs", frozen[0])] + [("score", c) for c in frozen[1:]]
        for name, c in models:
            fl = forward_flops(c, tokens, pairs, tokens if name != "score" else 0)
            frozen_bytes = 4 if run.frozen_dtype == "float32" else 2
            gather = _ring(run.dp, c.whole * frozen_bytes, "all_gather")
            add(name, fl, 0, tp_bytes(tokens, 1), gather if run.sharded else 0.0)
        if run.updates_per_rollout > 1:
            fl = forward_flops(counts, tokens, pairs, tokens)
            add("policy_logprobs", fl, 0, tp_bytes(tokens, 1), fsdp)
    else:
        tokens = run.tokens_per_micro_batch * run.grad_accum
        seqs, rest = divmod(tokens, run.max_length)  # sequences of max_length tokens, packed
        pairs = seqs * _attention_pairs(0, run.max_length) + _attention_pairs(0, rest)
    loss = 6 if run.tp == 1 else 8
    update = 3 * (2 * layer_mats * tokens + 4 * layers * heads_d * pairs)
    if run.trainer != "reward":
        update += loss * tokens * head
    if run.activation_checkpointing:
        update += 2 * layer_mats * tokens + 4 * layers * heads_d * pairs
    grads = counts.trained * 4 if not run.sharded else counts.whole * 4
    if run.sharded:
        dp_comm = 2 * _ring(run.dp, whole_gather, "all_gather")
        dp_comm += _ring(run.dp, grads, "reduce_scatter")
    else:
        dp_comm = _ring(run.dp, grads, "all_reduce")
    passes = 3 if run.activation_checkpointing else 2
    add("update", update, 0, tp_bytes(tokens, passes), dp_comm)
    return {
        "hardware": hw.__dict__,
        "phases": phases,
        "bound_s": sum(ph["bound_s"] for ph in phases.values()),
    }
