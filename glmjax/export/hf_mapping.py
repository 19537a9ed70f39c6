"""Parameter mapping from a GLM-4-style glmjax model to Hugging Face ``GlmForCausalLM``.

Pure NumPy (no torch import): ``to_hf_state_dict`` gives the HF state dict as arrays, ``hf_config``
the ``GlmConfig`` keyword arguments. Only GLM-4-style models map exactly (``norm=rmsnorm_pre``,
``mlp=swiglu``, ``rope_2d=False``); :func:`check_exportable` says why another model does not.

Layout (glmjax -> HF, ``L`` layers stacked on a leading axis when ``scan_layers``):

=============================  ==========================================  =======================
glmjax                          Hugging Face                                transform
=============================  ==========================================  =======================
embed [V, D]                    model.embed_tokens.weight [V, D]            as is
attn.wq [D, H, hd]              layers.i.self_attn.q_proj.weight [H*hd, D]  reshape [D, H*hd], .T
attn.bq [H, hd]                 layers.i.self_attn.q_proj.bias [H*hd]       reshape
attn.wk / wv [D, K, hd]         k_proj / v_proj.weight [K*hd, D]            reshape, .T
attn.wo [H, hd, D]              layers.i.self_attn.o_proj.weight [D, H*hd]  reshape [H*hd, D], .T
mlp.wi [D, 2, F]                layers.i.mlp.gate_up_proj.weight [2F, D]    reshape [D, 2F], .T (gate first)
mlp.wo [F, D]                   layers.i.mlp.down_proj.weight [D, F]        .T
attn_norm.scale [D]             layers.i.input_layernorm.weight             as is
mlp_norm.scale [D]              layers.i.post_attention_layernorm.weight    as is
final_norm.scale [D]            model.norm.weight                           as is
lm_head [D, V]                  lm_head.weight [V, D]                       .T
=============================  ==========================================  =======================
"""
from __future__ import annotations

import numpy as np


def check_exportable(model_cfg) -> None:
    """Raise ``ValueError`` if ``model_cfg`` is not a GLM-4-style model that ``GlmForCausalLM`` computes."""
    problems = []
    if model_cfg.norm != "rmsnorm_pre":
        problems.append(f"model.norm={model_cfg.norm!r} (GlmForCausalLM is RMSNorm pre-norm: rmsnorm_pre)")
    if model_cfg.mlp != "swiglu":
        problems.append(f"model.mlp={model_cfg.mlp!r} (GlmForCausalLM uses SwiGLU: swiglu)")
    if model_cfg.rope_2d:
        problems.append("model.rope_2d=True (GlmForCausalLM has 1D rotary only)")
    if problems:
        raise ValueError("model is not GLM-4 style, so it does not map onto GlmForCausalLM: "
                         + "; ".join(problems) + ". Export it with the self-contained PyTorch GLM instead.")


def hf_config(model_cfg, *, max_position_embeddings: int = 8192) -> dict:
    """Keyword arguments of ``transformers.GlmConfig`` for ``model_cfg``."""
    m = model_cfg
    return dict(
        vocab_size=int(m.vocab_size), hidden_size=int(m.hidden_size), intermediate_size=int(m.mlp_dim),
        num_hidden_layers=int(m.num_layers), num_attention_heads=int(m.num_heads),
        num_key_value_heads=int(m.num_kv_heads), head_dim=int(m.head_dim), hidden_act="silu",
        max_position_embeddings=int(max_position_embeddings), rms_norm_eps=float(m.norm_eps),
        attention_bias=bool(m.qkv_bias), tie_word_embeddings=bool(m.tie_embeddings),
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rope_theta),
                         "partial_rotary_factor": 0.5},
        pad_token_id=None, bos_token_id=None, eos_token_id=None, attention_dropout=0.0,
        initializer_range=float(m.init_std),
    )


def _layers(params, model_cfg):
    """Per-layer dicts of arrays, whether the layers are stacked (scanned) or a list."""
    layers = params["layers"]
    if model_cfg.scan_layers:
        return [_index(layers, i) for i in range(int(model_cfg.num_layers))]
    if isinstance(layers, dict):  # nnx.List pure dict: {0: {...}, 1: {...}}
        return [layers[k] for k in sorted(layers, key=int)]
    return list(layers)


def _index(tree, i):
    if isinstance(tree, dict):
        return {k: _index(v, i) for k, v in tree.items()}
    return np.asarray(tree)[i]


def to_hf_state_dict(params, model_cfg, *, check: bool = True) -> dict[str, np.ndarray]:
    """HF ``GlmForCausalLM`` state dict (float32 NumPy arrays) from glmjax ``params`` (a pure dict)."""
    if check:
        check_exportable(model_cfg)
    D, H, K, hd = (int(model_cfg.hidden_size), int(model_cfg.num_heads), int(model_cfg.num_kv_heads),
                   int(model_cfg.head_dim))
    f32 = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
    out = {"model.embed_tokens.weight": f32(params["embed"]),
           "model.norm.weight": f32(params["final_norm"]["scale"])}
    for i, layer in enumerate(_layers(params, model_cfg)):
        a, mlp = layer["attn"], layer["mlp"]
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = f32(a["wq"]).reshape(D, H * hd).T
        out[p + "self_attn.k_proj.weight"] = f32(a["wk"]).reshape(D, K * hd).T
        out[p + "self_attn.v_proj.weight"] = f32(a["wv"]).reshape(D, K * hd).T
        out[p + "self_attn.o_proj.weight"] = f32(a["wo"]).reshape(H * hd, D).T
        if model_cfg.qkv_bias:
            out[p + "self_attn.q_proj.bias"] = f32(a["bq"]).reshape(H * hd)
            out[p + "self_attn.k_proj.bias"] = f32(a["bk"]).reshape(K * hd)
            out[p + "self_attn.v_proj.bias"] = f32(a["bv"]).reshape(K * hd)
        wi = f32(mlp["wi"])  # [D, 2, F]: index 0 gate, 1 up == HF gate_up_proj rows [gate; up]
        out[p + "mlp.gate_up_proj.weight"] = wi.reshape(D, 2 * wi.shape[-1]).T
        out[p + "mlp.down_proj.weight"] = f32(mlp["wo"]).T
        out[p + "input_layernorm.weight"] = f32(layer["attn_norm"]["scale"])
        out[p + "post_attention_layernorm.weight"] = f32(layer["mlp_norm"]["scale"])
    if not model_cfg.tie_embeddings:
        out["lm_head.weight"] = f32(params["lm_head"]).T
    else:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
