"""Shared test helpers: random GLM-shaped batches (packed segments with bidirectional prefixes)."""
from __future__ import annotations

import numpy as np


def random_glm_features(rng: np.random.Generator, batch: int, length: int, vocab: int, *,
                        max_segments: int = 3, padding: bool = True) -> dict[str, np.ndarray]:
    """Packed rows: random segment lengths, each with a random bidirectional prefix (Part A) of length
    0..whole segment, trailing padding (segment id 0), random tokens/targets, 2D positions."""
    out = {k: np.zeros((batch, length), np.int32) for k in
           ("tokens", "targets", "segment_ids", "positions", "block_positions", "bidirectional")}
    out["loss_weights"] = np.zeros((batch, length), np.float32)
    for b in range(batch):
        used = int(rng.integers(length // 2, length + 1)) if padding else length
        n = int(rng.integers(1, max_segments + 1))
        cuts = np.sort(rng.choice(np.arange(1, used), size=min(n - 1, used - 1), replace=False)) if used > 1 else []
        bounds = [0, *cuts.tolist(), used]
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            seg_len = hi - lo
            a = int(rng.integers(0, seg_len + 1))
            out["segment_ids"][b, lo:hi] = s
            out["bidirectional"][b, lo:lo + a] = 1
            out["positions"][b, lo:hi] = np.concatenate([np.arange(a), np.full(seg_len - a, max(a - 1, 0))])
            out["block_positions"][b, lo + a:hi] = np.arange(1, seg_len - a + 1)
            out["loss_weights"][b, lo + a:hi] = 1.0
        out["tokens"][b, :used] = rng.integers(1, vocab, used)
        out["targets"][b, :used] = rng.integers(1, vocab, used)
    return out


def causal_features(rng: np.random.Generator, batch: int, length: int, vocab: int) -> dict[str, np.ndarray]:
    """One full-length causal document per row."""
    tokens = rng.integers(1, vocab, (batch, length + 1)).astype(np.int32)
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((batch, length), np.int32),
            "positions": pos, "block_positions": np.zeros((batch, length), np.int32),
            "bidirectional": np.zeros((batch, length), np.int32),
            "loss_weights": np.ones((batch, length), np.float32)}
