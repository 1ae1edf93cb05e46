"""`--preset nemo-aligner` and `--preset trl`: the options on which the two reference
implementations differ, set to each one's documented defaults (docs/recipe.md's table gives the
file and line of each value). A preset sits between the dataclass defaults and the --config file
and command line, which win. Both presets of a trainer set the same options, so switching
between them changes every one. The trainers' configs hold them as their `PRESETS`.

NeMo-Aligner: af2b3bd9, examples/nlp/gpt/conf/gpt_reinforce_actor.yaml and training_rm.yaml, the
REINFORCE actor's loss_func and the regression reward model's bt_loss_func; its lr schedule is
NeMo's CosineAnnealing (nemo/core/optim/lr_scheduler.py). TRL: RLOOConfig / RLOOTrainer and
RewardConfig / RewardTrainer over transformers' TrainingArguments defaults (one process).
"""

from __future__ import annotations

# NeMo's CosineAnnealing with constant_steps > 0 warms up as lr * s / w, decays by cosine over
# max_steps - w - constant_steps and holds min_lr after; transformers' linear schedule warms up
# as lr * s / w too and decays linearly to 0.
_NEMO_OPTIMIZER = {
    "schedule": "cosine",
    "warmup_steps": 10,
    "warmup_formula": "s/w",
    "constant_steps": 1000,
    "weight_decay": 0.1,
    "betas": (0.9, 0.98),
}
_TRL_OPTIMIZER = {
    "min_lr": 0.0,
    "schedule": "linear",
    "warmup_steps": 0,
    "warmup_formula": "s/w",
    "constant_steps": 0,
    "weight_decay": 0.0,
    "betas": (0.9, 0.999),
}

REINFORCE: dict[str, dict] = {
    "nemo-aligner": {
        "k": 4,
        "beta": 0.01,
        "kl_estimator": "abs",
        "kl_reduction": "mean",
        "max_new_tokens": 2048,
        "stop_strings": ["<|endoftext|>", "<extra_id_1>"],
        "loss_normalisation": "sequence-mean",
        "truncated": "zero-advantage",
        "temperature_in_logprobs": False,
        "normalize_advantages": False,
        "prompts_per_step": 16,
        "updates_per_rollout": 32,
        "lr": 9e-7,
        "min_lr": 9e-8,
        **_NEMO_OPTIMIZER,
    },
    "trl": {
        "k": 2,
        "beta": 0.05,
        "kl_estimator": "k1",
        "kl_reduction": "sum",
        "max_new_tokens": 512,
        "stop_strings": [],
        "loss_normalisation": "sequence-sum",
        "truncated": "kept",
        "temperature_in_logprobs": True,
        "normalize_advantages": False,
        "prompts_per_step": 4,
        "updates_per_rollout": 1,
        "lr": 1e-6,
        **_TRL_OPTIMIZER,
    },
}

REWARD: dict[str, dict] = {
    "nemo-aligner": {
        "ties": "count",
        "max_length": 4096,
        "lr": 9e-6,
        "min_lr": 9e-7,
        **_NEMO_OPTIMIZER,
    },
    "trl": {"ties": "count", "max_length": 1024, "lr": 1e-4, **_TRL_OPTIMIZER},
}
