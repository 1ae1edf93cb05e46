import pytest

from nemokern.data.tokenizer import (
    EOT,
    ByteTokenizer,
    HFTokenizer,
    load_tokenizer,
    render_llama3_chat,
)

CONV = [
    {"role": "system", "content": "Be brief. "},
    {"role": "user", "content": "  Héllo, wörld? 你好 <|eot_id|> inside text"},
    {"role": "assistant", "content": "Hi!\n"},
]


def test_render_format_exact():
    text = render_llama3_chat(CONV[1:2], add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        "Héllo, wörld? 你好 <|eot_id|> inside text<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_byte_tokenizer_roundtrip_and_specials():
    tok = ByteTokenizer()
    ids = tok.apply_chat_template(CONV)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eot_id
    assert tok.decode(ids) == render_llama3_chat(CONV)
    assert max(ids) < tok.vocab_size
    # a special-token string in user text stays bytes when special tokens are not allowed
    plain = tok.encode(EOT, allow_special=False)
    assert tok.eot_id not in plain and tok.decode(plain) == EOT
    assert tok.eot_id in tok.eos_ids


def test_byte_tokenizer_rejects_unknown_id():
    with pytest.raises(ValueError, match="outside"):
        ByteTokenizer().decode([65, 999])


@pytest.mark.parametrize(
    "bad,match",
    [
        ([], "non-empty"),
        ("hello", "non-empty"),
        ([{"role": "user"}], "message 0"),
        ([{"role": "robot", "content": "x"}], "role 'robot'"),
        ([{"role": "user", "content": 3}], "content must be a string"),
    ],
)
def test_bad_conversations(bad, match):
    with pytest.raises(ValueError, match=match):
        render_llama3_chat(bad)


def test_hf_tokenizer_matches_builtin_format(hf_dir):
    hf = load_tokenizer(hf_dir)
    assert isinstance(hf, HFTokenizer)
    for gen in (False, True):
        ids = hf.apply_chat_template(CONV, add_generation_prompt=gen)
        assert hf.decode(ids) == render_llama3_chat(CONV, gen)
        assert ids[0] == hf.bos_id
    ids = hf.apply_chat_template(CONV)
    assert ids.count(hf.eot_id) == 4  # three turns + the literal special in user text


def test_hf_tokenizer_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_load_tokenizer_byte_spec():
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert isinstance(load_tokenizer(None), ByteTokenizer)
