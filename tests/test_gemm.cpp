// The CPU GEMM (moe/cpu/gemm.hpp: the register-blocked float kernel, Eigen's kernel for double)
// and the fixed-order SIMD row loops (moe/cpu/simd.hpp), against float64 / long double references
// on fresh random inputs. Shapes are chosen to hit every edge of the blocking: rows that are not a
// multiple of the micro-kernel's MR, columns not a multiple of NR, depths past one KC block, widths
// past one NC block, B packed and read in place, strided views, all four transpose combinations,
// and "=" / "+=" with and without a bias.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <moe/cpu/gemm.hpp>
#include <moe/cpu/simd.hpp>
#include <moe/random.hpp>
#include <vector>

using moe::Index;
using moe::cpu::Gemm;
using moe::cpu::Op;

namespace {

// A [rows, cols] matrix inside a buffer with `pad` extra columns per row and a guard row at each
// end, all holding a sentinel: a read of the padding would poison results (NaN), a write to it
// shows up in guards_intact().
template <class S>
struct Padded {
  Index rows, cols, pad;
  std::vector<S> buffer;
  Padded(Index rows_, Index cols_, Index pad_, S sentinel)
      : rows(rows_), cols(cols_), pad(pad_), buffer(std::size_t((rows_ + 2) * (cols_ + pad_)), sentinel) {}
  Index stride() const { return cols + pad; }
  S* data() { return buffer.data() + stride(); }
  moe::MatrixView<S> view() { return {data(), rows, cols, stride()}; }
  moe::ConstMatrixView<S> const_view() { return view(); }
  S& operator()(Index r, Index c) { return data()[r * stride() + c]; }
  S operator()(Index r, Index c) const { return buffer[std::size_t((r + 1) * stride() + c)]; }
  bool guards_intact(S sentinel) const {
    for (Index i = 0; i < Index(buffer.size()); ++i) {
      const Index r = i / stride() - 1, c = i % stride();
      const bool inside = r >= 0 && r < rows && c < cols;
      if (!inside && !(buffer[std::size_t(i)] == sentinel || (std::isnan(sentinel) && std::isnan(buffer[std::size_t(i)]))))
        return false;
    }
    return true;
  }
};

template <class S>
void fill_random(Padded<S>& m, std::uint64_t seed, std::uint64_t stream) {
  for (Index r = 0; r < m.rows; ++r)
    for (Index c = 0; c < m.cols; ++c) m(r, c) = S(moe::random::normal(seed, stream, std::uint64_t(r * m.cols + c)));
}

struct Shape {
  Index m, n, depth;
};

// C (=|+=) op(A) op(B) (+ bias) through run_gemm against a long double reference, with the bound
// |error| <= 2 * depth * eps(S) * sum_k |op(A)_ik op(B)_kj| (+ the accumulate term), which holds
// for any summation order.
template <class S>
void check_product(Shape shape, Op op_a, Op op_b, bool accumulate, bool with_bias, int threads, std::uint64_t seed) {
  const S nan = std::numeric_limits<S>::quiet_NaN();
  const Index a_rows = op_a == Op::none ? shape.m : shape.depth, a_cols = op_a == Op::none ? shape.depth : shape.m;
  const Index b_rows = op_b == Op::none ? shape.depth : shape.n, b_cols = op_b == Op::none ? shape.n : shape.depth;
  Padded<S> a(a_rows, a_cols, 3, nan), b(b_rows, b_cols, 5, nan), c(shape.m, shape.n, 2, S(-777));
  fill_random(a, seed, 1);
  fill_random(b, seed, 2);
  fill_random(c, seed, 3);
  std::vector<S> bias(static_cast<std::size_t>(shape.n));
  for (Index j = 0; j < shape.n; ++j) bias[std::size_t(j)] = S(moe::random::normal(seed, 4, std::uint64_t(j)));
  const Padded<S> c_before = c;

  moe::cpu::run_gemm(Gemm<S>{c.view(), a.const_view(), op_a, b.const_view(), op_b, accumulate,
                             with_bias ? bias.data() : nullptr},
                     threads);

  const auto op_a_at = [&](Index i, Index k) { return op_a == Op::none ? a(i, k) : a(k, i); };
  const auto op_b_at = [&](Index k, Index j) { return op_b == Op::none ? b(k, j) : b(j, k); };
  const long double eps = std::numeric_limits<S>::epsilon();
  Index bad = 0;
  for (Index i = 0; i < shape.m; ++i)
    for (Index j = 0; j < shape.n; ++j) {
      long double exact = 0, magnitude = 0;
      for (Index k = 0; k < shape.depth; ++k) {
        const long double term = (long double)op_a_at(i, k) * (long double)op_b_at(k, j);
        exact += term;
        magnitude += std::fabs(term);
      }
      const long double before = accumulate ? (long double)c_before(i, j) : 0;
      const long double add = with_bias ? (long double)bias[std::size_t(j)] : 0;
      exact += before + add;
      magnitude += std::fabs(before) + std::fabs(add);
      const long double bound = 2 * (shape.depth + 2) * eps * magnitude + std::numeric_limits<S>::min();
      const long double error = std::fabs((long double)c(i, j) - exact);
      if (!(error <= bound)) ++bad;  // also catches NaN from a padding read
    }
  CHECK_MESSAGE(bad == 0, "m=", shape.m, " n=", shape.n, " depth=", shape.depth, " op_a=", int(op_a), " op_b=",
                int(op_b), " accumulate=", accumulate, " bias=", with_bias, ": ", bad, " elements out of bound");
  CHECK_MESSAGE(c.guards_intact(S(-777)), "a write outside C's view, m=", shape.m, " n=", shape.n);
}

const std::vector<Shape> kShapes = {
    {1, 1, 1},     {1, 33, 7},    {7, 1, 300},  {8, 32, 16},   {9, 33, 257},  {17, 17, 64},  {33, 48, 255},
    {64, 96, 256}, {100, 5, 600}, {150, 31, 40}, {5, 530, 33}, {200, 8, 129}, {2, 1040, 3}, {145, 64, 513},
    // B read in place (read_b_in_place: <= 32 rows, depth <= 128, whole NR panels), full and edge rows
    {32, 64, 128}, {20, 96, 100},
    // A transposed with rows more than 1024 floats apart: packed (read_a_in_place; the shapes above
    // read a transposed A in place)
    {1030, 40, 300},
};

}  // namespace

