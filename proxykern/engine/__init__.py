"""The decode engine: per-model runners with static KV caches, the capture-ready proxy step,
and speculative rounds (:mod:`proxykern.engine.speculative`, imported when used)."""
from ..models import graph_unsupported_reason, static_cache_unsupported_reason
from .static_runner import StaticRunner
from .step import ProxyStep, raise_bad_generation_rows

__all__ = ["ProxyStep", "StaticRunner", "graph_unsupported_reason",
           "raise_bad_generation_rows", "static_cache_unsupported_reason"]
