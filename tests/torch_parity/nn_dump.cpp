// tests/torch_parity/nn_dump.cpp: runs the fp32 building blocks of moe/nn.hpp (layernorm, linear,
// embedding, attention, cross-entropy, AdamW) on small random inputs and writes everything a
// PyTorch re-implementation needs to check them (tests/torch_parity/parity.py, test
// torch_parity_nn).
//
// Usage: moe_torch_parity_nn_dump OUTPUT_DIR
//
// OUTPUT_DIR/manifest.txt, one record per line, space-separated (the format of dump.cpp, minus
// the param records):
//   case   NAME kind=KIND KEY=VALUE ...          KIND: layernorm, linear, embedding, attention,
//                                                cross_entropy, adamw
//   tensor NAME TENSOR FILE NDIM D0 D1 ...       FILE: raw little-endian float32, row-major
//   scalar NAME KEY VALUE
// Integer inputs (token ids, targets) are written as float32 tensors (exact below 2^24).
//
// The backward passes add (+=) into the caller's gradient buffers: each such buffer starts from
// a random "prior" (dumped as NAME.prior) so the test checks the accumulation, not just the
// gradient. cross_entropy_backward writes its dlogits: that buffer starts from garbage, which
// must be overwritten.
#include <moe/nn.hpp>

#include "manifest_writer.hpp"
#include <moe/random.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

static_assert(std::endian::native == std::endian::little, "the dump format is little-endian float32");

namespace fs = std::filesystem;
using moe::Index;
using Vec = std::vector<float>;

constexpr int kThreads = 2;

using parity::Writer;

// n values mean + std * N(0, 1) from this program's stream.
Vec random(std::size_t n, std::uint64_t seed, std::uint64_t stream, double std_dev = 1.0, double mean = 0.0) {
  Vec v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = float(mean + std_dev * moe::random::normal(seed, 5000 + stream, i));
  return v;
}

Vec filled(std::size_t n, float value = 0.0f) { return Vec(n, value); }

moe::MatrixView<float> view(Vec& v, Index rows, Index cols) { return {v.data(), rows, cols}; }
moe::ConstMatrixView<float> cview(const Vec& v, Index rows, Index cols) { return {v.data(), rows, cols}; }

void layernorm_case(Writer& out, const std::string& kase, Index T, Index C, double x_mean, std::uint64_t seed) {
  const Vec x = random(std::size_t(T * C), seed, 1, 1.5, x_mean);  // |mean| >> std: the two-pass variance
  const Vec weight = random(std::size_t(C), seed, 2, 0.2, 1.0);
  const Vec bias = random(std::size_t(C), seed, 3, 0.1);
  const Vec dout = random(std::size_t(T * C), seed, 4);
  Vec y = filled(std::size_t(T * C)), mean = filled(std::size_t(T)), rstd = filled(std::size_t(T));
  moe::nn::layernorm_forward<float>(cview(x, T, C), weight.data(), bias.data(), view(y, T, C), mean.data(),
                                    rstd.data(), kThreads);
  const Vec dx_prior = random(std::size_t(T * C), seed, 5, 0.5), dw_prior = random(std::size_t(C), seed, 6, 0.5),
            db_prior = random(std::size_t(C), seed, 7, 0.5);
  Vec dx = dx_prior, dweight = dw_prior, dbias = db_prior;
  moe::nn::layernorm_backward<float>(cview(dout, T, C), cview(x, T, C), weight.data(), mean.data(), rstd.data(),
                                     view(dx, T, C), dweight.data(), dbias.data(), kThreads);
  out.line("case " + kase + " kind=layernorm rows=" + std::to_string(T) + " cols=" + std::to_string(C));
  out.tensor(kase, "x", {T, C}, x);
  out.tensor(kase, "weight", {C}, weight);
  out.tensor(kase, "bias", {C}, bias);
  out.tensor(kase, "dout", {T, C}, dout);
  out.tensor(kase, "out", {T, C}, y);
  out.tensor(kase, "mean", {T}, mean);
  out.tensor(kase, "rstd", {T}, rstd);
  out.tensor(kase, "dx", {T, C}, dx);
  out.tensor(kase, "dx.prior", {T, C}, dx_prior);
  out.tensor(kase, "dweight", {C}, dweight);
  out.tensor(kase, "dweight.prior", {C}, dw_prior);
  out.tensor(kase, "dbias", {C}, dbias);
  out.tensor(kase, "dbias.prior", {C}, db_prior);
}

