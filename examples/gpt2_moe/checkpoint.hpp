// examples/gpt2_moe/checkpoint.hpp: GPT-2 MoE checkpoints as safetensors files.
//
// Tensors
//   Every parameter under the name model.parameters() gives it: Hugging Face GPT-2 names
//   (wte.weight, wpe.weight, h.{l}.ln_1.weight, h.{l}.attn.c_attn.weight, ..., ln_f.bias), and
//   the MoE layer's own names under h.{l}.moe. (router.weight [N, H] for linear and for
//   fixed-random's frozen projection, experts.fc.weight [N, F, H], experts.fc.bias [N, F],
//   experts.proj.weight [N, H, F], experts.proj.bias [N, H]).
//   Layout: the four weights that Hugging Face keeps as Conv1D, [in, out] (h.{l}.attn.c_attn.weight,
//   attn.c_proj.weight, mlp.c_fc.weight, mlp.c_proj.weight), are stored transposed from the
//   model's nn.Linear [out, in], so a dense checkpoint has exactly the tensors (names, shapes,
//   meaning) of Hugging Face's `gpt2` model.safetensors. Every other tensor, the MoE ones
//   included, is stored in the model's own layout. dtype: the model's scalar (F32 for float).
//   Optimizer state (optional): AdamW's moments as optimizer.m.<name> and optimizer.v.<name>,
//   in the same layout as the parameter, for every parameter the optimizer has updated.
//
// Metadata (all strings)
//   format = "moe-gpt2/1", variant (dense, linear, self, fixed-random, random),
//   config.<field> for every gpt2::Config field (integers in decimal, route_from_residual
//   "true"/"false", self_slice "last"/"per-layer": absent in files from before 2026-12-06, read as
//   "last"), routing_step (the Random gate's draw counter, random variant only),
//   optimizer.step (when optimizer state is saved), plus the caller's entries (step, data
//   position, schedule, ...), which may not reuse these keys.
//
// Loading checks the format, the variant and every config field against the model, and each
// tensor's presence, dtype and shape, before it changes anything; a file with tensors the model
// does not have is refused (another variant's checkpoint). A file without "moe-gpt2" metadata is
// read as a Hugging Face GPT-2 file: dense only, config taken from the tensor shapes (heads =
// hidden / 64, as in every GPT-2 size), an optional "transformer." prefix stripped, and the
// non-parameter buffers h.{l}.attn.bias, h.{l}.attn.masked_bias and the tied lm_head.weight
// ignored.
#pragma once

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "../common/checkpoint_common.hpp"
#include "config.hpp"
#include "cpu_model.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/nn/adamw.hpp"

namespace gpt2 {

inline constexpr std::string_view kCheckpointFormat = "moe-gpt2/1";

struct CheckpointHeader {
  std::string variant;
  Config config;
  std::map<std::string, std::string> metadata;  // everything in the file's metadata, caller's entries included
  bool has_optimizer_state = false;
  bool hugging_face = false;  // a plain Hugging Face GPT-2 file (config inferred from the shapes)
};

namespace checkpoint_detail {

// "h.{l}.attn.c_attn.weight" and the three other Conv1D weights Hugging Face stores as [in, out].
inline bool stored_transposed(std::string_view name) {
  if (!name.starts_with("h.")) return false;
  name.remove_prefix(2);
  const std::size_t dot = name.find('.');
  if (dot == 0 || dot == std::string_view::npos ||
      !std::all_of(name.begin(), name.begin() + std::ptrdiff_t(dot), [](char c) { return c >= '0' && c <= '9'; }))
    return false;
  name.remove_prefix(dot + 1);
  return name == "attn.c_attn.weight" || name == "attn.c_proj.weight" || name == "mlp.c_fc.weight" ||
         name == "mlp.c_proj.weight";
}

inline std::vector<std::int64_t> file_shape(std::string_view name, const std::vector<Index>& shape) {
  std::vector<std::int64_t> out(shape.begin(), shape.end());
  if (stored_transposed(name)) std::swap(out[0], out[1]);
  return out;
}

// model [rows, cols] -> file [cols, rows], or a copy when the layouts agree.
template <class S>
std::vector<S> to_file_layout(std::string_view name, const std::vector<Index>& shape, std::span<const S> values) {
  if (!stored_transposed(name)) return {values.begin(), values.end()};
  const std::size_t rows = std::size_t(shape[0]), cols = std::size_t(shape[1]);
  std::vector<S> out(values.size());
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t c = 0; c < cols; ++c) out[c * rows + r] = values[r * cols + c];
  return out;
}

// Reads `stored_name` from the file into `out` in the model's layout (`shape`, named `name`).
template <class S>
void read_into(const moe::io::SafetensorsFile& file, const std::string& stored_name, std::string_view name,
               const std::vector<Index>& shape, std::span<S> out) {
  const std::vector<std::int64_t> expected = file_shape(name, shape);
  if (!stored_transposed(name)) {
    file.read(stored_name, out, expected);
    return;
  }
  std::vector<S> stored(out.size());
  file.read(stored_name, std::span<S>(stored), expected);
  const std::size_t rows = std::size_t(shape[0]), cols = std::size_t(shape[1]);
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t c = 0; c < cols; ++c) out[r * cols + c] = stored[c * rows + r];
}

