"""Benchmark: one reward-model training step (forward, Bradley-Terry loss, backward, AdamW step) on
the CPU, nemokern against the plain transformers way and against TRL's RewardTrainer.

    PYTHONPATH=$PWD python -m pytest bench/test_bench_reward_train.py --benchmark-enable \
        --benchmark-json=bench/results/<date>-<machine>-reward-train.json

All three train the SAME Llama-3.1-shaped model (hidden 256, 4 layers, 8 query / 2 KV heads, FFN
704, vocabulary 512, untied; fp32) from the SAME weights on the SAME 16 pairs per step
(nemokern.data.synthetic, hs2-preference layout, no ties), loss -log sigmoid(r_chosen - r_rejected)
averaged over the 16 pairs, AdamW at lr 1e-5, no gradient clipping:

  nemokern  RewardModel on the packed batch of load_reward_data (no padding computed;
            per-segment SDPA on the CPU): by default each pair's common prefix (the prompt) is
            packed once and its two responses continue it; test_nemokern[whole-pairs] packs the
            32 sequences whole, back to back (data.shared_prefix = False); the fused reward_head
            (final norm and head on the 32 last tokens only), nemokern.trainers.reward.reward_loss
            ("bt"), the AdamW of nemokern.engine.optimizer.build_optimizer (fused where available).
  plain     transformers LlamaForSequenceClassification(num_labels=1, pad_token_id set) on the
            same 32 sequences right-padded to the longest ([32, T], chosen first, then rejected),
            attn_implementation "eager" (and "sdpa"), score on every position, the reward read at
            the last non-pad token; torch.optim.AdamW (its default foreach implementation).
  trl       trl.RewardTrainer (not a nemokern dependency: skipped when `import trl` fails) on the
            same model class and weights (transformers' default attention, sdpa), given the pairs
            as conversations and tokenizing them itself; per_device_train_batch_size 16 over a
            16-pair dataset, so every optimizer step sees the same 16 pairs (reshuffled). fp32
            (bf16=False: TRL's bf16 default would change the arithmetic, not only the speed);
            max_grad_norm 0 (the others do not clip); logging, saving and evaluation off.
            Once with TRL's default gradient_checkpointing=True, once without.

Tokenizer: nemokern's built-in byte tokenizer (UTF-8 bytes 0..255, the six Llama-3.1 special
tokens 256..261) for nemokern and plain; for TRL an HF PreTrainedTokenizerFast built offline with
the same ids (byte-level vocabulary in byte order, the same special tokens) and a Llama-3.1 chat
template. The benchmark asserts that TRL's token ids equal nemokern's, row by row, and that the
nemokern and plain models give the same loss at the start.

Timing: nemokern and plain through bench/common.run_benchmark (one step per round, after a
warm-up step that also creates the AdamW state). TRL: one train() of TRL_WARMUP_STEPS (creating its
optimizer and AdamW state), then a measured train() of TRL_STEPS steps whose per-step times come
from a TrainerCallback (on_step_begin to on_step_end: training_step, optimizer, scheduler,
zero_grad; the data loading and collation between steps is outside, as batch building is outside
for the others); the first TRL_SKIP are dropped, the rest are the benchmark's rounds.
Group "..., interleaved": the same five, one step of each in turn, ROUNDS times (TRL: a train() of
one step each time, timed by the callback), so that a shared machine's changing load weighs on all
alike; time only (the peak memory is the first group's).
Peak extra memory: bench/common.peak_extra_bytes around one step (nemokern, plain) or around the
whole measured train() (TRL; the AdamW state already exists then, as for the others).
extra_info: pairs (per step), tokens (real tokens per step), padded_tokens (what the padded
implementations compute), peak_extra_bytes, device.
"""

import time

import pytest
import torch
import torch.nn.functional as F
from common import REWARD_MODEL as MODEL

# The timing helpers and the TRL pieces (offline HF byte tokenizer, chat template, step-time
# callback), shared with the RLOO benchmark: bench/common.py.
from common import (
    TRL_WARMUP_STEPS,
    device_name,
    hf_byte_tokenizer,
    run_benchmark,
    time_trl_steps,
    trl_callbacks,
    use_times,
)

from nemokern.data import load_reward_data
from nemokern.data.synthetic import write_synthetic
from nemokern.data.tokenizer import ByteTokenizer
from nemokern.engine.optimizer import build_optimizer
from nemokern.model import Llama, LlamaConfig, RewardModel
from nemokern.model.reward import HELPFULNESS
from nemokern.trainers.reward import RewardConfig, reward_loss

