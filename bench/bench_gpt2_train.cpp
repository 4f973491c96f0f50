// bench_gpt2_train: training throughput of the GPT-2 MoE example model, fp32, 2 threads.
//
// gpt2::Config::small() (V=256, maxT=128, L=4, NH=4, H=128, F=512, N=8, k=2), batch B=16 x T=128
// (2048 tokens). One iteration is kStepsPerIteration full training steps, as a training loop
// runs them:
//   forward (loss) -> backward -> clip_grad_norm(1.0) -> AdamW step -> zero_grad
//
//   Train/<variant>    variant self, linear (MoE FFN with that gate) or dense (GPT-2's MLP)
//
// Counters: tokens/s (B*T per step, over wall-clock time), loss (the last step's) and, for the
// MoE variants, max_expert_fraction (the largest share of a layer's router choices that one
// expert got over the timed steps, the worst layer; 1/N = 0.125 is perfect balance: imbalance
// costs time in both implementations, so it is printed beside the speed).
//
// The PyTorch peer is bench/torch_gpt2_train.py (same model, batch and optimizer);
// bench/run_gpt2.sh runs both and prints the comparison.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "../examples/gpt2_moe/cpu_model.hpp"

namespace {

using moe::Index;

constexpr int kThreads = 2;
constexpr Index kBatch = 16, kSeq = 128;
constexpr int kStepsPerIteration = 2;
constexpr int kIterations = 3;  // per repetition: a step takes ~0.1-0.3 s
constexpr std::uint64_t kDataSeed = 42;

// Byte-level tokens from the library's counter-based generator; targets are the next token.
// bench/torch_gpt2_train.py draws the same ids.
struct Batch {
  std::vector<std::int32_t> tokens, targets;
};
Batch make_batch(Index vocab) {
  Batch batch;
  for (Index i = 0; i <= kBatch * kSeq; ++i)
    batch.tokens.push_back(std::int32_t(moe::random::bits(kDataSeed, 0, std::uint64_t(i)) % std::uint64_t(vocab)));
  batch.targets.assign(batch.tokens.begin() + 1, batch.tokens.end());
  batch.tokens.pop_back();
  return batch;
}

template <class Model>
void BM_Train(benchmark::State& state) {
  const gpt2::Config config = gpt2::Config::small();
  Model model(config);
  model.set_threads(kThreads);
  moe::nn::AdamW<float> optimizer;  // GPT-2 / llm.c defaults: lr 6e-4, betas (0.9, 0.95), weight decay 0.1
  optimizer.set_threads(kThreads);
  std::vector<moe::ParamRef<float>> params = model.parameters();
  const Batch batch = make_batch(config.vocab);

  double loss = 0;
  auto train_step = [&] {
    loss = model.forward(batch.tokens, batch.targets, kBatch, kSeq);
    model.backward();
    moe::nn::clip_grad_norm(params, 1.0, kThreads);
    optimizer.step(params);
    model.zero_grad();
  };
  train_step();  // warm-up: activations and optimizer moments are allocated here
  if constexpr (Model::is_moe) model.reset_routing_stats();

  for (auto _ : state)
    for (int s = 0; s < kStepsPerIteration; ++s) train_step();

  const double tokens = double(state.iterations()) * kStepsPerIteration * double(kBatch * kSeq);
  state.counters["tokens/s"] = benchmark::Counter(tokens, benchmark::Counter::kIsRate);
  state.counters["loss"] = loss;
  if constexpr (Model::is_moe) {
    double busiest = 0;
    for (Index l = 0; l < config.layers; ++l) busiest = std::max(busiest, model.routing_stats(l).max_fraction());
    state.counters["max_expert_fraction"] = busiest;
  }
}

}  // namespace

int main(int argc, char** argv) {
  for (const char* variant : {"self", "linear", "dense"}) {
    gpt2::with_variant<float>(variant, [&](auto tag) {
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