void linear_case(Writer& out, const std::string& kase, Index T, Index I, Index O, std::uint64_t seed) {
  const Vec in = random(std::size_t(T * I), seed, 1);
  const Vec weight = random(std::size_t(O * I), seed, 2, 1.0 / std::sqrt(double(I)));
  const Vec bias = random(std::size_t(O), seed, 3, 0.1);
  const Vec dout = random(std::size_t(T * O), seed, 4);
  Vec y = filled(std::size_t(T * O), 12345.0f);  // written, not accumulated
  moe::nn::linear_forward<float>(cview(in, T, I), cview(weight, O, I), bias.data(), view(y, T, O), kThreads);
  const Vec din_prior = random(std::size_t(T * I), seed, 5, 0.5), dw_prior = random(std::size_t(O * I), seed, 6, 0.5),
            db_prior = random(std::size_t(O), seed, 7, 0.5);
  Vec din = din_prior, dweight = dw_prior, dbias = db_prior;
  moe::nn::linear_backward<float>(cview(in, T, I), cview(dout, T, O), cview(weight, O, I), view(din, T, I),
                                  view(dweight, O, I), dbias.data(), kThreads);
  out.line("case " + kase + " kind=linear rows=" + std::to_string(T) + " in=" + std::to_string(I) +
           " out=" + std::to_string(O));
  out.tensor(kase, "in", {T, I}, in);
  out.tensor(kase, "weight", {O, I}, weight);
  out.tensor(kase, "bias", {O}, bias);
  out.tensor(kase, "dout", {T, O}, dout);
  out.tensor(kase, "out", {T, O}, y);
  out.tensor(kase, "din", {T, I}, din);
  out.tensor(kase, "din.prior", {T, I}, din_prior);
  out.tensor(kase, "dweight", {O, I}, dweight);
  out.tensor(kase, "dweight.prior", {O, I}, dw_prior);
  out.tensor(kase, "dbias", {O}, dbias);
  out.tensor(kase, "dbias.prior", {O}, db_prior);
}

void embedding_case(Writer& out, const std::string& kase, Index B, Index T, Index V, Index max_T, Index C,
                    std::uint64_t seed) {
  // Ids from the first half of the vocabulary only: many repeats, and rows of dwte that get no
  // gradient at all (they must keep their prior).
  std::vector<std::int32_t> tokens(static_cast<std::size_t>(B * T));
  for (std::size_t i = 0; i < tokens.size(); ++i)
    tokens[i] = std::int32_t(moe::random::uniform(seed, 5100, i) * double(V / 2)) % std::int32_t(V / 2);
  const Vec wte = random(std::size_t(V * C), seed, 1), wpe = random(std::size_t(max_T * C), seed, 2, 0.5);
  const Vec dout = random(std::size_t(B * T * C), seed, 3);
  Vec y = filled(std::size_t(B * T * C));
  moe::nn::embedding_forward<float>(tokens, B, T, cview(wte, V, C), cview(wpe, max_T, C), view(y, B * T, C),
                                    kThreads);
  const Vec dwte_prior = random(std::size_t(V * C), seed, 4, 0.5), dwpe_prior = random(std::size_t(max_T * C), seed, 5, 0.5);
  Vec dwte = dwte_prior, dwpe = dwpe_prior;
  moe::nn::embedding_backward<float>(cview(dout, B * T, C), tokens, B, T, view(dwte, V, C), view(dwpe, max_T, C),
                                     kThreads);
  out.line("case " + kase + " kind=embedding batch=" + std::to_string(B) + " seq=" + std::to_string(T) +
           " vocab=" + std::to_string(V) + " max_seq=" + std::to_string(max_T) + " channels=" + std::to_string(C));
  out.ids(kase, "tokens", tokens);
  out.tensor(kase, "wte", {V, C}, wte);
  out.tensor(kase, "wpe", {max_T, C}, wpe);
  out.tensor(kase, "dout", {B * T, C}, dout);
  out.tensor(kase, "out", {B * T, C}, y);
  out.tensor(kase, "dwte", {V, C}, dwte);
  out.tensor(kase, "dwte.prior", {V, C}, dwte_prior);
  out.tensor(kase, "dwpe", {max_T, C}, dwpe);
  out.tensor(kase, "dwpe.prior", {max_T, C}, dwpe_prior);
}

