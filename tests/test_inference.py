"""Inference: the KV-cache decode gives exactly the tokens of full recomputation (the training forward)."""
import os

import jax
import numpy as np
import pytest
from flax import nnx

from glmjax.config import load_config
from glmjax.inference import from_params, generate_ids, logits
from glmjax.model.glm import GLM, pure_dict

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")


def random_model(*overrides, seed=0):
    cfg = load_config(TINY, ["--config.model.vocab_size=300", *overrides])
    params = jax.tree.map(np.asarray, pure_dict(nnx.state(GLM(cfg.model, nnx.Rngs(seed)), nnx.Param)))
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (1 + 0.2 * rng.standard_normal(x.shape) if "norm" in jax.tree_util.keystr(p)
                      else 0.15 * rng.standard_normal(x.shape)).astype(np.float32), params)
    return from_params(cfg, params)


@pytest.mark.parametrize("overrides", [
    (),  # GLM-130B style: DeepNorm, GeGLU, 2D rotary, scanned layers
    ("--config.model.norm=rmsnorm_pre", "--config.model.mlp=swiglu", "--config.model.rope_2d=false",
     "--config.model.num_kv_heads=2", "--config.model.scan_layers=false", "--config.model.tie_embeddings=true"),
    # the released GLM-130B knobs: embedding LN, no extra final norm, output / MLP biases, [value; gate]
    # GeGLU, 1D split-halves rotary over all of head_dim
    ("--config.model.embedding_norm=true", "--config.model.final_norm=false", "--config.model.attn_out_bias=true",
     "--config.model.mlp_bias=true", "--config.model.glu_order=value_first", "--config.model.rope_2d=false",
     "--config.model.rope_style=half", "--config.model.partial_rotary_factor=1.0"),
], ids=["glm130b_style", "glm4_style_gqa_unscanned_tied", "released_glm130b"])
def test_cache_equals_recompute_for_a_batch_of_different_lengths(overrides):
    model = random_model(*overrides)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(8, 300, n).tolist() for n in (3, 11, 6)]
    cached = generate_ids(model, prompts, max_new_tokens=16)
    full = generate_ids(model, prompts, max_new_tokens=16, use_cache=False)
    assert cached == full
    assert all(len(r) == 16 for r in cached) and len({tuple(r) for r in cached}) == 3
    # greedy next token of the full forward (logits) is the first generated token
    for p, row in zip(prompts, cached):
        assert int(np.argmax(logits(model, [p])[0, -1])) == row[0]
    # sampling: same seed, same tokens with and without the cache; another seed differs
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    s1 = generate_ids(model, prompts, **kw)
    assert s1 == generate_ids(model, prompts, use_cache=False, **kw)
    assert s1 != generate_ids(model, prompts, **{**kw, "seed": 6})


def test_cache_with_2d_positions_and_prefix_equals_recompute():
    model = random_model()
    rng = np.random.default_rng(2)
    prompts = [rng.integers(8, 300, n).tolist() for n in (5, 9)]
    prefix = [4, 6]  # Part A; the rest is Part B with positions fixed and block positions 1..
    pos = [list(range(a)) + [a - 1] * (len(p) - a) for p, a in zip(prompts, prefix)]
    bpos = [[0] * a + list(range(1, len(p) - a + 1)) for p, a in zip(prompts, prefix)]
    kw = dict(max_new_tokens=10, positions=pos, block_positions=bpos, prefix_lens=prefix, pos_step=0, block_pos_step=1)
    cached = generate_ids(model, prompts, **kw)
    assert cached == generate_ids(model, prompts, use_cache=False, **kw)
    plain = generate_ids(model, prompts, max_new_tokens=10)
    assert cached != plain  # the 2D positions and the prefix change the result


def test_bad_arguments_are_refused():
    model = random_model()
    with pytest.raises(ValueError, match="at least one token"):
        generate_ids(model, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate_ids(model, [[9]], max_new_tokens=2, top_p=0.0)
