"""Llama under tensor parallelism (2 and 4 gloo processes) equals the same model at TP = 1:
logits, linear_logprobs on the sharded LM head and every parameter gradient to fp32 rounding, on
GQA configs whose KV heads split across ranks and ones where they are replicated (with a tied
embedding). Checkpoints: TP = 1 -> TP = N -> TP = 1 bit for bit, and transformers loads what
TP = N saved. generate() gives every rank the same tokens.
"""

import os

import pytest
import torch
import torch.distributed as dist

from helpers import join_gloo, run_ranks
from nemokern.model import Llama, LlamaConfig, generate
from nemokern.ops import linear_logprobs, linear_policy_loss
from nemokern.parallel import all_gather

# name -> config overrides of LlamaConfig.tiny (4 query heads, vocabulary 320)
CONFIGS = {
    "kv2": dict(num_key_value_heads=2),  # TP 2: KV heads split; TP 4: each replicated twice
    "kv1_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),  # replicated at any TP
}
TOL = dict(rtol=2e-5, atol=2e-6)


def _checkpoint(path, overrides, seed):
    torch.manual_seed(seed)
    model = Llama(LlamaConfig.tiny(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # a missed norm cannot hide behind ones
    model.save_pretrained(path)


def _inputs(config):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=g)
    targets = torch.randint(0, config.vocab_size, (2, 11), generator=g)
    targets[0, :3] = -100  # prompt positions
    return ids, targets, torch.randn(2, 11, generator=g)


def _run(model, ids, targets, weights, tp_group):
    """Logits, log-probs (fused op on the hidden states), policy loss and the parameter grads."""
    model.zero_grad()
    logits = model(ids)
    hidden = model.hidden_states(ids)
    lp = linear_logprobs(hidden, model.lm_head.weight, targets, tp_group=tp_group)
    (lp * weights).sum().backward()
    with torch.no_grad():
        loss = linear_policy_loss(
            model.hidden_states(ids), model.lm_head.weight, targets, weights, tp_group=tp_group
        )
    grads = {n: p.grad for n, p in model.named_parameters()}
    return logits.detach(), lp.detach(), loss, grads


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _worker(rank, world, init_file, root):
    join_gloo(rank, world, init_file)
    group = dist.new_group(list(range(world)))
    for name in CONFIGS:
        path = os.path.join(root, name)
        ref = Llama.from_pretrained(path)
        tp = Llama.from_pretrained(path, tp_group=group)
        ids, targets, weights = _inputs(ref.config)
        want, got = (
            _run(ref, ids, targets, weights, None),
            _run(tp, ids, targets, weights, group),
        )
        for what, a, b in zip(("logits", "logprobs", "policy loss"), got[:3], want[:3]):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m, w=what, c=name: f"{c} {w}: {m}")
        shards = {n: m.shard for n, m in tp.named_modules() if hasattr(m, "shard")}
        worst = 0.0
        for pname, grad in got[3].items():
            shard = shards.get(pname.removesuffix(".weight"))
            expect = want[3][pname] if shard is None else shard.take(want[3][pname])
            torch.testing.assert_close(grad, expect, **TOL, msg=lambda m, p=pname: f"{p}: {m}")
            worst = max(worst, _max_err(grad, expect))
        if rank == 0:
            print(
                f"PARITY tp={world} {name}: logits {_max_err(got[0], want[0]):.2e} "
                f"logprobs {_max_err(got[1], want[1]):.2e} grads {worst:.2e}"
            )

        # generation: greedy equals TP = 1; sampling with a different seed per rank still
        # gives every rank rank 0's tokens
        prompts = [ids[0, :5].tolist(), ids[1, :3].tolist()]
        greedy = generate(tp, prompts, max_new_tokens=6, greedy=True, eos_token_id=[])
        alone = generate(ref, prompts, max_new_tokens=6, greedy=True, eos_token_id=[])
        assert torch.equal(greedy.tokens, alone.tokens), (greedy.tokens, alone.tokens)
        sampled = generate(
            tp, prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(rank)
        ).tokens
        every = all_gather(sampled, group)
        assert all(torch.equal(t, sampled) for t in every), every

        # TP = 1 -> TP = N -> TP = 1, bit for bit; transformers reads the TP = N save
        out = os.path.join(root, f"{name}_saved_tp{world}")
        tp.save_pretrained(out, max_shard_size="100KB")  # several shards: the index path
        dist.barrier()
        if rank == 0:
            back = Llama.from_pretrained(out)
            for (n, a), b in zip(back.state_dict().items(), ref.state_dict().values()):
                assert torch.equal(a, b), n
            from transformers import LlamaForCausalLM

            hf = LlamaForCausalLM.from_pretrained(out).eval()
            with torch.no_grad():
                torch.testing.assert_close(hf(ids).logits, want[0], rtol=1e-5, atol=1e-5)
        dist.barrier()
    if world == 4:
        with pytest.raises(ValueError, match="num_key_value_heads=3 and the tensor-parallel"):
            Llama(
                LlamaConfig.tiny(num_attention_heads=12, num_key_value_heads=3, head_dim=16),
                tp_group=group,
            )


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_tensor_parallel_llama_equals_tp1(world, tmp_path):
    for seed, (name, overrides) in enumerate(CONFIGS.items()):
        _checkpoint(tmp_path / name, overrides, seed)
    run_ranks(_worker, world, str(tmp_path))
