"""End-to-end input pipeline: features, determinism, host sharding, exact resumption, global arrays."""
import collections
import glob
import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import seqio
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glmjax.data import testing
from glmjax.data.pipeline import make_pipeline, to_global

FEATURES = ("tokens", "targets", "segment_ids", "positions", "block_positions", "bidirectional", "loss_weights")
GLM_MIX = dict(causal=0.25, mask=0.25, smask=0.25, gmask=0.25)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    testing.write_corpus(str(root / "docs"), 40, seed=1)
    return str(root)


def _cfg(corpus, **kw):
    return testing.data_config(f"text:{corpus}/docs/*.txt", cache_dir=f"{corpus}/cache", **{**GLM_MIX, **kw})


def _take(pipe, n):
    out = [next(pipe) for _ in range(n)]
    return out


def test_batch_features_shapes_and_dtypes(corpus):
    cfg = _cfg(corpus)
    pipe = make_pipeline(cfg, "train", process_index=0, process_count=1)
    batch = next(pipe)
    pipe.close()
    assert sorted(batch) == sorted(FEATURES)
    for k, v in batch.items():
        assert v.shape == (cfg.batch_size, cfg.seq_len), k
        assert v.dtype == (np.float32 if k == "loss_weights" else np.int32), k
    assert batch["tokens"].max() < cfg.model.vocab_size
    # segment ids start at 1 and padding (0) only trails
    for row in batch["segment_ids"]:
        assert row[0] == 1
        nz = row[row > 0]
        assert (np.diff(nz) >= 0).all() and (np.diff(nz) <= 1).all()
        assert (row[len(nz):] == 0).all()
    pad = batch["segment_ids"] == 0
    assert (batch["loss_weights"][pad] == 0).all() and (batch["tokens"][pad] == 0).all()


def test_same_seed_same_batches_and_other_seed_differs(corpus):
    cfg = _cfg(corpus)
    a = _take(make_pipeline(cfg, "train", process_index=0, process_count=1), 6)
    b = _take(make_pipeline(cfg, "train", process_index=0, process_count=1), 6)
    for x, y in zip(a, b):
        for k in FEATURES:
            np.testing.assert_array_equal(x[k], y[k])
    cfg.seed = 1
    c = _take(make_pipeline(cfg, "train", process_index=0, process_count=1), 6)
    assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


@pytest.mark.parametrize("snapshot_every", [0, 3])
def test_restored_iterator_continues_exactly(corpus, snapshot_every):
    cfg = _cfg(corpus)
    cfg.data.snapshot_every = snapshot_every  # 0: recompute from the start; 3: from the snapshot at batch 3
    full = _take(make_pipeline(cfg, "train", process_index=1, process_count=2), 9)
    first = make_pipeline(cfg, "train", process_index=1, process_count=2)
    _take(first, 4)
    state = json.loads(json.dumps(first.get_state()))  # must survive JSON
    first.close()
    if snapshot_every:
        assert state["stream_states"]["1"]["batches"] == 3
    else:
        assert state["stream_states"] == {"1": None}
    resumed = make_pipeline(cfg, "train", process_index=1, process_count=2)
    resumed.set_state(state)
    rest = _take(resumed, 5)
    resumed.close()
    for x, y in zip(full[4:], rest):
        for k in FEATURES:
            np.testing.assert_array_equal(x[k], y[k])
    assert resumed.get_state()["batches"] == 9


def test_set_state_refuses_a_different_stream(corpus):
    cfg = _cfg(corpus)
    pipe = make_pipeline(cfg, "train", process_index=0, process_count=2)
    next(pipe)  # a position at batch 0 fits any stream count: nothing was consumed
    state = pipe.get_state()
    state["streams"] = 4
    with pytest.raises(ValueError, match="streams=4 but this run has 2"):
        pipe.set_state(state)
    pipe.close()


def test_validation_is_deterministic_and_long_enough(corpus):
    cfg = _cfg(corpus, causal=1.0, mask=0.0, smask=0.0, gmask=0.0)
    cfg.eval_steps = 12  # more batches than one pass over the few validation files gives
    a = _take(make_pipeline(cfg, "validation", process_index=0, process_count=1), cfg.eval_steps)
    b = _take(make_pipeline(cfg, "validation", process_index=0, process_count=1), cfg.eval_steps)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])


