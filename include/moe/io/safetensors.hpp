// moe/io/safetensors.hpp: reading and writing the safetensors format.
//
// File layout (all little-endian):
//   8 bytes       N, the header length (uint64)
//   N bytes       UTF-8 JSON object: {"<name>": {"dtype": "F32", "shape": [d0, d1, ...],
//                 "data_offsets": [begin, end]}, ..., "__metadata__": {"key": "value", ...}}
//                 (padded with trailing spaces)
//   the rest      the data section; each tensor's bytes are [begin, end) within it, row-major
//
// The reader validates everything when the file is opened (sizes, JSON, dtypes, shapes, offsets,
// overlap, full coverage of the data section, metadata types), so a file that opens is
// consistent, and a file that does not gives one moe::Error naming the file, the tensor and the
// problem. The writer writes `<path>.tmp` and renames it over `path`, so an interrupted save
// never leaves a half-written file under the real name.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <vector>

#include "moe/config.hpp"
#include "moe/io/file_checks.hpp"
#include "moe/io/json.hpp"

namespace moe::io {

static_assert(std::endian::native == std::endian::little,
              "moe/io reads and writes little-endian files by reinterpreting memory");

// ---- dtypes ------------------------------------------------------------------------------------

enum class DType { F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U64, U32, U16, U8, BOOL };

inline constexpr DType all_dtypes[] = {DType::F64, DType::F32, DType::F16, DType::BF16, DType::F8_E4M3,
                                       DType::F8_E5M2, DType::I64, DType::I32, DType::I16, DType::I8,
                                       DType::U64, DType::U32, DType::U16, DType::U8, DType::BOOL};

inline std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F64: return "F64";
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::F8_E4M3: return "F8_E4M3";
    case DType::F8_E5M2: return "F8_E5M2";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::I16: return "I16";
    case DType::I8: return "I8";
    case DType::U64: return "U64";
    case DType::U32: return "U32";
    case DType::U16: return "U16";
    case DType::U8: return "U8";
    case DType::BOOL: return "BOOL";
  }
  return "?";
}

inline std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F64: case DType::I64: case DType::U64: return 8;
    case DType::F32: case DType::I32: case DType::U32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: case DType::U16: return 2;
    case DType::F8_E4M3: case DType::F8_E5M2: case DType::I8: case DType::U8: case DType::BOOL: return 1;
  }
  return 0;
}

inline std::optional<DType> parse_dtype(std::string_view name) {
  for (DType dtype : all_dtypes)
    if (dtype_name(dtype) == name) return dtype;
  return std::nullopt;
}

inline bool is_floating(DType dtype) {
  return dtype == DType::F64 || dtype == DType::F32 || dtype == DType::F16 || dtype == DType::BF16 ||
         dtype == DType::F8_E4M3 || dtype == DType::F8_E5M2;
}

// The dtype that stores a C++ type as is (F16 and BF16 have none: pass their bits as uint16_t
// with the dtype named explicitly).
template <class T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, double>) return DType::F64;
  else if constexpr (std::is_same_v<T, float>) return DType::F32;
  else if constexpr (std::is_same_v<T, bool>) return DType::BOOL;
  else if constexpr (std::is_integral_v<T> && std::is_signed_v<T> && sizeof(T) == 8) return DType::I64;
  else if constexpr (std::is_integral_v<T> && std::is_signed_v<T> && sizeof(T) == 4) return DType::I32;
  else if constexpr (std::is_integral_v<T> && std::is_signed_v<T> && sizeof(T) == 2) return DType::I16;
  else if constexpr (std::is_integral_v<T> && std::is_signed_v<T> && sizeof(T) == 1) return DType::I8;
  else if constexpr (std::is_integral_v<T> && std::is_unsigned_v<T> && sizeof(T) == 8) return DType::U64;
  else if constexpr (std::is_integral_v<T> && std::is_unsigned_v<T> && sizeof(T) == 4) return DType::U32;
  else if constexpr (std::is_integral_v<T> && std::is_unsigned_v<T> && sizeof(T) == 2) return DType::U16;
  else if constexpr (std::is_integral_v<T> && std::is_unsigned_v<T> && sizeof(T) == 1) return DType::U8;
  else static_assert(sizeof(T) == 0, "no safetensors dtype stores this type");
}

// ---- half and 8-bit float conversions (round to nearest even) -----------------------------------

inline float bf16_to_float(std::uint16_t bits) { return std::bit_cast<float>(std::uint32_t(bits) << 16); }

