"""The shared training loop: exact resume, the non-finite guard, accumulation, the schedule, DDP."""

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from train_tiny import TinyReward, batches, config, step_fn

from helpers import launch_script
from nemokern.engine.checkpoint import Checkpointer
from nemokern.engine.loop import NonFiniteError, TrainLoop, move_to
from nemokern.engine.metrics import read_metrics
from nemokern.engine.optimizer import lr_factor
from nemokern.errors import ConfigError


@pytest.fixture(autouse=True)
def one_thread():
    # These models are tiny: on a shared 2-core machine extra intra-op threads only contend.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _Crash(Exception):
    pass


def noisy_step(model, batch):
    """step_fn whose loss scale draws from every generator a checkpoint restores."""
    out = step_fn(model, batch)
    jitter = 1e-2 * (torch.rand(()).item() + random.random() + float(np.random.rand()))
    return dataclasses.replace(out, loss=out.loss * (1 + jitter))


def test_interrupted_and_resumed_run_gives_bit_identical_losses(tmp_path):
    data = batches(10)  # 5 steps per epoch at grad_accum 2; 2 epochs: 10 steps, cosine with warmup
    full_model = TinyReward(seed=0)
    full = TrainLoop(config(tmp_path / "full"), full_model, data, noisy_step).fit()
    assert len(full) == 10

    calls = []

    def crashing_step(model, batch):
        calls.append(1)
        if (
            len(calls) == 2 * 5 + 1
        ):  # in step 6: after the checkpoint of step 4, mid-way through step 6
            raise _Crash()
        return noisy_step(model, batch)

    out = tmp_path / "interrupted"
    with pytest.raises(_Crash):
        TrainLoop(config(out, save_every=4), TinyReward(seed=0), data, crashing_step).fit()
    assert [s for s, _ in Checkpointer(out).complete()] == [4]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]

    resumed_model = TinyReward(seed=123)  # other weights: everything must come from the checkpoint
    resumed = TrainLoop(
        config(out, save_every=4, resume="auto"), resumed_model, data, noisy_step
    ).fit()
    assert [r["step"] for r in resumed] == list(range(5, 11))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[4:]]  # bit for bit
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in full[4:]]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in full[4:]]
    logged = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in logged] == list(range(1, 11))  # step 5 of the crashed run replaced
    assert [r["loss"] for r in logged] == [r["loss"] for r in full]
    a, b = _params(full_model), _params(resumed_model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [s for s, _ in Checkpointer(out).complete()] == [8, 10]  # keep_last=2


def test_resume_refuses_other_batching(tmp_path):
    TrainLoop(config(tmp_path, max_steps=1), TinyReward(), batches(10), step_fn).fit()
    with pytest.raises(ValueError, match="micro_batches_per_step=2, this run has 4.*grad_accum"):
        TrainLoop(
            config(tmp_path, grad_accum=4, resume="auto"), TinyReward(), batches(10), step_fn
        ).fit()


def test_eval_every_without_an_evaluation_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--eval-every: 2 given, but this run has nothing"):
        TrainLoop(config(tmp_path, eval_every=2), TinyReward(), batches(4), step_fn)


def test_resume_refuses_other_data_of_the_same_shape(tmp_path):
    """Same count, batching, shuffle and seed, other rows: not the run that was saved."""
    TrainLoop(config(tmp_path, max_steps=1), TinyReward(), batches(10), step_fn).fit()
    with pytest.raises(ValueError, match="saved by a run with other training data"):
        TrainLoop(
            config(tmp_path, max_steps=2, resume="auto"), TinyReward(), batches(10, 7), step_fn
        ).fit()
    # the same data, rebuilt: resumes
    TrainLoop(
        config(tmp_path, max_steps=2, resume="auto"), TinyReward(), batches(10), step_fn
    ).fit()


@pytest.mark.parametrize(
    "kw, still",
    [
        (dict(lr=0.0, schedule="constant"), True),
        (dict(max_steps=1, warmup_steps=5, warmup_formula="s/w"), True),  # step 0 at 0/5
        (dict(max_steps=2, warmup_steps=5, warmup_formula="s/w"), False),  # step 1 moves
        (dict(max_steps=1, warmup_steps=5), False),  # (s+1)/w: the first step moves
    ],
)
def test_a_run_whose_every_step_has_lr_0_says_so(tmp_path, kw, still):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop = TrainLoop(config(tmp_path, **kw), TinyReward(), batches(8), step_fn)
    said = [str(w.message) for w in caught if "learns nothing" in str(w.message)]
    assert len(said) == still, said
    if still:
        assert "optimizer step(s) has lr 0 (--lr" in said[0]
        before = [p.clone() for p in loop.model.parameters()]
        loop.fit()
        assert all(torch.equal(a, b) for a, b in zip(before, loop.model.parameters()))


def test_losses_are_weighted_means_over_the_global_batch(tmp_path):
    data = batches(4)
    loop = TrainLoop(
        config(tmp_path, grad_accum=4, epochs=1, shuffle=False, lr=0.0, schedule="constant"),
        TinyReward(),
        data,
        step_fn,
    )
    model = TinyReward()  # same seed: the same weights as the loop's model before its step
    sq, n = 0.0, 0
    with torch.no_grad():
        for b in data:
            mask = b["labels"] != -100
            sq += ((model(b["ids"]) - b["labels"])[mask] ** 2).double().sum().item()
            n += int(mask.sum())
    history = loop.fit()
    assert history[0]["loss"] == pytest.approx(sq / n, rel=1e-6) and history[0]["weight"] == n
    assert history[0]["tokens"] == sum(b["ids"].numel() for b in data)


def test_schedule_warmup_then_cosine_to_min_lr(tmp_path):
    kw = dict(total_steps=10, warmup_steps=2, lr=1.0, min_lr=0.1)
    assert (
        lr_factor(0, schedule="cosine", **kw) == 0.5
        and lr_factor(1, schedule="cosine", **kw) == 1.0
    )
    assert lr_factor(2, schedule="cosine", **kw) == 1.0
    assert lr_factor(10, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(6, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_factor(7, schedule="constant", **kw) == 1.0
    history = TrainLoop(config(tmp_path), TinyReward(), batches(10), step_fn).fit()
    expected = [
        1e-2 * lr_factor(s, total_steps=10, warmup_steps=2, schedule="cosine", lr=1e-2, min_lr=1e-3)
        for s in range(10)
    ]
    assert [r["lr"] for r in history] == pytest.approx(expected, rel=1e-12)


def test_non_finite_loss_stops_naming_step_and_rows_and_keeps_last_good_state(tmp_path):
    data = batches(10, poison=5)  # micro-batch 5 is in step 3 without shuffling (2 per step)
    model = TinyReward()
    loop = TrainLoop(config(tmp_path, shuffle=False), model, data, step_fn)
    with pytest.raises(NonFiniteError, match=r"loss at step 3 .*\[500, 501") as err:
        loop.fit()
    assert "step-00000002" in str(err.value)
    ckpt = Checkpointer(tmp_path).latest()
    assert ckpt.name == "step-00000002"
    again = TinyReward(seed=9)
    state = Checkpointer(tmp_path).load(ckpt, model=again)
    assert state["step"] == 2 and all(torch.isfinite(p).all() for p in again.parameters())
    assert all(
        torch.equal(p, q) for p, q in zip(again.parameters(), model.parameters())
    )  # no update applied


@pytest.mark.parametrize("save_every", [0, 1])
def test_diverged_weights_are_not_kept_as_the_last_good_state(tmp_path, save_every):
    """Weights that are already non-finite when a loss turns non-finite (an update diverged) are
    not checkpointed as 'the last good state': the message names the newest checkpoint, or
    says there is none."""
    calls = []

    def diverging(model, batch):
        calls.append(1)
        if len(calls) == 2 * 2 + 1:  # step 3's first micro-batch (2 per step)
            with torch.no_grad():
                model.head.bias.fill_(float("inf"))
        return step_fn(model, batch)

    loop = TrainLoop(
        config(tmp_path, shuffle=False, save_every=save_every), TinyReward(), batches(10), diverging
    )
    expect = "resume from .*step-00000002" if save_every else r"start again \(no earlier"
    with pytest.raises(NonFiniteError, match="weights themselves are non-finite.*" + expect):
        loop.fit()
    latest = Checkpointer(tmp_path).latest()
    assert (latest.name == "step-00000002") if save_every else latest is None


def test_non_finite_gradient_stops_the_run(tmp_path):
    model = TinyReward()
    model.head.bias.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteError, match=r"gradient \(norm (inf|nan)\) at step 1 "):
        TrainLoop(config(tmp_path), model, batches(10), step_fn).fit()
    assert Checkpointer(tmp_path).latest().name == "step-00000000"


def test_eval_hook_and_metrics_file(tmp_path):
    seen = []

    def evaluate(model):
        seen.append(model.training)
        return {"accuracy": 0.5}

    history = TrainLoop(
        config(tmp_path, epochs=1, eval_every=2),
        TinyReward(),
        batches(10),
        step_fn,
        evaluate=evaluate,
    ).fit()
    assert [("eval_accuracy" in r) for r in history] == [False, True, False, True, True]
    assert seen == [False, False, False]
    record = read_metrics(tmp_path / "metrics.jsonl")[0]
    for key in (
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "tokens_per_s",
        "step_s",
        "peak_mem_mb",
        "reward_mean",
    ):
        assert key in record
    assert (tmp_path / "config.toml").is_file()


def test_too_little_data_for_one_step(tmp_path):
    with pytest.raises(ConfigError, match="grad_accum=4"):
        TrainLoop(config(tmp_path, grad_accum=4), TinyReward(), batches(3), step_fn)


def test_a_model_with_nothing_to_train_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no parameter with requires_grad=True"):
        TrainLoop(config(tmp_path), TinyReward().requires_grad_(False), batches(4), step_fn)


def test_ddp_two_processes_match_one_on_the_same_global_batch(tmp_path):
    launch_script(Path(__file__).with_name("train_tiny.py"), 2, tmp_path / "ddp", 1, timeout=120)
    two = json.loads((tmp_path / "ddp" / "losses.json").read_text())
    one = TrainLoop(
        config(tmp_path / "one", grad_accum=2), TinyReward(tie=True), batches(12), step_fn
    ).fit()
    assert len(two) == len(one) == 12
    assert two == pytest.approx([r["loss"] for r in one], rel=1e-5)


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    plain = TrainLoop(config(tmp_path / "a", max_steps=3), TinyReward(), batches(10), step_fn)
    recomputed = TrainLoop(
        config(tmp_path / "b", max_steps=3, activation_checkpointing=True),
        TinyReward(),
        batches(10),
        step_fn,
    )
    assert (
        recomputed.model.trunk.activation_checkpointing
        and not plain.model.trunk.activation_checkpointing
    )
    assert [r["loss"] for r in plain.fit()] == [r["loss"] for r in recomputed.fit()]


def test_a_step_with_nothing_counted_changes_nothing(tmp_path):
    data = batches(4)
    for b in data:
        b["labels"][:] = -100
    model = TinyReward()
    before = _params(model)
    history = TrainLoop(config(tmp_path, grad_accum=4, epochs=1), model, data, step_fn).fit()
    assert history[0]["weight"] == 0 and history[0]["loss"] == 0
    assert all(torch.equal(v, _params(model)[k]) for k, v in before.items())


def test_export_writes_an_hf_trunk_and_the_head(tmp_path):
    loop = TrainLoop(config(tmp_path, max_steps=1), TinyReward(), batches(10), step_fn)
    loop.fit()
    final = loop.export()
    from nemokern.engine.checkpoint import load_modules
    from nemokern.model import Llama

    Llama.from_pretrained(final / "trunk")
    again = TinyReward(seed=5)
    load_modules(again, final)
    assert torch.equal(again.head.weight, loop.model.head.weight)


class CountingLoop(TrainLoop):
    """A loop that makes its own batches and must carry state across a resume."""

    made = 0

    def micro_batches(self, step):
        self.made += 1
        return super().micro_batches(step)

    def extra_state(self):
        return {"made": self.made, "tensor": torch.arange(3)}

    def load_extra_state(self, state):
        assert torch.equal(state["tensor"], torch.arange(3))
        self.made = state["made"]


def test_subclass_state_survives_a_resume(tmp_path):
    def crash_in_step_4(model, batch):
        if loop.made == 4:
            raise _Crash()
        return step_fn(model, batch)

    loop = CountingLoop(
        config(tmp_path, epochs=1, save_every=2), TinyReward(), batches(10), crash_in_step_4
    )
    with pytest.raises(_Crash):
        loop.fit()
    resumed = CountingLoop(
        config(tmp_path, epochs=1, resume="auto"), TinyReward(), batches(10), step_fn
    )
    assert [r["step"] for r in resumed.fit()] == [3, 4, 5] and resumed.made == 2 + 3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_resume_from_a_named_checkpoint_into_another_run(tmp_path, device):
    data = batches(10)
    full_loop = TrainLoop(
        config(tmp_path / "full", device=device, save_every=4), TinyReward(), data, noisy_step
    )
    if device == "cuda":
        assert full_loop.optimizer.defaults["fused"] and full_loop.autocast() is not None
    full = full_loop.fit()
    step8 = tmp_path / "full" / "checkpoints" / "step-00000008"
    rest = TrainLoop(
        config(tmp_path / "rest", device=device, save_every=4, resume=str(step8)),
        TinyReward(seed=3),
        data,
        noisy_step,
    ).fit()
    assert [r["step"] for r in rest] == [9, 10]
    if device == "cpu":
        assert [r["loss"] for r in rest] == [r["loss"] for r in full[8:]]
    else:  # bf16 autocast; CUDA reductions need not be bit-reproducible
        assert [r["loss"] for r in rest] == pytest.approx([r["loss"] for r in full[8:]], rel=1e-2)
        assert full[-1]["peak_mem_mb"] > 0


def test_move_to_reaches_every_tensor():
    from typing import NamedTuple

    class Pair(NamedTuple):
        a: torch.Tensor
        b: list

    @dataclasses.dataclass
    class Packed:
        ids: torch.Tensor
        meta: dict
        name: str = "x"

    batch = {
        "p": Pair(torch.ones(1), [torch.zeros(2), 3]),
        "d": Packed(torch.ones(2), {"t": (torch.ones(1),)}),
    }
    moved = move_to(batch, torch.device("meta"))
    assert moved["p"].a.is_meta and moved["p"].b[0].is_meta and moved["p"].b[1] == 3
    assert isinstance(moved["p"], Pair) and isinstance(moved["d"], Packed)
    assert moved["d"].ids.is_meta and moved["d"].meta["t"][0].is_meta and moved["d"].name == "x"
