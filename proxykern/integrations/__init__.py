"""Integrations of proxy tuning into other serving stacks (vLLM: ``vllm_plugin``)."""
