// The CUDA backend's test cases on the emulated device: moe::cuda::BasicBackend's every body,
// launch size, dispatch step and GEMM mapping, run on the host (every CI run, ASan included).
// tests/cuda/test_cuda_backend.cu runs the same cases on a GPU.
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <span>
#include <thread>
#include <vector>

#include "cuda/emulated_test_device.hpp"
#include "moe/cuda/host_times.hpp"
#include "moe/cuda/memory_ledger.hpp"
#include "moe/cuda/multi_tensor.hpp"
#include "moe/cuda/per_device.hpp"
#include "moe/cuda/plan_cache.hpp"
#include "moe/cuda/row_packs.hpp"

#define CUDA_TEST_NAME(text) "cuda backend, emulated device: " text
#include "cuda/backend_cases.hpp"

TEST_CASE("bfloat16: rounding to nearest even, NaN and infinities kept, overflow to inf") {
  using moe::bfloat16;
  CHECK(bfloat16(1.0f).bits == 0x3f80);
  CHECK(float(bfloat16(1.0f + 0x1p-8f)) == 1.0f);              // halfway: ties to even (down)
  CHECK(float(bfloat16(1.0f + 3 * 0x1p-8f)) == 1.0f + 0x1p-6f); // halfway: ties to even (up)
  CHECK(float(bfloat16(1.0f + 0x1p-8f + 0x1p-20f)) == 1.0f + 0x1p-7f);
  CHECK(std::isnan(float(bfloat16(std::nanf("")))));
  CHECK(float(bfloat16(INFINITY)) == INFINITY);
  CHECK(float(bfloat16(-INFINITY)) == -INFINITY);
  CHECK(float(bfloat16(3.4e38f)) == INFINITY);
  CHECK(float(bfloat16(-2.5f)) == -2.5f);
  for (float v : {0.1f, -7.3f, 1e-30f, 6.5e4f}) CHECK(std::abs(float(bfloat16(v)) - v) <= std::abs(v) * 0x1p-8f);
}

namespace {

// Device bytes held after a training forward of T tokens (the layer's parameters, x and y included).
template <template <class> class G, class S>
moe::Index bytes_after_training_forward(moe::Index T) {
  using B = moe::cuda::BasicBackend<S, cuda_test::TestDevice>;
  const moe::LayerConfig config{.hidden = 64, .ffn = 256, .experts = 8, .top_k = 2};
  const std::size_t before = moe::cuda::EmulatedDevice::memory_use().in_use;
  moe::MoELayer<G, moe::GeluMLP, B> layer(config, 5, {}, {}, B(cuda_test::make_device()));
  const auto x = cuda_test::to_device<S>(layer.backend(), cuda_test::normal_values(std::size_t(T * 64), 9), T, 64);
  typename B::Matrix y(T, 64);
  layer.forward_into(x, y);
  return moe::Index(moe::cuda::EmulatedDevice::memory_use().in_use - before);
}

template <template <class> class G, class S>
void check_saved_bytes_per_token() {
  using Layer = moe::MoELayer<G, moe::GeluMLP, moe::cuda::BasicBackend<S, cuda_test::TestDevice>>;
  const moe::LayerConfig config{.hidden = 64, .ffn = 256, .experts = 8, .top_k = 2};
  const moe::Index T = 1024;
  const moe::Index held = bytes_after_training_forward<G, S>(2 * T) - bytes_after_training_forward<G, S>(T);
  // Beside the layer's own: x and y (2H scalars a token), the routing's choices (a byte a slot), the dispatch's
  // counts (N int32 a tile of 128 slots) and the statistics' logit moments (N of 24 bytes a chunk of 256 tokens):
  // 2 + 0.5 + 0.75 bytes a token at k = 2, N = 8.
  CHECK(held == T * (Layer::saved_bytes_per_token(config) + 2 * 64 * moe::Index(sizeof(S))) + T * 13 / 4);
}

}  // namespace

TEST_CASE("emulated device: a training forward holds the layer's saved_bytes_per_token a token (SelfRoute's logits a view)") {
  check_saved_bytes_per_token<moe::SelfRoute, float>();
  check_saved_bytes_per_token<moe::Linear, float>();
  check_saved_bytes_per_token<moe::SelfRoute, moe::bfloat16>();
  check_saved_bytes_per_token<moe::Linear, moe::bfloat16>();
}

TEST_CASE("emulated device: an in-place inference forward (y over x) gives the separate buffers' output and losses") {
  using B = moe::cuda::BasicBackend<float, cuda_test::TestDevice>;
  moe::LayerConfig config{.hidden = 64, .ffn = 128, .experts = 8, .top_k = 2};
  config.aux = {.load_balance = 0.01, .z_loss = 0.001};
  moe::MoELayer<moe::SelfRoute, moe::GeluMLP, B> separate(config, 19, {}, {}, B(cuda_test::make_device())),
      in_place(config, 19, {}, {}, B(cuda_test::make_device()));
  const moe::Index T = 150;
  const std::vector<float> values = cuda_test::normal_values(std::size_t(T * 64), 20);
  const auto x = cuda_test::to_device<float>(separate.backend(), values, T, 64);
  auto xy = cuda_test::to_device<float>(in_place.backend(), values, T, 64);
  B::Matrix y(T, 64);
  separate.forward_into(x, y, {.for_backward = false});
  in_place.forward_into(xy, xy, {.for_backward = false});
  std::vector<float> a(std::size_t(T * 64)), b(a.size());
  separate.backend().download(y, a);
  in_place.backend().download(xy, b);
  CHECK(a == b);
  CHECK(in_place.aux_losses().load_balance == separate.aux_losses().load_balance);
  CHECK(in_place.aux_losses().z_loss == separate.aux_losses().z_loss);
  CHECK(separate.aux_losses().z_loss > 0);
  // The logit moments read x's last columns before the output overwrote them: those of the values.
  moe::RoutingStats expected(8);
  std::vector<float> z(std::size_t(T * 8));
  for (moe::Index t = 0; t < T; ++t)
    for (moe::Index e = 0; e < 8; ++e) z[std::size_t(t * 8 + e)] = values[std::size_t(t * 64 + 56 + e)];
  expected.accumulate_logits(moe::ConstMatrixView<float>(z.data(), T, 8));
  CHECK(in_place.stats().logit_means() == expected.logit_means());
  CHECK(in_place.stats().logit_stds() == expected.logit_stds());
  CHECK(separate.stats().logit_means() == expected.logit_means());
}

namespace {
// The emulated backend with a grid too small for any routed launch: the layer's branch for forwards
// past the grouped GEMM's row tiles (about 8.35M slots, too many to run here).
struct NoRoutedRows : moe::cuda::BasicBackend<moe::bfloat16, cuda_test::TestDevice> {
  using BasicBackend::BasicBackend;
  static bool routed_rows_fit(moe::Index, moe::Index) { return false; }
};
}  // namespace

