// The Hopper grouped GEMM's arithmetic on indices (moe/cuda/grouped_gemm.hpp), on the host: the
// tile plan over the groups, the descriptors, and the kernel's steps emulated through them
// (grouped_gemm_emulated) against plain products. The kernel itself runs in moe_cuda_tests.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cuda/grouped_gemm_operands.hpp"
#include "moe/activations.hpp"
#include "moe/cuda/grouped_gemm.hpp"
#include "moe/random.hpp"

namespace {

using grouped_test::Bf16s;
using moe::bfloat16;
using moe::Index;
using moe::cuda::Epilogue;
using moe::cuda::GroupedGemm;
namespace gd = moe::cuda::grouped_gemm_detail;

// The problem's definition, element by element: the fp32 product in K order (one fused
// multiply-add per term, as the emulation), then the epilogue's rounding. The emulation must give
// these bits; a double-precision product (Operands::exact) bounds both.
Bf16s expected_outputs(const GroupedGemm<bfloat16>& p, const grouped_test::Operands& o, bool aux) {
  Bf16s e(std::size_t(o.rows * p.n));
  for (Index g = 0; g < p.groups; ++g)
    for (Index r = o.offsets[std::size_t(g)]; r < o.offsets[std::size_t(g) + 1]; ++r) {
      const Index src = p.gather ? p.gather[r] / p.gather_divisor : r;
      for (Index c = 0; c < p.n; ++c) {
        float acc = 0;
        for (Index j = 0; j < p.k; ++j) acc = std::fma(float(p.a[src * p.lda + j]), float(p.w[g * p.w_stride + c * p.k + j]), acc);
        const bfloat16* bias = p.bias ? p.bias + g * p.bias_stride : nullptr;
        const gd::OutputValues<bfloat16> v = gd::output_values(p.epilogue, acc, bias, c);
        e[std::size_t(r * p.n + c)] = aux ? v.aux : v.out;
      }
    }
  return e;
}

template <int BN>
void check_emulated(Epilogue epilogue, bool gather, std::vector<Index> group_rows, Index N, Index K,
                    std::uint32_t seed) {
  const grouped_test::Operands o = grouped_test::make_operands(group_rows, N, K, gather, 8, 0.05f, seed);
  const Index rows = o.rows;
  const bfloat16 poison = bfloat16(12345.0f);
  Bf16s out(std::size_t(rows * N + 1), poison), aux(std::size_t(rows * N + 1), poison);
  const GroupedGemm<bfloat16> p = o.problem(epilogue, gather, out.data(), aux.data(), 5);
  moe::cuda::grouped_gemm_emulated<BN>(p);

  const Bf16s expected_out = expected_outputs(p, o, false), expected_aux = expected_outputs(p, o, true);
  Index mismatches = 0;
  double worst = 0;
  for (Index g = 0; g < o.groups; ++g)
    for (Index r = o.offsets[std::size_t(g)]; r < o.offsets[std::size_t(g) + 1]; ++r)
      for (Index c = 0; c < N; ++c) {
        const std::size_t i = std::size_t(r * N + c);
        mismatches += out[i].bits != expected_out[i].bits;
        if (p.aux) mismatches += aux[i].bits != expected_aux[i].bits;
        const double pre = epilogue == Epilogue::bias_gelu ? double(float(aux[i])) : double(float(out[i]));
        const double exact = o.exact(p, g, r, c);
        worst = std::max(worst, std::abs(pre - exact) / (std::abs(exact) + 1e-2));
      }
  CHECK(mismatches == 0);
  CHECK(worst < 1e-2);  // bf16 rounding of the stored value: 2^-8 relative
  CHECK(out.back().bits == poison.bits);  // nothing written past the last row
  CHECK(aux.back().bits == poison.bits);
}

// The combine riding on the product: T tokens, top_k of `groups` experts each. y must hold the
// backend combine's bits from the rows the product wrote, the rows must be those of the product
// alone, every arrival count must be back at zero, and a second run must give the same bits.
template <int BN>
void check_emulated_combine(Index T, Index k, Index groups, Index N, Index K, std::uint32_t seed) {
  const grouped_test::Routing rt = grouped_test::make_routing(T, k, groups, seed);
  const grouped_test::Operands o = grouped_test::make_operands(rt.group_rows, N, K, false, 0, 0.05f, seed + 1);
  const bfloat16 poison = bfloat16(12345.0f);
  Bf16s alone(std::size_t(o.rows * N + 1), poison), out(std::size_t(o.rows * N + 1), poison), y(std::size_t(T * N + 1), poison);
  std::vector<std::uint32_t> arrivals(std::size_t(T * (N / moe::cuda::kGroupedGemmColumns)), 0);
  moe::cuda::grouped_gemm_emulated<BN>(o.problem(Epilogue::bias, false, alone.data(), nullptr, 0));
  GroupedGemm<bfloat16> p = o.problem(Epilogue::bias, false, out.data(), nullptr, 0);
  p.combine = rt.combine(y.data(), N, arrivals.data());
  CHECK_NOTHROW(moe::cuda::for_each_grouped_gemm_extent(p, [](const void*, std::size_t, const char*) {}));
  moe::cuda::grouped_gemm_emulated<BN>(p);
  CHECK(out == alone);
  const Bf16s expected = rt.expected_combine(out.data(), N, N);
  Index wrong = 0;
  for (std::size_t i = 0; i < expected.size(); ++i) wrong += y[i].bits != expected[i].bits;
  CHECK(wrong == 0);
  CHECK(y.back().bits == poison.bits);  // nothing past the last token
  CHECK(std::all_of(arrivals.begin(), arrivals.end(), [](std::uint32_t a) { return a == 0; }));
  const Bf16s first = y;
  moe::cuda::grouped_gemm_emulated<BN>(p);
  CHECK(y == first);
}

// SwiGLU in the tiles (GroupedGemm::swiglu): W_g's 2F rows [gate; up], out [rows, F]. Against
// the same operands as a plain product of 2F columns (gate_up, itself checked above) followed by
// the unfused pass's arithmetic: the same bits.
template <int BN>
void check_emulated_swiglu(bool gather, std::vector<Index> group_rows, Index F, Index K, std::uint32_t seed) {
  const grouped_test::Operands o = grouped_test::make_operands(group_rows, 2 * F, K, gather, 8, 0.05f, seed);
  const bfloat16 poison = bfloat16(12345.0f);
  Bf16s gate_up(std::size_t(o.rows * 2 * F + 1), poison), act(std::size_t(o.rows * F + 1), poison);
  moe::cuda::grouped_gemm_emulated<BN>(o.problem(Epilogue::none, gather, gate_up.data(), nullptr, 3));
  GroupedGemm<bfloat16> p = o.problem(Epilogue::none, gather, act.data(), nullptr, 3);
  p.n = F, p.ldc = F, p.swiglu = true;
  CHECK_NOTHROW(moe::cuda::for_each_grouped_gemm_extent(p, [](const void*, std::size_t, const char*) {}));
  moe::cuda::grouped_gemm_emulated<BN>(p);
  Index wrong = 0;
  for (Index r = 0; r < o.rows; ++r)
    for (Index c = 0; c < F; ++c) {
      const float g = float(gate_up[std::size_t(r * 2 * F + c)]), u = float(gate_up[std::size_t(r * 2 * F + F + c)]);
      wrong += act[std::size_t(r * F + c)].bits != bfloat16(moe::activation::silu(g) * u).bits;
    }
  CHECK(wrong == 0);
  CHECK(act.back().bits == poison.bits);
}

}  // namespace

