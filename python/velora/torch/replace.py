"""replace_linear: swaps a model's nn.Linear modules for VeloraLinear, in PEFT's spirit."""
import re

from torch import nn

from .linear import VeloraLinear


def _matches(name, target_modules):
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None   # PEFT: a string is a regular expression
    return any(name == t or name.endswith("." + t) for t in target_modules)   # PEFT: a list of name suffixes


def replace_linear(model, target_modules, **options):
    """Replaces every nn.Linear of ``model`` whose qualified name matches ``target_modules`` (a list
    of names matched as suffixes, e.g. ``["q_proj", "v_proj"]``, or a regular expression matched
    against the whole name, as PEFT's LoraConfig) by a VeloraLinear sharing its weight and bias
    (VeloraLinear.from_linear; ``options`` go to it: groups, v, z_storage, scale, ...).

    Returns the list of replaced names. Raises ValueError when nothing matches (as PEFT does).
    """
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and _matches(full, target_modules):
                setattr(module, child_name, VeloraLinear.from_linear(child, **options))
                replaced.append(full)
    if not replaced:
        raise ValueError(f"velora.torch.replace_linear: no nn.Linear of the model matches target_modules = {target_modules!r}")
    return replaced
