"""The training commands as a user runs them, end to end on the synthetic task: train-reward
(stage 1 regression, stage 2 scaled BT from it), score, export-reward, expo."""

import json
import subprocess
import sys

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
