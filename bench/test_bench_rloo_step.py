"""Benchmark: one full REINFORCE/RLOO step (generate, score, policy and reference log-probs,
update) on the CPU, nemokern's ReinforceTrainer against TRL's RLOOTrainer.

    PYTHONPATH=$PWD python -m pytest bench/test_bench_rloo_step.py --benchmark-enable \
        --benchmark-json=bench/results/<date>-<machine>-rloo-step.json

Both train the SAME Llama-3.1-shaped policy (hidden 256, 4 layers, 8 query / 2 KV heads, FFN 704,
the byte vocabulary of 262 ids, untied; fp32), saved once in HF layout and loaded by each (TRL
through LlamaForCausalLM, transformers' default sdpa attention; its reference is a second copy
loaded from the same directory, nemokern's a deep copy), on the SAME 8 chat prompts (every step
takes all 8, each sampled K=4 times: 32 completions per step), max 32 new tokens, temperature 1.0,
top-p 1, top-k off, with the SAME programmatic reward function (TRL's signature, the share of the
letter "a" in the completion), beta 0.05 (TRL's default), one optimizer step per rollout, AdamW
(fused in both: TRL's default adamw_torch_fused, nemokern's build_optimizer) at a constant lr
1e-6, betas (0.9, 0.999), no weight decay, gradient norm clipped to 1.0 (TRL's default).

Equal as far as TRL allows:
  KL        TRL puts beta * sum_t (logp - logp_ref) (k1, summed per sequence) into the reward;
            nemokern is run with kl_estimator "k1", kl_reduction "sum" to do the same (its recipe
            default is |k1| averaged).
  baseline  TRL counts completions that hit the length limit in the leave-one-out baseline
            (mask_truncated_completions False); nemokern with truncation_penalty 0.0 does too (by
            default it leaves them out). A random policy rarely samples EOS, so most are truncated.
  loss      NOT equal: TRL minimises the mean over sequences of -min(rho * A, clip(rho) * A) with
            rho = exp(sum_t logp - sum_t logp_old) (PPO-style sequence ratio; rho = 1 at one step
            per rollout, so the gradient is -A * grad sum_t logp per sequence); nemokern the masked
            token mean of -logp_t * A (linear_policy_loss, gradients formed in the forward). The
            same FLOPs up to elementwise work; a different weighting of long and short completions.
  old logps TRL computes the policy's log-probs without gradient (for rho) and the reference's;
            nemokern the policy's (for the KL and the entropy metric) and the reference's: two
            no-grad forwards each.
  generate  TRL: transformers' generate() on the 32 left-padded prompts (KV cache, runs until
            every row has ended or 32 tokens); nemokern: its own KV-cache generate(). Both sample
            from the same distribution but with different random streams, so the completions
            (and their lengths after EOS) differ.
  prompts   TRL applies the chat template and tokenizes the prompts on every step; nemokern once
            when it reads the prompts file. The benchmark asserts the ids are the same.
  checkpointing  TRL's default is gradient_checkpointing=True (recompute in the backward); run
            once with it and once without. nemokern does not checkpoint (its default).
  packing   NOT equal: nemokern (shared_prompt, its default) packs each prompt once for its K
            samples in the reference and update forwards (the K responses attend to that one
            copy); TRL runs K padded copies. Both do the arithmetic of the same math; nemokern
            less of it. test_nemokern[full-copies] (shared_prompt=False) packs K full copies,
            like TRL, to show what the sharing gains.
Tokenizer: nemokern's byte tokenizer; for TRL the offline HF tokenizer of
bench/common.py (byte-identical ids, the same Llama-3.1 chat template), as in
test_bench_reward_train.py.

Timing (steady state): nemokern: ReinforceTrainer.fit() of STEPS steps; per step its own records
step_s (wall, from the start of the rollout to after the optimizer step) and generate_s, score_s,
logprobs_s, update_s (= step_s minus the three: packing, the forward/backward and AdamW). TRL: one
train() of TRL_WARMUP_STEPS (creating the optimizer and its state), then a measured train() of
TRL_STEPS steps timed by a TrainerCallback (on_step_begin to on_step_end: _prepare_inputs, i.e.
tokenize, generate, decode, log-probs, score, advantages; then the loss forward, backward,
clipping, optimizer, zero_grad); phases by timing its own methods: generate_s
(_generate_single_turn), score_s (_calculate_rewards), logprobs_s (the no-grad
_get_per_token_logps_and_entropies calls), other_s (the rest of _prepare_inputs: chat template,
tokenize, decode, padding, advantages, metrics), update_s (the step minus _prepare_inputs). The
first SKIP steps are dropped in both; the rest are the benchmark's rounds (median reported).
Group "..., 432-byte system turn": the same prompts after one long system turn (SYSTEM, ~483
tokens each), nemokern (shared prompts, full copies) and TRL without checkpointing.
Group "..., interleaved": nemokern (shared prompts and full copies), TRL with and without
checkpointing, one step each in turn,
ROUNDS times, so that a shared machine's changing load weighs on all alike (nemokern: fit() of one
step on the same trainer, i.e. a fresh loop and AdamW whose state is created in that step, 3M
parameters; TRL: train() of one step with the kept optimizer, timed by the callback).
Threads: torch's default for both (torch.get_num_threads() is recorded).
extra_info: per-phase medians (s), completions, response_tokens (median per step), threads,
peak_extra_bytes (around the whole measured run), device.
"""

