"""The Hugging Face ChatGLM2-6B / ChatGLM3-6B remote-code layout: import into glmjax and export back.

``chatglm2``: ``config.json`` with ``model_type`` chatglm and the second-generation keys
(``multi_query_attention``, ``padded_vocab_size``, ``rmsnorm``, ...), weights in ``pytorch_model*.bin`` or
``*.safetensors``. Read against the released ``modeling_chatglm.py`` (THUDM/chatglm2-6b, chatglm3-6b):

* block: RMSNorm pre-norm (``rmsnorm=true``, ``apply_residual_connection_post_layernorm=false``), a final
  RMSNorm (``post_layer_norm=true``), untied ``output_layer``, no embedding norm;
* attention: ``query_key_value`` fused as ``[q (H*hd); k (K*hd); v (K*hd)]`` rows with bias
  (``add_qkv_bias``), multi-query groups ``K = multi_query_group_num`` (query head ``h`` reads group
  ``h // (H/K)``; without ``multi_query_attention`` the rows are per head ``[q_h; k_h; v_h]`` as in
  ChatGLM-6B), ``dense`` without bias (``add_bias_linear=false``), scores ``/ sqrt(hd)``, causal;
* rotary: ``RotaryEmbedding(kv_channels // 2)``: the first half of head_dim, interleaved pairs
  ``(x[2i], x[2i+1])``, frequencies ``1 / (10000 * rope_ratio)^(2i / (hd/2))``, positions ``0..n-1``;
* MLP: ``dense_h_to_4h`` ``[2F, D]``, ``silu(x[0]) * x[1]`` of ``torch.chunk(x, 2)``: gate first, no biases.

That is glmjax's GLM-4-style model (:data:`CHATGLM2_KNOBS`; ``rope_theta = 10000 * rope_ratio``), so
Hugging Face ``GlmForCausalLM`` computes the same function under other names (``--format=hf``).

==========================================================  ==================================
released (``transformer.`` prefix)                          glmjax
==========================================================  ==================================
embedding.word_embeddings.weight [V, D] (V = padded vocab)   embed
encoder.layers.i.input_layernorm.weight                      layers.i.attn_norm.scale
encoder.layers.i.self_attention.query_key_value [.., D]      attn.wq / wk / wv, bq / bk / bv
encoder.layers.i.self_attention.dense.weight [D, H*hd]       attn.wo [H, hd, D]
encoder.layers.i.post_attention_layernorm.weight             layers.i.mlp_norm.scale
encoder.layers.i.mlp.dense_h_to_4h.weight [2F, D]            mlp.wi [D, 2, F] (gate_first)
encoder.layers.i.mlp.dense_4h_to_h.weight [D, F]             mlp.wo [F, D]
encoder.final_layernorm.weight                               final_norm.scale
output_layer.weight [V, D]                                   lm_head [D, V]
rotary_pos_emb.inv_freq [hd/4] (a buffer)                    (recomputed; written on export)
==========================================================  ==================================
"""
from __future__ import annotations

import json
import os

import numpy as np

from glmjax.export import glm_originals

CHATGLM2_KNOBS = dict(norm="rmsnorm_pre", mlp="swiglu", glu_order="gate_first", qkv_bias=True, attn_out_bias=False,
                      mlp_bias=False, embedding_norm=False, final_norm=True, rope_2d=False, rope_style="interleaved",
                      partial_rotary_factor=0.5, tie_embeddings=False)
T = "transformer."
# config.json values the import requires (key: (value, why))
_REQUIRED = {"rmsnorm": (True, "glmjax's pre-norm block uses RMSNorm"),
             "apply_residual_connection_post_layernorm": (False, "the residual is taken before the norm"),
             "post_layer_norm": (True, "a final norm after the last layer"),
             "add_bias_linear": (False, "no biases on the attention output and MLP matrices")}


_err = glm_originals._err


def is_chatglm2(config: dict) -> bool:
    """Whether a ``model_type: chatglm`` config.json is ChatGLM2/3 (rather than ChatGLM-6B)."""
    return any(k in config for k in ("multi_query_attention", "padded_vocab_size", "rmsnorm", "ffn_hidden_size"))


