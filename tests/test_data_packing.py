import copy

import pytest
import torch

from nemokern.data.packing import RewardDataset, encode_conversation, load_reward_data
from nemokern.data.readers import ATTRIBUTES, HELPFULNESS_INDEX
from nemokern.data.synthetic import synthetic_rows
from nemokern.data.tokenizer import ByteTokenizer, HFTokenizer
from nemokern.errors import ConfigError

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def pairs():
    return load_reward_data(synthetic_rows(40, "hs2-preference", seed=1, ties=0.2), TOK)


@pytest.fixture(scope="module")
def regression():
    return load_reward_data(synthetic_rows(30, "helpsteer2", seed=2), TOK)


def _unshared(dataset):
    """The dataset with shared_prefix off (both sequences of a pair packed whole)."""
    dataset = copy.copy(dataset)
    dataset.shared_prefix = False
    return dataset


def _segments(batch):
    """Each sequence's ids (a pair's shared prefix included)."""
    return [batch.sequence(s).tolist() for s in range(batch.num_sequences)]


def test_regression_batch_layout(regression):
    batch = regression.batch([3, 0, 7])
    assert batch.kind == "regression" and batch.num_rows == 3 == batch.num_sequences
    for t in (batch.input_ids, batch.cu_seqlens, batch.position_ids, batch.last_index):
        assert t.dtype == torch.int64 and t.device.type == "cpu"
    assert batch.labels.dtype == torch.float32 and batch.labels.shape == (3, len(ATTRIBUTES))
    assert (batch.labels[:, :4] == -100).all()
    assert batch.pair_index is None and batch.strength is None
    assert batch.cu_seqlens[0] == 0 and batch.cu_seqlens[-1] == batch.num_tokens
    assert torch.equal(batch.last_index, batch.cu_seqlens[1:] - 1)
    assert batch.max_seqlen == int((batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).max())
    for (a, b), seg, i in zip(
        zip(batch.cu_seqlens[:-1], batch.cu_seqlens[1:]), _segments(batch), [3, 0, 7]
    ):
        assert torch.equal(batch.position_ids[a:b], torch.arange(b - a))
        ex = regression.read.examples[i]
        assert seg == TOK.apply_chat_template(list(ex.messages))  # rendered, no generation prompt
        assert seg[-1] == TOK.eot_id
        assert batch.labels[[3, 0, 7].index(i), HELPFULNESS_INDEX] == ex.labels[HELPFULNESS_INDEX]
    assert batch.rows == [3, 0, 7] and batch.where[0] == "<list> row 3"


def test_pair_batch_layout(pairs):
    batch = pairs.batch([5, 2])
    assert batch.kind == "pairs" and batch.num_rows == 2 and batch.num_sequences == 4
    assert pairs.layout == "hs2-preference"
    assert batch.pair_index.tolist() == [0, 0, 1, 1]
    assert batch.strength.dtype == torch.float32
    for p, i in enumerate([5, 2]):
        ex = pairs.read.examples[i]
        chosen, rejected = _segments(batch)[2 * p : 2 * p + 2]
        assert chosen == TOK.apply_chat_template(list(ex.prompt + ex.chosen))
        assert rejected == TOK.apply_chat_template(list(ex.prompt + ex.rejected))
        assert batch.strength[p] == ex.strength


def test_token_budget_keeps_pairs_together_and_covers_every_row(pairs):
    budget = 3 * max(e.num_tokens for e in pairs.examples)
    loader = pairs.batches(max_tokens_per_batch=budget, seed=3)
    seen = []
    for batch in loader:
        assert batch.num_tokens <= budget
        assert batch.num_sequences == 2 * batch.num_rows
        seen += batch.rows
    assert sorted(seen) == list(range(len(pairs)))
    assert loader.epoch == 1 and loader.next_batch == 0


def test_rows_per_batch_and_drop_last(regression):
    sizes = [b.num_rows for b in regression.batches(rows_per_batch=8, shuffle=False)]
    assert sizes == [8, 8, 8, 6]
    kept = [b.rows for b in regression.batches(rows_per_batch=8, drop_last=True, shuffle=False)]
    assert kept == [list(range(i, i + 8)) for i in (0, 8, 16)]


def test_batching_option_errors(pairs):
    with pytest.raises(ValueError, match="exactly one"):
        pairs.batches()
    with pytest.raises(ValueError, match="exactly one"):
        pairs.batches(max_tokens_per_batch=10_000, rows_per_batch=4)
    with pytest.raises(ConfigError, match="^rows_per_batch: must be a positive integer"):
        pairs.batches(rows_per_batch=0)
    with pytest.raises(ConfigError, match="^seed: must be a non-negative integer"):
        pairs.batches(rows_per_batch=2, seed=-1)
    with pytest.raises(ValueError, match="drop_last applies to rows_per_batch"):
        pairs.batches(max_tokens_per_batch=10_000, drop_last=True)
    biggest = max(range(len(pairs)), key=lambda i: pairs.examples[i].num_tokens)
    with pytest.raises(
        ValueError,
        match=rf"^<list> row {biggest}: a row of \d+ tokens does not fit "
        r"max_tokens_per_batch=50; raise it",
    ):
        pairs.batches(max_tokens_per_batch=50)


