// moe/cuda/nn/adamw.hpp: AdamW (PyTorch's torch.optim.AdamW: decoupled weight decay) and global
// gradient-norm clipping (torch.nn.utils.clip_grad_norm_) over parameters in device memory: the
// GPU twin of moe/nn/adamw.hpp (same interface, same update, same conventions).
//
// The parameters come as the CPU's std::vector<ParamRef<S>>, whose value and grad spans here
// point to DEVICE memory (never read on the host: only their sizes and pointers are used).
// The moments are kept in Compute<S>, one device array per parameter. For bf16 parameters that is
// the mixed-precision recipe: fp32 moments and fp32 MASTER WEIGHTS, which the update changes and
// then rounds into the bf16 parameter (an update smaller than half a bf16 step is not lost).
// Every update is elementwise, and all parameters go through a handful of launches
// (moe/cuda/multi_tensor.hpp: up to kTensorsPerLaunch tensors each; GPT-2 small with MoE blocks
// has about 170), not one launch per tensor; the only sync is clip_grad_norm's download of the
// summed squares (its partials live in the device's scratch). The moments (and master weights)
// are allocated once, on a parameter's first update.
#pragma once

#include <cmath>
#include <cstddef>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/config.hpp"
#include "moe/cuda/buffer.hpp"
#include "moe/cuda/device.hpp"
#include "moe/cuda/device_operands.hpp"
#include "moe/cuda/multi_tensor.hpp"
#include "moe/cuda/pack.hpp"
#include "moe/host_device.hpp"
#include "moe/nn/checks.hpp"
#include "moe/routing.hpp"
#include "moe/tensor.hpp"

