// moe/io/json.hpp: a small strict JSON (RFC 8259) reader and writer, enough for safetensors
// headers, tokenizer vocabularies and report files.
//
// Reading is strict: UTF-8 text only (validated, also inside strings), no BOM, no comments,
// no trailing commas, no NaN/Infinity, nothing after the value but whitespace. Escapes \uXXXX
// decode to UTF-8; surrogate pairs combine; a lone surrogate is an error. Duplicate keys in one
// object are rejected (a header naming one tensor twice is ambiguous). Nesting is limited to
// `max_depth` levels so that hostile input cannot exhaust the stack. Every error is a moe::Error
// "moe: <what>: invalid JSON at byte <offset>: <reason>".
//
// Numbers keep the text's exact integer when the literal is an integer that fits int64
// (`is_integer()`, `as_int()`); every number also has its nearest double (`as_number()`).
// A literal whose magnitude exceeds the double range is an error; one below it reads as 0.
//
// Objects keep their keys in insertion order; `find` is a linear scan (headers are small;
// iterate `as_object()` for big maps).
#pragma once

#include <algorithm>
#include <charconv>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "moe/config.hpp"

namespace moe::io::json {

inline constexpr int max_depth = 512;

enum class Type { null, boolean, number, string, array, object };

inline const char* type_name(Type type) {
  switch (type) {
    case Type::null: return "null";
    case Type::boolean: return "boolean";
    case Type::number: return "number";
    case Type::string: return "string";
    case Type::array: return "array";
    case Type::object: return "object";
  }
  return "?";
}

class Value;
using Array = std::vector<Value>;
using Object = std::vector<std::pair<std::string, Value>>;

class Value {
  struct Number {
    double nearest = 0;
    std::int64_t integer = 0;
    bool is_integer = false;
    friend bool operator==(const Number&, const Number&) = default;
  };
  using Storage = std::variant<std::monostate, bool, Number, std::string, Array, Object>;

 public:
  Value() = default;
  Value(std::nullptr_t) {}
  Value(bool b) : data_(b) {}
  template <std::integral I>
    requires(!std::same_as<I, bool>)
  Value(I i) {
    if constexpr (std::is_unsigned_v<I> && sizeof(I) >= sizeof(std::int64_t))
      check(i <= I(std::numeric_limits<std::int64_t>::max()), "json: integer ", i, " does not fit int64");
    data_ = Number{double(i), std::int64_t(i), true};
  }
  template <std::floating_point F>
  Value(F d) : data_(Number{double(d), 0, false}) {}
  Value(std::string s) : data_(std::move(s)) {}
  Value(std::string_view s) : data_(std::string(s)) {}
  Value(const char* s) : data_(std::string(s)) {}
  Value(Array a) : data_(std::move(a)) {}
  Value(Object o) : data_(std::move(o)) {}

  // A number from its literal: keeps the exact integer when there is one.
  static Value number(double nearest, bool is_integer, std::int64_t integer) {
    Value v;
    v.data_ = Number{nearest, is_integer ? integer : 0, is_integer};
    return v;
  }

  Type type() const { return Type(data_.index()); }
  bool is_null() const { return type() == Type::null; }
  bool is_bool() const { return type() == Type::boolean; }
  bool is_number() const { return type() == Type::number; }
  bool is_string() const { return type() == Type::string; }
  bool is_array() const { return type() == Type::array; }
  bool is_object() const { return type() == Type::object; }
  // A number whose literal was an integer within int64 (or a Value built from an integer).
  bool is_integer() const { return is_number() && std::get<Number>(data_).is_integer; }

  bool as_bool() const { return std::get<bool>(expect(Type::boolean)); }
  double as_number() const { return std::get<Number>(expect(Type::number)).nearest; }
  std::int64_t as_int() const {
    const Number& n = std::get<Number>(expect(Type::number));
    check(n.is_integer, "json: expected an integer, found the number ", n.nearest);
    return n.integer;
  }
  const std::string& as_string() const { return std::get<std::string>(expect(Type::string)); }
  const Array& as_array() const { return std::get<Array>(expect(Type::array)); }
  const Object& as_object() const { return std::get<Object>(expect(Type::object)); }