inline std::uint16_t float_to_bf16(float value) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  if (std::isnan(value)) return std::uint16_t((bits >> 16) | 0x0040);  // stays a (quiet) NaN
  const std::uint32_t rounding = 0x7FFF + ((bits >> 16) & 1);
  return std::uint16_t((bits + rounding) >> 16);
}

inline float f16_to_float(std::uint16_t bits) {
  const std::uint32_t sign = std::uint32_t(bits & 0x8000) << 16;
  const std::uint32_t exponent = (bits >> 10) & 0x1F;
  const std::uint32_t mantissa = bits & 0x3FF;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = std::ldexp(float(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return std::bit_cast<float>(sign | 0x7F800000u | (mantissa << 13));
  return std::bit_cast<float>(sign | ((exponent + 127 - 15) << 23) | (mantissa << 13));
}

inline std::uint16_t float_to_f16(float value) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  const std::uint16_t sign = std::uint16_t((bits >> 16) & 0x8000);
  const std::uint32_t magnitude = bits & 0x7FFFFFFF;
  if (magnitude > 0x7F800000) return sign | 0x7E00;       // NaN
  if (magnitude >= 0x47800000) return sign | 0x7C00;      // >= 2^16: infinity
  if (magnitude < 0x38800000) {                           // below 2^-14: subnormal half (or zero)
    const double scaled = double(std::bit_cast<float>(magnitude)) * 16777216.0;  // / 2^-24, exact
    return sign | std::uint16_t(std::nearbyint(scaled));  // 0x400 (smallest normal) when it rounds up
  }
  const std::uint32_t mantissa = magnitude & 0x7FFFFF;
  std::uint32_t half = ((((magnitude >> 23) - 127 + 15)) << 10) | (mantissa >> 13);
  const std::uint32_t rest = mantissa & 0x1FFF;
  if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) ++half;  // a carry may reach infinity: correct
  return sign | std::uint16_t(half);
}

// 8-bit floats (OCP FP8): E4M3 "fn" (bias 7, no infinities, S.1111.111 is NaN, max 448) and
// E5M2 (bias 15, IEEE-like).
inline float f8_e4m3_to_float(std::uint8_t bits) {
  const bool negative = bits & 0x80;
  const int exponent = (bits >> 3) & 0xF;
  const int mantissa = bits & 0x7;
  float magnitude;
  if (exponent == 0xF && mantissa == 0x7) magnitude = std::numeric_limits<float>::quiet_NaN();
  else if (exponent == 0) magnitude = std::ldexp(float(mantissa), -9);
  else magnitude = std::ldexp(float(8 + mantissa), exponent - 7 - 3);
  return negative ? -magnitude : magnitude;
}

inline float f8_e5m2_to_float(std::uint8_t bits) { return f16_to_float(std::uint16_t(bits << 8)); }

// ---- writing -----------------------------------------------------------------------------------

// One tensor to save: its name, dtype, shape and raw little-endian bytes (not owned).
struct TensorToWrite {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::span<const std::byte> bytes;
};

// A tensor of C++ values stored as is (float -> F32, double -> F64, std::int32_t -> I32, ...).
template <class T>
TensorToWrite tensor_to_write(std::string name, std::vector<std::int64_t> shape, std::span<const T> values) {
  return {std::move(name), dtype_of<T>(), std::move(shape), std::as_bytes(values)};
}
template <class T>
TensorToWrite tensor_to_write(std::string name, std::vector<std::int64_t> shape, const std::vector<T>& values) {
  return tensor_to_write(std::move(name), std::move(shape), std::span<const T>(values));
}
// The bytes are not copied: a temporary vector would be gone before the save.
template <class T>
TensorToWrite tensor_to_write(std::string name, std::vector<std::int64_t> shape, std::vector<T>&& values) = delete;
// F16 or BF16 bits.
inline TensorToWrite tensor_to_write(std::string name, DType half_dtype, std::vector<std::int64_t> shape,
                                     std::span<const std::uint16_t> bits) {
  check(half_dtype == DType::F16 || half_dtype == DType::BF16, "tensor_to_write: 16-bit floats given the ",
        dtype_name(half_dtype), " dtype, expected F16 or BF16");
  return {std::move(name), half_dtype, std::move(shape), std::as_bytes(bits)};
}

