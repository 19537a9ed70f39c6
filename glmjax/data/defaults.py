"""Default values of the ``data.*`` and ``objective.*`` config sections (owned by the data package)."""
from __future__ import annotations

import ml_collections


def data_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "stdlib"  # name of a registered seqio Task or Mixture; "stdlib" = the embedded default corpus
    c.tokenizer = ""  # path to a SentencePiece model; "" = train one from the task's text and cache it
    c.cache_dir = ""  # where trained tokenizers are cached; "" = ~/.cache/glmjax
    c.shuffle_buffer = 1024
    c.prefetch = 2  # batches prepared ahead by the prefetch thread
    return c


def objective_config() -> ml_collections.ConfigDict:
    """Mixture weights of the pretraining objectives (normalised at use) and their knobs."""
    c = ml_collections.ConfigDict()
    c.causal = 1.0  # plain causal LM
    c.mask = 0.0  # [MASK]: Poisson spans
    c.smask = 0.0  # [sMASK]: whole sentences
    c.gmask = 0.0  # [gMASK]: one suffix span
    c.mask_ratio = 0.15
    c.poisson_lambda = 3.0
    c.gmask_min_ratio = 0.5
    c.gmask_max_ratio = 1.0
    return c
