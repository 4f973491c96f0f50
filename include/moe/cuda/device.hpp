// moe/cuda/device.hpp: what moe::cuda::BasicBackend asks of a device, and the pieces of it that
// are plain arithmetic on indices (the row-major -> column-major GEMM mapping, integer atomics).
//
// A device runs index bodies and a few library calls on one stream:
//   D::allocate(bytes) / D::deallocate(p)      device memory (static: matrices resize themselves)
//   D::memory_use() / D::reset_memory_peak()   the bytes those allocations hold now and at most
//                                              (moe/cuda/memory_ledger.hpp; the examples report it)
//   d.upload(dst, src, bytes)                  host -> device, ordered on the stream
//   d.download(dst, src, bytes)                device -> host; waits for the stream (a sync point)
//   d.start_download(pending, src, bytes)      device -> host into a D::PendingDownload, returning at
//   d.finish_download(pending, dst)            once; the finish waits for the stream up to the copy
//                                              (a sync point) and puts the bytes at dst
//   d.for_each(n, body)                        body(i) for every i in [0, n), in any order/parallel
//   d.for_each_2d(rows, cols, body)            body(r, c) over a grid (no index division per element)
//   d.for_each_row(rows, body)                 body(r, row) per row r, with `row` (a D::Row) to
//                                              work on the row's columns together (below)
//   d.for_each_warp(count, staging_bytes, body)
//                                              body(w, warp) for every w in [0, count): a warp of
//                                              kRowLanes lanes with staging memory of its own and
//                                              tensor-core tile products (D::Warp, below)
//   d.gemm(BlasGemm<S>)                        one column-major product (cuBLAS's convention), or a
//                                              batch of them by strides or by pointer arrays
//   d.gemm_group(span<const BlasGemm<S>>)      independent single products (no product writes what
//                                              another reads or writes): the device may run them
//                                              concurrently (CudaDevice: on side streams, joined
//                                              before the stream's next call), in any order
//   d.scratch(bytes)                           a reusable workspace: valid until the next scratch()
//                                              call on this device (or a copy of it); growing it
//                                              waits for the stream. Work queued on the stream uses
//                                              it in order, so a function may carve it freely.
//   d.stable_sort_pairs(keys_in, keys_out, values_in, values_out, n, bits)
//                                              pairs ordered by key, stably (CUB radix sort)
//   d.dgelu_weights() / d.set_dgelu_weights(w) which weights an expert bank's backward through the
//                                              GELU multiplies (DgeluWeights, below); a setting of the
//                                              device and its copies, as CudaDevice's fp32 math is
//   d.grouped_gemm(GroupedGemm<S>)             every expert's product in one call, offsets read on
//                                              the device, rows gathered as they load
//                                              (moe/cuda/grouped_gemm.hpp); only where
//                                              d.grouped_gemm_supports<S>()
//   d.expert_gemm() / d.set_expert_gemm(e)     how an inference forward runs the experts' products
//                                              (ExpertGemm, below); a setting as dgelu_weights
//   d.check_device_memory(p, bytes, where, name)
//                                              throws moe::Error naming `where: name` where the
//                                              kernels could not read [p, p + bytes) (both: the
//                                              extent against the library's live allocations;
//                                              CudaDevice: other memory by its kind): the
//                                              operands of the layer, the nn pieces and the optimizer
//                                              are checked so (moe/cuda/device_operands.hpp), a host
//                                              pointer named, not faulted on
//
// Two devices implement it: moe::cuda::CudaDevice (moe/cuda/cuda_device.cuh: kernels, CUB,
// cuBLAS) and moe::cuda::EmulatedDevice (moe/cuda/emulated_device.hpp: host memory and plain
// loops). The backend is written once against this interface, so the emulated device runs every
// index body, every launch size and every GEMM mapping of the GPU path on a machine without a GPU.
#pragma once

#include <algorithm>
#include <bit>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "moe/config.hpp"
#include "moe/cuda/pack.hpp"
#include "moe/host_device.hpp"
#include "moe/tensor.hpp"

