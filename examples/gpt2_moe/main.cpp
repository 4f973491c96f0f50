// gpt2_moe: train GPT-2 models whose FFN blocks are MoE layers, compare routing gates, sample.
//
//   gpt2_moe compare                      self, linear and random on the default corpus + report
//   gpt2_moe train --variant self --steps 2000 --out runs/self
//   gpt2_moe train --resume runs/self/self.safetensors --steps 4000
//   gpt2_moe sample --checkpoint runs/self/self.safetensors --prompt "The "
//   gpt2_moe tokenize --data corpus/ --tokenizer gpt2-bpe --out shards/
//
// Every error is one line on stderr naming the file or flag, and a non-zero exit.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "../common/cli.hpp"
#include "../common/memory.hpp"
#include "../common/routing_report.hpp"
#include "../common/seed_summary.hpp"
#include "checkpoint.hpp"
#include "data.hpp"
#include "cpu_model.hpp"
#include "sample.hpp"
#include "session.hpp"
#include "train.hpp"

namespace {

namespace fs = std::filesystem;

const std::vector<std::string> kModelFlags = {"config", "layers", "hidden", "heads", "ffn", "context", "experts",
                                              "top-k", "route-from-residual", "seed"};
const std::vector<std::string> kTrainFlags = {"steps", "batch", "seq", "accumulation", "lr", "warmup",
                                              "weight-decay", "clip", "eval-every", "eval-tokens", "stats-tokens",
                                              "checkpoint-every", "threads", "data", "tokenizer", "out",
                                              "device", "precision", "attention", "no-checkpoint"};

cli::Parser make_parser() {
  std::vector<cli::Flag> flags = {
      {"variant", "NAME",
       "the FFN: dense, linear, self, self-per-layer (self-routing, layer l reading the N coordinates before "
       "layer l-1's, from the end), fixed-random or random", "self"},
      {"variants", "LIST", "comma-separated variants to compare", "self,linear,random"},
      {"config", "NAME", "model size: small (4 x 128, bytes) or gpt2-small (12 x 768, GPT-2 BPE)", "small"},
      {"layers", "N", "override the config's number of blocks", ""},
      {"hidden", "N", "override the config's width H", ""},
      {"heads", "N", "override the config's attention heads", ""},
      {"ffn", "N", "override the config's MLP / expert width F", ""},
      {"context", "N", "override the config's context length", ""},
      {"experts", "N", "experts per MoE layer N", "8"},
      {"top-k", "K", "experts per token k", "2"},
      {"route-from-residual", "", "gates read the residual stream before ln_2 instead of ln_2's output", ""},
      {"seed", "N", "model initialisation and data order", "1337"},
      {"seeds", "LIST",
       "compare: repeat the comparison for each of these seeds (e.g. 1337,1338,1339); the report gives mean ± std "
       "over them and each variant's difference from linear seed by seed", ""},
      {"steps", "N", "optimizer steps (with --resume: the total to reach)", "500 (compare: 600)"},
      {"batch", "B", "sequences per micro-batch", "16"},
      {"seq", "T", "tokens per sequence", "128 (at most the context)"},
      {"accumulation", "N", "micro-batches per optimizer step (gradient accumulation)", "1"},
      {"lr", "X", "peak learning rate (warmup, then cosine to 10%)", "2e-3"},
      {"warmup", "N", "warmup steps", "50"},
      {"weight-decay", "X", "AdamW decoupled weight decay (matrices only)", "0.1"},
      {"clip", "X", "global gradient-norm clipping (0: off)", "1.0"},
      {"eval-every", "N", "steps between validation losses (0: at the end only)", "250"},
      {"eval-tokens", "N", "validation tokens per evaluation", "65536"},
      {"stats-tokens", "N", "held-out tokens for the routing statistics", "262144"},
      {"checkpoint-every", "N", "steps between checkpoints (0: at the end only)", "0"},
      {"threads", "N", "CPU threads (results are bit-identical on any count)", "all cores"},
      {"device", "NAME", "cpu, cuda (the GPU) or emulated (the GPU's code on the host, slow: for tests)", "cpu"},
      {"no-checkpoint", "", "write no checkpoint (when only the figures are wanted)", ""},
      {"precision", "NAME", "fp32, tf32 or bf16 (bf16 and tf32: --device cuda; bf16 keeps fp32 master weights)",
       "fp32 on cpu, bf16 on cuda"},
      {"attention", "NAME",
       "device runs: fused (bf16, head sizes 32/64/128; elsewhere materialized) or materialized (keeps the "
       "[B, heads, T, T] probabilities: faster on an H100)", "materialized"},
      {"data", "PATH", "text file, folder of text files, or llm.c .bin shard(s)",
       "/usr/share/games/fortunes (Debian package fortunes)"},
      {"tokenizer", "NAME", "bytes or gpt2-bpe", "bytes for small, gpt2-bpe for gpt2-small"},
      {"out", "DIR", "folder for checkpoints and reports", "runs/<subcommand>"},
      {"from", "DIRS", "compare output folders (their routing.json) to report together, comma-separated", ""},
      {"resume", "FILE", "continue training from a checkpoint (same data; options restored from it)", ""},
      {"checkpoint", "FILE", "the checkpoint to sample from", ""},
      {"prompt", "TEXT", "text to continue", "\"\\n\""},
      {"tokens", "N", "tokens to generate", "200"},
      {"temperature", "X", "sampling temperature (0: greedy)", "0.8"},
      {"sample-top-k", "K", "sample among the K most likely tokens (0: all)", "40"},
  };
  std::vector<cli::Subcommand> subcommands = {
      {"train", "Train one variant; writes <out>/<variant>.safetensors.",
       cli::concat(cli::concat({"variant", "resume"}, kModelFlags), kTrainFlags)},
      {"compare", "Train several variants with identical data, seed and budget; write a routing report to <out>.",
       cli::concat(cli::concat({"variants", "seeds"}, kModelFlags), kTrainFlags)},
      {"sample", "Generate text from a checkpoint.",
       {"checkpoint", "prompt", "tokens", "temperature", "sample-top-k", "seed", "threads", "tokenizer"}},
      {"report", "Report comparisons run apart (same budget, data, model and seed; other variants) together in <out>.",
       {"from", "out"}},
      {"tokenize", "Tokenize a text corpus into llm.c .bin shards (<out>/train_000000.bin, val_000000.bin).",
       {"data", "tokenizer", "out", "config"}},
  };
  return cli::Parser("gpt2_moe",
                     "gpt2_moe: GPT-2 with Mixture-of-Experts FFNs; compares routing gates (dense, linear, self,\n"
                     "fixed-random, random) as in \"Self-Routing\" (paper Table 1, Figures 2-4).",
                     std::move(flags), std::move(subcommands));
}

// --data: a path, or "" for the default corpus when the flag is not given. An empty --data (say an
// unset shell variable) is refused rather than read as "the default".
std::string data_path(const cli::Parser& args) {
  moe::check(!args.has("data") || !args.get("data", "").empty(), "gpt2_moe: --data is empty");
  return args.get("data", "");
}

gpt2::Config model_config(const cli::Parser& args) {
  const std::string name = args.get("config", "small");
  gpt2::Config config;
  if (name == "small") config = gpt2::Config::small();
  else if (name == "gpt2-small") config = gpt2::Config::gpt2_small();
  else moe::fail("gpt2_moe: --config must be small or gpt2-small, got '", name, "'");
  config.layers = args.get_int("layers", config.layers, 1, 1 << 10);
  config.hidden = args.get_int("hidden", config.hidden, 1, 1 << 16);
  config.heads = args.get_int("heads", config.heads, 1, 1 << 10);
  config.ffn = args.get_int("ffn", config.ffn, 1, 1 << 18);
  config.context = args.get_int("context", config.context, 1, 1 << 16);
  config.experts = args.get_int("experts", config.experts, 1, 1 << 12);
  config.top_k = args.get_int("top-k", config.top_k, 1, 1 << 12);
  config.route_from_residual = args.get_switch("route-from-residual");
  config.seed = std::uint64_t(args.get_int("seed", std::int64_t(config.seed), 0));
  config.validate();
  return config;
}

std::string default_tokenizer(const gpt2::Config& config) { return config.vocab == 256 ? "bytes" : "gpt2-bpe"; }

gpt2::TrainOptions train_options(const cli::Parser& args, const gpt2::Config& config, std::int64_t default_steps,
                                 gpt2::TrainOptions options = {}) {
  options.steps = args.get_int("steps", default_steps, 1);
  options.batch = args.get_int("batch", options.batch, 1, 1 << 16);
  options.seq = args.get_int("seq", std::min(options.seq, config.context), 1, config.context);
  options.accumulation = args.get_int("accumulation", options.accumulation, 1, 1 << 16);
  options.lr = args.get_double("lr", options.lr, 0, 10);
  options.warmup = args.get_int("warmup", std::min(options.warmup, options.steps), 0, options.steps);
  options.weight_decay = args.get_double("weight-decay", options.weight_decay, 0, 10);
  options.grad_clip = args.get_double("clip", options.grad_clip, 0);
  options.eval_every = args.get_int("eval-every", options.eval_every, 0);
  options.eval_tokens = args.get_int("eval-tokens", options.eval_tokens, 1);
  options.stats_tokens = args.get_int("stats-tokens", options.stats_tokens, 1);
  options.checkpoint_every = args.get_int("checkpoint-every", options.checkpoint_every, 0);
  options.threads = int(args.get_int("threads", options.threads, 1, 1024));
  options.data_seed = config.seed;
  options.validate(config);
  return options;
}

// The options a run was started with, kept in its checkpoint so that --resume continues it exactly.
std::map<std::string, std::string> options_metadata(const gpt2::TrainOptions& o) {
  std::ostringstream lr;
  lr.precision(17);
  lr << o.lr;
  std::ostringstream decay;
  decay.precision(17);
  decay << o.weight_decay << ' ' << o.grad_clip << ' ' << o.min_lr_ratio;
  return {{"train.steps", std::to_string(o.steps)},         {"train.batch", std::to_string(o.batch)},
          {"train.seq", std::to_string(o.seq)},             {"train.accumulation", std::to_string(o.accumulation)},
          {"train.lr", lr.str()},                           {"train.warmup", std::to_string(o.warmup)},
          {"train.decay_clip_min_lr", decay.str()},          {"train.data_seed", std::to_string(o.data_seed)},
          {"train.eval_every", std::to_string(o.eval_every)}, {"train.eval_tokens", std::to_string(o.eval_tokens)},
          {"train.stats_tokens", std::to_string(o.stats_tokens)}};
}

// Restores the options saved by options_metadata; flags given on the command line win (a changed
// --steps extends or shortens the schedule, so the run no longer matches an uninterrupted one).
gpt2::TrainOptions resumed_options(const std::map<std::string, std::string>& meta, const fs::path& path,
                                    const gpt2::Config& config) {
  namespace ckpt = examples::checkpoint;
  const std::string file = path.string();
  gpt2::TrainOptions o;
  o.steps = ckpt::parse_count(file, meta, "train.steps");
  o.batch = ckpt::parse_count(file, meta, "train.batch");
  o.seq = ckpt::parse_count(file, meta, "train.seq");
  o.accumulation = ckpt::parse_count(file, meta, "train.accumulation");
  o.warmup = ckpt::parse_count(file, meta, "train.warmup");
  o.data_seed = std::uint64_t(ckpt::parse_count(file, meta, "train.data_seed"));
  o.eval_every = ckpt::parse_count(file, meta, "train.eval_every");
  o.eval_tokens = ckpt::parse_count(file, meta, "train.eval_tokens");
  o.stats_tokens = ckpt::parse_count(file, meta, "train.stats_tokens");
  o.lr = ckpt::parse_number(file, meta, "train.lr");
  // Three numbers in one entry (the format of the first checkpoints, kept so that they resume).
  std::istringstream rest(ckpt::metadata_text(file, meta, "train.decay_clip_min_lr"));
  rest >> o.weight_decay >> o.grad_clip >> o.min_lr_ratio;
  moe::check(!rest.fail() && (rest >> std::ws).eof() && std::isfinite(o.weight_decay) && std::isfinite(o.grad_clip) &&
                 std::isfinite(o.min_lr_ratio),
             file, ": metadata \"train.decay_clip_min_lr\" = \"", meta.at("train.decay_clip_min_lr"),
             "\" is not three finite numbers");
  ckpt::check_saved_options(file, [&] { o.validate(config); });
  return o;
}

using report::format_fixed;

report::VariantResult to_report(const gpt2::TrainResult& r, const gpt2::Config& config) {
  report::VariantResult v;
  v.variant = r.variant;
  v.router_parameters = r.router_parameters;
  v.total_parameters = r.parameters;
  v.metrics = {{"val loss", format_fixed(r.val_loss, 4)},
               {"val ppl", format_fixed(std::exp(r.val_loss), 2)},
               {"tokens/s", train::format_count(r.tokens_per_second)}};
  v.values = {{"val loss", r.val_loss, 4}, {"val ppl", std::exp(r.val_loss), 2}, {"tokens/s", r.tokens_per_second, 0}};
  // A device run: the GPU memory in use at its end (cudaMemGetInfo: the CUDA context and any other process
  // included), and the most its own allocations held at once while training (the library's ledger).
  if (r.device_memory_bytes > 0)
    v.metrics.push_back({"device memory", format_fixed(double(r.device_memory_bytes) / (1 << 30), 1) + " GiB"});
  if (r.device_memory_peak_bytes > 0)
    v.metrics.push_back({"peak allocated", train::format_memory(r.device_memory_peak_bytes)});
  v.is_moe = r.variant != "dense";
  v.layers = r.routing;
  v.routed_tokens = std::uint64_t(r.routed_tokens);
  v.top_k = config.top_k;
  return v;
}

// The device and precision flags; a device run defaults to bf16, the CPU to fp32.
gpt2::Device device_of(const cli::Parser& args) { return gpt2::parse_device(args.get("device", "cpu")); }
gpt2::Precision precision_of(const cli::Parser& args, gpt2::Device device) {
  return gpt2::parse_precision(args.get("precision", device == gpt2::Device::cuda ? "bf16" : "fp32"));
}

examples::AttentionKernel attention_of(const cli::Parser& args, gpt2::Device device) {
  return examples::attention_from_flag(args.has("attention"), args.get("attention", ""), device);
}

// The trainer for a run of `options`: its optimizer's rate and decay, and its threads set before
// anything describes it (the logs and reports name them).
gpt2::Session open_session(const cli::Parser& args, gpt2::Device device, gpt2::Precision precision,
                           std::string_view variant, const gpt2::Config& config, const gpt2::TrainOptions& options) {
  gpt2::Session session = gpt2::make_session(device, precision, variant, config,
                                             {.lr = options.lr, .weight_decay = options.weight_decay}, attention_of(args, device));
  session.trainer->set_threads(options.threads);
  return session;
}

void print_result(const gpt2::TrainResult& r, const fs::path& checkpoint) {
  std::printf("%s: val loss %.4f, perplexity %.2f, %.0f tokens/s; checkpoint %s\n", r.variant.c_str(), r.val_loss,
              std::exp(r.val_loss), r.tokens_per_second, checkpoint.empty() ? "none" : checkpoint.c_str());
  if (r.device_memory_bytes > 0)
    std::fprintf(stderr, "device memory in use after training: %.2f GiB\n", double(r.device_memory_bytes) / (1 << 30));
  if (r.device_memory_peak_bytes > 0)
    std::fprintf(stderr, "device memory allocated by the model at its peak: %s\n",
                 train::format_memory(r.device_memory_peak_bytes).c_str());
}

int run_train(const cli::Parser& args) {
  const gpt2::Device device = device_of(args);
  const gpt2::Precision precision = precision_of(args, device);
  if (args.has("resume")) {
    for (const std::string& flag : cli::concat({"variant", "tokenizer"}, kModelFlags))
      moe::check(!args.has(flag), "gpt2_moe train: --", flag, " cannot change a resumed run (the checkpoint fixes it)");
    gpt2::check_session(device, precision, attention_of(args, device));  // before the data loads
    const fs::path file = args.get("resume", "");
    const gpt2::CheckpointHeader header = gpt2::read_checkpoint_header(file);
    const std::int64_t step = examples::checkpoint::parse_count(file.string(), header.metadata, "step");
    gpt2::TrainOptions options = resumed_options(header.metadata, file, header.config);
    options = train_options(args, header.config, options.steps, options);
    options.data_seed = std::uint64_t(examples::checkpoint::parse_count(file.string(), header.metadata, "train.data_seed"));
    const std::string tokenizer = header.metadata.count("tokenizer") ? header.metadata.at("tokenizer") : "bytes";
    const gpt2::Dataset data = gpt2::load_dataset(data_path(args), tokenizer, header.config.vocab);
    moe::check(!header.metadata.count("data_fingerprint") ||
                   header.metadata.at("data_fingerprint") == std::to_string(gpt2::detail::fingerprint(data.train)),
               "gpt2_moe: the training data differs from the data checkpoint ", file.string(),
               " was trained on; pass the same --data");
    options.checkpoint = args.has("out") ? fs::path(args.get("out", "")) / file.filename() : file;
    if (args.get_switch("no-checkpoint")) options.checkpoint.clear();
    if (args.has("out") && !options.checkpoint.empty())
      cli::make_output_folder(args.get("out", ""), "gpt2_moe train");
    gpt2::Session session = open_session(args, device, precision, header.variant, header.config, options);
    session.load(file);
    const std::string name = gpt2::variant_name(header.variant, header.config);
    std::fprintf(stderr, "resuming %s from step %lld of %lld on %s (%s)\n", name.c_str(), (long long)step,
                 (long long)options.steps, session.trainer->description().c_str(), data.description.c_str());
    const gpt2::TrainResult r = gpt2::train(*session.trainer, session.save, data, options, step, name,
                                            options_metadata(options));
    print_result(r, options.checkpoint);
    train::print_peak_memory();
    return 0;
  }
  const std::string variant = args.get("variant", "self");
  const gpt2::VariantChoice choice = gpt2::parse_variant(variant);
  gpt2::check_session(device, precision, attention_of(args, device));  // before the data loads
  gpt2::Config config = model_config(args);
  config.self_slice = choice.self_slice;
  gpt2::TrainOptions options = train_options(args, config, 500);
  const gpt2::Dataset data =
      gpt2::load_dataset(data_path(args), args.get("tokenizer", default_tokenizer(config)), config.vocab);
  const fs::path out = args.get("out", "runs/train");
  options.checkpoint = args.get_switch("no-checkpoint") ? fs::path() : out / (variant + ".safetensors");
  if (!options.checkpoint.empty()) cli::make_output_folder(out, "gpt2_moe train");
  gpt2::Session session = open_session(args, device, precision, choice.ffn, config, options);
  gpt2::Trainer& trainer = *session.trainer;
  std::fprintf(stderr, "training %s on %s: %lld parameters (%lld in routers), %lld steps of %lld x %lld tokens on %s\n",
               variant.c_str(), trainer.description().c_str(), (long long)trainer.parameter_count(),
               (long long)trainer.router_parameter_count(), (long long)options.steps,
               (long long)(options.batch * options.accumulation), (long long)options.seq, data.description.c_str());
  const gpt2::TrainResult r = gpt2::train(trainer, session.save, data, options, 0, variant, options_metadata(options));
  print_result(r, options.checkpoint);
  train::print_peak_memory();
  return 0;
}

// "4 layers, hidden 128, 4 heads, context 128, 8 experts (F = 512), top-2"
std::string model_description(const gpt2::Config& config) {
  std::ostringstream model;
  model << config.layers << " layers, hidden " << config.hidden << ", " << config.heads << " heads, context "
        << config.context << ", " << config.experts << " experts (F = " << config.ffn << "), top-" << config.top_k
        << (config.route_from_residual ? ", gates read the residual stream" : "");
  return model.str();
}

// The report's header of a comparison; `where`: the device the variants trained on (empty: none named).
report::ReportOptions compare_report_options(const std::string& command, const gpt2::Config& config,
                                             const gpt2::TrainOptions& options, const gpt2::Dataset& data,
                                             const std::string& where) {
  report::ReportOptions report_options;
  report_options.title = "GPT-2 MoE: routing gates compared";
  report_options.command_line = command;
  report_options.budget = std::to_string(options.steps) + " steps of " +
                          std::to_string(options.batch * options.accumulation) + " x " + std::to_string(options.seq) +
                          " tokens per variant (" +
                          train::format_count(double(options.steps * options.batch * options.accumulation * options.seq)) +
                          " tokens); routing statistics on the validation split (up to " +
                          train::format_count(double(options.stats_tokens)) + " tokens)";
  report_options.corpus = data.description;
  report_options.notes = "Model: " + model_description(config) + ", seed " + std::to_string(config.seed) + ".";
  report_options.trained_on = where;
  return report_options;
}

// One comparison: every variant trained on `data` with `config`'s seed, its report written to
// `out`: the variants' results, and the device they trained on.
struct Comparison {
  std::vector<report::VariantResult> results;
  std::string where;
};

Comparison compare_variants(const cli::Parser& args, const std::string& command,
                                                   const std::vector<std::string>& variants, const gpt2::Config& config,
                                                   gpt2::TrainOptions options, const gpt2::Dataset& data,
                                                   const fs::path& out) {
  const gpt2::Device device = device_of(args);
  const gpt2::Precision precision = precision_of(args, device);
  options.data_seed = config.seed;
  Comparison c;
  for (const std::string& variant : variants) {
    const gpt2::VariantChoice choice = gpt2::parse_variant(variant);
    gpt2::Config built = config;
    built.self_slice = choice.self_slice;
    options.checkpoint = args.get_switch("no-checkpoint") ? fs::path() : out / (variant + ".safetensors");
    // Same seed: the tensors the variants share start equal.
    gpt2::Session session = open_session(args, device, precision, choice.ffn, built, options);
    c.where = session.trainer->description();
    c.results.push_back(to_report(
        gpt2::train(*session.trainer, session.save, data, options, 0, variant, options_metadata(options)), built));
  }
  report::write_routing_report(out, c.results, compare_report_options(command, config, options, data, c.where));
  return c;
}

int run_compare(const cli::Parser& args) {
  const std::string& command = args.command_line();
  gpt2::Config config = model_config(args);
  const gpt2::Device device = device_of(args);
  gpt2::check_session(device, precision_of(args, device), attention_of(args, device));  // before the data loads
  const std::vector<std::string> variants = args.get_list("variants", "self,linear,random");
  for (const std::string& variant : variants) gpt2::parse_variant(variant);  // names checked first
  cli::check_distinct(variants, "gpt2_moe compare", "variants");
  moe::check(!(args.has("seed") && args.has("seeds")), "gpt2_moe compare: give --seed or --seeds, not both");
  const std::vector<std::uint64_t> seeds =
      args.has("seeds") ? report::parse_seeds(args.get_list("seeds", ""), "gpt2_moe compare")
                        : std::vector<std::uint64_t>{config.seed};
  const gpt2::TrainOptions options = train_options(args, config, 600);
  const gpt2::Dataset data =
      gpt2::load_dataset(data_path(args), args.get("tokenizer", default_tokenizer(config)), config.vocab);
  const fs::path out = args.get("out", "runs/compare");
  cli::make_output_folder(out, "gpt2_moe compare");  // the report goes there: a bad path fails before training
  std::fprintf(stderr, "comparing %zu variants%s: %lld steps of %lld x %lld tokens each on %s\n", variants.size(),
               seeds.size() > 1 ? (" over " + std::to_string(seeds.size()) + " seeds").c_str() : "",
               (long long)options.steps, (long long)(options.batch * options.accumulation), (long long)options.seq,
               data.description.c_str());

  if (seeds.size() == 1) {
    const Comparison c = compare_variants(args, command, variants, config, options, data, out);
    std::printf("\n%s\nreport: %s\n", report::markdown_table(c.results).c_str(), (out / "report.md").c_str());
    train::print_peak_memory();
    return 0;
  }
  // Several seeds: each seed's comparison in out/seed-<seed>/, the summary over them in out/.
  std::string where;
  const auto compare_one = [&](std::uint64_t seed, const std::string& folder) {
    config.seed = seed;
    Comparison c = compare_variants(args, command, variants, config, options, data, out / folder);
    where = c.where;
    return std::move(c.results);
  };
  const std::vector<report::SeedRun> runs = report::compare_over_seeds(seeds, compare_one);
  report::ReportOptions summary = compare_report_options(command, config, options, data, "");
  summary.title = "GPT-2 MoE: routing gates compared over " + std::to_string(seeds.size()) + " seeds";
  summary.notes = "Model: " + model_description(config) + ". Trained on " + where + ".";
  report::write_and_print_seed_summary(out, runs, summary);
  train::print_peak_memory();
  return 0;
}

// Comparisons run apart (a GPU session's time fits one or two gates at GPT-2-small scale) in one
// report: each --from folder's routing.json, checked to be alike (merge_routing_documents).
int run_report(const cli::Parser& args) {
  moe::check(args.has("from"), "gpt2_moe report: --from DIRS (comma-separated compare folders) is required");
  const std::vector<std::string> folders = args.get_list("from", "");
  const fs::path out = args.get("out", "runs/report");
  // The merged report must not replace a run's own report, nor a seed summary's around it.
  const auto resolved = [](const fs::path& p) {  // absolute, links resolved, no trailing separator
    fs::path r = fs::weakly_canonical(p);
    return r.has_filename() || !r.has_parent_path() ? r : r.parent_path();
  };
  const fs::path out_path = resolved(out);
  for (const std::string& folder : folders) {
    const fs::path from = resolved(folder);
    const bool holds = std::mismatch(out_path.begin(), out_path.end(), from.begin(), from.end()).first == out_path.end();
    moe::check(!holds, "gpt2_moe report: --out ", out.string(), " is or holds the --from folder ", folder);
  }
  std::vector<report::RoutingDocument> documents;
  std::vector<std::string> names;
  for (const std::string& folder : folders) {
    const fs::path file = fs::path(folder) / "routing.json";
    std::ifstream in(file, std::ios::binary);
    moe::check(in.is_open(), "gpt2_moe report: cannot read '", file.string(), "' (a compare output folder?)");
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    documents.push_back(report::parse_routing_json(text, file.string()));
    // The command line the report kept starts with the program that ran it (vit_moe's reports read alike).
    const std::string& ran = documents.back().options.command_line;
    const std::string program = ran.substr(0, ran.find(' '));
    moe::check(program == "gpt2_moe", "gpt2_moe report: ", file.string(), " is a report of ",
               program.empty() ? "an unnamed program" : "'" + program + "'", ", not of a gpt2_moe comparison");
    names.push_back(file.string());
  }
  report::RoutingDocument merged = report::merge_routing_documents(documents, names);
  merged.options.title = "GPT-2 MoE: routing gates compared (" + std::to_string(folders.size()) + " runs)";
  report::write_routing_report(out, merged.results, merged.options);
  std::printf("%s\nreport: %s\n", report::markdown_table(merged.results).c_str(), (out / "report.md").c_str());
  return 0;
}

int run_sample(const cli::Parser& args) {
  moe::check(args.has("checkpoint"), "gpt2_moe sample: --checkpoint FILE is required");
  const fs::path file = args.get("checkpoint", "");
  const gpt2::CheckpointHeader header = gpt2::read_checkpoint_header(file);
  const std::string tokenizer_name =
      args.get("tokenizer", header.metadata.count("tokenizer") ? header.metadata.at("tokenizer") : "bytes");
  const gpt2::TextTokenizer tokenizer = gpt2::TextTokenizer::make(tokenizer_name, header.config.vocab);
  gpt2::SampleOptions options;
  options.tokens = args.get_int("tokens", options.tokens, 0, 1 << 20);
  options.temperature = args.get_double("temperature", options.temperature, 0, 100);
  options.top_k = args.get_int("sample-top-k", options.top_k, 0);
  options.seed = std::uint64_t(args.get_int("seed", std::int64_t(options.seed), 0));
  std::vector<std::int32_t> prompt = tokenizer.encode(args.get("prompt", "\n"));
  moe::check(!prompt.empty(), "gpt2_moe sample: --prompt encodes to no tokens");
  return gpt2::with_variant<float>(header.variant, [&](auto tag) {
    typename decltype(tag)::type model(header.config);
    gpt2::load_checkpoint(file, model, nullptr);
    model.set_threads(int(args.get_int("threads", moe::cpu::default_threads(), 1, 1024)));
    const std::vector<std::int32_t> ids = gpt2::generate(model, prompt, options);
    std::cout << tokenizer.decode(ids) << std::endl;
    return 0;
  });
}

int run_tokenize(const cli::Parser& args) {
  moe::check(args.has("out"), "gpt2_moe tokenize: --out DIR is required");
  const fs::path out = args.get("out", "");
  cli::make_output_folder(out, "gpt2_moe tokenize");
  const gpt2::Config config = model_config(args);
  const gpt2::Dataset data =
      gpt2::load_dataset(data_path(args), args.get("tokenizer", default_tokenizer(config)), config.vocab);
  moe::io::write_token_shard(out / "train_000000.bin", data.train);
  moe::io::write_token_shard(out / "val_000000.bin", data.val);
  std::printf("%s: %zu training and %zu validation tokens (%s) -> %s\n", data.description.c_str(), data.train.size(),
              data.val.size(), data.tokenizer.c_str(), out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  cli::Parser args = make_parser();
  return cli::run_main(
      argc, argv, args,
      {{"train", run_train}, {"compare", run_compare}, {"report", run_report}, {"sample", run_sample},
       {"tokenize", run_tokenize}});
}
