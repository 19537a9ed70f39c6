"""ChatGLM2-6B / ChatGLM3-6B (Hugging Face remote-code layout), exactly, and GLM-130B's SAT model-parallel
export: a float64 NumPy forward written here from the released ChatGLM2 description, on random weights in
the ORIGINAL layout, against glmjax after import; export back gives identical tensors.

Released ChatGLM2 (``modeling_chatglm.py``): ``h = E[x]``; per layer ``h = h + attn(RMS_in(h))``,
``h = h + mlp(RMS_post(h))``; final RMSNorm; logits ``h @ W_out^T`` (untied). Attention: fused
``query_key_value`` rows ``[q (H*hd); k (K*hd); v (K*hd)]`` with bias, K multi-query groups (query head h
reads group ``h // (H/K)``), rotary on the first half of head_dim on interleaved pairs with
``theta_i = 1 / (10000 * rope_ratio)^(2i / (hd/2))``, scores ``/ sqrt(hd)``, causal; ``dense`` without
bias. MLP: ``a, b = chunk(x W1^T, 2)``, ``silu(a) * b``, then ``W2`` (no biases).
"""
import json
import math
import os
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from glmjax.config import load_config, validate
from glmjax.export.from_hf import ImportError_, import_hf
from glmjax.export.hf import ExportError, export
from glmjax.inference import load, logits
from glmjax.train.state import abstract_params

REPO = Path(__file__).resolve().parents[1]
D, H, K, HD, F, V, L = 64, 4, 2, 16, 96, 128, 2
RATIO = 1.5  # rope_ratio (ChatGLM3-6B-32k style): theta = 10000 * 1.5, so the mapping is exercised
TOL = 1e-4  # float32 glmjax vs float64 NumPy; logits O(1-10), float32 relative error ~1e-6
T = "transformer."
RUN = ["--config.model.dtype=float32", "--config.model.remat=none", "--config.batch_size=8", "--config.seq_len=32",
       "--config.mesh.tensor=1", "--config.mesh.fsdp=-1", "--config.model.sequence_parallel=false",
       "--config.model.loss_chunk=0"]


def rms(x, w, eps=1e-5):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_interleaved(x, pos, base):
    """The released ``apply_rotary_pos_emb``: the first ``r = hd/2`` dims as pairs ``(x[2i], x[2i+1])``
    rotated by ``pos * theta_i``, ``theta_i = base^(-2i/r)``; the rest pass through."""
    r = x.shape[-1] // 2
    theta = 1.0 / base ** (np.arange(0, r, 2) / r)
    ang = pos[..., None].astype(np.float64) * theta  # [B, S, r/2]
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    x0, x1 = x[..., 0:r:2], x[..., 1:r:2]
    rot = np.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).reshape(*x.shape[:-1], r)
    return np.concatenate([rot, x[..., r:]], -1)