inline std::vector<std::pair<std::string, std::string>> config_fields(const Config& c) {
  return {{"config.vocab", std::to_string(c.vocab)},
          {"config.context", std::to_string(c.context)},
          {"config.layers", std::to_string(c.layers)},
          {"config.heads", std::to_string(c.heads)},
          {"config.hidden", std::to_string(c.hidden)},
          {"config.ffn", std::to_string(c.ffn)},
          {"config.experts", std::to_string(c.experts)},
          {"config.top_k", std::to_string(c.top_k)},
          {"config.seed", std::to_string(c.seed)},
          {"config.route_from_residual", c.route_from_residual ? "true" : "false"},
          {"config.self_slice", std::string(self_slice_name(c.self_slice))}};
}

using examples::checkpoint::parse_integer;

inline Config parse_config(const std::string& file, const std::map<std::string, std::string>& metadata) {
  Config c;
  c.vocab = parse_integer<Index>(file, metadata, "config.vocab");
  c.context = parse_integer<Index>(file, metadata, "config.context");
  c.layers = parse_integer<Index>(file, metadata, "config.layers");
  c.heads = parse_integer<Index>(file, metadata, "config.heads");
  c.hidden = parse_integer<Index>(file, metadata, "config.hidden");
  c.ffn = parse_integer<Index>(file, metadata, "config.ffn");
  c.experts = parse_integer<Index>(file, metadata, "config.experts");
  c.top_k = parse_integer<Index>(file, metadata, "config.top_k");
  c.seed = parse_integer<std::uint64_t>(file, metadata, "config.seed");
  const auto route = metadata.find("config.route_from_residual");
  moe::check(route != metadata.end(), file, ": metadata has no \"config.route_from_residual\"");
  moe::check(route->second == "true" || route->second == "false", file,
             ": metadata \"config.route_from_residual\" = \"", route->second, "\" is not true or false");
  c.route_from_residual = route->second == "true";
  const auto slice = metadata.find("config.self_slice");  // absent before 2026-12-06: every layer read the last N
  if (slice != metadata.end()) {
    const std::optional<SelfSlice> named = find_self_slice(slice->second);
    moe::check(named.has_value(), file, ": metadata \"config.self_slice\" = \"", slice->second,
               "\" is not last or per-layer");
    c.self_slice = *named;
  }
  return c;
}

// Hugging Face files may prefix every name with "transformer." (saved from GPT2LMHeadModel).
inline std::string hf_prefix(const moe::io::SafetensorsFile& file) {
  return file.contains("wte.weight") || !file.contains("transformer.wte.weight") ? "" : "transformer.";
}

inline bool hf_ignored(std::string_view name) {
  return name == "lm_head.weight" || name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias");
}