namespace moe::cuda::nn {

// The CPU optimizer's options, decay rule and choice of updated parameters (moe/nn/checks.hpp).
using moe::nn::AdamWConfig;
using moe::nn::AdamWStep;
using moe::nn::decays;
using moe::nn::optimizer_updates;

namespace adamw_detail {

// Elements per partial sum of squares in clip_grad_norm (one device thread each).
inline constexpr Index kNormChunk = 2048;

// One parameter's arrays for the multi-tensor update: value, grad: [n] (S); m, v: [n] (C);
// master: [n] (C) or null. `decays`: weight decay applies (decays(p) and weight_decay > 0).
template <class S, class C = Compute<S>>
struct UpdatedTensor {
  S* value;
  const S* grad;
  C* m;
  C* v;
  C* master;
  Index n;
  bool decays;
  bool packed;  // every array 16-byte aligned: whole packs move as 16-byte loads and stores
};

// Elements per thread of the update (moe/cuda/multi_tensor.hpp's chunk; any value gives the same bits).
inline constexpr Index kUpdateChunk = 512;

// One element of the update, in C: the new moments and the new value of the master weight (or
// parameter). The packed and the single-element paths both call it.
template <class C>
struct AdamWElement {
  C m, v, updated;
};
template <class C>
MOE_HOST_DEVICE AdamWElement<C> adamw_element(const AdamWStep<C>& k, bool decays, C g, C m, C v, C old) {
  // (g arrives times the step's gradient scale: C(grad) * scale, exact when the scale is 1.)
  const C mj = k.b1 * m + k.one_minus_b1 * g;
  const C vj = k.b2 * v + k.one_minus_b2 * g * g;
  // old * 1 is exact: parameters that do not decay take the same path.
  const C updated = old * (decays ? k.decay : C(1)) - k.step_size * mj / (C(std::sqrt(vj)) * k.inv_sqrt_correction2 + k.eps);
  return {mj, vj, updated};
}

// W elements of T at p (16-byte aligned) through W / kPackSize<T> pack loads, and back.
template <Index W, class T>
MOE_HOST_DEVICE void load_elements(const T* p, T (&out)[W]) {
  MOE_UNROLL
  for (Index i = 0; i < W / kPackSize<T>; ++i) {
    const Pack<T> x = load_pack(p + i * kPackSize<T>);
    MOE_UNROLL
    for (Index e = 0; e < kPackSize<T>; ++e) out[i * kPackSize<T> + e] = x.v[e];
  }
}
template <Index W, class T>
MOE_HOST_DEVICE void store_elements(T* p, const T (&in)[W]) {
  MOE_UNROLL
  for (Index i = 0; i < W / kPackSize<T>; ++i) {
    Pack<T> x;
    MOE_UNROLL
    for (Index e = 0; e < kPackSize<T>; ++e) x.v[e] = in[i * kPackSize<T> + e];
    store_pack(p + i * kPackSize<T>, x);
  }
}

// The CPU AdamW's update of every element of every tensor, in C, of the master weight when there is
// one (then rounded into value), with the gradient C(grad) * grad_scale; tensors in launches of
// kTensorsPerLaunch, a 16-byte pack of S (and the same elements of the C arrays) per step of a
// thread where the tensor's arrays allow.
template <class S, class D, class C = Compute<S>>
void adamw_update(const D& device, std::span<const UpdatedTensor<S>> tensors, AdamWStep<C> k, C grad_scale) {
  constexpr Index W = kPackSize<S>;
  for_each_tensor_pack<W>(device, tensors, kUpdateChunk, [=] MOE_HOST_DEVICE(const UpdatedTensor<S>& p, Index first, Index count) {
    if (p.packed && count == W) {
      const Pack<S> g = load_pack(p.grad + first);
      C m[W], v[W], old[W];
      load_elements<W>(p.m + first, m);
      load_elements<W>(p.v + first, v);
      if (p.master) {
        load_elements<W>(p.master + first, old);
      } else {
        const Pack<S> value = load_pack(p.value + first);
        MOE_UNROLL
        for (Index i = 0; i < W; ++i) old[i] = C(value.v[i]);
      }
      Pack<S> value;
      MOE_UNROLL
      for (Index i = 0; i < W; ++i) {
        const AdamWElement<C> x = adamw_element(k, p.decays, C(g.v[i]) * grad_scale, m[i], v[i], old[i]);
        m[i] = x.m, v[i] = x.v, old[i] = x.updated;
        value.v[i] = S(x.updated);
      }
      store_elements<W>(p.m + first, m);
      store_elements<W>(p.v + first, v);
      if (p.master) store_elements<W>(p.master + first, old);
      store_pack(p.value + first, value);
      return;
    }
    for (Index j = first; j < first + count; ++j) {
      const AdamWElement<C> x =
          adamw_element(k, p.decays, C(p.grad[j]) * grad_scale, p.m[j], p.v[j], p.master ? p.master[j] : C(p.value[j]));
      p.m[j] = x.m;
      p.v[j] = x.v;
      if (p.master) p.master[j] = x.updated;
      p.value[j] = S(x.updated);
    }
  });
}

// master[j] = C(value[j]): a master copy starts as the parameter's own values.
template <class S, class D, class C = Compute<S>>
void widen(const D& device, const S* value, C* master, Index n) {
  device.for_each(n, [=] MOE_HOST_DEVICE(Index j) { master[j] = C(value[j]); });
}

template <class T, class D>
void fill_zero(const D& device, T* data, Index n) {
  device.for_each(n, [=] MOE_HOST_DEVICE(Index j) { data[j] = T(0); });
}

// A gradient for clip_grad_norm: grad [n] and where its partial sums of squares go.
template <class S>
struct GradTensor {
  S* grad;
  Index n;
  double* partial;
  bool packed;  // grad is 16-byte aligned: whole packs move as 16-byte loads and stores
};

// partial[q] = sum of grad[j]^2 over the packs p = q, q + units, q + 2 units, ... of kPackSize<S>
// elements each (units = n / kNormChunk rounded up: about kNormChunk elements per unit,
// moe/cuda/multi_tensor.hpp's units), in double, packs and their elements in ascending order; the
// gradients in launches of kTensorsPerLaunch.
template <class S, class D>
void chunk_squares(const D& device, std::span<const GradTensor<S>> grads) {
  for_each_tensor_unit(device, grads, kNormChunk, [=] MOE_HOST_DEVICE(const GradTensor<S>& g, Index q, Index units) {
    constexpr Index W = kPackSize<S>;  // a 16-byte pack per load where the gradient allows
    const Index packs = (g.n + W - 1) / W;
    double s = 0;
    for (Index p = q; p < packs; p += units) {
      const Index first = p * W;
      if (g.packed && first + W <= g.n) {
        const Pack<S> x = load_pack(g.grad + first);
        MOE_UNROLL
        for (Index i = 0; i < W; ++i) s += double(x.v[i]) * double(x.v[i]);
      } else {
        for (Index j = first; j < g.n && j < first + W; ++j) s += double(g.grad[j]) * double(g.grad[j]);
      }
    }
    g.partial[q] = s;
  });
}

// Partials per strip of ordered_sum.
inline constexpr Index kSumStrip = 1024;
inline Index sum_strips(Index count) { return (count + kSumStrip - 1) / kSumStrip; }

// *total = the sum of partial[0, count) in a fixed order: strips of kSumStrip partials, each
// folded by one row of work (32 lanes, then their butterfly: moe/cuda/device.hpp), then the
// strips' sums (strip_sums [sum_strips(count)]) by one more row. GPT-2 small with MoE blocks has
// ~250,000 partials: one thread adding them, a chain of dependent loads, would take milliseconds.
template <class D>
void ordered_sum(const D& device, const double* partial, Index count, double* strip_sums, double* total) {
  const Index strips = sum_strips(count);
  device.for_each_row(strips, [=] MOE_HOST_DEVICE(Index s, const typename D::Row& r) {
    const Index begin = s * kSumStrip, n = count - begin < kSumStrip ? count - begin : kSumStrip;
    const double sum = r.sum(n, [&](Index j) { return partial[begin + j]; });
    if (r.first()) strip_sums[s] = sum;
  });
  device.for_each_row(1, [=] MOE_HOST_DEVICE(Index, const typename D::Row& r) {
    const double sum = r.sum(strips, [&](Index s) { return strip_sums[s]; });
    if (r.first()) *total = sum;
  });
}

template <class S, class D, class C = Compute<S>>
void scale_in_place(const D& device, std::span<const GradTensor<S>> grads, C scale) {
  constexpr Index W = kPackSize<S>;
  for_each_tensor_pack<W>(device, grads, kUpdateChunk, [=] MOE_HOST_DEVICE(const GradTensor<S>& g, Index first, Index count) {
    if (g.packed && count == W) {
      Pack<S> x = load_pack(g.grad + first);
      MOE_UNROLL
      for (Index i = 0; i < W; ++i) x.v[i] = S(C(x.v[i]) * scale);
      store_pack(g.grad + first, x);
      return;
    }
    for (Index j = first; j < first + count; ++j) g.grad[j] = S(C(g.grad[j]) * scale);
  });
}

template <class S, class D>
void zero_in_place(const D& device, std::span<const GradTensor<S>> grads) {
  constexpr Index W = kPackSize<S>;
  for_each_tensor_pack<W>(device, grads, kUpdateChunk, [=] MOE_HOST_DEVICE(const GradTensor<S>& g, Index first, Index count) {
    if (g.packed && count == W) {
      Pack<S> zero;
      MOE_UNROLL
      for (Index i = 0; i < W; ++i) zero.v[i] = S(0);
      store_pack(g.grad + first, zero);
      return;
    }
    for (Index j = first; j < first + count; ++j) g.grad[j] = S(0);
  });
}

// A parameter's values or gradient (`what`) as memory the kernels can read, named by the parameter's
// name: built only when the check fails (this runs for every parameter of every step).
template <class D, class S, class T>
void check_parameter_on_device(const D& device, const char* where, const char* what, const ParamRef<S>& p,
                               std::span<T> data) {
  try {
    check_on_device(device, where, what, data.data(), Index(data.size()));
  } catch (const Error&) {
    const std::string name = "parameter '" + p.name + "' " + what;
    check_on_device(device, where, name.c_str(), data.data(), Index(data.size()));
    throw;  // (the memory changed between the two checks)
  }
}

// A parameter's gradient as a GradTensor (no partials yet), packed where 16-byte aligned.
template <class S>
GradTensor<S> grad_tensor(ParamRef<S>& p) {
  return {p.grad.data(), Index(p.grad.size()), nullptr, pack_aligned(p.grad.data())};
}

// The gradients of the parameters `keep` selects, as GradTensors, each checked as device memory
// (`where` names the call).
template <class S, class D, class Keep>
std::vector<GradTensor<S>> grad_tensors_where(const D& device, const char* where, std::vector<ParamRef<S>>& params,
                                              Keep keep) {
  std::vector<GradTensor<S>> grads;
  for (ParamRef<S>& p : params)
    if (keep(p)) {
      check_parameter_on_device(device, where, "gradient", p, p.grad);
      grads.push_back(grad_tensor(p));
    }
  return grads;
}
// Every gradient of `params` (frozen parameters' too): what zero_grads and scale_grads touch.
template <class S, class D>
std::vector<GradTensor<S>> grad_tensors(const D& device, const char* where, std::vector<ParamRef<S>>& params) {
  return grad_tensors_where(device, where, params, [](const ParamRef<S>& p) { return !p.grad.empty(); });
}
// The gradients clipping measures and scales: those the optimizer updates (optimizer_updates).
template <class S, class D>
std::vector<GradTensor<S>> updated_grad_tensors(const D& device, const char* where, std::vector<ParamRef<S>>& params) {
  return grad_tensors_where(device, where, params, [](const ParamRef<S>& p) { return optimizer_updates(p); });
}

// The global L2 norm of `grads` (grad_norm's description below); sets their partials into the
// device's scratch.
template <class S, class D>
double norm_of(const D& device, std::vector<GradTensor<S>>& grads) {
  std::vector<Index> first;  // each gradient's first partial
  Index partials = 0;
  for (const GradTensor<S>& g : grads) {
    first.push_back(partials);
    partials += units_of(g.n, kNormChunk);
  }
  if (partials == 0) return 0.0;
  ScratchLayout layout;
  const auto sums_slot = layout.add<double>(partials + 1);  // the partials, then their sum
  const auto strips_slot = layout.add<double>(sum_strips(partials));
  void* scratch = device.scratch(layout.bytes());
  double* sums = sums_slot.in(scratch);
  for (std::size_t i = 0; i < grads.size(); ++i) grads[i].partial = sums + first[i];
  const std::span<const GradTensor<S>> list(grads);
  chunk_squares(device, list);
  ordered_sum(device, sums, partials, strips_slot.in(scratch), sums + partials);
  double squares = 0;
  device.download(&squares, sums + partials, sizeof(double));  // waits for the stream
  return std::sqrt(squares);
}

}  // namespace adamw_detail

// First and second moments for each parameter, keyed by its position in the list given to
// step(), as moe::nn::AdamW. The list is fixed by the first step: a later list of another length
// or with other sizes throws. Frozen parameters (trainable false) and ones without a gradient
// are skipped and keep empty moments.
//
// For each updated parameter p with gradient g, at step t (1 on the first call):
//   p -= lr * wd * p                      (only if decays(p))
//   m  = b1 m + (1 - b1) g
//   v  = b2 v + (1 - b2) g^2
//   p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
// in Compute<S>, the moments stored in Compute<S> (fp32 for bf16). All parameters in a few
// launches (kTensorsPerLaunch each); no sync. m()/v() download the state for a checkpoint (syncs), set_state() uploads one.
//
// Master weights (bf16 parameters only, kMasterWeights): p above is a Compute<S> copy of the
// parameter, made from its values on its first update (or set by set_master_weights, e.g. the
// fp32 values of a checkpoint), and the parameter receives S(p) after every update. So the master
// copy is what trains: values written into a bf16 parameter after its first update (weights loaded
// mid-run) are replaced by the next step unless set_master_weights gives the optimizer them too.
// master_weights() downloads them (the values a checkpoint should hold).
template <class S, class D>
class AdamW {
 public:
  using C = Compute<S>;
  static constexpr bool kMasterWeights = !std::is_same_v<S, C>;

