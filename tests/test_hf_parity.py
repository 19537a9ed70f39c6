"""The GLM-4-style glmjax model equals Hugging Face ``GlmForCausalLM`` (PyTorch, float32).

Random parameters (non-zero biases and norm scales), random tokens, one unpacked causal sequence per
row with positions 0..T-1. Our parameters go through ``glmjax.export.hf_mapping.to_hf_state_dict``
into the HF model; logits must agree within rtol = atol = 1e-4 (float32 on both sides).
"""
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import GlmConfig, GlmForCausalLM

from glmjax.config import load_config
from glmjax.export.hf_mapping import check_exportable, hf_config, to_hf_state_dict
from glmjax.model.glm import GLM, pure_dict
from helpers import causal_features

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
TOL = 1e-4  # rtol and atol on the logits


def glm4_tiny(*overrides):
    cfg = load_config(TINY, ["--config.model.norm=rmsnorm_pre", "--config.model.mlp=swiglu",
                             "--config.model.rope_2d=false", "--config.model.qkv_bias=true",
                             "--config.model.tie_embeddings=false", "--config.model.num_heads=4",
                             "--config.model.num_kv_heads=2", "--config.model.num_layers=3",
                             "--config.model.vocab_size=512", *overrides])
    return cfg.model


def randomise(params, rng: np.random.Generator):
    """Every parameter random (biases and norm scales too, so a mis-mapped one cannot hide)."""
    def fill(path, x):
        if "norm" in jax.tree_util.keystr(path):  # norm scales: around 1
            return (1.0 + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
        return (0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(fill, params)


def hf_model(model_cfg, state_dict):
    torch.manual_seed(0)
    model = GlmForCausalLM(GlmConfig(**hf_config(model_cfg))).float().eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()},
                                                strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "rotary" not in k], missing
    return model


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unscanned"])
def test_logits_match_hugging_face_glm(scan_layers):
    mcfg = glm4_tiny(f"--config.model.scan_layers={str(scan_layers).lower()}")
    check_exportable(mcfg)
    rng = np.random.default_rng(1234)
    model = GLM(mcfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    params = randomise(pure_dict(state), rng)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)

    B, T = 2, 48
    feats = causal_features(rng, B, T, mcfg.vocab_size)
    inputs = {k: feats[k] for k in ("tokens", "positions", "block_positions", "segment_ids", "bidirectional")}
    ours = np.asarray(nnx.jit(lambda m, f: m(f))(model, inputs))

    hf = hf_model(mcfg, to_hf_state_dict(params, mcfg))
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(feats["tokens"]).long(),
                    position_ids=torch.from_numpy(feats["positions"]).long()).logits.numpy()
    assert ours.shape == theirs.shape == (B, T, mcfg.vocab_size)
    assert np.abs(theirs).max() > 1.0  # not a degenerate comparison
    np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL)


def test_state_dict_covers_every_hf_parameter_with_the_right_shape():
    mcfg = glm4_tiny()
    params = jax.tree.map(np.asarray, pure_dict(nnx.state(GLM(mcfg, nnx.Rngs(0)), nnx.Param)))
    ours = to_hf_state_dict(params, mcfg)
    with torch.device("meta"):
        hf = GlmForCausalLM(GlmConfig(**hf_config(mcfg)))
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert {k: v.shape for k, v in ours.items()} == theirs


def test_non_glm4_models_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="model.norm='deepnorm'"):
        check_exportable(load_config(TINY).model)
