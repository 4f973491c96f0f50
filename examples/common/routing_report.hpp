// examples/common/routing_report.hpp: the report of a gate comparison (the paper's Table 1 and
// Figures 2-4): several variants trained with the same budget, each with its task metrics and, for
// MoE variants, the routing statistics of every layer. write_routing_report writes into one folder
//   report.md          the table, the settings, the pictures embedded
//   routing.csv        variant,layer,expert,fraction,logit_mean,logit_std,bias_logit (long format)
//   routing.json       every number of the table and of the pictures (read back by
//                      parse_routing_json: comparisons run apart, one gate per GPU call, are
//                      reported together by merge_routing_documents)
//   entropy.svg        normalized routing entropy per layer, one line per MoE variant (Figure 2)
//   max_fraction.svg   largest expert fraction per layer (Figure 4)
//   heatmap_<v>.svg    layer x expert fractions of variant v, one colour range for all (Figure 3)
// Dense variants appear in the table only. A variant keeps its colour and marker in every picture.
#pragma once

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "moe/io/json.hpp"
#include "moe/stats.hpp"
#include "svg_plot.hpp"

namespace report {

// values[top] above the mean of the other experts' values, over the mean of `stds`, where top is
// the expert with the largest fraction (LayerRouting's offsets). NaN for N < 2, a non-finite
// fraction, lists of another length, or a result that is not finite.
inline double top_expert_lead(const std::vector<double>& fractions, const std::vector<double>& values,
                              const std::vector<double>& stds) {
  const std::size_t n = fractions.size();
  const bool finite = std::all_of(fractions.begin(), fractions.end(), [](double f) { return std::isfinite(f); });
  if (n < 2 || !finite || values.size() != n || stds.size() != n) return std::nan("");
  const std::size_t top = std::size_t(std::max_element(fractions.begin(), fractions.end()) - fractions.begin());
  double others = 0, spread = 0;
  for (std::size_t e = 0; e < n; ++e) {
    if (e != top) others += values[e];
    spread += stds[e];
  }
  others /= double(n - 1), spread /= double(n);
  const double offset = (values[top] - others) / spread;
  return std::isfinite(offset) ? offset : std::nan("");
}

// One MoE layer's routing over the measured tokens (paper section 4.2).
struct LayerRouting {
  std::vector<double> fractions{};  // [N] f_i: share of the router choices that picked expert i
  double entropy = 0;               // -sum f_i log f_i / log N (paper eq. 6 over log N): 1 = uniform
  double max_fraction = 0;          // max_i f_i
  // Each expert's logit over the measured tokens: mean and standard deviation (moe::RoutingStats);
  // empty where not measured (reports written before they were).
  std::vector<double> logit_mean{};
  std::vector<double> logit_std{};
  // Each expert's logit for the router input's constant part, the same for every token (the bias
  // of the LayerNorm before the gate, through the gate: examples/common/router_bias.hpp); empty
  // where there is none (Random, a gate reading the residual stream) or it was not measured.
  std::vector<double> bias_logit{};

  static LayerRouting from_stats(const moe::RoutingStats& stats) {
    return {stats.expert_fractions(), stats.normalized_entropy(), stats.max_fraction(), stats.logit_means(),
            stats.logit_stds()};
  }

  // The most used expert's mean logit above the mean of the other experts' mean logits, in units
  // of the experts' mean standard deviation. A few units: that expert's logit tops the others'
  // whatever the token, so it is among nearly every token's choices (a fixed offset, such as one
  // coordinate of the hidden state running high); near 0: its share comes from logits that vary
  // with the token. NaN where the logits were not measured, for N = 1, or a value is not finite
  // (a NaN fraction included: then no expert is known to be the most used).
  double top_logit_offset() const { return top_expert_lead(fractions, logit_mean, logit_std); }

  // The part of top_logit_offset that the constant part of the router's input gives every token
  // (bias_logit's lead, in the same units): near top_logit_offset, that constant (the LayerNorm's bias)
  // carries the expert; near 0, the token-dependent part does. NaN where either is not measured.
  double top_bias_offset() const { return top_expert_lead(fractions, bias_logit, logit_std); }