def chatglm2_model_config(config: dict) -> dict:
    """glmjax ``model.*`` values from a ChatGLM2/3-6B ``config.json``; an unsupported variant is an error."""
    need = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "padded_vocab_size")
    missing = [k for k in need if k not in config]
    if missing:
        raise _err(f"config.json lacks {', '.join(missing)}: it is not a complete ChatGLM2/3-6B config "
                   f"(download the model's config.json with its weights)")
    bad = [f"{k}={config[k]!r} ({why}; glmjax imports {v!r})" for k, (v, why) in _REQUIRED.items()
           if k in config and bool(config[k]) != v]
    if not config.get("multi_query_attention", False):
        bad.append("multi_query_attention=false (per-head fused qkv rows; every released ChatGLM2/3 is multi-query)")
    if config.get("pre_seq_len") is not None:
        bad.append(f"pre_seq_len={config['pre_seq_len']} (a P-tuning prefix encoder: merge or drop it first)")
    if config.get("quantization_bit"):
        bad.append(f"quantization_bit={config['quantization_bit']} (quantized weights: import the float checkpoint)")
    if bad:
        raise _err("this ChatGLM2/3 checkpoint cannot be represented by glmjax: " + "; ".join(bad))
    D, H = int(config["hidden_size"]), int(config["num_attention_heads"])
    return dict(CHATGLM2_KNOBS, num_layers=int(config["num_layers"]), hidden_size=D, num_heads=H,
                num_kv_heads=int(config.get("multi_query_group_num") or 1),
                head_dim=int(config.get("kv_channels") or D // H), mlp_dim=int(config["ffn_hidden_size"]),
                vocab_size=int(config["padded_vocab_size"]), norm_eps=float(config.get("layernorm_epsilon", 1e-5)),
                rope_theta=10000.0 * float(config.get("rope_ratio", 1.0)),
                qkv_bias=bool(config.get("add_qkv_bias", False) or config.get("add_bias_linear", False)))


def _shape_checked(get, m):
    keys = (f"num_layers={m.num_layers}, hidden_size={m.hidden_size}, num_attention_heads={m.num_heads}, "
            f"multi_query_group_num={m.num_kv_heads}, kv_channels={m.head_dim}, ffn_hidden_size={m.mlp_dim}, "
            f"padded_vocab_size={m.vocab_size}")
    return glm_originals._shape_checked(get, m, "config.json", keys,
                                        "the weights do not belong to this config.json")


def _split_qkv(x, H, K, hd):
    """``[q (H*hd); k (K*hd); v (K*hd)]`` rows along axis 0 -> q ``[H, hd, ...]``, k / v ``[K, hd, ...]``."""
    rest = x.shape[1:]
    q, k, v = np.split(x, [H * hd, (H + K) * hd], axis=0)
    return q.reshape(H, hd, *rest), k.reshape(K, hd, *rest), v.reshape(K, hd, *rest)


def _join_qkv(q, k, v):
    H, K, hd = q.shape[0], k.shape[0], q.shape[1]
    return np.concatenate([q.reshape(H * hd, *q.shape[2:]), k.reshape(K * hd, *k.shape[2:]),
                           v.reshape(K * hd, *v.shape[2:])], axis=0)


def chatglm2_params(get, m) -> dict:
    """glmjax params (layers as a list) from the ChatGLM2/3 names."""
    D, H, K, hd, F, V, L = (m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim, m.vocab_size,
                            m.num_layers)
    need = _shape_checked(get, m)
    names = getattr(get, "names", None)
    if names is not None and f"{T}encoder.layers.{L}.input_layernorm.weight" in names:
        n = 1 + max(int(k.split(".")[3]) for k in names if k.startswith(T + "encoder.layers."))
        raise _err(f"the checkpoint has {n} layers but config.json has num_layers={L}: fix config.json")
    width = (H + 2 * K) * hd
    layers = []
    for i in range(L):
        p = f"{T}encoder.layers.{i}."
        q, k, v = _split_qkv(need(p + "self_attention.query_key_value.weight", (width, D)), H, K, hd)
        attn = {"wq": q.transpose(2, 0, 1), "wk": k.transpose(2, 0, 1), "wv": v.transpose(2, 0, 1),
                "wo": need(p + "self_attention.dense.weight", (D, H * hd)).T.reshape(H, hd, D)}
        if m.qkv_bias:
            attn["bq"], attn["bk"], attn["bv"] = _split_qkv(need(p + "self_attention.query_key_value.bias", (width,)),
                                                            H, K, hd)
        layers.append({"attn": attn,
                       "mlp": {"wi": need(p + "mlp.dense_h_to_4h.weight", (2 * F, D)).T.reshape(D, 2, F),
                               "wo": need(p + "mlp.dense_4h_to_h.weight", (D, F)).T},
                       "attn_norm": {"scale": need(p + "input_layernorm.weight", (D,))},
                       "mlp_norm": {"scale": need(p + "post_attention_layernorm.weight", (D,))}})
    return {"embed": need(T + "embedding.word_embeddings.weight", (V, D)),
            "final_norm": {"scale": need(T + "encoder.final_layernorm.weight", (D,))},
            "lm_head": need(T + "output_layer.weight", (V, D)).T, "layers": layers}


def chatglm2_state_dict(params, m) -> dict[str, np.ndarray]:
    """The ChatGLM2/3 names (float32 NumPy) from glmjax ``params``: the inverse of :func:`chatglm2_params`,
    plus the ``rotary_pos_emb.inv_freq`` buffer the released files carry."""
    from glmjax.export.hf_mapping import tree_reader

    read = tree_reader(params, m)
    D, H, hd, L = m.hidden_size, m.num_heads, m.head_dim, m.num_layers
    f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
    out = {T + "embedding.word_embeddings.weight": f32(read(("embed",), None))}
    half = hd // 2  # RotaryEmbedding(kv_channels // 2): its inv_freq over half of head_dim
    out[T + "rotary_pos_emb.inv_freq"] = f32(1.0 / 10000.0 ** (np.arange(0, half, 2, dtype=np.float64) / half))
    for i in range(L):
        p = f"{T}encoder.layers.{i}."
        g = lambda *path, i=i: np.asarray(read(("layers", *path), i), np.float32)  # noqa: E731
        out[p + "input_layernorm.weight"] = f32(g("attn_norm", "scale"))
        out[p + "self_attention.query_key_value.weight"] = f32(_join_qkv(
            *(g("attn", w).transpose(1, 2, 0) for w in ("wq", "wk", "wv"))))
        if m.qkv_bias:
            out[p + "self_attention.query_key_value.bias"] = f32(_join_qkv(*(g("attn", b) for b in ("bq", "bk", "bv"))))
        out[p + "self_attention.dense.weight"] = f32(g("attn", "wo").reshape(H * hd, D).T)
        out[p + "post_attention_layernorm.weight"] = f32(g("mlp_norm", "scale"))
        out[p + "mlp.dense_h_to_4h.weight"] = f32(g("mlp", "wi").reshape(D, -1).T)
        out[p + "mlp.dense_4h_to_h.weight"] = f32(g("mlp", "wo").T)
    out[T + "encoder.final_layernorm.weight"] = f32(read(("final_norm", "scale"), None))
    out[T + "output_layer.weight"] = f32(read(("lm_head",), None).T)
    return out


def chatglm2_config_json(m, *, seq_length: int) -> dict:
    """The ``config.json`` of the released remote code for model config ``m`` (its ``configuration_chatglm.py``
    and ``modeling_chatglm.py`` are not shipped: copy them from the released model repository)."""
    H, K = int(m.num_heads), int(m.num_kv_heads)
    return {"model_type": "chatglm", "architectures": ["ChatGLMModel"],
            "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                         "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                         "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
            "add_bias_linear": False, "add_qkv_bias": bool(m.qkv_bias), "apply_query_key_layer_scaling": True,
            "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
            "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "ffn_hidden_size": int(m.mlp_dim),
            "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": int(m.hidden_size),
            "kv_channels": int(m.head_dim), "layernorm_epsilon": float(m.norm_eps),
            "multi_query_attention": True, "multi_query_group_num": K, "num_attention_heads": H,
            "num_layers": int(m.num_layers), "original_rope": True, "padded_vocab_size": int(m.vocab_size),
            "post_layer_norm": True, "rmsnorm": True, "rope_ratio": float(m.rope_theta) / 10000.0,
            "seq_length": int(seq_length), "use_cache": True, "tie_word_embeddings": False,
            "torch_dtype": "float32"}


def write_chatglm2_checkpoint(state_dict: dict, m, out_dir: str, *, seq_length: int) -> str:
    """A ChatGLM2/3-layout directory (config.json + pytorch_model.bin) from NumPy (or torch) tensors."""
    import torch

    from glmjax.export.glm_originals import _tensor

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(chatglm2_config_json(m, seq_length=seq_length), f, indent=2)
    path = os.path.join(out_dir, "pytorch_model.bin")
    torch.save({k: _tensor(v) for k, v in state_dict.items()}, path)
    return path