TEST_CASE("emulated device: a forward past the grouped GEMM's row tiles takes the per-expert path, with its bits") {
  using Base = moe::cuda::BasicBackend<moe::bfloat16, cuda_test::TestDevice>;
  const moe::LayerConfig config{128, 256, 8, 2};
  const moe::Index T = 200;
  moe::MoELayer<moe::SelfRoute, moe::GeluMLP, Base> routed(config, 21, {}, {}, Base(cuda_test::make_device()));
  moe::MoELayer<moe::SelfRoute, moe::GeluMLP, NoRoutedRows> per_expert(config, 21, {}, {},
                                                                      NoRoutedRows(cuda_test::make_device()));
  const std::vector<float> values = cuda_test::normal_values(std::size_t(T * 128), 22);
  std::vector<float> outputs[2];
  bool offsets_on_host[2] = {};
  const auto run = [&](auto& layer, int i) {
    layer.collect_stats(false);
    layer.backend().device().set_expert_gemm(moe::cuda::ExpertGemm::grouped);
    REQUIRE(layer.experts().can_infer_routed(layer.backend(), cuda_test::to_device<moe::bfloat16>(layer.backend(), values, T, 128)));
    const auto x = cuda_test::to_device<moe::bfloat16>(layer.backend(), values, T, 128);
    typename Base::Matrix y(T, 128);
    layer.forward_into(x, y, {.for_backward = false});
    offsets_on_host[i] = layer.last_plan().offsets_on_host() || layer.last_plan().offsets_copy_in_flight();
    outputs[i] = cuda_test::to_host<moe::bfloat16>(layer.backend(), y.data(), y.size());
  };
  run(routed, 0);
  run(per_expert, 1);
  CHECK_FALSE(offsets_on_host[0]);  // the routed products read the offsets on the device
  CHECK(offsets_on_host[1]);        // the per-expert path reads them on the host
  CHECK(outputs[0] == outputs[1]);
}

TEST_CASE("cuda backend: routing workspace bytes per token bound what a routed plan holds") {
  using moe::Index;
  // k = 2, bf16, N = 8: 2 * (3 * 4 + 1 + 2 * 2) + 1 status byte + ceil(2 * 8 * 4 / 128); k = 1, fp32, N = 256:
  // 3 * 4 + 1 + 2 * 4 + 1 + 8
  CHECK(moe::cuda::BasicBackend<moe::bfloat16, moe::cuda::EmulatedDevice>::routing_bytes_per_token(2, 8) == 36);
  CHECK(moe::cuda::BasicBackend<float, moe::cuda::EmulatedDevice>::routing_bytes_per_token(1, 256) == 30);
  // What route() allocates for T tokens (the weights and their gradient counted as two slot arrays)
  // stays within T times the formula, and above T times (formula - 1): the rounding of the tiles.
  using B = moe::cuda::BasicBackend<moe::bfloat16, moe::cuda::EmulatedDevice>;
  const B backend(cuda_test::make_device());
  for (const Index T : {Index(1000), Index(4096), Index(70000)}) {
    CAPTURE(T);
    const Index N = 8, k = 2;
    moe::LayerConfig config{8, 8, N, k};
    B::Matrix logits(T, N);
    backend.fill(moe::MatrixView<moe::bfloat16>(logits), moe::bfloat16(0.f));
    B::Plan plan;
    B::Vector<moe::bfloat16> weights;
    backend.route(logits, config, plan, weights);
    const Index bytes = (plan.expert.size() + plan.row.size() + plan.slot_of_row.size() + plan.tile_count.size()) * 4 +
                        plan.choice.size() + plan.row_status.size() + 2 * weights.size() * Index(sizeof(moe::bfloat16));
    CHECK(bytes <= T * B::routing_bytes_per_token(k, N));
    CHECK(bytes > T * (B::routing_bytes_per_token(k, N) - 1));
  }
}

TEST_CASE("cuda backend: dispatch tiles are 128 slots, longer where there would be more than 1024") {
  using moe::Index;
  using moe::cuda::detail::dispatch_tiles;
  const auto tiles = [](Index slots) { return std::array<Index, 2>{dispatch_tiles(slots).size, dispatch_tiles(slots).count}; };
  CHECK(tiles(0) == std::array<Index, 2>{128, 1});  // one empty tile: the offsets still get written
  CHECK(tiles(128) == std::array<Index, 2>{128, 1});
  CHECK(tiles(129) == std::array<Index, 2>{128, 2});
  CHECK(tiles(131072) == std::array<Index, 2>{128, 1024});
  CHECK(tiles(131073) == std::array<Index, 2>{256, 513});
  CHECK(tiles(Index(1) << 30) == std::array<Index, 2>{Index(1) << 20, 1024});
}

TEST_CASE("cuda: sum_in_order (a column's partials, fetched eight at a time) has the plain loop's bits") {
  std::mt19937_64 rng(77);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<float> values(100);
  for (float& v : values) v = float(std::ldexp(normal(rng), int(rng() % 40) - 20));  // magnitudes that round apart
  for (const moe::Index n : {0, 1, 7, 8, 9, 16, 17, 63, 100}) {
    CAPTURE(n);
    float plain = 0;
    for (moe::Index i = 0; i < n; ++i) plain += values[std::size_t(i)];
    const float batched = moe::cuda::sum_in_order<float>(n, [&](moe::Index i) { return values[std::size_t(i)]; });
    CHECK(std::memcmp(&plain, &batched, sizeof(float)) == 0);
  }
}

TEST_CASE("cuda: PerDevice works a value out once for each device, also under concurrent first asks") {
  moe::cuda::PerDevice<int> value;
  std::atomic<int> computed{0};
  const auto ask = [&](int device) {
    return value.get(device, [&] {
      ++computed;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));  // widen the window two first asks share
      return 100 + device;
    });
  };
  std::vector<std::thread> threads;
  std::vector<int> seen(8);
  for (int t = 0; t < 8; ++t) threads.emplace_back([&, t] { seen[std::size_t(t)] = ask(t % 2); });
  for (std::thread& t : threads) t.join();
  for (int t = 0; t < 8; ++t) CHECK(seen[std::size_t(t)] == 100 + t % 2);
  CHECK(computed == 2);  // device 0 and device 1, each once
  CHECK(ask(1) == 101);
  CHECK(ask(3) == 103);
  CHECK(computed == 3);
}

// ---- the emulated device fails where a GPU would ----------------------------------------------

TEST_CASE("emulated device: allocations and every scratch area start poisoned (NaN floats, -1 integers)") {
  using moe::cuda::EmulatedDevice;
  const EmulatedDevice device;
  auto* values = static_cast<float*>(EmulatedDevice::allocate(8 * sizeof(float)));
  for (int i = 0; i < 8; ++i) CHECK(std::isnan(values[i]));
  EmulatedDevice::deallocate(values);
  auto* counts = static_cast<std::int32_t*>(device.scratch(4 * sizeof(std::int32_t)));
  counts[0] = 7;
  // The same buffer comes back, poisoned again: what one call left is never readable by the next.
  auto* again = static_cast<std::int32_t*>(device.scratch(4 * sizeof(std::int32_t)));
  CHECK(again == counts);
  CHECK(again[0] == -1);
}

