"""ReinforceTrainer (RLOO) on a tiny Llama with the byte tokenizer, CPU: the KL-regularised
reward and leave-one-out advantages by hand, the update's gradient against float64 autograd,
short runs with a reward function and with a reward-model directory, exact resume inside a
rollout, option errors."""

import json
import shutil
import textwrap

import pytest
import torch
import torch.nn.functional as F

from helpers import count_a, tiny_policy
from helpers import reinforce_config as config
from nemokern.data import DataError
from nemokern.data.tokenizer import ByteTokenizer
from nemokern.engine.config import ConfigError
from nemokern.engine.metrics import read_metrics
from nemokern.model import Llama, LlamaConfig, RewardModel
from nemokern.trainers.policy import (
    PolicyLoss,
    PolicyLossSpec,
    SampleGroups,
    kl_regularised_advantages,
    pack,
)
from nemokern.trainers.reinforce import ReinforceTrainer

TOK = ByteTokenizer()
STEP_METRICS = (
    "reward_mean",
    "reward_std",
    "kl_mean",
    "response_len_mean",
    "eos_fraction",
    "entropy",
    "advantage_mean",
    "advantage_std",
    "generate_s",
    "score_s",
    "logprobs_s",
    "update_s",
    "step_s",
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [
        {"prompt": "Say a.", "answer": "a"},
        {
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Say b."},
            ],
            "answer": "b",
        },
        {"prompt": "Say c.", "answer": "c"},
        {"prompt": "Say d.", "answer": "d"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- the math ------------------------------------------------------------------------------------
def test_kl_regularised_reward_and_rloo_by_hand():
    F64 = torch.float64  # R and the advantages are formed in float64
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    kl = torch.tensor([0.5, 1.0, 0.0, 2.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    # prompt 0: all ended with EOS; prompt 1: sample 1 truncated; prompt 2: only sample 1 ended
    ended = torch.tensor([1, 1, 1, 1, 0, 1, 0, 1, 0], dtype=torch.bool)
    scores, adv = kl_regularised_advantages(rewards, kl, ended, 3, beta=0.1)
    torch.testing.assert_close(
        scores, torch.tensor([0.95, 1.9, 3.0, 3.8, 5.0, 5.9, 7.0, 8.0, 9.0], dtype=F64)
    )
    torch.testing.assert_close(
        adv,
        torch.tensor(
            [0.95 - 2.45, 1.9 - 1.975, 3.0 - 1.425, 3.8 - 5.9, 0.0, 5.9 - 3.8, 0.0, 0.0, 0.0],
            dtype=F64,
        ),
    )
    # with a truncation penalty every sample counts, a truncated one with R - penalty
    scores, adv = kl_regularised_advantages(rewards, kl, ended, 3, beta=0.1, truncation_penalty=1.0)
    torch.testing.assert_close(
        scores, torch.tensor([0.95, 1.9, 3.0, 3.8, 4.0, 5.9, 6.0, 8.0, 8.0], dtype=F64)
    )
    torch.testing.assert_close(
        adv[3:], torch.tensor([3.8 - 4.95, 4.0 - 4.85, 5.9 - 3.9, -2.0, 1.0, 1.0], dtype=F64)
    )


def test_sample_groups_is_the_k_samples_per_prompt_layout():
    """SampleGroups: sample i is prompt i // k's; whole groups only, in pack() and in the RLOO
    advantages alike."""
    g = SampleGroups.of(6, 3)
    assert (g.k, g.n_prompts, g.n_samples) == (3, 2, 6)
    assert g.repeat(["a", "b"]) == ["a", "a", "a", "b", "b", "b"]
    assert g.grid(torch.arange(6)).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert g.samples(1, 2) == (3, 6) and list(g.firsts()) == [0, 3]
    for n, k in ((7, 3), (3, 0)):
        with pytest.raises(ValueError, match=f"{n} samples are not whole groups of k = {k}"):
            SampleGroups.of(n, k)
    ones = torch.ones(7, dtype=torch.bool)
    with pytest.raises(ValueError, match="7 samples are not whole groups of k = 3"):
        kl_regularised_advantages(torch.zeros(7), torch.zeros(7), ones, 3, beta=0.1)
    with pytest.raises(ValueError, match="3 samples are not whole groups of k = 2"):
        pack([[1], [1], [1]], [torch.tensor([2])] * 3, 2)


def test_pack_targets_are_the_response_tokens():
    b = pack([[1, 2, 3], [4, 5]], [torch.tensor([7, 8]), torch.tensor([9])])
    assert b["input_ids"].tolist() == [1, 2, 3, 7, 8, 4, 5, 9]
    assert b["cu_seqlens"].tolist() == [0, 5, 8]
    assert b["targets"].tolist() == [-100, -100, 7, 8, -100, -100, 9, -100]
    assert b["last_index"].tolist() == [4, 7]


def test_update_gradient_matches_float64_autograd():
    """PolicyLoss on a packed micro-batch vs the recipe's loss written out in float64 with plain
    log_softmax on per-sequence logits: mean over response tokens of -logp_t * A_seq, T = 0.7."""
    policy = tiny_policy(1)
    prompts = [[TOK.bos_id, 5, 6, 7], [TOK.bos_id, 9, 10], [TOK.bos_id, 11]]
    responses = [
        torch.tensor([40, 41, 42, TOK.eot_id]),
        torch.tensor([43]),
        torch.tensor([44, 45, 46]),
    ]
    adv = torch.tensor([0.7, -1.3, 0.25])
    b = pack(prompts, responses)
    mask = b["targets"] != -100
    seq = torch.repeat_interleave(
        torch.arange(3), (b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).long()
    )
    coef = torch.where(mask, -adv[seq] / mask.sum(), torch.zeros(()))
    loss = PolicyLoss(policy, PolicyLossSpec(temperature=0.7))(
        b["input_ids"], b["cu_seqlens"], b["targets"], coef
    )
    loss.backward()

    ref = Llama(policy.config).double()
    ref.load_state_dict({k: v.double() for k, v in policy.state_dict().items()})
    terms = []
    for p, r, a in zip(prompts, responses, adv.double()):
        ids = torch.tensor(p + r.tolist())
        logp = F.log_softmax(ref(ids[None])[0, :-1] / 0.7, -1).gather(-1, ids[1:, None])[:, 0]
        terms.append(-logp[len(p) - 1 :] * a)
    expected = torch.cat(terms).mean()
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(policy.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=2e-4, atol=1e-6, msg=name)


# ---- runs ----------------------------------------------------------------------------------------
def test_run_with_reward_fn_module_writes_metrics_and_a_transformers_model(
    tmp_path, prompts, monkeypatch
):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent("""
        def answer_share(prompts, completions, answer, **kw):
            assert len(prompts) == len(completions) == len(answer)
            return [c.count(a) / max(len(c), 1) for c, a in zip(completions, answer)]
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config(
        tmp_path, prompts, reward_fn="my_rewards:answer_share", max_steps=2, truncation_penalty=0.0
    )
    trainer = ReinforceTrainer(cfg)
    history = trainer.fit()
    assert [h["step"] for h in history] == [1, 2]
    for h in history:
        assert all(name in h for name in STEP_METRICS), sorted(h)
        assert 1 <= h["response_len_mean"] <= 6 and 0 <= h["eos_fraction"] <= 1 and h["entropy"] > 0
        assert h["kl_mean"] >= 0 and h["generate_s"] > 0 and h["update_s"] > 0
    assert history[0]["kl_mean"] == 0.0  # the first rollout's policy is the reference
    assert history[1]["kl_mean"] > 0.0
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]

    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tmp_path / "run" / "final").eval()
    ids = torch.tensor(
        [TOK.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)]
    )
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, trainer.policy.eval()(ids), rtol=1e-4, atol=1e-4)


def test_reward_model_directory_and_weighted_sources(tmp_path, prompts):
    torch.manual_seed(3)
    rm = RewardModel(Llama(LlamaConfig.tiny(vocab_size=TOK.vocab_size)))
    rm.save_pretrained(tmp_path / "rm")
    # (an HF-layout directory without a head reads as Nemotron-Reward-HF: lm_head row 0)
    rm.export_hf(tmp_path / "rm-hf", "helpfulness")

    def first_step(name, **kw):
        return ReinforceTrainer(config(tmp_path / name, prompts, max_steps=1, **kw)).fit()[0][
            "reward_mean"
        ]

    with_rm = first_step("rm", reward_model=str(tmp_path / "rm"))
    assert with_rm != 0.0
    assert first_step(
        "rm2", reward_model=str(tmp_path / "rm"), reward_model_weight=2.0
    ) == pytest.approx(2 * with_rm)
    assert first_step("hf", reward_model=str(tmp_path / "rm-hf")) == pytest.approx(
        with_rm, rel=1e-5
    )
    only_fn = ReinforceTrainer(
        config(tmp_path / "fn", prompts, max_steps=1), reward_fn=count_a
    ).fit()[0]
    both = ReinforceTrainer(
        config(
            tmp_path / "both",
            prompts,
            max_steps=1,
            reward_model=str(tmp_path / "rm"),
            reward_fn_weight=0.5,
        ),
        reward_fn=count_a,
    ).fit()[0]
    assert both["reward_mean"] == pytest.approx(with_rm + 0.5 * only_fn["reward_mean"], rel=1e-6)


def test_resume_inside_a_rollout_is_exact(tmp_path, prompts):
    def cfg(**kw):
        return config(
            tmp_path,
            prompts,
            max_steps=4,
            updates_per_rollout=2,
            truncation_penalty=0.0,
            save_every=1,
            keep_last=10,
            **kw,
        )

    full = ReinforceTrainer(cfg(), reward_fn=count_a).fit()
    assert any(h["loss"] != 0 for h in full)
    assert [h["generate_s"] > 0 for h in full] == [True, False, True, False]
    for step in (2, 3, 4):  # interrupted after step 1, in the middle of the first rollout
        shutil.rmtree(tmp_path / "run" / "checkpoints" / f"step-{step:08d}")
    rest = ReinforceTrainer(cfg(resume="auto"), reward_fn=count_a).fit()
    assert [h["step"] for h in rest] == [2, 3, 4]
    for name in ("loss", "grad_norm", "reward_mean", "kl_mean", "advantage_std", "entropy"):
        assert [h[name] for h in rest] == [h[name] for h in full[1:]], name


def test_resume_refuses_another_k_or_policy(tmp_path, prompts):
    """The policy directory is also the frozen reference's: a resume from another one trained
    against a different reference without a word."""
    ReinforceTrainer(config(tmp_path, prompts, max_steps=1, save_every=1), reward_fn=count_a).fit()
    with pytest.raises(ValueError, match="saved by a run with --k 3, this run has 2"):
        ReinforceTrainer(
            config(tmp_path, prompts, k=2, max_steps=2, resume="auto"), reward_fn=count_a
        ).fit()
    tiny_policy(seed=1).save_pretrained(tmp_path / "pol")
    with pytest.raises(ValueError, match="saved by a run with --policy 'tiny', this run has '/"):
        ReinforceTrainer(
            config(tmp_path, prompts, policy=str(tmp_path / "pol"), max_steps=2, resume="auto"),
            reward_fn=count_a,
        ).fit()


def test_policy_logprobs_from_the_update_forward_are_bit_exact(tmp_path, prompts, monkeypatch):
    """One update per rollout: the KL's policy log-probs come from the update's forward instead
    of a no-grad forward in the rollout; every metric and weight equals the rollout path's,
    with the reference a different model so that the KL is not 0, with two micro-batches."""

    def run(name, defer):
        monkeypatch.setattr(ReinforceTrainer, "defer_policy_logprobs", defer)
        trainer = ReinforceTrainer(
            config(
                tmp_path / name, prompts, max_steps=3, grad_accum=2, beta=0.5, kl_estimator="k3"
            ),
            policy=tiny_policy(),
            reward_fn=count_a,
        )
        trainer.reference = tiny_policy(seed=1)
        calls = []
        real = trainer.policy.hidden_states
        trainer.policy.hidden_states = lambda *a, **kw: (
            calls.append(torch.is_grad_enabled()) or (real(*a, **kw))
        )
        history = trainer.fit()
        return history, trainer.policy.state_dict(), calls

    deferred, weights, calls = run("deferred", True)
    rollout, weights_ref, calls_ref = run("rollout", False)
    assert False not in calls and False in calls_ref  # no no-grad policy forward when deferred
    assert any(h["kl_mean"] != 0 for h in deferred)
    for name in (
        "loss",
        "grad_norm",
        "reward_mean",
        "kl_mean",
        "score_mean",
        "entropy",
        "advantage_mean",
        "advantage_std",
        "response_len_mean",
    ):
        assert [h[name] for h in deferred] == [h[name] for h in rollout], name
    for k, v in weights.items():
        assert torch.equal(v, weights_ref[k]), k


def test_hf_tokenizer_directory_goes_to_final(tmp_path, prompts, hf_dir):
    from transformers import AutoTokenizer

    cfg = config(tmp_path, prompts, tokenizer=str(hf_dir), max_steps=1)
    ReinforceTrainer(cfg, reward_fn=count_a).fit()
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    assert (
        tok.convert_tokens_to_ids("<|eot_id|>")
        == LlamaConfig.from_json_file(tmp_path / "run" / "final" / "config.json").eos_token_id[0]
    )


# ---- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        (
            {"reward_fn": "no_such_module_xyz:fn"},
            "--reward-fn: cannot import module 'no_such_module_xyz'",
        ),
        ({"reward_fn": "json:no_such_fn"}, "module 'json' .* has no function 'no_such_fn'"),
        ({"reward_fn": "json"}, "is not 'module:function'"),
        ({}, "no reward source"),
        ({"reward_model": "/nonexistent/rm"}, "--reward-model: /nonexistent/rm is not a directory"),
        ({"reward_fn": "json:dumps", "prompts": ""}, "--prompts: a prompts file is required"),
    ],
)
def test_bad_options_are_named(tmp_path, prompts, kw, match):
    with pytest.raises(ConfigError, match=match):
        ReinforceTrainer(config(tmp_path, kw.pop("prompts", prompts), **kw))


def test_both_a_callable_and_an_option_and_k_below_two(tmp_path, prompts):
    with pytest.raises(ConfigError, match="given both as an option and as a Python callable"):
        ReinforceTrainer(config(tmp_path, prompts, reward_fn="json:dumps"), reward_fn=count_a)
    with pytest.warns(UserWarning, match="k = 1: .*every advantage is 0"):
        ReinforceTrainer(config(tmp_path, prompts, k=1), reward_fn=count_a)
    with pytest.raises(ConfigError, match="temperature = 0.0 must be > 0"):
        config(tmp_path, prompts, temperature=0.0)
    with pytest.raises(ConfigError, match="k = 0 must be at least 1"):
        config(tmp_path, prompts, k=0)


def test_a_prompt_row_without_a_prompt_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"question": "no prompt"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'prompt': missing column"):
        ReinforceTrainer(config(tmp_path, bad), reward_fn=count_a)


def test_a_bad_reward_function_result_is_named(tmp_path, prompts):
    def short(prompts, completions, **kw):
        return [1.0]

    with pytest.raises(ValueError, match="returned 1 rewards for 6 completions"):
        ReinforceTrainer(config(tmp_path, prompts, max_steps=1), reward_fn=short).fit()


@pytest.mark.parametrize(
    "result, shown",
    [
        (lambda n: {i: 1.0 for i in range(n)}, "got dict"),  # used to train on the dict's keys
        (lambda n: "1" * n, "got str"),
        (lambda n: ["0.5"] * n, "got list"),
        (lambda n: [[1.0]] * n, "got list"),
        (lambda n: torch.ones(n, 1), "got Tensor tensor"),
    ],
)
def test_rewards_that_are_not_numbers_are_refused(tmp_path, prompts, result, shown):
    def fn(prompts, completions, **kw):
        return result(len(completions))

    with pytest.raises(ValueError, match=f"must return a list .* of numbers.*; {shown}") as err:
        ReinforceTrainer(config(tmp_path, prompts, max_steps=1), reward_fn=fn).fit()
    assert "\n" not in str(err.value)


def test_rewards_as_arrays_tensors_and_bools_are_taken():
    import numpy as np

    from nemokern.trainers.rollout import call_reward_fn

    for out in (np.array([1, 0.5]), torch.tensor([1.0, 0.5]), [True, 0.5], (np.float32(1), 0.5)):
        got = call_reward_fn(lambda prompts, completions, out=out: out, ["p", "q"], ["a", "b"], {})
        assert got.tolist() == [1.0, 0.5]


def test_an_exception_in_the_reward_function_names_it(tmp_path, prompts):
    """Not a ValueError (the CLI would print it as an option mistake): the function's own
    exception is chained, so its traceback shows where it failed."""
    from nemokern.trainers.rollout import RewardFunctionError

    def buggy(prompts, completions, **kw):
        raise ValueError("my own bug")

    with pytest.raises(RewardFunctionError, match="function .*buggy raised ValueError: my own bug"):
        ReinforceTrainer(config(tmp_path, prompts, max_steps=1), reward_fn=buggy).fit()


def test_reward_function_signature_and_column_names_are_checked_first(tmp_path, prompts):
    def no_kwargs(prompts, completions):
        return [0.0] * len(completions)

    with pytest.raises(ConfigError, match=r"--reward-fn: .*no_kwargs.* answer=\.\.\.\) .*kwargs"):
        ReinforceTrainer(config(tmp_path, prompts), reward_fn=no_kwargs)
    ReinforceTrainer(config(tmp_path, prompts), reward_fn=lambda prompts, completions, answer: [])
    clash = tmp_path / "clash.jsonl"
    clash.write_text('{"prompt": "Say a.", "completions": "x"}\n')
    with pytest.raises(ValueError, match="clash.jsonl: column 'completions' would be passed"):
        ReinforceTrainer(config(tmp_path, clash), reward_fn=count_a)


def test_a_prompt_too_long_for_the_policy_is_refused_before_any_step(tmp_path, prompts):
    """Found at generation time it stopped the run after the steps before it, unsaved."""
    long = tmp_path / "long.jsonl"
    long.write_text('{"prompt": "short"}\n' + json.dumps({"prompt": "x" * 700}) + "\n")
    with pytest.raises(DataError, match=r"long.jsonl:2: field 'prompt': \d+ tokens plus") as e:
        ReinforceTrainer(config(tmp_path, long), reward_fn=count_a)
    assert (e.value.field, e.value.hint) == ("prompt", None)
    with pytest.raises(ValueError, match=r"--max-new-tokens 500 exceed the policy's .*at most \d+"):
        ReinforceTrainer(config(tmp_path, prompts, max_new_tokens=500), reward_fn=count_a)


@pytest.mark.slow
def test_tiny_policy_learns_to_say_a_with_bounded_kl(tmp_path, prompts):
    cfg = config(
        tmp_path,
        prompts,
        max_new_tokens=8,
        prompts_per_step=4,
        k=8,
        lr=3e-3,
        min_lr=3e-4,
        max_steps=40,
        truncation_penalty=0.0,
        beta=0.01,
    )
    history = ReinforceTrainer(cfg, reward_fn=count_a).fit()
    first = sum(h["reward_mean"] for h in history[:5]) / 5
    last = sum(h["reward_mean"] for h in history[-5:]) / 5
    assert last > first + 0.2, (first, last)
    assert max(h["kl_mean"] for h in history) < 5.0


def test_bf16_frozen_reference_and_reward_model(tmp_path, prompts):
    """frozen_dtype bfloat16: the reference and the reward model are held in bf16 (half their
    memory); the run's rewards and KL stay close to the fp32 run's on the same samples."""
    torch.manual_seed(0)
    RewardModel(tiny_policy(2)).save_pretrained(tmp_path / "rm")

    def run(dtype):
        trainer = ReinforceTrainer(
            config(
                tmp_path / dtype,
                prompts,
                reward_model=str(tmp_path / "rm"),
                frozen_dtype=dtype,
                max_steps=2,
                lr=1e-6,
            ),
            policy=tiny_policy(),
        )
        history = trainer.fit()
        return trainer, history

    bf16, h16 = run("bfloat16")
    fp32, h32 = run("float32")
    for module in (bf16.reference, bf16.reward_model):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp32.reference.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.policy.parameters()} == {torch.float32}
    for a, b in zip(h16, h32):
        assert a["response_len_mean"] == b["response_len_mean"]  # the same samples
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=0.01)
        assert a["kl_mean"] == pytest.approx(b["kl_mean"], abs=0.005)


@pytest.fixture
def never_ends(monkeypatch):
    """generate() with no EOS token: no sample ever ends (as a base policy with a small
    max_new_tokens)."""
    import nemokern.trainers.reinforce as reinforce

    real = reinforce.generate
    monkeypatch.setattr(
        reinforce, "generate", lambda *a, **kw: real(*a, **{**kw, "eos_token_id": []})
    )


def test_steps_where_no_sample_ends_warn_then_stop(tmp_path, prompts, never_ends):
    """Every advantage is 0 when no sample ends with EOS (loss 0, grad norm 0: the run used to
    go on and exit 0). The first such step warns with the numbers; one more than
    allow_no_eos_steps in a row stops the run; -1 allows any number; with truncation_penalty
    truncated samples count, so the run learns and goes on."""
    with pytest.warns(
        UserWarning,
        match=r"step 1: 0 of 6 samples ended with EOS.*"
        r"raise --max-new-tokens \(now 6\), or set --truncation-penalty",
    ):
        with pytest.raises(
            ValueError,
            match=r"step 3: no sample has ended with EOS for 3 steps "
            r"in a row \(0 of 6 in this one\).*--allow-no-eos-steps N",
        ) as err:
            ReinforceTrainer(
                config(tmp_path / "a", prompts, max_steps=5, allow_no_eos_steps=2),
                reward_fn=count_a,
            ).fit()
    assert "\n" not in str(err.value)
    for kw in ({"allow_no_eos_steps": -1}, {"truncation_penalty": 1.0, "allow_no_eos_steps": 0}):
        history = ReinforceTrainer(
            config(tmp_path / str(len(kw)), prompts, max_steps=3, **kw), reward_fn=count_a
        ).fit()
        assert [h["eos_fraction"] for h in history] == [0.0] * 3
    with pytest.raises(ConfigError, match="allow_no_eos_steps = -2 must be >= 0, or -1"):
        config(tmp_path, prompts, allow_no_eos_steps=-2)


def test_a_reward_that_overflows_the_gradient_is_named_by_its_size(tmp_path, prompts):
    from nemokern.engine.loop import NonFiniteError

    def huge(prompts, completions, **kw):
        return [1e30 * (i % 2) for i in range(len(completions))]

    cfg = config(tmp_path, prompts, max_steps=1, truncation_penalty=0.0)
    with pytest.raises(
        NonFiniteError,
        match=r"non-finite gradient .*root-mean-square of 7.07e\+29 "
        r"\(too large for a float32 gradient: scale the reward",
    ):
        ReinforceTrainer(cfg, reward_fn=huge).fit()
