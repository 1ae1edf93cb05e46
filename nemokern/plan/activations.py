"""Activation bytes per token, measured from a real forward of small Llamas and scaled by shape.

What a training forward keeps for its backward is what autograd saves: `measure_saved` runs
`Llama.hidden_states` on packed tokens under `torch.autograd.graph.saved_tensors_hooks` and adds
up the distinct storages it saves, parameters excluded (they are counted as parameters). Run at
two token counts and one or two decoder layers, that gives bytes per token per layer and bytes
per token outside the layers (embedding output, RoPE tables, the final norm).

Per token, a layer saves tensors whose last dimension is the hidden size H, this rank's query
width Q = heads/tp x head_dim, key/value width KV, intermediate width I, or one value per query
head (the attention's log-sum-exp): so bytes/token/layer = a.(H, Q, KV, I, heads, 1). The six
coefficients are solved from seven small shapes (least squares; the residual, reported as
`fit_error`, is zero to the byte when the model holds). Outside the layers: b.(H, head_dim, 1).
Under bf16 autocast (`compute="bfloat16"`, CPU autocast standing in for CUDA's: both cast the
matmuls' inputs to bf16) a layer also saves the bf16 copy of each of its matrices once,
independent of tokens; `measure_saved` reports it as the intercept.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..model import Llama, LlamaConfig

COMPUTE_DTYPES = ("float32", "bfloat16")
# (H, heads, kv heads, head_dim, I): varied one at a time around the first
_SHAPES = (
    (64, 4, 2, 16, 96),
    (128, 4, 2, 16, 96),
    (64, 8, 2, 16, 96),
    (64, 4, 4, 16, 96),
    (64, 4, 2, 32, 96),
    (64, 4, 2, 16, 192),
    (96, 6, 3, 8, 64),
)


@dataclass(frozen=True)
class ActivationModel:
    """Saved bytes per token: `layer` coefficients over (H, Q, KV, I, heads, 1) per decoder layer,
    `outside` over (H, head_dim, 1); `fit_error` the largest residual of the fit in bytes."""

    compute: str
    checkpointing: bool
    layer: tuple[float, ...]
    outside: tuple[float, ...]
    fit_error: float

    def per_layer(self, h: int, q: int, kv: int, i: int, heads: int) -> float:
        return _dot(self.layer, (h, q, kv, i, heads, 1))

    def outside_layers(self, h: int, head_dim: int) -> float:
        return _dot(self.outside, (h, head_dim, 1))


def _dot(a, b) -> float:
    return float(sum(x * y for x, y in zip(a, b)))


def measure_saved(config: LlamaConfig, tokens: int, compute: str, checkpointing=False) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one training forward of
    `Llama(config).hidden_states` over `tokens` packed tokens (two equal sequences) on the CPU,
    in fp32 or under CPU bf16 autocast; with `checkpointing`, what activation checkpointing
    keeps (each layer's input)."""
    torch.manual_seed(0)
    model = Llama(config, activation_checkpointing=checkpointing).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    half = tokens // 2
    ids = torch.randint(0, config.vocab_size, (tokens,))
    cu = torch.tensor([0, half, tokens], dtype=torch.int32)
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if compute == "bfloat16" else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
        out = model.hidden_states(ids, cu_seqlens=cu)
    del out
    return sum(seen.values())


def _config(h, heads, kv, d, i, layers) -> LlamaConfig:
    return LlamaConfig.tiny(
        hidden_size=h,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=d,
        intermediate_size=i,
        num_hidden_layers=layers,
        vocab_size=64,
    )


@functools.cache
def activation_model(compute: str, checkpointing: bool = False) -> ActivationModel:
    """Measure and fit the per-token coefficients for `compute` ("float32" or "bfloat16"), with
    or without activation checkpointing."""
    if compute not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype {compute!r}: use one of {COMPUTE_DTYPES}")
    n1, n2 = 64, 128
    rows, per_layer, outside_rows, outside = [], [], [], []
    for h, heads, kv, d, i in _SHAPES:
        one = [
            measure_saved(_config(h, heads, kv, d, i, 1), n, compute, checkpointing)
            for n in (n1, n2)
        ]
        two = [
            measure_saved(_config(h, heads, kv, d, i, 2), n, compute, checkpointing)
            for n in (n1, n2)
        ]
        layer = ((two[1] - one[1]) - (two[0] - one[0])) / (n2 - n1)
        rest = (one[1] - one[0]) / (n2 - n1) - layer
        rows.append((h, heads * d, kv * d, i, heads, 1))
        per_layer.append(layer)
        outside_rows.append((h, d, 1))
        outside.append(rest)
    a, err_a = _solve(rows, per_layer)
    b, err_b = _solve(outside_rows, outside)
    return ActivationModel(compute, checkpointing, a, b, max(err_a, err_b))


def _solve(rows, values) -> tuple[tuple[float, ...], float]:
    x = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(values, dtype=torch.float64)[:, None]
    coef = torch.linalg.lstsq(x, y).solution
    err = float((x @ coef - y).abs().max())
    return tuple(round(float(c), 6) for c in coef[:, 0]), err