TEST_CASE("gemm float: every transpose combination and blocking edge against a long double reference") {
  std::uint64_t seed = 100;
  for (const Shape& shape : kShapes)
    for (Op op_a : {Op::none, Op::transpose})
      for (Op op_b : {Op::none, Op::transpose})
        for (bool accumulate : {false, true})  // "=" stores without reading C; "+=" adds to it
          for (bool with_bias : {false, true})  // the bias is added in the last depth block's stores
            check_product<float>(shape, op_a, op_b, accumulate, with_bias, accumulate ? 1 : 2, ++seed);
}

TEST_CASE("gemm double (Eigen's kernel): the same shapes and bounds") {
  std::uint64_t seed = 900;
  for (const Shape& shape : kShapes)
    for (Op op_a : {Op::none, Op::transpose})
      for (Op op_b : {Op::none, Op::transpose}) check_product<double>(shape, op_a, op_b, true, true, 2, ++seed);
}

TEST_CASE("gemm float: same bits on 1 and 2 threads, and an empty depth leaves C = 0 (+ bias)") {
  const Shape shape{300, 200, 300};
  Padded<float> a(shape.m, shape.depth, 0, 0.f), b(shape.n, shape.depth, 0, 0.f);
  fill_random(a, 5, 1);
  fill_random(b, 5, 2);
  Padded<float> c1(shape.m, shape.n, 0, 0.f), c2(shape.m, shape.n, 0, 0.f);
  moe::cpu::run_gemm(Gemm<float>{c1.view(), a.const_view(), Op::none, b.const_view(), Op::transpose}, 1);
  moe::cpu::run_gemm(Gemm<float>{c2.view(), a.const_view(), Op::none, b.const_view(), Op::transpose}, 2);
  CHECK(c1.buffer == c2.buffer);
  // Its two row tiles share one packing of op(B) (kernel::shared_b_size); each tile run as a
  // product of its own packs it itself. The same bits.
  REQUIRE(moe::cpu::detail::kernel::shared_b_size(Gemm<float>{c1.view(), a.const_view(), Op::none, b.const_view(),
                                                              Op::transpose},
                                                  moe::cpu::kTileEdge) > 0);
  Padded<float> c3(shape.m, shape.n, 0, 0.f);
  for (Index r0 = 0; r0 < shape.m; r0 += moe::cpu::kTileEdge) {
    const Index rows = std::min(moe::cpu::kTileEdge, shape.m - r0);
    moe::cpu::run_gemm(Gemm<float>{c3.view().row_block(r0, rows), a.const_view().row_block(r0, rows), Op::none,
                                   b.const_view(), Op::transpose},
                       1);
  }
  CHECK(c1.buffer == c3.buffer);

  Padded<float> empty_a(4, 0, 0, 0.f), empty_b(0, 3, 0, 0.f), c(4, 3, 0, 9.f);
  const float bias[3] = {1, 2, 3};
  moe::cpu::run_gemm(Gemm<float>{c.view(), empty_a.const_view(), Op::none, empty_b.const_view(), Op::none, false, bias}, 2);
  for (Index i = 0; i < 4; ++i)
    for (Index j = 0; j < 3; ++j) CHECK(c(i, j) == bias[j]);
}

