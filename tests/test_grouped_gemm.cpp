// The Hopper grouped GEMM's arithmetic on indices (moe/cuda/grouped_gemm.hpp), on the host: the
// tile plan over the groups, the descriptors, and the kernel's steps emulated through them
// (grouped_gemm_emulated) against plain products. The kernel itself runs in moe_cuda_tests.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <new>
#include <random>
#include <vector>

#include "moe/cuda/grouped_gemm.hpp"

namespace {

using moe::bfloat16;
using moe::Index;
using moe::cuda::Epilogue;
using moe::cuda::GroupedGemm;
namespace gd = moe::cuda::grouped_gemm_detail;

// Operands start 64-byte aligned, as device allocations do (the kernel's 16-byte copies need 16).
template <class T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{64}); }
  bool operator==(const AlignedAllocator&) const { return true; }
};
using Bf16s = std::vector<bfloat16, AlignedAllocator<bfloat16>>;

Bf16s random_bf16(std::size_t n, float scale, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, scale);
  Bf16s v(n);
  for (bfloat16& x : v) x = bfloat16(normal(rng));
  return v;
}

// The problem's definition, element by element: the fp32 product in K order (one fused
// multiply-add per term, as the emulation), then the epilogue's rounding. The emulation must give
// these bits; a double-precision product bounds both.
struct Expected {
  Bf16s out, aux;
  std::vector<double> exact;  // the product + bias in double, before the activation
};
Expected expected(const GroupedGemm<bfloat16>& p, const std::vector<Index>& offsets, Index rows) {
  Expected e{Bf16s(std::size_t(rows * p.n)), Bf16s(std::size_t(rows * p.n)),
             std::vector<double>(std::size_t(rows * p.n))};
  for (Index g = 0; g < p.groups; ++g)
    for (Index r = offsets[std::size_t(g)]; r < offsets[std::size_t(g) + 1]; ++r) {
      const Index src = p.gather ? p.gather[r] / p.gather_divisor : r;
      for (Index c = 0; c < p.n; ++c) {
        float acc = 0;
        double exact = 0;
        for (Index j = 0; j < p.k; ++j) {
          const float a = float(p.a[src * p.lda + j]), w = float(p.w[g * p.w_stride + c * p.k + j]);
          acc = std::fma(a, w, acc);
          exact += double(a) * double(w);
        }
        const bfloat16* bias = p.bias ? p.bias + g * p.bias_stride : nullptr;
        const gd::OutputValues<bfloat16> v = gd::output_values(p.epilogue, acc, bias, c);
        e.out[std::size_t(r * p.n + c)] = v.out;
        e.aux[std::size_t(r * p.n + c)] = v.aux;
        e.exact[std::size_t(r * p.n + c)] = exact + (bias ? double(float(bias[c])) : 0.0);
      }
    }
  return e;
}

template <int BN>
void check_emulated(Epilogue epilogue, bool gather, std::vector<Index> group_rows, Index N, Index K,
                    std::uint32_t seed) {
  std::mt19937 rng(seed);
  const Index groups = Index(group_rows.size());
  std::vector<Index> offsets{0};
  for (Index r : group_rows) offsets.push_back(offsets.back() + r);
  const Index rows = offsets.back(), divisor = 2, lda = K + 8;  // padded rows: lda is honoured
  const Index a_rows = gather ? (rows + 1) / divisor + 3 : rows;
  const Bf16s a = random_bf16(std::size_t(std::max<Index>(a_rows, 1) * lda), 1.0f, rng);
  const Bf16s w = random_bf16(std::size_t(groups * N * K), 0.05f, rng);
  const Bf16s bias = random_bf16(std::size_t(groups * N), 0.5f, rng);
  std::vector<std::int32_t> source(static_cast<std::size_t>(rows));
  std::uniform_int_distribution<std::int32_t> pick(0, std::int32_t(a_rows * divisor - 1));
  for (std::int32_t& s : source) s = pick(rng);  // any row, in any order, some twice
  const bfloat16 poison = bfloat16(12345.0f);
  Bf16s out(std::size_t(rows * N + 1), poison), aux(std::size_t(rows * N + 1), poison);

  GroupedGemm<bfloat16> p;
  p.a = a.data(), p.lda = lda;
  p.gather = gather ? source.data() : nullptr, p.gather_divisor = std::int32_t(divisor);
  p.offsets = offsets.data(), p.groups = groups, p.max_rows = rows + 5;  // a loose bound, as the backend's T * k
  p.w = w.data(), p.w_stride = N * K;
  p.bias = epilogue == Epilogue::none ? nullptr : bias.data(), p.bias_stride = N;
  p.out = out.data(), p.ldc = N;
  p.aux = epilogue == Epilogue::bias_gelu ? aux.data() : nullptr, p.ldaux = N;
  p.n = N, p.k = K, p.epilogue = epilogue;
  moe::cuda::grouped_gemm_emulated<BN>(p);

  const Expected e = expected(p, offsets, rows);
  Index mismatches = 0;
  double worst = 0;
  for (Index i = 0; i < rows * N; ++i) {
    mismatches += out[std::size_t(i)].bits != e.out[std::size_t(i)].bits;
    if (p.aux) mismatches += aux[std::size_t(i)].bits != e.aux[std::size_t(i)].bits;
    const double pre = epilogue == Epilogue::bias_gelu ? double(float(aux[std::size_t(i)])) : double(float(out[std::size_t(i)]));
    worst = std::max(worst, std::abs(pre - e.exact[std::size_t(i)]) / (std::abs(e.exact[std::size_t(i)]) + 1e-2));
  }
  CHECK(mismatches == 0);
  CHECK(worst < 1e-2);  // bf16 rounding of the stored value: 2^-8 relative
  CHECK(out.back().bits == poison.bits);  // nothing written past the last row
  CHECK(aux.back().bits == poison.bits);
}

}  // namespace

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
}
