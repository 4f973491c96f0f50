// bench_vit_train: training throughput of the ViT MoE example model, fp32, 2 threads.
//
// vit::Config::small() (28x28x1 images, patch 7 -> Np=16 patches + the class token: T=17, L=6,
// NH=4, H=128, F=256, MoE with N=4, k=2 in blocks 1, 3, 5), batch B=64 images. One iteration is
// kStepsPerIteration full training steps, as a training loop runs them:
//   forward (loss) -> backward -> clip_grad_norm(1.0) -> AdamW step -> zero_grad
//
//   Train/<variant>    variant self, linear (MoE FFN with that gate) or dense (the MLP everywhere)
//
// Counters: images/s (B per step, over wall-clock time), loss (the last step's), parameters
// (the model's count, to compare with the PyTorch peer's) and, for the MoE variants,
// max_expert_fraction (the largest share of a block's router choices that one expert got over
// the timed steps, the worst block; 1/N = 0.25 is perfect balance: imbalance costs time in both
// implementations, so it is printed beside the speed).
//
// The PyTorch peer is bench/torch_vit_train.py (same model, batch and optimizer);
// bench/run_vit.sh runs both and prints the comparison.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "../examples/vit_moe/cpu_model.hpp"

namespace {

using moe::Index;

constexpr int kThreads = 2;
constexpr Index kBatch = 64;
constexpr int kStepsPerIteration = 4;
constexpr int kIterations = 5;  // per repetition: a step takes ~10-50 ms
constexpr std::uint64_t kDataSeed = 42;

// N(0, 1) pixels (normalised images) and labels in [0, classes) from the library's counter-based
// generator; bench/torch_vit_train.py draws the same ones.
struct Batch {
  std::vector<float> images;
  std::vector<std::int32_t> labels;
};
Batch make_batch(const vit::Config& config) {
  Batch batch;
  for (Index i = 0; i < kBatch * config.pixels(); ++i)
    batch.images.push_back(float(moe::random::normal(kDataSeed, 0, std::uint64_t(i))));
  for (Index b = 0; b < kBatch; ++b)
    batch.labels.push_back(
        std::int32_t(moe::random::bits(kDataSeed, 1, std::uint64_t(b)) % std::uint64_t(config.classes)));
  return batch;
}

template <class Model>
void BM_Train(benchmark::State& state) {
  const vit::Config config = vit::Config::small();
  Model model(config);
  model.set_threads(kThreads);
  // The ViT example's rate (config.hpp); betas, eps and weight decay are the optimizer's defaults
  // (0.9, 0.95, 1e-8, 0.1 on matrices only), as on the PyTorch side.
  moe::nn::AdamW<float> optimizer({.lr = 2e-3});
  optimizer.set_threads(kThreads);
  std::vector<moe::ParamRef<float>> params = model.parameters();
  const Batch batch = make_batch(config);

  double loss = 0;
  auto train_step = [&] {
    loss = model.forward(batch.images, batch.labels, kBatch);
    model.backward();
    moe::nn::clip_grad_norm(params, 1.0, kThreads);
    optimizer.step(params);
    model.zero_grad();
  };
  train_step();  // warm-up: activations and optimizer moments are allocated here
  if constexpr (Model::is_moe) model.reset_routing_stats();

  for (auto _ : state)
    for (int s = 0; s < kStepsPerIteration; ++s) train_step();

  const double images = double(state.iterations()) * kStepsPerIteration * double(kBatch);
  state.counters["images/s"] = benchmark::Counter(images, benchmark::Counter::kIsRate);
  state.counters["loss"] = loss;
  state.counters["parameters"] = double(model.parameter_count());
  if constexpr (Model::is_moe) {
    double busiest = 0;
    for (Index block : model.moe_blocks()) busiest = std::max(busiest, model.routing_stats(block).max_fraction());
    state.counters["max_expert_fraction"] = busiest;
  }
}

}  // namespace

int main(int argc, char** argv) {
  for (const char* variant : {"self", "linear", "dense"}) {
    vit::with_variant<float>(variant, [&](auto tag) {
      using Model = typename decltype(tag)::type;
      benchmark::RegisterBenchmark((std::string("Train/") + variant).c_str(), BM_Train<Model>)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond)
          ->Iterations(kIterations);
    });
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
