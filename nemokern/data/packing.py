"""Reward-model batches: examples -> chat-template token ids -> packed batches a trainer consumes.

`load_reward_data(source, tokenizer)` reads rows (readers.py), renders every conversation with the
tokenizer's chat template (no generation prompt; the reward is read at its last token) and keeps
the ids. A conversation longer than max_length loses tokens from the LEFT of its prompt (the
leading <|begin_of_text|> stays); when even the whole prompt is not enough the cut goes on into
the response, still from the left, so the last token is never cut. Both are counted in the summary.

`RewardDataset.batches(...)` packs examples into `RewardBatch`es, all sequences of a batch
concatenated with no padding: a row (one conversation, or the two of a pair) is never split across
batches. A batch holds either a number of rows or at most max_tokens_per_batch tokens. The order is
a seeded permutation per epoch, and `RewardBatches.state_dict()` records the position so a trainer
resumes exactly mid-epoch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nemokern.errors import ConfigError, DataError

from .readers import ATTRIBUTES, PreferencePair, ReadResult, read_examples


@dataclass(frozen=True)
class TokenizedExample:
    """One row's token ids: 1 sequence (regression) or 2 (chosen, rejected)."""

    sequences: tuple[np.ndarray, ...]  # int32 ids, each ending at the scored token
    where: str  # "file:line" / "source row N"
    labels: tuple[float, ...] | None = None  # regression: 9 attributes, -100 where missing
    strength: float | None = None  # pairs: m = |preference_strength|
    subset: str | None = None
    id: str | None = None
    truncated: int = 0  # sequences cut to max_length
    truncated_response: int = 0  # of those, cut past the prompt into the response

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


def encode_conversation(
    tokenizer,
    prompt: Sequence[dict],
    response: Sequence[dict],
    max_length: int,
    prompt_ids: list[int] | None = None,
):
    """Chat-template ids of prompt + response cut to max_length from the left of the prompt.

    Returns (ids int32 array, truncated: bool, into_response: bool). prompt_ids (the template of
    the prompt alone) may be passed to reuse it across the responses of a pair.
    """
    full = list(
        tokenizer.apply_chat_template(list(prompt) + list(response), add_generation_prompt=False)
    )
    if len(full) <= max_length:
        return np.asarray(full, dtype=np.int32), False, False
    if prompt_ids is None:
        prompt_ids = list(tokenizer.apply_chat_template(list(prompt), add_generation_prompt=False))
    # Templates that render the prompt as a prefix of the conversation (Llama-3.1's do) tell
    # where the response starts; for any other template the cut is reported as prompt-only.
    boundary = len(prompt_ids) if full[: len(prompt_ids)] == prompt_ids else len(full)
    head = 1 if full and full[0] == getattr(tokenizer, "bos_id", None) else 0
    cut = len(full) - max_length
    ids = full[:head] + full[head + cut :]
    return np.asarray(ids, dtype=np.int32), True, head + cut > boundary


def tokenize_example(example, tokenizer, max_length: int) -> TokenizedExample:
    """A RegressionExample or PreferencePair -> TokenizedExample."""
    if isinstance(example, PreferencePair):
        prompt_ids = None
        seqs, cuts, into = [], 0, 0
        for response in (example.chosen, example.rejected):
            ids, cut, deep = encode_conversation(
                tokenizer, example.prompt, response, max_length, prompt_ids
            )
            seqs.append(ids)
            cuts, into = cuts + cut, into + deep
        return TokenizedExample(
            tuple(seqs),
            example.where,
            strength=example.strength,
            subset=example.subset,
            id=example.id,
            truncated=cuts,
            truncated_response=into,
        )
    k = example.prompt_turns
    ids, cut, deep = encode_conversation(
        tokenizer, example.messages[:k], example.messages[k:], max_length
    )
    return TokenizedExample(
        (ids,),
        example.where,
        labels=example.labels,
        truncated=int(cut),
        truncated_response=int(deep),
    )


