#pragma once
/// \file
/// `VELORA_HOST_DEVICE`: marks a function that CUDA kernels call as well as host code.
///
/// Under nvcc it expands to `__host__ __device__`, so the one definition is compiled for both
/// sides (the counter-based RNG, the backend rules in velora/backend/rules/); for every other
/// compiler it is empty and no CUDA header is needed.
#if !defined(VELORA_HOST_DEVICE)
#if defined(__CUDACC__)
#define VELORA_HOST_DEVICE __host__ __device__
#else
#define VELORA_HOST_DEVICE
#endif
#endif