def test_to_global_assembles_the_local_batch():
    mesh = Mesh(np.array(jax.devices()).reshape(-1), ("data",))
    sharding = NamedSharding(mesh, P("data", None))
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 100, (16, 8)).astype(np.int32),
             "loss_weights": rng.random((16, 8)).astype(np.float32)}
    out = to_global(batch, sharding)
    for k, v in batch.items():
        assert out[k].shape == v.shape and out[k].sharding == sharding
        np.testing.assert_array_equal(np.asarray(out[k]), v)


def _segments(batch):
    """Every packed segment of a batch as a dict of 1-D arrays."""
    for r in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all()  # a segment is contiguous
            yield {k: v[r, idx] for k, v in batch.items() if k != "segment_ids"}


def test_segments_rebuild_the_documents_exactly(corpus):
    from test_data_objective import check_infill_layout, decode  # the independent reference decoder

    from glmjax.data import sources
    from glmjax.data.vocab import get_vocabulary, special_ids

    cfg = _cfg(corpus)
    vocab = get_vocabulary(cfg)
    ids = special_ids(vocab)
    assert (ids.mask, ids.smask, ids.gmask, ids.sop, ids.eop) == (3, 4, 5, 6, 7)  # the reference's ids
    # a text: file's documents: runs of whole lines, each ending in a newline (test_data_streaming.py)
    docs = [",".join(map(str, vocab.tokenizer.encode(piece) + [ids.eos])) + ","
            for p in sorted(glob.glob(f"{corpus}/docs/*.txt")) for piece in sources.text_pieces(p)]
    seen = collections.Counter()
    for batch in _take(make_pipeline(cfg, "train", process_index=0, process_count=1), 6):
        for ex in _segments(batch):
            if ex["bidirectional"].any():
                check_infill_layout(ex, cfg.seq_len)
                chunk, spans = decode(ex)
                np.testing.assert_array_equal(ex["loss_weights"] > 0, ex["bidirectional"] == 0)
                seen[int(ex["tokens"][spans[0][0]])] += 1
            else:  # causal: targets are the next tokens; loss everywhere
                np.testing.assert_array_equal(ex["targets"][:-1], ex["tokens"][1:])
                assert (ex["loss_weights"] == 1).all()
                chunk = np.concatenate([ex["tokens"], ex["targets"][-1:]])
                seen["causal"] += 1
            needle = ",".join(map(str, chunk)) + ","
            assert any(("," + d).find("," + needle) >= 0 for d in docs), "segment is not a piece of any document"
    assert set(seen) == {3, 4, 5, "causal"}, seen


def test_packed_segments_never_see_each_other_through_the_model_mask(corpus):
    from pallas_kernels.reference import attention_xla, glm_mask

    cfg = _cfg(corpus)
    # 8 batches: enough rows that hold several segments (3 of 64 here, 3 of 64 when text: files were
    # read whole; which rows depends on the exact token stream)
    batches = _take(make_pipeline(cfg, "train", process_index=0, process_count=1), 8)
    seg = np.concatenate([b["segment_ids"] for b in batches])
    bidir = np.concatenate([b["bidirectional"] for b in batches])
    assert (seg.max(axis=1) >= 2).sum() >= 2
    mask = np.asarray(glm_mask(seg, bidir, batch=seg.shape[0], q_len=cfg.seq_len, kv_len=cfg.seq_len))
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    assert not (mask & ~same).any()
    # Part A sees all of its Part A (bidirectional) and no Part B; Part B sees Part A and its past.
    for r in range(seg.shape[0]):
        for s in range(1, seg[r].max() + 1):
            idx = np.flatnonzero(seg[r] == s)
            a = idx[bidir[r, idx] == 1]
            if len(a):
                assert mask[r][np.ix_(a, a)].all() and not mask[r][np.ix_(a, idx[len(a):])].any()
    # Perturbing one segment's keys/values leaves every other segment's attention output unchanged.
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((seg.shape[0], cfg.seq_len, 2, 8)).astype(np.float32) for _ in range(3))
    row = int(np.argmax(seg.max(axis=1)))
    k2, v2 = k.copy(), v.copy()
    hit = seg[row] == 2
    k2[row, hit] += 3.0
    v2[row, hit] -= 5.0
    out1 = np.asarray(attention_xla(q, k, v, seg, bidir))
    out2 = np.asarray(attention_xla(q, k2, v2, seg, bidir))
    keep = seg[row] != 2
    np.testing.assert_allclose(out1[row, keep], out2[row, keep], rtol=0, atol=1e-6)
    assert not np.allclose(out1[row, hit], out2[row, hit])


