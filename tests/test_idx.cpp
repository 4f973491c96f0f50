// The ViT example's data (examples/vit_moe/idx.hpp, dataset.hpp, augment.hpp): IDX files plain
// and gzip-compressed, round trips, every truncation and mutation of small files ending in a clean
// read or one moe::Error naming the file, datasets and their normalisation, the seeded shuffle,
// and augmentation that is a pure function of (seed, epoch, index).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <unistd.h>

#include "../examples/vit_moe/dataset.hpp"

using moe::Index;
namespace fs = std::filesystem;

namespace {

// A fresh folder under the system temp dir, removed at the end of the test.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& tag)
      : path(fs::temp_directory_path() / ("moe_test_idx_" + tag + "_" + std::to_string(std::uint64_t(::getpid())))) {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

vit::idx::Images some_images(Index count, Index rows, Index cols, std::uint64_t seed) {
  vit::idx::Images images{count, rows, cols, {}};
  for (Index i = 0; i < count * rows * cols; ++i)
    images.pixels.push_back(std::uint8_t(moe::random::bits(seed, 0, std::uint64_t(i))));
  return images;
}

std::vector<std::uint8_t> some_labels(Index count, Index classes, std::uint64_t seed) {
  std::vector<std::uint8_t> labels;
  for (Index i = 0; i < count; ++i)
    labels.push_back(std::uint8_t(moe::random::bits(seed, 1, std::uint64_t(i)) % std::uint64_t(classes)));
  return labels;
}

std::string message_of(auto&& call) {
  try {
    call();
  } catch (const moe::Error& e) {
    return e.what();
  }
  return "(no error)";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// Any read of these bytes, as images and as labels, plain and gzip-compressed, ends in a clean
// result or a moe::Error naming the file (anything else escapes and fails the test; ASan checks
// the reads).
void expect_clean_outcome(const TempDir& dir, const std::vector<std::uint8_t>& bytes, bool gzip) {
  const std::string path = dir.file(gzip ? "fuzz.gz" : "fuzz");
  vit::idx::write_bytes(path, bytes, gzip);
  for (int as_labels = 0; as_labels < 2; ++as_labels) {
    try {
      if (as_labels) {
        const std::vector<std::uint8_t> labels = vit::idx::read_labels(path);
        CHECK(labels.size() + 8 == bytes.size());
      } else {
        const vit::idx::Images images = vit::idx::read_images(path);
        CHECK(Index(images.pixels.size()) == images.count * images.rows * images.cols);
        CHECK(images.pixels.size() + 16 == bytes.size());
      }
    } catch (const moe::Error& e) {
      CHECK(contains(e.what(), path));
    }
  }
}

}  // namespace

TEST_CASE("idx: images and labels round trip through plain and gzip files") {
  TempDir dir("roundtrip");
  const vit::idx::Images images = some_images(7, 5, 3, 1);
  const std::vector<std::uint8_t> labels = some_labels(7, 10, 2);
  for (bool gzip : {false, true}) {
    CAPTURE(gzip);
    const std::string suffix = gzip ? ".gz" : "";
    vit::idx::write_bytes(dir.file("images" + suffix), vit::idx::encode_images(images), gzip);
    vit::idx::write_bytes(dir.file("labels" + suffix), vit::idx::encode_labels(labels), gzip);
    const vit::idx::Images read = vit::idx::read_images(dir.file("images" + suffix));
    CHECK(read.count == 7);
    CHECK(read.rows == 5);
    CHECK(read.cols == 3);
    CHECK(read.pixels == images.pixels);
    CHECK(vit::idx::read_labels(dir.file("labels" + suffix)) == labels);
  }
  // The gzip file really is compressed (it starts with gzip's magic), the plain one is not.
  const std::vector<std::uint8_t> raw_gz = [&] {
    std::ifstream in(dir.file("images.gz"), std::ios::binary);
    return std::vector<std::uint8_t>(std::istreambuf_iterator<char>(in), {});
  }();
  REQUIRE(raw_gz.size() > 2);
  CHECK((raw_gz[0] == 0x1f && raw_gz[1] == 0x8b));

  // Zero images is a valid (empty) file.
  const vit::idx::Images none = vit::idx::parse_images(vit::idx::encode_images({0, 28, 28, {}}), "none");
  CHECK(none.count == 0);
  CHECK(none.rows == 28);
}

TEST_CASE("idx: the header is big-endian and checked against the bytes") {
  const std::vector<std::uint8_t> bytes = vit::idx::encode_images(some_images(2, 3, 4, 3));
  REQUIRE(bytes.size() == 16 + 24);
  const std::vector<std::uint8_t> header(bytes.begin(), bytes.begin() + 16);
  CHECK(header == std::vector<std::uint8_t>{0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4});

  auto images_error = [](std::vector<std::uint8_t> b) { return message_of([&] { vit::idx::parse_images(b, "x.idx"); }); };
  CHECK(contains(images_error(vit::idx::encode_labels(some_labels(3, 10, 1))), "x.idx is not an IDX images file"));
  CHECK(contains(images_error(vit::idx::encode_labels(some_labels(3, 10, 1))), "magic number 0x00000801"));
  CHECK(contains(images_error({0, 0, 8}), "x.idx has 3 bytes, too short"));
  CHECK(contains(images_error({0, 0, 8, 3, 0, 0, 0, 2}), "x.idx is truncated in its header"));
  std::vector<std::uint8_t> truncated(bytes.begin(), bytes.end() - 1);
  CHECK(contains(images_error(truncated), "x.idx is truncated: its header declares 2 images of 12 bytes"));
  std::vector<std::uint8_t> longer = bytes;
  longer.push_back(0);
  CHECK(contains(images_error(longer), "x.idx has 1 bytes past the end of its 2 images"));
  std::vector<std::uint8_t> zero_rows = bytes;
  zero_rows[11] = 0;
  CHECK(contains(images_error(zero_rows), "empty item"));
  std::vector<std::uint8_t> huge = bytes;  // 4 billion images of 2^32 - 1 rows: no allocation from the header
  for (int i = 4; i < 12; ++i) huge[std::size_t(i)] = 0xff;
  CHECK(contains(images_error(huge), "more than 2^31"));
  const std::vector<std::uint8_t> none_but_huge{0, 0, 8, 3, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
  CHECK(contains(images_error(none_but_huge), "x.idx declares images of 18446744065119617025 bytes each"));

  const std::string labels_error =
      message_of([&] { vit::idx::parse_labels(bytes, "labels.idx"); });
  CHECK(contains(labels_error, "labels.idx is not an IDX labels file"));
}

TEST_CASE("idx: every truncation of a small file, plain and gzip, is a clean error naming the file") {
  TempDir dir("truncate");
  const std::vector<std::uint8_t> images = vit::idx::encode_images(some_images(3, 4, 2, 4));
  for (std::size_t length = 0; length < images.size(); ++length) {
    CAPTURE(length);
    const std::vector<std::uint8_t> cut(images.begin(), images.begin() + std::ptrdiff_t(length));
    vit::idx::write_bytes(dir.file("cut"), cut, false);
    CHECK(contains(message_of([&] { vit::idx::read_images(dir.file("cut")); }), dir.file("cut")));
  }
  // A gzip file cut anywhere: zlib notices (header, data, CRC-32 or length), or the inflated
  // prefix is short.
  vit::idx::write_bytes(dir.file("whole.gz"), images, true);
  std::ifstream in(dir.file("whole.gz"), std::ios::binary);
  const std::vector<std::uint8_t> gz((std::istreambuf_iterator<char>(in)), {});
  for (std::size_t length = 1; length < gz.size(); ++length) {
    CAPTURE(length);
    std::ofstream out(dir.file("cut.gz"), std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(gz.data()), std::streamsize(length));
    out.close();
    const std::string message = message_of([&] { vit::idx::read_images(dir.file("cut.gz")); });
    CHECK(contains(message, dir.file("cut.gz")));
  }
  const std::string missing = message_of([&] { vit::idx::read_images(dir.file("missing.gz")); });
  CHECK(contains(missing, "missing.gz does not exist"));
  CHECK(contains(message_of([&] { vit::idx::read_labels(dir.path.string()); }), "is not a regular file"));
}

TEST_CASE("idx: fuzz: mutated plain and gzip files read cleanly or throw a moe::Error naming the file") {
  TempDir dir("fuzz");
  const std::vector<std::uint8_t> images = vit::idx::encode_images(some_images(3, 4, 4, 5));
  const std::vector<std::uint8_t> labels = vit::idx::encode_labels(some_labels(5, 10, 6));
  // Every header byte set to a few telling values (0, 1, 0x80, 0xff), as images and as labels.
  for (const std::vector<std::uint8_t>* file : {&images, &labels})
    for (std::size_t at = 0; at < 16 && at < file->size(); ++at)
      for (std::uint8_t value : {0x00, 0x01, 0x80, 0xff}) {
        CAPTURE(at);
        std::vector<std::uint8_t> mutated = *file;
        mutated[at] = value;
        expect_clean_outcome(dir, mutated, false);
      }
  // Random byte flips, insertions and deletions, then gzip-compressed or not.
  for (std::uint64_t trial = 0; trial < 200; ++trial) {
    CAPTURE(trial);
    std::vector<std::uint8_t> mutated = trial % 2 ? images : labels;
    const std::uint64_t r = moe::random::bits(99, 7, trial);
    const std::size_t at = std::size_t(r % mutated.size());
    switch ((r >> 32) % 3) {
      case 0: mutated[at] ^= std::uint8_t(1 + (r >> 40) % 255); break;
      case 1: mutated.insert(mutated.begin() + std::ptrdiff_t(at), std::uint8_t(r >> 48)); break;
      default: mutated.erase(mutated.begin() + std::ptrdiff_t(at)); break;
    }
    expect_clean_outcome(dir, mutated, trial % 4 < 2);
  }
  // Mutations of the compressed bytes themselves: zlib's checks (or the IDX checks) catch them.
  vit::idx::write_bytes(dir.file("good.gz"), images, true);
  std::ifstream in(dir.file("good.gz"), std::ios::binary);
  const std::vector<std::uint8_t> gz((std::istreambuf_iterator<char>(in)), {});
  for (std::uint64_t trial = 0; trial < 200; ++trial) {
    CAPTURE(trial);
    std::vector<std::uint8_t> mutated = gz;
    const std::uint64_t r = moe::random::bits(98, 8, trial);
    mutated[std::size_t(r % mutated.size())] ^= std::uint8_t(1 + (r >> 40) % 255);
    vit::idx::write_bytes(dir.file("mutated.gz"), mutated, false);
    try {
      const vit::idx::Images read = vit::idx::read_images(dir.file("mutated.gz"));
      CHECK(Index(read.pixels.size()) == read.count * read.rows * read.cols);
    } catch (const moe::Error& e) {
      CHECK(contains(e.what(), "mutated.gz"));
    }
  }
}

TEST_CASE("idx dataset: labels and images must agree; labels must be classes") {
  TempDir dir("dataset");
  vit::idx::write_bytes(dir.file("images.gz"), vit::idx::encode_images(some_images(6, 4, 4, 7)), true);
  vit::idx::write_bytes(dir.file("labels.gz"), vit::idx::encode_labels(some_labels(6, 3, 8)), true);
  vit::idx::write_bytes(dir.file("five-labels"), vit::idx::encode_labels(some_labels(5, 3, 8)), false);
  std::vector<std::uint8_t> bad_label = some_labels(6, 3, 8);
  bad_label[4] = 3;
  vit::idx::write_bytes(dir.file("bad-labels"), vit::idx::encode_labels(bad_label), false);

  const vit::Dataset dataset = vit::read_idx_dataset(dir.file("images.gz"), dir.file("labels.gz"), 3);
  CHECK(dataset.count() == 6);
  CHECK(dataset.shape.channels == 1);
  CHECK(dataset.shape.height == 4);
  CHECK(dataset.image(5).size() == 16);
  CHECK(dataset.image(5)[15] == some_images(6, 4, 4, 7).pixels.back());

  const std::string mismatch =
      message_of([&] { vit::read_idx_dataset(dir.file("images.gz"), dir.file("five-labels"), 3); });
  CHECK(contains(mismatch, "five-labels has 5 labels, but " + dir.file("images.gz") + " has 6 images"));
  const std::string out_of_range =
      message_of([&] { vit::read_idx_dataset(dir.file("images.gz"), dir.file("bad-labels"), 3); });
  CHECK(contains(out_of_range, "bad-labels: label 3 of image 4 is outside [0, 3)"));
  CHECK(contains(message_of([] { vit::fashion_mnist("validation"); }), "'validation'"));
  CHECK(contains(message_of([] { vit::fashion_mnist("test", "/nonexistent"); }), "dataset-fashion-mnist"));
}

TEST_CASE("idx dataset: Fashion-MNIST from Debian's dataset-fashion-mnist package") {
  const std::string path = std::string(vit::kFashionMnistDir) + "/t10k-images-idx3-ubyte.gz";
  if (!fs::exists(path)) {
    MESSAGE("skipped: " << path << " not installed (apt-get install dataset-fashion-mnist)");
    return;
  }
  const vit::Dataset test = vit::fashion_mnist("test");
  CHECK(test.count() == 10000);
  CHECK(test.shape.channels == 1);
  CHECK(test.shape.height == 28);
  CHECK(test.shape.width == 28);
  std::vector<int> per_class(10);
  for (std::int32_t label : test.labels) ++per_class[std::size_t(label)];
  CHECK(per_class == std::vector<int>(10, 1000));  // balanced
  const vit::Normalisation normalisation = vit::measure_normalisation(test);
  CHECK(normalisation.mean[0] == doctest::Approx(0.2868).epsilon(0.01));
  CHECK(normalisation.std[0] == doctest::Approx(0.3524).epsilon(0.01));
}

TEST_CASE("idx dataset: normalisation, the seeded shuffle and batches") {
  vit::Dataset dataset{{2, 2, 3}, {}, {}, 4};
  for (Index i = 0; i < 5 * 12; ++i) dataset.pixels.push_back(std::uint8_t(i * 4));
  dataset.labels = {0, 1, 2, 3, 0};
  const vit::Normalisation normalisation = vit::measure_normalisation(dataset);
  // Channel c of image i holds 4 * (12 i + 6 c + j), j < 6: a float64 reference.
  for (Index c = 0; c < 2; ++c) {
    double sum = 0, squares = 0;
    for (Index i = 0; i < 5; ++i)
      for (Index j = 0; j < 6; ++j) {
        const double v = 4.0 * double(12 * i + 6 * c + j) / 255.0;
        sum += v, squares += v * v;
      }
    const double mean = sum / 30, std = std::sqrt(squares / 30 - mean * mean);
    CHECK(normalisation.mean[std::size_t(c)] == doctest::Approx(mean).epsilon(1e-12));
    CHECK(normalisation.std[std::size_t(c)] == doctest::Approx(std).epsilon(1e-9));
  }

  const std::vector<Index> order = vit::shuffled_order(1000, 3, 0);
  std::vector<Index> sorted = order;
  std::sort(sorted.begin(), sorted.end());
  for (Index i = 0; i < 1000; ++i) CHECK(sorted[std::size_t(i)] == i);
  CHECK(order == vit::shuffled_order(1000, 3, 0));
  CHECK(order != vit::shuffled_order(1000, 3, 1));
  CHECK(order != vit::shuffled_order(1000, 4, 0));

  const std::vector<Index> indices{4, 1};
  std::vector<float> images;
  std::vector<std::int32_t> labels;
  vit::make_batch(dataset, indices, normalisation, nullptr, 0, images, labels);
  REQUIRE(images.size() == 24);
  CHECK(labels == std::vector<std::int32_t>{0, 1});
  for (Index b = 0; b < 2; ++b)
    for (Index j = 0; j < 12; ++j) {
      const std::size_t c = std::size_t(j / 6);
      const double pixel = dataset.image(indices[std::size_t(b)])[std::size_t(j)] / 255.0;
      CHECK(images[std::size_t(b * 12 + j)] ==
            doctest::Approx((pixel - normalisation.mean[c]) / normalisation.std[c]).epsilon(1e-6));
    }
  const std::vector<Index> outside{5};
  CHECK(contains(message_of([&] { vit::make_batch(dataset, outside, normalisation, nullptr, 0, images, labels); }),
                 "image 5, outside the dataset's 5"));
  const vit::Normalisation one_channel{{0.5}, {0.2}};
  CHECK(contains(message_of([&] { vit::make_batch(dataset, indices, one_channel, nullptr, 0, images, labels); }),
                 "2 channels"));
}

TEST_CASE("augment: crop and flip move pixels as torchvision's RandomCrop + RandomHorizontalFlip") {
  // A 2-channel 3x4 image with distinct values 1..24; fill 0.
  const vit::ImageShape shape{2, 3, 4};
  std::vector<int> image(24);
  for (int i = 0; i < 24; ++i) image[std::size_t(i)] = i + 1;
  std::vector<int> out(24);
  auto at = [&](const std::vector<int>& v, Index c, Index y, Index x) { return v[std::size_t((c * 3 + y) * 4 + x)]; };

  vit::augment_image<int>(image, shape, 2, {2, 2, false}, 0, out);  // the centred window: unchanged
  CHECK(out == image);
  vit::augment_image<int>(image, shape, 2, {0, 4, false}, 0, out);  // window up 2, right 2
  for (Index c = 0; c < 2; ++c)
    for (Index y = 0; y < 3; ++y)
      for (Index x = 0; x < 4; ++x) {
        const Index sy = y - 2, sx = x + 2;
        CHECK(at(out, c, y, x) == (sy >= 0 && sx < 4 ? at(image, c, sy, sx) : 0));
      }
  vit::augment_image<int>(image, shape, 0, {0, 0, true}, 0, out);  // mirror only
  for (Index c = 0; c < 2; ++c)
    for (Index y = 0; y < 3; ++y)
      for (Index x = 0; x < 4; ++x) CHECK(at(out, c, y, x) == at(image, c, y, 3 - x));
  vit::augment_image<int>(image, shape, 1, {1, 0, true}, -1, out);  // crop then mirror the window
  for (Index y = 0; y < 3; ++y)
    for (Index x = 0; x < 4; ++x) {
      const Index sx = (3 - x) - 1;
      CHECK(at(out, 1, y, x) == (sx >= 0 ? at(image, 1, y, sx) : -1));
    }

  CHECK_THROWS_AS(vit::augment_image<int>(image, shape, 1, {3, 0, false}, 0, out), moe::Error);
  std::vector<int> short_out(23);
  CHECK_THROWS_AS(vit::augment_image<int>(image, shape, 1, {1, 1, false}, 0, short_out), moe::Error);
  CHECK_THROWS_AS(vit::draw_augmentation({.padding = -1}, 0, 0), moe::Error);
}

TEST_CASE("augment: draws are a pure function of (seed, epoch, index) and cover every offset") {
  const vit::Augmentation augmentation{.padding = 3, .flip = true, .seed = 11};
  std::vector<int> dy_seen(7), dx_seen(7);
  int flips = 0, changed_by_epoch = 0, changed_by_seed = 0;
  for (std::uint64_t index = 0; index < 2000; ++index) {
    const vit::AugmentDraw draw = vit::draw_augmentation(augmentation, 5, index);
    const vit::AugmentDraw again = vit::draw_augmentation(augmentation, 5, index);
    CHECK((draw.dy == again.dy && draw.dx == again.dx && draw.flip == again.flip));
    REQUIRE((draw.dy >= 0 && draw.dy <= 6 && draw.dx >= 0 && draw.dx <= 6));
    ++dy_seen[std::size_t(draw.dy)], ++dx_seen[std::size_t(draw.dx)];
    flips += draw.flip;
    const vit::AugmentDraw next_epoch = vit::draw_augmentation(augmentation, 6, index);
    changed_by_epoch += next_epoch.dy != draw.dy || next_epoch.dx != draw.dx || next_epoch.flip != draw.flip;
    const vit::AugmentDraw other_seed = vit::draw_augmentation({.padding = 3, .flip = true, .seed = 12}, 5, index);
    changed_by_seed += other_seed.dy != draw.dy || other_seed.dx != draw.dx || other_seed.flip != draw.flip;
  }
  // Uniform over 7 offsets: about 286 each (binomial std ~16); half flipped (std ~22).
  for (int n : dy_seen) CHECK((n > 200 && n < 370));
  for (int n : dx_seen) CHECK((n > 200 && n < 370));
  CHECK((flips > 900 && flips < 1100));
  CHECK(changed_by_epoch > 1800);  // 1 - 1/98 of draws differ
  CHECK(changed_by_seed > 1800);

  const vit::AugmentDraw none = vit::draw_augmentation({.padding = 0, .flip = false, .seed = 1}, 3, 9);
  CHECK((none.dy == 0 && none.dx == 0 && !none.flip));

  // A batch is augmented per image, whatever its position: the same image in two batches
  // gets the same pixels.
  vit::Dataset dataset{{1, 5, 5}, {}, {0, 1, 0}, 2};
  for (int i = 0; i < 75; ++i) dataset.pixels.push_back(std::uint8_t(3 * i + 1));
  const vit::Normalisation normalisation{{0.0}, {1.0}};
  std::vector<float> first, second;
  std::vector<std::int32_t> labels;
  const std::vector<Index> forward_order{0, 2}, backward_order{2, 1};
  vit::make_batch(dataset, forward_order, normalisation, &augmentation, 4, first, labels);
  vit::make_batch(dataset, backward_order, normalisation, &augmentation, 4, second, labels);
  CHECK(std::equal(first.begin() + 25, first.end(), second.begin()));
}
