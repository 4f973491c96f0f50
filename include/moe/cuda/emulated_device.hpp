// moe/cuda/emulated_device.hpp: the CUDA backend's device on the host. Memory is host memory,
// for_each is a loop, the GEMM is the column-major definition (a fused multiply-add per term in k
// order, its epilogues applied to the unrounded sum, as cuBLASLt applies them) and the sort is
// std::stable_sort.
// It exists to test: every index body, launch size and GEMM mapping of moe::cuda::BasicBackend
// runs here with the host compiler (and under AddressSanitizer), on machines without a GPU.
//
// It is built to fail where a GPU would, not to be lenient where a GPU is:
//   * memory is poisoned: allocations and every scratch() area start as 0xFF bytes (NaN floats,
//     -1 integers), as cudaMalloc's memory holds whatever was there, so a read before a write,
//     or of a previous scratch() call's data, shows up as NaN or a wrong count;
//   * launches run in a chosen order (LaunchOrder): a body that reads what another index of the
//     same launch writes (a race on the GPU) gives different bits under another order; so do the
//     lanes of a warp's lanes() and of a row's for_each (LaneTurns), lane by lane;
//   * GEMMs check cuBLAS's argument rules (check_blas_gemm), and GEMMs, sorts and copies check
//     that every device pointer lies inside one live device allocation (a host pointer, or an
//     extent past the end, is named instead of read).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "moe/bfloat16.hpp"
#include "moe/config.hpp"
#include "moe/cuda/device.hpp"
#include "moe/cuda/grouped_gemm.hpp"
#include "moe/cuda/memory_ledger.hpp"
#include "moe/cuda/reference_gemm.hpp"
#include "moe/random.hpp"
#include "moe/tensor.hpp"

namespace moe::cuda {

// The order in which a launch's indices run. A GPU promises none; race-free bodies give the same
// bits under every order, which is what the tests check by changing it between runs. Within a
// warp (warp.lanes, a row's for_each) it orders the lanes' turns instead (LaneTurns).
enum class LaunchOrder {
  ascending,   // 0, 1, ..., n - 1 (a plain loop)
  descending,  // n - 1, ..., 0
  shuffled,    // a fresh pseudo-random permutation per launch (rows and columns apart in 2-D)
};

// values[0, n) in a pseudo-random order, by Fisher-Yates on counter-based draws (seed, draw): the
// same permutation for the same draw. The launches' shuffles and the lanes' share it.
template <class T>
void shuffle_by_draws(T* values, Index n, std::uint64_t seed, std::uint64_t draw) {
  for (Index i = n - 1; i > 0; --i)
    std::swap(values[i], values[moe::random::bits(seed, draw, std::uint64_t(i)) % std::uint64_t(i + 1)]);
}

// How the lanes of one warp take f(i) for i in [0, n): lane l runs l, l + 32, ... in that order,
// as on a GPU, where the lanes themselves keep no order among each other. Ascending runs the
// indices in order (the lanes in lockstep); descending runs lane 31's indices, then lane 30's, ...;
// shuffled, lane by lane in a fresh permutation per call. A lane that reads what another lane writes
// in the same call (a race without a sync between) then gets different bits under another order.
struct LaneTurns {
  LaunchOrder kind = LaunchOrder::ascending;
  std::uint64_t* draws = nullptr;  // shuffled: the device's counter the permutations draw from