def test_host_shards_are_disjoint_and_cover_the_split(corpus):
    from glmjax.data import sources
    from glmjax.data.tasks import FileSource

    spec = sources.parse_spec(f"text:{corpus}/docs/*.txt")
    src = FileSource(spec, validation_fraction=0.05)
    everything = sorted(t for p in sources.list_files(spec, "train") for t in sources.text_pieces(p))
    for count in (2, 3, len(everything) + 3):  # the last: fewer files than processes, sharded by document
        shards = []
        for index in range(count):
            ds = src.get_dataset("train", shuffle=True, seed=3, shard_info=seqio.ShardInfo(index, count))
            shards.append([ex["text"].decode() for ex in ds.as_numpy_iterator()])
        assert sorted(sum(shards, [])) == everything  # disjoint and together all of it
    cfg = _cfg(corpus)
    a = next(make_pipeline(cfg, "train", process_index=0, process_count=2))
    b = next(make_pipeline(cfg, "train", process_index=1, process_count=2))
    assert a["tokens"].shape == (cfg.batch_size // 2, cfg.seq_len)
    assert not np.array_equal(a["tokens"], b["tokens"])


def test_missing_paths_fail_with_the_path_and_a_fix(tmp_path):
    for task, words in ((f"text:{tmp_path}/nothing/*.txt", "matches no file"),
                        (f"jsonl:{tmp_path}/missing.jsonl@body", "does not exist")):
        cfg = testing.data_config(task, cache_dir=str(tmp_path / "cache"))
        with pytest.raises(FileNotFoundError, match=words) as err:
            make_pipeline(cfg, "train", process_index=0, process_count=1)
        assert str(tmp_path) in str(err.value) and "Fix" in str(err.value)


def test_bad_bytes_empty_files_and_one_huge_file_are_handled(tmp_path, caplog):
    from glmjax.data import sources
    from glmjax.data.tasks import FileSource

    docs = tmp_path / "docs"
    testing.write_corpus(str(docs), 6, seed=4)
    (docs / "bad.txt").write_bytes(b"def f():\n    return '\xff\xfe caf\xc3 \x80'\n" * 50)
    (docs / "empty1.txt").write_bytes(b"")
    (docs / "empty2.txt").write_bytes(b"")
    with caplog.at_level("WARNING"):
        files = sources.list_files(sources.parse_spec(f"text:{docs}/*.txt"), "train")
    assert "skipped 2 empty file(s)" in caplog.text
    src = FileSource(sources.parse_spec(f"text:{docs}/bad.txt"), 0.05)
    (text,) = [ex["text"].decode() for ex in src.get_dataset("train", shuffle=False).as_numpy_iterator()]
    assert "\ufffd" in text and "def f():" in text
    assert len(files) >= 1
    cfg = testing.data_config(f"text:{docs}/*.txt", cache_dir=str(tmp_path / "cache"), mask=1.0, causal=0.0)
    batch = next(make_pipeline(cfg, "train", process_index=0, process_count=1))
    assert batch["loss_weights"].sum() > 0
    # one file of ~0.6 MB (~5,000 rows of 128): one document, chunked; both splits read it
    rng = np.random.default_rng(0)
    huge = tmp_path / "huge.txt"
    huge.write_text(testing.random_text(rng, 10_000))
    cfg = testing.data_config(f"text:{huge}", cache_dir=str(tmp_path / "cache"), gmask=1.0, causal=0.0)
    for split in ("train", "validation"):
        pipe = make_pipeline(cfg, split, process_index=0, process_count=1)
        for batch in _take(pipe, 3):
            assert (batch["segment_ids"] > 0).mean() > 0.8
        pipe.close()


def test_jsonl_source_and_mixture(tmp_path):
    rng = np.random.default_rng(5)
    lines = [json.dumps({"body": testing.random_text(rng, 30), "id": i}) for i in range(200)]
    lines.insert(7, "not json")
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    testing.write_corpus(str(tmp_path / "docs"), 10, seed=6)
    task = f"jsonl:{tmp_path}/a.jsonl@body=0.5;text:{tmp_path}/docs/*.txt=0.5"
    cfg = testing.data_config(task, cache_dir=str(tmp_path / "cache"), gmask=0.7, mask=0.3, causal=0.0)
    for split in ("train", "validation"):
        batch = next(make_pipeline(cfg, split, process_index=0, process_count=1))
        assert batch["bidirectional"].any() and batch["loss_weights"].sum() > 0


_HASH_SCRIPT = """
import hashlib, json, sys
from glmjax.data import testing
from glmjax.data.pipeline import make_pipeline
cfg = testing.data_config(sys.argv[1], cache_dir=sys.argv[2], causal=0.25, mask=0.25, smask=0.25, gmask=0.25)
cfg.data.snapshot_every = 2
pipe = make_pipeline(cfg, "train", process_index=1, process_count=2)
pipe.set_state(json.load(open(sys.argv[3])))
h = hashlib.sha1()
for _ in range(3):
    b = next(pipe)
    for k in sorted(b):
        h.update(b[k].tobytes())
print("HASH", h.hexdigest())
"""


def test_a_fresh_process_restores_the_state_exactly(corpus, tmp_path):
    """A restarted job is a new process: its pipeline and the saved snapshot must not depend on this one."""
    cfg = _cfg(corpus)
    cfg.data.snapshot_every = 2
    pipe = make_pipeline(cfg, "train", process_index=1, process_count=2)
    _take(pipe, 5)
    state = pipe.get_state()
    assert state["stream_states"]["1"]["batches"] == 4
    (tmp_path / "state.json").write_text(json.dumps(state))
    h = hashlib.sha1()
    for b in _take(pipe, 3):
        for k in sorted(b):
            h.update(b[k].tobytes())
    pipe.close()
    res = subprocess.run([sys.executable, "-c", _HASH_SCRIPT, cfg.data.task, cfg.data.cache_dir,
                          str(tmp_path / "state.json")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"HASH {h.hexdigest()}" in res.stdout


def test_unpacked_rows_hold_one_example_each(corpus):
    cfg = _cfg(corpus)
    cfg.data.pack = False
    batch = next(make_pipeline(cfg, "validation", process_index=0, process_count=1))
    seg = batch["segment_ids"]
    assert set(np.unique(seg)) <= {0, 1} and (seg[:, 0] == 1).all()
    assert ((batch["tokens"] > 0) == (seg == 1)).all()


def test_a_snapshot_that_does_not_fit_falls_back_to_recomputing(corpus, caplog):
    cfg = _cfg(corpus)
    cfg.data.snapshot_every = 2
    pipe = make_pipeline(cfg, "train", process_index=0, process_count=1)
    want = _take(pipe, 5)[3:]
    state = pipe.get_state()
    pipe.close()
    state["batches"] = 3
    state["stream_states"]["0"]["iterator"]["files"] = {"iterator.index": "eJwDAAAAAAE="}  # a broken checkpoint
    state["stream_states"]["0"]["batches"] = 2
    resumed = make_pipeline(cfg, "train", process_index=0, process_count=1)
    with caplog.at_level("WARNING"):
        resumed.set_state(state)
        got = _take(resumed, 2)
    resumed.close()
    assert "recomputing the 3 batches" in caplog.text
    for x, y in zip(want, got):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])


def test_split_does_not_depend_on_where_the_data_lives(tmp_path):
    import shutil

    from glmjax.data import sources

    a = tmp_path / "a" / "docs"
    testing.write_corpus(str(a), 40, seed=4)
    b = tmp_path / "elsewhere" / "deeper" / "docs"
    shutil.copytree(a, b)
    for split in ("train", "validation"):
        files_a = sources.list_files(sources.parse_spec(f"text:{a}/*.txt"), split, 0.2)
        files_b = sources.list_files(sources.parse_spec(f"text:{b}/*.txt"), split, 0.2)
        assert [os.path.relpath(f, a) for f in files_a] == [os.path.relpath(f, b) for f in files_b]
        assert files_a
