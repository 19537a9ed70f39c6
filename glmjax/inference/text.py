"""Text <-> ids for inference: the run's tokenizer, with GLM's special tokens written in the text.

Prompts may contain ``[MASK] [sMASK] [gMASK] <sop> <eop>`` literally; they become the special ids and
the text between them is encoded by the tokenizer (which never produces a special from plain text).
The Hugging Face tokenizer written by export does the same, so both give the same ids for any text.
"""
from __future__ import annotations

import re

from glmjax.data.vocab import SPECIAL_TOKENS

_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


class Tokenizer:
    """``encode(text) -> ids`` (specials recognised), ``decode(ids) -> text``, ``ids[name]``."""

    def __init__(self, encode_plain, decode_ids, special: dict[str, int], eos: int, pad: int):
        self._encode, self._decode = encode_plain, decode_ids
        self.special, self.eos, self.pad = dict(special), int(eos), int(pad)

    @classmethod
    def for_config(cls, cfg) -> "Tokenizer":
        from glmjax.data.vocab import get_vocabulary, special_ids

        vocab = get_vocabulary(cfg)
        if hasattr(vocab, "tokenizer") and hasattr(vocab.tokenizer, "piece_to_id"):
            ids = special_ids(vocab)
            sp = vocab.tokenizer
            special = dict(zip(SPECIAL_TOKENS, (ids.mask, ids.smask, ids.gmask, ids.sop, ids.eop)))
            return cls(lambda t: list(sp.encode(t)), lambda i: sp.decode(list(i)), special, ids.eos, ids.pad)
        return cls.from_vocabulary(vocab)

    @classmethod
    def from_vocabulary(cls, vocab) -> "Tokenizer":
        """Any seqio-like vocabulary with ``special_ids`` (the Hugging Face one of glmjax.data.vocab)."""
        ids = vocab.special_ids
        special = dict(zip(SPECIAL_TOKENS, (ids.mask, ids.smask, ids.gmask, ids.sop, ids.eop)))
        return cls(lambda t: list(vocab.encode(t)), lambda i: vocab.decode(list(i)), special, ids.eos, ids.pad)

    def encode(self, text: str) -> list[int]:
        out = []
        for part in _SPLIT.split(text):
            if part in self.special:
                out.append(self.special[part])
            elif part:
                out.extend(int(i) for i in self._encode(part))
        return out

    def decode(self, ids) -> str:
        """Text of ``ids``; specials are written by name, pad / eos are dropped."""
        inverse = {v: k for k, v in self.special.items()}
        out, run = [], []
        for i in map(int, ids):
            if i in inverse or i in (self.pad, self.eos):
                if run:
                    out.append(self._decode(run))
                    run = []
                if i in inverse:
                    out.append(inverse[i])
            else:
                run.append(i)
        if run:
            out.append(self._decode(run))
        return "".join(out)
