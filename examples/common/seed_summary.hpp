// examples/common/seed_summary.hpp: a gate comparison repeated over several seeds (`compare
// --seeds 1337,1338,1339`). One seed's gap between two gates says little: another seed moves the
// loss by about as much. Over the seeds this reports, per variant, the mean and spread of every
// summarised value, and each variant's difference from a reference variant taken seed by seed
// (paired: within one seed the variants see the same data order and start from the same shared
// tensors, so the difference cancels much of the seed's own effect). write_seed_summary writes
//   report.md     the tables, with links to each seed's own report (<folder>/report.md)
//   summary.json  every per-seed value, and the means, spreads and differences
#pragma once

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "routing_report.hpp"

namespace report {

// One seed's comparison: the variants' results (the same variants, in the same order, in every
// run) and the folder of its own report, relative to the summary's.
struct SeedRun {
  std::uint64_t seed = 0;
  std::vector<VariantResult> results{};
  std::string folder{};
};

// The items of `--seeds`: at least two distinct non-negative integers. `who` starts the errors.
inline std::vector<std::uint64_t> parse_seeds(const std::vector<std::string>& items, std::string_view who) {
  std::vector<std::uint64_t> seeds;
  for (const std::string& item : items) {
    std::uint64_t seed = 0;
    const auto [end, error] = std::from_chars(item.data(), item.data() + item.size(), seed);
    moe::check(error == std::errc() && end == item.data() + item.size(), who, ": --seeds item '", item,
               "' is not a non-negative integer");
    moe::check(std::find(seeds.begin(), seeds.end(), seed) == seeds.end(), who, ": --seeds lists ", seed, " twice");
    seeds.push_back(seed);
  }
  moe::check(seeds.size() >= 2, who, ": --seeds needs at least two seeds (for one, use --seed)");
  return seeds;
}

// Mean, sample standard deviation and range of one value over the seeds where it is finite.
struct Spread {
  double mean = std::nan(""), std = std::nan(""), low = std::nan(""), high = std::nan("");
  std::size_t finite = 0;  // seeds that gave a finite value
  std::size_t given = 0;   // seeds that gave the value at all

