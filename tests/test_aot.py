"""tools/aot_compile.py and glmjax.aot: topology parsing, abstract TPU devices, the fit verdict, errors.

Compiles use the real XLA:TPU compiler from libtpu on this CPU host, at small shapes (a 1-2 layer
model) so each compile takes seconds. A missing libtpu fails these tests with the fix, never skips.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from aot_helpers import tpu_devices
from glmjax.aot import TopologyError, collectives_of, compile_report, parse_topology
from glmjax.config import ConfigError, base_config, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
    spec = importlib.util.spec_from_file_location("aot_compile_tool", os.path.join(ROOT, "tools", "aot_compile.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_libtpu_is_installed():
    assert importlib.util.find_spec("libtpu") is not None, (
        "libtpu is missing: `pip install -e '.[test]'` installs it; the TPU compile tests need it")


@pytest.mark.parametrize("name,grid,chips,slices", [
    ("v5p-8", (2, 2, 1), 4, 1), ("v5p-16", (2, 2, 2), 8, 1), ("v5p-128", (4, 4, 4), 64, 1),
    ("v5p-256", (4, 4, 8), 128, 1), ("v5p-1024", (8, 8, 8), 512, 1), ("v4-8", (2, 2, 1), 4, 1),
    ("v5litepod-16", (4, 4), 16, 1), ("v5e-32", (4, 8), 32, 1), ("v6e-256", (16, 16), 256, 1),
    ("v5p:4x4x8", (4, 4, 8), 128, 1), ("V6E:2x4", (2, 4), 8, 1), ("2xv5p-256", (4, 4, 8), 256, 2),
])
def test_parse_topology(name, grid, chips, slices):
    t = parse_topology(name)
    assert (t.grid, t.chips, t.num_slices) == (grid, chips, slices)


@pytest.mark.parametrize("name,match", [
    ("v9-8", "unknown TPU generation 'v9'"), ("tpu-128", "unknown topology"), ("v5p-7", "multiple of 2"),
    ("v5p-12", "not a power of two"), ("v5e:2x2x2", "2-D"), ("v5p-0", "bad accelerator type"),
])
def test_bad_topology_is_a_clear_error(name, match):
    with pytest.raises(TopologyError, match=match):
        parse_topology(name)


def test_abstract_devices_megacore_and_multislice():
    topo, devs = tpu_devices("v4-8")  # 4 chips, one device per chip (megacore)
    assert len(devs) == 4 and devs[0].device_kind == "TPU v4"
    topo, devs = tpu_devices("2xv5p:2x2x1")
    assert len(devs) == 8 and sorted({d.slice_index for d in devs}) == [0, 1]


def test_libtpu_missing_is_a_clear_error(monkeypatch):
    import glmjax.aot.topology as topology

    real = importlib.util.find_spec
    monkeypatch.setattr(topology.importlib.util, "find_spec", lambda n, *a: None if n == "libtpu" else real(n, *a))
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    with pytest.raises(TopologyError, match=r"libtpu is not installed.*pip install"):
        topology.abstract_devices(parse_topology("v5p-8"))


def test_collectives_of_counts_and_bytes():
    hlo = "\n".join([
        "  %all-gather.1 = bf16[8,128]{1,0} all-gather(bf16[2,128]{1,0} %p), dimensions={0}",
        "  %ags = (f32[4,16]{1,0}, f32[16,16]{1,0}) all-gather-start(f32[4,16]{1,0} %x), dimensions={0}",
        "  %agd = f32[16,16]{1,0} all-gather-done((f32[4,16]{1,0}, f32[16,16]{1,0}) %ags)",
        "  ROOT %ar = (f32[10]{0}, s32[3]{0}) all-reduce(f32[10]{0} %a, s32[3]{0} %b), to_apply=%sum",
        "  %rs = f32[2,5]{1,0} reduce-scatter(f32[8,5]{1,0} %c), dimensions={0}",
    ])
    c = collectives_of(hlo)
    assert c["all-gather"] == {"count": 2, "bytes": 8 * 128 * 2 + 16 * 16 * 4}
    assert c["all-reduce"] == {"count": 1, "bytes": 10 * 4 + 3 * 4}
    assert c["reduce-scatter"] == {"count": 1, "bytes": 40}
    assert c["all-to-all"]["count"] == 0


def _small_cfg(batch, *, seq=1024, vocab=32768):
    cfg = base_config()
    cfg.batch_size, cfg.seq_len = batch, seq
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 1, 256, 4, 2, 64, 512
    m.vocab_size, m.dtype = vocab, "bfloat16"
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
    return cfg


def test_mesh_that_does_not_match_the_slice_fails_before_compiling(capsys):
    tool = _tool()
    rc = tool.main(["--config=configs/tiny.py", "--topology=v5p-8", "--config.mesh.data=1",
                    "--config.mesh.fsdp=3"])
    err = capsys.readouterr().err
    assert rc == 2 and "4 devices" in err and "mesh" in err and "compiling" not in err
    assert tool.main(["--config=configs/tiny.py", "--topology=v7x-8"]) == 2
    assert "unknown TPU generation" in capsys.readouterr().err
    topo, devs = tpu_devices("2xv5p:2x2x1")
    with pytest.raises(ConfigError, match="multiple of the 2 slices"):
        compile_report(_small_cfg(16), topo, devices=devs)


def test_fit_verdict_flips_and_the_suggested_batch_fits(tmp_path, capsys):
    """v5p (95.74 GiB): batch 32 x 1024 fits; x256 does not (the compiler refuses it, fast); the tool
    says so (exit 3) and the suggested smaller batch, compiled again here, fits. Memory numbers are
    checked against the analytic state size."""
    topo, devs = tpu_devices("v5p:2x2x1")
    ok = compile_report(_small_cfg(32), topo, eval_step=False, devices=devs)
    assert ok["fits"] and ok["chips"] == 4 and ok["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    b = ok["per_chip_bytes"]
    from glmjax.scaling.flops import param_count

    n_params = param_count(_small_cfg(32).model)[0]
    # float32 params + AdamW mu, nu, sharded 4 ways (a few small vectors replicate) + the int32 batch
    state = 3 * 4 * n_params / 4
    batch_bytes = 7 * 4 * 32 * 1024 / 4
    assert b["parameters"] == pytest.approx(4 * n_params / 4, rel=0.02)
    assert state + batch_bytes <= b["arguments"] <= 1.02 * (state + batch_bytes) + 4096
    assert b["total"] == b["arguments"] + b["output"] - b["alias"] + b["temp"] and b["temp"] > 0
    assert ok["collectives"]["all-gather"]["count"] > 0  # fsdp gathers the weights

    out = tmp_path / "r.json"
    rc = _tool().main(["--config=" + _write_cfg(tmp_path, 32 * 256), "--topology=v5p-8", "--search=batch",
                       "--no_eval", "--max_compiles=3", "--fill=0.03", f"--json={out}"])  # a small suggestion: quick to compile
    err = capsys.readouterr().err
    r = json.loads(out.read_text())
    assert rc == 3 and "DOES NOT FIT" in err and r["fits"] is False
    assert r["per_chip_bytes"]["total"] > r["hbm_bytes"] or r["error"]
    for key in ("topology", "chips", "fits", "hbm_bytes", "per_chip_bytes", "compile_seconds", "suggestion"):
        assert key in r
    s = r["suggestion"]
    assert s and s["fits"] and s["overrides"]["batch_size"] < 32 * 256
    again = compile_report(_small_cfg(s["overrides"]["batch_size"]), topo, eval_step=False, devices=devs)
    assert again["fits"] and again["per_chip_bytes"]["total"] <= again["hbm_bytes"]


def _write_cfg(tmp_path, batch):
    p = tmp_path / f"small_{batch}.py"
    p.write_text(
        "from glmjax.config import base_config\n"
        "def get_config():\n"
        "    c = base_config()\n"
        f"    c.batch_size, c.seq_len = {batch}, 1024\n"
        "    m = c.model\n"
        "    m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 1, 256, 4, 2, 64, 512\n"
        "    m.vocab_size, m.dtype = 32768, 'bfloat16'\n"
        "    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1\n"
        "    return c\n")
    assert load_config(str(p)).batch_size == batch
    return str(p)


def test_training_preflight_refuses_a_config_that_does_not_fit(tmp_path, capsys, monkeypatch):
    from glmjax.train import cli

    monkeypatch.delenv("TPU_ACCELERATOR_TYPE", raising=False)
    with pytest.raises(SystemExit, match="preflight error: --preflight needs the TPU slice"):
        cli.main(["--config=configs/tiny.py", f"--workdir={tmp_path}/w", "--preflight"])
    with pytest.raises(SystemExit) as e:
        cli.main(["--config=" + _write_cfg(tmp_path, 32 * 256), f"--workdir={tmp_path}/w", "--preflight",
                  "--preflight_topology=v5p-8"])
    assert e.value.code == 3 and "does not fit" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "w")  # refused before the run started


def test_pallas_attention_train_step_compiles_for_v5p():
    """The model's attention_impl=pallas train step: Mosaic kernels inside the sharded step."""
    from pallas_kernels import compile_for

    from glmjax.aot.compile import abstract_batch, mesh_for
    from glmjax.train.state import model_spec
    from glmjax.train.step import make_train_step

    topo, devs = tpu_devices("v5p:2x2x1")
    cfg = _small_cfg(8, seq=256, vocab=2048)
    cfg.model.attention_impl = "pallas"
    cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2
    mesh = mesh_for(cfg, topo, devs)
    spec = model_spec(cfg, mesh)
    with compile_for("tpu"):
        lowered = make_train_step(cfg, spec, mesh).lower(spec.abstract_state, abstract_batch(cfg, mesh))
    text = lowered.compile().as_text()
    assert text.count("tpu_custom_call") >= 3  # forward, dq, dk/dv kernels