  // Entropy and maximum computed from the fractions as given (not renormalised); a non-finite
  // fraction makes both NaN. Entropy is 1 for N = 1, as in moe/stats.hpp.
  static LayerRouting from_fractions(std::vector<double> fractions) {
    LayerRouting layer{std::move(fractions), 0, 0};
    double entropy = 0, largest = 0;
    for (double f : layer.fractions) {
      if (!std::isfinite(f)) {
        layer.entropy = layer.max_fraction = std::nan("");
        return layer;
      }
      if (f > 0) entropy -= f * std::log(f);
      largest = std::max(largest, f);
    }
    const std::size_t n = layer.fractions.size();
    layer.entropy = n <= 1 ? double(n) : entropy / std::log(double(n));
    layer.max_fraction = largest;
    return layer;
  }
};

struct VariantResult {
  std::string variant{};  // "dense", "linear", "self", "fixed-random", "random", ...
  std::int64_t router_parameters = 0;
  std::int64_t total_parameters = 0;
  // Task-specific table columns, already formatted by the caller: {"val loss", "3.21"}, ...
  std::vector<std::pair<std::string, std::string>> metrics{};
  bool is_moe = false;
  std::vector<LayerRouting> layers{};  // one per MoE layer; empty for dense
  std::uint64_t routed_tokens = 0;     // tokens each layer's statistics were counted over
  // Experts chosen per token: a layer where all choices go to k experts has max fraction 1/k and
  // entropy log k / log N, the collapse lines of the pictures. 0 = not given (collapse drawn at 1).
  std::int64_t top_k = 0;
  // Columns after the routing means (a classifier's throughput: {"images/s", "1.2k"}); in the
  // JSON they follow `metrics` in the same object. Empty: the table ends with the routing means.
  std::vector<std::pair<std::string, std::string>> trailing_metrics{};
  // The metrics a comparison over several seeds summarises (seed_summary.hpp), as numbers:
  // {"val loss", 2.2954, 4}. Not shown in this report's own table.
  struct Value {
    std::string name{};
    double value = 0;
    int decimals = 4;  // shown with this many digits after the point
  };
  std::vector<Value> values{};
};

struct ReportOptions {
  std::string title = "Routing report";
  std::string command_line{};  // the command that produced the results
  std::string budget{};        // e.g. "2,000 steps of 8 x 128 tokens"
  std::string corpus{};        // e.g. "tiny-shakespeare, 1.1M bytes, 90/10 split"
  std::string notes{};         // markdown, appended to the header paragraph as it is
  std::string trained_on{};    // where the variants trained ("NVIDIA H200, 132 SMs, bf16"): "Trained on ..." after the notes
  std::string appendix{};      // markdown, appended to the end of report.md as it is (its own sections)
};

// Fixed per variant name so that a variant looks the same in every picture and every report;
// names outside the five known ones get a colour and marker from a hash of the name.
struct VariantStyle {
  std::string_view colour = "#000000";
  Marker marker = Marker::circle;
};

inline VariantStyle variant_style(std::string_view variant) {
  if (variant == "dense") return {"#555555", Marker::square};
  if (variant == "linear") return {"#0072b2", Marker::circle};
  if (variant == "self") return {"#d55e00", Marker::diamond};
  if (variant == "fixed-random") return {"#009e73", Marker::triangle};
  if (variant == "random") return {"#cc79a7", Marker::triangle_down};
  static constexpr std::array<std::string_view, 4> colours = {"#e69f00", "#56b4e9", "#000000", "#8c6d31"};
  static constexpr std::array<Marker, 5> markers = {Marker::circle, Marker::square, Marker::triangle, Marker::diamond,
                                                    Marker::triangle_down};
  std::uint64_t hash = 1469598103934665603ull;  // FNV-1a: the same on every platform and run
  for (char c : variant) hash = (hash ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  return {colours[hash % colours.size()], markers[(hash / colours.size()) % markers.size()]};
}

// Shortest text that reads back as the same double ("0.05", not "0.050000000000000003").
inline std::string shortest(double value) {
  char buffer[32];
  const auto result = std::to_chars(buffer, buffer + sizeof buffer, value);
  return std::string(buffer, result.ptr);
}

namespace detail {

inline std::size_t experts_of(const VariantResult& result) {
  return result.layers.empty() ? 0 : result.layers.front().fractions.size();
}

// Every check that the files below rely on, with the variant and layer named.
inline void validate(std::span<const VariantResult> results) {
  std::set<std::string_view> names;
  for (const VariantResult& r : results) {
    moe::check(!r.variant.empty(), "report: a variant has an empty name");
    moe::check(names.insert(r.variant).second, "report: variant '", r.variant, "' appears twice");
    moe::check(r.router_parameters >= 0 && r.total_parameters >= 0, "report: variant '", r.variant,
               "' has a negative parameter count (router ", r.router_parameters, ", total ", r.total_parameters, ")");
    std::set<std::string_view> metric_names;
    std::vector<std::pair<std::string, std::string>> all_metrics = r.metrics;
    all_metrics.insert(all_metrics.end(), r.trailing_metrics.begin(), r.trailing_metrics.end());
    for (const auto& [name, value] : all_metrics) {
      moe::check(!name.empty(), "report: variant '", r.variant, "' has a metric with an empty name");
      moe::check(metric_names.insert(name).second, "report: variant '", r.variant, "' has metric '", name, "' twice");
    }
    if (!r.is_moe) {
      moe::check(r.layers.empty(), "report: variant '", r.variant, "' is not MoE but has ", r.layers.size(),
                 " routing layers");
      continue;
    }
    moe::check(!r.layers.empty(), "report: MoE variant '", r.variant, "' has no routing layers");
    const std::size_t experts = experts_of(r);
    for (std::size_t l = 0; l < r.layers.size(); ++l) {
      moe::check(!r.layers[l].fractions.empty() && r.layers[l].fractions.size() == experts, "report: variant '",
                 r.variant, "' layer ", l, " has ", r.layers[l].fractions.size(), " expert fractions, layer 0 has ",
                 experts, " (every layer needs the same N >= 1)");
      // Shares of the router's choices, or NaN where a layer's statistics went wrong (shown as such).
      for (std::size_t e = 0; e < experts; ++e) {
        const double f = r.layers[l].fractions[e];
        moe::check(std::isnan(f) || (f >= 0 && f <= 1), "report: variant '", r.variant, "' layer ", l, " expert ", e,
                   " has fraction ", f, ", outside [0, 1]");
      }
      const LayerRouting& layer = r.layers[l];
      moe::check(layer.logit_mean.size() == layer.logit_std.size() &&
                     (layer.logit_mean.empty() || layer.logit_mean.size() == experts),
                 "report: variant '", r.variant, "' layer ", l, " has ", layer.logit_mean.size(), " logit means and ",
                 layer.logit_std.size(), " standard deviations for ", experts, " experts (none, or one each)");
      moe::check(layer.bias_logit.empty() || layer.bias_logit.size() == experts, "report: variant '", r.variant,
                 "' layer ", l, " has ", layer.bias_logit.size(), " bias logits for ", experts,
                 " experts (none, or one each)");
    }
    moe::check(r.top_k >= 0 && std::size_t(r.top_k) <= experts, "report: variant '", r.variant,
               "' has top_k = ", r.top_k, " for N = ", experts, " experts (0 = not given)");
  }
}

// Backslash before the characters that would end a table cell or start markup/HTML.
inline std::string markdown_escape(std::string_view text) {
  std::string out;
  for (char c : text) {
    if (c == '\n' || c == '\r') {
      out += ' ';
      continue;
    }
    if (std::string_view("\\`*[]<>&|").find(c) != std::string_view::npos) out += '\\';
    out += c;
  }
  return out;
}

// Appends " text |" to a markdown table row.
inline void append_cell(std::string& row, std::string_view text) {
  row += ' ';
  row += text;
  row += " |";
}

// 1234567 -> "1,234,567".
inline std::string grouped(std::uint64_t value) {
  const std::string digits = std::to_string(value);
  std::string out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

// Mean over the layers where the statistic is finite.
struct LayerMean {
  double value = std::nan("");
  std::size_t finite_layers = 0;
};

template <class Field>
LayerMean layer_mean(const VariantResult& result, Field field) {
  LayerMean mean;
  double sum = 0;
  for (const LayerRouting& layer : result.layers)
    if (const double v = field(layer); std::isfinite(v)) sum += v, ++mean.finite_layers;
  if (mean.finite_layers > 0) mean.value = sum / double(mean.finite_layers);
  return mean;
}

inline LayerMean mean_entropy(const VariantResult& r) {
  return layer_mean(r, [](const LayerRouting& l) { return l.entropy; });
}
inline LayerMean mean_max_fraction(const VariantResult& r) {
  return layer_mean(r, [](const LayerRouting& l) { return l.max_fraction; });
}

// "0.724", or "0.724 (3 of 4 layers)" when some layer has no value.
inline std::string mean_cell(const VariantResult& r, const LayerMean& mean) {
  if (!r.is_moe) return "-";
  std::string cell = format_fixed(mean.value, 3);
  if (mean.finite_layers > 0 && mean.finite_layers < r.layers.size())
    cell += " (" + std::to_string(mean.finite_layers) + " of " + std::to_string(r.layers.size()) + " layers)";
  return cell;
}

// The metric names of all variants, in the order they first appear (`metrics`, or with
// trailing = true, `trailing_metrics`).
inline std::vector<std::string> metric_columns(std::span<const VariantResult> results, bool trailing = false) {
  std::vector<std::string> columns;
  for (const VariantResult& r : results)
    for (const auto& metric : trailing ? r.trailing_metrics : r.metrics)
      if (std::find(columns.begin(), columns.end(), metric.first) == columns.end()) columns.push_back(metric.first);
  return columns;
}

// The cell of metric column `name` in a row: its value, or "-" when the variant has none.
inline std::string metric_cell(const std::vector<std::pair<std::string, std::string>>& metrics,
                               const std::string& name) {
  const auto found = std::find_if(metrics.begin(), metrics.end(), [&](const auto& p) { return p.first == name; });
  return found == metrics.end() ? std::string("-") : markdown_escape(found->second);
}

// heatmap_<variant>.svg with the name reduced to [A-Za-z0-9._-]; distinct names stay distinct
// files, also on file systems that ignore case.
inline std::vector<std::string> heatmap_file_names(std::span<const VariantResult> results) {
  std::vector<std::string> names(results.size());
  std::set<std::string> used;
  for (std::size_t i = 0; i < results.size(); ++i) {
    if (!results[i].is_moe) continue;
    std::string stem;
    for (char c : results[i].variant) {
      const bool keep = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
                        c == '_' || c == '.';
      stem += keep ? c : '_';
    }
    const auto lower = [](std::string text) {
      for (char& c : text)
        if (c >= 'A' && c <= 'Z') c = char(c - 'A' + 'a');
      return text;
    };
    std::string name = "heatmap_" + stem + ".svg";
    for (int n = 2; !used.insert(lower(name)).second; ++n) name = "heatmap_" + stem + "_" + std::to_string(n) + ".svg";
    names[i] = name;
  }
  return names;
}

// A JSON string for any bytes: ill-formed UTF-8 becomes U+FFFD first (moe::io::json::quote
// accepts valid UTF-8 only), so a stray byte in a name cannot stop the report.
inline std::string json_quote(std::string_view text) {
  std::string valid;
  for (std::size_t i = 0; i < text.size();) {
    const std::size_t length = utf8_sequence_length(text, i);
    valid += length == 0 ? replacement_character : text.substr(i, length);
    i += std::max<std::size_t>(length, 1);
  }
  return moe::io::json::quote(valid);
}

// Shortest round-trip text, "1.0" rather than "1" so that a double reads back as one; null when
// not finite.
inline std::string json_number(double value) {
  if (!std::isfinite(value)) return "null";
  std::string text = shortest(value);
  if (text.find_first_of(".e") == std::string::npos) text += ".0";
  return text;
}

inline void write_file(const std::filesystem::path& path, std::string_view content) {
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  moe::check(file.is_open(), "report: cannot open '", path.string(), "' for writing");
  file.write(content.data(), std::streamsize(content.size()));
  file.close();
  moe::check(!file.fail(), "report: writing '", path.string(), "' failed");
}

}  // namespace detail

// | variant | router params | total params | <metrics> | mean norm. entropy | mean max expert fraction |
// <trailing metrics> |. One row per variant in the given order; "-" where a value does not apply
// or was not given.
inline std::string markdown_table(std::span<const VariantResult> results) {
  using namespace detail;
  validate(results);
  const std::vector<std::string> metrics = metric_columns(results), trailing = metric_columns(results, true);
  std::string table = "| variant | router params | total params |";
  std::string rule = "|---|---:|---:|";
  for (const std::string& m : metrics) append_cell(table, markdown_escape(m)), rule += "---:|";
  table += " mean norm. entropy | mean max expert fraction |";
  rule += "---:|---:|";
  for (const std::string& m : trailing) append_cell(table, markdown_escape(m)), rule += "---:|";
  table += "\n" + rule + "\n";
  for (const VariantResult& r : results) {
    table += '|';
    append_cell(table, markdown_escape(r.variant));
    append_cell(table, r.is_moe ? grouped(std::uint64_t(r.router_parameters)) : "-");
    append_cell(table, grouped(std::uint64_t(r.total_parameters)));
    for (const std::string& m : metrics) append_cell(table, metric_cell(r.metrics, m));
    append_cell(table, mean_cell(r, mean_entropy(r)));
    append_cell(table, mean_cell(r, mean_max_fraction(r)));
    for (const std::string& m : trailing) append_cell(table, metric_cell(r.trailing_metrics, m));
    table += '\n';
  }
  return table;
}

// variant,layer,expert,fraction,logit_mean,logit_std,bias_logit: one row per (MoE variant, layer,
// expert); an empty value is n/a (not finite, or not measured).
inline std::string routing_csv(std::span<const VariantResult> results) {
  using namespace detail;
  validate(results);
  const auto cell = [](double v) { return std::isfinite(v) ? shortest(v) : std::string(); };
  std::string csv = "variant,layer,expert,fraction,logit_mean,logit_std,bias_logit\n";
  for (const VariantResult& r : results) {
    std::string name = r.variant;
    if (name.find_first_of(",\"\r\n") != std::string::npos) {  // RFC 4180 quoting
      std::string quoted = "\"";
      for (char c : name) quoted += c == '"' ? std::string("\"\"") : std::string(1, c);
      name = quoted + "\"";
    }
    for (std::size_t l = 0; l < r.layers.size(); ++l)
      for (std::size_t e = 0; e < r.layers[l].fractions.size(); ++e) {
        const LayerRouting& layer = r.layers[l];
        const bool logits = !layer.logit_mean.empty(), bias = !layer.bias_logit.empty();
        csv += name + "," + std::to_string(l) + "," + std::to_string(e) + "," + cell(layer.fractions[e]) + "," +
               (logits ? cell(layer.logit_mean[e]) : "") + "," + (logits ? cell(layer.logit_std[e]) : "") + "," +
               (bias ? cell(layer.bias_logit[e]) : "") + "\n";
      }
  }
  return csv;
}

// The options, then per variant: the table's values and every layer's fractions, entropy and
// max_fraction, and where measured each expert's logit_mean, logit_std and bias_logit. Non-finite
// numbers are null.
inline std::string routing_json(std::span<const VariantResult> results, const ReportOptions& options) {
  using namespace detail;
  validate(results);
  std::string json = "{\n";
  json += "  \"title\": " + json_quote(options.title) + ",\n";
  json += "  \"command_line\": " + json_quote(options.command_line) + ",\n";
  json += "  \"budget\": " + json_quote(options.budget) + ",\n";
  json += "  \"corpus\": " + json_quote(options.corpus) + ",\n";
  json += "  \"notes\": " + json_quote(options.notes) + ",\n";
  json += "  \"trained_on\": " + json_quote(options.trained_on) + ",\n";
  json += "  \"entropy\": \"normalized: -sum_i f_i log f_i / log N (1 = uniform)\",\n";
  json += "  \"variants\": [";
  for (std::size_t v = 0; v < results.size(); ++v) {
    const VariantResult& r = results[v];
    json += v ? ",\n    {\n" : "\n    {\n";
    json += "      \"variant\": " + json_quote(r.variant) + ",\n";
    json += "      \"is_moe\": " + std::string(r.is_moe ? "true" : "false") + ",\n";
    json += "      \"router_parameters\": " + std::to_string(r.router_parameters) + ",\n";
    json += "      \"total_parameters\": " + std::to_string(r.total_parameters) + ",\n";
    json += "      \"metrics\": {";
    for (std::size_t m = 0; m < r.metrics.size(); ++m)
      json += (m ? ", " : "") + json_quote(r.metrics[m].first) + ": " + json_quote(r.metrics[m].second);
    for (std::size_t m = 0; m < r.trailing_metrics.size(); ++m)
      json += (m || !r.metrics.empty() ? ", " : "") + json_quote(r.trailing_metrics[m].first) + ": " +
              json_quote(r.trailing_metrics[m].second);
    json += "},\n";
    json += "      \"trailing_metrics\": [";  // the names, of `metrics` above, that go after the routing columns
    for (std::size_t m = 0; m < r.trailing_metrics.size(); ++m)
      json += (m ? ", " : "") + json_quote(r.trailing_metrics[m].first);
    json += "],\n";
    if (!r.is_moe) {
      json += "      \"layers\": []\n    }";
      continue;
    }
    json += "      \"experts\": " + std::to_string(experts_of(r)) + ",\n";
    json += "      \"top_k\": " + (r.top_k > 0 ? std::to_string(r.top_k) : std::string("null")) + ",\n";
    json += "      \"routed_tokens\": " + std::to_string(r.routed_tokens) + ",\n";
    json += "      \"mean_normalized_entropy\": " + json_number(mean_entropy(r).value) + ",\n";
    json += "      \"mean_max_fraction\": " + json_number(mean_max_fraction(r).value) + ",\n";
    const auto array = [](const std::vector<double>& values) {
      std::string text = "[";
      for (std::size_t e = 0; e < values.size(); ++e) text += (e ? ", " : "") + json_number(values[e]);
      return text + "]";
    };
    json += "      \"layers\": [";
    for (std::size_t l = 0; l < r.layers.size(); ++l) {
      const LayerRouting& layer = r.layers[l];
      json += (l ? ",\n" : "\n") + std::string("        {\"layer\": ") + std::to_string(l) +
              ", \"entropy\": " + json_number(layer.entropy) +
              ", \"max_fraction\": " + json_number(layer.max_fraction) + ", \"fractions\": " + array(layer.fractions);
      if (!layer.logit_mean.empty())
        json += ", \"logit_mean\": " + array(layer.logit_mean) + ", \"logit_std\": " + array(layer.logit_std);
      if (!layer.bias_logit.empty()) json += ", \"bias_logit\": " + array(layer.bias_logit);
      json += "}";
    }
    json += "\n      ]\n    }";
  }
  json += results.empty() ? "]\n}\n" : "\n  ]\n}\n";
  return json;
}

namespace detail {

inline std::vector<Series> layer_series(std::span<const VariantResult> results, double LayerRouting::*field) {
  std::vector<Series> series;
  for (const VariantResult& r : results) {
    if (!r.is_moe) continue;
    const VariantStyle style = variant_style(r.variant);
    Series s{r.variant, {}, std::string(style.colour), style.marker};
    for (const LayerRouting& layer : r.layers) s.y.push_back(layer.*field);
    series.push_back(std::move(s));
  }
  return series;
}

// The distinct (N, k) pairs of the MoE variants, for the reference lines.
inline std::set<std::pair<std::size_t, std::int64_t>> shapes(std::span<const VariantResult> results) {
  std::set<std::pair<std::size_t, std::int64_t>> pairs;
  for (const VariantResult& r : results)
    if (r.is_moe) pairs.insert({experts_of(r), r.top_k});
  return pairs;
}

// Figure 2: normalized entropy per layer in [0, 1], with the uniform level and, when k is known,
// the level of a layer whose choices all go to k experts (log k / log N).
inline LineChart entropy_chart(std::span<const VariantResult> results) {
  LineChart chart{.title = "Normalized routing entropy per layer",
                  .y_label = "normalized entropy (1 = uniform)",
                  .series = layer_series(results, &LayerRouting::entropy),
                  .y_range = std::array<double, 2>{0, 1},
                  .references = {{1.0, "uniform"}}};
  for (const auto& [experts, top_k] : shapes(results))
    if (top_k >= 2 && std::size_t(top_k) < experts)
      chart.references.push_back({std::log(double(top_k)) / std::log(double(experts)),
                                  "collapse (k = " + std::to_string(top_k) + ", N = " + std::to_string(experts) + ")"});
  return chart;
}

// Figure 4: the largest expert's share per layer, with the uniform level 1/N and the collapse
// level 1/k (1 when k is not given). The y axis ends just above the highest collapse level.
inline LineChart max_fraction_chart(std::span<const VariantResult> results) {
  LineChart chart{.title = "Largest expert fraction per layer",
                  .y_label = "max expert fraction",
                  .series = layer_series(results, &LayerRouting::max_fraction)};
  std::set<std::size_t> experts_seen;
  std::set<std::int64_t> collapse_seen;
  double y_high = 0;
  for (const auto& [experts, top_k] : shapes(results)) {
    if (experts_seen.insert(experts).second)
      chart.references.push_back({1.0 / double(experts), "uniform (1/" + std::to_string(experts) + ")"});
    if (collapse_seen.insert(top_k).second)
      chart.references.push_back(top_k > 0
                                     ? ReferenceLine{1.0 / double(top_k), "collapse (1/" + std::to_string(top_k) + ")"}
                                     : ReferenceLine{1.0, "collapse (1)"});
    y_high = std::max(y_high, top_k > 0 ? 1.0 / double(top_k) : 1.0);
  }
  for (const Series& s : chart.series)
    for (double v : s.y)
      if (std::isfinite(v)) y_high = std::max(y_high, v);
  chart.y_range = std::array<double, 2>{0, std::min(1.0, y_high + 0.05)};
  return chart;
}

// Figure 3 for one variant, coloured on the given range so that variants compare.
inline Heatmap fractions_heatmap(const VariantResult& r, std::array<double, 2> range) {
  Heatmap map{.title = r.variant + ": share of router choices per expert",
              .row_axis = "layer",
              .column_axis = "expert",
              .value_label = "fraction of router choices",
              .rows = Index(r.layers.size()),
              .columns = Index(experts_of(r)),
              .value_range = range};
  for (const LayerRouting& layer : r.layers)
    map.values.insert(map.values.end(), layer.fractions.begin(), layer.fractions.end());
  return map;
}

// One range for every heatmap: 0 .. the largest finite fraction of any variant.
inline std::array<double, 2> shared_fraction_range(std::span<const VariantResult> results) {
  double high = 0;
  for (const VariantResult& r : results)
    for (const LayerRouting& layer : r.layers)
      for (double f : layer.fractions)
        if (std::isfinite(f)) high = std::max(high, f);
  return {0, high > 0 ? high : 1};
}

// A fenced code block whose fence is longer than any run of backticks in the text.
inline std::string code_block(std::string_view text) {
  std::size_t run = 0, longest = 0;
  for (char c : text) run = c == '`' ? run + 1 : 0, longest = std::max(longest, run);
  const std::string fence(std::max<std::size_t>(3, longest + 1), '`');
  return fence + "sh\n" + std::string(text) + "\n" + fence + "\n";
}

// Whether any layer of any variant has `field` measured (reports written before the logits were
// measured have none).
inline bool any_measured(std::span<const VariantResult> results, std::vector<double> LayerRouting::*field) {
  return std::any_of(results.begin(), results.end(), [&](const VariantResult& r) {
    return std::any_of(r.layers.begin(), r.layers.end(), [&](const LayerRouting& l) { return !(l.*field).empty(); });
  });
}
inline bool any_logits_measured(std::span<const VariantResult> results) {
  return any_measured(results, &LayerRouting::logit_mean);
}
inline bool any_bias_measured(std::span<const VariantResult> results) {
  return any_measured(results, &LayerRouting::bias_logit);
}

// report.md's words over its two offset tables.
inline constexpr std::string_view kLogitOffsetText =
    "The most used expert's mean logit above the other experts' mean logits, in units of their mean "
    "standard deviation. A few units: that expert's logit tops the others' whatever the token (a fixed "
    "offset), so it is among nearly every token's choices; near 0: its share comes from logits that vary "
    "with the token.";
inline constexpr std::string_view kBiasOffsetText =
    "Of that lead, the part the bias of the LayerNorm before the gate (GPT-2's ln_2, ViT's norm2) gives "
    "every token alike (the gate's logits for the bias: SelfRoute reads it, Linear and FixedRandom "
    "project it), in the same units. Near the lead: the bias carries the "
    "most used expert; near 0: the normalised stream does. n/a: a gate without such a part (Random; a gate "
    "reading the residual stream).";

// A per-layer table of one statistic (a member of LayerRouting or a function of one, with `decimals`
// digits after the point): rows = layers, columns = MoE variants.
template <class Field>
std::string layer_table(std::span<const VariantResult> results, Field field, int decimals = 3) {
  std::size_t layers = 0;
  std::string table = "| layer |", rule = "|---:|";
  for (const VariantResult& r : results)
    if (r.is_moe)
      append_cell(table, markdown_escape(r.variant)), rule += "---:|", layers = std::max(layers, r.layers.size());
  table += "\n" + rule + "\n";
  for (std::size_t l = 0; l < layers; ++l) {
    table += '|';
    append_cell(table, std::to_string(l));
    for (const VariantResult& r : results)
      if (r.is_moe)
        append_cell(table, l < r.layers.size() ? format_fixed(std::invoke(field, r.layers[l]), decimals) : std::string("-"));
    table += "\n";
  }
  return table;
}

}  // namespace detail

// The report.md text (the files it links are those write_routing_report writes).
inline std::string report_markdown(std::span<const VariantResult> results, const ReportOptions& options) {
  using namespace detail;
  validate(results);
  std::string md = "# " + markdown_escape(options.title) + "\n\n";
  if (!options.command_line.empty()) md += "Produced by\n\n" + code_block(options.command_line) + "\n";
  if (!options.budget.empty())
    md += "- **Budget** (the same for every variant): " + markdown_escape(options.budget) + "\n";
  if (!options.corpus.empty()) md += "- **Data:** " + markdown_escape(options.corpus) + "\n";
  std::set<std::uint64_t> token_counts;
  for (const VariantResult& r : results)
    if (r.is_moe) token_counts.insert(r.routed_tokens);
  if (token_counts.size() == 1) {
    md += "- **Routing statistics** over " + grouped(*token_counts.begin()) + " routed tokens per layer\n";
  } else if (token_counts.size() > 1) {
    md += "- **Routing statistics** over routed tokens per layer:";
    for (const VariantResult& r : results)
      if (r.is_moe) md += " " + markdown_escape(r.variant) + " " + grouped(r.routed_tokens) + ";";
    md.back() = '\n';
  }
  if (!options.notes.empty() || !options.trained_on.empty()) {
    std::string paragraph = options.notes;
    if (!options.trained_on.empty())
      paragraph += (paragraph.empty() ? "" : " ") + std::string("Trained on ") + options.trained_on + ".";
    md += "\n" + paragraph + "\n";
  }
  md += "\n" + markdown_table(results) + "\n";
  md +=
      "Router params are the learned parameters of the gates, summed over layers (\"-\": no router). "
      "Normalized entropy is -Σ f_i log f_i / log N over a layer's expert fractions f_i (paper eq. 6; "
      "1 = uniform), max expert fraction the share of router choices taken by the most used expert "
      "(1/N = uniform); both are means over layers. A layer has *collapsed* when every token's k choices "
      "go to the same k experts: entropy log k / log N, max expert fraction 1/k.\n";

  const bool any_moe = std::any_of(results.begin(), results.end(), [](const VariantResult& r) { return r.is_moe; });
  if (any_moe) {
    md += "\n## Routing entropy per layer\n\n![Normalized routing entropy per layer](entropy.svg)\n";
    md += "\n## Largest expert fraction per layer\n\n![Largest expert fraction per layer](max_fraction.svg)\n";
    md += "\n## Expert fractions, layer by expert\n\nOne colour range for all variants.\n";
    const std::vector<std::string> files = heatmap_file_names(results);
    for (std::size_t i = 0; i < results.size(); ++i)
      if (results[i].is_moe)
        md += "\n![" + markdown_escape(results[i].variant) + ": expert fractions](" + files[i] + ")\n";
    md += "\n## Per-layer values\n\nNormalized entropy:\n\n" + layer_table(results, &LayerRouting::entropy);
    md += "\nMax expert fraction:\n\n" + layer_table(results, &LayerRouting::max_fraction);
    const bool any_logits = any_logits_measured(results);
    if (any_logits)
      md += "\n" + std::string(kLogitOffsetText) + "\n\n" + layer_table(results, &LayerRouting::top_logit_offset, 2);
    const bool any_bias = any_logits && any_bias_measured(results);
    if (any_bias)
      md += "\n" + std::string(kBiasOffsetText) + "\n\n" + layer_table(results, &LayerRouting::top_bias_offset, 2);
    md += "\nAll fractions";
    md += any_logits ? ", and each expert's logit mean and standard deviation" : "";
    md += any_bias ? " and logit for the bias" : "";
    md += ": [routing.csv](routing.csv), [routing.json](routing.json).\n";
  }
  if (!options.appendix.empty()) md += "\n" + options.appendix + (options.appendix.ends_with('\n') ? "" : "\n");
  return md;
}

// Writes the report's files into `dir` (created if needed; existing files of the same names are
// replaced). Throws moe::Error naming the variant or the file on bad input or a failed write.
inline void write_routing_report(const std::filesystem::path& dir, std::span<const VariantResult> results,
                                 const ReportOptions& options) {
  using namespace detail;
  validate(results);
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  moe::check(!error, "report: cannot create directory '", dir.string(), "': ", error.message());
  write_file(dir / "report.md", report_markdown(results, options));
  write_file(dir / "routing.csv", routing_csv(results));
  write_file(dir / "routing.json", routing_json(results, options));
  const bool any_moe = std::any_of(results.begin(), results.end(), [](const VariantResult& r) { return r.is_moe; });
  if (!any_moe) return;
  write_file(dir / "entropy.svg", line_chart_svg(entropy_chart(results)));
  write_file(dir / "max_fraction.svg", line_chart_svg(max_fraction_chart(results)));
  const std::array<double, 2> range = shared_fraction_range(results);
  const std::vector<std::string> files = heatmap_file_names(results);
  for (std::size_t i = 0; i < results.size(); ++i)
    if (results[i].is_moe) write_file(dir / files[i], heatmap_svg(fractions_heatmap(results[i], range)));
}

// ---- reading a report back, and reporting comparisons run apart together ----------------------

// A comparison as its routing.json holds it: the options it was written with (all but the
// appendix) and every variant's table cells and routing (VariantResult::values, the numbers a
// summary over seeds uses, are not in the file).
struct RoutingDocument {
  ReportOptions options{};
  std::vector<VariantResult> results{};
};

namespace detail {
inline RoutingDocument parse_routing_document(std::string_view text, std::string_view what) {
  namespace json = moe::io::json;
  const json::Value doc = json::parse(text, what);
  const std::string where(what);
  const auto number = [](const json::Value& v) { return v.is_null() ? std::nan("") : v.as_number(); };
  const auto numbers = [&](const json::Value& array) {
    std::vector<double> values;
    for (const json::Value& v : array.as_array()) values.push_back(number(v));
    return values;
  };
  RoutingDocument d;
  d.options.title = doc.at("title").as_string();
  d.options.command_line = doc.at("command_line").as_string();
  d.options.budget = doc.at("budget").as_string();
  d.options.corpus = doc.at("corpus").as_string();
  if (const json::Value* notes = doc.find("notes")) d.options.notes = notes->as_string();
  if (const json::Value* place = doc.find("trained_on")) d.options.trained_on = place->as_string();
  for (const json::Value& v : doc.at("variants").as_array()) {
    VariantResult r;
    r.variant = v.at("variant").as_string();
    r.is_moe = v.at("is_moe").as_bool();
    r.router_parameters = v.at("router_parameters").as_int();
    r.total_parameters = v.at("total_parameters").as_int();
    std::set<std::string> trailing;
    if (const json::Value* names = v.find("trailing_metrics"))
      for (const json::Value& name : names->as_array()) trailing.insert(name.as_string());
    for (const auto& [name, value] : v.at("metrics").as_object())
      (trailing.count(name) ? r.trailing_metrics : r.metrics).emplace_back(name, value.as_string());
    if (r.is_moe) {
      const json::Value& top_k = v.at("top_k");
      r.top_k = top_k.is_null() ? 0 : top_k.as_int();
      r.routed_tokens = std::uint64_t(v.at("routed_tokens").as_int());
      for (const json::Value& layer : v.at("layers").as_array()) {
        LayerRouting l;
        l.fractions = numbers(layer.at("fractions"));
        l.entropy = number(layer.at("entropy"));
        l.max_fraction = number(layer.at("max_fraction"));
        const json::Value* means = layer.find("logit_mean");  // absent in reports written before them
        const json::Value* sds = layer.find("logit_std");
        if (means && sds) l.logit_mean = numbers(*means), l.logit_std = numbers(*sds);
        if (const json::Value* bias = layer.find("bias_logit")) l.bias_logit = numbers(*bias);
        r.layers.push_back(std::move(l));
      }
    }
    d.results.push_back(std::move(r));
  }
  moe::check(!d.results.empty(), "report: ", where, " holds no variants");
  validate(d.results);
  return d;
}
}  // namespace detail

// routing_json's text back into the results and options it was written from. `what` names the
// file in errors. Non-finite numbers (written as null) read as NaN.
inline RoutingDocument parse_routing_json(std::string_view text, std::string_view what) {
  try {
    return detail::parse_routing_document(text, what);
  } catch (const moe::Error& e) {  // a missing key or a wrong type says neither the file nor that it is a report
    const std::string message = e.what();
    if (message.find(what) != std::string::npos) throw;
    moe::fail("report: ", what, ": ", message);
  }
}

// The corpus as merge_routing_documents compares it: the data's description, its leading path
// ("<path> (<what it holds>)", gpt2_moe; "<path>: <what it holds>", vit_moe) cut to the path's last
// name. A later session's checkout of the repository (the GPU machine's) sits in another folder,
// and the same shards there are the same corpus.
inline std::string corpus_identity(std::string_view description) {
  const std::size_t end = std::min(description.find(" ("), description.find(": "));  // npos where neither is
  const std::string_view rest = end == std::string_view::npos ? std::string_view{} : description.substr(end);
  std::string_view path = description.substr(0, end);
  while (path.size() > 1 && path.back() == '/') path.remove_suffix(1);
  const std::size_t slash = path.rfind('/');
  if (slash == std::string_view::npos || slash + 1 == path.size()) return std::string(description);
  const std::string_view name = path.substr(slash + 1);
  if (name == "." || name == "..") return std::string(description);  // names no folder: compared whole
  return std::string(name) + std::string(rest);
}

// The variants of several comparisons in one report, in the order given. They must have been
// run alike: the same budget, data and notes (model, seed), and no variant twice. The report
// keeps every run's command line, one per line, and where each trained when they differ (a later
// GPU session may get another GPU): "A (self, linear); B (random)". Throws moe::Error naming what
// differs.
inline RoutingDocument merge_routing_documents(std::span<const RoutingDocument> documents,
                                               std::span<const std::string> names) {
  moe::check(!documents.empty() && documents.size() == names.size(), "report: nothing to merge");
  RoutingDocument merged;
  merged.options = documents.front().options;
  merged.options.command_line.clear();
  std::set<std::string> seen;
  for (std::size_t i = 0; i < documents.size(); ++i) {
    const ReportOptions& o = documents[i].options;
    // `alike`: the two are the same thing (what is compared may be less than what is shown).
    const auto same = [&](const std::string& ours, const std::string& theirs, const char* field, bool alike) {
      moe::check(alike, "report: ", names[i], " has another ", field, " than ", names.front(), " ('", theirs,
                 "' against '", ours, "'): only comparisons run alike can be reported together");
    };
    same(merged.options.budget, o.budget, "budget", merged.options.budget == o.budget);
    same(merged.options.corpus, o.corpus, "corpus", corpus_identity(merged.options.corpus) == corpus_identity(o.corpus));
    same(merged.options.notes, o.notes, "model or seed (the notes)", merged.options.notes == o.notes);
    for (const VariantResult& r : documents[i].results) {
      moe::check(seen.insert(r.variant).second, "report: variant '", r.variant, "' is in more than one of the runs (",
                 names[i], " again)");
      merged.results.push_back(r);
    }
    if (!o.command_line.empty())
      merged.options.command_line += (merged.options.command_line.empty() ? "" : "\n") + o.command_line;
  }
  const bool one_place = std::all_of(documents.begin(), documents.end(), [&](const RoutingDocument& d) {
    return d.options.trained_on == documents.front().options.trained_on;
  });
  if (!one_place) {
    merged.options.trained_on.clear();
    for (const RoutingDocument& d : documents) {
      std::string variants;
      for (const VariantResult& r : d.results) variants += (variants.empty() ? "" : ", ") + r.variant;
      merged.options.trained_on += (merged.options.trained_on.empty() ? "" : "; ") +
                                   (d.options.trained_on.empty() ? std::string("unknown") : d.options.trained_on) +
                                   " (" + variants + ")";
    }
  }
  return merged;
}

}  // namespace report
