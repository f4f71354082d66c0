"""velora for PyTorch (CPU tensors): VeloraLinear, VeloraLoRALinear, replace_linear and
AdaRankGradAdamW. See docs/python.md."""
from .linear import VeloraLinear
from .lora import VeloraLoRALinear
from .replace import replace_linear
from .optim import AdaRankGradAdamW, StepReport

__all__ = ["VeloraLinear", "VeloraLoRALinear", "replace_linear", "AdaRankGradAdamW", "StepReport"]
