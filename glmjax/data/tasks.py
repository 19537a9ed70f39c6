"""seqio Tasks and Mixtures: source -> tokenize (+eos) -> GLM objective (DESIGN.md §4).

``data.task`` is either the name of a seqio Task/Mixture registered elsewhere (its examples must carry
the task features of ``features.py``) or a *task spec*: one source spec (see ``sources.py``) or
several joined by ``;``, each optionally with a mixing rate: ``stdlib=0.7;text:/data/*.txt=0.3``.
A spec is registered on first use under a name that hashes everything it depends on (sources,
tokenizer, objective settings), so changing any of them can never reuse a stale registration.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging

import numpy as np
import seqio
import tensorflow as tf

from glmjax.data import blank_infilling, sources, vocab as vocab_lib
from glmjax.data.blank_infilling import FEATURES, OBJECTIVES

log = logging.getLogger(__name__)


def parse_task(task: str) -> list[tuple[sources.SourceSpec, float]]:
    """``"a=0.7;b=0.3"`` -> [(spec a, 0.7), (spec b, 0.3)]; a missing rate is 1."""
    out = []
    for part in filter(None, (p.strip() for p in task.split(";"))):
        rate = 1.0
        head, sep, tail = part.rpartition("=")
        if sep:
            try:
                rate, part = float(tail), head
            except ValueError:
                pass
        out.append((sources.parse_spec(part), rate))
    if not out:
        raise ValueError("data.task is empty: use 'stdlib' or e.g. 'text:/data/*.txt'")
    return out


class FileSource(seqio.DataSource):
    """Text / JSONL / stdlib files as a seqio source of ``{"text": string}``, sharded by file."""

    def __init__(self, spec: sources.SourceSpec, validation_fraction: float):
        super().__init__(splits=sources.SPLITS)
        self.spec, self.validation_fraction = spec, validation_fraction

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str):
        return sources.list_files(self.spec, split, self.validation_fraction)

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, *,
                    sequence_length=None, use_cached=False, num_epochs=1) -> tf.data.Dataset:
        files = self.list_shards(split)
        by_document = shard_info is not None and shard_info.num_shards > len(files)
        if shard_info is not None and not by_document:
            files = sources.shard_files(files, shard_info.index, shard_info.num_shards)
        elif by_document:
            log.warning("%s %s: %d file(s) for %d data streams: sharding by document (every stream reads "
                        "every file)", self.spec.key, split, len(files), shard_info.num_shards)
        ds = tf.data.Dataset.from_tensor_slices(tf.constant(files))
        if shuffle:  # a new (deterministic, seeded) file order every epoch
            ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        if self.spec.kind == "jsonl":
            ds = ds.flat_map(functools.partial(self._jsonl_texts, split=split))
        elif self.spec.kind == "text":  # streamed: pieces of whole lines, never the whole file in memory
            ds = ds.flat_map(lambda path: tf.data.TextLineDataset(path, buffer_size=1 << 20)
                             .batch(sources.TEXT_PIECE_LINES))
            ds = ds.map(lambda lines: tf.strings.reduce_join(lines + "\n"))
        else:
            ds = ds.map(tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.map(lambda raw: {"text": tf.strings.unicode_transcode(
            raw, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)})
        ds = ds.filter(lambda ex: tf.strings.length(ex["text"]) > 0)
        return ds.shard(shard_info.num_shards, shard_info.index) if by_document else ds

    def _jsonl_texts(self, path: tf.Tensor, split: str) -> tf.data.Dataset:
        def parse(path, index, line):
            text = sources.jsonl_line_text(path.decode(), int(index), line, self.spec.field,
                                           split, self.validation_fraction)
            return (text or "").encode("utf-8")

        lines = tf.data.TextLineDataset(path).enumerate()
        return lines.map(lambda i, line: tf.ensure_shape(
            tf.numpy_function(parse, [path, i, line], tf.string, stateful=False), []))


def _tokenize(ds: tf.data.Dataset, output_features) -> tf.data.Dataset:
    """text -> ``ids`` (document tokens + eos) and ``key`` (a hash of the text, seeds the objective)."""
    voc = output_features["tokens"].vocabulary

    def fn(ex):
        ids = tf.cast(voc.encode_tf(ex["text"]), tf.int32)
        ids = tf.concat([ids, [voc.eos_id]], axis=0)
        return {"ids": ids, "key": tf.strings.to_hash_bucket_fast(ex["text"], 2**62)}

    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


@seqio.map_over_dataset(num_seeds=1)
def _add_seed(ex, seed):
    return {**ex, "seed": seed}


def objective_spec(objective_cfg: dict, seq_len: int, voc: seqio.SentencePieceVocabulary):
    """The ObjectiveSpec for ``objective.*`` (as a dict) at ``seq_len`` with ``voc``'s special ids."""
    ids = vocab_lib.special_ids(voc)
    weights = tuple(float(objective_cfg[k]) for k in OBJECTIVES)
    return blank_infilling.ObjectiveSpec(
        seq_len=seq_len, weights=weights, mask_ids=ids.mask_ids, sop=ids.sop, eop=ids.eop,
        sentence_end=vocab_lib.sentence_end_table(voc) if weights[2] > 0 else None,
        mask_ratio=float(objective_cfg["mask_ratio"]), poisson_lambda=float(objective_cfg["poisson_lambda"]),
        gmask_min_ratio=float(objective_cfg["gmask_min_ratio"]),
        gmask_max_ratio=float(objective_cfg["gmask_max_ratio"]),
        gmask_positions=str(objective_cfg.get("gmask_positions", "mask")))


