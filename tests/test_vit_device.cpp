// The ViT MoE model on a CUDA-backend device (examples/vit_moe/model.hpp over
// moe::cuda::BasicBackend), run here on the host-emulated device: the model cases of
// tests/cuda/vit_model_cases.hpp (initial values, loss, logits and every gradient against the CPU
// model, same bits twice; moe_cuda_tests runs them on a GPU), then training runs through
// vit::train_run (train_run.hpp, vit_moe's --device): exact resume in fp32 and bf16, and
// checkpoints that move between the device and the CPU.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "../examples/vit_moe/train_run.hpp"
#include "cuda/emulated_test_device.hpp"
#include "vit_test_images.hpp"

#define CUDA_TEST_NAME(text) "cuda, emulated device: " text
#include "cuda/vit_model_cases.hpp"

namespace vit_device_test {

using moe::Index;

// 8 x 8 one-channel images whose class is a brightness level (vit_test_images.hpp); 2 blocks, block 1 MoE.
const vit::Config kConfig{.image_size = 8, .channels = 1, .patch = 4, .classes = 4, .layers = 2, .heads = 2,
                          .hidden = 16, .ffn = 24, .experts = 4, .top_k = 2, .moe_every = 2, .seed = 9};

vit::Data data() {
  vit::Data d{vit_test::brightness_images(40, 3), vit_test::brightness_images(16, 4), {}, "brightness"};
  d.normalisation = vit::measure_normalisation(d.train);
  return d;
}

vit::Run run(const std::string& variant, vit::Device device, vit::Precision precision, std::int64_t steps) {
  vit::Run r{.variant = variant, .config = kConfig, .device = device, .precision = precision};
  r.options.steps = steps;
  r.options.batch = 8;  // 5 steps an epoch: the runs cross epochs
  r.options.warmup = 2;
  r.options.lr = 3e-3;
  r.options.augment = true;
  r.options.threads = 1;
  r.options.log_every = 1000;
  return r;
}

std::filesystem::path temp_file(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / "moe_test_vit_device";
  std::filesystem::create_directories(dir);
  return dir / name;
}

// A checkpoint's parameters, read into the CPU model of its variant.
std::vector<float> checkpoint_values(const std::filesystem::path& file) {
  const vit::CheckpointHeader header = vit::read_checkpoint_header(file);
  return vit::with_variant<float>(header.variant, [&](auto tag) {
    typename decltype(tag)::type model(header.config);
    vit::load_checkpoint(file, model);
    std::vector<float> values;
    for (auto& p : model.parameters()) values.insert(values.end(), p.value.begin(), p.value.end());
    return values;
  });
}

double largest_difference(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(double(a[i]) - double(b[i])));
  return worst;
}

// 8 steps on `second` straight, against 4 steps on `first`, a checkpoint, and 4 more resumed on
// `second`. Returns both final checkpoints' values and results.
struct Resumed {
  vit::TrainResult straight, resumed;
  std::vector<float> straight_values, resumed_values;
};
Resumed resume(const std::string& variant, vit::Device first, vit::Precision first_precision, vit::Device second,
               vit::Precision second_precision) {
  const vit::Data d = data();
  const std::string name = variant + "_" + std::to_string(int(first)) + std::to_string(int(first_precision)) +
                           std::to_string(int(second)) + std::to_string(int(second_precision));
  Resumed out;
  vit::Run straight = run(variant, second, second_precision, 8);
  straight.options.checkpoint = temp_file(name + "_straight.safetensors");
  out.straight = vit::train_run(straight, d);
  vit::Run half = run(variant, first, first_precision, 8);
  half.options.checkpoint = temp_file(name + "_half.safetensors");
  half.options.stop_after = 4;
  CHECK(vit::train_run(half, d).steps == 4);
  vit::Run rest = run(variant, second, second_precision, 8);
  rest.resume = half.options.checkpoint;
  rest.start_step = 4;
  rest.options.checkpoint = temp_file(name + "_resumed.safetensors");
  out.resumed = vit::train_run(rest, d);
  CHECK(out.resumed.steps == 4);
  out.straight_values = checkpoint_values(straight.options.checkpoint);
  out.resumed_values = checkpoint_values(rest.options.checkpoint);
  return out;
}

}  // namespace vit_device_test

