"""Causal grouped-query attention backends for the Llama trunk, and the per-layer KV cache.

Three input forms, all with q [B, T, Hq, D] and k, v [B, T, Hkv, D] (Hq a multiple of Hkv):
  dense   B rows of T real tokens, plain causal attention;
  packed  B == 1, several sequences concatenated, segment boundaries in cu_seqlens [S + 1];
          no token attends across a boundary, no padding is computed; with a cache and
          cache_index, the keys/values are also written into the cache (a packed prefill);
          with `shared` (SharedPrefix), a segment may continue another one: its tokens attend
          to all of that segment's tokens, then causally to their own (k responses after one
          copy of their prompt);
  cached  generation: new keys/values are written into a preallocated KVCache at given slots and
          the queries attend to every valid cache slot up to their own; the static form
          (static_cache_context) attends over the whole cache with a mask, so a decode step has
          the same shapes at every position and torch.compile captures it once.
Packed backend, chosen automatically: flash_attn's varlen kernel (installed + CUDA + half
precision), else torch.nn.attention.varlen (CUDA + half precision), else exact per-segment SDPA.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nemokern import env

PACKED_BACKENDS = env.VARIABLES["NEMOKERN_ATTENTION"].choices
_HALF = (torch.float16, torch.bfloat16)


@dataclass
class KVCache:
    """Preallocated keys/values for generation: k[i], v[i] are [B, Hkv, max_len, D] for layer i.

    Slot s of row b holds the token written at step s; key_valid [B, max_len] marks slots that
    hold real tokens (left padding stays False), so padded rows never attend to padding.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    key_valid: torch.Tensor
    length: int = 0  # slots filled so far (same for every row)

    @classmethod
    def allocate(cls, num_layers, batch, num_kv_heads, max_len, head_dim, *, dtype, device):
        shape = (batch, num_kv_heads, max_len, head_dim)
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            key_valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
        )

    @property
    def max_len(self) -> int:
        return self.key_valid.shape[1]


@dataclass
class SharedPrefix:
    """The keys each packed segment attends to when segments may continue others.

    Segment s's key list is its parent's tokens (if it has one) followed by its own; kv_index
    [sum of key lengths] int64 lists those packed rows, segment by segment, with offsets
    cu_seqlens_k [S + 1] int32 and longest list max_seqlen_k. Queries keep the packed
    cu_seqlens; causality is aligned at the end of each key list (the last query sees every
    key of its list)."""

    kv_index: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_k: int


@dataclass
class AttentionContext:
    """How the tokens of one forward pass relate to each other (shared by all layers)."""

    cu_seqlens: torch.Tensor | None = None  # [S + 1] int32, packed form only
    max_seqlen: int = 0
    cache: KVCache | None = None
    # cached form: [B, 1, T, S] bool, True where query t may attend to slot j; S is
    # cache.length + T (eager) or cache.max_len (static)
    cache_mask: torch.Tensor | None = None
    # cached form: [T] int64 cache slots the new keys/values go to (default: the next T)
    slots: torch.Tensor | None = None
    # packed form only, prefilling a cache: (rows [N], slots [N]) int64, where each packed
    # token's key/value goes
    cache_index: tuple[torch.Tensor, torch.Tensor] | None = None
    shared: SharedPrefix | None = None  # packed form only: segments that continue others


def attention(q, k, v, ctx: AttentionContext, layer: int) -> torch.Tensor:
    """Causal attention; q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D] in q's dtype."""
    if ctx.cu_seqlens is not None:
        if ctx.cache is not None:
            rows, slots = ctx.cache_index
            ctx.cache.k[layer][rows, :, slots] = k[0]
            ctx.cache.v[layer][rows, :, slots] = v[0]
        return packed_attention(
            q[0], k[0], v[0], ctx.cu_seqlens, ctx.max_seqlen, shared=ctx.shared
        ).unsqueeze(0)
    if ctx.cache is not None:
        return _cached(q, k, v, ctx, layer)
    return _sdpa(q, k, v)


def _sdpa(q, k, v, mask=None):
    # SDPA wants [B, H, T, D]; enable_gqa broadcasts the kv heads without copying them.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=mask is None,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def packed_backend(q: torch.Tensor) -> str:
    """The packed backend for `q`; NEMOKERN_ATTENTION=flash_attn|torch_varlen|sdpa forces one."""
    return packed_backend_for(q.device, q.dtype)


