// examples/common/cli.hpp: the examples' command lines, `program SUBCOMMAND [--flag value]...`.
// Flags are declared up front with their help text; anything else is an error that names it.
// Values are parsed on request, and a bad value names the flag and what was expected. run_main is
// the examples' main(): the subcommand's handler runs, and any error becomes one line on stderr.
#pragma once

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <functional>
#include <iostream>
#include <map>
#include <new>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "moe/config.hpp"

namespace cli {

// `text` as one shell word: as it is when it holds only characters no shell treats specially, else
// in single quotes (a quote inside written '\'').
inline std::string shell_quoted(std::string_view text) {
  const auto plain = [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           std::string_view("_-+=.,/:@%").find(c) != std::string_view::npos;
  };
  if (!text.empty() && std::all_of(text.begin(), text.end(), plain)) return std::string(text);
  std::string quoted = "'";
  for (char c : text) {
    if (c == '\'') quoted += "'\\''";
    else quoted += c;
  }
  quoted += '\'';
  return quoted;
}

struct Flag {
  std::string name;        // without the dashes: "steps"
  std::string value_name;  // "N", "PATH"; empty for a switch (no value)
  std::string help;
  std::string default_text;  // shown in --help; empty: no default
};

struct Subcommand {
  std::string name;
  std::string summary;
  std::vector<std::string> flags;  // names of the flags it accepts
};

// Parses argv against a fixed set of subcommands and flags. Errors throw moe::Error with one line
// that names the offending argument (the program prints it and exits non-zero).
class Parser {
 public:
  Parser(std::string program, std::string description, std::vector<Flag> flags, std::vector<Subcommand> subcommands)
      : program_(std::move(program)),
        description_(std::move(description)),
        flags_(std::move(flags)),
        subcommands_(std::move(subcommands)) {}

  // argv[1] is the subcommand (or --help / -h / help); then --name value, --name=value or --switch.
  void parse(int argc, const char* const* argv) {
    std::vector<std::string_view> args(argv + 1, argv + argc);
    command_line_ = program_;
    for (std::string_view arg : args) {
      command_line_ += ' ';
      command_line_ += shell_quoted(arg);
    }
    if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
      help_ = true;
      if (args.size() >= 2) {
        subcommand_ = std::string(args[1]);
        find_subcommand(subcommand_);  // `--help fly` is an unknown subcommand, not the general help
      }
      return;
    }
    subcommand_ = std::string(args[0]);
    const Subcommand& sub = find_subcommand(subcommand_);
    for (std::size_t i = 1; i < args.size(); ++i) {
      std::string_view arg = args[i];
      if (arg == "--help" || arg == "-h") {
        help_ = true;
        continue;
      }
      moe::check(arg.size() > 2 && arg.substr(0, 2) == "--", program_, " ", subcommand_, ": unexpected argument '",
                 arg, "' (flags look like --steps 100; see --help)");
      arg.remove_prefix(2);
      std::optional<std::string_view> inline_value;
      if (const auto eq = arg.find('='); eq != std::string_view::npos) {
        inline_value = arg.substr(eq + 1);
        arg = arg.substr(0, eq);
      }
      const Flag& flag = find_flag(arg);
      moe::check(accepts(sub, flag.name), program_, " ", subcommand_, ": flag --", flag.name,
                 " does not apply to this subcommand (see ", program_, " --help ", subcommand_, ")");
      moe::check(!values_.count(flag.name), program_, ": flag --", flag.name, " given twice");
      if (flag.value_name.empty()) {
        moe::check(!inline_value, program_, ": flag --", flag.name, " takes no value");
        values_[flag.name] = "1";
      } else if (inline_value) {
        values_[flag.name] = std::string(*inline_value);
      } else {
        // A value that starts with "--" is the next flag: the value was forgotten (`--out --no-checkpoint`
        // would name a folder after the flag). Write `--name=--value` for a value that really starts so.
        moe::check(i + 1 < args.size() && !args[i + 1].starts_with("--"), program_, ": flag --", flag.name,
                   " needs a value (", flag.value_name, ")",
                   i + 1 < args.size() ? std::string(", got the flag '") + std::string(args[i + 1]) +
                                             "' (for a value that starts with --, write --" + flag.name + "=VALUE)"
                                       : std::string());
        values_[flag.name] = std::string(args[++i]);
      }
    }
  }

  bool help_requested() const { return help_; }
  const std::string& subcommand() const { return subcommand_; }
  const std::string& program() const { return program_; }
  // The command as parsed, quoted so that a shell runs it again (the reports print it).
  const std::string& command_line() const { return command_line_; }
  bool has(std::string_view name) const { return values_.count(std::string(name)) > 0; }

