"""share_v: one VeLoRA v for every data-parallel rank, set on a whole model's VeloraLinear layers."""
from .linear import VeloraLinear


def share_v(module, process_group=None):
    """Makes every VeloraLinear in ``module`` (itself included, and VeloraLoRALinear's ``lora_A``)
    share v over ``process_group`` as ``VeloraLinear(..., share_v=True, process_group=...)``
    does: the first recorded forward of a layer still without v reduces its first-batch
    sub-token sum over the group (None: the default group, taken at that forward), so every rank
    holds the same v. A layer that has v already (a loaded checkpoint, an earlier batch) keeps it.
    Call it on every rank, before the first training forward, as nn.SyncBatchNorm is set up.

    Returns the qualified names of the layers. Raises ValueError when ``module`` has no
    VeloraLinear, when a layer's v mode cannot be shared ('batch_mean', 'ema'), or for a group
    this process cannot use; no layer is changed then.
    """
    fn = "velora.torch.share_v"
    layers = [(name, m) for name, m in module.named_modules() if isinstance(m, VeloraLinear)]
    if not layers:
        raise ValueError(f"{fn}: argument 'module' ({type(module).__name__}) holds no VeloraLinear "
                         "(replace its nn.Linear layers first: velora.torch.replace_linear)")
    # Every layer checked before any is changed.
    for name, layer in layers:
        layer._check_shareable(process_group, f"{fn} (layer '{name}')")
    for name, layer in layers:
        layer._share_v_over(process_group, f"{fn} (layer '{name}')")
    return [name for name, _ in layers]
