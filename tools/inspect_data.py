"""Show what the model is trained on: the packed segments of the first batches, features and text.

    python tools/inspect_data.py --config=configs/tiny.py --num_batches=1
    python tools/inspect_data.py --config=configs/tiny.py --num_batches=4 --out=/tmp/batches.jsonl
    python tools/inspect_data.py --config=configs/tiny.py --config.objective.gmask=1 --config.objective.causal=0

Without ``--out`` it prints each segment's objective, the decoded Part A (mask tokens written out) and
each span (with the Part A position of its mask token). With ``--out`` it writes JSON lines, one per
packed segment: row, segment, objective, every feature as an integer list, the decoded texts and the
path of the SentencePiece model used. ``--config.KEY=VALUE`` overrides config keys.
"""
from __future__ import annotations

import argparse
import json
import sys

from glmjax.data.cli import parse_config_args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file, e.g. configs/tiny.py")
    p.add_argument("--num_batches", type=int, default=1, help="how many batches to show")
    p.add_argument("--split", default="train", choices=["train", "validation"])
    p.add_argument("--out", default="", help="write JSON lines here instead of printing")
    p.add_argument("--process_index", type=int, default=0, help="show this host's shard")
    p.add_argument("--process_count", type=int, default=1)
    args, cfg = parse_config_args(p, argv)
    from glmjax.data.inspect import segments
    from glmjax.data.pipeline import make_pipeline
    from glmjax.data.vocab import get_vocabulary

    vocab = get_vocabulary(cfg)
    model_file = vocab.sentencepiece_model_file
    pipe = make_pipeline(cfg, args.split, process_index=args.process_index, process_count=args.process_count)
    out = open(args.out, "w") if args.out else None
    try:
        print(f"tokenizer: {model_file}", file=sys.stderr if out else sys.stdout)
        for b in range(args.num_batches):
            batch = next(pipe)
            if out:
                print(f"\rbatch {b + 1}/{args.num_batches}", end="", file=sys.stderr, flush=True)
            for rec in segments(batch, vocab):
                rec = dict(batch=b, tokenizer=model_file, **rec)
                if out:
                    out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                else:
                    _print(rec)
    finally:
        pipe.close()
        if out:
            out.close()
            print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


def _print(rec: dict) -> None:
    print(f"\n=== batch {rec['batch']} row {rec['row']} segment {rec['segment']}: {rec['objective']}, "
          f"{rec['length']} tokens, {sum(1 for w in rec['loss_weights'] if w)} with loss")
    print("tokens:         ", rec["tokens"])
    print("targets:        ", rec["targets"])
    print("positions:      ", rec["positions"])
    print("block_positions:", rec["block_positions"])
    print("bidirectional:  ", rec["bidirectional"])
    if rec["objective"] == "causal":
        print("text:", repr(rec["text"]))
        return
    print("Part A:", repr(rec["part_a"]))
    for s in rec["spans"]:
        print(f"  span at position {s['position']}: {s['text']!r}")


if __name__ == "__main__":
    sys.exit(main())