void attention_case(Writer& out, const std::string& kase, Index B, Index T, Index heads, Index hs, bool causal,
                    std::uint64_t seed) {
  const Index C = heads * hs;
  const Vec qkv = random(std::size_t(B * T * 3 * C), seed, 1);
  const Vec dout = random(std::size_t(B * T * C), seed, 2);
  Vec y = filled(std::size_t(B * T * C)), att = filled(std::size_t(B * heads * T * T), 777.0f);
  moe::nn::attention_forward<float>(cview(qkv, B * T, 3 * C), B, T, heads, causal, view(y, B * T, C), att.data(),
                                    kThreads);
  const Vec dqkv_prior = random(std::size_t(B * T * 3 * C), seed, 3, 0.5);
  Vec dqkv = dqkv_prior;
  moe::nn::attention_backward<float>(cview(dout, B * T, C), cview(qkv, B * T, 3 * C), att.data(), B, T, heads, causal,
                                     view(dqkv, B * T, 3 * C), kThreads);
  out.line("case " + kase + " kind=attention batch=" + std::to_string(B) + " seq=" + std::to_string(T) +
           " heads=" + std::to_string(heads) + " head_size=" + std::to_string(hs) +
           " causal=" + (causal ? "1" : "0"));
  out.tensor(kase, "qkv", {B * T, 3 * C}, qkv);
  out.tensor(kase, "dout", {B * T, C}, dout);
  out.tensor(kase, "out", {B * T, C}, y);
  out.tensor(kase, "att", {B, heads, T, T}, att);
  out.tensor(kase, "dqkv", {B * T, 3 * C}, dqkv);
  out.tensor(kase, "dqkv.prior", {B * T, 3 * C}, dqkv_prior);
}

void cross_entropy_case(Writer& out, const std::string& kase, Index N, Index V, double dloss, std::uint64_t seed) {
  const Vec logits = random(std::size_t(N * V), seed, 1, 3.0, 5.0);  // offset: the max subtraction matters
  std::vector<std::int32_t> targets(static_cast<std::size_t>(N));
  for (Index r = 0; r < N; ++r)
    targets[std::size_t(r)] =
        r % 5 == 3 ? moe::nn::kIgnoreTarget
                   : std::int32_t(moe::random::uniform(seed, 5200, std::uint64_t(r)) * double(V)) % std::int32_t(V);
  targets[0] = std::int32_t(V - 1);  // the last class, once
  Vec losses = filled(std::size_t(N), 99.0f);
  const double loss =
      moe::nn::cross_entropy_forward<float>(cview(logits, N, V), targets, losses.data(), kThreads);
  Vec dlogits = filled(std::size_t(N * V), -1000.0f);  // garbage: backward writes, it must not add
  moe::nn::cross_entropy_backward<float>(cview(logits, N, V), targets, dloss, view(dlogits, N, V), kThreads);
  // The documented aliasing: dlogits may be logits itself.
  Vec in_place = logits;
  moe::nn::cross_entropy_backward<float>(cview(in_place, N, V), targets, dloss, view(in_place, N, V), kThreads);
  out.line("case " + kase + " kind=cross_entropy rows=" + std::to_string(N) + " vocab=" + std::to_string(V));
  char text[64];
  std::snprintf(text, sizeof text, "%.17g", dloss);
  out.scalar(kase, "dloss", text);
  std::snprintf(text, sizeof text, "%.17g", loss);
  out.scalar(kase, "loss", text);
  out.tensor(kase, "logits", {N, V}, logits);
  out.ids(kase, "targets", targets);
  out.tensor(kase, "losses", {N}, losses);
  out.tensor(kase, "dlogits", {N, V}, dlogits);
  out.tensor(kase, "dlogits.in_place", {N, V}, in_place);
}

