"""Batched sampling from a Llama with a static, preallocated KV cache.

Prompts of different lengths are left-padded; each row gets its own position ids (0 at its first
real token) and never attends to padding, so a padded prompt generates what it would alone.
Sampling: greedy, or temperature -> top-k -> top-p (nucleus) on the fp32 logits, drawn on the
logits' device with an optional seeded torch.Generator. Each row stops at its first EOS (or
where an optional `stop` function says).

Speed: the prompts are prefilled packed (no padding computed) into a cache whose prompt part is
rounded up to a bucket (a power of two, at least 16). Every decode step attends over the whole
cache with a mask, so it has the same shapes at every position and no host sync (EOS is tracked
on the device; the loop asks the host whether every row has ended once every STOP_CHECK_EVERY
steps). That step is what `compile=True` captures with torch.compile (mode "reduce-overhead",
i.e. CUDA graphs, on a GPU): one graph per (rows, bucket + max_new_tokens). `num_samples=k`
prefills each prompt once and copies its keys/values into its k rows. The model's parameters are
read as they are at each call: no copy of the weights is made or kept. Every argument is checked
before the KV cache is allocated.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .attention import AttentionContext, KVCache, static_cache_context


@dataclass
class Generation:
    """tokens [B, L] generated ids (EOS included), `pad_id` after each row's end; lengths [B]
    generated tokens per row (EOS counted); ended_with_eos [B] bool (False: hit max_new_tokens)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    ended_with_eos: torch.Tensor


def sample_next(logits, *, greedy=False, temperature=1.0, top_k=None, top_p=1.0, generator=None):
    """Next token ids [B] from logits [B, V]."""
    _check_sampling(temperature, top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits has shape {tuple(logits.shape)}; sample_next takes [B, V]")
    return _sample(logits, greedy, temperature, top_k, top_p, generator)


def _sample(logits, greedy, temperature, top_k, top_p, generator):
    """sample_next without its checks: generate's decode loop, whose options were checked once."""
    logits = logits.float()
    if greedy or temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the
        # most likely token always survives.
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race) with no host sync, which
    # torch.multinomial may need on CUDA; the clamp keeps a zero draw from winning with p = 0.
    probs = logits.softmax(-1)
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-30)
    return (probs / race).argmax(-1)