  static Spread of(std::span<const std::optional<double>> values) {
    Spread s;
    double sum = 0;
    for (const std::optional<double>& v : values) {
      if (!v) continue;
      ++s.given;
      if (!std::isfinite(*v)) continue;
      sum += *v;
      s.low = s.finite ? std::min(s.low, *v) : *v;
      s.high = s.finite ? std::max(s.high, *v) : *v;
      ++s.finite;
    }
    if (s.finite == 0) return s;
    s.mean = sum / double(s.finite);
    if (s.finite >= 2) {
      double squares = 0;
      for (const std::optional<double>& v : values)
        if (v && std::isfinite(*v)) squares += (*v - s.mean) * (*v - s.mean);
      s.std = std::sqrt(squares / double(s.finite - 1));
    }
    return s;
  }
};

namespace seed_detail {

// A column of the summary: a name, its digits, and how to read it from one variant's result
// (nullopt: the variant does not have it, e.g. a dense model's routing entropy).
struct Column {
  std::string name;
  int decimals = 4;
  std::function<std::optional<double>(const VariantResult&)> read;
};

// The summarised values in the order they first appear, then the two routing means.
inline std::vector<Column> columns(std::span<const SeedRun> runs) {
  std::vector<Column> list;
  std::set<std::string> seen;
  for (const SeedRun& run : runs)
    for (const VariantResult& r : run.results)
      for (const VariantResult::Value& v : r.values)
        if (seen.insert(v.name).second)
          list.push_back({v.name, v.decimals, [name = v.name](const VariantResult& x) -> std::optional<double> {
                            for (const VariantResult::Value& value : x.values)
                              if (value.name == name) return value.value;
                            return std::nullopt;
                          }});
  const auto routing = [](detail::LayerMean (*mean)(const VariantResult&)) {
    return [mean](const VariantResult& r) -> std::optional<double> {
      if (!r.is_moe) return std::nullopt;
      return mean(r).value;
    };
  };
  list.push_back({"mean norm. entropy", 3, routing(&detail::mean_entropy)});
  list.push_back({"mean max expert fraction", 3, routing(&detail::mean_max_fraction)});
  return list;
}

inline void validate(std::span<const SeedRun> runs) {
  moe::check(runs.size() >= 2, "seed summary: needs at least two runs, got ", runs.size());
  const std::vector<VariantResult>& first = runs.front().results;
  moe::check(!first.empty(), "seed summary: the run of seed ", runs.front().seed, " has no variants");
  std::set<std::uint64_t> seeds;
  for (const SeedRun& run : runs) {
    moe::check(seeds.insert(run.seed).second, "seed summary: seed ", run.seed, " appears twice");
    detail::validate(run.results);
    moe::check(run.results.size() == first.size(), "seed summary: seed ", run.seed, " has ", run.results.size(),
               " variants, seed ", runs.front().seed, " has ", first.size());
    for (const VariantResult& r : run.results) {
      std::set<std::string_view> names;
      for (const VariantResult::Value& value : r.values)
        moe::check(names.insert(value.name).second, "seed summary: variant '", r.variant, "' of seed ", run.seed,
                   " has value '", value.name, "' twice");
    }
    for (std::size_t v = 0; v < first.size(); ++v) {
      moe::check(run.results[v].variant == first[v].variant, "seed summary: variant ", v, " is '",
                 run.results[v].variant, "' for seed ", run.seed, " but '", first[v].variant, "' for seed ",
                 runs.front().seed);
      moe::check(run.results[v].layers.size() == first[v].layers.size(), "seed summary: variant '", first[v].variant,
                 "' has ", run.results[v].layers.size(), " MoE layers for seed ", run.seed, " but ",
                 first[v].layers.size(), " for seed ", runs.front().seed);
    }
  }
}

// The variant every other is compared with seed by seed: the learned router when it ran (the
// paper's baseline), else the first variant.
inline std::size_t reference_index(std::span<const SeedRun> runs) {
  const std::vector<VariantResult>& first = runs.front().results;
  for (std::size_t v = 0; v < first.size(); ++v)
    if (first[v].variant == "linear") return v;
  return 0;
}

// Column c of variant v in every run (nullopt where that run's variant lacks it).
inline std::vector<std::optional<double>> per_seed(std::span<const SeedRun> runs, std::size_t v, const Column& c) {
  std::vector<std::optional<double>> values;
  for (const SeedRun& run : runs) values.push_back(c.read(run.results[v]));
  return values;
}

// Variant v minus the reference, seed by seed (nullopt where either lacks the value).
inline std::vector<std::optional<double>> paired_differences(std::span<const SeedRun> runs, std::size_t v,
                                                             std::size_t reference, const Column& c) {
  std::vector<std::optional<double>> values;
  for (const SeedRun& run : runs) {
    const std::optional<double> a = c.read(run.results[v]), b = c.read(run.results[reference]);
    values.push_back(a && b ? std::optional<double>(*a - *b) : std::nullopt);
  }
  return values;
}

// "2.2954 ± 0.0123", with " [low, high]" when `range`; "-" when no seed gave the value; "(2 of 3
// seeds)" appended when some seed's value was not finite (a run that diverged).
inline std::string spread_cell(const Spread& s, int decimals, bool range) {
  if (s.given == 0) return "-";
  if (s.finite == 0) return "n/a";
  std::string cell = format_fixed(s.mean, decimals);
  if (s.finite >= 2) cell += " ± " + format_fixed(s.std, decimals);
  if (range && s.finite >= 2)
    cell += " [" + format_fixed(s.low, decimals) + ", " + format_fixed(s.high, decimals) + "]";
  if (s.finite < s.given) cell += " (" + std::to_string(s.finite) + " of " + std::to_string(s.given) + " seeds)";
  return cell;
}

inline std::string seed_list(std::span<const SeedRun> runs) {
  std::string list;
  for (const SeedRun& run : runs) list += (list.empty() ? "" : ", ") + std::to_string(run.seed);
  return list;
}

// The per-layer mean ± std over the seeds of one statistic (a member of LayerRouting or a function
// of one, `decimals` digits after the point): rows = layers, columns = MoE variants.
template <class Field>
std::string layer_spread_table(std::span<const SeedRun> runs, Field field, int decimals = 3) {
  const std::vector<VariantResult>& first = runs.front().results;
  std::string table = "| layer |", rule = "|---:|";
  std::size_t layers = 0;
  for (const VariantResult& r : first) {
    if (!r.is_moe) continue;
    detail::append_cell(table, detail::markdown_escape(r.variant));
    rule += "---:|";
    layers = std::max(layers, r.layers.size());
  }
  table += "\n" + rule + "\n";
  for (std::size_t l = 0; l < layers; ++l) {
    table += '|';
    detail::append_cell(table, std::to_string(l));
    for (std::size_t v = 0; v < first.size(); ++v) {
      if (!first[v].is_moe) continue;
      std::vector<std::optional<double>> values;
      for (const SeedRun& run : runs)
        values.push_back(l < run.results[v].layers.size()
                             ? std::optional<double>(std::invoke(field, run.results[v].layers[l]))
                             : std::nullopt);
      detail::append_cell(table, spread_cell(Spread::of(values), decimals, false));
    }
    table += '\n';
  }
  return table;
}

inline std::string spread_json(const Spread& s, std::span<const std::optional<double>> values) {
  std::string json = "{\"mean\": " + detail::json_number(s.mean) + ", \"std\": " + detail::json_number(s.std) +
                     ", \"min\": " + detail::json_number(s.low) + ", \"max\": " + detail::json_number(s.high) +
                     ", \"per_seed\": [";
  for (std::size_t i = 0; i < values.size(); ++i)
    json += (i ? ", " : "") + (values[i] ? detail::json_number(*values[i]) : std::string("null"));
  return json + "]}";
}

}  // namespace seed_detail

// | variant | <values> | mean norm. entropy | mean max expert fraction |, each cell the mean ± sample
// standard deviation over the seeds.
inline std::string seed_summary_table(std::span<const SeedRun> runs) {
  using namespace seed_detail;
  validate(runs);
  const std::vector<Column> list = columns(runs);
  std::string table = "| variant |", rule = "|---|";
  for (const Column& c : list) detail::append_cell(table, detail::markdown_escape(c.name)), rule += "---:|";
  table += "\n" + rule + "\n";
  for (std::size_t v = 0; v < runs.front().results.size(); ++v) {
    table += '|';
    detail::append_cell(table, detail::markdown_escape(runs.front().results[v].variant));
    for (const Column& c : list)
      detail::append_cell(table, spread_cell(Spread::of(per_seed(runs, v, c)), c.decimals, false));
    table += '\n';
  }
  return table;
}

// | variant − reference | <values> |: the paired differences' mean ± std [min, max] over the seeds.
inline std::string seed_difference_table(std::span<const SeedRun> runs) {
  using namespace seed_detail;
  validate(runs);
  const std::vector<Column> list = columns(runs);
  const std::size_t reference = reference_index(runs);
  const std::string& name = runs.front().results[reference].variant;
  std::string table = "| variant − " + detail::markdown_escape(name) + " |", rule = "|---|";
  for (const Column& c : list) detail::append_cell(table, detail::markdown_escape(c.name)), rule += "---:|";
  table += "\n" + rule + "\n";
  for (std::size_t v = 0; v < runs.front().results.size(); ++v) {
    if (v == reference) continue;
    table += '|';
    detail::append_cell(table, detail::markdown_escape(runs.front().results[v].variant));
    for (const Column& c : list)
      detail::append_cell(table, spread_cell(Spread::of(paired_differences(runs, v, reference, c)), c.decimals, true));
    table += '\n';
  }
  return table;
}

inline std::string seed_summary_markdown(std::span<const SeedRun> runs, const ReportOptions& options) {
  using namespace seed_detail;
  validate(runs);
  const std::vector<Column> list = columns(runs);
  const std::vector<VariantResult>& first = runs.front().results;
  const std::string reference_name = detail::markdown_escape(first[reference_index(runs)].variant);
  std::string md = "# " + detail::markdown_escape(options.title) + "\n\n";
  if (!options.command_line.empty()) md += "Produced by\n\n" + detail::code_block(options.command_line) + "\n";
  md += "- **Seeds** (" + std::to_string(runs.size()) + "): " + seed_list(runs) +
        ". A seed sets the initial weights and the data order; within a seed every variant gets the same.\n";
  if (!options.budget.empty())
    md += "- **Budget** (the same for every variant and seed): " + detail::markdown_escape(options.budget) + "\n";
  if (!options.corpus.empty()) md += "- **Data:** " + detail::markdown_escape(options.corpus) + "\n";
  if (!options.notes.empty()) md += "\n" + options.notes + "\n";
  md += "\n## Mean ± standard deviation over the seeds\n\n" + seed_summary_table(runs) + "\n";
  md += "Sample standard deviation (n − 1). The routing means are each seed's mean over layers, as in the "
        "per-seed reports.\n";
  md += "\n## Difference from " + reference_name + ", seed by seed\n\n" +
        seed_difference_table(runs) + "\n";
  md += "Each cell: the mean ± standard deviation of (variant − " + reference_name +
        ") over the seeds, then the smallest and largest difference. A range that excludes 0 means every seed put "
        "the two variants in the same order.\n";
  md += "\n## " + detail::markdown_escape(list.front().name) + " per seed\n\n| seed |";
  std::string rule = "|---:|";
  for (const VariantResult& r : first) detail::append_cell(md, detail::markdown_escape(r.variant)), rule += "---:|";
  md += "\n" + rule + "\n";
  for (const SeedRun& run : runs) {
    md += '|';
    detail::append_cell(md, std::to_string(run.seed));
    for (const VariantResult& r : run.results) {
      const std::optional<double> value = list.front().read(r);
      detail::append_cell(md, value ? format_fixed(*value, list.front().decimals) : std::string("-"));
    }
    md += '\n';
  }
  const bool any_moe = std::any_of(first.begin(), first.end(), [](const VariantResult& r) { return r.is_moe; });
  if (any_moe) {
    md += "\n## Per layer, mean ± standard deviation over the seeds\n\nNormalized entropy:\n\n" +
          layer_spread_table(runs, &LayerRouting::entropy);
    md += "\nMax expert fraction:\n\n" + layer_spread_table(runs, &LayerRouting::max_fraction);
    const bool any_logits = std::any_of(runs.begin(), runs.end(),
                                        [](const SeedRun& run) { return detail::any_logits_measured(run.results); });
    if (any_logits)
      md += "\nThe most used expert's logit offset (its mean logit above the other experts', in units of their "
            "standard deviation; each seed's report.md says more):\n\n" +
            layer_spread_table(runs, &LayerRouting::top_logit_offset, 2);
    const bool any_bias = any_logits && std::any_of(runs.begin(), runs.end(), [](const SeedRun& run) {
      return detail::any_bias_measured(run.results);
    });
    if (any_bias)
      md += "\nOf that offset, the part the LayerNorm's bias gives every token (the gate's logits for the bias, in "
            "the same units):\n\n" +
            layer_spread_table(runs, &LayerRouting::top_bias_offset, 2);
  }
  md += "\n## Each seed's report\n\n";
  for (const SeedRun& run : runs)
    md += "- seed " + std::to_string(run.seed) + ": [" + detail::markdown_escape(run.folder + "/report.md") + "](" +
          run.folder + "/report.md) (pictures, heatmaps, per-layer fractions)\n";
  return md;
}

inline std::string seed_summary_json(std::span<const SeedRun> runs, const ReportOptions& options) {
  using namespace seed_detail;
  validate(runs);
  const std::vector<Column> list = columns(runs);
  const std::vector<VariantResult>& first = runs.front().results;
  const std::size_t reference = reference_index(runs);
  std::string json = "{\n  \"title\": " + detail::json_quote(options.title) + ",\n";
  json += "  \"command_line\": " + detail::json_quote(options.command_line) + ",\n";
  json += "  \"budget\": " + detail::json_quote(options.budget) + ",\n";
  json += "  \"corpus\": " + detail::json_quote(options.corpus) + ",\n  \"seeds\": [";
  for (std::size_t i = 0; i < runs.size(); ++i) json += (i ? ", " : "") + std::to_string(runs[i].seed);
  json += "],\n  \"reports\": [";
  for (std::size_t i = 0; i < runs.size(); ++i)
    json += (i ? ", " : "") + detail::json_quote(runs[i].folder + "/report.md");
  json += "],\n  \"reference\": " + detail::json_quote(first[reference].variant) + ",\n  \"variants\": [";
  // {"<column>": {"mean": ..., "per_seed": [...]}, ...} of the columns some seed gave.
  const auto spreads = [&](const auto& values_of) {
    std::string object = "{";
    for (const Column& c : list) {
      const std::vector<std::optional<double>> values = values_of(c);
      const Spread s = Spread::of(values);
      if (s.given == 0) continue;
      object += (object.size() > 1 ? ",\n       " : "\n       ") + detail::json_quote(c.name) + ": " +
                spread_json(s, values);
    }
    return object + (object.size() > 1 ? "\n     }" : "}");
  };
  for (std::size_t v = 0; v < first.size(); ++v) {
    json += v ? ",\n    {" : "\n    {";
    json += "\"variant\": " + detail::json_quote(first[v].variant) + ",\n     \"values\": ";
    json += spreads([&](const Column& c) { return per_seed(runs, v, c); });
    if (v != reference)
      json += ",\n     \"minus_reference\": " +
              spreads([&](const Column& c) { return paired_differences(runs, v, reference, c); });
    json += "}";
  }
  json += "\n  ]\n}\n";
  return json;
}

// Writes report.md and summary.json into `dir` (created if needed). The seeds' own reports are
// written by the caller, each into dir / its folder.
inline void write_seed_summary(const std::filesystem::path& dir, std::span<const SeedRun> runs,
                               const ReportOptions& options) {
  seed_detail::validate(runs);
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  moe::check(!error, "report: cannot create directory '", dir.string(), "': ", error.message());
  detail::write_file(dir / "report.md", seed_summary_markdown(runs, options));
  detail::write_file(dir / "summary.json", seed_summary_json(runs, options));
}

// Runs one comparison per seed: `compare_one(seed, folder)` trains the variants with that seed,
// writes their report into <the summary's folder>/<folder> ("seed-<seed>") and returns their
// results. Progress goes to stderr.
template <class CompareOne>
std::vector<SeedRun> compare_over_seeds(const std::vector<std::uint64_t>& seeds, CompareOne compare_one) {
  std::vector<SeedRun> runs;
  for (const std::uint64_t seed : seeds) {
    const std::string folder = "seed-" + std::to_string(seed);
    std::fprintf(stderr, "seed %llu (%zu of %zu)\n", (unsigned long long)seed, runs.size() + 1, seeds.size());
    std::vector<VariantResult> results = compare_one(seed, folder);
    runs.push_back({seed, std::move(results), folder});
  }
  return runs;
}

// write_seed_summary, then the summary's two tables and where the report is, on stdout.
inline void write_and_print_seed_summary(const std::filesystem::path& dir, std::span<const SeedRun> runs,
                                         const ReportOptions& options) {
  write_seed_summary(dir, runs, options);
  std::printf("\n%s\n%s\nreport: %s\n", seed_summary_table(runs).c_str(), seed_difference_table(runs).c_str(),
              (dir / "report.md").c_str());
}

}  // namespace report
