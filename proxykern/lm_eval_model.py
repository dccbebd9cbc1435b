"""Compatibility alias: ``import proxykern.lm_eval_model`` registers the lm-eval model
"proxykern", as it did before the model moved to
:mod:`proxykern.integrations.lm_eval_model` (where it lives now)."""
from .integrations.lm_eval_model import ProxyKernLM, cli_main  # noqa: F401  (registers the model)
