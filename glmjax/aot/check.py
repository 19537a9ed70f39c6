"""The fit check as one call, shared by ``tools/aot_compile.py`` and ``python -m glmjax.train --preflight``:
compile, print a per-chip report, search for a fitting config when it does not fit."""
from __future__ import annotations

import sys

from glmjax.aot.compile import COLLECTIVES, compile_report
from glmjax.aot.search import largest_batch, suggest
from glmjax.aot.topology import abstract_devices, parse_topology
from glmjax.config import validate

EXIT_FITS, EXIT_DOES_NOT_FIT = 0, 3


def _gb(n) -> str:
    if n is None or n < 0:
        return "n/a"
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def format_report(r: dict) -> str:
    b = r["per_chip_bytes"]
    lines = [f"topology {r['topology']}: {r['chips']} chips ({r['num_slices']} slice(s)), mesh {r['mesh']}, "
             f"batch {r['batch_size']} x {r['seq_len']} ({r['per_chip_batch']:g} sequences per chip)",
             "per chip:",
             f"  parameters        {_gb(b['parameters'])}",
             f"  optimizer state   {_gb(b['optimizer_state'])}",
             f"  gradients (est.)  {_gb(b['gradients_estimate'])}  (inside temporaries)",
             f"  arguments         {_gb(b['arguments'])}  (parameters + optimizer state + batch)",
             f"  temporaries       {_gb(b['temp'])}  (activations, gradients, workspace)",
             f"  total             {_gb(b['total'])}  of {_gb(r['hbm_bytes'])} HBM"]
    if r["fits"]:
        lines.append(f"FITS with a margin of {_gb(r['margin_bytes'])} "
                     f"({100 * r['margin_bytes'] / r['hbm_bytes']:.1f}% of HBM free)")
    elif r.get("error"):
        lines.append(f"DOES NOT FIT: the TPU compiler refused the program: {r['error'][:300]}")
    elif r["margin_bytes"] >= 0 and r.get("eval") and not r["eval"]["fits"]:
        ev = r["eval"]
        why = f"the TPU compiler refused it: {ev['error'][:300]}" if ev.get("error") else \
            f"it needs {_gb(ev['total'])} of {_gb(r['hbm_bytes'])} HBM"
        lines.append(f"DOES NOT FIT: the train step fits (margin {_gb(r['margin_bytes'])}) but the eval step does "
                     f"not: {why}. It evaluates a batch of batch_size in optimizer.grad_accum_steps micro-batches, "
                     f"as training does: raise grad_accum_steps, or check with --no_eval and set eval_every=0")
    else:
        lines.append(f"DOES NOT FIT: {_gb(-r['margin_bytes'])} over HBM")
    lines.append(f"compile time {r['compile_seconds']:.1f} s (train step {r['train_compile_seconds']:.1f} s)")
    coll = ", ".join(f"{c} {r['collectives'][c]['count']} ({_gb(r['collectives'][c]['bytes'])})"
                     for c in COLLECTIVES if r["collectives"][c]["count"])
    lines.append(f"collectives in the compiled train step: {coll or 'none'} "
                 f"(ops in the scanned layer body appear once but run once per layer)")
    lines.append(f"model FLOPs per step {r['flops_per_step']:.3e} ({r['flops_per_chip_per_step']:.3e} per chip; "
                 f"glmjax.scaling.flops; XLA's own count sees a scanned layer body once)")
    return "\n".join(lines)


def run_check(cfg, topology: str, *, num_slices: int = 1, search: str = "auto", max_compiles: int = 6,
              find_max_batch: bool = False, eval_step: bool = True, fill: float = 0.9, out=None) -> dict:
    """Compile ``cfg`` for ``topology``, print the report to ``out``; the report dict gains
    ``suggestion`` (a fitting config, or None) and ``largest_batch`` (with ``find_max_batch``)."""
    out = sys.stderr if out is None else out
    topo = parse_topology(topology, num_slices)
    validate(cfg, topo.chips)  # config / mesh errors before any compile
    devices = abstract_devices(topo)
    print(f"compiling the train{' and eval' if eval_step else ''} step for {topo} "
          f"({topo.chips} chips) ...", file=out, flush=True)
    report = compile_report(cfg, topo, eval_step=eval_step, devices=devices)
    print(format_report(report), file=out, flush=True)
    report["suggestion"] = None

    def progress(overrides, r):
        verdict = "fits" if r["fits"] else "does not fit"
        print(f"  tried {overrides}: {_gb(r['per_chip_bytes']['total'])} per chip, {verdict}", file=out,
              flush=True)

    if not report["fits"] and search != "none":
        print(f"searching for a config that fits (at most {max_compiles} compiles) ...", file=out, flush=True)
        report["suggestion"] = suggest(cfg, topo, devices, mode=search, max_compiles=max_compiles,
                                       progress=progress, failed=report, fill=fill)
        s = report["suggestion"]
        print(f"suggestion: {s['command_line']} ({_gb(s['per_chip_bytes']['total'])} per chip)" if s else
              "no fitting config found within the search; try a larger slice or more tensor parallelism",
              file=out, flush=True)
    if find_max_batch and report["fits"]:
        report["largest_batch"] = largest_batch(cfg, topo, devices, progress=progress)
        print(f"largest batch_size that fits (doubling): {report['largest_batch']}", file=out, flush=True)
    return report