namespace moe::cuda {

enum class BlasOp { none, transpose };

// What a product passes through before it is stored (cuBLASLt's epilogues, fused into the GEMM on
// the GPU). With acc = op(A) op(B) in the compute type and bias[i] for row i of the column-major C
// (that is, for column i of a row-major output: one bias per output feature):
//   none       C = acc (+ C when accumulate)
//   bias       C = acc + bias
//   bias_gelu  aux = acc + bias (the pre-activation, kept for backward), C = gelu(aux) (tanh GELU,
//              moe/activations.hpp), both rounded once from the compute type; with aux null
//              (inference: nothing kept) only C
//   dgelu      C = acc * gelu'(aux): backward through the GELU, aux (read) the forward's pre-activation
enum class Epilogue { none, bias, bias_gelu, dgelu };

// Which weights an expert bank's backward through the GELU multiplies (BasicBackend::
// grouped_linear_backward_through_gelu: din = (dout W_e) * gelu'(pre), one product per expert
// with the dgelu epilogue):
//   stored      W_e as stored, [O, I] (nn.Linear's layout): cuBLAS's NN layout
//   transposed  W_e's transposes, [I, O], copied first in one packed pass over W: the TN layout (and
//               a copy of W in the backend's memory: 37.7 MB a layer for GPT-2-small's bf16 experts)
// The same products and values (on the emulated device the same bits). stored is the default: on
// an H100 (2026-12-05) the two layouts' DGELU products ran alike (bench_moe_cuda's expert_gemm
// rows: 347-395 against 351-379 TFLOP/s) and the copy made transposed's GPT-2-small training step
// 9% slower (bench_gpt2_cuda's Train/self_dgelu_transposed).
enum class DgeluWeights { stored, transposed };

// How the backend runs an expert bank's products in an inference forward (MoELayer's
// ForwardOptions::for_backward = false; BasicBackend::routed_products):
//   per_expert  the expert-sorted copy of the input rows (gather_rows), the offsets' copy to the
//               host (the forward's one sync), then a product per expert with rows (gemm_group)
//   grouped     d.grouped_gemm straight from the routing plan: one launch per product, the first
//               product's rows gathered from the tokens as it loads them, no copy and no sync,
//               and, where no slot can be dropped, the combine in the second's epilogue
//               (bf16 only, at shapes its tiles take; elsewhere per_expert runs)
// The same values within the products' rounding (on the emulated device the same bits).
// per_expert is the default until grouped is measured faster on a GPU (bench_moe_cuda's
// expert_product and moe_fwd_grouped rows).
enum class ExpertGemm { per_expert, grouped };

// C[m, n] (=|+=) op(A)[m, k] op(B)[k, n], every matrix column-major with a leading dimension.
template <class S>
struct BlasGemm {
  BlasOp op_a = BlasOp::none, op_b = BlasOp::none;
  Index m = 0, n = 0, k = 0;
  const S* a = nullptr;
  Index lda = 0;
  const S* b = nullptr;
  Index ldb = 0;
  S* c = nullptr;
  Index ldc = 0;
  bool accumulate = false;  // beta = 1
  // A strided batch: product i reads a + i*stride_a, b + i*stride_b and writes c + i*stride_c
  // (cublasGemmStridedBatchedEx). The outputs must not share elements.
  Index batch = 1;
  Index stride_a = 0, stride_b = 0, stride_c = 0;
  // An epilogue (one product, no accumulate): bias [m]; bias_gelu also writes aux [m, n] (ldaux)
  // unless aux is null, dgelu reads it.
  Epilogue epilogue = Epilogue::none;
  const S* bias = nullptr;
  S* aux = nullptr;
  Index ldaux = 0;
  // A batch given by pointers (cublasGemmBatchedEx), for operands no single stride reaches:
  // product i reads a_array[i] and b_array[i] and writes c_array[i]. The arrays hold `batch`
  // pointers each and lie in device memory (written there by a launch); a, b, c and the strides
  // stay unset. The outputs must not share elements.
  const S* const* a_array = nullptr;
  const S* const* b_array = nullptr;
  S* const* c_array = nullptr;
  // Bytes that every pointer in the arrays is a multiple of (a power of two; 1 when nothing is
  // known). cublasGemmBatchedEx cannot see the pointers from the host and picks kernels that
  // assume 16-byte aligned operands; below kBatchedAlignment the GPU device runs the products
  // one by one instead (moe/cuda/cuda_device.cuh).
  std::uint32_t array_alignment = 1;
  // The sizes change from call to call (an expert's block of rows): a device may choose its
  // algorithm once per size bucket instead of once per exact shape (CudaDevice: cuBLASLt with
  // plans per power-of-two bucket). Same results either way; a hint about cost only.
  bool shape_varies = false;
  MOE_HOST_DEVICE bool pointer_batch() const { return a_array || b_array || c_array; }
  // Product q's operands, whichever way the batch is given (A and B null when k = 0 by pointers). The arrays lie in
  // the device's memory, so only its code reads them (the emulated device's is the host's).
  MOE_HOST_DEVICE const S* a_of(Index q) const {
    return pointer_batch() ? (k > 0 ? a_array[q] : nullptr) : a + q * stride_a;
  }
  MOE_HOST_DEVICE const S* b_of(Index q) const {
    return pointer_batch() ? (k > 0 ? b_array[q] : nullptr) : b + q * stride_b;
  }
  MOE_HOST_DEVICE S* c_of(Index q) const { return pointer_batch() ? c_array[q] : c + q * stride_c; }
};

// cuBLAS's rules for one GemmEx / GemmStridedBatchedEx call (sizes >= 0 and within 32 bits,
// lda >= rows of A as stored, ldb likewise, ldc >= m, a batch of >= 1 with strides >= 0, operands
// present where read), checked by both devices before the call, so a bad mapping is named here
// rather than reported by cuBLAS as CUBLAS_STATUS_INVALID_VALUE.
template <class S>
void check_blas_gemm(const BlasGemm<S>& g) {
  constexpr Index kMax = (Index{1} << 31) - 1;
  check(g.m >= 0 && g.n >= 0 && g.k >= 0, "gemm: a negative size (m = ", g.m, ", n = ", g.n, ", k = ", g.k, ")");
  check(g.m <= kMax && g.n <= kMax && g.k <= kMax && g.lda <= kMax && g.ldb <= kMax && g.ldc <= kMax &&
            g.batch <= kMax,
        "gemm: a size, leading dimension or batch count exceeds cuBLAS's 32-bit ints");
  const Index a_rows = g.op_a == BlasOp::none ? g.m : g.k;
  const Index b_rows = g.op_b == BlasOp::none ? g.k : g.n;
  check(g.lda >= (a_rows > 1 ? a_rows : 1), "gemm: lda = ", g.lda, " is below A's ", a_rows, " stored rows");
  check(g.ldb >= (b_rows > 1 ? b_rows : 1), "gemm: ldb = ", g.ldb, " is below B's ", b_rows, " stored rows");
  check(g.ldc >= (g.m > 1 ? g.m : 1), "gemm: ldc = ", g.ldc, " is below C's ", g.m, " rows");
  check(g.batch >= 1 && g.stride_a >= 0 && g.stride_b >= 0 && g.stride_c >= 0, "gemm: a batch of ", g.batch,
        " with strides (", g.stride_a, ", ", g.stride_b, ", ", g.stride_c, ")");
  const bool writes = g.m > 0 && g.n > 0;
  if (g.pointer_batch()) {
    check(!g.a && !g.b && !g.c && g.stride_a == 0 && g.stride_b == 0 && g.stride_c == 0,
          "gemm: a batch by pointer arrays takes no a, b, c or strides");
    check(!writes || (g.c_array && (g.k == 0 || (g.a_array && g.b_array))), "gemm: a null pointer array in a batch of ",
          g.batch, " ", g.m, " x ", g.n, " x ", g.k, " products");
    check(g.epilogue == Epilogue::none, "gemm: a batch by pointer arrays takes no epilogue");
    return;
  }
  check(!writes || (g.c && (g.k == 0 || (g.a && g.b))), "gemm: a null operand in a ", g.m, " x ", g.n, " x ", g.k,
        " product");
  if (g.epilogue == Epilogue::none) return;
  check(g.batch == 1 && !g.accumulate, "gemm: an epilogue needs one product that overwrites C (batch ", g.batch,
        g.accumulate ? ", accumulate)" : ")");
  if (g.epilogue != Epilogue::dgelu) check(!writes || g.bias, "gemm: the epilogue's bias [", g.m, "] is null");
  if (g.epilogue == Epilogue::dgelu) check(!writes || g.aux, "gemm: the GELU derivative's aux [", g.m, ", ", g.n, "] is null");
  if (g.aux)
    check(g.ldaux >= (g.m > 1 ? g.m : 1) && g.ldaux <= kMax, "gemm: the GELU epilogue's aux has leading dimension ",
          g.ldaux, ", below its ", g.m, " rows");
}

// A member of a gemm_group: one product, not a batch (a batch is already one call to spread).
template <class S>
void check_group_member(const BlasGemm<S>& g) {
  check_blas_gemm(g);
  check(g.batch == 1 && !g.pointer_batch(), "gemm_group: its products are single ones, got a batch of ", g.batch,
        g.pointer_batch() ? " by pointer arrays" : "");
}

// Row-major out[M, N] (=|+=) op_a(a)[M, K] op_b(b)[K, N] as the column-major call
// out^T = op_b(b)^T op_a(a)^T: a row-major matrix read column-major is its transpose, so the
// operands swap and each keeps its own op.
template <class S>
BlasGemm<S> column_major_gemm(MatrixView<S> out, ConstMatrixView<S> a, BlasOp op_a, ConstMatrixView<S> b,
                              BlasOp op_b, bool accumulate) {
  const Index depth = op_a == BlasOp::none ? a.cols : a.rows;
  const Index b_depth = op_b == BlasOp::none ? b.rows : b.cols;
  const Index a_rows = op_a == BlasOp::none ? a.rows : a.cols;
  const Index b_cols = op_b == BlasOp::none ? b.cols : b.rows;
  check(depth == b_depth && a_rows == out.rows && b_cols == out.cols, "gemm: op(A) is [", a_rows, ", ", depth,
        "], op(B) is [", b_depth, ", ", b_cols, "], the output is [", out.rows, ", ", out.cols, "]");
  BlasGemm<S> g;
  g.op_a = op_b, g.op_b = op_a;
  g.m = out.cols, g.n = out.rows, g.k = depth;
  g.a = b.data, g.lda = b.stride;
  g.b = a.data, g.ldb = a.stride;
  g.c = out.data, g.ldc = out.stride;
  g.accumulate = accumulate;
  return g;
}

// Row-major out[M, N] = epilogue(a[M, K] op_b(b)): column_major_gemm with a bias per output
// column (bias [N]; null for dgelu) and, for the GELU epilogues, the pre-activation aux [M, N]
// (row-major, as out): written by bias_gelu (unless aux is empty: inference), read by dgelu.
template <class S>
BlasGemm<S> column_major_gemm_epilogue(MatrixView<S> out, ConstMatrixView<S> a, ConstMatrixView<S> b, BlasOp op_b,
                                       Epilogue epilogue, const S* bias, MatrixView<S> aux = {}) {
  BlasGemm<S> g = column_major_gemm(out, a, BlasOp::none, b, op_b, false);
  const bool uses_aux = (epilogue == Epilogue::bias_gelu && aux.data) || epilogue == Epilogue::dgelu;
  if (uses_aux)
    check(aux.rows == out.rows && aux.cols == out.cols, "gemm: the GELU epilogue's aux is [", aux.rows, ", ",
          aux.cols, "], the output is [", out.rows, ", ", out.cols, "]");
  g.epilogue = epilogue, g.bias = bias;
  if (uses_aux) g.aux = aux.data, g.ldaux = aux.stride;
  return g;
}

// `count` row-major products out_i (=|+=) op_a(a_i) op_b(b_i), where x_i starts at x.data +
// i * stride_x (elements): column_major_gemm's mapping with the strides swapped as the operands are.
template <class S>
BlasGemm<S> column_major_gemm_batched(MatrixView<S> out, ConstMatrixView<S> a, BlasOp op_a, ConstMatrixView<S> b,
                                      BlasOp op_b, bool accumulate, Index count, Index stride_out, Index stride_a,
                                      Index stride_b) {
  check(count >= 1, "gemm: a batch of ", count, " products");
  BlasGemm<S> g = column_major_gemm(out, a, op_a, b, op_b, accumulate);
  g.batch = count;
  g.stride_a = stride_b, g.stride_b = stride_a, g.stride_c = stride_out;
  return g;
}

// The alignment a batch by pointer arrays needs for cublasGemmBatchedEx's kernels (16-byte loads).
inline constexpr std::uint32_t kBatchedAlignment = 16;

// The largest power of two, up to 256, that divides `value` (256 for 0).
constexpr std::uint32_t alignment_of(std::uintptr_t value) {
  std::uint32_t bytes = 256;
  while (bytes > 1 && value % bytes != 0) bytes /= 2;
  return bytes;
}
inline std::uint32_t alignment_of(const void* p) { return alignment_of(reinterpret_cast<std::uintptr_t>(p)); }

// The alignment of every pointer made from one of `bases` plus whole multiples of the element
// counts in `steps` (leading dimensions, block offsets, ...) of S elements each.
template <class S>
std::uint32_t common_alignment(std::initializer_list<const void*> bases, std::initializer_list<Index> steps) {
  std::uint32_t bytes = 256;
  for (const void* p : bases) bytes = std::min(bytes, alignment_of(p));
  for (const Index n : steps) bytes = std::min(bytes, alignment_of(std::uintptr_t(n) * sizeof(S)));
  return bytes;
}

// column_major_gemm over a batch given by pointer arrays (device memory, `count` each): the views
// give the shapes and leading dimensions (their data pointers are ignored), product i is
// out_i (=|+=) op_a(a_i) op_b(b_i) with x_i = x_pointers[i]. The arrays swap as the operands do.
// `alignment`: bytes every pointer in the arrays is a multiple of (common_alignment); the
// emulated device checks that it holds.
template <class S>
BlasGemm<S> column_major_gemm_pointers(MatrixView<S> out, ConstMatrixView<S> a, BlasOp op_a, ConstMatrixView<S> b,
                                       BlasOp op_b, bool accumulate, Index count, S* const* out_pointers,
                                       const S* const* a_pointers, const S* const* b_pointers,
                                       std::uint32_t alignment) {
  check(count >= 1, "gemm: a batch of ", count, " products");
  check(alignment >= 1 && std::has_single_bit(alignment), "gemm: a pointer alignment of ", alignment, " bytes");
  BlasGemm<S> g = column_major_gemm(out, a, op_a, b, op_b, accumulate);
  g.a = g.b = nullptr, g.c = nullptr;
  g.batch = count;
  g.a_array = b_pointers, g.b_array = a_pointers, g.c_array = out_pointers;
  g.array_alignment = alignment;
  return g;
}

// A layout of typed arrays inside one scratch allocation (device.scratch(layout.bytes())), each
// aligned to 256 bytes as cudaMalloc aligns:
//   ScratchLayout layout;  const auto ids = layout.add<std::int32_t>(n), sums = layout.add<double>(m);
//   void* base = device.scratch(layout.bytes());  std::int32_t* id = ids.in(base);
class ScratchLayout {
 public:
  template <class T>
  struct Slot {
    std::size_t offset;
    T* in(void* base) const { return reinterpret_cast<T*>(static_cast<unsigned char*>(base) + offset); }
  };
  template <class T>
  Slot<T> add(Index count) {
    check(count >= 0, "scratch: an array of ", count, " elements");
    const std::size_t offset = (bytes_ + kAlignment - 1) / kAlignment * kAlignment;
    bytes_ = offset + std::size_t(count) * sizeof(T);
    return {offset};
  }
  std::size_t bytes() const { return bytes_; }

