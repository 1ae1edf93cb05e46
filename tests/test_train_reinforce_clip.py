"""REINFORCE with several updates per rollout and importance-ratio clipping (--clip-eps-low,
--clip-eps-high): the ratio is to the log-probs recorded at rollout time, so the first update of
a rollout has r = 1 (nothing clipped) and a later one does not; each update's loss equals the
clipped surrogate recomputed in float64 from the policy's weights before that update and the
rollout's batch. Tiny Llama, byte tokenizer, CPU."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from helpers import count_a, tiny_policy
from helpers import reinforce_config as config
from nemokern.engine.config import ConfigError
from nemokern.model import Llama
from nemokern.trainers.reinforce import ReinforceConfig, ReinforceTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


def char_sum(prompts, completions, **kw):
    """A reward that differs between almost any two completions: every update has advantages."""
    return [sum(map(ord, c)) % 7 / 7 for c in completions]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(f'{{"prompt": "Say {c}."}}\n' for c in "abcd"))
    return path


def float64_surrogate(weights, policy_config, batch, clip, temperature):
    """-sum_t min(r_t a_t, clip(r_t) a_t), a_t = -coef_t (the advantage over n_tokens), r_t =
    exp(logp_t - old_t), logp_t of the targets by a float64 copy of the policy on each packed
    sample (prompt + response) on its own, with plain log_softmax."""
    ref = Llama(policy_config).double()
    ref.load_state_dict({k: v.double() for k, v in weights.items()})
    cu, targets = batch["cu_seqlens"].long(), batch["targets"]
    logp = torch.zeros(targets.shape, dtype=torch.float64)
    with torch.no_grad():
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            logits = ref(batch["input_ids"][a:b][None])[0] / temperature
            lsm = F.log_softmax(logits, -1)
            t = targets[a:b]
            logp[a:b] = lsm.gather(-1, t.clamp(min=0)[:, None])[:, 0]
    mask = targets != -100
    r = torch.exp(logp - batch["old_logprobs"].double())[mask]
    adv = -batch["coef"].double()[mask]
    lo, hi = 1 - clip[0], 1 + clip[1]
    loss = -torch.min(r * adv, r.clamp(lo, hi) * adv).sum()
    clipped = ((adv > 0) & (r > hi)) | ((adv < 0) & (r < lo))
    return loss, r, clipped


def test_two_updates_per_rollout_with_ratio_clipping(tmp_path, prompts):
    clip = (0.002, 0.003)  # narrow: the second update's ratios leave [1 - low, 1 + high]
    cfg = config(
        tmp_path,
        prompts,
        max_steps=2,
        updates_per_rollout=2,
        clip_eps_low=clip[0],
        clip_eps_high=clip[1],
        truncation_penalty=0.0,  # every sample has an advantage
        shared_prompt=False,  # one packed segment per sample: recomputed sample by sample
        temperature=0.7,
        lr=3e-3,
    )
    trainer = ReinforceTrainer(cfg, policy=tiny_policy(), reward_fn=char_sum)
    seen = []
    real_update = trainer._update

    def update(model, batch):
        weights = copy.deepcopy(trainer.policy.state_dict())
        out = real_update(model, batch)
        seen.append((weights, {k: v.cpu() for k, v in batch.items() if torch.is_tensor(v)}, out))
        return out

    trainer._update = update
    history = trainer.fit()
    assert [h["generate_s"] > 0 for h in history] == [True, False]  # one rollout, two updates
    assert len(seen) == 2
    for step, ((weights, batch, out), h) in enumerate(zip(seen, history)):
        loss, r, clipped = float64_surrogate(
            weights, trainer.policy.config, batch, clip, cfg.temperature
        )
        torch.testing.assert_close(out.loss.detach().double(), loss, rtol=1e-5, atol=1e-7)
        assert h["loss"] == pytest.approx(float(loss), rel=1e-5, abs=1e-7)
        assert h["clip_fraction"] == pytest.approx(float(clipped.double().mean()), abs=1e-6)
        assert h["ratio_mean"] == pytest.approx(float(r.mean()), rel=1e-5)
        assert h["advantage_std"] > 0
        if step == 0:  # the policy that sampled: r = 1, nothing clipped
            assert h["clip_fraction"] == 0.0
            torch.testing.assert_close(r, torch.ones_like(r), rtol=0, atol=1e-5)
        else:
            assert 0 < h["clip_fraction"] < 1
            assert (r - 1).abs().max() > 1e-2


def test_without_clip_options_the_update_has_no_ratio(tmp_path, prompts):
    """NeMo-Aligner's several updates per rollout: -logp * A, no ratio, no clip metrics."""
    cfg = config(tmp_path, prompts, max_steps=2, updates_per_rollout=2)
    trainer = ReinforceTrainer(cfg, policy=tiny_policy(), reward_fn=count_a)
    seen = []
    real_update = trainer._update
    trainer._update = lambda model, batch: seen.append(batch) or real_update(model, batch)
    history = trainer.fit()
    assert all("clip_fraction" not in h for h in history)
    assert all("old_logprobs" not in b for b in seen)


