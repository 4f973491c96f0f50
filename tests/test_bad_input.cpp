// Bad input at the public entry points: every one throws moe::Error (a std::invalid_argument)
// whose message names the problem and the sizes involved, or gives the documented empty result
// (T = 0). A rejected call leaves the layer as it was.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "primitive_checks.hpp"
#include "reference.hpp"

using moe::Index;
using moe::LayerConfig;

namespace {

using Backend = moe::cpu::Backend;
using Matrix = Backend::Matrix;
template <template <class> class Gate, template <class> class Experts = moe::GeluMLP>
using Layer = moe::MoELayer<Gate, Experts, Backend>;

static_assert(std::is_base_of_v<std::invalid_argument, moe::Error>);

// The message of the moe::Error that f throws, or a marker saying what happened instead.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const moe::Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<not a moe::Error: ") + e.what() + ">";
  }
  return "<nothing thrown>";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// Every expected part must appear in the message; the message starts with "moe: ".
#define CHECK_ERROR_NAMES(message, ...)                                                          \
  do {                                                                                           \
    const std::string check_message_ = (message);                                                \
    CHECK_MESSAGE(check_message_.rfind("moe: ", 0) == 0, "message: ", check_message_);          \
    for (const std::string& check_part_ : std::vector<std::string>{__VA_ARGS__})                 \
      CHECK_MESSAGE(contains(check_message_, check_part_), "message \"", check_message_,         \
                    "\" does not contain \"", check_part_, "\"");                                 \
  } while (0)

LayerConfig good_config() { return LayerConfig{.hidden = 8, .ffn = 4, .experts = 4, .top_k = 2}; }

// The same config error from validate() and from constructing each kind of layer.
void check_config_error(const LayerConfig& config, std::vector<std::string> parts) {
  INFO("hidden=", config.hidden, " ffn=", config.ffn, " experts=", config.experts, " top_k=", config.top_k,
       " capacity_factor=", config.capacity_factor, " aux=", config.aux.load_balance, "/", config.aux.z_loss);
  const std::string from_validate = error_of([&] { moe::validate(config); });
  const std::string from_linear = error_of([&] { Layer<moe::Linear> layer(config, 1); });
  const std::string from_self = error_of([&] { Layer<moe::SelfRoute, moe::SwiGLU> layer(config, 1); });
  const std::string from_random = error_of([&] { Layer<moe::Random> layer(config, 1); });
  for (const std::string* message : {&from_validate, &from_linear, &from_self, &from_random})
    for (const std::string& part : parts)
      CHECK_MESSAGE(contains(*message, part), "message \"", *message, "\" does not contain \"", part, "\"");
  CHECK(from_linear == from_validate);  // the layer reports the config's own error first
  CHECK(from_self == from_validate);
  CHECK(from_random == from_validate);
}

Matrix finite_input(Index T, Index H, unsigned seed) { return ref::randn<float>(T, H, seed); }
Matrix zeros(Index T, Index H) { return Matrix::Zero(T, H); }

}  // namespace

TEST_CASE("bad input: layer config sizes must be positive") {
  for (Index bad : {Index(0), Index(-3)}) {
    LayerConfig c = good_config();
    c.hidden = bad;
    check_config_error(c, {"hidden size must be positive", "got " + std::to_string(bad)});
    c = good_config();
    c.ffn = bad;
    check_config_error(c, {"ffn size must be positive", "got " + std::to_string(bad)});
    c = good_config();
    c.experts = bad;
    check_config_error(c, {"number of experts must be positive", "got " + std::to_string(bad)});
  }
  LayerConfig c = good_config();
  c.experts = (Index{1} << 30) + 1;
  c.top_k = 1;
  check_config_error(c, {"number of experts 1073741825", "too large"});
  c = good_config();
  c.ffn = Index{1} << 62;  // 2F a row would overflow
  check_config_error(c, {"ffn size 4611686018427387904", "too large"});
  c = good_config();
  c.hidden = (Index{1} << 30) + 1;
  check_config_error(c, {"hidden size 1073741825", "too large"});
  c = good_config();
  c.hidden = c.ffn = Index{1} << 30;  // each allowed, their weights [N, 2F, H] not
  check_config_error(c, {"the experts' weights are too large", "N = 4", "[2147483648, 1073741824]"});
}

