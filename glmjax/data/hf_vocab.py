"""A Hugging Face tokenizer directory as a seqio vocabulary (``data.tokenizer=DIR``), via ``tokenizers``.

Used to continue pretraining an imported model with its own tokenizer. ``DIR/tokenizer.json`` is read
with the ``tokenizers`` library (no transformers needed); ``tokenizer_config.json`` names eos / pad.
The GLM specials ``[MASK] [sMASK] [gMASK] <sop> <eop>`` are looked up by their text (GLM-4's and
glmjax-exported tokenizers have them as added tokens); ``eos`` is the configured eos token, else
``<|endoftext|>`` or ``</s>``. Unlike the SentencePiece vocabulary, a literal ``[MASK]`` in the text
becomes the special token (that is how Hugging Face tokenizers treat added tokens).
"""
from __future__ import annotations

import json
import os

import numpy as np
import seqio
import tensorflow as tf


def is_hf_tokenizer_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json"))


class HFVocabulary(seqio.Vocabulary):
    def __init__(self, directory: str):
        from tokenizers import Tokenizer

        from glmjax.data.vocab import SPECIAL_TOKENS, SpecialIds

        self.directory = directory
        # the task registry keys tasks by the vocabulary's model file (glmjax.data.tasks)
        self.sentencepiece_model_file = os.path.join(directory, "tokenizer.json")
        self.tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        conf_path = os.path.join(directory, "tokenizer_config.json")
        conf = json.load(open(conf_path)) if os.path.isfile(conf_path) else {}

        def token_id(value):
            text = value.get("content") if isinstance(value, dict) else value
            return None if text is None else self.tokenizer.token_to_id(text)

        eos = token_id(conf.get("eos_token"))
        for fallback in ("<|endoftext|>", "</s>"):
            eos = eos if eos is not None else self.tokenizer.token_to_id(fallback)
        pad = token_id(conf.get("pad_token"))
        unk = token_id(conf.get("unk_token"))
        ids = [self.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        missing = [t for t, i in zip(SPECIAL_TOKENS, ids) if i is None] + ([] if eos is not None else ["eos"])
        if missing:
            raise ValueError(f"Hugging Face tokenizer {directory} lacks {missing}: GLM training needs the tokens "
                             f"{SPECIAL_TOKENS} and an eos token. Fix: add them to the tokenizer "
                             f"(tokenizer.add_special_tokens) and save it again, or use a SentencePiece model.")
        self._eos, self._unk = int(eos), int(unk if unk is not None else eos)
        self.special_ids = SpecialIds(int(pad if pad is not None else 0), self._eos, self._unk, *map(int, ids))
        super().__init__(extra_ids=0)

    @property
    def _base_vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def unk_id(self) -> int:
        return self._unk

    def _encode(self, s: str):
        return self.tokenizer.encode(s, add_special_tokens=False).ids

    def _decode(self, ids):
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def _encode_tf(self, s):
        out = tf.numpy_function(lambda x: np.asarray(self._encode(x.decode("utf-8")), np.int32), [s], tf.int32)
        out.set_shape([None])
        return out

    def _decode_tf(self, ids):
        return tf.numpy_function(lambda x: np.asarray(self._decode(x.tolist())).astype(object), [ids], tf.string)

    def sentence_end_table(self) -> np.ndarray:
        n = self._base_vocab_size
        table = np.zeros(n, bool)
        for token, i in self.tokenizer.get_vocab(with_added_tokens=True).items():
            text = self.tokenizer.decode([i])
            table[i] = text.rstrip().endswith((".", "!", "?")) or text.endswith("\n")
        for i in self.special_ids.mask_ids + (self.special_ids.sop, self.special_ids.eop):
            table[i] = False
        return table

    def __eq__(self, other):
        return isinstance(other, HFVocabulary) and other.directory == self.directory

    def __hash__(self):
        return hash(self.directory)
