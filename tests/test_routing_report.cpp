// The routing report of the gate comparisons (examples/common/routing_report.hpp), its summary
// over seeds (examples/common/seed_summary.hpp) and the SVG pictures under them
// (examples/common/svg_plot.hpp): every file is written, every number is the one given or the
// statistic computed by hand, the pictures are well-formed XML whatever the names and values.
#include <doctest/doctest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "../examples/common/routing_report.hpp"
#include "../examples/common/seed_summary.hpp"
#include "moe/io/json.hpp"

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int kLayers = 4, kExperts = 8;

// ---- a tiny XML well-formedness checker: enough for the SVG this project writes ----------------

struct XmlSummary {
  std::string problem;                  // empty when well-formed
  std::map<std::string, int> elements;  // element name -> count
};

XmlSummary check_xml(std::string_view doc) {
  XmlSummary summary;
  std::vector<std::string> open;
  bool root_seen = false;
  std::size_t i = 0;
  const auto fail = [&](std::string what) {
    summary.problem = what + " at byte " + std::to_string(i);
    return summary;
  };
  // An '&' must start one of XML's five entities or a character reference.
  const auto entity_ok = [&](std::size_t at) {
    const std::size_t end = doc.find(';', at);
    if (end == std::string_view::npos) return false;
    const std::string_view name = doc.substr(at + 1, end - at - 1);
    if (name == "amp" || name == "lt" || name == "gt" || name == "quot" || name == "apos") return true;
    return name.size() > 1 && name[0] == '#' &&
           name.find_first_not_of("#x0123456789abcdefABCDEF") == std::string_view::npos;
  };
  const auto is_name_char = [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == ':' || c == '.';
  };
  if (doc.starts_with("<?xml")) {
    i = doc.find("?>");
    if (i == std::string_view::npos) return fail("unterminated prolog");
    i += 2;
  }
  while (i < doc.size()) {
    if (doc[i] != '<') {
      if (doc[i] == '&' && !entity_ok(i)) return fail("bad entity");
      if (doc[i] == '>') return fail("raw '>' in text");
      if (open.empty() && !std::isspace(static_cast<unsigned char>(doc[i]))) return fail("text outside the root");
      ++i;
      continue;
    }
    if (doc.substr(i, 4) == "<!--") {
      i = doc.find("-->", i);
      if (i == std::string_view::npos) return fail("unterminated comment");
      i += 3;
      continue;
    }
    const bool closing = i + 1 < doc.size() && doc[i + 1] == '/';
    std::size_t j = i + (closing ? 2 : 1);
    const std::size_t name_start = j;
    while (j < doc.size() && is_name_char(doc[j])) ++j;
    const std::string name(doc.substr(name_start, j - name_start));
    if (name.empty()) return fail("tag without a name");
    if (closing) {
      while (j < doc.size() && std::isspace(static_cast<unsigned char>(doc[j]))) ++j;
      if (j >= doc.size() || doc[j] != '>') return fail("bad closing tag");
      if (open.empty() || open.back() != name) return fail("</" + name + "> closes nothing open");
      open.pop_back();
      i = j + 1;
      continue;
    }
    if (open.empty() && root_seen) return fail("second root element");
    root_seen = true;
    ++summary.elements[name];
    // Attributes: name="value" with no '<' and valid entities inside.
    for (;;) {
      while (j < doc.size() && std::isspace(static_cast<unsigned char>(doc[j]))) ++j;
      if (j >= doc.size()) return fail("unterminated tag <" + name);
      if (doc[j] == '>' || doc.substr(j, 2) == "/>") break;
      const std::size_t attribute = j;
      while (j < doc.size() && is_name_char(doc[j])) ++j;
      if (j == attribute || j + 1 >= doc.size() || doc[j] != '=' || (doc[j + 1] != '"' && doc[j + 1] != '\''))
        return fail("bad attribute in <" + name);
      const char quote = doc[j + 1];
      const std::size_t end = doc.find(quote, j + 2);
      if (end == std::string_view::npos) return fail("unterminated attribute in <" + name);
      for (std::size_t k = j + 2; k < end; ++k) {
        if (doc[k] == '<') return fail("'<' in an attribute of <" + name);
        if (doc[k] == '&' && !entity_ok(k)) return fail("bad entity in an attribute of <" + name);
      }
      j = end + 1;
    }
    if (doc[j] == '>') {
      open.push_back(name);
      i = j + 1;
    } else {
      i = j + 2;
    }
  }
  if (!open.empty()) return fail("<" + open.back() + "> never closed");
  if (!root_seen) return fail("no root element");
  return summary;
}

// ---- reading the JSON back with the library's strict parser ------------------------------------

using moe::io::json::Value;

const Value& item(const Value& array, std::size_t index) {
  REQUIRE(index < array.as_array().size());
  return array.as_array()[index];
}

// ---- the synthetic comparison: dense + three MoE variants, 4 layers x 8 experts, top-2 --------

std::vector<double> fractions_from_counts(const std::vector<std::int64_t>& counts) { return moe::fractions(counts); }

std::vector<report::VariantResult> synthetic_results() {
  std::mt19937 random(1234);
  const auto skewed_layer = [&](int spread) {
    std::vector<std::int64_t> counts(kExperts);
    for (auto& c : counts) c = 1 + std::int64_t(random() % unsigned(spread));
    return report::LayerRouting::from_fractions(fractions_from_counts(counts));
  };
  report::VariantResult dense{
      .variant = "dense", .total_parameters = 1'234'567, .metrics = {{"val loss", "3.50"}, {"val ppl", "33.1"}}};
  report::VariantResult linear{.variant = "linear",
                               .router_parameters = 4 * 128 * 8,
                               .total_parameters = 3'400'000,
                               .metrics = {{"val loss", "3.40"}, {"val ppl", "30.0"}, {"tokens/s", "41k"}},
                               .is_moe = true,
                               .routed_tokens = 65536,
                               .top_k = 2};
  // Layer 0 collapsed: every token's two choices are experts 0 and 1.
  linear.layers.push_back(report::LayerRouting::from_fractions({0.5, 0.5, 0, 0, 0, 0, 0, 0}));
  for (int l = 1; l < kLayers; ++l) linear.layers.push_back(skewed_layer(1000));
  report::VariantResult self{.variant = "self",
                             .router_parameters = 0,
                             .total_parameters = 3'395'904,
                             .metrics = {{"val loss", "3.38"}, {"val ppl", "29.4"}, {"tokens/s", "43k"}},
                             .is_moe = true,
                             .routed_tokens = 65536,
                             .top_k = 2};
  for (int l = 0; l < kLayers; ++l) self.layers.push_back(skewed_layer(100));
  // Self's logits measured (the others' not, as in reports written before they were): expert 5's
  // mean 2.5 above the others in layer 1; a NaN standard deviation in layer 3.
  for (int l = 0; l < kLayers; ++l) {
    self.layers[l].logit_mean.assign(kExperts, 0.25);
    self.layers[l].logit_std.assign(kExperts, 0.5);
  }
  self.layers[1].logit_mean[5] = 1.5;
  self.layers[1].fractions = {0.05, 0.05, 0.05, 0.05, 0.05, 0.5, 0.2, 0.05};
  self.layers[3].logit_std[2] = kNaN;
  // Self's logits for ln_2's bias: 1.0 of expert 5's lead of 1.25 in layer 1.
  for (int l = 0; l < kLayers; ++l) self.layers[l].bias_logit.assign(kExperts, 0.125);
  self.layers[1].bias_logit[5] = 1.125;
  report::VariantResult fixed{.variant = "fixed-random",
                              .router_parameters = 0,
                              .total_parameters = 3'395'904,
                              .metrics = {{"val loss", "3.45"}, {"val ppl", "31.5"}},
                              .is_moe = true,
                              .routed_tokens = 65536,
                              .top_k = 2};
  for (int l = 0; l < kLayers; ++l) fixed.layers.push_back(skewed_layer(300));
  fixed.layers[2].fractions[3] = kNaN;  // a layer whose statistics went wrong
  fixed.layers[2] = report::LayerRouting::from_fractions(fixed.layers[2].fractions);
  return {dense, linear, self, fixed};
}