// A Hugging Face GPT-2 file's config from its tensor shapes.
inline Config infer_hf_config(const moe::io::SafetensorsFile& file) {
  const std::string prefix = hf_prefix(file);
  const auto shape_of = [&](const std::string& name, std::size_t dims) {
    moe::check(file.contains(prefix + name), file.file(), ": neither moe-gpt2 metadata (format = ",
               kCheckpointFormat, ") nor the Hugging Face GPT-2 tensor \"", prefix + name, "\"");
    const std::vector<std::int64_t>& shape = file.info(prefix + name).shape;
    moe::check(shape.size() == dims, file.file(), ": tensor \"", prefix + name, "\" has ", shape.size(),
               " dimensions, expected ", dims);
    return shape;
  };
  Config c;
  c.vocab = Index(shape_of("wte.weight", 2)[0]);
  c.hidden = Index(shape_of("wte.weight", 2)[1]);
  c.context = Index(shape_of("wpe.weight", 2)[0]);
  c.layers = 0;
  while (file.contains(prefix + "h." + std::to_string(c.layers) + ".ln_1.weight")) ++c.layers;
  c.ffn = Index(shape_of("h.0.mlp.c_fc.weight", 2)[1]);  // Conv1D [in, out] = [H, F]
  c.heads = std::max<Index>(1, c.hidden / 64);
  return c;
}

// The metadata's config against the tensor shapes of the file, before anything is allocated for
// it: a corrupt or hand-edited config.* (say config.layers = 10^12) is refused here, naming the
// field, instead of building a model that does not fit in memory. Shapes are already bounded by
// the file's size, so every dimension that agrees with them is too.
inline void check_config_against_shapes(const moe::io::SafetensorsFile& file, const Config& c) {
  const auto expect_shape = [&](const std::string& tensor, std::vector<std::int64_t> shape, std::string_view fields) {
    examples::checkpoint::expect_shape(file, tensor, shape, fields);
  };
  expect_shape("wte.weight", {c.vocab, c.hidden}, "config.vocab and config.hidden");
  expect_shape("wpe.weight", {c.context, c.hidden}, "config.context and config.hidden");
  Index blocks = 0;
  while (blocks <= c.layers && file.contains("h." + std::to_string(blocks) + ".ln_1.weight")) ++blocks;
  moe::check(blocks == c.layers, file.file(), ": metadata says config.layers = ", c.layers, ", the file has ",
             blocks > c.layers ? "more" : std::to_string(blocks), " blocks (h.{l}.ln_1.weight)");
  if (file.contains("h.0.mlp.c_fc.weight"))
    expect_shape("h.0.mlp.c_fc.weight", {c.hidden, c.ffn}, "config.hidden and config.ffn");  // Conv1D [in, out]
  else
    expect_shape("h.0.moe.experts.fc.weight", {c.experts, c.ffn, c.hidden},
                 "config.experts, config.ffn and config.hidden");
}

}  // namespace checkpoint_detail

// The variant, config and metadata of a checkpoint, read from its header only (so that a
// program can build the right model type before loading).
inline CheckpointHeader read_checkpoint_header(const std::filesystem::path& path) {
  const moe::io::SafetensorsFile file = moe::io::SafetensorsFile::header_only(path);
  CheckpointHeader header;
  header.metadata = file.metadata();
  const auto format = header.metadata.find("format");
  if (format == header.metadata.end() || format->second != kCheckpointFormat) {
    // A Hugging Face file has none of this program's keys: one that has them is this program's with
    // its format damaged, and read as a Hugging Face file it would lose its config (heads, say).
    const bool ours = std::ranges::any_of(header.metadata, [](const auto& entry) {
      return entry.first != "format" && examples::checkpoint::reserved_key(entry.first);  // HF files have a format
    });
    moe::check(!ours && (format == header.metadata.end() || !format->second.starts_with("moe-gpt2")), file.file(),
               ": checkpoint format \"", format == header.metadata.end() ? "" : format->second,
               "\" is not supported (expected ", kCheckpointFormat, ")");
    header.variant = "dense";
    header.config = checkpoint_detail::infer_hf_config(file);
    header.hugging_face = true;
    return header;
  }
  header.variant = examples::checkpoint::read_variant(file.file(), header.metadata);
  header.config = checkpoint_detail::parse_config(file.file(), header.metadata);
  checkpoint_detail::check_config_against_shapes(file, header.config);
  header.has_optimizer_state = header.metadata.contains("optimizer.step");
  return header;
}