TEST_CASE("vit device runs: interrupted and resumed on the emulated device, every bit equals a straight run") {
  using namespace vit_device_test;
  for (const auto precision : {vit::Precision::fp32, vit::Precision::bf16})
    for (const std::string variant : {"self", "random"}) {
      CAPTURE(variant);
      CAPTURE(int(precision));
      const Resumed r = resume(variant, vit::Device::emulated, precision, vit::Device::emulated, precision);
      CHECK(r.resumed_values == r.straight_values);
      CHECK(r.resumed.train_loss == r.straight.train_loss);
      CHECK(r.resumed.test.loss == r.straight.test.loss);
      CHECK(r.resumed.test.confusion.counts == r.straight.test.confusion.counts);
    }
}

TEST_CASE("vit device runs: a checkpoint moves between the emulated device and the CPU (fp32)") {
  using namespace vit_device_test;
  // Trained on the device, resumed on the CPU, and the other way round: the resumed run ends where
  // a straight run on its device does, within what fp32 parity leaves after 8 steps.
  for (const auto& devices : {std::pair{vit::Device::emulated, vit::Device::cpu},
                              std::pair{vit::Device::cpu, vit::Device::emulated}}) {
    const vit::Device first = devices.first, second = devices.second;  // (clang 14 captures no bindings)
    CAPTURE(int(first));
    const Resumed r = resume("linear", first, vit::Precision::fp32, second, vit::Precision::fp32);
    CHECK(largest_difference(r.resumed_values, r.straight_values) < 1e-4);
    CHECK(std::abs(r.resumed.test.loss - r.straight.test.loss) < 1e-4);
  }
  // A bf16 device run's checkpoint holds its fp32 master weights: the CPU resumes from them.
  const Resumed r = resume("self", vit::Device::emulated, vit::Precision::bf16, vit::Device::cpu, vit::Precision::fp32);
  CHECK(largest_difference(r.resumed_values, r.straight_values) < 2e-2);
}

TEST_CASE("vit runs: each MoE block's router logits for norm2's bias come from the trained state, on every device") {
  namespace t = vit_device_test;  // qualified: the unity build joins this file with others
  const vit::Data d = t::data();
  for (const auto& where : {std::pair{vit::Device::cpu, vit::Precision::fp32},
                            std::pair{vit::Device::emulated, vit::Precision::fp32},
                            std::pair{vit::Device::emulated, vit::Precision::bf16}}) {
    const vit::Device device = where.first;  // (clang 14 captures no bindings)
    const vit::Precision precision = where.second;
    CAPTURE(int(device));
    CAPTURE(int(precision));
    vit::Run r = t::run("linear", device, precision, 3);
    r.options.checkpoint =
        t::temp_file("bias_" + std::to_string(int(device)) + std::to_string(int(precision)) + ".safetensors");
    const vit::TrainResult result = vit::train_run(r, d);
    // The checkpoint holds the same fp32 values (bf16: the master weights, which the forward reads
    // rounded to bf16): the same logits, to the bit.
    vit::MoEModel<moe::Linear, float> trained(t::kConfig);
    vit::load_checkpoint(r.options.checkpoint, trained);
    if (precision == vit::Precision::bf16)
      for (auto& p : trained.parameters())
        for (float& x : p.value) x = float(moe::bfloat16(x));
    const std::vector<std::vector<double>> expected = vit::router_bias_logits(trained);
    REQUIRE(result.routing.size() == 1);  // block 1
    REQUIRE(expected.size() == 1);
    CHECK(result.routing[0].bias_logit == expected[0]);
    CHECK(std::any_of(expected[0].begin(), expected[0].end(), [](double v) { return v != 0; }));
  }
  const vit::TrainResult random = vit::train_run(t::run("random", vit::Device::emulated, vit::Precision::fp32, 2), d);
  REQUIRE(random.routing.size() == 1);
  CHECK(random.routing[0].bias_logit.empty());
}

TEST_CASE("vit device runs: combinations that cannot run are refused naming the flag") {
  using namespace vit_device_test;
  const vit::Data d = data();
  const auto message = [&](vit::Device device, vit::Precision precision) {
    try {
      vit::train_run(run("self", device, precision, 1), d);
    } catch (const moe::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK(message(vit::Device::cpu, vit::Precision::bf16).find("--precision bf16 needs --device cuda") != std::string::npos);
  CHECK(message(vit::Device::emulated, vit::Precision::tf32).find("--precision tf32 needs --device cuda") != std::string::npos);
  CHECK(message(vit::Device::cuda, vit::Precision::bf16).find("--device cuda") != std::string::npos);
}
