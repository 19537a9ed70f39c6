"""Human-readable views of packed batches: one record per packed segment (used by tools/inspect_data.py)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import seqio

from glmjax.data import sources
from glmjax.data.vocab import SPECIAL_TOKENS, special_ids


def decode(vocab: seqio.SentencePieceVocabulary, ids) -> str:
    """Text of ``ids`` with the GLM special tokens written out (SentencePiece drops control symbols)."""
    sp = vocab.tokenizer
    names = {sp.piece_to_id(p): p for p in SPECIAL_TOKENS}
    names[sp.eos_id()] = "</s>"
    out, run = [], []
    for i in map(int, ids):
        if i in names:
            out += [sp.decode(run), names[i]]
            run = []
        else:
            run.append(i)
    return "".join(out + [sp.decode(run)])


def segments(batch: dict[str, np.ndarray], vocab: seqio.SentencePieceVocabulary) -> Iterator[dict]:
    """Every packed segment of ``batch``: its row, features (int lists) and decoded Part A / spans."""
    ids = special_ids(vocab)
    kinds = {ids.mask: "mask", ids.smask: "smask", ids.gmask: "gmask"}
    for row in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][row]
        for s in range(1, int(seg.max()) + 1):
            idx = np.flatnonzero(seg == s)
            f = {k: batch[k][row, idx] for k in batch if k != "segment_ids"}
            rec = dict(row=row, segment=s, length=len(idx))
            rec.update({k: [round(float(x), 4) if v.dtype.kind == "f" else int(x) for x in v] for k, v in f.items()})
            a = int(f["bidirectional"].sum())
            if a == 0:
                rec["objective"] = "causal"
                rec["text"] = decode(vocab, list(f["tokens"]) + [int(f["targets"][-1])])
            else:
                part_a, tokens, positions = f["tokens"][:a], f["tokens"], f["positions"]
                rec["objective"] = next((kinds[int(t)] for t in part_a if int(t) in kinds), "?")
                rec["part_a"] = decode(vocab, part_a)
                starts = [i for i in range(a, len(tokens)) if tokens[i] == ids.sop] + [len(tokens)]
                rec["spans"] = [dict(position=int(positions[b]), text=decode(vocab, tokens[b + 1:e]))
                                for b, e in zip(starts[:-1], starts[1:])]
            yield rec


def split_document_counts(cfg) -> dict[str, dict[str, int | str]]:
    """Documents per split for each source of ``cfg.data.task`` (reads every document: for messages
    about small corpora, not for the hot path). TFDS sources answer ``"?"``."""
    from glmjax.data.tasks import parse_task

    out = {}
    for spec, _ in parse_task(cfg.data.task):
        if spec.kind == "tfds":
            out[spec.key] = {"train": "?", "validation": "?"}
            continue
        frac = float(cfg.data.validation_fraction)
        out[spec.key] = {split: sum(1 for _ in sources.iter_texts(spec, split, frac))
                         for split in sources.SPLITS}
    return out
