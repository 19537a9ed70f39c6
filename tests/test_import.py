"""Import from Hugging Face: a GlmForCausalLM directory becomes a glmjax workdir that computes the same
logits, exports back to identical tensors (native and remote-code formats), and resumes training with
the model's own tokenizer."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import GlmConfig, GlmForCausalLM

from glmjax.data import sources
from glmjax.data.vocab import train_tokenizer
from glmjax.export.from_hf import ImportError_, import_hf
from glmjax.export.hf import export
from glmjax.export.tokenizer import save_hf_tokenizer
from glmjax.inference import load, logits

V = 512


def tensors(directory):
    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, f)))
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    sp = train_tokenizer(sources.iter_texts(sources.parse_spec("stdlib"), "train"), V, str(d / "sp.model"), 200_000)
    torch.manual_seed(0)
    config = GlmConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, attention_bias=True, tie_word_embeddings=False,
                       pad_token_id=0, eos_token_id=1, bos_token_id=None,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    model = GlmForCausalLM(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():  # every tensor random, biases and norms too
            p.copy_((1 + 0.2 * torch.randn_like(p)) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(str(d / "model"))
    save_hf_tokenizer(sp, str(d / "model"))
    return str(d / "model")


def test_import_computes_the_same_logits_and_round_trips(hf_dir, tmp_path):
    wd = str(tmp_path / "wd")
    r = import_hf(hf_dir, wd, overrides=["--config.batch_size=8", "--config.seq_len=32"])
    assert r["kind"] == "glm" and r["config"].data.tokenizer == hf_dir
    model, cfg = load(wd)
    assert model.step == 0 and cfg.model.num_kv_heads == 2 and cfg.model.head_dim == 16
    hf = GlmForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(8, V, (2, 19))
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(logits(model, tokens), theirs, rtol=1e-4, atol=1e-4)
    original = tensors(hf_dir)
    out = str(tmp_path / "back")
    export(wd, out)
    back = tensors(out)
    assert set(back) == set(original)
    for k, v in original.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    # through the remote-code format and back again: still identical
    remote, wd2, out2 = str(tmp_path / "remote"), str(tmp_path / "wd2"), str(tmp_path / "back2")
    assert export(wd, remote, fmt="remote", max_shard_size="100KB")["shards"] > 1
    assert import_hf(remote, wd2, overrides=[])["kind"] == "glmjax"
    export(wd2, out2, fmt="hf")
    for k, v in tensors(out2).items():
        np.testing.assert_array_equal(v, original[k], err_msg=k)


def test_imported_workdir_resumes_training_with_its_tokenizer(hf_dir, tmp_path):
    from glmjax.config import load_config
    from glmjax.train.loop import train

    from glmjax.data.testing import write_corpus

    wd = str(tmp_path / "wd")
    write_corpus(str(tmp_path / "corpus"), 20)
    import_hf(hf_dir, wd, overrides=["--config.batch_size=8", "--config.seq_len=32", "--config.eval_every=0",
                                     f"--config.data.task=text:{tmp_path}/corpus/*.txt", "--config.data.prefetch=2",
                                     "--config.optimizer.warmup_steps=1", "--config.log_every=1"])
    cfg = load_config(os.path.join(wd, "imported_config.py"), ["--config.steps=2"])
    result = train(cfg, wd)
    records = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # resumed from step 0, not re-initialised
    assert all(np.isfinite(r["loss"]) and r["loss"] < 2 * np.log(V) for r in records if "loss" in r)
    assert result is not None
    model, _ = load(wd)
    assert model.step == 2


def test_other_architectures_are_refused_and_nothing_is_written(tmp_path):
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ImportError_, match="'llama' model.*glm"):
        import_hf(str(d), str(tmp_path / "wd"))
    with pytest.raises(ImportError_, match="no config.json"):
        import_hf(str(tmp_path), str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()