  std::string get(std::string_view name, std::string_view fallback) const {
    const auto it = values_.find(std::string(name));
    return it == values_.end() ? std::string(fallback) : it->second;
  }
  // An integer in [min, max].
  std::int64_t get_int(std::string_view name, std::int64_t fallback, std::int64_t min = INT64_MIN,
                       std::int64_t max = INT64_MAX) const {
    if (!has(name)) return fallback;
    const std::string text = get(name, "");
    std::int64_t value = 0;
    const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
    moe::check(error == std::errc() && end == text.data() + text.size(), program_, ": --", name,
               " expects an integer, got '", text, "'");
    moe::check(value >= min && value <= max, program_, ": --", name, " = ", value, " is outside [", min, ", ", max,
               "]");
    return value;
  }
  // A finite number in [min, max].
  double get_double(std::string_view name, double fallback, double min = -1e300, double max = 1e300) const {
    if (!has(name)) return fallback;
    const std::string text = get(name, "");
    double value = 0;
    const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
    moe::check(error == std::errc() && end == text.data() + text.size() && value >= min && value <= max, program_,
               ": --", name, " expects a number in [", min, ", ", max, "], got '", text, "'");
    return value;
  }
  bool get_switch(std::string_view name) const { return has(name); }
  // A comma-separated list: "self,linear" -> {"self", "linear"} (empty items rejected).
  std::vector<std::string> get_list(std::string_view name, std::string_view fallback) const {
    const std::string text = get(name, fallback);
    std::vector<std::string> items;
    std::stringstream stream(text);
    for (std::string item; std::getline(stream, item, ',');) {
      moe::check(!item.empty(), program_, ": --", name, " has an empty item in '", text, "'");
      items.push_back(item);
    }
    moe::check(!items.empty(), program_, ": --", name, " is empty");
    moe::check(text.back() != ',', program_, ": --", name, " has an empty item in '", text, "'");  // getline drops a last one
    return items;
  }

  // Usage text: every subcommand, or one subcommand's flags with their defaults.
  std::string help() const {
    std::ostringstream out;
    const Subcommand* sub = nullptr;
    for (const Subcommand& s : subcommands_)
      if (s.name == subcommand_) sub = &s;
    if (!sub) {
      out << description_ << "\n\nusage: " << program_ << " <subcommand> [flags]\n\nsubcommands:\n";
      for (const Subcommand& s : subcommands_) out << "  " << pad(s.name, 10) << s.summary << "\n";
      out << "\n" << program_ << " --help <subcommand> lists its flags.\n";
      return out.str();
    }
    out << "usage: " << program_ << " " << sub->name << " [flags]\n" << sub->summary << "\n\nflags:\n";
    for (const std::string& name : sub->flags) {
      const Flag& flag = find_flag(name);
      std::string head = "--" + flag.name + (flag.value_name.empty() ? "" : " " + flag.value_name);
      out << "  " << pad(head, 26) << flag.help;
      if (!flag.default_text.empty()) out << " (default: " << flag.default_text << ")";
      out << "\n";
    }
    return out.str();
  }

 private:
  static std::string pad(std::string text, std::size_t width) {
    if (text.size() < width) text.append(width - text.size(), ' ');
    else text += "  ";
    return text;
  }
  const Subcommand& find_subcommand(std::string_view name) const {
    for (const Subcommand& s : subcommands_)
      if (s.name == name) return s;
    std::string valid;
    for (const Subcommand& s : subcommands_) valid += (valid.empty() ? "" : ", ") + s.name;
    moe::fail(program_, ": unknown subcommand '", name, "' (valid: ", valid, "; see ", program_, " --help)");
  }
  const Flag& find_flag(std::string_view name) const {
    for (const Flag& f : flags_)
      if (f.name == name) return f;
    moe::fail(program_, ": unknown flag --", name, " (see ", program_, " --help ", subcommand_, ")");
  }
  static bool accepts(const Subcommand& sub, const std::string& flag) {
    for (const std::string& f : sub.flags)
      if (f == flag) return true;
    return false;
  }

  std::string program_, description_, command_line_;
  std::vector<Flag> flags_;
  std::vector<Subcommand> subcommands_;
  std::string subcommand_;
  std::map<std::string, std::string> values_;
  bool help_ = false;
};

