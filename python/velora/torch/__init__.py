"""velora for PyTorch (CPU tensors): VeloraLinear, VeloraLoRALinear, replace_linear and
AdaRankGradAdamW, and share_v (one VeLoRA v for every data-parallel rank). See docs/python.md."""
from .linear import VeloraLinear
from .lora import VeloraLoRALinear
from .replace import replace_linear
from .optim import AdaRankGradAdamW, StepReport
from .shared_v import share_v

__all__ = ["VeloraLinear", "VeloraLoRALinear", "replace_linear", "AdaRankGradAdamW", "StepReport", "share_v"]
