"""proxykern: fast proxy tuning (Liu et al. 2024) -- a fused sampling op, generation and scoring.

``import proxykern`` loads torch and the op; transformers is imported only when a
generation entry point or the logits processor is used.
"""
from .baseline import naive_proxy_generate
from .generate import fused_proxy_generate
from .ops import SampleOutput, proxy_sample
from .outputs import ProxyGenerateOutput
from . import programs
from .programs import LogitProgram, program_sample
from .program_generate import program_generate
from .scoring import ProxyLogprobs, program_logprobs, proxy_logprobs

__all__ = ["SampleOutput", "proxy_sample", "ProxyGenerateOutput", "fused_proxy_generate",
           "naive_proxy_generate", "ProxyTuningLogitsProcessor", "ProxyLogprobs",
           "proxy_logprobs", "programs", "LogitProgram", "program_sample", "program_generate",
           "program_logprobs"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "ProxyTuningLogitsProcessor":  # subclasses transformers' LogitsProcessor
        from .integrations.processor import ProxyTuningLogitsProcessor
        return ProxyTuningLogitsProcessor
    raise AttributeError(f"module 'proxykern' has no attribute {name!r}")
