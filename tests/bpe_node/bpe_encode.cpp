// Encodes a file with our GPT-2 BPE tokenizer for the bpe_matches_node test:
//   bpe_encode <folder with encoder.json and vocab.bpe> <text file>
// prints the ids on one line, separated by spaces. Exits 1, with a message, when decoding the
// ids does not give back the file's bytes, or on any error.
#include <cstdio>
#include <exception>
#include <string>

#include "../../examples/gpt2_moe/bpe.hpp"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <bpe folder> <text file>\n", argv[0]);
    return 2;
  }
  try {
    const gpt2::BpeTokenizer tokenizer = gpt2::BpeTokenizer::load(argv[1]);
    const std::string text = gpt2::bpe_detail::read_file(argv[2]);
    const std::vector<std::int32_t> ids = tokenizer.encode(text);
    if (tokenizer.decode(ids) != text) {
      std::fprintf(stderr, "bpe_encode: decode(encode(text)) differs from the text of %s\n", argv[2]);
      return 1;
    }
    std::string line;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      if (i) line += ' ';
      line += std::to_string(ids[i]);
    }
    std::printf("%s\n", line.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bpe_encode: %s\n", e.what());
    return 1;
  }
  return 0;
}