TEST_CASE("grouped gemm: SwiGLU in the tiles gives the unfused product and pass's bits") {
  SUBCASE("128 columns a tile (64 outputs), gathered rows, uneven groups") {
    check_emulated_swiglu<128>(true, {130, 0, 1, 257}, 192, 128, 41);
  }
  SUBCASE("256 columns a tile (128 outputs), rows in place") { check_emulated_swiglu<256>(false, {64, 200}, 256, 64, 42); }
}

TEST_CASE("grouped gemm: the combine rides on the product: the combine's bits, counts back at zero") {
  SUBCASE("top-2 of 8, 128 columns a tile") { check_emulated_combine<128>(300, 2, 8, 256, 128, 11); }
  SUBCASE("top-1, 256 columns a tile") { check_emulated_combine<256>(77, 1, 3, 256, 64, 12); }
  SUBCASE("k = N = 4: every expert gets every token") { check_emulated_combine<128>(33, 4, 4, 128, 64, 13); }
  SUBCASE("no tokens") { check_emulated_combine<128>(0, 2, 4, 128, 64, 14); }
}

TEST_CASE("grouped gemm: the combine's sums: the backend's bits a pair at a time and 16 pairs at a time") {
  // The kernel's last row sums its lane's BN / 8 pairs together (rows outer, pairs inner); the
  // emulation a pair at a time. Each pair's sum keeps its order either way.
  const Index T = 50, k = 3, N = 4, cols = 2 * 16 * 3;
  const grouped_test::Routing rt = grouped_test::make_routing(T, k, N, 31);
  Bf16s out(std::size_t(T * k * cols));
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = bfloat16(float(moe::random::normal(32, 1, std::uint64_t(i))));
  Bf16s y(std::size_t(T * cols));
  std::vector<std::uint32_t> arrivals(std::size_t(T * cols));
  const auto m = rt.combine(y.data(), cols, arrivals.data());
  const Bf16s expected = rt.expected_combine(out.data(), cols, cols);  // the backend's combine
  Index differ = 0;
  for (Index t = 0; t < T; ++t)
    for (Index c0 = 0; c0 < cols; c0 += 2 * 16) {
      bfloat16 many[32], one[32];
      gd::combined_pairs<16>(
          m, t, [&](Index r, int q, bfloat16& v0, bfloat16& v1) { v0 = out[std::size_t(r * cols + c0 + 2 * q)], v1 = out[std::size_t(r * cols + c0 + 2 * q + 1)]; },
          [&](int q, bfloat16 y0, bfloat16 y1) { many[2 * q] = y0, many[2 * q + 1] = y1; });
      for (int q = 0; q < 16; ++q)
        gd::combined_pairs<1>(m, t, gd::PairOfRow{out.data(), cols, c0 + 2 * q},
                              [&](int, bfloat16 y0, bfloat16 y1) { one[2 * q] = y0, one[2 * q + 1] = y1; });
      for (int i = 0; i < 32; ++i)
        differ += many[i].bits != one[i].bits || many[i].bits != expected[std::size_t(t * cols + c0 + i)].bits;
    }
  CHECK(differ == 0);
}

