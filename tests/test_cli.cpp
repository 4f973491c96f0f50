// The examples' command lines (examples/common/cli.hpp): the recorded command runs again in a
// shell as given, errors reach the user as one line naming the program, and run_main's exit
// codes.
#include <doctest/doctest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "../examples/common/cli.hpp"

namespace {

cli::Parser make_parser() {
  return cli::Parser("prog", "prog: a test program.",
                     {{"out", "DIR", "where to write", "runs"}, {"steps", "N", "how many", "1"}, {"fast", "", "", ""}},
                     {{"train", "Train.", {"out", "steps", "fast"}}, {"fail", "Throws.", {}}});
}

// What /bin/sh gives back for `word` as one argument (printf '%s' prints it as it arrived).
std::string through_the_shell(const std::string& word) {
  const std::string command = "printf '%s' " + word;
  FILE* pipe = popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  std::string out;
  char buffer[256];
  for (std::size_t n; (n = std::fread(buffer, 1, sizeof buffer, pipe)) > 0;) out.append(buffer, n);
  CHECK(pclose(pipe) == 0);
  return out;
}

// Runs `body` with stderr sent to a temporary file; returns what it wrote there.
template <class Body>
std::string captured_stderr(Body&& body) {
  std::fflush(stderr);
  FILE* file = std::tmpfile();
  REQUIRE(file != nullptr);
  const int saved = dup(fileno(stderr));
  dup2(fileno(file), fileno(stderr));
  body();
  std::fflush(stderr);
  dup2(saved, fileno(stderr));
  close(saved);
  std::rewind(file);
  std::string text;
  for (int c; (c = std::fgetc(file)) != EOF;) text += char(c);
  std::fclose(file);
  return text;
}

}  // namespace

TEST_CASE("cli: shell_quoted leaves plain words alone and quotes the rest so that sh reads them back") {
  CHECK(cli::shell_quoted("runs/self-1.safetensors") == "runs/self-1.safetensors");
  CHECK(cli::shell_quoted("--lr=2e-3") == "--lr=2e-3");
  CHECK(cli::shell_quoted("1337,1338") == "1337,1338");
  CHECK(cli::shell_quoted("") == "''");
  CHECK(cli::shell_quoted("my runs") == "'my runs'");
  CHECK(cli::shell_quoted("it's") == "'it'\\''s'");
  for (const std::string word : {"my runs", "it's", "$HOME", "$(echo no)", "`echo no`", "a\\b", "tab\there", "\"q\"",
                                 "*", "~", "#x", "a;b", "a|b", "x&", "''", "new\nline", "!", "{a,b}"}) {
    CAPTURE(word);
    CHECK(cli::shell_quoted(word) != word);
    CHECK(through_the_shell(cli::shell_quoted(word)) == word);
  }
}

TEST_CASE("cli: the parser records the command line as a shell would run it again") {
  cli::Parser parser = make_parser();
  const char* argv[] = {"./prog", "train", "--out", "my runs", "--steps=5", "--fast"};
  parser.parse(6, argv);
  CHECK(parser.command_line() == "prog train --out 'my runs' --steps=5 --fast");
  CHECK(parser.get("out", "") == "my runs");
  CHECK(parser.get_int("steps", 0) == 5);
  CHECK(parser.get_switch("fast"));
}

TEST_CASE("cli: an error line drops the library's and the program's prefixes and is one line") {
  CHECK(cli::error_line("moe: prog: --steps expects an integer", "prog") == "--steps expects an integer");
  CHECK(cli::error_line("prog: bad", "prog") == "bad");
  CHECK(cli::error_line("vit: unknown variant", "prog", {"vit: "}) == "unknown variant");
  CHECK(cli::error_line("other: kept", "prog") == "other: kept");
  CHECK(cli::error_line("first\nsecond\nthird", "prog") == "first second third");
}