  // The value of the first member named `key`, or nullptr (also nullptr when this is no object).
  const Value* find(std::string_view key) const {
    if (!is_object()) return nullptr;
    for (const auto& [name, value] : std::get<Object>(data_))
      if (name == key) return &value;
    return nullptr;
  }
  const Value& at(std::string_view key) const {
    as_object();
    const Value* value = find(key);
    if (!value) fail("json: object has no key ", quote_for_message(key));
    return *value;
  }

  // Building: append to an array; set a member of an object (replaces an existing one, so
  // written objects never hold duplicate keys).
  Value& push_back(Value element) {
    expect(Type::array);
    return std::get<Array>(data_).emplace_back(std::move(element));
  }
  Value& set(std::string key, Value member) {
    expect(Type::object);
    auto& members = std::get<Object>(data_);
    for (auto& [name, value] : members)
      if (name == key) return value = std::move(member);
    return members.emplace_back(std::move(key), std::move(member)).second;
  }

  // Compact JSON (indent < 0) or pretty-printed with `indent` spaces per level.
  std::string dump(int indent = -1) const {
    std::string out;
    dump_to(out, indent, 0);
    return out;
  }
  void dump_to(std::string& out, int indent, int level) const;

  friend bool operator==(const Value& a, const Value& b);

 private:
  const Storage& expect(Type wanted) const {
    if (type() != wanted) fail("json: expected ", a_type(wanted), ", found ", a_type(type()));
    return data_;
  }
  static std::string a_type(Type type) {
    const std::string name = type_name(type);
    if (type == Type::null) return name;
    return (type == Type::array || type == Type::object ? "an " : "a ") + name;
  }
  static std::string quote_for_message(std::string_view key);

  Storage data_;
};

// Defined here, where Value is complete: an in-class default compares Object's pair<string, Value>
// while Value is still incomplete, which nvcc's front end refuses.
inline bool operator==(const Value& a, const Value& b) { return a.data_ == b.data_; }

// ---- writer ------------------------------------------------------------------------------------

namespace detail {

// Length of the valid UTF-8 sequence starting at text[i], or 0 if there is none
// (overlong forms, surrogates and code points past U+10FFFF are invalid).
inline std::size_t utf8_sequence_length(std::string_view text, std::size_t i) {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(text[k]); };
  const unsigned char lead = byte(i);
  if (lead < 0x80) return 1;
  std::size_t length;
  unsigned char low = 0x80, high = 0xBF;  // allowed range of the second byte
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3;
    if (lead == 0xE0) low = 0xA0;       // overlong
    if (lead == 0xED) high = 0x9F;      // UTF-16 surrogates
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4;
    if (lead == 0xF0) low = 0x90;       // overlong
    if (lead == 0xF4) high = 0x8F;      // past U+10FFFF
  } else {
    return 0;
  }
  if (text.size() - i < length) return 0;
  if (byte(i + 1) < low || byte(i + 1) > high) return 0;
  for (std::size_t k = 2; k < length; ++k)
    if (byte(i + k) < 0x80 || byte(i + k) > 0xBF) return 0;
  return length;
}

inline void append_utf8(std::string& out, std::uint32_t code_point) {
  if (code_point < 0x80) {
    out += char(code_point);
  } else if (code_point < 0x800) {
    out += char(0xC0 | (code_point >> 6));
    out += char(0x80 | (code_point & 0x3F));
  } else if (code_point < 0x10000) {
    out += char(0xE0 | (code_point >> 12));
    out += char(0x80 | ((code_point >> 6) & 0x3F));
    out += char(0x80 | (code_point & 0x3F));
  } else {
    out += char(0xF0 | (code_point >> 18));
    out += char(0x80 | ((code_point >> 12) & 0x3F));
    out += char(0x80 | ((code_point >> 6) & 0x3F));
    out += char(0x80 | (code_point & 0x3F));
  }
}

