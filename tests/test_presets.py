"""--preset nemo-aligner / trl: one step's logged loss against each reference's formula,
recomputed in float64 from the saved rollout (REINFORCE) or the pairs' rewards (BT with ties);
the options behind them; --print-config."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from nemokern.data.synthetic import write_synthetic
from nemokern.data.tokenizer import ByteTokenizer
from nemokern.engine.config import ConfigError, build_config
from nemokern.model import Llama, LlamaConfig
from nemokern.train import ReinforceConfig, ReinforceTrainer, RewardConfig, RewardTrainer
from nemokern.trainers.losses import bradley_terry_loss, policy_gradient_coefficients
from nemokern.trainers.reward import batch_rewards
from nemokern.trainers.rollout import stop_length

pytestmark = pytest.mark.usefixtures("one_thread")
TOK = ByteTokenizer()
# many one-character stop strings: a random tiny policy then ends some samples after a few
# tokens, others run to max_new_tokens without ending (mixed lengths, some not ended)
STOPS = list("etaoinshrdlucmfwyp")
HEAD_SCALE = 8.0
TEMPERATURE = 0.7  # != 1: NeMo-Aligner's log-probs use the raw logits, TRL's logits / T


def tiny_policy(seed=3):
    """A tiny random Llama whose LM head is scaled up: its token log-probs spread over a few
    nats, so the samples' mean log-probs differ and the step's loss (advantages sum to 0 per
    prompt) is not a cancellation that float32 rounding dominates."""
    torch.manual_seed(seed)
    model = Llama(
        LlamaConfig.tiny(
            vocab_size=TOK.vocab_size, bos_token_id=TOK.bos_id, eos_token_id=list(TOK.eos_ids)
        )
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    return model


def length_reward(prompts, completions, **kw):
    return [0.1 * len(c) + c.count("e") for c in completions]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {c}."}) + "\n" for c in "abcdefgh"))
    return path


# ---- each reference's REINFORCE loss, written from its source --------------------------------
def nemo_aligner_loss(lines, k):
    """NeMo-Aligner af2b3bd9: KL = masked mean of |logp - logp_ref| (ppo_utils.calculate_kl_penalty,
    reinforce.py), R = r - 0.01 KL, calculate_rloo_baseline over the ended samples (baseline = R
    where a prompt has at most one), and the actor's loss_func with micro_batch_size 1: per sample
    the token mean of -logp (R - b), 0 when the sample did not end; the mean over samples."""
    per_sample = []
    for g in range(0, len(lines), k):
        group = lines[g : g + k]
        lp = [np.array(x["logprobs"], np.float64) for x in group]
        ref = [np.array(x["ref_logprobs"], np.float64) for x in group]
        kl = np.array([np.abs(a - b).mean() for a, b in zip(lp, ref)])
        r = np.array([x["reward"] for x in group], np.float64) - 0.01 * kl
        end = np.array([x["ended"] for x in group], np.float64)
        if end.sum() <= 1:
            base = r.copy()
        else:
            base = ((1 - np.eye(k)) @ (r * end)) / (end.sum() - 1)
        for i in range(k):
            loss = (-lp[i] * (r[i] - base[i])).mean() if end[i] else 0.0
            per_sample.append(loss)
        for x, kl_i, r_i in zip(group, kl, r):
            assert x["kl"] == pytest.approx(kl_i, rel=1e-5, abs=1e-7)
            assert x["reward_with_kl"] == pytest.approx(r_i, rel=1e-5, abs=1e-7)
    return float(np.mean(per_sample))


def trl_loss(lines, k):
    """TRL RLOOTrainer: KL = sum of logp - logp_ref (k1), R = r - 0.05 KL, baseline = mean R of
    the other k - 1 samples (truncated ones kept: mask_truncated_completions False), loss =
    mean over samples of -A * sum_t logp_t (its ratio form at num_iterations 1 has this
    gradient)."""
    per_sample = []
    for g in range(0, len(lines), k):
        group = lines[g : g + k]
        lp = [np.array(x["logprobs"], np.float64) for x in group]
        ref = [np.array(x["ref_logprobs"], np.float64) for x in group]
        kl = np.array([(a - b).sum() for a, b in zip(lp, ref)])
        r = np.array([x["reward"] for x in group], np.float64) - 0.05 * kl
        adv = r - (r.sum() - r) / (k - 1)
        per_sample += [-adv[i] * lp[i].sum() for i in range(k)]
        for x, a in zip(group, adv):
            assert x["advantage"] == pytest.approx(a, rel=1e-5, abs=1e-6)
    return float(np.mean(per_sample))


def policy_logprobs(policy, line, temperature):
    """Float64 log-probs of a saved completion under `policy`, logits / temperature."""
    prompt = TOK.encode(line["prompt"])
    ids = torch.tensor(prompt + line["completion_ids"])
    with torch.no_grad():
        logits = policy(ids[None])[0].double() / temperature
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    return lp.gather(-1, ids[len(prompt) :, None])[:, 0].numpy()


@pytest.mark.parametrize(
    "preset, reference, logprob_temperature",
    [("nemo-aligner", nemo_aligner_loss, 1.0), ("trl", trl_loss, TEMPERATURE)],
)
def test_one_step_loss_is_the_references_formula(
    tmp_path, prompts, preset, reference, logprob_temperature
):
    cfg = build_config(
        ReinforceConfig,
        preset=preset,
        prompts=str(prompts),
        out=str(tmp_path / "run"),
        max_new_tokens=10,
        stop_strings=STOPS,
        temperature=TEMPERATURE,
        prompts_per_step=4,
        max_steps=1,
        save_rollouts=1,
        device="cpu",
        progress=False,
        tensorboard=False,
    )
    # the options each preset sets, the one-step overrides aside
    assert (
        cfg.preset == preset
        and (cfg.k, cfg.loss_normalisation)
        == {
            "nemo-aligner": (4, "sequence-mean"),
            "trl": (2, "sequence-sum"),
        }[preset]
    )
    trainer = ReinforceTrainer(cfg, policy=tiny_policy(), reward_fn=length_reward)
    before = tiny_policy()  # the policy the samples were drawn from
    history = trainer.fit()
    lines = [
        json.loads(x)
        for x in (tmp_path / "run" / "rollouts" / "step-00000001.jsonl").read_text().splitlines()
    ]
    assert len(lines) == 4 * cfg.k
    ended = [x["ended"] for x in lines]
    lengths = {len(x["completion_ids"]) for x in lines}
    assert any(ended) and not all(ended) and len(lengths) > 2, (ended, lengths)
    for x in lines:
        assert len(x["logprobs"]) == len(x["ref_logprobs"]) == len(x["completion_ids"])
        assert x["reward"] == pytest.approx(length_reward([], [x["completion"]])[0])
        ids = x["completion_ids"]
        ends = [TOK.decode(ids[:n]).endswith(tuple(STOPS)) for n in range(1, len(ids) + 1)]
        if not x["ended"]:
            assert len(ids) == 10 and not any(ends)
        elif ids[-1] not in TOK.eos_ids:  # cut right where its text first ends with a stop
            assert ends[-1] and not any(ends[:-1])
        want = policy_logprobs(before, x, logprob_temperature)
        np.testing.assert_allclose(x["logprobs"], want, rtol=1e-4, atol=1e-5)
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert logged == history[0]["loss"]
    want = reference(lines, cfg.k)
    assert abs(logged - want) <= 1e-5 * abs(want), (logged, want)


@pytest.mark.parametrize("normalisation", ["token-mean", "sequence-mean", "sequence-sum"])
def test_coefficients_against_float64(normalisation):
    torch.manual_seed(0)
    lengths = torch.tensor([3, 1, 7, 4, 2])
    sample_of = torch.repeat_interleave(torch.arange(5), lengths)
    mask = torch.rand(sample_of.numel()) < 0.8
    adv = torch.randn(5, dtype=torch.float64)
    lp = torch.randn(sample_of.numel(), dtype=torch.float64)
    coef, weight = policy_gradient_coefficients(adv.float(), sample_of, mask, normalisation)
    terms = [(-adv[s] * lp[(sample_of == s) & mask]) for s in range(5)]
    if normalisation == "token-mean":
        want, want_w = float(sum(t.sum() for t in terms) / mask.sum()), int(mask.sum())
    elif normalisation == "sequence-mean":
        want = float(np.mean([t.mean() if t.numel() else 0.0 for t in terms]))
        want_w = 5
    else:
        want, want_w = float(np.mean([t.sum() for t in terms])), 5
    assert weight == want_w
    assert float((coef.double() * lp).sum()) == pytest.approx(want, rel=1e-6)


# ---- reward losses with ties -------------------------------------------------------------------
def nemo_bt(first, second, label, kind):
    """NeMo-Aligner megatron_gpt_regression_reward_model.bt_loss_func, one pair per micro-batch
    (micro_batch_size 2), then the mean over micro-batches: label < 0 means response 1 is chosen,
    otherwise (ties included) response 2."""
    losses = []
    for f, s, lab in zip(first, second, label):
        c, r = (f, s) if lab < 0 else (s, f)
        m = abs(lab)
        bt = -np.log(1 / (1 + np.exp(-(c - r - (m if kind == "margin-bt" else 0)))))
        losses.append(m * bt if kind == "scaled-bt" else bt)
    return float(np.mean(losses))


@pytest.mark.parametrize("kind", ["bt", "margin-bt", "scaled-bt"])
@pytest.mark.parametrize("preset", ["nemo-aligner", "trl"])
def test_reward_step_with_ties(tmp_path, preset, kind):
    if preset == "trl" and kind == "scaled-bt":
        pytest.skip("TRL's RewardTrainer has no scaled BT")
    data = write_synthetic(tmp_path / "pairs.jsonl", 24, "hs2-preference", ties=0.3, seed=1)
    rows = [json.loads(x) for x in open(data)]
    assert any(r["preference_strength"] == 0 for r in rows)
    cfg = build_config(
        RewardConfig,
        preset=preset,
        data=data,
        loss=kind,
        out=str(tmp_path / "run"),
        rows_per_batch=len(rows),
        max_length=512,
        max_steps=1,
        device="cpu",
        progress=False,
        tensorboard=False,
    )
    torch.manual_seed(0)
    trainer = RewardTrainer(cfg)
    batch = trainer.train_data.batch(list(range(len(rows))))  # the step's pairs, in file order
    with torch.no_grad():
        r = batch_rewards(trainer.model, batch)[:, 4].double().view(-1, 2).numpy()
    labels = np.array([rows[i]["preference_strength"] for i in batch.rows], np.float64)
    # the reader puts the chosen response first: response 1 if label < 0, else response 2
    first = np.where(labels < 0, r[:, 0], r[:, 1])
    second = np.where(labels < 0, r[:, 1], r[:, 0])
    if preset == "trl":  # RewardTrainer: -logsigmoid(c - r [- margin]).mean() over every pair
        c, rj = r[:, 0], r[:, 1]
        margin = np.abs(labels) if kind == "margin-bt" else 0.0
        want = float(np.mean(np.log1p(np.exp(-(c - rj - margin)))))
    else:
        want = nemo_bt(first, second, labels, kind)
    logged = trainer.fit()[0]["loss"]
    assert abs(logged - want) <= 1e-5 * abs(want), (logged, want)


def test_ties_drop_is_the_default_and_differs():
    rc, rr = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([0.1, 0.5, 2.5])
    s = torch.tensor([2.0, 0.0, 1.0])
    dropped = bradley_terry_loss(rc, rr, s)
    counted = bradley_terry_loss(rc, rr, s, ties="count")
    assert (int(dropped.count), int(counted.count)) == (2, 3)
    scaled = bradley_terry_loss(rc, rr, s, kind="scaled", ties="count")
    assert float(scaled.loss) == pytest.approx(
        float(
            (2 * -torch.nn.functional.logsigmoid(rc[0] - rr[0]))
            + (1 * -torch.nn.functional.logsigmoid(rc[2] - rr[2]))
        )
        / 3
    )
    assert float(dropped.loss) != pytest.approx(float(counted.loss))


# ---- the options ---------------------------------------------------------------------------------
def test_stop_length():
    ids = list(b"ab<x>cd<x>")
    assert stop_length(ids, TOK.decode, ["<x>"]) == 5
    assert stop_length(ids, TOK.decode, ["cd", "<x"]) == 4
    assert stop_length(ids, TOK.decode, ["zz"]) is None


def test_command_line_and_config_win_over_the_preset(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "trl"\nbeta = 0.2\n')
    cfg = build_config(ReinforceConfig, toml=toml, k=6)
    assert (cfg.preset, cfg.beta, cfg.k, cfg.kl_estimator) == ("trl", 0.2, 6, "k1")
    assert build_config(ReinforceConfig).loss_normalisation == "token-mean"
    with pytest.raises(ValueError, match="no preset for SFTConfig"):
        from nemokern.train import SFTConfig

        build_config(SFTConfig, preset="trl")
    with pytest.raises(ConfigError, match="--truncation-penalty"):
        build_config(ReinforceConfig, truncated="trained", truncation_penalty=0.5)


def test_print_config_is_toml_that_reads_back(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "nemokern.cli",
            "train-reinforce",
            "--preset",
            "nemo-aligner",
            "--k",
            "8",
            "--print-config",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (tmp_path / "c.toml").write_text(out)
    cfg = build_config(ReinforceConfig, toml=tmp_path / "c.toml")
    assert (cfg.k, cfg.constant_steps, cfg.warmup_formula) == (8, 1000, "s/w")
    assert cfg.stop_strings == ["<|endoftext|>", "<extra_id_1>"]


# ---- the schedule --------------------------------------------------------------------------------
def nemo_cosine_annealing(step, max_lr, min_lr, warmup, constant, max_steps):
    """NeMo 8cfedd72 CosineAnnealing (nemo/core/optim/lr_scheduler.py) at PyTorch's last_epoch
    = step: with constant_steps > 0 Megatron's _linear_warmup_with_cosine_annealing throughout;
    without, (s + 1) / (w + 1) warmup and cosine over max_steps - w."""
    decay = max_steps - constant - warmup
    if constant > 0:
        if warmup > 0 and step <= warmup:
            return max_lr * step / warmup
        if step > warmup + decay:
            return min_lr
        return min_lr + 0.5 * (np.cos(np.pi * (step - warmup) / decay) + 1) * (max_lr - min_lr)
    if warmup > 0 and step <= warmup:
        return max_lr * (step + 1) / (warmup + 1)
    if step > max_steps:
        return min_lr
    mult = 0.5 * (1 + np.cos(np.pi * (step - warmup) / (max_steps - warmup)))
    return (max_lr - min_lr) * mult + min_lr


def hf_linear(step, lr, warmup, total):
    """transformers' get_linear_schedule_with_warmup (optimization.py)."""
    if step < warmup:
        return lr * step / max(1, warmup)
    return lr * max(0.0, (total - step) / max(1, total - warmup))


