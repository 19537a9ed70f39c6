"""Parameter mapping between a GLM-4.5-style glmjax MoE model and Hugging Face ``Glm4MoeForCausalLM``.

Pure NumPy, both directions: :func:`to_hf_moe_state_dict` (export) and :func:`from_hf_moe_state_dict`
(import); :func:`hf_moe_config` gives the ``Glm4MoeConfig`` keyword arguments and
:func:`model_overrides_from_hf` the glmjax ``model.*`` values of an HF config.

HF layer ``i < first_k_dense_replace`` is glmjax ``layers[i]``, later ones ``moe_layers[i - k]``
(stacked on a leading axis when ``scan_layers``). Per layer (HF -> glmjax):

=======================================  =============================  ==============================
Hugging Face                              glmjax                          transform
=======================================  =============================  ==============================
self_attn.q_proj.weight [H*hd, D]         attn.wq [D, H, hd]              .T, reshape, rotary perm
self_attn.{k,v}_proj.weight [K*hd, D]     attn.wk / wv [D, K, hd]         .T, reshape (k: rotary perm)
self_attn.{q,k,v}_proj.bias               attn.bq / bk / bv               reshape (q, k: rotary perm)
self_attn.o_proj.weight [D, H*hd]         attn.wo [H, hd, D]              .T, reshape
self_attn.{q,k}_norm.weight [hd]          attn.{q,k}_norm.scale           rotary perm
mlp.{gate,up,down}_proj (dense layers)    mlp.wi [D, 2, F], mlp.wo        .T, stack [gate, up]
mlp.gate.weight [E, D]                    mlp.router.gate [D, E]          .T
mlp.gate.e_score_correction_bias [E]      mlp.router.bias [E]             as is
mlp.experts.gate_up_proj [E, 2I, D]       mlp.wi [E, D, 2, I]             transpose, reshape
mlp.experts.down_proj [E, D, I]           mlp.wo [E, I, D]                transpose
mlp.shared_experts.{gate,up,down}_proj    mlp.shared.wi / wo              as the dense MLP
input_layernorm / post_attention_layernorm attn_norm / mlp_norm .scale    as is
=======================================  =============================  ==============================

Rotary: ``glm4_moe`` rotates the first half of head_dim in split halves ``(x[i], x[i + r/2])``. A glmjax
model with ``model.rope_style="half"`` computes that directly; one with interleaved pairs computes it
after a fixed permutation of the rotary q/k columns (glmjax dim ``2i`` = HF dim ``i``, ``2i+1`` = HF
``i + r/2``), which the mapping applies (q/k weights, biases and qk-norm scales; attention scores are
unchanged because q and k move together).
"""
from __future__ import annotations

import numpy as np

from glmjax.moe_config import moe_layer_count


def check_moe_exportable(m) -> None:
    problems = []
    if moe_layer_count(m) == 0:
        problems.append("model.moe.num_experts=0 (a dense model: export it as GlmForCausalLM)")
    if m.norm != "rmsnorm_pre":
        problems.append(f"model.norm={m.norm!r} (glm4_moe is RMSNorm pre-norm: rmsnorm_pre)")
    if m.mlp != "swiglu":
        problems.append(f"model.mlp={m.mlp!r} (glm4_moe uses SwiGLU: swiglu)")
    if m.rope_2d:
        problems.append("model.rope_2d=True (glm4_moe has 1D rotary only)")
    if problems:
        raise ValueError("model does not map onto Glm4MoeForCausalLM: " + "; ".join(problems))


def _rotary_dims(m) -> int:
    return int(int(m.head_dim) * float(m.get("partial_rotary_factor", 0.5)))


def rotary_perm(m) -> np.ndarray:
    """glmjax head_dim column j holds HF column ``perm[j]`` (identity for ``rope_style="half"``)."""
    hd, r = int(m.head_dim), _rotary_dims(m)
    perm = np.arange(hd)
    if m.get("rope_style", "interleaved") != "half":
        i = np.arange(r // 2)
        perm[2 * i], perm[2 * i + 1] = i, i + r // 2
    return perm


def hf_moe_config(m, *, max_position_embeddings: int = 8192) -> dict:
    """Keyword arguments of ``transformers.Glm4MoeConfig`` for glmjax model config ``m``."""
    e = m.moe
    return dict(
        vocab_size=int(m.vocab_size), hidden_size=int(m.hidden_size), intermediate_size=int(m.mlp_dim),
        moe_intermediate_size=int(e.expert_mlp_dim), num_hidden_layers=int(m.num_layers),
        num_attention_heads=int(m.num_heads), num_key_value_heads=int(m.num_kv_heads), head_dim=int(m.head_dim),
        hidden_act="silu", max_position_embeddings=int(max_position_embeddings), rms_norm_eps=float(m.norm_eps),
        attention_bias=bool(m.qkv_bias), tie_word_embeddings=bool(m.tie_embeddings),
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rope_theta),
                         "partial_rotary_factor": float(m.get("partial_rotary_factor", 0.5))},
        n_routed_experts=int(e.num_experts), num_experts_per_tok=int(e.experts_per_token),
        n_shared_experts=int(e.num_shared_experts), routed_scaling_factor=float(e.routed_scaling_factor),
        n_group=int(e.n_group), topk_group=int(e.topk_group), first_k_dense_replace=int(e.first_dense_layers),
        norm_topk_prob=bool(e.norm_topk_prob), use_qk_norm=bool(m.qk_norm), num_nextn_predict_layers=0,
        pad_token_id=None, bos_token_id=None, eos_token_id=None, attention_dropout=0.0,
        initializer_range=float(m.init_std),
    )


