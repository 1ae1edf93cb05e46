"""Prompt files for policy training: rows with a `prompt` (a string or chat turns) and any other
columns (e.g. a reference `answer` a reward function reads), tokenized with the chat template and
an open assistant header.

Sources are those of readers.py (.jsonl, .jsonl.gz, .parquet, or an iterable of dict rows); a bad
row raises DataError naming the file and line (or row) and the field. There is no option to skip
bad prompt rows (train-reinforce has no --skip-bad-rows), so the error does not suggest one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nemokern.errors import ConfigError

from .readers import BAD_VALUE, MISSING_COLUMN, DataError, parse_turns, raw_rows, source_name

PROMPT_HINT = "fix or remove the row"


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
    for where, row in raw_rows(source):
        try:
            out.append(_prompt(where, row, tokenizer))
        except DataError as exc:
            raise exc.with_hint(PROMPT_HINT) from None
    if not out:
        raise ConfigError(f"{source_name(source)}: no prompt rows")
    return out


def _prompt(where: str, row, tokenizer) -> Prompt:
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(where, None, BAD_VALUE, f"expected a JSON object, got {type(row).__name__}")
    if row.get("prompt") is None:
        raise DataError(
            where,
            "prompt",
            MISSING_COLUMN,
            "a prompt row needs `prompt`: a string or a list of chat turns",
        )
    turns = parse_turns(row["prompt"], where, "prompt", "user")  # lone surrogates are DataErrors
    try:
        ids = tokenizer.apply_chat_template(list(turns), add_generation_prompt=True)
    except UnicodeError as exc:  # text the tokenizer cannot encode
        raise DataError(where, "prompt", BAD_VALUE, str(exc)) from None
    others = {k: v for k, v in row.items() if k != "prompt"}
    return Prompt(row["prompt"], turns, tuple(ids), others, where)
