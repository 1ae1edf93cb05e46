"""The same command twice, in two processes, gives the same run: every random choice (a tiny
model, a fresh reward head, the data order, the samples) comes from --seed. Compared: every
step record of metrics.jsonl except what measures the machine (seconds, tokens/s, memory)."""

import json
import subprocess
import sys

import pytest
import torch

from nemokern.data.synthetic import write_synthetic
from nemokern.engine.metrics import read_metrics, run_values
from nemokern.model import Llama, LlamaConfig

QUIET = ["--no-progress", "--no-tensorboard", "--device", "cpu", "--max-steps", "2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_synthetic(root / "pref.jsonl", 16, "hs2-preference", seed=0)
    sums = [(a, b) for a in range(4) for b in range(4)]
    (root / "sft.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b)}) + "\n" for a, b in sums)
    )
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{a}+{b}="}) + "\n" for a, b in sums)
    )
    # a trunk without a reward head: train-reward gives it a fresh one
    torch.manual_seed(1)
    Llama(LlamaConfig.tiny()).save_pretrained(root / "trunk")
    return root


def twice(cwd, *command, launcher=(sys.executable, "-m", "nemokern.cli")):
    """Run `command` into OUT a and into OUT b; both runs' step records."""
    runs = []
    for out in ("a", "b"):
        done = subprocess.run(
            [*launcher, *command, "--out", out, *QUIET],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr
        runs.append(read_metrics(cwd / out / "metrics.jsonl"))
    return runs


def assert_same_run(a, b):
    assert len(a) == len(b) == 2
    assert [run_values(r) for r in a] == [run_values(r) for r in b]


@pytest.mark.parametrize(
    "command",
    [
        ["train-reward", "--model", "trunk", "--data", "pref.jsonl", "--loss", "bt"],
        ["train-sft", "--data", "sft.jsonl", "--rows-per-batch", "4"],
        ["train-reinforce", "--prompts", "prompts.jsonl", "--prompts-per-step", "4"]
        + ["--reward-fn", "nemokern.data.synthetic:sum_reward", "--max-new-tokens", "4"],
    ],
    ids=["reward-fresh-head", "sft", "reinforce"],
)
def test_the_same_command_twice_gives_the_same_run(files, tmp_path, command):
    for name in ("trunk", "pref.jsonl", "sft.jsonl", "prompts.jsonl"):
        (tmp_path / name).symlink_to(files / name)
    assert_same_run(*twice(tmp_path, *command, "--lr", "1e-3"))


def test_the_same_torchrun_command_twice_gives_the_same_run(files, tmp_path):
    """2 processes: each draws the same fresh head (--seed), only rank 0 takes OUT's lock."""
    (tmp_path / "trunk").symlink_to(files / "trunk")
    (tmp_path / "pref.jsonl").symlink_to(files / "pref.jsonl")
    command = ["-m", "nemokern.cli", "train-reward", "--model", "trunk", "--data", "pref.jsonl"]
    a, b = twice(tmp_path, *command, "--loss", "bt", "--lr", "1e-3", launcher=TORCHRUN)
    assert_same_run(a, b)
    assert not (tmp_path / "a" / "run.lock").exists()
    assert json.loads((tmp_path / "a" / "run.json").read_text())["processes"] == 2