TEST_CASE("memory ledger: bytes held now and at most, the peak reset to what is held, extents inside allocations") {
  moe::cuda::MemoryLedger ledger;
  alignas(16) static unsigned char a[100], b[300], c[50];
  ledger.add(a, sizeof a);
  ledger.add(b, sizeof b);
  CHECK(ledger.use().in_use == 400);
  ledger.remove(b);
  ledger.remove(c);  // not in the ledger: nothing changes
  ledger.remove(nullptr);
  moe::cuda::MemoryUse use = ledger.use();
  CHECK(use.in_use == 100);
  CHECK(use.peak == 400);
  CHECK(use.allocations == 2);
  ledger.reset_peak();
  CHECK(ledger.use().peak == 100);
  ledger.add(c, sizeof c, 3);
  CHECK(ledger.use().peak == 150);
  using Extent = moe::cuda::MemoryLedger::Extent;
  int owner = -1;
  CHECK(ledger.locate(a + 10, 90, &owner) == Extent::inside);
  CHECK(owner == 0);
  CHECK(ledger.locate(a + 10, 91) == Extent::past_end);  // one past the end
  CHECK(ledger.locate(a + 99, std::size_t(-1)) == Extent::past_end);  // no wrap past the address space
  CHECK(ledger.locate(a + 100, 1) == Extent::elsewhere);  // starts one past the end
  CHECK(ledger.locate(b, 1) == Extent::elsewhere);        // freed
  CHECK(ledger.locate(b, 0) == Extent::inside);           // nothing to check
  CHECK(ledger.locate(c + 49, 1, &owner) == Extent::inside);
  CHECK(owner == 3);
}

TEST_CASE("emulated device: its allocations are in its ledger, as CudaDevice's cudaMallocs are in its own") {
  using moe::cuda::EmulatedDevice;
  EmulatedDevice::reset_memory_peak();
  const moe::cuda::MemoryUse before = EmulatedDevice::memory_use();
  void* first = EmulatedDevice::allocate(1000);
  void* second = EmulatedDevice::allocate(3000);
  EmulatedDevice::deallocate(second);
  const moe::cuda::MemoryUse after = EmulatedDevice::memory_use();
  CHECK(after.in_use == before.in_use + 1000);
  CHECK(after.peak == before.in_use + 4000);
  CHECK(after.allocations == before.allocations + 2);
  EmulatedDevice::deallocate(first);
  CHECK(EmulatedDevice::memory_use().in_use == before.in_use);
}

TEST_CASE("emulated device: every launch order visits each index once; a racy body gives different bits") {
  using moe::cuda::LaunchOrder;
  constexpr moe::Index n = 100;
  std::vector<std::vector<moe::Index>> visits;
  for (LaunchOrder order : {LaunchOrder::ascending, LaunchOrder::descending, LaunchOrder::shuffled}) {
    const moe::cuda::EmulatedDevice device(order);
    std::vector<moe::Index> seen;
    device.for_each(n, [&](moe::Index i) { seen.push_back(i); });
    std::vector<moe::Index> sorted = seen;
    std::sort(sorted.begin(), sorted.end());
    for (moe::Index i = 0; i < n; ++i) REQUIRE(sorted[std::size_t(i)] == i);
    std::vector<std::pair<moe::Index, moe::Index>> cells;
    device.for_each_2d(3, 4, [&](moe::Index r, moe::Index c) { cells.emplace_back(r, c); });
    std::sort(cells.begin(), cells.end());
    CHECK(cells.size() == 12);
    CHECK(std::adjacent_find(cells.begin(), cells.end()) == cells.end());
    visits.push_back(seen);
  }
  CHECK(visits[1].front() == n - 1);
  CHECK(visits[2] != visits[0]);
  CHECK(visits[2] != visits[1]);
  // x[i] += x[i + 1] in place reads a neighbour's write under one order and not the other.
  const auto racy = [](LaunchOrder order) {
    std::vector<float> x(16);
    std::iota(x.begin(), x.end(), 1.f);
    float* p = x.data();
    moe::cuda::EmulatedDevice(order).for_each(15, [=](moe::Index i) { p[i] += p[i + 1]; });
    return x;
  };
  CHECK(racy(LaunchOrder::ascending) != racy(LaunchOrder::descending));
}

TEST_CASE("emulated device: a warp's lanes take turns in the launch order, each lane's indices in order; a race between lanes shows") {
  using moe::cuda::LaunchOrder;
  using Warp = moe::cuda::EmulatedDevice::Warp;
  constexpr moe::Index n = 70;  // lanes 0-5 get three indices, the rest two
  const auto visits = [](LaunchOrder order, bool row) {
    const moe::cuda::EmulatedDevice device(order);
    std::vector<moe::Index> seen;
    if (row)
      device.for_each_row(1, [&](moe::Index, const moe::cuda::EmulatedRow& work) {
        work.for_each(n, [&](moe::Index i) { seen.push_back(i); });
      });
    else
      device.for_each_warp(1, 0, [&](moe::Index, const Warp& warp) { warp.lanes(n, [&](moe::Index i) { seen.push_back(i); }); });
    return seen;
  };
  for (const bool row : {false, true}) {
    CAPTURE(row);
    std::vector<moe::Index> ascending(n);
    std::iota(ascending.begin(), ascending.end(), moe::Index{0});
    CHECK(visits(LaunchOrder::ascending, row) == ascending);
    for (const LaunchOrder order : {LaunchOrder::descending, LaunchOrder::shuffled}) {
      const std::vector<moe::Index> seen = visits(order, row);
      std::vector<moe::Index> sorted = seen;
      std::sort(sorted.begin(), sorted.end());
      REQUIRE(sorted == ascending);  // each index once
      CHECK(seen != ascending);
      // Lane by lane: a lane's indices (i, i + 32, ...) one after another, in order.
      for (std::size_t k = 0; k + 1 < seen.size(); ++k)
        if (seen[k] + moe::cuda::kRowLanes < n) CHECK(seen[k + 1] == seen[k] + moe::cuda::kRowLanes);
    }
    const std::vector<moe::Index> descending = visits(LaunchOrder::descending, row);
    CHECK(descending.front() == moe::cuda::kRowLanes - 1);  // lane 31 first
  }
  // Each lane adds its right neighbour's value into its own in the warp's staging, in one lanes()
  // call: a race (no sync between the neighbour's write and this read), so the orders disagree.
  const auto racy = [](LaunchOrder order) {
    const moe::cuda::EmulatedDevice device(order);
    std::vector<float> out(32);
    float* o = out.data();
    device.for_each_warp(1, 33 * sizeof(float), [=](moe::Index, const Warp& warp) {
      float* x = reinterpret_cast<float*>(warp.staging());
      warp.lanes(33, [&](moe::Index i) { x[i] = float(i + 1); });
      warp.lanes(32, [&](moe::Index i) { x[i] += x[i + 1]; });
      warp.lanes(32, [&](moe::Index i) { o[i] = x[i]; });
    });
    return out;
  };
  CHECK(racy(LaunchOrder::ascending) != racy(LaunchOrder::descending));
  CHECK(racy(LaunchOrder::ascending) != racy(LaunchOrder::shuffled));
}

