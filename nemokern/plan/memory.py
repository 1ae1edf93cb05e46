"""Bytes per rank of a training run, term by term and phase by phase.

What the trainers keep (nemokern/train): the trained model in float32 (loaded so whatever the
checkpoint's dtype), its float32 gradients and AdamW's two float32 moments (created at the first
optimizer step, so from the second step on); under DDP (data parallel, no --fsdp) a float32
copy of the gradients in DDP's buckets; under --fsdp 1/dp of all three, plus the layers FSDP2
gathers for the layer that runs; the REINFORCE reference and reward model in --frozen-dtype.
Compute: bf16 autocast on CUDA (`compute="bfloat16"`: the matmuls' inputs in bf16, the residual
stream, norms and hidden states in float32; each matrix's bf16 copy is kept for the backward),
float32 on the CPU.

A phase's peak is the persistent state plus what the phase holds at its fullest:
  forward     the end of a micro-batch's forward, where the fused loss runs: the activations
              (activations.py: measured, scaled by shape), the loss's input and buffers, the
              gradients of earlier micro-batches (grad_accum > 1); under bf16 autocast each
              matrix's bf16 copy
  backward    its end: all gradients (the layers' gradients fill in as their activations are
              freed, so the larger end of the backward bounds it) and a layer's working set
  optimizer   all gradients (AdamW fused: no temporaries)
  generate    the KV cache (rows x (prompt bucket + max_new_tokens), in the policy's dtype),
              the sampled rows' logits, under --fsdp the whole policy gathered
  score       a frozen forward without gradients: one layer's working set and the chunked
              log-prob buffers, under --fsdp the frozen model's gathered layers
  checkpoint  (CPU only) writing a checkpoint after a step: the host copies of the state written
  export      (CPU only) OUT/final under tp or --fsdp: the model gathered on the writer
Each number is a lower bound on what the allocator needs: fragmentation and the CUDA context
(about 0.5 to 1 GB) come on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..model import LlamaConfig
from .activations import activation_model
from .sharding import Counts, rank_counts

_BYTES = {"float32": 4, "bfloat16": 2}
# kernels/linear_policy_loss.py and linear_logprobs.py (tests/test_plan.py checks these): the
# scratch blocks of logits the fused LM-head ops hold, per device
LOSS_BLOCK = {"cuda": 512 << 20, "cpu": (1 << 23) * 4}
LOSS_STATS_BLOCK = {"cuda": 0, "cpu": (1 << 20) * 4}
LOGPROBS_FWD_BLOCK = {"cuda": 0, "cpu": (1 << 25) * 4}
LOGPROBS_BWD_BLOCK = {"cuda": 256 << 20, "cpu": (1 << 23) * 4}
# the CPU reference's statistics (block_stats_torch: exp) and gradient (block_dlogits_torch: the
# probabilities) each take a second block of the size of the logits block
LOGPROBS_BLOCKS = {"cuda": 1, "cpu": 2}
PROMPT_BUCKET_MIN = 16  # model/generate.py's _MIN_BUCKET
FSDP_UNITS_IN_FLIGHT = 2  # the unit computing and the one prefetched
SAVE_SHARD_BYTES = 5 * 10**9  # save_pretrained's default max_shard_size, "5GB"


@dataclass(frozen=True)
class Run:
    """What a training run looks like to the planner (the trainers' option names)."""

    trainer: str  # sft, reward, reinforce
    gpus: int
    tp: int = 1
    fsdp: bool = False
    device: str = "cuda"  # cuda (bf16 autocast when bf16) or cpu (float32)
    bf16: bool = True
    fsdp_param_dtype: str = "float32"
    shard_optimizer: bool = False
    activation_checkpointing: bool = False
    tokens_per_micro_batch: int = 4096  # sft / reward
    response_share: float = 1.0  # sft: the share of tokens that are response tokens
    max_length: int = 4096  # sft / reward: tokens per sequence (the step-time bound's attention)
    grad_accum: int = 1
    gpus_per_node: int = 8
    # reinforce
    k: int = 4
    prompts_per_step: int = 8
    updates_per_rollout: int = 1
    generation_batch_size: int = 0
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 256
    frozen_dtype: str = "float32"
    shared_prompt: bool = True
    reward_outputs: int = 9

    @property
    def dp(self) -> int:
        return self.gpus // self.tp

    @property
    def compute(self) -> str:
        return "bfloat16" if self.device == "cuda" and self.bf16 else "float32"

    @property
    def sharded(self) -> bool:
        return self.fsdp and self.dp > 1

    def prompts_per_micro_batch(self) -> int:
        return max(1, self.prompts_per_step // (self.grad_accum * self.dp))

    def micro_batch_tokens(self) -> int:
        """Tokens of one update micro-batch: for REINFORCE, its prompts packed once each and k
        responses of max_new_tokens (+1, pack's continuation token) at the longest."""
        if self.trainer != "reinforce":
            return self.tokens_per_micro_batch
        return self.prompts_per_micro_batch() * self.tokens_per_prompt()

    def loss_share(self) -> float:
        """The share of a micro-batch's tokens the fused loss computes (it drops the rows
        without a target: prompts, in REINFORCE every response's last token too)."""
        if self.trainer == "reinforce":
            return self.k * self.max_new_tokens / self.tokens_per_prompt()
        return self.response_share

    def tokens_per_prompt(self) -> int:
        """A prompt's k samples packed (pack): the prompt once and each response after its last
        token, or with shared_prompt off k whole copies."""
        p, n, k = self.max_prompt_tokens, self.max_new_tokens, self.k
        return p - 1 + k * (n + 1) if self.shared_prompt else k * (p + n)

    def rollout_rows(self) -> int:
        """Sequences one generate() call samples on a process."""
        prompts = self.prompts_per_step * self.updates_per_rollout // self.dp
        if self.generation_batch_size:
            prompts = min(prompts, max(1, self.generation_batch_size // self.k))
        return max(1, prompts) * self.k


def _activations(shape: LlamaConfig, run: Run, counts: Counts, tokens: int) -> dict:
    """Saved activations of one micro-batch (activation checkpointing: each layer's input, and
    in the backward one recomputed layer's activations), and the backward's working set: the
    gradients flowing into and out of the widest matmul of a layer (2 x tokens x its width)."""
    model = activation_model(run.compute, run.activation_checkpointing)
    d, tp = shape.head_dim, run.tp
    heads = shape.num_attention_heads // tp
    dims = (shape.hidden_size, heads * d, counts.kv_heads * d, shape.intermediate_size // tp, heads)
    total = tokens * (
        model.per_layer(*dims) * shape.num_hidden_layers + model.outside_layers(dims[0], d)
    )
    out = {"activations": int(total)}
    if run.activation_checkpointing:
        out["recomputed_layer"] = int(activation_model(run.compute).per_layer(*dims) * tokens)
    out["backward_working_set"] = 2 * tokens * max(dims[:4]) * _BYTES[run.compute]
    return out


def _loss_buffers(shape: LlamaConfig, run: Run, counts: Counts, tokens: int) -> tuple[int, int]:
    """(bytes held from the forward into the backward, scratch bytes) of the policy trainers'
    fused LM-head loss (linear_policy_loss) over the rows of `tokens` that have a target.
    Single rank: the hidden-state gradient and the
    float32 LM-head gradient, formed in the forward, and a block of logits per token chunk.
    Vocab-parallel: the LM-head gradient formed at the start of the backward, and the larger of
    the forward's and the backward's blocks of logits. Hidden states are float32 (the residual
    stream) on both devices."""
    if run.trainer == "reward":
        return 0, 0
    h, v = shape.hidden_size, counts.vocab
    tokens = math.ceil(tokens * run.loss_share())
    dev = run.device
    if run.tp == 1:
        held = tokens * h * 4 + v * h * 4
        scratch = min(tokens * v * 4, LOSS_BLOCK[dev]) + LOSS_STATS_BLOCK[dev]
        return held, scratch
    block = max(LOGPROBS_FWD_BLOCK[dev], LOGPROBS_BWD_BLOCK[dev])
    return v * h * 4, min(tokens * v * 4, block) * LOGPROBS_BLOCKS[dev]


def _loss_input(shape: LlamaConfig, run: Run, tokens: int) -> int:
    """The policy trainers' fused loss's input while it runs: the final hidden states [tokens, H]
    float32 (the final norm's output, which no backward saves) and, when some rows have no
    target, the copy of the rows that do (linear_policy_loss runs its GEMMs on those only)."""
    if run.trainer == "reward":
        return 0
    kept = math.ceil(tokens * run.loss_share())
    return (tokens + (kept if kept < tokens else 0)) * shape.hidden_size * 4


def _checkpoint(run: Run, counts: Counts) -> dict:
    """What writing a checkpoint (engine/checkpoint.py: every --save-every steps and at the end)
    adds on the process that writes the most, after the step (gradients freed), on the CPU:
    encode_state copies each tensor of the AdamW state a process writes (rank 0 all of it; under
    --shard-optimizer or --fsdp each process its share; under tp each tp rank its slice's); then
    under tp save_shard copies a rank's parameters (under --fsdp gathered), and under --fsdp
    alone save_pretrained gathers the model on the writing process. On CUDA the copies are host
    memory (state_format.host_copy) and the GPU holds one gathered tensor at a time: nothing
    counted."""
    if run.device != "cpu":
        return {}
    optimizer = persistent(run, counts, [])["optimizer"]
    if run.sharded:  # gathered tensor by tensor: the kept ones, and one being gathered
        model = 4 * (counts.whole + counts.largest_saved)
    else:
        model = 4 * counts.stored if run.tp > 1 else 0
    return {"copy": max(optimizer, model)}


def _export(run: Run, counts: Counts) -> dict:
    """OUT/final (save_pretrained, on the writing process; the CPU): under tp or --fsdp each
    tensor gathered whole (all_gather's stacked slices, then their concatenation) and kept until
    its safetensors file (at most SAVE_SHARD_BYTES) is written; on one process the parameters
    are written as they are. On CUDA the gathered tensors go to host memory one at a time:
    nothing counted."""
    if run.device != "cpu" or not (run.tp > 1 or run.sharded):
        return {}
    kept = min(counts.saved, SAVE_SHARD_BYTES // 4)
    return {"gathered_model": 4 * (kept + counts.largest_saved)}


def persistent(run: Run, counts: Counts, frozen: list[Counts]) -> dict:
    """Bytes kept for the whole run: parameters, AdamW state, DDP's buckets, frozen models."""
    out = {
        "parameters": counts.stored * 4,
        "optimizer": 2 * 4 * (counts.trained // run.dp if run.shard_optimizer else counts.trained),
        # DDP as engine/loop.py builds it (gradient_as_bucket_view off): flat float32 buckets
        # holding every trained parameter's gradient beside .grad, allocated at construction
        "ddp_buckets": counts.trained * 4 if run.dp > 1 and not run.sharded else 0,
    }
    for name, c in zip(("reference", "reward_model"), frozen):
        out[name] = c.stored * _BYTES[run.frozen_dtype]
    return out


def phases(
    shape: LlamaConfig, run: Run, counts: Counts, frozen: list[Counts], tokens=None, rows=None
):
    """{phase: {term: bytes}} of what each phase adds to the persistent bytes, at the run's
    micro-batch and rollout or at `tokens` per micro-batch and `rows` per generate() call."""
    tokens = run.micro_batch_tokens() if tokens is None else tokens
    act = _activations(shape, run, counts, tokens)
    held, scratch = _loss_buffers(shape, run, counts, tokens)
    grads = counts.trained * 4
    gather = _BYTES[run.fsdp_param_dtype]
    fsdp = {}
    if run.sharded:
        fsdp["fsdp_gathered"] = (counts.root + FSDP_UNITS_IN_FLIGHT * counts.layer) * gather
        fsdp["fsdp_unsharded_grads"] = FSDP_UNITS_IN_FLIGHT * counts.layer * 4
    forward = {
        "activations": act["activations"],
        "loss_input": _loss_input(shape, run, tokens),
        "loss_buffers": held,
        # the fused loss's blocks at the end of the forward, then the backward's first layer
        "scratch": max(scratch, act["backward_working_set"]),
        **({"recomputed_layer": act["recomputed_layer"]} if "recomputed_layer" in act else {}),
        **fsdp,
    }
    if run.compute == "bfloat16" and not (run.sharded and run.fsdp_param_dtype == "bfloat16"):
        forward["autocast_weights"] = counts.matrices * 2
    if run.grad_accum > 1:  # the earlier micro-batches' gradients
        forward["gradients"] = grads
    backward = {"gradients": grads, "working_set": act["backward_working_set"], **fsdp}
    out = {"forward": forward, "backward": backward, "optimizer": {"gradients": grads}}
    for name, terms in (("checkpoint", _checkpoint(run, counts)), ("export", _export(run, counts))):
        if terms:  # on CUDA neither adds to the GPU's memory
            out[name] = terms
    if run.trainer == "reinforce":
        out["generate"] = _generate(shape, run, counts, gather, rows or run.rollout_rows())
        out["score"] = _score(shape, run, frozen, tokens)
    return out


def kv_cache_bytes(shape: LlamaConfig, run: Run, counts: Counts, rows: int, dtype_bytes: int):
    """generate()'s KVCache: `rows` x (the prompt bucket, a power of two >= the longest prompt,
    + max_new_tokens) slots of every layer's keys and values (this rank's KV heads), and a
    validity flag per slot."""
    bucket = max(PROMPT_BUCKET_MIN, 1 << max(run.max_prompt_tokens - 1, 0).bit_length())
    slots = bucket + run.max_new_tokens
    per_slot = shape.num_hidden_layers * 2 * counts.kv_heads * shape.head_dim * dtype_bytes
    return rows * slots * (per_slot + 1)  # + key_valid


def _generate(shape: LlamaConfig, run: Run, counts: Counts, gather: int, rows: int) -> dict:
    policy = gather if run.sharded else 4  # the KV cache takes the gathered weights' dtype
    # logits [rows, V] gathered, then float32 copies while sampling (scaled, softmax)
    logits = rows * shape.vocab_size * (4 * 3 + (4 if run.tp > 1 else 0))
    out = {"kv_cache": kv_cache_bytes(shape, run, counts, rows, policy), "logits": logits}
    if run.sharded:
        out["fsdp_gathered"] = counts.whole * gather
    return out


def _score(shape: LlamaConfig, run: Run, frozen: list[Counts], tokens: int) -> dict:
    """The reference's / reward model's forward without gradients over one micro-batch."""
    c = frozen[0]
    act = _activations(shape, replace(run, activation_checkpointing=False), c, tokens)
    out = {
        "working_set": act["backward_working_set"],
        "logprob_buffers": min(tokens * c.vocab * 4, LOGPROBS_FWD_BLOCK[run.device])
        * LOGPROBS_BLOCKS[run.device],
    }
    if run.sharded:
        out["fsdp_gathered"] = (c.root + FSDP_UNITS_IN_FLIGHT * c.layer) * _BYTES[run.frozen_dtype]
    return out


@dataclass
class Memory:
    persistent: dict
    phases: dict

    @property
    def phase_totals(self) -> dict:
        base = sum(self.persistent.values())
        return {name: base + sum(terms.values()) for name, terms in self.phases.items()}

    @property
    def peak(self) -> int:
        return max(self.phase_totals.values())

    @property
    def peak_phase(self) -> str:
        totals = self.phase_totals
        return max(totals, key=totals.get)

    def binding(self) -> tuple[str, int]:
        """The largest single term of the peak phase (persistent ones included)."""
        terms = {**self.persistent, **self.phases[self.peak_phase]}
        name = max(terms, key=terms.get)
        return name, terms[name]


def model_counts(shape: LlamaConfig, run: Run, reward_shape: LlamaConfig | None = None):
    """(Counts of the trained model, [Counts of the frozen models]) on one rank."""
    kw = dict(gpus=run.gpus, tp=run.tp, fsdp=run.fsdp, gpus_per_node=run.gpus_per_node)
    trained = rank_counts(shape, reward_head=9 if run.trainer == "reward" else 0, **kw)
    frozen = []
    if run.trainer == "reinforce":
        frozen.append(rank_counts(shape, **kw))
        if reward_shape is not None:
            frozen.append(rank_counts(reward_shape, reward_head=run.reward_outputs, **kw))
    return trained, frozen


def memory(shape, run: Run, counts, frozen, tokens=None, rows=None) -> Memory:
    return Memory(persistent(run, counts, frozen), phases(shape, run, counts, frozen, tokens, rows))


def largest(fits, low: int, high: int) -> int:
    """The largest n in [low, high] with fits(n) (fits monotone decreasing); low - 1 if none."""
    if not fits(low):
        return low - 1
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low
