// moe/io/safetensors.hpp: round trips for every dtype, the half-precision conversions, every
// validation error of the reader, and mutated files that must read or throw moe::Error.
#include <doctest/doctest.h>
#include <sys/stat.h>  // mkfifo

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <moe/io/safetensors.hpp>
#include <random>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using moe::io::DType;
using moe::io::SafetensorsFile;

namespace {

// A fresh directory under the system's temporary directory, removed at the end of the test.
struct TemporaryDirectory {
  fs::path path;
  TemporaryDirectory() {
    std::random_device entropy;
    path = fs::temp_directory_path() / ("moe-test-safetensors-" + std::to_string(entropy()) + std::to_string(entropy()));
    fs::create_directories(path);
  }
  ~TemporaryDirectory() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

std::vector<std::byte> file_bytes(const fs::path& path) { return moe::io::detail::read_whole_file(path); }

// A safetensors file from a header text and a data section, exactly as given (no padding).
std::vector<std::byte> make_file(const std::string& header, std::size_t data_bytes, std::uint64_t length_field) {
  std::vector<std::byte> bytes(8 + header.size() + data_bytes, std::byte{0x5A});
  std::memcpy(bytes.data(), &length_field, 8);
  std::memcpy(bytes.data() + 8, header.data(), header.size());
  return bytes;
}
std::vector<std::byte> make_file(const std::string& header, std::size_t data_bytes) {
  return make_file(header, data_bytes, header.size());
}

// The message of the moe::Error that opening `bytes` throws ("" if it opens).
std::string open_error(std::vector<std::byte> bytes) {
  try {
    SafetensorsFile::from_bytes(std::move(bytes), "t.safetensors");
  } catch (const moe::Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& text, std::string_view part) { return text.find(part) != std::string::npos; }

// A valid file of three tensors and metadata, written by save_safetensors.
std::vector<std::byte> small_valid_file(const fs::path& directory) {
  const std::vector<float> a{1.5f, -2.25f, 3.0f, 0.0f, 1e-3f, 7.0f};
  const std::vector<std::int32_t> b{1, -2, 3};
  const std::vector<std::uint16_t> c{moe::io::float_to_bf16(0.5f), moe::io::float_to_bf16(-8.0f)};
  const moe::io::TensorToWrite tensors[] = {moe::io::tensor_to_write("a", {2, 3}, a),
                                            moe::io::tensor_to_write("b", {3}, b),
                                            moe::io::tensor_to_write("c", DType::BF16, {2, 1}, c)};
  const fs::path path = directory / "small.safetensors";
  moe::io::save_safetensors(path, tensors, {{"format", "pt"}, {"step", "12"}});
  return file_bytes(path);
}

}  // namespace

TEST_CASE("safetensors: every dtype round-trips its bytes, shape and name") {
  TemporaryDirectory directory;
  std::mt19937 rng(1);
  std::vector<std::vector<std::byte>> storage;
  std::vector<moe::io::TensorToWrite> tensors;
  const std::vector<std::vector<std::int64_t>> shapes{{3, 5}, {7}, {}, {2, 0, 4}, {1, 2, 3, 2}};
  for (DType dtype : moe::io::all_dtypes) {
    for (std::size_t s = 0; s < shapes.size(); ++s) {
      std::int64_t count = 1;
      for (std::int64_t dim : shapes[s]) count *= dim;
      std::vector<std::byte> bytes(std::size_t(count) * moe::io::dtype_size(dtype));
      for (std::byte& b : bytes) b = std::byte(rng());
      if (dtype == DType::BOOL)
        for (std::byte& b : bytes) b = std::byte(int(b) & 1);
      storage.push_back(std::move(bytes));
      tensors.push_back({std::string(moe::io::dtype_name(dtype)) + "." + std::to_string(s), dtype, shapes[s], {}});
    }
  }
  for (std::size_t i = 0; i < tensors.size(); ++i) tensors[i].bytes = storage[i];
  const fs::path path = directory.path / "all.safetensors";
  moe::io::save_safetensors(path, tensors, {{"format", "pt"}, {"note", "caf\xC3\xA9 \"quoted\""}});

  CHECK_FALSE(fs::exists(directory.path / "all.safetensors.tmp"));
  const std::vector<std::byte> bytes = file_bytes(path);
  std::uint64_t header_length;
  std::memcpy(&header_length, bytes.data(), 8);
  CHECK(header_length % 8 == 0);

  const SafetensorsFile file(path);
  REQUIRE(file.names().size() == tensors.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    CAPTURE(tensors[i].name);
    CHECK(file.names()[i] == tensors[i].name);  // header order is the given order
    const moe::io::TensorInfo& info = file.info(tensors[i].name);
    CHECK(info.dtype == tensors[i].dtype);
    CHECK(info.shape == tensors[i].shape);
    const auto data = file.data(tensors[i].name);
    CHECK(std::equal(data.begin(), data.end(), storage[i].begin(), storage[i].end()));
    // Wider dtypes come first in the data section, so every tensor is aligned to its element size.
    CHECK(info.begin % std::int64_t(moe::io::dtype_size(info.dtype)) == 0);
  }
  CHECK(file.metadata().at("format") == "pt");
  CHECK(file.metadata().at("note") == "caf\xC3\xA9 \"quoted\"");
}

TEST_CASE("safetensors: floating-point tensors read into float and double") {
  TemporaryDirectory directory;
  std::mt19937 rng(2);
  std::normal_distribution<double> normal(0.0, 10.0);
  std::vector<double> values(24);
  for (double& v : values) v = normal(rng);
  std::vector<float> as_float(values.begin(), values.end());
  std::vector<std::uint16_t> as_f16, as_bf16;
  for (float v : as_float) {
    as_f16.push_back(moe::io::float_to_f16(v));
    as_bf16.push_back(moe::io::float_to_bf16(v));
  }
  const moe::io::TensorToWrite tensors[] = {
      moe::io::tensor_to_write("f64", {4, 6}, values), moe::io::tensor_to_write("f32", {4, 6}, as_float),
      moe::io::tensor_to_write("f16", DType::F16, {4, 6}, as_f16),
      moe::io::tensor_to_write("bf16", DType::BF16, {4, 6}, as_bf16)};
  moe::io::save_safetensors(directory.path / "f.safetensors", tensors);
  const SafetensorsFile file(directory.path / "f.safetensors");
  CHECK(file.metadata().empty());

  std::vector<float> out(24);
  std::vector<double> out64(24);
  file.read("f64", out64, {4, 6});
  CHECK(out64 == values);
  file.read("f64", out, {4, 6});
  CHECK(out == as_float);  // rounded like a static_cast
  file.read("f32", out, {4, 6});
  CHECK(out == as_float);
  file.read("f32", out64, {4, 6});
  for (std::size_t i = 0; i < 24; ++i) CHECK(out64[i] == double(as_float[i]));
  file.read("f16", out, {4, 6});
  for (std::size_t i = 0; i < 24; ++i) CHECK(out[i] == doctest::Approx(as_float[i]).epsilon(1.0 / 2048));  // 11-bit significand
  file.read("bf16", out, {4, 6});
  for (std::size_t i = 0; i < 24; ++i) CHECK(out[i] == doctest::Approx(as_float[i]).epsilon(1.0 / 256));  // 8-bit significand
}

TEST_CASE("safetensors: F16 conversion is exact both ways and rounds to the nearest even half") {
  // Every half converts to a float and back to the same bits (NaNs stay NaN).
  std::vector<float> positive_halves;  // all finite non-negative halves, ascending
  for (std::uint32_t bits = 0; bits < 0x10000; ++bits) {
    const float value = moe::io::f16_to_float(std::uint16_t(bits));
    if (std::isnan(value)) {
      CHECK(std::isnan(moe::io::f16_to_float(moe::io::float_to_f16(value))));
      continue;
    }
    REQUIRE(moe::io::float_to_f16(value) == bits);
    if (bits < 0x7C00) positive_halves.push_back(value);
  }
  CHECK(moe::io::f16_to_float(0x3C00) == 1.0f);
  CHECK(moe::io::f16_to_float(0x7BFF) == 65504.0f);
  CHECK(moe::io::f16_to_float(0x0001) == std::ldexp(1.0f, -24));
  CHECK(moe::io::f16_to_float(0xFC00) == -std::numeric_limits<float>::infinity());

  // Random floats against a brute-force nearest-even search in double.
  std::mt19937 rng(3);
  std::uniform_int_distribution<std::uint32_t> bits_of(0, 0x477FFFFF);  // up to just below 2^16
  for (int i = 0; i < 20000; ++i) {
    const float x = std::bit_cast<float>(bits_of(rng));
    const auto above = std::lower_bound(positive_halves.begin(), positive_halves.end(), x);
    float expected;
    if (above == positive_halves.end()) {
      expected = (double(x) - 65504.0 < 16.0) ? 65504.0f : std::numeric_limits<float>::infinity();  // 65520 is the tie
    } else if (*above == x || above == positive_halves.begin()) {
      expected = *above;
    } else {
      const float below = *(above - 1);
      const double down = double(x) - below, up = double(*above) - x;
      const bool below_is_even = (moe::io::float_to_f16(below) & 1) == 0;
      expected = down < up ? below : up < down ? *above : below_is_even ? below : *above;
    }
    CAPTURE(x);
    CHECK(moe::io::f16_to_float(moe::io::float_to_f16(x)) == expected);
    CHECK(moe::io::f16_to_float(moe::io::float_to_f16(-x)) == -expected);
  }
  CHECK(moe::io::float_to_f16(65519.0f) == 0x7BFF);
  CHECK(moe::io::float_to_f16(65520.0f) == 0x7C00);
  CHECK(moe::io::float_to_f16(1e30f) == 0x7C00);
  CHECK(moe::io::float_to_f16(std::ldexp(1.0f, -25)) == 0x0000);           // tie with 0: even
  CHECK(moe::io::float_to_f16(std::ldexp(1.5f, -25)) == 0x0001);
  CHECK(moe::io::float_to_f16(std::ldexp(1.0f, -14) * (1 - 1.0f / 4096)) == 0x0400);  // up to the smallest normal
}

TEST_CASE("safetensors: BF16 conversion rounds to the nearest even and keeps NaN") {
  std::mt19937 rng(4);
  for (int i = 0; i < 20000; ++i) {
    const float x = std::bit_cast<float>(std::uint32_t(rng()));
    const std::uint16_t bf = moe::io::float_to_bf16(x);
    if (std::isnan(x)) {
      CHECK(std::isnan(moe::io::bf16_to_float(bf)));
      continue;
    }
    const std::uint32_t bits = std::bit_cast<std::uint32_t>(x);
    const float down = std::bit_cast<float>(bits & 0xFFFF0000u);
    const float up = std::bit_cast<float>((bits & 0xFFFF0000u) + 0x10000u);  // may be infinity: right
    const double to_down = std::abs(double(x) - double(down));
    const double to_up = std::isinf(up) ? (std::abs(double(x)) >= 3.3961775292304601e38 ? 0 : 1e300)
                                        : std::abs(double(up) - double(x));
    const bool down_is_even = ((bits >> 16) & 1) == 0;
    const float expected = to_down < to_up ? down : to_up < to_down ? up : down_is_even ? down : up;
    CAPTURE(x);
    CHECK(moe::io::bf16_to_float(bf) == expected);
  }
  for (std::uint32_t bits = 0; bits < 0x10000; ++bits) {
    const float value = moe::io::bf16_to_float(std::uint16_t(bits));
    if (!std::isnan(value)) CHECK(moe::io::float_to_bf16(value) == bits);
  }
}

TEST_CASE("safetensors: 8-bit floats decode by the OCP FP8 tables") {
  CHECK(moe::io::f8_e4m3_to_float(0x38) == 1.0f);   // 0.0111.000
  CHECK(moe::io::f8_e4m3_to_float(0x7E) == 448.0f);  // largest
  CHECK(moe::io::f8_e4m3_to_float(0x01) == std::ldexp(1.0f, -9));
  CHECK(std::isnan(moe::io::f8_e4m3_to_float(0x7F)));
  CHECK(moe::io::f8_e4m3_to_float(0xB8) == -1.0f);
  CHECK(moe::io::f8_e5m2_to_float(0x3C) == 1.0f);
  CHECK(moe::io::f8_e5m2_to_float(0x7B) == 57344.0f);
  CHECK(std::isinf(moe::io::f8_e5m2_to_float(0x7C)));
  CHECK(moe::io::f8_e5m2_to_float(0x01) == std::ldexp(1.0f, -16));
}

TEST_CASE("safetensors: reads a file laid out as Hugging Face writes it") {
  // Keys sorted, "__metadata__" first, no padding, data offsets in key order.
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"h.0.attn.bias":{"dtype":"F32","shape":[1,1,2,2],"data_offsets":[0,16]},)"
      R"("wte.weight":{"dtype":"F16","shape":[2],"data_offsets":[16,20]}})";
  std::vector<std::byte> bytes = make_file(header, 20);
  const float mask[4] = {1, 0, 1, 1};
  const std::uint16_t wte[2] = {0x3C00, 0xC000};  // 1, -2
  std::memcpy(bytes.data() + 8 + header.size(), mask, 16);
  std::memcpy(bytes.data() + 8 + header.size() + 16, wte, 4);
  const SafetensorsFile file = SafetensorsFile::from_bytes(bytes, "hf.safetensors");
  CHECK(file.names() == std::vector<std::string>{"h.0.attn.bias", "wte.weight"});
  CHECK(file.metadata().at("format") == "pt");
  std::vector<float> out(2);
  file.read("wte.weight", out, {2});
  CHECK(out == std::vector<float>{1, -2});
  std::vector<float> mask_out(4);
  file.read("h.0.attn.bias", mask_out, {1, 1, 2, 2});
  CHECK(mask_out == std::vector<float>{1, 0, 1, 1});
}

TEST_CASE("safetensors: a file with no tensors and no data is valid") {
  CHECK(open_error(make_file("{}", 0)).empty());
  CHECK(open_error(make_file(R"({"__metadata__": {}})", 0)).empty());
  CHECK(open_error(make_file("{}      ", 0)).empty());  // padding
}

TEST_CASE("safetensors: the reader names the file and the size problem") {
  CHECK(contains(open_error({}), "t.safetensors: file is 0 bytes, too short for the 8-byte header length"));
  CHECK(contains(open_error(std::vector<std::byte>(5)), "file is 5 bytes"));
  CHECK(contains(open_error(make_file("{}", 0, 100)), "header length 100 runs past the end of the file (10 bytes)"));
  CHECK(contains(open_error(make_file("{}", 0, ~std::uint64_t{0})), "exceeds the limit"));
  CHECK(contains(open_error(make_file("{}", 0, std::uint64_t{1} << 32)), "exceeds the limit"));
  CHECK(contains(open_error(make_file("", 0)), "header of t.safetensors: invalid JSON"));
}

TEST_CASE("safetensors: a header that is not a JSON object is an error") {
  CHECK(contains(open_error(make_file("{\"a\": ", 0)), "header of t.safetensors: invalid JSON at byte"));
  CHECK(contains(open_error(make_file("[1, 2]", 0)), "t.safetensors: header is a JSON array, expected an object"));
  CHECK(contains(open_error(make_file("\"x\"", 0)), "header is a JSON string"));
  CHECK(contains(open_error(make_file("{}\xFF", 0)), "invalid JSON"));
  CHECK(contains(open_error(make_file(R"({"a": 1})", 0)), "tensor \"a\": entry is a number, expected an object"));
}

TEST_CASE("safetensors: every malformed tensor entry is named with its problem") {
  const auto entry_error = [](const std::string& entry, std::size_t data_bytes) {
    return open_error(make_file(R"({"w": )" + entry + "}", data_bytes));
  };
  CHECK(contains(entry_error(R"({"dtype": "F32", "shape": [2]})", 8), "tensor \"w\": entry needs"));
  CHECK(contains(entry_error(R"({"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1})", 8),
                 "tensor \"w\": unexpected field \"x\""));
  CHECK(contains(entry_error(R"({"dtype": "F33", "shape": [2], "data_offsets": [0, 8]})", 8),
                 "tensor \"w\": unknown dtype \"F33\""));
  CHECK(contains(entry_error(R"({"dtype": 32, "shape": [2], "data_offsets": [0, 8]})", 8), "dtype is not a string"));
  CHECK(contains(entry_error(R"({"dtype": "F32", "shape": 2, "data_offsets": [0, 8]})", 8), "shape is not an array"));
  CHECK(contains(entry_error(R"({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]})", 8),
                 "shape [-2] has an entry that is not a non-negative integer"));
  CHECK(contains(entry_error(R"({"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]})", 8),
                 "not a non-negative integer"));
  CHECK(contains(entry_error(R"({"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]})", 8),
                 "has too many elements"));
  CHECK(contains(entry_error(R"({"dtype": "F64", "shape": [1152921504606846976], "data_offsets": [0, 8]})", 8),
                 "has too many elements"));  // 2^60 elements * 8 bytes overflows
  CHECK(contains(entry_error(R"({"dtype": "F32", "shape": [2], "data_offsets": [0]})", 8),
                 "data_offsets [0] is not a pair of integers"));
  CHECK(contains(entry_error(R"({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]})", 8),
                 "is not a pair of integers"));
  CHECK(contains(entry_error(R"({"dtype": "F32", "shape": [2], "data_offsets": [0, "8"]})", 8),
                 "is not a pair of integers"));
  CHECK(contains(entry_error(R"({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]})", 8),
                 "data_offsets [8,0] are not 0 <= begin <= end"));
  CHECK(contains(entry_error(R"({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]})", 8),
                 "are not 0 <= begin <= end"));
  CHECK(contains(entry_error(R"({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})", 4),
                 "tensor \"w\": data_offsets [0,8] end past the data section (4 bytes)"));
  CHECK(contains(entry_error(R"({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]})", 8),
                 "data_offsets [0,8] span 8 bytes, but shape [3] of F32 needs 12"));
}