@dataclass
class RewardBatch:
    """A packed batch of S sequences, N tokens in all, on the CPU.

    input_ids     [N] int64   the sequences back to back, no padding; or, with parents, each
                              pair's common prefix once and then the rest of either sequence
    cu_seqlens    [G + 1] int64  segment offsets 0 ... N (Llama.hidden_states(cu_seqlens=...));
                              G = S segments, one per sequence, unless parents is set
    parents       [G] int64   or None: segment g continues segment parents[g] (-1: none), as
                              Llama.hidden_states(parents=...) takes it
    position_ids  [N] int64   each token's position in its own sequence
    last_index    [S] int64   index into N of each sequence's last token (the scored one)
    labels        [S, 9] float32  regression: attributes in ATTRIBUTES order, -100 where missing
    pair_index    [S] int64   pairs: the pair of each sequence; sequence 2p is pair p's chosen
                              response, 2p + 1 its rejected one
    strength      [P] float32 pairs: m = |preference_strength| (0: a tie)
    rows          dataset indices of the batch's rows; `where` their "file:line" / "row N"
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    position_ids: torch.Tensor
    last_index: torch.Tensor
    rows: list[int]
    where: list[str]
    subsets: list[str | None]
    max_seqlen: int
    labels: torch.Tensor | None = None
    pair_index: torch.Tensor | None = None
    strength: torch.Tensor | None = None
    parents: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        return "regression" if self.labels is not None else "pairs"

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_sequences(self) -> int:
        return int(self.last_index.numel())

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def to(self, device, non_blocking: bool = False) -> RewardBatch:
        """A copy with every tensor on `device` (cu_seqlens included; the model casts it)."""
        moved = {name: getattr(self, name) for name in _TENSORS}
        moved = {
            k: v if v is None else v.to(device, non_blocking=non_blocking) for k, v in moved.items()
        }
        return RewardBatch(
            **moved,
            rows=self.rows,
            where=self.where,
            subsets=self.subsets,
            max_seqlen=self.max_seqlen,
        )

    def select(self, rows: Sequence[int]) -> RewardBatch:
        """A new packed CPU batch of the given rows (positions 0 .. num_rows - 1 of this batch), in
        that order: micro-batches for gradient accumulation, or one data-parallel rank's share
        (e.g. range(rank, num_rows, world_size))."""
        per_row = 1 if self.labels is not None else 2
        seqs = [r * per_row + j for r in rows for j in range(per_row)]
        cu = self.cu_seqlens.cpu().numpy()
        pieces = [self.sequence(s, cu) for s in seqs]
        labels = self.labels[seqs].cpu() if self.labels is not None else None
        strength = self.strength[list(rows)].cpu() if self.strength is not None else None
        return _pack(
            pieces,
            [self.rows[r] for r in rows],
            [self.where[r] for r in rows],
            [self.subsets[r] for r in rows],
            labels,
            strength,
            shared_prefix=self.parents is not None,
        )

    def sequence(self, s: int, cu: np.ndarray | None = None) -> np.ndarray:
        """The token ids of sequence s (its shared prefix included); cu: cu_seqlens as numpy,
        when the caller already has it (select asks for every sequence)."""
        cu = self.cu_seqlens.cpu().numpy() if cu is None else cu
        own = int(np.searchsorted(cu, int(self.last_index[s]), side="right")) - 1
        parts = [self.input_ids[cu[own] : cu[own + 1]]]
        parent = -1 if self.parents is None else int(self.parents[own])
        if parent >= 0:
            parts.insert(0, self.input_ids[cu[parent] : cu[parent + 1]])
        return torch.cat(parts).cpu().numpy()


_TENSORS = (
    "input_ids",
    "cu_seqlens",
    "position_ids",
    "last_index",
    "labels",
    "pair_index",
    "strength",
    "parents",
)


def check_positions(rows, limit: int) -> None:
    """DataError naming the first longest of `rows`, (tokens, "file:line") pairs, when it is
    longer than a model's `limit` positions (max_position_embeddings): refused, not trained past
    the positions (as REINFORCE refuses a prompt too long for its policy)."""
    n, where = max(rows, key=lambda row: row[0])
    if n > limit:
        raise DataError(
            where,
            None,
            f"{n} tokens exceed the model's max_position_embeddings ({limit}); set "
            f"--max-length {limit} or less (longer rows are then cut, and counted)",
            hint=None,
        )


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of a and b, leaving each at least its last token."""
    n = min(len(a), len(b)) - 1
    if n <= 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def _pack(pieces, rows, where, subsets, labels, strength, shared_prefix=False) -> RewardBatch:
    # segments: (ids, parent segment or -1, first position); sequence s ends segment ends[s]
    segments, ends = [], []
    if shared_prefix and strength is not None:
        for a, b in zip(pieces[0::2], pieces[1::2]):
            n = _common_prefix(a, b)
            root = -1
            if n:
                root = len(segments)
                segments.append((a[:n], -1, 0))
            for seq in (a, b):
                segments.append((seq[n:], root, n))
                ends.append(len(segments) - 1)
    else:
        segments = [(p, -1, 0) for p in pieces]
        ends = list(range(len(pieces)))
    lengths = np.fromiter((len(g[0]) for g in segments), dtype=np.int64, count=len(segments))
    cu = np.zeros(len(segments) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    n = int(cu[-1])
    first = np.fromiter((g[2] for g in segments), dtype=np.int64, count=len(segments))
    position = np.arange(n, dtype=np.int64) - np.repeat(cu[:-1] - first, lengths)
    parents = None
    if len(segments) != len(pieces):
        parents = torch.tensor([g[1] for g in segments], dtype=torch.int64)
    pair_index = None
    if strength is not None:
        pair_index = torch.arange(len(pieces), dtype=torch.int64) // 2
    return RewardBatch(
        input_ids=torch.from_numpy(np.concatenate([g[0] for g in segments]).astype(np.int64)),
        cu_seqlens=torch.from_numpy(cu),
        position_ids=torch.from_numpy(position),
        last_index=torch.from_numpy(cu[1:][ends] - 1),
        rows=list(rows),
        where=list(where),
        subsets=list(subsets),
        max_seqlen=int(lengths.max()),
        labels=labels,
        pair_index=pair_index,
        strength=strength,
        parents=parents,
    )


class RewardDataset:
    """Tokenized examples of one kind ("regression" or "pairs") and how they were read.

    shared_prefix (pairs): each batch packs the common prefix of a pair's chosen and rejected
    sequences (the prompt, unless max_length cut the two differently) once, the two continuing
    it (RewardBatch.parents); False
    packs both sequences whole. The rewards are the same up to rounding.
    """

    shared_prefix = True

    def __init__(
        self,
        examples: list[TokenizedExample],
        kind: str,
        read: ReadResult | None = None,
        max_length: int | None = None,
    ):
        if kind not in ("regression", "pairs"):
            raise ConfigError(f"must be 'regression' or 'pairs', got {kind!r}", option="kind")
        if not examples:
            why = []
            if read is not None and read.other_split:
                why.append(f"{read.other_split} rows of another split left out")
            if read is not None and read.bad_rows:
                why.append(f"{sum(read.bad_rows.values())} bad rows skipped")
            raise ConfigError(
                f"no usable rows in {read.source if read else 'the rows'}"
                + (f" ({', '.join(why)})" if why else "")
            )
        self.examples, self.kind, self.read, self.max_length = examples, kind, read, max_length
        self.truncated = sum(e.truncated for e in examples)
        self.truncated_response = sum(e.truncated_response for e in examples)
        # pairs that teach a pair loss nothing: ties (strength 0, which BT losses leave out) and
        # pairs whose two sequences are the same tokens (equal rewards, gradients that cancel)
        same = [len(e.sequences) == 2 and np.array_equal(*e.sequences) for e in examples]
        self.ties = sum(e.strength == 0 for e in examples)
        self.identical = sum(same)
        self.useless = sum(e.strength == 0 or d for e, d in zip(examples, same))
        self.max_token_id = max(int(s.max()) for e in examples for s in e.sequences)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def layout(self) -> str | None:
        """The rows' layout (readers.LAYOUTS): "pairs" rows carry no strength of their own."""
        return self.read.layout if self.read is not None else None

    def summary(self) -> str:
        lines = [self.read.summary()] if self.read is not None else []
        n_seq = sum(len(e.sequences) for e in self.examples)
        lines.append(
            f"  {len(self)} {self.kind} rows, {n_seq} sequences, "
            f"{sum(e.num_tokens for e in self.examples)} tokens"
        )
        if self.ties:
            lines.append(f"  {self.ties} ties (preference strength 0): left out of BT losses")
        if self.identical:
            lines.append(
                f"  {self.identical} pairs whose chosen and rejected are the same tokens: they "
                "teach a pair loss nothing"
            )
        if self.truncated:
            lines.append(
                f"  {self.truncated} of {n_seq} sequences longer than max_length="
                f"{self.max_length} were truncated from the left of the prompt"
                + (
                    f" ({self.truncated_response} of them into the response)"
                    if self.truncated_response
                    else ""
                )
            )
        return "\n".join(lines)

    def check_positions(self, limit: int) -> None:
        """Raise when a sequence is longer than a model's `limit` positions."""
        check_positions(((len(s), e.where) for e in self.examples for s in e.sequences), limit)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise when a token id does not fit a model's vocabulary (a larger one is fine)."""
        if self.max_token_id >= vocab_size:
            raise ConfigError(
                f"the data has token id {self.max_token_id} but the model's vocabulary "
                f"has {vocab_size} rows; use the model's own tokenizer"
            )

    def batch(self, indices: Sequence[int]) -> RewardBatch:
        """Pack the examples at `indices` (in that order) into one batch."""
        exs = [self.examples[i] for i in indices]
        pieces = [s for e in exs for s in e.sequences]
        labels = strength = None
        if self.kind == "regression":
            labels = torch.tensor([e.labels for e in exs], dtype=torch.float32).reshape(
                -1, len(ATTRIBUTES)
            )
        else:
            strength = torch.tensor([e.strength for e in exs], dtype=torch.float32)
        return _pack(
            pieces,
            list(indices),
            [e.where for e in exs],
            [e.subset for e in exs],
            labels,
            strength,
            shared_prefix=self.shared_prefix,
        )

    def batches(
        self,
        *,
        max_tokens_per_batch: int | None = None,
        rows_per_batch: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> RewardBatches:
        return RewardBatches(
            self,
            max_tokens_per_batch=max_tokens_per_batch,
            rows_per_batch=rows_per_batch,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )


def load_reward_data(
    source,
    tokenizer,
    *,
    layout: str = "auto",
    max_length: int = 4096,
    skip_bad_rows: bool = False,
    split: str | None = None,
) -> RewardDataset:
    """Read `source` (path or iterable of dict rows; see readers.py) and tokenize every row.

    tokenizer: anything with apply_chat_template(messages, add_generation_prompt) -> ids (and
    optionally bos_id), e.g. nemokern.data.tokenizer.ByteTokenizer or HFTokenizer.
    """
    if max_length < 2:
        raise ConfigError(f"must be at least 2, got {max_length}", option="max_length")
    read = read_examples(source, layout, skip_bad_rows=skip_bad_rows, split=split)
    examples = [tokenize_example(e, tokenizer, max_length) for e in read.examples]
    kind = "regression" if read.layout == "helpsteer2" else "pairs"
    return RewardDataset(examples, kind, read, max_length)


class RewardBatches:
    """Packed batches of a RewardDataset, epoch after epoch, in a seeded order; resumable.

    Exactly one of max_tokens_per_batch (rows are added in order while the batch stays within the
    budget) and rows_per_batch (drop_last leaves out a last short batch). Iterating yields the rest
    of the current epoch, then moves to the next; stopping part-way leaves the position where it
    was. state_dict() taken after receiving batch k resumes at batch k + 1 of the same epoch.
    """

    def __init__(
        self,
        dataset: RewardDataset,
        *,
        max_tokens_per_batch: int | None = None,
        rows_per_batch: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if (max_tokens_per_batch is None) == (rows_per_batch is None):
            raise ConfigError("give exactly one of max_tokens_per_batch and rows_per_batch")
        budget = max_tokens_per_batch if rows_per_batch is None else rows_per_batch
        if drop_last and rows_per_batch is None:
            raise ConfigError(
                "drop_last applies to rows_per_batch only; a token budget has no "
                "'full' batch to keep"
            )
        if not isinstance(budget, int) or budget < 1:
            name = "max_tokens_per_batch" if rows_per_batch is None else "rows_per_batch"
            raise ConfigError(f"must be a positive integer, got {budget!r}", option=name)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"must be a non-negative integer, got {seed!r}", option="seed")
        self.dataset, self.shuffle, self.seed, self.drop_last = dataset, shuffle, seed, drop_last
        self.max_tokens_per_batch, self.rows_per_batch = max_tokens_per_batch, rows_per_batch
        self._sizes = np.array([e.num_tokens for e in dataset.examples], dtype=np.int64)
        if max_tokens_per_batch is not None and self._sizes.max() > max_tokens_per_batch:
            i = int(self._sizes.argmax())
            raise ConfigError(
                f"{dataset.examples[i].where}: a row of {self._sizes[i]} tokens does not fit "
                f"max_tokens_per_batch={max_tokens_per_batch}; raise it to at least "
                f"{self._sizes.max()} or lower max_length"
            )
        digest = hashlib.sha256(self._sizes.tobytes())
        digest.update(
            repr(
                (dataset.kind, max_tokens_per_batch, rows_per_batch, shuffle, seed, drop_last)
            ).encode()
        )
        self.fingerprint = digest.hexdigest()[:16]
        self.epoch, self.next_batch = 0, 0
        self._plan_epoch, self._plan = None, None

    def order(self, epoch: int) -> np.ndarray:
        """The row order of an epoch: a permutation seeded by (seed, epoch), or 0..n-1."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def plan(self, epoch: int) -> list[list[int]]:
        """The dataset indices of every batch of an epoch."""
        if self._plan_epoch == epoch:
            return self._plan
        order = self.order(epoch).tolist()
        batches: list[list[int]] = []
        if self.rows_per_batch is not None:
            k = self.rows_per_batch
            batches = [order[i : i + k] for i in range(0, len(order), k)]
            if self.drop_last and batches and len(batches[-1]) < k:
                batches.pop()
        else:
            current, tokens = [], 0
            for i in order:
                if current and tokens + self._sizes[i] > self.max_tokens_per_batch:
                    batches.append(current)
                    current, tokens = [], 0
                current.append(i)
                tokens += int(self._sizes[i])
            if current:
                batches.append(current)
        self._plan_epoch, self._plan = epoch, batches
        return batches

    def __len__(self) -> int:
        """Batches in the current epoch."""
        return len(self.plan(self.epoch))

    def __iter__(self):
        if self.next_batch >= len(self.plan(self.epoch)):
            self.epoch, self.next_batch = self.epoch + 1, 0
        plan = self.plan(self.epoch)
        while self.next_batch < len(plan):
            indices = plan[self.next_batch]
            self.next_batch += 1
            yield self.dataset.batch(indices)
        self.epoch, self.next_batch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next_batch": self.next_batch, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise ConfigError(
                "the saved data position belongs to other data or batching options (fingerprint "
                f"{state.get('fingerprint')!r}, these batches {self.fingerprint!r}); resume with "
                "the same data, max_length, batch size and seed"
            )
        self.epoch, self.next_batch = int(state["epoch"]), int(state["next_batch"])


__all__ = [
    "RewardBatch",
    "RewardBatches",
    "RewardDataset",
    "TokenizedExample",
    "encode_conversation",
    "load_reward_data",
    "tokenize_example",
]
