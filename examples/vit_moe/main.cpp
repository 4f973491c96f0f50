// vit_moe: train ViT (DeiT) image classifiers whose every second MLP is an MoE layer, compare gates.
//
//   vit_moe compare                       dense, linear, self, random on Fashion-MNIST + report
//   vit_moe train --variant self --steps 2000 --out runs/self
//   vit_moe train --resume runs/self/self.safetensors --steps 3000
//   vit_moe train --variant self --device cuda        (bf16 on the GPU; --precision fp32 or tf32)
//
// Every error is one line on stderr naming the file or flag, and a non-zero exit.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "../common/cli.hpp"
#include "../common/confusion.hpp"
#include "../common/memory.hpp"
#include "../common/routing_report.hpp"
#include "../common/seed_summary.hpp"
#include "checkpoint.hpp"
#include "cpu_model.hpp"
#include "dataset.hpp"
#include "train_run.hpp"
#include "train.hpp"

namespace {

namespace fs = std::filesystem;

const std::vector<std::string> kModelFlags = {"config", "layers", "hidden", "heads", "ffn",
                                              "patch",  "experts", "top-k", "seed"};
const std::vector<std::string> kTrainFlags = {"steps", "epochs", "batch", "lr", "warmup", "weight-decay", "clip",
                                              "augment", "eval-every", "eval-images", "checkpoint-every", "threads",
                                              "data", "out", "no-checkpoint", "device", "precision", "attention"};

cli::Parser make_parser() {
  std::vector<cli::Flag> flags = {
      {"variant", "NAME", "the FFN of every second block: dense, linear, self, fixed-random or random", "self"},
      {"variants", "LIST", "comma-separated variants to compare", "dense,linear,self,random"},
      {"config", "NAME",
       "model size: small (6 blocks x 128, patch 7, for 28 x 28 images) or deit-s16 (DeiT-S/16: 12 x 384, patch 16)",
       "small"},
      {"layers", "N", "override the config's number of blocks", ""},
      {"hidden", "N", "override the config's width H", ""},
      {"heads", "N", "override the config's attention heads", ""},
      {"ffn", "N", "override the config's MLP / expert width F", ""},
      {"patch", "P", "override the config's patch size (must divide the image size)", ""},
      {"experts", "N", "experts per MoE layer N", "4"},
      {"top-k", "K", "experts per token k", "2"},
      {"seed", "N", "model initialisation, data order and augmentation", "1337"},
      {"seeds", "LIST",
       "compare: repeat the comparison for each of these seeds (e.g. 1337,1338,1339); the report gives mean ± std "
       "over them and each variant's difference from linear seed by seed", ""},
      {"steps", "N", "optimizer steps (with --resume: the total to reach)", "2000"},
      {"epochs", "N", "train for N passes over the training images instead of --steps", ""},
      {"batch", "B", "images per step (also per evaluation batch)", "64"},
      {"lr", "X", "peak learning rate (warmup, then cosine to 0)", "2e-3"},
      {"warmup", "N", "warmup steps", "100"},
      {"weight-decay", "X", "AdamW decoupled weight decay (matrices only)", "0.05"},
      {"clip", "X", "global gradient-norm clipping (0: off)", "1.0"},
      {"augment", "on|off", "random crop (padding 2) and horizontal flip of training images", "off"},
      {"eval-every", "N", "steps between test-set accuracies (0: at the end only)", "0"},
      {"eval-images", "N", "test images per evaluation and for the routing statistics (0: all)", "0"},
      {"checkpoint-every", "N", "steps between checkpoints (0: at the end only)", "0"},
      {"no-checkpoint", "", "write no checkpoint (when only the figures are wanted)", ""},
      {"threads", "N", "CPU threads (results are bit-identical on any count)", "all cores"},
      {"device", "NAME", "cpu, cuda (the GPU) or emulated (the GPU's code on the host, slow: for tests)", "cpu"},
      {"precision", "NAME", "fp32, tf32 or bf16 (bf16 and tf32: --device cuda; bf16 keeps fp32 master weights)",
       "fp32 on cpu, bf16 on cuda"},
      {"attention", "NAME",
       "device runs: fused (bf16, head sizes 32/64/128; elsewhere materialized) or materialized (keeps the "
       "[B, heads, T, T] probabilities)", "materialized"},
      {"data", "DIR",
       "folder with the four MNIST-style IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
       "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; plain or .gz)",
       "/usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist)"},
      {"out", "DIR", "folder for checkpoints and reports", "runs/<subcommand>"},
      {"resume", "FILE", "continue training from a checkpoint (same data; options restored from it)", ""},
  };
  std::vector<cli::Subcommand> subcommands = {
      {"train", "Train one variant; writes <out>/<variant>.safetensors.",
       cli::concat(cli::concat({"variant", "resume"}, kModelFlags), kTrainFlags)},
      {"compare",
       "Train several variants with identical data order, seed and budget; write a routing report "
       "(table, per-layer routing, pictures, confusion matrix of the best variant) to <out>.",
       cli::concat(cli::concat({"variants", "seeds"}, kModelFlags), kTrainFlags)},
  };
  return cli::Parser("vit_moe",
                     "vit_moe: a ViT / DeiT image classifier whose every second MLP is a Mixture-of-Experts layer;\n"
                     "compares routing gates (dense, linear, self, fixed-random, random) on Fashion-MNIST.",
                     std::move(flags), std::move(subcommands));
}

// ---- data ------------------------------------------------------------------------------------

// <dir>/<stem> in one of the names MNIST-style data sets use: stem, stem.gz, and the same with
// ".idx" for "-idx" (the original MNIST site's files as some mirrors rename them).
fs::path find_idx_file(const fs::path& dir, const std::string& stem) {
  std::vector<std::string> names = {stem, stem + ".gz"};
  if (const auto dash = stem.rfind("-idx"); dash != std::string::npos) {
    std::string dotted = stem;
    dotted[dash] = '.';
    names.push_back(dotted);
    names.push_back(dotted + ".gz");
  }
  for (const std::string& name : names)
    if (fs::exists(dir / name)) return dir / name;
  moe::fail("vit_moe: --data ", dir.string(), " has no ", stem, " (nor ", stem,
            ".gz); it needs the four MNIST-style IDX files");
}

vit::Data load_data(const cli::Parser& args) {
  const fs::path dir = args.get("data", vit::kFashionMnistDir);
  std::error_code error;
  moe::check(fs::is_directory(dir, error), "vit_moe: --data ", dir.string(),
             fs::exists(dir, error) ? " is not a folder" : " does not exist",
             dir == fs::path(vit::kFashionMnistDir) ? " (Debian: apt-get install dataset-fashion-mnist)" : "");
  // Labels are bytes: read with room for 256 classes, then the model gets as many as the labels use.
  const fs::path train_images = find_idx_file(dir, "train-images-idx3-ubyte");
  const fs::path train_labels = find_idx_file(dir, "train-labels-idx1-ubyte");
  const fs::path test_images = find_idx_file(dir, "t10k-images-idx3-ubyte");
  const fs::path test_labels = find_idx_file(dir, "t10k-labels-idx1-ubyte");
  vit::Data data;
  data.train = vit::read_idx_dataset(train_images.string(), train_labels.string(), 256);
  data.test = vit::read_idx_dataset(test_images.string(), test_labels.string(), 256);
  moe::check(data.train.count() > 0, "vit_moe: --data ", dir.string(), ": the training images file holds no images");
  moe::check(data.test.count() > 0, "vit_moe: --data ", dir.string(), ": the test images file holds no images");
  moe::check(data.train.shape.height == data.test.shape.height && data.train.shape.width == data.test.shape.width,
             "vit_moe: --data ", dir.string(), ": training images are ", data.train.shape.height, " x ",
             data.train.shape.width, ", test images ", data.test.shape.height, " x ", data.test.shape.width);
  moe::check(data.train.shape.height == data.train.shape.width, "vit_moe: --data ", dir.string(), ": images are ",
             data.train.shape.height, " x ", data.train.shape.width, "; the model takes square images");
  std::int32_t largest = 0;
  for (const vit::Dataset* split : {&data.train, &data.test})
    for (std::int32_t label : split->labels) largest = std::max(largest, label);
  data.train.classes = data.test.classes = largest + 1;
  data.normalisation = vit::measure_normalisation(data.train);
  std::ostringstream description;
  description << (dir == fs::path(vit::kFashionMnistDir) ? "Fashion-MNIST" : dir.string()) << ": "
              << data.train.count() << " training and " << data.test.count() << " test images of "
              << data.train.shape.height << " x " << data.train.shape.width << ", " << data.train.classes
              << " classes";
  data.description = description.str();
  return data;
}

// Fashion-MNIST's names when the data has its 10 classes, else the numbers.
std::vector<std::string> class_names(vit::Index classes) {
  if (classes == vit::Index(vit::kFashionMnistClasses.size())) return vit::kFashionMnistClasses;
  std::vector<std::string> names;
  for (vit::Index c = 0; c < classes; ++c) names.push_back(std::to_string(c));
  return names;
}

// ---- model and options -----------------------------------------------------------------------

// The named config with the command line's overrides; the input shape and the classes follow the
// data (one channel, its image size, as many classes as its labels use).
vit::Config model_config(const cli::Parser& args, const vit::Data& data) {
  const std::string name = args.get("config", "small");
  vit::Config config;
  if (name == "small") config = vit::Config::small();
  else if (name == "deit-s16") config = vit::Config::deit_s16();
  else moe::fail("vit_moe: --config must be small or deit-s16, got '", name, "'");
  config.layers = args.get_int("layers", config.layers, 1, 1 << 10);
  config.hidden = args.get_int("hidden", config.hidden, 1, 1 << 16);
  config.heads = args.get_int("heads", config.heads, 1, 1 << 10);
  config.ffn = args.get_int("ffn", config.ffn, 1, 1 << 18);
  config.patch = args.get_int("patch", config.patch, 1, 1 << 12);
  config.experts = args.get_int("experts", config.experts, 1, 1 << 12);
  config.top_k = args.get_int("top-k", config.top_k, 1, 1 << 12);
  config.seed = std::uint64_t(args.get_int("seed", std::int64_t(config.seed), 0));
  config.image_size = data.train.shape.height;
  config.channels = data.train.shape.channels;
  config.classes = data.train.classes;
  moe::check(config.image_size % config.patch == 0, "vit_moe: --patch ", config.patch, " does not divide the ",
             config.image_size, " x ", config.image_size, " images (--config ", name, ")");
  moe::check(config.hidden % config.heads == 0, "vit_moe: --hidden ", config.hidden, " is not divisible by --heads ",
             config.heads);
  moe::check(config.top_k <= config.experts, "vit_moe: --top-k ", config.top_k, " exceeds --experts ",
             config.experts);
  config.validate();
  return config;
}

vit::TrainOptions train_options(const cli::Parser& args, const vit::Data& data, vit::TrainOptions options = {},
                                bool resuming = false) {
  options.batch = args.get_int("batch", options.batch, 1, 1 << 16);
  moe::check(options.batch <= data.train.count(), "vit_moe: --batch ", options.batch,
             " is larger than the training split (", data.train.count(), " images)");
  moe::check(!(args.has("steps") && args.has("epochs")), "vit_moe: give --steps or --epochs, not both");
  if (args.has("epochs"))
    options.steps = args.get_int("epochs", 1, 1, 1 << 20) * vit::steps_per_epoch(data.train, options.batch);
  else
    options.steps = args.get_int("steps", options.steps, 1, std::int64_t(1) << 40);
  options.lr = args.get_double("lr", options.lr, 0, 10);
  options.warmup = args.get_int("warmup", resuming ? options.warmup : std::min(options.warmup, options.steps), 0);
  moe::check(options.warmup <= options.steps, "vit_moe: --warmup ", options.warmup, " exceeds the ", options.steps,
             " steps");
  options.weight_decay = args.get_double("weight-decay", options.weight_decay, 0, 10);
  options.grad_clip = args.get_double("clip", options.grad_clip, 0);
  const std::string augment = args.get("augment", options.augment ? "on" : "off");
  moe::check(augment == "on" || augment == "off", "vit_moe: --augment must be on or off, got '", augment, "'");
  options.augment = augment == "on";
  options.eval_every = args.get_int("eval-every", options.eval_every, 0);
  options.eval_images = args.get_int("eval-images", options.eval_images, 0);
  options.checkpoint_every = args.get_int("checkpoint-every", options.checkpoint_every, 0);
  options.threads = int(args.get_int("threads", options.threads, 1, 1024));
  options.validate();
  return options;
}

// The options a run was started with, kept in its checkpoint so that --resume continues it exactly.
std::map<std::string, std::string> options_metadata(const vit::TrainOptions& o) {
  return {{"train.steps", std::to_string(o.steps)},
          {"train.batch", std::to_string(o.batch)},
          {"train.lr", report::shortest(o.lr)},
          {"train.warmup", std::to_string(o.warmup)},
          {"train.min_lr_ratio", report::shortest(o.min_lr_ratio)},
          {"train.weight_decay", report::shortest(o.weight_decay)},
          {"train.clip", report::shortest(o.grad_clip)},
          {"train.augment", o.augment ? "on" : "off"},
          {"train.data_seed", std::to_string(o.data_seed)},
          {"train.eval_every", std::to_string(o.eval_every)},
          {"train.eval_images", std::to_string(o.eval_images)}};
}

// Restores the options saved by options_metadata.
vit::TrainOptions resumed_options(const std::map<std::string, std::string>& meta, const fs::path& path) {
  namespace ckpt = examples::checkpoint;
  const std::string file = path.string();
  vit::TrainOptions o;
  o.steps = ckpt::parse_count(file, meta, "train.steps");
  o.batch = ckpt::parse_count(file, meta, "train.batch");
  o.lr = ckpt::parse_number(file, meta, "train.lr");
  o.warmup = ckpt::parse_count(file, meta, "train.warmup");
  o.min_lr_ratio = ckpt::parse_number(file, meta, "train.min_lr_ratio");
  o.weight_decay = ckpt::parse_number(file, meta, "train.weight_decay");
  o.grad_clip = ckpt::parse_number(file, meta, "train.clip");
  const std::string& augment = ckpt::metadata_text(file, meta, "train.augment");
  moe::check(augment == "on" || augment == "off", file, ": metadata \"train.augment\" = \"", augment,
             "\" is not on or off");
  o.augment = augment == "on";
  o.data_seed = std::uint64_t(ckpt::parse_count(file, meta, "train.data_seed"));
  o.eval_every = ckpt::parse_count(file, meta, "train.eval_every");
  o.eval_images = ckpt::parse_count(file, meta, "train.eval_images");
  ckpt::check_saved_options(file, [&] { o.validate(); });
  return o;
}

// ---- output ----------------------------------------------------------------------------------

report::VariantResult to_report(const vit::TrainResult& r, const vit::Config& config) {
  report::VariantResult v;
  v.variant = r.variant;
  v.router_parameters = r.router_parameters;
  v.total_parameters = r.parameters;
  v.metrics = {{"test top-1", report::format_fixed(r.test.accuracy, 4)},
               {"test loss", report::format_fixed(r.test.loss, 4)}};
  v.trailing_metrics = {{"images/s", train::format_count(r.images_per_second)}};
  // A device run: the GPU memory in use at its end (cudaMemGetInfo: the CUDA context and any other process
  // included), and the most its own allocations held at once while training (the library's ledger).
  if (r.device_memory_bytes > 0)
    v.trailing_metrics.push_back(
        {"device memory", report::format_fixed(double(r.device_memory_bytes) / (1 << 30), 2) + " GiB"});
  if (r.device_memory_peak_bytes > 0)
    v.trailing_metrics.push_back({"peak allocated", train::format_memory(r.device_memory_peak_bytes)});
  v.values = {{"test top-1", r.test.accuracy, 4}, {"test loss", r.test.loss, 4}, {"images/s", r.images_per_second, 0}};
  v.is_moe = r.variant != "dense";
  v.layers = r.routing;
  v.routed_tokens = std::uint64_t(r.routed_tokens);
  v.top_k = config.top_k;
  return v;
}

void print_result(const vit::TrainResult& r, const fs::path& checkpoint) {
  std::printf("%s: test top-1 %.4f, test loss %.4f, %.0f images/s; checkpoint %s\n", r.variant.c_str(),
              r.test.accuracy, r.test.loss, r.images_per_second, checkpoint.empty() ? "none" : checkpoint.c_str());
  if (r.device_memory_bytes > 0)
    std::fprintf(stderr, "device memory in use after training: %.2f GiB\n", double(r.device_memory_bytes) / (1 << 30));
  if (r.device_memory_peak_bytes > 0)
    std::fprintf(stderr, "device memory allocated by the model at its peak: %s\n",
                 train::format_memory(r.device_memory_peak_bytes).c_str());
}

// The device, precision and attention flags (a device run defaults to bf16, the CPU to fp32),
// checked together before any data is read.
struct Where {
  examples::Device device;
  examples::Precision precision;
  examples::AttentionKernel attention;
};
Where where_of(const cli::Parser& args) {
  const examples::Device device = examples::parse_device(args.get("device", "cpu"));
  const examples::Precision precision = args.has("precision")
                                            ? examples::parse_precision(args.get("precision", ""))
                                            : examples::default_precision(device);
  examples::check_precision(device, precision);
  const examples::AttentionKernel kernel =
      examples::attention_from_flag(args.has("attention"), args.get("attention", ""), device);
  vit::check_device(device);
  return {device, precision, kernel};
}

std::string describe(const vit::Config& c, bool with_seed = true) {
  std::ostringstream text;
  text << c.layers << " blocks, hidden " << c.hidden << ", " << c.heads << " heads, MLP / expert width " << c.ffn
       << ", patch " << c.patch << " (" << c.tokens() << " tokens per image), " << c.experts << " experts, top-"
       << c.top_k;
  if (with_seed) text << ", seed " << c.seed;
  return text.str();
}

// Builds each variant once, so that a bad name or a config a gate cannot take (SelfRoute's N > H)
// fails before any training.
// An MoE variant needs an MoE block: with MoE in every moe_every-th block (blocks 1, 3, ... for "Every
// 2"), fewer blocks than that have none, and the run would be the dense model under another name.
void check_variants(const std::vector<std::string>& variants, const vit::Config& config) {
  for (const std::string& v : variants)
    vit::with_variant<float>(v, [&](auto tag) {
      using Model = typename decltype(tag)::type;
      moe::check(!Model::is_moe || config.layers >= config.moe_every, "vit_moe: variant '", v,
                 "' needs an MoE block, and with --layers ", config.layers, " there is none (MoE replaces the MLP of "
                 "one block in every ", config.moe_every, "): use --layers ", config.moe_every, " or more");
      Model model(config);
      return 0;
    });
}

// ---- subcommands -----------------------------------------------------------------------------

int run_train(const cli::Parser& args) {
  const Where where = where_of(args);
  if (args.has("resume")) {
    for (const std::string& flag : cli::concat({"variant"}, kModelFlags))
      moe::check(!args.has(flag), "vit_moe train: --", flag, " cannot change a resumed run (the checkpoint fixes it)");
    const fs::path file = args.get("resume", "");
    const vit::CheckpointHeader header = vit::read_checkpoint_header(file);
    const std::int64_t step = examples::checkpoint::parse_count(file.string(), header.metadata, "step");
    const vit::Data data = load_data(args);
    vit::TrainOptions options = train_options(args, data, resumed_options(header.metadata, file), true);
    moe::check(!header.metadata.count("data_fingerprint") ||
                   header.metadata.at("data_fingerprint") == std::to_string(vit::detail::fingerprint(data.train)),
               "vit_moe: the training data differs from the data checkpoint ", file.string(),
               " was trained on; pass the same --data");
    options.checkpoint = args.has("out") ? fs::path(args.get("out", "")) / file.filename() : file;
    if (args.get_switch("no-checkpoint")) options.checkpoint.clear();
    if (args.has("out") && !options.checkpoint.empty())
      cli::make_output_folder(args.get("out", ""), "vit_moe train");
    // Announced once the checkpoint is loaded: a file refused there stays a one-line error.
    const std::string announce = "resuming " + header.variant + " from step " + std::to_string(step) + " of " +
                                 std::to_string(options.steps) + " (" + data.description + ")";
    const vit::TrainResult r = vit::train_run({.variant = header.variant, .config = header.config, .options = options,
                                               .start_step = step, .resume = file, .label = header.variant,
                                               .metadata = options_metadata(options), .device = where.device,
                                               .precision = where.precision, .attention = where.attention,
                                               .announce = announce},
                                              data);
    print_result(r, options.checkpoint);
    train::print_peak_memory();
    return 0;
  }
  const std::string variant = args.get("variant", "self");
  vit::with_variant<float>(variant, [](auto) { return 0; });  // the name checked before the data is read
  const vit::Data data = load_data(args);
  const vit::Config config = model_config(args, data);
  check_variants({variant}, config);
  vit::TrainOptions options = train_options(args, data);
  options.data_seed = config.seed;
  const fs::path out = args.get("out", "runs/train");
  options.checkpoint = args.get_switch("no-checkpoint") ? fs::path() : out / (variant + ".safetensors");
  if (!options.checkpoint.empty()) cli::make_output_folder(out, "vit_moe train");
  vit::with_variant<float>(variant, [&](auto tag) {
    typename decltype(tag)::type model(config);
    std::fprintf(stderr, "training %s: %lld parameters (%lld in routers), %lld steps of %lld images on %s\n",
                 variant.c_str(), (long long)model.parameter_count(), (long long)model.router_parameter_count(),
                 (long long)options.steps, (long long)options.batch, data.description.c_str());
    return 0;
  });
  const vit::TrainResult r =
      vit::train_run({.variant = variant, .config = config, .options = options, .label = variant,
                      .metadata = options_metadata(options), .device = where.device, .precision = where.precision,
                      .attention = where.attention},
                     data);
  print_result(r, options.checkpoint);
  train::print_peak_memory();
  return 0;
}

// The report's header of a comparison (`runs`: the variants' results, for the MoE blocks and the
// test images counted; empty: left out).
report::ReportOptions compare_report_options(const std::string& command, const vit::Config& config,
                                             const vit::TrainOptions& options, const vit::Data& data,
                                             const std::vector<vit::TrainResult>& runs) {
  std::string moe_blocks;
  for (const vit::TrainResult& r : runs)
    if (!r.moe_blocks.empty()) {
      for (std::size_t i = 0; i < r.moe_blocks.size(); ++i)
        moe_blocks += (i ? ", " : "") + std::to_string(r.moe_blocks[i]);
      break;
    }
  report::ReportOptions report_options;
  report_options.title = "ViT MoE: routing gates compared";
  report_options.command_line = command;
  report_options.budget = std::to_string(options.steps) + " steps of " + std::to_string(options.batch) +
                          " images per variant (" + report::format_fixed(double(options.steps * options.batch) /
                                                                          double(data.train.count()), 1) +
                          " epochs), AdamW lr " + report::shortest(options.lr) + ", warmup " +
                          std::to_string(options.warmup) + ", cosine to 0, weight decay " +
                          report::shortest(options.weight_decay) + ", augmentation " +
                          (options.augment ? "crop + flip" : "off") +
                          "; accuracy and routing statistics on the test split" +
                          (runs.empty() ? std::string() : " (" + std::to_string(runs.front().test.images) + " images)");
  report_options.corpus = data.description;
  if (!runs.empty()) report_options.trained_on = runs.front().trained_on;  // empty on the CPU: not said
  report_options.notes = "Model: " + describe(config) + "." +
                         (moe_blocks.empty() ? std::string()
                                             : " Layer i of the routing pictures and files is the i-th MoE block "
                                               "(blocks " + moe_blocks + ").") +
                         " Images/s: training throughput (forward, backward, optimizer).";
  return report_options;
}

// One comparison: every variant trained with `config`'s seed, its report (with the confusion
// matrix of the most accurate variant) written to `out`. Returns the variants' results.
std::vector<report::VariantResult> compare_variants(const cli::Parser& args, const std::vector<std::string>& variants,
                                                   const vit::Config& config, vit::TrainOptions options,
                                                   const vit::Data& data, const fs::path& out) {
  const std::string& command = args.command_line();
  const Where where = where_of(args);
  options.data_seed = config.seed;
  std::vector<report::VariantResult> results;
  std::vector<vit::TrainResult> runs;
  for (const std::string& variant : variants) {  // same seed: shared tensors start equal
    options.checkpoint = args.get_switch("no-checkpoint") ? fs::path() : out / (variant + ".safetensors");
    runs.push_back(vit::train_run({.variant = variant, .config = config, .options = options, .label = variant,
                                   .metadata = options_metadata(options), .device = where.device,
                                   .precision = where.precision, .attention = where.attention},
                                  data));
    results.push_back(to_report(runs.back(), config));
  }

  // The confusion matrix of the most accurate variant (the first of equals).
  std::size_t best = 0;
  for (std::size_t i = 1; i < runs.size(); ++i)
    if (runs[i].test.accuracy > runs[best].test.accuracy) best = i;
  const vit::TrainResult& winner = runs[best];
  const std::string confusion_file = "confusion.svg";
  report::ReportOptions report_options = compare_report_options(command, config, options, data, runs);
  report_options.appendix = "## Confusion matrix of the most accurate variant (" + winner.variant + ", test top-1 " +
                            report::format_fixed(winner.test.accuracy, 4) + ")\n\nRows: true class, columns: " +
                            "predicted class, cells: share of the true class's test images.\n\n![confusion matrix](" +
                            confusion_file + ")\n";
  report::write_routing_report(out, results, report_options);
  report::detail::write_file(
      out / confusion_file,
      report::heatmap_svg(report::confusion_heatmap(
          winner.test.confusion, winner.variant + ": confusion matrix on the test split (row-normalised)",
          class_names(config.classes))));
  return results;
}

int run_compare(const cli::Parser& args) {
  const std::string& command = args.command_line();
  const std::vector<std::string> variants = args.get_list("variants", "dense,linear,self,random");
  for (const std::string& v : variants) vit::with_variant<float>(v, [](auto) { return 0; });  // names checked first
  cli::check_distinct(variants, "vit_moe compare", "variants");
  where_of(args);  // the device flags too
  moe::check(!(args.has("seed") && args.has("seeds")), "vit_moe compare: give --seed or --seeds, not both");
  const std::vector<std::uint64_t> seeds =
      args.has("seeds") ? report::parse_seeds(args.get_list("seeds", ""), "vit_moe compare")
                        : std::vector<std::uint64_t>{};
  const vit::Data data = load_data(args);
  vit::Config config = model_config(args, data);
  check_variants(variants, config);
  const vit::TrainOptions options = train_options(args, data);
  const fs::path out = args.get("out", "runs/compare");
  cli::make_output_folder(out, "vit_moe compare");  // the report goes there: a bad path fails before training
  std::fprintf(stderr, "comparing %zu variants%s: %lld steps of %lld images each on %s\n", variants.size(),
               seeds.empty() ? "" : (" over " + std::to_string(seeds.size()) + " seeds").c_str(),
               (long long)options.steps, (long long)options.batch, data.description.c_str());

  if (seeds.empty()) {
    const std::vector<report::VariantResult> results = compare_variants(args, variants, config, options, data, out);
    std::printf("\n%s\nreport: %s\n", report::markdown_table(results).c_str(), (out / "report.md").c_str());
    train::print_peak_memory();
    return 0;
  }
  // Several seeds: each seed's comparison in out/seed-<seed>/, the summary over them in out/.
  const auto compare_one = [&](std::uint64_t seed, const std::string& folder) {
    config.seed = seed;
    return compare_variants(args, variants, config, options, data, out / folder);
  };
  const std::vector<report::SeedRun> runs = report::compare_over_seeds(seeds, compare_one);
  report::ReportOptions summary = compare_report_options(command, config, options, data, {});
  summary.title = "ViT MoE: routing gates compared over " + std::to_string(seeds.size()) + " seeds";
  summary.notes = "Model: " + describe(config, false) + ".";
  report::write_and_print_seed_summary(out, runs, summary);
  train::print_peak_memory();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  cli::Parser args = make_parser();
  return cli::run_main(argc, argv, args, {{"train", run_train}, {"compare", run_compare}}, {"vit: "});
}
