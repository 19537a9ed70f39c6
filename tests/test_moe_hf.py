"""A tiny random Hugging Face ``Glm4MoeForCausalLM`` imported into glmjax gives the same logits, decodes
the same greedy tokens with the KV cache, and exports back through tools/export_hf.py bitwise.

3 layers (first dense), 8 experts, top 2, 1 shared, 2 groups (top 1 group), qk-norm, qkv bias, partial
half-split rotary, random non-zero correction bias (so the choice differs from the top scores).
float32 on both sides; rtol = atol = 1e-4 on logits of magnitude ~1-10."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

from glmjax.config import apply_override, base_config, validate
from glmjax.export.hf_moe_mapping import from_hf_moe_state_dict, model_overrides_from_hf
from glmjax.model.glm import GLM
from helpers import causal_features

TOL = 1e-4


def tiny_hf(seed=0):
    torch.manual_seed(seed)
    cfg = Glm4MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
                        first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=1.7,
                        use_qk_norm=True, attention_bias=True, rms_norm_eps=1e-5, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                         "partial_rotary_factor": 0.5},
                        num_nextn_predict_layers=0, initializer_range=0.2)
    model = Glm4MoeForCausalLM(cfg).float().eval()
    with torch.no_grad():  # every tensor random, norms around 1, correction bias large enough to matter
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.3 * torch.randn_like(b))
    return model


def glmjax_cfg(hf_config, scan=True, rope_style="half"):
    """The glmjax model config of an HF config; ``rope_style=interleaved`` computes the same model through
    the rotary column permutation of the mapping."""
    c = base_config()
    for k, v in model_overrides_from_hf(hf_config.to_dict()).items():
        node = c.model
        *parents, leaf = k.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = v
    apply_override(c, f"model.scan_layers={str(scan).lower()}")
    apply_override(c, f"model.rope_style={rope_style}")
    validate(c)
    return c.model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens).long()).logits.numpy()


def glmjax_logits(mcfg, params, feats):
    model = GLM(mcfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    model = nnx.merge(graphdef, state)
    inputs = {k: feats[k] for k in ("tokens", "positions", "segment_ids")}
    return np.asarray(nnx.jit(lambda m, f: m(f))(model, inputs))


def test_imported_hf_glm4_moe_gives_the_same_logits():
    """Scanned layers, half-split rotary (the tools test below covers listed layers + interleaved)."""
    hf = tiny_hf()
    mcfg = glmjax_cfg(hf.config)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    params = from_hf_moe_state_dict(sd, mcfg)
    rng = np.random.default_rng(3)
    feats = causal_features(rng, 2, 40, mcfg.vocab_size)
    theirs = hf_logits(hf, feats["tokens"])
    ours = glmjax_logits(mcfg, params, feats)
    assert np.abs(theirs).max() > 1.0
    np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL)


def write_tokenizer(directory, vocab: int) -> None:
    """A word-level Hugging Face tokenizer of ``vocab`` ids (the export copies the run's tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(directory / "tokenizer.json"))


def test_import_and_export_tools_round_trip_glm4_moe_and_decode_with_the_cache(tmp_path):
    """tools/import_hf.py turns a Glm4MoeForCausalLM directory into a workdir with the same logits (here
    with listed layers and glmjax's interleaved rotary, so the mapping permutes the rotary q/k columns);
    the KV-cache decode path (glmjax.inference) generates what transformers generates greedily;
    tools/export_hf.py writes it back as Glm4MoeForCausalLM with bitwise the same tensors (the inverse
    permutation) and the same logits."""
    import importlib.util
    from pathlib import Path

    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from glmjax.inference import generate_ids, load, logits

    def tool(name):
        path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.main

    hf = tiny_hf(1)
    hf_dir, wd, out = tmp_path / "hf", tmp_path / "wd", tmp_path / "out"
    hf.save_pretrained(str(hf_dir))
    write_tokenizer(hf_dir, hf.config.vocab_size)
    assert tool("import_hf")(["--model", str(hf_dir), "--workdir", str(wd), "--config.batch_size=8",
                              "--config.seq_len=32", "--config.model.scan_layers=false",
                              "--config.model.rope_style=interleaved", "--log_level=ERROR"]) == 0
    model, cfg = load(str(wd))
    assert cfg.model.moe.num_experts == 8 and cfg.model.moe.first_dense_layers == 1 and cfg.model.qk_norm
    assert not cfg.model.scan_layers and cfg.model.rope_style == "interleaved"
    tokens = np.random.default_rng(4).integers(1, hf.config.vocab_size, (2, 12))
    np.testing.assert_allclose(logits(model, tokens), hf_logits(hf, tokens), rtol=TOL, atol=TOL)
    ours = generate_ids(model, tokens.tolist(), max_new_tokens=6)
    with torch.no_grad():
        theirs = hf.generate(torch.from_numpy(tokens).long(), max_new_tokens=6, do_sample=False,
                             min_new_tokens=6, pad_token_id=0)[:, tokens.shape[1]:].numpy()
    np.testing.assert_array_equal(np.asarray(ours), theirs)

    assert tool("export_hf")(["--workdir", str(wd), "--out", str(out), "--log_level=ERROR"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "glm4_moe" and config["architectures"] == ["Glm4MoeForCausalLM"]
    back = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(back).__name__ == "Glm4MoeForCausalLM"
    exported = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    original = {k: v for f in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert set(exported) == set(original)
    for k, v in original.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    np.testing.assert_array_equal(hf_logits(back, tokens), hf_logits(hf, tokens))