import itertools

import pytest
import torch

# The timing helpers, the RLOO setup and both trainers, the TRL pieces (offline HF byte tokenizer,
# chat template, step-time callbacks): bench/common.py, shared with bench/profile_rloo_step.py
# and the reward-training benchmark.
from common import (
    MAX_NEW_TOKENS,
    TRL_SKIP,
    TRL_WARMUP_STEPS,
    K,
    device_name,
    median,
    nemokern_rloo_trainer,
    peak_extra_bytes,
    rloo_model,
    rloo_setup,
    time_trl_steps,
    trl_rloo_trainer,
    use_times,
)
from common import RLOO_PROMPTS as PROMPTS

from nemokern.model import Llama

STEPS, SKIP = 12, 2
ROUNDS = 10
MODEL = rloo_model()
PHASES = ("generate_s", "score_s", "logprobs_s", "update_s")
GROUP = (
    f"RLOO step (CPU, {PROMPTS} prompts x k={K}, {MAX_NEW_TOKENS} new tokens, "
    f"H={MODEL['hidden_size']} L={MODEL['num_hidden_layers']} fp32)"
)
# The long-prompt group: 8 short user turns after one system turn of 432 bytes (~490-token
# prompts with the chat template), the regime of RLHF prompt sets whose prompts outweigh the
# sampled responses.
SYSTEM = (
    "You are a careful writing assistant for a small team of engineers. Answer in one plain "
    "sentence, without lists, headings or code, and keep to the facts that the user gives you. "
    "If the request is unclear, write the most natural sentence a reader would expect. Prefer "
    "short common words, avoid jargon, never mention these instructions, and do not add a "
    "greeting or a sign-off. Use American spelling and end the sentence with a period."
)
LONG_GROUP = GROUP + f", {len(SYSTEM)}-byte system turn"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The policy in HF layout, the prompts file (chat turns), nemokern's prompt ids."""
    return rloo_setup(tmp_path_factory.mktemp("rloo_step"))


@pytest.fixture(scope="module")
def long_setup(tmp_path_factory):
    """setup's prompts after the SYSTEM turn."""
    return rloo_setup(tmp_path_factory.mktemp("rloo_step_long"), SYSTEM)


def test_same_policy(setup):
    """transformers' LlamaForCausalLM and nemokern's Llama give the same next-token log-probs."""
    from transformers import LlamaForCausalLM

    ids = torch.tensor([setup["ids"][0]])
    hf = LlamaForCausalLM.from_pretrained(setup["dir"], dtype=torch.float32).eval()
    nk = Llama.from_pretrained(setup["dir"], dtype=torch.float32).eval()
    with torch.no_grad():
        a = hf(input_ids=ids).logits[0].log_softmax(-1)
        h = nk.hidden_states(ids[0], cu_seqlens=torch.tensor([0, ids.shape[1]], dtype=torch.int32))
        b = (h @ nk.lm_head.weight.T).log_softmax(-1)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- nemokern


def _phase_info(records, phases):
    return {p: median([r[p] for r in records]) for p in phases}


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("packing", ["shared-prompt", "full-copies"])
def test_nemokern(benchmark, setup, packing):
    _run_nemokern(benchmark, setup, packing)


@pytest.mark.benchmark(group=LONG_GROUP)
@pytest.mark.parametrize("packing", ["shared-prompt", "full-copies"])
def test_nemokern_long_prompts(benchmark, long_setup, packing):
    _run_nemokern(benchmark, long_setup, packing)


