// moe/io/file_checks.hpp: what the file readers (safetensors.hpp, shards.hpp) ask of a path before
// they open it.
#pragma once

#include <filesystem>
#include <string_view>
#include <system_error>

#include "moe/config.hpp"

namespace moe::io::detail {

// A regular file, or a link to one. A directory is named as such; a pipe, a socket or a device is
// refused too: opening a pipe waits for a writer, and a device may never end. A missing path is
// left to the open, which names it.
inline void check_regular_file(const std::filesystem::path& path, std::string_view expected) {
  std::error_code error;
  const std::filesystem::file_status status = std::filesystem::status(path, error);
  check(!std::filesystem::is_directory(status), path.string(), ": is a directory, expected ", expected);
  check(!std::filesystem::exists(status) || std::filesystem::is_regular_file(status), path.string(),
        ": is not a regular file (a pipe, a socket or a device), expected ", expected);
}

}  // namespace moe::io::detail