TEST_CASE("safetensors: overlapping tensors and holes in the data section are errors") {
  const std::string overlap =
      R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
      R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})";
  CHECK(contains(open_error(make_file(overlap, 12)),
                 "tensor \"b\" at bytes [4, 12) overlaps tensor \"a\" at [0, 8)"));
  const std::string same =
      R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
      R"( "b": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}})";
  CHECK(contains(open_error(make_file(same, 8)), "overlaps"));
  const std::string inside =  // an empty tensor inside another one
      R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
      R"( "b": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}})";
  CHECK(contains(open_error(make_file(inside, 8)), "overlaps"));
  const std::string gap =
      R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
      R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}})";
  CHECK(contains(open_error(make_file(gap, 20)),
                 "bytes [8, 12) of the data section before tensor \"b\" belong to no tensor"));
  const std::string starts_late = R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})";
  CHECK(contains(open_error(make_file(starts_late, 8)), "bytes [0, 4) of the data section before tensor \"a\""));
  const std::string trailing = R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})";
  CHECK(contains(open_error(make_file(trailing, 9)),
                 "bytes [8, 9) at the end of the data section belong to no tensor"));
  CHECK(contains(open_error(make_file("{}", 3)), "bytes [0, 3) at the end of the data section"));
  // Empty tensors at the boundaries are fine.
  const std::string empties =
      R"({"e0": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},)"
      R"( "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
      R"( "e8": {"dtype": "F64", "shape": [3, 0], "data_offsets": [8, 8]}})";
  CHECK(open_error(make_file(empties, 8)).empty());
}