TEST_CASE("bad input: top_k must be in [1, N]") {
  LayerConfig c = good_config();
  c.top_k = 0;
  check_config_error(c, {"top_k must be at least 1", "got 0"});
  c.top_k = -2;
  check_config_error(c, {"top_k must be at least 1", "got -2"});
  c.top_k = 5;  // N = 4
  check_config_error(c, {"top_k = 5", "number of experts N = 4"});
  c.experts = 1, c.top_k = 2;
  check_config_error(c, {"top_k = 2", "N = 1"});
  c.top_k = 1;
  CHECK_NOTHROW(moe::validate(c));  // k = N = 1 is fine
}

TEST_CASE("bad input: negative or NaN capacity factor and auxiliary loss weights") {
  LayerConfig c = good_config();
  c.capacity_factor = -0.5;
  check_config_error(c, {"capacity_factor must be finite and >= 0", "-0.5"});
  c.capacity_factor = std::numeric_limits<double>::quiet_NaN();
  check_config_error(c, {"capacity_factor must be finite and >= 0"});

  c = good_config();
  c.aux.load_balance = -0.01;
  check_config_error(c, {"auxiliary loss weights must be finite and >= 0"});
  c = good_config();
  c.aux.z_loss = -1;
  check_config_error(c, {"auxiliary loss weights must be finite and >= 0"});
  c = good_config();
  c.aux.z_loss = std::numeric_limits<double>::quiet_NaN();
  check_config_error(c, {"auxiliary loss weights must be finite and >= 0"});

  c = good_config();
  c.aux.load_balance = std::numeric_limits<double>::infinity();
  check_config_error(c, {"auxiliary loss weights must be finite and >= 0", "load_balance = inf"});
  c = good_config();
  c.aux.z_loss = std::numeric_limits<double>::infinity();
  check_config_error(c, {"auxiliary loss weights must be finite and >= 0", "z_loss = inf"});

  c = good_config();
  c.capacity_factor = 0;  // dropless and the aux losses off are the defaults, not errors
  c.aux = {0, 0};
  CHECK_NOTHROW(moe::validate(c));
  // The standard library's exception type catches it too.
  c.top_k = 0;
  CHECK_THROWS_AS(moe::validate(c), std::invalid_argument);
  CHECK_THROWS_WITH_AS(moe::validate(c), doctest::Contains("top_k"), moe::Error);
}

TEST_CASE("bad input: SelfRoute needs N <= H and offset + N <= H") {
  LayerConfig c{.hidden = 4, .ffn = 4, .experts = 8, .top_k = 2};
  CHECK_ERROR_NAMES(error_of([&] { Layer<moe::SelfRoute> layer(c, 1); }), "SelfRoute", "N = 8", "H = 4");

  c = LayerConfig{.hidden = 8, .ffn = 4, .experts = 4, .top_k = 2};
  using Options = moe::SelfRoute<Backend>::Options;
  CHECK_ERROR_NAMES(error_of([&] { Layer<moe::SelfRoute> layer(c, 1, Options{.offset = 5}); }), "SelfRoute offset 5",
                    "N = 4", "H = 8");
  CHECK_ERROR_NAMES(error_of([&] { Layer<moe::SelfRoute> layer(c, 1, Options{.offset = 8}); }), "offset 8");
  // The edges are fine: the last N coordinates, explicitly or by default, and the first N.
  CHECK(Layer<moe::SelfRoute>(c, 1, Options{.offset = 4}).gate().offset() == 4);
  CHECK(Layer<moe::SelfRoute>(c, 1).gate().offset() == 4);
  CHECK(Layer<moe::SelfRoute>(c, 1, Options{.offset = 0}).gate().offset() == 0);
  c.hidden = c.experts = 4;  // H = N: the logits are the whole input
  CHECK(Layer<moe::SelfRoute>(c, 1).gate().offset() == 0);
}