def model_overrides_from_hf(hf: dict) -> dict:
    """glmjax ``model.*`` values (dotted keys) of an HF ``Glm4MoeConfig`` dict (``config.to_dict()``)."""
    rope = hf.get("rope_parameters") or {}
    return {
        "vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"], "mlp_dim": hf["intermediate_size"],
        "num_layers": hf["num_hidden_layers"], "num_heads": hf["num_attention_heads"],
        "num_kv_heads": hf["num_key_value_heads"], "head_dim": hf.get("head_dim") or
        hf["hidden_size"] // hf["num_attention_heads"], "norm": "rmsnorm_pre", "mlp": "swiglu", "rope_2d": False,
        "norm_eps": hf["rms_norm_eps"], "qkv_bias": hf["attention_bias"], "qk_norm": hf["use_qk_norm"],
        "tie_embeddings": hf["tie_word_embeddings"], "rope_theta": rope.get("rope_theta", 10000.0),
        "moe.num_experts": hf["n_routed_experts"], "moe.experts_per_token": hf["num_experts_per_tok"],
        "moe.expert_mlp_dim": hf["moe_intermediate_size"], "moe.num_shared_experts": hf["n_shared_experts"],
        "moe.first_dense_layers": hf["first_k_dense_replace"], "moe.n_group": hf["n_group"],
        "moe.topk_group": hf["topk_group"], "moe.norm_topk_prob": hf["norm_topk_prob"],
        "moe.routed_scaling_factor": hf["routed_scaling_factor"],
    }


def _layer_list(tree, n: int, scanned: bool):
    if tree is None or n == 0:
        return []
    if scanned:
        return [_index(tree, i) for i in range(n)]
    return [tree[k] for k in sorted(tree, key=int)]


def _index(tree, i):
    if isinstance(tree, dict):
        return {k: _index(v, i) for k, v in tree.items()}
    return np.asarray(tree)[i]


def _stack(layers: list, scanned: bool):
    if scanned:
        return {k: _stack([layer[k] for layer in layers], True) if isinstance(layers[0][k], dict)
                else np.stack([layer[k] for layer in layers]) for k in layers[0]}
    return {i: layer for i, layer in enumerate(layers)}


def to_hf_moe_state_dict(params, m) -> dict[str, np.ndarray]:
    """HF ``Glm4MoeForCausalLM`` state dict (float32 NumPy) from glmjax ``params`` (a pure dict)."""
    check_moe_exportable(m)
    D, H, K, hd = int(m.hidden_size), int(m.num_heads), int(m.num_kv_heads), int(m.head_dim)
    inv = np.argsort(rotary_perm(m))  # HF column c is glmjax column inv[c]
    f32 = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
    n_moe = moe_layer_count(m)
    n_dense = int(m.num_layers) - n_moe
    layers = (_layer_list(params.get("layers"), n_dense, m.scan_layers)
              + _layer_list(params.get("moe_layers"), n_moe, m.scan_layers))
    out = {"model.embed_tokens.weight": f32(params["embed"]), "model.norm.weight": f32(params["final_norm"]["scale"])}
    for i, layer in enumerate(layers):
        a, mlp, p = layer["attn"], layer["mlp"], f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = f32(a["wq"])[..., inv].reshape(D, H * hd).T
        out[p + "self_attn.k_proj.weight"] = f32(a["wk"])[..., inv].reshape(D, K * hd).T
        out[p + "self_attn.v_proj.weight"] = f32(a["wv"]).reshape(D, K * hd).T
        out[p + "self_attn.o_proj.weight"] = f32(a["wo"]).reshape(H * hd, D).T
        if m.qkv_bias:
            out[p + "self_attn.q_proj.bias"] = f32(a["bq"])[..., inv].reshape(H * hd)
            out[p + "self_attn.k_proj.bias"] = f32(a["bk"])[..., inv].reshape(K * hd)
            out[p + "self_attn.v_proj.bias"] = f32(a["bv"]).reshape(K * hd)
        if m.qk_norm:
            out[p + "self_attn.q_norm.weight"] = f32(a["q_norm"]["scale"])[inv]
            out[p + "self_attn.k_norm.weight"] = f32(a["k_norm"]["scale"])[inv]
        if i < n_dense:
            out.update(_mlp_to_hf(mlp, p + "mlp."))
        else:
            wi = f32(mlp["wi"])  # [E, D, 2, I]
            E, _, _, I = wi.shape
            out[p + "mlp.gate.weight"] = f32(mlp["router"]["gate"]).T
            out[p + "mlp.gate.e_score_correction_bias"] = f32(mlp["router"]["bias"])
            out[p + "mlp.experts.gate_up_proj"] = wi.reshape(E, D, 2 * I).transpose(0, 2, 1)
            out[p + "mlp.experts.down_proj"] = f32(mlp["wo"]).transpose(0, 2, 1)
            if "shared" in mlp:
                out.update(_mlp_to_hf(mlp["shared"], p + "mlp.shared_experts."))
        out[p + "input_layernorm.weight"] = f32(layer["attn_norm"]["scale"])
        out[p + "post_attention_layernorm.weight"] = f32(layer["mlp_norm"]["scale"])
    out["lm_head.weight"] = out["model.embed_tokens.weight"] if m.tie_embeddings else f32(params["lm_head"]).T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _mlp_to_hf(mlp, prefix: str) -> dict:
    wi = np.asarray(mlp["wi"], np.float32)  # [D, 2, F]
    return {prefix + "gate_proj.weight": wi[:, 0].T, prefix + "up_proj.weight": wi[:, 1].T,
            prefix + "down_proj.weight": np.asarray(mlp["wo"], np.float32).T}


