// tests/reference.hpp: a plain float64 MoE layer, token by token, no grouping, no threads: the
// higher-precision reference the library's layer is checked against. Routing decisions use the
// contract functions of moe/routing.hpp (selection, robust softmax, dispatch order).
#pragma once

#include <moe/moe.hpp>

#include <map>
#include <random>
#include <string>
#include <vector>

namespace ref {

using moe::Index;
using Matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

enum class ExpertKind { gelu_mlp, swiglu };

// A layer's parameters by name, widened to double.
using Params = std::map<std::string, std::vector<double>>;

template <class Layer>
Params params_of(Layer& layer) {
  Params out;
  for (auto& p : layer.parameters()) out[p.name].assign(p.value.begin(), p.value.end());
  return out;
}
template <class Layer>
Params grads_of(Layer& layer) {
  Params out;
  for (auto& p : layer.parameters())
    if (!p.grad.empty()) out[p.name].assign(p.grad.begin(), p.grad.end());
  return out;
}

struct Result {
  Matrix y;                 // [T, H]
  Matrix dx;                // [T, H]
  Matrix dlogits;           // [T, N]
  Params grads;             // expert (and router, if given) gradients
};

// y = MoE(x) and its gradients for loss = sum(y .* dy). logits [T, N] are the gate's output;
// the caller maps dlogits back through its gate.
inline Result moe_layer(const Matrix& x, const Matrix& logits, const Params& p, const moe::LayerConfig& c,
                        ExpertKind kind, const Matrix& dy) {
  const Index T = x.rows(), H = c.hidden, F = c.ffn, N = c.experts, k = c.top_k;
  Result r;
  r.y = Matrix::Zero(T, H);
  r.dx = Matrix::Zero(T, H);
  r.dlogits = Matrix::Zero(T, N);
  for (auto& [name, v] : p) r.grads[name] = std::vector<double>(v.size(), 0.0);

  // Routing with the contract functions, in double.
  moe::RoutingPlan plan;
  std::vector<double> weights(T * k);
  moe::route<double>(moe::ConstMatrixView<double>(logits.data(), T, N), k, c.weights, c.capacity_factor, plan,
                     weights);
  std::vector<double> dweights(T * k, 0.0);

  for (Index t = 0; t < T; ++t) {
    for (Index j = 0; j < k; ++j) {
      const Index s = t * k + j;
      if (plan.row[s] < 0) continue;  // dropped: no contribution
      const Index e = plan.expert[s];
      const bool gelu = kind == ExpertKind::gelu_mlp;
      // Hidden activation act [F] of expert e on token t.
      std::vector<double> act(F), pre(F), g(F), u(F);
      if (gelu) {
        const auto& w1 = p.at("experts.fc.weight"); const auto& b1 = p.at("experts.fc.bias");
        for (Index f = 0; f < F; ++f) {
          double a = b1[e * F + f];
          for (Index h = 0; h < H; ++h) a += w1[(e * F + f) * H + h] * x(t, h);
          pre[f] = a, act[f] = moe::activation::gelu(a);
        }
      } else {
        const auto& wgu = p.at("experts.gate_up.weight");
        for (Index f = 0; f < F; ++f) {
          double a = 0, b = 0;
          for (Index h = 0; h < H; ++h) a += wgu[(e * 2 * F + f) * H + h] * x(t, h), b += wgu[(e * 2 * F + F + f) * H + h] * x(t, h);
          g[f] = a, u[f] = b, act[f] = moe::activation::silu(a) * b;
        }
      }
      // Output projection [H, F] (+ bias for GeluMLP), shared by both kinds.
      const std::string out_name = gelu ? "experts.proj" : "experts.down";
      const auto& w_out = p.at(out_name + ".weight");
      std::vector<double> out(H), dout(H), dact(F, 0.0);
      for (Index h = 0; h < H; ++h) {
        double a = gelu ? p.at("experts.proj.bias")[e * H + h] : 0.0;
        for (Index f = 0; f < F; ++f) a += w_out[(e * H + h) * F + f] * act[f];
        out[h] = a;
      }
      // Backward of this slot for loss = sum(y .* dy): d out = w * dy[t], d w = dy[t] . out.
      double dw = 0;
      for (Index h = 0; h < H; ++h) dw += dy(t, h) * out[h], dout[h] = weights[s] * dy(t, h);
      dweights[s] = dw;
      auto& g_out = r.grads[out_name + ".weight"];
      for (Index h = 0; h < H; ++h) {
        if (gelu) r.grads["experts.proj.bias"][e * H + h] += dout[h];
        for (Index f = 0; f < F; ++f) g_out[(e * H + h) * F + f] += dout[h] * act[f], dact[f] += dout[h] * w_out[(e * H + h) * F + f];
      }
      if (gelu) {
        const auto& w1 = p.at("experts.fc.weight");
        auto& gw1 = r.grads["experts.fc.weight"]; auto& gb1 = r.grads["experts.fc.bias"];
        for (Index f = 0; f < F; ++f) {
          const double dh = dact[f] * moe::activation::gelu_grad(pre[f]);
          gb1[e * F + f] += dh;
          for (Index h = 0; h < H; ++h) gw1[(e * F + f) * H + h] += dh * x(t, h), r.dx(t, h) += dh * w1[(e * F + f) * H + h];
        }
      } else {
        const auto& wgu = p.at("experts.gate_up.weight");
        auto& gwgu = r.grads["experts.gate_up.weight"];
        for (Index f = 0; f < F; ++f) {
          const double dg = dact[f] * u[f] * moe::activation::silu_grad(g[f]), du = dact[f] * moe::activation::silu(g[f]);
          for (Index h = 0; h < H; ++h) {
            gwgu[(e * 2 * F + f) * H + h] += dg * x(t, h);
            gwgu[(e * 2 * F + F + f) * H + h] += du * x(t, h);
            r.dx(t, h) += dg * wgu[(e * 2 * F + f) * H + h] + du * wgu[(e * 2 * F + F + f) * H + h];
          }
        }
      }
      for (Index h = 0; h < H; ++h) r.y(t, h) += weights[s] * out[h];
    }
  }
  // Router path: weights -> logits (contract), plus auxiliary losses.
  moe::MatrixView<double> dl(r.dlogits.data(), T, N);
  for (Index t = 0; t < T; ++t)
    moe::route_token_backward<double>(moe::ConstMatrixView<double>(logits.data(), T, N), t, k, c.weights, plan,
                                      dweights.data(), dl);
  moe::aux_loss_backward<double>(moe::ConstMatrixView<double>(logits.data(), T, N), plan, c.aux, {}, dl);
  return r;
}

// Max |a - b| / max(max |b|, floor): a relative error against the reference's scale.
inline double rel_error(const double* a, const double* b, std::size_t n, double floor = 1e-30) {
  double diff = 0, scale = floor;
  for (std::size_t i = 0; i < n; ++i) diff = std::max(diff, std::abs(a[i] - b[i])), scale = std::max(scale, std::abs(b[i]));
  return diff / scale;
}
template <class A>
double rel_error(const A& a, const Matrix& b) {
  const Matrix ad = a.template cast<double>();
  return rel_error(ad.data(), b.data(), std::size_t(b.size()));
}
template <class T>
double rel_error(const std::vector<T>& a, const std::vector<double>& b) {
  std::vector<double> ad(a.begin(), a.end());
  return rel_error(ad.data(), b.data(), b.size());
}

// Fresh normal matrix from a seed.
template <class S = float>
Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> randn(Index rows, Index cols, unsigned seed,
                                                                       double std_dev = 1.0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> dist(0.0, std_dev);
  Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = S(dist(gen));
  return m;
}

}  // namespace ref
