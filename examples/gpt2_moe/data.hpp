// examples/gpt2_moe/data.hpp: what --data and --tokenizer turn into: training and validation token
// streams. Three sources:
//   - llm.c token shards (a .bin file, or a folder of them): files whose name contains "val" are
//     the validation split (llm.c's fineweb_val_000000.bin); without one, the last 5% of tokens;
//   - a text file or folder of text files (corpus.hpp: documents, a deterministic 95/5 split);
//   - nothing: the default corpus, Debian's fortunes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <string>
#include <variant>
#include <vector>

#include "bpe.hpp"
#include "corpus.hpp"
#include "moe/io/shards.hpp"
#include "train.hpp"

namespace gpt2 {

// The tokenizer chosen at run time by name: "bytes" (vocabulary 256) or "gpt2-bpe" (50257).
class TextTokenizer {
 public:
  static TextTokenizer make(const std::string& name, Index model_vocab) {
    TextTokenizer tokenizer;
    tokenizer.name_ = name;
    if (name == "bytes") tokenizer.impl_ = ByteTokenizer{};
    else if (name == "gpt2-bpe") tokenizer.impl_ = BpeTokenizer::load(default_bpe_dir());
    else moe::fail("gpt2_moe: --tokenizer must be bytes or gpt2-bpe, got '", name, "'");
    moe::check(tokenizer.vocab_size() <= model_vocab, "gpt2_moe: the ", name, " tokenizer has ",
               tokenizer.vocab_size(), " ids but the model's vocabulary is ", model_vocab,
               " (use --config gpt2-small for gpt2-bpe, or --tokenizer bytes)");
    return tokenizer;
  }

  std::vector<std::int32_t> encode(std::string_view text) const {
    return std::visit([&](const auto& t) { return t.encode(text); }, impl_);
  }
  std::string decode(std::span<const std::int32_t> ids) const {
    return std::visit([&](const auto& t) { return t.decode(ids); }, impl_);
  }
  Index vocab_size() const {
    return std::visit([](const auto& t) { return Index(t.vocab_size()); }, impl_);
  }
  const std::string& name() const { return name_; }
  template <class Fn>
  decltype(auto) visit(Fn&& fn) const {
    return std::visit(std::forward<Fn>(fn), impl_);
  }

 private:
  std::string name_;
  std::variant<ByteTokenizer, BpeTokenizer> impl_;
};

namespace detail {

inline std::vector<std::uint16_t> narrow_ids(const std::vector<std::int32_t>& ids, const std::string& what) {
  std::vector<std::uint16_t> out(ids.size());
  for (std::size_t i = 0; i < ids.size(); ++i) {
    moe::check(ids[i] >= 0 && ids[i] <= 0xffff, "gpt2_moe: ", what, ": token id ", ids[i], " does not fit 16 bits");
    out[i] = std::uint16_t(ids[i]);
  }
  return out;
}

inline bool is_shard_source(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  if (fs::is_regular_file(path)) return path.extension() == ".bin";
  if (!fs::is_directory(path)) return false;
  for (const auto& entry : fs::directory_iterator(path))
    if (entry.is_regular_file() && entry.path().extension() == ".bin") return true;
  return false;
}

inline Dataset load_shards(const std::filesystem::path& path, const std::string& tokenizer) {
  Dataset data;
  data.tokenizer = tokenizer;
  std::size_t files = 0;
  for (const std::filesystem::path& shard : moe::io::list_token_shards(path)) {
    const std::vector<std::uint16_t> tokens = moe::io::read_token_shard(shard);
    const bool validation = shard.filename().string().find("val") != std::string::npos;
    std::vector<std::uint16_t>& into = validation ? data.val : data.train;
    into.insert(into.end(), tokens.begin(), tokens.end());
    ++files;
  }
  if (data.val.empty()) {  // no validation shard: hold out the last 5% of the tokens
    const std::size_t held = data.train.size() / 20;
    data.val.assign(data.train.end() - std::ptrdiff_t(held), data.train.end());
    data.train.resize(data.train.size() - held);
  }
  moe::check(!data.train.empty(), "gpt2_moe: the shards in ", path.string(), " hold no training tokens");
  data.description = path.string() + " (" + std::to_string(files) + " llm.c shard(s), " +
                     std::to_string(data.train.size()) + " training + " + std::to_string(data.val.size()) +
                     " validation tokens, " + tokenizer + ")";
  return data;
}

}  // namespace detail

// path: empty for the default corpus. model_vocab bounds the tokenizer's ids.
inline Dataset load_dataset(const std::string& path_text, const std::string& tokenizer_name, Index model_vocab) {
  const std::filesystem::path path = path_text.empty() ? default_corpus_path() : std::filesystem::path(path_text);
  moe::check(std::filesystem::exists(path), "gpt2_moe: --data ", path.string(), " does not exist");
  if (detail::is_shard_source(path)) return detail::load_shards(path, tokenizer_name);

  const TextTokenizer tokenizer = TextTokenizer::make(tokenizer_name, model_vocab);
  std::vector<std::string> documents = load_documents(path);
  std::size_t bytes = 0;
  for (const std::string& d : documents) bytes += d.size();
  const std::size_t count = documents.size();
  const DocumentSplit split = split_documents(std::move(documents));
  const TokenStreams streams = tokenizer.visit([&](const auto& t) { return tokenize(split, t); });
  Dataset data;
  data.tokenizer = tokenizer_name;
  data.train = detail::narrow_ids(streams.train, path.string());
  data.val = detail::narrow_ids(streams.validation, path.string());
  data.description = path.string() + " (" + std::to_string(count) + " documents, " + std::to_string(bytes) +
                     " bytes; " + std::to_string(data.train.size()) + " training + " +
                     std::to_string(data.val.size()) + " validation tokens, " + tokenizer_name + ")";
  return data;
}

}  // namespace gpt2