  explicit AdamW(D device, AdamWConfig config = {}) : device_(std::move(device)), config_(config) {
    moe::nn::check_adamw_config(config);
  }

  const AdamWConfig& config() const { return config_; }
  const D& device() const { return device_; }

  void step(std::vector<ParamRef<S>>& params) { step(params, config_.lr); }

  // grad_scale: the update reads every gradient times this factor, as if the gradients had been
  // scaled in place first (C(g) * scale, rounded once in C: for fp32 the bits of the in-place
  // scaling; for bf16 gradients, without their rounding back to bf16). It is how clipping's
  // factor reaches the update without its own pass over the gradients (grad_norm, clip_factor).
  void step(std::vector<ParamRef<S>>& params, double lr, C grad_scale = C(1)) {
    moe::nn::check_adamw_rate(lr);
    check(std::isfinite(double(grad_scale)) && grad_scale >= C(0), "AdamW: grad_scale must be finite and >= 0, got ",
          double(grad_scale));
    const int step = moe::nn::detail::next_adamw_step(steps_);  // checked before bind() changes anything
    bind(params);
    steps_ = step;
    const AdamWStep<C> k = moe::nn::adamw_step<C>(config_, lr, steps_);
    std::vector<adamw_detail::UpdatedTensor<S>> tensors;
    for (std::size_t i = 0; i < params.size(); ++i) {
      ParamRef<S>& p = params[i];
      if (!optimizer_updates(p)) continue;
      C* master = kMasterWeights ? master_[i].data() : nullptr;
      const bool packed = pack_aligned(p.value.data()) && pack_aligned(p.grad.data()) && pack_aligned(m_[i].data()) &&
                          pack_aligned(v_[i].data()) && (!master || pack_aligned(master));
      tensors.push_back({p.value.data(), p.grad.data(), m_[i].data(), v_[i].data(), master, Index(p.value.size()),
                         decays(p) && config_.weight_decay != 0, packed});
    }
    adamw_detail::adamw_update(device_, std::span<const adamw_detail::UpdatedTensor<S>>(tensors), k, grad_scale);
  }

