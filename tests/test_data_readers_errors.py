"""Bad input the readers must name (file, line, field) instead of failing with a traceback: corrupt
files, huge numbers, rows that fit no layout, malformed HelpSteer2 turns, BOMs, directories, and
text no tokenizer can encode."""

import gzip
import json
import re

import pytest

from nemokern.data import load_reward_data
from nemokern.data.prompts import read_prompts
from nemokern.data.readers import (
    BAD_VALUE,
    INVALID_JSON,
    LABEL_RANGE,
    NO_LAYOUT,
    STRENGTH_RANGE,
    DataError,
    read_examples,
    split_helpsteer_turns,
    write_rows,
)
from nemokern.data.sft import read_sft
from nemokern.data.tokenizer import load_tokenizer

HS2 = {
    "prompt": "q",
    "response": "a",
    "helpfulness": 3,
    "correctness": 2,
    "coherence": 3,
    "complexity": 1,
    "verbosity": 2,
}
PREF = {"prompt": "q", "response_1": "a", "response_2": "b", "preference_strength": -2}


def _jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ----------------------------------------------------------------------------- 1: corrupt .gz


def test_corrupt_gz_is_a_clean_error_naming_the_file(tmp_path):
    rows = b"".join(json.dumps(HS2).encode() + b"\n" for _ in range(200))
    data = bytearray(gzip.compress(rows, mtime=0))
    data[len(data) // 2] ^= 0xFF  # a flipped byte mid-stream: zlib.error, not OSError
    path = tmp_path / "corrupt.jsonl.gz"
    path.write_bytes(bytes(data))
    where = r"(it|past line \d+)"  # "it": the error came before the first line was read
    pattern = rf"^{re.escape(str(path))}: cannot read {where} \(a corrupt or truncated file\)"
    with pytest.raises(ValueError, match=pattern):
        read_examples(path)
    with pytest.raises(ValueError, match=pattern):
        read_examples(path, skip_bad_rows=True)
    with pytest.raises(ValueError, match=pattern):
        read_prompts(path, load_tokenizer(None))


# ----------------------------------------------------------------------------- 2: huge numbers


@pytest.mark.parametrize(
    "row,field,reason",
    [
        (dict(HS2, quality=10**400), "quality", LABEL_RANGE),
        (dict(HS2, helpfulness=-(10**400)), "helpfulness", LABEL_RANGE),
        (dict(PREF, preference_strength=10**400), "preference_strength", STRENGTH_RANGE),
        (dict(PREF, preference_strength=-(10**400)), "preference_strength", STRENGTH_RANGE),
    ],
)
def test_huge_integer_is_a_range_error_naming_line_and_field(tmp_path, row, field, reason):
    good = HS2 if "response" in row else PREF
    path = _jsonl(tmp_path / "d.jsonl", [json.dumps(good), json.dumps(row), json.dumps(good)])
    assert "9" * 400 in path.read_text() or "1" + "0" * 400 in path.read_text()
    with pytest.raises(DataError) as err:
        read_examples(path)
    assert str(err.value).startswith(f"{path}:2: field '{field}': {reason}: got an integer of")
    assert (err.value.field, err.value.reason) == (field, reason)
    result = read_examples(path, skip_bad_rows=True)
    assert len(result.examples) == 2 and result.bad_rows == {reason: 1}
    # in-memory rows too
    with pytest.raises(DataError, match=rf"^<list> row 0: field '{field}': {reason}"):
        read_examples([row])


def test_json_python_cannot_parse_is_invalid_json(tmp_path):
    # an integer past Python's int-string digit limit (ValueError, not JSONDecodeError) and
    # nesting past the recursion limit (RecursionError)
    lines = [
        json.dumps(HS2),
        json.dumps(HS2).replace('"verbosity": 2', '"verbosity": ' + "9" * 5000),
        "[" * 100_000 + "]" * 100_000,
        json.dumps(HS2),
    ]
    path = _jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: {INVALID_JSON}"):
        read_examples(path)
    result = read_examples(path, skip_bad_rows=True)
    assert len(result.examples) == 2 and result.bad_rows == {INVALID_JSON: 2}


# ----------------------------------------------------------------------------- 3: layout detection


@pytest.mark.parametrize(
    "first",
    [
        {("respons" if k == "response" else k): v for k, v in HS2.items()},  # a typo'd column
        {k: v for k, v in PREF.items() if k != "preference_strength"},
        dict(PREF, chosen="x", rejected="y"),  # fits two layouts
    ],
)
def test_a_row_that_fits_no_layout_names_its_line_and_can_be_skipped(tmp_path, first):
    good = PREF if "response_1" in first else HS2
    path = _jsonl(tmp_path / "d.jsonl", [json.dumps(first), json.dumps(good), json.dumps(good)])
    with pytest.raises(DataError) as err:
        read_examples(path)
    assert str(err.value).startswith(f"{path}:1: {NO_LAYOUT}: cannot detect the data layout")
    assert err.value.reason == NO_LAYOUT and err.value.field is None
    assert "--skip-bad-rows" in str(err.value)
    result = read_examples(path, skip_bad_rows=True)
    assert result.layout == ("hs2-preference" if good is PREF else "helpsteer2")
    assert result.detected and result.columns == tuple(good)
    assert len(result.examples) == 2 and result.bad_rows == {NO_LAYOUT: 1}
    assert [e.where for e in result.examples] == [f"{path}:2", f"{path}:3"]
    assert f"{path}:1: {NO_LAYOUT}" in result.summary()
    # no row fits: an error naming the file
    only_bad = _jsonl(tmp_path / "bad.jsonl", [json.dumps(first)] * 2)
    with pytest.raises(
        ValueError, match=rf"^{only_bad}: no row could be read to detect the layout"
    ):
        read_examples(only_bad, skip_bad_rows=True)
    # in-memory rows are named the same way
    in_memory = [first, good]
    with pytest.raises(DataError, match="^<list> row 0: "):
        read_examples(in_memory)


@pytest.mark.parametrize("skip", [False, True])
def test_parquet_with_a_schema_that_fits_no_layout_names_the_file(tmp_path, skip):
    typo = {("respons" if k == "response" else k): v for k, v in HS2.items()}
    path = tmp_path / "d.parquet"
    write_rows([typo, typo], path)
    with pytest.raises(ValueError) as err:
        read_examples(path, skip_bad_rows=skip)
    assert not isinstance(err.value, DataError)  # the whole file's schema, not a row
    assert str(err.value).startswith(f"{path}: cannot detect the data layout from the columns")
    assert "'respons'" in str(err.value)


def test_an_unreadable_parquet_file_is_one_line(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import nemokern.data.readers as readers

    class Broken:
        def ParquetFile(self, path):  # noqa: N802 (pyarrow's name)
            raise pa.ArrowInvalid(
                "Couldn't deserialize thrift:\nTProtocolException: Invalid data\n"
            )

    monkeypatch.setattr(readers, "_import_pyarrow_parquet", lambda: Broken())
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError) as err:
        list(readers.raw_rows(str(tmp_path / "x.parquet")))
    assert "\n" not in str(err.value) and "not a readable parquet file: Couldn't" in str(err.value)


# ----------------------------------------------------------------------------- 4: HelpSteer2 turns


@pytest.mark.parametrize(
    "prompt,problem",
    [
        ("<extra_id_1>User\n", "turn 0 (user) of the <extra_id_1>User/Assistant markers is empty"),
        ("<extra_id_1>Assistant\nHello<extra_id_1>User\nq", "turn 0 (user)"),
        ("Hi<extra_id_1>Assistant\n \n<extra_id_1>User\nq", "turn 1 (assistant)"),
        ("Hi<extra_id_1>Assistant\nHello<extra_id_1>User\n", "turn 2 (user)"),
        ("Hi<extra_id_1>Assistant\nHello", "the prompt ends on an assistant turn"),
        ("Hi<extra_id_1>Assistant\r\nHello", "the prompt ends on an assistant turn"),
    ],
)
def test_malformed_helpsteer_prompt_is_a_bad_value(tmp_path, prompt, problem):
    path = _jsonl(tmp_path / "d.jsonl", [json.dumps(HS2), json.dumps(dict(HS2, prompt=prompt))])
    with pytest.raises(DataError) as err:
        read_examples(path)
    assert str(err.value).startswith(f"{path}:2: field 'prompt': {BAD_VALUE}: {problem}")
    assert (err.value.field, err.value.reason) == ("prompt", BAD_VALUE)
    result = read_examples(path, skip_bad_rows=True)
    assert len(result.examples) == 1 and result.bad_rows == {BAD_VALUE: 1}
    prompts = _jsonl(tmp_path / "p.jsonl", [json.dumps({"prompt": prompt})])
    with pytest.raises(DataError, match=f"^{prompts}:1: field 'prompt': {BAD_VALUE}"):
        read_prompts(prompts, load_tokenizer(None))


def test_crlf_after_the_role_word_splits_like_lf():
    lf = "Hi<extra_id_1>Assistant\nHello<extra_id_1>User\nq"
    crlf = "Hi<extra_id_1>Assistant\r\nHello<extra_id_1>User\r\nq"
    expected = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "q"},
    ]
    assert split_helpsteer_turns(lf) == split_helpsteer_turns(crlf) == expected
    a, b = read_examples([dict(HS2, prompt=lf), dict(HS2, prompt=crlf)]).examples
    assert a.messages == b.messages and a.prompt_turns == b.prompt_turns == 3
    assert not any("<extra_id_1>" in m["content"] for m in b.messages)


