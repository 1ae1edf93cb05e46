"""Data a run cannot learn from, or reads wrongly, stops before any step with one message naming
the file (and line): --split without a split column, rows past the model's positions, prompts
given as turns that end on an assistant turn, pairs that are all ties or all identical; and the
chat layouts TRL users write (prompt-less conversations, repeated prompt turns, completions of
conversational prompts as message lists)."""

import json

import pytest
import torch

from nemokern.data import DataError, read_examples
from nemokern.data.prompts import read_prompts
from nemokern.data.sft import read_sft
from nemokern.data.synthetic import write_synthetic
from nemokern.data.tokenizer import ByteTokenizer
from nemokern.trainers.reinforce import ReinforceConfig, ReinforceTrainer
from nemokern.trainers.reward import RewardConfig, RewardTrainer
from nemokern.trainers.sft import SFTConfig, SFTTrainer

TOK = ByteTokenizer()
USER = {"role": "user", "content": "What color is the sky?"}
BLUE = {"role": "assistant", "content": "It is blue."}
GREEN = {"role": "assistant", "content": "It is green."}
COMMON = dict(progress=False, tensorboard=False, max_steps=1, device="cpu")


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_split_on_a_file_without_a_split_column_is_refused(tmp_path):
    rows = jsonl(tmp_path / "rb.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match=r"split='train' \(--split\) .* no row of .*rb.jsonl"):
        read_examples(rows, split="train")
    hs2 = write_synthetic(tmp_path / "hs2.jsonl", 4, "helpsteer2")
    with pytest.raises(ValueError, match="has a 'split' value; drop --split"):
        RewardTrainer(RewardConfig(data=hs2, split="train", out=str(tmp_path / "o"), **COMMON))
    pref = write_synthetic(tmp_path / "pref.jsonl", 8, "hs2-preference", val_fraction=0.5)
    assert len(read_examples(pref, split="val").examples) < 8  # a split column: kept as before


def test_a_prompt_given_as_turns_must_end_on_a_user_turn(tmp_path):
    """Each reader refuses it naming file:line (it used to train on the assistant turn as if it
    were the prompt's question, or generate after it)."""
    ends_on_assistant = [USER, BLUE]
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": [USER]}, {"prompt": ends_on_assistant}])
    match = r"p.jsonl:2: field 'prompt': bad value: its last turn is 'assistant'; a prompt ends"
    with pytest.raises(DataError, match=match):
        read_prompts(path, TOK)
    pairs = [{"prompt": [USER]}, {"prompt": ends_on_assistant}]
    path = jsonl(tmp_path / "p.jsonl", [dict(r, chosen="a", rejected="b") for r in pairs])
    with pytest.raises(DataError, match=match):
        read_examples(path)
    path = jsonl(tmp_path / "p.jsonl", [dict(r, response="a") for r in pairs])
    with pytest.raises(DataError, match=match):
        read_sft(path, TOK)


def test_pairs_without_a_prompt_column_split_off_their_shared_turns(tmp_path):
    """chosen/rejected as whole conversations, no prompt column: the prompt is the turns both
    start with; the pair reads as the same pair written with a prompt column."""
    implicit = {"chosen": [USER, BLUE], "rejected": [USER, GREEN]}
    explicit = {"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN]}
    path = jsonl(tmp_path / "implicit.jsonl", [implicit])
    read = read_examples(path)
    ours, theirs = read.examples[0], read_examples([explicit]).examples[0]
    assert (ours.prompt, ours.chosen, ours.rejected) == (
        theirs.prompt,
        theirs.chosen,
        theirs.rejected,
    )
    assert "1 rows: no prompt column: the prompt is the turns chosen and rejected start with" in (
        read.summary()
    )
    with pytest.raises(DataError, match="do not start with the same turns"):
        read_examples([{"chosen": [BLUE], "rejected": [GREEN]}], layout="pairs")


def test_chosen_and_rejected_that_repeat_the_prompt_are_read_once(tmp_path):
    """A prompt column plus whole conversations in chosen/rejected used to render the user turn
    twice; now the repeated turns are read once and counted, and a row where only one of the
    two repeats them is refused."""
    repeated = {"prompt": [USER], "chosen": [USER, BLUE], "rejected": [USER, GREEN]}
    read = read_examples([repeated, dict(repeated, prompt=USER["content"])])
    explicit = read_examples([{"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN]}])
    for pair in read.examples:
        assert (pair.prompt, pair.chosen, pair.rejected) == (
            explicit.examples[0].prompt,
            explicit.examples[0].chosen,
            explicit.examples[0].rejected,
        )
    assert "2 rows: chosen and rejected repeat the prompt column's turns: read once" in (
        read.summary()
    )
    with pytest.raises(DataError, match="'chosen': bad value: it repeats the prompt's turns and"):
        read_examples([dict(repeated, rejected=[GREEN])])
    with pytest.raises(DataError, match="'rejected': .*its first turn is 'user'; a response"):
        other = {"role": "user", "content": "And the sea?"}
        read_examples([dict(repeated, chosen=[BLUE], rejected=[other, GREEN])])


def test_pairs_that_are_all_ties_or_identical_are_refused(tmp_path):
    ties = write_synthetic(tmp_path / "ties.jsonl", 6, "hs2-preference", ties=1.0)
    cfg = dict(out=str(tmp_path / "o"), **COMMON)
    with pytest.raises(ValueError, match=r"none of its 6 pairs can train bt: 6 are ties"):
        RewardTrainer(RewardConfig(data=ties, loss="bt", **cfg))
    same = [{"prompt": "q", "chosen": "same", "rejected": "same"}] * 3
    path = jsonl(tmp_path / "same.jsonl", same)
    with pytest.raises(ValueError, match=r"0 are ties .* and 3 have chosen and rejected the same"):
        RewardTrainer(RewardConfig(data=path, loss="bt", **cfg))
    mixed = jsonl(
        tmp_path / "mixed.jsonl", same + [{"prompt": "q", "chosen": "a", "rejected": "b"}]
    )
    trainer = RewardTrainer(RewardConfig(data=mixed, loss="bt", **cfg))
    assert "3 pairs whose chosen and rejected are the same tokens" in trainer.train_data.summary()


def test_rows_longer_than_the_model_positions_are_refused(tmp_path):
    """The tiny model has 512 positions; max_length 4096 used to let a 700-token row train past
    them. Refused naming the row and the --max-length that cuts it; with it the row is cut."""
    long = "x" * 700
    sft = jsonl(
        tmp_path / "sft.jsonl",
        [{"prompt": "q", "response": "a"}, {"prompt": long, "response": "a"}],
    )
    cfg = dict(out=str(tmp_path / "o"), **COMMON)
    match = r"sft.jsonl:2: \d+ tokens exceed the model's max_position_embeddings \(512\); set "
    match += "--max-length 512"
    with pytest.raises(DataError, match=match):
        SFTTrainer(SFTConfig(data=sft, **cfg))
    assert SFTTrainer(SFTConfig(data=sft, max_length=512, **cfg)).train_data.truncated == 1
    pairs = jsonl(tmp_path / "rb.jsonl", [{"prompt": long, "chosen": "a", "rejected": "b"}] * 2)
    with pytest.raises(DataError, match=r"rb.jsonl:1: \d+ tokens exceed .*\(512\)"):
        RewardTrainer(RewardConfig(data=pairs, loss="bt", **cfg))


def test_completions_of_conversational_prompts_reach_the_reward_function_as_messages(tmp_path):
    """As TRL's GRPO/RLOO trainers pass them: a prompt given as turns gets each completion as
    [{"role": "assistant", "content": text}], a string prompt the text."""
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": [USER]}, {"prompt": "Say a."}])
    seen = {}

    def record(prompts, completions, **kw):
        for p, c in zip(prompts, completions):
            seen[isinstance(p, list)] = c
        return [0.0] * len(completions)

    torch.manual_seed(0)
    cfg = ReinforceConfig(
        prompts=path, out=str(tmp_path / "o"), max_new_tokens=3, prompts_per_step=2, k=2, **COMMON
    )
    ReinforceTrainer(cfg, reward_fn=record).fit()
    assert isinstance(seen[False], str)
    assert isinstance(seen[True], list) and len(seen[True]) == 1
    assert seen[True][0]["role"] == "assistant" and isinstance(seen[True][0]["content"], str)