  // ---- state, for checkpoints ------------------------------------------------------------
  int step_count() const { return steps_; }
  // Host copies of the moments (empty for parameters never updated). Each download syncs.
  std::vector<std::vector<C>> m() const { return download(m_); }
  std::vector<std::vector<C>> v() const { return download(v_); }
  // Restores a saved state (uploads it); the next step() checks it against its parameter list.
  void set_state(int step_count, const std::vector<std::vector<C>>& m, const std::vector<std::vector<C>>& v) {
    moe::nn::detail::check_adamw_set_state(step_count, m, v);
    steps_ = step_count;
    m_ = upload(m);
    v_ = upload(v);
    sizes_.clear();  // checked against the list on the next step
  }

  // Master weights (kMasterWeights only; fp32 parameters are their own): host copies, empty for parameters never updated and not
  // set (a download each: syncs); set_master_weights uploads them (an empty entry: made from the
  // parameter on its first update). Checked against the parameter list on the next step.
  std::vector<std::vector<C>> master_weights() const
    requires kMasterWeights
  {
    return download(master_);
  }
  void set_master_weights(const std::vector<std::vector<C>>& master)
    requires kMasterWeights
  {
    master_ = upload(master);
    sizes_.clear();
  }

 private:
  std::vector<std::vector<C>> download(const std::vector<DeviceArray<C, D>>& moments) const {
    std::vector<std::vector<C>> host(moments.size());
    for (std::size_t i = 0; i < moments.size(); ++i) {
      host[i].resize(std::size_t(moments[i].size()));
      device_.download(host[i].data(), moments[i].data(), host[i].size() * sizeof(C));
    }
    return host;
  }
  std::vector<DeviceArray<C, D>> upload(const std::vector<std::vector<C>>& host) const {
    std::vector<DeviceArray<C, D>> moments(host.size());
    for (std::size_t i = 0; i < host.size(); ++i) {
      moments[i].resize(Index(host[i].size()));
      device_.upload(moments[i].data(), host[i].data(), host[i].size() * sizeof(C));
    }
    return moments;
  }

