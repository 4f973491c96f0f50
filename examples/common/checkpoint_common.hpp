// examples/common/checkpoint_common.hpp: what the GPT-2 and ViT checkpoints share. Both are
// safetensors files holding every parameter, optionally AdamW's moments as optimizer.m.<name> /
// optimizer.v.<name>, and string metadata (format, variant, config.*, routing_step,
// optimizer.step, plus the caller's own entries).
//
// A model may store a parameter in another layout than it computes with (GPT-2's Conv1D weights
// are transposed in the file); `file_shape(param)` gives the stored shape, and `to_file(param,
// values)` the stored values. The identity layout is the default.
#pragma once

#include <charconv>
#include <cstdint>
#include <filesystem>
#include <map>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "moe/config.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/nn/adamw.hpp"
#include "moe/tensor.hpp"

namespace examples::checkpoint {

// Keys the checkpoint writes itself; a caller's entry may not reuse them.
inline bool reserved_key(std::string_view key) {
  return key == "format" || key == "variant" || key == "routing_step" || key.starts_with("config.") ||
         key.starts_with("optimizer.");
}

template <class Integer>
Integer parse_integer(const std::string& file, const std::map<std::string, std::string>& metadata,
                      const std::string& key) {
  const auto it = metadata.find(key);
  moe::check(it != metadata.end(), file, ": metadata has no \"", key, "\"");
  Integer value{};
  const std::string& text = it->second;
  const auto result = std::from_chars(text.data(), text.data() + text.size(), value);
  moe::check(result.ec == std::errc{} && result.ptr == text.data() + text.size() && !text.empty(), file,
             ": metadata \"", key, "\" = \"", text, "\" is not a valid integer");
  return value;
}

// The caller's entries (none of them reserved), then format and variant.
inline std::map<std::string, std::string> base_metadata(const std::string& file,
                                                        const std::map<std::string, std::string>& extra,
                                                        std::string_view format, std::string_view variant) {
  std::map<std::string, std::string> metadata;
  for (const auto& [key, value] : extra) {
    moe::check(!reserved_key(key), file, ": metadata key \"", key, "\" is reserved for the checkpoint itself");
    metadata[key] = value;
  }
  metadata["format"] = std::string(format);
  metadata["variant"] = std::string(variant);
  return metadata;
}

// A tensor of the file's header against the shape the metadata's config fields give it (read
// before a model is built from that config: the shapes are bounded by the file's size, so a
// config that agrees with them cannot ask for more memory than the file holds).
inline void expect_shape(const moe::io::SafetensorsFile& file, const std::string& tensor,
                         const std::vector<std::int64_t>& shape, std::string_view fields) {
  moe::check(file.contains(tensor), file.file(), ": checkpoint has no tensor \"", tensor, "\"");
  moe::check(file.info(tensor).shape == shape, file.file(), ": tensor \"", tensor, "\" has shape ",
             moe::io::detail::shape_string(file.info(tensor).shape), ", but the metadata's ", fields, " need ",
             moe::io::detail::shape_string(shape));
}

template <class S>
std::vector<std::int64_t> model_shape(const moe::ParamRef<S>& p) {
  return {p.shape.begin(), p.shape.end()};
}
template <class S>
std::vector<S> copy_values(const moe::ParamRef<S>&, std::span<const S> values) {
  return {values.begin(), values.end()};
}

// Writes every parameter and, given an optimizer, its moments (adding optimizer.step to the
// metadata) to `path` (through <path>.tmp and a rename).
template <class S, class FileShape, class ToFile>
void save_tensors(const std::filesystem::path& path, std::vector<moe::ParamRef<S>>& params,
                  const moe::nn::AdamW<S>* optimizer, std::map<std::string, std::string> metadata,
                  FileShape file_shape, ToFile to_file) {
  const std::string file = path.string();
  struct Stored {
    std::string name;
    std::vector<std::int64_t> shape;
    std::vector<S> values;
  };
  std::vector<Stored> stored;
  const auto add = [&](std::string name, const moe::ParamRef<S>& p, std::span<const S> values) {
    stored.push_back({std::move(name), file_shape(p), to_file(p, values)});
  };
  for (const moe::ParamRef<S>& p : params) add(p.name, p, p.value);
  if (optimizer) {
    moe::check(optimizer->m().empty() || optimizer->m().size() == params.size(), file, ": the optimizer holds ",
               optimizer->m().size(), " parameters' moments, the model has ", params.size(), " parameters");
    metadata["optimizer.step"] = std::to_string(optimizer->step_count());
    for (std::size_t i = 0; i < optimizer->m().size(); ++i) {
      if (optimizer->m()[i].empty()) continue;  // never updated (frozen, or no step yet)
      moe::check(optimizer->m()[i].size() == params[i].value.size() && optimizer->v()[i].size() == params[i].value.size(),
                 file, ": the optimizer's moments of \"", params[i].name, "\" do not match its size");
      add("optimizer.m." + params[i].name, params[i], optimizer->m()[i]);
      add("optimizer.v." + params[i].name, params[i], optimizer->v()[i]);
    }
  }
  std::vector<moe::io::TensorToWrite> tensors;  // views of `stored`, complete by now
  for (const Stored& s : stored)
    tensors.push_back(moe::io::tensor_to_write(s.name, s.shape, std::span<const S>(s.values)));
  moe::io::save_safetensors(path, tensors, metadata);
}

// Before a load changes anything: every parameter is in the file (under prefix + its name) as a
// floating-point tensor of its stored shape; moments, if the file has optimizer state, come in
// pairs and only for trained parameters; and no other tensor is there except those `ignored`
// accepts. Returns which parameters have moments. `variant` names the model in the errors.
template <class S, class FileShape, class Ignored>
std::vector<bool> check_tensors(const moe::io::SafetensorsFile& file, const std::vector<moe::ParamRef<S>>& params,
                                const std::string& prefix, bool has_optimizer_state, std::string_view variant,
                                FileShape file_shape, Ignored ignored) {
  const std::string& name = file.file();
  std::set<std::string> expected;
  const auto check_tensor = [&](const std::string& stored, const moe::ParamRef<S>& p) {
    moe::check(file.contains(stored), name, ": checkpoint has no tensor \"", stored, "\"");
    const moe::io::TensorInfo& info = file.info(stored);
    moe::check(moe::io::is_floating(info.dtype), name, ": tensor \"", stored, "\" has dtype ",
               moe::io::dtype_name(info.dtype), ", expected a floating-point type");
    const std::vector<std::int64_t> shape = file_shape(p);
    moe::check(info.shape == shape, name, ": tensor \"", stored, "\" has shape ",
               moe::io::detail::shape_string(info.shape), ", the model's \"", p.name, "\" needs ",
               moe::io::detail::shape_string(shape));
    expected.insert(stored);
  };
  for (const moe::ParamRef<S>& p : params) check_tensor(prefix + p.name, p);
  std::vector<bool> has_moments(params.size(), false);
  if (has_optimizer_state) {
    for (std::size_t i = 0; i < params.size(); ++i) {
      const std::string m = "optimizer.m." + params[i].name, v = "optimizer.v." + params[i].name;
      moe::check(file.contains(m) == file.contains(v), name, ": checkpoint has only one of \"", m, "\" and \"", v, "\"");
      if (!file.contains(m)) continue;
      moe::check(moe::nn::optimizer_updates(params[i]), name, ": checkpoint has optimizer moments for \"",
                 params[i].name, "\", which is not trained");
      check_tensor(m, params[i]);
      check_tensor(v, params[i]);
      has_moments[i] = true;
    }
  }
  for (const std::string& stored : file.names())
    moe::check(expected.contains(stored) || ignored(stored), name, ": checkpoint tensor \"", stored,
               "\" has no place in the ", variant, " model (a checkpoint of another variant or config?)");
  return has_moments;
}

}  // namespace examples::checkpoint
