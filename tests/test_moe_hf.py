"""A tiny random Hugging Face ``Glm4MoeForCausalLM`` imported into glmjax gives the same logits, and a
glmjax MoE model exported to it reloads in transformers with the same logits.

3 layers (first dense), 8 experts, top 2, 1 shared, 2 groups (top 1 group), qk-norm, qkv bias, partial
half-split rotary, random non-zero correction bias (so the choice differs from the top scores).
float32 on both sides; rtol = atol = 1e-4 on logits of magnitude ~1-10."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

from glmjax.config import apply_override, base_config, validate
from glmjax.export.hf_moe_mapping import (from_hf_moe_state_dict, hf_moe_config, model_overrides_from_hf,
                                          to_hf_moe_state_dict)
from glmjax.model.glm import GLM, pure_dict
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


def glmjax_cfg(hf_config, scan=True):
    c = base_config()
    for k, v in model_overrides_from_hf(hf_config.to_dict()).items():
        node = c.model
        *parents, leaf = k.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = v
    apply_override(c, f"model.scan_layers={str(scan).lower()}")
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


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_imported_hf_glm4_moe_gives_the_same_logits(scan):
    hf = tiny_hf()
    mcfg = glmjax_cfg(hf.config, scan)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    params = from_hf_moe_state_dict(sd, mcfg)
    rng = np.random.default_rng(3)
    feats = causal_features(rng, 2, 40, mcfg.vocab_size)
    theirs = hf_logits(hf, feats["tokens"])
    ours = glmjax_logits(mcfg, params, feats)
    assert np.abs(theirs).max() > 1.0
    np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL)


def test_exported_glmjax_moe_reloads_in_transformers_with_the_same_logits():
    mcfg = glmjax_cfg(tiny_hf().config)
    rng = np.random.default_rng(5)
    model = GLM(mcfg, nnx.Rngs(1))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (1.0 + 0.3 * rng.standard_normal(x.shape) if "norm" in jax.tree_util.keystr(path)
                         else 0.15 * rng.standard_normal(x.shape)).astype(np.float32),
        pure_dict(nnx.state(model, nnx.Param)))
    sd = to_hf_moe_state_dict(params, mcfg)
    hf = Glm4MoeForCausalLM(Glm4MoeConfig(**hf_moe_config(mcfg))).float().eval()
    missing, unexpected = hf.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    feats = causal_features(rng, 2, 32, mcfg.vocab_size)
    np.testing.assert_allclose(glmjax_logits(mcfg, params, feats), hf_logits(hf, feats["tokens"]),
                               rtol=TOL, atol=TOL)
    # and back: HF -> glmjax is the inverse map
    back = from_hf_moe_state_dict({k: v.numpy() for k, v in hf.state_dict().items()}, mcfg)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