inline void append_quoted(std::string& out, std::string_view utf8) {
  static constexpr char hex[] = "0123456789abcdef";
  out += '"';
  for (std::size_t i = 0; i < utf8.size();) {
    const unsigned char c = static_cast<unsigned char>(utf8[i]);
    if (c >= 0x80) {
      const std::size_t length = utf8_sequence_length(utf8, i);
      check(length > 0, "json: string is not valid UTF-8 (byte ", i, ")");
      out.append(utf8.substr(i, length));
      i += length;
      continue;
    }
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 0xF];
        } else {
          out += char(c);
        }
    }
    ++i;
  }
  out += '"';
}

inline void append_number(std::string& out, double value) {
  check(std::isfinite(value), "json: cannot write the non-finite number ", value);
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof buffer, value);  // shortest round trip
  const std::string_view text(buffer, std::size_t(result.ptr - buffer));
  out += text;
  // Keep a double a double when read back ("3.0", not the integer "3"), as Python does.
  if (text.find_first_of(".e") == std::string_view::npos) out += ".0";
}

}  // namespace detail

// A JSON string literal for UTF-8 text (throws moe::Error if it is not valid UTF-8).
inline std::string quote(std::string_view utf8) {
  std::string out;
  out.reserve(utf8.size() + 2);
  detail::append_quoted(out, utf8);
  return out;
}

inline std::string Value::quote_for_message(std::string_view key) {
  std::string out;
  try {
    detail::append_quoted(out, key);
  } catch (const Error&) {
    out = "(a key that is not valid UTF-8)";
  }
  return out;
}

inline void Value::dump_to(std::string& out, int indent, int level) const {
  const auto newline = [&](int depth) {
    if (indent < 0) return;
    out += '\n';
    out.append(std::size_t(indent) * std::size_t(depth), ' ');
  };
  switch (type()) {
    case Type::null: out += "null"; break;
    case Type::boolean: out += std::get<bool>(data_) ? "true" : "false"; break;
    case Type::number: {
      const Number& n = std::get<Number>(data_);
      if (n.is_integer) {
        char buffer[32];
        out.append(buffer, std::to_chars(buffer, buffer + sizeof buffer, n.integer).ptr);
      } else {
        detail::append_number(out, n.nearest);
      }
      break;
    }
    case Type::string: detail::append_quoted(out, std::get<std::string>(data_)); break;
    case Type::array: {
      const Array& elements = std::get<Array>(data_);
      out += '[';
      for (std::size_t i = 0; i < elements.size(); ++i) {
        if (i) out += ',';
        newline(level + 1);
        elements[i].dump_to(out, indent, level + 1);
      }
      if (!elements.empty()) newline(level);
      out += ']';
      break;
    }
    case Type::object: {
      const Object& members = std::get<Object>(data_);
      out += '{';
      for (std::size_t i = 0; i < members.size(); ++i) {
        if (i) out += ',';
        newline(level + 1);
        detail::append_quoted(out, members[i].first);
        out += indent < 0 ? ":" : ": ";
        members[i].second.dump_to(out, indent, level + 1);
      }
      if (!members.empty()) newline(level);
      out += '}';
      break;
    }
  }
}

// ---- reader ------------------------------------------------------------------------------------

namespace detail {

class Parser {
 public:
  Parser(std::string_view text, std::string_view what) : text_(text), what_(what) {}

  Value parse_document() {
    skip_whitespace();
    Value value = parse_value(0);
    skip_whitespace();
    if (pos_ != text_.size()) error("unexpected data after the JSON value");
    return value;
  }

 private:
  [[noreturn]] void error(std::string_view reason) const { error_at(pos_, reason); }
  [[noreturn]] void error_at(std::size_t offset, std::string_view reason) const {
    fail(what_, ": invalid JSON at byte ", offset, ": ", reason);
  }

  bool at_end() const { return pos_ >= text_.size(); }
  char peek() const { return text_[pos_]; }

