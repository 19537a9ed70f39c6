"""Ahead-of-time compilation for TPU slices from a CPU host: will this config fit, and what would.

See docs/tpu_aot.md. ``parse_topology`` -> ``abstract_devices`` -> ``compile_report``; ``suggest``
searches for a config that fits.
"""
from glmjax.aot.compile import collectives_of, compile_report
from glmjax.aot.search import largest_batch, suggest
from glmjax.aot.topology import GENERATIONS, Topology, TopologyError, abstract_devices, parse_topology, require_libtpu

__all__ = ["GENERATIONS", "Topology", "TopologyError", "abstract_devices", "collectives_of", "compile_report",
           "largest_batch", "parse_topology", "require_libtpu", "suggest"]
