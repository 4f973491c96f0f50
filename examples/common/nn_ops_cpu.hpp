// examples/common/nn_ops_cpu.hpp: NnOps for the CPU backend (see nn_ops.hpp): moe::nn's pieces
// with the model's thread count, host tensors (parameter.hpp), moe::nn::AdamW. Every piece gives
// the same bits on any thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "moe/moe.hpp"
#include "moe/nn.hpp"
#include "nn_ops.hpp"
#include "parameter.hpp"

namespace examples {

template <class S>
class NnOps<moe::cpu::BasicBackend<S>> {
 public:
  using Backend = moe::cpu::BasicBackend<S>;
  using Scalar = S;
  using Param = Tensor<S>;
  using Stat = S;
  template <class T>
  using Array = std::vector<T>;
  using Optimizer = moe::nn::AdamW<S>;

  explicit NnOps(int threads = moe::cpu::default_threads()) { set_threads(threads); }
  void set_threads(int threads) {
    moe::check(threads >= 1, "thread count must be >= 1, got ", threads);
    threads_ = threads;
    backend_.set_threads(threads);
  }
  int threads() const { return threads_; }
  std::string description() const { return "cpu, " + std::to_string(threads_) + " threads, fp32"; }

  // ---- making -----------------------------------------------------------------------------
  // storage_rows: ignored; the CPU pads nothing (Tensor::padded_matrix is the matrix).
  Param param(std::string name, std::vector<Index> shape, Index /*storage_rows*/ = 0) const {
    return Param(std::move(name), std::move(shape));
  }
  Backend make_backend() const { return Backend(threads_); }
  Optimizer make_optimizer(const moe::nn::AdamWConfig& config) const {
    Optimizer optimizer(config);
    optimizer.set_threads(threads_);
    return optimizer;
  }
  void init_normal(Param& t, double std_dev, std::uint64_t seed) const { examples::init_normal(t, std_dev, seed); }
  void fill(Param& t, S value) const { examples::fill(t, value); }
  void zero(moe::MatrixView<S> m) const { examples::zero(m); }
  void zero_grad(moe::ParamRef<S>& p) const { std::fill(p.grad.begin(), p.grad.end(), S(0)); }
  void zero_grads(std::vector<moe::ParamRef<S>>& params) const {
    for (moe::ParamRef<S>& p : params) zero_grad(p);
  }
  void download(std::span<const S> values, std::span<float> host) const { std::copy(values.begin(), values.end(), host.begin()); }
  void upload(std::span<const float> host, std::span<S> values) const { std::copy(host.begin(), host.end(), values.begin()); }
  // A double model's host values are doubles (a device's are floats): copied as they are.
  void download(std::span<const S> values, std::span<S> host) const
    requires(!std::is_same_v<S, float>)
  {
    std::copy(values.begin(), values.end(), host.begin());
  }
  void upload(std::span<const S> host, std::span<S> values) const
    requires(!std::is_same_v<S, float>)
  {
    std::copy(host.begin(), host.end(), values.begin());
  }

