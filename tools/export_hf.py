"""Export a glmjax checkpoint to a Hugging Face / PyTorch directory (safetensors, config, tokenizer).

    python tools/export_hf.py --workdir=/tmp/glm_tiny --out=/tmp/glm_tiny_hf
    python tools/export_hf.py --workdir=DIR --step=300 --out=OUT --format=hf --dtype=bfloat16 --max_shard_size=2GB

--format=hf: GLM-4-style models (model.norm=rmsnorm_pre, model.mlp=swiglu, model.rope_2d=false) as native
  GlmForCausalLM: AutoModelForCausalLM.from_pretrained(OUT).
--format=remote: any glmjax model as the self-contained modeling_glmjax.py:
  AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True).
--format=glm130b | chatglm | chatglm2: a model with the released GLM-130B / ChatGLM-6B / ChatGLM2-6B
  architecture (e.g. imported from there, configs/glm130b.py, chatglm_6b.py, chatglm2_6b.py) back in that
  layout: OUT/latest + OUT/<step>/mp_rank_XX_model_states.pt ({"module": state_dict}, --mp=N model-parallel
  ranks split as SwissArmyTransformer does) or OUT/config.json + pytorch_model.bin (built in memory).
--format=auto (default): the released layout for those architectures, else hf when the model allows it,
  else remote.
Tensors are streamed one at a time from the checkpoint (host memory ~ the largest tensor); the result
appears at OUT only when complete. See docs/export.md.
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
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--format", default="auto", choices=("auto", "hf", "remote", "glm130b", "chatglm", "chatglm2"))
    p.add_argument("--mp", type=int, default=1, help="--format=glm130b: model-parallel ranks to split into")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to export (default: the run's data.tokenizer or its cached trained one)")
    add_log_level(p)
    args = p.parse_args(argv)
    quiet(args.log_level)
    from glmjax.export.hf import export

    s = export(args.workdir, args.out, step=args.step, fmt=args.format, dtype=args.dtype,
               max_shard_size=args.max_shard_size, tokenizer=args.tokenizer, progress=True, mp=args.mp)
    if s["format"] in ("glm130b", "chatglm", "chatglm2"):
        print(f"exported step {s['step']} to {s['out']}: the released {s['format']} layout, "
              f"{s['bytes'] / 1e9:.3f} GB in {s['seconds']:.1f}s")
        return 0
    load = "" if s["format"] == "hf" else ", trust_remote_code=True"
    print(f"exported step {s['step']} to {s['out']}: format {s['format']}, {s['shards']} shard(s), "
          f"{s['bytes'] / 1e9:.3f} GB in {s['seconds']:.1f}s (tensors {s['tensor_seconds']:.1f}s: "
          f"{s['bytes'] / 1e9 / max(s['tensor_seconds'], 1e-9):.2f} GB/s)\n"
          f"load it with AutoModelForCausalLM.from_pretrained({s['out']!r}{load})")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