// The flag lists of several subcommands joined: concat({"variant"}, model_flags).
inline std::vector<std::string> concat(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// The folders make_output_folder made in this run, outermost first: run_main removes those still
// empty when the subcommand fails, so a run that stops before writing anything (a model too large,
// bad data) leaves no empty folder behind. Only folders that did not exist are listed.
inline std::vector<std::filesystem::path>& made_output_folders() {
  static std::vector<std::filesystem::path> made;
  return made;
}

// Makes the output folder `path` (with its parents) before any work, so that a path that cannot be one
// (under a file, say) fails at once rather than after the training that was to write there.
inline void make_output_folder(const std::filesystem::path& path, std::string_view program) {
  moe::check(!path.empty(), program, ": --out is empty");
  std::error_code error;
  // What create_directories will make, deepest first: the path as written, not normalised, as it makes
  // it (for r/a/../b with r/a missing that is r/a too); a "." or ".." entry names a folder listed
  // on its own.
  std::vector<std::filesystem::path> missing;
  for (std::filesystem::path p = std::filesystem::absolute(path, error);
       !error && p.has_relative_path() && !std::filesystem::exists(p, error); p = p.parent_path())
    if (p.has_filename() && p.filename() != "." && p.filename() != "..") missing.push_back(p);
  // Listed before they are made: a failure part of the way leaves those made to be removed too.
  made_output_folders().insert(made_output_folders().end(), missing.rbegin(), missing.rend());
  std::filesystem::create_directories(path, error);
  moe::check(!error && std::filesystem::is_directory(path), program, ": cannot make the output folder '",
             path.string(), "'", error ? ": " + error.message() : std::string());
}

// Removes the folders make_output_folder made that are empty, innermost first (one holding anything
// stays, and so do the folders around it; one already gone is skipped).
inline void remove_empty_output_folders() {
  auto& made = made_output_folders();
  for (auto folder = made.rbegin(); folder != made.rend(); ++folder) {
    std::error_code error;
    std::filesystem::remove(*folder, error);  // fails, leaving it, unless it is an empty folder
  }
  made.clear();
}

// Refuses a list that names an item twice ("<who>: --<flag> lists 'x' twice"): a comparison would
// run it twice and its report could not tell the runs apart.
inline void check_distinct(const std::vector<std::string>& items, std::string_view who, std::string_view flag) {
  for (auto it = items.begin(); it != items.end(); ++it)
    moe::check(std::find(items.begin(), it, *it) == it, who, ": --", flag, " lists '", *it, "' twice");
}

// What `error.what()` reads as on the program's one error line: without the "moe: " the library's
// errors start with nor the program's own name (the line names it once), on one line.
inline std::string error_line(std::string_view message, const std::string& program,
                              const std::vector<std::string>& other_prefixes = {}) {
  std::vector<std::string> prefixes = {"moe: ", program + ": "};
  prefixes.insert(prefixes.end(), other_prefixes.begin(), other_prefixes.end());
  for (const std::string& prefix : prefixes)
    if (message.starts_with(prefix)) message.remove_prefix(prefix.size());
  std::string line(message);
  std::replace(line.begin(), line.end(), '\n', ' ');
  return line;
}

// An example's main(): parses argv, prints the help when asked, else runs the subcommand's
// handler. Every error ends here as one line on stderr, "<program>: error: <message>", and exit
// status 1; `other_prefixes` are further prefixes the line drops ("vit: " of the ViT headers).
using Handler = std::function<int(const Parser&)>;
inline int run_main(int argc, const char* const* argv, Parser& parser,
                    const std::vector<std::pair<std::string, Handler>>& handlers,
                    const std::vector<std::string>& other_prefixes = {}) {
  try {
    parser.parse(argc, argv);
    if (parser.help_requested()) {
      std::cout << parser.help();
      return 0;
    }
    for (const auto& [name, handler] : handlers)
      if (name == parser.subcommand()) {
        const int status = handler(parser);
        made_output_folders().clear();  // a finished run keeps its folders, empty or not
        return status;
      }
    moe::fail(parser.program(), ": subcommand '", parser.subcommand(), "' has no handler");
  } catch (const std::bad_alloc&) {
    remove_empty_output_folders();
    std::fprintf(stderr, "%s: error: out of memory (std::bad_alloc): the model, the batch or the data is larger than "
                 "this machine can hold\n", parser.program().c_str());
    return 1;
  } catch (const std::exception& error) {
    remove_empty_output_folders();
    std::fprintf(stderr, "%s: error: %s\n", parser.program().c_str(),
                 error_line(error.what(), parser.program(), other_prefixes).c_str());
    return 1;
  }
}

}  // namespace cli
