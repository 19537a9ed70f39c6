"""End-to-end input pipeline: features, determinism, host sharding, exact resumption, global arrays."""
import json

import jax
import numpy as np
import pytest
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


def test_restored_iterator_continues_exactly(corpus):
    cfg = _cfg(corpus)
    full = _take(make_pipeline(cfg, "train", process_index=1, process_count=2), 9)
    first = make_pipeline(cfg, "train", process_index=1, process_count=2)
    _take(first, 4)
    state = json.loads(json.dumps(first.get_state()))  # must survive JSON
    first.close()
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
    state = pipe.get_state()
    state["process_count"] = 4
    with pytest.raises(ValueError, match="process_count"):
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
