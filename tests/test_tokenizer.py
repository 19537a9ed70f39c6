"""The SentencePiece tokenizer: special ids, byte fallback round trips, size, caching, determinism."""
import importlib.util
import os
import threading

import numpy as np
import pytest
import seqio

from glmjax.data import testing
from glmjax.data.vocab import SPECIAL_TOKENS, cached_tokenizer_path, get_vocabulary, special_ids, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def stdlib_cfg(tmp_path_factory):
    return testing.data_config("stdlib", cache_dir=str(tmp_path_factory.mktemp("tok")), vocab_size=700)


@pytest.fixture(scope="module")
def stdlib_vocab(stdlib_cfg):
    return get_vocabulary(stdlib_cfg)


def test_special_ids_and_size(stdlib_vocab, stdlib_cfg):
    ids = special_ids(stdlib_vocab)
    assert (ids.pad, ids.eos, ids.unk) == (0, 1, 2)
    assert len({ids.mask, ids.smask, ids.gmask, ids.sop, ids.eop}) == 5
    assert stdlib_vocab.vocab_size == stdlib_cfg.model.vocab_size
    sp = stdlib_vocab.tokenizer
    for piece in SPECIAL_TOKENS:
        assert sp.is_control(sp.piece_to_id(piece))
        assert sp.piece_to_id(piece) not in sp.encode(f"x = '{piece}'")  # text cannot forge them


def test_any_text_round_trips_through_byte_fallback(stdlib_vocab):
    sp = stdlib_vocab.tokenizer
    rng = np.random.default_rng(0)
    alphabet = list("abcXYZ019 _()[]{}:.,'\"\n\t#=+-*/\\") + ["  ", "    ", "\n    ", "é", "ß", "中文", "🙂", "\u0301", "\x00", "\x7f"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(1, 80))))
        ids = sp.encode(text)
        assert sp.unk_id() not in ids
        assert max(ids) < stdlib_vocab.vocab_size
        assert sp.decode(ids) == text
    # the TF encoder used by the pipeline agrees with the Python one
    text = "def f(x):\n    return x ** 2  # 🙂 done\n"
    np.testing.assert_array_equal(stdlib_vocab.encode_tf(text).numpy(), sp.encode(text))


def test_cache_is_reused_and_keyed_by_settings(stdlib_cfg, stdlib_vocab):
    path = cached_tokenizer_path(stdlib_cfg)
    assert path == stdlib_vocab.sentencepiece_model_file and os.path.exists(path)
    mtime = os.path.getmtime(path)
    assert get_vocabulary(stdlib_cfg).sentencepiece_model_file == path
    assert os.path.getmtime(path) == mtime
    other = stdlib_cfg.copy_and_resolve_references()
    other.model.vocab_size = 800
    assert cached_tokenizer_path(other) != path
    other.model.vocab_size = 700
    other.data.task = "text:/somewhere/*.txt"
    assert cached_tokenizer_path(other) != path


def test_training_is_deterministic_and_concurrent_builds_are_safe(tmp_path):
    rng = np.random.default_rng(1)
    texts = [testing.random_text(rng, 40) for _ in range(200)]
    out = str(tmp_path / "same.model")
    threads = [threading.Thread(target=train_tokenizer, args=(texts, 400, out, 10**6)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    train_tokenizer(texts, 400, str(tmp_path / "again.model"), 10**6)
    with open(out, "rb") as a, open(tmp_path / "again.model", "rb") as b:
        assert a.read() == b.read()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    v = seqio.SentencePieceVocabulary(out)
    assert v.vocab_size <= 400  # hard_vocab_limit=False: small corpora may learn fewer, never more


def test_too_small_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="raise model.vocab_size"):
        train_tokenizer(["héllo wörld ünïcode"] * 50, 100, str(tmp_path / "small.model"), 10**6)


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    cfg = testing.data_config("stdlib", cache_dir=str(tmp_path))
    cfg.data.tokenizer = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        get_vocabulary(cfg)


def test_train_tokenizer_tool(tmp_path, capsys):
    testing.write_corpus(str(tmp_path / "docs"), 12, seed=3)
    out = tmp_path / "t.model"
    spec = importlib.util.spec_from_file_location("train_tokenizer", os.path.join(ROOT, "tools", "train_tokenizer.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([f"--source=text:{tmp_path}/docs/*.txt", "--vocab_size=400", f"--out={out}"]) == 0
    assert out.exists() and "special ids" in capsys.readouterr().out
    assert special_ids(seqio.SentencePieceVocabulary(str(out))).sop == 6