TEST_CASE("safetensors: metadata must map strings to strings") {
  CHECK(contains(open_error(make_file(R"({"__metadata__": [1]})", 0)),
                 "\"__metadata__\" is a array, expected an object"));
  CHECK(contains(open_error(make_file(R"({"__metadata__": {"step": 12}})", 0)),
                 "metadata \"step\" is a number, expected a string"));
  CHECK(contains(open_error(make_file(R"({"__metadata__": {"a": "x", "a": "y"}})", 0)), "duplicate key \"a\""));
  CHECK(contains(open_error(make_file(R"({"w": {}, "w": {}})", 0)), "duplicate key \"w\""));
}

TEST_CASE("safetensors: read checks the tensor's name, shape, buffer size and dtype") {
  TemporaryDirectory directory;
  const fs::path path = directory.path / "r.safetensors";
  const std::vector<float> w(6, 1.0f);
  const std::vector<std::int64_t> ids{1, 2};
  const moe::io::TensorToWrite tensors[] = {moe::io::tensor_to_write("w", {2, 3}, w),
                                            moe::io::tensor_to_write("ids", {2}, ids)};
  moe::io::save_safetensors(path, tensors);
  const SafetensorsFile file(path);
  std::vector<float> out(6);
  CHECK(file.contains("w"));
  CHECK_FALSE(file.contains("v"));
  CHECK_THROWS_WITH_AS(file.info("v"), doctest::Contains("r.safetensors: no tensor named \"v\""), moe::Error);
  CHECK_THROWS_WITH_AS(file.read("v", out, {2, 3}), doctest::Contains("no tensor named \"v\""), moe::Error);
  CHECK_THROWS_WITH_AS(file.read("w", out, {3, 2}),
                       doctest::Contains("r.safetensors: tensor \"w\": shape is [2, 3], expected [3, 2]"), moe::Error);
  CHECK_THROWS_WITH_AS(file.read("w", out, {6}), doctest::Contains("shape is [2, 3], expected [6]"), moe::Error);
  std::vector<float> small(5);
  CHECK_THROWS_WITH_AS(file.read("w", small, {2, 3}),
                       doctest::Contains("has 6 elements, the output buffer has room for 5"), moe::Error);
  std::vector<float> two(2);
  CHECK_THROWS_WITH_AS(file.read("ids", two, {2}), doctest::Contains("dtype I64 is not a floating-point type"),
                       moe::Error);
  file.read("w", out, {2, 3});
  CHECK(out == w);
}

