// examples/common/nn_ops_cuda.hpp: NnOps for the CUDA backend (see nn_ops.hpp) on device D:
// moe::cuda::nn's pieces, device tensors (device_parameter.hpp) and moe::cuda::nn::AdamW, which
// keeps fp32 master weights for bf16 parameters. D is moe::cuda::CudaDevice (a GPU; include
// moe/cuda.cuh first, from nvcc) or moe::cuda::EmulatedDevice (the same code on the host, for
// tests). No Eigen.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "device_parameter.hpp"
#include "moe/bfloat16.hpp"
#include "moe/cuda/backend.hpp"
#include "moe/cuda/nn/adamw.hpp"
#include "moe/cuda/nn/attention.hpp"
#include "moe/cuda/nn/cross_entropy.hpp"
#include "moe/cuda/nn/embedding.hpp"
#include "moe/cuda/nn/fused_attention.hpp"
#include "moe/cuda/nn/layernorm.hpp"
#include "moe/cuda/nn/linear.hpp"
#include "attention_kernel.hpp"
#include "moe/random.hpp"
#include "nn_ops.hpp"
#include "parameter.hpp"

namespace examples {

template <class S, class D>
class NnOps<moe::cuda::BasicBackend<S, D>> {
 public:
  using Backend = moe::cuda::BasicBackend<S, D>;
  using Scalar = S;
  using Param = DeviceTensor<S, D>;
  using Stat = moe::Compute<S>;
  template <class T>
  using Array = moe::cuda::DeviceArray<T, D>;
  using Optimizer = moe::cuda::nn::AdamW<S, D>;

  explicit NnOps(D device = D{}, AttentionKernel attention = kDefaultAttention)
      : device_(device), backend_(std::make_shared<Backend>(device)), attention_(attention) {}
  const D& device() const { return device_; }
  void set_threads(int) {}  // the device decides
  std::string description() const {
    std::string text = std::is_same_v<S, moe::bfloat16> ? "bf16 (fp32 master weights)" : "fp32";
    if constexpr (requires { device_.description(); }) text = device_.description() + ", " + text;
    text += attention_ == AttentionKernel::fused ? ", fused attention where it fits" : ", materialized attention";
    return text;
  }

  // ---- making -----------------------------------------------------------------------------
  // storage_rows: rows of zero padding below the matrix (DeviceTensor), for products over them.
  Param param(std::string name, std::vector<Index> shape, Index storage_rows = 0) const {
    Param t(std::move(name), std::move(shape), storage_rows);
    backend_->fill(t.padded_matrix(), S(0));
    backend_->fill(t.padded_grad_matrix(), S(0));
    return t;
  }
  Backend make_backend() const { return Backend(device_); }
  Optimizer make_optimizer(const moe::nn::AdamWConfig& config) const { return Optimizer(device_, config); }
  // The CPU's numbers (parameter.hpp: drawn in float from (seed, name)), stored as S.
  void init_normal(Param& t, double std_dev, std::uint64_t seed) const {
    std::vector<float> host(std::size_t(t.size()));
    moe::random::fill_normal(std::span<float>(host), std_dev, seed, stream_of(t.name));
    upload(host, std::span<S>(t.value.data(), host.size()));
  }
  void fill(Param& t, S value) const { backend_->fill(t.matrix(), value); }
  void zero(moe::MatrixView<S> m) const { backend_->fill(m, S(0)); }
  void zero_grad(moe::ParamRef<S>& p) const {
    if (!p.grad.empty()) backend_->fill(moe::MatrixView<S>(p.grad.data(), 1, Index(p.grad.size())), S(0));
  }
  void zero_grads(std::vector<moe::ParamRef<S>>& params) const { moe::cuda::nn::zero_grads(device_, params); }
  // Device values <-> host floats (for checkpoints): a download waits for the stream.
  void download(std::span<const S> values, std::span<float> host) const {
    moe::check(values.size() == host.size(), "download: ", values.size(), " values into ", host.size());
    std::vector<S> raw(values.size());
    device_.download(raw.data(), values.data(), raw.size() * sizeof(S));
    for (std::size_t i = 0; i < raw.size(); ++i) host[i] = float(raw[i]);
  }
  void upload(std::span<const float> host, std::span<S> values) const {
    moe::check(values.size() == host.size(), "upload: ", host.size(), " values into ", values.size());
    std::vector<S> raw(host.size());
    for (std::size_t i = 0; i < raw.size(); ++i) raw[i] = S(host[i]);
    device_.upload(values.data(), raw.data(), raw.size() * sizeof(S));
  }