def test_report_names_the_eval_step_when_only_it_does_not_fit():
    """A train step that fits with an eval step that does not: the verdict says which and what to change
    (numbers from a glm45_air compile on v5p-128: train 72.24 GB, eval 103.81 GB of 102.80 GB)."""
    from glmjax.aot.check import format_report

    coll = {c: {"count": 0, "bytes": 0} for c in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                                                  "collective-permute")}
    b = {"arguments": 20.05e9, "temp": 52.2e9, "total": 72.24e9, "parameters": 6.68e9, "optimizer_state": 13.36e9,
         "gradients_estimate": 6.68e9, "output": 20.05e9, "alias": 20.05e9}
    r = {"topology": "v5p:4x4x4", "chips": 64, "num_slices": 1, "mesh": {}, "batch_size": 512, "seq_len": 4096,
         "per_chip_batch": 8.0, "fits": False, "hbm_bytes": 102.8e9, "per_chip_bytes": b,
         "margin_bytes": 102.8e9 - 72.24e9, "compile_seconds": 445.3, "train_compile_seconds": 303.7,
         "collectives": coll, "flops_per_step": 1.9e17, "flops_per_chip_per_step": 3e15, "error": None,
         "eval": {"fits": False, "total": 103.81e9, "temp": 97.1e9, "compile_seconds": 141.7, "error": None}}
    text = format_report(r)
    assert "the train step fits (margin 30.56 GB) but the eval step does not: it needs 103.81 GB of 102.80 GB" in text
    assert "grad_accum_steps" in text and "n/a" not in text
