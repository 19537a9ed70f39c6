"""The remote-code PyTorch GLM (``modeling_glmjax.py``, ``--format=remote``) computes issue 13's knobs: the
released GLM-130B and ChatGLM-6B architectures (embedding norm, no final norm, attention-output and MLP
biases, ``[value; gate]`` GeGLU, plain tanh GELU MLP, split-halves rotary over all / half of head_dim,
2D rotary), and variants of them (gate-first GeGLU with tanh GELU on interleaved pairs, erf GELU MLP with a
quarter of head_dim rotated), on random weights imported from the released layouts: transformers' logits
equal glmjax's within 1e-4 (float32 both sides; measured ~1e-6), with 2D positions and a bidirectional prefix.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from glmjax.export.from_hf import import_hf
from glmjax.export.hf import export
from glmjax.inference import load, logits
from test_glm_originals import SMALL, V, released_tensors

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A word-level Hugging Face tokenizer (the export ships the run's tokenizer with the weights)."""
    from tokenizers import Tokenizer, models

    d = tmp_path_factory.mktemp("tok")
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, V - 5)},
             **{t: V - 5 + j for j, t in enumerate(("[MASK]", "[sMASK]", "[gMASK]", "<sop>", "<eop>"))}}
    Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")).save(str(d / "tokenizer.json"))
    return str(d)


def _released_dir(tmp_path, chatglm: bool) -> str:
    sd = released_tensors(np.random.default_rng(21 + chatglm), chatglm=chatglm)
    d = tmp_path / ("chatglm" if chatglm else "glm130b")
    d.mkdir()
    if chatglm:
        from test_glm_originals import D, F, H, L

        (d / "config.json").write_text(json.dumps({
            "model_type": "chatglm", "hidden_size": D, "num_attention_heads": H, "num_layers": L,
            "inner_hidden_size": F, "vocab_size": V, "position_encoding_2d": True, "tie_word_embeddings": False}))
        torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, d / "pytorch_model.bin")
    else:
        torch.save({"module": {k: torch.from_numpy(v) for k, v in sd.items()}}, d / "mp_rank_00_model_states.pt")
    return str(d)


CASES = {
    "glm130b": (False, []),  # 1D rotary over all of head_dim, split halves, [value; gate] erf GeGLU
    "glm130b_variant": (False, ["--config.model.glu_order=gate_first", "--config.model.gelu=tanh",
                                "--config.model.rope_style=interleaved", "--config.model.partial_rotary_factor=0.5"]),
    "chatglm": (True, []),  # 2D rotary, split halves, tanh GELU MLP, untied here
    "chatglm_variant": (True, ["--config.model.gelu=erf", "--config.model.partial_rotary_factor=0.25"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_remote_code_export_computes_the_released_knobs(case, tmp_path, tokenizer_dir):
    chatglm, knobs = CASES[case]
    wd = str(tmp_path / "wd")
    preset = str(REPO / ("configs/chatglm_6b.py" if chatglm else "configs/glm130b.py"))
    src = _released_dir(tmp_path, chatglm)
    overrides = ["--config.model.dtype=float32", "--config.batch_size=8", "--config.seq_len=32"]
    overrides = (overrides if chatglm else SMALL) + knobs
    import_hf(src, wd, config_path=preset, overrides=overrides)
    out = str(tmp_path / "remote")
    assert export(wd, out, fmt="remote", tokenizer=tokenizer_dir)["format"] == "remote"
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    model, _ = load(wd)
    rng = np.random.default_rng(22)
    tokens = rng.integers(0, V, (2, 14))
    ctx = np.array([8, 5])  # Part A per row; Part B at the mask position, block positions 1..
    j = np.arange(14)
    pos = np.where(j[None] < ctx[:, None], j[None], ctx[:, None] - 1)
    bpos = np.where(j[None] < ctx[:, None], 0, j[None] - ctx[:, None] + 1)
    bidir = (j[None] < ctx[:, None]).astype(np.int64)
    ours = logits(model, tokens, positions=pos, block_positions=bpos, bidirectional=ctx)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(tokens), position_ids=torch.tensor(pos),
                    block_position_ids=torch.tensor(bpos), bidirectional=torch.tensor(bidir)).logits.numpy()
    assert np.abs(ours).max() > 1.0
    np.testing.assert_allclose(theirs, ours, rtol=TOL, atol=TOL)


def test_chatglm2_is_glm_for_causal_lm_under_other_names(tmp_path, tokenizer_dir):
    """An imported ChatGLM2/3 model exports (``auto``) natively as ``GlmForCausalLM``: the same function as
    the released ChatGLM2 forward (NumPy) and glmjax, with ``rope_theta = 10000 * rope_ratio``."""
    from test_glm_originals_chatglm2 import RUN, chatglm2_config, chatglm2_forward, chatglm2_tensors

    src = tmp_path / "chatglm2"
    src.mkdir()
    sd = chatglm2_tensors(np.random.default_rng(24))
    (src / "config.json").write_text(json.dumps(chatglm2_config()))
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, src / "pytorch_model.bin")
    wd, out = str(tmp_path / "wd"), str(tmp_path / "hf")
    import_hf(str(src), wd, config_path=str(REPO / "configs/chatglm2_6b.py"), overrides=RUN)
    assert export(wd, out, tokenizer=tokenizer_dir)["format"] == "hf"
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "GlmForCausalLM"
    tokens = np.random.default_rng(25).integers(0, V, (2, 13))
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(tokens)).logits.numpy()
    want = chatglm2_forward(sd, tokens)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(theirs, want, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(logits(load(wd)[0], tokens), want, rtol=TOL, atol=TOL)