TEST_CASE("grouped gemm: a combine without its arrays, or with slots dropped, is refused") {
  const grouped_test::Routing rt = grouped_test::make_routing(40, 2, 4, 21);
  const grouped_test::Operands o = grouped_test::make_operands(rt.group_rows, 128, 64, false, 0, 0.05f, 22);
  Bf16s out(std::size_t(o.rows * 128)), y(40 * 128);
  std::vector<std::uint32_t> arrivals(40);
  GroupedGemm<bfloat16> p = o.problem(Epilogue::none, false, out.data(), nullptr, 0);
  p.combine = rt.combine(y.data(), 128, arrivals.data());
  CHECK_NOTHROW(moe::cuda::check_grouped_gemm(p, 128));
  GroupedGemm<bfloat16> q = p;
  q.combine.arrivals = nullptr;
  CHECK_THROWS_WITH(moe::cuda::check_grouped_gemm(q, 128), doctest::Contains("arrivals"));
  q = p;
  q.combine.ldy = 127;
  CHECK_THROWS_WITH(moe::cuda::check_grouped_gemm(q, 128), doctest::Contains("even ldy"));
  q = p;
  q.max_rows = 79;  // fewer rows than slots: some slot has none
  CHECK_THROWS_WITH(moe::cuda::check_grouped_gemm(q, 128), doctest::Contains("every slot's row"));
  // Offsets that end short of T * k rows (a capacity dropped slots): the counts would never return to zero.
  std::vector<Index> short_offsets = o.offsets;
  short_offsets.back() -= 1;
  q = p;
  q.offsets = short_offsets.data();
  CHECK_THROWS_WITH(moe::cuda::for_each_grouped_gemm_extent(q, [](const void*, std::size_t, const char*) {}),
                    doctest::Contains("every slot kept"));
}

TEST_CASE("grouped gemm: tiles cover each group's rows once, in group order, empty groups skipped") {
  const std::vector<Index> offsets{0, 0, 300, 301, 301, 557};  // groups of 0, 300, 1, 0, 256 rows
  const Index groups = 5, bound = gd::tiles_bound(557, groups);
  std::vector<int> covered(557, 0);
  Index tiles = 0, last_group = -1;
  for (Index t = 0; t < bound; ++t) {
    const gd::Tile tile = gd::tile_of(offsets.data(), groups, t);
    if (!tile.valid) {
      for (Index u = t; u < bound; ++u) CHECK_FALSE(gd::tile_of(offsets.data(), groups, u).valid);
      break;
    }
    ++tiles;
    CHECK(tile.group >= last_group);
    last_group = tile.group;
    CHECK(tile.row_begin >= offsets[std::size_t(tile.group)]);
    CHECK(tile.row_end <= offsets[std::size_t(tile.group) + 1]);
    CHECK(tile.row_end - tile.row_begin <= gd::kTileRows);
    for (Index r = tile.row_begin; r < tile.row_end; ++r) ++covered[std::size_t(r)];
  }
  CHECK(tiles == 3 + 1 + 2);  // ceil(300/128) + ceil(1/128) + ceil(256/128)
  for (int c : covered) CHECK(c == 1);
}

