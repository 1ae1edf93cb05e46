"""`nemokern selfcheck`: one RLOO-style rollout-and-score pass of a tiny built-in Llama-3.1 on CPU
or GPU, with nothing downloaded.

It exercises every layer of the package and checks each against its plain counterpart:
HF-layout save/load, packed forward vs per-sequence forward, KV-cache sampling of k responses per
prompt, fused log-probs from hidden states vs log_softmax of the logits, sequence KL to a
reference policy, the reward head on the last token, and the leave-one-out advantage.
`check_options` validates every argument before any work; the CLI calls it first. (The recipe
itself, trained end to end, is `nemokern demo`: tools/demo.py.)
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field

import torch

from nemokern.data.tokenizer import ByteTokenizer
from nemokern.engine import options
from nemokern.errors import ConfigError
from nemokern.model import Llama, LlamaConfig, generate
from nemokern.ops import linear_logprobs, logprobs, reward_head, sequence_kl
from nemokern.trainers.policy import SampleGroups, kl_regularised_advantages, pack

PROMPTS = (
    "Write a haiku about GPUs.",
    "What is 17 * 23?",
    "Name three prime numbers.",
)


# The defaults of run_selfcheck and of `nemokern selfcheck` (the CLI reads them from here).
DEFAULT_SEED, DEFAULT_K, DEFAULT_MAX_NEW_TOKENS, DEFAULT_DEVICE = 0, 4, 96, "cpu"


def _setup():
    """The tokenizer, the tiny model's config and the chat-formatted prompts (cheap, no model)."""
    tok = ByteTokenizer()
    cfg = LlamaConfig.tiny(
        vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=list(tok.eos_ids)
    )
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        for p in PROMPTS
    ]
    return tok, cfg, prompts


