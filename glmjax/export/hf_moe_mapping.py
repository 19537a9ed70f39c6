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
mlp.experts.{x}.{gate,up}_proj [I, D]     mlp.wi[x] [D, 2, I]             .T, stack [gate, up]
mlp.experts.{x}.down_proj [D, I]          mlp.wo[x] [I, D]                .T
(in memory: experts.gate_up_proj [E, 2I, D], experts.down_proj [E, D, I]; import reads both)
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
    """Raise ``ValueError`` if ``m`` is not a GLM-4.5-style MoE that ``Glm4MoeForCausalLM`` computes."""
    problems = []
    if moe_layer_count(m) == 0:
        problems.append("model.moe.num_experts=0 (a dense model: export it as GlmForCausalLM)")
    if m.norm != "rmsnorm_pre":
        problems.append(f"model.norm={m.norm!r} (glm4_moe is RMSNorm pre-norm: rmsnorm_pre)")
    if m.mlp != "swiglu":
        problems.append(f"model.mlp={m.mlp!r} (glm4_moe uses SwiGLU: swiglu)")
    if m.rope_2d:
        problems.append("model.rope_2d=True (glm4_moe has 1D rotary only)")
    for key, plain in (("attn_out_bias", False), ("mlp_bias", False), ("embedding_norm", False),
                       ("final_norm", True), ("glu_order", "gate_first")):
        if m.get(key, plain) != plain:
            problems.append(f"model.{key}={m[key]!r} (glm4_moe has {key}={plain})")
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
    """glmjax ``model.*`` values (dotted keys) of an HF ``Glm4MoeConfig`` dict (``config.json``); GLM-4.5's
    half-split rotary is computed directly (``rope_style=half``)."""
    rope = hf.get("rope_parameters") or {}
    if (rope.get("rope_type") or "default") != "default":
        raise ValueError(f"rope_type={rope.get('rope_type')!r}: only plain rotary is implemented in glmjax")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf.get('hidden_act')!r}: glmjax's experts are SwiGLU (silu)")
    return {
        "vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"], "mlp_dim": hf["intermediate_size"],
        "num_layers": hf["num_hidden_layers"], "num_heads": hf["num_attention_heads"],
        "num_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"], "norm": "rmsnorm_pre",
        "mlp": "swiglu", "rope_2d": False, "rope_style": "half",
        "partial_rotary_factor": float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))),
        "norm_eps": hf["rms_norm_eps"], "qkv_bias": hf["attention_bias"], "qk_norm": hf["use_qk_norm"],
        "tie_embeddings": hf["tie_word_embeddings"],
        "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "moe.num_experts": hf["n_routed_experts"], "moe.experts_per_token": hf["num_experts_per_tok"],
        "moe.expert_mlp_dim": hf["moe_intermediate_size"], "moe.num_shared_experts": hf["n_shared_experts"],
        "moe.first_dense_layers": hf["first_k_dense_replace"], "moe.n_group": hf["n_group"],
        "moe.topk_group": hf["topk_group"], "moe.norm_topk_prob": hf["norm_topk_prob"],
        "moe.routed_scaling_factor": float(hf["routed_scaling_factor"]),
    }


def _stack_of(m, i: int) -> tuple[str, int]:
    """(glmjax stack, index in it) of HF layer ``i``: dense ``layers`` first, then ``moe_layers``."""
    n_dense = int(m.num_layers) - moe_layer_count(m)
    return ("layers", i) if i < n_dense else ("moe_layers", i - n_dense)