  template <class F>
  void run(Index n, F f) const {
    if (kind == LaunchOrder::ascending || n <= 1) {
      for (Index i = 0; i < n; ++i) f(i);
      return;
    }
    int lanes[kRowLanes];
    for (int l = 0; l < kRowLanes; ++l) lanes[l] = kind == LaunchOrder::descending ? kRowLanes - 1 - l : l;
    if (kind == LaunchOrder::shuffled) shuffle_by_draws(lanes, kRowLanes, kLaneSeed, draws ? (*draws)++ : 0);
    for (const int lane : lanes)
      for (Index i = lane; i < n; i += kRowLanes) f(i);
  }
  static constexpr std::uint64_t kLaneSeed = 0x1a7e5;
};

// A row of EmulatedDevice::for_each_row: the warp's lanes and butterfly in loops (device.hpp).
struct EmulatedRow {
  template <class F>
  auto sum(Index n, F f) const {
    using T = decltype(f(Index{}));
    T lanes[kRowLanes] = {};
    for (int l = 0; l < kRowLanes; ++l)
      for (Index c = l; c < n; c += kRowLanes) lanes[l] += f(c);
    return butterfly(lanes, [](T a, T b) { return a + b; });
  }
  template <class F>
  auto max(Index n, F f) const {
    using T = decltype(f(Index{}));
    T lanes[kRowLanes];
    for (int l = 0; l < kRowLanes; ++l) {
      lanes[l] = -T(INFINITY);
      for (Index c = l; c < n; c += kRowLanes) {
        const T v = f(c);
        lanes[l] = v > lanes[l] ? v : lanes[l];
      }
    }
    return butterfly(lanes, [](T a, T b) { return b > a ? b : a; });
  }
  template <class T, class Fold, class Combine>
  T reduce(Index n, T identity, Fold fold, Combine combine) const {
    T lanes[kRowLanes];
    for (int l = 0; l < kRowLanes; ++l) {
      lanes[l] = identity;
      for (Index c = l; c < n; c += kRowLanes) lanes[l] = fold(lanes[l], c);
    }
    return butterfly(lanes, combine);
  }
  template <class F>
  void for_each(Index n, F f) const {
    turns.run(n, f);
  }
  // The warp's steps in loops: each lane's run summed, the sums scanned, then the lanes take their
  // turns over their runs (a store that reached into another lane's run shows under another order).
  template <class Acc, class Load, class Store>
    requires std::integral<Acc>
  Acc exclusive_scan(Index n, Load load, Store store) const {
    Acc before_lane[kRowLanes], total = 0;
    for (int l = 0; l < kRowLanes; ++l) {
      before_lane[l] = total;
      const RowRun run = row_run(n, l);
      for (Index c = run.begin; c < run.end; ++c) total += Acc(load(c));
    }
    turns.run(kRowLanes, [&](Index l) {
      const RowRun run = row_run(n, int(l));
      Acc before = before_lane[l];
      for (Index c = run.begin; c < run.end; ++c) {
        const Acc v = Acc(load(c));
        store(c, before);
        before += v;
      }
    });
    return total;
  }
  bool first() const { return true; }  // the body runs once per row here
  LaneTurns turns;  // the order of the lanes' turns in for_each (the device's launch order)
};

// A warp of EmulatedDevice::for_each_warp (device.hpp): the lanes in a loop, a tile as 16 x 16 floats (bf16 operands
// are exact in float), a tile product as the definition in k order. Each load and store checks the alignment and the
// leading dimension the GPU's tensor-core loads require.
class EmulatedWarp {
 public:
  static constexpr int kElements = kTileSize * kTileSize;
  struct Acc {
    float v[kElements];
  };
  struct ARows {  // A(r, k) at v[r * 16 + k]
    float v[kElements];
  };
  struct BRows {  // B(k, c) at v[k * 16 + c]
    float v[kElements];
  };
  struct BCols {  // the same, loaded from B's transpose
    float v[kElements];
  };
  struct Rows {  // row r's value at v[r]
    float v[kTileSize];
  };

  // A batch of copy_rows: 16-byte copies (from null: zeros), run at the wait that finishes the batch.
  struct Copy {
    unsigned char* to;
    const unsigned char* from;
  };
  using Batches = std::deque<std::vector<Copy>>;

  struct InFlight {
    std::vector<Copy> open;  // started, not committed
    Batches committed;
    bool empty() const { return open.empty() && committed.empty(); }
  };

