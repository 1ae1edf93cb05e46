"""The pieces of a REINFORCE rollout and the loop that makes one every `updates_per_rollout`
optimizer steps: reward sources (a Python function with TRL's signature, a reward-model
directory), stop strings, and RolloutLoop. The update's coefficients and loss are policy.py's;
reinforce.py puts them together into ReinforceTrainer.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nemokern.engine.config import option_error
from nemokern.engine.loop import TrainLoop
from nemokern.errors import ConfigError
from nemokern.model import RewardModel
from nemokern.model.reward import HEAD_WEIGHTS, check_reward_directory, check_trained
from nemokern.trainers.policy import SampleGroups

PHASES = ("generate_s", "score_s", "logprobs_s")
DEFERRED_SUMS = ("kl", "score", "entropy", "advantage", "advantage_sq")  # micro_batch_terms


# ---- the pieces of a rollout ---------------------------------------------------------------------
def load_reward_fn(spec: str) -> Callable:
    """The function named by 'module:function' (the module importable from sys.path)."""
    module_name, sep, name = spec.partition(":")
    if not (sep and module_name and name):
        raise option_error(
            "reward_fn", f"{spec!r} is not 'module:function' (e.g. my_rewards:exact_match)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise option_error(
            "reward_fn",
            f"cannot import module {module_name!r} ({e}); put its directory on "
            "PYTHONPATH or install it",
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise option_error(
            "reward_fn",
            f"module {module_name!r} ({getattr(module, '__file__', '?')}) has no function {name!r}",
        )
    return fn


def load_reward_model(
    path, attribute: str, tp_group=None, dtype=torch.float32, deferred=False
) -> tuple[RewardModel, int]:
    """(model, column) for a reward-model directory: RewardModel's layout (the head in
    reward_head.safetensors, column = `attribute`) or the Nemotron-Reward-HF layout (a plain Llama
    whose lm_head row 0 is the head, plus config.json's nemokern_reward_bias if any; column 0).
    deferred: read once sharded (RewardModel.from_pretrained)."""
    path = Path(path)
    if not path.is_dir():
        raise option_error("reward_model", f"{path} is not a directory")
    check_reward_directory(path, "--reward-model")
    model = RewardModel.load_any(path, dtype=dtype, tp_group=tp_group, deferred=deferred)
    if (path / HEAD_WEIGHTS).exists():
        if attribute not in model.attributes:
            raise option_error(
                "attribute",
                f"{attribute!r} is not an output of {path}'s head: {list(model.attributes)}",
            )
        check_trained(model.trained_attributes, attribute, "--attribute")
        return model, model.attributes.index(attribute)
    return model, 0


def stop_length(ids: list[int], decode: Callable, stop_strings) -> int | None:
    """The length of the shortest prefix of the response `ids` whose decoded text (special
    tokens kept) ends with one of `stop_strings`; None if none does. One decode when the text
    holds no stop string; otherwise a bisection for the first prefix that holds one (a longer
    prefix decodes to a longer text), then a scan from there for one that ends with one."""
    stops = tuple(stop_strings)
    if not any(s in decode(ids) for s in stops):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        text = decode(ids[:mid])
        if any(s in text for s in stops):
            hi = mid
        else:
            lo = mid + 1
    return next((n for n in range(lo, len(ids) + 1) if decode(ids[:n]).endswith(stops)), None)


class RewardFunctionError(RuntimeError):
    """The user's reward function raised: the message names it, the chained exception (and its
    traceback) is the function's own."""