def _mlp_from_hf(sd, prefix: str) -> dict:
    return {"wi": np.stack([sd[prefix + "gate_proj.weight"].T, sd[prefix + "up_proj.weight"].T], axis=1),
            "wo": sd[prefix + "down_proj.weight"].T}


def from_hf_moe_state_dict(sd: dict, m) -> dict:
    """glmjax params (pure dict of float32 NumPy arrays) from an HF ``Glm4MoeForCausalLM`` state dict."""
    check_moe_exportable(m)
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    D, H, K, hd = int(m.hidden_size), int(m.num_heads), int(m.num_kv_heads), int(m.head_dim)
    perm = rotary_perm(m)
    n_moe = moe_layer_count(m)
    n_dense = int(m.num_layers) - n_moe
    layers = []
    for i in range(int(m.num_layers)):
        p = f"model.layers.{i}."
        g = lambda name: sd[p + name]  # noqa: E731
        a = {"wq": g("self_attn.q_proj.weight").T.reshape(D, H, hd)[..., perm],
             "wk": g("self_attn.k_proj.weight").T.reshape(D, K, hd)[..., perm],
             "wv": g("self_attn.v_proj.weight").T.reshape(D, K, hd),
             "wo": g("self_attn.o_proj.weight").T.reshape(H, hd, D)}
        if m.qkv_bias:
            a["bq"] = g("self_attn.q_proj.bias").reshape(H, hd)[..., perm]
            a["bk"] = g("self_attn.k_proj.bias").reshape(K, hd)[..., perm]
            a["bv"] = g("self_attn.v_proj.bias").reshape(K, hd)
        if m.qk_norm:
            a["q_norm"] = {"scale": g("self_attn.q_norm.weight")[perm]}
            a["k_norm"] = {"scale": g("self_attn.k_norm.weight")[perm]}
        if i < n_dense:
            mlp = _mlp_from_hf(sd, p + "mlp.")
        else:
            gu = g("mlp.experts.gate_up_proj")  # [E, 2I, D]
            E, I2, _ = gu.shape
            mlp = {"router": {"gate": g("mlp.gate.weight").T, "bias": g("mlp.gate.e_score_correction_bias")},
                   "wi": gu.transpose(0, 2, 1).reshape(E, D, 2, I2 // 2),
                   "wo": g("mlp.experts.down_proj").transpose(0, 2, 1)}
            if int(m.moe.num_shared_experts):
                mlp["shared"] = _mlp_from_hf(sd, p + "mlp.shared_experts.")
        layers.append({"attn": a, "mlp": mlp, "attn_norm": {"scale": g("input_layernorm.weight")},
                       "mlp_norm": {"scale": g("post_attention_layernorm.weight")}})
    params = {"embed": sd["model.embed_tokens.weight"], "final_norm": {"scale": sd["model.norm.weight"]}}
    if n_dense:
        params["layers"] = _stack(layers[:n_dense], m.scan_layers)
    params["moe_layers"] = _stack(layers[n_dense:], m.scan_layers)
    if not m.tie_embeddings:
        params["lm_head"] = sd["lm_head.weight"].T
    return params
