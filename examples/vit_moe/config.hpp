// examples/vit_moe/config.hpp: the shape of a ViT (DeiT) MoE model, and the two named configs.
#pragma once

#include <cstdint>

#include "moe/config.hpp"

namespace vit {

using moe::Index;

struct Config {
  Index image_size = 28;  // square images of image_size x image_size pixels
  Index channels = 1;     // C
  Index patch = 7;        // P: each patch is P x P pixels of every channel
  Index classes = 10;
  Index layers = 6;     // L: transformer blocks
  Index heads = 4;      // NH
  Index hidden = 128;   // H (ViT's embed_dim)
  Index ffn = 256;      // F: hidden width of the dense MLP and of each expert
  Index experts = 4;    // N (MoE variants)
  Index top_k = 2;      // k (MoE variants)
  Index moe_every = 2;  // MoE replaces the MLP of blocks moe_every-1, 2*moe_every-1, ... ("Every 2")
  std::uint64_t seed = 1337;

  // Fashion-MNIST in minutes on 2 cores: patch 7 gives 16 patches + the class token, a quarter of
  // the cost of patch 4 (50 tokens); ffn 256 costs 0.6x of 512. About 85% test accuracy after
  // 2000 AdamW steps of 64 images (lr 2e-3, no augmentation) for dense, self and random alike.
  static Config small() { return {}; }
  // DeiT-S/16 on ImageNet-sized inputs (22M parameters in the dense variant).
  static Config deit_s16() {
    return {.image_size = 224, .channels = 3, .patch = 16, .classes = 1000, .layers = 12, .heads = 6,
            .hidden = 384, .ffn = 1536};
  }

  Index patches_per_side() const { return image_size / patch; }
  Index patches() const { return patches_per_side() * patches_per_side(); }
  Index tokens() const { return 1 + patches(); }                      // T: class token + patches
  Index patch_size() const { return channels * patch * patch; }       // the patch embedding's input width
  Index pixels() const { return channels * image_size * image_size; }  // one image, [C, H, W] row-major
  // Blocks 1, 3, 5, ... with moe_every = 2; every block with 1.
  bool is_moe_block(Index block) const { return block % moe_every == moe_every - 1; }

  // The MoE layer of an MoE block.
  moe::LayerConfig layer() const { return {.hidden = hidden, .ffn = ffn, .experts = experts, .top_k = top_k}; }

  void validate() const {
    moe::check(image_size >= 1 && channels >= 1 && patch >= 1 && classes >= 1 && layers >= 1 && heads >= 1 &&
                   hidden >= 1 && ffn >= 1 && moe_every >= 1,
               "vit: image_size, channels, patch, classes, layers, heads, hidden, ffn and moe_every must be "
               "positive, got image_size = ",
               image_size, ", channels = ", channels, ", patch = ", patch, ", classes = ", classes,
               ", layers = ", layers, ", heads = ", heads, ", hidden = ", hidden, ", ffn = ", ffn,
               ", moe_every = ", moe_every);
    moe::check(image_size % patch == 0, "vit: image_size = ", image_size, " is not divisible by patch = ", patch);
    moe::check(hidden % heads == 0, "vit: hidden = ", hidden, " is not divisible by heads = ", heads);
  }
};

}  // namespace vit
