"""Argument checks shared by the modules: ValueError naming the function, the argument and the
values, as the library's own errors do."""
import torch


def require_cpu(tensor, function, name):
    if tensor is not None and tensor.device.type != "cpu":
        raise ValueError(
            f"{function}: argument '{name}' is on {tensor.device}; velora.torch takes CPU tensors "
            "(the CUDA backend is not wired to torch yet)")


def require_input_dtype(x, function):
    # float64 is refused as nn.Linear refuses a dtype other than its weight's: computing it in
    # float32 would silently lose its precision. Half inputs are cast for the products.
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"{function}: argument 'x' has dtype {x.dtype}; the layer's parameters are float32 and it "
            "takes float32, float16 or bfloat16 inputs (convert a float64 input with x.float())")
