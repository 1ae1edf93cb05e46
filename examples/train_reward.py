"""Train a tiny random Llama-3.1 reward model the Nemotron way on the synthetic task (CPU, about
3 CPU-minutes).

Stage 1: helpfulness-only SteerLM regression on HelpSteer2-layout rows. Stage 2: scaled
Bradley-Terry on HelpSteer2-Preference-layout pairs, initialised from stage 1 including its head.
Held-out pair accuracy after each stage (measured: 0.98, then 1.0). Run from the repository root:

    python examples/train_reward.py [OUT]

The same with the command line: `nemokern train-reward --loss helpfulness ...`, then
`nemokern train-reward --loss scaled-bt --init OUT/stage1/final ...` (README: Training).
"""

import sys
import tempfile
from pathlib import Path

from nemokern.data.synthetic import write_synthetic
from nemokern.train import RewardConfig, RewardTrainer
from nemokern.trainers.reward import score_file


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = write_synthetic(out / "hs2.jsonl", 400, "helpsteer2", seed=0)
    pairs = write_synthetic(out / "pref.jsonl", 400, "hs2-preference", seed=1)
    held_out = write_synthetic(out / "held_out.jsonl", 100, "hs2-preference", seed=2)
    common = dict(rows_per_batch=8, lr=3e-3, warmup_steps=5, progress=True, tensorboard=False)
    stage1 = RewardConfig(data=rows, loss="helpfulness", out=str(out / "stage1"), **common)
    RewardTrainer(stage1).fit()
    print("stage 1 held-out accuracy:", score_file(out / "stage1" / "final", held_out)["accuracy"])
    stage2 = RewardConfig(
        data=pairs, loss="scaled-bt", init=str(out / "stage1" / "final"),
        out=str(out / "stage2"), **common,
    )  # fmt: skip
    RewardTrainer(stage2).fit()
    print("stage 2 held-out accuracy:", score_file(out / "stage2" / "final", held_out)["accuracy"])


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()))