namespace detail {

inline std::string shape_string(std::span<const std::int64_t> shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

// The element count of `shape`, or nullopt if a dimension is negative or the count (times
// `element_size` bytes) overflows int64.
inline std::optional<std::int64_t> checked_element_count(std::span<const std::int64_t> shape,
                                                         std::size_t element_size) {
  std::int64_t count = 1;
  for (std::int64_t dim : shape) {
    if (dim < 0) return std::nullopt;
    if (__builtin_mul_overflow(count, dim, &count)) return std::nullopt;
  }
  std::int64_t bytes;
  if (__builtin_mul_overflow(count, std::int64_t(element_size), &bytes)) return std::nullopt;
  return count;
}

// Writes the parts one after another to `<path>.tmp`, then renames it to `path`.
inline void write_file_atomically(const std::filesystem::path& path, std::span<const std::span<const std::byte>> parts) {
  std::filesystem::path temporary = path;
  temporary += ".tmp";
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    check(bool(out), "cannot open ", temporary.string(), " for writing");
    for (std::span<const std::byte> part : parts)
      out.write(reinterpret_cast<const char*>(part.data()), std::streamsize(part.size()));
    out.flush();
    if (!out) {
      out.close();
      std::error_code ignored;
      std::filesystem::remove(temporary, ignored);
      fail("writing ", temporary.string(), " failed (disk full?)");
    }
  }
  std::error_code error;
  std::filesystem::rename(temporary, path, error);
  if (error) {
    std::error_code ignored;
    std::filesystem::remove(temporary, ignored);
    fail("cannot rename ", temporary.string(), " to ", path.string(), ": ", error.message());
  }
}

inline std::vector<std::byte> read_whole_file(const std::filesystem::path& path) {
  check_regular_file(path, "a file");
  std::ifstream in(path, std::ios::binary);
  check(bool(in), "cannot open ", path.string(), " for reading");
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  check(size >= 0, "cannot determine the size of ", path.string());
  in.seekg(0, std::ios::beg);
  std::vector<std::byte> bytes(static_cast<std::size_t>(size));
  in.read(reinterpret_cast<char*>(bytes.data()), std::streamsize(size));
  check(in.gcount() == size, "reading ", path.string(), " failed after ", in.gcount(), " of ", size, " bytes");
  return bytes;
}

}  // namespace detail

// Saves tensors (names unique, not "__metadata__") and string metadata. The data section holds
// the tensors in the given order, except that wider dtypes come first so every tensor is
// aligned to its element size; the header is padded to a multiple of 8 bytes.
inline void save_safetensors(const std::filesystem::path& path, std::span<const TensorToWrite> tensors,
                             const std::map<std::string, std::string>& metadata = {}) {
  const std::string file = path.string();
  std::vector<std::size_t> data_order(tensors.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) data_order[i] = i;
  std::stable_sort(data_order.begin(), data_order.end(), [&](std::size_t a, std::size_t b) {
    return dtype_size(tensors[a].dtype) > dtype_size(tensors[b].dtype);
  });
  std::vector<std::int64_t> begin(tensors.size());
  std::int64_t offset = 0;
  for (std::size_t i : data_order) {
    begin[i] = offset;
    offset += std::int64_t(tensors[i].bytes.size());
  }

  json::Value header = json::Object{};
  if (!metadata.empty()) {
    json::Value entries = json::Object{};
    for (const auto& [key, value] : metadata) entries.set(key, value);
    header.set("__metadata__", std::move(entries));
  }
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const TensorToWrite& tensor = tensors[i];
    const auto where = [&] { return file + ": tensor \"" + tensor.name + "\": "; };
    check(!tensor.name.empty(), file, ": a tensor has an empty name");
    check(tensor.name != "__metadata__", file, ": \"__metadata__\" is reserved, not a tensor name");
    check(!header.find(tensor.name), where(), "the name is used twice");
    const auto count = detail::checked_element_count(tensor.shape, dtype_size(tensor.dtype));
    check(count.has_value(), where(), "invalid shape ", detail::shape_string(tensor.shape));
    check(std::uint64_t(*count) * dtype_size(tensor.dtype) == tensor.bytes.size(), where(), "shape ",
          detail::shape_string(tensor.shape), " of ", dtype_name(tensor.dtype), " needs ",
          *count * std::int64_t(dtype_size(tensor.dtype)), " bytes, given ", tensor.bytes.size());
    json::Value shape = json::Array{};
    for (std::int64_t dim : tensor.shape) shape.push_back(dim);
    json::Value entry = json::Object{};
    entry.set("dtype", std::string(dtype_name(tensor.dtype)));
    entry.set("shape", std::move(shape));
    entry.set("data_offsets",
              json::Array{json::Value(begin[i]), json::Value(begin[i] + std::int64_t(tensor.bytes.size()))});
    header.set(tensor.name, std::move(entry));
  }
  std::string header_text = header.dump();
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  std::byte length[8];
  const std::uint64_t header_length = header_text.size();
  std::memcpy(length, &header_length, 8);
  std::vector<std::span<const std::byte>> parts{std::span<const std::byte>(length),
                                                std::as_bytes(std::span(header_text))};
  for (std::size_t i : data_order) parts.push_back(tensors[i].bytes);
  detail::write_file_atomically(path, parts);
}