@pytest.mark.parametrize(
    "warmup, constant, total", [(10, 1000, 1500), (10, 1000, 600), (3, 5, 20), (4, 0, 30)]
)
def test_schedule_matches_nemo_cosine_annealing(warmup, constant, total):
    from nemokern.engine.optimizer import lr_factor

    formula = "s/w" if constant else "(s+1)/(w+1)"
    for s in range(total):
        ours = 9e-7 * lr_factor(
            s,
            total_steps=total,
            warmup_steps=warmup,
            schedule="cosine",
            lr=9e-7,
            min_lr=9e-8,
            constant_steps=constant,
            warmup_formula=formula,
        )
        want = nemo_cosine_annealing(s, 9e-7, 9e-8, warmup, constant, total)
        assert ours == pytest.approx(want, rel=1e-12, abs=1e-20), s


@pytest.mark.parametrize("warmup, total", [(0, 7), (3, 11)])
def test_linear_schedule_matches_transformers(warmup, total):
    from nemokern.engine.optimizer import lr_factor

    for s in range(total):
        ours = lr_factor(
            s,
            total_steps=total,
            warmup_steps=warmup,
            schedule="linear",
            lr=1e-6,
            min_lr=0.0,
            warmup_formula="s/w",
        )
        assert 1e-6 * ours == pytest.approx(hf_linear(s, 1e-6, warmup, total), abs=1e-20), s


