// examples/vit_moe/checkpoint.hpp: ViT MoE checkpoints as safetensors files.
//
// Tensors
//   Every parameter under the name and in the layout model.parameters() gives it: timm's
//   VisionTransformer (cls_token [1, 1, H], pos_embed [1, T, H], patch_embed.proj.weight
//   [H, C, P, P], blocks.{l}.norm1.weight, blocks.{l}.attn.qkv.weight [3H, H], ...,
//   blocks.{l}.mlp.fc1.weight [F, H], norm.weight, head.weight [classes, H]), and in MoE blocks the
//   MoE layer's own names under blocks.{l}.moe. (router.weight [N, H] for linear and for
//   fixed-random's frozen projection, experts.fc.weight [N, F, H], experts.fc.bias [N, F],
//   experts.proj.weight [N, H, F], experts.proj.bias [N, H]). dtype: F32.
//   Optimizer state (optional): AdamW's moments as optimizer.m.<name> and optimizer.v.<name>, for
//   every parameter the optimizer has updated.
//
// Metadata (all strings)
//   format = "moe-vit/1", variant (dense, linear, self, fixed-random, random), config.<field> for
//   every vit::Config field (decimal integers), routing_step (the Random gate's draw counter,
//   random variant only), optimizer.step (when optimizer state is saved), plus the caller's
//   entries (step, training options, data fingerprint, ...), which may not reuse these keys.
//
// Loading checks the format, the variant and every config field against the model, and each
// tensor's presence, dtype and shape, before it changes anything; a tensor the model does not
// have is refused (another variant's checkpoint). Every error names the file.
#pragma once

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "../common/checkpoint_common.hpp"
#include "config.hpp"
#include "cpu_model.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/nn/adamw.hpp"

