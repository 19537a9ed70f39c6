"""The released GLM-130B and ChatGLM-6B, exactly: a float64 NumPy forward of the released block written
here from its description, on random weights in the ORIGINAL layout, against glmjax after import
(tools/import_hf.py's library function) and back (export to the layout it came from).

Released block (GLM-130B and ChatGLM-6B): ``a = LN_in(h); m = LN_post(alpha*a + attn(a));
h = alpha*m + mlp(m)``, ``alpha = (2N)^0.5``, a final LN after the last layer, logits ``h @ E^T``.
Attention: fused per-head qkv ``[heads, 3*head_dim]`` with bias, split-halves rotary (``rotate_half``;
GLM-130B 1D over all of head_dim, ChatGLM-6B 2D: first half by position, second by block position),
output projection with bias, bidirectional prefix. MLP: GLM-130B GeGLU ``[value; gate]`` (second half
is the gate, erf GELU), ChatGLM-6B plain tanh-GELU, both with biases.
"""
import json
import math
import os
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from glmjax.config import ConfigError, base_config, load_config, validate
from glmjax.export.from_hf import ImportError_, import_hf
from glmjax.export.hf import export
from glmjax.inference import load, logits
from glmjax.train.state import abstract_params

REPO = Path(__file__).resolve().parents[1]
D, H, HD, F, V, L = 64, 4, 16, 96, 128, 2
TOL = 1e-4  # float32 glmjax vs float64 NumPy; logits are O(1-10), float32 error ~1e-6 relative
T = "transformer."
SMALL = [f"--config.model.num_layers={L}", f"--config.model.hidden_size={D}", f"--config.model.num_heads={H}",
         f"--config.model.num_kv_heads={H}", f"--config.model.head_dim={HD}", f"--config.model.mlp_dim={F}",
         f"--config.model.vocab_size={V}", "--config.model.dtype=float32", "--config.model.remat=none",
         "--config.batch_size=8", "--config.seq_len=32", "--config.mesh.tensor=1", "--config.mesh.fsdp=-1"]


# ------------------------------------------------------------------------- the released model, in NumPy