namespace {

// Gemm::a_rows: op(A)'s row i is A.row(a_rows[i] / divisor), read where it lies. The product must
// be the copy's, bit for bit: gather the rows into a matrix, multiply that.
template <class S>
void check_gathered_rows(Shape shape, Op op_b, bool with_bias, Index divisor, int threads, std::uint64_t seed) {
  const S nan = std::numeric_limits<S>::quiet_NaN();
  const Index tokens = 1 + shape.m / 2;  // fewer rows than the product's: some repeat, some are skipped
  Padded<S> a(tokens, shape.depth, 3, nan), b(op_b == Op::none ? shape.depth : shape.n,
                                              op_b == Op::none ? shape.n : shape.depth, 5, nan);
  fill_random(a, seed, 1);
  fill_random(b, seed, 2);
  std::vector<S> bias(static_cast<std::size_t>(shape.n));
  for (Index j = 0; j < shape.n; ++j) bias[std::size_t(j)] = S(moe::random::normal(seed, 4, std::uint64_t(j)));
  std::vector<std::int32_t> rows(static_cast<std::size_t>(shape.m));
  Padded<S> copy(shape.m, shape.depth, 0, nan);
  for (Index i = 0; i < shape.m; ++i) {
    const Index token = Index(moe::random::bits(seed, 5, std::uint64_t(i)) % std::uint64_t(tokens));
    rows[std::size_t(i)] = std::int32_t(token * divisor + i % divisor);  // a slot of that token
    for (Index k = 0; k < shape.depth; ++k) copy(i, k) = a(token, k);
  }
  Padded<S> c(shape.m, shape.n, 2, S(-777)), c_copy(shape.m, shape.n, 2, S(-777));
  const S* bias_or_null = with_bias ? bias.data() : nullptr;
  Gemm<S> gathered{c.view(), a.const_view(), Op::none, b.const_view(), op_b, false, bias_or_null};
  gathered.a_rows = rows.data(), gathered.a_rows_divisor = std::int32_t(divisor);
  moe::cpu::run_gemm(gathered, threads);
  moe::cpu::run_gemm(Gemm<S>{c_copy.view(), copy.const_view(), Op::none, b.const_view(), op_b, false, bias_or_null},
                     threads);
  CHECK_MESSAGE(std::memcmp(c.buffer.data(), c_copy.buffer.data(), c.buffer.size() * sizeof(S)) == 0, "m=", shape.m,
                " n=", shape.n, " depth=", shape.depth, " op_b=", int(op_b), " divisor=", divisor,
                ": the gathered product differs from the copy's");
}

}  // namespace

