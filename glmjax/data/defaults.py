"""Default values of the ``data.*`` and ``objective.*`` config sections (owned by the data package)."""
from __future__ import annotations

import ml_collections


def data_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # What to train on: "stdlib" (the embedded default corpus), "text:GLOB", "jsonl:GLOB@field",
    # "tfds:name@field", a mixture "stdlib=0.7;text:/d/*.txt=0.3", or a registered seqio Task/Mixture.
    c.task = "stdlib"
    c.tokenizer = ""  # path to a SentencePiece model; "" = train one from the task's text and cache it
    c.cache_dir = ""  # where trained tokenizers are cached; "" = ~/.cache/glmjax
    c.tokenizer_sample_chars = 3_000_000  # characters of training text the tokenizer is trained on
    c.validation_fraction = 0.05  # share of files (JSONL: lines) held out as the validation split
    c.shuffle_buffer = 1024  # examples (chunks) shuffled together after the objective, train split only
    c.prefetch = 8  # batches the prefetch thread keeps ready (2 left the tiny step waiting 0.8% of the time)
    c.snapshot_every = 100  # batches between tf.data iterator snapshots (resume recomputes < this many); 0 = none
    # streams the global batch is made of (stream v always gives the same rows, from its own shard):
    # 0 = auto: one per row group (host) of a fresh run's layout, then the checkpoint's on every resume
    c.streams = 0
    c.on_reshard = "error"  # resumed with another host/mesh layout: "error" | "restart" (data starts over)
    c.pack = True  # pack several examples per row (False: one example per row, padded)
    return c


def objective_config() -> ml_collections.ConfigDict:
    """Mixture weights of the pretraining objectives (normalised at use) and their knobs."""
    c = ml_collections.ConfigDict()
    c.causal = 1.0  # plain causal LM
    c.mask = 0.0  # [MASK]: Poisson spans
    c.smask = 0.0  # [sMASK]: whole sentences
    c.gmask = 0.0  # [gMASK]: one suffix span
    c.mask_ratio = 0.15  # [MASK]/[sMASK]: share of a chunk's tokens covered by spans
    c.poisson_lambda = 3.0  # [MASK]: span lengths ~ max(1, Poisson(lambda))
    c.gmask_min_ratio = 0.5  # [gMASK]: the suffix is uniform in [min, max] of the chunk
    c.gmask_max_ratio = 1.0
    # [gMASK] positions: mask (Part B at the [gMASK] position, block positions 1..; GLM / ChatGLM-6B)
    # | continue (positions run on 0..n through Part B, block positions 0: GLM-130B). [MASK]/[sMASK]: always mask.
    c.gmask_positions = "mask"
    return c
