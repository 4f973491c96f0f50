// The GPT-2 example's corpus (examples/gpt2_moe/corpus.hpp): documents from fortune files and
// plain text, folders read like Debian's fortunes package, the deterministic train/validation
// split, token streams with separators, and every error naming its path.
#include <doctest/doctest.h>

#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "../examples/gpt2_moe/corpus.hpp"

namespace fs = std::filesystem;
using Docs = std::vector<std::string>;
using Ids = std::vector<std::int32_t>;

namespace {

// A fresh folder under the system's temp directory, removed at the end of the test.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& name) {
    path = fs::temp_directory_path() / ("moe_test_corpus_" + name + "_" + std::to_string(getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
  fs::path write(const std::string& relative, std::string_view text) const {
    const fs::path file = path / relative;
    fs::create_directories(file.parent_path());
    std::ofstream(file, std::ios::binary) << text;
    return file;
  }
};

Docs numbered_documents(int count) {
  Docs documents;
  for (int i = 0; i < count; ++i) documents.push_back("document number " + std::to_string(i) + "\n");
  return documents;
}

}  // namespace

// ---- documents -----------------------------------------------------------------------------------

TEST_CASE("corpus: a fortune file splits at lines that are exactly %, which are dropped") {
  CHECK(gpt2::split_file_text("one\n%\ntwo\nlines\n%\n") == Docs{"one\n", "two\nlines\n"});
  CHECK(gpt2::split_file_text("%\nfirst\n%\n\n  \n%\n%\nlast, no newline") == Docs{"first\n", "last, no newline"});
  CHECK(gpt2::split_file_text("a\r\n%\r\nb\r\n") == Docs{"a\r\n", "b\r\n"});
  // "100%" or "%%" are text; a blank line inside a fortune is kept.
  CHECK(gpt2::split_file_text("100%\n%%\n\nstill one\n%\nx\n") == Docs{"100%\n%%\n\nstill one\n", "x\n"});
}

TEST_CASE("corpus: a plain text file splits into paragraphs at blank lines") {
  CHECK(gpt2::split_file_text("p1 l1\np1 l2\n\n \t\np2\n") == Docs{"p1 l1\np1 l2\n", "p2\n"});
  CHECK(gpt2::split_file_text("\n\n  lead\n\n\ntail") == Docs{"  lead\n", "tail"});
  CHECK(gpt2::split_file_text("only one line") == Docs{"only one line"});
  CHECK(gpt2::split_file_text(" \n\t\n").empty());
  CHECK(gpt2::split_file_text("").empty());
}

TEST_CASE("corpus: on random text the documents are non-blank pieces of the text, in order") {
  std::mt19937 rng(9);
  const std::vector<std::string> alphabet = {"%", "%\n", "\n", "\n\n", " ", "\t", "\r", "a", "b c", std::string(1, '\0')};
  for (int trial = 0; trial < 300; ++trial) {
    std::string text;
    for (std::size_t i = rng() % 40; i > 0; --i) text += alphabet[rng() % alphabet.size()];
    std::size_t position = 0;
    for (const std::string& document : gpt2::split_file_text(text)) {
      CHECK(document.find_first_not_of(" \t\n\r\f\v") != std::string::npos);
      position = text.find(document, position);
      REQUIRE(position != std::string::npos);
      position += document.size();
    }
  }
}

TEST_CASE("corpus: a folder reads like Debian's fortunes: sorted, recursive, skipping indexes, links, binaries") {
  TempDir dir("folder");
  dir.write("b", "fortune one\n%\nfortune two\n");
  dir.write("b.dat", std::string("\0\0\0\2index", 9));      // strfile index beside its file
  fs::create_symlink("b", dir.path / "b.u8");               // Debian's UTF-8 alias
  dir.write("a.txt", "paragraph one\n\nparagraph two\n");
  dir.write("sub/c", "nested\n");
  dir.write("notes.dat", "a .dat without a sibling is text\n");
  dir.write(".hidden", "hidden file\n");
  dir.write(".git/config", "hidden folder\n");
  dir.write("image.bin", std::string("PNG\0\1\2", 6));
  CHECK(gpt2::load_documents(dir.path) ==
        Docs{"paragraph one\n", "paragraph two\n", "fortune one\n", "fortune two\n",
             "a .dat without a sibling is text\n", "nested\n"});
}

TEST_CASE("corpus: a link to a file outside the folder is read") {
  TempDir outside("outside"), dir("linking");
  dir.write("a", "inside\n");
  outside.write("x", "outside\n");
  fs::create_symlink(outside.path / "x", dir.path / "z");
  CHECK(gpt2::load_documents(dir.path) == Docs{"inside\n", "outside\n"});
}

TEST_CASE("corpus: a single file is a corpus of its own") {
  TempDir dir("single");
  CHECK(gpt2::load_documents(dir.write("book.txt", "first\n\nsecond\n")) == Docs{"first\n", "second\n"});
}

TEST_CASE("corpus: gzip files (.gz, dictd's .dz) read as their text; corrupt or truncated ones are errors") {
  TempDir dir("gzip");
  const std::string text = "First paragraph,\ntwo lines.\n\nSecond one.\n\n\nThird.\n";
  const fs::path plain = dir.write("plain.txt", text);
  const fs::path packed = dir.path / "packed.txt.gz";
  {
    gzFile out = gzopen(packed.c_str(), "wb9");
    REQUIRE(out != nullptr);
    REQUIRE(gzwrite(out, text.data(), unsigned(text.size())) == int(text.size()));
    REQUIRE(gzclose(out) == Z_OK);
  }
  CHECK(gpt2::load_documents(packed) == gpt2::load_documents(plain));
  CHECK(gpt2::load_documents(packed).size() == 3);

  std::ifstream in(packed, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const fs::path truncated = dir.write("truncated.gz", bytes.substr(0, bytes.size() - 6));
  CHECK_THROWS_WITH_AS(gpt2::load_documents(truncated), doctest::Contains("truncated.gz"), moe::Error);
  std::string flipped = bytes;
  flipped[flipped.size() / 2] = char(flipped[flipped.size() / 2] ^ 0x5a);
  const fs::path corrupt = dir.write("corrupt.gz", flipped);
  CHECK_THROWS_WITH_AS(gpt2::load_documents(corrupt), doctest::Contains("corrupt or truncated gzip data"), moe::Error);
}

// A gzip member of text, as bytes (zlib's gzwrite through a file).
static std::string gzip_member(const TempDir& dir, const std::string& text) {
  const fs::path path = dir.path / "member.gz";
  gzFile out = gzopen(path.c_str(), "wb6");
  REQUIRE(out != nullptr);
  REQUIRE(gzwrite(out, text.data(), unsigned(text.size())) == int(text.size()));
  REQUIRE(gzclose(out) == Z_OK);
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

TEST_CASE("corpus: gzip members one after another read as their texts joined; other bytes after them are an error") {
  TempDir dir("members");
  const std::string a = "Alpha paragraph.\n\n", b = "Beta paragraph.\n";
  const std::string gz_a = gzip_member(dir, a), gz_b = gzip_member(dir, b), gz_empty = gzip_member(dir, "");
  const auto read = [&](const std::string& name, const std::string& bytes) {
    return gpt2::corpus_detail::read_text_file(dir.write(name, bytes));
  };
  CHECK(read("one.gz", gz_a) == a);
  CHECK(read("two.gz", gz_a + gz_b) == a + b);  // `cat a.gz b.gz`, as gzip -dc reads it
  CHECK(read("empty_member.gz", gz_a + gz_empty + gz_b) == a + b);
  CHECK(read("only_empty.gz", gz_empty).empty());

  // zlib's gzread would drop these bytes without a word: each is an error naming where they start.
  for (const std::string& tail : {std::string("junk\n"), std::string("x"), std::string(512, '\0')}) {
    CAPTURE(tail.size());
    const std::string expected = "the bytes after the gzip data are not gzip (" + std::to_string(tail.size()) +
                                 " of them, from byte " + std::to_string(gz_a.size() + gz_b.size()) + ")";
    CHECK_THROWS_WITH_AS(read("tail.gz", gz_a + gz_b + tail), doctest::Contains(expected.c_str()), moe::Error);
  }

  // Every cut of a two-member file inside a member is truncated data (a cut at a member's end is
  // a whole file); one byte is no gzip magic, so it reads as a plain file.
  const std::string two = gz_a + gz_b;
  for (std::size_t size = 2; size < two.size(); ++size) {
    CAPTURE(size);
    if (size == gz_a.size()) {
      CHECK(read("cut.gz", two.substr(0, size)) == a);
      continue;
    }
    CHECK_THROWS_WITH_AS(read("cut.gz", two.substr(0, size)), doctest::Contains("truncated gzip data"), moe::Error);
  }
}

TEST_CASE("corpus: gzip members longer than the reader's 1 MiB window, joined, read whole") {
  TempDir dir("big_members");
  std::mt19937 rng(7);
  std::string text(3u << 20, ' ');  // letters at random: they deflate to ~60%, so the members span windows
  for (char& c : text) c = char('a' + rng() % 26);
  const std::string first = text.substr(0, 2u << 20), second = text.substr(2u << 20);
  const std::string bytes = gzip_member(dir, first) + gzip_member(dir, second);
  REQUIRE(bytes.size() > (1u << 20) + (1u << 19));
  CHECK(gpt2::corpus_detail::read_text_file(dir.write("big.gz", bytes)) == text);
}

TEST_CASE("corpus: a dictd database splits into entries at unindented lines after indented or blank ones") {
  CHECK(gpt2::split_dictd_text("14\n    adj 1: four\n           more\n14 July\n    n 1: a holiday\n") ==
        Docs{"14\n    adj 1: four\n           more\n", "14 July\n    n 1: a holiday\n"});
  // Blank lines between entries (GCIDE) and multi-line headwords stay with their entry.
  CHECK(gpt2::split_dictd_text("A \\a\\ n.\n   body\n\nB\nB cont\n   body\n\n\n") ==
        Docs{"A \\a\\ n.\n   body\n\n", "B\nB cont\n   body\n\n\n"});
  CHECK(gpt2::split_dictd_text("\n\n").empty());
  TempDir dir("dictd");
  dir.write("d/x.dict", "h1\n  b1\nh2\n  b2\n");
  dir.write("d/x.index", "h1\tA\tB\nh2\tC\tD\n");  // the index beside it is skipped
  dir.write("d/notes.txt", "p1\n\np2\n");
  CHECK(gpt2::load_documents(dir.path / "d") == Docs{"p1\n", "p2\n", "h1\n  b1\n", "h2\n  b2\n"});
}

TEST_CASE("corpus: Debian's dict-gcide (the GPU-scale corpus) reads as about 40 MB of paragraphs") {
  const fs::path gcide = "/usr/share/dictd/gcide.dict.dz";
  REQUIRE_MESSAGE(fs::exists(gcide), "install the Debian package dict-gcide (scripts/setup.sh does)");
  const Docs documents = gpt2::load_documents(gcide);
  std::size_t bytes = 0;
  for (const auto& d : documents) bytes += d.size();
  CHECK(documents.size() > 100000);
  CHECK(bytes > 35'000'000);
  CHECK(std::any_of(documents.begin(), documents.end(),
                    [](const std::string& d) { return d.starts_with("Abdication \\Ab`di*ca\"tion\\, n."); }));
}

TEST_CASE("corpus: missing paths, folders without text and empty text are errors naming the path") {
  TempDir dir("errors");
  const fs::path missing = dir.path / "no_such_file";
  const std::string missing_message = missing.string() + " does not exist";
  CHECK_THROWS_WITH_AS(gpt2::load_documents(missing), doctest::Contains(missing_message.c_str()), moe::Error);

  const fs::path empty = dir.path / "empty";
  fs::create_directories(empty);
  const std::string empty_message = empty.string() + " has no text files";
  CHECK_THROWS_WITH_AS(gpt2::load_documents(empty), doctest::Contains(empty_message.c_str()), moe::Error);

  const fs::path binaries = dir.path / "binaries";
  dir.write("binaries/x", std::string("a\0b", 3));
  dir.write("binaries/.y", "hidden");
  CHECK_THROWS_WITH_AS(gpt2::load_documents(binaries), doctest::Contains("has no text files (2 entries skipped"),
                       moe::Error);

  const fs::path blank = dir.path / "blank";
  dir.write("blank/x", " \n\n\t\n");
  dir.write("blank/y", "%\n%\n");
  const std::string blank_message = blank.string() + " has no documents";
  CHECK_THROWS_WITH_AS(gpt2::load_documents(blank), doctest::Contains(blank_message.c_str()), moe::Error);

  CHECK_THROWS_WITH_AS(gpt2::load_documents("/dev/null"), doctest::Contains("/dev/null is neither a file nor a folder"),
                       moe::Error);
  const fs::path binary_file = dir.write("binary_file", std::string("\0\1", 2));
  CHECK_THROWS_WITH_AS(gpt2::load_documents(binary_file), doctest::Contains("is not text"), moe::Error);
  const fs::path blank_file = dir.write("blank_file", "\n\n");
  const std::string blank_file_message = blank_file.string() + " has no documents";
  CHECK_THROWS_WITH_AS(gpt2::load_documents(blank_file), doctest::Contains(blank_file_message.c_str()), moe::Error);
}

TEST_CASE("corpus: the default corpus is Debian's fortunes, or an error naming the package and setup") {
  if (fs::is_directory("/usr/share/games/fortunes")) {
    CHECK(gpt2::default_corpus_path() == fs::path("/usr/share/games/fortunes"));
    const Docs documents = gpt2::load_documents(gpt2::default_corpus_path());
    CHECK(documents.size() > 1000);
    const gpt2::DocumentSplit split = gpt2::split_documents(documents);
    const double fraction = double(split.validation.size()) / double(documents.size());
    CHECK(fraction > 0.03);
    CHECK(fraction < 0.07);
  } else {
    CHECK_THROWS_WITH_AS(gpt2::default_corpus_path(), doctest::Contains("`fortunes`"), moe::Error);
    CHECK_THROWS_WITH_AS(gpt2::default_corpus_path(), doctest::Contains("scripts/setup.sh"), moe::Error);
  }
}

// ---- split ---------------------------------------------------------------------------------------

TEST_CASE("corpus split: about the fraction goes to validation, keeping the corpus order on each side") {
  const Docs documents = numbered_documents(4000);
  const gpt2::DocumentSplit split = gpt2::split_documents(documents, 0.05);
  CHECK(split.train.size() + split.validation.size() == documents.size());
  // Binomial(4000, 0.05): 200 +- 14 (one standard deviation); the bounds are 5 of them.
  CHECK(split.validation.size() > 130);
  CHECK(split.validation.size() < 270);
  const auto in_order = [&](const Docs& side) {
    std::vector<std::size_t> positions;
    for (const auto& document : side)
      positions.push_back(std::size_t(std::find(documents.begin(), documents.end(), document) - documents.begin()));
    return std::is_sorted(positions.begin(), positions.end());
  };
  CHECK(in_order(split.train));
  CHECK(in_order(split.validation));
}

TEST_CASE("corpus split: a document's side depends on its text and the seed only") {
  const Docs documents = numbered_documents(500);
  const gpt2::DocumentSplit first = gpt2::split_documents(documents);
  const gpt2::DocumentSplit again = gpt2::split_documents(documents);
  CHECK(first.train == again.train);
  CHECK(first.validation == again.validation);
  // More documents around them, in another order: every old document stays on its side.
  Docs more = numbered_documents(1000);
  std::reverse(more.begin(), more.end());
  const gpt2::DocumentSplit larger = gpt2::split_documents(more);
  for (const auto& document : first.validation)
    CHECK(std::find(larger.validation.begin(), larger.validation.end(), document) != larger.validation.end());
  // Duplicates share a side, so no text is in both.
  for (const auto& document : documents)
    CHECK(gpt2::in_validation(document, 0.05) == gpt2::in_validation(std::string(document), 0.05));
  // Another seed draws another split.
  const gpt2::DocumentSplit reseeded = gpt2::split_documents(documents, 0.05, 7);
  CHECK(reseeded.validation != first.validation);
}

TEST_CASE("corpus split: an empty side or a fraction outside (0, 1) is an error") {
  CHECK_THROWS_WITH_AS(gpt2::split_documents(numbered_documents(1)), doctest::Contains("both need at least one"),
                       moe::Error);
  CHECK_THROWS_WITH_AS(gpt2::split_documents(Docs{}), doctest::Contains("splitting 0 documents"), moe::Error);
  for (double fraction : {0.0, 1.0, -0.5, std::nan("")})
    CHECK_THROWS_WITH_AS(gpt2::split_documents(numbered_documents(10), fraction),
                         doctest::Contains("validation fraction must be in (0, 1)"), moe::Error);
}

// ---- token streams -------------------------------------------------------------------------------

TEST_CASE("corpus streams: the separator comes before every document") {
  const gpt2::ByteTokenizer bytes;
  const Docs documents{"ab\n", "c"};
  CHECK(gpt2::tokenize_documents(documents, bytes) == Ids{'\n', 'a', 'b', '\n', '\n', 'c'});
  const gpt2::DocumentSplit split{{"x"}, {"yz", "w"}};
  const gpt2::TokenStreams streams = gpt2::tokenize(split, bytes);
  CHECK(streams.train == Ids{'\n', 'x'});
  CHECK(streams.validation == Ids{'\n', 'y', 'z', '\n', 'w'});

  // A BPE vocabulary of bytes only: its separator is <|endoftext|>.
  moe::io::json::Value encoder = moe::io::json::Object{};
  for (unsigned b = 0; b < 256; ++b) {
    std::string spelled;
    moe::io::json::detail::append_utf8(spelled, gpt2::bpe_detail::byte_to_code_point[b]);
    encoder.set(spelled, std::int64_t(b));
  }
  encoder.set("<|endoftext|>", 256);
  const gpt2::BpeTokenizer bpe = gpt2::BpeTokenizer::from_text(encoder.dump(), "");
  CHECK(gpt2::tokenize_documents(documents, bpe) == Ids{256, 'a', 'b', '\n', 256, 'c'});
}

TEST_CASE("corpus streams: the byte tokenizer round-trips any bytes and rejects ids that are no byte") {
  const gpt2::ByteTokenizer bytes;
  std::string all(256, '\0');
  for (int b = 0; b < 256; ++b) all[std::size_t(b)] = char(b);
  const Ids ids = bytes.encode(all);
  CHECK(ids.front() == 0);
  CHECK(ids.back() == 255);
  CHECK(bytes.decode(ids) == all);
  CHECK(bytes.vocab_size() == 256);
  CHECK_THROWS_WITH_AS(bytes.decode(Ids{'a', 256}), doctest::Contains("token id 256 at position 1"), moe::Error);
  CHECK_THROWS_AS(bytes.decode(Ids{-1}), moe::Error);
}
