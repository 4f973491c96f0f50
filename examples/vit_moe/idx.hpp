// examples/vit_moe/idx.hpp: the IDX files of MNIST and Fashion-MNIST, read and written, plain or
// gzip-compressed (.gz, through zlib; a plain file reads as it is, whatever its name).
//
// Format: a big-endian 32-bit magic 0x000008DD (0x08: unsigned bytes, DD: the number of
// dimensions), DD big-endian 32-bit sizes, then the values, row-major:
//   images 0x00000803: [count, rows, cols] pixels,   labels 0x00000801: [count] labels.
// Everything is checked against the bytes actually there: a wrong magic, a truncated header or
// body, or bytes past the end is one moe::Error naming the file; nothing is allocated from a size
// the file does not back up.
#pragma once

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <vector>

#include "../common/gzip.hpp"
#include "moe/config.hpp"

namespace vit::idx {

using moe::Index;

inline constexpr std::uint32_t kImagesMagic = 0x00000803;
inline constexpr std::uint32_t kLabelsMagic = 0x00000801;
// The largest decompressed file read (Fashion-MNIST's largest is 47 MB): a guard against a
// corrupt or hostile .gz that would inflate without end.
inline constexpr std::size_t kMaxBytes = std::size_t(1) << 30;

struct Images {
  Index count = 0, rows = 0, cols = 0;
  std::vector<std::uint8_t> pixels;  // [count, rows, cols]
};

namespace detail {

inline std::uint32_t read_be32(std::span<const std::uint8_t> bytes, std::size_t at) {
  return std::uint32_t(bytes[at]) << 24 | std::uint32_t(bytes[at + 1]) << 16 | std::uint32_t(bytes[at + 2]) << 8 |
         std::uint32_t(bytes[at + 3]);
}
inline void append_be32(std::vector<std::uint8_t>& out, std::uint64_t value) {
  moe::check(value <= 0xffffffffULL, "vit: IDX sizes are 32-bit, got ", value);
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(std::uint8_t(value >> shift));
}

// The sizes in the header of an IDX file of unsigned bytes (as many as the magic's last byte
// says), checked to describe exactly the bytes that follow the header.
inline std::vector<std::uint64_t> parse_header(std::span<const std::uint8_t> bytes, const std::string& name,
                                               std::uint32_t magic, const char* what) {
  moe::check(bytes.size() >= 4, "vit: ", name, " has ", bytes.size(), " bytes, too short for an IDX magic number");
  const std::uint32_t found = read_be32(bytes, 0);
  if (found != magic) {
    char text[96];
    std::snprintf(text, sizeof text, "magic number 0x%08x, expected 0x%08x", unsigned(found), unsigned(magic));
    moe::fail("vit: ", name, " is not an IDX ", what, " file (", text, ")");
  }
  const std::size_t rank = magic & 0xff, header = 4 + 4 * rank;
  moe::check(bytes.size() >= header, "vit: ", name, " is truncated in its header (", bytes.size(), " bytes, the ",
             what, " header has ", header, ")");
  std::vector<std::uint64_t> sizes;
  std::uint64_t per_item = 1;  // bytes per image or label; each size < 2^32, so no product overflows below
  for (std::size_t d = 0; d < rank; ++d) {
    sizes.push_back(read_be32(bytes, 4 + 4 * d));
    if (d > 0) per_item *= sizes.back();
  }
  moe::check(per_item > 0, "vit: ", name, " declares an empty item (a size of 0 after the count)");
  // An image's pixel count is an Index product later (rows * columns): bounded here, so a file of no
  // images cannot declare a size that overflows it.
  constexpr std::uint64_t kMaxItemBytes = std::uint64_t(1) << 31;
  moe::check(per_item <= kMaxItemBytes, "vit: ", name, " declares ", what, " of ", per_item,
             " bytes each (more than 2^31)");
  const std::uint64_t body = bytes.size() - header, count = sizes[0];
  moe::check(count <= body / per_item, "vit: ", name, " is truncated: its header declares ", count, " ", what,
             " of ", per_item, " bytes each, the file has ", body, " bytes after the header");
  moe::check(count * per_item == body, "vit: ", name, " has ", body - count * per_item,
             " bytes past the end of its ", count, " ", what);
  return sizes;
}

}  // namespace detail

// bytes: a whole IDX images file (0x00000803) -> its images. name: for messages.
inline Images parse_images(std::span<const std::uint8_t> bytes, const std::string& name) {
  const std::vector<std::uint64_t> sizes = detail::parse_header(bytes, name, kImagesMagic, "images");
  Images images{Index(sizes[0]), Index(sizes[1]), Index(sizes[2]), {}};
  images.pixels.assign(bytes.begin() + 16, bytes.end());
  return images;
}

// bytes: a whole IDX labels file (0x00000801) -> its labels. name: for messages.
inline std::vector<std::uint8_t> parse_labels(std::span<const std::uint8_t> bytes, const std::string& name) {
  detail::parse_header(bytes, name, kLabelsMagic, "labels");
  return {bytes.begin() + 8, bytes.end()};
}

inline std::vector<std::uint8_t> encode_images(const Images& images) {
  moe::check(images.count >= 0 && images.rows > 0 && images.cols > 0 &&
                 Index(images.pixels.size()) == images.count * images.rows * images.cols,
             "vit: cannot encode ", images.count, " images of ", images.rows, "x", images.cols, " from ",
             images.pixels.size(), " pixels");
  std::vector<std::uint8_t> out;
  detail::append_be32(out, kImagesMagic);
  for (Index size : {images.count, images.rows, images.cols}) detail::append_be32(out, std::uint64_t(size));
  out.insert(out.end(), images.pixels.begin(), images.pixels.end());
  return out;
}

inline std::vector<std::uint8_t> encode_labels(std::span<const std::uint8_t> labels) {
  std::vector<std::uint8_t> out;
  detail::append_be32(out, kLabelsMagic);
  detail::append_be32(out, labels.size());
  out.insert(out.end(), labels.begin(), labels.end());
  return out;
}

// The whole file, inflated when it is gzip (examples/common/gzip.hpp).
inline std::vector<std::uint8_t> read_bytes(const std::string& path) {
  return examples::read_maybe_gzip<std::vector<std::uint8_t>>(path, kMaxBytes, "vit");
}

// Writes bytes to path, gzip-compressed (level 6) when gzip is set.
inline void write_bytes(const std::string& path, std::span<const std::uint8_t> bytes, bool gzip) {
  if (!gzip) {
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
    moe::check(bool(out), "vit: cannot write ", path);
    return;
  }
  gzFile file = gzopen(path.c_str(), "wb6");
  moe::check(file != nullptr, "vit: cannot open ", path, " for writing");
  bool ok = true;
  for (std::size_t at = 0; ok && at < bytes.size(); at += 1u << 20) {
    const unsigned n = unsigned(std::min<std::size_t>(1u << 20, bytes.size() - at));
    ok = gzwrite(file, bytes.data() + at, n) == int(n);
  }
  ok = gzclose(file) == Z_OK && ok;
  moe::check(ok, "vit: cannot write ", path);
}

inline Images read_images(const std::string& path) { return parse_images(read_bytes(path), path); }
inline std::vector<std::uint8_t> read_labels(const std::string& path) { return parse_labels(read_bytes(path), path); }

}  // namespace vit::idx