def ln(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p[0] + p[1]


def gelu_erf(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def gelu_tanh(x):  # ChatGLM-6B's gelu_impl
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rope(x, pos):
    """The released rotary on the last dim of ``x [B, T, H, r]``: cos/sin of ``pos * inv_freq``
    duplicated over the two halves, ``x * cos + rotate_half(x) * sin``."""
    r = x.shape[-1]
    freqs = pos[..., None].astype(np.float64) / 10000.0 ** (np.arange(0, r, 2) / r)
    emb = np.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return x * np.cos(emb) + rotate_half(x) * np.sin(emb)


def released_forward(sd, tokens, pos, bpos, prefix, *, chatglm: bool):
    g = lambda name: sd[name].astype(np.float64)  # noqa: E731
    lnp = lambda name: (g(name + ".weight"), g(name + ".bias"))  # noqa: E731
    B, S = tokens.shape
    alpha = math.sqrt(2 * L)
    j = np.arange(S)
    visible = (j[None, :] <= j[:, None])[None] | (j[None, None, :] < prefix[:, None, None])  # [B, T, S]
    h = g(T + "word_embeddings.weight")[tokens]
    for i in range(L):
        p = f"{T}layers.{i}."
        a = ln(h, lnp(p + "input_layernorm"))
        mixed = (a @ g(p + "attention.query_key_value.weight").T + g(p + "attention.query_key_value.bias"))
        q, k, v = np.split(mixed.reshape(B, S, H, 3 * HD), 3, axis=-1)
        if chatglm:  # 2D: first half of head_dim by position, second by block position
            q = np.concatenate([rope(q[..., :HD // 2], pos), rope(q[..., HD // 2:], bpos)], -1)
            k = np.concatenate([rope(k[..., :HD // 2], pos), rope(k[..., HD // 2:], bpos)], -1)
        else:
            q, k = rope(q, pos), rope(k, pos)
        s = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(HD)
        s = np.where(visible[:, None], s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        ctx = np.einsum("bhts,bshd->bthd", w, v).reshape(B, S, H * HD)
        attn = ctx @ g(p + "attention.dense.weight").T + g(p + "attention.dense.bias")
        m = ln(alpha * a + attn, lnp(p + "post_attention_layernorm"))
        z = m @ g(p + "mlp.dense_h_to_4h.weight").T + g(p + "mlp.dense_h_to_4h.bias")
        if chatglm:
            y = gelu_tanh(z)
        else:
            value, gate = np.split(z, 2, axis=-1)
            y = value * gelu_erf(gate)
        h = alpha * m + y @ g(p + "mlp.dense_4h_to_h.weight").T + g(p + "mlp.dense_4h_to_h.bias")
    h = ln(h, lnp(T + "final_layernorm"))
    head = g("lm_head.weight") if "lm_head.weight" in sd else g(T + "word_embeddings.weight")
    return h @ head.T


def released_tensors(rng, *, chatglm: bool) -> dict:
    """Random float32 weights with the released names and shapes (biases and norms random too)."""
    f = lambda *shape, s=0.15: rng.normal(0, s, shape).astype(np.float32)  # noqa: E731
    sd = {T + "word_embeddings.weight": f(V, D, s=0.3)}
    width = F if chatglm else 2 * F
    norms = [f"{T}layers.{i}.{n}" for i in range(L) for n in ("input_layernorm", "post_attention_layernorm")]
    for n in norms + [T + "final_layernorm"]:
        sd[n + ".weight"], sd[n + ".bias"] = 1 + f(D, s=0.2), f(D, s=0.2)
    for i in range(L):
        p = f"{T}layers.{i}."
        sd[p + "attention.query_key_value.weight"], sd[p + "attention.query_key_value.bias"] = f(3 * H * HD, D), f(3 * H * HD, s=0.1)
        sd[p + "attention.dense.weight"], sd[p + "attention.dense.bias"] = f(D, H * HD), f(D, s=0.1)
        sd[p + "mlp.dense_h_to_4h.weight"], sd[p + "mlp.dense_h_to_4h.bias"] = f(width, D), f(width, s=0.1)
        sd[p + "mlp.dense_4h_to_h.weight"], sd[p + "mlp.dense_4h_to_h.bias"] = f(D, F, s=0.1), f(D, s=0.1)
    if chatglm:
        sd["lm_head.weight"] = f(V, D, s=0.3)  # untied here, so a mis-mapped head cannot hide
    return sd


def split_ranks(sd, n):
    """Megatron model parallelism of the released code: column-parallel along dim 0 (the GeGLU
    dense_h_to_4h half by half: each rank ``[value_r; gate_r]``), row-parallel weights along dim 1."""
    ranks = [{} for _ in range(n)]
    for name, x in sd.items():
        if "dense_h_to_4h" in name:
            value, gate = np.split(x, 2, axis=0)
            parts = [np.concatenate([v, g_]) for v, g_ in zip(np.split(value, n), np.split(gate, n))]
        elif name.endswith(("word_embeddings.weight", "query_key_value.weight", "query_key_value.bias")):
            parts = np.split(x, n, axis=0)
        elif name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
            parts = np.split(x, n, axis=1)
        else:
            parts = [x] * n
        for r in range(n):
            ranks[r][name] = torch.from_numpy(np.ascontiguousarray(parts[r])).half().float()  # fp16 -> exact
    return ranks


@pytest.fixture(scope="module")
def glm130b_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("glm130b")
    sd = {k: torch.from_numpy(v).half().float().numpy() for k, v in released_tensors(np.random.default_rng(0), chatglm=False).items()}
    (d / "1000").mkdir()
    (d / "latest").write_text("1000\n")
    for r, part in enumerate(split_ranks(sd, 2)):
        torch.save({"module": part, "iteration": 1000}, d / "1000" / f"mp_rank_{r:02d}_model_states.pt")
    return str(d), sd


@pytest.fixture(scope="module")
def chatglm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chatglm")
    sd = released_tensors(np.random.default_rng(1), chatglm=True)
    (d / "config.json").write_text(json.dumps({
        "model_type": "chatglm", "architectures": ["ChatGLMModel"], "hidden_size": D, "num_attention_heads": H,
        "num_layers": L, "inner_hidden_size": F, "vocab_size": V, "layernorm_epsilon": 1e-5,
        "position_encoding_2d": True, "tie_word_embeddings": False}))
    state = {k: torch.from_numpy(v) for k, v in sd.items()}
    state[f"{T}layers.0.attention.rotary_emb.inv_freq"] = torch.ones(HD // 4)  # a buffer the import ignores
    torch.save(state, d / "pytorch_model.bin")
    return str(d), sd


def read_sat(path):
    return {k: v.numpy() for k, v in torch.load(path, weights_only=True)["module"].items()}


def test_glm130b_import_matches_the_released_forward_and_exports_back(glm130b_dir, tmp_path):
    src, sd = glm130b_dir
    wd = str(tmp_path / "wd")
    r = import_hf(src, wd, config_path=str(REPO / "configs/glm130b.py"), overrides=SMALL)  # layout auto-detected
    assert r["kind"] == "glm130b"
    model, cfg = load(wd)
    m = cfg.model
    assert (m.rope_style, m.partial_rotary_factor, m.rope_2d, m.glu_order) == ("half", 1.0, False, "value_first")
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, V, (2, 13))
    pos = np.broadcast_to(np.arange(13), (2, 13))  # 1D positions
    prefix = np.array([6, 0])  # [gMASK]-style bidirectional context / plain causal
    want = released_forward(sd, tokens, pos, np.zeros_like(pos), prefix, chatglm=False)
    got = logits(model, tokens, positions=pos, bidirectional=prefix)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)
    out = str(tmp_path / "back")
    assert export(wd, out)["format"] == "glm130b"  # auto: back to the layout it came from
    assert open(os.path.join(out, "latest")).read().strip() == "0"  # SAT's layout: latest + <step>/mp_rank_XX
    back = read_sat(os.path.join(out, "0", "mp_rank_00_model_states.pt"))
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_chatglm_import_matches_the_released_forward_with_2d_positions_and_prefix(chatglm_dir, tmp_path):
    src, sd = chatglm_dir
    wd = str(tmp_path / "wd")
    r = import_hf(src, wd, config_path=str(REPO / "configs/chatglm_6b.py"), layout="chatglm",
                  overrides=["--config.model.dtype=float32", "--config.batch_size=8", "--config.seq_len=32"])
    assert r["kind"] == "chatglm"
    model, cfg = load(wd)
    assert (cfg.model.mlp, cfg.model.gelu, cfg.model.rope_2d, cfg.model.tie_embeddings) == ("gelu", "tanh", True, False)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, V, (2, 14))
    ctx = np.array([8, 5])  # Part A length per row; Part B at the mask position, block positions 1..
    j = np.arange(14)
    pos = np.where(j[None] < ctx[:, None], j[None], ctx[:, None] - 1)
    bpos = np.where(j[None] < ctx[:, None], 0, j[None] - ctx[:, None] + 1)
    want = released_forward(sd, tokens, pos, bpos, ctx, chatglm=True)
    got = logits(model, tokens, positions=pos, block_positions=bpos, bidirectional=ctx)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)
    out = str(tmp_path / "back")
    assert export(wd, out, fmt="chatglm")["format"] == "chatglm"
    back = {k: v.numpy() for k, v in torch.load(os.path.join(out, "pytorch_model.bin"), weights_only=True).items()}
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    assert json.load(open(os.path.join(out, "config.json")))["inner_hidden_size"] == F


def test_bad_checkpoints_name_the_first_mismatching_tensor(glm130b_dir, tmp_path):
    src, _ = glm130b_dir
    cfg = str(REPO / "configs/glm130b.py")
    wd = tmp_path / "wd"
    with pytest.raises(ImportError_, match=r"'transformer\.layers\.0\.mlp\.dense_h_to_4h\.weight' has shape "
                                           r"\(192, 64\) but --config .* implies \(160, 64\)"):
        import_hf(src, str(wd), config_path=cfg, overrides=SMALL + ["--config.model.mlp_dim=80"])
    with pytest.raises(ImportError_, match=r"'transformer\.word_embeddings\.weight' has shape \(128, 64\)"):
        import_hf(src, str(wd), config_path=cfg, overrides=SMALL + ["--config.model.hidden_size=32"])
    with pytest.raises(ImportError_, match="has 2 layers but --config has model.num_layers=1"):
        import_hf(src, str(wd), config_path=cfg, overrides=SMALL + ["--config.model.num_layers=1"])
    with pytest.raises(ImportError_, match="unknown --layout='gpt2': known layouts are chatglm, chatglm2, glm, glm130b, glm4_moe, glmjax"):
        import_hf(src, str(wd), layout="gpt2")
    with pytest.raises(ImportError_, match="--config must give its shape"):
        import_hf(src, str(wd), overrides=SMALL)
    with pytest.raises(ImportError_, match="no mp_rank_XX_model_states.pt"):
        import_hf(str(tmp_path), str(wd), config_path=cfg, layout="glm130b")
    v2 = tmp_path / "chatglm2"  # detected as ChatGLM2/3 (tests/test_glm_originals_chatglm2.py)
    v2.mkdir()
    (v2 / "config.json").write_text(json.dumps({"model_type": "chatglm", "multi_query_attention": True}))
    with pytest.raises(ImportError_, match="lacks num_layers, hidden_size, .*: it is not a complete ChatGLM2/3-6B"):
        import_hf(str(v2), str(wd))
    assert not wd.exists()


# --------------------------------------------------------------------------------- presets: counts

def released_shapes(*, layers, hidden, heads, head_dim, mlp_in, mlp, vocab):
    """Name -> shape of every tensor of a released checkpoint (GLM-130B / ChatGLM-6B naming)."""
    out = {T + "word_embeddings.weight": (vocab, hidden), T + "final_layernorm.weight": (hidden,),
           T + "final_layernorm.bias": (hidden,)}
    for i in range(layers):
        p = f"{T}layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            out[p + n + ".weight"] = out[p + n + ".bias"] = (hidden,)
        out[p + "attention.query_key_value.weight"] = (3 * heads * head_dim, hidden)
        out[p + "attention.query_key_value.bias"] = (3 * heads * head_dim,)
        out[p + "attention.dense.weight"], out[p + "attention.dense.bias"] = (hidden, heads * head_dim), (hidden,)
        out[p + "mlp.dense_h_to_4h.weight"], out[p + "mlp.dense_h_to_4h.bias"] = (mlp_in, hidden), (mlp_in,)
        out[p + "mlp.dense_4h_to_h.weight"], out[p + "mlp.dense_4h_to_h.bias"] = (hidden, mlp), (hidden,)
    return out


@pytest.mark.parametrize("preset,shapes,billions", [
    ("glm130b", dict(layers=70, hidden=12288, heads=96, head_dim=128, mlp_in=2 * 32768, mlp=32768, vocab=150528),
     128.7),
    # ChatGLM-6B's lm_head.weight is the tied copy of the embeddings: not a parameter of its own
    ("chatglm_6b", dict(layers=28, hidden=4096, heads=32, head_dim=128, mlp_in=16384, mlp=16384, vocab=130528), 6.2),
])
def test_preset_parameter_counts_equal_the_released_checkpoints(preset, shapes, billions):
    cfg = load_config(str(REPO / f"configs/{preset}.py"))
    validate(cfg)
    _, abstract, _ = abstract_params(cfg.model)  # eval_shape: nothing is allocated
    ours = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    released = sum(math.prod(s) for s in released_shapes(**shapes).values())
    assert ours == released
    assert round(ours / 1e9, 1) == billions


# --------------------------------------------------------------------------- knobs: objective, init

def test_gmask_continue_positions_are_glm130b_and_mask_rule_is_unchanged():
    from glmjax.data.blank_infilling import ObjectiveSpec, make_example

    chunk = np.arange(100, 140)
    ex = {}
    for rule in ("mask", "continue"):
        spec = ObjectiveSpec(seq_len=64, weights=(0, 0.5, 0, 0.5), mask_ids=(5, 6, 7), sop=8, eop=9,
                             gmask_positions=rule)
        ex[rule] = {o: make_example(chunk, o, spec, np.random.default_rng(4)) for o in ("gmask", "mask")}
    g, c = ex["mask"]["gmask"], ex["continue"]["gmask"]
    n = len(g["tokens"])
    a = int(g["bidirectional"].sum())  # Part A ends with the [gMASK] token
    assert g["tokens"][a - 1] == 7 and g["tokens"][a] == 8
    np.testing.assert_array_equal(g["positions"][a:], a - 1)  # mask rule: Part B at the [gMASK] position
    np.testing.assert_array_equal(g["block_positions"][a:], np.arange(1, n - a + 1))
    np.testing.assert_array_equal(c["positions"], np.arange(n))  # GLM-130B: 0..n straight through
    np.testing.assert_array_equal(c["block_positions"], 0)
    for key in ("tokens", "targets", "bidirectional"):
        np.testing.assert_array_equal(c[key], g[key])
    for key in ex["mask"]["mask"]:  # [MASK] examples do not depend on the [gMASK] rule
        np.testing.assert_array_equal(ex["continue"]["mask"][key], ex["mask"]["mask"][key])


def test_deepnorm_init_is_xavier_normal_with_beta_on_v_out_and_mlp():
    from flax import nnx

    from glmjax.model.glm import GLM, pure_dict

    m = base_config().model
    m.update(dict(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=4, head_dim=64, mlp_dim=512,
                  vocab_size=64, norm="deepnorm", mlp="geglu", init="deepnorm", scan_layers=False))
    p = pure_dict(nnx.state(GLM(m, nnx.Rngs(0)), nnx.Param))["layers"][0]
    beta = (2 * 4) ** -0.5
    xavier = lambda fi, fo, gain=1.0: gain * math.sqrt(2 / (fi + fo))  # noqa: E731
    want = {("attn", "wq"): xavier(256, 256), ("attn", "wk"): xavier(256, 256),
            ("attn", "wv"): xavier(256, 256, beta), ("attn", "wo"): xavier(256, 256, beta),
            ("mlp", "wi"): xavier(256, 512, beta), ("mlp", "wo"): xavier(512, 256, beta)}
    for (a, b), std in want.items():
        x = np.asarray(p[a][b])
        # >= 65536 samples: the sample std is within ~0.3% (1 sigma) of the true one
        assert abs(x.std() / std - 1) < 0.02, (a, b, x.std(), std)
        assert abs(x.mean()) < 4 * std / math.sqrt(x.size)


@pytest.mark.parametrize("key,value,needle", [
    ("model.gelu", "quick", "model.gelu='quick' is not one of erf, tanh"),
    ("model.glu_order", "gate_last", "model.glu_order='gate_last' is not one of gate_first, value_first"),
    ("model.mlp", "relu", "model.mlp='relu' is not one of geglu, swiglu, gelu"),
    ("model.init", "xavier", "model.init='xavier' is not one of normal, deepnorm"),
    ("model.init", "deepnorm", "model.init='deepnorm' needs model.norm='deepnorm'"),
    ("objective.gmask_positions", "next", "objective.gmask_positions='next' is not one of mask, continue"),
])
def test_knob_validation(key, value, needle):
    c = base_config()
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        validate(c)
