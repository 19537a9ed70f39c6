"""Small configs and synthetic corpora for the data tests and tools (not used in training)."""
from __future__ import annotations

import os

import ml_collections
import numpy as np

from glmjax.data import defaults

_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
          "sigma tau upsilon phi chi psi omega the a of and to in is it that for on with as").split()


def data_config(task: str = "stdlib", *, cache_dir: str, seq_len: int = 128, batch_size: int = 8,
                vocab_size: int = 512, seed: int = 0, **objective) -> ml_collections.ConfigDict:
    """The config sections the data pipeline reads, small enough for tests (tokenizer in ~1 s)."""
    cfg = ml_collections.ConfigDict(dict(seed=seed, batch_size=batch_size, seq_len=seq_len, eval_steps=2,
                                         model=dict(vocab_size=vocab_size)))
    cfg.data = defaults.data_config()
    cfg.data.task = task
    cfg.data.cache_dir = cache_dir
    cfg.data.tokenizer_sample_chars = 300_000
    cfg.data.shuffle_buffer = 64
    cfg.data.prefetch = 1  # tests read a few batches: do not compute more in the background
    cfg.objective = defaults.objective_config()
    for k, v in objective.items():
        cfg.objective[k] = v
    return cfg


def random_text(rng: np.random.Generator, num_sentences: int) -> str:
    """Sentences of random words, some ending in newlines (so [sMASK] finds sentences)."""
    out = []
    for _ in range(num_sentences):
        words = rng.choice(_WORDS, size=int(rng.integers(3, 15)))
        out.append(" ".join(words).capitalize() + rng.choice([". ", "? ", "!\n", ".\n"]))
    return "".join(out)


def write_corpus(directory: str, num_files: int, seed: int = 0, sentences=(5, 60)) -> list[str]:
    """Writes ``num_files`` text files of random sentences; returns their paths."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(num_files):
        path = os.path.join(directory, f"doc{i:04d}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(random_text(rng, int(rng.integers(*sentences))))
        paths.append(path)
    return paths
