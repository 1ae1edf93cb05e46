"""Llama-3.x decoder (the trunk under every nemokern head), readable top to bottom.

embedding -> N x [RMSNorm -> GQA attention with llama3-scaled RoPE -> residual,
                  RMSNorm -> SwiGLU MLP -> residual] -> final RMSNorm -> LM head.
Parameter names match HF's LlamaForCausalLM without its "model." prefix, so hf.py maps checkpoints
one to one. With a tp_group (Megatron-style tensor parallelism) every rank holds a slice of each
projection: q/k/v and gate/up split by output (heads), o and down by input, the embedding and the
LM head by vocabulary; activations between blocks are replicated on all ranks. The numerics
follow transformers (RMSNorm in fp32, cos/sin cast to the activation dtype) so logits match
LlamaForCausalLM to rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..kernels import rms_norm
from ..parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    Shard,
    VocabParallelEmbedding,
    broadcast,
    copy_to_tp,
    rank_and_size,
)
from .attention import AttentionContext, KVCache, SharedPrefix, attention, cache_mask
from .config import LlamaConfig
from .hf import empty, load_pretrained, save_pretrained, split_from


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 statistics, rounded back before the weight multiply: bit for bit transformers'
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse RoPE frequencies [D/2] in fp32 on the CPU, with Llama-3.1's frequency rescaling."""
    d = config.head_dim
    exponents = torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d
    inv_freq = 1.0 / (config.rope_theta**exponents)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (beyond the original context) are slowed by `factor`, short ones kept,
    # and the band in between interpolated smoothly.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(position_ids, inv_freq, dtype):
    """position_ids [B, T] -> cos, sin [B, T, D] (angles in fp32 or fp64, then cast to `dtype`)."""
    exact = torch.promote_types(dtype, torch.float32)
    freqs = position_ids[..., None].to(exact) * inv_freq.to(exact)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [B, T, H, D]; rotates the two halves of the head dimension (HF's rotate_half layout)."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def head_shards(config: LlamaConfig, tp_group) -> tuple[Shard, Shard]:
    """This rank's rows of q_proj and of k_proj/v_proj: nq/tp query heads, and the KV heads they
    read (nkv/tp of them, or one KV head replicated on tp/nkv ranks when nkv < tp)."""
    rank, tp = rank_and_size(tp_group)
    nq, nkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if nq % tp:
        raise ValueError(
            f"num_attention_heads={nq} is not divisible by the tensor-parallel size {tp}; "
            "choose a tp size that divides it"
        )
    if nkv % tp and tp % nkv:
        raise ValueError(
            f"num_key_value_heads={nkv} and the tensor-parallel size {tp}: one must divide the "
            "other (KV heads are split, or replicated when fewer than ranks)"
        )
    q = Shard(0, nq * d, nq // tp * d, rank, tp)
    kv = Shard(0, nkv * d, max(nkv // tp, 1) * d, rank, tp)
    return q, kv


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int, tp_group=None):
        super().__init__()
        self.layer, self.head_dim = layer, config.head_dim
        h, nq, nkv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        q_rows, kv_rows = head_shards(config, tp_group)
        # x passes copy_to_tp once in forward: one gradient all-reduce for q, k and v together
        col = dict(tp_group=tp_group, reduce_input_grad=False)
        self.q_proj = ColumnParallelLinear(h, nq * self.head_dim, shard=q_rows, **col)
        self.k_proj = ColumnParallelLinear(h, nkv * self.head_dim, shard=kv_rows, **col)
        self.v_proj = ColumnParallelLinear(h, nkv * self.head_dim, shard=kv_rows, **col)
        self.o_proj = RowParallelLinear(nq * self.head_dim, h, tp_group)

    def forward(self, x, cos, sin, ctx: AttentionContext):
        b, t, _ = x.shape
        x = copy_to_tp(x, self.q_proj.tp_group)
        q = self.q_proj(x).view(b, t, -1, self.head_dim)
        k = self.k_proj(x).view(b, t, -1, self.head_dim)
        v = self.v_proj(x).view(b, t, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v, ctx, self.layer)
        return self.o_proj(out.reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig, tp_group=None):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        col = dict(tp_group=tp_group, reduce_input_grad=False, what="intermediate_size")
        self.gate_proj = ColumnParallelLinear(h, i, **col)
        self.up_proj = ColumnParallelLinear(h, i, **col)
        self.down_proj = RowParallelLinear(i, h, tp_group, what="intermediate_size")

    def forward(self, x):
        x = copy_to_tp(x, self.gate_proj.tp_group)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int, tp_group=None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, tp_group)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tp_group)

    def forward(self, x, cos, sin, ctx: AttentionContext):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Llama-3.x causal LM.

    `activation_checkpointing = True` recomputes each layer in the backward pass (training only).
    tp_group: a torch.distributed group (e.g. `init_parallel(tp).get_group("tp")`) over which the
    weights are split; every rank of it runs the same calls on the same input_ids. `model(ids)`
    returns the full logits on every rank (gathered); trainers take `hidden_states` and this
    rank's vocabulary shard `lm_head.weight` to `linear_logprobs(..., tp_group=model.tp_group)`.
    """

    def __init__(
        self, config: LlamaConfig, *, tp_group=None, activation_checkpointing: bool = False
    ):
        super().__init__()
        self.config = config
        self.activation_checkpointing = activation_checkpointing
        h, v = config.hidden_size, config.vocab_size
        self.embed_tokens = VocabParallelEmbedding(v, h, tp_group)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, tp_group) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ColumnParallelLinear(h, v, tp_group, gather_output=True, what="vocab_size")
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Kept out of the buffers so that model.to(bfloat16) never rounds the frequencies.
        self._inv_freq = rope_inv_freq(config)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02):
        """Random init as transformers does it (normal(0, std) matrices, unit norm weights)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    def forward(
        self, input_ids, *, cu_seqlens=None, parents=None, position_ids=None, cache=None, valid=None
    ):
        """Logits [..., V] for input_ids [B, T] (dense), [1, N] or [N] (packed, with cu_seqlens
        and optionally parents; see hidden_states)."""
        return self.lm_head(
            self.hidden_states(
                input_ids,
                cu_seqlens=cu_seqlens,
                parents=parents,
                position_ids=position_ids,
                cache=cache,
                valid=valid,
            )
        )

    def hidden_states(
        self,
        input_ids,
        *,
        cu_seqlens=None,
        parents=None,
        position_ids=None,
        cache: KVCache | None = None,
        final_norm: bool = True,
        valid=None,
    ):
        """Hidden states [..., H] of the last layer, final RMSNorm applied unless final_norm=False.

        input_ids [B, T] with no padding, or packed [1, N] / [N] with cu_seqlens [S + 1] (int,
        0 ... N) whose position ids restart per segment unless given. position_ids has the shape
        of input_ids. With a KVCache (generation), `valid` [B, T] bool marks real tokens.
        parents [S] (int, packed only; -1 = none): segment s continues segment parents[s], which
        comes before it and has no parent itself: its tokens attend to all of the parent's
        tokens and then causally to their own, and their positions go on from the parent's
        length. So k responses packed after one copy of their prompt give each the hidden states
        of prompt + response, with the prompt computed once (nemokern.trainers.rollout.pack(...,
        k) builds such batches for REINFORCE, the reward data's pair batches for chosen and
        rejected).
        The output keeps input_ids' leading shape. Checking the ids against the vocabulary costs one
        host sync.
        """
        ids, pos, ctx = self._prepare(input_ids, cu_seqlens, position_ids, cache, valid, parents)
        x = self.decoder(ids, pos, ctx)
        if cache is not None:
            cache.length += ids.shape[1]
        if final_norm:
            x = self.norm(x)
        return x.view(*input_ids.shape, -1)

    def decoder(self, ids, positions, ctx: AttentionContext):
        """The decoder layers' output [B, T, H] (before the final norm) for ids and positions
        [B, T] under `ctx`, with no checks and no host sync: what hidden_states runs once its
        inputs are validated, and what generate() runs for prefill and each decode step."""
        x = self.embed_tokens(ids)
        if self._inv_freq.device != x.device:
            self._inv_freq = self._inv_freq.to(x.device)
        cos, sin = rope_cos_sin(positions, self._inv_freq, x.dtype)
        recompute = (
            self.activation_checkpointing
            and self.training
            and torch.is_grad_enabled()
            and ctx.cache is None
        )
        for layer in self.layers:
            if recompute:
                x = checkpoint(layer, x, cos, sin, ctx, use_reentrant=False)
            else:
                x = layer(x, cos, sin, ctx)
        return x

    def _prepare(self, input_ids, cu_seqlens, position_ids, cache, valid, parents=None):
        """Validate inputs; return ids [B, T], position ids [B, T] and the AttentionContext."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (
            torch.int64,
            torch.int32,
        ):
            got = (
                input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            )
            raise TypeError(
                f"input_ids must be an int64/int32 tensor of token ids, got {got}"
                + ("; tokenize the text first" if isinstance(input_ids, str) else "")
            )
        if input_ids.dim() == 1 and cu_seqlens is not None:
            ids = input_ids[None]
        elif input_ids.dim() == 2:
            ids = input_ids
        else:
            raise ValueError(
                "input_ids must be [B, T] (or [N] with cu_seqlens); got shape "
                f"{tuple(input_ids.shape)}"
            )
        b, t = ids.shape
        if b == 0 or t == 0:
            raise ValueError(
                f"input_ids has shape {tuple(input_ids.shape)}: no tokens; pass at "
                "least one token per row"
            )
        lo, hi = (int(x) for x in torch.aminmax(ids))  # one host sync, for a named error
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(
                f"input_ids hold ids in [{lo}, {hi}], outside the vocabulary "
                f"[0, vocab_size={self.config.vocab_size})"
            )
        ctx = AttentionContext(cache=cache)
        if cu_seqlens is not None:
            if cache is not None or b != 1:
                raise ValueError(
                    "packed input (cu_seqlens) needs input_ids [1, N] or [N] and no cache; "
                    f"got shape {tuple(input_ids.shape)}"
                )
            cu, ctx.max_seqlen = _check_cu_seqlens(cu_seqlens, t, ids.device)
            ctx.cu_seqlens, lengths = cu, cu[1:] - cu[:-1]
            offsets = None
            if parents is not None:
                ctx.shared, offsets = _shared_prefix(cu, parents)
            if position_ids is None:
                starts = torch.repeat_interleave(cu[:-1].long(), lengths.long(), output_size=t)
                if offsets is not None:  # a continuing segment's positions follow its parent's
                    starts = starts - torch.repeat_interleave(
                        offsets, lengths.long(), output_size=t
                    )
                position_ids = torch.arange(t, device=ids.device) - starts
        elif parents is not None:
            raise ValueError("parents describes packed segments; pass it with cu_seqlens")
        if position_ids is None:
            start = 0 if cache is None else cache.length
            position_ids = torch.arange(start, start + t, device=ids.device).expand(b, t)
        if position_ids.numel() != b * t or tuple(position_ids.shape) not in (
            (b, t),
            (t,) * (b == 1),
        ):
            raise ValueError(
                f"position_ids shape {tuple(position_ids.shape)} must equal input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
        if cache is not None:
            valid = (
                torch.ones(b, t, dtype=torch.bool, device=ids.device) if valid is None else valid
            )
            if valid.shape != (b, t) or valid.dtype != torch.bool:
                raise ValueError(
                    f"valid must be a bool tensor of shape {(b, t)}; "
                    f"got {valid.dtype} {tuple(valid.shape)}"
                )
            ctx.cache_mask = cache_mask(cache, valid)
        elif valid is not None:
            raise ValueError(
                "valid marks padding inside a KV cache; without a cache pass unpadded input_ids"
            )
        return ids, position_ids.reshape(b, t), ctx

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for `batch` rows of up to `max_len` tokens (model dtype and device)."""
        c, p = self.config, self.embed_tokens.weight
        return KVCache.allocate(
            c.num_hidden_layers,
            batch,
            self.layers[0].self_attn.k_proj.out_features // c.head_dim,  # this rank's KV heads
            max_len,
            c.head_dim,
            dtype=p.dtype,
            device=p.device,
        )

    # ---- HF checkpoints (implemented in hf.py) ------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, **options) -> Llama:
        """Load a local HF Llama directory (config.json + *.safetensors, sharded or not).

        Options (keywords): dtype (torch dtype or name; default the config.json dtype, else
        float32), device, tp_group (split the model over this group; each rank reads only its
        slices of the memory-mapped files), activation_checkpointing, check_finite (raise
        CheckpointError naming the tensor and file if one holds nan/inf; default True),
        deferred (build it on the meta device and read the weights when
        `model.deferred.materialize` runs, after the model is sharded; a model with tied
        embeddings is read at once all the same).
        """
        return load_pretrained(cls, path, **options)

    @classmethod
    def empty(cls, config: LlamaConfig, *, dtype, device, tp_group=None) -> Llama:
        """A Llama whose tensors are allocated on `device` in `dtype` but not initialised, to be
        filled from a checkpoint or another model (no random init spent)."""
        return empty(cls, config, dtype=dtype, device=device, tp_group=tp_group)

    @classmethod
    def split_from(cls, full: Llama, tp_group) -> Llama:
        """This rank's tensor-parallel part of `full`, an unsplit Llama (e.g. a random one built
        from a seed on every rank): each weight sliced as from_pretrained(..., tp_group=...)
        would read it from full's files, so the split model computes what `full` does. `full`
        itself when tp_group is None."""
        return split_from(cls, full, tp_group)

    def save_pretrained(self, path, *, max_shard_size: int | str = "5GB") -> None:
        """Write config.json + safetensors (sharded above max_shard_size); transformers loads it.

        Under tensor parallelism every rank of tp_group calls it (the slices are gathered one
        tensor at a time) and the group's rank 0 writes one ordinary, unsharded-model checkpoint.
        """
        save_pretrained(self, path, max_shard_size=max_shard_size)

    @property
    def tp_group(self):
        """The tensor-parallel process group (None: the whole model on this process)."""
        return self.embed_tokens.tp_group

    def same_token(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens sampled on tp rank 0, on every rank of tp_group (all continue alike)."""
        return broadcast(tokens, self.tp_group)


def _shared_prefix(cu, parents) -> tuple[SharedPrefix, torch.Tensor]:
    """The SharedPrefix for packed segments cu [S + 1] (int32, checked) whose segment s
    continues segment parents[s] (-1: none), and each segment's position offset [S] int64 (its
    parent's length, else 0). Errors name the segment. One host sync."""
    s = cu.numel() - 1
    if (
        not isinstance(parents, torch.Tensor)
        or parents.dtype.is_floating_point
        or tuple(parents.shape) != (s,)
    ):
        got = tuple(parents.shape) if isinstance(parents, torch.Tensor) else type(parents).__name__
        raise ValueError(
            f"parents must be an integer tensor [S] = [{s}] (one per segment); got {got}"
        )
    par = parents.to(device=cu.device, dtype=torch.int64)
    listed = par.tolist()
    for i, p in enumerate(listed):
        if p != -1 and not (0 <= p < i):
            raise ValueError(
                f"parents[{i}] = {p}: a segment continues an earlier segment (0 ... {i - 1}) or "
                "none (-1)"
            )
        if p != -1 and listed[p] != -1:
            raise ValueError(
                f"parents[{i}] = {p}, but segment {p} continues segment {listed[p]} itself; "
                "only one level of shared prefix is supported"
            )
    start, own = cu[:-1].long(), (cu[1:] - cu[:-1]).long()
    has = par >= 0
    p = par.clamp(min=0)
    offset = torch.where(has, own[p], 0)  # keys of the parent, before each segment's own
    n_keys = offset + own
    cu_k = torch.zeros(s + 1, dtype=torch.int64, device=cu.device)
    cu_k[1:] = n_keys.cumsum(0)
    total = int(cu_k[-1])
    seg = torch.repeat_interleave(torch.arange(s, device=cu.device), n_keys, output_size=total)
    j = torch.arange(total, device=cu.device) - cu_k[seg]
    kv_index = torch.where(j < offset[seg], start[p][seg] + j, start[seg] + j - offset[seg])
    shared = SharedPrefix(kv_index, cu_k.to(torch.int32), int(n_keys.max()) if s else 0)
    return shared, offset


def _check_cu_seqlens(cu_seqlens, n, device):
    """cu_seqlens as int32 on `device` (what the varlen kernels take) and the longest segment.

    One host sync. A CPU cu_seqlens with CUDA input_ids is moved, not refused: it is the natural
    way to build it, and the kernels would otherwise fail with an error that does not name it.
    """
    if (
        not isinstance(cu_seqlens, torch.Tensor)
        or cu_seqlens.dim() != 1
        or cu_seqlens.numel() < 2
        or cu_seqlens.dtype.is_floating_point
    ):
        raise ValueError(
            "cu_seqlens must be a 1-D integer tensor [S + 1] of segment offsets (0, ..., N)"
        )
    bounds = cu_seqlens.tolist()
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != n or min(lengths) < 0:
        raise ValueError(
            f"cu_seqlens must start at 0, be non-decreasing and end at N={n}; got {bounds}"
        )
    return cu_seqlens.to(device=device, dtype=torch.int32), max(lengths)