// ---- reading -----------------------------------------------------------------------------------

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::int64_t begin = 0;  // byte offsets within the data section
  std::int64_t end = 0;
  std::int64_t elements() const {
    std::int64_t count = 1;
    for (std::int64_t dim : shape) count *= dim;
    return count;
  }
};

class SafetensorsFile {
 public:
  // Headers larger than this are rejected before parsing (Hugging Face's reader uses the same cap).
  static constexpr std::uint64_t max_header_bytes = 100'000'000;

  explicit SafetensorsFile(const std::filesystem::path& path)
      : SafetensorsFile(path.string(), detail::read_whole_file(path)) {}
  // A file's contents already in memory; `name` stands for the file in error messages.
  static SafetensorsFile from_bytes(std::vector<std::byte> bytes, std::string name) {
    return SafetensorsFile(std::move(name), std::move(bytes));
  }
  // Reads only the header (names, shapes, metadata), validated as fully against the file's size;
  // data() and read() then throw. For a quick look at a large checkpoint.
  static SafetensorsFile header_only(const std::filesystem::path& path) {
    const std::string file = path.string();
    detail::check_regular_file(path, "a file");
    std::ifstream in(path, std::ios::binary);
    check(bool(in), "cannot open ", file, " for reading");
    std::error_code error;
    const std::uintmax_t file_size = std::filesystem::file_size(path, error);
    check(!error, "cannot determine the size of ", file, ": ", error.message());
    std::vector<std::byte> head(std::size_t(std::min<std::uintmax_t>(file_size, 8)));
    in.read(reinterpret_cast<char*>(head.data()), std::streamsize(head.size()));
    if (head.size() == 8) {
      std::uint64_t header_length;
      std::memcpy(&header_length, head.data(), 8);
      if (header_length <= max_header_bytes && header_length <= file_size - 8) {
        head.resize(8 + std::size_t(header_length));
        in.read(reinterpret_cast<char*>(head.data()) + 8, std::streamsize(header_length));
      }
    }
    check(bool(in), "reading the header of ", file, " failed");
    SafetensorsFile result(file, std::move(head), file_size);
    result.header_only_ = true;
    return result;
  }

  const std::string& file() const { return file_; }
  // Tensor names in the header's order.
  const std::vector<std::string>& names() const { return names_; }
  bool contains(std::string_view name) const { return index_.find(name) != index_.end(); }
  const TensorInfo& info(std::string_view name) const {
    const auto it = index_.find(name);
    if (it == index_.end()) fail(file_, ": no tensor named \"", name, "\"");
    return tensors_[it->second];
  }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // The tensor's raw little-endian bytes.
  std::span<const std::byte> data(std::string_view name) const {
    const TensorInfo& tensor = info(name);
    check(!header_only_, file_, ": opened header-only, cannot read tensor \"", name, "\"");
    return std::span(bytes_).subspan(data_start_ + std::size_t(tensor.begin), std::size_t(tensor.end - tensor.begin));
  }

  // Converts a floating-point tensor (F64, F32, F16, BF16, F8) into `out`, after checking that
  // its shape is `expected_shape` and `out` has room for exactly its elements.
  void read(std::string_view name, std::span<float> out, std::span<const std::int64_t> expected_shape) const {
    read_as(name, out, expected_shape);
  }
  void read(std::string_view name, std::span<double> out, std::span<const std::int64_t> expected_shape) const {
    read_as(name, out, expected_shape);
  }
  void read(std::string_view name, std::span<float> out, std::initializer_list<std::int64_t> expected_shape) const {
    read_as(name, out, std::span(expected_shape.begin(), expected_shape.size()));
  }
  void read(std::string_view name, std::span<double> out, std::initializer_list<std::int64_t> expected_shape) const {
    read_as(name, out, std::span(expected_shape.begin(), expected_shape.size()));
  }

