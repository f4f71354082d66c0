#pragma once
/// \file
/// Umbrella header: the shared core, the Eigen CPU backend, VeLoRA, and fine-tuning (LoRA layers
/// over frozen float, bf16/f16 and NF4 base weights: finetune/, quant/).
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
#include "finetune/frozen_weight.hpp"
#include "finetune/lora.hpp"
#include "quant/half_weight.hpp"
#include "quant/kernels.hpp"
#include "quant/nf4.hpp"
#include "quant/nf4_frozen_weight.hpp"
#include "quant/nf4_layout.hpp"
#include "quant/tiled_products.hpp"
