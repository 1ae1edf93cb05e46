import gzip
import json

import pytest

from nemokern.data.readers import (
    ATTRIBUTES,
    BAD_VALUE,
    DEFAULT_PAIR_STRENGTH,
    EMPTY_PROMPT,
    EMPTY_RESPONSE,
    INVALID_JSON,
    LABEL_RANGE,
    MISSING_COLUMN,
    MISSING_LABEL,
    STRENGTH_RANGE,
    DataError,
    PreferencePair,
    RegressionExample,
    detect_layout,
    read_examples,
    split_helpsteer_turns,
    write_rows,
)

HS2 = {
    "prompt": "Name a river.",
    "response": "The Nile.",
    "helpfulness": 4,
    "correctness": 4,
    "coherence": 4,
    "complexity": 1,
    "verbosity": 0,
}
PREF = {
    "prompt": "Name a river.",
    "response_1": "The Nile.",
    "response_2": "A cat.",
    "preference_strength": -2,
    "split": "train",
}
PAIR = {
    "prompt": "Name a river.",
    "chosen": "The Nile.",
    "rejected": "A cat.",
    "subset": "chat",
    "id": "7",
}
LAYOUT_ROWS = {"helpsteer2": HS2, "hs2-preference": PREF, "pairs": PAIR}


class FakeDataset:
    """What the readers use of a datasets.Dataset: iteration over dict rows and column_names."""

    def __init__(self, rows):
        self.rows = rows
        self.column_names = list(rows[0])

    def __iter__(self):
        return iter(self.rows)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".parquet", "list", "dataset"])
@pytest.mark.parametrize("layout", ["helpsteer2", "hs2-preference", "pairs"])
def test_every_source_and_layout_auto_detected(tmp_path, suffix, layout):
    rows = [dict(LAYOUT_ROWS[layout], prompt=f"question {i}") for i in range(3)]
    if suffix == "list":
        source = rows
    elif suffix == "dataset":
        source = FakeDataset(rows)
    else:
        source = tmp_path / f"data{suffix}"
        write_rows(rows, source)
    result = read_examples(source)
    assert result.layout == layout and result.detected
    assert f"layout {layout} (auto-detected" in result.summary()
    assert len(result.examples) == result.rows_read == 3
    assert result.examples[2].where.endswith(":3" if suffix.startswith(".jsonl") else "row 2")
    assert read_examples(source, layout).summary().count("as requested") == 1


def test_helpsteer2_labels_5_or_9_attributes():
    five = read_examples([HS2]).examples[0]
    assert isinstance(five, RegressionExample)
    assert five.labels == (MISSING_LABEL,) * 4 + (4.0, 4.0, 4.0, 1.0, 0.0)
    assert five.messages == (
        {"role": "user", "content": "Name a river."},
        {"role": "assistant", "content": "The Nile."},
    )
    nine = read_examples([dict(HS2, quality=3, toxicity=0, humor=None, creativity=2)]).examples[0]
    assert nine.labels[:4] == (3.0, 0.0, MISSING_LABEL, 2.0)
    assert len(nine.labels) == len(ATTRIBUTES)


def test_helpsteer2_multi_turn_prompt_is_split_into_turns():
    prompt = "Hi<extra_id_1>Assistant\nHello!<extra_id_1>User\nName a river."
    assert split_helpsteer_turns(prompt) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a river."},
    ]
    ex = read_examples([dict(HS2, prompt=prompt)]).examples[0]
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "user", "assistant"]
    assert ex.prompt_turns == 3


def test_prompt_as_chat_turns_and_response_as_turns():
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a river."},
    ]
    pair = read_examples([dict(PAIR, prompt=turns)]).examples[0]
    assert pair.prompt == tuple(turns)
    more = [
        {"role": "assistant", "content": "The Nile."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "The Amazon."},
    ]
    ex = read_examples([dict(HS2, response=more)]).examples[0]
    assert ex.messages[ex.prompt_turns :] == tuple(more)