// Saves the model's parameters (and, given an optimizer, its state) with the metadata above
// plus `extra`. Writes <path>.tmp, then renames it.
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
    auto& gate = model.ffn(0).layer().gate();
    if constexpr (requires { gate.step(); }) {
      for (Index l = 0; l < model.config().layers; ++l)
        moe::check(model.ffn(l).layer().gate().step() == gate.step(), file, ": layer ", l,
                   "'s Random gate is at step ", model.ffn(l).layer().gate().step(), ", layer 0's at ", gate.step());
      metadata["routing_step"] = std::to_string(gate.step());
    }
  }
  std::vector<moe::ParamRef<S>> params = model.parameters();
  examples::checkpoint::save_tensors<S>(
      path, params, optimizer, std::move(metadata),
      [](const moe::ParamRef<S>& p) { return checkpoint_detail::file_shape(p.name, p.shape); },
      [](const moe::ParamRef<S>& p, std::span<const S> values) {
        return checkpoint_detail::to_file_layout<S>(p.name, p.shape, values);
      });
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
  const Config& have = model.config();
  const Config& want = header.config;
  const auto check_field = [&](std::string_view field, auto in_file, auto in_model) {
    const auto text = [](auto value) {
      if constexpr (std::is_same_v<decltype(value), bool>) return std::string(value ? "true" : "false");
      else if constexpr (std::is_same_v<decltype(value), SelfSlice>) return std::string(self_slice_name(value));
      else return std::to_string(value);
    };
    moe::check(in_file == in_model, name, ": config.", field, " is ", text(in_file), " in the checkpoint, ",
               text(in_model), " in the model");
  };
  check_field("vocab", want.vocab, have.vocab);
  check_field("context", want.context, have.context);
  check_field("layers", want.layers, have.layers);
  check_field("hidden", want.hidden, have.hidden);
  check_field("ffn", want.ffn, have.ffn);
  if (!header.hugging_face) {  // a Hugging Face file does not record these
    check_field("heads", want.heads, have.heads);
    check_field("experts", want.experts, have.experts);
    check_field("top_k", want.top_k, have.top_k);
    check_field("seed", want.seed, have.seed);
    check_field("route_from_residual", want.route_from_residual, have.route_from_residual);
    check_field("self_slice", want.self_slice, have.self_slice);
  }
  const std::string prefix = header.hugging_face ? checkpoint_detail::hf_prefix(file) : "";

  // Every check first: presence, dtype and shape of each tensor, nothing unexpected.
  std::vector<moe::ParamRef<S>> params = model.parameters();
  const std::vector<bool> has_moments = examples::checkpoint::check_tensors<S>(
      file, params, prefix, header.has_optimizer_state, Model::variant,
      [](const moe::ParamRef<S>& p) { return checkpoint_detail::file_shape(p.name, p.shape); },
      [&](const std::string& stored) { return header.hugging_face && checkpoint_detail::hf_ignored(stored); });
  const examples::checkpoint::RecordedSteps steps =
      examples::checkpoint::read_steps(name, header.metadata, optimizer && header.has_optimizer_state);

  // Then the restore, which changes nothing unless every value is read and finite.
  examples::checkpoint::restore_tensors<S>(
      name, params, prefix, has_moments, steps, optimizer,
      [&](const std::string& stored, const moe::ParamRef<S>& p, std::span<S> out) {
        checkpoint_detail::read_into<S>(file, stored, p.name, p.shape, out);
      });
  model.set_routing_step(Model::is_moe ? steps.routing_step : 0);
  return header;
}

}  // namespace gpt2