STOP_CHECK_EVERY = 8  # decode steps between host checks of "has every row ended?"
_MIN_BUCKET = 16


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    *,
    max_new_tokens: int,
    eos_token_id: int | Iterable[int] | None = None,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    num_samples: int = 1,
    compile: bool | None = None,
    stop=None,
) -> Generation:
    """Sample up to max_new_tokens after each prompt (lists of token ids or 1-D tensors).

    eos_token_id: an id or a set of ids ending a row (default: the config's eos ids, or none).
    temperature 0 or greedy=True picks the argmax.
    num_samples=k: k samples per prompt; row i * k + j of the result is sample j of prompt i. Each
    prompt is prefilled once and its keys/values copied into its k rows.
    compile: run the decode step through torch.compile (None: on CUDA, with CUDA graphs; not on
    the CPU, where compiling took 26-46 s for a 3-25% gain, see README "Generation speed").
    Greedy results are the same either way.
    stop: None, or a function (tokens [B, t] generated so far, lengths [B]) -> [B] bool, asked
    at each host check (every STOP_CHECK_EVERY steps) which rows have ended for another reason
    (e.g. a stop string); those rows end there (ended_with_eos True), so the loop can end early.
    It sees tokens past the row's true end, up to the check: the caller cuts the row itself.
    """
    _check_options(prompts, max_new_tokens, temperature, top_k, top_p, num_samples)
    device = model.embed_tokens.weight.device
    vocab = model.config.vocab_size
    if eos_token_id is None:  # the config's: ids beyond this vocabulary can never be sampled
        ids = [i for i in _eos_ids(model.config.eos_token_ids, None) if 0 <= i < vocab]
    else:
        ids = _eos_ids(eos_token_id, vocab)
    eos = torch.tensor(ids, dtype=torch.long, device=device)
    rows = [_prompt_ids(i, p, model.config.vocab_size) for i, p in enumerate(prompts)]
    b, plen = len(rows), max(r.numel() for r in rows)
    limit = model.config.max_position_embeddings
    if plen + max_new_tokens > limit:
        raise ValueError(
            f"the longest prompt ({plen} tokens) plus max_new_tokens={max_new_tokens} "
            f"exceeds the model's max_position_embeddings={limit}; "
            + position_fix(plen, max_new_tokens, limit)
        )
    if compile is None:
        compile = device.type == "cuda"
    forward = _compiled(device.type) if compile else _forward
    # The prompts go into the cache right-aligned at slots [plen - len, plen) (decoding then
    # writes the same slot in every row); the bucket changes the cache length, and so the number
    # of compiled decode graphs, not results: empty slots are never attended to.
    plen = max(_MIN_BUCKET, 1 << (plen - 1).bit_length())
    prompt_lengths = torch.tensor([r.numel() for r in rows])

    k, n = num_samples, b * num_samples
    was_training = model.training
    model.eval()
    try:
        graphs = compile and device.type == "cuda"
        cache = _new_cache(model, n, plen + max_new_tokens, graphs=graphs)
        # Prefill each prompt once, packed (no padding computed), into the first of its k rows,
        # then copy its keys/values into the other k - 1.
        logits = _prefill(
            model, rows, prompt_lengths, cache, first_rows=torch.arange(b) * k, end=plen
        )
        if k > 1:
            prompt_part = [t[:, :, :plen] for t in cache.k + cache.v] + [cache.key_valid[:, :plen]]
            for t in prompt_part:
                shared = t.unflatten(0, (b, k))  # a view: rows i * k + j of prompt i
                shared[:, 1:] = shared[:, :1]
            logits = logits.repeat_interleave(k, dim=0)
        next_pos = prompt_lengths.to(device).repeat_interleave(k)[:, None]
        slot = torch.tensor([plen], device=device)
        new_valid = torch.ones(n, 1, dtype=torch.bool, device=device)
        out = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        lengths = torch.zeros(n, dtype=torch.long, device=device)
        for step in range(max_new_tokens):
            tok = _sample(logits, greedy, temperature, top_k, top_p, generator)
            tok = model.same_token(tok)  # tensor parallel: every rank continues with one token
            tok = torch.where(done, pad_id, tok)
            out[:, step] = tok
            lengths += (~done).long()
            done |= ~done & torch.isin(tok, eos)
            if stop is not None and (step + 1) % STOP_CHECK_EVERY == 0:
                done |= stop(out[:, : step + 1], lengths).to(device)
            if step + 1 == max_new_tokens or (
                (step + 1) % STOP_CHECK_EVERY == 0 and bool(done.all())
            ):
                break
            # Finished rows keep stepping (the batch stays rectangular) on a harmless token 0.
            feed = torch.where(done, 0, tok)[:, None]
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are used up
            logits = forward(model, feed, next_pos, slot, cache, new_valid)
            next_pos, slot = next_pos + 1, slot + 1
    finally:
        model.train(was_training)
    return Generation(tokens=out[:, : int(lengths.max())], lengths=lengths, ended_with_eos=done)


def _prefill(model, rows, lengths, cache, *, first_rows, end):
    """Logits [b, V] after the last token of each prompt in rows (b 1-D id tensors, lengths [b]),
    whose keys/values go to cache rows first_rows [b] at slots [end - length, end)."""
    device = cache.key_valid.device
    positions = torch.cat([torch.arange(int(n)) for n in lengths])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    index = (
        first_rows.repeat_interleave(lengths).to(device),
        (positions + end - lengths.repeat_interleave(lengths)).to(device),
    )
    cache.key_valid[index] = True
    ctx = AttentionContext(
        cu_seqlens=cu.to(device, torch.int32),
        max_seqlen=int(lengths.max()),
        cache=cache,
        cache_index=index,
    )
    x = model.decoder(torch.cat(rows).to(device)[None], positions.to(device)[None], ctx)
    return model.lm_head(model.norm(x[0, cu[1:].to(device) - 1]))


def _forward(model, ids, positions, slots, cache, valid):
    """Logits [B, V] of the last position after writing ids [B, T] (positions [B, T], validity
    valid [B, T]) into cache slots [T]. No host sync and no shape that depends on the slots."""
    ctx = static_cache_context(cache, slots, valid)
    return model.lm_head(model.norm(model.decoder(ids, positions, ctx)[:, -1]))