  EmulatedWarp(unsigned char* staging, std::size_t staging_bytes, InFlight* in_flight, LaneTurns turns = {})
      : staging_(staging), staging_bytes_(staging_bytes), in_flight_(in_flight), turns_(turns) {}
  unsigned char* staging() const { return staging_; }
  void sync() const {}  // one sequence of steps: every read is done before the next write
  template <class F>
  void lanes(Index n, F f) const {
    turns_.run(n, f);
  }
  template <class E, class RowOf>
  void copy_rows(E* dst, Index ld, Index rows, Index valid, Index cols, RowOf row_of) const {
    check((std::size_t(cols) * sizeof(E)) % 16 == 0 && (std::size_t(ld) * sizeof(E)) % 16 == 0 && ld >= cols,
          "for_each_warp: copy_rows of ", cols, " elements of ", sizeof(E), " bytes into rows ", ld,
          " apart (each a multiple of 16 bytes)");
    std::vector<Copy>& batch = in_flight_->open;
    for (Index r = 0; r < rows; ++r) {
      unsigned char* to = reinterpret_cast<unsigned char*>(dst + r * ld);
      const unsigned char* from = r < valid ? reinterpret_cast<const unsigned char*>(row_of(r)) : nullptr;
      check(alignment_of(to) >= 16 && (!from || alignment_of(from) >= 16), "for_each_warp: copy_rows's row ", r,
            " is not 16-byte aligned on both sides");
      for (std::size_t b = 0; b < std::size_t(cols) * sizeof(E); b += 16) batch.push_back({to + b, from ? from + b : nullptr});
    }
  }
  void commit_copies() const {
    in_flight_->committed.push_back(std::move(in_flight_->open));
    in_flight_->open.clear();
  }
  void wait_copies(int pending) const {
    check(pending == 0 || pending == 1, "for_each_warp: wait_copies(", pending, "): 0 or 1 batches may stay in flight");
    Batches& committed = in_flight_->committed;
    while (committed.size() > std::size_t(pending)) {
      for (const Copy& c : committed.front())
        if (c.from)
          std::memcpy(c.to, c.from, 16);
        else
          std::memset(c.to, 0, 16);
      committed.pop_front();
    }
  }
  void fill(Acc& acc, float value) const { std::fill(std::begin(acc.v), std::end(acc.v), value); }
  void load_acc(Acc& acc, const float* p, Index ld) const {
    check_tile(p, ld, sizeof(float), "load_acc");
    for (int r = 0; r < kTileSize; ++r)
      for (int c = 0; c < kTileSize; ++c) acc.v[r * kTileSize + c] = p[r * ld + c];
  }
  void store_acc(float* p, Index ld, const Acc& acc) const {
    check_tile(p, ld, sizeof(float), "store_acc");
    for (int r = 0; r < kTileSize; ++r)
      for (int c = 0; c < kTileSize; ++c) p[r * ld + c] = acc.v[r * kTileSize + c];
  }
  void load_a(ARows& a, const bfloat16* p, Index ld) const {
    check_tile(p, ld, sizeof(bfloat16), "load_a");
    check_staged(p, ld, kTileSize, "load_a");
    for (int r = 0; r < kTileSize; ++r)
      for (int k = 0; k < kTileSize; ++k) a.v[r * kTileSize + k] = float(p[r * ld + k]);
  }
  void load_b(BRows& b, const bfloat16* p, Index ld) const {
    check_tile(p, ld, sizeof(bfloat16), "load_b");
    check_staged(p, ld, kTileSize, "load_b");
    for (int k = 0; k < kTileSize; ++k)
      for (int c = 0; c < kTileSize; ++c) b.v[k * kTileSize + c] = float(p[k * ld + c]);
  }
  void load_bt(BCols& b, const bfloat16* p, Index ld) const {
    check_tile(p, ld, sizeof(bfloat16), "load_bt");
    check_staged(p, ld, kTileSize, "load_bt");
    for (int k = 0; k < kTileSize; ++k)
      for (int c = 0; c < kTileSize; ++c) b.v[k * kTileSize + c] = float(p[c * ld + k]);
  }
  void mma(Acc& acc, const ARows& a, const BRows& b) const { product(acc, a.v, b.v); }
  void mma(Acc& acc, const ARows& a, const BCols& b) const { product(acc, a.v, b.v); }

  // Element-wise work in registers (device.hpp): the whole tile at once, rows and columns in order.
  template <class F>
  void map(Acc& acc, F f) const {
    for (int r = 0; r < kTileSize; ++r)
      for (int c = 0; c < kTileSize; ++c) acc.v[r * kTileSize + c] = f(Index(r), Index(c), acc.v[r * kTileSize + c]);
  }
  template <class F>
  void map_rows(Acc& acc, const Rows& rows, F f) const {
    map(acc, [&](Index r, Index c, float x) { return f(r, c, x, rows.v[r]); });
  }
  template <class F>
  void zip(Acc& acc, const Acc& other, F f) const {
    map(acc, [&](Index r, Index c, float x) { return f(r, c, x, other.v[r * kTileSize + c]); });
  }
  template <class Op>
  void fold_rows(Rows& rows, const Acc& acc, Op op) const {
    for (int r = 0; r < kTileSize; ++r) {
      float x = acc.v[r * kTileSize];
      for (int c = 1; c < kTileSize; ++c) x = op(x, acc.v[r * kTileSize + c]);
      rows.v[r] = op(rows.v[r], x);
    }
  }
  template <class F, class... R>
  void for_rows(F f, R&... rows) const {
    for (int r = 0; r < kTileSize; ++r) f(Index(r), rows.v[r]...);
  }
  template <class F, class... R>
  void each_row(F f, const R&... rows) const {
    for (int r = 0; r < kTileSize; ++r) f(Index(r), rows.v[r]...);
  }
  void to_a(ARows& a, const Acc& acc) const {
    for (int i = 0; i < kElements; ++i) a.v[i] = float(bfloat16(acc.v[i]));
  }

