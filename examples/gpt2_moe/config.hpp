// examples/gpt2_moe/config.hpp: the shape of a GPT-2 MoE model, and the two named configs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <optional>
#include <string>
#include <string_view>

#include "../common/variants.hpp"
#include "moe/config.hpp"

namespace gpt2 {

using moe::Index;

// Which N coordinates of its input each layer's SelfRoute gate reads (the self variant; the other
// gates have no slice):
//   last:      every layer the last N, [H - N, H) (the paper's eq. 5, and the default);
//   per_layer: layer l its own N, counting down from the end: [H - N(l + 1), H - N l), starting at the
//              end again after H / N layers (the paper's section 2.2: "different layers could use
//              different coordinate subsets"). An ablation (the variant self-per-layer, below): with
//              `last`, one coordinate that runs high in every layer's input wins every layer's routing.
enum class SelfSlice { last, per_layer };
inline constexpr std::string_view kSelfSliceNames[] = {"last", "per-layer"};
inline std::string_view self_slice_name(SelfSlice s) { return kSelfSliceNames[int(s)]; }
// The slice a name selects, if any.
inline std::optional<SelfSlice> find_self_slice(std::string_view name) {
  for (std::size_t i = 0; i < std::size(kSelfSliceNames); ++i)
    if (name == kSelfSliceNames[i]) return SelfSlice(i);
  return std::nullopt;
}

struct Config {
  Index vocab = 256;    // V: byte-level by default
  Index context = 128;  // maxT: positions of wpe
  Index layers = 4;     // L
  Index heads = 4;      // NH
  Index hidden = 128;   // H (GPT-2's C / n_embd)
  Index ffn = 512;      // F: hidden width of the dense MLP and of each expert
  Index experts = 8;    // N (MoE variants)
  Index top_k = 2;      // k (MoE variants)
  std::uint64_t seed = 1337;
  // MoE variants: the gate reads the residual stream before ln_2 instead of the layer's own input
  // (ln_2's output, what a learned router reads by default). Experts always read ln_2's output.
  bool route_from_residual = false;
  SelfSlice self_slice = SelfSlice::last;  // MoE self variant: the coordinates each layer's gate reads

  // Trains in minutes on 2 cores.
  static Config small() { return {}; }
  // GPT-2 small (124M parameters in the dense variant), GPT-2 BPE vocabulary.
  static Config gpt2_small() {
    return {.vocab = 50257, .context = 1024, .layers = 12, .heads = 12, .hidden = 768, .ffn = 3072};
  }

  // The MoE layer of each block.
  moe::LayerConfig layer() const { return {.hidden = hidden, .ffn = ffn, .experts = experts, .top_k = top_k}; }

  // SelfRoute::Options::offset for block `layer`: -1 (the last N) or the start of its own slice.
  Index self_offset(Index layer) const {
    if (self_slice == SelfSlice::last || experts > hidden) return -1;  // (N > H: the gate itself refuses)
    return hidden - experts * (1 + layer % (hidden / experts));
  }

  void validate() const {
    moe::check(vocab >= 1 && context >= 1 && layers >= 1 && heads >= 1 && hidden >= 1 && ffn >= 1,
               "gpt2: vocab, context, layers, heads, hidden and ffn must be positive, got vocab = ", vocab,
               ", context = ", context, ", layers = ", layers, ", heads = ", heads, ", hidden = ", hidden,
               ", ffn = ", ffn);
    moe::check(hidden % heads == 0, "gpt2: hidden = ", hidden, " is not divisible by heads = ", heads);
  }
};

// ---- variants by name --------------------------------------------------------------------------
// gpt2_moe's variants: the examples' five FFNs (examples::kVariants) and self-per-layer, the self
// FFN with Config::self_slice = per_layer. Logs, reports and checkpoint file names use these names,
// so the two self variants train, and are reported, side by side (one compare, or `report --from`
// over runs made apart); a checkpoint keeps the FFN ("self") and the slice (config.self_slice).
inline constexpr std::string_view kSelfPerLayer = "self-per-layer";

struct VariantChoice {
  std::string ffn;  // one of examples::kVariants
  SelfSlice self_slice = SelfSlice::last;
};

// "dense, linear, self, self-per-layer, fixed-random, random", for the errors.
inline std::string variant_list() {
  std::string list;
  for (std::string_view v : examples::kVariants) {
    (list += list.empty() ? "" : ", ") += v;
    if (v == "self") (list += ", ") += kSelfPerLayer;
  }
  return list;
}

// The FFN and slice a name selects; unknown names throw moe::Error naming it and the valid ones.
inline VariantChoice parse_variant(std::string_view name) {
  if (name == kSelfPerLayer) return {"self", SelfSlice::per_layer};
  moe::check(examples::known_variant(name), "gpt2: unknown variant '", name, "' (valid: ", variant_list(), ")");
  return {std::string(name), SelfSlice::last};
}

// The name of FFN `ffn` built with `config`: what parse_variant takes back to them.
inline std::string variant_name(std::string_view ffn, const Config& config) {
  return std::string(ffn == "self" && config.self_slice == SelfSlice::per_layer ? kSelfPerLayer : ffn);
}

}  // namespace gpt2