 private:
  SafetensorsFile(std::string file, std::vector<std::byte> whole_file)
      : file_(std::move(file)), bytes_(std::move(whole_file)) {
    validate(bytes_.size());
  }
  SafetensorsFile(std::string file, std::vector<std::byte> head, std::uint64_t file_size)
      : file_(std::move(file)), bytes_(std::move(head)) {
    validate(file_size);
  }

  template <class T>
  void read_as(std::string_view name, std::span<T> out, std::span<const std::int64_t> expected_shape) const {
    const TensorInfo& tensor = info(name);
    check(!header_only_, file_, ": opened header-only, cannot read tensor \"", name, "\"");
    const auto where = [&] { return file_ + ": tensor \"" + tensor.name + "\": "; };
    check(std::equal(tensor.shape.begin(), tensor.shape.end(), expected_shape.begin(), expected_shape.end()),
          where(), "shape is ", detail::shape_string(tensor.shape), ", expected ", detail::shape_string(expected_shape));
    check(std::int64_t(out.size()) == tensor.elements(), where(), "has ", tensor.elements(),
          " elements, the output buffer has room for ", out.size());
    check(is_floating(tensor.dtype), where(), "dtype ", dtype_name(tensor.dtype),
          " is not a floating-point type, cannot read it as floating point");
    const std::byte* source = bytes_.data() + data_start_ + std::size_t(tensor.begin);
    const auto identity = [](auto x) { return x; };
    switch (tensor.dtype) {
      case DType::F64: decode<double>(source, out, identity); break;
      case DType::F32: decode<float>(source, out, identity); break;
      case DType::F16: decode<std::uint16_t>(source, out, f16_to_float); break;
      case DType::BF16: decode<std::uint16_t>(source, out, bf16_to_float); break;
      case DType::F8_E4M3: decode<std::uint8_t>(source, out, f8_e4m3_to_float); break;
      case DType::F8_E5M2: decode<std::uint8_t>(source, out, f8_e5m2_to_float); break;
      default: break;
    }
  }

  // out[i] = to_value(element i of an array of Stored at `source`, of any alignment).
  template <class Stored, class T, class ToValue>
  static void decode(const std::byte* source, std::span<T> out, ToValue to_value) {
    for (std::size_t i = 0; i < out.size(); ++i) {
      Stored stored;
      std::memcpy(&stored, source + i * sizeof(Stored), sizeof(Stored));
      out[i] = T(to_value(stored));
    }
  }

  [[noreturn]] void invalid(const std::string& problem) const { fail(file_, ": ", problem); }
  [[noreturn]] void invalid_tensor(const std::string& name, const std::string& problem) const {
    fail(file_, ": tensor \"", name, "\": ", problem);
  }

  // `bytes_` holds the whole file, or (header-only) at least its first 8 + N bytes.
  void validate(std::uint64_t file_size) {
    if (file_size < 8)
      invalid("file is " + std::to_string(file_size) + " bytes, too short for the 8-byte header length");
    std::uint64_t header_length;
    std::memcpy(&header_length, bytes_.data(), 8);
    if (header_length > max_header_bytes)
      invalid("header length " + std::to_string(header_length) + " exceeds the limit of " +
              std::to_string(max_header_bytes) + " bytes (not a safetensors file?)");
    if (header_length > file_size - 8)
      invalid("header length " + std::to_string(header_length) + " runs past the end of the file (" +
              std::to_string(file_size) + " bytes)");
    data_start_ = 8 + std::size_t(header_length);
    const std::int64_t data_size = std::int64_t(file_size - data_start_);

    const std::string_view header_text(reinterpret_cast<const char*>(bytes_.data()) + 8, header_length);
    const json::Value header = json::parse(header_text, "header of " + file_);
    if (!header.is_object()) invalid("header is a JSON " + std::string(json::type_name(header.type())) + ", expected an object");

    for (const auto& [name, entry] : header.as_object()) {
      if (name == "__metadata__") {
        read_metadata(entry);
        continue;
      }
      tensors_.push_back(read_tensor_entry(name, entry, data_size));
      names_.push_back(name);
      index_.emplace(name, tensors_.size() - 1);
    }
    check_coverage(data_size);
  }

  void read_metadata(const json::Value& entry) {
    if (!entry.is_object())
      invalid("\"__metadata__\" is a " + std::string(json::type_name(entry.type())) + ", expected an object");
    for (const auto& [key, value] : entry.as_object()) {
      if (!value.is_string())
        invalid("metadata \"" + key + "\" is a " + json::type_name(value.type()) + ", expected a string");
      metadata_.emplace(key, value.as_string());
    }
  }

