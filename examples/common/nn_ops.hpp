// examples/common/nn_ops.hpp: the transformer pieces the example models are written against, for
// a given MoE backend B. One model definition (examples/gpt2_moe/model.hpp) then trains on the
// CPU (moe::nn, Eigen: nn_ops_cpu.hpp) and on a CUDA-backend device (moe::cuda::nn: the GPU, or
// the host-emulated device the tests use: nn_ops_cuda.hpp). This header names the interface; it
// includes neither world, so code compiled by nvcc can include the model.
//
// NnOps<B> (copyable, cheap: a thread count or a device handle) provides
//   types      Backend = B, Scalar, Param (a named tensor with .value/.grad arrays, matrix(),
//              grad_matrix(), ref()), Stat (LayerNorm's cached mean/rstd element), Array<T> (a
//              buffer: .resize(n), .data()), Optimizer (AdamW over the Params' storage)
//   making     param(name, shape) (zeros), make_backend() (for a MoELayer or dense FFN),
//              make_optimizer(AdamWConfig), init_normal(Param&, std, seed) (the CPU's numbers
//              from (seed, name)), fill(Param&, value), zero(MatrixView), zero_grad(ParamRef&),
//              zero_grads(params) (every gradient of the list: a few launches on a device)
//   layers     embedding_, layernorm_, linear_, attention_, cross_entropy_{forward,backward} (these
//              two take an optional Stat array [2N], the forward's row statistics for the
//              backward on the same logits: a device skips its second read of the rows):
//              moe::nn's arguments without the thread count (see moe/nn/*.hpp), except that attention's
//              cache for its backward (attention_cache_size(B, T, heads, C) elements) may hold less than
//              the probabilities (a device's fused attention keeps log-sum-exps), so its backward also
//              takes the forward's out; and
//              add(src, dst) (dst += src), gelu_forward/backward. linear_backward's din and
//              attention_backward's dqkv are added into, or written over with a last argument of
//              moe::nn::GradInto::overwrite (no zero fill of the buffer first: moe::nn and moe::cuda::nn
//              take it themselves)
//   training   scale_gradients(params, factor), clip_grad_norm(params, max_norm),
//              set_threads(n) (CPU; a no-op on a device), description(); a device's also
//              grad_norm(params) and clip_factor(norm, max_norm), clipping's halves, so that its
//              Optimizer::step(params, lr, factor) applies the factor (no pass of its own)
// Host data (token ids, targets) always comes as host spans; device memory never reaches the host
// except through download(span, host).
#pragma once

namespace examples {

template <class B>
class NnOps;  // specialised in nn_ops_cpu.hpp and nn_ops_cuda.hpp

}  // namespace examples
