"""proxykern: fast proxy tuning (Liu et al. 2024) -- a fused sampling op and generation."""
from .generate import ProxyGenerateOutput, fused_proxy_generate
from .ops import SampleOutput, proxy_sample
from .processor import ProxyTuningLogitsProcessor
from .reference import naive_proxy_generate

__all__ = ["SampleOutput", "proxy_sample", "ProxyGenerateOutput", "fused_proxy_generate",
           "naive_proxy_generate", "ProxyTuningLogitsProcessor"]
__version__ = "0.1.0"