TEST_CASE("cli: run_main runs the subcommand's handler; errors are one stderr line and exit 1") {
  const std::vector<std::pair<std::string, cli::Handler>> handlers = {
      {"train", [](const cli::Parser& args) { return int(args.get_int("steps", 7)); }},
      {"fail", [](const cli::Parser&) -> int { throw std::runtime_error("moe: prog: broken\ninside"); }}};
  const auto run = [&](std::vector<const char*> argv, int& rc) {
    cli::Parser parser = make_parser();
    return captured_stderr([&] { rc = cli::run_main(int(argv.size()), argv.data(), parser, handlers); });
  };
  int rc = -1;
  CHECK(run({"prog", "train", "--steps", "3"}, rc).empty());
  CHECK(rc == 3);
  CHECK(run({"prog", "fail"}, rc) == "prog: error: broken inside\n");
  CHECK(rc == 1);
  CHECK(run({"prog", "fly"}, rc) == "prog: error: unknown subcommand 'fly' (valid: train, fail; see prog --help)\n");
  CHECK(rc == 1);
  CHECK(run({"prog", "train", "--colour", "red"}, rc).starts_with("prog: error: unknown flag --colour"));
  CHECK(rc == 1);
  CHECK(run({"prog", "train", "--steps"}, rc) == "prog: error: flag --steps needs a value (N)\n");
  CHECK(rc == 1);

  // A subcommand the parser knows but no handler serves is an error too, not a silent exit.
  cli::Parser parser = make_parser();
  const char* argv[] = {"prog", "fail"};
  const std::string message =
      captured_stderr([&] { rc = cli::run_main(2, argv, parser, {{"train", handlers[0].second}}); });
  CHECK(message == "prog: error: subcommand 'fail' has no handler\n");
  CHECK(rc == 1);
}

TEST_CASE("cli: a failed subcommand removes the output folders it made that are still empty, and only those") {
  namespace fs = std::filesystem;
  char pattern[] = "/tmp/moe_cli_XXXXXX";
  REQUIRE(mkdtemp(pattern) != nullptr);
  const fs::path root = pattern;
  fs::create_directories(root / "existing");
  const auto run = [&](const std::function<void()>& body, bool fails) {
    cli::Parser parser = make_parser();
    const char* argv[] = {"prog", "train"};
    int rc = -1;
    captured_stderr([&] {
      rc = cli::run_main(2, argv, parser, {{"train", [&](const cli::Parser&) {
                                              body();
                                              if (fails) throw std::runtime_error("broken");
                                              return 0;
                                            }}});
    });
    CHECK(rc == (fails ? 1 : 0));
  };
  // Made and left empty: removed, parents made with it too; the folder that existed stays.
  run([&] { cli::make_output_folder(root / "existing" / "a" / "b", "prog"); }, true);
  CHECK(fs::is_directory(root / "existing"));
  CHECK_FALSE(fs::exists(root / "existing" / "a"));
  // An existing --out folder is not removed, empty or not.
  run([&] { cli::make_output_folder(root / "existing", "prog"); }, true);
  CHECK(fs::is_directory(root / "existing"));
  // One that holds a file stays, with the folders around it; an empty sibling made later goes,
  // and a folder made inside one made earlier is removed before it (innermost first).
  run(
      [&] {
        cli::make_output_folder(root / "outer" / "kept", "prog");
        std::ofstream(root / "outer" / "kept" / "report.md") << "partial";
        cli::make_output_folder(root / "outer" / "empty", "prog");
        cli::make_output_folder(root / "nest", "prog");
        cli::make_output_folder(root / "nest" / "inner", "prog");
      },
      true);
  CHECK(fs::exists(root / "outer" / "kept" / "report.md"));
  CHECK_FALSE(fs::exists(root / "outer" / "empty"));
  CHECK_FALSE(fs::exists(root / "nest"));
  // A path through a folder it makes and leaves again (r/a/../b with r/a missing): r/a is made too,
  // and removed with the rest.
  run([&] { cli::make_output_folder(root / "r" / "a" / ".." / "b", "prog"); }, true);
  CHECK_FALSE(fs::exists(root / "r"));
  run([&] { cli::make_output_folder(root / "existing" / "a" / ".." / "b" / ".", "prog"); }, true);
  CHECK(fs::is_directory(root / "existing"));
  CHECK_FALSE(fs::exists(root / "existing" / "a"));
  CHECK_FALSE(fs::exists(root / "existing" / "b"));
  // A run that succeeds keeps its folders, empty or not.
  run([&] { cli::make_output_folder(root / "done", "prog"); }, false);
  CHECK(fs::is_directory(root / "done"));
  fs::remove_all(root);
}