def test_preference_strength_orients_the_pair():
    better_1 = read_examples([PREF]).examples[0]
    assert isinstance(better_1, PreferencePair)
    assert better_1.chosen[0]["content"] == "The Nile." and better_1.strength == 2.0
    better_2 = read_examples([dict(PREF, preference_strength=3)]).examples[0]
    assert better_2.chosen[0]["content"] == "A cat." and better_2.strength == 3.0
    tie = read_examples([dict(PREF, preference_strength=0)]).examples[0]
    assert tie.strength == 0.0
    rb = read_examples([PAIR]).examples[0]
    assert (rb.subset, rb.id, rb.strength) == ("chat", "7", DEFAULT_PAIR_STRENGTH)


def test_split_filter():
    rows = [dict(PREF, split="train"), dict(PREF, split="val"), dict(PREF, split="train")]
    result = read_examples(rows, split="val")
    assert len(result.examples) == 1 and result.other_split == 2
    assert "2 rows of another split left out" in result.summary()
    from nemokern.data import load_reward_data
    from nemokern.data.tokenizer import ByteTokenizer

    with pytest.raises(ValueError, match=r"no usable rows in .* \(3 rows of another split left"):
        load_reward_data(rows, ByteTokenizer(), split="vall")


def test_layout_detection_errors():
    assert detect_layout(["prompt", "chosen", "rejected", "id"]) == "pairs"
    with pytest.raises(ValueError, match="none of"):
        detect_layout(["prompt", "answer"])
    with pytest.raises(ValueError, match=r"several \(hs2-preference, pairs\)"):
        detect_layout(
            ["prompt", "chosen", "rejected", "response_1", "response_2", "preference_strength"]
        )
    with pytest.raises(ValueError, match="unknown data layout 'csv'"):
        read_examples([PAIR], "csv")


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_examples(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unknown format; expected one of \.jsonl"):
        read_examples(tmp_path / "d.csv")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="has no rows"):
        read_examples(tmp_path / "empty.jsonl")
    with pytest.raises(TypeError, match="iterable of dict rows"):
        read_examples(PAIR)


# (row, layout, field, reason): every kind of bad row the readers name
BAD_ROWS = [
    (
        {k: v for k, v in HS2.items() if k != "correctness"},
        "helpsteer2",
        "correctness",
        MISSING_COLUMN,
    ),
    (dict(HS2, response=None), "helpsteer2", "response", MISSING_COLUMN),
    (dict(HS2, helpfulness=5), "helpsteer2", "helpfulness", LABEL_RANGE),
    (dict(HS2, verbosity=-1), "helpsteer2", "verbosity", LABEL_RANGE),
    (dict(HS2, quality=4.5), "helpsteer2", "quality", LABEL_RANGE),
    (dict(HS2, coherence="high"), "helpsteer2", "coherence", BAD_VALUE),
    (dict(HS2, response="  \n"), "helpsteer2", "response", EMPTY_RESPONSE),
    (dict(HS2, prompt=""), "helpsteer2", "prompt", EMPTY_PROMPT),
    (dict(PREF, preference_strength=4), "hs2-preference", "preference_strength", STRENGTH_RANGE),
    (dict(PREF, preference_strength=-3.5), "hs2-preference", "preference_strength", STRENGTH_RANGE),
    (dict(PREF, response_2=""), "hs2-preference", "response_2", EMPTY_RESPONSE),
    (
        {k: v for k, v in PREF.items() if k != "preference_strength"},
        "hs2-preference",
        "preference_strength",
        MISSING_COLUMN,
    ),
    (dict(PAIR, rejected=""), "pairs", "rejected", EMPTY_RESPONSE),
    (dict(PAIR, chosen=[]), "pairs", "chosen", EMPTY_RESPONSE),
    ({k: v for k, v in PAIR.items() if k != "chosen"}, "pairs", "chosen", MISSING_COLUMN),
    (dict(PAIR, prompt=[{"role": "robot", "content": "x"}]), "pairs", "prompt", BAD_VALUE),
    (dict(PAIR, prompt=[{"role": "user"}]), "pairs", "prompt", BAD_VALUE),
    (dict(PAIR, prompt=7), "pairs", "prompt", BAD_VALUE),
]


