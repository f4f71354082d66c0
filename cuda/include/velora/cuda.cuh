#pragma once
/// \file
/// The CUDA backend in one include (needs nvcc; see velora/cuda/backend.cuh).
#include "cuda/backend.cuh"
#include "cuda/buffer.hpp"
#include "cuda/context.hpp"
#include "cuda/error.hpp"
