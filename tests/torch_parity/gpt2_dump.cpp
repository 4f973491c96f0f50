// tests/torch_parity/gpt2_dump.cpp: one forward and one backward of a tiny fp32 GPT-2 MoE model
// (examples/gpt2_moe/model.hpp) per variant, written as safetensors for the PyTorch rebuild in
// tests/torch_parity/gpt2_parity.py.
//
// Usage: moe_torch_parity_gpt2_dump OUTPUT_DIR
//
// OUTPUT_DIR/<case>.safetensors holds
//   param.<name>                 every parameter's value, Hugging Face GPT-2 names (frozen ones too)
//   grad.<name>                  the gradient of the mean loss, for every trainable parameter
//   tokens, targets              I32 [B, T] (targets: -1 = ignored position)
//   loss                         F64 [] the mean cross-entropy
//   logits                       F32 [B*T, V] before backward
//   routing.h.<l>.logits         F32 [B*T, N] the gate's logits of MoE layer l (the Random gate's
//                                draws come from the library's counter-based generator: PyTorch
//                                routes with these)
//   routing.h.<l>.experts        I32 [B*T, k] the chosen experts, best first
// and metadata: case, variant, route_from_residual, self_slice, every Config field, batch, seq, loss (17 digits)
// and frozen (the comma-separated names of the parameters without a gradient).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include "../../examples/gpt2_moe/cpu_model.hpp"
#include "moe/io/safetensors.hpp"