  TensorInfo read_tensor_entry(const std::string& name, const json::Value& entry, std::int64_t data_size) const {
    const auto bad = [&](const std::string& problem) { invalid_tensor(name, problem); };
    if (!entry.is_object()) bad(std::string("entry is a ") + json::type_name(entry.type()) + ", expected an object");
    for (const auto& [key, value] : entry.as_object())
      if (key != "dtype" && key != "shape" && key != "data_offsets") bad("unexpected field \"" + key + "\"");
    const json::Value* dtype = entry.find("dtype");
    const json::Value* shape = entry.find("shape");
    const json::Value* offsets = entry.find("data_offsets");
    if (!dtype || !shape || !offsets) bad("entry needs \"dtype\", \"shape\" and \"data_offsets\"");

    TensorInfo tensor;
    tensor.name = name;
    if (!dtype->is_string()) bad("dtype is not a string");
    const std::optional<DType> parsed = parse_dtype(dtype->as_string());
    if (!parsed) bad("unknown dtype \"" + dtype->as_string() + "\"");
    tensor.dtype = *parsed;

    if (!shape->is_array()) bad("shape is not an array");
    for (const json::Value& dim : shape->as_array()) {
      if (!dim.is_integer() || dim.as_int() < 0) bad("shape " + shape->dump() + " has an entry that is not a non-negative integer");
      tensor.shape.push_back(dim.as_int());
    }
    const auto count = detail::checked_element_count(tensor.shape, dtype_size(tensor.dtype));
    if (!count) bad("shape " + detail::shape_string(tensor.shape) + " has too many elements");

    if (!offsets->is_array() || offsets->as_array().size() != 2 || !offsets->as_array()[0].is_integer() ||
        !offsets->as_array()[1].is_integer())
      bad("data_offsets " + offsets->dump() + " is not a pair of integers [begin, end]");
    tensor.begin = offsets->as_array()[0].as_int();
    tensor.end = offsets->as_array()[1].as_int();
    if (tensor.begin < 0 || tensor.end < tensor.begin)
      bad("data_offsets " + offsets->dump() + " are not 0 <= begin <= end");
    if (tensor.end > data_size)
      bad("data_offsets " + offsets->dump() + " end past the data section (" + std::to_string(data_size) + " bytes)");
    const std::int64_t expected_bytes = *count * std::int64_t(dtype_size(tensor.dtype));
    if (tensor.end - tensor.begin != expected_bytes)
      bad("data_offsets " + offsets->dump() + " span " + std::to_string(tensor.end - tensor.begin) +
          " bytes, but shape " + detail::shape_string(tensor.shape) + " of " + std::string(dtype_name(tensor.dtype)) +
          " needs " + std::to_string(expected_bytes));
    return tensor;
  }

  // The tensors must tile the data section exactly: no overlap, no gap, nothing after the last.
  void check_coverage(std::int64_t data_size) const {
    std::vector<const TensorInfo*> by_offset;
    for (const TensorInfo& tensor : tensors_) by_offset.push_back(&tensor);
    std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
      return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    std::int64_t covered = 0;
    const TensorInfo* previous = nullptr;
    for (const TensorInfo* tensor : by_offset) {
      if (tensor->begin < covered)
        invalid("tensor \"" + tensor->name + "\" at bytes [" + std::to_string(tensor->begin) + ", " +
                std::to_string(tensor->end) + ") overlaps tensor \"" + previous->name + "\" at [" +
                std::to_string(previous->begin) + ", " + std::to_string(previous->end) + ")");
      if (tensor->begin > covered)
        invalid("bytes [" + std::to_string(covered) + ", " + std::to_string(tensor->begin) +
                ") of the data section before tensor \"" + tensor->name +
                "\" belong to no tensor (the data section must be fully covered)");
      covered = tensor->end;
      previous = tensor;
    }
    if (covered != data_size)
      invalid("bytes [" + std::to_string(covered) + ", " + std::to_string(data_size) +
              ") at the end of the data section belong to no tensor (the data section must be fully covered)");
  }

  std::string file_;
  std::vector<std::byte> bytes_;
  std::size_t data_start_ = 0;
  bool header_only_ = false;
  std::vector<TensorInfo> tensors_;
  std::vector<std::string> names_;
  std::map<std::string, std::size_t, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace moe::io