  // Sizes the moments (and master weights) on the first step, or checks restored ones; afterwards,
  // checks that the list still matches. The checks are moe::nn::AdamW's (nn/checks.hpp), and every
  // updated parameter's values and gradient as device memory; all come before any allocation or upload.
  void bind(const std::vector<ParamRef<S>>& params) {
    moe::nn::detail::check_adamw_gradients(params);
    for (const ParamRef<S>& p : params)
      if (optimizer_updates(p)) {
        adamw_detail::check_parameter_on_device(device_, "AdamW", "values", p, p.value);
        adamw_detail::check_parameter_on_device(device_, "AdamW", "gradient", p, p.grad);
      }
    if (sizes_.empty()) {  // the first step, or the first after set_state / set_master_weights
      moe::nn::detail::check_adamw_distinct(params);
      moe::nn::detail::check_adamw_state("restored moments", m_, params);
      if constexpr (kMasterWeights) moe::nn::detail::check_adamw_state("master weights", master_, params);
      for (const ParamRef<S>& p : params) sizes_.push_back(p.value.size());
      if (m_.empty()) {
        m_.resize(params.size());
        v_.resize(params.size());
      }
      if (kMasterWeights && master_.empty()) master_.resize(params.size());
    }
    moe::nn::detail::check_adamw_list(params, sizes_);
    for (std::size_t i = 0; i < params.size(); ++i) {
      if (!optimizer_updates(params[i]) || sizes_[i] == 0) continue;
      const Index n = Index(sizes_[i]);
      if (m_[i].empty()) {  // first update of this parameter
        m_[i].resize(n);
        v_[i].resize(n);
        adamw_detail::fill_zero(device_, m_[i].data(), n);
        adamw_detail::fill_zero(device_, v_[i].data(), n);
      }
      if (kMasterWeights && master_[i].empty()) {
        master_[i].resize(n);
        adamw_detail::widen(device_, params[i].value.data(), master_[i].data(), n);
      }
    }
  }

