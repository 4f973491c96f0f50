// examples/common/gzip.hpp: a whole file's bytes, inflated when it is gzip (.gz, and dictd's .dz,
// which is gzip with a random-access table in the header); a plain file reads as it is, whatever
// its name. Both examples read their data through it (Fashion-MNIST's IDX files, text corpora
// such as Debian's dict-gcide). Errors name the file: missing, not a regular file, larger than
// the limit once inflated, corrupt or truncated gzip data (zlib's checks: header, data, CRC-32,
// length).
#pragma once

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>

#include "moe/config.hpp"

namespace examples {

// who: the message prefix ("vit", "gpt2"). Container: std::string or std::vector<std::uint8_t>.
template <class Container>
Container read_maybe_gzip(const std::string& path, std::size_t max_bytes, const char* who) {
  std::error_code error;
  const std::filesystem::file_status status = std::filesystem::status(path, error);
  moe::check(std::filesystem::exists(status), who, ": ", path, " does not exist");
  moe::check(std::filesystem::is_regular_file(status), who, ": ", path, " is not a regular file");
  gzFile file = gzopen(path.c_str(), "rb");
  moe::check(file != nullptr, who, ": cannot open ", path, " (", std::strerror(errno), ")");
  Container bytes;
  const unsigned chunk = 1u << 20;
  int errnum = Z_OK;
  const char* message = "";
  for (;;) {
    const std::size_t old_size = bytes.size();
    bytes.resize(old_size + chunk);
    const int got = gzread(file, bytes.data() + old_size, chunk);
    bytes.resize(old_size + std::size_t(std::max(got, 0)));
    message = gzerror(file, &errnum);
    if (got <= 0 || errnum != Z_OK || bytes.size() > max_bytes) break;
  }
  std::string zlib_message = errnum == Z_ERRNO ? std::strerror(errno) : message;
  if (zlib_message.starts_with(path + ": ")) zlib_message.erase(0, path.size() + 2);  // zlib names the file too
  const int closed = gzclose(file);
  moe::check(bytes.size() <= max_bytes, who, ": ", path, " inflates to more than ", max_bytes, " bytes");
  moe::check(errnum == Z_OK, who, ": ", path, ": corrupt or truncated gzip data (zlib: ", zlib_message, ")");
  // Z_BUF_ERROR: the data ended inside a gzip stream.
  moe::check(closed != Z_BUF_ERROR, who, ": ", path, ": truncated gzip data (the stream ends early)");
  moe::check(closed == Z_OK, who, ": ", path, ": reading failed (zlib: ", zError(closed), ")");
  return bytes;
}

}  // namespace examples
