// moe/nn/adamw.hpp: AdamW (PyTorch's torch.optim.AdamW: decoupled weight decay) over ParamRefs,
// and global gradient-norm clipping (torch.nn.utils.clip_grad_norm_).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>
#include <utility>
#include <vector>

#include "moe/config.hpp"
#include "moe/cpu/parallel.hpp"
#include "moe/cpu/simd.hpp"
#include "moe/nn/checks.hpp"
#include "moe/tensor.hpp"

namespace moe::nn {

namespace detail {
// The optimizer's elementwise passes go in pieces of this many elements of one parameter: cut by
// the shapes alone, so any thread count gives the same bits.
inline constexpr Index kOptimizerPiece = Index(1) << 14;

// (parameter index, first element) of every piece of the parameters the optimizer updates.
template <class S>
std::vector<std::pair<std::size_t, Index>> optimizer_pieces(const std::vector<ParamRef<S>>& params) {
  std::vector<std::pair<std::size_t, Index>> pieces;
  for (std::size_t i = 0; i < params.size(); ++i)
    if (optimizer_updates(params[i]))
      for (Index begin = 0; begin < Index(params[i].value.size()); begin += kOptimizerPiece)
        pieces.emplace_back(i, begin);
  return pieces;
}

// AdamW's update of elements j.. of one parameter, as many as P holds: P is a SIMD packet of S,
// or S itself for one element. The multiply-adds are written as such: pmadd is fused where the
// machine has FMA, in packets and (Eigen's scalar pmadd) for one element alike, so a packet's lanes
// and single elements give the same bits, whatever a compiler would contract in a * b + c.
// decay: k.decay for a parameter that decays, else 1.
template <class P, class S>
void adamw_update_at(Index j, S* value, const S* grad, S* m, S* v, S decay, const AdamWStep<S>& k) {
  using namespace Eigen::internal;
  const P g = ploadu<P>(grad + j);
  const P mj = pmadd(pset1<P>(k.b1), ploadu<P>(m + j), pmul(pset1<P>(k.one_minus_b1), g));
  const P vj = pmadd(pset1<P>(k.b2), ploadu<P>(v + j), pmul(pmul(pset1<P>(k.one_minus_b2), g), g));
  pstoreu(m + j, mj);
  pstoreu(v + j, vj);
  // sqrt(v / (1 - b2^t)) + eps, as sqrt(v) * (1 / sqrt(1 - b2^t)) + eps
  const P denominator = pmadd(cpu::simd::exact_sqrt(vj), pset1<P>(k.inv_sqrt_correction2), pset1<P>(k.eps));
  const P step = pdiv(pmul(pset1<P>(k.step_size), mj), denominator);
  pstoreu(value + j, pmadd(ploadu<P>(value + j), pset1<P>(decay), pnegate(step)));
}

// The update of n elements of one parameter (see AdamW): SIMD packets from element 0, then the
// rest one by one through the same formula, with the same bits. (A plain loop would not
// vectorise: std::sqrt's errno check is a branch.)
template <class S>
void adamw_update(S* value, const S* grad, S* m, S* v, Index n, S decay, const AdamWStep<S>& k) {
  using P = cpu::simd::Packet<S>;
  constexpr Index L = cpu::simd::kLanes<S>;
  const Index full = n - n % L;
  for (Index j = 0; j < full; j += L) adamw_update_at<P>(j, value, grad, m, v, decay, k);
  for (Index j = full; j < n; ++j) adamw_update_at<S>(j, value, grad, m, v, decay, k);
}
}  // namespace detail

// First and second moments for each parameter, keyed by its position in the list given to
// step(). The list is fixed by the first step: a later list of another length or with other
// sizes throws. Frozen parameters (trainable false) and ones without a gradient are skipped and
// keep empty moments.
//
// For each updated parameter p with gradient g, at step t (1 on the first call):
//   p -= lr * wd * p                      (only if decays(p))
//   m  = b1 m + (1 - b1) g
//   v  = b2 v + (1 - b2) g^2
//   p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
// The state (m(), v(), step_count()) is exposed so that a checkpoint can save it and resume the
// exact same trajectory (restore with set_state()). The update is elementwise and runs on
// threads() threads (default: all; the bits do not depend on it).
template <class S>
class AdamW {
 public:
  explicit AdamW(AdamWConfig config = {}) : config_(config) {
    moe::nn::check_adamw_config(config);
  }

  const AdamWConfig& config() const { return config_; }
  int threads() const { return threads_; }
  void set_threads(int threads) {
    check(threads >= 1, "AdamW: thread count must be >= 1, got ", threads);
    threads_ = threads;
  }

  void step(std::vector<ParamRef<S>>& params) { step(params, config_.lr); }

