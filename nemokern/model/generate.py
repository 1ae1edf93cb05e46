"""Batched sampling from a Llama with a preallocated KV cache.

Prompts of different lengths are left-padded; each row gets its own position ids (0 at its first
real token) and never attends to padding, so a padded prompt generates what it would alone.
Sampling: greedy, or temperature -> top-k -> top-p (nucleus) on the fp32 logits, drawn with an
optional seeded torch.Generator. Each row stops at its first EOS. Every argument is checked before
the KV cache is allocated.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Generation:
    """tokens [B, L] generated ids (EOS included), `pad_id` after each row's end; lengths [B]
    generated tokens per row (EOS counted); ended_with_eos [B] bool (False: hit max_new_tokens)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    ended_with_eos: torch.Tensor


def sample_next(logits, *, greedy=False, temperature=1.0, top_k=None, top_p=1.0, generator=None):
    """Next token ids [B] from logits [B, V]."""
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
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


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
) -> Generation:
    """Sample up to max_new_tokens after each prompt (lists of token ids or 1-D tensors).

    eos_token_id: an id or a set of ids ending a row (default: the config's eos ids, or none).
    temperature 0 or greedy=True picks the argmax.
    """
    _check_options(prompts, max_new_tokens, temperature, top_k, top_p)
    device = model.embed_tokens.weight.device
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_ids
    eos = torch.tensor(
        sorted({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)),
        dtype=torch.long,
        device=device,
    )
    rows = [_prompt_ids(i, p, model.config.vocab_size) for i, p in enumerate(prompts)]
    b, plen = len(rows), max(r.numel() for r in rows)
    limit = model.config.max_position_embeddings
    if plen + max_new_tokens > limit:
        raise ValueError(
            f"the longest prompt ({plen} tokens) plus max_new_tokens={max_new_tokens} "
            f"exceeds the model's max_position_embeddings={limit}; shorten the "
            f"prompt or lower max_new_tokens to at most {max(0, limit - plen)}"
        )
    ids = torch.zeros(b, plen, dtype=torch.long)  # left padding: token 0, never attended to
    valid = torch.zeros(b, plen, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, plen - r.numel() :] = r
        valid[i, plen - r.numel() :] = True
    ids, valid = ids.to(device), valid.to(device)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)

    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(b, plen + max_new_tokens)
        # LM head on the last prompt position only: [B, T, V] prompt logits are never needed.
        hidden = model.hidden_states(ids, position_ids=positions, cache=cache, valid=valid)
        logits = model.lm_head(hidden[:, -1])
        next_pos = positions[:, -1:] + 1
        out = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        ended = torch.zeros(b, dtype=torch.bool, device=device)
        lengths = torch.zeros(b, dtype=torch.long, device=device)
        for step in range(max_new_tokens):
            tok = sample_next(
                logits,
                greedy=greedy,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
            )
            tok = model.same_token(tok)  # tensor parallel: every rank continues with one token
            tok = torch.where(done, pad_id, tok)
            out[:, step] = tok
            lengths += (~done).long()
            hit = ~done & torch.isin(tok, eos)
            ended |= hit
            done |= hit
            # One host sync per step: stop early once every row has ended.
            if step + 1 == max_new_tokens or bool(done.all()):
                break
            # Finished rows keep stepping (the batch stays rectangular) on a harmless token 0.
            feed = torch.where(done, 0, tok)
            logits = model(feed[:, None], position_ids=next_pos, cache=cache)[:, -1]
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    return Generation(tokens=out[:, : int(lengths.max())], lengths=lengths, ended_with_eos=ended)


def _prompt_ids(i, prompt, vocab_size) -> torch.Tensor:
    """prompts[i] as a 1-D int64 CPU tensor of ids in [0, vocab_size)."""
    if isinstance(prompt, (str, bytes)):
        raise TypeError(
            f"prompts[{i}] is a string; generate takes token ids, so encode the text "
            "first (e.g. tokenizer.encode or apply_chat_template)"
        )
    try:
        ids = torch.as_tensor(prompt).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"prompts[{i}] is not a sequence of token ids ({e})") from None
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


def _check_options(prompts, max_new_tokens, temperature, top_k, top_p):
    if isinstance(prompts, (str, bytes)) or isinstance(prompts, torch.Tensor) and prompts.dim() < 2:
        raise TypeError(
            "prompts must be a list of prompts, each a list or 1-D tensor of token "
            "ids (e.g. [tokenizer.encode(text)]); got "
            f"{'a string' if isinstance(prompts, (str, bytes)) else 'one tensor'}"
        )
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one prompt")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive integer or None (off)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