  // ---- layers (moe/cuda/nn/*.hpp) ------------------------------------------------------------
  void embedding_forward(std::span<const std::int32_t> tokens, Index B, Index T, moe::ConstMatrixView<S> wte,
                         moe::ConstMatrixView<S> wpe, moe::MatrixView<S> out) const {
    moe::cuda::nn::embedding_forward<S>(device_, tokens, B, T, wte, wpe, out);
  }
  void embedding_backward(moe::ConstMatrixView<S> dout, std::span<const std::int32_t> tokens, Index B, Index T,
                          moe::MatrixView<S> dwte, moe::MatrixView<S> dwpe) const {
    moe::cuda::nn::embedding_backward<S>(device_, dout, tokens, B, T, dwte, dwpe);
  }
  void layernorm_forward(moe::ConstMatrixView<S> x, const S* weight, const S* bias, moe::MatrixView<S> out, Stat* mean,
                         Stat* rstd) const {
    moe::cuda::nn::layernorm_forward<S>(device_, x, weight, bias, out, mean, rstd);
  }
  void layernorm_backward(moe::ConstMatrixView<S> dout, moe::ConstMatrixView<S> x, const S* weight, const Stat* mean,
                          const Stat* rstd, moe::MatrixView<S> dx, S* dweight, S* dbias) const {
    moe::cuda::nn::layernorm_backward<S>(device_, dout, x, weight, mean, rstd, dx, dweight, dbias);
  }
  void linear_forward(moe::ConstMatrixView<S> in, moe::ConstMatrixView<S> weight, const S* bias,
                      moe::MatrixView<S> out) const {
    moe::cuda::nn::linear_forward<S>(device_, in, weight, bias, out);
  }
  void linear_backward(moe::ConstMatrixView<S> in, moe::ConstMatrixView<S> dout, moe::ConstMatrixView<S> weight,
                       moe::MatrixView<S> din, moe::MatrixView<S> dweight, S* dbias,
                       moe::nn::GradInto din_into = moe::nn::GradInto::add) const {
    moe::cuda::nn::linear_backward<S>(device_, in, dout, weight, din, dweight, dbias, din_into);
  }
  // The attention's cache for its backward (elements of S): the fused path's log-sum-exps (a float per query row) or
  // the materialised probabilities.
  bool uses_fused_attention(Index channels, Index heads) const {
    return attention_ == AttentionKernel::fused && moe::cuda::nn::fused_attention_fits<S>(channels, heads);
  }
  Index attention_cache_size(Index B, Index T, Index heads, Index channels) const {
    if (!uses_fused_attention(channels, heads)) return B * heads * T * T;
    return (B * heads * T * Index(sizeof(float)) + Index(sizeof(S)) - 1) / Index(sizeof(S));
  }
  void attention_forward(moe::ConstMatrixView<S> qkv, Index B, Index T, Index heads, bool causal,
                         moe::MatrixView<S> out, S* cache) const {
    if constexpr (std::is_same_v<S, moe::bfloat16>)
      if (uses_fused_attention(out.cols, heads))
        return moe::cuda::nn::fused_attention_forward<S>(device_, qkv, B, T, heads, causal, out,
                                                         reinterpret_cast<float*>(cache));
    moe::cuda::nn::attention_forward<S>(device_, qkv, B, T, heads, causal, out, cache);
  }
  // out: the forward's (the fused backward reads it; the materialised one does not).
  void attention_backward(moe::ConstMatrixView<S> dout, moe::ConstMatrixView<S> qkv, moe::ConstMatrixView<S> out,
                          const S* cache, Index B, Index T, Index heads, bool causal, moe::MatrixView<S> dqkv,
                          moe::nn::GradInto into = moe::nn::GradInto::add) const {
    if constexpr (std::is_same_v<S, moe::bfloat16>)
      if (uses_fused_attention(out.cols, heads))
        return moe::cuda::nn::fused_attention_backward<S>(device_, dout, qkv, out, reinterpret_cast<const float*>(cache),
                                                          B, T, heads, causal, dqkv, into);
    moe::cuda::nn::attention_backward<S>(device_, dout, qkv, cache, B, T, heads, causal, dqkv, /*block: default*/ 0,
                                         into);
  }
  // row_stats ([2N], optional): the forward's softmax statistics, read by the backward on the same
  // logits instead of a second read of every row.
  double cross_entropy_forward(moe::ConstMatrixView<S> logits, std::span<const std::int32_t> targets, S* losses,
                               Stat* row_stats = nullptr) const {
    return moe::cuda::nn::cross_entropy_forward<S>(device_, logits, targets, losses, row_stats);
  }
  void cross_entropy_backward(moe::ConstMatrixView<S> logits, std::span<const std::int32_t> targets, double dloss,
                              moe::MatrixView<S> dlogits, const Stat* row_stats = nullptr) const {
    moe::cuda::nn::cross_entropy_backward<S>(device_, logits, targets, dloss, dlogits, row_stats);
  }
  void add(moe::ConstMatrixView<S> src, moe::MatrixView<S> dst) const { backend_->add(src, dst); }
  void gelu_forward(moe::ConstMatrixView<S> in, moe::MatrixView<S> out) const { backend_->gelu_forward(in, out); }
  void gelu_backward(moe::ConstMatrixView<S> in, moe::ConstMatrixView<S> dout, moe::MatrixView<S> din) const {
    backend_->gelu_backward(in, dout, din);
  }

