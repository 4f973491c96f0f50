// tests/torch_parity/manifest_writer.hpp: how the dump programs hand tensors to parity.py: one
// raw little-endian float32 file per tensor plus manifest.txt, one line per tensor
// ("tensor CASE NAME FILE RANK DIMS...") or value ("scalar CASE KEY VALUE") or free-form line.
#pragma once

#include <moe/tensor.hpp>

#include <bit>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

static_assert(std::endian::native == std::endian::little, "the dump format is little-endian float32");

namespace parity {

namespace fs = std::filesystem;
using moe::Index;

class Writer {
 public:
  explicit Writer(fs::path dir) : dir_(std::move(dir)), manifest_(dir_ / "manifest.txt") {
    if (!manifest_) throw std::runtime_error("cannot write " + (dir_ / "manifest.txt").string());
    manifest_.precision(17);
  }

  void line(const std::string& text) { manifest_ << text << '\n'; }

  void tensor(const std::string& kase, const std::string& name, const std::vector<Index>& shape, const float* data,
              std::size_t count) {
    std::size_t expected = 1;
    for (Index d : shape) expected *= std::size_t(d);
    if (expected != count) throw std::runtime_error("shape of " + kase + "/" + name + " does not match its size");
    const std::string file = kase + "__" + name + ".f32";
    std::ofstream out(dir_ / file, std::ios::binary);
    out.write(reinterpret_cast<const char*>(data), std::streamsize(count * sizeof(float)));
    if (!out) throw std::runtime_error("cannot write " + file);
    manifest_ << "tensor " << kase << ' ' << name << ' ' << file << ' ' << shape.size();
    for (Index d : shape) manifest_ << ' ' << d;
    manifest_ << '\n';
  }
  void tensor(const std::string& kase, const std::string& name, const std::vector<Index>& shape,
              const std::vector<float>& data) {
    tensor(kase, name, shape, data.data(), data.size());
  }
  void ids(const std::string& kase, const std::string& name, const std::vector<std::int32_t>& values) {
    tensor(kase, name, {Index(values.size())}, std::vector<float>(values.begin(), values.end()));
  }
  void matrix(const std::string& kase, const std::string& name, moe::ConstMatrixView<float> m) {
    std::vector<float> packed(std::size_t(m.rows * m.cols));
    for (Index r = 0; r < m.rows; ++r)
      for (Index c = 0; c < m.cols; ++c) packed[std::size_t(r * m.cols + c)] = m(r, c);
    tensor(kase, name, {m.rows, m.cols}, packed.data(), packed.size());
  }
  template <class V>
  void scalar(const std::string& kase, const std::string& key, V value) {
    manifest_ << "scalar " << kase << ' ' << key << ' ' << value << '\n';
  }

  void finish() {
    manifest_.flush();
    if (!manifest_) throw std::runtime_error("writing the manifest failed");
  }

 private:
  fs::path dir_;
  std::ofstream manifest_;
};

}  // namespace parity