TEST_CASE("bad input: forward with the wrong input width, output shape or mask length") {
  Layer<moe::Linear> layer(good_config(), 3);
  const Matrix x5 = finite_input(4, 5, 1);
  CHECK_ERROR_NAMES(error_of([&] { layer.forward(x5); }), "input has 5 columns", "hidden size is 8");
  const Matrix x12 = finite_input(4, 12, 1);
  CHECK_ERROR_NAMES(error_of([&] { layer.forward(x12); }), "12", "8");

  const Matrix x = finite_input(4, 8, 2);
  Matrix y(3, 8);
  CHECK_ERROR_NAMES(error_of([&] { layer.forward_into(x, y); }), "output is [3, 8]", "expected [4, 8]");
  Matrix y2(4, 7);
  CHECK_ERROR_NAMES(error_of([&] { layer.forward_into(x, y2); }), "output is [4, 7]", "expected [4, 8]");

  const std::vector<std::uint8_t> short_mask = {1, 0, 1};
  CHECK_ERROR_NAMES(error_of([&] { layer.forward(x, {.token_mask = short_mask}); }), "token mask has 3 entries",
                    "4 tokens");
  const std::vector<std::uint8_t> long_mask = {1, 1, 1, 1, 1};
  CHECK_ERROR_NAMES(error_of([&] { layer.forward(x, {.token_mask = long_mask}); }), "token mask has 5 entries",
                    "4 tokens");
  // Nothing was run: no statistics, no pending backward.
  CHECK(layer.stats().tokens == 0);
  CHECK_ERROR_NAMES(error_of([&] { const Matrix z = zeros(4, 8); layer.backward(z); }), "backward needs a forward first");

  // The right mask length works (and an empty mask means every token).
  const std::vector<std::uint8_t> mask = {1, 0, 1, 1};
  CHECK_NOTHROW(layer.forward(x, {.token_mask = mask}));
  CHECK(layer.stats().tokens == 3);
}

TEST_CASE("bad input: backward before forward, twice after one forward, with the wrong shapes") {
  Layer<moe::Linear> layer(good_config(), 4);
  CHECK_ERROR_NAMES(error_of([&] { const Matrix z = zeros(4, 8); layer.backward(z); }), "backward needs a forward first");

  const Matrix x = finite_input(4, 8, 5), dy = finite_input(4, 8, 6);
  layer.forward(x);
  CHECK_ERROR_NAMES(error_of([&] { const Matrix z = zeros(3, 8); layer.backward(z); }), "output gradient is [3, 8]",
                    "last forward's output is [4, 8]");
  CHECK_ERROR_NAMES(error_of([&] { const Matrix z = zeros(4, 9); layer.backward(z); }), "output gradient is [4, 9]", "[4, 8]");
  Matrix dx_bad(4, 3);
  CHECK_ERROR_NAMES(error_of([&] { layer.backward_into(dy, dx_bad); }), "input gradient is [4, 3]",
                    "expected [4, 8]");

  // The rejected calls did not consume the forward: the right one still runs, once.
  Matrix dx;
  CHECK_NOTHROW(dx = layer.backward(dy));
  CHECK(dx.rows() == 4);
  CHECK(dx.cols() == 8);
  CHECK_ERROR_NAMES(error_of([&] { layer.backward(dy); }), "backward needs a forward first",
                    "once per forward");
  // A new forward allows a new backward.
  layer.forward(x);
  CHECK_NOTHROW(layer.backward(dy));
}