def test_well_formed_helpsteer_prompts_read_as_before():
    # a single string (markers or none), newlines kept in the content, two user turns in a row
    cases = {
        "Name a river.": [{"role": "user", "content": "Name a river."}],
        "Hi\n<extra_id_1>Assistant\nHello!\n<extra_id_1>User\nq\n": [
            {"role": "user", "content": "Hi\n"},
            {"role": "assistant", "content": "Hello!\n"},
            {"role": "user", "content": "q\n"},
        ],
        "Hi<extra_id_1>User\nmore": [
            {"role": "user", "content": "Hi"},
            {"role": "user", "content": "more"},
        ],
    }
    for prompt, turns in cases.items():
        ex = read_examples([dict(HS2, prompt=prompt)]).examples[0]
        assert list(ex.messages[: ex.prompt_turns]) == turns


# ----------------------------------------------------------------------------- 5: BOM


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_utf8_bom_is_read_as_utf8_sig(tmp_path, suffix):
    text = "\ufeff" + json.dumps(HS2) + "\n" + json.dumps(dict(HS2, prompt="caf\u00e9")) + "\n"
    path = tmp_path / f"bom{suffix}"
    if suffix.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(text.encode("utf-8"))
    else:
        path.write_bytes(text.encode("utf-8"))
    result = read_examples(path)
    assert result.layout == "helpsteer2" and result.columns == tuple(HS2)
    assert [e.where for e in result.examples] == [f"{path}:1", f"{path}:2"]
    assert result.examples[1].messages[0]["content"] == "caf\u00e9"
    # a BOM anywhere but the start of the file is still not JSON
    path2 = tmp_path / "late_bom.jsonl"
    path2.write_bytes(text.replace("\ufeff", "").encode() + "\ufeff{}\n".encode())
    with pytest.raises(DataError, match=f"^{path2}:3: {INVALID_JSON}"):
        read_examples(path2)