TEST_CASE("gemm: gathered A rows (a_rows) give the gathered copy's product, bit for bit") {
  std::uint64_t seed = 1300;
  for (const Shape& shape : kShapes)
    for (Op op_b : {Op::none, Op::transpose})
      for (Index divisor : {1, 3}) {
        check_gathered_rows<float>(shape, op_b, divisor == 1, divisor, divisor == 1 ? 1 : 2, ++seed);
        check_gathered_rows<double>(shape, op_b, divisor != 1, divisor, 2, ++seed);
      }
  // Refused: a gathered transposed A.
  Padded<float> a(4, 5, 0, 0.f), b(5, 3, 0, 0.f), c(4, 3, 0, 0.f);
  const std::int32_t rows[4] = {0, 1, 2, 3};
  Gemm<float> g{c.view(), a.const_view(), Op::transpose, b.const_view(), Op::none};
  g.a_rows = rows;
  CHECK_THROWS_WITH_AS(moe::cpu::run_gemm(g, 1), doctest::Contains("gathered A rows need op_a none"), moe::Error);
}

TEST_CASE("gemm: mismatched shapes throw, naming the dimension") {
  Padded<float> a(4, 5, 0, 0.f), b(6, 3, 0, 0.f), c(4, 3, 0, 0.f);
  CHECK_THROWS_WITH_AS(moe::cpu::run_gemm(Gemm<float>{c.view(), a.const_view(), Op::none, b.const_view(), Op::none}, 1),
                       doctest::Contains("inner dimensions differ"), moe::Error);
  Padded<float> c_wrong(5, 3, 0, 0.f);
  CHECK_THROWS_WITH_AS(
      moe::cpu::run_gemm(Gemm<float>{c_wrong.view(), a.const_view(), Op::none, b.const_view(), Op::none}, 1),
      doctest::Contains("rows of C and op(A) differ"), moe::Error);
}

TEST_CASE("simd row loops: sum, dot, max, exp_and_sum and scale against long double, every length 1..70") {
  for (Index n = 1; n <= 70; ++n) {
    std::vector<float> a(static_cast<std::size_t>(n)), b(static_cast<std::size_t>(n));
    for (Index j = 0; j < n; ++j) {
      a[std::size_t(j)] = float(3 * moe::random::normal(7, 1, std::uint64_t(n * 100 + j)));
      b[std::size_t(j)] = float(moe::random::normal(7, 2, std::uint64_t(n * 100 + j)));
    }
    long double sum = 0, abs_sum = 0, dot = 0, abs_dot = 0, max = a[0];
    for (Index j = 0; j < n; ++j) {
      sum += a[std::size_t(j)];
      abs_sum += std::fabs((long double)a[std::size_t(j)]);
      dot += (long double)a[std::size_t(j)] * b[std::size_t(j)];
      abs_dot += std::fabs((long double)a[std::size_t(j)] * b[std::size_t(j)]);
      max = std::max<long double>(max, a[std::size_t(j)]);
    }
    const long double eps = std::numeric_limits<float>::epsilon(), bound = 2 * (n + 1) * eps;
    CHECK(std::fabs(moe::cpu::simd::sum(a.data(), n) - sum) <= bound * abs_sum);
    CHECK(std::fabs(moe::cpu::simd::dot(a.data(), b.data(), n) - dot) <= bound * abs_dot);
    CHECK(moe::cpu::simd::max(a.data(), n) == float(max));

    const float scale = 0.7f;
    std::vector<float> terms(static_cast<std::size_t>(n), -1.f);
    const float exp_sum = moe::cpu::simd::exp_and_sum(a.data(), n, float(max), scale, terms.data());
    long double exact_sum = 0;
    for (Index j = 0; j < n; ++j) {
      const long double exact = std::exp(((long double)a[std::size_t(j)] - max) * scale);
      exact_sum += exact;
      CHECK(std::fabs(terms[std::size_t(j)] - exact) <= 8 * eps * exact + 1e-37L);  // a vector exp, a few ulps
    }
    CHECK(std::fabs(exp_sum - exact_sum) <= (8 + 2 * n) * eps * exact_sum);

    std::vector<float> scaled(static_cast<std::size_t>(n));
    moe::cpu::simd::scale(a.data(), n, 0.25f, scaled.data());
    for (Index j = 0; j < n; ++j) CHECK(scaled[std::size_t(j)] == a[std::size_t(j)] * 0.25f);
  }
}

