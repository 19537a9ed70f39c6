"""Import a Hugging Face GLM checkpoint into a glmjax workdir (step 0) to continue pretraining it.

    python tools/import_hf.py --model=/models/glm-4-9b-hf --workdir=/tmp/glm4_cont
    python -m glmjax.train --config=/tmp/glm4_cont/imported_config.py --workdir=/tmp/glm4_cont

    python tools/import_hf.py --model=/models/glm-130b --layout=glm130b --config=configs/glm130b.py \
        --workdir=/tmp/glm130b_cont

--model: a checkpoint directory in one of the layouts (--layout; auto-detected when omitted):
  glm      config.json (model_type "glm", GlmForCausalLM) + *.safetensors
  glmjax   a glmjax remote-code export (tools/export_hf.py --format=remote)
  chatglm  Hugging Face ChatGLM-6B (config.json model_type "chatglm" + pytorch_model*.bin or safetensors)
  chatglm2 Hugging Face ChatGLM2-6B / ChatGLM3-6B (model_type "chatglm" with multi_query_attention,
           padded_vocab_size, ...: detected from config.json)
  glm130b  the released GLM-130B SwissArmyTransformer checkpoint: mp_rank_XX_model_states.pt files
           ({"module": state_dict}, the model-parallel ranks are merged); it has no config, so --config
           (configs/glm130b.py) gives the shape, and a mismatching tensor is named
The model config is derived from config.json (glm130b: the architecture from the layout, the shape from
--config); --config gives the rest of the run (data, optimizer, mesh; default: glmjax's defaults) and
--config.KEY=VALUE overrides anything.
The run tokenizes with the model's own tokenizer (data.tokenizer = --model when it has tokenizer.json).
Writes WORKDIR/checkpoints/0 and WORKDIR/imported_config.py (pass it as --config to resume).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from glmjax.export.cli import add_log_level, quiet, run  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--workdir", required=True, help="new glmjax workdir to write")
    p.add_argument("--config", default=None, help="config file for the non-model settings (glm130b: also the shape)")
    p.add_argument("--layout", default=None, help="checkpoint layout: glm, glmjax, chatglm, chatglm2, glm130b (default: detect)")
    add_log_level(p)
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if not r.startswith("--config.")]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)} (config overrides are --config.KEY=VALUE)")
    quiet(args.log_level)
    from glmjax.export.from_hf import import_hf

    r = import_hf(args.model, args.workdir, config_path=args.config, overrides=rest, layout=args.layout)
    print(f"imported {args.model} ({r['kind']}) into {r['workdir']} as step 0\n"
          f"continue pretraining: python -m glmjax.train --config={r['workdir']}/imported_config.py "
          f"--workdir={r['workdir']}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
