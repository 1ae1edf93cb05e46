"""A reward model: a Llama trunk and a linear head (with bias) on the final-normed hidden state of
each conversation's last token, computed by the fused `ops.reward_head` on those tokens only.

On disk: the trunk as an ordinary HF Llama directory (its lm_head kept as it was) plus
`reward_head.safetensors` (weight [K, H], bias [K]) and `reward_head.json` (the attribute names).
`export_reward_hf` (and `export_hf` for a model in memory) writes the Nemotron-Reward-HF layout
instead: a plain Llama whose lm_head row 0 is one head row, so that transformers'
LlamaForCausalLM gives logits[last, 0] = reward - bias.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from nemokern.errors import ConfigError
from nemokern.model.deferred import defer, is_deferred
from nemokern.model.hf import (
    SAFETENSORS_FLOATS,
    CheckpointError,
    check_checkpoint,
    open_safetensors,
    parse_size,
    read_tensor,
    save_safetensors,
    staged_directory,
    weight_files,
    write_safetensors,
)
from nemokern.model.llama import Llama
from nemokern.ops import reward_head
from nemokern.parallel import broadcast, rank_and_size
from nemokern.parallel.fsdp import copy_into, first_holder, full_tensor

# SteerLM's 9 attributes, in the order of the head's outputs (recipe.md section 1); the one
# definition that data readers, losses and trainers use.
ATTRIBUTES = (
    "quality",
    "toxicity",
    "humor",
    "creativity",
    "helpfulness",
    "correctness",
    "coherence",
    "complexity",
    "verbosity",
)
HELPFULNESS = ATTRIBUTES.index("helpfulness")  # 4: the column Bradley-Terry losses read
IGNORE_LABEL = -100  # an attribute without a label
HEAD_WEIGHTS, HEAD_CONFIG = "reward_head.safetensors", "reward_head.json"
# The config.json key export_reward_hf writes: a plain Llama directory that holds it is a reward
# model in the Nemotron-Reward-HF layout, not a policy.
EXPORT_MARKER = "nemokern_reward_attribute"


def model_kind(path) -> str:
    """What a model directory holds: "reward model" (a head in reward_head.safetensors),
    "reward export" (the Nemotron-Reward-HF layout, config.json marked with EXPORT_MARKER),
    "policy" (any other HF Llama directory: its logits are token scores, not a reward), or
    "no model" (no readable config.json: whoever loads it names what is wrong); CheckpointError
    for a reward model's directory that lost its head's weights."""
    path = Path(path)
    if (path / HEAD_WEIGHTS).exists():
        return "reward model"
    if (path / HEAD_CONFIG).exists():  # a reward model without its head's weights: not a policy
        raise CheckpointError(
            f"{path} has {HEAD_CONFIG} but no {HEAD_WEIGHTS}: the reward model's head weights are "
            "missing (an incomplete copy?); copy the whole directory train-reward wrote"
        )
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "no model"
    return "reward export" if isinstance(config, dict) and EXPORT_MARKER in config else "policy"


def check_reward_directory(path, option: str) -> None:
    """ConfigError naming `option` when the directory holds a policy: a policy's token-0 logit
    would be read as a reward."""
    if not Path(path).is_dir():
        raise ConfigError(f"{option} {path} is not a directory")
    if model_kind(path) == "policy":
        raise ConfigError(
            f"{option} {path}: a policy (an HF Llama without {HEAD_WEIGHTS} and without "
            f"{EXPORT_MARKER} in config.json), not a reward model; give train-reward's OUT/final "
            f"or export-reward's output (a Nemotron-Reward-HF download: add "
            f'"{EXPORT_MARKER}": "reward" to its config.json)'
        )


class RewardModel(nn.Module):
    """trunk: a Llama; head: nn.Linear(H, len(attributes)) on its final-normed last-token state."""

    def __init__(self, trunk: Llama, attributes=ATTRIBUTES):
        super().__init__()
        self.trunk = trunk
        self.attributes = _attribute_names(attributes)
        # the head outputs a trainer fitted (reward_head.json records them); None: not known
        self.trained_attributes: tuple[str, ...] | None = None
        p = trunk.embed_tokens.weight
        self.head = nn.Linear(
            trunk.config.hidden_size,
            len(self.attributes),
            bias=True,
            device="cpu" if p.is_meta else p.device,
            dtype=p.dtype,
        )
        with torch.no_grad():
            self.head.weight.normal_(0.0, trunk.config.hidden_size**-0.5)
            self.head.bias.zero_()
        if p.is_meta:  # a deferred trunk (Llama.from_pretrained(deferred=True)): the head too
            self._defer_head(dict(self.head.named_parameters()))

    def _defer_head(self, values: dict) -> None:
        """The head on the meta device, given `values` (weight, bias) when the model is
        materialized (model.deferred)."""
        values = {name: v.detach().cpu().clone() for name, v in values.items()}
        self.head.to("meta")

        def fill():
            for name, value in values.items():
                copy_into(self.head.get_parameter(name), value)

        defer(self.head, fill)

    def attribute_index(self, name: str) -> int:
        if name not in self.attributes:
            raise ConfigError(
                f"{name!r} is not one of the head's {list(self.attributes)}", option="attribute"
            )
        return self.attributes.index(name)

    def forward(self, input_ids, last_index, *, cu_seqlens=None, parents=None, position_ids=None):
        """Rewards [S, K] float32 for packed input_ids [N] with cu_seqlens [S + 1] (last_index:
        the packed row of each sequence's last token; parents: segments that continue others,
        as in Llama.hidden_states), or dense [B, T] with last_index [B]."""
        hidden = self.trunk.hidden_states(
            input_ids,
            cu_seqlens=cu_seqlens,
            parents=parents,
            position_ids=position_ids,
            final_norm=False,
        )
        if cu_seqlens is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1])
        norm = self.trunk.norm
        return reward_head(
            hidden, last_index, norm.weight, self.head.weight, self.head.bias, eps=norm.eps
        )

    # ---- files --------------------------------------------------------------------------------
    def save_pretrained(self, path) -> None:
        path = Path(path)
        # under tensor parallelism or FSDP a collective: the first process writes
        self.trunk.save_pretrained(path)
        head = {name: full_tensor(p.detach()) for name, p in self.head.named_parameters()}
        if rank_and_size(self.trunk.tp_group)[0] or not first_holder(self.head.parameters()):
            return
        head = {name: t.cpu().contiguous() for name, t in head.items()}
        save_safetensors(head, path / HEAD_WEIGHTS, metadata={"format": "pt"})
        config = {"attributes": list(self.attributes)}
        if self.trained_attributes is not None:
            config["trained_attributes"] = list(self.trained_attributes)
        (path / HEAD_CONFIG).write_text(json.dumps(config) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        path,
        *,
        dtype=None,
        device=None,
        attributes=None,
        activation_checkpointing=False,
        tp_group=None,
        deferred=False,
    ) -> RewardModel:
        """Load a trunk (any HF Llama directory) and its head when the directory has one; a
        directory without a head (a base or instruct model) gets a fresh head over `attributes`
        (default the 9 SteerLM ones). tp_group: the trunk split as Llama.from_pretrained does.
        deferred: as Llama.from_pretrained's, the head included."""
        path = Path(path)
        trunk = Llama.from_pretrained(
            path,
            dtype=dtype,
            device=device,
            activation_checkpointing=activation_checkpointing,
            tp_group=tp_group,
            deferred=deferred,
        )
        if not (path / HEAD_WEIGHTS).exists():
            return cls(trunk, ATTRIBUTES if attributes is None else attributes)
        saved = _saved_attributes(path)
        if attributes is not None and tuple(attributes) != tuple(saved):
            raise CheckpointError(
                f"{path}: the saved head has attributes {saved}, not {list(attributes)}"
            )
        model = cls(trunk, saved)
        model.trained_attributes = _saved_trained(path)
        tensors = _saved_head(path, len(saved), trunk.config.hidden_size)
        if is_deferred(trunk):
            model._defer_head(tensors)
            return model
        with torch.no_grad():
            model.head.weight.copy_(tensors["weight"])
            model.head.bias.copy_(tensors["bias"])
        return model

    @classmethod
    def from_reward_hf(
        cls, path, *, dtype=None, device=None, tp_group=None, deferred=False
    ) -> RewardModel:
        """A Nemotron-Reward-HF directory (a plain Llama whose reward is logits[last, 0]) as a
        one-attribute RewardModel: lm_head row 0 is the head, with the bias `export_hf` recorded
        in config.json (0 when absent, as in NVIDIA's release). deferred: as from_pretrained's."""
        trunk = Llama.from_pretrained(
            path, dtype=dtype, device=device, tp_group=tp_group, deferred=deferred
        )
        extra = trunk.config.extra
        model = cls(trunk, (extra.get(EXPORT_MARKER, "reward"),))
        if is_deferred(trunk):  # row 0 read from the file (an untied head: a tied one loads whole)
            row = read_tensor(path, "lm_head.weight", rows=slice(0, 1))
            bias = torch.full((1,), float(extra.get("nemokern_reward_bias", 0.0)))
            model._defer_head({"weight": row, "bias": bias})
            return model
        with torch.no_grad():
            # vocabulary row 0 is in tp rank 0's shard
            model.head.weight.copy_(broadcast(trunk.lm_head.weight[:1].clone(), tp_group))
            model.head.bias.fill_(float(extra.get("nemokern_reward_bias", 0.0)))
        return model

    @classmethod
    def load_any(cls, path, *, dtype=None, device=None, tp_group=None, deferred=False):
        """RewardModel.from_pretrained where the directory has a head, else from_reward_hf."""
        load = cls.from_pretrained if (Path(path) / HEAD_WEIGHTS).exists() else cls.from_reward_hf
        return load(path, dtype=dtype, device=device, tp_group=tp_group, deferred=deferred)

    def export_hf(self, path, attribute: str = "helpfulness") -> float:
        """Write the Nemotron-Reward-HF layout for one attribute (export_reward_hf, from this
        model saved to a temporary directory beside `path`); return the head's bias for it."""
        tp_size = rank_and_size(self.trunk.tp_group)[1]
        if tp_size > 1:
            raise ConfigError(
                f"export_hf on a reward model split over {tp_size} tensor-parallel ranks: "
                "save_pretrained it, then export that directory (export_reward_hf, or nemokern "
                "export-reward)"
            )
        self.attribute_index(attribute)  # a wrong name fails before anything is written
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=Path(path).parent) as saved:
            self.save_pretrained(saved)
            return export_reward_hf(saved, path, attribute)


