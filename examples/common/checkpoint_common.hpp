// examples/common/checkpoint_common.hpp: what the GPT-2 and ViT checkpoints share. Both are
// safetensors files holding every parameter, optionally AdamW's moments as optimizer.m.<name> /
// optimizer.v.<name>, and string metadata (format, variant, config.*, routing_step,
// optimizer.step, plus the caller's own entries).
//
// A model may store a parameter in another layout than it computes with (GPT-2's Conv1D weights
// are transposed in the file); `file_shape(param)` gives the stored shape, and `to_file(param,
// values)` the stored values. The identity layout is the default.
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
#include <system_error>
#include <vector>

#include "moe/config.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/nn/adamw.hpp"
#include "moe/tensor.hpp"
#include "variants.hpp"

namespace examples::checkpoint {

// Keys the checkpoint writes itself; a caller's entry may not reuse them.
inline bool reserved_key(std::string_view key) {
  return key == "format" || key == "variant" || key == "routing_step" || key.starts_with("config.") ||
         key.starts_with("optimizer.");
}

// A metadata entry the file must have; the errors name the file and the key.
inline const std::string& metadata_text(const std::string& file, const std::map<std::string, std::string>& metadata,
                                        const std::string& key) {
  const auto it = metadata.find(key);
  moe::check(it != metadata.end(), file, ": metadata has no \"", key, "\"");
  return it->second;
}

template <class Integer>
Integer parse_integer(const std::string& file, const std::map<std::string, std::string>& metadata,
                      const std::string& key) {
  const std::string& text = metadata_text(file, metadata, key);
  Integer value{};
  const auto result = std::from_chars(text.data(), text.data() + text.size(), value);
  moe::check(result.ec == std::errc{} && result.ptr == text.data() + text.size() && !text.empty(), file,
             ": metadata \"", key, "\" = \"", text, "\" is not a valid integer");
  return value;
}

// The variant a checkpoint holds: one of examples::kVariants.
inline std::string read_variant(const std::string& file, const std::map<std::string, std::string>& metadata) {
  const std::string& variant = metadata_text(file, metadata, "variant");
  moe::check(known_variant(variant), file, ": unknown variant \"", variant, "\" (valid: ", variant_list(), ")");
  return variant;
}

// A count (steps, a batch, a seed): an integer >= 0 that fits std::int64_t.
inline std::int64_t parse_count(const std::string& file, const std::map<std::string, std::string>& metadata,
                                const std::string& key) {
  const auto value = parse_integer<std::int64_t>(file, metadata, key);
  moe::check(value >= 0, file, ": metadata \"", key, "\" = ", value, " is negative");
  return value;
}

// A finite number, as std::to_chars (report::shortest) wrote it.
inline double parse_number(const std::string& file, const std::map<std::string, std::string>& metadata,
                           const std::string& key) {
  const std::string& text = metadata_text(file, metadata, key);
  double value = 0;
  const auto result = std::from_chars(text.data(), text.data() + text.size(), value);
  moe::check(result.ec == std::errc{} && result.ptr == text.data() + text.size() && !text.empty() &&
                 std::isfinite(value),
             file, ": metadata \"", key, "\" = \"", text, "\" is not a finite number");
  return value;
}

// Runs `validate` on training options read back from a checkpoint's metadata: a value no command
// line could have given (an edited file) is the file's error, naming it first; the check's own
// words, which name the option's flag, follow in parentheses.
template <class Validate>
void check_saved_options(const std::string& file, Validate&& validate) {
  try {
    validate();
  } catch (const moe::Error& error) {
    std::string_view message = error.what();
    if (message.starts_with("moe: ")) message.remove_prefix(5);
    moe::fail(file, ": the training options in its metadata are not valid (", message, ")");
  }
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

// The counters a checkpoint records, read and checked before anything is restored: AdamW's step
// count (only when the optimizer state is to be restored) and the Random gate's draw counter.
struct RecordedSteps {
  bool restore_optimizer = false;
  int optimizer_step = 0;
  std::uint64_t routing_step = 0;
};

inline RecordedSteps read_steps(const std::string& file, const std::map<std::string, std::string>& metadata,
                                bool restore_optimizer) {
  RecordedSteps steps;
  steps.restore_optimizer = restore_optimizer;
  if (restore_optimizer) {
    steps.optimizer_step = parse_integer<int>(file, metadata, "optimizer.step");
    moe::check(steps.optimizer_step >= 0, file, ": optimizer.step is negative (", steps.optimizer_step, ")");
  }
  if (metadata.contains("routing_step"))
    steps.routing_step = parse_integer<std::uint64_t>(file, metadata, "routing_step");
  return steps;
}

// Reads every parameter (under prefix + its name) and, when `steps` restores the optimizer, the
// moments `has_moments` marks, through `read(stored_name, param, out)`, into scratch; checks
// that every value is finite (a non-finite one would poison training silently, and a corrupt file
// is its likely cause); only then copies them into the parameters and sets the optimizer's state.
// An error leaves the parameters and the optimizer as they were.
template <class S, class Read>
void restore_tensors(const std::string& file, std::vector<moe::ParamRef<S>>& params, const std::string& prefix,
                     const std::vector<bool>& has_moments, const RecordedSteps& steps, moe::nn::AdamW<S>* optimizer,
                     Read read) {
  const auto read_finite = [&](const std::string& stored, const moe::ParamRef<S>& p, std::vector<S>& out) {
    out.resize(p.value.size());
    read(stored, p, std::span<S>(out));
    for (S value : out) moe::check(std::isfinite(value), file, ": tensor \"", stored, "\" holds a non-finite value");
  };
  const bool restore_optimizer = steps.restore_optimizer && optimizer;
  std::vector<std::vector<S>> values(params.size()), m(params.size()), v(params.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    read_finite(prefix + params[i].name, params[i], values[i]);
    if (!restore_optimizer || !has_moments[i]) continue;
    read_finite("optimizer.m." + params[i].name, params[i], m[i]);
    read_finite("optimizer.v." + params[i].name, params[i], v[i]);
  }
  // set_state checks its arguments before it changes anything; the copies after it cannot fail.
  if (restore_optimizer) optimizer->set_state(steps.optimizer_step, std::move(m), std::move(v));
  for (std::size_t i = 0; i < params.size(); ++i)
    std::copy(values[i].begin(), values[i].end(), params[i].value.begin());
}

}  // namespace examples::checkpoint