# ----------------------------------------------------------------------------- 6: directory


def test_a_directory_is_named_as_one(tmp_path):
    folder = tmp_path / "d.jsonl"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"data file '.*d\.jsonl' is a directory, not a file"):
        read_examples(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_examples(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- 7: prompts' hint


def test_prompt_errors_do_not_suggest_skip_bad_rows(tmp_path):
    tok = load_tokenizer(None)
    for i, line in enumerate(
        ["{not json", json.dumps({"answer": 1}), json.dumps({"prompt": " "}), "[1]"]
    ):
        path = _jsonl(tmp_path / f"p{i}.jsonl", [json.dumps({"prompt": "ok"}), line])
        with pytest.raises(DataError) as err:
            read_prompts(path, tok)
        msg = str(err.value)
        assert msg.startswith(f"{path}:2: "), msg
        assert "skip" not in msg and msg.endswith(" (fix or remove the row)"), msg
    # the reward and SFT readers, which have the option, still suggest it
    bad = _jsonl(tmp_path / "r.jsonl", ["{not json"])
    with pytest.raises(DataError, match="--skip-bad-rows"):
        read_examples(bad)
    with pytest.raises(DataError, match="--skip-bad-rows"):
        read_sft(bad, tok)


def test_data_error_hint():
    err = DataError("f.jsonl:3", "prompt", BAD_VALUE, "why")
    assert (
        str(err) == err.message + " (fix the row, or skip bad rows with skip_bad_rows=True "
        "/ --skip-bad-rows)"
    )
    assert err.message == "f.jsonl:3: field 'prompt': bad value: why"
    bare = err.with_hint(None)
    assert str(bare) == bare.message == err.message
    assert (bare.where, bare.field, bare.reason, bare.detail) == (
        "f.jsonl:3",
        "prompt",
        BAD_VALUE,
        "why",
    )


# ----------------------------------------------------------------------------- 8: lone surrogates


LONE = '"a\\ud800"'  # JSON text of a string holding a lone surrogate


@pytest.mark.parametrize(
    "line",
    [
        '{"prompt": ' + LONE + "}",
        '{"prompt": [{"role": "user", "content": ' + LONE + "}]}",
        '{"prompt": "Hi<extra_id_1>Assistant\\nHello<extra_id_1>User\\n\\udfff"}',
    ],
)
def test_prompt_with_a_lone_surrogate_names_file_line_and_field(tmp_path, line):
    path = _jsonl(tmp_path / "p.jsonl", [json.dumps({"prompt": "ok"}), line])
    with pytest.raises(DataError) as err:
        read_prompts(path, load_tokenizer(None))
    assert str(err.value).startswith(f"{path}:2: field 'prompt': {BAD_VALUE}: turn ")
    assert "not valid Unicode text" in str(err.value)


def test_prompt_tokenizer_unicode_error_names_the_row(tmp_path):
    class Picky:
        def apply_chat_template(self, turns, add_generation_prompt):
            if "\u00e9" in turns[-1]["content"]:
                "\u00e9".encode("ascii")  # raises UnicodeEncodeError
            return [1, 2]

    path = _jsonl(tmp_path / "p.jsonl", [json.dumps({"prompt": "ok"}), '{"prompt": "caf\\u00e9"}'])
    with pytest.raises(DataError, match=rf"^{path}:2: field 'prompt': {BAD_VALUE}: 'ascii' codec"):
        read_prompts(path, Picky())


@pytest.mark.parametrize("field", ["prompt", "response"])
def test_reward_data_with_a_lone_surrogate_is_a_bad_row(tmp_path, field):
    bad = json.dumps(dict(HS2, **{field: "X"})).replace('"X"', LONE)
    path = _jsonl(tmp_path / "r.jsonl", [json.dumps(HS2), bad, json.dumps(HS2)])
    tok = load_tokenizer(None)
    with pytest.raises(DataError) as err:
        load_reward_data(path, tok)
    assert str(err.value).startswith(f"{path}:2: field '{field}': {BAD_VALUE}: turn 0 is not valid")
    data = load_reward_data(path, tok, skip_bad_rows=True)
    assert len(data) == 2 and data.read.bad_rows == {BAD_VALUE: 1}
    with pytest.raises(DataError, match=rf"^{path}:2: field '{field}': {BAD_VALUE}"):
        read_sft(path, tok)


@pytest.mark.parametrize(
    "name, content, reader, message",
    [
        ("d.jsonl", None, "examples", r"data file '.*d\.jsonl' is a directory, not a file"),
        ("x.csv", "a,b\n", "sft", r"data file '.*x\.csv': unknown format; expected one of"),
        ("x.jsonl.gz", '{"prompt": "q"}\n', "prompts", r"x\.jsonl\.gz: cannot read it \(a corrupt"),
        ("e.jsonl", "", "examples", r"data source .*e\.jsonl has no rows$"),
        ("e.jsonl", "\n \n", "sft", r"e\.jsonl: no prompt/response rows$"),
        ("e.jsonl", "", "prompts", r"e\.jsonl: no prompt rows$"),
    ],
)
def test_a_file_that_holds_no_rows_is_a_config_error(tmp_path, name, content, reader, message):
    """A data file that is not one (a directory, another format, not gzip, no rows) is the
    option's mistake, not a row's: ConfigError, with no "past line 0" for a file that fails
    before its first line."""
    from nemokern.errors import ConfigError

    path = tmp_path / name
    path.mkdir() if content is None else path.write_text(content)
    read = {
        "examples": lambda: read_examples(path),
        "sft": lambda: read_sft(path, load_tokenizer(None)),
        "prompts": lambda: read_prompts(path, load_tokenizer(None)),
    }[reader]
    with pytest.raises(ConfigError, match=message):
        read()


def test_sft_max_length_names_the_option():
    from nemokern.errors import ConfigError

    with pytest.raises(ConfigError, match="^max_length: must be at least 2, got 1$") as err:
        read_sft([{"prompt": "q", "response": "a"}], load_tokenizer(None), max_length=1)
    assert err.value.option == "max_length"
