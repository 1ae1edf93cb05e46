"""Prompt files for policy training: rows with a `prompt` (a string or chat turns) and any other
columns (e.g. a reference `answer` a reward function reads), tokenized with the chat template and
an open assistant header.

Sources are those of readers.py (.jsonl, .jsonl.gz, .parquet, or an iterable of dict rows); a bad
row raises DataError naming the file and line (or row) and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .readers import BAD_VALUE, MISSING_COLUMN, DataError, _raw_rows, _turns


@dataclass(frozen=True)
class Prompt:
    """One prompt row: the `prompt` value as the file holds it, its turns, its token ids (chat
    template + generation prompt), the row's other columns, and where it came from."""

    prompt: object  # str or list of turns, as read
    turns: tuple[dict, ...]
    ids: tuple[int, ...]
    columns: dict = field(default_factory=dict)
    where: str = ""


def read_prompts(source, tokenizer) -> list[Prompt]:
    """Every row of `source` as a Prompt; DataError for a row without a usable `prompt`."""
    out = []
    for where, row in _raw_rows(source):
        if isinstance(row, DataError):
            raise row
        if not isinstance(row, dict):
            raise DataError(
                where, None, BAD_VALUE, f"expected a JSON object, got {type(row).__name__}"
            )
        if row.get("prompt") is None:
            raise DataError(
                where,
                "prompt",
                MISSING_COLUMN,
                "a prompt row needs `prompt`: a string or a list of chat turns",
            )
        turns = _turns(row["prompt"], where, "prompt", "user")
        ids = tokenizer.apply_chat_template(list(turns), add_generation_prompt=True)
        others = {k: v for k, v in row.items() if k != "prompt"}
        out.append(Prompt(row["prompt"], turns, tuple(ids), others, where))
    if not out:
        raise ValueError(f"{source}: no prompt rows")
    return out