 private:
  static void product(Acc& acc, const float* a, const float* b) {
    for (int r = 0; r < kTileSize; ++r)
      for (int c = 0; c < kTileSize; ++c) {
        float sum = acc.v[r * kTileSize + c];
        for (int k = 0; k < kTileSize; ++k) sum += a[r * kTileSize + k] * b[k * kTileSize + c];
        acc.v[r * kTileSize + c] = sum;
      }
  }
  static void check_tile(const void* p, Index ld, std::size_t element, const char* what) {
    check(alignment_of(p) >= kTileAlignment, "for_each_warp: ", what, " at an address aligned to ", alignment_of(p),
          " bytes (tensor-core tile loads need ", kTileAlignment, ")");
    check(ld >= kTileSize && (std::size_t(ld) * element) % 16 == 0, "for_each_warp: ", what, " with ld = ", ld,
          " (at least 16, and a multiple of 16 bytes)");
  }
  // The GPU's bf16 tile loads are ldmatrix, which reads shared memory only: the tile's 16 rows of
  // 16 elements must lie in this warp's staging (a global pointer would read garbage there).
  void check_staged(const bfloat16* p, Index ld, Index rows, const char* what) const {
    const auto* begin = reinterpret_cast<const unsigned char*>(p);
    const auto* end = reinterpret_cast<const unsigned char*>(p + (rows - 1) * ld + kTileSize);
    check(begin >= staging_ && end <= staging_ + staging_bytes_, "for_each_warp: ", what,
          " reads a tile outside the warp's staging (bf16 tiles load from the staging only: ldmatrix on the GPU)");
  }
  unsigned char* staging_;
  std::size_t staging_bytes_;
  InFlight* in_flight_;
  LaneTurns turns_;
};

namespace emulated_detail {

inline constexpr unsigned char kPoison = 0xFF;  // NaN as float/double/bf16, -1 as a signed integer

// Every live allocation of every emulated device (begin address -> bytes), so copies, GEMMs and
// sorts can check their pointers as cudaMemcpy and cuBLAS would fault on them.
class Allocations {
 public:
  static Allocations& instance() {
    static Allocations* registry = new Allocations;  // never destroyed: static device objects may outlive it
    return *registry;
  }
  void add(const void* p, std::size_t bytes) { ledger_.add(p, bytes); }
  void remove(const void* p) { ledger_.remove(p); }
  const MemoryLedger& ledger() const { return ledger_; }
  MemoryLedger& ledger() { return ledger_; }
  // Throws moe::Error unless [p, p + bytes) lies inside one live allocation (nothing to check for 0 bytes).
  void check_inside(const void* p, std::size_t bytes, const char* what) const { check_inside(p, bytes, what, ""); }
  void check_inside(const void* p, std::size_t bytes, const char* where, const char* name) const {
    const MemoryLedger::Extent extent = ledger_.locate(p, bytes);
    check(extent != MemoryLedger::Extent::past_end, "emulated device: ", where, *name ? ": " : "", name, " (", bytes,
          " bytes) runs past the end of its device allocation");
    check(extent != MemoryLedger::Extent::elsewhere, "emulated device: ", where, *name ? ": " : "", name, " (", bytes,
          " bytes) is not in any device allocation: a host pointer or a freed buffer");
  }