@pytest.mark.parametrize("fmt", [".jsonl", ".parquet"])
@pytest.mark.parametrize("bad,layout,field,reason", BAD_ROWS)
def test_bad_row_names_file_line_and_field(tmp_path, fmt, bad, layout, field, reason):
    good = LAYOUT_ROWS[layout]
    path = tmp_path / f"data{fmt}"
    if fmt == ".parquet":
        if (
            isinstance(bad.get("prompt", ""), (int, list))
            or isinstance(bad.get("coherence"), str)
            or bad.get("chosen") == []
        ):
            pytest.skip("a parquet column holds one type")
        rows = [good, bad, good]
        write_rows(rows, path)
        where = f"{path} row 1"
    else:
        write_rows([good, good, bad, good], path)
        where = f"{path}:3"
    with pytest.raises(DataError) as err:
        read_examples(path, layout)
    msg = str(err.value)
    assert msg.startswith(f"{where}: field '{field}': {reason}"), msg
    assert "--skip-bad-rows" in msg
    assert (err.value.field, err.value.reason) == (field, reason)
    result = read_examples(path, layout, skip_bad_rows=True)
    assert len(result.examples) == result.rows_read - 1
    assert result.bad_rows == {reason: 1}
    assert f"1 bad rows skipped ({reason}: 1)" in result.summary()
    assert where in result.summary()


def test_invalid_json_and_counts_per_reason(tmp_path):
    path = tmp_path / "mixed.jsonl.gz"
    lines = [
        json.dumps(PAIR),
        "{not json",
        json.dumps(dict(PAIR, chosen="")),
        "[1, 2]",
        "",
        json.dumps(PAIR),
        json.dumps(dict(PAIR, rejected="  ")),
    ]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON: Expecting"):
        read_examples(path)
    result = read_examples(path, skip_bad_rows=True)
    assert result.layout == "pairs" and len(result.examples) == 2
    assert result.bad_rows == {INVALID_JSON: 2, EMPTY_RESPONSE: 2}
    assert result.rows_read == 6  # the blank line is not a row
    assert [e.where for e in result.examples] == [f"{path}:1", f"{path}:6"]


def test_auto_layout_skips_a_bad_first_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("oops\n" + json.dumps(PREF) + "\n")
    with pytest.raises(DataError, match=f"{path}:1: invalid JSON"):
        read_examples(path)
    result = read_examples(path, skip_bad_rows=True)
    assert result.layout == "hs2-preference" and len(result.examples) == 1
    path.write_text("oops\n")
    with pytest.raises(ValueError, match="no row could be read"):
        read_examples(path, skip_bad_rows=True)


def test_parquet_chat_turn_prompts_and_null_labels(tmp_path):
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a river."},
    ]
    path = tmp_path / "d.parquet"
    write_rows([dict(HS2, prompt=turns, quality=None), dict(HS2, prompt=turns, quality=2)], path)
    first, second = read_examples(path).examples
    assert first.messages[:2] == tuple(turns) and first.prompt_turns == 2
    assert first.labels[0] == MISSING_LABEL and second.labels[0] == 2.0


def test_unreadable_files_name_the_file(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(PAIR) + "\n" + json.dumps(PAIR) + "\n")
    path.write_bytes(path.read_bytes()[:-12])  # truncated download
    with pytest.raises(ValueError, match=f"^{path}: cannot read past line"):
        read_examples(path)
    not_utf8 = tmp_path / "latin1.jsonl"
    not_utf8.write_bytes(
        json.dumps(PAIR).encode() + b"\n" + '{"prompt": "caf\xe9"}\n'.encode("latin-1")
    )
    with pytest.raises(DataError, match=f"^{not_utf8}:2: invalid JSON: 'utf-8' codec"):
        read_examples(not_utf8)
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(ValueError, match=f"^{fake}: not a readable parquet file"):
        read_examples(fake, "pairs")
    with pytest.raises(ValueError, match=f"^{fake}: not a readable parquet file"):
        read_examples(fake)
