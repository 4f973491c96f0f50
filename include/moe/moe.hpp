// moe/moe.hpp: the CPU world in one include. (The GPU world is moe/cuda.cuh.)
#pragma once

#include "moe/activations.hpp"
#include "moe/aux_loss.hpp"
#include "moe/backend.hpp"
#include "moe/config.hpp"
#include "moe/cpu/backend.hpp"
#include "moe/experts.hpp"
#include "moe/gate.hpp"
#include "moe/layer.hpp"
#include "moe/optimizer.hpp"
#include "moe/random.hpp"
#include "moe/routing.hpp"
#include "moe/stats.hpp"
#include "moe/tensor.hpp"
#include "moe/version.hpp"
