"""The decode engine: per-model runners with static KV caches and the capture-ready proxy step."""
from .static_runner import StaticRunner, static_cache_unsupported_reason
from .step import ProxyStep, graph_unsupported_reason

__all__ = ["ProxyStep", "StaticRunner", "graph_unsupported_reason",
           "static_cache_unsupported_reason"]