TEST_CASE("bad input: a rejected forward leaves the previous forward's state intact") {
  // Two identical layers see the same forward; one also gets rejected calls in between. Their
  // backward results must agree bit for bit.
  const LayerConfig c{.hidden = 8, .ffn = 4, .experts = 4, .top_k = 2, .aux = {.load_balance = 0.01, .z_loss = 0.001}};
  Layer<moe::Linear> a(c, 9), b(c, 9);
  const Matrix x = finite_input(6, 8, 7), dy = finite_input(6, 8, 8);
  const Matrix ya = a.forward(x), yb = b.forward(x);
  CHECK(ya == yb);
  const Matrix other = finite_input(5, 8, 10), narrow = finite_input(6, 7, 11);
  const std::vector<std::uint8_t> bad_mask = {1, 1};
  Matrix bad_y(5, 7);
  CHECK_THROWS_AS(b.forward(narrow), moe::Error);
  CHECK_THROWS_AS(b.forward_into(other, bad_y), moe::Error);
  CHECK_THROWS_AS(b.forward(other, {.token_mask = bad_mask}), moe::Error);
  CHECK(b.stats().tokens == a.stats().tokens);
  CHECK(b.aux_loss() == a.aux_loss());
  const Matrix dxa = a.backward(dy), dxb = b.backward(dy);
  CHECK(dxa == dxb);
  const ref::Params ga = ref::grads_of(a), gb = ref::grads_of(b);
  CHECK(ga == gb);
}

namespace {
// T = 0 through a layer: an empty [0, H] output and input gradient, parameter gradients left at
// zero, statistics and auxiliary losses untouched.
template <template <class> class Gate, template <class> class Experts>
void check_empty_batch(double capacity_factor) {
  const LayerConfig c{.hidden = 8, .ffn = 4, .experts = 4, .top_k = 2, .capacity_factor = capacity_factor,
                      .aux = {.load_balance = 0.01, .z_loss = 0.001}};
  Layer<Gate, Experts> layer(c, 12);
  // A real batch first, so that the statistics are not trivially zero.
  const Matrix x = finite_input(5, 8, 13);
  layer.forward(x);
  const Matrix dy = finite_input(5, 8, 14);
  layer.backward(dy);
  layer.zero_grad();
  const moe::RoutingStats before = layer.stats();
  REQUIRE(before.tokens == 5);

  const Matrix empty(0, 8);
  Matrix y;
  REQUIRE_NOTHROW(y = layer.forward(empty));
  CHECK(y.rows() == 0);
  CHECK(y.cols() == 8);
  CHECK(layer.aux_loss() == 0.0);
  const moe::RoutingStats& after = layer.stats();
  CHECK(after.tokens == before.tokens);
  CHECK(after.slots == before.slots);
  CHECK(after.dropped_slots == before.dropped_slots);
  CHECK(after.assignments == before.assignments);
  CHECK(after.rows_with_nonfinite == before.rows_with_nonfinite);
  CHECK(after.rows_without_finite == before.rows_without_finite);
  const moe::RoutingPlan& plan = layer.last_plan();
  CHECK(plan.tokens == 0);
  CHECK(plan.rows() == 0);
  CHECK(plan.dropped_slots == 0);
  CHECK(plan.expert_offsets == std::vector<Index>(5, 0));
  CHECK(layer.last_weights().empty());

  // forward_into an empty view, with an empty mask, works too.
  Matrix y2(0, 8);
  const std::vector<std::uint8_t> no_mask;
  CHECK_NOTHROW(layer.forward_into(empty, y2, {.token_mask = no_mask}));

  Matrix dx;
  const Matrix empty_dy(0, 8);
  REQUIRE_NOTHROW(dx = layer.backward(empty_dy));
  CHECK(dx.rows() == 0);
  CHECK(dx.cols() == 8);
  for (const auto& p : layer.parameters()) {
    INFO(p.name);
    bool all_zero = true;
    for (float g : p.grad) all_zero = all_zero && g == 0.f;
    CHECK(all_zero);
  }
  // Still once per forward.
  CHECK_THROWS_AS(layer.backward(empty_dy), moe::Error);
}
}  // namespace

