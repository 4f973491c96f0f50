// moe/io/shards.hpp: llm.c's token shards (the files its dev/data/*.py scripts write).
//
// File layout (little-endian):
//   256 x int32   header: [0] = 20240520 (magic), [1] = 1 (version), [2] = token count n, rest 0
//   n x uint16    the GPT-2 token ids
//
// The reader checks the magic, the version and that the file holds exactly n tokens (a shard
// cut short by an interrupted download, or with bytes appended, is an error naming both sizes).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moe/config.hpp"
#include "moe/io/file_checks.hpp"
#include "moe/io/safetensors.hpp"  // detail::write_file_atomically

namespace moe::io {

inline constexpr std::int32_t token_shard_magic = 20240520;
inline constexpr std::int32_t token_shard_version = 1;
inline constexpr std::size_t token_shard_header_bytes = 256 * sizeof(std::int32_t);

inline std::vector<std::uint16_t> read_token_shard(const std::filesystem::path& path) {
  const std::string file = path.string();
  detail::check_regular_file(path, "a token shard");
  std::ifstream in(path, std::ios::binary);
  check(bool(in), "cannot open token shard ", file);
  std::error_code error;
  const std::uintmax_t file_size = std::filesystem::file_size(path, error);
  check(!error, "cannot determine the size of ", file, ": ", error.message());
  check(file_size >= token_shard_header_bytes, file, ": file is ", file_size, " bytes, shorter than the ",
        token_shard_header_bytes, "-byte token shard header");

  std::int32_t header[256];
  in.read(reinterpret_cast<char*>(header), std::streamsize(sizeof header));
  check(bool(in), file, ": reading the header failed");
  check(header[0] == token_shard_magic, file, ": magic number is ", header[0], ", expected ", token_shard_magic,
        " (not an llm.c token shard?)");
  check(header[1] == token_shard_version, file, ": token shard version ", header[1], " is not supported (expected ",
        token_shard_version, ")");
  const std::int32_t tokens = header[2];
  check(tokens >= 0, file, ": header says ", tokens, " tokens, a negative count");
  const std::uintmax_t token_bytes = file_size - token_shard_header_bytes;
  check(token_bytes == std::uintmax_t(tokens) * sizeof(std::uint16_t), file, ": header says ", tokens,
        " tokens (", std::uintmax_t(tokens) * sizeof(std::uint16_t), " bytes) but the file holds ", token_bytes,
        " bytes after the header", token_bytes < std::uintmax_t(tokens) * 2 ? " (truncated?)" : "");

  std::vector<std::uint16_t> result(static_cast<std::size_t>(tokens));
  in.read(reinterpret_cast<char*>(result.data()), std::streamsize(token_bytes));
  check(in.gcount() == std::streamsize(token_bytes), file, ": reading the tokens failed after ", in.gcount(),
        " of ", token_bytes, " bytes");
  return result;
}

// Writes `<path>.tmp` and renames it to `path`.
inline void write_token_shard(const std::filesystem::path& path, std::span<const std::uint16_t> tokens) {
  check(tokens.size() <= std::size_t(std::numeric_limits<std::int32_t>::max()), path.string(), ": ",
        tokens.size(), " tokens do not fit one shard (at most 2^31 - 1)");
  std::int32_t header[256] = {};
  header[0] = token_shard_magic;
  header[1] = token_shard_version;
  header[2] = std::int32_t(tokens.size());
  const std::span<const std::byte> parts[] = {std::as_bytes(std::span(header)), std::as_bytes(tokens)};
  detail::write_file_atomically(path, parts);
}

namespace detail {

// Glob matching of one file name against a pattern where '*' stands for any run of characters.
inline bool matches_wildcard(std::string_view name, std::string_view pattern) {
  std::size_t n = 0, p = 0, star = std::string_view::npos, resume = 0;
  while (n < name.size()) {
    if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      resume = n;
    } else if (p < pattern.size() && pattern[p] == name[n]) {
      ++p;
      ++n;
    } else if (star != std::string_view::npos) {
      p = star + 1;
      n = ++resume;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

}  // namespace detail

// The shards `where` names, sorted by file name:
//   a file                      -> that file
//   a directory                 -> its *.bin files
//   dir/pattern with '*'s       -> the files in dir matching the pattern (llm.c's
//                                  "fineweb_train_*.bin", keeping train and val apart)
// Throws if nothing matches.
inline std::vector<std::filesystem::path> list_token_shards(const std::filesystem::path& where) {
  namespace fs = std::filesystem;
  std::error_code error;
  if (fs::is_regular_file(where, error)) return {where};
  fs::path directory = where;
  std::string pattern = "*.bin";
  if (!fs::is_directory(where, error)) {
    const std::string name = where.filename().string();
    check(name.find('*') != std::string::npos, where.string(), ": no such file or directory");
    directory = where.parent_path().empty() ? fs::path(".") : where.parent_path();
    pattern = name;
    check(fs::is_directory(directory, error), directory.string(), ": no such directory (from the pattern ",
          where.string(), ")");
  }
  std::vector<fs::path> shards;
  try {
    for (const fs::directory_entry& entry : fs::directory_iterator(directory))
      if (entry.is_regular_file() && detail::matches_wildcard(entry.path().filename().string(), pattern))
        shards.push_back(entry.path());
  } catch (const fs::filesystem_error& e) {
    fail("cannot list ", directory.string(), ": ", e.code().message());
  }
  check(!shards.empty(), "no token shards matching ", pattern, " in ", directory.string());
  std::sort(shards.begin(), shards.end(),
            [](const fs::path& a, const fs::path& b) { return a.filename().string() < b.filename().string(); });
  return shards;
}

}  // namespace moe::io
