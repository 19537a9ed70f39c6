"""Generate text from a glmjax checkpoint (KV cache; GLM blank filling for prompts with masks).

    python tools/generate.py --workdir=/tmp/glm_tiny --prompt="def fib(n):"
    python tools/generate.py --workdir=DIR --prompt="x = [MASK] + 1" --max_new_tokens=16
    python tools/generate.py --workdir=DIR --prompt="import os" --prompt="class A:" --temperature=0.8 --top_p=0.95

A prompt containing [MASK], [sMASK] or [gMASK] is completed the GLM way: the prompt is Part A (seen
bidirectionally) and each blank is generated after <sop> until <eop>; the filled text is printed.
Otherwise the continuation is printed after the prompt. Several --prompt are decoded as one batch.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from glmjax.export.cli import add_log_level, quiet, run  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="the training run's --workdir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="new tokens per prompt (per blank)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0)
    add_log_level(p)
    args = p.parse_args(argv)
    quiet(args.log_level)
    from glmjax.inference import generate, load

    model, _ = load(args.workdir, args.step)
    outs = generate(model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, seed=args.seed)
    masks = ("[MASK]", "[sMASK]", "[gMASK]")
    for prompt, text in zip(args.prompt, outs):
        print(text if any(m in prompt for m in masks) else prompt + text)
        if len(args.prompt) > 1:
            print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