def chatglm2_forward(sd, tokens):
    g = lambda name: sd[name].astype(np.float64)  # noqa: E731
    B, S = tokens.shape
    pos = np.broadcast_to(np.arange(S), (B, S))
    causal = np.tril(np.ones((S, S), bool))
    h = g(T + "embedding.word_embeddings.weight")[tokens]
    for i in range(L):
        p = f"{T}encoder.layers.{i}."
        x = rms(h, g(p + "input_layernorm.weight"))
        mixed = x @ g(p + "self_attention.query_key_value.weight").T + g(p + "self_attention.query_key_value.bias")
        q, k, v = np.split(mixed, [H * HD, (H + K) * HD], axis=-1)
        q, k, v = q.reshape(B, S, H, HD), k.reshape(B, S, K, HD), v.reshape(B, S, K, HD)
        q, k = rope_interleaved(q, pos, 10000 * RATIO), rope_interleaved(k, pos, 10000 * RATIO)
        k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)  # head h -> group h // (H/K)
        s = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(HD)
        s = np.where(causal, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        ctx = np.einsum("bhts,bshd->bthd", w, v).reshape(B, S, H * HD)
        h = h + ctx @ g(p + "self_attention.dense.weight").T
        x = rms(h, g(p + "post_attention_layernorm.weight"))
        a, b = np.split(x @ g(p + "mlp.dense_h_to_4h.weight").T, 2, axis=-1)
        h = h + (a / (1 + np.exp(-a)) * b) @ g(p + "mlp.dense_4h_to_h.weight").T
    h = rms(h, g(T + "encoder.final_layernorm.weight"))
    return h @ g(T + "output_layer.weight").T


def chatglm2_tensors(rng) -> dict:
    f = lambda *shape, s=0.15: rng.normal(0, s, shape).astype(np.float32)  # noqa: E731
    sd = {T + "embedding.word_embeddings.weight": f(V, D, s=0.3), T + "output_layer.weight": f(V, D, s=0.3),
          T + "encoder.final_layernorm.weight": 1 + f(D, s=0.2),
          T + "rotary_pos_emb.inv_freq": (1.0 / 10000 ** (np.arange(0, HD // 2, 2) / (HD // 2))).astype(np.float32)}
    for i in range(L):
        p = f"{T}encoder.layers.{i}."
        sd[p + "input_layernorm.weight"], sd[p + "post_attention_layernorm.weight"] = 1 + f(D, s=0.2), 1 + f(D, s=0.2)
        sd[p + "self_attention.query_key_value.weight"] = f((H + 2 * K) * HD, D)
        sd[p + "self_attention.query_key_value.bias"] = f((H + 2 * K) * HD, s=0.1)
        sd[p + "self_attention.dense.weight"] = f(D, H * HD)
        sd[p + "mlp.dense_h_to_4h.weight"], sd[p + "mlp.dense_4h_to_h.weight"] = f(2 * F, D), f(D, F, s=0.1)
    return sd


def chatglm2_config(**extra) -> dict:
    c = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "add_bias_linear": False, "add_qkv_bias": True,
         "apply_residual_connection_post_layernorm": False, "ffn_hidden_size": F, "hidden_size": D, "kv_channels": HD,
         "layernorm_epsilon": 1e-5, "multi_query_attention": True, "multi_query_group_num": K,
         "num_attention_heads": H, "num_layers": L, "original_rope": True, "padded_vocab_size": V,
         "post_layer_norm": True, "rmsnorm": True, "seq_length": 32, "rope_ratio": RATIO, "torch_dtype": "float16"}
    c.update(extra)
    return c


@pytest.fixture(scope="module")
def chatglm2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chatglm2")
    sd = chatglm2_tensors(np.random.default_rng(11))
    (d / "config.json").write_text(json.dumps(chatglm2_config()))
    half = {k: v for k, v in sd.items() if "layers.1." not in k}  # two shards, as the released files are
    torch.save({k: torch.from_numpy(v) for k, v in half.items()}, d / "pytorch_model-00001-of-00002.bin")
    torch.save({k: torch.from_numpy(v) for k, v in sd.items() if k not in half}, d / "pytorch_model-00002-of-00002.bin")
    return str(d), sd


def test_chatglm2_import_matches_the_released_forward_and_exports_back(chatglm2_dir, tmp_path):
    src, sd = chatglm2_dir
    wd = str(tmp_path / "wd")
    r = import_hf(src, wd, config_path=str(REPO / "configs/chatglm2_6b.py"), overrides=RUN)  # layout detected
    assert r["kind"] == "chatglm2"
    model, cfg = load(wd)
    m = cfg.model
    assert (m.num_kv_heads, m.rope_theta, m.vocab_size, m.tie_embeddings) == (K, 10000 * RATIO, V, False)
    tokens = np.random.default_rng(12).integers(0, V, (2, 13))
    want = chatglm2_forward(sd, tokens)
    got = logits(model, tokens)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)
    out = str(tmp_path / "back")
    s = export(wd, out, fmt="chatglm2")
    assert s["format"] == "chatglm2"
    back = {k: v.numpy() for k, v in torch.load(os.path.join(out, "pytorch_model.bin"), weights_only=True).items()}
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    config = json.load(open(os.path.join(out, "config.json")))
    for key, value in chatglm2_config(seq_length=32, torch_dtype="float32").items():
        if key != "architectures":
            assert config[key] == value, key
    # the exported directory imports again (layout detected from its config.json) to the same logits
    wd2 = str(tmp_path / "wd2")
    assert import_hf(out, wd2, config_path=str(REPO / "configs/chatglm2_6b.py"), overrides=RUN)["kind"] == "chatglm2"
    np.testing.assert_array_equal(logits(load(wd2)[0], tokens), got)


def test_chatglm2_bad_input_is_named(chatglm2_dir, tmp_path):
    src, _ = chatglm2_dir
    wd = tmp_path / "wd"
    preset = str(REPO / "configs/chatglm2_6b.py")

    def variant(name, **changes):
        d = tmp_path / name
        d.mkdir()
        for f in os.listdir(src):
            if f.endswith(".bin"):
                os.symlink(os.path.join(src, f), d / f)
        (d / "config.json").write_text(json.dumps(chatglm2_config(**changes)))
        return str(d)

    with pytest.raises(ImportError_, match=r"'transformer\.encoder\.layers\.0\.self_attention\.query_key_value"
                                           r"\.weight' has shape \(128, 64\) but config\.json .* implies \(96, 64\)"):
        import_hf(variant("groups", multi_query_group_num=1), str(wd), config_path=preset, overrides=RUN)
    with pytest.raises(ImportError_, match=r"'transformer\.encoder\.layers\.0\.mlp\.dense_h_to_4h\.weight' has shape"):
        import_hf(variant("ffn", ffn_hidden_size=80), str(wd), config_path=preset, overrides=RUN)
    with pytest.raises(ImportError_, match="has 2 layers but config.json has num_layers=1"):
        import_hf(variant("layers", num_layers=1), str(wd), config_path=preset, overrides=RUN)
    with pytest.raises(ImportError_, match=r"apply_residual_connection_post_layernorm=True .*; pre_seq_len=8"):
        import_hf(variant("ptuning", apply_residual_connection_post_layernorm=True, pre_seq_len=8), str(wd))
    with pytest.raises(ImportError_, match="known layouts are chatglm, chatglm2, glm, glm130b, glm4_moe, glmjax"):
        import_hf(src, str(wd), layout="chatglm3")
    with pytest.raises(ImportError_, match=r"--layout=chatglm but .* is a 'chatglm2' model"):
        import_hf(src, str(wd), layout="chatglm")
    assert not wd.exists()


def released_chatglm2_shapes(*, layers, hidden, heads, groups, head_dim, ffn, vocab):
    out = {T + "embedding.word_embeddings.weight": (vocab, hidden), T + "output_layer.weight": (vocab, hidden),
           T + "encoder.final_layernorm.weight": (hidden,)}
    for i in range(layers):
        p = f"{T}encoder.layers.{i}."
        out[p + "input_layernorm.weight"] = out[p + "post_attention_layernorm.weight"] = (hidden,)
        out[p + "self_attention.query_key_value.weight"] = ((heads + 2 * groups) * head_dim, hidden)
        out[p + "self_attention.query_key_value.bias"] = ((heads + 2 * groups) * head_dim,)
        out[p + "self_attention.dense.weight"] = (hidden, heads * head_dim)
        out[p + "mlp.dense_h_to_4h.weight"], out[p + "mlp.dense_4h_to_h.weight"] = (2 * ffn, hidden), (hidden, ffn)
    return out


def test_chatglm2_preset_parameter_count_equals_the_released_checkpoint():
    cfg = load_config(str(REPO / "configs/chatglm2_6b.py"))
    validate(cfg)
    _, abstract, _ = abstract_params(cfg.model)
    ours = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    released = sum(math.prod(s) for s in released_chatglm2_shapes(
        layers=28, hidden=4096, heads=32, groups=2, head_dim=128, ffn=13696, vocab=65024).values())
    assert ours == released == 6_243_584_000  # the released files' tensors, inv_freq (a buffer) aside


# ------------------------------------------------------------------ GLM-130B: SAT model-parallel export


def test_glm130b_exports_into_sat_model_parallel_ranks_and_imports_back(tmp_path):
    from test_glm_originals import SMALL, released_tensors, split_ranks

    sd = {k: torch.from_numpy(v).half().float().numpy()
          for k, v in released_tensors(np.random.default_rng(13), chatglm=False).items()}
    src = tmp_path / "src"
    src.mkdir()
    torch.save({"module": {k: torch.from_numpy(v) for k, v in sd.items()}}, src / "mp_rank_00_model_states.pt")
    wd = str(tmp_path / "wd")
    import_hf(str(src), wd, config_path=str(REPO / "configs/glm130b.py"), overrides=SMALL)
    for mp in (2, 4):
        out = tmp_path / f"mp{mp}"
        s = export(wd, str(out), mp=mp)  # auto: glm130b
        assert (s["format"], s["shards"]) == ("glm130b", mp)
        assert (out / "latest").read_text().strip() == "0"
        files = sorted(os.listdir(out / "0"))
        assert files == [f"mp_rank_{r:02d}_model_states.pt" for r in range(mp)]
        # each rank holds exactly SAT's piece (split_ranks: the Megatron rule written in the tests)
        want = split_ranks(sd, mp)
        for r in range(mp):
            state = torch.load(out / "0" / files[r], weights_only=True)
            assert state["iteration"] == 0 and set(state["module"]) == set(sd)
            for k, v in state["module"].items():
                np.testing.assert_array_equal(v.numpy(), want[r][k].numpy(), err_msg=f"rank {r} {k}")
        # and the ranks merge back (import) into the same parameters
        wd2 = str(tmp_path / f"wd{mp}")
        import_hf(str(out), wd2, config_path=str(REPO / "configs/glm130b.py"), overrides=SMALL)
        a, b = jax.tree.leaves(_params(wd)), jax.tree.leaves(_params(wd2))
        assert len(a) == len(b) > 10
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ExportError, match=r"--mp=3 does not divide model.vocab_size=128, model.num_heads=4: "):
        export(wd, str(tmp_path / "mp3"), mp=3)
    with pytest.raises(ExportError, match=r"--mp=2: only --format=glm130b"):
        export(wd, str(tmp_path / "mp2r"), mp=2, fmt="remote")
    assert not (tmp_path / "mp3").exists()


def _params(wd):
    from glmjax.export.reader import CheckpointReader

    return CheckpointReader(wd).read_tree()