TEST_CASE("bad input: T = 0 gives an empty output and empty gradients for every gate") {
  for (double cf : {0.0, 1.0}) {
    CAPTURE(cf);
    {
      INFO("gate: linear");
      check_empty_batch<moe::Linear, moe::GeluMLP>(cf);
    }
    {
      INFO("gate: fixed random");
      check_empty_batch<moe::FixedRandom, moe::GeluMLP>(cf);
    }
    {
      INFO("gate: random");
      check_empty_batch<moe::Random, moe::SwiGLU>(cf);
    }
    {
      INFO("gate: self route");
      check_empty_batch<moe::SelfRoute, moe::GeluMLP>(cf);
      check_empty_batch<moe::SelfRoute, moe::SwiGLU>(cf);
    }
  }
  // Empty batches through the reference routing and the backend's routing.
  moe::RoutingPlan plan;
  std::vector<float> weights;
  moe::route<float>(moe::ConstMatrixView<float>(nullptr, 0, 4), 2, moe::RoutingWeights::softmax_over_top_k, 1.0, plan,
                    weights);
  CHECK(plan.rows() == 0);
  CHECK(plan.expert.empty());
  Backend().route(moe::ConstMatrixView<float>(nullptr, 0, 4), good_config(), plan, weights);
  CHECK(plan.rows() == 0);
  CHECK(weights.empty());
}

TEST_CASE("bad input: backend thread count must be >= 1") {
  Backend backend(1);
  CHECK_ERROR_NAMES(error_of([&] { backend.set_threads(0); }), "thread count must be >= 1", "got 0");
  CHECK_ERROR_NAMES(error_of([&] { backend.set_threads(-4); }), "got -4");
  CHECK(backend.threads() == 1);  // unchanged by the rejected calls
  CHECK_ERROR_NAMES(error_of([] { Backend b(0); }), "thread count must be >= 1");
  CHECK_ERROR_NAMES(error_of([] { moe::cpu::Backend64 b(-1); }), "got -1");
  backend.set_threads(2);
  CHECK(backend.threads() == 2);
}

// A capacity factor of +inf (or one so large that ceil(cf * T * k / N) does not fit an Index)
// asks for "no limit". It must either be rejected with a clear error or act as dropless, never
// turn into a garbage capacity. The layer is only run when the capacity is sane, so a failure
// here is a failed check, not a crash (except under Clang's UBSan, whose float-cast-overflow
// check stops at the conversion itself).
TEST_CASE("bad input: an infinite or huge capacity factor is rejected or dropless") {
  for (double cf : {std::numeric_limits<double>::infinity(), 1e300, 1e19}) {
    CAPTURE(cf);
    const Index T = 6, N = 4, k = 2;
    LayerConfig c{.hidden = 8, .ffn = 4, .experts = N, .top_k = k, .capacity_factor = cf};
    const std::string message = error_of([&] { moe::validate(c); });
    if (message != "<nothing thrown>") {
      CHECK_ERROR_NAMES(message, "capacity_factor");
      continue;
    }
    const Index capacity = moe::expert_capacity(T, k, N, cf);
    CHECK(capacity == T * k);
    if (capacity != T * k) continue;
    Layer<moe::Linear> layer(c, 1);
    const Matrix x = finite_input(T, 8, 2);
    layer.forward(x);
    CHECK(layer.last_plan().capacity == T * k);
    CHECK(layer.last_plan().dropped_slots == 0);
    CHECK(layer.last_plan().rows() == T * k);
  }
}

// An offset so large that offset + N would overflow must be rejected, not wrap around and pass
// the check (the gate would then read far outside the input).
TEST_CASE("bad input: a SelfRoute offset near the Index maximum is rejected") {
  const LayerConfig c{.hidden = 8, .ffn = 4, .experts = 4, .top_k = 2};
  using Options = moe::SelfRoute<Backend>::Options;
  for (Index offset : {std::numeric_limits<Index>::max(), std::numeric_limits<Index>::max() - 2}) {
    CAPTURE(offset);
    CHECK_ERROR_NAMES(error_of([&] { Layer<moe::SelfRoute> layer(c, 1, Options{.offset = offset}); }),
                      "SelfRoute offset", "H = 8");
  }
}

