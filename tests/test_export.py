"""Export to Hugging Face: native GlmForCausalLM and the remote-code PyTorch GLM, against glmjax.

Tiny models trained 3 steps by the real loop on random batches, exported from their checkpoints, loaded
with transformers (float32): logits equal ``glmjax.inference.logits`` within 1e-4 (float32 summation
over a few hundred terms of O(1) values; measured ~1e-6), greedy tokens equal, blanks filled alike.
"""
import itertools
import json
import os
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from glmjax.config import load_config
from glmjax.data import sources
from glmjax.data.vocab import train_tokenizer
from glmjax.export.hf import ExportError, export
from glmjax.export.reader import CheckpointReadError
from glmjax.inference import fill_blanks_ids, generate, generate_ids, load, logits
from glmjax.inference.testing import trained_workdir

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
TOL = 1e-4
V = 512


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "sp.model")
    return train_tokenizer(sources.iter_texts(sources.parse_spec("stdlib"), "train"), V, path, 200_000)


def small_cfg(sp_model, *overrides):
    return load_config(TINY, ["--config.batch_size=8", "--config.seq_len=32", f"--config.model.vocab_size={V}",
                              f"--config.data.tokenizer={sp_model}", "--config.optimizer.warmup_steps=1",
                              *overrides])


GLM4 = ("--config.model.norm=rmsnorm_pre", "--config.model.mlp=swiglu", "--config.model.rope_2d=false",
        "--config.model.num_kv_heads=2", "--config.model.num_layers=3")


@pytest.fixture(scope="module")
def glm4_workdir(tmp_path_factory, sp_model):
    return trained_workdir(small_cfg(sp_model, *GLM4), str(tmp_path_factory.mktemp("glm4")), steps=3)


@pytest.fixture(scope="module")
def glm130b_workdir(tmp_path_factory, sp_model):
    return trained_workdir(small_cfg(sp_model, "--config.model.scan_layers=false"),
                           str(tmp_path_factory.mktemp("glm130b")), steps=3)


def test_glm4_exports_as_native_glm_with_equal_logits_and_greedy_tokens(glm4_workdir, tmp_path):
    out = str(tmp_path / "hf")
    summary = export(glm4_workdir, out)
    assert summary["format"] == "hf" and summary["step"] == 3
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "glm" and "auto_map" not in config
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "GlmForCausalLM"
    model, _ = load(glm4_workdir)
    rng = np.random.default_rng(7)
    for B, T in ((2, 24), (3, 17)):
        tokens = rng.integers(8, V, (B, T))
        ours = logits(model, tokens)
        with torch.no_grad():
            theirs = hf(input_ids=torch.tensor(tokens)).logits.numpy()
        assert np.abs(theirs).max() > 0.5
        np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL)
    prompt = rng.integers(8, V, 7).tolist()
    ours = generate_ids(model, [prompt], max_new_tokens=20)[0]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                             eos_token_id=None)[0, len(prompt):].tolist()
    assert ours == theirs


def test_glm130b_style_exports_as_remote_code_with_2d_positions_and_prefix(glm130b_workdir, tmp_path):
    out = str(tmp_path / "remote")
    assert export(glm130b_workdir, out, max_shard_size="150KB")["format"] == "remote"
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) >= 3  # several shards, and they load
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    model, _ = load(glm130b_workdir)
    rng = np.random.default_rng(3)
    B, T = 3, 20
    tokens = rng.integers(8, V, (B, T))
    a = rng.integers(1, T - 2, B)  # Part A lengths
    j = np.arange(T)[None]
    bidir = (j < a[:, None]).astype(np.int32)
    pos = np.minimum(j, a[:, None] - 1)
    bpos = np.maximum(j - a[:, None] + 1, 0)
    ours = logits(model, tokens, positions=pos, block_positions=bpos, bidirectional=bidir)
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens), position_ids=torch.tensor(pos), block_position_ids=torch.tensor(bpos),
                    bidirectional=torch.tensor(bidir)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL)
    assert np.abs(ours - logits(model, tokens)).max() > 1e-2  # positions and prefix matter
    # blank filling: the remote generate fills [MASK] / [gMASK] like glmjax
    tk = model.get_tokenizer()
    prompt = tk.encode("def add(a, b):\n    return [MASK]\n\nx = [gMASK]")
    part_a, spans = fill_blanks_ids(model, prompt, tk.special, max_new_tokens=6)
    want = part_a + [t for s in spans for t in [tk.special["<sop>"], *s, tk.special["<eop>"]]]
    got = hf.generate(torch.tensor([prompt]), max_new_tokens=6)[0].tolist()
    assert got[:len(want)] == want and len(spans) == 2
    text = generate(model, ["def add(a, b):\n    return [MASK]\n\nx = [gMASK]"], max_new_tokens=6)[0]
    assert "[MASK]" not in text and text.startswith("def add(a, b):\n    return ")


def test_tokenizer_gives_sentencepiece_ids(glm4_workdir, tmp_path, sp_model):
    out = str(tmp_path / "tok")
    export(glm4_workdir, out, dtype="bfloat16")
    auto = AutoTokenizer.from_pretrained(out)
    model, _ = load(glm4_workdir)
    ours = model.get_tokenizer()
    texts = [t[:4000] for t in itertools.islice(sources.iter_texts(sources.parse_spec("stdlib"), "validation"), 30)]
    texts.append("a [MASK] b [sMASK]c[gMASK] <sop>x<eop>  \t\n\u00e9\u4e2d\U0001F600 123")
    checked = 0
    for text in texts:
        assert auto.encode(text, add_special_tokens=False) == ours.encode(text)
        checked += len(text)
    assert checked > 50_000
    assert auto.convert_tokens_to_ids("[gMASK]") == ours.special["[gMASK]"]
    from glmjax.data.vocab import SPECIAL_TOKENS
    from glmjax.export import tokenizer as export_tokenizer

    assert export_tokenizer.SPECIAL_TOKENS == SPECIAL_TOKENS
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert next(hf.parameters()).dtype == torch.bfloat16


def test_bad_inputs_are_clear_errors_and_leave_nothing(glm130b_workdir, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(CheckpointReadError, match="does not exist"):
        export(str(tmp_path / "nope"), out)
    with pytest.raises(CheckpointReadError, match=r"--step=7 is not a checkpoint.*\[3\]"):
        export(glm130b_workdir, out, step=7)
    with pytest.raises(ExportError, match=r"model.norm='deepnorm'.*--format=remote"):
        export(glm130b_workdir, out, fmt="hf")
    with pytest.raises(ExportError, match="--dtype"):
        export(glm130b_workdir, out, dtype="int8")
    broken = str(tmp_path / "broken")
    shutil.copytree(glm130b_workdir, broken)
    data = os.path.join(broken, "checkpoints", "3", "state", "ocdbt.process_0", "d")
    for name in os.listdir(data):
        with open(os.path.join(data, name), "r+b") as f:
            f.truncate(max(os.path.getsize(f.name) // 2, 1))
    with pytest.raises(CheckpointReadError, match="damaged"):
        export(broken, out)
    assert not os.path.exists(out) and not [p for p in os.listdir(tmp_path) if p.startswith("out")]


def test_cli_reports_user_errors_without_a_traceback(tmp_path):
    import subprocess
    import sys

    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "export_hf.py")
    r = subprocess.run([sys.executable, tool, f"--workdir={tmp_path / 'missing'}", f"--out={tmp_path / 'o'}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
