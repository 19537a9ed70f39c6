"""PyTorch GLM exported by glmjax (``trust_remote_code=True``); self-contained: torch + transformers only.

This file is copied next to the weights by ``tools/export_hf.py --format=remote``. It computes exactly
what glmjax's JAX model computes for the knobs in ``config.glmjax_model`` (the run's ``model`` config
section): DeepNorm post-LN or RMSNorm pre-norm blocks, an optional norm on the embeddings and after the
last layer, GeGLU / SwiGLU (either half the gate) or a plain GELU MLP (erf or tanh), 1D or 2D rotary on
interleaved pairs or split halves over any fraction of head_dim, MHA / GQA, biases on qkv, the attention
output and the MLP, tied or untied output (the released GLM-130B and ChatGLM-6B architectures included). Parameter names and shapes are glmjax's own
(``layers.<i>.attn.wq [D, H, hd]``, ...), so export and import copy tensors without transforms.

``forward(input_ids, position_ids=None, block_position_ids=None, bidirectional=None, attention_mask=None)``:
token ``i`` sees token ``j`` iff both are real tokens (``attention_mask``) and ``j <= i`` or
``bidirectional[j] == 1`` (GLM's Part A). ``generate`` fills ``[MASK]``/``[sMASK]``/``[gMASK]`` blanks
like glmjax does (Part A bidirectional, ``<sop> span <eop>`` per blank, 2D positions) and otherwise
continues the text; it recomputes the whole sequence per token (no KV cache).

Adding a glmjax model knob: add it to ``KNOBS`` with the values this file implements and implement
them below; ``IGNORED`` lists knobs that do not change the forward pass.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

KNOBS = {"norm": ("deepnorm", "rmsnorm_pre"), "mlp": ("geglu", "swiglu", "gelu"), "rope_2d": (True, False),
         "qkv_bias": (True, False), "tie_embeddings": (True, False), "rope_style": ("interleaved", "half"),
         "gelu": ("erf", "tanh"), "glu_order": ("gate_first", "value_first"), "attn_out_bias": (True, False),
         "mlp_bias": (True, False), "embedding_norm": (True, False), "final_norm": (True, False),
         "qk_norm": (False,)}
SHAPES = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "vocab_size",
          "norm_eps", "rope_theta", "partial_rotary_factor")
IGNORED = ("attention_impl", "dtype", "param_dtype", "remat", "scan_layers", "embedding_grad_shrink", "init_std",
           "loss_chunk", "init", "sequence_parallel")


def unsupported_knobs(model: dict) -> list[str]:
    """The knobs of a glmjax ``model`` config this file cannot compute (empty: exportable)."""
    bad = []
    for key, value in model.items():
        if key == "moe":  # Mixture of Experts: exported as Glm4MoeForCausalLM, never as remote code
            if int(value.get("num_experts", 0)):
                bad.append(f"model.moe.num_experts={value['num_experts']} (MoE exports as Glm4MoeForCausalLM)")
        elif key in KNOBS:
            if value not in KNOBS[key]:
                bad.append(f"model.{key}={value!r} (supported: {', '.join(map(repr, KNOBS[key]))})")
        elif key not in SHAPES and key not in IGNORED:
            bad.append(f"model.{key}={value!r} (unknown to modeling_glmjax.py)")
    return bad


class GlmjaxConfig(PretrainedConfig):
    model_type = "glmjax"

    def __init__(self, glmjax_model: dict | None = None, special_ids: dict | None = None, **kwargs):
        self.glmjax_model = dict(glmjax_model or {})
        self.special_ids = dict(special_ids or {})
        m = self.glmjax_model
        kwargs.setdefault("vocab_size", m.get("vocab_size"))
        kwargs.setdefault("hidden_size", m.get("hidden_size"))
        kwargs.setdefault("num_hidden_layers", m.get("num_layers"))
        kwargs.setdefault("num_attention_heads", m.get("num_heads"))
        kwargs.setdefault("tie_word_embeddings", bool(m.get("tie_embeddings", False)))
        super().__init__(**kwargs)


def _rotate(x, pos, theta, style):
    r = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, r, 2, dtype=torch.float32, device=x.device) / r))
    angle = pos.float()[..., None] * inv_freq  # [B, T, r/2]
    cos, sin = torch.cos(angle)[:, :, None], torch.sin(angle)[:, :, None]
    x = x.float()
    if style == "half":  # pairs (x[i], x[i + r/2]): rotate_half
        x1, x2 = x[..., :r // 2], x[..., r // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    even, odd = x[..., 0::2], x[..., 1::2]  # pairs (x[2i], x[2i+1])
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).reshape(x.shape)


def rope(x, pos, bpos, m):
    """Rotary on ``x [B, T, H, hd]``: ``r = hd * partial_rotary_factor`` dims by ``pos``, with ``rope_2d`` the
    next ``r`` by ``bpos``; the rest pass through."""
    D = x.shape[-1]
    r = int(round(D * float(m.get("partial_rotary_factor", 0.5))))
    theta, style = float(m["rope_theta"]), m.get("rope_style", "interleaved")
    parts, end = [_rotate(x[..., :r], pos, theta, style)], r
    if m["rope_2d"]:
        parts.append(_rotate(x[..., r:2 * r], bpos, theta, style))
        end = 2 * r
    if end < D:
        parts.append(x[..., end:].float())
    return torch.cat(parts, dim=-1).to(x.dtype)


class Norm(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.rms, self.eps = m["norm"] == "rmsnorm_pre", float(m["norm_eps"])
        self.scale = nn.Parameter(torch.ones(m["hidden_size"]))
        if not self.rms:
            self.bias = nn.Parameter(torch.zeros(m["hidden_size"]))

    def forward(self, x):
        h = x.float()
        if self.rms:
            y = h * torch.rsqrt((h * h).mean(-1, keepdim=True) + self.eps) * self.scale.float()
        else:
            mean = h.mean(-1, keepdim=True)
            var = ((h - mean) ** 2).mean(-1, keepdim=True)
            y = (h - mean) * torch.rsqrt(var + self.eps) * self.scale.float() + self.bias.float()
        return y.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, m):
        super().__init__()
        D, H, K, hd = m["hidden_size"], m["num_heads"], m["num_kv_heads"], m["head_dim"]
        self.m = m
        self.wq, self.wk = nn.Parameter(torch.empty(D, H, hd)), nn.Parameter(torch.empty(D, K, hd))
        self.wv, self.wo = nn.Parameter(torch.empty(D, K, hd)), nn.Parameter(torch.empty(H, hd, D))
        if m["qkv_bias"]:
            self.bq = nn.Parameter(torch.zeros(H, hd))
            self.bk, self.bv = nn.Parameter(torch.zeros(K, hd)), nn.Parameter(torch.zeros(K, hd))
        self.out_bias = bool(m.get("attn_out_bias", False))
        if self.out_bias:
            self.bo = nn.Parameter(torch.zeros(D))

    def forward(self, x, pos, bpos, visible):
        m = self.m
        q = torch.einsum("btd,dhk->bthk", x, self.wq)
        k = torch.einsum("btd,dhk->bthk", x, self.wk)
        v = torch.einsum("btd,dhk->bthk", x, self.wv)
        if m["qkv_bias"]:
            q, k, v = q + self.bq, k + self.bk, v + self.bv
        q, k = rope(q, pos, bpos, m), rope(k, pos, bpos, m)
        groups = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        s = torch.einsum("bthk,bshk->bhts", q.float(), k.float()) * q.shape[-1] ** -0.5
        s = s.masked_fill(~visible[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row seeing nothing (padding) gives 0
        out = torch.einsum("bhts,bshk->bthk", p, v.float()).to(x.dtype)
        out = torch.einsum("bthk,hkd->btd", out, self.wo)
        return out + self.bo if self.out_bias else out


class MLP(nn.Module):
    """Gated (``wi [D, 2, F]``; ``glu_order``: which half is the gate) or plain GELU (``wi [D, F]``) MLP."""

    def __init__(self, m):
        super().__init__()
        D, Fd = m["hidden_size"], m["mlp_dim"]
        self.gated = m["mlp"] != "gelu"
        self.swiglu = m["mlp"] == "swiglu"
        self.approximate = "tanh" if m.get("gelu", "erf") == "tanh" else "none"
        self.gate = 1 if m.get("glu_order", "gate_first") == "value_first" else 0
        shape = (D, 2, Fd) if self.gated else (D, Fd)
        self.wi = nn.Parameter(torch.empty(*shape))
        self.wo = nn.Parameter(torch.empty(Fd, D))
        self.bias = bool(m.get("mlp_bias", False))
        if self.bias:
            self.bi, self.bo = nn.Parameter(torch.zeros(*shape[1:])), nn.Parameter(torch.zeros(D))

    def act(self, h):
        return F.silu(h) if self.swiglu else F.gelu(h, approximate=self.approximate)

    def forward(self, x):
        h = torch.einsum("btd,dcf->btcf", x, self.wi) if self.gated else x @ self.wi
        if self.bias:
            h = h + self.bi
        y = self.act(h[:, :, self.gate]) * h[:, :, 1 - self.gate] if self.gated else self.act(h)
        out = y @ self.wo
        return out + self.bo if self.bias else out


class Block(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.deepnorm = m["norm"] == "deepnorm"
        self.alpha = (2.0 * m["num_layers"]) ** 0.5 if self.deepnorm else 1.0
        self.attn_norm, self.attn = Norm(m), Attention(m)
        self.mlp_norm, self.mlp = Norm(m), MLP(m)

    def forward(self, x, pos, bpos, visible):
        if self.deepnorm:
            x = self.attn_norm(self.alpha * x + self.attn(x, pos, bpos, visible))
            return self.mlp_norm(self.alpha * x + self.mlp(x))
        x = x + self.attn(self.attn_norm(x), pos, bpos, visible)
        return x + self.mlp(self.mlp_norm(x))


class GlmjaxForCausalLM(PreTrainedModel):
    config_class = GlmjaxConfig
    base_model_prefix = ""
    _no_split_modules = ["Block"]

    def __init__(self, config: GlmjaxConfig):
        super().__init__(config)
        m = config.glmjax_model
        bad = unsupported_knobs(m)
        if bad:
            raise ValueError("this modeling_glmjax.py cannot compute " + "; ".join(bad))
        self.embed = nn.Parameter(torch.empty(m["vocab_size"], m["hidden_size"]))
        if m.get("embedding_norm", False):
            self.embed_norm = Norm(m)
        self.layers = nn.ModuleList([Block(m) for _ in range(m["num_layers"])])
        if m.get("final_norm", True):
            self.final_norm = Norm(m)
        if not m["tie_embeddings"]:
            self.lm_head = nn.Parameter(torch.empty(m["hidden_size"], m["vocab_size"]))
        self.post_init()

    def _init_weights(self, module):  # weights come from the checkpoint; keep init deterministic and cheap
        for name, p in module.named_parameters(recurse=False):
            with torch.no_grad():
                if name in ("scale",):
                    p.fill_(1.0)
                elif name.startswith("b") or name == "bias":
                    p.zero_()
                else:
                    p.normal_(0.0, 0.02)

    def forward(self, input_ids, position_ids=None, block_position_ids=None, bidirectional=None,
                attention_mask=None, labels=None, **kwargs):
        B, T = input_ids.shape
        dev = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(T, device=dev).expand(B, T)
        if block_position_ids is None:
            block_position_ids = torch.zeros(B, T, dtype=torch.long, device=dev)
        real = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        bidir = torch.zeros(B, T, dtype=torch.bool, device=dev) if bidirectional is None else bidirectional.bool()
        j = torch.arange(T, device=dev)
        visible = real[:, :, None] & real[:, None, :] & ((j[None, :] <= j[:, None])[None] | bidir[:, None, :])
        x = self.embed[input_ids]
        m = self.config.glmjax_model
        if m.get("embedding_norm", False):
            x = self.embed_norm(x)
        for block in self.layers:
            x = block(x, position_ids, block_position_ids, visible)
        if m.get("final_norm", True):
            x = self.final_norm(x)
        head = self.embed.T if self.config.glmjax_model["tie_embeddings"] else self.lm_head
        logits = (x @ head).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    # -------------------------------------------------------------------------------------- generate

    def _next(self, ids, pos, bpos, prefix, do_sample, temperature, top_p, gen):
        t = torch.tensor
        bidir = (torch.arange(len(ids)) < prefix)[None]
        logits = self(t([ids]), t([pos]), t([bpos]), bidir).logits[0, -1]
        if not do_sample:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / max(temperature, 1e-6), -1)
        sp, order = torch.sort(probs, descending=True)
        keep = (torch.cumsum(sp, -1) - sp) < top_p
        sp = sp * keep
        return int(order[torch.multinomial(sp / sp.sum(), 1, generator=gen)])

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, eos_token_id=None, seed: int = 0, **unused):
        """Per row: blank filling if it holds mask tokens (returns Part A then ``<sop> span <eop>`` per
        blank), else the row followed by up to ``max_new_tokens`` new tokens. Rows are right-padded with
        ``pad`` to a common length."""
        sid = self.config.special_ids
        masks = {sid.get("[MASK]"), sid.get("[sMASK]"), sid.get("[gMASK]")} - {None}
        eos = sid.get("eos") if eos_token_id is None else eos_token_id
        gen = torch.Generator().manual_seed(seed)
        rows = []
        for row in input_ids.tolist():
            if masks & set(row):
                seq, pos, bpos = list(row), list(range(len(row))), [0] * len(row)
                for m in [i for i, tok in enumerate(row) if tok in masks]:
                    seq, pos, bpos = seq + [sid["<sop>"]], pos + [m], bpos + [1]
                    for _ in range(max_new_tokens):
                        tok = self._next(seq, pos, bpos, len(row), do_sample, temperature, top_p, gen)
                        seq, pos, bpos = seq + [tok], pos + [m], bpos + [bpos[-1] + 1]
                        if tok == sid["<eop>"]:
                            break
                    if seq[-1] != sid["<eop>"]:
                        seq, pos, bpos = seq + [sid["<eop>"]], pos + [m], bpos + [bpos[-1] + 1]
                rows.append(seq)
            else:
                seq = list(row)
                for _ in range(max_new_tokens):
                    tok = self._next(seq, list(range(len(seq))), [0] * len(seq), 0, do_sample, temperature, top_p, gen)
                    seq.append(tok)
                    if tok == eos:
                        break
                rows.append(seq)
        width = max(map(len, rows))
        pad = sid.get("pad", 0)
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
