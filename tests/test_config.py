"""Bad configs fail before compiling, with a message naming the key, the problem and the fix."""
from pathlib import Path

import numpy as np
import pytest

from glmjax.config import ConfigError, load_config, validate

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")


def cfg_with(*overrides):
    return load_config(TINY, list(overrides))


def check(cfg, num_devices, *needles):
    with pytest.raises(ConfigError) as err:
        validate(cfg, num_devices)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_tiny_config_is_valid_on_1_and_8_devices():
    validate(cfg_with(), 1)
    validate(cfg_with(), 8)


def test_heads_not_divisible_by_tensor():
    check(cfg_with("--config.model.num_heads=6", "--config.model.num_kv_heads=6", "--config.mesh.tensor=4",
                   "--config.mesh.data=2"), 8, "model.num_heads=6", "mesh.tensor=4", "divides")


def test_heads_not_divisible_by_kv_heads():
    check(cfg_with("--config.model.num_kv_heads=3"), 1, "model.num_heads=4", "model.num_kv_heads=3", "divisors")


def test_mesh_product_not_device_count():
    check(cfg_with("--config.mesh.data=2", "--config.mesh.fsdp=2"), 8, "mesh", "= 4", "8 devices")


def test_batch_not_divisible_by_data_parallel():
    check(cfg_with("--config.batch_size=12", "--config.mesh.data=8"), 8, "batch_size=12", "multiple of 8")


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError) as err:
        cfg_with("--config.model.num_head=8")
    assert "model.num_head" in str(err.value) and "model.num_heads" in str(err.value)
    with pytest.raises(ConfigError, match="unknown config key 'optimiser.lr'"):
        cfg_with("--config.optimiser.lr=1e-3")


@pytest.mark.parametrize("key", ["model.hidden_size", "batch_size", "seq_len", "model.num_layers", "steps"])
def test_non_positive_sizes(key):
    check(cfg_with(f"--config.{key}=0"), 1, f"{key}=0", "positive", f"--config.{key}")
    check(cfg_with(f"--config.{key}=-3"), 1, f"{key}=-3")


def test_override_types_are_checked():
    with pytest.raises(ConfigError, match="integer"):
        cfg_with("--config.model.num_layers=two")
    with pytest.raises(ConfigError, match="bool"):
        cfg_with("--config.model.rope_2d=maybe")
    c = cfg_with("--config.optimizer.lr=1e-2", "--config.model.rope_2d=false", "--config.mesh.fsdp=-1")
    assert c.optimizer.lr == 1e-2 and c.model.rope_2d is False and c.mesh.fsdp == -1


def test_bad_choice_and_missing_file():
    check(cfg_with("--config.model.norm=batchnorm"), 1, "model.norm='batchnorm'", "rmsnorm_pre")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.py")


def test_cli_reports_config_error_before_compiling(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "glmjax.train", f"--config={TINY}", f"--workdir={tmp_path}",
                        "--config.model.num_kv_heads=3"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "config error" in r.stderr and "num_kv_heads=3" in r.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_cli_reports_missing_data_path_without_traceback(tmp_path):
    import subprocess
    import sys

    missing = tmp_path / "nothing_here" / "*.txt"
    r = subprocess.run([sys.executable, "-m", "glmjax.train", f"--config={TINY}", f"--workdir={tmp_path / 'w'}",
                        f"--config.data.task=text:{missing}"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "error:" in r.stderr and str(tmp_path / "nothing_here") in r.stderr
    assert "Traceback" not in r.stderr


def run_train_cli(*args, timeout=300):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "glmjax.train", f"--config={TINY}", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_cli_workdir_that_is_a_file(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("not a directory")
    r = run_train_cli(f"--workdir={f}", timeout=120)
    assert r.returncode != 0
    assert "is an existing file, not a directory" in r.stderr and str(f) in r.stderr
    assert "Traceback" not in r.stderr
    assert f.read_text() == "not a directory"


def test_cli_small_corpus_with_empty_validation_split(tmp_path):
    """46 JSONL documents whose hash-chosen 5% validation share is empty: a message with the counts and
    the fixes before training starts, not a bare StopIteration at the first evaluation."""
    import json

    from glmjax.data.sources import split_of

    rng = np.random.default_rng(0)
    words = "the model learns 語言 模型 數據 blank infilling of text and code 訓練 from scratch".split()
    name = next(n for n in (f"corpus{i}.jsonl" for i in range(1000))
                if all(split_of(f"{n}:{j}", 0.05) == "train" for j in range(46)))
    docs = [" ".join(rng.choice(words, 250)) + f" {i}" for i in range(46)]
    (tmp_path / name).write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs),
                                 encoding="utf-8")
    r = run_train_cli(f"--workdir={tmp_path / 'w'}", f"--config.data.task=jsonl:{tmp_path}/*.jsonl@text",
                      "--config.steps=3")
    assert r.returncode != 0
    assert "validation split is empty" in r.stderr
    assert "46 train / 0 validation documents" in r.stderr
    assert "--config.data.validation_fraction=" in r.stderr and "--config.eval_every=0" in r.stderr
    assert "Traceback" not in r.stderr and "StopIteration" not in r.stderr
    assert not (tmp_path / "w" / "checkpoints").exists() or not any((tmp_path / "w" / "checkpoints").iterdir())
