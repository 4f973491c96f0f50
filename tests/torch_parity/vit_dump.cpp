// tests/torch_parity/vit_dump.cpp: runs one forward and backward of a tiny fp32 ViT MoE model
// (examples/vit_moe/model.hpp) for every variant and writes what a PyTorch rebuild needs to
// check it (tests/torch_parity/vit_parity.py): the images and labels, every parameter, the
// logits, losses and loss, every parameter gradient, and each MoE block's router logits (the
// Random gate's draws cannot be replayed in PyTorch).
//
// Usage: moe_torch_parity_vit_dump OUTPUT_DIR
//
// OUTPUT_DIR/manifest.txt, one record per line, space-separated (manifest_writer.hpp's format):
//   case   NAME variant=V image_size=S channels=C patch=P classes=K layers=L heads=NH hidden=H
//               ffn=F experts=N top_k=k moe_every=E batch=B
//   param  NAME PARAM trainable=0|1 grad=0|1     in parameters() order (timm's names)
//   tensor NAME TENSOR FILE NDIM D0 D1 ...       PARAM (values), PARAM.grad, images, labels,
//                                                logits, losses, blocks.{l}.moe.router_logits
//   scalar NAME KEY VALUE                        loss, router_parameters
#include "../../examples/vit_moe/cpu_model.hpp"
#include "manifest_writer.hpp"

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using moe::Index;

constexpr int kThreads = 2;

// 8x8 images of 2 channels in four 4x4 patches (T = 5), 4 blocks (MoE in 1 and 3), N <= H.
const vit::Config kConfig{.image_size = 8, .channels = 2, .patch = 4, .classes = 5, .layers = 4, .heads = 2,
                          .hidden = 16, .ffn = 24, .experts = 4, .top_k = 2, .moe_every = 2, .seed = 2024};
constexpr Index kBatch = 3;

template <class Model>
void dump_variant(parity::Writer& out) {
  const vit::Config& c = kConfig;
  const std::string kase = "vit_" + std::string(Model::variant);
  Model model(c);
  model.set_threads(kThreads);

  std::vector<float> images(std::size_t(kBatch * c.pixels()));
  for (std::size_t i = 0; i < images.size(); ++i) images[i] = float(moe::random::normal(c.seed, 6000, i));
  std::vector<std::int32_t> labels;
  for (Index b = 0; b < kBatch; ++b)
    labels.push_back(std::int32_t(moe::random::bits(c.seed, 6001, std::uint64_t(b)) % std::uint64_t(c.classes)));
  // Larger parameters than the initialisation's 0.02 so every path matters: the loss moves away
  // from log(classes) and the routing depends on the weights.
  for (auto& p : model.parameters()) {
    if (!p.trainable) continue;
    const std::uint64_t stream = examples::stream_of(p.name);
    for (std::size_t i = 0; i < p.value.size(); ++i)
      p.value[i] += float(0.3 * moe::random::normal(c.seed + 1, stream, i));
  }

  model.zero_grad();
  const double loss = model.forward(images, labels, kBatch);
  // The router logits are only valid until backward (SelfRoute's are a view of the layer input).
  std::vector<std::pair<std::string, std::vector<float>>> router_logits;
  if constexpr (Model::is_moe)
    for (Index block : model.moe_blocks()) {
      const moe::ConstMatrixView<float> z = model.moe_ffn(block).layer().last_logits();
      std::vector<float> packed;
      for (Index r = 0; r < z.rows; ++r) packed.insert(packed.end(), z.row(r), z.row(r) + z.cols);
      router_logits.emplace_back("blocks." + std::to_string(block) + ".moe.router_logits", std::move(packed));
    }
  model.backward();

  out.line("case " + kase + " variant=" + std::string(Model::variant) + " image_size=" + std::to_string(c.image_size) +
           " channels=" + std::to_string(c.channels) + " patch=" + std::to_string(c.patch) +
           " classes=" + std::to_string(c.classes) + " layers=" + std::to_string(c.layers) +
           " heads=" + std::to_string(c.heads) + " hidden=" + std::to_string(c.hidden) +
           " ffn=" + std::to_string(c.ffn) + " experts=" + std::to_string(c.experts) +
           " top_k=" + std::to_string(c.top_k) + " moe_every=" + std::to_string(c.moe_every) +
           " batch=" + std::to_string(kBatch));
  out.tensor(kase, "images", {kBatch, c.channels, c.image_size, c.image_size}, images);
  out.ids(kase, "labels", labels);
  for (auto& p : model.parameters()) {
    out.line("param " + kase + " " + p.name + " trainable=" + (p.trainable ? "1" : "0") +
             " grad=" + (p.grad.empty() ? "0" : "1"));
    out.tensor(kase, p.name, p.shape, p.value.data(), p.value.size());
    if (!p.grad.empty()) out.tensor(kase, p.name + ".grad", p.shape, p.grad.data(), p.grad.size());
  }
  out.matrix(kase, "logits", model.logits());
  out.tensor(kase, "losses", {kBatch}, std::vector<float>(model.losses().begin(), model.losses().end()));
  const Index T = c.tokens();
  for (auto& [name, values] : router_logits) out.tensor(kase, name, {kBatch * T, c.experts}, values);
  char text[64];
  std::snprintf(text, sizeof text, "%.17g", loss);
  out.scalar(kase, "loss", text);
  out.scalar(kase, "router_parameters", model.router_parameter_count());
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
    parity::Writer out(dir);
    for (std::string_view variant : vit::kVariants)
      vit::with_variant<float>(variant, [&](auto tag) { dump_variant<typename decltype(tag)::type>(out); });
    out.finish();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe_torch_parity_vit_dump: %s\n", e.what());
    return 1;
  }
  return 0;
}
