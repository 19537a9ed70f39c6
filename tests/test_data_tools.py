"""tools/inspect_data.py and tools/bench_data.py on a small corpus (in-process)."""
import importlib.util
import json
import os

import pytest

from glmjax.data import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    testing.write_corpus(str(root / "docs"), 30, seed=8)
    path = root / "small.py"
    path.write_text(
        "from glmjax.config import base_config\n"
        "def get_config():\n"
        "    c = base_config()\n"
        "    c.batch_size, c.seq_len, c.model.vocab_size = 4, 64, 512\n"
        f"    c.data.task = 'text:{root}/docs/*.txt'\n"
        f"    c.data.cache_dir = '{root}/cache'\n"
        "    c.data.tokenizer_sample_chars = 200000\n"
        "    c.data.shuffle_buffer = 32\n"
        "    c.objective.causal, c.objective.mask, c.objective.smask, c.objective.gmask = 0.25, 0.25, 0.25, 0.25\n"
        "    return c\n")
    return str(path)


def test_inspect_data_writes_one_json_line_per_segment(config_file, tmp_path, capsys):
    out = tmp_path / "segments.jsonl"
    assert _tool("inspect_data").main([f"--config={config_file}", "--num_batches=3", f"--out={out}"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["batch"] for r in records} == {0, 1, 2}
    objectives = {r["objective"] for r in records}
    assert objectives <= {"causal", "mask", "smask", "gmask"} and len(objectives) >= 3
    for r in records:
        assert r["tokenizer"].endswith(".model") and os.path.exists(r["tokenizer"])
        for k in ("tokens", "targets", "positions", "block_positions", "bidirectional", "loss_weights"):
            assert len(r[k]) == r["length"] and all(isinstance(x, (int, float)) for x in r[k])
        if r["objective"] == "causal":
            assert r["text"]
        else:
            mask = {"mask": "[MASK]", "smask": "[sMASK]", "gmask": "[gMASK]"}[r["objective"]]
            assert r["part_a"].count(mask) == len(r["spans"]) >= 1
            # putting the spans' text back in place of the masks gives the chunk's text, no mask left
            text, pieces = r["part_a"], sorted(r["spans"], key=lambda s: s["position"])
            for s in pieces:
                text = text.replace(mask, s["text"], 1)
            assert mask not in text
    # printing mode shows Part A and the spans
    assert _tool("inspect_data").main([f"--config={config_file}", "--num_batches=1"]) == 0
    shown = capsys.readouterr().out
    assert "tokenizer:" in shown and "=== batch 0 row 0 segment 1" in shown


def test_bench_data_pipeline_only(config_file, capsys):
    assert _tool("bench_data").main([f"--config={config_file}", "--num_batches=5", "--warmup=1",
                                     "--train_steps=0"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out[: out.rindex("}") + 1])
    assert res["pipeline_tokens_per_s"] > 0 and 0.5 < res["fill"] <= 1.0