def hf_moe_tensors(m, read) -> list[tuple[str, tuple[int, ...], object]]:
    """The HF ``Glm4MoeForCausalLM`` tensors as ``(name, shape, make)`` (streamed export, as
    :func:`glmjax.export.hf_mapping.hf_tensors`): ``read(path, layer)`` reads one glmjax parameter, where
    ``path[0]`` is ``layers`` or ``moe_layers``; nothing is read until ``make()`` is called."""
    check_moe_exportable(m)
    D, H, K, hd, F, V = (int(m.hidden_size), int(m.num_heads), int(m.num_kv_heads), int(m.head_dim),
                         int(m.mlp_dim), int(m.vocab_size))
    e = m.moe
    E, I, S = int(e.num_experts), int(e.expert_mlp_dim), int(e.expert_mlp_dim) * int(e.num_shared_experts)
    inv = np.argsort(rotary_perm(m))  # HF column c is glmjax column inv[c]
    f32 = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
    out = [("model.embed_tokens.weight", (V, D), lambda: f32(read(("embed",), None)))]
    for i in range(int(m.num_layers)):
        stack, j = _stack_of(m, i)
        p = f"model.layers.{i}."

        def get(*path, stack=stack, j=j):
            return f32(read((stack, *path), j))

        out += [
            (p + "self_attn.q_proj.weight", (H * hd, D), lambda g=get: g("attn", "wq")[..., inv].reshape(D, H * hd).T),
            (p + "self_attn.k_proj.weight", (K * hd, D), lambda g=get: g("attn", "wk")[..., inv].reshape(D, K * hd).T),
            (p + "self_attn.v_proj.weight", (K * hd, D), lambda g=get: g("attn", "wv").reshape(D, K * hd).T),
            (p + "self_attn.o_proj.weight", (D, H * hd), lambda g=get: g("attn", "wo").reshape(H * hd, D).T),
            (p + "input_layernorm.weight", (D,), lambda g=get: g("attn_norm", "scale")),
            (p + "post_attention_layernorm.weight", (D,), lambda g=get: g("mlp_norm", "scale")),
        ]
        if m.qkv_bias:
            out += [(p + "self_attn.q_proj.bias", (H * hd,), lambda g=get: g("attn", "bq")[..., inv].reshape(H * hd)),
                    (p + "self_attn.k_proj.bias", (K * hd,), lambda g=get: g("attn", "bk")[..., inv].reshape(K * hd)),
                    (p + "self_attn.v_proj.bias", (K * hd,), lambda g=get: g("attn", "bv").reshape(K * hd))]
        if m.qk_norm:
            out += [(p + "self_attn.q_norm.weight", (hd,), lambda g=get: g("attn", "q_norm", "scale")[inv]),
                    (p + "self_attn.k_norm.weight", (hd,), lambda g=get: g("attn", "k_norm", "scale")[inv])]
        if stack == "layers":
            out += _mlp_tensors(get, p + "mlp.", ("mlp",), F, D)
            continue
        out += [
            (p + "mlp.gate.weight", (E, D), lambda g=get: g("mlp", "router", "gate").T),
            (p + "mlp.gate.e_score_correction_bias", (E,), lambda g=get: g("mlp", "router", "bias")),
        ]
        for x in range(E):  # the released checkpoints' layout: one gate / up / down matrix per expert
            q = f"{p}mlp.experts.{x}."
            out += [(q + "gate_proj.weight", (I, D), lambda g=get, x=x: g("mlp", "wi")[x, :, 0].T),
                    (q + "up_proj.weight", (I, D), lambda g=get, x=x: g("mlp", "wi")[x, :, 1].T),
                    (q + "down_proj.weight", (D, I), lambda g=get, x=x: g("mlp", "wo")[x].T)]
        if S:
            out += _mlp_tensors(get, p + "mlp.shared_experts.", ("mlp", "shared"), S, D)
    out.append(("model.norm.weight", (D,), lambda: f32(read(("final_norm", "scale"), None))))
    if not m.tie_embeddings:
        out.append(("lm_head.weight", (V, D), lambda: f32(read(("lm_head",), None)).T))
    return [(n, shape, (lambda f=f: np.ascontiguousarray(f()))) for n, shape, f in out]


def _mlp_tensors(get, prefix: str, path: tuple, F: int, D: int) -> list:
    return [(prefix + "gate_proj.weight", (F, D), lambda: get(*path, "wi")[:, 0].T),
            (prefix + "up_proj.weight", (F, D), lambda: get(*path, "wi")[:, 1].T),
            (prefix + "down_proj.weight", (D, F), lambda: get(*path, "wo").T)]