std::string read_file(const std::filesystem::path& path) {
  std::ifstream file(path, std::ios::binary);
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

std::vector<std::string> split(std::string_view text, char separator) {
  std::vector<std::string> parts;
  std::size_t start = 0;
  for (std::size_t end; (end = text.find(separator, start)) != std::string_view::npos; start = end + 1)
    parts.emplace_back(text.substr(start, end - start));
  parts.emplace_back(text.substr(start));
  return parts;
}

// The cells of a markdown table row "| a | b |", trimmed.
std::vector<std::string> cells(std::string_view row) {
  std::vector<std::string> parts = split(row, '|');
  REQUIRE(parts.size() >= 2);
  parts.erase(parts.begin());
  parts.pop_back();
  for (std::string& p : parts) {
    p.erase(0, p.find_first_not_of(' '));
    p.erase(p.find_last_not_of(' ') + 1);
  }
  return parts;
}

std::size_t count(std::string_view text, std::string_view what) {
  std::size_t n = 0;
  for (std::size_t at = text.find(what); at != std::string_view::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

double mean_of(const report::VariantResult& r, double report::LayerRouting::*field) {
  double sum = 0;
  int n = 0;
  for (const auto& layer : r.layers)
    if (std::isfinite(layer.*field)) sum += layer.*field, ++n;
  return sum / n;
}

struct TempDir {
  std::filesystem::path path =
      std::filesystem::temp_directory_path() / ("moe-routing-report-" + std::to_string(::getpid()));
  TempDir() { std::filesystem::remove_all(path); }
  ~TempDir() { std::filesystem::remove_all(path); }
};

}  // namespace

TEST_CASE("routing report: a collapsed layer has entropy log 2 / log 8 and max fraction 1/2") {
  const auto layer = report::LayerRouting::from_fractions({0.5, 0.5, 0, 0, 0, 0, 0, 0});
  CHECK(layer.entropy == doctest::Approx(std::log(2.0) / std::log(8.0)).epsilon(1e-12));
  CHECK(layer.max_fraction == 0.5);
  const auto uniform = report::LayerRouting::from_fractions(std::vector<double>(8, 0.125));
  CHECK(uniform.entropy == doctest::Approx(1.0).epsilon(1e-12));
  const auto broken = report::LayerRouting::from_fractions({0.5, kNaN, 0.5});
  CHECK(std::isnan(broken.entropy));
  CHECK(std::isnan(broken.max_fraction));
}

TEST_CASE("routing report: a layer from moe::RoutingStats carries the library's fractions, entropy and maximum") {
  moe::RoutingStats stats(kExperts);
  stats.assignments = {10, 0, 30, 5, 5, 20, 25, 5};
  const auto layer = report::LayerRouting::from_stats(stats);
  const auto recomputed = report::LayerRouting::from_fractions(layer.fractions);
  CHECK(layer.fractions == stats.expert_fractions());
  CHECK(layer.entropy == doctest::Approx(recomputed.entropy).epsilon(1e-12));
  CHECK(layer.max_fraction == 0.3);
}

TEST_CASE("routing report: the most used expert's logit offset, in units of the experts' mean standard deviation") {
  report::LayerRouting layer = report::LayerRouting::from_fractions({0.1, 0.5, 0.2, 0.2});
  CHECK(std::isnan(layer.top_logit_offset()));  // not measured
  layer.logit_mean = {0.0, 3.0, 1.0, -1.0};
  layer.logit_std = {1.0, 2.0, 1.0, 2.0};
  CHECK(layer.top_logit_offset() == doctest::Approx(3.0 / 1.5).epsilon(1e-15));  // (3 - 0) / mean(1, 2, 1, 2)
  // The bias's part: the same expert (the most used, not the bias's largest) in the same units.
  CHECK(std::isnan(layer.top_bias_offset()));  // not measured
  layer.bias_logit = {0.5, 1.25, 4.0, -0.75};
  CHECK(layer.top_bias_offset() == doctest::Approx((1.25 - 3.75 / 3) / 1.5).epsilon(1e-15));
  layer.bias_logit[1] = 3.0;
  CHECK(layer.top_bias_offset() == doctest::Approx((3.0 - 3.75 / 3) / 1.5).epsilon(1e-15));
  layer.bias_logit.pop_back();
  CHECK(std::isnan(layer.top_bias_offset()));  // not one each
  layer.logit_mean[3] = kNaN;
  CHECK(std::isnan(layer.top_logit_offset()));
  layer.logit_mean[3] = -1.0;
  layer.fractions[2] = kNaN;  // no expert known to be the most used
  CHECK(std::isnan(layer.top_logit_offset()));
  report::LayerRouting one = report::LayerRouting::from_fractions({1.0});
  one.logit_mean = {0.5}, one.logit_std = {1.0};
  CHECK(std::isnan(one.top_logit_offset()));  // N = 1: no other expert

  // From the library's statistics: each expert's mean and standard deviation of its logit.
  moe::RoutingStats stats(2);
  stats.assignments = {3, 1};
  const std::vector<float> z = {2.f, 0.f, 4.f, 1.f, 0.f, -1.f};  // [3 tokens, 2 experts]
  stats.accumulate_logits(moe::ConstMatrixView<float>(z.data(), 3, 2));
  const auto measured = report::LayerRouting::from_stats(stats);
  CHECK(measured.logit_mean == std::vector<double>{2.0, 0.0});
  CHECK(measured.logit_std[0] == doctest::Approx(std::sqrt(8.0 / 3)).epsilon(1e-15));
  CHECK(measured.top_logit_offset() == doctest::Approx(2.0 / ((std::sqrt(8.0 / 3) + std::sqrt(2.0 / 3)) / 2)));
}

TEST_CASE("routing report: every file is written into a new folder, no picture for dense") {
  TempDir dir;
  const auto results = synthetic_results();
  report::write_routing_report(dir.path / "nested", results, {.title = "test", .command_line = "gpt2_moe compare"});
  for (const char* name : {"report.md", "routing.csv", "routing.json", "entropy.svg", "max_fraction.svg",
                           "heatmap_linear.svg", "heatmap_self.svg", "heatmap_fixed-random.svg"}) {
    CAPTURE(name);
    CHECK(std::filesystem::file_size(dir.path / "nested" / name) > 0);
  }
  CHECK_FALSE(std::filesystem::exists(dir.path / "nested" / "heatmap_dense.svg"));
  const std::string md = read_file(dir.path / "nested" / "report.md");
  CHECK(md.find("gpt2_moe compare") != std::string::npos);
  CHECK(md.find("](entropy.svg)") != std::string::npos);
  CHECK(md.find("](heatmap_fixed-random.svg)") != std::string::npos);
  // The logit offsets: a table with a column per MoE variant, n/a where not measured.
  const std::size_t at = md.find("The most used expert's mean logit above");
  REQUIRE(at != std::string::npos);
  const std::vector<std::string> lines = split(md.substr(md.find("| layer |", at)), '\n');
  CHECK(cells(lines[0]) == std::vector<std::string>{"layer", "linear", "self", "fixed-random"});
  CHECK(cells(lines[3]) == std::vector<std::string>{"1", "n/a", "2.50", "n/a"});  // (1.5 - 0.25) / 0.5
  CHECK(cells(lines[5])[2] == "n/a");                                           // a NaN standard deviation
  CHECK(md.find("each expert's logit mean and standard deviation and logit for the bias") != std::string::npos);
  // The bias's part of the lead: the same columns, n/a where not measured.
  const std::size_t bias_at = md.find("Of that lead, the part the bias of the LayerNorm before the gate");
  REQUIRE(bias_at != std::string::npos);
  const std::vector<std::string> bias_lines = split(md.substr(md.find("| layer |", bias_at)), '\n');
  CHECK(cells(bias_lines[0]) == std::vector<std::string>{"layer", "linear", "self", "fixed-random"});
  CHECK(cells(bias_lines[2]) == std::vector<std::string>{"0", "n/a", "0.00", "n/a"});
  CHECK(cells(bias_lines[3]) == std::vector<std::string>{"1", "n/a", "2.00", "n/a"});  // (1.125 - 0.125) / 0.5
  // Without the bias's logits: no such table; without any measured logits (older reports): neither table.
  auto unmeasured = synthetic_results();
  for (auto& layer : unmeasured[2].layers) layer.bias_logit.clear();
  CHECK(report::report_markdown(unmeasured, {}).find("LayerNorm before the gate") == std::string::npos);
  CHECK(report::report_markdown(unmeasured, {}).find("mean logit") != std::string::npos);
  for (auto& layer : unmeasured[2].layers) layer.logit_mean.clear(), layer.logit_std.clear();
  CHECK(report::report_markdown(unmeasured, {}).find("mean logit") == std::string::npos);
}

TEST_CASE("routing report: the markdown table has one row per variant, every metric column and the layer means") {
  const auto results = synthetic_results();
  const std::vector<std::string> lines = split(report::markdown_table(results), '\n');
  REQUIRE(lines.size() == 2 + results.size() + 1);  // header, rule, rows, the final newline's empty piece
  CHECK(cells(lines[0]) == std::vector<std::string>{"variant", "router params", "total params", "val loss", "val ppl",
                                                    "tokens/s", "mean norm. entropy", "mean max expert fraction"});
  CHECK(cells(lines[1]).size() == 8);
  CHECK(cells(lines[2]) == std::vector<std::string>{"dense", "-", "1,234,567", "3.50", "33.1", "-", "-", "-"});

  const auto linear = cells(lines[3]);
  CHECK(linear[0] == "linear");
  CHECK(linear[1] == "4,096");
  CHECK(linear[5] == "41k");
  CHECK(linear[6] == report::format_fixed(mean_of(results[1], &report::LayerRouting::entropy), 3));
  CHECK(linear[7] == report::format_fixed(mean_of(results[1], &report::LayerRouting::max_fraction), 3));
  CHECK(cells(lines[4])[1] == "0");  // Self-Routing: a router without parameters

  // fixed-random: no tokens/s given; its NaN layer is left out of the means, and the cell says so.
  const auto fixed = cells(lines[5]);
  CHECK(fixed[5] == "-");
  CHECK(fixed[6] == report::format_fixed(mean_of(results[3], &report::LayerRouting::entropy), 3) + " (3 of 4 layers)");
  CHECK(fixed[7].ends_with("(3 of 4 layers)"));
}

TEST_CASE("routing report: the CSV has L x N rows per MoE variant, each layer summing to 1") {
  const auto results = synthetic_results();
  const std::vector<std::string> lines = split(report::routing_csv(results), '\n');
  CHECK(lines.front() == "variant,layer,expert,fraction,logit_mean,logit_std,bias_logit");
  CHECK(lines.back().empty());
  std::map<std::string, int> rows;
  std::map<std::pair<std::string, int>, double> layer_sums;
  std::map<std::pair<std::string, int>, int> layer_missing;
  for (std::size_t i = 1; i + 1 < lines.size(); ++i) {
    const auto fields = split(lines[i], ',');
    REQUIRE(fields.size() == 7);
    ++rows[fields[0]];
    if (fields[0] == "self" && fields[1] == "1" && fields[2] == "5")
      CHECK(fields[4] + "," + fields[5] + "," + fields[6] == "1.5,0.5,1.125");
    if (fields[0] == "self" && fields[1] == "3" && fields[2] == "2") CHECK(fields[5].empty());  // NaN
    if (fields[0] != "self") CHECK(fields[4] + fields[5] + fields[6] == "");                     // not measured
    const std::pair<std::string, int> key{fields[0], std::stoi(fields[1])};
    if (fields[3].empty())
      ++layer_missing[key];
    else
      layer_sums[key] += std::stod(fields[3]);
  }
  CHECK(rows.count("dense") == 0);
  for (const char* variant : {"linear", "self", "fixed-random"}) {
    CAPTURE(variant);
    CHECK(rows[variant] == kLayers * kExperts);
    for (int l = 0; l < kLayers; ++l)
      if (layer_missing[{variant, l}] == 0) CHECK(layer_sums[{variant, l}] == doctest::Approx(1.0).epsilon(1e-12));
  }
  CHECK(layer_missing[{"fixed-random", 2}] == 1);  // the NaN fraction is an empty field
}

TEST_CASE("routing report: the JSON parses and holds each layer's numbers, null where not finite") {
  const auto results = synthetic_results();
  const Value doc = moe::io::json::parse(report::routing_json(results, {.title = "t", .budget = "100 steps"}));
  CHECK(doc.at("budget").as_string() == "100 steps");
  const Value& variants = doc.at("variants");
  REQUIRE(variants.as_array().size() == 4);
  const Value& dense = item(variants, 0);
  CHECK(dense.at("variant").as_string() == "dense");
  CHECK_FALSE(dense.at("is_moe").as_bool());
  CHECK(dense.at("layers").as_array().empty());
  CHECK(dense.at("metrics").at("val ppl").as_string() == "33.1");

  const Value& linear = item(variants, 1);
  CHECK(linear.at("router_parameters").as_int() == 4096);
  CHECK(linear.at("top_k").as_int() == 2);
  REQUIRE(linear.at("layers").as_array().size() == std::size_t(kLayers));
  const Value& collapsed = item(linear.at("layers"), 0);
  CHECK(collapsed.at("entropy").as_number() == doctest::Approx(std::log(2.0) / std::log(8.0)).epsilon(1e-15));
  CHECK(collapsed.at("max_fraction").as_number() == 0.5);
  CHECK_FALSE(item(collapsed.at("fractions"), 2).is_integer());  // 0.0, a double like its neighbours
  for (int l = 0; l < kLayers; ++l)
    for (int e = 0; e < kExperts; ++e)  // shortest round-trip text: the same doubles come back
      CHECK(item(item(linear.at("layers"), l).at("fractions"), e).as_number() == results[1].layers[l].fractions[e]);
  CHECK(linear.at("mean_normalized_entropy").as_number() ==
        doctest::Approx(mean_of(results[1], &report::LayerRouting::entropy)));

  const Value& broken = item(item(variants, 3).at("layers"), 2);
  CHECK(broken.at("entropy").is_null());
  CHECK(broken.at("max_fraction").is_null());
  CHECK(item(broken.at("fractions"), 3).is_null());
  CHECK(item(broken.at("fractions"), 2).is_number());
}

TEST_CASE("routing report: every picture is well-formed SVG, one line per MoE variant, L x N heatmap cells") {
  TempDir dir;
  const auto results = synthetic_results();
  report::write_routing_report(dir.path, results, {});
  for (const char* name : {"entropy.svg", "max_fraction.svg"}) {
    CAPTURE(name);
    const std::string svg = read_file(dir.path / name);
    const XmlSummary xml = check_xml(svg);
    CHECK(xml.problem == "");
    CHECK(count(svg, "<path class=\"series\"") == 3);
    CHECK(svg.find("dense") == std::string::npos);
    // fixed-random has no value at layer 2: its line breaks there and its legend says so.
    CHECK(svg.find("fixed-random (n/a at layer 2)") != std::string::npos);
  }
  const std::string max_fraction = read_file(dir.path / "max_fraction.svg");
  CHECK(max_fraction.find(">uniform (1/8)</text>") != std::string::npos);
  CHECK(max_fraction.find(">collapse (1/2)</text>") != std::string::npos);
  CHECK(read_file(dir.path / "entropy.svg").find(">collapse (k = 2, N = 8)</text>") != std::string::npos);

  for (const char* name : {"heatmap_linear.svg", "heatmap_self.svg", "heatmap_fixed-random.svg"}) {
    CAPTURE(name);
    const std::string svg = read_file(dir.path / name);
    CHECK(check_xml(svg).problem == "");
    CHECK(count(svg, "<rect class=\"cell\"") == std::size_t(kLayers * kExperts));
  }
  const std::string broken = read_file(dir.path / "heatmap_fixed-random.svg");
  CHECK(count(broken, "fill=\"url(#not-available)\"") == 2);  // the n/a cell and its colour-bar swatch
  CHECK(broken.find(">n/a</text>") != std::string::npos);
}

TEST_CASE("routing report: a variant has the same colour in every picture, whatever its position") {
  auto results = synthetic_results();
  std::swap(results[1], results[3]);
  const std::string self_colour = std::string(report::variant_style("self").colour);
  CHECK(self_colour != report::variant_style("linear").colour);
  TempDir dir;
  report::write_routing_report(dir.path, results, {});
  for (const char* name : {"entropy.svg", "max_fraction.svg"}) {
    const std::string svg = read_file(dir.path / name);
    const std::size_t path = svg.find("<title>self</title>");
    REQUIRE(path != std::string::npos);
    CHECK(svg.rfind("stroke=\"" + self_colour + "\"", path) > svg.rfind("<path", path));
  }
}

TEST_CASE("routing report: <, & and > in names are escaped in every file") {
  auto results = synthetic_results();
  results[2].variant = "self <&> \"quoted\"";
  results[2].metrics.push_back({"a|b", "x<y"});
  TempDir dir;
  report::write_routing_report(dir.path, results, {.title = "A & B", .corpus = "<corpus>"});
  for (const char* name : {"entropy.svg", "max_fraction.svg", "heatmap_self______quoted_.svg"}) {
    CAPTURE(name);
    const std::string svg = read_file(dir.path / name);
    CHECK(check_xml(svg).problem == "");
    CHECK(svg.find("self &lt;&amp;&gt; &quot;quoted&quot;") != std::string::npos);
  }
  const std::string md = read_file(dir.path / "report.md");
  CHECK(md.find("# A \\& B") != std::string::npos);
  CHECK(md.find("\\<corpus\\>") != std::string::npos);
  CHECK(md.find("| self \\<\\&\\> \"quoted\" |") != std::string::npos);
  CHECK(md.find("| a\\|b |") != std::string::npos);
  const Value doc = moe::io::json::parse(read_file(dir.path / "routing.json"));
  CHECK(item(doc.at("variants"), 2).at("variant").as_string() == results[2].variant);
  CHECK(item(doc.at("variants"), 2).at("metrics").at("a|b").as_string() == "x<y");
  results[3].variant = "stray \xFF byte";  // not UTF-8: U+FFFD in the JSON, which stays valid
  CHECK(item(moe::io::json::parse(report::routing_json(results, {})).at("variants"), 3).at("variant").as_string() ==
        "stray \xEF\xBF\xBD byte");
  CHECK(read_file(dir.path / "routing.csv").find("\n\"self <&> \"\"quoted\"\"\",0,0,") != std::string::npos);
}

TEST_CASE("svg: xml_escape turns control characters and broken UTF-8 into U+FFFD, keeps good UTF-8") {
  CHECK(report::xml_escape("a<b>&'\"") == "a&lt;b&gt;&amp;&apos;&quot;");
  CHECK(report::xml_escape("\x01x\t") == "\xEF\xBF\xBDx\t");
  CHECK(report::xml_escape("\xC3\xA9\xE2\x86\x92") == "\xC3\xA9\xE2\x86\x92");          // é→ kept
  CHECK(report::xml_escape("\xC3") == "\xEF\xBF\xBD");                                  // truncated sequence
  CHECK(report::xml_escape("\xC0\xAF") == "\xEF\xBF\xBD\xEF\xBF\xBD");                  // overlong '/'
  CHECK(report::xml_escape("\xED\xA0\x80") == "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // a surrogate
  CHECK(report::xml_escape("\xEF\xBF\xBF") == "\xEF\xBF\xBD");                          // U+FFFF
}

TEST_CASE("svg: random names and values never break the document") {
  std::mt19937 random(99);
  const double specials[] = {kNaN, kInf, -kInf, 0.0, -1e300, 1e300, 1e-300};
  for (int trial = 0; trial < 50; ++trial) {
    CAPTURE(trial);
    const auto random_text = [&] {
      std::string text(random() % 12, ' ');
      for (char& c : text) c = char(random() % 256);
      return text;
    };
    report::LineChart chart{.title = random_text(), .x_label = random_text(), .y_label = random_text()};
    if (trial % 2) chart.y_range = std::array<double, 2>{0, 1};
    chart.references.push_back({double(random() % 100) / 50, random_text()});
    for (int s = 0; s < 3; ++s) {
      report::Series series{random_text(), {}, {}, report::Marker(s)};
      for (int i = 0; i < 5; ++i)
        series.y.push_back(random() % 3 == 0 ? specials[random() % 7] : double(random() % 1000) / 999);
      chart.series.push_back(series);
    }
    const std::string line = report::line_chart_svg(chart);
    CHECK(check_xml(line).problem == "");
    CHECK(line.find("nan") == std::string::npos);
    CHECK(line.find("inf") == std::string::npos);

    report::Heatmap map{.title = random_text(),
                        .row_axis = random_text(),
                        .column_axis = random_text(),
                        .value_label = random_text(),
                        .rows = 3,
                        .columns = 2};
    for (int i = 0; i < 6; ++i)
      map.values.push_back(random() % 3 == 0 ? specials[random() % 7] : double(random() % 100));
    map.row_labels = {random_text(), random_text(), random_text()};
    const std::string heat = report::heatmap_svg(map);
    CHECK(check_xml(heat).problem == "");
    CHECK(heat.find("nan") == std::string::npos);
    CHECK(count(heat, "<rect class=\"cell\"") == 6);
  }
}

TEST_CASE("svg: a heatmap serves as a 10 x 10 confusion matrix with class names and counts") {
  const std::vector<std::string> classes = {"airplane", "automobile", "bird",  "cat",  "deer",
                                            "dog",      "frog",       "horse", "ship", "truck & co"};
  report::Heatmap confusion{.title = "CIFAR-10 confusion",
                            .row_axis = "true class",
                            .column_axis = "predicted class",
                            .value_label = "images",
                            .rows = 10,
                            .columns = 10,
                            .row_labels = classes,
                            .column_labels = classes,
                            .decimals = 0};
  for (int t = 0; t < 10; ++t)
    for (int p = 0; p < 10; ++p) confusion.values.push_back(t == p ? 900 + t : (t + p) % 7);
  const std::string svg = report::heatmap_svg(confusion);
  CHECK(check_xml(svg).problem == "");
  CHECK(count(svg, "<rect class=\"cell\"") == 100);
  CHECK(svg.find(">909</text>") != std::string::npos);             // counts as integers in the cells
  CHECK(svg.find(">truck &amp; co</text>") != std::string::npos);  // labels escaped
  CHECK(svg.find("rotate(-45") != std::string::npos);              // long column labels turned

  confusion.values[5] = 1.5;
  confusion.values.pop_back();
  CHECK_THROWS_WITH_AS(report::heatmap_svg(confusion), doctest::Contains("99 values for a [10, 10] grid"), moe::Error);
}

TEST_CASE("svg: a line chart leaves a gap at a non-finite value, a fixed range clips the rest") {
  report::LineChart chart{
      .title = "gaps", .series = {{"s", {0.2, kNaN, 0.4, 0.5, kInf, 0.6}}}, .y_range = std::array<double, 2>{0, 1}};
  const std::string svg = report::line_chart_svg(chart);
  CHECK(check_xml(svg).problem == "");
  const std::size_t d = svg.find("<path class=\"series\" d=\"");
  REQUIRE(d != std::string::npos);
  const std::string path = svg.substr(d, svg.find('"', d + 24) - d);
  CHECK(count(path, "M") == 3);  // pieces [0], [2, 3] and [5]
  CHECK(count(path, "L") == 1);
  CHECK(svg.find("s (n/a at layer 1, 4)") != std::string::npos);
  CHECK(svg.find("clip-path=\"url(#plot-area)\"") != std::string::npos);
  CHECK_THROWS_AS(report::line_chart_svg({.title = "bad", .y_range = std::array<double, 2>{1, 1}}), moe::Error);
}

TEST_CASE("routing report: bad input names the variant and the problem") {
  const auto check_message = [](std::vector<report::VariantResult> results, const char* message) {
    CAPTURE(message);
    CHECK_THROWS_WITH_AS(report::markdown_table(results), doctest::Contains(message), moe::Error);
  };
  auto results = synthetic_results();
  results[2].variant = "linear";
  check_message(results, "variant 'linear' appears twice");
  results = synthetic_results();
  results[0].layers = results[1].layers;
  check_message(results, "variant 'dense' is not MoE but has 4 routing layers");
  results = synthetic_results();
  results[2].layers.clear();
  check_message(results, "MoE variant 'self' has no routing layers");
  results = synthetic_results();
  results[2].layers[3].fractions.pop_back();
  check_message(results, "variant 'self' layer 3 has 7 expert fractions, layer 0 has 8");
  results = synthetic_results();
  results[1].top_k = 9;
  check_message(results, "variant 'linear' has top_k = 9 for N = 8 experts");
  results = synthetic_results();
  results[1].metrics.push_back({"val loss", "1"});
  check_message(results, "variant 'linear' has metric 'val loss' twice");
  results = synthetic_results();
  results[0].variant.clear();
  check_message(results, "a variant has an empty name");
  results = synthetic_results();
  results[2].layers[1].logit_std.pop_back();
  check_message(results, "variant 'self' layer 1 has 8 logit means and 7 standard deviations for 8 experts");
  results = synthetic_results();
  results[2].layers[2].bias_logit.push_back(0.0);
  check_message(results, "variant 'self' layer 2 has 9 bias logits for 8 experts");

  TempDir dir;
  std::filesystem::create_directories(dir.path);
  std::ofstream(dir.path / "file") << "x";
  CHECK_THROWS_WITH_AS(report::write_routing_report(dir.path / "file" / "sub", synthetic_results(), {}),
                       doctest::Contains("cannot create directory"), moe::Error);
}

TEST_CASE("routing report: a report of dense variants only has the table and no pictures") {
  std::vector<report::VariantResult> results = {{.variant = "dense", .total_parameters = 10}};
  TempDir dir;
  report::write_routing_report(dir.path, results, {});
  CHECK(std::filesystem::exists(dir.path / "report.md"));
  CHECK_FALSE(std::filesystem::exists(dir.path / "entropy.svg"));
  CHECK(moe::io::json::parse(read_file(dir.path / "routing.json")).at("variants").as_array().size() == 1);
  CHECK(read_file(dir.path / "routing.csv") == "variant,layer,expert,fraction,logit_mean,logit_std,bias_logit\n");
}

// ---- a classifier's report: metrics after the routing columns, an appendix, a confusion matrix --

TEST_CASE("routing report: trailing metrics follow the routing means in the table and the JSON") {
  auto results = synthetic_results();
  results[0].metrics = {{"test top-1", "0.8512"}};
  results[0].trailing_metrics = {{"images/s", "1.1k"}};
  results[2].metrics = {{"test top-1", "0.8633"}};
  results[2].trailing_metrics = {{"images/s", "950"}};
  const std::vector<std::string> lines = split(report::markdown_table(results), '\n');
  CHECK(cells(lines[0]) == std::vector<std::string>{"variant", "router params", "total params", "test top-1",
                                                    "val loss", "val ppl", "tokens/s", "mean norm. entropy",
                                                    "mean max expert fraction", "images/s"});
  CHECK(cells(lines[1]).size() == 10);
  CHECK(cells(lines[2]) == std::vector<std::string>{"dense", "-", "1,234,567", "0.8512", "-", "-", "-", "-", "-", "1.1k"});
  const auto self = cells(lines[4]);
  CHECK(self[3] == "0.8633");
  CHECK(self[7] == report::format_fixed(mean_of(results[2], &report::LayerRouting::entropy), 3));
  CHECK(self[9] == "950");
  CHECK(cells(lines[3])[9] == "-");  // linear gave no images/s

  const auto json = moe::io::json::parse(report::routing_json(results, {}));
  const auto& metrics = item(json.at("variants"), 2).at("metrics");
  CHECK(metrics.at("test top-1").as_string() == "0.8633");
  CHECK(metrics.at("images/s").as_string() == "950");
  CHECK(metrics.as_object().size() == 2);

  results[2].trailing_metrics.push_back({"test top-1", "0.1"});  // one name, one column
  CHECK_THROWS_WITH_AS(report::markdown_table(results), doctest::Contains("has metric 'test top-1' twice"), moe::Error);
}

TEST_CASE("routing report: the appendix ends report.md as given; without one the report is unchanged") {
  const auto results = synthetic_results();
  report::ReportOptions options{.title = "T"};
  const std::string plain = report::report_markdown(results, options);
  options.appendix = "## Confusion matrix\n\n![confusion](confusion.svg)";
  const std::string with = report::report_markdown(results, options);
  CHECK(with == plain + "\n## Confusion matrix\n\n![confusion](confusion.svg)\n");
}

// ---- the summary over seeds ----------------------------------------------------------------------

namespace {

// Seed s of three: linear's val loss 2.00, 2.10, 2.20; self's 1.95, 2.08, 2.12 (self - linear:
// -0.05, -0.02, -0.08: mean -0.05, sample std 0.03); dense 2.5 + s / 10 (always 0.5 above). Routing: every layer of
// linear has max fraction 0.25 + s / 100, self's 0.2 (the synthetic layers' entropies are kept).
std::vector<report::SeedRun> synthetic_seed_runs() {
  const double linear_loss[] = {2.00, 2.10, 2.20}, self_loss[] = {1.95, 2.08, 2.12};
  std::vector<report::SeedRun> runs;
  for (int s = 0; s < 3; ++s) {
    const std::vector<report::VariantResult> base = synthetic_results();  // dense, linear, self, fixed-random
    report::VariantResult self = base[2], dense = base[0], linear = base[1];
    self.values = {{"val loss", self_loss[s], 4}, {"tokens/s", 1000.0 + s, 0}};
    linear.values = {{"val loss", linear_loss[s], 4}, {"tokens/s", 900.0, 0}};
    dense.values = {{"val loss", 2.5 + s / 10.0, 4}};
    for (auto& layer : linear.layers) layer.max_fraction = 0.25 + s / 100.0;
    for (auto& layer : self.layers) layer.max_fraction = 0.2;
    runs.push_back({std::uint64_t(100 + s), {self, linear, dense}, "seed-" + std::to_string(100 + s)});
  }
  return runs;
}

// The markdown row that starts with "| name |".
std::vector<std::string> row_of(std::string_view table, std::string_view name) {
  for (const std::string& line : split(table, '\n'))
    if (line.starts_with("| " + std::string(name) + " |")) return cells(line);
  FAIL("no row " << name << " in\n" << table);
  return {};
}

}  // namespace

TEST_CASE("seed summary: mean, sample standard deviation and range over the finite values") {
  const std::vector<std::optional<double>> values = {1.0, std::nullopt, 4.0, kNaN, 2.0};
  const report::Spread s = report::Spread::of(values);
  CHECK(s.given == 4);
  CHECK(s.finite == 3);
  CHECK(s.mean == doctest::Approx(7.0 / 3).epsilon(1e-15));
  CHECK(s.std == doctest::Approx(std::sqrt(7.0 / 3)).epsilon(1e-15));  // ((4 + 1 + 25) / 9) / (3 - 1)
  CHECK(s.low == 1.0);
  CHECK(s.high == 4.0);
  const report::Spread one = report::Spread::of(std::vector<std::optional<double>>{3.0});
  CHECK(one.mean == 3.0);
  CHECK(std::isnan(one.std));  // no spread from one value
  const report::Spread none = report::Spread::of(std::vector<std::optional<double>>{kInf, std::nullopt});
  CHECK(none.given == 1);
  CHECK(none.finite == 0);
  CHECK(std::isnan(none.mean));
}

TEST_CASE("seed summary: the table holds each value's mean ± std, '-' where a variant has none") {
  const auto runs = synthetic_seed_runs();
  const std::string table = report::seed_summary_table(runs);
  CAPTURE(table);
  CHECK(cells(split(table, '\n')[0]) ==
        std::vector<std::string>{"variant", "val loss", "tokens/s", "mean norm. entropy", "mean max expert fraction"});
  CHECK(row_of(table, "linear")[1] == "2.1000 ± 0.1000");
  CHECK(row_of(table, "self")[1] == "2.0500 ± 0.0889");  // sd of 1.95, 2.08, 2.12 = 0.08888...
  CHECK(row_of(table, "self")[2] == "1001 ± 1");
  CHECK(row_of(table, "linear")[4] == "0.260 ± 0.010");
  CHECK(row_of(table, "dense")[2] == "-");
  CHECK(row_of(table, "dense")[3] == "-");
  const double entropy = mean_of(runs[0].results[0], &report::LayerRouting::entropy);
  CHECK(row_of(table, "self")[3] == report::format_fixed(entropy, 3) + " ± 0.000");  // the same layers every seed
}

TEST_CASE("seed summary: differences from linear are taken seed by seed, with their range") {
  auto runs = synthetic_seed_runs();
  const std::string table = report::seed_difference_table(runs);
  CAPTURE(table);
  CHECK(table.starts_with("| variant − linear |"));
  CHECK(row_of(table, "self")[1] == "-0.0500 ± 0.0300 [-0.0800, -0.0200]");
  CHECK(row_of(table, "self")[4] == "-0.060 ± 0.010 [-0.070, -0.050]");
  CHECK(row_of(table, "dense")[1] == "0.5000 ± 0.0000 [0.5000, 0.5000]");
  CHECK(row_of(table, "dense")[3] == "-");
  CHECK(table.find("| linear |") == std::string::npos);  // the reference has no row
  // A seed whose run diverged: counted out, and said so.
  runs[1].results[0].values[0].value = kNaN;
  const std::string diverged = report::seed_difference_table(runs);
  CHECK(row_of(diverged, "self")[1] == "-0.0650 ± 0.0212 [-0.0800, -0.0500] (2 of 3 seeds)");
  // Without linear the first variant is the reference.
  for (auto& run : runs) run.results.erase(run.results.begin() + 1);
  CHECK(report::seed_difference_table(runs).starts_with("| variant − self |"));
}

TEST_CASE("seed summary: the files hold every per-seed value, the JSON parses, report.md links each seed") {
  const auto runs = synthetic_seed_runs();
  TempDir dir;
  report::write_seed_summary(dir.path / "out", runs,
                             {.title = "over seeds", .command_line = "gpt2_moe compare --seeds 100,101,102"});
  const std::string md = read_file(dir.path / "out" / "report.md");
  CHECK(md.find("# over seeds") == 0);
  CHECK(md.find("- **Seeds** (3): 100, 101, 102.") != std::string::npos);
  CHECK(md.find("[seed-101/report.md](seed-101/report.md)") != std::string::npos);
  CHECK(md.find("| 102 | 2.1200 | 2.2000 | 2.7000 |") != std::string::npos);  // val loss per seed
  // The logit offsets over the seeds: self's measured (2.5 in layer 1 of every seed), linear's not.
  const std::size_t offsets = md.find("The most used expert's logit offset");
  REQUIRE(offsets != std::string::npos);
  const std::string offset_table = md.substr(md.find("| layer |", offsets));
  CHECK(cells(split(offset_table, '\n')[0]) == std::vector<std::string>{"layer", "self", "linear"});
  CHECK(row_of(offset_table, "1") == std::vector<std::string>{"1", "2.50 ± 0.00", "n/a"});
  const std::size_t bias_offsets = md.find("Of that offset, the part the LayerNorm's bias gives");
  REQUIRE(bias_offsets != std::string::npos);
  CHECK(row_of(md.substr(md.find("| layer |", bias_offsets)), "1") == std::vector<std::string>{"1", "2.00 ± 0.00", "n/a"});
  auto unmeasured = runs;  // runs reported before the logits were measured: no such tables
  for (auto& run : unmeasured)
    for (auto& layer : run.results[0].layers) layer.bias_logit.clear();
  CHECK(report::seed_summary_markdown(unmeasured, {}).find("LayerNorm's bias") == std::string::npos);
  for (auto& run : unmeasured)
    for (auto& layer : run.results[0].layers) layer.logit_mean.clear(), layer.logit_std.clear();
  CHECK(report::seed_summary_markdown(unmeasured, {}).find("logit offset") == std::string::npos);
  const Value doc = moe::io::json::parse(read_file(dir.path / "out" / "summary.json"));
  CHECK(doc.at("reference").as_string() == "linear");
  REQUIRE(doc.at("seeds").as_array().size() == 3);
  CHECK(item(doc.at("seeds"), 2).as_int() == 102);
  const Value& self = item(doc.at("variants"), 0);
  CHECK(self.at("variant").as_string() == "self");
  CHECK(item(self.at("values").at("val loss").at("per_seed"), 1).as_number() == 2.08);
  CHECK(self.at("minus_reference").at("val loss").at("mean").as_number() == doctest::Approx(-0.05).epsilon(1e-12));
  CHECK(self.at("minus_reference").at("val loss").at("std").as_number() == doctest::Approx(0.03).epsilon(1e-12));
  const Value& linear = item(doc.at("variants"), 1);
  CHECK(linear.find("minus_reference") == nullptr);
  const Value& dense = item(doc.at("variants"), 2);
  CHECK(dense.at("values").find("mean norm. entropy") == nullptr);
}

TEST_CASE("seed summary: bad input names the seed, the variant and the problem") {
  const auto check_message = [](std::vector<report::SeedRun> runs, const char* message) {
    CAPTURE(message);
    CHECK_THROWS_WITH_AS(report::seed_summary_table(runs), doctest::Contains(message), moe::Error);
  };
  auto runs = synthetic_seed_runs();
  std::swap(runs[2].results[0], runs[2].results[1]);
  check_message(runs, "variant 0 is 'linear' for seed 102 but 'self' for seed 100");
  runs = synthetic_seed_runs();
  runs[1].results.pop_back();
  check_message(runs, "seed 101 has 2 variants, seed 100 has 3");
  runs = synthetic_seed_runs();
  runs[2].seed = 100;
  check_message(runs, "seed 100 appears twice");
  runs = synthetic_seed_runs();
  runs[1].results[1].values.push_back({"val loss", 1, 4});
  check_message(runs, "variant 'linear' of seed 101 has value 'val loss' twice");
  runs = synthetic_seed_runs();
  runs[1].results[0].layers.pop_back();
  check_message(runs, "variant 'self' has 3 MoE layers for seed 101 but 4 for seed 100");
  runs = synthetic_seed_runs();
  runs.resize(1);
  check_message(runs, "needs at least two runs");

  CHECK(report::parse_seeds({"3", "18446744073709551615"}, "x") ==
        std::vector<std::uint64_t>{3, 18446744073709551615ull});
  CHECK_THROWS_WITH_AS(report::parse_seeds({"3"}, "prog"),
                       doctest::Contains("prog: --seeds needs at least two seeds (for one, use --seed)"), moe::Error);
  CHECK_THROWS_WITH_AS(report::parse_seeds({"3", "-1"}, "prog"),
                       doctest::Contains("item '-1' is not a non-negative integer"), moe::Error);
  CHECK_THROWS_WITH_AS(report::parse_seeds({"3", "3"}, "prog"), doctest::Contains("lists 3 twice"), moe::Error);
}

// ---- reading routing.json back; comparisons run apart, reported together ----------------------

namespace {

void check_same_result(const report::VariantResult& got, const report::VariantResult& want) {
  CAPTURE(want.variant);
  CHECK(got.variant == want.variant);
  CHECK(got.is_moe == want.is_moe);
  CHECK(got.router_parameters == want.router_parameters);
  CHECK(got.total_parameters == want.total_parameters);
  CHECK(got.metrics == want.metrics);
  CHECK(got.trailing_metrics == want.trailing_metrics);
  CHECK(got.top_k == want.top_k);
  CHECK(got.routed_tokens == want.routed_tokens);
  REQUIRE(got.layers.size() == want.layers.size());
  const auto same = [](double a, double b) { return a == b || (std::isnan(a) && std::isnan(b)); };
  for (std::size_t l = 0; l < want.layers.size(); ++l) {
    CAPTURE(l);
    REQUIRE(got.layers[l].fractions.size() == want.layers[l].fractions.size());
    for (std::size_t e = 0; e < want.layers[l].fractions.size(); ++e)
      CHECK(same(got.layers[l].fractions[e], want.layers[l].fractions[e]));  // shortest text: the same double
    CHECK(same(got.layers[l].entropy, want.layers[l].entropy));
    CHECK(same(got.layers[l].max_fraction, want.layers[l].max_fraction));
    REQUIRE(got.layers[l].logit_mean.size() == want.layers[l].logit_mean.size());
    REQUIRE(got.layers[l].logit_std.size() == want.layers[l].logit_std.size());
    for (std::size_t e = 0; e < want.layers[l].logit_mean.size(); ++e) {
      CHECK(same(got.layers[l].logit_mean[e], want.layers[l].logit_mean[e]));
      CHECK(same(got.layers[l].logit_std[e], want.layers[l].logit_std[e]));
    }
    REQUIRE(got.layers[l].bias_logit.size() == want.layers[l].bias_logit.size());
    for (std::size_t e = 0; e < want.layers[l].bias_logit.size(); ++e)
      CHECK(same(got.layers[l].bias_logit[e], want.layers[l].bias_logit[e]));
  }
}

report::ReportOptions run_options(std::string command) {
  return {.title = "GPT-2 MoE: routing gates compared",
          .command_line = std::move(command),
          .budget = "200 steps of 8 x 1024 tokens per variant",
          .corpus = "dictionaries, 28M tokens",
          .notes = "Model: GPT-2 small, seed 1337.",
          .trained_on = "NVIDIA H200, 132 SMs, bf16"};
}

}  // namespace

TEST_CASE("routing report: routing.json reads back into the same results and options, NaN included") {
  auto results = synthetic_results();
  results[1].trailing_metrics = {{"images/s", "1.2k"}};  // after the routing columns; must stay there
  const report::ReportOptions options = run_options("gpt2_moe compare --variants dense,linear,self,fixed-random");
  const report::RoutingDocument doc = report::parse_routing_json(report::routing_json(results, options), "test");
  REQUIRE(doc.results.size() == results.size());
  for (std::size_t i = 0; i < results.size(); ++i) check_same_result(doc.results[i], results[i]);
  CHECK(doc.options.title == options.title);
  CHECK(doc.options.command_line == options.command_line);
  CHECK(doc.options.budget == options.budget);
  CHECK(doc.options.corpus == options.corpus);
  CHECK(doc.options.notes == options.notes);
  CHECK(doc.options.trained_on == options.trained_on);
  // The report written from what was read is the report written from the results.
  CHECK(report::report_markdown(doc.results, doc.options) == report::report_markdown(results, options));
  CHECK_THROWS_WITH_AS(report::parse_routing_json("{\"title\": \"t\"}", "old.json"), doctest::Contains("command_line"),
                       moe::Error);
  CHECK_THROWS_WITH_AS(report::parse_routing_json("[1,", "cut.json"), doctest::Contains("cut.json"), moe::Error);
}

TEST_CASE("routing report: runs of other gates with the same budget merge into one report; unlike runs are refused") {
  const auto results = synthetic_results();  // dense, linear, self, fixed-random
  const std::vector<report::VariantResult> first(results.begin(), results.begin() + 2), second(results.begin() + 2,
                                                                                               results.end());
  report::ReportOptions second_options = run_options("gpt2_moe compare --variants self,fixed-random");
  second_options.trained_on = "NVIDIA H100 80GB HBM3, 132 SMs, bf16";  // a later session's GPU
  const std::vector<report::RoutingDocument> docs = {
      report::parse_routing_json(report::routing_json(first, run_options("gpt2_moe compare --variants dense,linear")),
                                 "a/routing.json"),
      report::parse_routing_json(report::routing_json(second, second_options), "b/routing.json")};
  const std::vector<std::string> names = {"a/routing.json", "b/routing.json"};
  const report::RoutingDocument merged = report::merge_routing_documents(docs, names);
  REQUIRE(merged.results.size() == 4);
  for (std::size_t i = 0; i < results.size(); ++i) check_same_result(merged.results[i], results[i]);
  CHECK(merged.options.command_line ==
        "gpt2_moe compare --variants dense,linear\ngpt2_moe compare --variants self,fixed-random");
  CHECK(merged.options.trained_on ==
        "NVIDIA H200, 132 SMs, bf16 (dense, linear); NVIDIA H100 80GB HBM3, 132 SMs, bf16 (self, fixed-random)");
  const std::string md = report::report_markdown(merged.results, merged.options);
  CHECK(md.find("Trained on NVIDIA H200, 132 SMs, bf16 (dense, linear); NVIDIA H100") != std::string::npos);
  CHECK(md.find("| fixed-random |") != std::string::npos);

  // Runs on one GPU: its name once.
  std::vector<report::RoutingDocument> same_place = docs;
  same_place[1].options.trained_on = same_place[0].options.trained_on;
  CHECK(report::merge_routing_documents(same_place, names).options.trained_on == "NVIDIA H200, 132 SMs, bf16");

  const auto refused = [&](auto change, const char* phrase) {
    std::vector<report::RoutingDocument> changed = docs;
    change(changed[1]);
    CHECK_THROWS_WITH_AS(report::merge_routing_documents(changed, names), doctest::Contains(phrase), moe::Error);
  };
  refused([](report::RoutingDocument& d) { d.options.budget = "100 steps of 8 x 1024 tokens per variant"; },
          "b/routing.json has another budget than a/routing.json");
  refused([](report::RoutingDocument& d) { d.options.corpus = "fortunes"; }, "another corpus");

  // The same shards read from another checkout's folder are the same corpus; another folder name,
  // or other contents under the same name, are not.
  const std::string shards = " (2 llm.c shard(s), 27940716 training + 1465187 validation tokens, gpt2-bpe)";
  const auto with_corpora = [&](std::string a, std::string b) {
    std::vector<report::RoutingDocument> changed = docs;
    changed[0].options.corpus = std::move(a), changed[1].options.corpus = std::move(b);
    return changed;
  };
  CHECK(report::merge_routing_documents(with_corpora("/work/main/build-gpu/gpt2-shards" + shards,
                                                     "/tmp/w/build-gpu/gpt2-shards/" + shards),
                                        names)
            .options.corpus == "/work/main/build-gpu/gpt2-shards" + shards);
  CHECK(report::merge_routing_documents(with_corpora("/a/mnist: 60000 training", "/b/mnist: 60000 training"), names)
            .results.size() == 4);
  using Corpora = std::pair<std::string, std::string>;
  for (const auto& [a, b] : {Corpora{"/w/gpt2-shards" + shards, "/w/other-shards" + shards},
                             Corpora{"/w/gpt2-shards" + shards, "/w/gpt2-shards (1 llm.c shard(s))"},
                             Corpora{"/a/mnist: 60000 training", "/a/mnist: 100 training"},
                             Corpora{"/x/shards/." + shards, "/y/other/." + shards}})
    CHECK_THROWS_WITH_AS(report::merge_routing_documents(with_corpora(a, b), names), doctest::Contains("another corpus"),
                         moe::Error);
  refused([](report::RoutingDocument& d) { d.options.notes = "Model: GPT-2 small, seed 7."; }, "model or seed");
  refused([](report::RoutingDocument& d) { d.results[0].variant = "linear"; },
          "variant 'linear' is in more than one of the runs");
}
