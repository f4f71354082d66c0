#pragma once
/// \file
/// Umbrella header: the shared core, the Eigen CPU backend and VeLoRA.
#include "concepts.hpp"
#include "core/buffer.hpp"
#include "core/checked.hpp"
#include "core/error.hpp"
#include "core/rng.hpp"
#include "core/serialize.hpp"
#include "core/storage.hpp"
#include "core/view.hpp"
#include "backend/eigen.hpp"
#include "compressor.hpp"
#include "layers.hpp"