def test_truncated_trained_and_normalised_advantages():
    from nemokern.trainers.losses import normalise_advantages, rloo_advantages

    scores = torch.tensor([[1.0, 2.0, 4.0, 8.0], [1.0, 2.0, 3.0, 5.0]], dtype=torch.float64)
    valid = torch.tensor([[True, True, False, True], [True, False, False, False]])
    adv = rloo_advantages(scores, valid, train_invalid=True)
    # prompt 0: valid samples' mean of the others; the invalid one against all valid ones
    want0 = [1 - 5, 2 - 4.5, 4 - 11 / 3, 8 - 1.5]
    assert adv[0].tolist() == pytest.approx(want0) and adv[1].abs().sum() == 0
    assert rloo_advantages(scores, valid)[0, 2] == 0
    a = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    trained = torch.tensor([True, True, False, True])
    out = normalise_advantages(a, trained)
    sub = np.array([1.0, -2.0, 3.0])
    want = (sub - sub.mean()) / (sub.std(ddof=1) + 1e-4)
    assert out[trained].tolist() == pytest.approx(want.tolist()) and out[2] == 0


def test_generate_ends_early_on_stop_strings_with_the_same_samples():
    from nemokern.model import generate

    policy = tiny_policy()
    prompts = [TOK.encode("Say a."), TOK.encode("Say bb.")]

    def cut(g):
        out = []
        for row, n in zip(g.tokens.tolist(), g.lengths.tolist()):
            m = stop_length(row[:n], TOK.decode, STOPS)
            out.append(row[: m or n])
        return out

    calls = []

    def seen(tokens, lengths):
        calls.append(tokens.shape[1])
        rows = zip(tokens.tolist(), lengths.tolist())
        return torch.tensor([stop_length(t[:n], TOK.decode, STOPS) is not None for t, n in rows])

    kw = dict(max_new_tokens=64, num_samples=4, temperature=TEMPERATURE, pad_id=TOK.pad_id)
    plain = generate(policy, prompts, generator=torch.Generator().manual_seed(5), **kw)
    early = generate(policy, prompts, generator=torch.Generator().manual_seed(5), stop=seen, **kw)
    assert cut(plain) == cut(early)
    assert calls and early.tokens.shape[1] < plain.tokens.shape[1]  # the loop ended early
