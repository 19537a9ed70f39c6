"""The SentencePiece tokenizer: trained from the task's text, cached, with the GLM special tokens.

Ids: pad=0, eos=1, unk=2, then the control symbols ``[MASK] [sMASK] [gMASK] <sop> <eop>`` (3..7),
then 256 byte pieces (byte fallback: any text encodes, nothing is ``unk``), then learned pieces.
Control symbols are never produced by encoding text, so a corpus containing the string ``[MASK]``
cannot forge one. The vocabulary size is ``model.vocab_size`` (one source of truth); SentencePiece
may learn fewer pieces on a small corpus, never more, so every id is < ``model.vocab_size``.

Normalisation is the identity and whitespace is kept as is (code and indentation survive a
round trip). Training reads a bounded, deterministic sample of the training split
(``data.tokenizer_sample_chars``) so the tiny config builds its tokenizer in seconds, and the
result is cached under ``data.cache_dir`` keyed by a hash of (source, vocab size, settings).
Concurrent builders are safe: each writes a temporary file and renames it into place.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from typing import Iterable

import numpy as np
import seqio
import sentencepiece as spm

from glmjax.data import sources

log = logging.getLogger(__name__)

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
SPECIAL_TOKENS = ("[MASK]", "[sMASK]", "[gMASK]", "<sop>", "<eop>")
_SETTINGS_VERSION = 1  # bump when the trainer settings below change (invalidates caches)
_MAX_SENTENCE_BYTES = 4096


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens of a vocabulary."""

    pad: int
    eos: int
    unk: int
    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int

    @property
    def mask_ids(self) -> tuple[int, int, int]:
        return (self.mask, self.smask, self.gmask)


def special_ids(vocab: seqio.SentencePieceVocabulary) -> SpecialIds:
    """The special ids of ``vocab`` (looked up by piece, so any compatible model works)."""
    if hasattr(vocab, "special_ids"):  # glmjax.data.hf_vocab.HFVocabulary
        return vocab.special_ids
    sp = vocab.tokenizer
    ids = [sp.piece_to_id(p) for p in SPECIAL_TOKENS]
    missing = [p for p, i in zip(SPECIAL_TOKENS, ids) if i == sp.unk_id()]
    if missing or sp.pad_id() != PAD_ID:
        raise ValueError(
            f"tokenizer {vocab.sentencepiece_model_file} lacks {missing or 'pad id 0'}: GLM needs "
            f"pad=0 and the control symbols {SPECIAL_TOKENS}. Fix: set data.tokenizer='' to train one."
        )
    return SpecialIds(PAD_ID, sp.eos_id(), sp.unk_id(), *ids)


def sentence_end_table(vocab: seqio.SentencePieceVocabulary) -> np.ndarray:
    """bool[vocab.vocab_size]: the token ends a sentence (piece ends in . ! ? or is a newline)."""
    if hasattr(vocab, "sentence_end_table"):  # glmjax.data.hf_vocab.HFVocabulary
        return vocab.sentence_end_table()
    sp = vocab.tokenizer
    table = np.zeros(sp.get_piece_size(), dtype=bool)
    newline = sp.piece_to_id("<0x0A>")
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        table[i] = (not sp.is_control(i) and piece.rstrip("▁").endswith((".", "!", "?", "\n")))
    if newline != sp.unk_id():
        table[newline] = True
    return table


def _sample_lines(texts: Iterable[str], max_chars: int) -> list[str]:
    """Lines of the first ``max_chars`` characters of ``texts`` (SentencePiece trains on lines)."""
    lines, total = [], 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            line = line.encode("utf-8")[:_MAX_SENTENCE_BYTES].decode("utf-8", errors="ignore")
            lines.append(line)
            total += len(line) + 1
            if total >= max_chars:
                return lines
    return lines