def _attribute_names(attributes) -> tuple[str, ...]:
    """The head's output names: a non-empty sequence of distinct strings (a bare string would be
    read as one attribute per character)."""
    if isinstance(attributes, str | bytes):
        raise TypeError(
            f"attributes={attributes!r} is one string; pass a list, e.g. [{attributes!r}]"
        )
    names = tuple(attributes)
    if (
        not names
        or not all(isinstance(a, str) and a for a in names)
        or len(set(names)) < len(names)
    ):
        raise ConfigError(
            f"attributes={list(names)!r} must be a non-empty list of distinct names (one per "
            "head output)"
        )
    return names


def _saved_attributes(path: Path) -> list[str]:
    try:
        return json.loads((path / HEAD_CONFIG).read_text())["attributes"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / HEAD_CONFIG}: unreadable head config ({exc})") from None


def _saved_trained(path: Path) -> tuple[str, ...] | None:
    trained = json.loads((path / HEAD_CONFIG).read_text()).get("trained_attributes")
    return None if trained is None else tuple(trained)


def check_trained(trained: tuple[str, ...] | None, attribute: str, option: str) -> None:
    """ConfigError naming `option` when a head's `attribute` output is not among the `trained`
    ones (RewardModel.trained_attributes; None: not known): its values are a random init's."""
    if trained is not None and attribute not in trained:
        raise ConfigError(
            f"{option} {attribute!r}: the reward model's head was trained on "
            f"{', '.join(trained)} only; its {attribute!r} output is untrained (random); "
            f"choose one of {', '.join(trained)}"
        )