def test_order_is_seeded_and_changes_per_epoch(pairs):
    def rows(seed, epochs=2):
        loader = pairs.batches(rows_per_batch=4, seed=seed)
        return [[b.rows for b in loader] for _ in range(epochs)]

    a, b, c = rows(0), rows(0), rows(1)
    assert a == b and a != c
    assert a[0] != a[1] and sorted(r for batch in a[1] for r in batch) == list(range(len(pairs)))
    plain = pairs.batches(rows_per_batch=4, shuffle=False)
    assert [r for batch in plain for r in batch.rows] == list(range(len(pairs)))


@pytest.mark.parametrize("options", [{"rows_per_batch": 3}, {"max_tokens_per_batch": 1000}])
def test_resume_exactly_mid_epoch(pairs, options):
    whole = pairs.batches(seed=5, **options)
    per_epoch = len(whole)
    reference = [b for _ in range(3) for b in whole]

    stop = per_epoch + per_epoch // 2  # in the middle of the second epoch
    first = pairs.batches(seed=5, **options)
    got, it = [], iter(first)
    while len(got) < stop:
        try:
            got.append(next(it))
        except StopIteration:
            it = iter(first)
    state = first.state_dict()

    resumed = pairs.batches(seed=5, **options)
    resumed.load_state_dict(state)
    for _ in range(2):
        got += list(resumed)
    got = got[: len(reference)]
    assert len(got) == len(reference)
    for x, y in zip(got, reference):
        assert x.rows == y.rows and torch.equal(x.input_ids, y.input_ids)
        assert torch.equal(x.cu_seqlens, y.cu_seqlens) and torch.equal(x.strength, y.strength)

    with pytest.raises(ValueError, match="fingerprint"):
        pairs.batches(seed=6, **options).load_state_dict(state)


def test_breaking_after_the_last_batch_moves_to_the_next_epoch(regression):
    loader = regression.batches(rows_per_batch=10, seed=0)
    it = iter(loader)
    for _ in range(len(loader)):
        next(it)
    assert loader.state_dict()["next_batch"] == len(loader)
    epoch1 = [b.rows for b in loader]
    assert loader.epoch == 2 and epoch1 == [p for p in loader.plan(1)]


def test_select_repacks_a_sub_batch(pairs, regression):
    for data in (pairs, regression):
        batch = data.batch([4, 1, 9, 6])
        sub = batch.select([2, 0])
        want = data.batch([9, 4])
        for name in ("input_ids", "cu_seqlens", "position_ids", "last_index"):
            assert torch.equal(getattr(sub, name), getattr(want, name)), name
        assert sub.rows == [9, 4] and sub.where == want.where
        for name in ("labels", "pair_index", "strength"):
            a, b = getattr(sub, name), getattr(want, name)
            assert (a is None and b is None) or torch.equal(a, b)
        moved = batch.to("meta")
        assert moved.input_ids.device.type == "meta" and moved.rows == batch.rows
        assert (moved.labels is None) == (batch.labels is None)


