"""The config saved with the checkpoints, and the check that a resumed run has the same model."""
from __future__ import annotations

import json
import logging

from etils import epath

from glmjax.config import ConfigError

log = logging.getLogger("glmjax.checkpoint")

CHECKPOINT_DIR = "checkpoints"
MODEL_SECTIONS = ("model",)  # config sections that define the shapes of the saved state
# model keys that change how the step computes, not what the state holds: a resume may change them
# (scan_layers is structural: scanned layers are saved stacked along a "layers" axis)
NON_STRUCTURAL = ("model.remat", "model.attention_impl")


class ConfigMismatchError(ConfigError):
    """The run's model config differs from the one saved in the workdir's checkpoints (a ``ConfigError``)."""


def config_to_dict(cfg) -> dict:
    """The config as plain JSON data (``ConfigDict``, or a dict)."""
    if hasattr(cfg, "to_json_best_effort"):
        return json.loads(cfg.to_json_best_effort())
    return json.loads(json.dumps(cfg, default=str))


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def step_dirs(directory: epath.Path) -> list[tuple[int, epath.Path]]:
    """Committed step directories (plain integer names; orbax tmp directories never match), newest first."""
    if not directory.exists():
        return []
    steps = [(int(p.name), p) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()]
    return sorted(steps, reverse=True)


def saved_config(workdir) -> dict | None:
    """The config stored with the newest checkpoint of ``workdir`` that has a readable one, or None."""
    for _, path in step_dirs(epath.Path(workdir) / CHECKPOINT_DIR):
        try:
            return json.loads((path / "config" / "config.json").read_text())
        except (OSError, ValueError):
            continue
    return None


def check_compatible(workdir, cfg, *, note: bool = True) -> None:
    """Raise :class:`ConfigMismatchError` if ``workdir`` holds checkpoints of a different model config.

    Changes of :data:`NON_STRUCTURAL` model keys and of the mesh are allowed (orbax restores into any
    mesh); with ``note`` they are logged in one line.
    """
    old = saved_config(workdir)
    if old is None:
        return
    new = config_to_dict(cfg)
    diffs, allowed = [], []
    from glmjax.config import base_config

    defaults = _flatten(config_to_dict(base_config()))
    for section in MODEL_SECTIONS:
        a, b = _flatten(old.get(section, {}), section + "."), _flatten(new.get(section, {}), section + ".")
        # a key newer than the checkpoint (e.g. model.moe.*) counts as its default there
        a = {**{k: defaults[k] for k in b if k not in a and k in defaults}, **a}
        for key in sorted(set(a) | set(b)):
            if a.get(key, "<missing>") != b.get(key, "<missing>"):
                line = f"{key}: checkpoint has {a.get(key, '<missing>')!r}, this run has {b.get(key, '<missing>')!r}"
                (allowed if key in NON_STRUCTURAL else diffs).append(line)
    a, b = _flatten(old.get("mesh", {}), "mesh."), _flatten(new.get("mesh", {}), "mesh.")
    allowed += [f"{k}: checkpoint has {a.get(k, '<missing>')!r}, this run has {b.get(k, '<missing>')!r}"
                for k in sorted(set(a) | set(b)) if a.get(k, "<missing>") != b.get(k, "<missing>")]
    if note and allowed and not diffs:
        log.info("resuming with changed settings that do not change the saved state: %s", "; ".join(allowed))
    if diffs:
        raise ConfigMismatchError(
            f"the workdir {workdir} holds checkpoints of a different model, so this run cannot resume "
            f"from them:\n  " + "\n  ".join(diffs) + "\nTo resume, run with the checkpoint's model config "
            f"(see {workdir}/{CHECKPOINT_DIR}/<step>/config/config.json); to start over, pass "
            f"--restart=false (moves the old checkpoints aside) or use a new --workdir.")