// The dispatch's scan: a row's exclusive_scan in place, over lengths around the 32 runs' edges (a run
// of zero, one or several columns a lane), under every launch order.
TEST_CASE("emulated device: a row's exclusive scan in place gives the plain loop's prefixes and the total in runs of n / 32") {
  using moe::cuda::LaunchOrder;
  using moe::Index;
  std::mt19937_64 rng(86);
  for (const Index n : {Index{0}, Index{1}, Index{31}, Index{32}, Index{33}, Index{100}, Index{1024}, Index{1025}}) {
    CAPTURE(n);
    // The runs tile [0, n) in lane order.
    Index next = 0;
    for (int lane = 0; lane < moe::cuda::kRowLanes; ++lane) {
      const moe::cuda::RowRun run = moe::cuda::row_run(n, lane);
      CHECK(run.begin == next);
      CHECK(run.end >= run.begin);
      next = run.end;
    }
    CHECK(next == n);
    std::vector<std::int32_t> values(static_cast<std::size_t>(n)), expected(static_cast<std::size_t>(n));
    for (auto& v : values) v = std::int32_t(rng() % 1000);
    std::int64_t sum = 0;
    for (Index c = 0; c < n; ++c) expected[std::size_t(c)] = std::int32_t(sum), sum += values[std::size_t(c)];
    for (const LaunchOrder order : {LaunchOrder::ascending, LaunchOrder::descending, LaunchOrder::shuffled}) {
      const moe::cuda::EmulatedDevice device(order);
      std::vector<std::int32_t> column = values;
      std::int64_t total = -1;
      std::int32_t* c = column.data();
      device.for_each_row(1, [&](Index, const moe::cuda::EmulatedRow& row) {
        total = row.exclusive_scan<std::int64_t>(n, [=](Index i) { return c[i]; },
                                                 [=](Index i, std::int64_t before) { c[i] = std::int32_t(before); });
      });
      CHECK(column == expected);
      CHECK(total == sum);
    }
  }
}

TEST_CASE("emulated device: launch_count counts launches over non-empty ranges and library calls, copies shared") {
  const moe::cuda::EmulatedDevice device;
  const moe::cuda::EmulatedDevice copy = device;
  device.for_each(3, [](moe::Index) {});
  device.for_each(0, [](moe::Index) {});
  copy.for_each_2d(2, 2, [](moe::Index, moe::Index) {});
  device.for_each_row(0, [](moe::Index, const moe::cuda::EmulatedRow&) {});
  device.for_each_row(4, [](moe::Index, const moe::cuda::EmulatedRow&) {});
  CHECK(device.launch_count() == 3);
  CHECK(copy.launch_count() == 3);
}

TEST_CASE("emulated device: sync_count counts downloads and synchronize, copies shared") {
  const moe::cuda::EmulatedDevice device;
  const moe::cuda::EmulatedDevice copy = device;
  moe::cuda::DeviceArray<float, moe::cuda::EmulatedDevice> a(2);
  float host[2];
  device.upload(a.data(), host, sizeof(host));
  device.download(host, a.data(), sizeof(host));
  copy.synchronize();
  CHECK(device.sync_count() == 2);
  CHECK(copy.sync_count() == 2);
}

TEST_CASE("emulated device: a started download copies the stream's bytes of its start, reaching the host at its finish") {
  const moe::cuda::EmulatedDevice device;
  moe::cuda::DeviceArray<float, moe::cuda::EmulatedDevice> a(2);
  const float first[2] = {1.f, 2.f}, second[2] = {3.f, 4.f};
  device.upload(a.data(), first, sizeof(first));
  moe::cuda::EmulatedDevice::PendingDownload pending;
  device.start_download(pending, a.data(), sizeof(first));
  device.upload(a.data(), second, sizeof(second));  // queued after the copy: not in it
  float host[2] = {0.f, 0.f};
  CHECK(device.sync_count() == 0);  // the start does not wait
  device.finish_download(pending, host);
  CHECK(host[0] == 1.f);
  CHECK(host[1] == 2.f);
  CHECK(device.sync_count() == 1);  // the finish waits: a sync point
  CHECK_THROWS_WITH_AS(device.finish_download(pending, host), doctest::Contains("no download in flight"), moe::Error);
  CHECK_THROWS_AS(device.start_download(pending, first, sizeof(first)), moe::Error);  // host memory is no source
}

TEST_CASE("host call times: nothing while off; nested calls count in the outer one, the heuristic as a detail") {
  using moe::cuda::HostCall;
  moe::cuda::HostCallTimes times;
  { const auto t = times.time(HostCall::launch); }
  CHECK(times[HostCall::launch].calls == 0);
  times.enable(true);
  const auto spin = [](double seconds) {  // host time that a clock must see
    const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (std::chrono::steady_clock::now() < end) {}
  };
  {
    const auto outer = times.time(HostCall::gemm_lt);  // a declined fusion: cuBLAS, then a pass
    {
      const auto search = times.time(HostCall::lt_heuristic);
      spin(2e-3);
    }
    { const auto inner = times.time(HostCall::gemm); }
    { const auto pass = times.time(HostCall::launch); }
  }
  { const auto a = times.time(HostCall::launch); }
  {
    const auto b = times.time(HostCall::launch);
    spin(1e-3);
  }
  CHECK(times[HostCall::gemm_lt].calls == 1);
  CHECK(times[HostCall::gemm].calls == 0);
  CHECK(times[HostCall::lt_heuristic].calls == 1);
  CHECK(times[HostCall::launch].calls == 2);
  CHECK(times[HostCall::gemm_lt].seconds >= times[HostCall::lt_heuristic].seconds);
  CHECK(times[HostCall::lt_heuristic].seconds >= 2e-3);
  CHECK(times[HostCall::launch].max_seconds >= 1e-3);
  CHECK(times[HostCall::launch].seconds >= times[HostCall::launch].max_seconds);
  CHECK(times.total_seconds() == doctest::Approx(times[HostCall::gemm_lt].seconds + times[HostCall::launch].seconds));
  times.reset();
  CHECK(times[HostCall::launch].calls == 0);
  CHECK(times.total_seconds() == 0);
  CHECK(moe::cuda::host_call_name(HostCall::wait) == "wait");
}