TEST_CASE("safetensors: opening a missing file, a directory or an unwritable path is an error") {
  TemporaryDirectory directory;
  CHECK_THROWS_WITH_AS(SafetensorsFile(directory.path / "missing.safetensors"),
                       doctest::Contains("cannot open"), moe::Error);
  CHECK_THROWS_WITH_AS(SafetensorsFile(directory.path), doctest::Contains("is a directory"), moe::Error);
  // A named pipe: refused before the open, which would wait for a writer forever.
  const fs::path pipe = directory.path / "pipe.safetensors";
  REQUIRE(mkfifo(pipe.c_str(), 0600) == 0);
  CHECK_THROWS_WITH_AS(SafetensorsFile{pipe}, doctest::Contains("is not a regular file"), moe::Error);
  CHECK_THROWS_WITH_AS(SafetensorsFile::header_only(pipe), doctest::Contains("is not a regular file"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::io::save_safetensors(directory.path / "no" / "such" / "dir.safetensors", {}),
                       doctest::Contains("cannot open"), moe::Error);
}

TEST_CASE("safetensors: the writer rejects inconsistent tensors, naming them") {
  TemporaryDirectory directory;
  const fs::path path = directory.path / "w.safetensors";
  const std::vector<float> six(6);
  const auto save = [&](std::vector<moe::io::TensorToWrite> tensors) { moe::io::save_safetensors(path, tensors); };
  CHECK_THROWS_WITH_AS(save({moe::io::tensor_to_write("w", {2, 2}, six)}),
                       doctest::Contains("tensor \"w\": shape [2, 2] of F32 needs 16 bytes, given 24"), moe::Error);
  CHECK_THROWS_WITH_AS(save({moe::io::tensor_to_write("w", {-6}, six)}),
                       doctest::Contains("tensor \"w\": invalid shape [-6]"), moe::Error);
  CHECK_THROWS_WITH_AS(save({moe::io::tensor_to_write("w", {6}, six), moe::io::tensor_to_write("w", {6}, six)}),
                       doctest::Contains("tensor \"w\": the name is used twice"), moe::Error);
  CHECK_THROWS_WITH_AS(save({moe::io::tensor_to_write("", {6}, six)}), doctest::Contains("empty name"), moe::Error);
  CHECK_THROWS_WITH_AS(save({moe::io::tensor_to_write("__metadata__", {6}, six)}),
                       doctest::Contains("reserved"), moe::Error);
  CHECK_THROWS_WITH_AS(save({moe::io::tensor_to_write("bad \xFF", {6}, six)}),
                       doctest::Contains("not valid UTF-8"), moe::Error);
  CHECK_FALSE(fs::exists(path));
  CHECK_FALSE(fs::exists(directory.path / "w.safetensors.tmp"));
}

TEST_CASE("safetensors: saving over an existing file replaces it whole") {
  TemporaryDirectory directory;
  const fs::path path = directory.path / "c.safetensors";
  const std::vector<float> one{1}, two{2, 2};
  moe::io::save_safetensors(path, std::vector{moe::io::tensor_to_write("x", {1}, one)});
  moe::io::save_safetensors(path, std::vector{moe::io::tensor_to_write("y", {2}, two)});
  const SafetensorsFile file(path);
  CHECK(file.names() == std::vector<std::string>{"y"});
  CHECK_FALSE(fs::exists(directory.path / "c.safetensors.tmp"));
}

TEST_CASE("safetensors: mutated files either read or throw moe::Error") {
  TemporaryDirectory directory;
  const std::vector<std::byte> valid = small_valid_file(directory.path);
  REQUIRE(open_error(valid).empty());
  int opened = 0, rejected = 0;
  const auto attempt = [&](std::vector<std::byte> bytes) {
    try {
      const SafetensorsFile file = SafetensorsFile::from_bytes(std::move(bytes), "mutant.safetensors");
      for (const std::string& name : file.names()) {
        const moe::io::TensorInfo& info = file.info(name);
        (void)file.data(name);
        if (moe::io::is_floating(info.dtype)) {
          std::vector<double> out(std::size_t(info.elements()));
          file.read(name, out, info.shape);
        }
      }
      ++opened;
    } catch (const moe::Error&) {
      ++rejected;
    }
  };

  for (std::size_t length = 0; length < valid.size(); ++length)
    attempt(std::vector<std::byte>(valid.begin(), valid.begin() + std::ptrdiff_t(length)));
  std::mt19937 rng(99);
  const std::byte specials[] = {std::byte{0x00}, std::byte{0xFF}, std::byte{'{'}, std::byte{'"'},
                                std::byte{'9'}, std::byte{'-'}, std::byte{','}, std::byte{0x80}};
  for (int i = 0; i < 3000; ++i) {
    std::vector<std::byte> bytes = valid;
    const int edits = 1 + int(rng() % 3);
    for (int e = 0; e < edits; ++e) {
      const std::size_t at = rng() % bytes.size();
      switch (rng() % 3) {
        case 0: bytes[at] ^= std::byte(1u << (rng() % 8)); break;
        case 1: bytes[at] = specials[rng() % std::size(specials)]; break;
        default: {  // tamper with the header length
          std::uint64_t length;
          std::memcpy(&length, bytes.data(), 8);
          const std::uint64_t choices[] = {0, length - 1, length + 1, length + 8, length / 2, rng(), ~std::uint64_t{0}};
          length = choices[rng() % std::size(choices)];
          std::memcpy(bytes.data(), &length, 8);
        }
      }
    }
    attempt(std::move(bytes));
  }
  for (int i = 0; i < 300; ++i) {
    std::vector<std::byte> garbage(rng() % 64);
    for (std::byte& b : garbage) b = std::byte(rng());
    if (garbage.size() >= 8 && i % 2) {
      const std::uint64_t length = rng() % (garbage.size() - 7);  // a header length that fits
      std::memcpy(garbage.data(), &length, 8);
    }
    attempt(std::move(garbage));
  }
  CHECK(opened + rejected == int(valid.size()) + 3000 + 300);
  CHECK(opened > 0);  // some flips land in tensor data and keep the file valid
  CHECK(rejected > 0);

  // The file-reading path too, on a truncated copy.
  const fs::path truncated = directory.path / "truncated.safetensors";
  {
    std::ofstream out(truncated, std::ios::binary);
    out.write(reinterpret_cast<const char*>(valid.data()), std::streamsize(valid.size() - 3));
  }
  CHECK_THROWS_AS(SafetensorsFile{truncated}, moe::Error);
}

TEST_CASE("safetensors: header_only reads names, shapes and metadata without the data") {
  TemporaryDirectory directory;
  const std::vector<std::byte> valid = small_valid_file(directory.path);
  const fs::path path = directory.path / "small.safetensors";
  const SafetensorsFile file = SafetensorsFile::header_only(path);
  CHECK(file.names() == std::vector<std::string>{"a", "b", "c"});
  CHECK(file.info("a").shape == std::vector<std::int64_t>{2, 3});
  CHECK(file.metadata().at("step") == "12");
  std::vector<float> out(6);
  CHECK_THROWS_WITH_AS(file.read("a", out, {2, 3}), doctest::Contains("opened header-only"), moe::Error);
  CHECK_THROWS_WITH_AS(file.data("a"), doctest::Contains("opened header-only"), moe::Error);

  // Validated against the real file size: a truncated data section is caught without reading it.
  const fs::path truncated = directory.path / "cut.safetensors";
  {
    std::ofstream out_file(truncated, std::ios::binary);
    out_file.write(reinterpret_cast<const char*>(valid.data()), std::streamsize(valid.size() - 2));
  }
  CHECK_THROWS_WITH_AS(SafetensorsFile::header_only(truncated), doctest::Contains("end past the data section"),
                       moe::Error);
  for (std::size_t length : {std::size_t{0}, std::size_t{5}, std::size_t{8}, std::size_t{20}}) {
    {
      std::ofstream out_file(truncated, std::ios::binary | std::ios::trunc);
      out_file.write(reinterpret_cast<const char*>(valid.data()), std::streamsize(length));
    }
    CAPTURE(length);
    CHECK_THROWS_AS(SafetensorsFile::header_only(truncated), moe::Error);
  }
  CHECK_THROWS_WITH_AS(SafetensorsFile::header_only(directory.path / "missing"), doctest::Contains("cannot open"),
                       moe::Error);
  CHECK_THROWS_WITH_AS(SafetensorsFile::header_only(directory.path), doctest::Contains("is a directory"), moe::Error);
}
