"""Tokenizers: a local Hugging Face tokenizer directory, or a built-in byte-level one.

Both render conversations in the Llama-3.1 chat format, so the embedded demo needs no download.

Llama-3.1 chat format (what `render_llama3_chat` writes, and what the Nemotron reward model reads):

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{content}<|eot_id|>

(one line, no newline between turns). Message contents are stripped, as Meta's template does.
With add_generation_prompt the text ends with an open assistant header. The date preamble that
Meta's own template adds to the system turn is not written by the built-in renderer; a real
Llama-3.1 tokenizer directory uses its own chat template (HFTokenizer), preamble included.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from nemokern.errors import ConfigError

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|finetune_right_pad_id|>"
LLAMA3_SPECIAL_TOKENS = (BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, EOT, PAD)
CHAT_ROLES = ("system", "user", "assistant", "ipython", "tool")


def _check_messages(messages) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(
            "a conversation must be a non-empty list of {'role': ..., 'content': ...} dicts"
        )
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(
                f"message {i} must be a dict with 'role' and 'content', got {msg!r:.80}"
            )
        if msg["role"] not in CHAT_ROLES:
            raise ValueError(f"message {i} has role {msg['role']!r}; expected one of {CHAT_ROLES}")
        if not isinstance(msg["content"], str):
            raise ValueError(
                f"message {i} content must be a string, got {type(msg['content']).__name__}"
            )


def render_llama3_chat(messages, add_generation_prompt: bool = False) -> str:
    """Render [{'role', 'content'}, ...] as Llama-3.1 chat text (see the module docstring)."""
    _check_messages(messages)
    parts = [BEGIN_OF_TEXT]
    for msg in messages:
        parts.append(f"{START_HEADER}{msg['role']}{END_HEADER}\n\n{msg['content'].strip()}{EOT}")
    if add_generation_prompt:
        parts.append(f"{START_HEADER}assistant{END_HEADER}\n\n")
    return "".join(parts)


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; the Llama-3.1 special tokens follow (256..261).

    vocab_size is 262; a model may have a larger embedding (rows never produced stay unused).
    """

    def __init__(self):
        self.special_ids = {tok: 256 + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self._special_by_id = {v: k for k, v in self.special_ids.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in LLAMA3_SPECIAL_TOKENS) + ")")
        self.vocab_size = 256 + len(LLAMA3_SPECIAL_TOKENS)

    @property
    def bos_id(self) -> int:
        return self.special_ids[BEGIN_OF_TEXT]

    @property
    def eot_id(self) -> int:
        return self.special_ids[EOT]

    @property
    def pad_id(self) -> int:
        return self.special_ids[PAD]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Ids that end a generated turn: <|eot_id|> and <|end_of_text|>."""
        return (self.special_ids[EOT], self.special_ids[END_OF_TEXT])

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Bytes of `text`; special-token strings become their ids when allow_special."""
        if not allow_special:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece in self.special_ids:
                ids.append(self.special_ids[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        out, buf = [], bytearray()
        for i in (int(x) for x in ids):
            if 0 <= i < 256:
                buf.append(i)
                continue
            if i not in self._special_by_id:
                raise ConfigError(
                    f"token id {i} is outside the byte tokenizer's vocabulary "
                    f"(0..{self.vocab_size - 1}); a model whose vocabulary is larger needs its "
                    "own tokenizer (--tokenizer DIR)"
                )
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special:
                out.append(self._special_by_id[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> list[int]:
        return self.encode(render_llama3_chat(messages, add_generation_prompt))


class HFTokenizer:
    """A tokenizer directory on local disk (tokenizer.json, tokenizer_config.json); no hub ids."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"tokenizer directory {path!r} does not exist (hub downloads are not supported)"
            )
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            raise ConfigError(f"could not load a tokenizer from {path!r}: {exc}") from exc
        self.path = path
        missing = [
            t
            for t in (BEGIN_OF_TEXT, EOT)
            if self.tok.convert_tokens_to_ids(t) in (None, self.tok.unk_token_id)
        ]
        if missing:
            raise ConfigError(f"tokenizer {path!r} lacks the Llama-3.1 special tokens {missing}")
        self.vocab_size = len(self.tok)

    def _id(self, token: str) -> int:
        return int(self.tok.convert_tokens_to_ids(token))

    @property
    def bos_id(self) -> int:
        return self._id(BEGIN_OF_TEXT)

    @property
    def eot_id(self) -> int:
        return self._id(EOT)

    @property
    def pad_id(self) -> int:
        pad = self.tok.convert_tokens_to_ids(PAD)
        return int(pad) if pad not in (None, self.tok.unk_token_id) else self.eot_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        ids = [self.eot_id]
        end = self.tok.convert_tokens_to_ids(END_OF_TEXT)
        if end not in (None, self.tok.unk_token_id):
            ids.append(int(end))
        return tuple(ids)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        if allow_special:
            return list(self.tok.encode(text, add_special_tokens=False))
        # split_special_tokens keeps "<|eot_id|>" in user text from becoming a control token
        return list(
            self.tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        )

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> list[int]:
        _check_messages(messages)
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        else:
            text = render_llama3_chat(messages, add_generation_prompt)
        return self.encode(text)


def load_tokenizer(path: str | os.PathLike | None = None):
    """None or "byte" -> the built-in ByteTokenizer (what `--tokenizer byte` names); a local
    directory -> HFTokenizer."""
    return ByteTokenizer() if path is None or path == "byte" else HFTokenizer(path)