TEST_CASE("multi-tensor launches: every element of every tensor once, units of about `chunk`, a launch per table") {
  struct Tensor {
    std::int32_t* visits;
    moe::Index n;
    moe::Index expected_units;
  };
  constexpr moe::Index kChunk = 64;
  constexpr int kCapacity = moe::cuda::kTensorsPerLaunch<Tensor>;
  // 2.5 tables of non-empty tensors, an empty one every 5th (they take no table slot).
  const int nonempty = 2 * kCapacity + kCapacity / 2;
  std::vector<moe::cuda::DeviceArray<std::int32_t, moe::cuda::EmulatedDevice>> storage;
  std::vector<Tensor> tensors;
  for (int i = 0, made = 0; made < nonempty; ++i) {
    const moe::Index n = i % 5 == 4 ? 0 : moe::Index(1 + (i * 37) % 200);  // 1 .. 200: under, at and over the chunk
    storage.emplace_back(n);
    std::fill_n(storage.back().data(), n, 0);
    tensors.push_back({storage.back().data(), n, (n + kChunk - 1) / kChunk});
    made += n > 0;
  }
  for (moe::cuda::LaunchOrder order : {moe::cuda::LaunchOrder::ascending, moe::cuda::LaunchOrder::shuffled}) {
    const moe::cuda::EmulatedDevice device(order);
    bool units_right = true;
    bool* units_ok = &units_right;
    moe::cuda::for_each_tensor_unit(device, std::span<const Tensor>(tensors), kChunk,
                                    [=](const Tensor& t, moe::Index q, moe::Index units) {
                                      if (units != t.expected_units || q < 0 || q >= units) *units_ok = false;
                                      for (moe::Index j = q; j < t.n; j += units) ++t.visits[j];
                                    });
    CHECK(units_right);
    CHECK(device.launch_count() == 3);  // ceil(2.5 tables)
    moe::cuda::for_each_tensor_element(device, std::span<const Tensor>(tensors), kChunk,
                                       [=](const Tensor& t, moe::Index j) { ++t.visits[j]; });
    CHECK(device.launch_count() == 6);
  }
  for (std::size_t i = 0; i < tensors.size(); ++i)
    for (moe::Index j = 0; j < tensors[i].n; ++j) REQUIRE(tensors[i].visits[j] == 4);  // 2 orders x 2 calls
  const moe::cuda::EmulatedDevice device;
  moe::cuda::for_each_tensor_unit(device, std::span<const Tensor>(tensors.data(), 0), kChunk,
                                  [](const Tensor&, moe::Index, moe::Index) {});
  CHECK(device.launch_count() == 0);
}

TEST_CASE("cuda backend: the experts' bias gradients in two launches for all experts, each expert's own sums") {
  using B = moe::cuda::BasicBackend<float, moe::cuda::EmulatedDevice>;
  using moe::Index;
  const Index I = 5, O = 7, N = 6;
  // Expert blocks of 0, 1, 64, 65, 0 and 130 rows: empty, a partial chunk, one whole, one plus a row.
  const std::vector<Index> offsets = {0, 0, 1, 65, 130, 130, 260};
  const Index R = offsets.back();
  const moe::cuda::EmulatedDevice device(moe::cuda::LaunchOrder::shuffled);
  const B backend(device);
  B::Matrix in(R, I), dout(R, O), weight(N * O, I), dweight(N * O, I);
  B::Vector<float> dbias(N * O);
  const std::vector<float> dout_host = cuda_test::normal_values(std::size_t(R * O), 91);
  backend.upload(dout_host, dout);
  backend.upload(cuda_test::normal_values(std::size_t(R * I), 92), in);
  backend.fill(dweight, 0.f);
  const std::vector<float> before = cuda_test::normal_values(std::size_t(N * O), 93);  // "+=": start from values
  std::copy(before.begin(), before.end(), dbias.data());

  const std::uint64_t launches = device.launch_count();
  backend.grouped_linear_backward(in, dout, offsets, weight, {}, dweight, dbias.data());
  const Index nonempty = 4;
  CHECK(device.launch_count() - launches == nonempty + 2);  // a weight GEMM per expert, 2 for the sums

  for (Index e = 0; e < N; ++e)
    for (Index c = 0; c < O; ++c) {
      double sum = before[std::size_t(e * O + c)];
      for (Index r = offsets[std::size_t(e)]; r < offsets[std::size_t(e) + 1]; ++r) sum += dout_host[std::size_t(r * O + c)];
      CAPTURE(e);
      CAPTURE(c);
      if (offsets[std::size_t(e)] == offsets[std::size_t(e) + 1])
        CHECK(dbias.data()[e * O + c] == before[std::size_t(e * O + c)]);  // an empty expert's bias gradient untouched
      else
        CHECK(std::abs(dbias.data()[e * O + c] - sum) <= 1e-5 * (1 + std::abs(sum)));
    }
}

TEST_CASE("emulated device: GEMMs check cuBLAS's argument rules and that operands are device memory") {
  using moe::cuda::BlasGemm;
  using moe::cuda::EmulatedDevice;
  const EmulatedDevice device;
  auto* a = static_cast<float*>(EmulatedDevice::allocate(6 * sizeof(float)));
  auto* b = static_cast<float*>(EmulatedDevice::allocate(6 * sizeof(float)));
  auto* c = static_cast<float*>(EmulatedDevice::allocate(4 * sizeof(float)));
  BlasGemm<float> g;  // C[2, 2] = A[2, 3] B[3, 2], column-major
  g.m = 2, g.n = 2, g.k = 3, g.a = a, g.lda = 2, g.b = b, g.ldb = 3, g.c = c, g.ldc = 2;
  for (int i = 0; i < 6; ++i) a[i] = float(i), b[i] = 1.f;
  device.gemm(g);
  CHECK(c[0] == 0.f + 2.f + 4.f);
  BlasGemm<float> bad = g;
  bad.lda = 1;
  CHECK_THROWS_WITH_AS(device.gemm(bad), doctest::Contains("lda = 1 is below A's 2 stored rows"), moe::Error);
  bad = g;
  bad.ldc = 1;
  CHECK_THROWS_WITH_AS(device.gemm(bad), doctest::Contains("ldc = 1"), moe::Error);
  bad = g;
  bad.b = nullptr;
  CHECK_THROWS_WITH_AS(device.gemm(bad), doctest::Contains("null operand"), moe::Error);
  std::vector<float> host(6, 1.f);
  bad = g;
  bad.a = host.data();
  CHECK_THROWS_WITH_AS(device.gemm(bad), doctest::Contains("gemm's A (24 bytes) is not in any device allocation"),
                       moe::Error);
  bad = g;
  bad.ldb = 4;  // B's extent (3 rows, 2 columns 4 apart) runs past its 6 elements
  CHECK_THROWS_WITH_AS(device.gemm(bad), doctest::Contains("gemm's B (28 bytes) runs past the end of its device allocation"),
                       moe::Error);
  bad = g;
  bad.batch = 2, bad.stride_c = 4;  // the second product writes past C
  CHECK_THROWS_WITH_AS(device.gemm(bad), doctest::Contains("gemm's C"), moe::Error);
  CHECK_THROWS_WITH_AS(device.upload(host.data(), a, sizeof(float)), doctest::Contains("upload's destination"),
                       moe::Error);
  CHECK_THROWS_WITH_AS(device.download(a, host.data(), sizeof(float)), doctest::Contains("download's source"),
                       moe::Error);
  EmulatedDevice::deallocate(c);
  CHECK_THROWS_WITH_AS(device.download(host.data(), c, sizeof(float)), doctest::Contains("freed"), moe::Error);
  EmulatedDevice::deallocate(b);
  EmulatedDevice::deallocate(a);
}