def _run_nemokern(benchmark, setup, packing):
    trainer = nemokern_rloo_trainer(setup, STEPS, f"nemokern-{packing}", packing == "shared-prompt")
    assert [list(p.ids) for p in trainer.prompts] == setup["ids"]
    history, peak = peak_extra_bytes(lambda: benchmark.pedantic(trainer.fit, rounds=1), "cpu")
    steady = history[SKIP:]
    assert len(steady) == STEPS - SKIP
    fit_seconds = use_times(benchmark, [r["step_s"] for r in steady])
    benchmark.extra_info.update(
        peak_extra_bytes=peak,
        device=device_name("cpu"),
        fit_seconds=fit_seconds,
        completions=PROMPTS * K,
        response_tokens=median([r["response_len_mean"] * PROMPTS * K for r in steady]),
        threads=torch.get_num_threads(),
        fused_adamw=bool(trainer.loop.optimizer.defaults.get("fused")),
        reward_mean=[r["reward_mean"] for r in history],
        kl_mean=[r["kl_mean"] for r in history],
        step_s=[r["step_s"] for r in history],
        **_phase_info(steady, PHASES),
    )


# ---------------------------------------------------------------- TRL


CKPT = pytest.mark.parametrize("checkpointing", [True, False], ids=["grad-ckpt", "no-ckpt"])


@pytest.mark.benchmark(group=GROUP)
@CKPT
def test_trl(benchmark, setup, checkpointing):
    _run_trl(benchmark, setup, checkpointing)


@pytest.mark.benchmark(group=LONG_GROUP)
def test_trl_long_prompts(benchmark, long_setup):
    """TRL without gradient checkpointing (its faster setting here) on the long prompts."""
    _run_trl(benchmark, long_setup, False)


def _run_trl(benchmark, setup, checkpointing):
    name = f"trl-{checkpointing}"
    trl, trainer, timer = trl_rloo_trainer(setup, checkpointing, TRL_WARMUP_STEPS, name)
    peak, train_seconds = time_trl_steps(benchmark, trainer, timer)
    benchmark.extra_info.update(
        peak_extra_bytes=peak,
        device=device_name("cpu"),
        train_seconds=train_seconds,
        completions=PROMPTS * K,
        response_tokens=median([p["response_tokens"] for p in timer.phases[TRL_SKIP:]]),
        threads=torch.get_num_threads(),
        gradient_checkpointing=bool(trainer.model.is_gradient_checkpointing),
        optim=str(trainer.args.optim),
        attn=trainer.model.config._attn_implementation,
        trl=trl.__version__,
        step_s=list(timer.times),
        **_phase_info(timer.phases[TRL_SKIP:], (*PHASES, "other_s")),
    )


# ---------------------------------------------------------------- all of them in turn

IMPLS = ["nemokern", "nemokern[full-copies]", "trl[grad-ckpt]", "trl[no-ckpt]"]


@pytest.fixture(scope="module")
def interleaved(setup):
    """Seconds per step (and phases) of each implementation, one step of each in turn, ROUNDS
    times, so that the load of a shared machine weighs on all of them alike."""
    steps = {}
    for shared, name in ((True, "nemokern"), (False, "nemokern[full-copies]")):
        runs = itertools.count()

        def nemokern_step(shared=shared, name=name, runs=runs):
            # a fresh trainer, loop and AdamW each time (3M parameters), in a fresh --out: a
            # trainer refuses an --out that holds another run
            trainer = nemokern_rloo_trainer(setup, 1, f"i-{name}-{next(runs)}", shared)
            record = trainer.fit()[-1]
            return record["step_s"], {p: record[p] for p in PHASES}

        steps[name] = nemokern_step
    try:
        import trl  # noqa: F401
    except ImportError:
        pass
    else:
        for checkpointing, name in ((True, "trl[grad-ckpt]"), (False, "trl[no-ckpt]")):
            _, trainer, timer = trl_rloo_trainer(setup, checkpointing, 1, f"i-{name}")

            def trl_step(trainer=trainer, timer=timer):
                trainer.train()
                return timer.times[-1], timer.phases[-1]

            steps[name] = trl_step
    out = {name: ([], []) for name in steps}
    for step in steps.values():
        step()  # warm-up, AdamW state
    for _ in range(ROUNDS):
        for name, step in steps.items():
            seconds, phases = step()
            out[name][0].append(seconds)
            out[name][1].append(phases)
    return out


@pytest.mark.benchmark(group=GROUP + ", interleaved")
@pytest.mark.parametrize("impl", IMPLS)
def test_interleaved(benchmark, interleaved, setup, impl):
    if impl not in interleaved:
        pytest.skip("trl is not installed")
    times, phases = interleaved[impl]
    benchmark.pedantic(lambda: None, rounds=1)
    use_times(benchmark, times)
    names = (*PHASES, "other_s") if impl.startswith("trl") else PHASES
    benchmark.extra_info.update(
        device=device_name("cpu"),
        completions=PROMPTS * K,
        threads=torch.get_num_threads(),
        step_s=list(times),
        **_phase_info(phases, names),
    )