  void skip_whitespace() {
    while (!at_end() && (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r')) ++pos_;
  }

  void expect_literal(std::string_view literal) {
    if (text_.substr(pos_, literal.size()) != literal) error("unexpected character");
    pos_ += literal.size();
  }

  Value parse_value(int depth) {
    if (at_end()) error("unexpected end of input, expected a value");
    switch (peek()) {
      case '{': return parse_object(depth + 1);
      case '[': return parse_array(depth + 1);
      case '"': return Value(parse_string());
      case 't': expect_literal("true"); return Value(true);
      case 'f': expect_literal("false"); return Value(false);
      case 'n': expect_literal("null"); return Value(nullptr);
      default:
        if (peek() == '-' || (peek() >= '0' && peek() <= '9')) return parse_number();
        error("unexpected character, expected a value");
    }
  }

  void enter(int depth) {
    if (depth > max_depth) error("nesting deeper than the limit of " + std::to_string(max_depth));
  }

  Value parse_array(int depth) {
    enter(depth);
    ++pos_;  // '['
    Array elements;
    skip_whitespace();
    if (!at_end() && peek() == ']') {
      ++pos_;
      return Value(std::move(elements));
    }
    for (;;) {
      skip_whitespace();
      elements.push_back(parse_value(depth));
      skip_whitespace();
      if (at_end()) error("unexpected end of input inside an array");
      if (peek() == ',') {
        ++pos_;
      } else if (peek() == ']') {
        ++pos_;
        return Value(std::move(elements));
      } else {
        error("expected ',' or ']' in an array");
      }
    }
  }

  Value parse_object(int depth) {
    enter(depth);
    const std::size_t start = pos_;
    ++pos_;  // '{'
    Object members;
    skip_whitespace();
    if (!at_end() && peek() == '}') {
      ++pos_;
      return Value(std::move(members));
    }
    for (;;) {
      skip_whitespace();
      if (at_end() || peek() != '"') error("expected a string key in an object");
      std::string key = parse_string();
      skip_whitespace();
      if (at_end() || peek() != ':') error("expected ':' after an object key");
      ++pos_;
      skip_whitespace();
      Value value = parse_value(depth);
      members.emplace_back(std::move(key), std::move(value));
      skip_whitespace();
      if (at_end()) error("unexpected end of input inside an object");
      if (peek() == ',') {
        ++pos_;
      } else if (peek() == '}') {
        ++pos_;
        reject_duplicate_keys(members, start);
        return Value(std::move(members));
      } else {
        error("expected ',' or '}' in an object");
      }
    }
  }

  void reject_duplicate_keys(const Object& members, std::size_t object_start) const {
    std::vector<std::size_t> order(members.size());
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::sort(order.begin(), order.end(),
              [&](std::size_t a, std::size_t b) { return members[a].first < members[b].first; });
    for (std::size_t i = 1; i < order.size(); ++i)
      if (members[order[i]].first == members[order[i - 1]].first)
        error_at(object_start, "duplicate key " + quote(members[order[i]].first) + " in the object starting here");
  }

  unsigned read_hex4() {
    if (text_.size() - pos_ < 4) error("unexpected end of input in a \\u escape");
    unsigned value = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = text_[pos_++];
      value <<= 4;
      if (c >= '0' && c <= '9') value |= unsigned(c - '0');
      else if (c >= 'a' && c <= 'f') value |= unsigned(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') value |= unsigned(c - 'A' + 10);
      else error_at(pos_ - 1, "invalid hex digit in a \\u escape");
    }
    return value;
  }

  std::string parse_string() {
    const std::size_t start = pos_;
    ++pos_;  // opening quote
    std::string out;
    for (;;) {
      // Copy the run of plain characters in one go (vocabularies are mostly plain text).
      const std::size_t run_start = pos_;
      while (!at_end()) {
        const unsigned char c = static_cast<unsigned char>(peek());
        if (c == '"' || c == '\\' || c < 0x20 || c >= 0x80) break;
        ++pos_;
      }
      out.append(text_.substr(run_start, pos_ - run_start));
      if (at_end()) error_at(start, "unterminated string");
      const unsigned char c = static_cast<unsigned char>(peek());
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c < 0x20) error("control character in a string (must be escaped)");
      if (c >= 0x80) {
        const std::size_t length = utf8_sequence_length(text_, pos_);
        if (length == 0) error("invalid UTF-8 in a string");
        out.append(text_.substr(pos_, length));
        pos_ += length;
        continue;
      }
      ++pos_;  // backslash
      if (at_end()) error("unexpected end of input in an escape");
      const char escape = text_[pos_++];
      switch (escape) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          const std::size_t escape_start = pos_ - 2;
          std::uint32_t code_point = read_hex4();
          if (code_point >= 0xDC00 && code_point <= 0xDFFF)
            error_at(escape_start, "lone low surrogate in a \\u escape");
          if (code_point >= 0xD800 && code_point <= 0xDBFF) {
            if (text_.substr(pos_, 2) != "\\u") error_at(escape_start, "high surrogate not followed by a low one");
            pos_ += 2;
            const std::uint32_t low = read_hex4();
            if (low < 0xDC00 || low > 0xDFFF) error_at(escape_start, "high surrogate not followed by a low one");
            code_point = 0x10000 + ((code_point - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(out, code_point);
          break;
        }
        default: error_at(pos_ - 1, "invalid escape character");
      }
    }
  }

  Value parse_number() {
    const std::size_t start = pos_;
    const auto digits = [&] {
      const std::size_t first = pos_;
      while (!at_end() && peek() >= '0' && peek() <= '9') ++pos_;
      return pos_ - first;
    };
    if (peek() == '-') ++pos_;
    if (at_end()) error("unexpected end of input in a number");
    if (peek() == '0') {
      ++pos_;
      if (!at_end() && peek() >= '0' && peek() <= '9') error("leading zero in a number");
    } else if (digits() == 0) {
      error("expected a digit");
    }
    const std::size_t integer_end = pos_;
    bool integral = true;
    if (!at_end() && peek() == '.') {
      integral = false;
      ++pos_;
      if (digits() == 0) error("expected a digit after the decimal point");
    }
    const std::size_t fraction_end = pos_;
    std::size_t exponent_start = pos_;
    if (!at_end() && (peek() == 'e' || peek() == 'E')) {
      integral = false;
      ++pos_;
      exponent_start = pos_;
      if (!at_end() && (peek() == '+' || peek() == '-')) ++pos_;
      if (digits() == 0) error("expected a digit in the exponent");
    }
    const char* first = text_.data() + start;
    const char* last = text_.data() + pos_;
    std::int64_t integer = 0;
    bool exact = false;
    if (integral) {
      const auto result = std::from_chars(first, last, integer);
      exact = result.ec == std::errc{} && result.ptr == last;
    }
    double nearest = 0;
    const auto result = std::from_chars(first, last, nearest);
    if (result.ec == std::errc::result_out_of_range) {
      if (decimal_order(start, integer_end, fraction_end, exponent_start) > 0)
        error_at(start, "number out of the range of a double");
      nearest = *first == '-' ? -0.0 : 0.0;  // underflow
    } else if (result.ec != std::errc{} || result.ptr != last) {
      error_at(start, "malformed number");
    }
    return Value::number(nearest, exact, integer);
  }

  // Roughly log10 of a nonzero literal's magnitude (its sign tells overflow from underflow).
  std::int64_t decimal_order(std::size_t start, std::size_t integer_end, std::size_t fraction_end,
                             std::size_t exponent_start) const {
    std::int64_t exponent = 0;
    if (exponent_start < pos_) {
      std::size_t i = exponent_start;
      const bool negative = text_[i] == '-';
      if (text_[i] == '+' || text_[i] == '-') ++i;
      for (; i < pos_; ++i) exponent = std::min<std::int64_t>(exponent * 10 + (text_[i] - '0'), 1'000'000'000);
      if (negative) exponent = -exponent;
    }
    std::size_t first_digit = start + (text_[start] == '-');
    if (text_[first_digit] != '0') return exponent + std::int64_t(integer_end - first_digit);
    std::int64_t leading_zeros = 0;  // in the fraction
    for (std::size_t i = integer_end + 1; i < fraction_end && text_[i] == '0'; ++i) ++leading_zeros;
    return exponent - leading_zeros;
  }

  std::string_view text_;
  std::string_view what_;
  std::size_t pos_ = 0;
};

}  // namespace detail

// Parses one JSON document; `what` names the source in error messages (a file, "header of x").
inline Value parse(std::string_view text, std::string_view what = "json") {
  return detail::Parser(text, what).parse_document();
}

}  // namespace moe::io::json