  D device_;
  AdamWConfig config_;
  int steps_ = 0;
  std::vector<std::size_t> sizes_;
  std::vector<DeviceArray<C, D>> m_, v_;  // [params] device arrays of Compute<S>
  std::vector<DeviceArray<C, D>> master_;  // [params] fp32 master weights (kMasterWeights only)
};

// The global L2 norm of all gradients (trainable parameters with a gradient, in device memory),
// as moe::nn::clip_grad_norm measures it. The squares are summed in double: per parameter in
// interleaved chunks of about kNormChunk elements (one thread each, 16-byte packs in index order;
// all parameters in a few launches), then the partials in list-and-chunk order through
// ordered_sum's fixed tree, so the norm is the same bits on every run. Downloading the sum waits
// for the stream: the one sync.
template <class S, class D>
double grad_norm(const D& device, std::vector<ParamRef<S>>& params) {
  moe::nn::detail::check_clip_distinct("grad_norm", params);
  std::vector<adamw_detail::GradTensor<S>> grads = adamw_detail::updated_grad_tensors(device, "grad_norm", params);
  return adamw_detail::norm_of(device, grads);
}

// What clipping multiplies the gradients by for a norm: max_norm / (norm + 1e-6) in C when the
// norm exceeds max_norm, else 1 (and 1 for a non-finite norm: the caller should skip that step).
// AdamW::step(params, lr, clip_factor(norm, max_norm)) then updates with the clipped gradients.
template <class C>
C clip_factor(double norm, double max_norm) {
  check(max_norm > 0, "clip_grad_norm: max_norm must be > 0, got ", max_norm);
  return std::isfinite(norm) && norm > max_norm ? C(max_norm / (norm + 1e-6)) : C(1);
}

// Scales every gradient by clip_factor when the global norm (grad_norm) exceeds max_norm, as
// moe::nn::clip_grad_norm. Returns the norm before clipping; a non-finite norm is returned with
// the gradients left as they are (the caller should skip that step).
template <class S, class D>
double clip_grad_norm(const D& device, std::vector<ParamRef<S>>& params, double max_norm) {
  using C = Compute<S>;
  check(max_norm > 0, "clip_grad_norm: max_norm must be > 0, got ", max_norm);
  moe::nn::detail::check_clip_distinct("clip_grad_norm", params);
  std::vector<adamw_detail::GradTensor<S>> grads = adamw_detail::updated_grad_tensors(device, "clip_grad_norm", params);
  const double norm = adamw_detail::norm_of(device, grads);
  const C factor = clip_factor<C>(norm, max_norm);
  if (factor == C(1)) return norm;
  adamw_detail::scale_in_place(device, std::span<const adamw_detail::GradTensor<S>>(grads), factor);
  return norm;
}

// Every gradient of `params` (frozen ones included) set to zero, in a few multi-tensor launches
// (a fill per parameter would be ~170 launches a GPT-2 step), 16-byte stores where aligned.
template <class S, class D>
void zero_grads(const D& device, std::vector<ParamRef<S>>& params) {
  const std::vector<adamw_detail::GradTensor<S>> grads = adamw_detail::grad_tensors(device, "zero_grads", params);
  adamw_detail::zero_in_place(device, std::span<const adamw_detail::GradTensor<S>>(grads));
}

// Every gradient of `params` times `factor` (frozen ones included), as zero_grads' launches.
template <class S, class D>
void scale_grads(const D& device, std::vector<ParamRef<S>>& params, float factor) {
  moe::nn::detail::check_scale_distinct("scale_grads", params);
  const std::vector<adamw_detail::GradTensor<S>> grads = adamw_detail::grad_tensors(device, "scale_grads", params);
  adamw_detail::scale_in_place(device, std::span<const adamw_detail::GradTensor<S>>(grads), Compute<S>(factor));
}

}  // namespace moe::cuda::nn
