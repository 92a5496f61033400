"""Tokenization on the host, numpy only, with the released tokenizers' layout and truncation.

The released tokenizer files (CLIP's BPE vocabulary, DT5's sentencepiece model) are not
here, so words map to ids by a hash into the encoder's vocabulary. What an app needs
besides the ids is kept exactly as the real tokenizers do it:

* CLIP (``clip``): BOS, the words, EOS, then padding to ``max_length``; a longer prompt
  keeps its first ``max_length - 2`` words and still ends in EOS (``truncation=True``).
  The graph pools at the EOS position, which the host feeds as a one-hot.
* T5 (``t5``): the words, EOS, padding with PAD; the mask is 1 up to and including EOS.
  A longer prompt keeps its first ``max_length - 1`` words and EOS.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

KINDS = ("clip", "t5")
# CLIP's pre-tokenizer splits letters, digits and punctuation; lower case first
_WORDS = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


@dataclass(frozen=True)
class Tokenizer:
    kind: str
    max_length: int
    eos_id: int
    pad_id: int
    word_ids: tuple[int, int]  # [first, last) of the ids words hash into
    bos_id: int | None = None  # CLIP only

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown tokenizer kind {self.kind!r}; kinds: {', '.join(KINDS)}")
        if self.kind == "clip" and self.bos_id is None:
            raise ValueError("a CLIP tokenizer needs its BOS id")

    @classmethod
    def from_json(cls, raw: dict) -> "Tokenizer":
        return cls(kind=raw["kind"], max_length=int(raw["max_length"]), eos_id=int(raw["eos_id"]),
                   pad_id=int(raw["pad_id"]), word_ids=tuple(raw["word_ids"]), bos_id=raw.get("bos_id"))

    def as_json(self) -> dict:
        out = {"kind": self.kind, "max_length": self.max_length, "eos_id": self.eos_id, "pad_id": self.pad_id,
               "word_ids": list(self.word_ids), "words": "lower-cased letters, single digits and punctuation runs; "
                                                         "id = first + crc32(word) mod (last - first)"}
        if self.bos_id is not None:
            out["bos_id"] = self.bos_id
        return out

    @property
    def max_words(self) -> int:
        return self.max_length - (2 if self.kind == "clip" else 1)

    def words(self, text: str) -> list[str]:
        return _WORDS.findall(text.lower())

    def _id(self, word: str) -> int:
        first, last = self.word_ids
        return first + zlib.crc32(word.encode("utf-8")) % (last - first)

    def __call__(self, text: str) -> tuple[np.ndarray, np.ndarray, int]:
        """ids [1, L] int64, mask [1, L] int64, and how many words were cut off."""
        words = self.words(text)
        kept = words[:self.max_words]
        body = [self._id(w) for w in kept] + [self.eos_id]
        if self.kind == "clip":
            body = [self.bos_id] + body
        ids = np.full((1, self.max_length), self.pad_id, dtype=np.int64)
        ids[0, :len(body)] = body
        mask = np.zeros((1, self.max_length), dtype=np.int64)
        mask[0, :len(body)] = 1
        return ids, mask, len(words) - len(kept)

    def end_onehot(self, ids: np.ndarray) -> np.ndarray:
        """[1, L] float32, 1 at the first EOS (where CLIP pools)."""
        out = np.zeros(ids.shape, dtype=np.float32)
        out[0, int(np.argmax(ids[0] == self.eos_id))] = 1.0
        return out