@functools.cache
def _compiled(device_type: str):
    # dynamic=False: one graph per shape; the prompt buckets and a fixed max_new_tokens keep the
    # shapes few. CUDA graphs remove the per-kernel launch cost that dominates a decode step.
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(_forward, fullgraph=True, dynamic=False, mode=mode)


def _new_cache(model, batch: int, max_len: int, *, graphs: bool) -> KVCache:
    cache = model.new_cache(batch, max_len)
    if graphs:
        # CUDA graphs replay fixed addresses: a static (unguarded) address lets the graphs write
        # the cache in place instead of copying it in and out at every step; a new cache at the
        # next call makes them re-record once, not recompile.
        for t in (*cache.k, *cache.v, cache.key_valid):
            torch._dynamo.mark_static_address(t)
    return cache


def _prompt_ids(i, prompt, vocab_size) -> torch.Tensor:
    """prompts[i] as a 1-D int64 CPU tensor of ids in [0, vocab_size)."""
    if isinstance(prompt, (str, bytes)):
        raise TypeError(
            f"prompts[{i}] is a string; generate takes token ids, so encode the text "
            "first (e.g. tokenizer.encode or apply_chat_template)"
        )
    try:
        ids = torch.as_tensor(prompt)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"prompts[{i}] is not a sequence of token ids ({e})") from None
    if ids.dim() != 1:  # a [B, T] batch inside the list would be read as one long prompt
        raise ValueError(
            f"prompts[{i}] has shape {tuple(ids.shape)}; each prompt is one sequence of ids "
            "(pass a batch as a list of its rows)"
        )
    if ids.numel() == 0:
        raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token (e.g. BOS)")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"prompts[{i}] holds {ids.dtype} values; token ids are integers")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(
            f"prompts[{i}] has token ids outside [0, vocab_size={vocab_size}): "
            f"min {int(ids.min())}, max {int(ids.max())}"
        )
    return ids.to(torch.long)


def position_fix(
    prompt_len: int, max_new_tokens: int, limit: int, option: str = "max_new_tokens"
) -> str:
    """The fix when a prompt of prompt_len tokens plus max_new_tokens exceeds the model's `limit`
    positions; `option` names max_new_tokens as the caller's user knows it."""
    if prompt_len < limit:
        return f"shorten the prompt or lower {option} to at most {limit - prompt_len}"
    return f"shorten the prompt to at most {limit - max_new_tokens} tokens"


def _eos_ids(eos_token_id, vocab_size) -> list[int]:
    """The sorted distinct ids of an int, an iterable of ints or an integer tensor, each in
    [0, vocab_size) unless vocab_size is None: an id outside it would never be sampled, so no
    row would ever end."""
    if isinstance(eos_token_id, set | frozenset | range):
        eos_token_id = list(eos_token_id)
    try:
        t = torch.as_tensor(eos_token_id)
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is not None and t.numel() == 0 and t.dim() == 1:
        return []
    if t is None or t.dim() > 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(
            f"eos_token_id={eos_token_id!r} must be a token id, a list of ids or an integer "
            "tensor (or [] for none)"
        )
    ids = sorted(set(t.reshape(-1).tolist()))
    bad = [] if vocab_size is None else [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(
            f"eos_token_id {bad[0]} is outside the vocabulary [0, {vocab_size}): no row would "
            "ever end with it"
        )
    return ids


def _check_sampling(temperature, top_k, top_p) -> None:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not (math.isfinite(temperature) and temperature >= 0)
    ):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0: greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive integer or None (off)")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]")


def _check_options(prompts, max_new_tokens, temperature, top_k, top_p, num_samples):
    if isinstance(prompts, (str, bytes)) or isinstance(prompts, torch.Tensor) and prompts.dim() < 2:
        raise TypeError(
            "prompts must be a list of prompts, each a list or 1-D tensor of token "
            "ids (e.g. [tokenizer.encode(text)]); got "
            f"{'a string' if isinstance(prompts, (str, bytes)) else 'one tensor'}"
        )
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one prompt")
    if isinstance(prompts, list | tuple) and all(
        isinstance(p, int) and not isinstance(p, bool) for p in prompts
    ):  # generate(model, tok.encode(text)): every id would be a one-token prompt
        raise TypeError(
            "prompts is one flat list of ids; pass a list of prompts, e.g. [tokenizer.encode(text)]"
        )
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    _check_sampling(temperature, top_k, top_p)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(
            f"num_samples={num_samples!r} must be a positive integer (samples per prompt)"
        )