  // ---- training -----------------------------------------------------------------------------
  // g = S(C(g) * factor), element by element (the CPU's float product for fp32).
  void scale_gradients(std::vector<moe::ParamRef<S>>& params, float factor) const {
    moe::cuda::nn::scale_grads(device_, params, factor);
  }
  double clip_grad_norm(std::vector<moe::ParamRef<S>>& params, double max_norm) const {
    return moe::cuda::nn::clip_grad_norm(device_, params, max_norm);
  }
  // Clipping in two halves, for a step that lets the update apply it (Optimizer::step(params, lr,
  // factor)): the norm, then the factor clip_grad_norm would scale the gradients by (1: none).
  double grad_norm(std::vector<moe::ParamRef<S>>& params) const { return moe::cuda::nn::grad_norm(device_, params); }
  static moe::Compute<S> clip_factor(double norm, double max_norm) {
    return moe::cuda::nn::clip_factor<moe::Compute<S>>(norm, max_norm);
  }
  // Device memory in use (bytes) where the device can tell (the GPU: cudaMemGetInfo, every
  // process and the context included), else 0.
  std::int64_t memory_in_use() const {
    if constexpr (requires { device_.memory_in_use(); }) return std::int64_t(device_.memory_in_use());
    return 0;
  }
  // The most device memory (bytes) the library's allocations on this kind of device have held at
  // once since the last reset_memory_peak (moe/cuda/memory_ledger.hpp): the model's own peak.
  std::int64_t memory_peak() const { return std::int64_t(D::memory_use().peak); }
  void reset_memory_peak() const { D::reset_memory_peak(); }

 private:
  D device_;
  std::shared_ptr<Backend> backend_;  // element-wise passes (shared by copies: it owns workspace)
  AttentionKernel attention_;
};

}  // namespace examples
