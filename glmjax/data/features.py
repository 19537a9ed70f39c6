"""Packs GLM examples into the model features of DESIGN.md §4.

Task features (one example, all int32, same length): ``tokens, targets, positions, block_positions,
bidirectional``. Model features (``[length]`` each, length = ``seq_len``): the same plus
``segment_ids`` (1, 2, ... per packed example, 0 on padding) and ``loss_weights`` (float32, 1 where
the target is a real token: Part B and causal examples; 0 on Part A and padding).

seqio's packer finds an example's length by counting non-zero values, and ``targets`` (Part A),
``positions``, ``block_positions`` and ``bidirectional`` hold real zeros; so every feature is stored
plus one while packing and shifted back afterwards (padding comes back as 0). The packer also reads
a key ending in ``_positions`` as one of its own, so features are renamed while packing.
"""
from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf

from glmjax.data.blank_infilling import FEATURES

MODEL_FEATURES = FEATURES + ("segment_ids", "loss_weights")

_Spec = seqio.FeatureConverter.FeatureSpec
_PACK_NAMES = {k: f"f{i}" for i, k in enumerate(FEATURES)}  # names the packer cannot misread


class GLMFeatureConverter(seqio.FeatureConverter):
    """Packs (``pack=True``) or pads examples to ``task_feature_lengths["tokens"]``."""

    TASK_FEATURES = {k: _Spec(dtype=tf.int32) for k in FEATURES}
    MODEL_FEATURES = {**{k: _Spec(dtype=tf.int32) for k in FEATURES + ("segment_ids",)},
                      "loss_weights": _Spec(dtype=tf.float32)}
    PACKING_FEATURE_DTYPES = {}

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        lengths = {_PACK_NAMES[k]: task_feature_lengths[k] for k in FEATURES}
        ds = ds.map(lambda ex: {_PACK_NAMES[k]: ex[k] + 1 for k in FEATURES}, num_parallel_calls=tf.data.AUTOTUNE)
        ds = self._pack_or_pad(ds, lengths)

        def restore(ex):
            out = {k: tf.maximum(ex[_PACK_NAMES[k]] - 1, 0) for k in FEATURES}
            tokens = _PACK_NAMES["tokens"]
            if self.pack:
                out["segment_ids"] = ex[tokens + "_segment_ids"]
            else:
                out["segment_ids"] = tf.cast(ex[tokens] > 0, tf.int32)
            out["loss_weights"] = tf.cast(out["targets"] > 0, tf.float32)
            return out

        return ds.map(restore, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        length = task_feature_lengths["tokens"]
        return {k: length for k in MODEL_FEATURES}