def to_hf_moe_state_dict(params, m) -> dict[str, np.ndarray]:
    """HF ``Glm4MoeForCausalLM`` state dict (float32 NumPy) from glmjax ``params`` (a pure dict)."""
    from glmjax.export.hf_mapping import tree_reader

    out = {name: make() for name, _, make in hf_moe_tensors(m, tree_reader(params, m))}
    if m.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def glm4_moe_model_config(config: dict) -> dict:
    """The import layout's config function (``glmjax.export.from_hf.LAYOUTS['glm4_moe']``)."""
    return model_overrides_from_hf(config)


def glm4_moe_params(get, m) -> dict:
    """glmjax params (``layers`` / ``moe_layers`` as lists) from ``Glm4MoeForCausalLM`` tensor names."""
    check_moe_exportable(m)
    D, H, K, hd = int(m.hidden_size), int(m.num_heads), int(m.num_kv_heads), int(m.head_dim)
    perm = rotary_perm(m)
    out = {"embed": get("model.embed_tokens.weight"), "final_norm": {"scale": get("model.norm.weight")},
           "layers": [], "moe_layers": []}
    for i in range(int(m.num_layers)):
        p = f"model.layers.{i}."
        g = lambda name: get(p + name)  # noqa: E731
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
        stack, _ = _stack_of(m, i)
        if stack == "layers":
            mlp = _mlp_from_hf(g, "mlp.")
        else:
            wi, wo = _experts_from_hf(get, p + "mlp.experts.", int(m.moe.num_experts))
            mlp = {"router": {"gate": g("mlp.gate.weight").T, "bias": g("mlp.gate.e_score_correction_bias")},
                   "wi": wi, "wo": wo}
            if int(m.moe.num_shared_experts):
                mlp["shared"] = _mlp_from_hf(g, "mlp.shared_experts.")
        out[stack].append({"attn": a, "mlp": mlp, "attn_norm": {"scale": g("input_layernorm.weight")},
                           "mlp_norm": {"scale": g("post_attention_layernorm.weight")}})
    if not m.tie_embeddings:
        out["lm_head"] = get("lm_head.weight").T
    return out


def _experts_from_hf(get, prefix: str, E: int):
    """(wi [E, D, 2, I], wo [E, I, D]) from per-expert files (``experts.{x}.gate_proj.weight``: the
    released checkpoints, what transformers saves) or the fused in-memory ``experts.gate_up_proj``."""
    names = getattr(get, "names", None)
    if names is not None and prefix + "gate_up_proj" in names:
        gu = get(prefix + "gate_up_proj")  # [E, 2I, D] rows [gate; up]
        wi = gu.reshape(E, 2, gu.shape[1] // 2, gu.shape[2]).transpose(0, 3, 1, 2)
        return wi, get(prefix + "down_proj").transpose(0, 2, 1)
    wi = np.stack([np.stack([get(f"{prefix}{x}.gate_proj.weight").T, get(f"{prefix}{x}.up_proj.weight").T], 1)
                   for x in range(E)])
    return wi, np.stack([get(f"{prefix}{x}.down_proj.weight").T for x in range(E)])


def _mlp_from_hf(g, prefix: str) -> dict:
    return {"wi": np.stack([g(prefix + "gate_proj.weight").T, g(prefix + "up_proj.weight").T], axis=1),
            "wo": g(prefix + "down_proj.weight").T}


def from_hf_moe_state_dict(sd: dict, m) -> dict:
    """glmjax params (pure dict of float32 NumPy arrays) from an HF ``Glm4MoeForCausalLM`` state dict."""
    from glmjax.export.from_hf import params_from_hf

    def get(name):
        return np.asarray(sd[name], np.float32)

    get.names = set(sd)
    return params_from_hf("glm4_moe", get, m)