  // ---- layers (moe/nn/*.hpp) ----------------------------------------------------------------
  void embedding_forward(std::span<const std::int32_t> tokens, Index B, Index T, moe::ConstMatrixView<S> wte,
                         moe::ConstMatrixView<S> wpe, moe::MatrixView<S> out) const {
    moe::nn::embedding_forward<S>(tokens, B, T, wte, wpe, out, threads_);
  }
  void embedding_backward(moe::ConstMatrixView<S> dout, std::span<const std::int32_t> tokens, Index B, Index T,
                          moe::MatrixView<S> dwte, moe::MatrixView<S> dwpe) const {
    moe::nn::embedding_backward<S>(dout, tokens, B, T, dwte, dwpe, threads_);
  }
  void layernorm_forward(moe::ConstMatrixView<S> x, const S* weight, const S* bias, moe::MatrixView<S> out, Stat* mean,
                         Stat* rstd) const {
    moe::nn::layernorm_forward<S>(x, weight, bias, out, mean, rstd, threads_);
  }
  void layernorm_backward(moe::ConstMatrixView<S> dout, moe::ConstMatrixView<S> x, const S* weight, const Stat* mean,
                          const Stat* rstd, moe::MatrixView<S> dx, S* dweight, S* dbias) const {
    moe::nn::layernorm_backward<S>(dout, x, weight, mean, rstd, dx, dweight, dbias, threads_);
  }
  void linear_forward(moe::ConstMatrixView<S> in, moe::ConstMatrixView<S> weight, const S* bias,
                      moe::MatrixView<S> out) const {
    moe::nn::linear_forward<S>(in, weight, bias, out, threads_);
  }
  void linear_backward(moe::ConstMatrixView<S> in, moe::ConstMatrixView<S> dout, moe::ConstMatrixView<S> weight,
                       moe::MatrixView<S> din, moe::MatrixView<S> dweight, S* dbias,
                       moe::nn::GradInto din_into = moe::nn::GradInto::add) const {
    moe::nn::linear_backward<S>(in, dout, weight, din, dweight, dbias, threads_, din_into);
  }
  // The attention's cache for its backward: the [B, heads, T, T] probabilities.
  Index attention_cache_size(Index B, Index T, Index heads, Index /*channels*/) const { return B * heads * T * T; }
  void attention_forward(moe::ConstMatrixView<S> qkv, Index B, Index T, Index heads, bool causal,
                         moe::MatrixView<S> out, S* att) const {
    moe::nn::attention_forward<S>(qkv, B, T, heads, causal, out, att, threads_);
  }
  // out (the forward's): unused here, as the cache holds the probabilities.
  void attention_backward(moe::ConstMatrixView<S> dout, moe::ConstMatrixView<S> qkv, moe::ConstMatrixView<S> /*out*/,
                          const S* att, Index B, Index T, Index heads, bool causal, moe::MatrixView<S> dqkv,
                          moe::nn::GradInto into = moe::nn::GradInto::add) const {
    moe::nn::attention_backward<S>(dout, qkv, att, B, T, heads, causal, dqkv, threads_, into);
  }
  // row_stats: unused here (the CPU's backward recomputes the softmax statistics).
  double cross_entropy_forward(moe::ConstMatrixView<S> logits, std::span<const std::int32_t> targets, S* losses,
                               Stat* /*row_stats*/ = nullptr) const {
    return moe::nn::cross_entropy_forward<S>(logits, targets, losses, threads_);
  }
  void cross_entropy_backward(moe::ConstMatrixView<S> logits, std::span<const std::int32_t> targets, double dloss,
                              moe::MatrixView<S> dlogits, const Stat* /*row_stats*/ = nullptr) const {
    moe::nn::cross_entropy_backward<S>(logits, targets, dloss, dlogits, threads_);
  }
  void add(moe::ConstMatrixView<S> src, moe::MatrixView<S> dst) const { backend_.add(src, dst); }
  void gelu_forward(moe::ConstMatrixView<S> in, moe::MatrixView<S> out) const { backend_.gelu_forward(in, out); }
  void gelu_backward(moe::ConstMatrixView<S> in, moe::ConstMatrixView<S> dout, moe::MatrixView<S> din) const {
    backend_.gelu_backward(in, dout, din);
  }

  // ---- training -----------------------------------------------------------------------------
  void scale_gradients(std::vector<moe::ParamRef<S>>& params, float factor) const {
    moe::nn::detail::check_scale_distinct("scale_gradients", params);
    for (auto& p : params)
      for (S& g : p.grad) g *= factor;
  }
  double clip_grad_norm(std::vector<moe::ParamRef<S>>& params, double max_norm) const {
    return moe::nn::clip_grad_norm(params, max_norm, threads_);
  }

 private:
  int threads_ = 1;
  Backend backend_{1};
};

}  // namespace examples