PAIRS = 16
LR = 1e-5
ROUNDS = 10
GROUP = (
    f"reward train step (CPU, {PAIRS} pairs, H={MODEL['hidden_size']} "
    f"L={MODEL['num_hidden_layers']} fp32)"
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The pairs (nemokern's packed batch, the rows as conversations), the weights on disk."""
    tmp = tmp_path_factory.mktemp("reward_train")
    path = write_synthetic(tmp / "pairs.jsonl", PAIRS, "hs2-preference", seed=0)
    data = load_reward_data(path, ByteTokenizer())
    batch = data.batch(list(range(PAIRS)))  # each pair's common prefix packed once (the default)
    data.shared_prefix = False
    whole = data.batch(list(range(PAIRS)))  # both conversations of each pair whole
    data.shared_prefix = True
    torch.manual_seed(0)
    model = RewardModel(Llama(LlamaConfig.tiny(**MODEL)))
    data.check_vocab(model.trunk.config.vocab_size)
    model.save_pretrained(tmp / "model")  # HF Llama directory + reward_head.safetensors
    pairs = data.read.examples
    return {
        "dir": tmp / "model",
        "batch": batch,
        "whole": whole,
        "data": data,
        "pairs": pairs,
        "tmp": tmp,
    }


def _info(setup):
    sequences = [s for e in setup["data"].examples for s in e.sequences]
    longest = max(len(s) for s in sequences)
    return {
        "pairs": PAIRS,
        "tokens": sum(len(s) for s in sequences),
        "padded_tokens": len(sequences) * longest,
        "dtype": "float32",
    }


def _padded(setup):
    """input_ids, attention_mask [2P, T]: the P chosen sequences, then the P rejected,
    right-padded."""
    examples = setup["data"].examples
    seqs = [e.sequences[0] for e in examples] + [e.sequences[1] for e in examples]
    t = max(len(s) for s in seqs)
    pad = ByteTokenizer().pad_id
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.from_numpy(s).long()
        mask[i, : len(s)] = 1
    return ids, mask


def _hf_model(setup, attn):
    """LlamaForSequenceClassification with the trunk's weights and the helpfulness row of the head
    (the head's bias is 0 and cancels in r_chosen - r_rejected anyway)."""
    from transformers import LlamaForSequenceClassification
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # lm_head.weight unused, score.weight new: both expected
    try:
        model = LlamaForSequenceClassification.from_pretrained(
            setup["dir"],
            num_labels=1,
            pad_token_id=ByteTokenizer().pad_id,
            dtype=torch.float32,
            attn_implementation=attn,
        )
    finally:
        logging.set_verbosity(verbosity)
    nemokern = RewardModel.from_pretrained(setup["dir"], dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.copy_(nemokern.head.weight[HELPFULNESS : HELPFULNESS + 1])
    return model.train()


def _nemokern_model(setup):
    model = RewardModel.from_pretrained(setup["dir"], dtype=torch.float32).train()
    model.trunk.lm_head.weight.requires_grad_(
        False
    )  # as RewardTrainer does: never reaches a reward
    return model


def _nemokern_loss(model, b):
    rewards = model(
        b.input_ids,
        b.last_index,
        cu_seqlens=b.cu_seqlens,
        parents=b.parents,
        position_ids=b.position_ids,
    )
    return reward_loss("bt", rewards, b)[0].loss


def _plain_loss(model, ids, mask):
    r_chosen, r_rejected = (
        model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, 0].chunk(2)
    )
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def test_same_start(setup):
    """Same weights, same pairs: nemokern's packed loss (shared prefixes, and whole pairs) equals
    the padded transformers loss."""
    with torch.no_grad():
        b = _plain_loss(_hf_model(setup, "eager"), *_padded(setup))
        for batch in (setup["batch"], setup["whole"]):
            a = _nemokern_loss(_nemokern_model(setup), batch)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert setup["batch"].num_tokens < setup["whole"].num_tokens


def _optimizer_step(loss_fn, opt):
    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _nemokern_step(setup, batch="batch"):
    model, b = _nemokern_model(setup), setup[batch]
    opt = build_optimizer(model, RewardConfig(lr=LR, weight_decay=0.0, grad_clip=0.0))
    return _optimizer_step(lambda: _nemokern_loss(model, b), opt), bool(opt.defaults.get("fused"))


def _plain_step(setup, attn):
    model = _hf_model(setup, attn)
    ids, mask = _padded(setup)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    return _optimizer_step(lambda: _plain_loss(model, ids, mask), opt)


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("packing", ["shared-prompt", "whole-pairs"])
def test_nemokern(benchmark, setup, packing):
    step, fused = _nemokern_step(setup, "batch" if packing == "shared-prompt" else "whole")
    batch = setup["batch" if packing == "shared-prompt" else "whole"]
    run_benchmark(
        benchmark,
        step,
        "cpu",
        ROUNDS,
        fused_adamw=fused,
        packed_tokens=batch.num_tokens,
        **_info(setup),
    )


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_plain(benchmark, setup, attn):
    run_benchmark(benchmark, _plain_step(setup, attn), "cpu", ROUNDS, attn=attn, **_info(setup))


# ---------------------------------------------------------------- TRL


def _trl_trainer(setup, checkpointing, steps):
    """(trl module, a RewardTrainer over the 16 pairs as conversations, its StepTimes); checks
    that TRL's token ids are nemokern's."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tokenizer = hf_byte_tokenizer(setup["tmp"] / "hf_tokenizer")
    rows = [
        {"prompt": list(p.prompt), "chosen": list(p.chosen), "rejected": list(p.rejected)}
        for p in setup["pairs"]
    ]
    timer = trl_callbacks()[0]()
    args = trl.RewardConfig(
        output_dir=str(setup["tmp"] / "trl"),
        per_device_train_batch_size=PAIRS,
        max_steps=steps,
        learning_rate=LR,
        weight_decay=0.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        bf16=False,
        gradient_checkpointing=checkpointing,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        max_length=None,
        seed=0,
    )
    trainer = trl.RewardTrainer(
        model=_hf_model(setup, "sdpa"),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    for row, ex in zip(trainer.train_dataset, setup["data"].examples):
        assert row["chosen_ids"] == ex.sequences[0].tolist()
        assert row["rejected_ids"] == ex.sequences[1].tolist()
    return trl, trainer, timer


CKPT = pytest.mark.parametrize("checkpointing", [True, False], ids=["grad-ckpt", "no-ckpt"])


@pytest.mark.benchmark(group=GROUP)
@CKPT
def test_trl(benchmark, setup, checkpointing):
    trl, trainer, timer = _trl_trainer(setup, checkpointing, TRL_WARMUP_STEPS)
    peak, train_seconds = time_trl_steps(benchmark, trainer, timer)
    benchmark.extra_info.update(
        peak_extra_bytes=peak,
        device=device_name("cpu"),
        train_seconds=train_seconds,
        gradient_checkpointing=checkpointing,
        attn=trainer.model.config._attn_implementation,
        trl=trl.__version__,
        **_info(setup),
    )


# ---------------------------------------------------------------- all of them in turn

IMPLS = [
    "nemokern",
    "nemokern[whole-pairs]",
    "plain[eager]",
    "plain[sdpa]",
    "trl[grad-ckpt]",
    "trl[no-ckpt]",
]


@pytest.fixture(scope="module")
def interleaved(setup):
    """Seconds per step of every implementation, one step of each in turn, ROUNDS times, so that
    the load of a shared machine weighs on all of them alike (the groups above run one after the
    other and may each meet another load). TRL: train() of one step each time, timed by the
    callback as above."""
    steps = {
        "nemokern": _nemokern_step(setup)[0],
        "nemokern[whole-pairs]": _nemokern_step(setup, "whole")[0],
        "plain[eager]": _plain_step(setup, "eager"),
        "plain[sdpa]": _plain_step(setup, "sdpa"),
    }
    try:
        import trl  # noqa: F401
    except ImportError:
        pass
    else:
        for checkpointing, name in ((True, "trl[grad-ckpt]"), (False, "trl[no-ckpt]")):
            _, trainer, timer = _trl_trainer(setup, checkpointing, 1)

            def trl_step(trainer=trainer, timer=timer):
                trainer.train()
                return timer.times[-1]

            steps[name] = trl_step
    times = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up, AdamW state
    for _ in range(ROUNDS):
        for name, step in steps.items():
            if name.startswith("trl"):
                times[name].append(step())
            else:
                t = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t)
    return times


@pytest.mark.benchmark(group=GROUP + ", interleaved")
@pytest.mark.parametrize("impl", IMPLS)
def test_interleaved(benchmark, interleaved, setup, impl):
    if impl not in interleaved:
        pytest.skip("trl is not installed")
    benchmark.pedantic(lambda: None, rounds=1)
    use_times(benchmark, interleaved[impl])
    benchmark.extra_info.update(device=device_name("cpu"), **_info(setup))
