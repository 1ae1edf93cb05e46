"""A synthetic reward task for tests and the demo, deterministic from a seed, in the real layouts.

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
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
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
