import pytest

from nemokern.data.readers import HELPFULNESS_INDEX, LAYOUTS, read_examples
from nemokern.data.synthetic import (
    GOOD_WORDS,
    synthetic_helpfulness,
    synthetic_rows,
    write_synthetic,
)


def test_deterministic_from_the_seed():
    assert synthetic_rows(20, "pairs", seed=3) == synthetic_rows(20, "pairs", seed=3)
    assert synthetic_rows(20, "pairs", seed=3) != synthetic_rows(20, "pairs", seed=4)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".parquet"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_written_files_read_back_in_their_layout(tmp_path, layout, suffix):
    path = write_synthetic(tmp_path / f"syn{suffix}", 25, layout, seed=1, multi_turn=0.5)
    result = read_examples(path)
    assert result.layout == layout and len(result.examples) == 25 and not result.bad_rows
    multi = [
        e
        for e in result.examples
        if len(getattr(e, "prompt", None) or e.messages[: e.prompt_turns]) == 3
    ]
    assert multi  # earlier turns come back as chat turns (from markers or from turn lists)


def test_the_rule_decides_every_label_and_preference():
    for ex in read_examples(synthetic_rows(200, "helpsteer2", seed=0)).examples:
        assert ex.labels[HELPFULNESS_INDEX] == synthetic_helpfulness(ex.messages[-1]["content"])
    pairs = read_examples(synthetic_rows(200, "hs2-preference", seed=0, ties=0.25)).examples
    ties = [p for p in pairs if p.strength == 0]
    assert 20 < len(ties) < 80
    for p in pairs:
        good = [synthetic_helpfulness(r[0]["content"]) for r in (p.chosen, p.rejected)]
        assert p.strength == min(3, good[0] - good[1])
    for p in read_examples(synthetic_rows(200, "pairs", seed=0)).examples:
        good = [synthetic_helpfulness(r[0]["content"]) for r in (p.chosen, p.rejected)]
        assert good[0] > good[1]
        assert p.subset == ("synthetic-easy" if good[0] - good[1] >= 2 else "synthetic-hard")
    assert synthetic_helpfulness(" ".join(GOOD_WORDS[:3]) + " wrong the") == 3


def test_val_split_and_bad_layout():
    rows = synthetic_rows(100, "hs2-preference", seed=0, val_fraction=0.3)
    n_val = sum(r["split"] == "val" for r in rows)
    assert 15 < n_val < 45
    assert len(read_examples(rows, split="val").examples) == n_val
    with pytest.raises(ValueError, match="unknown layout 'sft'"):
        synthetic_rows(3, "sft")