def trainer_settings(vocab_size: int) -> dict:
    """SentencePiece trainer arguments (everything but the input)."""
    return dict(
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # small corpora may learn fewer pieces; never more
        character_coverage=0.9995,
        byte_fallback=True,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        control_symbols=list(SPECIAL_TOKENS),
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        shuffle_input_sentence=False,
        num_threads=1,  # deterministic: every host builds the same model
        minloglevel=2,
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str, max_chars: int) -> str:
    """Trains a SentencePiece model on the first ``max_chars`` characters; writes it atomically."""
    t0 = time.time()
    lines = _sample_lines(texts, max_chars)
    if not lines:
        raise ValueError(f"no text to train a tokenizer for {out_path}")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, **trainer_settings(vocab_size)
        )
    except RuntimeError as e:
        if "required_chars" not in str(e) and "too high" not in str(e):
            raise
        raise ValueError(
            f"cannot train a {vocab_size}-piece tokenizer for {out_path}: {e}. It needs room for 8 special "
            "pieces, 256 byte pieces and the corpus's characters. Fix: raise model.vocab_size (>= 512 is safe)."
        ) from e
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, out_path)  # atomic: a concurrent reader sees the old file or the whole new one
    log.info("trained tokenizer %s (vocab %d, %d lines) in %.1fs", out_path, vocab_size, len(lines), time.time() - t0)
    return out_path


def cache_dir(cfg) -> str:
    return os.path.expanduser(cfg.data.cache_dir or "~/.cache/glmjax")


def cached_tokenizer_path(cfg) -> str:
    """Where the tokenizer for this config's training text lives (whether built yet or not)."""
    spec = tokenizer_source(cfg)
    key = json.dumps(
        dict(source=spec.key, vocab=int(cfg.model.vocab_size), chars=int(cfg.data.tokenizer_sample_chars),
             val=float(cfg.data.validation_fraction), settings=trainer_settings(0), v=_SETTINGS_VERSION),
        sort_keys=True,
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    name = spec.kind + "-" + str(cfg.model.vocab_size)
    return os.path.join(cache_dir(cfg), "tokenizers", f"{name}-{digest}.model")


def tokenizer_source(cfg) -> sources.SourceSpec:
    """The source whose training text trains the tokenizer: the first source of ``data.task``."""
    from glmjax.data import tasks  # local import: tasks imports this module

    return tasks.parse_task(cfg.data.task)[0][0]


def get_vocabulary(cfg) -> seqio.SentencePieceVocabulary:
    """The run's vocabulary: ``data.tokenizer`` if set (a SentencePiece model, or a Hugging Face tokenizer
    directory with ``tokenizer.json``), else the cached (built on first use) one."""
    path = cfg.data.tokenizer
    if path:
        path = os.path.expanduser(path)
        from glmjax.data.hf_vocab import HFVocabulary, is_hf_tokenizer_dir

        if is_hf_tokenizer_dir(path):
            hf = HFVocabulary(path)
            if hf.vocab_size > cfg.model.vocab_size:
                raise ValueError(f"tokenizer {path} has {hf.vocab_size} tokens > model.vocab_size="
                                 f"{cfg.model.vocab_size}. Fix: raise model.vocab_size or use a smaller tokenizer.")
            return hf
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"data.tokenizer={path!r} does not exist. Fix: build one with "
                "`python tools/train_tokenizer.py --out=PATH`, or set data.tokenizer='' to build it here."
            )
    else:
        path = cached_tokenizer_path(cfg)
        if not os.path.exists(path):
            spec = tokenizer_source(cfg)
            log.info("building tokenizer from %s -> %s", spec.key, path)
            texts = sources.iter_texts(spec, "train", cfg.data.validation_fraction)
            train_tokenizer(texts, int(cfg.model.vocab_size), path, int(cfg.data.tokenizer_sample_chars))
    vocab = seqio.SentencePieceVocabulary(path)
    if vocab.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer {path} has {vocab.vocab_size} pieces > model.vocab_size={cfg.model.vocab_size}. "
            "Fix: raise model.vocab_size or use a smaller tokenizer."
        )
    special_ids(vocab)  # fails early on an incompatible model
    return vocab
