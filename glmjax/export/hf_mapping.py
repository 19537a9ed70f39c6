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
    if model_cfg.get("rope_style", "interleaved") != "interleaved":
        problems.append(f"model.rope_style={model_cfg.rope_style!r} (GlmForCausalLM rotates interleaved pairs)")
    for key, plain in (("attn_out_bias", False), ("mlp_bias", False), ("embedding_norm", False),
                       ("final_norm", True)):
        if model_cfg.get(key, plain) != plain:
            problems.append(f"model.{key}={model_cfg[key]!r} (GlmForCausalLM has {key}={plain})")
    if problems:
        raise ValueError("model is not GLM-4 style, so it does not map onto GlmForCausalLM: "
                         + "; ".join(problems) + ". Export it with --format=remote (the self-contained PyTorch GLM, "
                         "loaded with trust_remote_code=True) instead.")


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
                         "partial_rotary_factor": float(m.get("partial_rotary_factor", 0.5))},
        pad_token_id=None, bos_token_id=None, eos_token_id=None, attention_dropout=0.0,
        initializer_range=float(m.init_std),
    )


def hf_tensors(model_cfg, read, *, check: bool = True) -> list[tuple[str, tuple[int, ...], object]]:
    """The HF ``GlmForCausalLM`` tensors as ``(name, shape, make)``; ``make()`` reads and maps one tensor.

    ``read(path, layer)`` returns the glmjax parameter at ``path`` (a tuple such as
    ``('layers', 'attn', 'wq')``) for one ``layer`` (``None`` for non-layer parameters) as a NumPy
    array; nothing is read until ``make()`` is called, so an exporter holds one tensor at a time.
    """
    if check:
        check_exportable(model_cfg)
    m = model_cfg
    D, H, K, hd, F, V = (int(m.hidden_size), int(m.num_heads), int(m.num_kv_heads), int(m.head_dim),
                         int(m.mlp_dim), int(m.vocab_size))
    f32 = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
    out = [("model.embed_tokens.weight", (V, D), lambda: f32(read(("embed",), None)))]
    for i in range(int(m.num_layers)):
        p = f"model.layers.{i}."

        def get(*path, i=i):
            return f32(read(("layers", *path), i))

        out += [
            (p + "self_attn.q_proj.weight", (H * hd, D), lambda get=get: get("attn", "wq").reshape(D, H * hd).T),
            (p + "self_attn.k_proj.weight", (K * hd, D), lambda get=get: get("attn", "wk").reshape(D, K * hd).T),
            (p + "self_attn.v_proj.weight", (K * hd, D), lambda get=get: get("attn", "wv").reshape(D, K * hd).T),
            (p + "self_attn.o_proj.weight", (D, H * hd), lambda get=get: get("attn", "wo").reshape(H * hd, D).T),
        ]
        if m.qkv_bias:
            out += [(p + "self_attn.q_proj.bias", (H * hd,), lambda get=get: get("attn", "bq").reshape(H * hd)),
                    (p + "self_attn.k_proj.bias", (K * hd,), lambda get=get: get("attn", "bk").reshape(K * hd)),
                    (p + "self_attn.v_proj.bias", (K * hd,), lambda get=get: get("attn", "bv").reshape(K * hd))]
        out += [  # wi [D, 2, F]: index 0 gate, 1 up == HF gate_up_proj rows [gate; up]
            (p + "mlp.gate_up_proj.weight", (2 * F, D), lambda get=get: get("mlp", "wi").reshape(D, 2 * F).T),
            (p + "mlp.down_proj.weight", (D, F), lambda get=get: get("mlp", "wo").T),
            (p + "input_layernorm.weight", (D,), lambda get=get: get("attn_norm", "scale")),
            (p + "post_attention_layernorm.weight", (D,), lambda get=get: get("mlp_norm", "scale")),
        ]
    out.append(("model.norm.weight", (D,), lambda: f32(read(("final_norm", "scale"), None))))
    if not m.tie_embeddings:
        out.append(("lm_head.weight", (V, D), lambda: f32(read(("lm_head",), None)).T))
    return [(n, s, (lambda f=f: np.ascontiguousarray(f()))) for n, s, f in out]


def tree_reader(params, model_cfg):
    """``read(path, layer)`` over a parameter pure dict (stacked or listed layers)."""
    def read(path, layer):
        node = params
        if path[0] in ("layers", "moe_layers") and not model_cfg.scan_layers:
            layers = node[path[0]]
            node = layers[layer] if not isinstance(layers, dict) else {str(k): v for k, v in layers.items()}[str(layer)]
            path, layer = path[1:], None
        for key in path:
            node = node[key]
        node = np.asarray(node)
        return node if layer is None else node[layer]
    return read


def to_hf_state_dict(params, model_cfg, *, check: bool = True) -> dict[str, np.ndarray]:
    """HF ``GlmForCausalLM`` state dict (float32 NumPy arrays) from glmjax ``params`` (a pure dict)."""
    out = {name: make() for name, _, make in hf_tensors(model_cfg, tree_reader(params, model_cfg), check=check)}
    if model_cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out
