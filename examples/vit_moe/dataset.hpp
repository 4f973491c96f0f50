// examples/vit_moe/dataset.hpp: a labelled image dataset in memory (Fashion-MNIST from Debian's
// dataset-fashion-mnist package, or any pair of IDX files), its normalisation, a seeded shuffle
// and the assembly of a training or evaluation batch in the model's input layout.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "augment.hpp"
#include "idx.hpp"
#include "moe/config.hpp"
#include "moe/random.hpp"

namespace vit {

using moe::Index;

struct Dataset {
  ImageShape shape;                   // [C, H, W] of every image
  std::vector<std::uint8_t> pixels;   // [count, C, H, W]
  std::vector<std::int32_t> labels;   // [count], in [0, classes)
  Index classes = 0;

  Index count() const { return Index(labels.size()); }
  std::span<const std::uint8_t> image(Index i) const {
    return std::span<const std::uint8_t>(pixels).subspan(std::size_t(i * shape.pixels()), std::size_t(shape.pixels()));
  }
};

// An IDX images file and its labels file (plain or .gz) -> one dataset of one-channel images.
// The counts must agree and every label must be in [0, classes); errors name the file.
inline Dataset read_idx_dataset(const std::string& images_path, const std::string& labels_path, Index classes) {
  moe::check(classes >= 1 && classes <= 256, "vit: classes must be in [1, 256] for byte labels, got ", classes);
  idx::Images images = idx::read_images(images_path);
  const std::vector<std::uint8_t> labels = idx::read_labels(labels_path);
  moe::check(Index(labels.size()) == images.count, "vit: ", labels_path, " has ", labels.size(), " labels, but ",
             images_path, " has ", images.count, " images");
  Dataset dataset{{1, images.rows, images.cols}, std::move(images.pixels), {}, classes};
  dataset.labels.reserve(labels.size());
  for (std::size_t i = 0; i < labels.size(); ++i) {
    moe::check(labels[i] < classes, "vit: ", labels_path, ": label ", int(labels[i]), " of image ", i,
               " is outside [0, ", classes, ")");
    dataset.labels.push_back(labels[i]);
  }
  return dataset;
}

// Where Debian's dataset-fashion-mnist package installs the four .gz files.
inline constexpr std::string_view kFashionMnistDir = "/usr/share/datasets/fashion-mnist";

// split "train" (60,000 images) or "test" (10,000): 28x28 grey images of 10 classes.
inline Dataset fashion_mnist(std::string_view split, std::string_view dir = kFashionMnistDir) {
  moe::check(split == "train" || split == "test", "vit: Fashion-MNIST split must be 'train' or 'test', got '", split,
             "'");
  const std::string prefix = std::string(dir) + "/" + (split == "train" ? "train" : "t10k");
  moe::check(std::filesystem::exists(prefix + "-images-idx3-ubyte.gz"), "vit: Fashion-MNIST is not in ", dir, " (",
             prefix, "-images-idx3-ubyte.gz does not exist; Debian: apt-get install dataset-fashion-mnist)");
  return read_idx_dataset(prefix + "-images-idx3-ubyte.gz", prefix + "-labels-idx1-ubyte.gz", 10);
}

// Per-channel mean and standard deviation of the pixels scaled to [0, 1]; the model sees
// (pixel / 255 - mean) / std. Fashion-MNIST's training set: mean 0.2860, std 0.3530.
struct Normalisation {
  std::vector<double> mean, std;
};

// Over every pixel of the dataset, summed in double in a fixed order.
inline Normalisation measure_normalisation(const Dataset& dataset) {
  const Index C = dataset.shape.channels, plane = dataset.shape.height * dataset.shape.width;
  moe::check(dataset.count() > 0 && plane > 0, "vit: cannot measure the normalisation of an empty dataset");
  Normalisation result{std::vector<double>(std::size_t(C)), std::vector<double>(std::size_t(C))};
  for (Index c = 0; c < C; ++c) {
    double sum = 0, squares = 0;
    for (Index i = 0; i < dataset.count(); ++i) {
      const std::uint8_t* p = dataset.image(i).data() + c * plane;
      std::uint64_t s = 0, q = 0;  // exact per image
      for (Index j = 0; j < plane; ++j) s += p[j], q += std::uint64_t(p[j]) * p[j];
      sum += double(s), squares += double(q);
    }
    const double n = double(dataset.count()) * double(plane), mean = sum / n / 255.0;
    result.mean[std::size_t(c)] = mean;
    result.std[std::size_t(c)] = std::sqrt(std::max(squares / n / (255.0 * 255.0) - mean * mean, 1e-12));
  }
  return result;
}

// A permutation of [0, count), a pure function of (seed, epoch): Fisher-Yates on counter-based draws.
inline std::vector<Index> shuffled_order(Index count, std::uint64_t seed, std::uint64_t epoch) {
  std::vector<Index> order(std::size_t(std::max<Index>(count, 0)));
  for (Index i = 0; i < count; ++i) order[std::size_t(i)] = i;
  const std::uint64_t stream = moe::random::mix64(0x73687566ULL ^ moe::random::mix64(epoch));
  for (Index i = count - 1; i > 0; --i) {
    const Index j = Index(moe::random::bits(seed, stream, std::uint64_t(i)) % std::uint64_t(i + 1));
    std::swap(order[std::size_t(i)], order[std::size_t(j)]);
  }
  return order;
}

// The images dataset[indices[b]] -> images: [B, C*H*W] normalised floats (the model's input) and
// labels: [B]. With an augmentation, image i is cropped and flipped by its draw for (epoch, i),
// padding with black (pixel 0), before normalising.
inline void make_batch(const Dataset& dataset, std::span<const Index> indices, const Normalisation& normalisation,
                       const Augmentation* augmentation, std::uint64_t epoch, std::vector<float>& images,
                       std::vector<std::int32_t>& labels) {
  const Index C = dataset.shape.channels, plane = dataset.shape.height * dataset.shape.width;
  const Index pixels = dataset.shape.pixels();
  moe::check(Index(normalisation.mean.size()) == C && Index(normalisation.std.size()) == C,
             "vit: the normalisation has ", normalisation.mean.size(), " means and ", normalisation.std.size(),
             " stds, the images have ", C, " channels");
  for (Index c = 0; c < C; ++c)
    moe::check(normalisation.std[std::size_t(c)] > 0 && std::isfinite(normalisation.mean[std::size_t(c)]),
               "vit: the normalisation of channel ", c, " needs a finite mean and a positive std");
  images.resize(indices.size() * std::size_t(pixels));
  labels.resize(indices.size());
  std::vector<std::uint8_t> augmented(static_cast<std::size_t>(pixels));
  for (std::size_t b = 0; b < indices.size(); ++b) {
    const Index i = indices[b];
    moe::check(i >= 0 && i < dataset.count(), "vit: batch entry ", b, " is image ", i, ", outside the dataset's ",
               dataset.count());
    std::span<const std::uint8_t> source = dataset.image(i);
    if (augmentation) {
      augment_image<std::uint8_t>(source, dataset.shape, augmentation->padding,
                                  draw_augmentation(*augmentation, epoch, std::uint64_t(i)), 0, augmented);
      source = augmented;
    }
    float* out = images.data() + b * std::size_t(pixels);
    for (Index c = 0; c < C; ++c) {
      const double mean = normalisation.mean[std::size_t(c)], scale = 1.0 / normalisation.std[std::size_t(c)];
      for (Index j = c * plane; j < (c + 1) * plane; ++j) out[j] = float((source[std::size_t(j)] / 255.0 - mean) * scale);
    }
    labels[b] = dataset.labels[std::size_t(i)];
  }
}

}  // namespace vit
