// examples/vit_moe/augment.hpp: training-time augmentation of one image, torchvision's
// RandomCrop(size, padding=p) then RandomHorizontalFlip(): the image is padded by p pixels of
// `fill` on every side, a window of the original size is cut at a random offset, and the window
// is mirrored left-right with probability 1/2.
//
// The draws are a pure function of (seed, epoch, index), index being the image's place in its
// dataset: an image is augmented the same way whatever batch, order or thread it lands in, and
// differently in every epoch.
#pragma once

#include <cstdint>
#include <span>

#include "moe/config.hpp"
#include "moe/random.hpp"

namespace vit {

using moe::Index;

struct ImageShape {
  Index channels = 1, height = 0, width = 0;
  Index pixels() const { return channels * height * width; }
};

struct Augmentation {
  Index padding = 2;  // p: crop offsets range over [0, 2p] in each direction; 0: no crop
  bool flip = true;   // mirror left-right with probability 1/2
  std::uint64_t seed = 0;
};

// One image's draw: the crop window's top-left corner in the padded image and the flip.
struct AugmentDraw {
  Index dy = 0, dx = 0;  // in [0, 2p]; (p, p) is the unshifted image
  bool flip = false;
};

inline AugmentDraw draw_augmentation(const Augmentation& augmentation, std::uint64_t epoch, std::uint64_t index) {
  moe::check(augmentation.padding >= 0, "vit: augmentation padding must be >= 0, got ", augmentation.padding);
  // One stream per epoch, three counters per image.
  const std::uint64_t stream = moe::random::mix64(0x617567ULL ^ moe::random::mix64(epoch));
  auto draw = [&](std::uint64_t k) { return moe::random::bits(augmentation.seed, stream, 3 * index + k); };
  const std::uint64_t offsets = std::uint64_t(2 * augmentation.padding + 1);
  return {Index(draw(0) % offsets), Index(draw(1) % offsets), augmentation.flip && (draw(2) >> 63) != 0};
}

// image: [C, H, W] -> out: [C, H, W] (must not alias image)
//   out[c][y][x] = image[c][y + dy - p][x' + dx - p], x' = W-1-x if flipped else x,
//   fill where that pixel lies in the padding.
template <class T>
void augment_image(std::span<const T> image, ImageShape shape, Index padding, const AugmentDraw& draw, T fill,
                   std::span<T> out) {
  const Index C = shape.channels, H = shape.height, W = shape.width;
  moe::check(C >= 1 && H >= 1 && W >= 1, "vit: image shape [", C, ", ", H, ", ", W, "] must be positive");
  moe::check(Index(image.size()) == shape.pixels() && Index(out.size()) == shape.pixels(), "vit: augment_image: image has ",
             image.size(), " and out ", out.size(), " values, the shape [", C, ", ", H, ", ", W, "] has ", shape.pixels());
  moe::check(padding >= 0 && draw.dy >= 0 && draw.dy <= 2 * padding && draw.dx >= 0 && draw.dx <= 2 * padding,
             "vit: augment_image: crop offset (", draw.dy, ", ", draw.dx, ") is outside [0, 2p] for padding p = ",
             padding);
  for (Index c = 0; c < C; ++c)
    for (Index y = 0; y < H; ++y) {
      const Index source_y = y + draw.dy - padding;
      T* row = out.data() + (c * H + y) * W;
      for (Index x = 0; x < W; ++x) {
        const Index source_x = (draw.flip ? W - 1 - x : x) + draw.dx - padding;
        const bool inside = source_y >= 0 && source_y < H && source_x >= 0 && source_x < W;
        row[x] = inside ? image[std::size_t((c * H + source_y) * W + source_x)] : fill;
      }
    }
}

}  // namespace vit
