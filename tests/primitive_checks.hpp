// The backends' element-wise and routing primitives refuse operands of the wrong shape, naming
// them (moe/backend_checks.hpp): one body for the CPU backend (test_bad_input.cpp) and the CUDA
// backend (cuda/backend_cases.hpp, the emulated device and the GPU).
#pragma once

#include <doctest/doctest.h>

#include <cstdint>
#include <span>

#include "moe/config.hpp"
#include "moe/tensor.hpp"

template <class B>
void check_primitive_shapes(const B& backend) {
  using S = typename B::Scalar;
  using M = typename B::Matrix;
  using moe::Index;
  const auto matrix = [&](Index rows, Index cols, std::uint64_t seed) {
    M m;
    B::resize(m, rows, cols);
    backend.fill_normal(moe::MatrixView<S>(m), 1.0, seed, 0);
    return m;
  };
  const auto view = [](M& m) { return moe::MatrixView<S>(m); };
  const auto in = [](const M& m) { return moe::ConstMatrixView<S>(m); };
  const auto refused = [](auto&& call, const char* message) {
    CHECK_THROWS_WITH_AS(call(), doctest::Contains(message), moe::Error);
  };

  // Element-wise: the operands' shapes agree.
  M a = matrix(4, 8, 1), tall = matrix(5, 8, 2), narrow = matrix(4, 4, 3);
  refused([&] { backend.copy(in(a), view(tall)); }, "copy: dst is [5, 8], src is [4, 8]");
  refused([&] { backend.add(in(tall), view(a)); }, "add: dst is [4, 8], src is [5, 8]");
  refused([&] { backend.gelu_forward(in(a), view(narrow)); }, "gelu_forward: out is [4, 4], in is [4, 8]");
  refused([&] { backend.gelu_backward(in(a), in(tall), view(a)); }, "gelu_backward: dout is [5, 8], in is [4, 8]");
  refused([&] { backend.gelu_backward(in(a), in(a), view(tall)); }, "gelu_backward: din is [5, 8], in is [4, 8]");
  refused([&] { backend.swiglu_forward(in(a), view(a)); },
          "swiglu_forward: gate_up is [4, 8], expected [4, 16] (gate | up for out's rows)");
  refused([&] { backend.swiglu_backward(in(tall), in(narrow), view(tall)); },
          "swiglu_backward: gate_up is [5, 8], expected [4, 8]");
  refused([&] { backend.swiglu_backward(in(a), in(narrow), view(tall)); },
          "swiglu_backward: dgate_up is [5, 8], gate_up is [4, 8]");

  // Routing: a plan of T = 6 tokens over N = 4 experts, top-2 (12 slots, none dropped).
  const moe::LayerConfig config{8, 8, 4, 2};
  const M logits = matrix(6, 4, 4);
  typename B::Plan plan;
  typename B::template Vector<S> weights, short_weights;
  backend.route(in(logits), config, plan, weights);
  M rows = matrix(12, 8, 5), few_rows = matrix(3, 8, 6), x = matrix(6, 8, 7), y = matrix(6, 8, 8);
  // Before the host has the plan's offsets (a GPU backend's copy in flight): room for every slot.
  refused([&] { backend.combine(in(few_rows), plan, weights, view(y)); },
          "combine: expert_rows is [3, 8], the plan's expert rows need [12, 8]");
  if constexpr (requires { plan.offsets_on_host(); })  // a GPU backend, the copy in flight: it says so
    refused([&] { backend.combine(in(few_rows), plan, weights, view(y)); }, "(T*k rows until the host has the offsets)");
  REQUIRE(B::expert_offsets(plan).back() == 12);  // on the host: the checks of R run
  B::resize(short_weights, 11);
  M x5 = matrix(5, 8, 9), d_rows = matrix(12, 8, 10), dlogits = matrix(6, 4, 11), logits5 = matrix(5, 4, 12);
  typename B::template Vector<S> dweights;
  backend.gather_rows(in(x), plan, view(rows));  // the right shapes pass
  backend.combine(in(rows), plan, weights, view(y));
  refused([&] { backend.gather_rows(in(x5), plan, view(rows)); },
          "gather_rows: x is [5, 8], expected [6, 8] (the plan's tokens)");
  refused([&] { backend.combine(in(rows), plan, weights, view(x5)); }, "combine: y is [5, 8], expected [6, 8]");
  refused([&] { backend.combine(in(few_rows), plan, weights, view(y)); },
          "combine: expert_rows is [3, 8], the plan's expert rows need [12, 8]");
  refused([&] { backend.combine(in(rows), plan, short_weights, view(y)); },
          "combine: weights has 11 entries, the plan has 12 slots");
  refused([&] { backend.sum_rows_to_tokens(in(rows), plan, view(x5)); }, "sum_rows_to_tokens: dx is [5, 8]");
  refused([&] { backend.combine_backward(in(x5), in(rows), plan, weights, view(d_rows), dweights); },
          "combine_backward: dy is [5, 8], expected [6, 8]");
  refused([&] { backend.combine_backward(in(y), in(few_rows), plan, weights, view(d_rows), dweights); },
          "combine_backward: expert_rows is [3, 8]");
  backend.combine_backward(in(y), in(rows), plan, weights, view(d_rows), dweights);
  const std::span<const std::uint8_t> no_mask;
  refused([&] { backend.route_backward(in(logits5), plan, config, dweights, no_mask, view(dlogits)); },
          "route_backward: logits is [5, 4], expected [6, 4] (the plan's [T, N])");
  refused([&] { backend.route_backward(in(logits), plan, config, dweights, no_mask, view(narrow)); },
          "route_backward: dlogits is [4, 4], logits is [6, 4]");
  moe::LayerConfig other_k = config;
  other_k.top_k = 3;
  refused([&] { backend.route_backward(in(logits), plan, other_k, dweights, no_mask, view(dlogits)); },
          "route_backward: the config has N = 4, k = 3, the plan N = 4, k = 2");
  refused([&] { backend.route_backward(in(logits), plan, config, short_weights, no_mask, view(dlogits)); },
          "route_backward: dweights has 11 entries, the plan has 12 slots");
  backend.route_backward(in(logits), plan, config, dweights, no_mask, view(dlogits));
}
