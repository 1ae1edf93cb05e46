"""Stopping on SIGTERM / SIGINT (engine/stop.py): the step in progress finishes, a checkpoint of it
is written, TrainingStopped names it, and --resume auto continues exactly; every process stops at
the same step. (The command's exit status: tests/test_cli_train.py.)"""

import json
import os
import signal

import pytest
import torch
from train_tiny import TinyReward, batches, config, step_fn

from helpers import join_gloo, run_ranks
from nemokern.engine.loop import TrainLoop
from nemokern.engine.stop import TrainingStopped


def _signalling(at_step: int, signum=signal.SIGTERM, times: int = 1, rank=None, per_step=2):
    """step_fn that, in the first micro-batch of step `at_step` (1-based; `per_step` micro-batches
    a step on each process), sends `signum` to its own process `times` times (only on process
    `rank` when given)."""
    calls = []

    def fn(model, batch):
        calls.append(1)
        mine = rank is None or torch.distributed.get_rank() == rank
        if len(calls) == (at_step - 1) * per_step + 1 and mine:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return step_fn(model, batch)

    return fn


def _loop(out, fn, **kw):
    return TrainLoop(config(out, grad_accum=2, **kw), TinyReward(), batches(12), fn)


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(tmp_path):
    straight = _loop(tmp_path / "straight", step_fn)
    expected = straight.fit()
    before = signal.getsignal(signal.SIGTERM)
    loop = _loop(tmp_path / "run", _signalling(3))
    with pytest.raises(TrainingStopped, match=r"stopped by SIGTERM after step 3 of 12; .*step-0+3"):
        loop.fit()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is fit's only
    assert loop.last_saved == 3 and [h["step"] for h in loop.history] == [1, 2, 3]
    resumed = _loop(tmp_path / "run", step_fn, resume="auto")
    rest = resumed.fit()
    assert [h["step"] for h in rest] == list(range(4, 13))
    for ours, ref in zip(loop.history + rest, expected):
        assert ours["loss"] == ref["loss"] and ours["grad_norm"] == ref["grad_norm"]
    for (name, ours), ref in zip(
        resumed.model.state_dict().items(), straight.model.state_dict().values()
    ):
        assert torch.equal(ours, ref), name


@pytest.fixture
def sigint_default():
    """SIGINT as in an interactive process (a background job of a shell starts with it ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_sigint_twice_interrupts_at_once(tmp_path, sigint_default):
    loop = _loop(tmp_path, _signalling(2, signal.SIGINT, times=2))
    with pytest.raises(KeyboardInterrupt):
        loop.fit()
    assert loop.step == 1  # inside step 2: not finished, not saved
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_signal_stays_ignored(tmp_path):
    """A run started ignoring SIGINT (nohup-like) is not stopped by one, and leaves it ignored."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        loop = _loop(tmp_path, _signalling(2, signal.SIGINT, times=2))
        try:
            history = loop.fit()
        except (KeyboardInterrupt, TrainingStopped) as e:  # not pytest's own Ctrl-C
            pytest.fail(f"an ignored SIGINT stopped the run: {e!r}")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert [h["step"] for h in history] == list(range(1, 13))


def _two_process_worker(rank, world, init_file, root):
    os.environ["WORLD_SIZE"] = str(world)
    join_gloo(rank, world, init_file)
    loop = TrainLoop(
        config(root, grad_accum=1), TinyReward(), batches(12), _signalling(2, rank=1, per_step=1)
    )
    try:
        loop.fit()
    except TrainingStopped as e:
        with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
            json.dump({"step": loop.step, "signum": e.signum, "message": str(e)}, f)


def test_every_process_stops_at_the_same_step_when_one_is_signalled(tmp_path):
    run_ranks(_two_process_worker, 2, str(tmp_path))
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [g["step"] for g in got] == [2, 2] and {g["signum"] for g in got} == {signal.SIGTERM}
    assert (tmp_path / "checkpoints" / "step-00000002" / "manifest.json").is_file()


def test_sigterm_inside_a_reinforce_rollout_resumes_on_its_samples(tmp_path):
    """The signal arrives while the rollout for steps 1-2 is scored: step 1 finishes, its
    checkpoint keeps the rest of the rollout, and the resumed run equals an uninterrupted one."""
    from nemokern.trainers.reinforce import ReinforceConfig, ReinforceTrainer

    rows = [{"prompt": f"Say {c}."} for c in "abcd"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sent = []

    def reward(prompts, completions, signal_first=False, **kw):
        if signal_first and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        return [float(sum(map(ord, c)) % 7) for c in completions]

    def run(out, signal_first=False, **kw):
        cfg = ReinforceConfig(
            prompts=str(tmp_path / "prompts.jsonl"),
            out=str(tmp_path / out),
            max_new_tokens=4,
            prompts_per_step=2,
            k=2,
            updates_per_rollout=2,
            truncation_penalty=0.0,
            max_steps=4,
            lr=1e-3,
            progress=False,
            tensorboard=False,
            device="cpu",
            **kw,
        )
        trainer = ReinforceTrainer(
            cfg, reward_fn=lambda **a: reward(**a, signal_first=signal_first)
        )
        return trainer, trainer.fit

    _, fit = run("straight")
    expected = fit()
    assert all(h["grad_norm"] > 0 for h in expected)  # updates that move the policy
    trainer, fit = run("run", signal_first=True)
    with pytest.raises(TrainingStopped, match="after step 1 of 4"):
        fit()
    first = trainer.loop.history
    _, fit = run("run", resume="auto")
    rest = fit()
    assert [h["step"] for h in first + rest] == [1, 2, 3, 4]
    for ours, ref in zip(first + rest, expected):
        for key in ("loss", "grad_norm", "reward_mean", "kl_mean"):
            assert ours[key] == ref[key], key