def check_reward_fn(fn: Callable, columns: list[str], where: str) -> None:
    """That `fn` can be called as fn(prompts=..., completions=..., **columns), the prompts file
    `where`'s other columns being those keyword lists (TRL's convention); checked before any
    step, so that a mismatch does not surface at the first rollout."""
    clash = sorted({"prompts", "completions"} & set(columns))
    if clash:
        raise ConfigError(
            f"{where}: column {clash[0]!r} would be passed to the reward function as a keyword "
            "it already receives (prompts=, completions=); rename the column"
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or extension function: nothing to check
        return
    try:
        signature.bind(prompts=[], completions=[], **dict.fromkeys(columns, []))
    except TypeError as e:
        name = getattr(fn, "__qualname__", repr(fn))
        raise option_error(
            "reward_fn",
            f"{name}{signature} cannot be called as fn(prompts=..., completions=..."
            + "".join(f", {c}=..." for c in columns)
            + f") ({e}); the columns come from {where}: accept them or **kwargs, "
            "as TRL's fn(prompts, completions, **kwargs)",
        ) from None


def completion(prompt, text: str):
    """A completion as a reward function receives it: the text, or for a prompt given as chat
    turns one assistant message [{"role": "assistant", "content": text}] (how TRL's GRPO and
    RLOO trainers pass completions of conversational prompts)."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _reward_values(out) -> list | None:
    """The rewards a function returned as a list of Python numbers, or None if they are not a
    1-D sequence of real numbers (bools count as 0/1)."""
    if isinstance(out, torch.Tensor | np.ndarray):
        return out.tolist() if out.ndim == 1 else None
    if not isinstance(out, list | tuple):
        return None  # a str, a dict, a scalar, a generator: not one reward per completion
    values = [v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v for v in out]
    return values if all(isinstance(v, numbers.Real) for v in values) else None


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[0]["content"]


def call_reward_fn(fn: Callable, prompts: list, completions: list, columns: dict) -> torch.Tensor:
    """fn(prompts=..., completions=..., **columns) as float64 [n]; errors name the function.
    completions: strings, or message lists (see `completion`)."""
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        out = fn(prompts=prompts, completions=completions, **columns)
    except Exception as e:
        raise RewardFunctionError(f"reward function {name} raised {type(e).__name__}: {e}") from e
    values = _reward_values(out)
    if values is None:
        shown = " ".join(repr(out).split())[:80]
        raise option_error(
            "reward_fn",
            f"reward function {name} must return a list (or 1-D array) of numbers, one per "
            f"completion; got {type(out).__name__} {shown}",
        )
    values = [float(v) for v in values]
    if len(values) != len(completions):
        raise option_error(
            "reward_fn",
            f"reward function {name} returned {len(values)} rewards for {len(completions)} "
            "completions",
        )
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise option_error(
            "reward_fn",
            f"reward function {name} returned a non-finite reward for completion {bad[0]} "
            f"({values[bad[0]]}): {_text(completions[bad[0]])[:80]!r}",
        )
    return torch.tensor(values, dtype=torch.float64)


@dataclass
class Samples:
    """A rollout's samples in the order of its steps' micro-batches, each prompt's k consecutive
    (groups)."""

    groups: SampleGroups
    order: list[int]  # the prompts (indices), one per group
    prompt_ids: list  # each sample's prompt tokens [n_samples]
    responses: list[torch.Tensor]  # each sample's response tokens
    ended: torch.Tensor  # [n_samples] bool: ended with EOS or a stop string
    steps: list[list[list[int]]]  # steps[s][m]: the prompts of micro-batch m of step s
    spans: list = field(init=False)  # spans[s][m]: (start, end, prompts), its samples start:end

    def __post_init__(self):
        self.spans, first = [], 0
        for step in self.steps:
            self.spans.append([])
            for mb in step:
                self.spans[-1].append((*self.groups.samples(first, first + len(mb)), mb))
                first += len(mb)


def step_sums(rewards, lengths, ended) -> dict:
    """The sums a step's record is made of (RolloutLoop.step_record), from its samples' rewards,
    response lengths and ended flags [n]; those formed with the coefficients start at 0."""
    return {
        "samples": rewards.numel(),
        "reward": float(rewards.sum()),
        "reward_sq": float((rewards * rewards).sum()),
        "response_tokens": float(lengths.sum()),
        "eos": float(ended.sum()),
        **dict.fromkeys(DEFERRED_SUMS, 0.0),
    }


def add_sums(into: dict, stats: dict) -> None:
    """Add a micro-batch's statistics (micro_batch_terms) to its step's sums."""
    for name, value in stats.items():
        into[name] += value


# ---- the loop ------------------------------------------------------------------------------------
class RolloutLoop(TrainLoop):
    """TrainLoop whose micro-batches come from rollouts: every `updates_per_rollout` steps,
    `rollout(first_step, groups)` (groups[s][m]: the prompt group of micro-batch m of step
    first_step + s, as micro_batch_indices orders them) returns
    {"steps": [[batch, ...] per step], "sums": [{name: float} per step], "seconds": {phase: s}}.
    An unfinished rollout is saved in every checkpoint (extra_state), so a resume inside it
    trains on the same samples. Each step's record adds the rollout's statistics of that step's
    samples (summed over processes) and the seconds per phase (0 on steps that made no rollout)."""

    def __init__(self, config, model, data, step_fn, *, rollout, updates_per_rollout: int):
        super().__init__(config, model, data, step_fn)
        self.rollout_fn, self.updates = rollout, updates_per_rollout
        self.rollout: dict | None = None
        self.seconds: dict = {}
        self.no_eos_steps, self.warned_no_eos = 0, False  # _check_eos

    def _covers(self, step: int) -> bool:
        r = self.rollout
        return r is not None and r["first"] <= step < r["first"] + len(r["steps"])

    def micro_batches(self, step):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        if not self._covers(step):
            end = min((step // self.updates + 1) * self.updates, self.total_steps)
            groups = [[self.data[i] for i in self.micro_batch_indices(s)] for s in range(step, end)]
            made = self.rollout_fn(step, groups)
            self.rollout = {"first": step, "steps": made["steps"], "sums": made["sums"]}
            self.seconds = made["seconds"]
        batches = self.rollout["steps"][step - self.rollout["first"]]
        return [
            (f"step {step + 1} micro-batch {j} (rollout from step {self.rollout['first'] + 1})", b)
            for j, b in enumerate(batches)
        ]

    def extra_state(self) -> dict:
        # self.step steps are done; keep the rollout while some of its steps are still to come
        return {"rollout": self.rollout} if self._covers(self.step) else {}

    def load_extra_state(self, state: dict) -> None:
        self.rollout = state.get("rollout")

    def add_to_step(self, stats: dict) -> None:
        """Add statistics formed during the update (micro_batch_terms) to the current step's."""
        add_sums(self.rollout["sums"][self.step - self.rollout["first"]], stats)

    def step_record(self, step: int, metrics: dict) -> dict:
        sums = self.rollout["sums"][step - self.rollout["first"]]
        names = sorted(sums)
        totals = self.sum_over_processes([torch.tensor(float(sums[k])) for k in names])
        s = dict(zip(names, totals))
        n, tok = max(s["samples"], 1.0), max(s["response_tokens"], 1.0)

        def std(total, squares):
            return math.sqrt(max(squares / n - (total / n) ** 2, 0.0))

        metrics.update(
            reward_mean=s["reward"] / n,
            reward_std=std(s["reward"], s["reward_sq"]),
            kl_mean=s["kl"] / n,
            score_mean=s["score"] / n,
            response_len_mean=s["response_tokens"] / n,
            eos_fraction=s["eos"] / n,
            entropy=s["entropy"] / tok,
            advantage_mean=s["advantage"] / n,
            advantage_std=std(s["advantage"], s["advantage_sq"]),
            **self.seconds,
            update_s=max(metrics["step_s"] - sum(self.seconds.values()), 0.0),
        )
        self._check_eos(step + 1, int(s["eos"]), int(s["samples"]))
        return metrics

    def nonfinite_note(self, step: int) -> str:
        """How large this process's rewards of `step` are (a reward of 1e30 makes the float32
        gradient overflow)."""
        sums = self.rollout["sums"][step - self.rollout["first"]]
        rms = math.sqrt(sums["reward_sq"] / max(sums["samples"], 1))
        size = f"{rms:.3g}" if math.isfinite(rms) else "beyond 1e154"
        large = rms > 1e6
        return f"the step's rewards have a root-mean-square of {size}" + (
            " (too large for a float32 gradient: scale the reward, e.g. --reward-fn-weight or "
            "--reward-model-weight, to order 1)"
            if large
            else ""
        )

    def _check_eos(self, step: int, ended: int, samples: int) -> None:
        """A step none of whose samples ended (EOS or a stop string) learns nothing (every
        advantage is 0) unless truncated samples are trained (config.truncated): warn at the
        first, stop with a ValueError once more than config.allow_no_eos_steps such steps follow
        one another (-1: never)."""
        cfg = self.config
        if ended or cfg.truncated != "zero-advantage":  # truncation_penalty implies "kept"
            self.no_eos_steps = 0
            return
        self.no_eos_steps += 1
        fix = (
            f"raise --max-new-tokens (now {cfg.max_new_tokens}), or set --truncation-penalty "
            "(truncated samples then count, penalised)"
        )
        if 0 <= cfg.allow_no_eos_steps < self.no_eos_steps:
            raise ConfigError(
                f"step {step}: no sample has ended with EOS for {self.no_eos_steps} steps in a "
                f"row (0 of {samples} in this one), so every advantage is 0 and nothing is "
                f"learned; {fix}; --allow-no-eos-steps N allows more such steps"
            )
        if not self.warned_no_eos and self.dist.rank == 0:
            self.warned_no_eos = True
            warnings.warn(
                f"step {step}: 0 of {samples} samples ended with EOS, so every advantage is 0 "
                f"and this step learns nothing; {fix}",
                UserWarning,
                stacklevel=2,
            )
