"""Synthetic tasks for tests and the demo, deterministic from a seed, in the real layouts: a
preference task on graded words (below) and small sums (sum_rows, the demo's task).

Every response holds exactly four graded words, each from GOOD_WORDS or BAD_WORDS, shuffled with
zero to three FILLER_WORDS. Its helpfulness is the number of good words (0..4), so the better
response of a pair is the one with more good words: a rule a tiny model learns from the bytes of
the response alone. The other HelpSteer2 attributes are fixed functions of the words too:
correctness = 4 - #"wrong", coherence = 4 - #"vague", complexity = topic number % 5,
verbosity = #filler words.

A share of prompts (multi_turn) carry an earlier exchange: as `<extra_id_1>` markers inside the
prompt string (helpsteer2, hs2-preference, as HelpSteer2 does) or as a list of chat turns (pairs).
"""

from __future__ import annotations

import os
import random

from nemokern.errors import ConfigError

from .readers import LAYOUTS, write_rows

GOOD_WORDS = ("correct", "helpful", "clear", "precise")
BAD_WORDS = ("wrong", "vague", "rude", "lazy")
FILLER_WORDS = ("the", "and", "so", "then")
TOPICS = (
    "rivers",
    "planets",
    "bread",
    "chess",
    "tides",
    "violins",
    "bridges",
    "moss",
    "comets",
    "glaciers",
    "owls",
    "lanterns",
)


def synthetic_helpfulness(response: str) -> int:
    """The task's rule: how many GOOD_WORDS the response holds (0..4)."""
    return sum(w in GOOD_WORDS for w in response.split())


def _response(rng: random.Random, good: int) -> str:
    words = [rng.choice(GOOD_WORDS) for _ in range(good)]
    words += [rng.choice(BAD_WORDS) for _ in range(4 - good)]
    words += [rng.choice(FILLER_WORDS) for _ in range(rng.randint(0, 3))]
    rng.shuffle(words)
    return " ".join(words)


def _labels(response: str, topic: int) -> dict:
    words = response.split()
    return {
        "helpfulness": synthetic_helpfulness(response),
        "correctness": 4 - words.count("wrong"),
        "coherence": 4 - words.count("vague"),
        "complexity": topic % 5,
        "verbosity": sum(w in FILLER_WORDS for w in words),
    }


def _prompt(rng: random.Random, topic: int, multi_turn: float, as_turns: bool):
    question = f"Tell me about {TOPICS[topic]}."
    if rng.random() >= multi_turn:
        return [{"role": "user", "content": question}] if as_turns else question
    first, reply = f"Do you know {TOPICS[(topic + 1) % len(TOPICS)]}?", "Yes, a little."
    if as_turns:
        return [
            {"role": "user", "content": first},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": question},
        ]
    return f"{first}<extra_id_1>Assistant\n{reply}<extra_id_1>User\n{question}"


def synthetic_rows(
    n: int,
    layout: str = "hs2-preference",
    *,
    seed: int = 0,
    multi_turn: float = 0.1,
    ties: float = 0.0,
    val_fraction: float = 0.0,
) -> list[dict]:
    """n rows of the synthetic task in one of LAYOUTS.

    ties: share of hs2-preference pairs with equal helpfulness (strength 0); other pairs differ.
    val_fraction: share of hs2-preference rows with split "val" (the rest "train").
    pairs rows carry subset "synthetic-easy" (helpfulness differs by 2 or more) or
    "synthetic-hard" (by 1), and an id.
    """
    if layout not in LAYOUTS:
        raise ConfigError(
            f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}", option="layout"
        )
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.randrange(len(TOPICS))
        prompt = _prompt(rng, topic, multi_turn, as_turns=layout == "pairs")
        if layout == "helpsteer2":
            response = _response(rng, rng.randint(0, 4))
            rows.append({"prompt": prompt, "response": response, **_labels(response, topic)})
            continue
        h1 = rng.randint(0, 4)
        if layout == "hs2-preference" and rng.random() < ties:
            h2 = h1
        else:
            h2 = rng.choice([h for h in range(5) if h != h1])
        r1, r2 = _response(rng, h1), _response(rng, h2)
        if layout == "hs2-preference":
            rows.append(
                {
                    "prompt": prompt,
                    "response_1": r1,
                    "response_2": r2,
                    "preference_strength": max(-3, min(3, h2 - h1)),
                    "split": "val" if rng.random() < val_fraction else "train",
                }
            )
        else:
            chosen, rejected = (r1, r2) if h1 > h2 else (r2, r1)
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "subset": "synthetic-easy" if abs(h1 - h2) >= 2 else "synthetic-hard",
                    "id": str(i),
                }
            )
    return rows


