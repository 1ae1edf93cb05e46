"""Shared-prompt packing: k responses packed after one copy of their prompt (Llama.hidden_states
with `parents`, pack(..., k)) give each response the log-probs and gradients of its own full
sequence run alone, in float64; the CPU attention path against a float64 reference written
out score by score; the trainer with and without sharing; bad `parents` named."""

import pytest
import torch
import torch.nn.functional as F

from nemokern.data.tokenizer import ByteTokenizer
from nemokern.model import Llama, LlamaConfig, RewardModel, packed_attention
from nemokern.model.attention import SharedPrefix
from nemokern.trainers.policy import pack
from nemokern.trainers.reinforce import ReinforceConfig, ReinforceTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

# 3 prompts x k=3: a one-token prompt (no prefix segment), an empty response, awkward lengths
PROMPTS = [[1, 2, 3, 4, 5, 6], [7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
RESPONSE_LENGTHS = [[3, 0, 5], [2, 4, 1], [7, 3, 6]]
K = 3


def model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    config = LlamaConfig.tiny(vocab_size=64, num_attention_heads=4, num_key_value_heads=2)
    return Llama(config).to(dtype)


def samples(seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = [p for p in PROMPTS for _ in range(K)]
    responses = [torch.randint(0, 64, (n,), generator=g) for ns in RESPONSE_LENGTHS for n in ns]
    return rows, responses


def alone(policy, rows, responses, weights):
    """Per sample, its full sequence run alone (dense, no packing): log-probs of the response
    tokens by plain log_softmax, and sum(weights * log-probs)."""
    lps, device = [], policy.lm_head.weight.device
    for p, r in zip(rows, responses):
        ids, r = torch.tensor(p + r.tolist(), device=device), r.to(device)
        logits = policy(ids[None])[0, len(p) - 1 : -1]
        lps.append(F.log_softmax(logits.double(), -1).gather(-1, r[:, None])[:, 0])
    lp = torch.cat(lps)
    return lp, (weights * lp).sum()


def packed(policy, batch, weights):
    hidden = policy.hidden_states(
        batch["input_ids"], cu_seqlens=batch["cu_seqlens"], parents=batch.get("parents")
    )
    keep = batch["targets"] != -100
    logits = policy.lm_head(hidden[keep])
    lp = F.log_softmax(logits.double(), -1).gather(-1, batch["targets"][keep, None])[:, 0]
    return lp, (weights * lp).sum()


def test_pack_shares_each_prompt_once():
    b = pack([[1, 2, 3]] * 2 + [[4]] * 2, [torch.tensor(x) for x in ([7, 8], [9], [], [5])], k=2)
    # [1, 2] | [3, 7, 8] [3, 9] | [4] [4, 5]   (the one-token prompt has no prefix segment)
    assert b["input_ids"].tolist() == [1, 2, 3, 7, 8, 3, 9, 4, 4, 5]
    assert b["cu_seqlens"].tolist() == [0, 2, 5, 7, 8, 10]
    assert b["parents"].tolist() == [-1, 0, 0, -1, -1]
    assert b["targets"].tolist() == [-100, -100, 7, 8, -100, 9, -100, -100, 5, -100]
    assert b["sample_cu"].tolist() == [0, 5, 7, 8, 10]
    assert b["last_index"].tolist() == [4, 6, 7, 9]
    with pytest.raises(ValueError, match="samples 0 ... 1 do not share one prompt"):
        pack([[1, 2], [1, 3]], [torch.tensor([5])] * 2, k=2)


@pytest.mark.parametrize("share", [None, K])
def test_logprobs_and_gradients_equal_each_sequence_alone(share):
    policy = model()
    rows, responses = samples()
    n = sum(r.numel() for r in responses)
    weights = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    lp_ref, loss_ref = alone(policy, rows, responses, weights)
    loss_ref.backward()
    grads_ref = {k: p.grad.clone() for k, p in policy.named_parameters()}
    policy.zero_grad()

    batch = pack(rows, responses, share)
    if share:  # (k - 1) x (prompt length - 1) tokens fewer: 2 x 5 + 0 + 2 x 12
        assert batch["input_ids"].numel() == pack(rows, responses)["input_ids"].numel() - 34
    lp, loss = packed(policy, batch, weights)
    loss.backward()
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-12)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, grads_ref[name], rtol=1e-10, atol=1e-12, msg=name)


def test_shared_segments_fail_the_comparison_without_their_prefix():
    """The check above can fail: dropping the parents (each response then sees no prompt)."""
    policy = model()
    rows, responses = samples()
    weights = torch.ones(sum(r.numel() for r in responses), dtype=torch.float64)
    batch = pack(rows, responses, K)
    lp_ref, _ = alone(policy, rows, responses, weights)
    lp, _ = packed(policy, {**batch, "parents": None}, weights)
    assert (lp - lp_ref).abs().max() > 1e-3


def reference_attention(q, k, v, cu, parents):
    """float64, one segment at a time, scores written out: segment s's queries see its parent's
    tokens and, causally, its own."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    bounds = cu.tolist()
    out = torch.zeros_like(q)
    for s, p in enumerate(parents):
        a, b = bounds[s], bounds[s + 1]
        keys = list(range(bounds[p], bounds[p + 1])) if p >= 0 else []
        keys += list(range(a, b))
        n_prefix = len(keys) - (b - a)
        scores = torch.einsum("thd,jhd->htj", q[a:b], k[keys]) / q.shape[-1] ** 0.5
        allowed = torch.arange(len(keys))[None] <= n_prefix + torch.arange(b - a)[:, None]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[a:b] = torch.einsum("htj,jhd->thd", probs, v[keys])
    return out


def test_cpu_attention_with_shared_prefix_matches_float64():
    lengths, parents = [5, 3, 1, 4, 7, 2, 6], [-1, 0, 0, -1, 3, -1, 5]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    n = sum(lengths)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(n, h, 16, generator=g) for h in (4, 2, 2))
    from nemokern.model.llama import _shared_prefix

    shared, offsets = _shared_prefix(cu, torch.tensor(parents))
    assert offsets.tolist() == [0, 5, 5, 0, 4, 0, 2]
    ref = reference_attention(q, k, v, cu, parents)
    out = packed_attention(q, k, v, cu, max(lengths), shared=shared)
    plain = reference_attention(q, k, v, cu, parents).float()  # fp32 rounding of the result
    assert (out.double() - ref).abs().max() <= 2 * (plain.double() - ref).abs().max() + 2e-6
    assert isinstance(shared, SharedPrefix) and shared.max_seqlen_k == 11


@pytest.mark.parametrize(
    "parents, cu, match",
    [
        ([-1, 0], None, "pass it with cu_seqlens"),
        ([-1], [0, 2, 4], r"parents must be an integer tensor \[S\] = \[2\]"),
        ([1, -1], [0, 2, 4], r"parents\[0\] = 1: a segment continues an earlier segment"),
        ([-1, 0, 1], [0, 2, 4, 5], "only one level of shared prefix"),
    ],
)
def test_bad_parents_are_named(parents, cu, match):
    policy = model(dtype=torch.float32)
    n = 4 if cu is None else cu[-1]
    kw = {} if cu is None else {"cu_seqlens": torch.tensor(cu)}
    with pytest.raises(ValueError, match=match):
        policy.hidden_states(
            torch.zeros(n, dtype=torch.long)[None], parents=torch.tensor(parents), **kw
        )


def test_reward_model_scores_shared_samples_like_full_copies():
    torch.manual_seed(4)
    rm = RewardModel(model(seed=4, dtype=torch.float32))  # reward_head takes fp32 at most
    rows, responses = samples()
    full, shared = pack(rows, responses), pack(rows, responses, K)
    scores = [
        rm(b["input_ids"], b["last_index"], cu_seqlens=b["cu_seqlens"], parents=b.get("parents"))
        for b in (full, shared)
    ]
    assert scores[0].shape == (9, len(rm.attributes))
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-5, atol=1e-6)


def test_trainer_with_and_without_shared_prompts(tmp_path):
    """Same samples (generation does not depend on packing), so the same rewards; log-probs,
    KL, loss and weights equal to fp32 rounding."""
    tok = ByteTokenizer()
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Say a."}\n{"prompt": "Say something long, with an a."}\n')

    def run(shared):
        torch.manual_seed(0)
        policy = Llama(
            LlamaConfig.tiny(
                vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=list(tok.eos_ids)
            )
        )
        cfg = ReinforceConfig(
            prompts=str(path),
            out=str(tmp_path / f"run-{shared}"),
            max_new_tokens=6,
            prompts_per_step=2,
            k=3,
            lr=1e-3,
            beta=0.5,
            kl_estimator="k3",
            max_steps=3,
            shared_prompt=shared,
            progress=False,
            tensorboard=False,
            device="cpu",
        )
        trainer = ReinforceTrainer(
            cfg,
            policy=policy,
            reward_fn=lambda prompts, completions, **kw: [c.count("a") for c in completions],
        )
        return trainer.fit(), trainer.policy.state_dict()

    (shared, w_shared), (full, w_full) = run(True), run(False)
    # each step packs 2 prompts once instead of k = 3 times
    assert all(h["tokens"] < f["tokens"] for h, f in zip(shared, full))
    for name in ("reward_mean", "response_len_mean"):
        assert [h[name] for h in shared] == [h[name] for h in full], name
    assert any(h["kl_mean"] != 0 for h in shared[1:])
    for name in ("loss", "kl_mean", "entropy", "advantage_std"):
        torch.testing.assert_close(
            torch.tensor([h[name] for h in shared]),
            torch.tensor([h[name] for h in full]),
            rtol=1e-4,
            atol=1e-6,
            msg=name,
        )
    for name, v in w_shared.items():
        torch.testing.assert_close(v, w_full[name], rtol=1e-4, atol=1e-6, msg=name)


def bf16_within_twice_plain(monkeypatch, device, backend):
    """bf16 on `device`: the shared-prompt batch through `backend` against the float64 model,
    within 2x the bf16 error of the same sequences run alone with SDPA."""
    policy64 = model()
    rows, responses = samples()
    weights = torch.ones(sum(r.numel() for r in responses), dtype=torch.float64)
    lp_ref, _ = alone(policy64, rows, responses, weights)
    policy = model(dtype=torch.bfloat16).to(device)
    with torch.no_grad():
        monkeypatch.setenv("NEMOKERN_ATTENTION", "sdpa")
        lp_alone, _ = alone(policy, rows, responses, weights.to(device))
        monkeypatch.setenv("NEMOKERN_ATTENTION", backend)
        batch = {k: v.to(device) for k, v in pack(rows, responses, K).items()}
        lp, _ = packed(policy, batch, weights.to(device))
    plain = (lp_alone.cpu() - lp_ref).abs().max()
    err = (lp.cpu() - lp_ref).abs().max()
    assert 0 < err <= 2 * plain + 1e-3, (err, plain)


def test_bf16_cpu_within_twice_plain(monkeypatch):
    bf16_within_twice_plain(monkeypatch, "cpu", "sdpa")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen", "sdpa"])
def test_gpu_shared_prefix_backends_match_float64(monkeypatch, backend):
    """CUDA: every packed backend with parents (the varlen kernels get key lists longer than
    their query lists, causal at the bottom right)."""
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    bf16_within_twice_plain(monkeypatch, "cuda", backend)
