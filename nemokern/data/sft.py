"""Supervised fine-tuning rows: `prompt` + `response` -> chat-template token ids, split where the
response starts (the tokens the loss is taken on).

A row holds `prompt` (a string or chat turns, as in readers.py) and `response` (a string: one
assistant turn, or a list of turns). Sources are those of readers.py (.jsonl, .jsonl.gz, .parquet,
or an iterable of dict rows). The prompt is rendered with the open assistant header (what
generation starts from); the response tokens are everything the full conversation adds after it,
the closing <|eot_id|> included, so a model trained on them learns to stop. A row longer than
max_length loses prompt tokens from the left (the leading <|begin_of_text|> stays), then response
tokens from the right; both are counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from nemokern.errors import ConfigError

from .packing import check_positions
from .readers import BAD_VALUE, MISSING_COLUMN, DataError, parse_turns, raw_rows, source_name


@dataclass(frozen=True)
class SFTExample:
    """One row's ids: the prompt (with the open assistant header) and the response after it."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    where: str  # "file:line" / "source row N"
    truncated: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class SFTDataset:
    """Tokenized SFT rows and how they were read. `kind` and `examples[i].num_tokens` are what
    packing.RewardBatches plans packed batches from."""

    examples: list[SFTExample]
    source: str
    max_length: int
    bad_rows: Counter = field(default_factory=Counter)  # reason -> count
    kind: str = "sft"

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def truncated(self) -> int:
        return sum(e.truncated for e in self.examples)

    @property
    def max_token_id(self) -> int:
        return max(max(e.prompt_ids + e.response_ids) for e in self.examples)

    def summary(self) -> str:
        tokens = sum(e.num_tokens for e in self.examples)
        targets = sum(len(e.response_ids) for e in self.examples)
        lines = [
            f"{self.source}: {len(self)} prompt/response rows, {tokens} tokens, "
            f"{targets} of them response tokens (the loss's)"
        ]
        if self.truncated:
            lines.append(f"  {self.truncated} rows longer than max_length={self.max_length} cut")
        if self.bad_rows:
            counts = ", ".join(f"{r}: {n}" for r, n in sorted(self.bad_rows.items()))
            lines.append(f"  {sum(self.bad_rows.values())} bad rows skipped ({counts})")
        return "\n".join(lines)

    def check_positions(self, limit: int) -> None:
        """Raise when a row is longer than a model's `limit` positions."""
        check_positions(((e.num_tokens, e.where) for e in self.examples), limit)

    def check_vocab(self, vocab_size: int) -> None:
        if self.max_token_id >= vocab_size:
            raise ConfigError(
                f"{self.source}: token id {self.max_token_id} does not fit the model's vocabulary "
                f"({vocab_size} rows); use the model's own tokenizer"
            )


def encode_sft(tokenizer, prompt, response, max_length: int, where: str) -> SFTExample:
    """Chat-template ids of one prompt/response, split where the response starts."""
    if response and response[0].get("role") != "assistant":
        raise DataError(
            where,
            "response",
            BAD_VALUE,
            f"its first turn has role {response[0].get('role')!r}; a response starts with an "
            "assistant turn (earlier turns belong in the prompt)",
        )
    prompt_ids = list(tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True))
    full = list(tokenizer.apply_chat_template(list(prompt) + list(response)))
    if full[: len(prompt_ids)] != prompt_ids or len(full) == len(prompt_ids):
        raise DataError(
            where,
            "response",
            BAD_VALUE,
            "the chat template does not render the prompt as the start of the conversation, so "
            "the response tokens cannot be told apart; use a Llama-3.1-style template",
        )
    response_ids = full[len(prompt_ids) :]
    cut = len(full) - max_length
    if cut > 0:
        head = 1 if prompt_ids[0] == getattr(tokenizer, "bos_id", None) else 0
        keep = max(len(prompt_ids) - cut, head)
        prompt_ids = prompt_ids[:head] + prompt_ids[len(prompt_ids) - keep + head :]
        response_ids = response_ids[: max_length - len(prompt_ids)]
    return SFTExample(tuple(prompt_ids), tuple(response_ids), where, cut > 0)


def read_sft(source, tokenizer, *, max_length: int = 4096, skip_bad_rows: bool = False):
    """Every row of `source` as an SFTExample; a bad row raises DataError naming it (or, with
    skip_bad_rows, is skipped and counted)."""
    if max_length < 2:
        raise ConfigError(f"must be at least 2, got {max_length}", option="max_length")
    examples, bad = [], Counter()
    for where, row in raw_rows(source):
        try:
            if isinstance(row, DataError):
                raise row
            if not isinstance(row, dict):
                raise DataError(
                    where, None, BAD_VALUE, f"expected a JSON object, got {type(row).__name__}"
                )
            for name in ("prompt", "response"):
                if row.get(name) is None:
                    raise DataError(
                        where,
                        name,
                        MISSING_COLUMN,
                        "an SFT row needs `prompt` and `response` (strings or chat turns)",
                    )
            prompt = parse_turns(row["prompt"], where, "prompt", "user")
            response = parse_turns(row["response"], where, "response", "assistant")
            examples.append(encode_sft(tokenizer, prompt, response, max_length, where))
        except DataError as e:
            if not skip_bad_rows:
                raise
            bad[e.reason] += 1
    if not examples:
        raise ConfigError(f"{source_name(source)}: no prompt/response rows")
    return SFTDataset(examples, source_name(source), max_length, bad)
