"""The reward-model trainer (recipe.md section 1): SteerLM regression (all nine attributes or
helpfulness only) on HelpSteer2 rows, or regular / margin / scaled Bradley-Terry on preference
pairs, over a RewardModel (Llama trunk + linear head on the last token through ops.reward_head).

Batches are packed (no padding is computed) and both responses of a pair sit in one micro-batch.
The shared TrainLoop does the rest (accumulation, clipping, AdamW, checkpoints, exact resume,
metrics, DDP). The finished model goes to OUT/final in RewardModel's layout (an HF Llama directory
plus reward_head.safetensors / reward_head.json), which `score`, `export-reward` and `--init` read.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from nemokern.data import load_reward_data
from nemokern.data.tokenizer import load_tokenizer
from nemokern.engine.config import TrainConfig, check_data_and_batching, option, option_error
from nemokern.engine.distributed import reads_deferred, setup_distributed, tp_group_for
from nemokern.engine.loop import StepOutput, TrainLoop, move_to
from nemokern.errors import ConfigError
from nemokern.model import Llama, LlamaConfig, RewardModel
from nemokern.model.reward import (
    ATTRIBUTES,
    HEAD_WEIGHTS,
    IGNORE_LABEL,
    check_reward_directory,
    check_trained,
    model_kind,
)
from nemokern.trainers import presets
from nemokern.trainers.losses import (
    HELPFULNESS,
    TIES,
    bradley_terry_loss,
    pair_accuracy,
    regression_loss,
)
from nemokern.trainers.rewardbench import accuracy_report

LOSSES = ("regression", "helpfulness", "bt", "margin-bt", "scaled-bt")
_BT_KIND = {"bt": "regular", "margin-bt": "margin", "scaled-bt": "scaled"}


@dataclass
class RewardConfig(TrainConfig):
    """Everything `nemokern train-reward` takes. Defaults: recipe.md's stage 1 (lr 2e-6 constant);
    stage 2 (scaled BT from stage 1's model and head) is `--loss scaled-bt --init DIR --lr 1e-6`."""

    # the training data's content is checked on resume (TrainLoop), not its path
    PRESETS: ClassVar[dict[str, dict]] = presets.REWARD
    RESUME_CHANGEABLE: ClassVar[tuple[str, ...]] = (
        *TrainConfig.RESUME_CHANGEABLE,
        "data",
        "eval_data",
    )

    model: str = option(
        "tiny",
        "an HF Llama directory (a base/instruct model or a reward model's "
        "final/), or 'tiny' for a small random Llama-3.1",
    )
    tokenizer: str = option("byte", "a local HF tokenizer directory, or 'byte' (built in)")
    data: str = option("", "training data: .jsonl, .jsonl.gz or .parquet")
    eval_data: str = option("", "evaluation data (same layouts); scored every eval_every steps")
    data_format: str = option(
        "auto",
        "row layout ('auto' detects it from the columns)",
        choices=("auto", "helpsteer2", "hs2-preference", "pairs"),
    )
    split: str = option(
        "", "keep only rows whose 'split' column has this value (e.g. train; needs the column)"
    )
    loss: str = option(
        "regression",
        "regression (9 attributes), helpfulness (column 4 only), "
        "bt, margin-bt or scaled-bt (pairs)",
        choices=LOSSES,
    )
    ties: str = option(
        "drop",
        "BT losses, pairs of preference strength 0: drop (out of the loss and its mean) or count "
        "(response_2 as the chosen one: regular and margin BT push it up, scaled BT adds 0 that "
        "still counts in the mean)",
        choices=TIES,
    )
    init: str = option(
        "",
        "start from this reward model INCLUDING its head (stage 2 from stage 1), not --model",
    )
    max_length: int = option(
        4096,
        "tokens per conversation; longer ones lose prompt tokens on the "
        "left (counted and reported)",
    )
    rows_per_batch: int = option(8, "rows per micro-batch (a row: one conversation, or a pair)")
    max_tokens_per_batch: int = option(0, "token budget per micro-batch instead of rows (0: off)")
    skip_bad_rows: bool = option(
        False, "skip malformed rows (counted per reason) instead of stopping"
    )
    shared_prompt: bool = option(
        True,
        "pairs: pack the common prefix of chosen and rejected (the prompt) once, both "
        "responses attending to it; off: both conversations whole",
    )


def build_model(config: RewardConfig) -> RewardModel:
    """The RewardModel `config` asks for: --init (with its head), else --model (a fresh head when
    the directory has none), else a tiny random Llama-3.1. With --tp the trunk is split (a tiny
    one is built whole on every rank and split, so it is the same model at every tp)."""
    name = "init" if config.init else "model"
    path = getattr(config, name)
    tiny = name == "model" and path == "tiny"
    if not tiny and not Path(path).is_dir():
        raise option_error(name, f"{path} is not a directory" + " (nor 'tiny')" * (name == "model"))
    if config.init and config.model != "tiny":
        # --init's directory is the trunk too: a second model would be ignored
        raise option_error(
            "init",
            f"{config.init} is the starting model, trunk and head; drop --model {config.model} "
            "(--model DIR starts a fresh head on DIR's trunk instead)",
        )
    if config.init and model_kind(path) in ("policy", "reward export"):
        raise option_error(
            "init",
            f"{path} has no {HEAD_WEIGHTS} (a {model_kind(path)}): --init continues a reward model "
            "saved by train-reward, head included; to start a fresh head on a base or instruct "
            f"model use --model {path}",
        )
    tp_group = tp_group_for(config)
    # --seed draws the tiny model and a fresh head (a directory without one): the same on every
    # process and in every run of the same command
    torch.manual_seed(config.seed)
    if tiny:
        return RewardModel(Llama.split_from(Llama(LlamaConfig.tiny()), tp_group))
    return RewardModel.from_pretrained(
        path, dtype=torch.float32, tp_group=tp_group, deferred=reads_deferred(config)
    )


def check_loss_fits_data(loss: str, kind: str, layout: str, where: str) -> None:
    if loss in ("regression", "helpfulness") and kind != "regression":
        raise option_error(
            "loss",
            f"{loss} needs attribute labels (HelpSteer2 rows); {where} holds "
            f"{layout} rows (preference pairs): use bt, margin-bt or scaled-bt",
        )
    if loss in _BT_KIND and kind != "pairs":
        raise option_error(
            "loss",
            f"{loss} needs preference pairs; {where} holds {layout} rows with "
            "attribute labels: use regression or helpfulness",
        )
    if loss in ("margin-bt", "scaled-bt") and layout == "pairs":
        raise option_error(
            "loss",
            f"{loss} needs preference strengths (HelpSteer2-Preference); {where} "
            "has chosen/rejected pairs without them: use bt",
        )


def trained_attributes(loss: str, data) -> set[str]:
    """The head outputs `loss` fits on `data`: the labelled attributes (regression), else
    helpfulness (the column every other loss reads)."""
    if loss != "regression":
        return {ATTRIBUTES[HELPFULNESS]}
    labelled = {i for e in data.examples for i, v in enumerate(e.labels) if v != IGNORE_LABEL}
    return {ATTRIBUTES[i] for i in labelled}


def reward_loss(loss: str, rewards: torch.Tensor, batch, ties: str = "drop"):
    """(LossValue, metrics) of one packed batch's rewards [S, K] under `loss` (BT losses: ties
    as losses.bradley_terry_loss takes them)."""
    if loss in ("regression", "helpfulness"):
        columns = (HELPFULNESS,) if loss == "helpfulness" else None
        value = regression_loss(rewards, batch.labels, columns=columns)
        labelled = batch.labels[:, HELPFULNESS] != -100
        err = (rewards[:, HELPFULNESS] - batch.labels[:, HELPFULNESS]).abs()[labelled]
        mae = err.mean().detach() if err.numel() else torch.zeros((), device=rewards.device)
        return value, {"helpfulness_mae": mae}
    r = rewards[:, HELPFULNESS].view(-1, 2)  # sequence 2p: pair p's chosen, 2p + 1: rejected
    value = bradley_terry_loss(r[:, 0], r[:, 1], batch.strength, kind=_BT_KIND[loss], ties=ties)
    accuracy = pair_accuracy(r[:, 0].detach(), r[:, 1].detach(), batch.strength)
    return value, {"accuracy": accuracy}


def batch_rewards(model: RewardModel, batch):
    """Rewards [S, K] of a packed RewardBatch (already on the model's device)."""
    return model(
        batch.input_ids,
        batch.last_index,
        cu_seqlens=batch.cu_seqlens,
        parents=batch.parents,
        position_ids=batch.position_ids,
    )


def evaluate_pairs(model, dataset, device, *, max_tokens_per_batch=None, rows_per_batch=None):
    """accuracy_report of `dataset` (pairs) under `model`: overall, per subset, RewardBench
    sections."""
    batches = dataset.batches(
        max_tokens_per_batch=max_tokens_per_batch or None,
        rows_per_batch=None if max_tokens_per_batch else rows_per_batch or 8,
        shuffle=False,
    )
    return _pairs_report(model, batches, device, HELPFULNESS)


@torch.no_grad()
def _pairs_report(model, batches, device, column):
    scores, subsets, strengths = [], [], []
    for batch in batches:
        scores += batch_rewards(model, move_to(batch, device))[:, column].float().cpu().tolist()
        subsets += batch.subsets
        if batch.strength is not None:
            strengths += batch.strength.tolist()
    return accuracy_report(
        scores[0::2],
        scores[1::2],
        subsets if any(subsets) else None,
        strengths=strengths if len(strengths) == len(scores) // 2 else None,
    )


def score_file(
    model_dir,
    data,
    *,
    tokenizer="byte",
    data_format="auto",
    max_length=4096,
    max_tokens_per_batch=16384,
    skip_bad_rows=False,
    device="cpu",
    attribute=None,
    tp=1,
    dtype="float32",
):
    """accuracy_report of a pairs file (preference pairs or RewardBench) under the reward model in
    `model_dir` (RewardModel layout, or Nemotron-Reward-HF: reward = logits[last, 0]).

    attribute: the head column to compare (default helpfulness where the head has it, else
    column 0). tp: split the model over that many torchrun processes (one tensor-parallel group;
    each reads its slices; every process computes the same report). dtype: float32 or bfloat16
    weights. Returns the report plus "summary" (the data reader's).
    """
    if tp < 1:
        raise option_error("tp", f"{tp} must be at least 1")
    tp_group = None
    if tp > 1:
        layout = setup_distributed(device, tp)
        if layout.dp_size > 1:
            raise option_error(
                "tp",
                f"score runs one tensor-parallel group: start {tp} processes (torchrun "
                f"--nproc-per-node {tp}); this run has {layout.world_size}",
            )
        device, tp_group = str(layout.device), layout.tp_group
    check_reward_directory(model_dir, "--model")
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    dataset = load_reward_data(
        data, tok, layout=data_format, max_length=max_length, skip_bad_rows=skip_bad_rows
    )
    if dataset.kind != "pairs":
        raise ConfigError(
            f"{data}: score compares chosen/rejected pairs; this file holds {dataset.layout} rows"
        )
    model = RewardModel.load_any(
        model_dir, dtype=getattr(torch, dtype), device=device, tp_group=tp_group
    ).eval()
    dataset.check_vocab(model.trunk.config.vocab_size)
    dataset.check_positions(model.trunk.config.max_position_embeddings)
    names, trained = model.attributes, model.trained_attributes
    if attribute:
        column = model.attribute_index(attribute)
        check_trained(trained, attribute, "--attribute")
    else:  # helpfulness where the head has it trained, else its first trained (or first) column
        usable = [a for a in names if trained is None or a in trained]
        column = names.index("helpfulness" if "helpfulness" in usable else usable[0])
    batches = dataset.batches(max_tokens_per_batch=max_tokens_per_batch, shuffle=False)
    report = _pairs_report(model, batches, torch.device(device), column)
    report["attribute"] = names[column]
    report["summary"] = dataset.summary()
    return report


class RewardTrainer:
    """`RewardTrainer(config).fit()`: train, export OUT/final, return the per-step metrics."""

    def __init__(self, config: RewardConfig, *, model: RewardModel | None = None, tokenizer=None):
        check_data_and_batching(config)
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer)
        layout = config.data_format
        self.train_data = load_reward_data(
            config.data,
            self.tokenizer,
            layout=layout,
            max_length=config.max_length,
            skip_bad_rows=config.skip_bad_rows,
            split=config.split or None,
        )
        check_loss_fits_data(config.loss, self.train_data.kind, self.train_data.layout, config.data)
        data = self.train_data
        # with --ties count, regular and margin BT learn from ties (response_2 as the chosen)
        ties_train = config.ties == "count" and config.loss in ("bt", "margin-bt")
        if data.kind == "pairs" and (data.identical if ties_train else data.useless) == len(data):
            raise ConfigError(
                f"{config.data}: none of its {len(data)} pairs can train {config.loss}: "
                f"{data.ties} are ties (preference strength 0, left out of BT losses unless "
                f"--ties count with bt or margin-bt) and {data.identical} have chosen and "
                "rejected the same tokens"
            )
        self.eval_data = None
        if config.eval_data:
            self.eval_data = load_reward_data(
                config.eval_data,
                self.tokenizer,
                layout=layout,
                max_length=config.max_length,
                skip_bad_rows=config.skip_bad_rows,
            )
            if self.eval_data.kind != "pairs" and config.loss in _BT_KIND:
                # pairs are scored by accuracy under any loss; labelled rows only by the
                # training loss, which a pair loss cannot compute on them
                raise option_error(
                    "eval_data",
                    f"{config.eval_data} holds {self.eval_data.layout} rows with attribute "
                    f"labels, which {config.loss} cannot evaluate: give preference or "
                    "RewardBench pairs (scored by pair accuracy)",
                )
        self.model = model if model is not None else build_model(config)
        # what OUT/final's reward_head.json records as trained: this run's attributes, and those
        # an --init head was trained on before
        self.model.trained_attributes = tuple(
            a
            for a in self.model.attributes
            if a in trained_attributes(config.loss, self.train_data)
            or a in (self.model.trained_attributes or ())
        )
        vocab = self.model.trunk.config.vocab_size
        for data in filter(None, (self.train_data, self.eval_data)):
            data.check_vocab(vocab)
            data.check_positions(self.model.trunk.config.max_position_embeddings)
            data.shared_prefix = config.shared_prompt
        # The trunk's lm_head never reaches a reward: frozen, so DDP and AdamW skip it.
        self.model.trunk.lm_head.weight.requires_grad_(False)
        tokens = config.max_tokens_per_batch or None
        plan = self.train_data.batches(
            max_tokens_per_batch=tokens,
            rows_per_batch=None if tokens else config.rows_per_batch,
            shuffle=True,
            seed=config.seed,
        )
        self.micro_batches = [self.train_data.batch(rows) for rows in plan.plan(0)]

    def _step(self, model, batch) -> StepOutput:
        # model is the DDP wrapper under torchrun: batch_rewards calls it, so DDP sees the forward
        value, metrics = reward_loss(
            self.config.loss, batch_rewards(model, batch), batch, self.config.ties
        )
        return StepOutput(
            value.loss,
            weight=value.count,
            metrics=metrics,
            tokens=batch.num_tokens,
            rows=batch.where,
        )

    def _evaluate(self, model) -> dict:
        device = next(model.parameters()).device
        model = getattr(model, "module", model)  # DDP
        data, cfg = self.eval_data, self.config
        if data.kind == "pairs":
            report = evaluate_pairs(
                model,
                data,
                device,
                max_tokens_per_batch=cfg.max_tokens_per_batch,
                rows_per_batch=cfg.rows_per_batch,
            )
            out = {"accuracy": report["accuracy"]}
            absent = report.get("missing", {}).get("sections", ())
            out.update(
                {
                    f"{k.lower().replace(' ', '_')}": v
                    for k, v in report.get("sections", {}).items()
                    if k not in absent
                }
            )
            return out
        total, count = 0.0, 0
        batches = data.batches(rows_per_batch=cfg.rows_per_batch or 8, shuffle=False)
        with torch.no_grad():
            for batch in batches:
                b = move_to(batch, device)
                value, _ = reward_loss(cfg.loss, batch_rewards(model, b), b, cfg.ties)
                total += float(value.loss) * int(value.count)
                count += int(value.count)
        return {"loss": total / count if count else math.nan}

    def fit(self) -> list[dict]:
        """Train; write OUT/final (RewardModel layout) on rank 0; return the per-step records."""
        start = time.perf_counter()
        loop = TrainLoop(
            self.config,
            self.model,
            self.micro_batches,
            self._step,
            evaluate=self._evaluate if self.eval_data is not None else None,
        )
        self.loop = loop
        history = loop.fit()
        if loop.writes_weights:
            self.model.save_pretrained(Path(self.config.out) / "final")
        if loop.dist.active:
            torch.distributed.barrier()
        self.seconds = time.perf_counter() - start
        return history
