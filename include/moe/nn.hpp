// moe/nn.hpp: the transformer building blocks (CPU forward/backward pairs) that the GPT-2 and
// ViT examples assemble around MoELayer. Input gradients are added (+=) into the caller's
// buffers, llm.c style, so residual streams sum without copies.
#pragma once

#include "moe/nn/adamw.hpp"
#include "moe/nn/attention.hpp"
#include "moe/nn/cross_entropy.hpp"
#include "moe/nn/embedding.hpp"
#include "moe/nn/layernorm.hpp"
#include "moe/nn/linear.hpp"