def check_options(*, seed, k, max_new_tokens, device, out_dir) -> list[str]:
    """Raise ConfigError for an argument run_selfcheck cannot run with; return
    warnings."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"{seed!r} is not allowed; use an integer in [0, 2**63)", option="seed")
    options.int_at_least("k", k, 1, "the number of responses sampled per prompt")
    options.int_at_least("max_new_tokens", max_new_tokens, 1, "the response length limit")
    _, cfg, prompts = _setup()
    room = cfg.max_position_embeddings - max(len(p) for p in prompts)
    if max_new_tokens > room:
        raise ConfigError(
            f"{max_new_tokens} is too many: the longest prompt leaves room for "
            f"{room} new tokens in the tiny model's {cfg.max_position_embeddings} positions",
            option="max_new_tokens",
        )
    options.device("device", device)
    if out_dir is not None:
        options.out_dir("out_dir", out_dir)
    if k == 1:
        return ["k=1: RLOO needs k >= 2 responses per prompt; every advantage will be 0"]
    return []


@dataclass
class SelfcheckResult:
    checks: dict[str, float] = field(default_factory=dict)  # name -> max abs error
    rewards: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    advantages: list[float] = field(default_factory=list)
    seconds: float = 0.0


def run_selfcheck(
    *,
    seed: int = DEFAULT_SEED,
    k: int = DEFAULT_K,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    device: str = DEFAULT_DEVICE,
    out_dir: str | None = None,
    log=print,
) -> SelfcheckResult:
    """Run the checks; every check's error lands in SelfcheckResult.checks. Bad arguments raise
    ConfigError before any work; warnings (k = 1) go to `log`."""
    for warning in check_options(
        seed=seed, k=k, max_new_tokens=max_new_tokens, device=device, out_dir=out_dir
    ):
        log(f"warning: {warning}")
    t0 = time.perf_counter()
    res = SelfcheckResult()
    torch.manual_seed(seed)
    tok, cfg, prompts = _setup()
    policy = Llama(cfg).to(device).eval()
    log(
        f"[1/6] tiny Llama-3.1: {sum(p.numel() for p in policy.parameters()):,} parameters, "
        f"{cfg.num_hidden_layers} layers, GQA {cfg.num_attention_heads}/{cfg.num_key_value_heads}, "
        f"vocab {cfg.vocab_size}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        path = out_dir or tmp
        policy.save_pretrained(path)
        reloaded = Llama.from_pretrained(path, device=device).eval()
    probe = torch.tensor(
        [tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}])], device=device
    )
    with torch.no_grad():
        res.checks["save/load logits"] = (policy(probe) - reloaded(probe)).abs().max().item()
    log(
        "[2/6] save_pretrained -> from_pretrained "
        f"({'kept in ' + out_dir if out_dir else 'temp dir'}): "
        f"max |dlogits| = {res.checks['save/load logits']:.1e}"
    )

    gen = torch.Generator(device=device).manual_seed(seed)
    groups = SampleGroups(k, len(PROMPTS))
    sample_prompts = groups.repeat(prompts)
    rollout = generate(
        policy,
        sample_prompts,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        generator=gen,
        pad_id=tok.pad_id,
    )
    log(
        f"[3/6] sampled {k} responses x {len(PROMPTS)} prompts with the KV cache: lengths "
        f"{rollout.lengths.tolist()}, ended with EOS "
        f"{int(rollout.ended_with_eos.sum())}/{rollout.lengths.numel()}"
    )

    # Pack prompt + response of every rollout into one row: no padding is computed. Targets: the
    # next token inside each response; prompt tokens and segment ends are ignored (-100).
    responses = [rollout.tokens[i, : rollout.lengths[i]] for i in range(groups.n_samples)]
    packed = pack(sample_prompts, responses)
    ids, cu, targets = (packed[n].to(device) for n in ("input_ids", "cu_seqlens", "targets"))
    lengths = cu[1:] - cu[:-1]
    seqs = ids.split(lengths.tolist())
    with torch.no_grad():
        hidden = policy.hidden_states(ids, cu_seqlens=cu, final_norm=False)  # [N, H]
        alone = torch.cat([policy.hidden_states(s[None], final_norm=False)[0] for s in seqs])
    res.checks["packed vs per-sequence hidden"] = (hidden - alone).abs().max().item()
    # The trainers' packing: each prompt once, its k responses continuing it (parents).
    shared = pack(sample_prompts, responses, k)
    with torch.no_grad():
        h_shared = policy.hidden_states(
            shared["input_ids"].to(device),
            cu_seqlens=shared["cu_seqlens"].to(device),
            parents=shared["parents"].to(device),
            final_norm=False,
        )
    predicts = shared["targets"].to(device) != -100  # the rows that predict a response token
    h_alone = torch.cat(
        [a[len(sample_prompts[i]) - 1 : -1] for i, a in enumerate(alone.split(lengths.tolist()))]
    )
    res.checks["shared-prompt vs per-sequence hidden"] = (
        (h_shared[predicts] - h_alone).abs().max().item()
    )
    log(
        f"[4/6] packed forward of {ids.numel()} tokens in {len(seqs)} segments: "
        f"max |packed - per-sequence| = {res.checks['packed vs per-sequence hidden']:.1e}; "
        f"each prompt once ({shared['input_ids'].numel()} tokens): max |shared - per-sequence| "
        f"= {res.checks['shared-prompt vs per-sequence hidden']:.1e}"
    )

    mask = targets != -100
    reference = Llama(cfg).to(device).eval()
    reference.load_state_dict(policy.state_dict())
    with torch.no_grad():
        for p in reference.parameters():  # a nearby "reference policy"
            p.add_(0.01 * torch.randn_like(p))
        normed = policy.norm(hidden)
        lp = linear_logprobs(normed, policy.lm_head.weight, targets)
        lp_eager = logprobs(policy.lm_head(normed), targets)
        ref_lp = linear_logprobs(
            reference.hidden_states(ids, cu_seqlens=cu), reference.lm_head.weight, targets
        )
    res.checks["linear_logprobs vs logprobs(logits)"] = (lp - lp_eager).abs().max().item()
    kl = sequence_kl(lp, ref_lp, mask, estimator="abs", reduction="mean", cu_seqlens=cu)
    res.kl = kl.tolist()
    log(
        f"[5/6] fused log-probs from hidden states: max |linear_logprobs - logprobs(logits)| = "
        f"{res.checks['linear_logprobs vs logprobs(logits)']:.1e}; sequence KL (abs, mean) to the "
        f"reference: {[round(x, 4) for x in res.kl]}"
    )

    # Reward: the Nemotron-Reward-HF layout, logit of token 0 at the last token of each sequence.
    last = cu[1:].long() - 1
    with torch.no_grad():
        r = reward_head(
            hidden, last, policy.norm.weight, policy.lm_head.weight[:1], eps=cfg.rms_norm_eps
        )[:, 0]
        r_eager = policy.lm_head(policy.norm(hidden[last]))[:, 0].float()
    res.checks["reward_head vs norm+gather+linear"] = (r - r_eager).abs().max().item()
    beta = 0.01
    _, adv = kl_regularised_advantages(r, kl, rollout.ended_with_eos, k, beta=beta)
    res.rewards, res.advantages = r.tolist(), adv.tolist()
    log(
        f"[6/6] rewards (lm_head row 0 at the last token) max |fused - eager| = "
        f"{res.checks['reward_head vs norm+gather+linear']:.1e}; RLOO advantages (beta={beta}, "
        f"valid = ended with EOS): {[round(a, 4) for a in res.advantages]}"
    )
    res.seconds = time.perf_counter() - t0
    return res
