"""Reward-model data: files and in-memory rows -> validated examples, with errors naming the row.

Sources: a local .jsonl / .jsonl.gz (one JSON object per line; blank lines are ignored), a .parquet
file (read with pyarrow, imported only when a parquet file is read), or any iterable of dict rows
(a list of dicts, a `datasets.Dataset`).

Layouts (`LAYOUTS`; "auto" picks one from the column names and `ReadResult.summary` says which):

- "helpsteer2"      prompt, response, and attribute labels 0..4. HelpSteer2 has the five columns
                    helpfulness, correctness, coherence, complexity, verbosity (all required); the
                    other four of the nine SteerLM attributes (quality, toxicity, humor,
                    creativity) are read when present. A missing or null label becomes -100.
- "hs2-preference"  prompt, response_1, response_2, preference_strength (-3..3; negative means
                    response_1 is better), optional split.
- "pairs"           prompt, chosen, rejected, optional subset and id (the RewardBench layout).
                    Without prompt, chosen and rejected as whole conversations: the prompt is the
                    turns both start with; chosen and rejected that both repeat the prompt
                    column's turns are read once (PreferencePair.prompt_from says which).

A prompt is a string or a list of chat turns [{"role", "content"}, ...]. A HelpSteer2 prompt
string that carries earlier turns with the dataset's `<extra_id_1>Assistant\\n` /
`<extra_id_1>User\\n` markers is split into turns. A prompt ends on a user turn. A response is a
string (one assistant turn) or a list of turns, starting with an assistant turn, appended after
the prompt.

A bad row raises `DataError` naming the source, the line (jsonl) or row (parquet, in-memory; both
0-based), the field and the reason; with skip_bad_rows=True it is skipped and counted per reason.
With layout "auto", a row whose columns fit no layout is such a row (NO_LAYOUT), and the layout
comes from the first row that fits; a parquet file or Dataset whose schema fits none is an error
naming it. In a HelpSteer2 prompt string an empty turn, or a last turn that is not the user's, is
a bad value.
"""

from __future__ import annotations

import codecs
import gzip
import json
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from nemokern.errors import ConfigError, DataError
from nemokern.model.reward import ATTRIBUTES, HELPFULNESS, IGNORE_LABEL

from .tokenizer import CHAT_ROLES

HELPSTEER2_ATTRIBUTES = ATTRIBUTES[4:]
HELPFULNESS_INDEX = HELPFULNESS  # column 4: the BT reward
MISSING_LABEL = float(IGNORE_LABEL)
LAYOUTS = ("helpsteer2", "hs2-preference", "pairs")
# A chosen/rejected row has no strength column; it counts as a plain preference of strength 1
# ("slightly better" on the HelpSteer2-Preference scale), so scaled BT weighs it like regular BT.
DEFAULT_PAIR_STRENGTH = 1.0

# Reasons a row is bad (the keys of ReadResult.bad_rows).
INVALID_JSON = "invalid JSON"
MISSING_COLUMN = "missing column"
LABEL_RANGE = "label outside 0..4"
STRENGTH_RANGE = "strength outside -3..3"
EMPTY_RESPONSE = "empty response"
EMPTY_PROMPT = "empty prompt"
BAD_VALUE = "bad value"
NO_LAYOUT = "columns fit no layout"

PAIR_COLUMNS = ("chosen", "rejected")
# How a "pairs" row gave its prompt (PreferencePair.prompt_from), when not as a prompt column with
# response-only chosen/rejected.
IMPLICIT_PROMPT = "no prompt column: the prompt is the turns chosen and rejected start with"
REPEATED_PROMPT = "chosen and rejected repeat the prompt column's turns: read once"

_REQUIRED = {
    "helpsteer2": ("prompt", "response") + HELPSTEER2_ATTRIBUTES,
    "hs2-preference": ("prompt", "response_1", "response_2", "preference_strength"),
    "pairs": ("prompt", "chosen", "rejected"),
}
_TURN_MARKER = re.compile(r"<extra_id_1>(User|Assistant)\r?\n")
_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


@dataclass(frozen=True)
class RegressionExample:
    """One conversation with its 9 attribute labels (ATTRIBUTES order; MISSING_LABEL where
    absent)."""

    messages: tuple[dict, ...]  # prompt turns then the response turn(s)
    prompt_turns: int  # how many of `messages` belong to the prompt
    labels: tuple[float, ...]
    where: str  # "file:line" / "source row N"


