"""Shared by the TPU ahead-of-time compile tests: libtpu must be present (fail loudly, never skip)."""
from __future__ import annotations

import importlib.util

import pytest

from glmjax.aot.topology import abstract_devices, parse_topology


def tpu_devices(name: str):
    """Abstract TPU devices of ``name``; a missing libtpu is a test failure naming the fix."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail("libtpu is not installed, so the TPU compile tests cannot run: `pip install -e '.[test]'` "
                    "installs it (the TPU compiler runs on CPU; no TPU needed)", pytrace=False)
    return parse_topology(name), abstract_devices(parse_topology(name))