TEST_CASE("bad input: views with a negative extent, overlapping rows or no data are refused by name") {
  Layer<moe::SelfRoute> layer(good_config(), 3);
  Matrix x = finite_input(4, 8, 12), y(4, 8), dx(4, 8);
  using View = moe::MatrixView<float>;
  CHECK_ERROR_NAMES(error_of([&] { layer.forward_into(View(x.data(), -1, 8), View(y.data(), -1, 8)); }),
                    "MoELayer forward", "input is [-1, 8]", "negative extent");
  CHECK_ERROR_NAMES(error_of([&] { layer.forward_into(View(x.data(), 4, 8, -8), y); }), "input is [4, 8]",
                    "row stride -8", "rows would overlap");
  CHECK_ERROR_NAMES(error_of([&] { layer.forward_into(x, View(y.data(), 4, 8, 4)); }), "output is [4, 8]",
                    "row stride 4");
  CHECK_ERROR_NAMES(error_of([&] { layer.forward_into(View(nullptr, 4, 8), y); }), "input is [4, 8]",
                    "no data (null pointer)");
  CHECK_ERROR_NAMES(error_of([&] { layer.forward(View(x.data(), -1, 8)); }), "input is [-1, 8]");
  CHECK_NOTHROW(layer.forward_into(View(nullptr, 0, 8), View(nullptr, 0, 8)));  // empty: no data needed
  layer.forward_into(x, y);
  CHECK_ERROR_NAMES(error_of([&] { layer.backward_into(View(nullptr, 4, 8), dx); }), "MoELayer backward",
                    "output gradient is [4, 8]", "no data");
  CHECK_ERROR_NAMES(error_of([&] { layer.backward(View(y.data(), -4, 8)); }), "output gradient is [-4, 8]");
  CHECK_NOTHROW(layer.backward_into(y, dx));  // the refused calls did not take the forward
}

TEST_CASE("views: overlaps() is exact for one row stride (column blocks of one matrix do not overlap)") {
  Matrix m = Matrix::Zero(6, 10);
  const moe::MatrixView<float> all(m);
  CHECK(moe::overlaps(all, all));
  CHECK_FALSE(moe::overlaps(all.col_block(0, 5), all.col_block(5, 5)));
  CHECK(moe::overlaps(all.col_block(0, 6), all.col_block(5, 5)));
  CHECK_FALSE(moe::overlaps(all.row_block(0, 3), all.row_block(3, 3)));
  CHECK(moe::overlaps(all.row_block(0, 4), all.row_block(3, 3)));
  CHECK(moe::overlaps(all.row_block(2, 1).col_block(9, 1), all.row_block(2, 2).col_block(9, 1)));
  CHECK_FALSE(moe::overlaps(all.row_block(2, 1).col_block(9, 1), all.row_block(3, 2).col_block(0, 9)));
  CHECK(moe::overlaps(all.row_block(2, 1).col_block(9, 1), all.row_block(1, 2).col_block(9, 1)));
  CHECK_FALSE(moe::overlaps(all.row_block(0, 0), all));                             // empty
  CHECK(moe::overlaps(moe::MatrixView<float>(m.data() + 3, 2, 4, 5), all.col_block(0, 1)));  // other strides: ranges
  Matrix other = Matrix::Zero(6, 10);
  CHECK_FALSE(moe::overlaps(all, moe::MatrixView<float>(other)));
}