def write_synthetic(
    path: str | os.PathLike, n: int, layout: str = "hs2-preference", **kwargs
) -> str:
    """Write synthetic_rows(n, layout, **kwargs) to a .jsonl, .jsonl.gz or .parquet file."""
    write_rows(synthetic_rows(n, layout, **kwargs), path)
    return os.fspath(path)


# ---- small sums: the demo's task -----------------------------------------------------------------
# A prompt asks for the sum of two digits ("3+5="); an answer is a number. A policy can be
# warm-started on noisy demonstrations (some answers wrong), a reward model learns which answers
# are right, and REINFORCE is rewarded for exact answers: a task whose progress a person can read.


def sum_prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def sum_answer(prompt: str) -> int:
    """The right answer to a sum_prompt."""
    a, b = prompt.rstrip("=").split("+")
    return int(a) + int(b)


def sum_helpfulness(prompt: str, response: str) -> int:
    """4 for the right answer, one less per unit of distance from it, 0 for a non-number."""
    try:
        value = int(response.strip())
    except ValueError:
        return 0
    return max(0, 4 - abs(value - sum_answer(prompt)))


def sum_reward(prompts, completions, **columns) -> list[float]:
    """The task's reward function, in TRL's signature: 1.0 for an exact answer, else 0.0.
    Prompts and completions are strings or message lists (a conversational prompt's completion
    is [{"role": "assistant", "content": ...}])."""
    return [float(sum_helpfulness(_text(p), _text(c)) == 4) for p, c in zip(prompts, completions)]


def _text(message) -> str:
    """A string, or the content of a message list's last message."""
    return message if isinstance(message, str) else message[-1]["content"]


def _wrong_answer(rng: random.Random, right: int, spread: int) -> int:
    while True:
        value = right + rng.randint(-spread, spread)
        if value != right and value >= 0:
            return value


def sum_rows(
    n: int,
    layout: str,
    *,
    seed: int = 0,
    correct: float = 0.5,
    spread: int = 3,
    max_a: int = 9,
    max_b: int = 9,
):
    """n rows of the small-sums task, deterministic from `seed`.

    layout "sft": prompt + response (the right answer with probability `correct`, else one within
    `spread` of it); "helpsteer2": one answer (right or wrong, as for sft) with sum_helpfulness as
    helpfulness (and correctness), the other attributes fixed; "hs2-preference": a right and a
    wrong answer, or two wrong ones at different distances, strength = their helpfulness
    difference (capped at 3); "pairs": chosen = the right answer, rejected = a wrong one.
    """
    if layout not in ("sft", "helpsteer2", "hs2-preference", "pairs"):
        raise ConfigError(
            f"unknown layout {layout!r}; expected sft, helpsteer2, hs2-preference or pairs",
            option="layout",
        )
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_a), rng.randint(0, max_b)
        prompt, right = sum_prompt(a, b), a + b
        if layout in ("sft", "helpsteer2"):
            value = right if rng.random() < correct else _wrong_answer(rng, right, spread)
            row = {"prompt": prompt, "response": str(value)}
            if layout == "helpsteer2":
                h = sum_helpfulness(prompt, str(value))
                row.update(helpfulness=h, correctness=h, coherence=4, complexity=0, verbosity=0)
            rows.append(row)
            continue
        if layout == "pairs":
            rejected = _wrong_answer(rng, right, spread)
            rows.append({"prompt": prompt, "chosen": str(right), "rejected": str(rejected)})
            continue
        first = right if rng.random() < 0.7 else _wrong_answer(rng, right, spread)
        second = _wrong_answer(rng, right, spread)
        while sum_helpfulness(prompt, str(second)) == sum_helpfulness(prompt, str(first)):
            second = _wrong_answer(rng, right, spread)
        if rng.random() < 0.5:
            first, second = second, first
        h1, h2 = (sum_helpfulness(prompt, str(v)) for v in (first, second))
        rows.append(
            {
                "prompt": prompt,
                "response_1": str(first),
                "response_2": str(second),
                "preference_strength": max(-3, min(3, h2 - h1)),
            }
        )
    return rows
