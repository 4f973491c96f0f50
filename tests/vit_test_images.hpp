// tests/vit_test_images.hpp: the ViT tests' small image set (test_vit_train.cpp, test_vit_device.cpp).
#pragma once

#include <cstdint>

#include "../examples/vit_moe/dataset.hpp"
#include "moe/random.hpp"

namespace vit_test {

// 8 x 8 one-channel images of 4 classes. Class c is a brightness level, 30 + 50 c plus noise in
// [0, 40) per pixel: learnable in a few dozen steps (a task that needs the positions, such as
// "which quadrant is lit", takes hundreds).
inline vit::Dataset brightness_images(moe::Index count, std::uint64_t seed) {
  vit::Dataset data{{1, 8, 8}, {}, {}, 4};
  for (moe::Index i = 0; i < count; ++i) {
    const std::int32_t label = std::int32_t(moe::random::bits(seed, 1, std::uint64_t(i)) % 4);
    for (moe::Index j = 0; j < 64; ++j)
      data.pixels.push_back(std::uint8_t(30 + 50 * label + moe::random::bits(seed, 2, std::uint64_t(i * 64 + j)) % 40));
    data.labels.push_back(label);
  }
  return data;
}

}  // namespace vit_test
