"""proxykern: fast proxy tuning (Liu et al. 2024) -- a fused sampling op and generation."""
from .ops import SampleOutput, proxy_sample

__all__ = ["SampleOutput", "proxy_sample"]
__version__ = "0.1.0"