def check_forced_attention(*, machine: bool = False) -> None:
    """ValueError when NEMOKERN_ATTENTION forces a back end that is not installed, or, with
    `machine`, one that needs CUDA on a machine without it (both kernels are CUDA-only)."""
    forced = env.choice("NEMOKERN_ATTENTION")
    if forced not in ("flash_attn", "torch_varlen"):
        return
    if forced == "flash_attn" and not _flash_attn_installed():
        why = "flash_attn is not installed (pip install flash-attn)"
    elif forced == "torch_varlen" and _torch_varlen() is None:
        why = f"this torch ({torch.__version__}) has no torch.nn.attention.varlen"
    elif machine and not torch.cuda.is_available():
        why = "it runs on CUDA only and torch sees no GPU"
    else:
        return
    raise ValueError(f"NEMOKERN_ATTENTION={forced} cannot run here: {why}; unset it (auto)")


def packed_backend_for(device, dtype) -> str:
    """The packed backend for queries of `dtype` on `device` (see packed_backend)."""
    forced = env.choice("NEMOKERN_ATTENTION")
    if forced != "auto":
        check_forced_attention()
        return forced
    if torch.device(device).type == "cuda" and dtype in _HALF:
        if _flash_attn_installed():
            return "flash_attn"
        if _torch_varlen() is not None:
            return "torch_varlen"
    return "sdpa"


def packed_attention(q, k, v, cu_seqlens, max_seqlen: int, *, shared=None) -> torch.Tensor:
    """Causal attention within each packed segment.

    q [N, Hq, D], k/v [N, Hkv, D], cu_seqlens [S + 1] int32 (0, ..., N) -> [N, Hq, D].
    With shared (SharedPrefix), segment s attends to the keys shared.kv_index lists for it (its
    parent's tokens, then its own), causally aligned at the end of that list.
    """
    backend = packed_backend(q)
    cu_k, max_k = cu_seqlens, max_seqlen
    if shared is not None:
        # one gather per layer of the keys/values each segment sees; its backward sums the
        # gradients of a shared prefix's keys/values over the segments that read them
        k, v = k.index_select(0, shared.kv_index), v.index_select(0, shared.kv_index)
        cu_k, max_k = shared.cu_seqlens_k, shared.max_seqlen_k
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        # causal=True aligns the mask at the bottom-right when a key list is longer
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k, causal=True)
    if backend == "torch_varlen":
        varlen = _torch_varlen()
        if varlen is None:
            raise RuntimeError(
                "NEMOKERN_ATTENTION=torch_varlen but torch.nn.attention.varlen is missing"
            )
        return _call_varlen(varlen, q, k, v, cu_seqlens, cu_k, max_seqlen, max_k)
    # Exact fallback: one SDPA call per segment (no cross-segment scores are ever computed).
    # One split and one cat: per-segment slice assignment would make autograd zero-fill and add
    # a full-size gradient for every segment. Rows past the last segment come out as zeros.
    bounds = cu_seqlens.tolist()
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    q_parts = q.split(lengths + [q.shape[0] - bounds[-1]])
    if shared is None:
        k_lengths = lengths + [q.shape[0] - bounds[-1]]
    else:
        kb = cu_k.tolist()
        k_lengths = [e - s for s, e in zip(kb[:-1], kb[1:])] + [k.shape[0] - kb[-1]]
    outs = [
        _sdpa(qs[None], ks[None], vs[None], _lower_right(qs.shape[0], ks.shape[0], q.device))[0]
        if i < len(lengths) and qs.shape[0]
        else torch.zeros_like(qs)
        for i, (qs, ks, vs) in enumerate(zip(q_parts, k.split(k_lengths), v.split(k_lengths)))
    ]
    return torch.cat(outs)


def _lower_right(n_q: int, n_k: int, device):
    """None (plain causal) when n_q == n_k, else the [n_q, n_k] bool mask of causal attention
    aligned at the last key: query i sees keys j <= i + n_k - n_q."""
    if n_q == n_k:
        return None
    j = torch.arange(n_k, device=device)
    return j <= torch.arange(n_k - n_q, n_k, device=device)[:, None]