def _glm_objective(ds: tf.data.Dataset, sequence_length, output_features, objective_cfg: dict) -> tf.data.Dataset:
    """Each document -> its chunks as GLM examples (seeded by seqio's per-example seed + text hash)."""
    spec = objective_spec(objective_cfg, sequence_length["tokens"], output_features["tokens"].vocabulary)

    def examples(ids, seed, key):
        entropy = [int(x) & 0xFFFFFFFF for x in seed] + [int(key) & 0xFFFFFFFFFFFFFFFF]
        rng = np.random.default_rng(entropy)
        exs = [ex for _, ex in blank_infilling.document_examples(ids, spec, rng)]
        lengths = np.array([len(ex["tokens"]) for ex in exs], np.int32)
        flat = [np.concatenate([ex[k] for ex in exs]) if exs else np.zeros(0, np.int32) for k in FEATURES]
        return (*flat, lengths)

    def fn(ex):
        *flat, lengths = tf.numpy_function(examples, [ex["ids"], ex["seed"], ex["key"]],
                                           [tf.int32] * (len(FEATURES) + 1), stateful=False)
        lengths.set_shape([None])
        return {k: tf.RaggedTensor.from_row_lengths(tf.ensure_shape(v, [None]), lengths)
                for k, v in zip(FEATURES, flat)}

    ds = _add_seed(ds).map(fn, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.unbatch()


def output_features(voc: seqio.SentencePieceVocabulary) -> dict[str, seqio.Feature]:
    other = seqio.PassThroughVocabulary(size=0)
    return {k: seqio.Feature(voc if k in ("tokens", "targets") else other, add_eos=False, dtype=tf.int32)
            for k in FEATURES}


def _source(spec: sources.SourceSpec, validation_fraction: float) -> seqio.DataSource:
    if spec.kind == "tfds":
        return seqio.TfdsDataSource(tfds_name=spec.pattern, splits={s: s for s in sources.SPLITS})
    return FileSource(spec, validation_fraction)


def _rekey(ds, field: str):
    return ds.map(lambda ex: {"text": ex[field]}, num_parallel_calls=tf.data.AUTOTUNE)


def register(cfg, voc: seqio.SentencePieceVocabulary) -> str:
    """Registers ``cfg.data.task`` (a spec) with this vocabulary/objective; returns the seqio name."""
    if cfg.data.task in seqio.TaskRegistry.names() or cfg.data.task in seqio.MixtureRegistry.names():
        return cfg.data.task
    parts = parse_task(cfg.data.task)
    objective_cfg = {k: cfg.objective[k] for k in cfg.objective}
    vf = float(cfg.data.validation_fraction)
    names = []
    for spec, _ in parts:
        key = json.dumps([spec.key, voc.sentencepiece_model_file, objective_cfg, vf], sort_keys=True)
        name = "glmjax_" + hashlib.sha1(key.encode()).hexdigest()[:16]
        if name not in seqio.TaskRegistry.names():
            rekey = spec.kind == "tfds" and spec.field != "text"
            pre = [functools.partial(_rekey, field=spec.field)] if rekey else []
            seqio.TaskRegistry.add(
                name, source=_source(spec, vf), output_features=output_features(voc),
                preprocessors=pre + [_tokenize, seqio.CacheDatasetPlaceholder(),
                                     functools.partial(_glm_objective, objective_cfg=objective_cfg)],
                shuffle_buffer_size=int(cfg.data.shuffle_buffer))
        names.append(name)
    if len(parts) == 1:
        return names[0]
    mixture = "glmjax_mix_" + hashlib.sha1(json.dumps([names, [r for _, r in parts]]).encode()).hexdigest()[:16]
    if mixture not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(mixture, [(n, r) for n, (_, r) in zip(names, parts)])
    return mixture