void adamw_case(Writer& out, const std::string& kase, Index rows, Index cols, std::uint64_t seed) {
  const moe::nn::AdamWConfig config{.lr = 0.05, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1};
  const double lr2 = 0.02;  // the second step takes a scheduled rate
  const Vec w0 = random(std::size_t(rows * cols), seed, 1, 0.5), b0 = random(std::size_t(cols), seed, 2, 0.5);
  const Vec gw1 = random(std::size_t(rows * cols), seed, 3), gb1 = random(std::size_t(cols), seed, 4);
  const Vec gw2 = random(std::size_t(rows * cols), seed, 5, 0.3), gb2 = random(std::size_t(cols), seed, 6, 2.0);
  Vec w = w0, b = b0, gw = gw1, gb = gb1;
  std::vector<moe::ParamRef<float>> params{
      {"weight", {rows, cols}, std::span<float>(w), std::span<float>(gw), true},
      {"bias", {cols}, std::span<float>(b), std::span<float>(gb), true},
  };
  moe::nn::AdamW<float> optimizer(config);
  optimizer.step(params);
  const Vec w1 = w, b1 = b;
  gw = gw2;
  gb = gb2;
  optimizer.step(params, lr2);

  out.line("case " + kase + " kind=adamw rows=" + std::to_string(rows) + " cols=" + std::to_string(cols));
  char text[64];
  for (auto [key, value] : {std::pair{"lr", config.lr}, {"lr2", lr2}, {"beta1", config.beta1}, {"beta2", config.beta2},
                            {"eps", config.eps}, {"weight_decay", config.weight_decay}}) {
    std::snprintf(text, sizeof text, "%.17g", value);
    out.scalar(kase, key, text);
  }
  out.tensor(kase, "weight.0", {rows, cols}, w0);
  out.tensor(kase, "bias.0", {cols}, b0);
  out.tensor(kase, "weight.grad.1", {rows, cols}, gw1);
  out.tensor(kase, "bias.grad.1", {cols}, gb1);
  out.tensor(kase, "weight.grad.2", {rows, cols}, gw2);
  out.tensor(kase, "bias.grad.2", {cols}, gb2);
  out.tensor(kase, "weight.1", {rows, cols}, w1);
  out.tensor(kase, "bias.1", {cols}, b1);
  out.tensor(kase, "weight.2", {rows, cols}, w);
  out.tensor(kase, "bias.2", {cols}, b);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUTPUT_DIR\n", argv[0]);
    return 2;
  }
  try {
    const fs::path dir = argv[1];
    fs::create_directories(dir);
    Writer out(dir);

    layernorm_case(out, "layernorm", 37, 48, 0.0, 71);
    layernorm_case(out, "layernorm_offset", 29, 67, 40.0, 72);  // |mean| >> std, odd width

    linear_case(out, "linear", 33, 40, 24, 81);
    linear_case(out, "linear_large", 130, 150, 97, 82);  // several GEMM tiles, ragged edges

    embedding_case(out, "embedding", 3, 7, 13, 9, 16, 91);  // T < max_T: rows >= T of dwpe untouched

    attention_case(out, "attention_causal", 2, 70, 3, 8, true, 101);  // T crosses the 64-row block
    attention_case(out, "attention_bidirectional", 2, 70, 3, 8, false, 102);
    attention_case(out, "attention_causal_small", 3, 5, 2, 4, true, 103);

    cross_entropy_case(out, "cross_entropy", 23, 37, 1.0, 111);
    cross_entropy_case(out, "cross_entropy_scaled", 40, 101, 0.7, 112);  // dloss != 1

    adamw_case(out, "adamw", 6, 9, 121);

    out.finish();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe_torch_parity_nn_dump: %s\n", e.what());
    return 1;
  }
  return 0;
}
