"""The GLM pretraining objectives on one tokenized document, in numpy (DESIGN.md §4).

A document ``x_1..x_n`` is cut into chunks; each chunk draws an objective (``causal``, ``mask``,
``smask``, ``gmask``) with the configured weights and becomes one example:

* blank infilling: spans of the chunk are replaced by one mask token each (Part A); Part B lists
  the spans in random order, each as ``<sop> s_1..s_l`` with targets ``s_1..s_l <eop>``.
  ``positions``: Part A 0..|A|-1, a Part B token the position of its span's mask token;
  ``block_positions``: Part A 0, Part B 1..l+1; ``bidirectional`` 1 on Part A; Part A targets are
  the pad id 0 (no loss). With ``objective.gmask_positions=continue`` (GLM-130B) a [gMASK] example
  instead has ``positions`` 0..n+1 straight through Part B and ``block_positions`` 0.
* causal: ``tokens = c[:-1]``, ``targets = c[1:]`` for a chunk ``c`` of ``m + 1`` tokens; chunks
  overlap by one token so every token after the first is a target once.

An example grows by 2 tokens per span, so each objective's chunk length is chosen so that its
longest possible example fits ``seq_len``: packing never cuts a span.
Everything is drawn from the ``numpy.random.Generator`` passed in: same generator state, same output.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

OBJECTIVES = ("causal", "mask", "smask", "gmask")
FEATURES = ("tokens", "targets", "positions", "block_positions", "bidirectional")


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    """Everything the objectives need (built from ``objective.*``, ``seq_len`` and the vocabulary)."""

    seq_len: int
    weights: tuple[float, float, float, float]  # causal, mask, smask, gmask (normalised)
    mask_ids: tuple[int, int, int]  # [MASK], [sMASK], [gMASK]
    sop: int
    eop: int
    sentence_end: np.ndarray | None = None  # bool[vocab]: token ends a sentence (for [sMASK])
    mask_ratio: float = 0.15
    poisson_lambda: float = 3.0
    gmask_min_ratio: float = 0.5
    gmask_max_ratio: float = 1.0
    gmask_positions: str = "mask"  # mask | continue (GLM-130B: [gMASK] positions run on, no block positions)

    def __post_init__(self):
        w = np.asarray(self.weights, dtype=np.float64)
        if w.shape != (4,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"objective weights must be 4 non-negative numbers, not all 0: {self.weights}")
        object.__setattr__(self, "weights", tuple(float(x) for x in w / w.sum()))
        if not 0.0 < self.gmask_min_ratio <= self.gmask_max_ratio <= 1.0:
            raise ValueError("need 0 < objective.gmask_min_ratio <= objective.gmask_max_ratio <= 1")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"objective.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.weights[2] > 0 and self.sentence_end is None:
            raise ValueError("[sMASK] needs a sentence_end table")
        if self.gmask_positions not in ("mask", "continue"):
            raise ValueError(f"objective.gmask_positions={self.gmask_positions!r} is not one of mask, continue")
        if self.seq_len < 16:
            raise ValueError(f"seq_len={self.seq_len} is too short for the GLM objectives (>= 16)")

    def chunk_len(self, objective: str) -> int:
        """Tokens of the document one example of ``objective`` takes (its result fits seq_len)."""
        if objective == "causal":
            return self.seq_len  # plus one overlapping token
        if objective == "gmask":
            return self.seq_len - 2
        n = self.seq_len  # [MASK]/[sMASK]: at most ceil(ratio * n) spans
        while n + 2 * math.ceil(self.mask_ratio * n) > self.seq_len:
            n -= 1
        return n


def poisson_spans(n: int, rng: np.random.Generator, ratio: float, lam: float) -> np.ndarray:
    """Non-overlapping ``[start, length]`` rows (sorted) covering at least ceil(ratio*n) of n tokens.

    Lengths ~ max(1, Poisson(lam)) are drawn until they cover the target (the last one may overshoot,
    so coverage is a little above ``ratio`` on short chunks). Spans are separated by at least one
    unmasked token; the gaps are placed uniformly at random.
    """
    target = max(1, math.ceil(ratio * n))
    lengths = np.maximum(1, rng.poisson(lam, size=target))
    k = int(np.searchsorted(np.cumsum(lengths), target)) + 1
    lengths = lengths[:k]
    covered = int(lengths.sum())
    # Interior gaps >= 1: distribute the remaining free tokens over k+1 gaps uniformly.
    free = n - covered - (k - 1)
    if free < 0:  # chunk too short for these spans: one span of the target length
        return np.array([[0, min(target, n - 1)]], dtype=np.int64)
    bars = np.sort(rng.choice(free + k, size=k, replace=False))
    gaps = np.diff(np.concatenate([[-1], bars])) - 1  # k leading gaps of a composition of `free`
    gaps[1:] += 1
    starts = np.cumsum(gaps) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.stack([starts, lengths], axis=1).astype(np.int64)


def sentence_spans(is_end: np.ndarray, rng: np.random.Generator, ratio: float) -> np.ndarray:
    """Whole sentences (random ones, none longer than half the chunk) covering >= ratio of it.

    ``is_end[i]`` says token i ends a sentence. Falls back to Poisson spans when the chunk has no
    sentence short enough.
    """
    n = len(is_end)
    ends = np.flatnonzero(is_end[:-1]) + 1
    bounds = np.concatenate([[0], ends, [n]])
    starts, lengths = bounds[:-1], np.diff(bounds)
    ok = np.flatnonzero((lengths > 0) & (lengths <= n // 2))
    if len(ok) == 0:
        return poisson_spans(n, rng, ratio, 3.0)
    order = rng.permutation(ok)
    covered = np.cumsum(lengths[order])
    k = int(np.searchsorted(covered, math.ceil(ratio * n))) + 1
    chosen = np.sort(order[:k])
    return np.stack([starts[chosen], lengths[chosen]], axis=1).astype(np.int64)


def gmask_span(n: int, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """One suffix span whose length is uniform over [ceil(lo*n), floor(hi*n)] (at least 1)."""
    low = max(1, math.ceil(lo * n))
    high = max(low, math.floor(hi * n))
    length = int(rng.integers(low, high + 1))
    return np.array([[n - length, length]], dtype=np.int64)


def infill_example(chunk: np.ndarray, spans: np.ndarray, mask_id: int, sop: int, eop: int,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The blank-infilling example of ``chunk`` with ``spans`` (sorted ``[start, length]`` rows)."""
    n, k = len(chunk), len(spans)
    keep = np.ones(n, dtype=bool)
    for s, l in spans:
        keep[s:s + l] = False
    keep[spans[:, 0]] = True  # the first token of a span becomes its mask token
    part_a = chunk.copy()
    part_a[spans[:, 0]] = mask_id
    part_a = part_a[keep]
    # Position in Part A of span j's mask token: its start minus what earlier spans removed.
    mask_pos = spans[:, 0] - np.concatenate([[0], np.cumsum(spans[:-1, 1] - 1)])
    a = len(part_a)
    tokens, targets, positions, block = [part_a], [np.zeros(a, np.int64)], [np.arange(a)], [np.zeros(a, np.int64)]
    for j in rng.permutation(k):
        s, l = spans[j]
        span = chunk[s:s + l]
        tokens.append(np.concatenate([[sop], span]))
        targets.append(np.concatenate([span, [eop]]))
        positions.append(np.full(l + 1, mask_pos[j]))
        block.append(np.arange(1, l + 2))
    total = n + 2 * k
    bidir = np.zeros(total, np.int64)
    bidir[:a] = 1
    out = dict(tokens=np.concatenate(tokens), targets=np.concatenate(targets),
               positions=np.concatenate(positions), block_positions=np.concatenate(block), bidirectional=bidir)
    return {key: v.astype(np.int32) for key, v in out.items()}


