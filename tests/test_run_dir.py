"""A run's output directory: a fresh run is refused over another run (--overwrite clears it), one
process writes at a time (OUT/run.lock), OUT/run.json identifies the run, a resume applies the
options that may change and refuses the others, and files get the umask's permissions."""

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys

import pytest
import torch
from train_tiny import TinyReward, batches, config, step_fn

from helpers import single_thread  # noqa: F401  (the fixture)
from nemokern.data.synthetic import write_synthetic
from nemokern.engine.config import ConfigError
from nemokern.engine.loop import TrainLoop
from nemokern.engine.metrics import read_metrics
from nemokern.engine.run_dir import LOCK_FILE, RunLock

pytestmark = pytest.mark.usefixtures("single_thread")


def fit(out, **kw):
    return TrainLoop(config(out, **kw), TinyReward(), batches(10), step_fn).fit()


def test_a_fresh_run_over_another_is_refused_and_overwrite_clears_it(tmp_path):
    fit(tmp_path, max_steps=2)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError) as e:
        fit(tmp_path, max_steps=3)
    message = str(e.value)
    assert message.startswith(f"--out: {tmp_path} already holds a run (checkpoints up to step-")
    assert "--resume auto" in message and "--overwrite" in message
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]  # untouched
    fit(tmp_path, max_steps=3, overwrite=True)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003"]
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only what a run writes is removed
    with pytest.raises(ConfigError, match="--overwrite: removes the run in --out, which --resume"):
        config(tmp_path, overwrite=True, resume="auto")


def test_the_lock_names_a_live_holder_and_takes_over_a_dead_ones(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        held = {"pid": sleeper.pid, "host": socket.gethostname(), "started": "then"}
        (tmp_path / LOCK_FILE).write_text(json.dumps(held))
        with pytest.raises(ConfigError) as e:
            fit(tmp_path, max_steps=1)
        assert f"is in use by another nemokern process (pid {sleeper.pid} on " in str(e.value)
        assert not (tmp_path / "checkpoints").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # that process is gone: its lock is stale and taken over; the run releases it at its end
    seen = []

    def step_seeing_the_lock(model, batch):
        seen.append(json.loads((tmp_path / LOCK_FILE).read_text())["pid"])
        return step_fn(model, batch)

    TrainLoop(config(tmp_path, max_steps=1), TinyReward(), batches(10), step_seeing_the_lock).fit()
    assert set(seen) == {os.getpid()} and not (tmp_path / LOCK_FILE).exists()
    # another host's lock cannot be checked: refused, saying how to clear it
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(ConfigError, match=f"if it is no longer running, remove {tmp_path}"):
        RunLock(tmp_path).acquire()


def test_a_lock_of_this_process_is_held_once(tmp_path):
    outer, inner = RunLock(tmp_path), RunLock(tmp_path)
    outer.acquire()
    inner.acquire()  # e.g. the CLI's lock, then the loop's
    inner.release()
    assert (tmp_path / LOCK_FILE).exists()
    outer.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_run_json_identifies_the_run_and_keeps_the_runs_it_continues(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"x": 1}\n')
    # a file-naming option is hashed; TrainConfig has none, so use a subclass's
    from nemokern.trainers.sft import SFTConfig

    cfg = SFTConfig(**{**vars(config(tmp_path / "o", max_steps=2)), "data": str(data)})
    TrainLoop(cfg, TinyReward(), batches(10), step_fn).fit()
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    assert record["options"]["lr"] == cfg.lr and record["options"]["data"] == str(data)
    assert record["data_files"]["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert record["versions"]["torch"] == torch.__version__
    assert set(record["versions"]) >= {"python", "triton", "transformers", "safetensors"}
    assert record["nemokern"]["version"] and "commit" in record["nemokern"]
    assert record["processes"] == 1 and record["resumed_from"] is None
    cfg.resume, cfg.max_steps = "auto", 3
    TrainLoop(cfg, TinyReward(), batches(10), step_fn).fit()
    again = json.loads((tmp_path / "o" / "run.json").read_text())
    assert again["resumed_from"]["step"] == 2 and again["options"]["max_steps"] == 3
    assert [r["options"]["max_steps"] for r in again["earlier"]] == [2]


def test_a_resume_applies_a_new_lr_and_schedule_and_refuses_other_options(tmp_path, capsys):
    fit(tmp_path, max_steps=2, schedule="constant", warmup_steps=0, lr=1e-2)
    resumed = fit(
        tmp_path, max_steps=4, schedule="constant", warmup_steps=0, lr=5e-3, resume="auto"
    )
    assert [r["lr"] for r in resumed] == [5e-3, 5e-3]  # the saved run's was 1e-2
    assert capsys.readouterr().err.strip() == (
        f"resuming from {tmp_path}/checkpoints/step-00000002 (step 2 of 4)"
    )
    cosine = fit(tmp_path, max_steps=6, schedule="cosine", min_lr=0.0, lr=5e-3, resume="auto")
    assert cosine[0]["lr"] < 5e-3 and cosine[-1]["lr"] < cosine[0]["lr"]
    with pytest.raises(ValueError, match="--weight-decay 0.1, this run has 0.2; it cannot change"):
        fit(tmp_path, max_steps=8, weight_decay=0.2, resume="auto")


def test_files_get_the_permissions_of_the_umask(tmp_path):
    from nemokern.model import RewardModel
    from nemokern.model.reward import export_reward_hf

    before = os.umask(0o022)
    try:
        loop = TrainLoop(config(tmp_path, max_steps=1), TinyReward(), batches(10), step_fn)
        loop.fit()
        loop.export()
        model = RewardModel(TinyReward().trunk, ("helpfulness",))
        model.save_pretrained(tmp_path / "rm")
        export_reward_hf(tmp_path / "rm", tmp_path / "hf", "helpfulness")
    finally:
        os.umask(before)
    modes = {
        p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
        for p in tmp_path.rglob("*")
    }
    assert any(name.endswith(".safetensors") for name in modes)
    wrong = {
        n: oct(m) for n, m in modes.items() if m != (0o755 if (tmp_path / n).is_dir() else 0o644)
    }
    assert not wrong


def nemokern(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "nemokern.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_commands_refuse_mixed_runs_in_one_line(tmp_path):
    """As a user runs them: a second fresh run into the same --out, and a resume with another
    --loss, each exit 2 with one line; a resume says which checkpoint it continues."""
    write_synthetic(tmp_path / "pref.jsonl", 16, "hs2-preference", seed=0)
    run = ["train-reward", "--data", "pref.jsonl", "--loss", "bt", "--out", "o", "--no-progress"]
    run += ["--no-tensorboard", "--max-steps"]
    assert nemokern(*run, 1, cwd=tmp_path).returncode == 0
    again = nemokern(*run, 2, cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert again.stderr.startswith("nemokern train-reward: error: --out: o already holds a run")
    resumed = nemokern(*run, 2, "--resume", "auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from o/checkpoints/step-00000001 (step 1 of 2)\n" in resumed.stderr
    other = nemokern(*run, 3, "--resume", "auto", "--loss", "margin-bt", cwd=tmp_path)
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr
    assert other.stdout == ""  # refused before any work (the data summary)
    assert "saved by a run with --loss 'bt', this run has 'margin-bt'" in other.stderr