def test_one_update_per_rollout_takes_the_ratio_from_its_own_forward(tmp_path, prompts):
    """With one update per rollout the policy log-probs come from the update's forward: the
    ratio is to those (the policy that sampled), 1, nothing clipped."""
    cfg = config(tmp_path, prompts, max_steps=2, clip_eps_low=0.2)
    history = ReinforceTrainer(cfg, policy=tiny_policy(), reward_fn=count_a).fit()
    for h in history:
        assert h["clip_fraction"] == 0.0 and h["ratio_mean"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", ["clip_eps_low", "clip_eps_high"])
def test_bad_clip_option_names_the_option(name):
    with pytest.raises(ConfigError, match=f"^--{name.replace('_', '-')}: -0.1 must be >= 0"):
        ReinforceConfig(prompts="p.jsonl", **{name: -0.1})


@pytest.mark.parametrize(
    "kw, taken",
    [(dict(clip_eps_low=1.5), ""), (dict(clip_eps_low=1.0), ""), (dict(clip_eps_high=2.0), True)],
)
def test_a_lower_clip_at_or_below_0_is_refused(kw, taken):
    """1 - eps_low <= 0: the ratio exp(logp - old_logp) is always above it, so it never clips."""
    with pytest.raises(ConfigError, match=r"^--clip-eps-low: .* at or below 0") as e:
        ReinforceConfig(prompts="p.jsonl", **kw)
    assert ("taken from --clip-eps-high" in str(e.value)) == bool(taken)
    ReinforceConfig(prompts="p.jsonl", clip_eps_low=0.99, clip_eps_high=5.0)  # high may exceed 1


def test_loss_spec_takes_the_options_of_its_names():
    """ReinforceConfig.loss_spec(): each field from the option of its name, the temperature
    that every log-prob uses and the clip range with an unset side taking the other's value."""
    cfg = ReinforceConfig(
        k=3,
        beta=0.2,
        kl_estimator="k3",
        kl_reduction="sum",
        truncated="trained",
        normalize_advantages=True,
        loss_normalisation="sequence-sum",
        temperature=0.5,
        clip_eps_high=0.3,
    )
    spec = cfg.loss_spec()
    for f in dataclasses.fields(spec):
        if f.name not in ("temperature", "clip"):
            assert getattr(spec, f.name) == getattr(cfg, f.name), f.name
    assert spec.temperature == 0.5 and spec.clip == (0.3, 0.3)
    assert ReinforceConfig(clip_eps_low=0.1, clip_eps_high=0.4).loss_spec().clip == (0.1, 0.4)
    assert ReinforceConfig(temperature_in_logprobs=False, temperature=0.5).loss_spec() == (
        dataclasses.replace(ReinforceConfig().loss_spec(), temperature=1.0)
    )
    assert ReinforceConfig().loss_spec().clip is None