TEST_CASE("emulated device: a GEMM group runs independent products and refuses ones that touch each other's output") {
  using moe::cuda::BlasGemm;
  using moe::cuda::EmulatedDevice;
  // Two experts' blocks: C_e[2, 2] = A_e[2, 3] B_e[3, 2], column-major, each in its own part of
  // one allocation (as an expert's row block of the experts' buffer is).
  auto* a = static_cast<float*>(EmulatedDevice::allocate(12 * sizeof(float)));
  auto* b = static_cast<float*>(EmulatedDevice::allocate(12 * sizeof(float)));
  auto* c = static_cast<float*>(EmulatedDevice::allocate(8 * sizeof(float)));
  for (int i = 0; i < 12; ++i) a[i] = float(i), b[i] = float(i % 5) - 2.f;
  std::vector<BlasGemm<float>> group(2);
  for (int e = 0; e < 2; ++e) {
    BlasGemm<float>& g = group[std::size_t(e)];
    g.m = 2, g.n = 2, g.k = 3, g.a = a + 6 * e, g.lda = 2, g.b = b + 6 * e, g.ldb = 3, g.c = c + 4 * e, g.ldc = 2;
  }
  const auto expected = [&](int e, int i, int j) {
    float sum = 0;
    for (int p = 0; p < 3; ++p) sum += a[6 * e + i + 2 * p] * b[6 * e + p + 3 * j];
    return sum;
  };
  for (const auto order : {moe::cuda::LaunchOrder::ascending, moe::cuda::LaunchOrder::descending}) {
    const EmulatedDevice device(order);
    std::fill(c, c + 8, -1.f);
    device.gemm_group(std::span<const BlasGemm<float>>(group));
    CHECK(device.launch_count() == 2);
    for (int e = 0; e < 2; ++e)
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) CHECK(c[4 * e + i + 2 * j] == expected(e, i, j));
  }
  const EmulatedDevice device;
  std::vector<BlasGemm<float>> bad = group;
  bad[1].c = c + 3;  // overlaps the first output's last element
  CHECK_THROWS_WITH_AS(device.gemm_group(std::span<const BlasGemm<float>>(bad)),
                       doctest::Contains("product 0 writes memory that product 1 reads or writes"), moe::Error);
  bad = group;
  bad[1].b = c;  // reads the first product's output (and the extent still lies in one allocation)
  bad[1].ldb = 3, bad[1].n = 1;
  bad[1].ldc = 2;
  CHECK_THROWS_WITH_AS(device.gemm_group(std::span<const BlasGemm<float>>(bad)),
                       doctest::Contains("product 0 writes memory that product 1 reads"), moe::Error);
  // Rows 0-1 and 2-3 of one column-major [4, 2] output (ldc = 4) interleave without sharing an element,
  // as cuBLAS may write them side by side: taken, each product's rows where they belong.
  auto* wide = static_cast<float*>(EmulatedDevice::allocate(8 * sizeof(float)));
  std::vector<BlasGemm<float>> rows = group;
  for (int e = 0; e < 2; ++e) rows[std::size_t(e)].c = wide + 2 * e, rows[std::size_t(e)].ldc = 4;
  std::fill(wide, wide + 8, -1.f);
  device.gemm_group(std::span<const BlasGemm<float>>(rows));
  for (int e = 0; e < 2; ++e)
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) CHECK(wide[2 * e + i + 4 * j] == expected(e, i, j));
  rows[1].c = wide + 1;  // rows 1-2: row 1 of both
  CHECK_THROWS_WITH_AS(device.gemm_group(std::span<const BlasGemm<float>>(rows)),
                       doctest::Contains("product 0 writes memory that product 1 reads or writes"), moe::Error);
  EmulatedDevice::deallocate(wide);
  bad = group;
  bad[0].batch = 2, bad[0].stride_c = 0, bad[0].stride_a = 0, bad[0].stride_b = 0;
  CHECK_THROWS_WITH_AS(device.gemm_group(std::span<const BlasGemm<float>>(bad)),
                       doctest::Contains("single ones, got a batch of 2"), moe::Error);
  EmulatedDevice::deallocate(c);
  EmulatedDevice::deallocate(b);
  EmulatedDevice::deallocate(a);
}

TEST_CASE("plan cache: finds what was stored under an equal key only, and starts over when full") {
  using Cache = moe::cuda::PlanCache<3, int>;
  Cache cache(3);
  CHECK_FALSE(cache.find({1, 2, 3}).has_value());
  cache.insert({1, 2, 3}, 10);
  cache.insert({1, 2, 4}, 11);
  cache.insert({3, 2, 1}, 12);
  CHECK(cache.find({1, 2, 3}) == 10);
  CHECK(cache.find({1, 2, 4}) == 11);
  CHECK(cache.find({3, 2, 1}) == 12);
  CHECK_FALSE(cache.find({2, 1, 3}).has_value());
  cache.insert({1, 2, 4}, 21);  // a known key is replaced in place, nothing dropped
  CHECK(cache.size() == 3);
  CHECK(cache.find({1, 2, 4}) == 21);
  cache.insert({9, 9, 9}, 99);  // full: starts over with the new plan alone
  CHECK(cache.size() == 1);
  CHECK(cache.find({9, 9, 9}) == 99);
  CHECK_FALSE(cache.find({1, 2, 3}).has_value());
  CHECK_THROWS_WITH_AS(Cache(0), doctest::Contains("a capacity of 0 plans"), moe::Error);
}

TEST_CASE("emulated device: a batch by pointer arrays reads each product's operands where its pointers say") {
  using moe::cuda::BlasGemm;
  using moe::cuda::EmulatedDevice;
  const EmulatedDevice device;
  // Two products C_i[2, 1] = A_i[2, 2] B_i[2, 1] whose operands sit at no common stride.
  auto* data = static_cast<float*>(EmulatedDevice::allocate(16 * sizeof(float)));
  for (int i = 0; i < 16; ++i) data[i] = float(i);
  auto* pointers = static_cast<float**>(EmulatedDevice::allocate(6 * sizeof(float*)));
  const float** a = const_cast<const float**>(pointers);
  const float** b = a + 2;
  float** c = pointers + 4;
  a[0] = data + 0, a[1] = data + 7;  // A_0 = [[0, 2], [1, 3]], A_1 = [[7, 9], [8, 10]]
  b[0] = data + 4, b[1] = data + 2;  // B_0 = [4, 5], B_1 = [2, 3]
  c[0] = data + 12, c[1] = data + 14;
  BlasGemm<float> g;
  g.m = 2, g.n = 1, g.k = 2, g.lda = 2, g.ldb = 2, g.ldc = 2, g.batch = 2;
  g.a_array = a, g.b_array = b, g.c_array = c;
  device.gemm(g);
  CHECK(data[12] == 0.f * 4 + 2.f * 5);
  CHECK(data[13] == 1.f * 4 + 3.f * 5);
  CHECK(data[14] == 7.f * 2 + 9.f * 3);
  CHECK(data[15] == 8.f * 2 + 10.f * 3);

  BlasGemm<float> bad = g;
  bad.stride_c = 2;
  CHECK_THROWS_WITH_AS(device.gemm(bad), doctest::Contains("takes no a, b, c or strides"), moe::Error);
  bad = g;
  bad.b_array = nullptr;
  CHECK_THROWS_WITH_AS(device.gemm(bad), doctest::Contains("a null pointer array"), moe::Error);
  std::vector<const float*> host_array = {data, data + 7};
  bad = g;
  bad.a_array = host_array.data();  // cuBLAS reads the arrays on the device
  CHECK_THROWS_WITH_AS(device.gemm(bad), doctest::Contains("gemm's array of A pointers"), moe::Error);
  c[1] = data + 15;  // the second C runs one element past the allocation
  CHECK_THROWS_WITH_AS(device.gemm(g), doctest::Contains("gemm's C"), moe::Error);
  EmulatedDevice::deallocate(pointers);
  EmulatedDevice::deallocate(data);
}

