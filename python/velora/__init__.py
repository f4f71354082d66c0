"""velora: VeLoRA activation compression and AdaRankGrad low-rank AdamW (docs/python.md).

The PyTorch integration is ``velora.torch``; ``velora.NumericalError`` is the exception for
numerical events (NaN/Inf or overflow) where a call is asked to raise instead of reporting;
``velora.build_info()`` says which CPU kernel bodies the installed extension was compiled with.
"""
from ._build import build_info
from .errors import NumericalError

__version__ = "0.1.0"
__all__ = ["NumericalError", "build_info", "__version__"]