def _saved_head(path: Path, k: int, hidden_size: int) -> dict[str, torch.Tensor]:
    """The head saved in `path` ({"weight", "bias"}), checked to be [k, hidden_size] and [k];
    CheckpointError naming the file and the tensor otherwise."""
    file = path / HEAD_WEIGHTS
    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors raises its own error type for a garbled file
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    expect = {"weight": (k, hidden_size), "bias": (k,)}
    for name, shape in expect.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            got = tuple(tensors[name].shape) if name in tensors else "missing"
            raise CheckpointError(
                f"{file}: tensor {name!r} is {got}, expected {shape} ({k} attributes in "
                f"{HEAD_CONFIG}, hidden_size={hidden_size} in config.json)"
            )
        if not tensors[name].dtype.is_floating_point or not torch.isfinite(tensors[name]).all():
            raise CheckpointError(
                f"{file}: tensor {name!r} is not all finite floats ({tensors[name].dtype}): a "
                "corrupt or diverged head"
            )
    return tensors


@torch.no_grad()
def export_reward_hf(
    model_dir, out, attribute: str = "helpfulness", *, max_shard_size="5GB"
) -> float:
    """The Nemotron-Reward-HF layout of the reward model saved in `model_dir` (RewardModel's
    layout), written to `out`: the trunk's tensors copied one at a time from the memory-mapped
    files, lm_head's row 0 replaced by the head's row for `attribute` (a tied lm_head written out
    untied), config.json with tie_word_embeddings false plus nemokern_reward_attribute and
    nemokern_reward_bias. Returns that bias, which lm_head cannot hold (adding it changes no
    ranking). Peak memory: one output shard.

    `model_dir` is checked before anything is written, as from_pretrained checks it (config.json
    a valid Llama config, every tensor of the shape it implies, the head [K, hidden_size] and
    [K]): a bad one raises ConfigError or CheckpointError (ValueErrors) naming the file and the
    field or tensor. The files are written into a temporary directory beside `out`, which is
    renamed to `out` (or, when `out` is a directory already, moved into it) at the end: a failure
    while copying leaves `out` as it was."""
    model_dir, out = Path(model_dir), Path(out)
    limit = parse_size(max_shard_size)  # a bad size fails before anything is written
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is not a directory; give train-reward's OUT/final")
    if not (model_dir / HEAD_WEIGHTS).is_file():
        raise CheckpointError(
            f"{model_dir} has no {HEAD_WEIGHTS}: not a reward model saved by train-reward"
        )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    attributes = _saved_attributes(model_dir)
    if attribute not in attributes:
        raise ConfigError(
            f"{attribute!r} is not one of the head's {list(attributes)}", option="attribute"
        )
    check_trained(_saved_trained(model_dir), attribute, "attribute")
    i = attributes.index(attribute)
    hidden_size = check_checkpoint(Llama, model_dir).hidden_size  # config.json and trunk shapes
    head = _saved_head(model_dir, len(attributes), hidden_size)
    row, bias = head["weight"][i], float(head["bias"][i])
    config = json.loads((model_dir / "config.json").read_text())  # as saved, other keys kept
    tied = bool(config.get("tie_word_embeddings", False))
    where = {}  # name -> (file, stored name, bytes)
    for file in dict.fromkeys(weight_files(model_dir).values()):
        with open_safetensors(file) as f:
            for name in f.keys():
                stored = f.get_slice(name)
                dtype = SAFETENSORS_FLOATS.get(stored.get_dtype())
                if dtype is None:
                    raise CheckpointError(
                        f"{file}: tensor {name!r} has dtype {stored.get_dtype()}; a reward "
                        f"model's weights are floating-point ({sorted(SAFETENSORS_FLOATS)})"
                    )
                where[name] = (file, name, math.prod(stored.get_shape()) * dtype.itemsize)
    if tied:  # lm_head written out, a copy of the embedding: row 0 must not change the latter
        where["lm_head.weight"] = where["model.embed_tokens.weight"]

    def load(name):
        file, stored, _ = where[name]
        with open_safetensors(file) as f:
            t = f.get_tensor(stored)
        if name == "lm_head.weight":
            t = t.clone()
            t[0] = row.to(t.dtype)
        return t

    config.update(
        tie_word_embeddings=False, nemokern_reward_attribute=attribute, nemokern_reward_bias=bias
    )
    with staged_directory(out, "export") as staging:
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_safetensors(staging, list(where), lambda n: where[n][2], load, limit=limit)
    return bias