// moe/cuda/row_packs.hpp on the emulated device's row: packed and column-by-column reductions agree with a float64
// reference at every length across and inside packs, the maximum exactly and skipping NaN alike, updates bit for bit;
// a row whose length is not a whole number of packs is neither read nor written past its end.
template <class S>
void check_row_packs() {
  constexpr moe::Index kLength = 72, kPack = moe::cuda::kPackSize<S>;
  moe::cuda::DeviceArray<S, moe::cuda::EmulatedDevice> a(kLength), b(kLength), out_packed(kLength), out_plain(kLength);
  REQUIRE(moe::cuda::row_packs_fit(a.data(), kLength));
  CHECK(moe::cuda::row_packs_fit(a.data(), 0));  // one row for every row (a weight vector)
  CHECK_FALSE(moe::cuda::row_packs_fit(a.data() + 1, kLength));
  CHECK_FALSE(moe::cuda::row_packs_fit(a.data(), kLength + 1));
  const std::vector<float> va = cuda_test::normal_values(kLength, 5), vb = cuda_test::normal_values(kLength, 6);
  for (moe::Index c = 0; c < kLength; ++c) a.data()[c] = S(va[std::size_t(c)]), b.data()[c] = S(vb[std::size_t(c)]);
  const moe::cuda::EmulatedRow row;
  const auto value = [](moe::Index, S x) { return float(x); };
  const auto product = [](moe::Index, S x, S y) { return float(x) * float(y); };
  for (moe::Index n = 0; n <= kLength; ++n) {
    CAPTURE(n);
    double sum = 0, dot = 0, max = -INFINITY;
    for (moe::Index c = 0; c < n; ++c) {
      sum += double(float(a.data()[c]));
      dot += double(float(a.data()[c])) * double(float(b.data()[c]));
      max = std::max(max, double(float(a.data()[c])));
    }
    for (const float got : {moe::cuda::row_sum<true>(row, n, value, a.data()), moe::cuda::row_sum<false>(row, n, value, a.data())})
      CHECK(std::abs(got - sum) <= 1e-6 * (1 + std::abs(sum)));
    for (const float got : {moe::cuda::row_sum<true>(row, n, product, a.data(), b.data()),
                            moe::cuda::row_sum<false>(row, n, product, a.data(), b.data())})
      CHECK(std::abs(got - dot) <= 1e-6 * (1 + std::abs(dot)));
    CHECK(moe::cuda::row_max<true>(row, n, value, a.data()) == float(max));
    CHECK(moe::cuda::row_max<false>(row, n, value, a.data()) == float(max));
  }
  // A NaN is skipped by both orders (the row work's `>` rule), wherever it sits in a pack.
  for (const moe::Index at : {moe::Index{0}, kPack - 1, kPack + 1, kLength - 1}) {
    const S kept = a.data()[at];
    a.data()[at] = S(NAN);
    const float packed = moe::cuda::row_max<true>(row, kLength, value, a.data());
    CHECK(packed == moe::cuda::row_max<false>(row, kLength, value, a.data()));
    CHECK_FALSE(std::isnan(packed));
    a.data()[at] = kept;
  }
  // Updates: the same element function, the same bits, and nothing past n.
  // Additions only: the compiler may fuse a multiply-add in one loop and not in the other (moe/cuda/pack.hpp).
  const auto update = [](moe::Index c, S o, S x, S y) { return S(float(o) - float(x) + float(y) + float(c)); };
  for (const moe::Index n : {kLength - kPack, kLength - kPack - 1, kPack + 1, moe::Index{1}, moe::Index{0}}) {
    CAPTURE(n);
    for (moe::Index c = 0; c < kLength; ++c) out_packed.data()[c] = out_plain.data()[c] = S(float(c) - 3.f);
    moe::cuda::row_update<true>(row, n, update, out_packed.data(), a.data(), b.data());
    moe::cuda::row_update<false>(row, n, update, out_plain.data(), a.data(), b.data());
    CHECK(std::memcmp(out_packed.data(), out_plain.data(), sizeof(S) * kLength) == 0);
    CHECK(float(out_packed.data()[n]) == float(n) - 3.f);
  }
  // Rows allocated to their exact length (the emulated device's allocations are exact, so the sanitizer build reports
  // any access past the end): the partial last pack is taken element by element.
  for (const moe::Index n : {moe::Index{1}, kPack - 1, kPack + 1, 3 * kPack + 2}) {
    CAPTURE(n);
    moe::cuda::DeviceArray<S, moe::cuda::EmulatedDevice> x(n), y(n), packed(n), plain(n);
    REQUIRE(moe::cuda::row_packs_fit(x.data(), n - n % kPack));
    for (moe::Index c = 0; c < n; ++c) {
      x.data()[c] = a.data()[c], y.data()[c] = b.data()[c];
      packed.data()[c] = plain.data()[c] = S(float(c));
    }
    double dot = 0;
    for (moe::Index c = 0; c < n; ++c) dot += double(float(x.data()[c])) * double(float(y.data()[c]));
    CHECK(std::abs(moe::cuda::row_sum<true>(row, n, product, x.data(), y.data()) - dot) <= 1e-6 * (1 + std::abs(dot)));
    CHECK(moe::cuda::row_max<true>(row, n, value, x.data()) == moe::cuda::row_max<false>(row, n, value, x.data()));
    moe::cuda::row_update<true>(row, n, update, packed.data(), x.data(), y.data());
    moe::cuda::row_update<false>(row, n, update, plain.data(), x.data(), y.data());
    CHECK(std::memcmp(packed.data(), plain.data(), sizeof(S) * std::size_t(n)) == 0);
  }
  // row_update_live: the update below `live`, zeros from there to n, nothing read at or past live (the inputs are
  // allocated `live` long: the sanitizer build reports a read past them) and nothing written past n.
  for (const moe::Index n : {moe::Index{1}, kPack - 1, kPack + 1, 3 * kPack + 2, 4 * kPack}) {
    for (const moe::Index live : {moe::Index{0}, moe::Index{1}, kPack - 1, kPack, kPack + 1, n - 1, n}) {
      if (live < 0 || live > n) continue;
      CAPTURE(n);
      CAPTURE(live);
      moe::cuda::DeviceArray<S, moe::cuda::EmulatedDevice> x(live), y(live), packed(n + 1), plain(n + 1);
      for (moe::Index c = 0; c < live; ++c) x.data()[c] = a.data()[c], y.data()[c] = b.data()[c];
      for (moe::Index c = 0; c <= n; ++c) packed.data()[c] = plain.data()[c] = S(float(c) + 0.5f);
      moe::Index calls = 0;
      const auto counted = [&](moe::Index c, S o, S xv, S yv) {
        ++calls;
        return update(c, o, xv, yv);
      };
      moe::cuda::row_update_live<true>(row, n, live, counted, packed.data(), x.data(), y.data());
      CHECK(calls == live);
      moe::cuda::row_update_live<false>(row, n, live, update, plain.data(), x.data(), y.data());
      CHECK(std::memcmp(packed.data(), plain.data(), sizeof(S) * std::size_t(n + 1)) == 0);
      for (moe::Index c = 0; c < n; ++c) {
        const float expected = c < live ? float(update(c, S(float(c) + 0.5f), x.data()[c], y.data()[c])) : 0.f;
        CHECK(float(packed.data()[c]) == expected);
      }
      CHECK(float(packed.data()[n]) == float(n) + 0.5f);
    }
  }
}

