// moe/nn/adamw.hpp: AdamW (PyTorch's torch.optim.AdamW: decoupled weight decay) over ParamRefs,
// and global gradient-norm clipping (torch.nn.utils.clip_grad_norm_).
#pragma once

#include <cmath>
#include <cstddef>
#include <utility>
#include <vector>

#include "moe/config.hpp"
#include "moe/tensor.hpp"

namespace moe::nn {

struct AdamWConfig {
  double lr = 6e-4;  // used by step(params); step(params, lr) takes a scheduled rate instead
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
};

// Weight decay applies only to parameters of 2 or more dimensions (matrices, embeddings); biases
// and norm weights (1-D) are not decayed: the GPT-2 / llm.c convention.
template <class S>
bool decays(const ParamRef<S>& param) {
  return param.shape.size() >= 2;
}

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
// exact same trajectory (restore with set_state()).
template <class S>
class AdamW {
 public:
  explicit AdamW(AdamWConfig config = {}) : config_(config) {
    check(config.lr >= 0 && config.eps >= 0 && config.weight_decay >= 0, "AdamW: lr, eps and weight_decay must be >= 0");
    check(config.beta1 >= 0 && config.beta1 < 1 && config.beta2 >= 0 && config.beta2 < 1,
          "AdamW: betas must lie in [0, 1), got ", config.beta1, " and ", config.beta2);
  }

  const AdamWConfig& config() const { return config_; }

  void step(std::vector<ParamRef<S>>& params) { step(params, config_.lr); }

  void step(std::vector<ParamRef<S>>& params, double lr) {
    bind(params);
    ++steps_;
    const double b1 = config_.beta1, b2 = config_.beta2;
    const double correction1 = 1 - std::pow(b1, steps_), correction2 = 1 - std::pow(b2, steps_);
    const S step_size = S(lr / correction1), inv_sqrt_correction2 = S(1 / std::sqrt(correction2));
    const S eps = S(config_.eps), decay = S(1 - lr * config_.weight_decay);
    const S s_b1 = S(b1), s_b2 = S(b2), one_minus_b1 = S(1 - b1), one_minus_b2 = S(1 - b2);
    for (std::size_t i = 0; i < params.size(); ++i) {
      ParamRef<S>& p = params[i];
      if (!updated(p)) continue;
      S* m = m_[i].data();
      S* v = v_[i].data();
      const bool decay_this = decays(p) && config_.weight_decay != 0;
      for (std::size_t j = 0; j < p.value.size(); ++j) {
        const S g = p.grad[j];
        if (decay_this) p.value[j] *= decay;
        m[j] = s_b1 * m[j] + one_minus_b1 * g;
        v[j] = s_b2 * v[j] + one_minus_b2 * g * g;
        p.value[j] -= step_size * m[j] / (std::sqrt(v[j]) * inv_sqrt_correction2 + eps);
      }
    }
  }

  // ---- state, for checkpoints ------------------------------------------------------------
  int step_count() const { return steps_; }
  std::vector<std::vector<S>>& m() { return m_; }
  std::vector<std::vector<S>>& v() { return v_; }
  const std::vector<std::vector<S>>& m() const { return m_; }
  const std::vector<std::vector<S>>& v() const { return v_; }
  // Restores a saved state; the next step() checks it against its parameter list.
  void set_state(int step_count, std::vector<std::vector<S>> m, std::vector<std::vector<S>> v) {
    check(step_count >= 0, "AdamW::set_state: step count must be >= 0, got ", step_count);
    check(m.size() == v.size(), "AdamW::set_state: ", m.size(), " first moments but ", v.size(), " second moments");
    for (std::size_t i = 0; i < m.size(); ++i)
      check(m[i].size() == v[i].size(), "AdamW::set_state: moments of parameter ", i, " have sizes ", m[i].size(),
            " and ", v[i].size());
    steps_ = step_count;
    m_ = std::move(m);
    v_ = std::move(v);
    sizes_.clear();  // checked against the list on the next step
  }

 private:
  static bool updated(const ParamRef<S>& p) { return p.trainable && !p.grad.empty(); }

  // Sizes the moments on the first step (or checks restored ones); afterwards, checks that the
  // list still matches.
  void bind(const std::vector<ParamRef<S>>& params) {
    for (std::size_t i = 0; i < params.size(); ++i)
      if (updated(params[i]))
        check(params[i].grad.size() == params[i].value.size(), "AdamW: parameter ", i, " '", params[i].name,
              "' has ", params[i].value.size(), " values but ", params[i].grad.size(), " gradients");
    if (sizes_.empty()) {
      if (m_.empty()) {  // first step
        m_.resize(params.size());
        v_.resize(params.size());
      }
      check(m_.size() == params.size(), "AdamW: the restored state has ", m_.size(), " parameters, the list has ",
            params.size());
      for (std::size_t i = 0; i < params.size(); ++i)
        check(m_[i].empty() || m_[i].size() == params[i].value.size(), "AdamW: restored moments of parameter ", i,
              " '", params[i].name, "' have ", m_[i].size(), " entries, the parameter has ",
              params[i].value.size());
      for (const ParamRef<S>& p : params) sizes_.push_back(p.value.size());
    }
    check(params.size() == sizes_.size(), "AdamW: the parameter list has ", params.size(),
          " entries, the first step had ", sizes_.size());
    for (std::size_t i = 0; i < params.size(); ++i) {
      check(params[i].value.size() == sizes_[i], "AdamW: parameter ", i, " '", params[i].name, "' has ",
            params[i].value.size(), " values, it had ", sizes_[i], " at the first step");
      if (updated(params[i]) && m_[i].empty()) {  // first update of this parameter
        m_[i].assign(sizes_[i], S(0));
        v_[i].assign(sizes_[i], S(0));
      }
    }
  }

  AdamWConfig config_;
  int steps_ = 0;
  std::vector<std::size_t> sizes_;
  std::vector<std::vector<S>> m_, v_;
};

// Scales every gradient by max_norm / (norm + 1e-6) when the global L2 norm of all gradients
// (trainable parameters with a gradient, in list order, summed in double) exceeds max_norm, as
// torch.nn.utils.clip_grad_norm_. Returns the norm before clipping. A non-finite norm is returned
// with the gradients left as they are (the caller should skip that step).
template <class S>
double clip_grad_norm(std::vector<ParamRef<S>>& params, double max_norm) {
  check(max_norm > 0, "clip_grad_norm: max_norm must be > 0, got ", max_norm);
  double squares = 0;
  for (const ParamRef<S>& p : params) {
    if (!p.trainable || p.grad.empty()) continue;
    for (S g : p.grad) squares += double(g) * double(g);
  }
  const double norm = std::sqrt(squares);
  if (!std::isfinite(norm) || norm <= max_norm) return norm;
  const S scale = S(max_norm / (norm + 1e-6));
  for (ParamRef<S>& p : params) {
    if (!p.trainable || p.grad.empty()) continue;
    for (S& g : p.grad) g *= scale;
  }
  return norm;
}

}  // namespace moe::nn
