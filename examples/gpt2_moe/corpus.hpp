// examples/gpt2_moe/corpus.hpp: the GPT-2 example's training text: documents read from a file or
// a folder, a deterministic train/validation split, and the two token streams.
//
//   documents = load_documents(default_corpus_path());   // Debian's fortunes, or any text
//   split     = split_documents(std::move(documents));   // ~5% to validation, by a hash of the text
//   streams   = tokenize(split, ByteTokenizer{});        // or a BpeTokenizer for gpt2-small
//
// Documents. A fortune file (one with a line that is exactly "%") holds one document per
// fortune: the text between "%" lines, without them. Any other text file holds one document per
// paragraph: runs of lines separated by blank (whitespace-only) lines; a single book is thereby
// many documents, enough for a split. A dictd database (Debian's dict-* packages: "x.dict" or
// "x.dict.dz") holds one document per entry: an entry starts at an unindented line that follows
// an indented or blank one (WordNet's entries have no blank lines between them). Documents keep
// their bytes exactly (line ends included); whitespace-only ones are dropped. Gzip files (.gz,
// .dz) are read inflated.
//
// Folders are read recursively, files in path order, skipping: hidden entries (".name"), binary
// files (a NUL byte), fortune indexes ("x.dat" beside "x"), dictd indexes ("x.index" beside
// "x.dict[.dz]") and links to files inside the folder (Debian's "x.u8 -> x"), which are read
// under their own names. A folder of links to /usr/share/dictd/*.dict.dz is a corpus of
// dictionaries.
//
// Token streams put the tokenizer's separator before every document (as llm.c does with
// <|endoftext|>), so each document starts after a separator: '\n' for bytes (the stream reads as
// the documents with blank lines between them), <|endoftext|> (50256) for GPT-2's BPE.
#pragma once

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "../common/gzip.hpp"
#include "bpe.hpp"
#include "moe/config.hpp"
#include "moe/random.hpp"