@dataclass(frozen=True)
class PreferencePair:
    """Two conversations sharing a prompt; `chosen` is the better one.

    strength is m = |preference_strength| >= 0 (0: a tie), DEFAULT_PAIR_STRENGTH for "pairs" rows.
    """

    prompt: tuple[dict, ...]
    chosen: tuple[dict, ...]  # response turn(s) only
    rejected: tuple[dict, ...]
    strength: float
    where: str
    subset: str | None = None
    id: str | None = None
    split: str | None = None
    prompt_from: str | None = None  # "pairs" rows: IMPLICIT_PROMPT, REPEATED_PROMPT or None


@dataclass
class ReadResult:
    """What a read produced: the examples, the layout used, and what was skipped and why."""

    source: str
    layout: str
    detected: bool  # True when "auto" chose the layout
    columns: tuple[str, ...]
    examples: list = field(default_factory=list)
    rows_read: int = 0
    bad_rows: Counter = field(default_factory=Counter)  # reason -> count
    bad_examples: list[str] = field(default_factory=list)  # the first few error messages
    other_split: int = 0  # rows of another split, left out by `split=`

    def summary(self) -> str:
        how = "auto-detected from the columns" if self.detected else "as requested"
        lines = [
            f"{self.source}: layout {self.layout} ({how}; columns {', '.join(self.columns)})",
            f"  {self.rows_read} rows read, {len(self.examples)} examples kept",
        ]
        if self.other_split:
            lines.append(f"  {self.other_split} rows of another split left out")
        given = Counter(getattr(e, "prompt_from", None) for e in self.examples)
        lines += [
            f"  {given[how]} rows: {how}"
            for how in (IMPLICIT_PROMPT, REPEATED_PROMPT)
            if given[how]
        ]
        if self.bad_rows:
            counts = ", ".join(f"{r}: {n}" for r, n in sorted(self.bad_rows.items()))
            lines.append(f"  {sum(self.bad_rows.values())} bad rows skipped ({counts})")
            lines += [f"    e.g. {m}" for m in self.bad_examples]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- raw rows