namespace vit {

inline constexpr std::string_view kCheckpointFormat = "moe-vit/1";

struct CheckpointHeader {
  std::string variant;
  Config config;
  std::map<std::string, std::string> metadata;  // everything in the file's metadata, caller's entries included
  bool has_optimizer_state = false;
};

namespace checkpoint_detail {

// Every Config field by name, as stored in the metadata.
inline std::vector<std::pair<std::string, std::string>> config_fields(const Config& c) {
  return {{"config.image_size", std::to_string(c.image_size)}, {"config.channels", std::to_string(c.channels)},
          {"config.patch", std::to_string(c.patch)},           {"config.classes", std::to_string(c.classes)},
          {"config.layers", std::to_string(c.layers)},         {"config.heads", std::to_string(c.heads)},
          {"config.hidden", std::to_string(c.hidden)},         {"config.ffn", std::to_string(c.ffn)},
          {"config.experts", std::to_string(c.experts)},       {"config.top_k", std::to_string(c.top_k)},
          {"config.moe_every", std::to_string(c.moe_every)},   {"config.seed", std::to_string(c.seed)}};
}

using examples::checkpoint::parse_integer;

// The config in the metadata, validated (a config no model can be built from is an error here).
inline Config parse_config(const std::string& file, const std::map<std::string, std::string>& metadata) {
  constexpr Index limit = Index(1) << 24;  // far above any real model; keeps products from overflowing
  const auto field = [&](const char* key) {
    const Index value = parse_integer<Index>(file, metadata, key);
    moe::check(value >= 1 && value <= limit, file, ": metadata \"", key, "\" = ", value, " is outside [1, ", limit,
               "]");
    return value;
  };
  Config c;
  c.image_size = field("config.image_size");
  c.channels = field("config.channels");
  c.patch = field("config.patch");
  c.classes = field("config.classes");
  c.layers = field("config.layers");
  c.heads = field("config.heads");
  c.hidden = field("config.hidden");
  c.ffn = field("config.ffn");
  c.experts = field("config.experts");
  c.top_k = field("config.top_k");
  c.moe_every = field("config.moe_every");
  c.seed = parse_integer<std::uint64_t>(file, metadata, "config.seed");
  try {
    c.validate();
  } catch (const moe::Error& error) {
    moe::fail(file, ": the config in its metadata is not valid (", error.what(), ")");
  }
  return c;
}

// The metadata's config against the tensor shapes of the file, before a model is built from it:
// a corrupt or hand-edited config.* is refused here, naming the fields, instead of allocating a
// model that does not fit in memory (shapes are already bounded by the file's size).
inline void check_config_against_shapes(const moe::io::SafetensorsFile& file, const Config& c) {
  const auto expect_shape = [&](const std::string& tensor, std::vector<std::int64_t> shape, std::string_view fields) {
    examples::checkpoint::expect_shape(file, tensor, shape, fields);
  };
  expect_shape("cls_token", {1, 1, c.hidden}, "config.hidden");
  expect_shape("pos_embed", {1, c.tokens(), c.hidden}, "config.image_size, config.patch and config.hidden");
  expect_shape("patch_embed.proj.weight", {c.hidden, c.channels, c.patch, c.patch},
               "config.hidden, config.channels and config.patch");
  expect_shape("head.weight", {c.classes, c.hidden}, "config.classes and config.hidden");
  Index blocks = 0;
  while (blocks <= c.layers && file.contains("blocks." + std::to_string(blocks) + ".norm1.weight")) ++blocks;
  moe::check(blocks == c.layers, file.file(), ": metadata says config.layers = ", c.layers, ", the file has ",
             blocks > c.layers ? "more" : std::to_string(blocks), " blocks (blocks.{l}.norm1.weight)");
  // The first dense block and the first MoE block, each of its kind (with moe_every > 1 a model has
  // both: config.experts must be checked even when a dense block comes first).
  bool dense = false, routed = false;
  for (Index block = 0; block < c.layers && !(dense && routed); ++block) {
    const std::string prefix = "blocks." + std::to_string(block) + ".";
    if (!dense && file.contains(prefix + "mlp.fc1.weight")) {
      expect_shape(prefix + "mlp.fc1.weight", {c.ffn, c.hidden}, "config.ffn and config.hidden");
      dense = true;
    }
    if (!routed && file.contains(prefix + "moe.experts.fc.weight")) {
      expect_shape(prefix + "moe.experts.fc.weight", {c.experts, c.ffn, c.hidden},
                   "config.experts, config.ffn and config.hidden");
      routed = true;
    }
  }
  moe::check(dense || routed, file.file(), ": checkpoint has no MLP or expert weights (blocks.{l}.mlp.fc1.weight, "
             "blocks.{l}.moe.experts.fc.weight)");
}

}  // namespace checkpoint_detail

// The variant, config and metadata of a checkpoint, read from its header only (so that a
// program can build the right model type before loading).
inline CheckpointHeader read_checkpoint_header(const std::filesystem::path& path) {
  const moe::io::SafetensorsFile file = moe::io::SafetensorsFile::header_only(path);
  CheckpointHeader header;
  header.metadata = file.metadata();
  const auto format = header.metadata.find("format");
  moe::check(format != header.metadata.end() && format->second == kCheckpointFormat, file.file(),
             ": not a vit_moe checkpoint (metadata format is \"",
             format == header.metadata.end() ? "" : format->second, "\", expected \"", kCheckpointFormat, "\")");
  header.variant = examples::checkpoint::read_variant(file.file(), header.metadata);
  header.config = checkpoint_detail::parse_config(file.file(), header.metadata);
  checkpoint_detail::check_config_against_shapes(file, header.config);
  header.has_optimizer_state = header.metadata.contains("optimizer.step");
  return header;
}

// Saves the model's parameters (and, given an optimizer, its state) with the metadata above
// plus `extra`. The file is written to a temporary name and renamed: a crash never leaves half a
// checkpoint under the real name.
template <class Model>
void save_checkpoint(const std::filesystem::path& path, Model& model,
                     const moe::nn::AdamW<typename Model::Scalar>* optimizer,
                     const std::map<std::string, std::string>& extra = {}) {
  using S = typename Model::Scalar;
  const std::string file = path.string();
  std::map<std::string, std::string> metadata =
      examples::checkpoint::base_metadata(file, extra, kCheckpointFormat, Model::variant);
  for (const auto& [key, value] : checkpoint_detail::config_fields(model.config())) metadata[key] = value;
  if constexpr (Model::is_moe) {
    const std::vector<Index> blocks = model.moe_blocks();
    auto& gate = model.moe_ffn(blocks.front()).layer().gate();
    if constexpr (requires { gate.step(); }) {
      for (Index block : blocks)
        moe::check(model.moe_ffn(block).layer().gate().step() == gate.step(), file, ": block ", block,
                   "'s Random gate is at step ", model.moe_ffn(block).layer().gate().step(), ", block ",
                   blocks.front(), "'s at ", gate.step());
      metadata["routing_step"] = std::to_string(gate.step());
    }
  }
  std::vector<moe::ParamRef<S>> params = model.parameters();
  examples::checkpoint::save_tensors<S>(path, params, optimizer, std::move(metadata), examples::checkpoint::model_shape<S>,
                                        examples::checkpoint::copy_values<S>);
}

// Loads a checkpoint into `model` (built with the checkpoint's variant and config, e.g. from
// read_checkpoint_header) and, if `optimizer` is given and the file has optimizer state, into
// the optimizer; the Random gate's step is restored too, so training resumes bit for bit.
// Everything is checked before the model changes; errors name the file, the tensor or field and
// both values.
template <class Model>
CheckpointHeader load_checkpoint(const std::filesystem::path& path, Model& model,
                                 moe::nn::AdamW<typename Model::Scalar>* optimizer = nullptr) {
  using S = typename Model::Scalar;
  const CheckpointHeader header = read_checkpoint_header(path);
  const moe::io::SafetensorsFile file(path);
  const std::string& name = file.file();

  moe::check(header.variant == Model::variant, name, ": checkpoint variant is \"", header.variant,
             "\", the model's is \"", Model::variant, "\"");
  const auto have = checkpoint_detail::config_fields(model.config());
  const auto want = checkpoint_detail::config_fields(header.config);
  for (std::size_t i = 0; i < have.size(); ++i)
    moe::check(want[i].second == have[i].second, name, ": ", want[i].first, " is ", want[i].second,
               " in the checkpoint, ", have[i].second, " in the model");

  // Every check first: presence, dtype and shape of each tensor, nothing unexpected.
  std::vector<moe::ParamRef<S>> params = model.parameters();
  const std::vector<bool> has_moments =
      examples::checkpoint::check_tensors<S>(file, params, "", header.has_optimizer_state, Model::variant,
                                             examples::checkpoint::model_shape<S>, [](const std::string&) { return false; });
  const examples::checkpoint::RecordedSteps steps =
      examples::checkpoint::read_steps(name, header.metadata, optimizer && header.has_optimizer_state);

  // Then the restore, which changes nothing unless every value is read and finite.
  examples::checkpoint::restore_tensors<S>(
      name, params, "", has_moments, steps, optimizer,
      [&](const std::string& stored, const moe::ParamRef<S>& p, std::span<S> out) {
        const std::vector<std::int64_t> shape(p.shape.begin(), p.shape.end());
        file.read(stored, out, std::span<const std::int64_t>(shape));
      });
  model.set_routing_step(steps.routing_step);
  return header;
}

}  // namespace vit