def test_truncation_from_the_left_of_the_prompt_is_counted():
    long_prompt = "".join(f"word{i} " for i in range(200))
    rows = [
        {"prompt": long_prompt, "chosen": "Good answer.", "rejected": "Bad."},
        {"prompt": "Short?", "chosen": "Yes.", "rejected": "No."},
    ]
    data = load_reward_data(rows, TOK, max_length=120)
    first = data.examples[0]
    for seq, resp in zip(first.sequences, ("Good answer.", "Bad.")):
        full = TOK.apply_chat_template(
            [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": resp}]
        )
        assert len(seq) == 120 and seq[0] == TOK.bos_id
        assert seq[1:].tolist() == full[len(full) - 119 :]  # the prompt's start is what was cut
        assert TOK.decode(seq).endswith(f"{resp}<|eot_id|>")
    assert (data.truncated, data.truncated_response) == (2, 0)
    assert (
        "2 of 4 sequences longer than max_length=120 were truncated from the left" in data.summary()
    )
    assert data.examples[1].truncated == 0

    deep = load_reward_data(
        [{"prompt": "Hi", "chosen": "x" * 100, "rejected": "y"}], TOK, max_length=40
    )
    assert (deep.truncated, deep.truncated_response) == (1, 1)
    seq = deep.examples[0].sequences[0]
    assert len(seq) == 40 and seq[0] == TOK.bos_id and seq[-1] == TOK.eot_id
    assert "(1 of them into the response)" in deep.summary()
    with pytest.raises(ConfigError, match="^max_length: must be at least 2"):
        load_reward_data(rows, TOK, max_length=1)


def test_encode_without_bos_or_prefix_stable_template():
    class Plain:  # renders responses before prompts: the prompt is no prefix of the conversation
        def apply_chat_template(self, messages, add_generation_prompt=False):
            return [ord(c) for m in reversed(messages) for c in m["content"]]

    ids, cut, deep = encode_conversation(
        Plain(),
        [{"role": "user", "content": "abcdef"}],
        [{"role": "assistant", "content": "xyz"}],
        4,
    )
    assert ids.tolist() == [ord(c) for c in "cdef"] and cut and not deep


def test_hf_tokenizer_chat_template_and_vocab_check(hf_dir):
    tok = HFTokenizer(hf_dir)
    rows = synthetic_rows(6, "pairs", seed=4, multi_turn=0.5)
    data = load_reward_data(rows, tok, max_length=64)
    batch = data.batch(range(len(data)))
    for seg, ex in zip(_segments(batch)[::2], data.read.examples):
        full = tok.apply_chat_template(list(ex.prompt + ex.chosen))
        assert seg == (full if len(full) <= 64 else full[:1] + full[-63:])
        assert seg[0] == tok.bos_id and seg[-1] == tok.eot_id
    assert data.truncated > 0
    data.check_vocab(tok.vocab_size)
    data.check_vocab(tok.vocab_size + 100)  # a model vocabulary larger than the tokenizer's is fine
    with pytest.raises(ValueError, match="model's vocabulary has 10 rows"):
        data.check_vocab(10)


def test_packed_batch_drives_the_model_like_separate_sequences(pairs):
    from nemokern.model import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Llama(cfg).eval()
    whole = _unshared(pairs).batch([0, 3])
    shared = pairs.batch([0, 3])
    assert whole.parents is None and shared.parents is not None
    assert shared.num_tokens < whole.num_tokens  # each pair's prompt packed once
    for batch in (whole, shared):
        with torch.no_grad():
            packed = model.hidden_states(
                batch.input_ids,
                cu_seqlens=batch.cu_seqlens,
                parents=batch.parents,
                position_ids=batch.position_ids,
            ).reshape(-1, cfg.hidden_size)
            last = packed[batch.last_index]
            for s, seg in enumerate(_segments(batch)):
                alone = model.hidden_states(torch.tensor([seg]))[0, -1]
                torch.testing.assert_close(last[s], alone, rtol=1e-4, atol=1e-5)


def test_dataset_errors():
    with pytest.raises(ConfigError, match="no usable rows in the rows$"):
        RewardDataset([], "pairs")
    with pytest.raises(ConfigError, match="^kind: must be"):
        RewardDataset([], "sft")


def test_pair_common_prefix_is_packed_once():
    """By hand: the longest common prefix of chosen and rejected, each keeping its last token;
    no shared segment when the pair differs at the first token; whole sequences back from
    sequence() and select()."""
    import numpy as np

    from nemokern.data.packing import RewardDataset, TokenizedExample

    def ex(a, b):
        seqs = (np.array(a, dtype=np.int32), np.array(b, dtype=np.int32))
        return TokenizedExample(seqs, "x", strength=1.0)

    data = RewardDataset(
        [ex([1, 2, 3, 4], [1, 2, 3, 5, 6]), ex([7, 8], [9]), ex([4, 4], [4, 4])], "pairs"
    )
    b = data.batch([0, 1, 2])
    # [1 2 3] [4] [5 6] | [7 8] [9] | [4] [4] [4]
    assert b.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 4, 4, 4]
    assert b.cu_seqlens.tolist() == [0, 3, 4, 6, 8, 9, 10, 11, 12]
    assert b.parents.tolist() == [-1, 0, 0, -1, -1, -1, 5, 5]
    assert b.position_ids.tolist() == [0, 1, 2, 3, 3, 4, 0, 1, 0, 0, 1, 1]
    assert b.last_index.tolist() == [3, 5, 7, 8, 10, 11]
    assert [b.sequence(s).tolist() for s in range(6)] == [
        [1, 2, 3, 4],
        [1, 2, 3, 5, 6],
        [7, 8],
        [9],
        [4, 4],
        [4, 4],
    ]
    sub = b.select([2, 0])
    assert [sub.sequence(s).tolist() for s in range(4)] == [
        [4, 4],
        [4, 4],
        [1, 2, 3, 4],
        [1, 2, 3, 5, 6],
    ]
    assert sub.parents is not None and sub.rows == [2, 0]