TEST_CASE("row packs: sums, maxima and updates in 16-byte packs agree with the column-by-column row work") {
  check_row_packs<float>();
  check_row_packs<moe::bfloat16>();
}

TEST_CASE("row max-sum: one read gives a row's max and sum of exponentials; -inf, NaN and the pair's symmetry") {
  using moe::cuda::MaxSum;
  const moe::cuda::EmulatedRow row;
  const auto value = [](moe::Index, float x) { return x; };
  std::mt19937_64 rng(77);
  std::normal_distribution<float> normal(0.f, 4.f);
  for (const moe::Index n : {moe::Index{1}, moe::Index{3}, moe::Index{31}, moe::Index{33}, moe::Index{100},
                             moe::Index{1000}, moe::Index{4099}}) {
    CAPTURE(n);
    moe::cuda::DeviceArray<float, moe::cuda::EmulatedDevice> x(n);
    for (moe::Index c = 0; c < n; ++c) x.data()[c] = c % 17 == 5 ? -INFINITY : normal(rng);  // masked entries too
    for (const float scale : {1.f, 0.125f}) {  // attention's 1 / sqrt(head size) goes inside the exponent
      CAPTURE(scale);
      double max = -INFINITY, sum = 0;
      for (moe::Index c = 0; c < n; ++c) max = std::max(max, double(x.data()[c]));
      for (moe::Index c = 0; c < n; ++c) sum += std::exp((double(x.data()[c]) - max) * scale);
      for (const bool packed : {true, false}) {
        const MaxSum<float> s = packed ? moe::cuda::row_max_sum<true>(row, n, value, x.data(), scale)
                                       : moe::cuda::row_max_sum<false>(row, n, value, x.data(), scale);
        CHECK(double(s.max) == max);
        CHECK(std::abs(double(s.sum) - sum) <= 1e-6 * sum);
      }
    }
  }
  // The pair: {-inf, 0} is the identity, combining is the same bits either way round, a NaN is kept.
  const MaxSum<float> empty{-INFINITY, 0.f}, a{1.5f, 3.25f}, b{-2.f, 7.5f}, c{1.5f, 0.75f};
  const auto same = [](MaxSum<float> u, MaxSum<float> v) { return std::memcmp(&u, &v, sizeof(u)) == 0; };
  CHECK(same(moe::cuda::max_sum_combine(a, empty), a));
  CHECK(same(moe::cuda::max_sum_combine(empty, a), a));
  CHECK(same(moe::cuda::max_sum_combine(empty, empty), empty));
  for (const auto& [u, v] : {std::pair{a, b}, std::pair{a, c}, std::pair{b, c}}) {
    CHECK(same(moe::cuda::max_sum_combine(u, v), moe::cuda::max_sum_combine(v, u)));
    const MaxSum<float> w = moe::cuda::max_sum_combine(u, v);
    const double expected = double(u.sum) * std::exp(double(u.max) - double(w.max)) +
                            double(v.sum) * std::exp(double(v.max) - double(w.max));
    CHECK(w.max == std::max(u.max, v.max));
    CHECK(std::abs(double(w.sum) - expected) <= 1e-6 * expected);
  }
  CHECK(same(moe::cuda::max_sum_add(empty, -INFINITY), empty));
  CHECK(std::isnan(moe::cuda::max_sum_add(empty, NAN).sum));
  CHECK(std::isnan(moe::cuda::max_sum_add(a, NAN).sum));
  CHECK(std::isnan(moe::cuda::max_sum_combine(moe::cuda::max_sum_add(empty, NAN), a).sum));
  CHECK(std::isnan(moe::cuda::max_sum_combine(a, moe::cuda::max_sum_add(empty, NAN)).sum));
  // +inf: exp(inf - inf) is NaN, as on the CPU, whether it comes first, later, or twice.
  CHECK(std::isnan(moe::cuda::max_sum_add(empty, INFINITY).sum));
  CHECK(std::isnan(moe::cuda::max_sum_add(a, INFINITY).sum));
  CHECK(std::isnan(moe::cuda::max_sum_add(moe::cuda::max_sum_add(a, INFINITY), 2.f).sum));
  CHECK(moe::cuda::max_sum_add(a, 4.f).sum == a.sum * std::exp(a.max - 4.f) + 1.f);  // a finite new max: its 1 exactly
  // A whole pack at once (max_sum_add_all): the pair of one value at a time up to the sum's rounding, and the same
  // rules for -inf, NaN and +inf wherever they sit in the pack.
  const auto add_all = [](MaxSum<float> acc, float x0, float x1, float x2, float x3) {
    const float x[4] = {x0, x1, x2, x3};
    return moe::cuda::max_sum_add_all(acc, x);
  };
  const auto add_each = [](MaxSum<float> acc, float x0, float x1, float x2, float x3) {
    for (const float x : {x0, x1, x2, x3}) acc = moe::cuda::max_sum_add(acc, x);
    return acc;
  };
  for (const MaxSum<float> start : {empty, a, b}) {
    for (const auto& [x0, x1, x2, x3] : {std::array{0.5f, -1.f, 3.f, 2.f}, std::array{-4.f, -3.f, -6.f, -2.5f},
                                         std::array{-INFINITY, 1.f, -INFINITY, 0.25f}}) {
      const MaxSum<float> all = add_all(start, x0, x1, x2, x3), each = add_each(start, x0, x1, x2, x3);
      CHECK(all.max == each.max);
      CHECK(std::abs(double(all.sum) - double(each.sum)) <= 1e-6 * double(each.sum));
    }
    CHECK(same(add_all(start, -INFINITY, -INFINITY, -INFINITY, -INFINITY), start));
    CHECK(std::isnan(add_all(start, -INFINITY, NAN, -INFINITY, -INFINITY).sum));
    CHECK(std::isnan(add_all(start, 1.f, 2.f, NAN, 0.f).sum));
    CHECK(std::isnan(add_all(start, 0.f, INFINITY, 1.f, 2.f).sum));
    CHECK(std::isnan(add_all(add_all(start, INFINITY, 0.f, 0.f, 0.f), 1.f, 2.f, 3.f, 4.f).sum));
    CHECK(std::isnan(add_all(add_all(start, NAN, -INFINITY, -INFINITY, -INFINITY), 1.f, 2.f, 3.f, 4.f).sum));
  }
  // Every column of a row once, each lane's in order: a count of visits per column.
  std::vector<int> visits(70, 0);
  const int total = row.reduce(moe::Index{70}, 0, [&](int acc, moe::Index col) { return ++visits[std::size_t(col)], acc + 1; },
                               [](int u, int v) { return u + v; });
  CHECK(total == 70);
  CHECK(std::all_of(visits.begin(), visits.end(), [](int v) { return v == 1; }));
}
