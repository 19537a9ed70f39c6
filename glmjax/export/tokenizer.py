"""The run's SentencePiece tokenizer as a Hugging Face ``tokenizers`` BPE with the same ids.

glmjax's SentencePiece model (glmjax.data.vocab) is BPE with identity normalisation, no dummy
prefix, byte fallback, and control symbols for the GLM specials. SentencePiece BPE encodes by
repeatedly merging the adjacent pair whose concatenation is the highest-scoring piece; it does not
pre-split at encode time. The equivalent ``tokenizers`` model: the same vocabulary (same ids), a merge
``(a, b)`` for every split of every normal piece into two normal pieces, ranked by the piece's score,
``byte_fallback=True``, the normaliser ``' ' -> '▁'`` and no pre-tokenizer. The GLM specials
``[MASK] [sMASK] [gMASK] <sop> <eop>`` are added tokens, so writing them in text gives their ids, as
``glmjax.inference.text.Tokenizer`` does.
"""
from __future__ import annotations

import os

# == glmjax.data.vocab.SPECIAL_TOKENS (a test checks it): that module imports seqio and TensorFlow, which
# would add ~0.7 GB to the resident memory of every export
SPECIAL_TOKENS = ("[MASK]", "[sMASK]", "[gMASK]", "<sop>", "<eop>")


def sentencepiece_to_hf(model_file: str):
    """A ``tokenizers.Tokenizer`` equal to the SentencePiece model ``model_file`` on every text."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers

    sp = spm.SentencePieceProcessor(model_file=model_file)
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    normal = {sp.id_to_piece(i): sp.get_score(i) for i in range(n)
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    merges = []
    for piece, score in normal.items():
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in normal and b in normal:
                merges.append((-score, vocab[piece], vocab[a], (a, b)))
    merges.sort()
    unk = sp.id_to_piece(sp.unk_id())
    bpe = models.BPE(vocab=vocab, merges=[m[-1] for m in merges], unk_token=unk, byte_fallback=True,
                     fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def save_hf_tokenizer(model_file: str, out_dir: str) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (+ the SentencePiece model) into ``out_dir``."""
    import shutil

    import sentencepiece as spm
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=model_file)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=sentencepiece_to_hf(model_file), eos_token=sp.id_to_piece(sp.eos_id()),
        pad_token=sp.id_to_piece(sp.pad_id()), unk_token=sp.id_to_piece(sp.unk_id()), mask_token="[MASK]",
        clean_up_tokenization_spaces=False)
    fast.save_pretrained(out_dir)
    shutil.copyfile(model_file, os.path.join(out_dir, "tokenizer.model"))
