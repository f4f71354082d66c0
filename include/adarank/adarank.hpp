#pragma once
/// \file
/// Umbrella header of AdaRankGrad (low-rank Adam moments with adaptive rank, refresh and
/// moment transport). Link `velora::adarank`.
#include "backend.hpp"
#include "gradient.hpp"
#include "optimizer.hpp"
#include "policies.hpp"
#include "rsvd.hpp"
#include "transport.hpp"