TEST_CASE("bad input: a copy of a layer keeps its parameters but not its forward") {
  // The forward's logits are a view into the original (SelfRoute's: of its input copy; Linear's: of
  // its gate's buffer): a copy that kept it would read freed or replaced memory in its backward.
  const Matrix x = finite_input(5, 8, 13), dy = finite_input(5, 8, 14);
  auto check_copy = [&](auto& layer) {
    layer.forward(x);
    auto copy = layer;
    CHECK_ERROR_NAMES(error_of([&] { copy.backward(dy); }), "backward needs a forward first",
                      "a copy of a layer keeps no forward");
    CHECK(copy.last_logits().rows == 0);
    const Matrix dx = layer.backward(dy);  // the original's forward is its own
    copy.zero_grad();
    layer.zero_grad();
    layer.forward(x);
    copy.forward(x);
    CHECK(copy.backward(dy) == layer.backward(dy));  // the same parameters
    auto assigned = layer;
    layer.forward(x);
    assigned = layer;  // assignment too
    CHECK_THROWS_AS(assigned.backward(dy), moe::Error);
    auto moved = std::move(layer);  // a move takes the forward, and leaves the source none
    CHECK_THROWS_AS(layer.backward(dy), moe::Error);  // what the move left: no forward
    CHECK(moved.backward(dy) == dx);
    auto& same = moved;
    moved = same;  // self-assignment keeps the layer as it is, its forward too
    moved.forward(x);
    moved = same;
    CHECK(moved.backward(dy) == dx);
  };
  Layer<moe::SelfRoute> self(good_config(), 15);
  check_copy(self);
  Layer<moe::Linear> linear(good_config(), 16);
  check_copy(linear);
}

TEST_CASE("bad input: an in-place forward (y over x) gives the separate buffers' output and losses; input_kept refuses it") {
  LayerConfig c = good_config();
  c.aux = {.load_balance = 0.01, .z_loss = 0.001};
  Layer<moe::SelfRoute> separate(c, 17), in_place(c, 17);
  const Matrix x = finite_input(7, 8, 18);
  for (const bool for_backward : {false, true}) {
    CAPTURE(for_backward);
    Matrix y(7, 8), xy = x;
    separate.forward_into(x, y, {.for_backward = for_backward});
    in_place.forward_into(xy, xy, {.for_backward = for_backward});
    CHECK(xy == y);
    CHECK(in_place.aux_losses().load_balance == separate.aux_losses().load_balance);
    CHECK(in_place.aux_losses().z_loss == separate.aux_losses().z_loss);
    // The logit moments read x's last columns before the output overwrote them.
    CHECK(in_place.stats().logit_means() == separate.stats().logit_means());
    CHECK(in_place.stats().logit_stds() == separate.stats().logit_stds());
  }
  Matrix xy = x;
  CHECK_ERROR_NAMES(error_of([&] { in_place.forward_into(xy, xy, {.input_kept = true}); }), "input_kept",
                    "output overlaps the input the backward will read");
  Matrix r = x, y(7, 8);
  CHECK_ERROR_NAMES(error_of([&] { in_place.forward_into(x, r, r, {.input_kept = true}); }), "input_kept");
  CHECK_NOTHROW(in_place.forward_into(x, r, y, {.input_kept = true}));
  // Its backward: the gate reads the caller's router input after dx is written, so dx must not be it.
  Matrix dx(7, 8), dr = Matrix::Zero(7, 8);
  CHECK_ERROR_NAMES(error_of([&] { in_place.backward_into(y, r, dr); }), "MoELayer backward", "input_kept",
                    "input gradient overlaps the router input");
  CHECK_ERROR_NAMES(error_of([&] { in_place.backward_into(y, dx, r); }), "router input gradient overlaps the router input");
  CHECK_NOTHROW(in_place.backward_into(y, dx, dr));
  Matrix kept = x;
  in_place.forward_into(kept, y, {.input_kept = true});
  CHECK_ERROR_NAMES(error_of([&] { in_place.backward_into(y, kept); }), "input gradient overlaps the input");
}

TEST_CASE("bad input: the backend's element-wise and routing primitives refuse operands of the wrong shape") {
  check_primitive_shapes(Backend{});
  check_primitive_shapes(moe::cpu::BasicBackend<double>{});
}
