"""Small workdirs for tests and benchmarks: a tiny model trained a few steps on random GLM batches.

``trained_workdir(cfg, workdir, steps)`` runs the real training loop (``glmjax.train.loop.train``) on
synthetic packed batches (no tokenizer, no corpus) and leaves a checkpoint of the last step, so export,
import and inference are exercised on parameters that the optimizer has moved away from their init.
"""
from __future__ import annotations

import numpy as np


class _RandomBatches:
    """Deterministic random GLM batches ``[batch_size, seq_len]`` with a resumable position."""

    def __init__(self, cfg, seed: int):
        self.cfg, self.seed, self.i = cfg, seed, 0

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.i])
        self.i += 1
        B, T, V = int(self.cfg.batch_size), int(self.cfg.seq_len), int(self.cfg.model.vocab_size)
        tokens = rng.integers(8, V, (B, T + 1)).astype(np.int32)
        a = rng.integers(0, T // 2, B)
        idx = np.arange(T)[None, :]
        bidir = (idx < a[:, None]).astype(np.int32)
        return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((B, T), np.int32),
                "positions": np.minimum(idx, np.maximum(a[:, None] - 1, 0)).astype(np.int32)
                if self.cfg.model.rope_2d else np.broadcast_to(idx, (B, T)).astype(np.int32),
                "block_positions": (np.maximum(idx - a[:, None] + 1, 0) * self.cfg.model.rope_2d).astype(np.int32),
                "bidirectional": bidir, "loss_weights": (1 - bidir).astype(np.float32)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = int(state["i"])


def trained_workdir(cfg, workdir: str, steps: int = 3, seed: int = 0) -> str:
    """Train ``cfg`` for ``steps`` steps on random batches into ``workdir`` (one checkpoint at the end)."""
    from glmjax.data.pipeline import to_global
    from glmjax.train.loop import train

    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.steps, cfg.eval_every, cfg.log_every = steps, 0, steps
        cfg.checkpoint.every = 0
        cfg.checkpoint.async_save = False
    train(cfg, workdir, pipelines=(_RandomBatches(cfg, seed), lambda: _RandomBatches(cfg, seed + 1), to_global))
    return workdir