 private:
  MemoryLedger ledger_;
};

// Bytes from the first to one past the last element a column-major operand touches (0 if none).
template <class S>
std::size_t operand_bytes(Index rows, Index cols, Index ld) {
  return rows > 0 && cols > 0 ? std::size_t((cols - 1) * ld + rows) * sizeof(S) : 0;
}

// Bytes of A and of B as a product stores them (op(A) is [m, k], op(B) is [k, n]; each column-major
// with its leading dimension), for one product of the batch.
template <class S>
std::size_t a_bytes(const BlasGemm<S>& g) {
  return g.op_a == BlasOp::none ? operand_bytes<S>(g.m, g.k, g.lda) : operand_bytes<S>(g.k, g.m, g.lda);
}
template <class S>
std::size_t b_bytes(const BlasGemm<S>& g) {
  return g.op_b == BlasOp::none ? operand_bytes<S>(g.k, g.n, g.ldb) : operand_bytes<S>(g.n, g.k, g.ldb);
}

// What a product reads and writes, each operand as the memory it is: a column-major [rows, cols]
// operand with leading dimension ld is, row-major, `cols` rows of `rows` elements, ld apart. So
// moe::overlaps tells operands that interleave without sharing an element (neighbouring row blocks
// of one column-major buffer, which cuBLAS writes side by side) from ones that share one.
template <class S>
struct Footprint {
  std::vector<ConstMatrixView<S>> reads, writes;
};
template <class S>
ConstMatrixView<S> column_major(const S* p, Index rows, Index cols, Index ld) {
  return {p, cols, rows, ld};
}
template <class S>
Footprint<S> footprint(const BlasGemm<S>& g) {
  Footprint<S> f;
  if (g.m == 0 || g.n == 0) return f;
  f.reads.push_back(g.op_a == BlasOp::none ? column_major(g.a, g.m, g.k, g.lda) : column_major(g.a, g.k, g.m, g.lda));
  f.reads.push_back(g.op_b == BlasOp::none ? column_major(g.b, g.k, g.n, g.ldb) : column_major(g.b, g.n, g.k, g.ldb));
  const ConstMatrixView<S> c = column_major<S>(g.c, g.m, g.n, g.ldc);
  f.writes.push_back(c);
  if (g.accumulate) f.reads.push_back(c);
  if (g.epilogue == Epilogue::bias || g.epilogue == Epilogue::bias_gelu) f.reads.push_back({g.bias, 1, g.m});
  if (g.aux) (g.epilogue == Epilogue::dgelu ? f.reads : f.writes).push_back(column_major<S>(g.aux, g.m, g.n, g.ldaux));
  return f;
}

}  // namespace emulated_detail

struct EmulatedDevice {
  using Row = EmulatedRow;
  static constexpr std::size_t kAlignment = 256;  // cudaMalloc's alignment

  EmulatedDevice() = default;
  explicit EmulatedDevice(LaunchOrder order) { state_->order = order; }
  // A handle: copies share the state. No move operations, so a move copies too and leaves its
  // source usable (a moved-from backend or layer keeps a device rather than a null state).
  EmulatedDevice(const EmulatedDevice&) = default;
  EmulatedDevice& operator=(const EmulatedDevice&) = default;
  LaunchOrder launch_order() const { return state_->order; }
  DgeluWeights dgelu_weights() const { return state_->dgelu_weights; }
  void set_dgelu_weights(DgeluWeights weights) const { state_->dgelu_weights = weights; }
  ExpertGemm expert_gemm() const { return state_->expert_gemm; }
  void set_expert_gemm(ExpertGemm gemm) const { state_->expert_gemm = gemm; }
  std::string description() const { return "emulated CUDA device (host loops)"; }
  // Inside one live allocation, as a GPU kernel would need (a host pointer faults there).
  void check_device_memory(const void* p, std::size_t bytes, const char* where, const char* name) const {
    emulated_detail::Allocations::instance().check_inside(p, bytes, where, name);
  }

  static void* allocate(std::size_t bytes) {
    const std::size_t size = bytes == 0 ? 1 : bytes;
    void* p = ::operator new(size, std::align_val_t{kAlignment});
    std::memset(p, emulated_detail::kPoison, size);
    emulated_detail::Allocations::instance().add(p, size);
    return p;
  }
  static void deallocate(void* p) {
    if (!p) return;
    emulated_detail::Allocations::instance().remove(p);
    ::operator delete(p, std::align_val_t{kAlignment});
  }

  void upload(void* dst, const void* src, std::size_t bytes) const {
    emulated_detail::Allocations::instance().check_inside(dst, bytes, "upload's destination");
    copy_bytes(dst, src, bytes);
  }
  void download(void* dst, const void* src, std::size_t bytes) const {
    emulated_detail::Allocations::instance().check_inside(src, bytes, "download's source");
    copy_bytes(dst, src, bytes);
    ++state_->sync_count;
  }
  void synchronize() const { ++state_->sync_count; }

