#pragma once
/// \file
/// The libtorch adapter (target velora::torch, docs/torch.md): view_of and matrix_input
/// (tensors as matrix views), VeloraLinear (a linear layer that keeps a VeLoRA record of its
/// input), VeloraLoRALinear and replace_lora (LoRA adapters on frozen Linears), AdaRankGradAdamW (the low-rank optimizer as a torch::optim::Optimizer).
#include "backend.hpp"
#include "communicator.hpp"
#include "factored.hpp"
#include "linear.hpp"
#include "lora.hpp"
#include "optimizer.hpp"
#include "view.hpp"