def causal_example(chunk: np.ndarray) -> dict[str, np.ndarray]:
    """Next-token prediction on ``chunk`` (``m + 1`` tokens give an example of length m)."""
    m = len(chunk) - 1
    zeros = np.zeros(m, np.int32)
    return dict(tokens=chunk[:-1].astype(np.int32), targets=chunk[1:].astype(np.int32),
                positions=np.arange(m, dtype=np.int32), block_positions=zeros, bidirectional=zeros)


def make_example(chunk: np.ndarray, objective: str, spec: ObjectiveSpec, rng: np.random.Generator):
    """One example of ``objective`` on ``chunk``."""
    if objective == "causal":
        return causal_example(chunk)
    n = len(chunk)
    if objective == "mask":
        spans = poisson_spans(n, rng, spec.mask_ratio, spec.poisson_lambda)
    elif objective == "smask":
        spans = sentence_spans(spec.sentence_end[chunk], rng, spec.mask_ratio)
    elif objective == "gmask":
        spans = gmask_span(n, rng, spec.gmask_min_ratio, spec.gmask_max_ratio)
    else:
        raise ValueError(f"unknown objective {objective!r}; one of {OBJECTIVES}")
    mask_id = spec.mask_ids[OBJECTIVES.index(objective) - 1]
    ex = infill_example(chunk, spans, mask_id, spec.sop, spec.eop, rng)
    if objective == "gmask" and spec.gmask_positions == "continue":
        ex["positions"] = np.arange(len(ex["tokens"]), dtype=np.int32)
        ex["block_positions"] = np.zeros(len(ex["tokens"]), np.int32)
    return ex


def document_examples(doc: np.ndarray, spec: ObjectiveSpec, rng: np.random.Generator):
    """Cuts a tokenized document into chunks; yields ``(objective_index, example)`` per chunk.

    Each chunk first draws its objective, then takes that objective's chunk length. Chunks of fewer
    than 2 tokens (nothing to predict) are dropped.
    """
    pos, n = 0, len(doc)
    while n - pos >= 2:
        obj = int(rng.choice(4, p=spec.weights))
        name = OBJECTIVES[obj]
        length = spec.chunk_len(name)
        chunk = doc[pos:pos + length + (name == "causal")]
        pos += length
        if len(chunk) >= 2:
            yield obj, make_example(chunk, name, spec, rng)
