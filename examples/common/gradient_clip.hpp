// examples/common/gradient_clip.hpp: global-norm gradient clipping for a training loop over
// examples::NnOps<B> (torch.nn.utils.clip_grad_norm_'s rule), split in its two halves so that a
// device does not spend a pass over the gradients on it:
//   measure(ops, params, max_norm)  the norm before clipping (0 when max_norm is 0)
//   step(optimizer, params, lr)     AdamW with the clipped gradients
// On a device (its ops have grad_norm and clip_factor) the factor rides into AdamW's update,
// step(params, lr, factor); on the CPU the gradients are scaled in place by measure, as PyTorch
// does, and step is the plain update. A non-finite norm is the caller's to refuse before step.
#pragma once

#include <vector>

#include "moe/routing.hpp"  // moe::Compute
#include "moe/tensor.hpp"

namespace examples {

template <class Ops, class S>
inline constexpr bool kClipsInUpdate = requires(const Ops& ops, std::vector<moe::ParamRef<S>>& params) {
  ops.grad_norm(params);
  ops.clip_factor(1.0, 1.0);
};

template <class Ops, class S>
class GradientClip {
 public:
  double measure(const Ops& ops, std::vector<moe::ParamRef<S>>& params, double max_norm) {
    factor_ = 1;
    if (max_norm <= 0) return 0.0;
    if constexpr (kClipsInUpdate<Ops, S>) {
      const double norm = ops.grad_norm(params);
      factor_ = ops.clip_factor(norm, max_norm);
      return norm;
    } else {
      return ops.clip_grad_norm(params, max_norm);
    }
  }

  template <class Optimizer>
  void step(Optimizer& optimizer, std::vector<moe::ParamRef<S>>& params, double lr) {
    if constexpr (kClipsInUpdate<Ops, S>) optimizer.step(params, lr, factor_);
    else optimizer.step(params, lr);
    factor_ = 1;
  }

 private:
  moe::Compute<S> factor_ = 1;  // from measure to step (a device's only)
};

}  // namespace examples