  // start_download / finish_download (as CudaDevice's): the source's bytes are taken at the start,
  // where the stream would copy them, and reach the host only at the finish, so a host read
  // before it finds nothing new.
  class PendingDownload {
    friend struct EmulatedDevice;
    std::vector<unsigned char> bytes_;
    bool in_flight_ = false;
  };
  void start_download(PendingDownload& pending, const void* src, std::size_t bytes) const {
    emulated_detail::Allocations::instance().check_inside(src, bytes, "download's source");
    pending.bytes_.resize(bytes);
    copy_bytes(pending.bytes_.data(), src, bytes);
    pending.in_flight_ = true;
  }
  void finish_download(PendingDownload& pending, void* dst) const {
    check(pending.in_flight_, "finish_download: no download in flight");
    copy_bytes(dst, pending.bytes_.data(), pending.bytes_.size());
    pending.in_flight_ = false;
    ++state_->sync_count;
  }

  // Launches and library calls so far (for_each* over a non-empty range, gemm, stable_sort_pairs;
  // by this device and its copies): about what a GPU would queue, for tests that count them.
  std::uint64_t launch_count() const { return state_->launch_count; }
  // Waits for the stream so far (download, synchronize): each one drains a GPU's queue.
  std::uint64_t sync_count() const { return state_->sync_count; }
  // Batches by pointer arrays below kBatchedAlignment so far: the GPU device runs each of those one
  // product at a time after downloading the arrays (a wait), so the library's callers avoid them.
  std::uint64_t slow_pointer_batches() const { return state_->slow_pointer_batches; }
  // Device allocations so far, by every emulated device (each a cudaMalloc on a GPU, and a
  // cudaFree later: both wait for the whole device).
  static std::uint64_t allocation_count() { return memory_use().allocations; }
  // The bytes every emulated device holds now and at most (moe/cuda/memory_ledger.hpp), as
  // CudaDevice counts its cudaMallocs; reset_memory_peak starts the peak again from now.
  static MemoryUse memory_use() { return emulated_detail::Allocations::instance().ledger().use(); }
  static void reset_memory_peak() { emulated_detail::Allocations::instance().ledger().reset_peak(); }

  template <class Body>
  void for_each(Index n, Body body) const {
    if (n > 0) ++state_->launch_count;
    const Order order = next_order(n);
    for (Index i = 0; i < n; ++i) body(order[i]);
  }
  template <class Body>
  void for_each_2d(Index rows, Index cols, Body body) const {
    if (rows > 0 && cols > 0) ++state_->launch_count;
    const Order row_order = next_order(rows), col_order = next_order(cols);
    for (Index r = 0; r < rows; ++r)
      for (Index c = 0; c < cols; ++c) body(row_order[r], col_order[c]);
  }
  template <class Body>
  void for_each_row(Index rows, Body body) const {
    if (rows > 0) ++state_->launch_count;
    const Order order = next_order(rows);
    Row row;
    row.turns = lane_turns();
    for (Index r = 0; r < rows; ++r) body(order[r], row);
  }

  // Each warp's staging starts poisoned, as a GPU's shared memory holds whatever the last block left there.
  using Warp = EmulatedWarp;
  template <class Body>
  void for_each_warp(Index count, std::size_t staging_bytes, Body body) const {
    check_warp_staging(staging_bytes);
    if (count <= 0) return;
    ++state_->launch_count;
    const std::size_t bytes = staging_bytes == 0 ? 1 : staging_bytes;
    const std::unique_ptr<unsigned char, StagingFree> staging(
        static_cast<unsigned char*>(::operator new(bytes, std::align_val_t{kTileAlignment})));
    const Order order = next_order(count);
    Warp::InFlight in_flight;
    for (Index i = 0; i < count; ++i) {
      std::memset(staging.get(), emulated_detail::kPoison, bytes);
      body(order[i], Warp(staging.get(), staging_bytes, &in_flight, lane_turns()));
      check(in_flight.empty(), "for_each_warp: warp ", order[i], " returned with copies in flight (",
            in_flight.committed.size(), " committed batches, ", in_flight.open.size(),
            " uncommitted copies): they would land in the next warp's staging");
    }
  }

