// moe/io/shards.hpp: llm.c token shards: round trip, every header error, listing, mutations.
#include <doctest/doctest.h>
#include <sys/stat.h>  // mkfifo

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <moe/io/shards.hpp>
#include <random>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

struct TemporaryDirectory {
  fs::path path;
  TemporaryDirectory() {
    std::random_device entropy;
    path = fs::temp_directory_path() / ("moe-test-shards-" + std::to_string(entropy()) + std::to_string(entropy()));
    fs::create_directories(path);
  }
  ~TemporaryDirectory() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

void write_bytes(const fs::path& path, const std::vector<std::byte>& bytes) {
  fs::remove(path);  // a fresh file: truncating one in place makes ext4 flush it on close (slow)
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
}

// A shard written by hand, as llm.c's Python scripts write it (header fields given explicitly).
std::vector<std::byte> shard_bytes(std::int32_t magic, std::int32_t version, std::int32_t count,
                                   const std::vector<std::uint16_t>& tokens) {
  std::int32_t header[256] = {};
  header[0] = magic;
  header[1] = version;
  header[2] = count;
  std::vector<std::byte> bytes(sizeof header + tokens.size() * 2);
  std::memcpy(bytes.data(), header, sizeof header);
  if (!tokens.empty()) std::memcpy(bytes.data() + sizeof header, tokens.data(), tokens.size() * 2);
  return bytes;
}

std::string read_error(const fs::path& path) {
  try {
    moe::io::read_token_shard(path);
  } catch (const moe::Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& text, std::string_view part) { return text.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("shards: written tokens read back exactly, with llm.c's header") {
  TemporaryDirectory directory;
  std::vector<std::uint16_t> tokens(1000);
  std::mt19937 rng(5);
  for (auto& t : tokens) t = std::uint16_t(rng() % 50257);
  tokens[0] = 50256;  // <|endoftext|>
  tokens[1] = 65535;
  const fs::path path = directory.path / "train_000.bin";
  moe::io::write_token_shard(path, tokens);
  CHECK_FALSE(fs::exists(directory.path / "train_000.bin.tmp"));
  CHECK(fs::file_size(path) == 1024 + 2 * tokens.size());
  CHECK(moe::io::read_token_shard(path) == tokens);

  std::ifstream in(path, std::ios::binary);
  std::int32_t header[256];
  in.read(reinterpret_cast<char*>(header), sizeof header);
  CHECK(header[0] == 20240520);
  CHECK(header[1] == 1);
  CHECK(header[2] == 1000);
  CHECK(std::all_of(header + 3, header + 256, [](std::int32_t v) { return v == 0; }));

  moe::io::write_token_shard(path, std::vector<std::uint16_t>{});
  CHECK(moe::io::read_token_shard(path).empty());
}

TEST_CASE("shards: header errors name the file and the problem") {
  TemporaryDirectory directory;
  const fs::path path = directory.path / "s.bin";
  const std::vector<std::uint16_t> three{1, 2, 3};

  write_bytes(path, std::vector<std::byte>(1000));
  CHECK(contains(read_error(path), "s.bin: file is 1000 bytes, shorter than the 1024-byte token shard header"));
  write_bytes(path, {});
  CHECK(contains(read_error(path), "file is 0 bytes"));
  write_bytes(path, shard_bytes(20240521, 1, 3, three));
  CHECK(contains(read_error(path), "s.bin: magic number is 20240521, expected 20240520"));
  write_bytes(path, shard_bytes(20240520, 2, 3, three));
  CHECK(contains(read_error(path), "s.bin: token shard version 2 is not supported (expected 1)"));
  write_bytes(path, shard_bytes(20240520, 1, -3, three));
  CHECK(contains(read_error(path), "header says -3 tokens, a negative count"));
  write_bytes(path, shard_bytes(20240520, 1, 4, three));
  CHECK(contains(read_error(path), "header says 4 tokens (8 bytes) but the file holds 6 bytes after the header (truncated?)"));
  write_bytes(path, shard_bytes(20240520, 1, 2, three));
  CHECK(contains(read_error(path), "header says 2 tokens (4 bytes) but the file holds 6 bytes after the header"));
  std::vector<std::byte> odd = shard_bytes(20240520, 1, 3, three);
  odd.push_back(std::byte{0});
  write_bytes(path, odd);
  CHECK(contains(read_error(path), "but the file holds 7 bytes"));
  write_bytes(path, shard_bytes(20240520, 1, 3, three));
  CHECK(moe::io::read_token_shard(path) == three);

  CHECK(contains(read_error(directory.path / "missing.bin"), "cannot open token shard"));
  CHECK(contains(read_error(directory.path), "is a directory"));
  const std::filesystem::path pipe = directory.path / "pipe.bin";  // the open would wait for a writer
  REQUIRE(mkfifo(pipe.c_str(), 0600) == 0);
  CHECK(contains(read_error(pipe), "is not a regular file"));
}

TEST_CASE("shards: listing takes a file, a directory's *.bin, or a wildcard pattern, sorted by name") {
  TemporaryDirectory directory;
  const std::vector<std::uint16_t> tokens{1};
  for (const char* name : {"fineweb_val_000000.bin", "fineweb_train_000002.bin", "fineweb_train_000001.bin",
                           "notes.txt", "fineweb_train_000003.bin.tmp"})
    moe::io::write_token_shard(directory.path / name, tokens);
  fs::create_directories(directory.path / "sub.bin");  // a directory is never a shard

  const auto names = [](const std::vector<fs::path>& paths) {
    std::vector<std::string> out;
    for (const fs::path& p : paths) out.push_back(p.filename().string());
    return out;
  };
  CHECK(names(moe::io::list_token_shards(directory.path)) ==
        std::vector<std::string>{"fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_val_000000.bin"});
  CHECK(names(moe::io::list_token_shards(directory.path / "fineweb_train_*.bin")) ==
        std::vector<std::string>{"fineweb_train_000001.bin", "fineweb_train_000002.bin"});
  CHECK(names(moe::io::list_token_shards(directory.path / "*val*")) ==
        std::vector<std::string>{"fineweb_val_000000.bin"});
  CHECK(names(moe::io::list_token_shards(directory.path / "notes.txt")) == std::vector<std::string>{"notes.txt"});

  CHECK_THROWS_WITH_AS(moe::io::list_token_shards(directory.path / "missing.bin"),
                       doctest::Contains("missing.bin: no such file or directory"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::io::list_token_shards(directory.path / "tiny_*.bin"),
                       doctest::Contains("no token shards matching tiny_*.bin in"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::io::list_token_shards(directory.path / "nodir" / "*.bin"),
                       doctest::Contains("no such directory"), moe::Error);
  fs::create_directories(directory.path / "empty");
  CHECK_THROWS_WITH_AS(moe::io::list_token_shards(directory.path / "empty"),
                       doctest::Contains("no token shards matching *.bin"), moe::Error);
}

TEST_CASE("shards: wildcard matching follows shell globbing for '*'") {
  using moe::io::detail::matches_wildcard;
  CHECK(matches_wildcard("a.bin", "*.bin"));
  CHECK(matches_wildcard(".bin", "*.bin"));
  CHECK_FALSE(matches_wildcard("a.bin.tmp", "*.bin"));
  CHECK(matches_wildcard("train_01.bin", "train_*.bin"));
  CHECK_FALSE(matches_wildcard("val_01.bin", "train_*.bin"));
  CHECK(matches_wildcard("abcbcd", "a*bcd"));
  CHECK(matches_wildcard("anything", "*"));
  CHECK(matches_wildcard("exact", "exact"));
  CHECK_FALSE(matches_wildcard("exact", "exac"));
  CHECK(matches_wildcard("x", "**x**"));
}

TEST_CASE("shards: the writer refuses a path it cannot create") {
  TemporaryDirectory directory;
  CHECK_THROWS_WITH_AS(moe::io::write_token_shard(directory.path / "no" / "dir.bin", std::vector<std::uint16_t>{1}),
                       doctest::Contains("cannot open"), moe::Error);
}

TEST_CASE("shards: mutated and truncated shards either read or throw moe::Error") {
  TemporaryDirectory directory;
  std::vector<std::uint16_t> tokens(64);
  for (std::size_t i = 0; i < tokens.size(); ++i) tokens[i] = std::uint16_t(i * 997);
  const std::vector<std::byte> valid = shard_bytes(20240520, 1, std::int32_t(tokens.size()), tokens);
  const fs::path path = directory.path / "m.bin";
  int read = 0, rejected = 0;
  const auto attempt = [&](const std::vector<std::byte>& bytes) {
    write_bytes(path, bytes);
    try {
      const auto result = moe::io::read_token_shard(path);
      CHECK(result.size() * 2 + 1024 == bytes.size());
      ++read;
    } catch (const moe::Error&) {
      ++rejected;
    }
  };
  for (std::size_t length = 0; length < valid.size(); length += 7)
    attempt(std::vector<std::byte>(valid.begin(), valid.begin() + std::ptrdiff_t(length)));
  std::mt19937 rng(77);
  for (int i = 0; i < 600; ++i) {
    std::vector<std::byte> bytes = valid;
    const std::size_t at = rng() % 12;  // the magic, version and count fields
    switch (rng() % 3) {
      case 0: bytes[at] ^= std::byte(1u << (rng() % 8)); break;
      case 1: bytes[at] = (rng() % 2) ? std::byte{0xFF} : std::byte{0x00}; break;
      default: bytes.insert(bytes.end(), std::size_t(1 + rng() % 4), std::byte{0}); break;
    }
    if (i % 5 == 0) bytes[rng() % bytes.size()] = std::byte(rng());  // anywhere, tokens included
    attempt(bytes);
  }
  CHECK(read + rejected == int((valid.size() + 6) / 7) + 600);
  CHECK(read > 0);
  CHECK(rejected > 0);
}
