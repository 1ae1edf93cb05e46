"""The training commands as a user runs them, end to end on the synthetic task: train-reward
(stage 1 regression, stage 2 scaled BT from it), score, export-reward, expo; how a run stops
(divergence, SIGTERM) and the torchrun line."""

import json
import signal
import subprocess
import sys
import time

import pytest

from nemokern.data.synthetic import write_synthetic


def nemokern(*args, cwd):
    out = subprocess.run(
        [sys.executable, "-m", "nemokern.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_reward_recipe_from_the_command_line(tmp_path):
    write_synthetic(tmp_path / "hs2.jsonl", 16, "helpsteer2", seed=0)
    write_synthetic(tmp_path / "pref.jsonl", 16, "hs2-preference", seed=0)
    write_synthetic(tmp_path / "rb.jsonl", 12, "pairs", seed=1)
    common = ["--no-progress", "--no-tensorboard", "--lr", "1e-3", "--max-steps", "2"]
    out = nemokern(
        "train-reward",
        "--data",
        "hs2.jsonl",
        "--loss",
        "helpfulness",
        "--out",
        "s1",
        *common,
        cwd=tmp_path,
    )
    assert "2 steps" in out and "final model: s1/final" in out
    (tmp_path / "stage2.toml").write_text('loss = "scaled-bt"\ninit = "s1/final"\n')
    nemokern(
        "train-reward",
        "--config",
        "stage2.toml",
        "--data",
        "pref.jsonl",
        "--out",
        "s2",
        *common,
        cwd=tmp_path,
    )
    report = json.loads(
        nemokern("score", "--model", "s2/final", "--data", "rb.jsonl", "--json", cwd=tmp_path)
    )
    assert report["n"] == 12 and 0.0 <= report["accuracy"] <= 1.0
    # a partial RewardBench file: the overall is the leaderboard's formula, flagged not comparable
    rows = [json.loads(line) for line in (tmp_path / "rb.jsonl").read_text().splitlines()]
    part = [{**row, "subset": ("alpacaeval-easy", "hep-go")[i % 2]} for i, row in enumerate(rows)]
    (tmp_path / "rb-part.jsonl").write_text("".join(json.dumps(row) + "\n" for row in part))
    out = nemokern("score", "--model", "s2/final", "--data", "rb-part.jsonl", cwd=tmp_path)
    assert "section Safety: 0.0000 (no subset in this file" in out
    assert "not comparable with the leaderboard" in out
    assert "sections missing: Chat Hard, Safety" in out and "hep-go 6/164 rows" in out
    nemokern("export-reward", "--model", "s2/final", "--out", "hf", cwd=tmp_path)
    exported = json.loads(
        nemokern("score", "--model", "hf", "--data", "rb.jsonl", "--json", cwd=tmp_path)
    )
    assert exported["accuracy"] == report["accuracy"]
    assert "wrote expo" in nemokern(
        "expo",
        "--init",
        "s1/final",
        "--aligned",
        "s2/final",
        "--alpha",
        "0.3",
        "--out",
        "expo",
        cwd=tmp_path,
    )


# train-reward on tmp_path/hs2.jsonl into tmp_path/o, quietly (options appended)
TRAIN_REWARD = [sys.executable, "-m", "nemokern.cli", "train-reward", "--data", "hs2.jsonl"] + [
    "--loss",
    "helpfulness",
    "--out",
    "o",
    "--no-progress",
    "--no-tensorboard",
]


def test_a_diverging_run_stops_with_one_line_and_keeps_its_last_good_checkpoint(tmp_path):
    """lr 1e30 makes step 2's loss non-finite: exit status 1, one line naming the step, the
    rows and the checkpoint to resume from (no traceback); that checkpoint is on disk."""
    write_synthetic(tmp_path / "hs2.jsonl", 16, "helpsteer2", seed=0)
    out = subprocess.run(
        TRAIN_REWARD + ["--lr", "1e30", "--max-steps", "3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("nemokern train-reward: stopped: non-finite loss at step 2")
    assert "hs2.jsonl:" in lines[0] and "o/checkpoints/step-00000001" in lines[0]
    assert (tmp_path / "o" / "checkpoints" / "step-00000001" / "manifest.json").is_file()


def test_train_reward_under_torchrun_with_fsdp(tmp_path):
    """The README's scale-out line on 2 CPU processes: `torchrun ... -m nemokern.cli
    train-reward --fsdp` trains and writes OUT/final; a diverging run stops every process with
    exit status 1 and one line from rank 0 naming both ranks' rows."""
    write_synthetic(tmp_path / "pref.jsonl", 16, "hs2-preference", seed=0)

    def torchrun(out, *extra):
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
            + ["2", "-m", "nemokern.cli", "train-reward", "--data", "pref.jsonl", "--loss"]
            + ["scaled-bt", "--out", out, "--no-progress", "--no-tensorboard", "--device", "cpu"]
            + list(extra),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )

    ok = torchrun("o", "--fsdp", "--max-steps", "2")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("final model: o/final") == 1  # one process reports
    assert (tmp_path / "o" / "final" / "model.safetensors").is_file()
    bad = torchrun("bad", "--lr", "1e30", "--max-steps", "3")
    assert bad.returncode != 0
    ours = [line for line in bad.stderr.splitlines() if line.startswith("nemokern ")]
    assert len(ours) == 1 and "stopped: non-finite" in ours[0], bad.stderr
    assert "rank 0:" in ours[0] and "rank 1:" in ours[0]
    assert "nemokern/engine/loop.py" not in bad.stderr  # torchrun's traceback only, not ours


def test_cli_exits_143_with_one_line_on_sigterm(tmp_path):
    """A real signal from outside, at whatever step the run has reached (engine/stop.py; the
    resume's exactness: tests/test_train_stop.py)."""
    write_synthetic(tmp_path / "hs2.jsonl", 64, "helpsteer2", seed=0)
    proc = subprocess.Popen(
        TRAIN_REWARD + ["--max-steps", "100000", "--rows-per-batch", "2"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "o" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "nemokern train-reward: stopped by SIGTERM after"
    ), err
    step = int(lines[0].split("after step ")[1].split()[0])
    assert (tmp_path / "o" / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()


def test_score_splits_the_model_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m nemokern.cli score --tp 2` (each process reads its slices)
    reports what one process does; --dtype bfloat16 to bf16 precision; --tp without torchrun is
    refused by name."""
    import torch

    from nemokern.model import Llama, LlamaConfig, RewardModel

    write_synthetic(tmp_path / "rb.jsonl", 24, "pairs", seed=1)
    torch.manual_seed(0)
    RewardModel(Llama(LlamaConfig.tiny())).save_pretrained(tmp_path / "rm")
    args = ["score", "--model", "rm", "--data", "rb.jsonl", "--json"]
    one = json.loads(nemokern(*args, cwd=tmp_path))
    bf16 = json.loads(nemokern(*args, "--dtype", "bfloat16", cwd=tmp_path))
    split = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + ["-m", "nemokern.cli", *args, "--tp", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert split.returncode == 0, split.stderr
    reports = [json.loads(line) for line in split.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1  # rank 0 prints
    assert reports[0]["n"] == one["n"] == 24 and reports[0]["accuracy"] == one["accuracy"]
    assert reports[0]["mean_margin"] == pytest.approx(one["mean_margin"], rel=1e-4, abs=1e-6)
    assert bf16["mean_margin"] == pytest.approx(one["mean_margin"], rel=5e-2, abs=1e-2)
    alone = subprocess.run(
        [sys.executable, "-m", "nemokern.cli", *args, "--tp", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert alone.returncode == 2 and "--tp: 2 needs a multiple of 2 processes" in alone.stderr


@pytest.mark.parametrize(
    "cmd, match",
    [
        (TRAIN_REWARD[3:] + ["--device", "tpu"], "--device: 'tpu' is not a device"),
        (TRAIN_REWARD[3:] + ["--out", "hs2.jsonl"], "--out: 'hs2.jsonl' exists and is not a dir"),
        (TRAIN_REWARD[3:] + ["--lr", "inf"], "lr = inf must be a finite number"),
        (["score", "--model", "m", "--data", "hs2.jsonl", "--device", "tpu"], "--device: 'tpu'"),
    ],
)
def test_bad_run_options_exit_2_with_one_line(tmp_path, cmd, match):
    """Mistakes in --device, --out or a float option: one line naming it, exit 2, before any
    work (these used to be tracebacks, or a run that diverged at step 1)."""
    import re

    write_synthetic(tmp_path / "hs2.jsonl", 16, "helpsteer2", seed=0)
    out = subprocess.run(
        [sys.executable, "-m", "nemokern.cli", *cmd],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and re.search(match, out.stderr), out.stderr
    assert not (tmp_path / "o").exists()
