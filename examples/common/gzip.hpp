// examples/common/gzip.hpp: a whole file's bytes, inflated when it is gzip (.gz, and dictd's .dz,
// which is gzip with a random-access table in the header); a plain file reads as it is, whatever
// its name. Both examples read their data through it (Fashion-MNIST's IDX files, text corpora
// such as Debian's dict-gcide).
//
// Gzip is a file that starts with gzip's magic bytes (1f 8b), as gzip(1) and zlib's gzread have it.
// Members written one after another (`cat a.gz b.gz`) read as their texts joined, as gzip -dc
// gives them. Errors name the file: missing, not a regular file, larger than the limit once
// inflated, corrupt data (zlib's checks: header, data, CRC-32, length), data that ends inside a
// member, and bytes after the last member that are not gzip. zlib's gzread ignores those without
// a word; they are a damaged or appended-to file, so here they are an error that says where they
// start.
#pragma once

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "moe/config.hpp"

namespace examples {

namespace gzip_detail {

inline bool starts_with_gzip_magic(const unsigned char* bytes, std::size_t size) {
  return size >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b;
}

// The file's raw bytes through a fixed window: `data()[0, available())` are read and not yet
// consumed; `offset()` is the file position of the first of them.
class InputWindow {
 public:
  InputWindow(std::FILE* file, const std::string& path, const char* who) : file_(file), path_(path), who_(who) {}

  // Moves the unconsumed bytes to the front and reads until at least `want` are there or the file
  // ends. Returns the number available.
  std::size_t fill(std::size_t want) {
    if (start_ > 0) {
      std::memmove(buffer_.data(), buffer_.data() + start_, end_ - start_);
      end_ -= start_, start_ = 0;
    }
    while (end_ - start_ < want && !at_end_) {
      const std::size_t got = std::fread(buffer_.data() + end_, 1, buffer_.size() - end_, file_);
      moe::check(!std::ferror(file_), who_, ": ", path_, ": reading failed (", std::strerror(errno), ")");
      if (got == 0) at_end_ = true;
      end_ += got, read_ += got;
    }
    return available();
  }
  unsigned char* data() { return buffer_.data() + start_; }
  std::size_t available() const { return end_ - start_; }
  void consume(std::size_t n) { start_ += n; }
  bool at_end() const { return at_end_; }
  std::uint64_t offset() const { return read_ - available(); }

 private:
  std::FILE* file_;
  const std::string& path_;
  const char* who_;
  std::vector<unsigned char> buffer_ = std::vector<unsigned char>(std::size_t(1) << 20);
  std::size_t start_ = 0, end_ = 0;
  std::uint64_t read_ = 0;  // bytes read from the file so far
  bool at_end_ = false;
};

}  // namespace gzip_detail

// who: the message prefix ("vit", "gpt2"). Container: std::string or std::vector<std::uint8_t>.
template <class Container>
Container read_maybe_gzip(const std::string& path, std::size_t max_bytes, const char* who) {
  std::error_code error;
  const std::filesystem::file_status status = std::filesystem::status(path, error);
  moe::check(std::filesystem::exists(status), who, ": ", path, " does not exist");
  moe::check(std::filesystem::is_regular_file(status), who, ": ", path, " is not a regular file");
  const std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(std::fopen(path.c_str(), "rb"), &std::fclose);
  moe::check(file != nullptr, who, ": cannot open ", path, " (", std::strerror(errno), ")");
  gzip_detail::InputWindow in(file.get(), path, who);
  Container bytes;
  const auto append = [&](const unsigned char* data, std::size_t size) {
    moe::check(size <= max_bytes - bytes.size(), who, ": ", path, " inflates to more than ", max_bytes, " bytes");
    bytes.insert(bytes.end(), data, data + size);
  };

  if (!gzip_detail::starts_with_gzip_magic(in.data(), in.fill(2))) {  // a plain file
    while (in.fill(1) > 0) append(in.data(), in.available()), in.consume(in.available());
    return bytes;
  }

  z_stream stream{};
  moe::check(inflateInit2(&stream, 16 + MAX_WBITS) == Z_OK, who, ": ", path, ": zlib could not start inflating");
  const std::unique_ptr<z_stream, int (*)(z_stream*)> end_stream(&stream, &inflateEnd);
  std::vector<unsigned char> out(std::size_t(1) << 20);
  for (;;) {
    if (in.available() == 0) in.fill(1);
    stream.next_in = in.data();
    stream.avail_in = unsigned(in.available());  // at most the window's 1 MiB
    stream.next_out = out.data();
    stream.avail_out = unsigned(out.size());
    const unsigned given = stream.avail_in;
    const int result = inflate(&stream, Z_NO_FLUSH);
    in.consume(given - stream.avail_in);
    append(out.data(), out.size() - stream.avail_out);
    if (result == Z_STREAM_END) {  // a member's end: another member, the file's end, or trailing bytes
      if (in.fill(2) == 0) return bytes;
      const std::uint64_t at = in.offset();
      if (gzip_detail::starts_with_gzip_magic(in.data(), in.available())) {
        inflateReset(&stream);
        continue;
      }
      moe::check(!(in.available() == 1 && in.data()[0] == 0x1f), who, ": ", path,
                 ": truncated gzip data (the file ends inside the next member's header, at byte ", at + 1, ")");
      moe::fail(who, ": ", path, ": the bytes after the gzip data are not gzip (", std::filesystem::file_size(path) - at,
                " of them, from byte ", at, "): a damaged or appended-to file; gzip -dc ", path,
                " > out.txt keeps the data before them");
    }
    moe::check(result == Z_OK || result == Z_BUF_ERROR, who, ": ", path, ": corrupt or truncated gzip data (zlib: ",
               stream.msg != nullptr ? stream.msg : zError(result), ", at byte ", in.offset(), ")");
    // Room to write and no input left: the member needs bytes the file does not have.
    moe::check(!(stream.avail_out > 0 && in.available() == 0 && in.at_end()), who, ": ", path,
               ": truncated gzip data (the file ends inside a gzip stream, at byte ", in.offset(), ")");
  }
}

}  // namespace examples