def source_name(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"<{type(source).__name__}>"


def raw_rows(source) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of a path or an iterable of dict rows (the sources of
    read_examples, prompts.read_prompts and sft.read_sft); where is "file:line" or "... row N",
    row the parsed value, or a DataError for an unparsable jsonl line (the caller raises or skips
    it). A path that is no data file raises FileNotFoundError or ConfigError."""
    if not isinstance(source, (str, os.PathLike)):
        if isinstance(source, (dict, bytes)) or not isinstance(source, Iterable):
            raise TypeError(
                "data source must be a file path or an iterable of dict rows, got "
                f"{type(source).__name__}"
            )
        name = source_name(source)
        for i, row in enumerate(source):
            yield f"{name} row {i}", row
        return
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"data file {path!r} is a directory, not a file")
    if not os.path.isfile(path):
        raise ConfigError(f"data file {path!r} is not a regular file")
    if path.endswith(".parquet"):
        for i, row in enumerate(_parquet_rows(path)):
            yield f"{path} row {i}", row
        return
    if not path.endswith((".jsonl", ".jsonl.gz")):
        raise ConfigError(
            f"data file {path!r}: unknown format; expected one of {', '.join(_SUFFIXES)}"
        )
    opener = gzip.open if path.endswith(".gz") else open
    n = 0
    try:
        with opener(path, "rb") as f:
            for n, line in enumerate(f, start=1):
                if n == 1 and line.startswith(codecs.BOM_UTF8):  # read as utf-8-sig
                    line = line[len(codecs.BOM_UTF8) :]
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    yield where, json.loads(line.decode("utf-8"))
                # JSONDecodeError, UnicodeDecodeError, an integer past Python's digit limit;
                # RecursionError: nesting too deep
                except (ValueError, RecursionError) as exc:
                    yield where, DataError(where, None, INVALID_JSON, str(exc))
    except (OSError, EOFError, zlib.error) as exc:  # a corrupt or truncated .gz
        broken = isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile))
        why = " (a corrupt or truncated file)" if broken else ""
        where = f"past line {n}" if n else "it"
        raise ConfigError(f"{path}: cannot read {where}{why}: {exc}") from exc


def _import_pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is in the test environment
        raise ImportError(
            "reading .parquet files needs pyarrow: pip install 'nemokern[parquet]' (or pyarrow)"
        ) from exc
    return pq


def _parquet_rows(path: str) -> Iterator[dict]:
    import pyarrow as pa

    pq = _import_pyarrow_parquet()
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        for batch in batches:
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as exc:
        reason = " ".join(str(exc).split())  # Arrow's messages can span lines: one line
        raise ConfigError(f"{path}: not a readable parquet file: {reason}") from exc


def _columns(source, first_row) -> tuple[str, ...]:
    if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".parquet"):
        return tuple(_import_pyarrow_parquet().ParquetFile(os.fspath(source)).schema_arrow.names)
    names = getattr(source, "column_names", None)  # datasets.Dataset
    if isinstance(names, (list, tuple)):
        return tuple(names)
    return tuple(first_row) if isinstance(first_row, dict) else ()


def detect_layout(columns: Iterable[str]) -> str:
    """The layout whose characteristic columns are present; ConfigError when none or several fit."""
    cols = set(columns)
    fits = []
    if {"response_1", "response_2", "preference_strength"} <= cols:
        fits.append("hs2-preference")
    if {"chosen", "rejected"} <= cols:
        fits.append("pairs")
    if "response" in cols and cols & set(ATTRIBUTES):
        fits.append("helpsteer2")
    if len(fits) != 1:
        why = "none" if not fits else f"several ({', '.join(fits)})"
        raise ConfigError(
            f"cannot detect the data layout from the columns {sorted(cols)}: {why} of "
            f"{', '.join(LAYOUTS)} fit; expected {_REQUIRED}; pass the layout explicitly "
            "(--data-format)"
        )
    return fits[0]


# ----------------------------------------------------------------------------- row -> example


def split_helpsteer_turns(prompt: str) -> list[dict]:
    """A HelpSteer2 prompt string -> chat turns, splitting at the <extra_id_1>Role\\n markers
    ("\\r\\n" after the role word too). The turns are not checked; see check_helpsteer_turns."""
    parts = _TURN_MARKER.split(prompt)
    turns = [{"role": "user", "content": parts[0]}]
    for role, content in zip(parts[1::2], parts[2::2]):
        turns.append({"role": role.lower(), "content": content})
    return turns


def check_helpsteer_turns(turns: list[dict]) -> str | None:
    """What is wrong with a split HelpSteer2 prompt (an empty turn, or a last turn that is not the
    user's), or None."""
    for i, t in enumerate(turns):
        if not t["content"].strip():
            return f"turn {i} ({t['role']}) of the <extra_id_1>User/Assistant markers is empty"
    if turns[-1]["role"] != "user":
        return (
            f"the prompt ends on an {turns[-1]['role']} turn (after its last <extra_id_1> "
            "marker); a prompt must end on a user turn"
        )
    return None


def _check_text(turns, where: str, name: str) -> None:
    """DataError for a turn whose content is not valid Unicode (a lone surrogate such as JSON's
    "\\ud800"), which no tokenizer can encode."""
    for i, t in enumerate(turns):
        try:
            t["content"].encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(
                where,
                name,
                BAD_VALUE,
                f"turn {i} is not valid Unicode text (character {exc.start}: {exc.reason})",
            ) from None


def parse_turns(value, where: str, name: str, default_role: str) -> tuple[dict, ...]:
    """A string (one turn of `default_role`) or a list of {role, content} -> validated turns;
    DataError naming `where` and the field `name` otherwise."""
    empty = EMPTY_PROMPT if default_role == "user" else EMPTY_RESPONSE
    if isinstance(value, str):
        if not value.strip():
            raise DataError(where, name, empty)
        if default_role == "user":
            turns = split_helpsteer_turns(value)
            if len(turns) > 1 and (problem := check_helpsteer_turns(turns)):
                raise DataError(where, name, BAD_VALUE, problem)
        else:
            turns = [{"role": default_role, "content": value}]
        _check_text(turns, where, name)
        return tuple(turns)
    if isinstance(value, (list, tuple)):
        if not value:
            raise DataError(where, name, empty)
        turns = []
        for i, t in enumerate(value):
            if not (
                isinstance(t, dict)
                and isinstance(t.get("role"), str)
                and isinstance(t.get("content"), str)
            ):
                raise DataError(
                    where,
                    name,
                    BAD_VALUE,
                    f"turn {i} must be {{'role': str, 'content': str}}, got {t!r:.80}",
                )
            if t["role"] not in CHAT_ROLES:
                raise DataError(
                    where,
                    name,
                    BAD_VALUE,
                    f"turn {i} has role {t['role']!r}; expected one of {CHAT_ROLES}",
                )
            turns.append({"role": t["role"], "content": t["content"]})
        if not any(t["content"].strip() for t in turns):
            raise DataError(where, name, empty)
        if default_role == "user" and turns[-1]["role"] != "user":
            raise DataError(
                where,
                name,
                BAD_VALUE,
                f"its last turn is {turns[-1]['role']!r}; a prompt ends on a user turn (the "
                "response answers it): move the turns after the last user turn into the response",
            )
        _check_text(turns, where, name)
        return tuple(turns)
    raise DataError(
        where,
        name,
        BAD_VALUE,
        f"expected a string or a list of chat turns, got {type(value).__name__}",
    )


def _response(value, where: str, name: str) -> tuple[dict, ...]:
    """A response: a string (one assistant turn) or turns starting with an assistant turn."""
    turns = parse_turns(value, where, name, "assistant")
    if turns[0]["role"] != "assistant":
        raise DataError(
            where,
            name,
            BAD_VALUE,
            f"its first turn is {turns[0]['role']!r}; a response starts with an assistant turn "
            "(earlier turns belong in the prompt)",
        )
    return turns


def _pair_turns(row: dict, where: str) -> tuple[tuple, tuple, tuple, str | None]:
    """(prompt, chosen, rejected, how) of a "pairs" row. how is None for a prompt column with
    response-only chosen/rejected; IMPLICIT_PROMPT for a row without a prompt whose chosen and
    rejected are whole conversations (the prompt: the turns both start with, each keeping at
    least its last turn); REPEATED_PROMPT where chosen and rejected both repeat the prompt column's
    turns (read once)."""
    if row.get("prompt") is None and all(isinstance(row.get(n), list) for n in PAIR_COLUMNS):
        chosen, rejected = (parse_turns(row[n], where, n, "assistant") for n in PAIR_COLUMNS)
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise DataError(
                where,
                "prompt",
                MISSING_COLUMN,
                "no prompt column, and chosen and rejected do not start with the same turns",
            )
        prompt = parse_turns(list(chosen[:n]), where, "chosen/rejected shared turns", "user")
        for name, turns in zip(PAIR_COLUMNS, (chosen[n:], rejected[n:])):
            _response(list(turns), where, name)
        return prompt, chosen[n:], rejected[n:], IMPLICIT_PROMPT
    _require(row, "pairs", where)
    prompt = parse_turns(row["prompt"], where, "prompt", "user")
    both = [parse_turns(row[n], where, n, "assistant") for n in PAIR_COLUMNS]
    k = len(prompt)
    repeats = [len(t) > k and t[:k] == prompt for t in both]
    how = None
    if all(repeats):
        both, how = [t[k:] for t in both], REPEATED_PROMPT
    elif any(repeats):
        name = PAIR_COLUMNS[repeats.index(True)]
        raise DataError(
            where,
            name,
            BAD_VALUE,
            f"it repeats the prompt's turns and {PAIR_COLUMNS[repeats.index(False)]} does not; "
            "give both as the response turns only, or both as whole conversations",
        )
    chosen, rejected = (_response(list(t), where, n) for t, n in zip(both, PAIR_COLUMNS))
    return prompt, chosen, rejected, how


def _brief(value) -> str:
    """repr(value), shortened (a huge integer's repr can be thousands of digits, or fail)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value, where: str, name: str, lo: float, hi: float, reason: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(where, name, BAD_VALUE, f"expected a number, got {_brief(value)}")
    # an int is compared exactly: math.isfinite / float() overflow past ~1e308
    ok = lo <= value <= hi if isinstance(value, int) else math.isfinite(value) and lo <= value <= hi
    if not ok:
        raise DataError(where, name, reason, f"got {_brief(value)}")
    return float(value)


def _require(row: dict, layout: str, where: str) -> None:
    for name in _REQUIRED[layout]:
        if name not in row or row[name] is None:
            raise DataError(
                where, name, MISSING_COLUMN, f"a {layout} row needs {', '.join(_REQUIRED[layout])}"
            )


def _optional_str(row: dict, name: str) -> str | None:
    value = row.get(name)
    return None if value is None else str(value)


def row_to_example(row, layout: str, where: str):
    """One raw row -> RegressionExample or PreferencePair; DataError when the row is bad."""
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(
            where, None, INVALID_JSON, f"expected a JSON object, got {type(row).__name__}"
        )
    if layout == "pairs":
        prompt, chosen, rejected, how = _pair_turns(row, where)
        return PreferencePair(
            prompt,
            chosen,
            rejected,
            DEFAULT_PAIR_STRENGTH,
            where,
            subset=_optional_str(row, "subset"),
            id=_optional_str(row, "id"),
            split=_optional_str(row, "split"),
            prompt_from=how,
        )
    _require(row, layout, where)
    prompt = parse_turns(row["prompt"], where, "prompt", "user")
    if layout == "helpsteer2":
        response = _response(row["response"], where, "response")
        labels = []
        for name in ATTRIBUTES:
            value = row.get(name)
            labels.append(
                MISSING_LABEL if value is None else _number(value, where, name, 0, 4, LABEL_RANGE)
            )
        return RegressionExample(prompt + response, len(prompt), tuple(labels), where)
    if layout == "hs2-preference":
        r1 = _response(row["response_1"], where, "response_1")
        r2 = _response(row["response_2"], where, "response_2")
        s = _number(row["preference_strength"], where, "preference_strength", -3, 3, STRENGTH_RANGE)
        chosen, rejected = (r1, r2) if s < 0 else (r2, r1)
        return PreferencePair(
            prompt,
            chosen,
            rejected,
            abs(s),
            where,
            subset=_optional_str(row, "subset"),
            id=_optional_str(row, "id"),
            split=_optional_str(row, "split"),
        )
    raise ConfigError(
        f"unknown data layout {layout!r}; expected auto or one of {', '.join(LAYOUTS)}",
        option="layout",
    )


def read_examples(
    source,
    layout: str = "auto",
    *,
    skip_bad_rows: bool = False,
    split: str | None = None,
    max_reported: int = 5,
) -> ReadResult:
    """Read every row of `source` (path or iterable of dicts) into examples of one layout.

    layout: "auto" or one of LAYOUTS. split: keep only rows whose `split` column equals it (rows
    without the column are kept; a source where no row has one is refused). skip_bad_rows: skip
    and count bad rows instead of raising DataError at the first; the first `max_reported`
    messages are kept for the summary.
    """
    if layout != "auto" and layout not in LAYOUTS:
        raise ConfigError(
            f"unknown data layout {layout!r}; expected auto or one of {', '.join(LAYOUTS)}",
            option="layout",
        )
    result = ReadResult(source_name(source), layout, layout == "auto", ())
    split_column = False  # some row has a split value
    for where, row in raw_rows(source):
        result.rows_read += 1
        split_column |= isinstance(row, dict) and row.get("split") is not None
        try:
            if result.layout == "auto":
                # the first object row that fits a layout (or a parquet / Dataset schema) names
                # the columns
                schema = _columns(source, None)
                if not isinstance(row, dict) and not schema:
                    row_to_example(row, LAYOUTS[0], where)  # raises the row's own error
                columns = _columns(source, row)
                try:
                    result.layout = detect_layout(columns)
                except ConfigError as exc:
                    if schema:  # every row has these columns: not a row's fault
                        raise ConfigError(f"{result.source}: {exc}") from None
                    raise DataError(where, None, NO_LAYOUT, str(exc)) from None
                result.columns = columns
            elif not result.columns:
                result.columns = _columns(source, row)
            example = row_to_example(row, result.layout, where)
        except DataError as exc:
            if not skip_bad_rows:
                raise
            result.bad_rows[exc.reason] += 1
            if len(result.bad_examples) < max_reported:
                result.bad_examples.append(exc.message)
            continue
        if split is not None and isinstance(row, dict) and row.get("split") not in (None, split):
            result.other_split += 1
            continue
        result.examples.append(example)
    if not result.rows_read:
        raise ConfigError(f"data source {result.source} has no rows")
    if split is not None and not split_column:
        raise ConfigError(
            f"split={split!r} (--split) keeps the rows whose 'split' column has that value, but "
            f"no row of {result.source} has a 'split' value; drop --split, or use a file with "
            "the column"
        )
    if result.layout == "auto":
        first = f"; the first: {result.bad_examples[0]}" if result.bad_examples else ""
        raise ConfigError(
            f"{result.source}: no row could be read to detect the layout "
            f"({sum(result.bad_rows.values())} bad rows){first}"
        )
    return result


# ----------------------------------------------------------------------------- writing


def write_rows(rows: Iterable[dict], path: str | os.PathLike) -> None:
    """Write dict rows as .jsonl, .jsonl.gz or .parquet (chosen by the suffix of `path`)."""
    path = os.fspath(path)
    rows = list(rows)
    if path.endswith(".parquet"):
        import pyarrow as pa

        columns = list(dict.fromkeys(k for r in rows for k in r))  # every row's columns, in order
        table = pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows])
        _import_pyarrow_parquet().write_table(table, path)
        return
    if not path.endswith((".jsonl", ".jsonl.gz")):
        raise ConfigError(f"cannot write {path!r}: expected one of {', '.join(_SUFFIXES)}")
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(text.encode("utf-8"))
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