namespace {

namespace fs = std::filesystem;
using moe::Index;
using moe::io::TensorToWrite;

// Tiny enough for a PyTorch float64 rebuild in well under a second; N <= H for SelfRoute; two
// layers so the second one's routing depends on the first one's output.
constexpr gpt2::Config kConfig{.vocab = 50, .context = 16, .layers = 2, .heads = 2, .hidden = 32, .ffn = 48,
                               .experts = 4, .top_k = 2, .seed = 2024};
constexpr Index kBatch = 2, kSeq = 12;

// This program's own streams (tokens, targets, re-initialised parameters), far from the model's.
constexpr std::uint64_t kStreamTokens = 5001, kStreamTargets = 5002, kStreamParamBase = 6000;

std::vector<std::int64_t> shape64(const std::vector<Index>& shape) { return {shape.begin(), shape.end()}; }

// Re-initialises every trainable parameter at a scale where each part of the model matters
// (GPT-2's init, std 0.02 and zero biases, leaves attention near uniform and the FFNs faint):
// matrices N(0, 1/fan_in), biases N(0, 0.1^2), LayerNorm weights 1 + N(0, 0.1^2). The frozen
// FixedRandom projection keeps the library's values.
template <class Model>
void reinitialise(Model& model, std::uint64_t seed) {
  std::uint64_t stream = kStreamParamBase;
  for (auto& p : model.parameters()) {
    ++stream;
    if (!p.trainable) continue;
    const bool norm_weight = p.name.find("ln_") != std::string::npos && p.name.ends_with(".weight");
    const bool bias = p.name.ends_with(".bias");
    const double std_dev = norm_weight || bias ? 0.1 : 1.0 / std::sqrt(double(p.shape.back()));
    for (std::size_t i = 0; i < p.value.size(); ++i)
      p.value[i] = float((norm_weight ? 1.0 : 0.0) + std_dev * moe::random::normal(seed, stream, i));
  }
}

template <class Model>
void dump_case(const fs::path& dir, const std::string& name, bool route_from_residual,
               gpt2::SelfSlice self_slice = gpt2::SelfSlice::last) {
  gpt2::Config config = kConfig;
  config.route_from_residual = route_from_residual;
  config.self_slice = self_slice;
  Model model(config);
  reinitialise(model, config.seed);

  const Index BT = kBatch * kSeq, V = config.vocab, N = config.experts, k = config.top_k;
  std::vector<std::int32_t> tokens(static_cast<std::size_t>(BT)), targets(static_cast<std::size_t>(BT));
  for (Index i = 0; i < BT; ++i) {
    tokens[std::size_t(i)] = std::int32_t(moe::random::bits(config.seed, kStreamTokens, std::uint64_t(i)) % V);
    targets[std::size_t(i)] = std::int32_t(moe::random::bits(config.seed, kStreamTargets, std::uint64_t(i)) % V);
  }
  targets[3] = targets[std::size_t(BT - 1)] = moe::nn::kIgnoreTarget;  // one in each sequence

  model.zero_grad();
  const double loss = model.forward(tokens, targets, kBatch, kSeq);

  std::deque<std::vector<float>> kept;  // owns the copies until the save
  std::deque<std::vector<std::int32_t>> kept_ids;
  std::vector<TensorToWrite> tensors;
  auto add_matrix = [&](std::string tensor, moe::ConstMatrixView<float> m) {
    std::vector<float>& packed = kept.emplace_back();
    for (Index r = 0; r < m.rows; ++r) packed.insert(packed.end(), m.row(r), m.row(r) + m.cols);
    tensors.push_back(moe::io::tensor_to_write<float>(std::move(tensor), {m.rows, m.cols}, packed));
  };

  add_matrix("logits", model.logits());
  if constexpr (Model::is_moe) {
    for (Index l = 0; l < config.layers; ++l) {
      const auto& layer = model.ffn(l).layer();
      const std::string prefix = "routing.h." + std::to_string(l) + ".";
      add_matrix(prefix + "logits", layer.last_logits());
      const std::vector<std::int32_t>& chosen = kept_ids.emplace_back(layer.last_plan().expert);
      tensors.push_back(moe::io::tensor_to_write<std::int32_t>(prefix + "experts", {BT, k}, chosen));
    }
  }
  model.backward();

  std::string frozen;
  for (auto& p : model.parameters()) {
    const std::vector<std::int64_t> shape = shape64(p.shape);
    tensors.push_back(moe::io::tensor_to_write<float>("param." + p.name, shape, std::span<const float>(p.value)));
    if (p.trainable && !p.grad.empty())
      tensors.push_back(moe::io::tensor_to_write<float>("grad." + p.name, shape, std::span<const float>(p.grad)));
    else
      frozen += (frozen.empty() ? "" : ",") + p.name;
  }
  tensors.push_back(moe::io::tensor_to_write<std::int32_t>("tokens", {kBatch, kSeq}, tokens));
  tensors.push_back(moe::io::tensor_to_write<std::int32_t>("targets", {kBatch, kSeq}, targets));
  const std::vector<double> loss_value{loss};
  tensors.push_back(moe::io::tensor_to_write<double>("loss", {}, loss_value));

  char loss_text[64];
  std::snprintf(loss_text, sizeof loss_text, "%.17g", loss);
  const std::map<std::string, std::string> metadata{
      {"case", name},
      {"variant", std::string(Model::variant)},
      {"route_from_residual", route_from_residual ? "1" : "0"},
      {"self_slice", std::string(gpt2::self_slice_name(self_slice))},
      {"vocab", std::to_string(config.vocab)},
      {"context", std::to_string(config.context)},
      {"layers", std::to_string(config.layers)},
      {"heads", std::to_string(config.heads)},
      {"hidden", std::to_string(config.hidden)},
      {"ffn", std::to_string(config.ffn)},
      {"experts", std::to_string(N)},
      {"top_k", std::to_string(k)},
      {"batch", std::to_string(kBatch)},
      {"seq", std::to_string(kSeq)},
      {"loss", loss_text},
      {"frozen", frozen},
  };
  moe::io::save_safetensors(dir / (name + ".safetensors"), tensors, metadata);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUTPUT_DIR\n", argv[0]);
    return 2;
  }
  try {
    const fs::path dir = argv[1];
    fs::create_directories(dir);
    for (std::string_view variant : gpt2::kVariants)
      gpt2::with_variant<float>(variant, [&](auto tag) {
        using Model = typename decltype(tag)::type;
        dump_case<Model>(dir, std::string(variant), false);
        // The gate reads the residual stream before ln_2 (the experts still read ln_2's output).
        if (variant == "self" || variant == "linear")
          dump_case<Model>(dir, std::string(variant) + "-from-residual", true);
        // Each layer's gate reads its own N coordinates (layer 1 the N before layer 0's).
        if (variant == "self") dump_case<Model>(dir, "self-per-layer", false, gpt2::SelfSlice::per_layer);
      });
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe_torch_parity_gpt2_dump: %s\n", e.what());
    return 1;
  }
  return 0;
}