  // The column-major definition (moe/cuda/reference_gemm.hpp), accumulated in the scalar's compute type in k order;
  // a batch is its products one after another. cuBLAS's argument rules and the operands' memory are checked first.
  template <class S>
  void gemm(const BlasGemm<S>& g) const {
    check_blas_gemm(g);
    check_gemm_memory(g);
    ++state_->launch_count;
    if (g.pointer_batch() && g.array_alignment < kBatchedAlignment) ++state_->slow_pointer_batches;
    for (Index q = 0; q < g.batch; ++q)
      for (Index j = 0; j < g.n; ++j)
        for (Index i = 0; i < g.m; ++i) reference_gemm_element(g, q, i, j);
  }

  // The grouped product (moe/cuda/grouped_gemm.hpp) as the GPU's kernel runs it, emulated: the
  // same tiles, placement and descriptors, products in k order (so the bits of gemm's products,
  // which add in the same order). Its extents are checked against the live allocations first.
  template <class S>
  static constexpr bool grouped_gemm_supports() {
    return std::is_same_v<S, bfloat16>;
  }
  template <class S>
  void grouped_gemm(const GroupedGemm<S>& g) const {
    static_assert(std::is_same_v<S, bfloat16>, "EmulatedDevice::grouped_gemm: bf16 operands only (the wgmma kernel's)");
    check_grouped_gemm(g, kGroupedGemmColumns);
    const auto& allocations = emulated_detail::Allocations::instance();
    for_each_grouped_gemm_extent(g, [&](const void* p, std::size_t bytes, const char* what) {
      allocations.check_inside(p, bytes, what);
    });
    ++state_->launch_count;
    grouped_gemm_emulated<kGroupedGemmColumns>(g);
  }

  // Independent products (device.hpp): each is checked as gemm checks it, then that none writes
  // bytes another reads or writes (a GPU would run them concurrently: that would be a race),
  // then they run in the device's launch order (so a dependence the check cannot see, if any,
  // changes bits between orders).
  template <class S>
  void gemm_group(std::span<const BlasGemm<S>> products) const {
    std::vector<emulated_detail::Footprint<S>> footprints;
    for (const BlasGemm<S>& g : products) {
      check_group_member(g);
      footprints.push_back(emulated_detail::footprint(g));
    }
    for (std::size_t p = 0; p < footprints.size(); ++p)
      for (std::size_t q = 0; q < footprints.size(); ++q) {
        if (p == q) continue;
        for (const ConstMatrixView<S>& w : footprints[p].writes) {
          bool clash = false;
          for (const ConstMatrixView<S>& r : footprints[q].reads) clash = clash || overlaps(w, r);
          for (const ConstMatrixView<S>& o : footprints[q].writes) clash = clash || overlaps(w, o);
          check(!clash, "gemm_group: product ", p, " writes memory that product ", q,
                " reads or writes; a GPU may run them at the same time");
        }
      }
    const Order order = next_order(Index(products.size()));
    for (Index i = 0; i < Index(products.size()); ++i) gemm(products[std::size_t(order[i])]);
  }

  // One growing host buffer, shared by copies of this device (as CudaDevice's context is),
  // poisoned on every call: nothing a previous call left there may be read.
  void* scratch(std::size_t bytes) const {
    if (bytes > state_->scratch_size) {
      state_->scratch.reset(static_cast<unsigned char*>(allocate(bytes)));
      state_->scratch_size = bytes;
    }
    if (bytes) std::memset(state_->scratch.get(), emulated_detail::kPoison, bytes);
    return state_->scratch.get();
  }

