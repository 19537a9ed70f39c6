"""Single-process checks of the multi-host rules: resume compatibility of non-structural model keys,
``scheme://`` data patterns through tf.io.gfile (TF's ``ram://`` filesystem stands in for gs://),
to_global's global shape and its errors, and the data decision when nothing fits (resume across host
counts: tests/test_data_streams.py)."""
import json
import logging

import numpy as np
import pytest
import tensorflow as tf

from glmjax.checkpoint import ConfigMismatchError, check_compatible
from glmjax.config import load_config
from glmjax.data import sources, testing
from glmjax.data.pipeline import host_rows, make_pipeline, row_group, to_global
from glmjax.sharding import batch_sharding, make_mesh
from test_train import TINY


def _save_config(workdir, cfg):
    d = workdir / "checkpoints" / "3" / "config"
    d.mkdir(parents=True)
    (d / "config.json").write_text(cfg.to_json_best_effort())


def test_resume_allows_remat_and_attention_impl_but_not_hidden_size(tmp_path, caplog):
    cfg = load_config(TINY)
    _save_config(tmp_path, cfg)
    changed = load_config(TINY, ["--config.model.remat=full", "--config.model.attention_impl=pallas"])
    with caplog.at_level(logging.INFO, logger="glmjax.checkpoint"):
        check_compatible(str(tmp_path), changed)
    assert "model.remat: checkpoint has 'none', this run has 'full'" in caplog.text
    assert "model.attention_impl" in caplog.text
    with pytest.raises(ConfigMismatchError, match="model.hidden_size: checkpoint has 128, this run has 256"):
        check_compatible(str(tmp_path), load_config(TINY, ["--config.model.hidden_size=256",
                                                           "--config.model.remat=full"]))


def test_url_patterns_go_through_the_filesystem_layer(tmp_path):
    rng = np.random.default_rng(7)
    texts = {f"ram://bucket/corpus/part{i:02d}.txt": testing.random_text(rng, 20) for i in range(12)}
    for path, text in texts.items():
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(text)
    with tf.io.gfile.GFile("ram://bucket/corpus/empty.txt", "w") as f:
        f.write("")
    spec = sources.parse_spec("text:ram://bucket/corpus/*.txt")
    train, val = (sources.list_files(spec, s, 0.25) for s in ("train", "validation"))
    assert sorted(train + val) == sorted(texts) and train and val  # the empty file is skipped
    # the split is keyed by the path relative to the common folder: same as the same files on local disk
    for path, text in texts.items():
        (tmp_path / path.rsplit("/", 1)[1]).write_text(text)
    local = sources.list_files(sources.parse_spec(f"text:{tmp_path}/*.txt"), "train", 0.25)
    assert [p.rsplit("/", 1)[1] for p in train] == [p.rsplit("/", 1)[1] for p in local]
    assert sources.read_text(train[0]) == texts[train[0]]
    cfg = testing.data_config("text:ram://bucket/corpus/*.txt", cache_dir=str(tmp_path / "cache"))
    batch = next(make_pipeline(cfg, "train", process_index=0, process_count=1))
    assert batch["tokens"].shape == (cfg.batch_size, cfg.seq_len) and (batch["segment_ids"] > 0).mean() > 0.5
    with pytest.raises(FileNotFoundError, match="matches no file"):
        sources.list_files(sources.parse_spec("text:ram://bucket/nothing/*.txt"), "train")


def test_to_global_gives_the_global_shape_and_checks_the_rows():
    cfg = load_config(TINY, ["--config.mesh.fsdp=2", "--config.mesh.tensor=4", "--config.mesh.data=1",
                             "--config.batch_size=8"])
    sh = batch_sharding(make_mesh(cfg))
    assert host_rows(sh, 8) == (0, 8) and row_group(sh, 8) == (0, 1)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 100, (8, 16)).astype(np.int32)
    out = to_global({"tokens": x}, sh)
    assert out["tokens"].shape == (8, 16)
    np.testing.assert_array_equal(np.asarray(out["tokens"]), x)
    with pytest.raises(ValueError, match=r"has 4 rows but this process holds rows \[0, 8\)"):
        to_global({"tokens": x[:4]}, sh, batch_size=8)


def test_set_state_without_a_state_for_this_host_is_refused_or_restarts(tmp_path, caplog):
    testing.write_corpus(str(tmp_path / "docs"), 12, seed=2)
    cfg = testing.data_config(f"text:{tmp_path}/docs/*.txt", cache_dir=str(tmp_path / "cache"))
    want = next(make_pipeline(cfg, "train", process_index=0, process_count=1))
    pipe = make_pipeline(cfg, "train", process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no saved data-iterator state could be read.*on_reshard=restart"):
        pipe.set_state(None)
    other = make_pipeline(cfg, "train", process_index=0, process_count=1)
    next(other)
    state = json.loads(json.dumps(other.get_state()))
    other.close()
    state["streams"] = 2
    with pytest.raises(ValueError, match="streams=2 but this run has 1"):
        pipe.set_state(state)
    cfg.data.on_reshard = "restart"
    with caplog.at_level("WARNING"):
        pipe.set_state(None)
    assert "starts the train data from its beginning" in caplog.text
    np.testing.assert_array_equal(next(pipe)["tokens"], want["tokens"])
    pipe.close()
