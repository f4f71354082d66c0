"""velora.build_info(): the extension holds the SIMD bodies of the CPU it was built on."""
import pytest

import velora


def _cpu_flags():
    """The host CPU's feature flags from /proc/cpuinfo (Linux), or None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_build_info_describes_the_compiled_bodies():
    info = velora.build_info()
    assert info["adamw8_body"] in ("avx512", "avx2", "scalar") and info["adamw_body"] in ("avx512", "scalar")
    # a body is compiled exactly when the compiler was allowed its instructions
    assert (info["adamw8_body"] == "avx512") == ("avx512f" in info["isa"])
    assert (info["adamw_body"] == "avx512") == ("avx512f" in info["isa"])
    if info["adamw8_body"] == "avx2":
        assert {"avx2", "fma"} <= set(info["isa"])
    assert info["native"] or info["arch_flags"] == ""   # flags are added only when VELORA_PYTHON_NATIVE is ON
    assert isinstance(info["blas"], str) and isinstance(info["openmp"], bool) and info["compiler"]


def test_default_build_has_the_avx512_bodies_on_an_avx512_cpu():
    info = velora.build_info()
    if not info["native"]:
        pytest.skip("a portable build (VELORA_PYTHON_NATIVE=OFF): compiled for any CPU")
    flags = _cpu_flags()
    if flags is None or "avx512f" not in flags:
        pytest.skip("the host CPU has no AVX-512F (or no /proc/cpuinfo)")
    assert info["arch_flags"] == "-march=native"
    assert "avx512f" in info["isa"]
    assert info["adamw8_body"] == "avx512" and info["adamw_body"] == "avx512"
