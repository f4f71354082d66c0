"""velora.build_info(): what the installed extension was compiled with (docs/python.md)."""


def build_info():
    """A dict describing the compiled extension velora._C:

    - ``adamw8_body``: the 8-bit AdamW kernel's body (``state="8bit"``): "avx512", "avx2" or
      "scalar"; ``adamw_body``: the float AdamW kernel's, "avx512" or "scalar". Within one build
      every body gives the same bits; the scalar ones are several times slower. A build without
      FMA ("fma" not in ``isa``) rounds multiply-adds twice, so its bits differ from a native
      build's by rounding.
    - ``native``: whether the build asked for the building CPU (CMake option VELORA_PYTHON_NATIVE,
      ON by default); ``arch_flags``: the flags that gave ("-march=native", or "" when off or
      refused by the compiler); ``isa``: the instruction sets the compiler was allowed, of those
      the kernels test ("avx512f", "avx512vbmi" (with BW: the 8-bit body's byte permutes), "avx2",
      "fma").
    - ``blas``: the BLAS the CPU GEMM calls ("none": Eigen's product); ``openmp``; ``compiler``.
    """
    import torch  # noqa: F401  (the extension links libtorch, which torch's import loads)
    from . import _C
    return dict(_C.build_info())