  // (keys_out, values_out) = (keys_in, values_in) ordered by ascending key, equal keys keeping
  // their order. Only the low `bits` bits of a key count (all keys fit them).
  void stable_sort_pairs(const std::uint32_t* keys_in, std::uint32_t* keys_out, const std::int32_t* values_in,
                         std::int32_t* values_out, Index n, int /*bits*/) const {
    const auto& allocations = emulated_detail::Allocations::instance();
    const std::size_t bytes = std::size_t(n) * sizeof(std::uint32_t);
    allocations.check_inside(keys_in, bytes, "sort's input keys");
    allocations.check_inside(keys_out, bytes, "sort's output keys");
    allocations.check_inside(values_in, bytes, "sort's input values");
    allocations.check_inside(values_out, bytes, "sort's output values");
    ++state_->launch_count;
    std::vector<Index> order(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), Index{0});
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return keys_in[a] < keys_in[b]; });
    for (Index i = 0; i < n; ++i) keys_out[i] = keys_in[order[i]], values_out[i] = values_in[order[i]];
  }

 private:
  template <class S>
  using Compute = typename ComputeTypeOf<S>::type;

  // A launch's index order: order[i] is the i-th index to run.
  struct Order {
    LaunchOrder kind;
    Index n;
    std::vector<Index> shuffled;
    Index operator[](Index i) const {
      return kind == LaunchOrder::ascending ? i : kind == LaunchOrder::descending ? n - 1 - i : shuffled[std::size_t(i)];
    }
  };
  static constexpr std::uint64_t kShuffleSeed = 0x5eed;
  LaneTurns lane_turns() const { return {state_->order, &state_->launches}; }
  Order next_order(Index n) const {
    Order order{state_->order, n, {}};
    if (order.kind == LaunchOrder::shuffled && n <= 1) order.kind = LaunchOrder::ascending;  // one order only
    if (order.kind == LaunchOrder::shuffled) {
      order.shuffled.resize(std::size_t(n));
      std::iota(order.shuffled.begin(), order.shuffled.end(), Index{0});
      shuffle_by_draws(order.shuffled.data(), n, kShuffleSeed, state_->launches++);
    }
    return order;
  }

  // Every operand of every product of the batch inside one allocation.
  template <class S>
  static void check_gemm_memory(const BlasGemm<S>& g) {
    if (g.m == 0 || g.n == 0) return;
    const auto& allocations = emulated_detail::Allocations::instance();
    if (g.pointer_batch()) {  // the arrays themselves are device memory, as cublasGemmBatchedEx reads them
      const std::size_t bytes = std::size_t(g.batch) * sizeof(void*);
      allocations.check_inside(g.c_array, bytes, "gemm's array of C pointers");
      if (g.k > 0) {
        allocations.check_inside(g.a_array, bytes, "gemm's array of A pointers");
        allocations.check_inside(g.b_array, bytes, "gemm's array of B pointers");
      }
    }
    if (g.pointer_batch())  // the alignment the caller promised, which decides the GPU's path
      for (Index q = 0; q < g.batch; ++q) {
        const void* const operands[] = {g.k > 0 ? g.a_of(q) : nullptr, g.k > 0 ? g.b_of(q) : nullptr, g.c_of(q)};
        for (const void* p : operands)
          check(alignment_of(p) >= g.array_alignment, "gemm: product ", q, " of a batch promised ",
                g.array_alignment, "-byte aligned pointers has one aligned to ", alignment_of(p));
      }
    for (Index q = 0; q < g.batch; ++q) {
      allocations.check_inside(g.a_of(q), emulated_detail::a_bytes(g), "gemm's A");
      allocations.check_inside(g.b_of(q), emulated_detail::b_bytes(g), "gemm's B");
      allocations.check_inside(g.c_of(q), emulated_detail::operand_bytes<S>(g.m, g.n, g.ldc), "gemm's C");
    }
    if (g.epilogue == Epilogue::bias || g.epilogue == Epilogue::bias_gelu)
      allocations.check_inside(g.bias, std::size_t(g.m) * sizeof(S), "gemm's bias");
    if (g.aux)
      allocations.check_inside(g.aux, emulated_detail::operand_bytes<S>(g.m, g.n, g.ldaux), "gemm's aux");
  }

  struct StagingFree {
    void operator()(unsigned char* p) const { ::operator delete(p, std::align_val_t{kTileAlignment}); }
  };

  // Shared by copies of the device (as CudaDevice's context is): the order, the launch count the
  // shuffles draw from, and the scratch buffer.
  struct State {
    struct Free {
      void operator()(unsigned char* p) const { deallocate(p); }
    };
    LaunchOrder order = LaunchOrder::ascending;
    DgeluWeights dgelu_weights = DgeluWeights::stored;
    ExpertGemm expert_gemm = ExpertGemm::per_expert;
    std::uint64_t launches = 0;  // shuffled launches: what the shuffles draw from
    std::uint64_t launch_count = 0;
    std::uint64_t slow_pointer_batches = 0;
    std::uint64_t sync_count = 0;
    std::unique_ptr<unsigned char, Free> scratch;
    std::size_t scratch_size = 0;
  };
  std::shared_ptr<State> state_ = std::make_shared<State>();
  static void copy_bytes(void* dst, const void* src, std::size_t bytes) {
    if (bytes) std::memcpy(dst, src, bytes);
  }
};

}  // namespace moe::cuda