namespace gpt2 {

using moe::Index;

// ---- tokenizers --------------------------------------------------------------------------------

template <class T>
concept Tokenizer = requires(const T& tokenizer, std::string_view text, std::span<const std::int32_t> ids) {
  { tokenizer.encode(text) } -> std::same_as<std::vector<std::int32_t>>;  // bytes -> ids
  { tokenizer.decode(ids) } -> std::same_as<std::string>;                 // ids -> bytes
  { tokenizer.vocab_size() } -> std::convertible_to<Index>;               // every id is below it
  { tokenizer.document_separator() } -> std::same_as<std::int32_t>;       // the id before each document
};

// Byte-level: id = byte, vocabulary 256 (the small config).
struct ByteTokenizer {
  std::vector<std::int32_t> encode(std::string_view text) const {
    std::vector<std::int32_t> ids(text.size());
    for (std::size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
    return ids;
  }
  std::string decode(std::span<const std::int32_t> ids) const {
    std::string text(ids.size(), '\0');
    for (std::size_t i = 0; i < ids.size(); ++i) {
      moe::check(ids[i] >= 0 && ids[i] < 256, "gpt2: decode: token id ", ids[i], " at position ", i,
                 " is not a byte (the byte tokenizer's vocabulary is [0, 256))");
      text[i] = char(ids[i]);
    }
    return text;
  }
  Index vocab_size() const { return 256; }
  std::int32_t document_separator() const { return '\n'; }
};

static_assert(Tokenizer<ByteTokenizer>);
static_assert(Tokenizer<BpeTokenizer>);

// ---- documents ---------------------------------------------------------------------------------

// Debian's `fortunes` package: a few MB of English quotations, jokes and verse.
inline std::filesystem::path default_corpus_path() {
  const std::filesystem::path path = "/usr/share/games/fortunes";
  std::error_code error;
  moe::check(std::filesystem::is_directory(path, error), "gpt2: the default corpus ", path.string(),
             " is missing: install the Debian package `fortunes` (scripts/setup.sh does), or name a text "
             "file or folder");
  return path;
}

namespace corpus_detail {

inline bool is_blank(std::string_view text) {
  return text.find_first_not_of(" \t\n\r\f\v") == std::string_view::npos;
}

// Calls visit(line_start, line_end, next_line_start) for each line; line_end excludes "\n".
template <class Visit>
void for_each_line(std::string_view text, Visit&& visit) {
  for (std::size_t start = 0; start < text.size();) {
    const std::size_t newline = text.find('\n', start);
    const std::size_t end = newline == std::string_view::npos ? text.size() : newline;
    const std::size_t next = newline == std::string_view::npos ? text.size() : newline + 1;
    visit(start, end, next);
    start = next;
  }
}

inline bool is_fortune_separator(std::string_view line) { return line == "%" || line == "%\r"; }

// A text file's bytes; gzip (.gz, dictd's .dz) is inflated, so Debian's compressed texts read
// directly (dict-gcide's /usr/share/dictd/gcide.dict.dz: 40 MB of dictionary text).
inline constexpr std::size_t kMaxCorpusFileBytes = std::size_t(1) << 32;
inline std::string read_text_file(const std::filesystem::path& path) {
  return examples::read_maybe_gzip<std::string>(path.string(), kMaxCorpusFileBytes, "gpt2: corpus file");
}

inline bool is_binary(std::string_view text) { return text.find('\0') != std::string_view::npos; }

}  // namespace corpus_detail

// A file's text -> its documents (the fortune or paragraph rule above), in order.
inline std::vector<std::string> split_file_text(std::string_view text) {
  using namespace corpus_detail;
  bool fortune = false;
  for_each_line(text, [&](std::size_t start, std::size_t end, std::size_t) {
    fortune = fortune || is_fortune_separator(text.substr(start, end - start));
  });
  std::vector<std::string> documents;
  const auto keep = [&](std::size_t start, std::size_t end) {
    const std::string_view document = text.substr(start, end - start);
    if (!is_blank(document)) documents.emplace_back(document);
  };
  std::size_t document_start = 0;
  if (fortune) {
    for_each_line(text, [&](std::size_t start, std::size_t end, std::size_t next) {
      if (!is_fortune_separator(text.substr(start, end - start))) return;
      keep(document_start, start);
      document_start = next;
    });
    keep(document_start, text.size());
  } else {
    std::size_t document_end = 0;  // after the paragraph's last non-blank line; 0 while none
    for_each_line(text, [&](std::size_t start, std::size_t end, std::size_t next) {
      if (!is_blank(text.substr(start, end - start))) {
        if (document_end == 0) document_start = start;
        document_end = next;
      } else if (document_end != 0) {
        keep(document_start, document_end);
        document_end = 0;
      }
    });
    if (document_end != 0) keep(document_start, document_end);
  }
  return documents;
}

// A dictd database's text -> one document per entry (the rule above), in order.
inline std::vector<std::string> split_dictd_text(std::string_view text) {
  using namespace corpus_detail;
  std::vector<std::string> documents;
  std::size_t entry_start = 0;
  bool in_body = false;  // the previous line was indented or blank
  const auto keep = [&](std::size_t start, std::size_t end) {
    const std::string_view document = text.substr(start, end - start);
    if (!is_blank(document)) documents.emplace_back(document);
  };
  for_each_line(text, [&](std::size_t start, std::size_t end, std::size_t) {
    const std::string_view line = text.substr(start, end - start);
    const bool head = !is_blank(line) && line.front() != ' ' && line.front() != '\t';
    if (head && in_body) {
      keep(entry_start, start);
      entry_start = start;
    }
    in_body = !head;
  });
  keep(entry_start, text.size());
  return documents;
}

inline bool is_dictd_file(const std::filesystem::path& path) {
  const std::string name = path.filename().string();
  return name.ends_with(".dict") || name.ends_with(".dict.dz");
}

// A text file, or every text file under a folder, -> documents, in a deterministic order.
inline std::vector<std::string> load_documents(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  using namespace corpus_detail;
  std::error_code error;
  const fs::file_status status = fs::status(path, error);
  moe::check(fs::exists(status), "gpt2: the corpus path ", path.string(), " does not exist");

  std::vector<std::string> documents;
  const auto add_file = [&](const std::filesystem::path& file, const std::string& text) {
    for (std::string& document : is_dictd_file(file) ? split_dictd_text(text) : split_file_text(text))
      documents.push_back(std::move(document));
  };

  if (!fs::is_directory(status)) {
    moe::check(fs::is_regular_file(status), "gpt2: the corpus path ", path.string(), " is neither a file nor a folder");
    const std::string text = read_text_file(path);
    moe::check(!is_binary(text), "gpt2: the corpus file ", path.string(), " is not text (it has NUL bytes)");
    add_file(path, text);
    moe::check(!documents.empty(), "gpt2: the corpus file ", path.string(), " has no documents (only whitespace)");
    return documents;
  }

  const fs::path root = fs::canonical(path, error);
  moe::check(!error, "gpt2: cannot resolve the corpus folder ", path.string(), ": ", error.message());
  const auto inside_root = [&](const fs::path& target) {
    const fs::path relative = target.lexically_relative(root);
    return !relative.empty() && *relative.begin() != "..";
  };
  std::vector<fs::path> files;
  std::size_t skipped = 0;
  fs::recursive_directory_iterator entries(root, error), end;
  moe::check(!error, "gpt2: cannot list the corpus folder ", path.string(), ": ", error.message());
  for (; entries != end; entries.increment(error)) {
    moe::check(!error, "gpt2: cannot list the corpus folder ", path.string(), ": ", error.message());
    const fs::directory_entry& entry = *entries;
    const fs::path& file = entry.path();
    const std::string name = file.filename().string();
    if (name.starts_with(".")) {
      if (entry.is_directory(error) && !entry.is_symlink(error)) entries.disable_recursion_pending();
      ++skipped;
      continue;
    }
    if (!entry.is_regular_file(error)) {
      if (!entry.is_directory(error)) ++skipped;  // sockets, devices, broken links
      continue;
    }
    if (entry.is_symlink(error)) {
      const fs::path target = fs::canonical(file, error);
      if (error || inside_root(target)) {
        ++skipped;
        continue;
      }
    }
    if (file.extension() == ".dat" && fs::is_regular_file(fs::path(file).replace_extension(), error)) {
      ++skipped;
      continue;
    }
    if (file.extension() == ".index" && (fs::exists(fs::path(file).replace_extension(".dict"), error) ||
                                         fs::exists(fs::path(file).replace_extension(".dict.dz"), error))) {
      ++skipped;
      continue;
    }
    files.push_back(file);
  }
  std::sort(files.begin(), files.end());

  std::size_t text_files = 0;
  for (const fs::path& file : files) {
    const std::string text = read_text_file(file);
    if (is_binary(text)) {
      ++skipped;
      continue;
    }
    ++text_files;
    add_file(file, text);
  }
  moe::check(text_files > 0, "gpt2: the corpus folder ", path.string(), " has no text files (", skipped,
             " entries skipped: binary files, fortune indexes, links to files inside it, hidden entries)");
  moe::check(!documents.empty(), "gpt2: the corpus folder ", path.string(), " has no documents (its ", text_files,
             " text files hold only whitespace)");
  return documents;
}

// ---- train / validation split --------------------------------------------------------------------

inline constexpr double kValidationFraction = 0.05;
inline constexpr std::uint64_t kSplitSeed = 20260101;

// Whether a document belongs to validation: a uniform number drawn from a hash of its bytes (and
// the seed) falls below the fraction. It depends on nothing else, so adding files never moves
// another document across, and duplicate documents always land on the same side.
inline bool in_validation(std::string_view document, double validation_fraction, std::uint64_t seed = kSplitSeed) {
  std::uint64_t hash = 0xcbf29ce484222325ULL;  // FNV-1a
  for (const char c : document) hash = (hash ^ static_cast<unsigned char>(c)) * 0x100000001b3ULL;
  constexpr std::uint64_t stream = 0x636f72707573;  // "corpus"
  return moe::random::uniform(seed, stream, hash) < validation_fraction;
}

struct DocumentSplit {
  std::vector<std::string> train, validation;  // each in the corpus order
};

// Both sides must be non-empty: a corpus too small for the fraction is an error that says so.
inline DocumentSplit split_documents(std::vector<std::string> documents,
                                     double validation_fraction = kValidationFraction,
                                     std::uint64_t seed = kSplitSeed) {
  moe::check(validation_fraction > 0 && validation_fraction < 1,
             "gpt2: the validation fraction must be in (0, 1), got ", validation_fraction);
  DocumentSplit split;
  for (std::string& document : documents) {
    auto& side = in_validation(document, validation_fraction, seed) ? split.validation : split.train;
    side.push_back(std::move(document));
  }
  moe::check(!split.train.empty() && !split.validation.empty(), "gpt2: splitting ", documents.size(),
             " documents with validation fraction ", validation_fraction, " put ", split.train.size(),
             " in training and ", split.validation.size(),
             " in validation; both need at least one (use more text or another fraction)");
  return split;
}

// ---- token streams -------------------------------------------------------------------------------

// documents -> [separator, document 0's ids..., separator, document 1's ids..., ...]
template <Tokenizer T>
std::vector<std::int32_t> tokenize_documents(std::span<const std::string> documents, const T& tokenizer) {
  std::vector<std::int32_t> stream;
  for (const std::string& document : documents) {
    stream.push_back(tokenizer.document_separator());
    const std::vector<std::int32_t> ids = tokenizer.encode(document);
    stream.insert(stream.end(), ids.begin(), ids.end());
  }
  return stream;
}

struct TokenStreams {
  std::vector<std::int32_t> train, validation;
};

template <Tokenizer T>
TokenStreams tokenize(const DocumentSplit& split, const T& tokenizer) {
  return {tokenize_documents(std::span<const std::string>(split.train), tokenizer),
          tokenize_documents(std::span<const std::string>(split.validation), tokenizer)};
}

}  // namespace gpt2
