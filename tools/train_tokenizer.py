"""Train the GLM SentencePiece tokenizer for any source and write it to a file.

    python tools/train_tokenizer.py --source=stdlib --vocab_size=2048 --out=/tmp/stdlib.model
    python tools/train_tokenizer.py --source='text:/data/books/*.txt' --vocab_size=32000 --out=books.model

Point a run at the result with ``--config.data.tokenizer=PATH`` (and ``model.vocab_size`` >= the size).
Without ``--out`` the model is written where a run with ``data.task=SOURCE`` would look for it
(``data.cache_dir``), so the run reuses it instead of training its own.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from glmjax.data import defaults, sources


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="stdlib", help="source spec: stdlib | text:GLOB | jsonl:GLOB@FIELD | tfds:NAME@FIELD")
    p.add_argument("--vocab_size", type=int, default=2048, help="number of pieces (= model.vocab_size)")
    p.add_argument("--out", default="", help="output .model path (default: the run's cache location)")
    p.add_argument("--cache_dir", default="", help="data.cache_dir for the default --out (default ~/.cache/glmjax)")
    p.add_argument("--sample_chars", type=int, default=defaults.data_config().tokenizer_sample_chars,
                   help="characters of training text to train on")
    p.add_argument("--validation_fraction", type=float, default=defaults.data_config().validation_fraction)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import seqio

    from glmjax.data import vocab

    spec = sources.parse_spec(args.source)
    out = args.out
    if not out:
        import ml_collections

        cfg = ml_collections.ConfigDict(dict(model=dict(vocab_size=args.vocab_size), data=defaults.data_config()))
        cfg.data.task, cfg.data.cache_dir = args.source, args.cache_dir
        cfg.data.tokenizer_sample_chars, cfg.data.validation_fraction = args.sample_chars, args.validation_fraction
        out = vocab.cached_tokenizer_path(cfg)

    t0, seen, shown = time.time(), [0], [0.0]

    def texts():  # progress: characters read so far, at most every 0.2 s
        for text in sources.iter_texts(spec, "train", args.validation_fraction):
            seen[0] += len(text)
            if time.time() - shown[0] > 0.2 or seen[0] >= args.sample_chars:
                shown[0] = time.time()
                print(f"\rreading {spec.key}: {min(seen[0], args.sample_chars):,}/{args.sample_chars:,} chars",
                      end="", file=sys.stderr, flush=True)
            yield text

    print(f"training a {args.vocab_size}-piece tokenizer on {spec.key} ...", file=sys.stderr)
    vocab.train_tokenizer(texts(), args.vocab_size, out, args.sample_chars)
    print(file=sys.stderr)
    v = seqio.SentencePieceVocabulary(out)
    ids = vocab.special_ids(v)
    print(f"wrote {out} ({v.vocab_size} pieces, {time.time() - t0:.1f}s); special ids: {ids}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
