"""VeloraLoRALinear: PEFT's LoRA on a frozen nn.Linear, the adapter's input kept as a VeLoRA record.

    y = base(x) + s · B·A·dropout(x),   s = lora_alpha / r

lora_A is a VeloraLinear (r × D, no bias), so the forward keeps Z = x_a·(I_G ⊗ v)ᵀ instead of
x_a and dA = dHᵀZ·(I_G ⊗ vᵀ) with dH = s·dY·B (VeLoRA's estimate; exact at G = D); lora_B is an
nn.Linear (O × r, zero at start, as PEFT). The base is frozen (requires_grad False) and shared
with the wrapped module.
"""
import math

from torch import nn

from .linear import VeloraLinear


class VeloraLoRALinear(nn.Module):
    def __init__(self, base, r=8, lora_alpha=8, lora_dropout=0.0, groups=32, **velora_options):
        super().__init__()
        fn = "velora.torch.VeloraLoRALinear"
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{fn}: argument 'base' is a {type(base).__name__}, not an nn.Linear")
        if not (isinstance(r, int) and r >= 1):
            raise ValueError(f"{fn}: argument 'r' is {r!r}; it must be an integer >= 1")
        if not (0.0 <= lora_dropout < 1.0):
            raise ValueError(f"{fn}: argument 'lora_dropout' is {lora_dropout}; it must be in [0, 1)")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A = VeloraLinear(base.in_features, r, bias=False, groups=groups, **velora_options)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        # PEFT's initialisation: A Kaiming-uniform, B zero (the adapted layer starts as the base).
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