// Every lane of exact_sqrt equals std::sqrt bit for bit (a fast approximation, as Eigen's psqrt
// for float under EIGEN_FAST_MATH, is a bit or two off for most values).
template <class S>
void check_exact_sqrt() {
  using P = moe::cpu::simd::Packet<S>;
  constexpr Index L = moe::cpu::simd::kLanes<S>;
  const S specials[] = {S(0), -S(0), S(1), S(2), std::numeric_limits<S>::denorm_min(), std::numeric_limits<S>::min(),
                        std::numeric_limits<S>::max(), std::numeric_limits<S>::infinity(), -S(1),
                        std::numeric_limits<S>::quiet_NaN()};
  std::vector<S> values(specials, specials + std::size(specials));
  for (int i = 0; i < 4000; ++i)  // magnitudes from 1e-30 to 1e30
    values.push_back(S(std::exp(moe::random::normal(5, 0, std::uint64_t(i)) * 23)) *
                     S(1 + moe::random::normal(5, 1, std::uint64_t(i)) * 0.1));
  while (values.size() % std::size_t(L) != 0) values.push_back(S(3));
  std::size_t mismatches = 0;
  for (std::size_t j = 0; j < values.size(); j += std::size_t(L)) {
    alignas(64) S lanes[L];
    Eigen::internal::pstore(lanes, moe::cpu::simd::exact_sqrt(Eigen::internal::ploadu<P>(values.data() + j)));
    for (Index l = 0; l < L; ++l) {
      const S expected = std::sqrt(values[j + std::size_t(l)]);
      if (std::memcmp(&lanes[l], &expected, sizeof(S)) != 0 && !(std::isnan(lanes[l]) && std::isnan(expected)))
        ++mismatches;
    }
  }
  CHECK(mismatches == 0);
}

TEST_CASE("simd exact_sqrt: every lane is std::sqrt's correctly rounded root, special values too") {
  check_exact_sqrt<float>();
  check_exact_sqrt<double>();
}

TEST_CASE("simd row loops: the bits depend on the values, not on the row's address") {
  // The same 37 values at every misalignment of a buffer give the same sum, dot and exp sum.
  std::vector<float> buffer(64 + 37);
  float reference_sum = 0, reference_dot = 0, reference_exp = 0;
  for (Index offset = 0; offset < 16; ++offset) {
    for (Index j = 0; j < 37; ++j) buffer[std::size_t(offset + j)] = float(moe::random::normal(3, 0, std::uint64_t(j)));
    const float* row = buffer.data() + offset;
    const float s = moe::cpu::simd::sum(row, 37), d = moe::cpu::simd::dot(row, row, 37);
    const float e = moe::cpu::simd::exp_and_sum(row, 37, 0.f, 1.f);
    if (offset == 0) {
      reference_sum = s, reference_dot = d, reference_exp = e;
    } else {
      CHECK(s == reference_sum);
      CHECK(d == reference_dot);
      CHECK(e == reference_exp);
    }
  }
}