@functools.cache
def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _call_varlen(varlen, q, k, v, cu_q, cu_k, max_q, max_k):
    """torch's varlen_attn, causal, across its signatures: torch 2.13 takes window_size and
    enable_gqa; torch 2.11 has no enable_gqa (the KV heads are then repeated to q's count) and
    older ones say is_causal instead of window_size."""
    params = _parameters(varlen)
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    elif "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        raise RuntimeError(
            "torch.nn.attention.varlen.varlen_attn takes neither window_size nor "
            "is_causal; set NEMOKERN_ATTENTION=sdpa"
        )
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


@functools.cache
def _parameters(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _cached(q, k, v, ctx, layer):
    cache, t = ctx.cache, q.shape[1]
    slots = ctx.slots
    if slots is None:
        slots = torch.arange(cache.length, cache.length + t, device=q.device)
    # index_copy_ with a tensor of slots: no Python int per position, so a compiled decode step
    # is the same graph at every position.
    cache.k[layer].index_copy_(2, slots, k.transpose(1, 2))
    cache.v[layer].index_copy_(2, slots, v.transpose(1, 2))
    end = ctx.cache_mask.shape[-1]
    keys, values = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
    groups = q.shape[2] // k.shape[2]
    if t == 1 and q.device.type == "cpu":
        return _decode_cpu(q, keys, values, ctx.cache_mask)
    if t > 1 and groups > 1:
        # Prefill: CUDA's memory-efficient SDPA takes a mask but not enable_gqa, and the math
        # fallback would materialise [B, Hq, T, T] scores; repeating the KV heads (the size of q)
        # keeps prefill on the fused kernel. Decoding (t == 1) scores only [B, Hq, 1, T].
        keys, values = (
            keys.repeat_interleave(groups, dim=1),
            values.repeat_interleave(groups, dim=1),
        )
        groups = 1
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys, values, attn_mask=ctx.cache_mask, enable_gqa=groups > 1
    )
    return out.transpose(1, 2)


def _decode_cpu(q, keys, values, mask):
    """One query per row on the CPU: q [B, 1, Hq, D], keys/values [B, Hkv, S, D], mask
    [B, 1, 1, S] bool -> [B, 1, Hq, D]. Plain fp32 matmuls over the query heads grouped per KV
    head: the CPU's fused SDPA kernel is built for blocks of queries and takes ~4x as long for
    one bf16 query (2.9 vs 0.74 ms at B = 64, 8 query / 2 KV heads, 192 keys, 2 threads; fp32:
    0.71 vs 0.63 ms), at the same error against float64."""
    b, _, hq, d = q.shape
    hkv = keys.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d).float()  # query head h reads KV head h // G
    scores = torch.matmul(qg, keys.float().transpose(-1, -2)).mul_(d**-0.5)  # [B, Hkv, G, S]
    probs = torch.softmax(scores.masked_fill_(~mask, float("-inf")), dim=-1)
    return torch.matmul(probs, values.float()).view(b, 1, hq, d).to(q.dtype)


def cache_mask(cache: KVCache, new_valid: torch.Tensor) -> torch.Tensor:
    """Mark the next T slots valid per new_valid [B, T] and return the [B, 1, T, length + T]
    mask for attending to them (the eager form: one more key per step)."""
    b, t = new_valid.shape
    start, end = cache.length, cache.length + t
    if end > cache.max_len:
        raise ValueError(f"KV cache overflow: {end} slots needed, cache holds {cache.max_len}")
    cache.key_valid[:, start:end] = new_valid
    return _slot_mask(cache.key_valid[:, :end], torch.arange(start, end, device=new_valid.device))


def static_cache_context(cache: KVCache, slots: torch.Tensor, new_valid: torch.Tensor):
    """The AttentionContext for writing T new tokens at `slots` [T] (int64, on the cache's device)
    with validity new_valid [B, T], attending over the whole cache: every shape depends on B, T
    and cache.max_len only, never on the position, and nothing syncs with the host. The caller
    keeps the slots inside the cache."""
    cache.key_valid.index_copy_(1, slots, new_valid)
    return AttentionContext(cache=cache, cache_mask=_slot_mask(cache.key_valid, slots), slots=slots)


def _slot_mask(key_valid, slots):
    """[B, 1, T, S] mask: query t (in slot slots[t]) sees the valid slots j <= slots[t] of
    key_valid [B, S]. It always sees its own slot, so a padding query has one finite score
    (all-masked rows would give NaN that later layers would read)."""
    j = torch.arange(key_valid.shape[1], device=key_valid.device)
    mask = (j <= slots[:, None]) & key_valid[:, None, :]
    mask |= j == slots[:, None]
    return mask[:, None]