TEST_CASE("grouped gemm: operand descriptors hold the address, the 8-row stride and the 128-byte swizzle") {
  const std::uint64_t d = gd::operand_descriptor(0x12340u + 32u);
  CHECK((d & 0x3FFF) == (0x12340u + 32u) >> 4);
  CHECK(((d >> 16) & 0x3FFF) == 1);
  CHECK(((d >> 32) & 0x3FFF) == 1024 >> 4);
  CHECK(((d >> 49) & 7) == 0);
  CHECK((d >> 62) == 1);
  // Read through the descriptor, the chunk the kernel placed for (row, chunk) is where element
  // 8 * chunk of that row is found: placement and descriptor agree for every row of two atoms.
  for (Index row = 0; row < 16; ++row)
    for (Index chunk = 0; chunk < gd::kChunksPerRow; ++chunk) {
      const std::uint64_t step = gd::operand_descriptor(std::uint32_t(32 * (chunk / 2)));  // 16 elements a step
      CHECK(gd::descriptor_byte(step, row, 8 * (chunk % 2)) == gd::swizzled_chunk(row, chunk));
    }
}

TEST_CASE("grouped gemm: the kernel's steps, emulated, give the plain products' bits") {
  SUBCASE("128 columns a tile, bias + GELU with the pre-activation, gathered rows, uneven groups") {
    check_emulated<128>(Epilogue::bias_gelu, true, {130, 0, 1, 257}, 256, 128, 1);
  }
  SUBCASE("256 columns a tile, bias, rows in place") { check_emulated<256>(Epilogue::bias, false, {64, 200}, 256, 192, 2); }
  SUBCASE("no epilogue, one group, one stage of K") { check_emulated<128>(Epilogue::none, true, {129}, 128, 64, 3); }
  SUBCASE("no rows at all") { check_emulated<128>(Epilogue::bias, true, {0, 0}, 128, 64, 4); }
}

TEST_CASE("grouped gemm: shapes the tiles cannot take are refused with the shape") {
  Bf16s a(64 * 64), w(128 * 64), out(64 * 128);
  const std::vector<Index> offsets{0, 64};
  GroupedGemm<bfloat16> p;
  p.a = a.data(), p.lda = 64, p.offsets = offsets.data(), p.groups = 1, p.max_rows = 64;
  p.w = w.data(), p.w_stride = 128 * 64, p.out = out.data(), p.ldc = 128, p.n = 128, p.k = 64;
  CHECK_NOTHROW(moe::cuda::check_grouped_gemm(p, 128));
  CHECK_THROWS_WITH(moe::cuda::check_grouped_gemm(p, 256), doctest::Contains("N = 128 must be a multiple of 256"));
  GroupedGemm<bfloat16> q = p;
  q.k = 48, q.lda = 48;
  CHECK_THROWS_WITH(moe::cuda::check_grouped_gemm(q, 128), doctest::Contains("K = 48"));
  q = p;
  q.epilogue = Epilogue::bias;
  CHECK_THROWS_WITH(moe::cuda::check_grouped_gemm(q, 128), doctest::Contains("needs a bias"));
  q = p;
  q.a = a.data() + 1;  // a view that starts mid-row: its 16-byte copies would fault on the GPU
  CHECK_THROWS_WITH(moe::cuda::check_grouped_gemm(q, 128), doctest::Contains("16-byte aligned"));
  q = p;
  q.epilogue = Epilogue::dgelu;
  CHECK_THROWS_WITH(moe::cuda::check_grouped_gemm(q, 128), doctest::Contains("none, bias or bias_gelu"));
  // SwiGLU: W holds 2N rows an expert, N a multiple of half a tile, no other epilogue.
  q = p;
  q.n = 64, q.swiglu = true;
  CHECK_NOTHROW(moe::cuda::check_grouped_gemm(q, 128));
  q.n = 96, q.ldc = 128;
  CHECK_THROWS_WITH(moe::cuda::check_grouped_gemm(q, 128), doctest::Contains("multiple of 64 (swiglu: half a tile)"));
  q.n = 128;
  CHECK_THROWS_WITH(moe::cuda::check_grouped_gemm(q, 128), doctest::Contains("swiglu: 2N rows of W"));
  q.n = 64, q.epilogue = Epilogue::bias, q.bias = w.data();
  CHECK_THROWS_WITH(moe::cuda::check_grouped_gemm(q, 128), doctest::Contains("swiglu is its own epilogue"));
  // The GPU's grid holds 65535 row tiles: every device refuses more (the layer goes per expert).
  q = p;
  q.groups = 1, q.max_rows = (65535 - 1) * 128;
  CHECK_NOTHROW(moe::cuda::check_grouped_gemm(q, 128));
  q.max_rows += 1;
  CHECK_THROWS_WITH(moe::cuda::check_grouped_gemm(q, 128), doctest::Contains("needs more than 65535 tiles of 128 rows"));
  CHECK(moe::cuda::grouped_gemm_detail::rows_fit((65535 - 8) * 128, 8));
  CHECK_FALSE(moe::cuda::grouped_gemm_detail::rows_fit((65535 - 8) * 128 + 1, 8));
}
