"""The recipe's plans for docs/plan.md: the reward model (HelpSteer2-Preference pairs) and
REINFORCE (k = 4) at 8B and 70B on 8, 16 and 64 80 GB GPUs, each one `nemokern plan ... --json`
command; prints the commands and a markdown table.

    python bench/plan_recipe.py [reward] [reinforce] > /tmp/recipe.md
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

# reward: scaled BT pairs, micro-batches of at most 8192 tokens (a pair of 4096-token
# conversations), 4 per step. REINFORCE: NeMo-Aligner's rollout of 128 prompts x 4 samples in
# optimizer steps of 64 samples (16 prompts; 64 prompts on 64 data-parallel processes), prompts
# up to 1024 tokens, responses up to 1024.
TRAINERS = {
    "reward": ["--max-tokens-per-batch", "8192", "--grad-accum", "4"],
    "reinforce": [
        "--k", "4", "--updates-per-rollout", "8",
        "--max-prompt-tokens", "1024", "--max-new-tokens", "1024", "--frozen-dtype", "bfloat16",
    ],
}  # fmt: skip
LAYOUTS = {"llama-3.1-8b": ["--tp", "1", "--fsdp"], "llama-3.1-70b": ["--tp", "8", "--fsdp"]}


def command(model: str, trainer: str, gpus: int) -> list[str]:
    cmd = ["nemokern", "plan", "--trainer", trainer, "--model", model, "--gpus", str(gpus)]
    cmd += ["--gpu-memory", "80GB", *LAYOUTS[model], *TRAINERS[trainer]]
    if trainer == "reinforce":
        # one prompt (its k samples) per micro-batch, as NeMo-Aligner's micro_batch_size 1;
        # a step of at least one prompt per data-parallel process
        dp = gpus // int(LAYOUTS[model][1])
        prompts = max(16, dp)
        cmd += ["--reward-model", model, "--prompts-per-step", str(prompts)]
        cmd += ["--grad-accum", str(prompts // dp)]
    return cmd


def main(argv=None) -> int:
    trainers = (argv if argv is not None else sys.argv[1:]) or list(TRAINERS)
    rows = []
    for model in LAYOUTS:
        for trainer in trainers:
            for gpus in (8, 16, 64):
                cmd = command(model, trainer, gpus)
                print("    " + shlex.join(cmd), flush=True)
                out = subprocess.run(cmd + ["--json"], capture_output=True, text=True)
                if out.returncode:
                    rows.append(f"| {model} | {trainer} | {gpus} | {out.stderr.strip()} |")
                    continue
                r = json.loads(out.stdout)
                s = r.get("suggestion")
                change = (
                    "fits"
                    if r["fits"]
                    else "none fits"
                    if s is None
                    else f"--tp {s['tp']}{' --fsdp' * s['fsdp']}"
                    f"{' --activation-checkpointing' * s['activation_checkpointing']}: "
                    f"{s['peak_bytes'] / 1e9:.1f}"
                )
                largest = (
                    f"{r['largest_micro_batch_prompts']} prompts, "
                    f"{r['largest_rollout_rows']:,} rows"
                    if trainer == "reinforce"
                    else f"{r['largest_micro_batch_tokens']:,} tokens"
                )
                rows.append(
                    f"| {model} | {trainer} | {gpus} | tp {r['tp']} dp {r['dp']}"
                    f"{' FSDP' * r['fsdp']} | {r['peak_bytes'] / 1e9:.1f} ({r['peak_phase']}) | "
                    f"{r['binding_term']} {r['binding_bytes'] / 1e9:.1f} | {largest} | {change} | "
                    f"{r['step_time']['bound_s']:.2f} |"
                )
    print()
    print(
        "| model | trainer | GPUs | layout | peak GB (phase) | largest term GB | largest "
        "micro-batch that fits | smallest tp/FSDP change (peak GB) | step bound s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