 private:
  static constexpr std::size_t kAlignment = 256;
  std::size_t bytes_ = 0;
};

// The reductions of D::for_each_row: a row's columns are dealt to kRowLanes lanes (lane l takes
// c = l, l + 32, ...), each lane folds its own in order, and the 32 partials meet in a butterfly
// (lane l takes l ^ 16, then l ^ 8, ... l ^ 1), which leaves every lane with the same value. The
// GPU runs the lanes as a warp (shuffles); the emulated device runs the same order in a loop, so
// both give the same reductions. A row body must do its writes through row.for_each (one column
// each) or under row.first() (once per row): on the GPU all 32 lanes run the body.
//   row.sum(n, f)      sum over c in [0, n) of f(c)
//   row.max(n, f)      max over c in [0, n) of f(c) (-inf for n = 0; a NaN is kept or skipped as `>` decides)
//   row.reduce(n, identity, fold, combine)
//                      each lane folds acc = fold(acc, c) over its columns from `identity`, then the
//                      butterfly meets the partials with combine(mine, other's); combine must give
//                      the same bits either way round, so that every lane ends with the same value
//   row.for_each(n, f) f(c) for every c in [0, n)
//   row.exclusive_scan<Acc>(n, load, store)
//                      store(c, load(0) + ... + load(c - 1)) for every c in [0, n), and returns the
//                      total in every lane: an in-place scan of a column (store may overwrite what load
//                      reads at c, and nothing else). Integers only, whose sums have no order. Lane l
//                      takes the run row_run(n, l): its sum, the warp's scan of the 32 sums, its run
//                      again (one wait for memory a pass, where a thread alone waits once per batch).
//   row.first()        true in exactly one lane
inline constexpr int kRowLanes = 32;

// The columns [begin, end) of lane `lane` in a row's exclusive_scan: 32 runs of ceil(n / 32).
struct RowRun {
  Index begin = 0, end = 0;
};
MOE_HOST_DEVICE inline RowRun row_run(Index n, int lane) {
  const Index per = (n + kRowLanes - 1) / kRowLanes, begin = per * lane, end = begin + per;
  return {begin < n ? begin : n, end < n ? end : n};
}

// The butterfly on an array of lane partials (the emulated device's copy of the warp's shuffles).
template <class T, class Combine>
T butterfly(T (&lanes)[kRowLanes], Combine combine) {
  for (int offset = kRowLanes / 2; offset > 0; offset /= 2) {
    T next[kRowLanes];
    for (int l = 0; l < kRowLanes; ++l) next[l] = combine(lanes[l], lanes[l ^ offset]);
    for (int l = 0; l < kRowLanes; ++l) lanes[l] = next[l];
  }
  return lanes[0];
}

// The tile work of D::for_each_warp, for kernels that keep their operands on chip (fused attention,
// moe/cuda/nn/fused_attention.hpp). Each w gets one warp; the warp's body works as a row body does: all
// lanes run it, so what it computes outside lanes() must be the same in every lane, and it writes
// only through lanes() and store_acc. Its calls:
//   warp.staging()                 `staging_bytes` of the warp's own memory (shared memory on the GPU),
//                                  kTileAlignment-aligned, contents undefined on entry (at most
//                                  kWarpStagingMax bytes)
//   warp.lanes(n, f)               f(i) for every i in [0, n), dealt over the lanes; when it returns,
//                                  every lane is done and sees the others' writes
//   warp.sync()                    every lane's reads and writes of the staging so far are done before any lane
//                                  goes on (a tile loaded into registers, then written over)
//   warp.copy_rows(dst, ld, rows, valid, cols, row_of)
//                                  starts copies into the staging: row r < valid of the [rows, cols] tile at dst
//                                  (leading dimension ld, elements of E) gets the cols elements at row_of(r),
//                                  rows valid..rows-1 get zeros; every row 16-byte aligned on both sides and
//                                  cols * sizeof(E) a multiple of 16 (GPU: asynchronous 16-byte copies, cp.async,
//                                  so a warp's loads are in flight together)
//   warp.commit_copies()           closes a batch: the copies started since the last commit
//   warp.wait_copies(pending)      waits until at most `pending` (0 or 1) of the latest committed batches are in
//                                  flight; the finished ones are then seen by every lane. What a batch writes must
//                                  not be read or written before the wait that finishes it, and a body must not
//                                  return with copies in flight (the emulated device defers every copy to its
//                                  wait, so a read before it sees the staging's poison)
//   warp.fill(acc, v)              every element of a Warp::Acc (16 x 16 float) = v
//   warp.load_acc(acc, p, ld) / warp.store_acc(p, ld, acc)
//                                  a row-major float tile: element (r, c) at p[r * ld + c]
//   warp.load_a(a, p, ld)          Warp::ARows, bf16: A(r, k) = p[r * ld + k]
//   warp.load_b(b, p, ld)          Warp::BRows, bf16: B(k, c) = p[k * ld + c]
//   warp.load_bt(b, p, ld)         Warp::BCols, bf16: B(k, c) = p[c * ld + k] (B given by the rows of its transpose)
//                                  the three bf16 loads read the warp's staging only (ldmatrix on the GPU): the
//                                  emulated device refuses a tile outside it
//   warp.mma(acc, a, b)            acc += A B over the 16 k, products and sums in float
// An accumulator also works in registers, element by element, so a softmax over its rows needs no
// trip through the staging (the fused attention's scores). Warp::Rows holds a float per row of a
// tile (row r's value in the lanes that hold row r's elements):
//   warp.map(acc, f)               acc(r, c) = f(r, c, acc(r, c)) for every element
//   warp.map_rows(acc, rows, f)    acc(r, c) = f(r, c, acc(r, c), rows[r])
//   warp.zip(acc, other, f)        acc(r, c) = f(r, c, acc(r, c), other(r, c))
//   warp.fold_rows(rows, acc, op)  rows[r] = op(rows[r], op over row r of acc): op associative and
//                                  commutative on the bits (a sum, fmax), so every lane agrees
//   warp.for_rows(f, rows...)      f(r, rows[r]...) for every r, each Rows by reference: arithmetic
//                                  on whole rows (every lane that holds row r runs it)
//   warp.each_row(f, rows...)      f(r, rows[r]...) exactly once per r (a store per row); when it
//                                  returns, every lane sees its writes
//   warp.to_a(a, acc)              a = the accumulator rounded to bf16, as an A operand (P in P V)
// f and op must not write anything but their result (each_row's f excepted). The order of a fold's
// terms is the device's own: the same bits run to run on each device.
// Every tile pointer must be kTileAlignment-aligned and every ld a multiple of 16 bytes (the
// tensor cores' loads): the emulated device checks both. The GPU adds a tile product's terms in
// the hardware's order, the emulated device in k order: the same bits run to run on each, results
// within float rounding of each other.
inline constexpr int kTileSize = 16;
inline constexpr std::size_t kTileAlignment = 32;
inline constexpr std::size_t kWarpStagingMax = 48 * 1024;
inline void check_warp_staging(std::size_t bytes) {
  check(bytes <= kWarpStagingMax, "for_each_warp: ", bytes, " bytes of staging a warp, over the ", kWarpStagingMax,
        " a GPU gives");
}

// use(load(i)) for i = begin, ..., end - 1 in that order, the loads issued Batch at a time before their uses: one
// thread walking a long column (a chunk of rows, a column's partials) keeps Batch loads in flight instead of waiting
// on each in turn. The uses run in the plain loop's order, so sums keep its bits.
template <Index Batch, class Load, class Use>
MOE_HOST_DEVICE void fetch_in_batches(Index begin, Index end, Load load, Use use) {
  using Item = decltype(load(begin));
  Index i = begin;
  for (; i + Batch <= end; i += Batch) {
    Item items[Batch];
    MOE_UNROLL
    for (Index j = 0; j < Batch; ++j) items[j] = load(i + j);
    MOE_UNROLL
    for (Index j = 0; j < Batch; ++j) use(items[j]);
  }
  for (; i < end; ++i) use(load(i));
}

// f(0) + f(1) + ... + f(n - 1) in T, added in that order (the plain loop's bits), fetched 32 at a time. Its
// callers are the last steps of column sums, a thread per column over its partials with few threads in all:
// their time is the round trips to memory (on an H100, LayerNorm's 2 x 128 partials a column took 29 µs a launch
// fetched eight at a time, 32 waits).
template <class T, class F>
MOE_HOST_DEVICE T sum_in_order(Index n, F f) {
  T total = 0;
  fetch_in_batches<32>(0, n, f, [&](T term) { total += term; });
  return total;
}

// sum[e] += C(at(j)[e]) for e < W and j = begin, ..., end - 1, added in j order, a pack of W elements a row (W =
// kPackSize<S>: one 16-byte load; 1: one element), eight rows in flight: a walk down a column of packs (a bias
// gradient's chunk of rows, an embedding row's run of tokens) with the plain loop's bits.
template <Index W, class C, class RowAt>
MOE_HOST_DEVICE void add_rows_in_order(C (&sum)[W], Index begin, Index end, RowAt at) {
  fetch_in_batches<8>(begin, end, [&](Index j) { return load_pack_of<W>(at(j)); }, [&](const auto& row) {
    MOE_UNROLL
    for (Index e = 0; e < W; ++e) sum[e] += C(row.v[e]);
  });
}

// *target += value with an atomic on the GPU. Only integers: integer sums do not depend on the
// order of the additions, so counts stay deterministic.
template <class I>
  requires std::integral<I>
MOE_HOST_DEVICE inline void atomic_add(I* target, I value) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(I) == 8)
    atomicAdd(reinterpret_cast<unsigned long long*>(target), static_cast<unsigned long long>(value));
  else
    atomicAdd(reinterpret_cast<unsigned int*>(target), static_cast<unsigned int>(value));
#else
  *target += value;
#endif
}

namespace detail {

// body(r, c) for every element of a [rows, cols] grid (the device's 2-D launch).
template <class D, class Body>
void for_each_2d(const D& device, Index rows, Index cols, Body body) {
  if (rows > 0 && cols > 0) device.for_each_2d(rows, cols, body);
}

}  // namespace detail

// Bits needed to sort keys in [0, count).
inline int key_bits(Index count) {
  int bits = 0;
  while ((Index{1} << bits) < count) ++bits;
  return bits == 0 ? 1 : bits;
}

}  // namespace moe::cuda