  void step(std::vector<ParamRef<S>>& params, double lr) {
    moe::nn::check_adamw_rate(lr);
    const int step = detail::next_adamw_step(steps_);  // checked before bind() changes anything
    bind(params);
    steps_ = step;
    const AdamWStep<S> k = adamw_step<S>(config_, lr, steps_);
    const auto pieces = detail::optimizer_pieces(params);
    cpu::parallel_for(threads_, Index(pieces.size()), [&](Index piece) {
      const auto [i, begin] = pieces[std::size_t(piece)];
      ParamRef<S>& p = params[i];
      const Index end = std::min(begin + detail::kOptimizerPiece, Index(p.value.size()));
      // p * 1 is exact: parameters that do not decay take the same path.
      const S decay = decays(p) && config_.weight_decay != 0 ? k.decay : S(1);
      detail::adamw_update(p.value.data() + begin, p.grad.data() + begin, m_[i].data() + begin,
                           v_[i].data() + begin, end - begin, decay, k);
    });
  }

  // ---- state, for checkpoints ------------------------------------------------------------
  int step_count() const { return steps_; }
  std::vector<std::vector<S>>& m() { return m_; }
  std::vector<std::vector<S>>& v() { return v_; }
  const std::vector<std::vector<S>>& m() const { return m_; }
  const std::vector<std::vector<S>>& v() const { return v_; }
  // Restores a saved state; the next step() checks it against its parameter list.
  void set_state(int step_count, std::vector<std::vector<S>> m, std::vector<std::vector<S>> v) {
    detail::check_adamw_set_state(step_count, m, v);
    steps_ = step_count;
    m_ = std::move(m);
    v_ = std::move(v);
    sizes_.clear();  // checked against the list on the next step
  }

 private:
  // Sizes the moments on the first step (or checks restored ones); afterwards, checks that the
  // list still matches. Every check comes before any change (see nn/checks.hpp).
  void bind(const std::vector<ParamRef<S>>& params) {
    detail::check_adamw_gradients(params);
    if (sizes_.empty()) {  // the first step, or the first after set_state
      detail::check_adamw_distinct(params);
      detail::check_adamw_state("restored moments", m_, params);
      for (const ParamRef<S>& p : params) sizes_.push_back(p.value.size());
      if (m_.empty()) {
        m_.resize(params.size());
        v_.resize(params.size());
      }
    }
    detail::check_adamw_list(params, sizes_);
    for (std::size_t i = 0; i < params.size(); ++i)
      if (optimizer_updates(params[i]) && m_[i].empty()) {  // first update of this parameter
        m_[i].assign(sizes_[i], S(0));
        v_[i].assign(sizes_[i], S(0));
      }
  }

  AdamWConfig config_;
  int threads_ = cpu::default_threads();
  int steps_ = 0;
  std::vector<std::size_t> sizes_;
  std::vector<std::vector<S>> m_, v_;
};

// Scales every gradient by max_norm / (norm + 1e-6) when the global L2 norm of all gradients
// (trainable parameters with a gradient) exceeds max_norm, as torch.nn.utils.clip_grad_norm_.
// Returns the norm before clipping. A non-finite norm is returned with the gradients left as they
// are (the caller should skip that step). The squares are summed in double, in pieces cut from
// the shapes (each in a fixed order, then the pieces in list order): the same bits on any thread
// count.
template <class S>
double clip_grad_norm(std::vector<ParamRef<S>>& params, double max_norm, int threads = cpu::default_threads()) {
  check(max_norm > 0, "clip_grad_norm: max_norm must be > 0, got ", max_norm);
  check(threads >= 1, "clip_grad_norm: thread count must be >= 1, got ", threads);
  detail::check_clip_distinct("clip_grad_norm", params);
  const auto pieces = detail::optimizer_pieces(params);
  auto piece_range = [&](Index piece) {
    const auto [i, begin] = pieces[std::size_t(piece)];
    const Index size = std::min(detail::kOptimizerPiece, Index(params[i].grad.size()) - begin);
    return std::span<S>(params[i].grad).subspan(std::size_t(begin), std::size_t(size));
  };
  std::vector<double> piece_squares(pieces.size());
  cpu::parallel_for(threads, Index(pieces.size()), [&](Index piece) {
    const std::span<S> grad = piece_range(piece);
    double lanes[8] = {};  // 8 running sums, then folded in a fixed order
    std::size_t j = 0;
    for (; j + 8 <= grad.size(); j += 8)
      for (std::size_t l = 0; l < 8; ++l) lanes[l] += double(grad[j + l]) * double(grad[j + l]);
    for (; j < grad.size(); ++j) lanes[0] += double(grad[j]) * double(grad[j]);
    piece_squares[std::size_t(piece)] =
        ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  });
  double squares = 0;
  for (double s : piece_squares) squares += s;
  const double norm = std::sqrt(squares);
  if (!std::isfinite(norm) || norm <= max_norm) return norm;
  const S scale = S(max_norm / (norm + 1e-6));
  cpu::parallel_for(threads, Index(pieces.size()), [&](Index piece) {
    for (S& g : piece_range(piece)) g *= scale;
  });
  return norm;
}

}  // namespace moe::nn
